//! `haven-gateway`: one binary for the process server, master target and configuration server
//! roles.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod config;

/// The Haven gateway.
#[derive(Debug, Parser)]
#[command(name = "haven-gateway", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks a gateway configuration without starting anything: every plugin loads, implements
    /// its world, imports only what its grants cover, and its storage root exists. Reports every
    /// problem at once.
    Validate {
        /// The gateway configuration (TOML).
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
}

/// Exit code for a configuration that does not validate.
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HAVEN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Validate { config } => match config::validate(&config) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in &errors {
                    eprintln!("error: {e}");
                }
                eprintln!("{}: {} error(s)", config.display(), errors.len());
                ExitCode::from(EXIT_CONFIG)
            }
        },
    }
}
