//! `haven-agent`: serve a protected disk over NBD through the write splitter, and inspect or
//! replay its change log.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use anyhow::Context;
use clap::{Parser, Subcommand};
use haven_agent::log::{ChangeLog, Limits};
use haven_agent::nbd::{self, Server};
use haven_agent::splitter::Splitter;

#[derive(Parser, Debug)]
#[command(
    name = "haven-agent",
    version,
    about = "Haven's agent: the write splitter of protected disks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a disk over NBD; every change lands on the disk and in the change log.
    Serve {
        /// Backing disk: a raw image file or a block device.
        #[arg(long)]
        disk: PathBuf,
        /// Folder of the change log (created if missing).
        #[arg(long)]
        log_dir: PathBuf,
        /// TCP address to listen on (default 127.0.0.1:10809 when --socket is not given).
        #[arg(long)]
        listen: Option<String>,
        /// Unix socket to listen on.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Export name (clients asking for the empty name get it too).
        #[arg(long, default_value = "disk")]
        export: String,
        /// Most bytes the change log may hold; writes beyond it fail with ENOSPC.
        #[arg(long, default_value_t = Limits::default().max_bytes)]
        log_max_bytes: u64,
        /// Size of one change-log segment file.
        #[arg(long, default_value_t = Limits::default().segment_bytes)]
        log_segment_bytes: u64,
    },
    /// Print the records of a change log: sequence, kind, offset, length.
    LogDump {
        /// Folder of the change log (the agent must not be running on it).
        #[arg(long)]
        log_dir: PathBuf,
    },
    /// Apply a change log onto a raw image, in order.
    LogReplay {
        /// Folder of the change log (the agent must not be running on it).
        #[arg(long)]
        log_dir: PathBuf,
        /// Raw image to apply the records to.
        #[arg(long)]
        onto: PathBuf,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("haven-agent: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            disk,
            log_dir,
            listen,
            socket,
            export,
            log_max_bytes,
            log_segment_bytes,
        } => {
            let limits = Limits {
                max_bytes: log_max_bytes,
                segment_bytes: log_segment_bytes,
            };
            let log = ChangeLog::open(&log_dir, limits)?;
            let splitter = Arc::new(Splitter::open(&disk, log)?);
            let server = Arc::new(Server::new(Arc::clone(&splitter), export.clone()));
            let listen = match (&listen, &socket) {
                (None, None) => Some("127.0.0.1:10809".to_string()),
                _ => listen,
            };
            let mut threads = Vec::new();
            if let Some(addr) = listen {
                let listener =
                    TcpListener::bind(&addr).with_context(|| format!("listening on {addr}"))?;
                let local = listener.local_addr()?;
                tracing::info!(addr = %local, export = %export, "listening on TCP");
                let server = Arc::clone(&server);
                threads.push(thread::spawn(move || server.serve_tcp(listener)));
            }
            if let Some(path) = socket {
                let listener = nbd::bind_unix(&path)
                    .with_context(|| format!("listening on Unix socket {}", path.display()))?;
                tracing::info!(socket = %path.display(), export = %export, "listening on Unix socket");
                let server = Arc::clone(&server);
                threads.push(thread::spawn(move || server.serve_unix(listener)));
            }
            tracing::info!(
                disk = %disk.display(),
                size = splitter.size(),
                log_dir = %log_dir.display(),
                "agent serving"
            );
            for t in threads {
                match t.join() {
                    Ok(r) => r?,
                    Err(_) => anyhow::bail!("a listener thread panicked"),
                }
            }
            Ok(())
        }
        Command::LogDump { log_dir } => {
            let limits = Limits {
                max_bytes: u64::MAX,
                segment_bytes: u64::MAX,
            };
            let log = ChangeLog::open(&log_dir, limits)?;
            let st = log.stats();
            println!(
                "# segments {} bytes {} first {} last {} durable {}",
                st.segments, st.bytes_used, st.first_seq, st.last_seq, st.durable_seq
            );
            for rec in log.read_from(st.first_seq)? {
                let rec = rec?;
                println!("{} {} {} {}", rec.seq, rec.kind.name(), rec.offset, rec.len);
            }
            Ok(())
        }
        Command::LogReplay { log_dir, onto } => {
            let st = haven_agent::replay::replay(&log_dir, &onto)?;
            println!(
                "applied {} records ({}..={}), {} bytes written",
                st.records, st.first_seq, st.last_seq, st.bytes_written
            );
            Ok(())
        }
    }
}
