//! `haven`, the operator's command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod image;
mod plugins;
mod recovery;
mod remote;

/// Haven: site recovery for machine disks.
#[derive(Debug, Parser)]
#[command(name = "haven", version, about)]
struct Cli {
    /// Folder holding the plugin components (`haven_raw.wasm`, `haven_vmdk.wasm`, …).
    /// Default: $HAVEN_PLUGIN_DIR, else the plugins next to this program.
    #[arg(long, global = true, value_name = "DIR")]
    plugin_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Disk images: info, create, convert, compare, map (qemu-img's conventions).
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Plugins: list the ones installed, inspect a component.
    #[command(subcommand)]
    Plugin(plugins::PluginCommand),
    /// Every protected disk the gateways know: state, sync progress, lag, throughput.
    Status {
        /// A gateway's API (repeat for several; default http://127.0.0.1:9480).
        #[arg(long)]
        api: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(remote::TokenCommand),
    /// Enrolled agents: list, revoke.
    #[command(subcommand)]
    Agent(remote::AgentCommand),
    /// Recovery points of a protected item: list, create.
    #[command(subcommand)]
    Point(recovery::PointCommand),
    /// Failover: `haven failover ITEM --point P|latest` (or `--planned`), and `test`,
    /// `cleanup`, `commit`, `show`.
    Failover(recovery::FailoverArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HAVEN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let plugins = plugins::Plugins::new(cli.plugin_dir);
    let result = match cli.command {
        Command::Image(c) => image::run(&plugins, c),
        Command::Plugin(c) => plugins::run(&plugins, c).map(|()| ExitCode::SUCCESS),
        Command::Status { api, json } => remote::status(&api, json).map(|()| ExitCode::SUCCESS),
        Command::Token(c) => remote::token(c).map(|()| ExitCode::SUCCESS),
        Command::Agent(c) => remote::agent(c).map(|()| ExitCode::SUCCESS),
        Command::Point(c) => recovery::point(c).map(|()| ExitCode::SUCCESS),
        Command::Failover(a) => recovery::failover(a).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("haven: {e:#}");
            // qemu-img's convention: 1 is "images differ" for compare, 2 an error.
            ExitCode::from(2)
        }
    }
}
