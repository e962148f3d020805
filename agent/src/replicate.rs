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
//! What to ship, when to free the log, the mapping and the hash pass are decided by
//! [`haven_replication::Shipper`], a sans-IO machine; this module is its driver on tokio. It
//! connects (mutual TLS QUIC), opens one bidirectional stream, feeds the machine the stream's
//! frames, its timers and a view of the log, and runs what it asks: read records from the log
//! (on the blocking pool), free acknowledged segments, write `disk.state`, compare a range of
//! blocks. The machine outlives connections (a `Session`); records are pushed into it lazily
//! from the log, at most `window_bytes + 8 MiB` of pushed-unreleased bytes, and only records
//! that are durable in the log and on the backing disk (the read does that group commit, see
//! [`Splitter::sync_for_shipping`]): the downstream never holds a change the agent could lose.
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
//! *The pass*, range by range (at most `ShipperConfig::resync_range`, 256 MiB, each), resumable from
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
//! *A pass over some ranges only.* When a downstream that now serves the agent (a process
//! server that took it over) resumes below what the agent released on a protected disk, the
//! records between are lost downstream. Write `R0` for the replica after every record below
//! the resume point: it equals the disk as it was after those records. Every change since is
//! either in those lost records or in `L`. So a byte outside the lost records' extents has in
//! `R0` the disk's value of that time, and the argument above holds for it without a
//! comparison: comparing the lost records' extents (from the trail, `trail.rs`) is enough. If
//! the trail does not know them all (the agent restarted, or too many), or the disk was in its
//! initial pass (`R0` then lacks the chunks not copied yet), the whole disk is compared.
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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use haven_net::endpoint;
use haven_net::quinn;
use haven_net::stream::{FrameReader, write_frames};
use haven_replication::shipper::{
    Change, LogView, Resync, Shipper, ShipperAction, ShipperConfig, ShipperEnd, Start,
};
use haven_wire::{DiskInfo, ErrorFrame, Frame, HashRequest, Hashes, Payload, Record, Write};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::CacheLink;
use crate::disk::seq_add;
pub use crate::disk::{Machine, Shared};
use crate::identity::{Identity, resolve};
use crate::log::{self, Kind};
use crate::splitter::{Captured, Overflow, SplitError, Splitter};
use crate::state::Phase;
/// Chunk of the initial pass.
pub const SYNC_CHUNK: usize = 1 << 20;
/// Most bytes of records read from the log in one go.
const FILL_BYTES: u64 = 8 << 20;
/// How often the shipper looks for new records when idle.
const POLL: Duration = Duration::from_millis(10);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Reconnection attempts back off to this at most (a restarted gateway is usually noticed at
/// once, by its stateless reset, and answers the first attempt).
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The process server to replicate to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Its name, when a configuration server named it.
    pub name: Option<String>,
    /// `HOST:PORT`.
    pub server: String,
    /// The name its certificate is checked against.
    pub server_name: String,
    /// The CA that issued its certificate, PEM; `None`: the agent's own (it enrolled there).
    pub ca_pem: Option<String>,
}

/// Where and how to replicate.
#[derive(Clone)]
pub struct ShipConfig {
    /// The process server; `None` until the configuration server names one. A new value ends
    /// the connection to the old one.
    pub target: watch::Receiver<Option<Target>>,
    /// Woken when the process server says the agent was moved away from it (the configuration
    /// server is asked at once).
    pub ask_now: Option<Arc<tokio::sync::Notify>>,
    /// The agent's identity.
    pub identity: Identity,
    /// The sender's window.
    pub window_bytes: u64,
    /// Called with each new connection to the process server (the master target's requests
    /// for points and planned failover arrive on it).
    pub on_connection: Option<Arc<dyn Fn(quinn::Connection) + Send + Sync>>,
    /// Ship to this cache storage account instead of a process server (`cache.rs`).
    pub cache: Option<Arc<haven_cache_account::CacheAccount>>,
}

impl ShipConfig {
    /// Replication to the process server the agent enrolled with.
    pub fn enrolled(
        identity: Identity,
        window_bytes: u64,
        on_connection: Option<Arc<dyn Fn(quinn::Connection) + Send + Sync>>,
    ) -> ShipConfig {
        let target = Target {
            name: None,
            server: identity.info.server.clone(),
            server_name: identity.info.server_name.clone(),
            ca_pem: None,
        };
        ShipConfig {
            target: watch::channel(Some(target)).1,
            ask_now: None,
            identity,
            window_bytes,
            on_connection,
            cache: None,
        }
    }
}

impl std::fmt::Debug for ShipConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShipConfig")
            .field("target", &*self.target.borrow())
            .field("window_bytes", &self.window_bytes)
            .finish_non_exhaustive()
    }
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
// The shipper: a thin driver of `haven_replication::Shipper`.

/// Records read from the log: (log seq, stream record).
type Filled = Vec<(u64, Record)>;

/// A [`Shipper`] and the work it asked for that outlives a connection.
struct Session {
    shipper: Shipper,
    /// The log read running, and the base it maps with.
    fill: Option<(i64, JoinHandle<Result<Filled, String>>)>,
    /// What was already added to the shared totals.
    shipped: u64,
    resync_sent: u64,
}

impl Session {
    fn new(shared: &Shared, window_bytes: u64, peer_id: [u8; 16]) -> anyhow::Result<Session> {
        let rec = shared.record();
        let mut config = ShipperConfig::new(
            peer_id,
            DiskInfo {
                id: shared.disk,
                size: rec.size,
                block_size: rec.block_size,
            },
        );
        // The shipper's defaults: 8 MiB beyond the window, 64 KiB digests in ranges of 256 MiB,
        // acknowledged records freed every 500 ms.
        config.sender.window_bytes = window_bytes;
        if rec.compare_block != 0 {
            // Ranges as large as the default's (256 MiB), as many digests as a request may ask:
            // each range costs a round trip and a durable `sync_offset`, whatever its size.
            config.resync_block = rec.compare_block;
            config.resync_range = (u64::from(rec.compare_block)
                * haven_wire::frame::MAX_HASHES as u64)
                .min(config.resync_range);
        }
        // QUIC finds a gateway that is gone; a busy one answers late, and is waited for.
        config.sender.keepalive_timeout = haven_net::endpoint::STREAM_WATCHDOG;
        let resyncing = rec.state == Phase::Resyncing;
        let start = Start {
            seq_base: rec.seq_base,
            resync: resyncing.then_some(Resync {
                remap: rec.remap,
                sync_offset: rec.sync_offset,
            }),
            // A resync that must first find its mapping starts over on the whole disk.
            only: (resyncing && !rec.remap)
                .then(|| crate::trail::load_ranges(shared.dir(), rec.seq_base))
                .flatten(),
            log_first: shared.splitter.log_stats().first_seq,
        };
        let shipper = Shipper::new(config, start)?;
        shared
            .acked_seq
            .store(shipper.acked_seq(), Ordering::Relaxed);
        Ok(Session {
            shipper,
            fill: None,
            shipped: 0,
            resync_sent: 0,
        })
    }

    /// Copies the shipper's progress into the shared state the report and points read.
    fn publish(&mut self, shared: &Shared) {
        let sh = &self.shipper;
        shared.acked_seq.store(sh.acked_seq(), Ordering::Relaxed);
        let shipped = sh.shipped_bytes();
        shared
            .shipped_total
            .fetch_add(shipped - self.shipped, Ordering::Relaxed);
        self.shipped = shipped;
        let sent = sh.resync_sent_bytes();
        shared
            .resync_sent
            .fetch_add(sent - self.resync_sent, Ordering::Relaxed);
        self.resync_sent = sent;
        if let Some(done) = sh.sync_done() {
            shared.sync_done.store(done, Ordering::Relaxed);
        }
    }
}

/// Why a connection ended.
enum Outcome {
    /// The agent is stopping.
    Stop,
    /// `seq_base` changed (or stored state could not be written): start a new session from
    /// `disk.state`.
    Rebase,
    /// The log overflowed: the shipper turns the disk to resyncing.
    Overflow,
    /// The connection ended; try again after the backoff. `welcomed`: it got as far as the
    /// `Welcome` (the backoff starts over).
    Lost { why: String, welcomed: bool },
    /// The gateway says the disk was failed over: replication stops for good.
    FailedOver(String),
    /// The process server no longer serves this agent: ask where to go.
    Moved(String),
    /// Another process server was named: connect there at once.
    Retarget,
}

/// Resolves when the splitter's log has overflowed.
async fn overflowed(splitter: &Splitter) {
    while splitter.overflow().is_none() {
        tokio::time::sleep(POLL).await;
    }
}

/// Makes a change the shipper decided durable in `disk.state` (blocking).
fn persist(shared: &Shared, change: Change) -> anyhow::Result<()> {
    match &change {
        Change::Mapped {
            seq_base,
            resume_seq,
        } => tracing::info!(
            resume_seq,
            seq_base,
            "resync: mapping the change log onto the replica's stream"
        ),
        Change::Resync { why, .. } => {
            tracing::warn!("{why}");
            shared.set_message(Some(why.clone()));
            shared.sync_done.store(0, Ordering::Relaxed);
        }
        Change::Progress { .. } | Change::Protected => {}
    }
    // The ranges of an earlier resync go first: a ranges file always belongs to the resync
    // `disk.state` names (a crash in between leaves none, and the whole disk is compared).
    let ranges_path = crate::trail::ranges_path(shared.dir());
    // Only a protected disk's replica equals the disk up to the lost records: during the
    // initial pass it lacks more (the chunks not yet copied), so the whole disk is compared.
    let only = match &change {
        Change::Resync {
            seq_base: Some(base),
            lost: Some((first, last)),
            ..
        } if shared.record().state == Phase::Protected => shared
            .trail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ranges(
                *first,
                *last,
                u64::from(haven_replication::shipper::DEFAULT_RESYNC_BLOCK),
                shared.record().size,
            )
            .map(|ranges| crate::trail::StoredRanges {
                seq_base: *base,
                ranges,
            }),
        _ => None,
    };
    if matches!(
        change,
        Change::Resync { .. } | Change::Protected | Change::Mapped { .. }
    ) {
        crate::trail::remove_ranges(shared.dir())
            .with_context(|| format!("removing {}", ranges_path.display()))?;
    }
    let rec = shared.update(|r| match change {
        Change::Mapped { seq_base, .. } => {
            r.seq_base = seq_base;
            r.remap = false;
            r.sync_offset = 0;
        }
        Change::Resync { seq_base, .. } => {
            r.state = Phase::Resyncing;
            r.sync_offset = 0;
            r.remap = seq_base.is_none();
            if let Some(b) = seq_base {
                r.seq_base = b;
            }
        }
        Change::Progress { sync_offset } => {
            if r.state == Phase::Resyncing && !r.remap {
                r.sync_offset = sync_offset;
            }
        }
        Change::Protected => {
            if r.state == Phase::Resyncing {
                r.state = Phase::Protected;
                r.sync_offset = 0;
            }
        }
    })?;
    if let Some(stored) = only {
        let bytes: u64 = stored.ranges.iter().map(|r| r.1).sum();
        tracing::info!(
            ranges = stored.ranges.len(),
            bytes,
            "resync: comparing only what the records the downstream lost wrote"
        );
        haven_fsutil::write_atomic(&ranges_path, &serde_json::to_vec(&stored)?, 0o644)?;
    }
    if matches!(change, Change::Protected) && rec.state == Phase::Protected {
        shared.set_message(None);
        tracing::info!(
            sent_bytes = shared.resync_sent.load(Ordering::Relaxed),
            "resync done: the disk is protected"
        );
    }
    Ok(())
}

/// The log overflowed: the shipper records that the disk resyncs, then the log is reset
/// (module docs, "A full log"). Blocking.
fn handle_overflow(shared: &Shared, session: &mut Session) -> anyhow::Result<()> {
    let Some(Overflow { used, max_bytes }) = shared.splitter.overflow() else {
        return Ok(());
    };
    session.shipper.overflowed(format!(
        "change log full ({used} of {max_bytes} bytes); resyncing by block comparison — raise \
         --log-max-bytes or check the connection to the process server"
    ));
    while let Some(action) = session.shipper.poll_action(Instant::now()) {
        match action {
            ShipperAction::Persist(change) => persist(shared, change)?,
            ShipperAction::ResetLog => {
                shared.splitter.reset_log()?;
                let first = shared.splitter.log_stats().first_seq;
                shared
                    .trail
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .reset(first);
                // The log's durable seq, after the reset.
                shared.update(|_| {})?;
            }
            other => tracing::debug!(?other, "not run: the shipper is being replaced"),
        }
    }
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
    let mut target_rx = cfg.target.clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let Some(target) = target_rx.borrow_and_update().clone() else {
            shared.set_link(Some(
                "waiting for the configuration server to name a process server".into(),
            ));
            tokio::select! {
                _ = changed(&mut target_rx) => {}
                _ = stop.changed() => return,
            }
            continue;
        };
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
        if shared.splitter.overflow().is_some() {
            let result = tokio::task::block_in_place(|| handle_overflow(&shared, s));
            session = None;
            match result {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "resetting the overflowed change log");
                    tokio::select! {
                        _ = tokio::time::sleep(BACKOFF_MAX) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
            continue;
        }
        let outcome = connection(&shared, &cfg, &target, s, &mut stop, &mut target_rx).await;
        s.shipper.connection_lost();
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
            Outcome::Retarget => {
                backoff = BACKOFF_MIN;
                continue;
            }
            Outcome::Moved(why) => {
                tracing::warn!(server = %target.server,
                    "the process server no longer serves this agent: {why}; asking the \
                     configuration server where to replicate");
                shared.set_link(Some(format!(
                    "process server {}: moved away ({why}); waiting for the configuration server",
                    target.server
                )));
                if let Some(ask) = &cfg.ask_now {
                    ask.notify_one();
                }
                // Back to the same process server only if the configuration server says so
                // (or has not answered for a while).
                tokio::select! {
                    _ = changed(&mut target_rx) => {}
                    _ = tokio::time::sleep(MOVED_WAIT) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
            Outcome::Lost { why, welcomed } => {
                if welcomed {
                    backoff = BACKOFF_MIN;
                }
                tracing::warn!(server = %target.server, retry_in_ms = backoff.as_millis() as u64,
                    "replication connection: {why}");
                let peer = match cfg.cache {
                    Some(_) => "cache account",
                    None => "process server",
                };
                shared.set_link(Some(format!("{peer} {}: {why}", target.server)));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = overflowed(&shared.splitter) => {}
            _ = changed(&mut target_rx) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// After a process server said the agent moved, the longest wait for the configuration
/// server to name another before trying it again.
const MOVED_WAIT: Duration = Duration::from_secs(10);

/// A new target; never, once no one can send one (a target given on the command line).
async fn changed(rx: &mut watch::Receiver<Option<Target>>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
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

/// Sets a flag when dropped: a comparison still running for an ended connection stops.
struct Cancel(Arc<AtomicBool>);

impl Drop for Cancel {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// One connection: connect, handshake, then run the shipper's actions and frames until it says
/// the connection is over.
async fn connection(
    shared: &Arc<Shared>,
    cfg: &ShipConfig,
    target: &Target,
    s: &mut Session,
    stop: &mut watch::Receiver<bool>,
    target_rx: &mut watch::Receiver<Option<Target>>,
) -> Outcome {
    let mut link = match &cfg.cache {
        Some(account) => {
            let peer = match cfg.identity.peer_id() {
                Ok(p) => p,
                Err(e) => return lost(e.to_string(), false),
            };
            let open = CacheLink::open(Arc::clone(account), peer, shared.disk);
            tokio::select! {
                l = open => match l {
                    Ok(l) => Link::Cache(Box::new(l)),
                    Err(e) => return lost(e, false),
                },
                _ = overflowed(&shared.splitter) => return Outcome::Overflow,
                _ = stop.changed() => return Outcome::Stop,
            }
        }
        None => match quic(shared, cfg, target, stop, target_rx).await {
            Ok(l) => l,
            Err(outcome) => return outcome,
        },
    };
    s.shipper.connect(Instant::now());
    let mut welcomed = false;
    // The comparison of a range (resync) running, with the offset it answers.
    let mut comparing: Option<JoinHandle<(u64, Result<Captured, SplitError>)>> = None;
    let cancel = Cancel(Arc::new(AtomicBool::new(false)));
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(server = %target.server, first_seq = s.shipper.first_seq(), "replication connection open");

    loop {
        if shared.splitter.overflow().is_some() {
            return Outcome::Overflow;
        }
        let st = shared.splitter.log_stats();
        s.shipper.log(LogView {
            first_seq: st.first_seq,
            last_seq: st.last_seq,
            bytes_used: st.bytes_used,
            max_bytes: shared.log_max_bytes,
        });
        let now = Instant::now();
        while let Some(action) = s.shipper.poll_action(now) {
            match action {
                ShipperAction::Persist(change) => {
                    if let Err(e) = tokio::task::block_in_place(|| persist(shared, change)) {
                        tracing::error!(error = %format!("{e:#}"), "writing disk.state");
                        return Outcome::Rebase;
                    }
                }
                ShipperAction::Fill { from, base } => {
                    let (splitter, disk) = (Arc::clone(&shared.splitter), shared.disk);
                    s.fill = Some((
                        base,
                        tokio::task::spawn_blocking(move || fill(&splitter, disk, from, base)),
                    ));
                }
                ShipperAction::Release { up_to } => {
                    let splitter = Arc::clone(&shared.splitter);
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = splitter.release_log(up_to) {
                            tracing::warn!(error = %e, "freeing acknowledged records from the log");
                        }
                    });
                }
                ShipperAction::Compare { request, hashes } => {
                    shared
                        .resync_compared
                        .fetch_add(request.len, Ordering::Relaxed);
                    if request.offset == 0 || comparing.is_none() {
                        tracing::debug!(offset = request.offset, "resync: comparing a range");
                    }
                    let (sh, stop_flag) = (Arc::clone(shared), Arc::clone(&cancel.0));
                    comparing = Some(tokio::task::spawn_blocking(move || {
                        (request.offset, compare(&sh, request, &hashes, &stop_flag))
                    }));
                }
                ShipperAction::ResetLog => return Outcome::Overflow,
            }
        }
        s.publish(shared);
        if !welcomed && s.shipper.is_streaming() {
            welcomed = true;
            shared.set_link(None);
            tracing::info!(
                resume_seq = s.shipper.acked_seq() + 1,
                "replication stream resumed"
            );
        }

        let frames: Vec<Frame> = std::iter::from_fn(|| s.shipper.poll_transmit(now)).collect();
        if !frames.is_empty()
            && let Err(e) = link.write(frames).await
        {
            return lost(format!("sending: {e}"), welcomed);
        }
        if let Some(end) = s.shipper.poll_end() {
            link.finish();
            return match end {
                ShipperEnd::Rebase => Outcome::Rebase,
                ShipperEnd::Lost { why, welcomed } => lost(why, welcomed),
                ShipperEnd::FailedOver(why) => Outcome::FailedOver(why),
                ShipperEnd::Moved(why) => Outcome::Moved(why),
            };
        }

        let timeout = s.shipper.poll_timeout();
        tokio::select! {
            _ = stop.changed() => return Outcome::Stop,
            _ = changed(target_rx) => {
                link.finish();
                return Outcome::Retarget;
            }
            frame = link.next(welcomed) => match frame {
                Ok(Some(f)) => {
                    s.shipper.handle_frame(Instant::now(), f);
                    // Take what else has arrived without waiting.
                    loop {
                        match link.try_next(welcomed).await {
                            Ok(Some(f)) => s.shipper.handle_frame(Instant::now(), f),
                            Ok(None) => break,
                            Err(outcome) => return outcome,
                        }
                    }
                }
                Ok(None) => return lost("the gateway finished the stream", welcomed),
                Err(outcome) => return outcome,
            },
            records = async {
                match &mut s.fill {
                    Some((_, h)) => h.await.ok(),
                    None => std::future::pending().await,
                }
            } => {
                let base = s.fill.take().map_or(0, |(b, _)| b);
                match records {
                    Some(Ok(records)) => {
                        shared.trail.lock().unwrap_or_else(|e| e.into_inner()).note(&records);
                        s.shipper.filled(base, records);
                    }
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "reading the change log");
                        s.shipper.fill_failed(Instant::now());
                    }
                    None => s.shipper.fill_failed(Instant::now()),
                }
            },
            done = join(&mut comparing) => match done {
                Some((offset, Ok(c))) => s.shipper.compared(offset, c.bytes),
                // Seen at the top of the loop.
                Some((_, Err(SplitError::Overflowed))) => {}
                Some((_, Err(e))) => s.shipper.compare_failed(e.to_string()),
                None => s.shipper.compare_failed("a comparison task failed".into()),
            },
            _ = async {
                match timeout {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => s.shipper.handle_timeout(Instant::now()),
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

/// Connects to the process server and opens the replication stream.
async fn quic(
    shared: &Arc<Shared>,
    cfg: &ShipConfig,
    target: &Target,
    stop: &mut watch::Receiver<bool>,
    target_rx: &mut watch::Receiver<Option<Target>>,
) -> Result<Link, Outcome> {
    let id = &cfg.identity;
    let addr = resolve(&target.server)
        .await
        .map_err(|e| lost(format!("{e:#}"), false))?;
    let ca_pem = target.ca_pem.as_deref().unwrap_or(&id.ca_pem);
    let conn = tokio::select! {
        c = endpoint::connect(addr, &target.server_name, ca_pem, &id.cert_pem, &id.key_pem) => c,
        _ = overflowed(&shared.splitter) => return Err(Outcome::Overflow),
        _ = changed(target_rx) => return Err(Outcome::Retarget),
        _ = stop.changed() => return Err(Outcome::Stop),
    };
    let conn = match conn {
        Ok(c) => c,
        Err(haven_net::NetError::Connection { source, .. }) => {
            return Err(lost(describe(&source), false));
        }
        Err(e) => return Err(lost(e.to_string(), false)),
    };
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| lost(describe(&e), false))?;
    *shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
    if let Some(hook) = &cfg.on_connection {
        // Requests from the master target (points, planned failover) come on this connection.
        hook(conn);
    }
    Ok(Link::Quic {
        send,
        reader: FrameReader::new(recv),
    })
}

/// Where the shipper's frames go: a process server's stream, or a cache storage account.
enum Link {
    Quic {
        send: quinn::SendStream,
        reader: FrameReader,
    },
    Cache(Box<CacheLink>),
}

impl Link {
    async fn write(&mut self, frames: Vec<Frame>) -> Result<(), String> {
        match self {
            Link::Quic { send, .. } => write_frames(send, frames).await.map_err(|e| e.to_string()),
            Link::Cache(c) => c.send(frames).await,
        }
    }

    fn finish(&mut self) {
        if let Link::Quic { send, .. } = self {
            let _ = send.finish();
        }
    }

    /// The next frame; `None` when the peer finished the stream. Cancel-safe.
    async fn next(&mut self, welcomed: bool) -> Result<Option<Frame>, Outcome> {
        match self {
            Link::Quic { send, reader } => match reader.next().await {
                Ok(f) => Ok(f),
                Err(e) => Err(decode_failed(send, e, welcomed).await),
            },
            Link::Cache(c) => c.next().await.map_err(|why| lost(why, welcomed)),
        }
    }

    /// A frame that has arrived already.
    async fn try_next(&mut self, welcomed: bool) -> Result<Option<Frame>, Outcome> {
        match self {
            Link::Quic { send, reader } => match reader.try_next() {
                Ok(f) => Ok(f),
                Err(e) => Err(decode_failed(send, e, welcomed).await),
            },
            Link::Cache(c) => c.try_next().map_err(|why| lost(why, welcomed)),
        }
    }
}

/// Reads durable records from `from` (at most [`FILL_BYTES`]), as stream records.
fn fill(splitter: &Splitter, disk: u32, from: u64, base: i64) -> Result<Filled, String> {
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
        out.push((seq, to_wire(rec, disk, base)?));
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

/// A log record of disk `disk` as a stream record.
fn to_wire(rec: log::Record, disk: u32, base: i64) -> Result<Record, String> {
    if rec.kind == Kind::Tag {
        let tag = rec
            .tag()
            .ok_or_else(|| format!("change log record {}: a damaged tag", rec.seq))?;
        return Ok(Record::Tag(haven_wire::Tag {
            disk,
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
        disk,
        seq: seq_add(rec.seq, base),
        offset: rec.offset,
        data,
    }))
}

/// Compares the local blocks of `req` with the replica's digests and appends those that
/// differ (a block without a digest counts as different), waiting while the log is more than
/// half full; then makes them durable (the shipper then records the pass's progress). Stops on
/// `cancel`, on an overflow and when the agent stops.
fn compare(
    shared: &Shared,
    req: HashRequest,
    hashes: &Hashes,
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
    Ok(total)
}

/// Every second: `status.json`, and a report to the gateway when connected; every 250 ms a
/// mark of when the writes happened (carried in the report).
pub async fn report_loop(machine: Arc<Machine>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(haven_net::stream::WriteMarks::FINE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let per_report = (Duration::from_secs(1).as_millis()
        / haven_net::stream::WriteMarks::FINE_EVERY.as_millis()) as u64;
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        // It takes the splitters' locks, which a write may hold for a moment.
        let m = Arc::clone(&machine);
        let _ = tokio::task::spawn_blocking(move || {
            for d in &m.disks {
                d.sample_writes();
            }
        })
        .await;
        ticks += 1;
        if ticks % per_report != 1 {
            continue;
        }
        let m = Arc::clone(&machine);
        let report = tokio::task::spawn_blocking(move || {
            if let Err(e) = m.write_status() {
                tracing::warn!(error = %e, "writing status.json");
            }
            m.report()
        })
        .await;
        let conn = machine.connection();
        if let (Ok(report), Some(conn)) = (report, conn) {
            tokio::spawn(async move {
                if let Err(e) = haven_net::stream::send_report(&conn, &report).await {
                    tracing::debug!(error = %e, "sending a report");
                }
            });
        }
    }
}
