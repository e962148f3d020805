//! `haven-agent serve` and `haven-agent protect`: opening a protected disk, serving it over NBD,
//! and (for `protect`) replicating it.
//!
//! # Data folder of `protect`
//!
//! ```text
//! DATA/identity/{cert.pem, key.pem, ca.pem, agent.json}   enrollment (see identity.rs)
//! DATA/disk.state                                        replication state (see state.rs)
//! DATA/log/                                              the change log (`log/overflowed`:
//!                                                        it overflowed, see splitter.rs)
//! DATA/log.damaged-<unix time>/                          a damaged log, moved aside (resync)
//! DATA/status.json                                       the last report, every second
//! ```

use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::identity::{Identity, host_part};
use crate::log::{ChangeLog, Durability, Limits, LogError};
use crate::nbd::{self, Server};
use crate::replicate::{self, Shared, ShipConfig, Target};
use crate::splitter::{OnFull, Splitter};
use crate::state::{DiskRecord, Phase};

/// Where NBD clients reach the disk (the command-line options of `serve` and `protect`).
#[derive(Clone, Debug, clap::Args)]
pub struct NbdConfig {
    /// TCP address to listen on (default 127.0.0.1:10809 when --socket is not given).
    #[arg(long)]
    pub listen: Option<String>,
    /// Unix socket to listen on.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Export name (clients asking for the empty name get it too).
    #[arg(long, default_value = "disk")]
    pub export: String,
    /// Serve NBD over TLS only (`NBD_OPT_STARTTLS`), with the certificates in this folder:
    /// `server-cert.pem`, `server-key.pem`, and `ca-cert.pem` (the site CA, which clients'
    /// certificates must come from) — what `haven-gateway nbd-cert --server NAME` writes.
    /// Required to listen on an address other than loopback.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// A file created once the disk is served (the listeners accept connections), holding
    /// the addresses served, one per line; removed when the agent stops. A script started the
    /// agent in the background waits for it before using the disk.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
}

/// The NBD listeners' threads; a thread's result says why it stopped.
type Listeners = Vec<thread::JoinHandle<std::io::Result<()>>>;

/// Starts the NBD listeners on their threads; returns the server (to close it) and them.
pub fn serve_nbd(
    splitter: &Arc<Splitter>,
    cfg: &NbdConfig,
) -> anyhow::Result<(Arc<Server>, Listeners)> {
    let backend: Arc<Splitter> = Arc::clone(splitter);
    let mut server = Server::new(backend, cfg.export.clone());
    if let Some(dir) = &cfg.tls_dir {
        server = server.with_tls(nbd_tls(dir)?);
    }
    let server = Arc::new(server);
    let listen = match (&cfg.listen, &cfg.socket) {
        (None, None) => Some("127.0.0.1:10809".to_string()),
        (l, _) => l.clone(),
    };
    let scheme = if cfg.tls_dir.is_some() { "nbds" } else { "nbd" };
    let mut threads = Vec::new();
    let mut served = String::new();
    if let Some(addr) = listen {
        let listener = TcpListener::bind(&addr).with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        if !local.ip().is_loopback() && cfg.tls_dir.is_none() {
            anyhow::bail!(
                "refusing to serve plain NBD on {addr}: without TLS the disk is served on \
                 loopback or a Unix socket only; give --tls-dir DIR with certificates from the \
                 site CA (`haven-gateway nbd-cert --server NAME --out DIR`)"
            );
        }
        tracing::info!(addr = %local, export = %cfg.export, tls = cfg.tls_dir.is_some(), "listening on TCP");
        served.push_str(&format!("{scheme}://{local}/{}\n", cfg.export));
        let server = Arc::clone(&server);
        threads.push(thread::spawn(move || server.serve_tcp(listener)));
    }
    if let Some(path) = &cfg.socket {
        let listener = nbd::bind_unix(path)
            .with_context(|| format!("listening on Unix socket {}", path.display()))?;
        tracing::info!(socket = %path.display(), export = %cfg.export, "listening on Unix socket");
        served.push_str(&format!(
            "{scheme}+unix:///{}?socket={}\n",
            cfg.export,
            path.display()
        ));
        let server = Arc::clone(&server);
        threads.push(thread::spawn(move || server.serve_unix(listener)));
    }
    if let Some(ready) = &cfg.ready_file {
        haven_fsutil::write_atomic(ready, served.as_bytes(), 0o644)
            .with_context(|| format!("writing the ready file {}", ready.display()))?;
    }
    Ok((server, threads))
}

/// The TLS of an export from the certificates in `dir` (see [`NbdConfig::tls_dir`]).
fn nbd_tls(dir: &Path) -> anyhow::Result<haven_nbd::Tls> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (--tls-dir holds server-cert.pem, server-key.pem and ca-cert.pem, \
                 as `haven-gateway nbd-cert --server NAME` writes them)",
                path.display()
            )
        })
    };
    let config = haven_net::tls::nbd_server_config(
        &read("server-cert.pem")?,
        &read("server-key.pem")?,
        &read("ca-cert.pem")?,
        &[],
    )
    .with_context(|| format!("the NBD certificates in {}", dir.display()))?;
    Ok(haven_nbd::Tls::new(Arc::new(config)))
}

/// Removes the ready file of `cfg`, if any (the disk is no longer served).
pub fn not_ready(cfg: &NbdConfig) {
    if let Some(ready) = &cfg.ready_file {
        let _ = std::fs::remove_file(ready);
    }
}

/// `haven-agent serve`: the write splitter without replication.
pub fn serve(disk: &Path, log_dir: &Path, limits: Limits, nbd: &NbdConfig) -> anyhow::Result<()> {
    let log = ChangeLog::open(log_dir, limits)?;
    let splitter = Arc::new(Splitter::open(disk, log, OnFull::Refuse)?);
    let (_server, threads) = serve_nbd(&splitter, nbd)?;
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

/// Options of `haven-agent protect`.
#[derive(Clone, Debug)]
pub struct ProtectConfig {
    /// The data folder (enrolled).
    pub data_dir: PathBuf,
    /// The backing disk.
    pub disk: PathBuf,
    /// The process server, overriding `agent.json`.
    pub server: Option<String>,
    /// NBD front end.
    pub nbd: NbdConfig,
    /// Change-log limits.
    pub limits: Limits,
    /// The sender's window.
    pub window_bytes: u64,
    /// Recovery points: intervals and quiesce hooks.
    pub points: crate::points::PointsArgs,
}

/// Size of a raw file or block device.
fn disk_size(path: &Path) -> anyhow::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("opening backing disk {}", path.display()))?;
    let meta = f.metadata()?;
    Ok(if meta.file_type().is_block_device() {
        f.seek(SeekFrom::End(0))?
    } else {
        meta.len()
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Moves a lost or damaged log aside so a fresh one can start.
fn move_aside(data_dir: &Path, log_dir: &Path) -> anyhow::Result<()> {
    if !log_dir.exists() {
        return Ok(());
    }
    let mut to = data_dir.join(format!("log.damaged-{}", unix_now()));
    let mut n = 1;
    while to.exists() {
        to = data_dir.join(format!("log.damaged-{}-{n}", unix_now()));
        n += 1;
    }
    std::fs::rename(log_dir, &to)
        .with_context(|| format!("moving {} to {}", log_dir.display(), to.display()))?;
    haven_fsutil::sync_dir(data_dir)?;
    tracing::warn!(to = %to.display(), "moved the damaged change log aside");
    Ok(())
}

/// The file naming the boot the agent last started in.
const BOOT_FILE: &str = "boot-id";
/// Present when the agent last stopped cleanly (everything synced); removed at start.
const CLEAN_STOP: &str = "clean-stop";

/// This machine's boot id (`/proc/sys/kernel/random/boot_id`; `HAVEN_BOOT_ID_FILE` names
/// another file, for tests and drills).
fn boot_id() -> Option<String> {
    let path = std::env::var_os("HAVEN_BOOT_ID_FILE").map_or_else(
        || PathBuf::from("/proc/sys/kernel/random/boot_id"),
        PathBuf::from,
    );
    let id = std::fs::read_to_string(path).ok()?.trim().to_string();
    (!id.is_empty()).then_some(id)
}

/// Why the change log cannot be trusted, when the machine restarted since the agent last
/// started and the agent was not stopped cleanly. The log is not synced while the agent runs
/// (`Durability::Process`), and the kernel writes the disk's pages back in any order, so a
/// power cut can leave writes on the disk that the log lost; a killed agent loses nothing (the
/// kernel keeps what it wrote).
fn unclean_restart(data_dir: &Path) -> Option<String> {
    let previous = std::fs::read_to_string(data_dir.join(BOOT_FILE)).ok()?;
    let previous = previous.trim();
    let now = boot_id()?;
    if previous == now || data_dir.join(CLEAN_STOP).exists() {
        return None;
    }
    Some(format!(
        "the machine restarted since the agent last ran (boot {previous}, now {now}) and the \
         agent was not stopped cleanly: the last changes may be on the disk and not in the \
         change log"
    ))
}

/// Records the boot this run belongs to; the next stop is clean only once it says so.
fn mark_started(data_dir: &Path) -> anyhow::Result<()> {
    if let Some(id) = boot_id() {
        haven_fsutil::write_atomic(
            &data_dir.join(BOOT_FILE),
            format!("{id}\n").as_bytes(),
            0o644,
        )?;
    }
    match std::fs::remove_file(data_dir.join(CLEAN_STOP)) {
        Ok(()) => haven_fsutil::sync_dir(data_dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Records that the agent stopped with the disk and the log synced.
fn mark_clean_stop(data_dir: &Path) -> anyhow::Result<()> {
    haven_fsutil::write_atomic(
        &data_dir.join(CLEAN_STOP),
        b"the agent stopped with the disk and its change log synced\n",
        0o644,
    )?;
    Ok(())
}

/// Opens `disk.state` and the log, deciding whether the disk must be resynced.
fn open_state_and_log(cfg: &ProtectConfig) -> anyhow::Result<(DiskRecord, ChangeLog)> {
    let state_path = cfg.data_dir.join("disk.state");
    let log_dir = cfg.data_dir.join("log");
    let size = disk_size(&cfg.disk)?;
    let Some(mut rec) = DiskRecord::load(&state_path)? else {
        if log_dir.exists() {
            anyhow::bail!(
                "{} holds a change log but no disk.state: it is not this disk's replication \
                 log (a `serve` log?); move it away to start protecting {} from scratch",
                log_dir.display(),
                cfg.disk.display()
            );
        }
        let rec = DiskRecord::new(size);
        rec.store(&state_path)?;
        tracing::info!(disk = %cfg.disk.display(), size, "first protection: initial sync");
        let log = ChangeLog::open(&log_dir, cfg.limits)?;
        return Ok((rec, log));
    };
    if rec.size != size {
        anyhow::bail!(
            "backing disk {} is {size} bytes but was {} bytes when its protection started \
             ({}); a resized disk needs a new protection: stop the agent, remove {} and {}, \
             and start again (a full initial sync)",
            cfg.disk.display(),
            rec.size,
            state_path.display(),
            state_path.display(),
            log_dir.display()
        );
    }
    let mut lost: Option<String> = None;
    if let Some(why) = unclean_restart(&cfg.data_dir) {
        // Its records describe changes the resync finds anyway; nothing of it is kept.
        if log_dir.exists() {
            std::fs::remove_dir_all(&log_dir)
                .with_context(|| format!("removing {}", log_dir.display()))?;
            haven_fsutil::sync_dir(&cfg.data_dir)?;
        }
        lost = Some(why);
    } else if !log_dir.exists() {
        lost = Some(format!("the change log {} is missing", log_dir.display()));
    }
    let log = match ChangeLog::open(&log_dir, cfg.limits) {
        Ok(log) if lost.is_none() && log.stats().last_seq < rec.log_seq => {
            let why = format!(
                "the change log {} ends at record {} but records up to {} were durable",
                log_dir.display(),
                log.stats().last_seq,
                rec.log_seq
            );
            drop(log);
            move_aside(&cfg.data_dir, &log_dir)?;
            lost = Some(why);
            ChangeLog::open(&log_dir, cfg.limits)?
        }
        Ok(log) => log,
        Err(e @ LogError::Damaged { .. }) => {
            lost = Some(e.to_string());
            move_aside(&cfg.data_dir, &log_dir)?;
            ChangeLog::open(&log_dir, cfg.limits)?
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(why) = lost {
        tracing::warn!(
            "{why}: the disk will be resynced by comparing block hashes with the replica"
        );
        crate::trail::remove_ranges(&cfg.data_dir)?;
        rec.state = Phase::Resyncing;
        rec.sync_offset = 0;
        rec.remap = true;
        rec.log_seq = log.stats().durable_seq;
        rec.store(&state_path)?;
    }
    Ok((rec, log))
}

/// `haven-agent protect`: serve the disk over NBD and replicate it, until SIGTERM/SIGINT.
pub fn protect(cfg: ProtectConfig) -> anyhow::Result<()> {
    let identity = Identity::load(&cfg.data_dir)?;
    // After a planned failover the disk is never served again; what the log still holds is
    // shipped, then the agent stops.
    let failed_over = crate::points::failed_over(&cfg.data_dir);
    if let Some(why) = &failed_over {
        tracing::warn!(
            disk = %cfg.disk.display(),
            "not served: {why}; shipping what the change log still holds"
        );
    }
    let (policy, hooks) = cfg.points.resolve()?;
    let (rec, mut log) = open_state_and_log(&cfg)?;
    // The log is never synced while the agent runs (a killed agent loses nothing of it); a
    // machine restart without a clean stop resyncs the disk instead (`unclean_restart`).
    log.set_durability(Durability::Process);
    mark_started(&cfg.data_dir)?;
    // A full log degrades the protection (a resync), never the workload.
    let splitter = Arc::new(Splitter::open(&cfg.disk, log, OnFull::Overflow)?);
    let shared = Arc::new(Shared::new(
        Arc::clone(&splitter),
        &cfg.data_dir,
        rec,
        cfg.limits.max_bytes,
        identity.info.machine_name.clone(),
        identity.info.agent_id.clone(),
    ));
    // Record the log's durable seq now, so a log lost from here on is noticed.
    shared.update(|_| {})?;
    let points = Arc::new(crate::points::Points::default());
    points.set_hooks(hooks);
    if failed_over.is_some() {
        splitter.shutdown()?;
    }
    // Where to replicate: the process server given, the one a configuration server names, or
    // the one enrolled with.
    let (target, from_config_server) = match &cfg.server {
        Some(server) => (
            Some(Target {
                name: None,
                server: server.clone(),
                server_name: host_part(server).to_string(),
                ca_pem: None,
            }),
            false,
        ),
        None if identity.info.config_server => (crate::director::kept(&cfg.data_dir), true),
        None => (
            Some(Target {
                name: None,
                server: identity.info.server.clone(),
                server_name: identity.info.server_name.clone(),
                ca_pem: None,
            }),
            false,
        ),
    };
    let server = target.as_ref().map_or_else(
        || "(asking the configuration server)".to_string(),
        |t| t.server.clone(),
    );
    let (targets, target_rx) = tokio::sync::watch::channel(target);
    let ask_now = Arc::new(tokio::sync::Notify::new());
    let ship_cfg = ShipConfig {
        target: target_rx,
        ask_now: from_config_server.then(|| Arc::clone(&ask_now)),
        identity: identity.clone(),
        window_bytes: cfg.window_bytes,
        on_connection: Some(crate::points::control_hook(&shared, &points)),
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("haven-ship")
        .enable_all()
        .build()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shipper = rt.spawn(replicate::ship(
        Arc::clone(&shared),
        ship_cfg,
        stop_rx.clone(),
    ));
    if from_config_server {
        rt.spawn(crate::director::run(
            Arc::clone(&shared),
            identity,
            targets,
            ask_now,
            stop_rx.clone(),
        ));
    } else {
        drop(targets);
    }
    let reporter = rt.spawn(replicate::report_loop(Arc::clone(&shared), stop_rx));

    let sync_thread = (rec.state == Phase::InitialSync && failed_over.is_none()).then(|| {
        let shared = Arc::clone(&shared);
        let window_bytes = cfg.window_bytes;
        thread::Builder::new()
            .name("initial-sync".into())
            .spawn(move || {
                if let Err(e) = replicate::initial_sync(&shared, window_bytes) {
                    tracing::error!(error = %format!("{e:#}"), "initial sync stopped");
                }
            })
    });
    let sync_thread = sync_thread.transpose()?;

    let listeners = if failed_over.is_some() {
        Vec::new()
    } else {
        let (nbd_server, listeners) = serve_nbd(&splitter, &cfg.nbd)?;
        points.set_close_front_end(move || nbd_server.close());
        let shared = Arc::clone(&shared);
        let points = Arc::clone(&points);
        let data_dir = cfg.data_dir.clone();
        thread::Builder::new()
            .name("points".into())
            .spawn(move || crate::points::run_interval(shared, points, data_dir, policy))?;
        listeners
    };
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for t in listeners {
        let done_tx = done_tx.clone();
        thread::spawn(move || {
            let r = match t.join() {
                Ok(r) => r.map_err(anyhow::Error::from),
                Err(_) => Err(anyhow::anyhow!("a listener thread panicked")),
            };
            let _ = done_tx.send(r);
        });
    }
    drop(done_tx);
    tracing::info!(
        disk = %cfg.disk.display(),
        size = splitter.size(),
        state = ?rec.state,
        server = %server,
        "agent protecting"
    );

    let ended = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let drained = async {
            // A planned failover closed the front end (or had, before a restart): every record
            // is shipped before the agent stops, however long the path takes to come back.
            let last = shared.wire_seq(splitter.log_stats().last_seq);
            tracing::info!(
                last_seq = last,
                "planned failover: shipping the last records"
            );
            while shared.acked_seq() < last {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::warn!(
                acked_seq = shared.acked_seq(),
                "planned failover: everything is shipped; the source stays stopped"
            );
        };
        if failed_over.is_some() {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = int.recv() => tracing::info!("SIGINT: stopping"),
                () = drained => {}
            }
            return anyhow::Ok(());
        }
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
            r = done_rx.recv() => {
                if crate::points::failed_over(&cfg.data_dir).is_none() {
                    return r.unwrap_or(Ok(())).context("NBD listener stopped");
                }
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                    _ = int.recv() => tracing::info!("SIGINT: stopping"),
                    () = drained => {}
                }
            }
        }
        anyhow::Ok(())
    });

    // Stop: no more changes, everything durable, state recorded.
    not_ready(&cfg.nbd);
    shared.stop();
    let _ = stop_tx.send(true);
    let durable = splitter.shutdown()?;
    if let Some(t) = sync_thread {
        let _ = t.join();
    }
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(2), shipper).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), reporter).await;
    });
    shared.update(|_| {})?;
    mark_clean_stop(&cfg.data_dir)?;
    let _ = shared.write_status();
    rt.shutdown_timeout(Duration::from_secs(1));
    tracing::info!(durable_seq = durable, "agent stopped");
    ended
}
