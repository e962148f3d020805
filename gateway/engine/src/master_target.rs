//! The master target: journals every stream durably and applies it to replicas.
//!
//! ```text
//! process server ──QUIC──▶ ingest (Receiver) ──▶ journal/<agent>/<disk>/ (encrypted segments)
//!                                  │                 │ redb: durable seq, index by seq + extent
//!                                  │ Ack (durable)   ▼
//!                                  ◀──────────  applier (pool) ──▶ target writer plugin ──▶ replica
//!                                                    │ flush, then applied seq in redb,
//!                                                    ▼ then the journal is released
//! ```
//!
//! A few applier threads (at most [`MAX_APPLIERS`]) serve every replica: each replica belongs
//! to one of them, which owns one instance of the target writer plugin with its replicas open
//! in it and takes the replicas with work in turn, a batch each. It applies journaled records strictly in sequence order, flushes the replica, records the
//! applied seq in redb and only then releases the journal up to it: after a crash anywhere, the
//! journal still holds every record after the recorded applied seq, and re-applying a record
//! the replica already has is harmless (writes are idempotent in order).
//!
//! A record that fails its authentication (a tampered or damaged segment) is never applied:
//! the replica stops at the record before it and its status names the file and offset.
//!
//! Resync hashes are computed by the applier between batches, once everything journaled is
//! applied, so they describe the replica after exactly the records received so far.
//!
//! The appliers are in `applier.rs`; points, test failover and failover in
//! [`crate::recovery`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use haven_host::{Host, PluginSpec};
use haven_net::endpoint::ServerTls;
use haven_net::stream::{HeldUpTo, Report, held_up_to, read_report};
use haven_net::{SiteCa, quinn};
use haven_store::journal::{AppendInfo, Journal, JournalOptions};
use haven_store::key::Key;
use haven_store::state::{StateDb, StreamKey, StreamRecord};
use haven_wire::{HashRequest, Hashes, Hello, PeerId, Record, Seq};
use tokio::sync::oneshot;

use crate::applier::{Appliers, Job, MAX_APPLIERS};
use crate::ingest::{self, DiskStream, RecordExt, Sink, Via, lock};
use crate::status::{MasterTargetStatus, ReplicaStatus};
use crate::{Rate, now_ms, peer_hex};

/// An agent's report older than this says nothing about the writes its source made since.
const REPORT_FRESH: Duration = Duration::from_secs(5);

/// How a master target runs.
#[derive(Clone, Debug)]
pub struct MasterTargetConfig {
    /// UDP address process servers connect to.
    pub listen: SocketAddr,
    /// The gateway's state folder: `journal/`, `state.redb`, `journal.key`.
    pub data_dir: PathBuf,
    /// The target writer that writes replicas (its storage root holds them).
    pub writer: PluginSpec,
    /// Options replicas and failover images are created with (e.g. `subformat=monolithicFlat`
    /// for VMDKs a VMware host attaches).
    pub writer_options: Vec<(String, String)>,
    /// Journal limits.
    pub journal: JournalOptions,
    /// How long recovery points are kept.
    pub retention: crate::retention::RetentionPolicy,
    /// Address test-failover NBD exports listen on (a free port each).
    pub nbd_host: std::net::IpAddr,
    /// TLS every export requires (`nbds://` URIs), or none (loopback only).
    pub nbd_tls: Option<haven_nbd::Tls>,
    /// Retention by machine name from the configuration server's last assignment (kept by a
    /// joined gateway), in force from the first retention pass.
    pub retention_by_machine: HashMap<String, crate::retention::RetentionPolicy>,
}

/// A running master target.
pub struct MasterTarget {
    pub(crate) config: MasterTargetConfig,
    pub(crate) state: Arc<StateDb>,
    key: Key,
    pub(crate) host: Arc<Host>,
    /// The threads that apply every replica's journal.
    appliers: Appliers,
    pub(crate) replicas: Mutex<HashMap<StreamKey, Arc<Replica>>>,
    pub(crate) reports: Mutex<HashMap<String, Report>>,
    /// When each agent's latest report arrived, and its clock's offset from ours then.
    heard: Mutex<HashMap<String, Heard>>,
    /// The connection that forwards each agent's stream (its reports come on it): control
    /// requests for the agent go there.
    pub(crate) routes: Mutex<HashMap<String, quinn::Connection>>,
    /// Milliseconds since the Unix epoch, for retention (replaceable in tests).
    pub(crate) clock: Box<dyn Fn() -> u64 + Send + Sync>,
    listener: crate::Listener,
    /// Streams whose journal or replica could not be opened, and why: reported, not served.
    broken: Mutex<HashMap<StreamKey, (haven_wire::DiskInfo, String, String)>>,
    /// Retention of each machine the configuration server assigned a policy to (by machine
    /// name); the others keep `config.retention`.
    pub(crate) retention_by_machine: Mutex<HashMap<String, crate::retention::RetentionPolicy>>,
    /// Apply latency and RPO over time, for `/metrics`.
    pub(crate) histograms: Arc<crate::metrics::Histograms>,
    /// Which process server forwards each agent (by agent id), as kept in redb
    /// (`owner/<agent>`); the lock orders takeovers.
    owners: Mutex<HashMap<PeerId, Option<Owner>>>,
}

/// The process server that forwards an agent's streams: the first one that did, or the last
/// that took the agent over (`TAKEOVER`). Streams of the agent from any other are refused
/// with `MOVED`, so a process server that was given up for lost can never forward what it
/// cached before the agent moved.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Owner {
    /// Its certificate's id at this site's CA.
    id: String,
    /// The name it enrolled with.
    name: String,
    /// Since when, ms since the Unix epoch.
    since_ms: u64,
}

impl std::fmt::Debug for MasterTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterTarget")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

/// When an agent's report arrived.
#[derive(Clone, Copy, Debug)]
struct Heard {
    /// When it first arrived.
    at: Instant,
    /// The agent's time in it.
    time_ms: u64,
    /// The agent's clock minus ours, in ms, as the report's time said on arrival.
    skew_ms: i64,
}

/// The recovery point objective achieved now for one item, in seconds: how far back a
/// failover now would go. `None` before there is a point to fail over to, and once the item
/// is failed over.
///
/// With points kept: when the source has written since the newest point the master target
/// holds (its fresh report's last seq is past what points cover), or when it has not been
/// heard from lately (a process server or link down: it may have), everything since that
/// point is at stake: the age of the point, on the source's clock. Otherwise it is the master
/// target's own measure: the age of the oldest record it holds that no point covers.
///
/// Without points a failover takes everything held here, and what is at stake is the source's
/// writes the master target does not hold yet: `held` says, from the source's marks, since
/// when ([`held_up_to`]); the age of that moment on the source's clock. A source not heard
/// from lately may have written since its report: the report's age. At least the master
/// target's own measure either way.
///
/// [`held_up_to`]: haven_net::stream::held_up_to
#[allow(clippy::too_many_arguments)]
fn rpo_seconds(
    keep_points: bool,
    newest_point: Option<&crate::recovery::PointRecord>,
    covered: Seq,
    last_seq: Option<(u64, Heard)>,
    held: Option<HeldUpTo>,
    now: Instant,
    now_ms: u64,
    lag_seconds: f64,
) -> Option<f64> {
    if !keep_points {
        let Some((_, heard)) = last_seq else {
            return Some(lag_seconds);
        };
        let source_now = now_ms as i64 + heard.skew_ms;
        let since = match held {
            Some(HeldUpTo::At(ms) | HeldUpTo::Before(ms)) => ms as i64,
            None if now.duration_since(heard.at) <= REPORT_FRESH => return Some(lag_seconds),
            None => heard.time_ms as i64,
        };
        let age = (source_now - since).max(0) as f64 / 1000.0;
        return Some(age.max(lag_seconds));
    }
    let point = newest_point?;
    let written_since = match last_seq {
        Some((last, heard)) if now.duration_since(heard.at) <= REPORT_FRESH => last > covered,
        _ => true,
    };
    if !written_since {
        return Some(lag_seconds);
    }
    let source_now = match last_seq {
        Some((_, heard)) => now_ms as i64 + heard.skew_ms,
        None => now_ms as i64,
    };
    let age = (source_now - point.source_time_ms as i64).max(0) as f64 / 1000.0;
    Some(age.max(lag_seconds))
}

/// One replica: its journal stream and the applier's progress.
pub(crate) struct Replica {
    pub(crate) stream: Arc<DiskStream>,
    pub(crate) path: String,
    pub(crate) applied: AtomicU64,
    /// Points, the base hold, the failover state.
    pub(crate) recovery: crate::recovery::ReplicaRecovery,
    /// Journaled, unapplied records: seq, extent bytes, when journaled.
    unapplied: Mutex<VecDeque<(Seq, u64, Instant)>>,
    /// The master target's histograms (apply latency is observed here).
    histograms: Arc<crate::metrics::Histograms>,
    applied_rate: Mutex<Rate>,
    /// Its applier's jobs.
    pub(crate) wake: Mutex<std_mpsc::Sender<Job>>,
    /// A `Wake::Changed` is queued and not yet seen: at most one is ever queued.
    pub(crate) change_queued: std::sync::atomic::AtomicBool,
    /// Its applier has opened it in the writer (creating it when new): a view of its points
    /// can read it from then on.
    pub(crate) created: std::sync::atomic::AtomicBool,
    /// The replica is a seed (a disk that was here before the stream): never created.
    pub(crate) seeded: bool,
    /// A seed's comparison's recent pace, for its estimate of the time left.
    pub(crate) compare_pace: Mutex<crate::status::Pace>,
}

impl Replica {
    /// Wakes the applier (coalesced).
    pub(crate) fn wake(&self) {
        if !self.change_queued.swap(true, Ordering::AcqRel) {
            let _ = lock(&self.wake).send(Job::Changed(self.stream.key));
        }
    }

    /// Records up to `seq` (`bytes` of extent) are applied: they leave the lag and count in
    /// the apply rate.
    pub(crate) fn note_applied(&self, seq: Seq, bytes: u64) {
        let now = Instant::now();
        let mut unapplied = lock(&self.unapplied);
        while unapplied.front().is_some_and(|(s, _, _)| *s <= seq) {
            if let Some((_, _, journaled)) = unapplied.pop_front() {
                self.histograms
                    .apply_latency
                    .observe(now.duration_since(journaled).as_secs_f64());
            }
        }
        lock(&self.applied_rate).add(now, bytes);
    }
}

impl MasterTarget {
    /// Opens the state and replays what it says: every known replica gets its applier back.
    pub fn open(config: MasterTargetConfig, host: Arc<Host>) -> Result<Arc<MasterTarget>> {
        let min = 2 * u64::from(haven_wire::frame::MAX_DATA_LEN);
        if config.journal.max_bytes < min {
            anyhow::bail!(
                "journal_max_bytes {} is below the minimum of {min} (two of the largest records)",
                config.journal.max_bytes
            );
        }
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let state = Arc::new(StateDb::open(&config.data_dir.join("state.redb"))?);
        let key = Key::load_or_create(&config.data_dir.join("journal.key"))?;
        let appliers = Appliers::start(
            std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, MAX_APPLIERS)),
            !config.retention.window.is_zero(),
            host.clone(),
            config.writer.clone(),
            config.writer_options.clone(),
            state.clone(),
        )?;
        let retention_by_machine = Mutex::new(config.retention_by_machine.clone());
        let mt = Arc::new(MasterTarget {
            config,
            state,
            key,
            host,
            appliers,
            replicas: Mutex::new(HashMap::new()),
            reports: Mutex::new(HashMap::new()),
            heard: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            clock: clock_from_env(),
            listener: crate::Listener::default(),
            broken: Mutex::new(HashMap::new()),
            retention_by_machine,
            histograms: Arc::default(),
            owners: Mutex::new(HashMap::new()),
        });
        for (key, record) in mt.state.streams()? {
            let info = haven_wire::DiskInfo {
                id: key.disk,
                size: record.size,
                block_size: record.block_size,
            };
            // One damaged journal must not keep the other replicas from being served.
            match mt.replica(key, info, &record.machine_name) {
                Ok(r) => {
                    // A failover cut short by a stop starts its image again.
                    let state = lock(&r.recovery.state).item.state;
                    if state == crate::recovery::ItemState::FailingOver {
                        mt.resume_failover(r);
                    }
                }
                Err(e) => {
                    tracing::error!(replica = %key, error = %format!("{e:#}"), "replica not served")
                }
            }
        }
        mt.spawn_retention();
        Ok(mt)
    }

    /// Serves process servers until the endpoint closes. With `ca`, process servers may enroll
    /// here with a token.
    pub async fn serve(
        self: &Arc<Self>,
        tls: ServerTls,
        ca: Option<Arc<Mutex<SiteCa>>>,
    ) -> Result<()> {
        let server = self.listener.bind(self.config.listen, tls, ca)?;
        tracing::info!(addr = %server.local_addr()?, "master target listening");
        while let Some(conn) = server.accept().await {
            let mt = self.clone();
            tokio::spawn(async move {
                let ticket = mt.listener.add(&conn.peer.agent_id, &conn.connection);
                let peer = Via {
                    id: conn.peer.agent_id.clone(),
                    name: conn.peer.machine_name.clone(),
                };
                mt.clone().connection(conn.connection, peer).await;
                mt.listener.remove(ticket);
            });
        }
        Ok(())
    }

    /// The role's endpoint: its address, CRLs and live connections.
    pub fn listener(&self) -> &crate::Listener {
        &self.listener
    }

    async fn connection(self: Arc<Self>, conn: quinn::Connection, peer: Via) {
        loop {
            tokio::select! {
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let mt = self.clone();
                        let peer = peer.clone();
                        tokio::spawn(async move {
                            if let Err(e) = ingest::serve_stream(mt, None, peer, send, recv).await {
                                tracing::warn!(error = %format!("{e:#}"), "replication stream ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::info!(peer = %peer.name, reason = %e, "process server disconnected");
                        return;
                    }
                },
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => {
                        // One process server sends the reports of all its agents each second:
                        // each is read on its own task, so none holds up the next stream.
                        let (mt, conn) = (self.clone(), conn.clone());
                        tokio::spawn(async move {
                            if let Ok(report) = read_report(recv).await {
                                mt.heard_report(report, &conn);
                            }
                        });
                    }
                    Err(_) => return,
                },
            }
        }
    }

    /// A report of an agent came on `conn` (its process server's connection).
    fn heard_report(&self, report: Report, conn: &quinn::Connection) {
        // Reports are read concurrently: one older than the one kept is old news.
        let stale = lock(&self.reports)
            .get(&report.agent_id)
            .is_some_and(|kept| kept.time_ms > report.time_ms);
        if stale {
            return;
        }
        lock(&self.routes).insert(report.agent_id.clone(), conn.clone());
        // The process server sends its latest report of the agent every second, the same one
        // again while the agent is cut off from it: only a newer report is news of the source.
        let mut heard = lock(&self.heard);
        let seen = heard.get(&report.agent_id).map(|h| h.time_ms);
        if seen.is_none_or(|t| report.time_ms > t) {
            heard.insert(
                report.agent_id.clone(),
                Heard {
                    at: Instant::now(),
                    time_ms: report.time_ms,
                    skew_ms: report.time_ms as i64 - now_ms() as i64,
                },
            );
        }
        drop(heard);
        // The report first: an item found by the name below must find its report too (its
        // state says why a failover is refused).
        lock(&self.reports).insert(report.agent_id.clone(), report.clone());
        self.learn_machine_name(&report);
    }

    /// Keeps the machine's name from its agent's report, in memory and in redb (items are
    /// named by it, also after a restart before the next report).
    fn learn_machine_name(&self, report: &Report) {
        let replicas: Vec<Arc<Replica>> = lock(&self.replicas)
            .values()
            .filter(|r| peer_hex(&r.stream.key.peer) == report.agent_id)
            .cloned()
            .collect();
        for r in replicas {
            {
                let mut name = lock(&r.stream.machine_name);
                if *name == report.machine_name {
                    continue;
                }
                name.clone_from(&report.machine_name);
            }
            let name = report.machine_name.clone();
            if let Err(e) = self
                .state
                .update_stream(r.stream.key, move |rec| rec.machine_name = name)
            {
                tracing::warn!(error = %e, "recording the machine's name");
            }
        }
    }

    /// The replica of `key`, its applier started, created when new. A failure is remembered
    /// and reported in the status until a later attempt succeeds.
    fn replica(
        &self,
        key: StreamKey,
        info: haven_wire::DiskInfo,
        machine: &str,
    ) -> Result<Arc<Replica>> {
        let result = self.open_replica(key, info, machine);
        let mut broken = lock(&self.broken);
        match &result {
            Ok(_) => {
                broken.remove(&key);
            }
            Err(e) => {
                broken.insert(key, (info, machine.to_string(), format!("{e:#}")));
            }
        }
        result
    }

    fn open_replica(
        &self,
        key: StreamKey,
        info: haven_wire::DiskInfo,
        machine: &str,
    ) -> Result<Arc<Replica>> {
        let mut replicas = lock(&self.replicas);
        if let Some(r) = replicas.get(&key) {
            if r.stream.info.size != info.size {
                return Err(anyhow!(
                    "disk {key}: the source announces {} bytes, but its replica has {}; \
                     a resized disk must be protected again",
                    info.size,
                    r.stream.info.size
                ));
            }
            // The name it has stays: a known one comes from the agent's reports
            // (`learn_machine_name`), and `machine` may be only a placeholder until one arrives.
            return Ok(r.clone());
        }
        let mut seed = None;
        let record = match self.state.get_stream(key)? {
            Some(r) => {
                // A seed still listed was adopted by a run that stopped before it said so.
                if r.replica_path.is_some() {
                    seed = self.seed_of(key)?;
                }
                r
            }
            None => {
                // A reprotect's seed: the replica is a disk that is here already.
                seed = self.seed_of(key)?;
                let r = StreamRecord {
                    size: info.size,
                    block_size: info.block_size,
                    machine_name: seed
                        .as_ref()
                        .map_or_else(|| machine.to_string(), |s| s.spec.machine_name.clone()),
                    created_ms: now_ms(),
                    replica_path: seed.as_ref().map(|s| s.spec.path.clone()),
                    seeding: seed.is_some(),
                    ..Default::default()
                };
                self.state.put_stream(key, &r)?;
                r
            }
        };
        let dir = self
            .config
            .data_dir
            .join("journal")
            .join(peer_hex(&key.peer))
            .join(key.disk.to_string());
        let journal = Journal::open(&dir, &self.key, self.config.journal)?;
        let unapplied: VecDeque<_> = journal
            .entries()
            .into_iter()
            .filter(|e| e.seq > record.applied_seq)
            .map(|e| (e.seq, e.len, Instant::now()))
            .collect();
        let stream = Arc::new(DiskStream::new(key, info, machine.to_string(), journal));
        let tx = self.appliers.sender();
        let replica = Arc::new(Replica {
            stream,
            path: record
                .replica_path
                .clone()
                .unwrap_or_else(|| format!("{}/disk{}.raw", peer_hex(&key.peer), key.disk)),
            seeded: record.replica_path.is_some(),
            compare_pace: Mutex::default(),
            applied: AtomicU64::new(record.applied_seq),
            recovery: Default::default(),
            unapplied: Mutex::new(unapplied),
            histograms: self.histograms.clone(),
            applied_rate: Mutex::new(Rate::default()),
            wake: Mutex::new(tx),
            change_queued: std::sync::atomic::AtomicBool::new(false),
            created: std::sync::atomic::AtomicBool::new(false),
        });
        self.load_recovery(&replica, record.applied_seq)?;
        if let Some(seed) = seed {
            self.seed_adopted(&replica, &seed);
        }
        if record.seeding {
            crate::recovery::restore_seed(&replica, record.applied_seq, record.seed_compared);
        }
        self.restore_test(&replica);
        let _ = lock(&replica.wake).send(Job::Add(replica.clone()));
        replicas.insert(key, replica.clone());
        Ok(replica)
    }

    /// What the master target reports.
    pub fn status(&self) -> MasterTargetStatus {
        let now = Instant::now();
        let reports = lock(&self.reports).clone();
        let heard = lock(&self.heard).clone();
        let keep_points = !self.config.retention.window.is_zero();
        let mut replicas: Vec<ReplicaStatus> = lock(&self.replicas)
            .values()
            .map(|r| {
                let s = &r.stream;
                let unapplied = lock(&r.unapplied);
                let agent_id = peer_hex(&s.key.peer);
                let rate = lock(&r.applied_rate);
                let report = reports.get(&agent_id).cloned();
                // The recovery facts at one instant.
                let (newest, item_state, points, test_failover) = {
                    let st = lock(&r.recovery.state);
                    (
                        st.points.values().next_back().copied(),
                        st.item.state,
                        st.points.len(),
                        st.test.running().map(|t| t.uri().to_string()),
                    )
                };
                // Records after the newest point (or the base) are what a failover now loses.
                let covered = newest
                    .map_or(0, |p| p.seq)
                    .max(r.applied.load(Ordering::Acquire));
                // The deque is in seq order: only its tail is uncovered.
                let uncovered = || {
                    let from = unapplied.partition_point(|(s, _, _)| *s <= covered);
                    unapplied.range(from..)
                };
                let lag_seconds = uncovered()
                    .next()
                    .map_or(0.0, |(_, _, t)| now.duration_since(*t).as_secs_f64());
                let seeding = *lock(&r.recovery.seed) != crate::recovery::SeedHold::Off;
                let disk_report = report
                    .as_ref()
                    .and_then(|rep| rep.disks.iter().find(|d| d.disk == s.key.disk))
                    .zip(heard.get(&agent_id));
                let last_seq = disk_report.map(|(d, h)| (d.last_seq, *h));
                let held = disk_report
                    .and_then(|(d, h)| held_up_to(&d.written, d.last_seq, h.time_ms, s.durable()));
                let rpo = (item_state == crate::recovery::ItemState::Protected)
                    .then(|| {
                        rpo_seconds(
                            keep_points,
                            newest.as_ref(),
                            covered,
                            last_seq,
                            held,
                            now,
                            now_ms(),
                            lag_seconds,
                        )
                    })
                    .flatten();
                let reprotect = seeding
                    .then(|| {
                        disk_report.map(|(d, _)| {
                            crate::status::ReprotectProgress::of(
                                d,
                                s.info.size,
                                &mut lock(&r.compare_pace),
                                now_ms(),
                            )
                        })
                    })
                    .flatten();
                ReplicaStatus {
                    // The connection is the process server's; the machine is the agent's.
                    machine_name: report
                        .as_ref()
                        .map_or_else(|| lock(&s.machine_name).clone(), |r| r.machine_name.clone()),
                    report,
                    agent_id,
                    disk: s.key.disk,
                    size: s.info.size,
                    path: r.path.clone(),
                    seeding,
                    reprotect,
                    durable_seq: s.durable(),
                    applied_seq: r.applied.load(Ordering::Acquire),
                    lag_bytes: uncovered().map(|(_, b, _)| b).sum(),
                    lag_seconds,
                    rpo_seconds: rpo,
                    item_state: item_state.name().to_string(),
                    points,
                    newest_point_ms: newest.map(|p| p.source_time_ms),
                    test_failover,
                    apply_bytes_per_second: rate.per_second(now),
                    applied_bytes_total: rate.total(),
                    journal_bytes: s.journal().stats().bytes,
                    error: s.error(),
                }
            })
            .collect();
        for (key, (info, machine, error)) in lock(&self.broken).iter() {
            let agent_id = peer_hex(&key.peer);
            replicas.push(ReplicaStatus {
                report: reports.get(&agent_id).cloned(),
                agent_id,
                machine_name: machine.clone(),
                disk: key.disk,
                size: info.size,
                path: format!("{}/disk{}.raw", peer_hex(&key.peer), key.disk),
                seeding: false,
                reprotect: None,
                durable_seq: 0,
                applied_seq: 0,
                lag_bytes: 0,
                lag_seconds: 0.0,
                rpo_seconds: None,
                item_state: String::new(),
                points: 0,
                newest_point_ms: None,
                test_failover: None,
                apply_bytes_per_second: 0.0,
                applied_bytes_total: 0,
                journal_bytes: 0,
                error: Some(format!("not served: {error}")),
            });
        }
        replicas.sort_by(|a, b| (&a.agent_id, a.disk).cmp(&(&b.agent_id, b.disk)));
        MasterTargetStatus {
            listen: self
                .listener
                .local_addr()
                .map_or_else(|| self.config.listen.to_string(), |a| a.to_string()),
            writer: self.config.writer.name.clone(),
            journal_max_bytes: self.config.journal.max_bytes,
            plugin_traps: self.appliers.traps.count.load(Ordering::Relaxed),
            last_plugin_trap: lock(&self.appliers.traps.last).clone(),
            replicas,
        }
    }

    /// Apply latency and RPO over time, for `/metrics`.
    pub fn histograms(&self) -> Arc<crate::metrics::Histograms> {
        self.histograms.clone()
    }

    /// Observes every replica's RPO now (once a second, from the retention thread).
    pub(crate) fn sample_rpo(&self) {
        for r in self.status().replicas {
            if let Some(rpo) = r.rpo_seconds {
                self.histograms.rpo.observe(rpo);
            }
        }
    }

    /// The storage root replicas are written below.
    pub fn replica_root(&self) -> Option<PathBuf> {
        self.config.writer.grants.storage_root.clone()
    }
}

/// The clock retention uses: the system's, shifted by the number of milliseconds in the file
/// `$HAVEN_CLOCK_OFFSET_FILE` when that is set (re-read on every call; for drills and tests
/// that need hours to pass).
fn clock_from_env() -> Box<dyn Fn() -> u64 + Send + Sync> {
    match std::env::var_os("HAVEN_CLOCK_OFFSET_FILE") {
        None => Box::new(now_ms),
        Some(path) => {
            tracing::warn!(file = ?path, "retention clock shifted by the offset in a file");
            Box::new(move || {
                let offset: i64 = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                now_ms().saturating_add_signed(offset)
            })
        }
    }
}

impl MasterTarget {
    /// Checks that `via` forwards the agent of `hello` (records it when it is the first, or
    /// takes the agent over).
    fn check_owner(&self, hello: &Hello, via: &Via) -> Result<()> {
        let agent = peer_hex(&hello.peer_id);
        let key = format!("owner/{agent}");
        let mut owners = lock(&self.owners);
        let known = match owners.get(&hello.peer_id) {
            Some(o) => o.clone(),
            None => {
                let o: Option<Owner> = self.state.get_json(&key)?;
                owners.insert(hello.peer_id, o.clone());
                o
            }
        };
        match known {
            Some(o) if o.id == via.id => return Ok(()),
            Some(o) if !hello.takeover => {
                return Err(crate::ingest::Refused::moved(format!(
                    "agent {agent} is forwarded by process server `{}` since {} ms after the \
                     epoch; this process server (`{}`) no longer serves it and must drop what \
                     it caches for it",
                    o.name, o.since_ms, via.name
                )));
            }
            Some(o) => tracing::warn!(agent = %agent, from = %o.name, to = %via.name,
                "the agent moved to another process server; its streams are taken from there"),
            None => {}
        }
        let owner = Owner {
            id: via.id.clone(),
            name: via.name.clone(),
            since_ms: now_ms(),
        };
        self.state.put_json(&key, &owner)?;
        owners.insert(hello.peer_id, Some(owner));
        Ok(())
    }
}

/// The start of the error a seeding replica whose journal is full shows.
const SEEDING_FULL: &str = "the reprotect's differences filled the journal";

impl Sink for MasterTarget {
    fn journal_full(&self, stream: &DiskStream, full: bool) {
        if !full {
            if stream.error().is_some_and(|e| e.starts_with(SEEDING_FULL)) {
                stream.set_error(None);
            }
            return;
        }
        // Nothing of a seeding replica is applied before its comparison ends, so nothing frees
        // its journal: it waits until an operator gives it room.
        let seeding = lock(&self.replicas)
            .get(&stream.key)
            .is_some_and(|r| *lock(&r.recovery.seed) != crate::recovery::SeedHold::Off);
        if seeding {
            let message = format!(
                "{SEEDING_FULL} ({} bytes, journal_max_bytes) before the comparison ended, and \
                 nothing is applied to the old disk until it ends: raise journal_max_bytes in \
                 [master_target] and restart this gateway; the agent's log holds the rest",
                self.config.journal.max_bytes
            );
            tracing::error!(stream = %stream.key, "{message}");
            stream.set_error(Some(message));
        }
    }

    fn open_disks(&self, hello: &Hello, via: &Via) -> Result<Vec<Arc<DiskStream>>> {
        if hello.role == haven_wire::Role::ProcessServer {
            self.check_owner(hello, via)?;
        }
        // The connection is the process server's (`via`); the machine's name comes with the
        // agent's reports.
        let machine_name = lock(&self.reports)
            .get(&peer_hex(&hello.peer_id))
            .map_or_else(|| format!("(via {})", via.name), |r| r.machine_name.clone());
        let machine_name = machine_name.as_str();
        hello
            .disks
            .iter()
            .map(|d| {
                let key = StreamKey {
                    peer: hello.peer_id,
                    disk: d.id,
                };
                let replica = self.replica(key, *d, machine_name)?;
                if let Some(why) = self.refusal(&replica) {
                    return Err(crate::ingest::Refused::failed_over(why));
                }
                Ok(replica.stream.clone())
            })
            .collect()
    }

    fn on_durable(
        &self,
        stream: &DiskStream,
        _durable: Seq,
        appended: &[(Record, AppendInfo)],
    ) -> Result<()> {
        let replica = lock(&self.replicas)
            .get(&stream.key)
            .cloned()
            .context("durable records for an unknown replica")?;
        // The journal indexes what it holds (rebuilt from its segments at open): nothing to
        // record here but the points below.
        if let Some(why) = self.refusal(&replica) {
            return Err(crate::ingest::Refused::failed_over(why));
        }
        for (r, _) in appended {
            if let Record::Tag(t) = r {
                crate::recovery::seed_tag(&replica, t.seq);
                if !self.config.retention.window.is_zero() {
                    crate::recovery::register_tag(&self.state, &replica, t);
                }
            }
        }
        let now = Instant::now();
        lock(&replica.unapplied).extend(
            appended
                .iter()
                .map(|(r, _)| (r.seq(), r.wire_extent(), now)),
        );
        replica.wake();
        Ok(())
    }

    fn check_compressed(&self) -> bool {
        false
    }

    fn hashes(
        &self,
        stream: &Arc<DiskStream>,
        request: HashRequest,
    ) -> oneshot::Receiver<Result<Hashes, String>> {
        let (tx, rx) = oneshot::channel();
        match lock(&self.replicas).get(&stream.key) {
            Some(r) => {
                let _ = lock(&r.wake).send(Job::Hash(stream.key, request, tx));
            }
            None => {
                let _ = tx.send(Err(format!("no replica for disk {}", stream.key)));
            }
        }
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::{PointKind, PointRecord};

    fn point(seq: Seq, source_time_ms: u64) -> PointRecord {
        PointRecord {
            point: source_time_ms,
            seq,
            source_time_ms,
            kind: PointKind::Crash,
            received_ms: source_time_ms,
            group: false,
        }
    }

    #[test]
    fn rpo_is_the_newest_points_age_on_the_source_clock_while_writes_are_uncovered() {
        let now = Instant::now();
        let now_ms = 1_000_000;
        let p = point(10, now_ms - 800);
        // The source's clock runs 5 s ahead; a report just arrived.
        let heard = Heard {
            at: now,
            time_ms: now_ms + 5_000,
            skew_ms: 5_000,
        };
        let p_ahead = point(10, now_ms + 5_000 - 800);
        let rpo = |p: Option<&PointRecord>, last: Option<(u64, Heard)>, lag: f64| {
            rpo_seconds(true, p, 10, last, None, now, now_ms, lag)
        };
        // Writes after the point: its age, on the source's clock.
        assert_eq!(rpo(Some(&p_ahead), Some((12, heard)), 0.2), Some(0.8));
        // None since: the master target's own measure.
        assert_eq!(rpo(Some(&p_ahead), Some((10, heard)), 0.0), Some(0.0));
        // Not heard from for longer than a report's freshness: it may have written.
        let stale = Heard {
            at: now - REPORT_FRESH - Duration::from_secs(1),
            time_ms: now_ms - 6_000,
            skew_ms: 0,
        };
        assert_eq!(rpo(Some(&p), Some((10, stale)), 0.0), Some(0.8));
        // Never heard from: the same, on our clock.
        assert_eq!(rpo(Some(&p), None, 0.0), Some(0.8));
        // The master target's measure wins when larger.
        assert_eq!(rpo(Some(&p), Some((12, heard)), 7.5), Some(7.5));
        // Nothing to fail over to yet.
        assert_eq!(rpo(None, Some((12, heard)), 3.0), None);
        // Without points: since when the source's writes are not all held here, on its
        // clock (5 s ahead), at least the master target's measure.
        let unpointed = |held, heard, lag| {
            rpo_seconds(false, None, 0, Some((12, heard)), held, now, now_ms, lag)
        };
        assert_eq!(
            unpointed(Some(HeldUpTo::At(now_ms + 5_000 - 2_500)), heard, 1.5),
            Some(2.5)
        );
        assert_eq!(
            unpointed(Some(HeldUpTo::Before(now_ms + 5_000 - 9_000)), heard, 1.5),
            Some(9.0)
        );
        // Everything the fresh report knows of is held: the master target's measure.
        assert_eq!(unpointed(None, heard, 0.25), Some(0.25));
        // A stale report: the source may have written since it.
        assert_eq!(unpointed(None, stale, 0.0), Some(6.0));
        // Never heard from: the master target's measure.
        assert_eq!(
            rpo_seconds(false, None, 0, None, None, now, now_ms, 1.5),
            Some(1.5)
        );
    }
}
