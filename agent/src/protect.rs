//! `haven-agent serve` and `haven-agent protect`: opening protected disks, serving them over
//! NBD, and (for `protect`) replicating them.
//!
//! # Data folder of `protect`
//!
//! ```text
//! DATA/identity/{cert.pem, key.pem, ca.pem, agent.json}   enrollment (see identity.rs)
//! DATA/disks.json                                        the disks' paths, in id order
//! DATA/disk.state                                        disk 1's replication state (state.rs)
//! DATA/log/                                              disk 1's change log (`log/overflowed`:
//!                                                        it overflowed, see splitter.rs)
//! DATA/log.damaged-<unix time>/                          a damaged log, moved aside (resync)
//! DATA/disk<N>/{disk.state, log/, …}                     the same for disk N ≥ 2
//! DATA/status.json                                       the last report, every second
//! ```

use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tracing::Instrument;

use crate::identity::{Identity, host_part};
use crate::log::{ChangeLog, Durability, Limits, LogError};
use crate::nbd::{self, Server};
use crate::replicate::{self, Machine, Shared, ShipConfig, Target};
use crate::splitter::{OnFull, Splitter};
use crate::state::{DiskRecord, Phase};

/// Where NBD clients reach the disks (the command-line options of `serve` and `protect`). Each
/// disk is its own export on its own listener: `--listen` and `--socket` are given once per
/// `--disk`, in the same order.
#[derive(Clone, Debug, clap::Args)]
pub struct NbdConfig {
    /// TCP address to listen on; once per --disk, in their order (default 127.0.0.1:10809
    /// for a single disk when --socket is not given).
    #[arg(long)]
    pub listen: Vec<String>,
    /// Unix socket to listen on; once per --disk, in their order.
    #[arg(long)]
    pub socket: Vec<PathBuf>,
    /// Also serve the disk as the file `disk` in this (empty) folder, through FUSE: once per
    /// --disk, in their order. A loop device over it carries a real filesystem (`losetup -f
    /// --show DIR/disk`, then `mkfs`, `mount`); every write is captured as through NBD. Needs
    /// /dev/fuse and root (or fusermount3).
    #[arg(long, value_name = "DIR")]
    pub fuse: Vec<PathBuf>,
    /// Export name (clients asking for the empty name get it too): one for every disk, or
    /// once per --disk.
    #[arg(long)]
    pub export: Vec<String>,
    /// Serve NBD over TLS only (`NBD_OPT_STARTTLS`), with the certificates in this folder:
    /// `server-cert.pem`, `server-key.pem`, and `ca-cert.pem` (the site CA, which clients'
    /// certificates must come from) — what `haven-gateway nbd-cert --server NAME` writes.
    /// Required to listen on an address other than loopback.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// A file created once the disks are served (the listeners accept connections), holding
    /// the addresses served, one per line, disk by disk; removed when the agent stops. A
    /// script started the agent in the background waits for it before using the disks.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
}

/// Where one disk is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskNbd {
    pub listen: Option<String>,
    pub socket: Option<PathBuf>,
    /// The folder its file is served in (`--fuse`).
    pub fuse: Option<PathBuf>,
    pub export: String,
}

impl NbdConfig {
    /// Where each of `disks` disks is served, checked against the counts given.
    pub fn per_disk(&self, disks: usize) -> anyhow::Result<Vec<DiskNbd>> {
        for (option, given) in [
            ("--listen", self.listen.len()),
            ("--socket", self.socket.len()),
            ("--fuse", self.fuse.len()),
        ] {
            if given != 0 && given != disks {
                anyhow::bail!(
                    "{given} {option} for {disks} --disk: give {option} once per disk, in the \
                     same order (each disk is served on its own)"
                );
            }
        }
        if disks > 1 && self.listen.is_empty() && self.socket.is_empty() {
            anyhow::bail!(
                "{disks} disks need a place each: give --listen ADDR or --socket PATH once per \
                 --disk, in the same order"
            );
        }
        if !matches!(self.export.len(), 0 | 1) && self.export.len() != disks {
            anyhow::bail!(
                "{} --export for {disks} --disk: give one export name for all, or one per disk",
                self.export.len()
            );
        }
        Ok((0..disks)
            .map(|i| DiskNbd {
                listen: match (self.listen.get(i), self.socket.is_empty()) {
                    (Some(l), _) => Some(l.clone()),
                    (None, true) => Some("127.0.0.1:10809".to_string()),
                    (None, false) => None,
                },
                socket: self.socket.get(i).cloned(),
                fuse: self.fuse.get(i).cloned(),
                export: self
                    .export
                    .get(i)
                    .or(self.export.first())
                    .cloned()
                    .unwrap_or_else(|| "disk".to_string()),
            })
            .collect())
    }
}

/// The NBD listeners' threads; a thread's result says why it stopped.
type Listeners = Vec<thread::JoinHandle<std::io::Result<()>>>;

/// Serves each splitter at its place (`places`, in the same order) on listener threads; writes
/// the ready file once all listen. Returns the servers (to close them) and the threads.
pub fn serve_nbd(
    splitters: &[Arc<Splitter>],
    places: &[DiskNbd],
    cfg: &NbdConfig,
) -> anyhow::Result<(Vec<Arc<Server>>, Listeners)> {
    let tls = cfg.tls_dir.as_deref().map(nbd_tls).transpose()?;
    let scheme = if tls.is_some() { "nbds" } else { "nbd" };
    let (mut servers, mut threads) = (Vec::new(), Vec::new());
    let mut served = String::new();
    for (splitter, place) in splitters.iter().zip(places) {
        let backend: Arc<Splitter> = Arc::clone(splitter);
        let mut server = Server::new(backend, place.export.clone());
        if let Some(tls) = &tls {
            server = server.with_tls(tls.clone());
        }
        let server = Arc::new(server);
        if let Some(addr) = &place.listen {
            let listener =
                TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
            let local = listener.local_addr()?;
            if !local.ip().is_loopback() && tls.is_none() {
                anyhow::bail!(
                    "refusing to serve plain NBD on {addr}: without TLS the disk is served on \
                     loopback or a Unix socket only; give --tls-dir DIR with certificates from \
                     the site CA (`haven-gateway nbd-cert --server NAME --out DIR`)"
                );
            }
            tracing::info!(addr = %local, export = %place.export, tls = tls.is_some(), "listening on TCP");
            served.push_str(&format!("{scheme}://{local}/{}\n", place.export));
            let server = Arc::clone(&server);
            threads.push(thread::spawn(move || server.serve_tcp(listener)));
        }
        if let Some(path) = &place.socket {
            let listener = nbd::bind_unix(path)
                .with_context(|| format!("listening on Unix socket {}", path.display()))?;
            tracing::info!(socket = %path.display(), export = %place.export, "listening on Unix socket");
            served.push_str(&format!(
                "{scheme}+unix:///{}?socket={}\n",
                place.export,
                path.display()
            ));
            let server = Arc::clone(&server);
            threads.push(thread::spawn(move || server.serve_unix(listener)));
        }
        servers.push(server);
    }
    if let Some(ready) = &cfg.ready_file {
        haven_fsutil::write_atomic(ready, served.as_bytes(), 0o644)
            .with_context(|| format!("writing the ready file {}", ready.display()))?;
    }
    Ok((servers, threads))
}

/// Serves each splitter whose place names a folder (`--fuse`) as the file `disk` in it, until
/// the mounts returned are dropped.
pub fn serve_files(
    splitters: &[Arc<Splitter>],
    places: &[DiskNbd],
) -> anyhow::Result<Vec<haven_fusefile::Mount>> {
    let mut mounts = Vec::new();
    for (splitter, place) in splitters.iter().zip(places) {
        let Some(dir) = &place.fuse else { continue };
        let disk: Arc<dyn haven_nbd::Backend> = Arc::clone(splitter) as _;
        let file = haven_fusefile::File {
            name: "disk".into(),
            content: haven_fusefile::Content::Disk(disk),
        };
        let mount = haven_fusefile::mount(dir, vec![file])
            .with_context(|| format!("--fuse {}", dir.display()))?;
        tracing::info!(file = %dir.join("disk").display(), "serving the disk as a file");
        mounts.push(mount);
    }
    Ok(mounts)
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
    let places = nbd.per_disk(1)?;
    let log = ChangeLog::open(log_dir, limits)?;
    let splitter = Arc::new(Splitter::open(disk, log, OnFull::Refuse)?);
    let (_servers, threads) = serve_nbd(&[Arc::clone(&splitter)], &places, nbd)?;
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
    /// The backing disks, disk 1, 2, … in this order.
    pub disks: Vec<PathBuf>,
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
    /// A cache storage account to ship to instead of a process server.
    pub cache: crate::cache::CacheArgs,
    /// A disk protected for the first time is compared with a replica that already holds an
    /// older copy of it (reprotect, failback) instead of copied whole.
    pub seeded: bool,
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

/// Opens disk `id`'s `disk.state` and log (in `dir`), deciding whether the disk must be
/// resynced; `unclean` says why no log of the machine can be trusted, if none can.
fn open_state_and_log(
    dir: &Path,
    disk: &Path,
    limits: Limits,
    unclean: Option<&str>,
    seeded: bool,
) -> anyhow::Result<(DiskRecord, ChangeLog)> {
    haven_fsutil::create_dir_all(dir)?;
    let state_path = dir.join("disk.state");
    let log_dir = dir.join("log");
    let size = disk_size(disk)?;
    let Some(mut rec) = DiskRecord::load(&state_path)? else {
        if log_dir.exists() {
            anyhow::bail!(
                "{} holds a change log but no disk.state: it is not this disk's replication \
                 log (a `serve` log?); move it away to start protecting {} from scratch",
                log_dir.display(),
                disk.display()
            );
        }
        let rec = if seeded {
            tracing::info!(disk = %disk.display(), size,
                "first protection, seeded: comparing with the replica's copy instead of copying");
            DiskRecord::seeded(size)
        } else {
            tracing::info!(disk = %disk.display(), size, "first protection: initial sync");
            DiskRecord::new(size)
        };
        rec.store(&state_path)?;
        let log = ChangeLog::open(&log_dir, limits)?;
        return Ok((rec, log));
    };
    if rec.size != size {
        anyhow::bail!(
            "backing disk {} is {size} bytes but was {} bytes when its protection started \
             ({}); a resized disk needs a new protection: stop the agent, remove {} and {}, \
             and start again (a full initial sync)",
            disk.display(),
            rec.size,
            state_path.display(),
            state_path.display(),
            log_dir.display()
        );
    }
    let mut lost: Option<String> = None;
    if seeded && rec.compare_block == 0 {
        if rec.state == Phase::InitialSync {
            // A seed filled by a copy would keep its old data where the copy skips zeroes.
            rec.compare_block = crate::state::SEEDED_COMPARE_BLOCK;
            lost = Some(
                "started --seeded after an initial copy began without it: the copy is replaced \
                 by a comparison"
                    .into(),
            );
        } else {
            tracing::warn!(
                disk = %disk.display(),
                "--seeded is ignored: this disk's protection started before without it"
            );
        }
    }
    if let Some(why) = unclean {
        // Its records describe changes the resync finds anyway; nothing of it is kept.
        if log_dir.exists() {
            std::fs::remove_dir_all(&log_dir)
                .with_context(|| format!("removing {}", log_dir.display()))?;
            haven_fsutil::sync_dir(dir)?;
        }
        lost = Some(why.to_string());
    } else if !log_dir.exists() {
        lost = Some(format!("the change log {} is missing", log_dir.display()));
    }
    let log = match ChangeLog::open(&log_dir, limits) {
        Ok(log) if lost.is_none() && log.stats().last_seq < rec.log_seq => {
            let why = format!(
                "the change log {} ends at record {} but records up to {} were durable",
                log_dir.display(),
                log.stats().last_seq,
                rec.log_seq
            );
            drop(log);
            move_aside(dir, &log_dir)?;
            lost = Some(why);
            ChangeLog::open(&log_dir, limits)?
        }
        Ok(log) => log,
        Err(e @ LogError::Damaged { .. }) => {
            lost = Some(e.to_string());
            move_aside(dir, &log_dir)?;
            ChangeLog::open(&log_dir, limits)?
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(why) = lost {
        tracing::warn!(
            "{why}: the disk will be resynced by comparing block hashes with the replica"
        );
        crate::trail::remove_ranges(dir)?;
        rec.state = Phase::Resyncing;
        rec.sync_offset = 0;
        rec.remap = true;
        rec.log_seq = log.stats().durable_seq;
        rec.store(&state_path)?;
    }
    Ok((rec, log))
}

/// The list of the machine's disks, kept so that a restart with other disks is refused.
const DISKS_FILE: &str = "disks.json";

/// Checks `disks` against the disks the data folder protects (`DATA/disks.json`; a folder
/// from before it protects one disk if it holds a `disk.state`), then records them.
fn check_disks(data_dir: &Path, disks: &[PathBuf]) -> anyhow::Result<()> {
    let path = data_dir.join(DISKS_FILE);
    let known: Option<Vec<PathBuf>> = match std::fs::read(&path) {
        Ok(body) => Some(
            serde_json::from_slice(&body)
                .with_context(|| format!("reading {} (a JSON list of paths)", path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let count = match &known {
        Some(k) => Some(k.len()),
        None => data_dir.join("disk.state").exists().then_some(1),
    };
    if let Some(count) = count
        && count != disks.len()
    {
        let listed = known.as_ref().map_or_else(String::new, |k| {
            format!(
                " ({})",
                k.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        anyhow::bail!(
            "{} protects {count} disk(s){listed} but {} --disk were given: give every disk of \
             the machine, in the same order; to protect another set of disks, enroll the \
             agent anew with a new data folder (a full initial sync)",
            data_dir.display(),
            disks.len()
        );
    }
    if let Some(known) = &known {
        for (i, (was, now)) in known.iter().zip(disks).enumerate() {
            if was != now {
                tracing::warn!(disk = i + 1, was = %was.display(), now = %now.display(),
                    "the disk's path changed since the last start; its size is checked, its content is not");
            }
        }
    }
    let body = serde_json::to_vec_pretty(disks)?;
    haven_fsutil::write_atomic(&path, &body, 0o644)?;
    Ok(())
}

/// `haven-agent protect`: serve the machine's disks over NBD and replicate them, until
/// SIGTERM/SIGINT.
pub fn protect(cfg: ProtectConfig) -> anyhow::Result<()> {
    if cfg.disks.is_empty() {
        anyhow::bail!("give the machine's disks: --disk PATH, once per disk");
    }
    if cfg.disks.len() > crate::disk::MAX_DISKS {
        anyhow::bail!(
            "{} --disk: one agent protects at most {} disks",
            cfg.disks.len(),
            crate::disk::MAX_DISKS
        );
    }
    let places = cfg.nbd.per_disk(cfg.disks.len())?;
    let identity = Identity::load(&cfg.data_dir)?;
    check_disks(&cfg.data_dir, &cfg.disks)?;
    // After a planned failover the disks are never served again; what the logs still hold is
    // shipped, then the agent stops.
    let failed_over = crate::points::failed_over(&cfg.data_dir);
    if let Some(why) = &failed_over {
        tracing::warn!("not served: {why}; shipping what the change logs still hold");
    }
    let (policy, hooks) = cfg.points.resolve()?;
    // The logs are never synced while the agent runs (a killed agent loses nothing of them); a
    // machine restart without a clean stop resyncs the disks instead (`unclean_restart`).
    let unclean = unclean_restart(&cfg.data_dir);
    let mut opened = Vec::new();
    for (i, disk) in cfg.disks.iter().enumerate() {
        let id = i as u32 + 1;
        let dir = crate::disk::disk_dir(&cfg.data_dir, id);
        let (rec, mut log) =
            open_state_and_log(&dir, disk, cfg.limits, unclean.as_deref(), cfg.seeded)
                .with_context(|| format!("disk {id} ({})", disk.display()))?;
        log.set_durability(Durability::Process);
        opened.push((id, disk, rec, log));
    }
    mark_started(&cfg.data_dir)?;
    let mut disks = Vec::new();
    for (id, disk, rec, log) in opened {
        // A full log degrades the protection (a resync), never the workload.
        let splitter = Arc::new(Splitter::open(disk, log, OnFull::Overflow)?);
        let shared = Arc::new(Shared::new(
            id,
            Arc::clone(&splitter),
            &cfg.data_dir,
            rec,
            cfg.limits.max_bytes,
        ));
        // Record the log's durable seq now, so a log lost from here on is noticed.
        shared.update(|_| {})?;
        if failed_over.is_some() {
            splitter.shutdown()?;
        }
        disks.push(shared);
    }
    let machine = Arc::new(Machine::new(
        disks,
        &cfg.data_dir,
        identity.info.machine_name.clone(),
        identity.info.agent_id.clone(),
    ));
    let points = Arc::new(crate::points::Points::default());
    points.set_hooks(hooks);
    // Where to replicate: the process server given, the one a configuration server names, or
    // the one enrolled with.
    let cache = cfg.cache.open()?;
    let (target, from_config_server) = match (&cfg.server, &cache) {
        (_, Some(account)) => (
            Some(Target {
                name: Some("cache account".into()),
                server: account.describe(),
                server_name: String::new(),
                ca_pem: None,
            }),
            false,
        ),
        (Some(server), None) => (
            Some(Target {
                name: None,
                server: server.clone(),
                server_name: host_part(server).to_string(),
                ca_pem: None,
            }),
            false,
        ),
        (None, None) if identity.info.config_server => (crate::director::kept(&cfg.data_dir), true),
        (None, None) => (
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
        on_connection: Some(crate::points::control_hook(&machine, &points)),
        cache,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("haven-ship")
        .enable_all()
        .build()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // One stream per disk, each on its own connection (a disk's resync or move never holds up
    // another's records); the master target's requests are answered on any of them.
    let shippers: Vec<_> = machine
        .disks
        .iter()
        .map(|d| {
            let ship = replicate::ship(Arc::clone(d), ship_cfg.clone(), stop_rx.clone());
            rt.spawn(ship.instrument(tracing::info_span!("disk", id = d.disk)))
        })
        .collect();
    if let Some(account) = &ship_cfg.cache {
        let peer = identity.peer_id()?;
        rt.spawn(crate::cache::report_loop(
            Arc::clone(&machine),
            Arc::clone(account),
            peer,
            stop_rx.clone(),
        ));
        rt.spawn(crate::cache::control_loop(
            Arc::clone(&machine),
            Arc::clone(&points),
            Arc::clone(account),
            peer,
            stop_rx.clone(),
        ));
    }
    if from_config_server {
        rt.spawn(crate::director::run(
            Arc::clone(&machine),
            identity,
            targets,
            ask_now,
            stop_rx.clone(),
        ));
    } else {
        drop(targets);
    }
    let reporter = rt.spawn(replicate::report_loop(Arc::clone(&machine), stop_rx));

    let mut sync_threads = Vec::new();
    for d in &machine.disks {
        if d.record().state != Phase::InitialSync || failed_over.is_some() {
            continue;
        }
        let (shared, window_bytes) = (Arc::clone(d), cfg.window_bytes);
        sync_threads.push(
            thread::Builder::new()
                .name(format!("initial-sync-{}", d.disk))
                .spawn(move || {
                    if let Err(e) = replicate::initial_sync(&shared, window_bytes) {
                        tracing::error!(disk = shared.disk, error = %format!("{e:#}"), "initial sync stopped");
                    }
                })?,
        );
    }

    let (listeners, files) = if failed_over.is_some() {
        (Vec::new(), Vec::new())
    } else {
        let splitters: Vec<Arc<Splitter>> = machine
            .disks
            .iter()
            .map(|d| Arc::clone(&d.splitter))
            .collect();
        // The files first: the ready file (written with the listeners) means all is served.
        let files = serve_files(&splitters, &places)?;
        let (servers, listeners) = serve_nbd(&splitters, &places, &cfg.nbd)?;
        points.set_close_front_end(move || {
            for s in &servers {
                s.close();
            }
        });
        let (machine, points) = (Arc::clone(&machine), Arc::clone(&points));
        thread::Builder::new()
            .name("points".into())
            .spawn(move || crate::points::run_interval(machine, points, policy))?;
        (listeners, files)
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
    for d in &machine.disks {
        tracing::info!(
            disk = d.disk,
            path = %cfg.disks[d.disk as usize - 1].display(),
            size = d.splitter.size(),
            state = ?d.record().state,
            server = %server,
            "agent protecting"
        );
    }

    let ended = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let drained = async {
            // A planned failover closed the front ends (or had, before a restart): every
            // record is shipped before the agent stops, however long the path takes to come
            // back.
            for d in &machine.disks {
                let last = d.wire_seq(d.splitter.log_stats().last_seq);
                tracing::info!(
                    disk = d.disk,
                    last_seq = last,
                    "planned failover: shipping the last records"
                );
                while d.acked_seq() < last {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            tracing::warn!("planned failover: everything is shipped; the source stays stopped");
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

    // Stop: no more changes, everything durable, state recorded. (A file still in use, under
    // a mounted loop device, stays mounted until the process ends.)
    not_ready(&cfg.nbd);
    for mut f in files {
        if let Err(e) = f.unmount() {
            tracing::warn!(error = %e, "the disk file stays mounted until the agent exits");
        }
    }
    machine.stop();
    let _ = stop_tx.send(true);
    let mut durable = Vec::new();
    for d in &machine.disks {
        durable.push(d.splitter.shutdown()?);
    }
    for t in sync_threads {
        let _ = t.join();
    }
    rt.block_on(async {
        for shipper in shippers {
            let _ = tokio::time::timeout(Duration::from_secs(2), shipper).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), reporter).await;
    });
    for d in &machine.disks {
        d.update(|_| {})?;
    }
    mark_clean_stop(&cfg.data_dir)?;
    let _ = machine.write_status();
    rt.shutdown_timeout(Duration::from_secs(1));
    tracing::info!(durable_seqs = ?durable, "agent stopped");
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nbd(listen: &[&str], socket: &[&str], export: &[&str]) -> NbdConfig {
        NbdConfig {
            listen: listen.iter().map(|s| s.to_string()).collect(),
            socket: socket.iter().map(PathBuf::from).collect(),
            export: export.iter().map(|s| s.to_string()).collect(),
            fuse: Vec::new(),
            tls_dir: None,
            ready_file: None,
        }
    }

    #[test]
    fn each_disk_gets_its_own_place() {
        let one = nbd(&[], &[], &[]).per_disk(1).expect("default");
        assert_eq!(
            one,
            [DiskNbd {
                listen: Some("127.0.0.1:10809".into()),
                socket: None,
                fuse: None,
                export: "disk".into(),
            }]
        );
        let two = nbd(&["127.0.0.1:1", "127.0.0.1:2"], &[], &["a", "b"])
            .per_disk(2)
            .expect("two");
        assert_eq!(two[1].listen.as_deref(), Some("127.0.0.1:2"));
        assert_eq!(two[1].export, "b");
        let sockets = nbd(&[], &["/s1", "/s2"], &["x"]).per_disk(2).expect("two");
        assert_eq!(sockets[1].listen, None);
        assert_eq!(sockets[1].socket.as_deref(), Some(Path::new("/s2")));
        assert_eq!(sockets[1].export, "x");

        let e = nbd(&["127.0.0.1:1"], &[], &[])
            .per_disk(2)
            .expect_err("one listen");
        assert_eq!(
            e.to_string(),
            "1 --listen for 2 --disk: give --listen once per disk, in the same order (each disk \
             is served on its own)"
        );
        let e = nbd(&[], &[], &[]).per_disk(3).expect_err("no place");
        assert_eq!(
            e.to_string(),
            "3 disks need a place each: give --listen ADDR or --socket PATH once per --disk, in \
             the same order"
        );
    }

    #[test]
    fn a_data_folder_keeps_its_number_of_disks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disks: Vec<PathBuf> = ["/a", "/b", "/c"].iter().map(PathBuf::from).collect();
        check_disks(dir.path(), &disks).expect("first start");
        check_disks(dir.path(), &disks).expect("the same disks");
        let e = check_disks(dir.path(), &disks[..2]).expect_err("one less");
        assert_eq!(
            e.to_string(),
            format!(
                "{} protects 3 disk(s) (/a, /b, /c) but 2 --disk were given: give every disk of \
                 the machine, in the same order; to protect another set of disks, enroll the \
                 agent anew with a new data folder (a full initial sync)",
                dir.path().display()
            )
        );
        // A folder from before `disks.json` protects one disk.
        let old = tempfile::tempdir().expect("tempdir");
        std::fs::write(old.path().join("disk.state"), b"x").expect("write");
        let e = check_disks(old.path(), &disks).expect_err("three for one");
        assert!(
            e.to_string().contains("protects 1 disk(s) but 3 --disk"),
            "{e}"
        );
        check_disks(old.path(), &disks[..1]).expect("one");
    }
}
