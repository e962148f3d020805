//! `haven-agent`: enroll with a gateway, protect a machine's disks (serve them over NBD through
//! the write splitter and replicate them), show its status, and inspect or replay a change log.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use haven_agent::identity;
use haven_agent::log::{ChangeLog, Limits};
use haven_agent::protect::{self, NbdConfig, ProtectConfig};
use haven_net::stream::Report;

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
    /// Enroll this machine using a one-time token, with the deployment's configuration server
    /// (`--config-server`: it names the process server to replicate to, and moves the agent
    /// when that one is lost) or with one process server (`--server`); stores DATA/identity.
    #[command(group = clap::ArgGroup::new("with").required(true).args(["server", "config_server"]))]
    Enroll {
        /// The agent's data folder.
        #[arg(long)]
        data_dir: PathBuf,
        /// A process server, HOST:PORT.
        #[arg(long)]
        server: Option<String>,
        /// The configuration server, HOST:PORT.
        #[arg(long)]
        config_server: Option<String>,
        /// The site this machine runs at (with --config-server; the pipeline's machine entry
        /// may name it instead).
        #[arg(long, requires = "config_server")]
        site: Option<String>,
        /// Name the gateway's certificate is checked against (default: the host part).
        #[arg(long)]
        server_name: Option<String>,
        /// The one-time enrollment token (haven1.…).
        #[arg(long)]
        token: String,
        /// This machine's name (default: the host name).
        #[arg(long)]
        machine_name: Option<String>,
    },
    /// Serve the machine's disks over NBD through the write splitter and replicate them to the
    /// gateway; a recovery point covers every disk at one instant.
    Protect {
        /// The agent's data folder (enrolled).
        #[arg(long)]
        data_dir: PathBuf,
        /// Backing disk: a raw image file or a block device; once per disk of the machine
        /// (disk 1, 2, … in this order, the same at every start).
        #[arg(long = "disk", required = true)]
        disks: Vec<PathBuf>,
        /// The gateway, HOST:PORT (default: the one enrolled with).
        #[arg(long)]
        server: Option<String>,
        #[command(flatten)]
        nbd: NbdConfig,
        /// Most bytes the change log may hold. Writes never fail when it is full: the agent
        /// stops logging, then resets the log and resyncs by block comparison.
        #[arg(long, default_value_t = Limits::default().max_bytes)]
        log_max_bytes: u64,
        /// Size of one change-log segment file.
        #[arg(long, default_value_t = Limits::default().segment_bytes)]
        log_segment_bytes: u64,
        /// Most bytes of records sent and not yet acknowledged by the gateway.
        #[arg(long, default_value_t = 64 << 20)]
        window_bytes: u64,
        #[command(flatten)]
        points: haven_agent::points::PointsArgs,
        #[command(flatten)]
        cache: haven_agent::cache::CacheArgs,
        /// The replica already holds an older copy of these disks (`haven reprotect` prepared
        /// it: the old source after a failover, the failover image before a failback): on
        /// first protection, compare block hashes and send only what differs instead of the
        /// initial copy. Ignored for disks protected before.
        #[arg(long)]
        seeded: bool,
    },
    /// Print the replication status of a protected disk (from DATA/status.json).
    Status {
        /// The agent's data folder.
        #[arg(long)]
        data_dir: PathBuf,
        /// Print the JSON report as it is.
        #[arg(long)]
        json: bool,
    },
    /// Serve a disk over NBD; every change lands on the disk and in the change log.
    Serve {
        /// Backing disk: a raw image file or a block device.
        #[arg(long)]
        disk: PathBuf,
        /// Folder of the change log (created if missing).
        #[arg(long)]
        log_dir: PathBuf,
        #[command(flatten)]
        nbd: NbdConfig,
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
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HAVEN_LOG")
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
        Command::Enroll {
            data_dir,
            server,
            config_server,
            site,
            server_name,
            token,
            machine_name,
        } => {
            let with = identity::Enrollment {
                config_server: config_server.is_some(),
                site,
            };
            let server = server.or(config_server).unwrap_or_default();
            let id = identity::enroll(
                &data_dir,
                &server,
                server_name.as_deref(),
                &token,
                machine_name.as_deref(),
                with,
            )?;
            println!(
                "enrolled as agent {} ({}) with {}; identity stored in {}",
                id.info.agent_id,
                id.info.machine_name,
                id.info.server,
                data_dir.join(identity::IDENTITY_DIR).display()
            );
            if id.info.config_server {
                // Known to the configuration server from now on; `protect` asks again anyway.
                match haven_agent::director::register(&data_dir) {
                    Ok(Some(ps)) => println!("assigned to process server {ps}"),
                    Ok(None) => println!("no process server assigned yet"),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"),
                        "cannot ask the configuration server yet; `protect` will"),
                }
            }
            Ok(())
        }
        Command::Protect {
            data_dir,
            disks,
            server,
            nbd,
            log_max_bytes,
            log_segment_bytes,
            window_bytes,
            points,
            cache,
            seeded,
        } => protect::protect(ProtectConfig {
            data_dir,
            disks,
            server,
            nbd,
            limits: Limits {
                max_bytes: log_max_bytes,
                segment_bytes: log_segment_bytes,
            },
            window_bytes,
            points,
            cache,
            seeded,
        }),
        Command::Status { data_dir, json } => status(&data_dir, json),
        Command::Serve {
            disk,
            log_dir,
            nbd,
            log_max_bytes,
            log_segment_bytes,
        } => protect::serve(
            &disk,
            &log_dir,
            Limits {
                max_bytes: log_max_bytes,
                segment_bytes: log_segment_bytes,
            },
            &nbd,
        ),
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
            if st.copies_skipped > 0 {
                println!(
                    "{} copy records passed over: they stand for the protected disk's own \
                     content (initial sync, resync), which the log does not hold",
                    st.copies_skipped
                );
            }
            Ok(())
        }
    }
}

/// `haven-agent status`: the last report the running agent wrote.
fn status(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let path = data_dir.join("status.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is `haven-agent protect --data-dir {}` running?)",
            path.display(),
            data_dir.display()
        )
    })?;
    if json {
        print!("{text}");
        return Ok(());
    }
    let report: Report =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let age_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        .saturating_sub(report.time_ms)
        / 1000;
    println!("machine {} (report {age_s} s old)", report.machine_name);
    println!(
        "{:>4}  {:<12}  {:>12}  {:>7}  {:>10}  {:>10}  {:>8}  {:>12}  {:>12}",
        "DISK", "STATE", "SIZE", "SYNC", "LAST SEQ", "ACKED SEQ", "LAG", "LOG", "SHIPPED"
    );
    for d in &report.disks {
        let sync = if d.size == 0 {
            100.0
        } else {
            d.sync_done_bytes as f64 * 100.0 / d.size as f64
        };
        println!(
            "{:>4}  {:<12}  {:>12}  {:>6.1}%  {:>10}  {:>10}  {:>8}  {:>12}  {:>12}",
            d.disk,
            d.state.name(),
            d.size,
            sync,
            d.last_seq,
            d.acked_seq,
            d.last_seq.saturating_sub(d.acked_seq),
            format!("{}/{}", d.log_bytes, d.log_max_bytes),
            d.shipped_bytes_total
        );
        if d.resync_sent_bytes > 0 {
            println!("      resync sent {} bytes", d.resync_sent_bytes);
        }
        if let Some(m) = &d.message {
            println!("      {m}");
        }
    }
    Ok(())
}
