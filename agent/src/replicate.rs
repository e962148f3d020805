//! Replication of a protected disk: the shipper, the initial pass, resync, and reports.
//!
//! # Sequence numbers
//!
//! The stream's seq of a record is its change-log seq plus `seq_base` (kept in `disk.state`).
//! `seq_base` is 0 from the first protection and changes only when a resync starts over a log
//! that no longer continues what the downstream holds.
//!
//! # Shipping
//!
//! The shipper runs on tokio. It connects (mutual TLS QUIC), opens one bidirectional stream and
//! runs a [`Sender`] over it. The [`Sender`] outlives connections (a [`Session`]); records are
//! pushed into it lazily from the log, at most `window_bytes + 8 MiB` of pushed-unreleased
//! bytes, and only records that are durable in the log and on the backing disk (the shipper
//! does that group commit itself, see [`Splitter::sync_for_shipping`]): the downstream never
//! holds a change the agent could lose. `Released` frees the log's segments.
//!
//! # Initial pass
//!
//! On first protection, [`initial_sync`] reads the disk in 1 MiB chunks and appends every chunk
//! that is not all zero to the log as a write record, under the splitter's lock, so it is
//! ordered with the workload's writes. It waits while the log is more than half full (its own
//! appends never overflow the log: only clients' writes do), records its progress in
//! `disk.state` (after a sync) and resumes from there. An overflow turns the disk to
//! `resyncing`, which supersedes the initial pass.
//!
//! # Resync
//!
//! The disk is `resyncing` when its log was lost or damaged, when the downstream resumes below
//! what the agent released (it lost records), or when the log overflowed (below). A resync
//! makes the replica equal to the disk by comparing SHA-256 digests of 64 KiB blocks.
//!
//! *Mapping.* While `disk.state` says `remap`, the stream seq of the log's first record is not
//! known: at the `Welcome` the shipper sets `seq_base` so that the log's first record maps onto
//! the downstream's resume point `M`, persists it (clearing `remap`) and reconnects. Nothing is
//! pushed while `remap` holds. Call `R0` the replica after every record below `M`, and `L` the
//! log's records from its first, in order: the replica ends as `R0` with `L` applied.
//!
//! *The pass*, range by range (at most [`RESYNC_RANGE`] bytes each), resumable from
//! `sync_offset`: (1) hold pushes until every record pushed so far is acknowledged; (2) ask the
//! range's digests (still holding pushes, so the process server's cache drains and it forwards
//! the request; the master target answers once it applied everything); (3) compare the range
//! with the disk, appending every block that differs to the log under the splitter's lock
//! (ordered with the workload's writes), while pushes go on; (4) sync, persist `sync_offset` at
//! the range's end, next range. The compare waits while the log is more than half full, and the
//! pushes of (3) drain it, so the log never has to hold more than half its size of captures:
//! however large the differences, a pass does not deadlock on a small log.
//!
//! *Why the replica converges.* Invariant: since the log's first record, every change to the
//! disk is in `L`, in the order it reached the disk (overflow breaks this, and is handled below).
//! Take a byte `x` of a range whose digests describe the replica after `R0` plus a prefix of `L`
//! (records are applied in order; the prefix holds only records appended before the comparison,
//! since they were pushed before the digests were computed), compared with the disk at time `T`:
//! - if `x`'s block differed, a capture of the disk's value at `T` is appended at `T`;
//! - if it was equal, the replica's `x` after that prefix equals the disk's `x` at `T`.
//!
//! In the end the replica's `x` is the value of the last record of `L` touching `x`, or `R0`'s
//! if none does. If a record after `T` touches `x`, the last one carries the disk's current value
//! (every change is logged, in disk order). Otherwise, with a capture, the last record touching
//! `x` is at or before `T` and carries the disk's value at `T`, which is current. Without a
//! capture: the last record touching `x` at or before `T`, if any, carries the disk's value at
//! `T` (the prefix applied for the digests either includes it, or ends before it and the record
//! still comes later); if none, the replica keeps the prefix's value, equal to the disk's at
//! `T`. So the replica ends equal to the disk, whatever prefix each range's digests saw; waiting
//! for acknowledgements before asking only keeps records in flight from showing up as
//! differences. A connection lost mid-pass resumes from `sync_offset` on the same mapping; a
//! mapping that changes (`remap`) restarts the pass from 0. When every range is compared, the
//! disk is `protected`: every difference is in the log and ships from it.
//!
//! # A full log
//!
//! The splitter does not fail writes when the log is full (see `splitter.rs`): it marks the log
//! overflowed and applies changes to the disk only. The shipper notices ([`Splitter::overflow`]),
//! and (1) records `state=resyncing`, `remap`, `sync_offset=0` in `disk.state` durably, with the
//! report's message naming the cause; (2) resets the log ([`Splitter::reset_log`]: its records are
//! dropped, no longer needed since the pass finds every difference, and the splitter logs again,
//! switched under its lock); (3) reconnects, so the mapping and the pass above start afresh on
//! the emptied log. The invariant holds again from the switch: changes before it are on the disk
//! and the pass (which starts after it) compares the disk; changes after it are in `L`. A crash
//! anywhere in between is safe: the overflow marker in the log folder was durable before the
//! first unlogged change reached the disk, so a restart never applies the void records and
//! resets the log the same way; `disk.state` says `resyncing` before the marker goes.
//!
//! Termination: a pass needs the log only for half its size at a time, so it completes as long
//! as the workload's write rate stays below what the link ships. If it does not, the log
//! overflows again and the resync starts over; the workload is never affected, and the report
//! says to raise `--log-max-bytes` or check the connection.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use haven_net::endpoint;
use haven_net::quinn;
use haven_net::stream::{DiskReport, DiskState, FrameReader, Report, write_frames};
use haven_wire::frame::error_code;
use haven_wire::{
    DiskInfo, ErrorFrame, Frame, HashRequest, Hashes, Payload, Record, Role, Sender, SenderConfig,
    SenderEvent, Seq, Violation, Write,
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::identity::{Identity, resolve};
use crate::log::{self, Kind};
use crate::splitter::{Captured, Overflow, SplitError, Splitter};
use crate::state::{DiskRecord, Phase};

/// The disk's id in the stream: one disk per agent process.
pub const DISK_ID: u32 = 1;
/// Block size of resync digests.
pub const RESYNC_BLOCK: u32 = 64 * 1024;
/// Chunk of the initial pass.
pub const SYNC_CHUNK: usize = 1 << 20;
/// Pushed-unreleased bytes allowed beyond the window.
const PUSH_SLACK: u64 = 8 << 20;
/// Most bytes of records read from the log in one go.
const FILL_BYTES: u64 = 8 << 20;
/// Most bytes of one range of the hash pass (4096 digests).
pub const RESYNC_RANGE: u64 = 4096 * RESYNC_BLOCK as u64;
/// How often the shipper looks for new records when idle.
const POLL: Duration = Duration::from_millis(10);
/// How often acknowledged records are freed from the log (when it is not filling up).
const RELEASE_EVERY: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Reconnection attempts back off to this at most (a restarted gateway is usually noticed at
/// once, by its stateless reset, and answers the first attempt).
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Where and how to replicate.
#[derive(Clone, Debug)]
pub struct ShipConfig {
    /// The process server, `HOST:PORT`.
    pub server: String,
    /// The name its certificate is checked against.
    pub server_name: String,
    /// The agent's identity.
    pub identity: Identity,
    /// The sender's window.
    pub window_bytes: u64,
}

/// State shared by the shipper, the initial pass, the reporter and the main thread.
#[derive(Debug)]
pub struct Shared {
    /// The protected disk.
    pub splitter: Arc<Splitter>,
    /// Recovery points: id counter, hooks, the front end to close on a planned failover.
    pub points: crate::points::Points,
    data_dir: PathBuf,
    state_path: PathBuf,
    status_path: PathBuf,
    record: Mutex<DiskRecord>,
    log_max_bytes: u64,
    machine_name: String,
    sync_done: AtomicU64,
    resync_sent: AtomicU64,
    shipped_total: AtomicU64,
    acked_seq: AtomicU64,
    conn: Mutex<Option<quinn::Connection>>,
    stopping: AtomicBool,
    /// Why the disk is not protected, for the report.
    message: Mutex<Option<String>>,
    /// Why the agent is not connected to the process server (refusal, loss), until it is again.
    link: Mutex<Option<String>>,
    /// The disk was failed over at the secondary site (the gateway said so): replication is
    /// stopped for good.
    failed_over: Mutex<Option<String>>,
    /// The agent's id, from its certificate.
    agent_id: String,
    /// Bumped (inside [`Shared::update`]) whenever a resync starts over: a pass of an older
    /// epoch must not record progress.
    epoch: AtomicU64,
}

impl Shared {
    /// Shared state over an opened disk and its (already stored) `disk.state`.
    pub fn new(
        splitter: Arc<Splitter>,
        data_dir: &std::path::Path,
        record: DiskRecord,
        log_max_bytes: u64,
        machine_name: String,
        agent_id: String,
    ) -> Shared {
        let sync_done = match record.state {
            Phase::InitialSync | Phase::Resyncing => record.sync_offset,
            Phase::Protected => record.size,
        };
        let acked = seq_add(splitter.log_stats().first_seq, record.seq_base).saturating_sub(1);
        Shared {
            splitter,
            points: crate::points::Points::default(),
            data_dir: data_dir.to_path_buf(),
            state_path: data_dir.join("disk.state"),
            status_path: data_dir.join("status.json"),
            record: Mutex::new(record),
            log_max_bytes,
            machine_name,
            sync_done: AtomicU64::new(sync_done),
            resync_sent: AtomicU64::new(0),
            shipped_total: AtomicU64::new(0),
            acked_seq: AtomicU64::new(acked),
            conn: Mutex::new(None),
            stopping: AtomicBool::new(false),
            message: Mutex::new(None),
            link: Mutex::new(None),
            failed_over: Mutex::new(None),
            agent_id,
            epoch: AtomicU64::new(0),
        }
    }

    fn set_link(&self, m: Option<String>) {
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = m;
    }

    fn set_message(&self, m: Option<String>) {
        *self.message.lock().unwrap_or_else(|e| e.into_inner()) = m;
    }

    /// The current `disk.state`.
    pub fn record(&self) -> DiskRecord {
        *self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes `disk.state` and writes it (with the log's durable seq refreshed). Never called
    /// with the splitter's lock held.
    pub fn update(&self, f: impl FnOnce(&mut DiskRecord)) -> anyhow::Result<DiskRecord> {
        let mut rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = *rec;
        f(&mut next);
        next.log_seq = self.splitter.log_stats().durable_seq;
        next.store(&self.state_path)?;
        *rec = next;
        Ok(next)
    }

    /// Asks the initial pass and the shipper to stop.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Whether the agent is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping()
    }

    /// The agent's data folder.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// The stream seq of change-log record `log_seq`.
    pub fn wire_seq(&self, log_seq: u64) -> u64 {
        seq_add(log_seq, self.record().seq_base)
    }

    /// Every record up to this stream seq is acknowledged durable downstream.
    pub fn acked_seq(&self) -> u64 {
        self.acked_seq.load(Ordering::Relaxed)
    }

    /// How much of the initial pass or resync is done, in whole percent.
    pub fn sync_percent(&self) -> u64 {
        let size = self.record().size.max(1);
        self.sync_done.load(Ordering::Relaxed).min(size) * 100 / size
    }

    /// The report of this moment.
    pub fn report(&self) -> Report {
        let rec = self.record();
        let st = self.splitter.log_stats();
        let sync_done = match rec.state {
            Phase::Protected => rec.size,
            Phase::InitialSync | Phase::Resyncing => self.sync_done.load(Ordering::Relaxed),
        };
        let resync_sent = self.resync_sent.load(Ordering::Relaxed);
        // Failed over: told by the gateway, or (planned) marked in the data folder.
        let failed_over = self
            .failed_over
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .or_else(|| crate::points::failed_over(&self.data_dir));
        let (state, message) = match failed_over {
            Some(why) => (DiskState::FailedOver, Some(why)),
            None => (
                rec.state.report_state(),
                self.message
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .or_else(|| self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            ),
        };
        Report {
            agent_id: self.agent_id.clone(),
            machine_name: self.machine_name.clone(),
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            disks: vec![DiskReport {
                disk: DISK_ID,
                size: rec.size,
                state,
                sync_done_bytes: sync_done,
                resync_sent_bytes: resync_sent,
                log_bytes: st.bytes_used,
                log_max_bytes: self.log_max_bytes,
                written_bytes_total: self.splitter.client_bytes(),
                shipped_bytes_total: self.shipped_total.load(Ordering::Relaxed),
                last_seq: seq_add(st.last_seq, rec.seq_base),
                acked_seq: self.acked_seq.load(Ordering::Relaxed),
                message,
            }],
        }
    }

    /// Writes `status.json` (atomically).
    pub fn write_status(&self) -> anyhow::Result<()> {
        let body = serde_json::to_vec_pretty(&self.report())?;
        Ok(haven_fsutil::write_atomic(&self.status_path, &body, 0o644)?)
    }
}

/// `seq + base`, never below 0.
fn seq_add(seq: u64, base: i64) -> u64 {
    (seq as i128 + base as i128).clamp(0, u64::MAX as i128) as u64
}

/// Whether `data` is all zero (16 bytes at a time).
pub fn all_zero(data: &[u8]) -> bool {
    let chunks = data.chunks_exact(16);
    let tail = chunks.remainder();
    chunks
        .map(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])))
        .all(|w| w == 0)
        && tail.iter().all(|&b| b == 0)
}

// ---------------------------------------------------------------------------------------------
// The initial pass.

/// The initial pass over the disk (see the module docs). Runs on its own thread until done,
/// until the disk leaves the initial-sync state (a resync supersedes it), or until stopped.
pub fn initial_sync(shared: &Shared, ahead_bytes: u64) -> anyhow::Result<()> {
    let splitter = &shared.splitter;
    let size = splitter.size();
    let mut offset = shared.record().sync_offset.min(size);
    let mut buf = vec![0u8; SYNC_CHUNK];
    let mut since_persist = 0;
    tracing::info!(offset, size, "initial sync running");
    while offset < size {
        if shared.stopping() || shared.record().state != Phase::InitialSync {
            return Ok(());
        }
        // Leave the workload room: wait while the log is more than half full. And stay at most
        // `ahead_bytes` of copies ahead of what the downstream acknowledged, so that progress
        // means shipped and the copies read the disk close to when they were logged.
        let st = splitter.log_stats();
        let unacked = seq_add(st.last_seq, shared.record().seq_base)
            .saturating_sub(shared.acked_seq.load(Ordering::Relaxed));
        if st.bytes_used > shared.log_max_bytes / 2 || unacked * SYNC_CHUNK as u64 > ahead_bytes {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let n = (size - offset).min(SYNC_CHUNK as u64) as usize;
        match splitter.capture_blocks(offset, &mut buf[..n], n, |_, d| !all_zero(d)) {
            Ok(_) => {}
            // Overflowed: the shipper turns the disk to resyncing, which supersedes this pass.
            Err(SplitError::LogFull(_) | SplitError::Overflowed) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(SplitError::ShuttingDown) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        offset += n as u64;
        shared.sync_done.store(offset, Ordering::Relaxed);
        since_persist += 1;
        if since_persist >= 8 || offset == size {
            since_persist = 0;
            splitter.sync_for_shipping()?;
            shared.update(|r| {
                if r.state == Phase::InitialSync {
                    r.sync_offset = offset;
                    if offset == size {
                        r.state = Phase::Protected;
                    }
                }
            })?;
        }
    }
    if shared.record().state == Phase::Protected {
        tracing::info!(size, "initial sync done: the disk is protected");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The shipper.

/// Records read from the log: (log seq, stream record).
type Filled = Vec<(u64, Record)>;

/// A [`Sender`] and what is pushed into it; lives across connections while `seq_base` holds.
struct Session {
    sender: Sender,
    base: i64,
    /// The log's first seq when the session started.
    first_log: u64,
    /// The next log seq to push.
    next_log: u64,
    /// Wire seq and cost of every pushed, unreleased record.
    costs: VecDeque<(Seq, u64)>,
    pushed_bytes: u64,
    fill: Option<JoinHandle<Result<Filled, String>>>,
    /// Log seq up to which the log may be freed, and when it last was.
    release_to: u64,
    released_at: Instant,
}

impl Session {
    fn new(shared: &Shared, window_bytes: u64, peer_id: [u8; 16]) -> anyhow::Result<Session> {
        let rec = shared.record();
        let first_log = shared.splitter.log_stats().first_seq;
        let mut first = seq_add(first_log, rec.seq_base);
        let mut base = rec.seq_base;
        if first == 0 || (rec.state == Phase::Resyncing && rec.remap) {
            // The mapping is unknown (only while resyncing): probe from 1, so that any resume
            // point is accepted; the `Welcome` then sets the mapping.
            base = 1 - first_log as i64;
            first = 1;
        }
        let mut config = SenderConfig::new(Role::Agent, peer_id);
        config.window_bytes = window_bytes;
        let info = DiskInfo {
            id: DISK_ID,
            size: rec.size,
            block_size: rec.block_size,
        };
        let sender = Sender::new(config, [(info, first)])?;
        shared.acked_seq.store(first - 1, Ordering::Relaxed);
        Ok(Session {
            sender,
            base,
            first_log,
            next_log: first_log,
            costs: VecDeque::new(),
            pushed_bytes: 0,
            fill: None,
            release_to: 0,
            released_at: Instant::now(),
        })
    }

    fn first_wire(&self) -> Seq {
        seq_add(self.first_log, self.base)
    }
}

/// Why a connection ended.
enum Outcome {
    /// The agent is stopping.
    Stop,
    /// `seq_base` changed: start a new session.
    Rebase,
    /// The log overflowed: reset it and resync (new session).
    Overflow,
    /// The connection ended; try again after the backoff. `welcomed`: it got as far as the
    /// `Welcome` (the backoff starts over).
    Lost { why: String, welcomed: bool },
    /// The gateway says the disk was failed over: replication stops for good.
    FailedOver(String),
}

/// A hash pass on one connection, range by range (see the module docs).
struct HashPass {
    size: u64,
    /// The epoch of [`Shared`] it belongs to.
    epoch: u64,
    /// Every range below this was compared and its differing blocks appended.
    done_to: u64,
    /// The range asked and not yet answered.
    asked: Option<HashRequest>,
    /// The comparison running.
    comparing: Option<JoinHandle<Result<Captured, SplitError>>>,
    /// Set when the pass is dropped, so that a comparison still running stops.
    cancel: Arc<AtomicBool>,
}

impl HashPass {
    fn new(size: u64, from: u64, epoch: u64) -> HashPass {
        HashPass {
            size,
            epoch,
            done_to: from.min(size),
            asked: None,
            comparing: None,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Pushing waits from the end of one comparison until the next range's digests arrive.
    fn holds_pushes(&self) -> bool {
        self.comparing.is_none() && self.done_to < self.size
    }

    fn done(&self) -> bool {
        self.done_to >= self.size && self.asked.is_none() && self.comparing.is_none()
    }
}

impl Drop for HashPass {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Release);
    }
}

/// Resolves when the splitter's log has overflowed.
async fn overflowed(splitter: &Splitter) {
    while splitter.overflow().is_none() {
        tokio::time::sleep(POLL).await;
    }
}

/// The log overflowed: record that the disk resyncs, then reset the log (module docs, "A full
/// log"). Blocking.
fn handle_overflow(shared: &Shared) -> anyhow::Result<()> {
    let Some(Overflow { used, max_bytes }) = shared.splitter.overflow() else {
        return Ok(());
    };
    let msg = format!(
        "change log full ({used} of {max_bytes} bytes); resyncing by block comparison — raise \
         --log-max-bytes or check the connection to the process server"
    );
    tracing::warn!("{msg}");
    shared.set_message(Some(msg));
    shared.update(|r| {
        r.state = Phase::Resyncing;
        r.remap = true;
        r.sync_offset = 0;
        shared.epoch.fetch_add(1, Ordering::AcqRel);
    })?;
    shared.sync_done.store(0, Ordering::Relaxed);
    shared.splitter.reset_log()?;
    // The log's durable seq, after the reset.
    shared.update(|_| {})?;
    Ok(())
}

/// Runs the shipper until `stop` turns true.
pub async fn ship(shared: Arc<Shared>, cfg: ShipConfig, mut stop: watch::Receiver<bool>) {
    let peer_id = match cfg.identity.peer_id() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot replicate");
            return;
        }
    };
    let mut backoff = BACKOFF_MIN;
    let mut session: Option<Session> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        if shared.splitter.overflow().is_some() {
            session = None;
            let sh = Arc::clone(&shared);
            match tokio::task::spawn_blocking(move || handle_overflow(&sh)).await {
                Ok(Ok(())) => backoff = BACKOFF_MIN,
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "resetting the overflowed change log");
                    tokio::select! {
                        _ = tokio::time::sleep(BACKOFF_MAX) => {}
                        _ = stop.changed() => return,
                    }
                    continue;
                }
                Err(_) => return,
            }
        }
        let s = match &mut session {
            Some(s) => s,
            None => match Session::new(&shared, cfg.window_bytes, peer_id) {
                Ok(s) => session.insert(s),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the replication stream");
                    return;
                }
            },
        };
        let outcome = connection(&shared, &cfg, s, &mut stop).await;
        s.sender.connection_lost();
        if let Some(conn) = shared.conn.lock().unwrap_or_else(|e| e.into_inner()).take() {
            conn.close(0u32.into(), b"agent reconnecting");
        }
        match outcome {
            Outcome::Stop => return,
            Outcome::Rebase => {
                session = None;
                backoff = BACKOFF_MIN;
            }
            Outcome::Overflow => continue,
            Outcome::FailedOver(why) => {
                let why = format!(
                    "{why}; the replica at the secondary site is the production copy now and \
                     writes here are no longer replicated (to protect this disk again, enroll \
                     the agent anew with a new data folder)"
                );
                tracing::warn!("replication stopped: {why}");
                *shared.failed_over.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                shared.set_link(None);
                // Nothing more to ship, ever: wait for the agent to stop.
                let _ = stop.wait_for(|stopping| *stopping).await;
                return;
            }
            Outcome::Lost { why, welcomed } => {
                if welcomed {
                    backoff = BACKOFF_MIN;
                }
                tracing::warn!(server = %cfg.server, retry_in_ms = backoff.as_millis() as u64,
                    "replication connection: {why}");
                shared.set_link(Some(format!("process server {}: {why}", cfg.server)));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = overflowed(&shared.splitter) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Names a connection error, with the gateway's refusal and what to do about it.
fn describe(err: &quinn::ConnectionError) -> String {
    use haven_net::Refusal;
    match Refusal::of(err) {
        Some(Refusal::CertificateRequired) => {
            "refused by the gateway: it requires a client certificate (enroll first)".into()
        }
        Some(Refusal::UnknownCa) => "refused by the gateway: this agent's certificate is not from \
             its site CA (enrolled with another site? remove DATA/identity and enroll again)"
            .into(),
        Some(Refusal::CertificateExpired) => {
            "refused by the gateway: this agent's certificate has expired (renew it)".into()
        }
        Some(Refusal::CertificateRevoked) => "refused by the gateway: this agent's certificate \
             was revoked (remove DATA/identity and enroll again with a new token)"
            .into(),
        Some(r) => format!("refused by the gateway ({r:?}): {err}"),
        None => match err {
            // This side refused the gateway: its certificate is not from our site's CA.
            quinn::ConnectionError::TransportError(t)
                if t.code == quinn::TransportErrorCode::crypto(48) =>
            {
                "the gateway's certificate is not from the site CA this agent enrolled with \
                 (wrong address, or enrolled with another site? remove DATA/identity and enroll \
                 again with this site's token)"
                    .into()
            }
            _ => format!("connection lost: {err}"),
        },
    }
}

fn lost(why: impl Into<String>, welcomed: bool) -> Outcome {
    Outcome::Lost {
        why: why.into(),
        welcomed,
    }
}

async fn join<T>(h: &mut Option<JoinHandle<T>>) -> Option<T> {
    match h {
        Some(handle) => {
            let r = handle.await.ok();
            *h = None;
            r
        }
        None => std::future::pending().await,
    }
}

/// One connection: connect, handshake, stream until it ends.
async fn connection(
    shared: &Arc<Shared>,
    cfg: &ShipConfig,
    s: &mut Session,
    stop: &mut watch::Receiver<bool>,
) -> Outcome {
    let id = &cfg.identity;
    let addr = match resolve(&cfg.server).await {
        Ok(a) => a,
        Err(e) => return lost(format!("{e:#}"), false),
    };
    let conn = tokio::select! {
        c = endpoint::connect(addr, &cfg.server_name, &id.ca_pem, &id.cert_pem, &id.key_pem) => c,
        _ = overflowed(&shared.splitter) => return Outcome::Overflow,
        _ = stop.changed() => return Outcome::Stop,
    };
    let conn = match conn {
        Ok(c) => c,
        Err(haven_net::NetError::Connection { source, .. }) => {
            return lost(describe(&source), false);
        }
        Err(e) => return lost(e.to_string(), false),
    };
    let (mut send, recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return lost(describe(&e), false),
    };
    *shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
    // Requests from the master target (points, planned failover) come on this connection; the
    // task ends with it.
    tokio::spawn(crate::points::serve_control(
        Arc::clone(shared),
        conn.clone(),
    ));
    let mut reader = FrameReader::new(recv);
    let size = shared.splitter.size();
    let window = s.sender.config().window_bytes;
    s.sender.connect(Instant::now());
    let mut welcomed = false;
    let mut pass: Option<HashPass> = None;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(%addr, first_seq = s.first_wire(), "replication connection open");

    loop {
        if shared.splitter.overflow().is_some() {
            return Outcome::Overflow;
        }
        let phase = shared.record().state;
        let now = Instant::now();

        // Read more records from the log when pushing is allowed and the budget has room:
        // resyncing, only while the pass lets pushes go (the mapping is known once it runs).
        let hold = phase == Phase::Resyncing && pass.as_ref().is_none_or(HashPass::holds_pushes);
        if !hold
            && s.fill.is_none()
            && s.pushed_bytes < window + PUSH_SLACK
            && shared.splitter.log_stats().last_seq >= s.next_log
        {
            let splitter = Arc::clone(&shared.splitter);
            let (from, base) = (s.next_log, s.base);
            s.fill = Some(tokio::task::spawn_blocking(move || {
                fill(&splitter, from, base)
            }));
        }

        // Free acknowledged records from the log, not on every ack (a release of the whole
        // log starts a new segment).
        if s.release_to >= s.first_log
            && (s.released_at.elapsed() >= RELEASE_EVERY
                || shared.splitter.log_stats().bytes_used > shared.log_max_bytes / 2)
        {
            let splitter = Arc::clone(&shared.splitter);
            let upto = s.release_to;
            s.released_at = Instant::now();
            s.release_to = 0;
            tokio::task::spawn_blocking(move || {
                if let Err(e) = splitter.release_log(upto) {
                    tracing::warn!(error = %e, "freeing acknowledged records from the log");
                }
            });
        }

        // The hash pass, range by range: ask a range once everything pushed is acknowledged.
        if let Some(p) = &mut pass {
            if p.asked.is_none()
                && p.comparing.is_none()
                && p.done_to < p.size
                && s.fill.is_none()
                && s.sender.unreleased() == 0
            {
                let req = HashRequest {
                    disk: DISK_ID,
                    offset: p.done_to,
                    len: (p.size - p.done_to).min(RESYNC_RANGE),
                    block_size: RESYNC_BLOCK,
                };
                if let Err(e) = s.sender.request_hashes(req) {
                    return lost(format!("asking the replica's digests: {e}"), welcomed);
                }
                p.asked = Some(req);
            }
            if p.done() {
                let epoch = p.epoch;
                pass = None;
                match shared.update(|r| {
                    if r.state == Phase::Resyncing
                        && !r.remap
                        && shared.epoch.load(Ordering::Acquire) == epoch
                    {
                        r.state = Phase::Protected;
                        r.sync_offset = 0;
                        shared.set_message(None);
                    }
                }) {
                    Ok(r) if r.state == Phase::Protected => {
                        tracing::info!(
                            sent_bytes = shared.resync_sent.load(Ordering::Relaxed),
                            "resync done: the disk is protected"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => return lost(format!("{e:#}"), welcomed),
                }
                continue;
            }
        }

        let frames: Vec<Frame> = std::iter::from_fn(|| s.sender.poll_transmit(now)).collect();
        if !frames.is_empty()
            && let Err(e) = write_frames(&mut send, frames).await
        {
            return lost(format!("sending: {e}"), welcomed);
        }

        while let Some(ev) = s.sender.poll_event() {
            match ev {
                SenderEvent::Connected => {
                    welcomed = true;
                    shared.set_link(None);
                    let released = s.sender.released(DISK_ID).unwrap_or(0);
                    tracing::info!(resume_seq = released + 1, "replication stream resumed");
                    shared.acked_seq.store(released, Ordering::Relaxed);
                    let rec = shared.record();
                    if rec.state == Phase::Resyncing {
                        if rec.remap {
                            // The log's first record must map to where the downstream resumes.
                            let base = released as i64 + 1 - s.first_log as i64;
                            let rebase = released + 1 != s.first_wire();
                            tracing::info!(
                                resume_seq = released + 1,
                                seq_base = base,
                                "resync: mapping the change log onto the replica's stream"
                            );
                            if let Err(e) = shared.update(|r| {
                                r.seq_base = base;
                                r.remap = false;
                                r.sync_offset = 0;
                            }) {
                                return lost(format!("{e:#}"), true);
                            }
                            if rebase {
                                return Outcome::Rebase;
                            }
                        }
                        let from = shared.record().sync_offset;
                        tracing::info!(
                            size,
                            from,
                            block = RESYNC_BLOCK,
                            "resync: comparing digests"
                        );
                        shared.sync_done.store(from, Ordering::Relaxed);
                        pass = Some(HashPass::new(
                            size,
                            from,
                            shared.epoch.load(Ordering::Acquire),
                        ));
                    }
                }
                SenderEvent::Released { up_to, .. } => {
                    while s.costs.front().is_some_and(|&(seq, _)| seq <= up_to) {
                        if let Some((_, cost)) = s.costs.pop_front() {
                            s.pushed_bytes -= cost;
                            shared.shipped_total.fetch_add(cost, Ordering::Relaxed);
                        }
                    }
                    shared.acked_seq.fetch_max(up_to, Ordering::Relaxed);
                    let log_seq = up_to as i128 - s.base as i128;
                    if log_seq >= 1 {
                        s.release_to = s.release_to.max(log_seq as u64);
                    }
                }
                SenderEvent::Hashes(h) => {
                    if let Some(p) = &mut pass
                        && let Some(req) = p.asked.filter(|r| r.offset == h.offset)
                    {
                        p.asked = None;
                        let (sh, cancel, epoch) =
                            (Arc::clone(shared), Arc::clone(&p.cancel), p.epoch);
                        p.comparing = Some(tokio::task::spawn_blocking(move || {
                            compare(&sh, req, &h, epoch, &cancel)
                        }));
                    } else {
                        tracing::warn!(offset = h.offset, "unasked digests ignored");
                    }
                }
                SenderEvent::PeerError(e) => {
                    if e.code == error_code::RESUME_GAP {
                        return enter_resync(shared, None, &e.message);
                    }
                    if e.code == error_code::FAILED_OVER {
                        return Outcome::FailedOver(e.message);
                    }
                    return lost(
                        format!(
                            "the gateway ended the stream: {} (code {})",
                            e.message, e.code
                        ),
                        welcomed,
                    );
                }
                SenderEvent::ProtocolError(v) => {
                    let frames: Vec<Frame> =
                        std::iter::from_fn(|| s.sender.poll_transmit(now)).collect();
                    let _ = write_frames(&mut send, frames).await;
                    let _ = send.finish();
                    if let Violation::ResumeGap { next_seq, .. } = v {
                        let base = next_seq as i64 - shared.splitter.log_stats().first_seq as i64;
                        return enter_resync(shared, Some(base), &v.to_string());
                    }
                    return lost(format!("protocol error: {v}"), welcomed);
                }
                SenderEvent::ConnectionDead => {
                    return lost("the gateway stopped answering", welcomed);
                }
            }
        }
        if s.sender.is_closed() {
            return lost("stream closed", welcomed);
        }

        let timeout = s.sender.poll_timeout();
        let phase_now = shared.record().state;
        tokio::select! {
            _ = stop.changed() => return Outcome::Stop,
            frame = reader.next() => match frame {
                Ok(Some(f)) => {
                    s.sender.handle(Instant::now(), f);
                    // Take what else has arrived without waiting.
                    loop {
                        match reader.try_next() {
                            Ok(Some(f)) => s.sender.handle(Instant::now(), f),
                            Ok(None) => break,
                            Err(e) => return decode_failed(&mut send, e, welcomed).await,
                        }
                    }
                }
                Ok(None) => return lost("the gateway finished the stream", welcomed),
                Err(e) => return decode_failed(&mut send, e, welcomed).await,
            },
            records = join(&mut s.fill) => match records {
                Some(Ok(records)) => {
                    if phase_now == Phase::Resyncing && pass.is_none() {
                        // Read before a resync started: drop, the session is about to change.
                        continue;
                    }
                    for (log_seq, r) in records {
                        let seq = r.seq();
                        let cost = r.wire_len();
                        if let Err(e) = s.sender.push(r) {
                            tracing::error!(error = %e, "pushing a log record");
                            return Outcome::Rebase;
                        }
                        s.costs.push_back((seq, cost));
                        s.pushed_bytes += cost;
                        s.next_log = log_seq + 1;
                    }
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "reading the change log");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                None => {}
            },
            done = async {
                match &mut pass {
                    Some(p) => join(&mut p.comparing).await,
                    None => std::future::pending().await,
                }
            } => {
                match done {
                    Some(Ok(c)) => {
                        if let Some(p) = &mut pass {
                            shared.resync_sent.fetch_add(c.bytes, Ordering::Relaxed);
                            p.done_to = (p.done_to + RESYNC_RANGE).min(size);
                            shared.sync_done.store(p.done_to, Ordering::Relaxed);
                        }
                    }
                    // Seen at the top of the loop.
                    Some(Err(SplitError::Overflowed)) => {}
                    Some(Err(e)) => return lost(format!("resync: {e}"), welcomed),
                    None => return lost("resync: a comparison task failed", welcomed),
                }
            },
            _ = async {
                match timeout {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => s.sender.handle_timeout(Instant::now()),
            _ = tick.tick() => {}
        }
    }
}

/// The peer's bytes did not decode: tell it, then end the connection.
async fn decode_failed(
    send: &mut quinn::SendStream,
    e: haven_net::stream::StreamError,
    welcomed: bool,
) -> Outcome {
    match e {
        haven_net::stream::StreamError::Decode(w) => {
            let frame = Frame::Error(ErrorFrame::from_wire_error(&w));
            let _ = write_frames(send, [frame]).await;
            let _ = send.finish();
            lost(format!("undecodable frame from the gateway: {w}"), welcomed)
        }
        haven_net::stream::StreamError::Read(quinn::ReadError::ConnectionLost(c)) => {
            lost(describe(&c), welcomed)
        }
        other => lost(other.to_string(), welcomed),
    }
}

/// The downstream lost records this agent released: the disk goes to resync.
fn enter_resync(shared: &Shared, base: Option<i64>, why: &str) -> Outcome {
    tracing::warn!(
        "the replica lost records already released here ({why}): resyncing by hash compare"
    );
    match shared.update(|r| {
        r.state = Phase::Resyncing;
        r.sync_offset = 0;
        r.remap = base.is_none();
        if let Some(b) = base {
            r.seq_base = b;
        }
        shared.epoch.fetch_add(1, Ordering::AcqRel);
    }) {
        Ok(_) => Outcome::Rebase,
        Err(e) => lost(format!("{e:#}"), true),
    }
}

/// Reads durable records from `from` (at most [`FILL_BYTES`]), as stream records.
fn fill(splitter: &Splitter, from: u64, base: i64) -> Result<Filled, String> {
    let durable = splitter.sync_for_shipping().map_err(|e| e.to_string())?;
    if durable < from {
        return Ok(Vec::new());
    }
    let reader = splitter.read_log_from(from).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let mut copied = false;
    for rec in reader {
        let mut rec = rec.map_err(|e| e.to_string())?;
        if rec.seq > durable {
            break;
        }
        if rec.kind == Kind::Copy {
            // The disk's content now: at least as new as at the record's place in the log.
            rec.data = vec![0; rec.len as usize];
            splitter
                .read(rec.offset, &mut rec.data)
                .map_err(|e| e.to_string())?;
            copied = true;
        }
        bytes += rec.data.len() as u64 + 64;
        let seq = rec.seq;
        out.push((seq, to_wire(rec, base)?));
        if bytes >= FILL_BYTES {
            break;
        }
    }
    if copied {
        // What was just read may include writes not yet synced: make them durable before any of
        // it leaves the machine (a replica must never hold what the source could lose).
        splitter.sync_disk().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// A log record as a stream record.
fn to_wire(rec: log::Record, base: i64) -> Result<Record, String> {
    if rec.kind == Kind::Tag {
        let tag = rec
            .tag()
            .ok_or_else(|| format!("change log record {}: a damaged tag", rec.seq))?;
        return Ok(Record::Tag(haven_wire::Tag {
            disk: DISK_ID,
            seq: seq_add(rec.seq, base),
            point: tag.point,
            kind: if tag.app {
                haven_wire::TagKind::App
            } else {
                haven_wire::TagKind::Crash
            },
            source_time_ms: tag.time_ms,
        }));
    }
    let data = match rec.kind {
        Kind::Write | Kind::Copy if all_zero(&rec.data) => Payload::Zero { len: rec.len },
        Kind::Write | Kind::Copy => Payload::Data(Bytes::from(rec.data)),
        Kind::Zero => Payload::Zero { len: rec.len },
        Kind::Trim | Kind::Tag => Payload::Trim { len: rec.len },
    };
    Ok(Record::Write(Write {
        disk: DISK_ID,
        seq: seq_add(rec.seq, base),
        offset: rec.offset,
        data,
    }))
}

/// Compares the local blocks of `req` with the replica's digests and appends those that
/// differ (a block without a digest counts as different), waiting while the log is more than
/// half full; then makes them durable and records the pass's progress (if the pass is still the
/// current one). Stops on `cancel`, on an overflow and when the agent stops.
fn compare(
    shared: &Shared,
    req: HashRequest,
    hashes: &Hashes,
    epoch: u64,
    cancel: &AtomicBool,
) -> Result<Captured, SplitError> {
    let splitter = &shared.splitter;
    let bs = req.block_size as usize;
    let end = (req.offset + req.len).min(splitter.size());
    let mut buf = vec![0u8; bs * 16];
    let mut total = Captured::default();
    let mut off = req.offset;
    let mut warned = Instant::now() - Duration::from_secs(60);
    while off < end {
        if cancel.load(Ordering::Acquire) || shared.stopping() {
            return Err(SplitError::ShuttingDown);
        }
        let n = (end - off).min(buf.len() as u64) as usize;
        if splitter.log_stats().bytes_used + n as u64 > shared.log_max_bytes / 2 {
            // Leave the workload room; the shipper drains the log meanwhile.
            if warned.elapsed() >= Duration::from_secs(10) {
                warned = Instant::now();
                tracing::info!("resync waits for the change log to drain below half full");
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let differs = |at: u64, data: &[u8]| {
            let digest = (hashes.block_size == req.block_size && at >= hashes.offset)
                .then(|| ((at - hashes.offset) / u64::from(hashes.block_size)) as usize)
                .and_then(|i| hashes.hashes.get(i));
            digest.is_none_or(|d| Sha256::digest(data).as_slice() != d.as_slice())
        };
        match splitter.capture_blocks(off, &mut buf[..n], bs, differs) {
            Ok(c) => {
                total.blocks += c.blocks;
                total.bytes += c.bytes;
                off += n as u64;
            }
            Err(SplitError::LogFull(_)) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e),
        }
    }
    splitter.sync_for_shipping()?;
    shared
        .update(|r| {
            if r.state == Phase::Resyncing
                && !r.remap
                && r.sync_offset == req.offset
                && shared.epoch.load(Ordering::Acquire) == epoch
            {
                r.sync_offset = end;
            }
        })
        .map_err(|e| {
            SplitError::Log(log::LogError::Invalid(format!(
                "recording the resync's progress: {e:#}"
            )))
        })?;
    Ok(total)
}

/// Every second: `status.json`, and a report to the gateway when connected.
pub async fn report_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let s = Arc::clone(&shared);
        let report = tokio::task::spawn_blocking(move || {
            if let Err(e) = s.write_status() {
                tracing::warn!(error = %e, "writing status.json");
            }
            s.report()
        })
        .await;
        let conn = shared
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let (Ok(report), Some(conn)) = (report, conn) {
            tokio::spawn(async move {
                if let Err(e) = haven_net::stream::send_report(&conn, &report).await {
                    tracing::debug!(error = %e, "sending a report");
                }
            });
        }
    }
}
