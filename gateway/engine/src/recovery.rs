//! Recovery points, retention and failover at the master target.
//!
//! # Points
//!
//! A point is a tag record in a disk's stream (taken by the agent, see `agent/src/points.rs`).
//! When its tag is durable in the journal the master target lists it (redb `meta`, one key
//! per point, `point/<agent>/<disk>/<seq>`, so a point costs one small write however many are
//! kept; rebuilt from the journal's tags at start, so a crash between the journal and redb loses
//! none). The replica at point P is the base replica with every journal
//! record up to P's tag applied.
//!
//! # Retention
//!
//! Once a second the retention pass applies the policy ([`crate::retention`]) to each item's
//! points and drops the others; when the journal is more than [`JOURNAL_HIGH_PERCENT`] full it
//! also drops the oldest points until enough journal would be freed. The applier advances the
//! base replica only up to the oldest point kept, so the journal holds exactly what the kept
//! points need. With `window = "0s"` no point is kept and the base replica follows the stream.
//!
//! # Test failover and failover
//!
//! A test failover presents a point as an [`overlay::View`] exported over NBD; the base replica
//! is *held* (not advanced, the journal not freed) while it exists. It is recorded in redb
//! (`test/<agent>/<disk>`), so a restarted master target serves it again, at the same address
//! when that port is free, with its scratch's writes. A failover holds the base
//! too, materialises the point into a new image through the writer plugin, and stops the item's
//! replication. The item's state machine, each transition recorded with time and cause:
//!
//! ```text
//! protected ──failover──▶ failing-over ──image complete──▶ failed-over ──commit──▶ committed
//!                              │  ▲ (restart: materialisation starts again)
//!                              ▼  │ failover (retry)
//!                        failover-failed
//! ```
//!
//! A planned failover first asks the agent to stop (its front end closes after a final flush
//! and a final tag), waits until that tag is durable here, then fails over to it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use haven_host::Access;
use haven_net::control::{self, Command, Reply, Request};
use haven_store::state::{StateDb, StreamKey};
use haven_wire::{Record, Seq, Tag, TagKind};
use serde::{Deserialize, Serialize};

use crate::ingest::lock;
use crate::master_target::{MasterTarget, Replica, Wake};
use crate::overlay::{Base, Scratch, View};
use crate::retention::{self, PointAge};
use crate::{failpoint, now_ms, peer_hex};

/// The journal is pruned of old points above this fill level (percent of `journal_max_bytes`).
pub const JOURNAL_HIGH_PERCENT: u64 = 75;
/// Longest a control request to the agent may take (its quiesce hooks included).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(150);
/// Longest the master target waits for a point's tag to arrive after the agent took it.
const POINT_ARRIVAL: Duration = Duration::from_secs(120);
/// Bytes copied per step of a materialisation.
const COPY_CHUNK: usize = 4 << 20;
/// All-zero blocks of this size are left as holes in a failover image.
const SPARSE_BLOCK: usize = 64 << 10;

/// Crash- or application-consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    /// As a power cut would leave the disks.
    Crash,
    /// Taken with the workload quiesced (hooks).
    App,
}

/// A recovery point the master target holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointRecord {
    /// Its id (as the agent chose it).
    pub point: u64,
    /// Its tag's sequence number in the disk's stream.
    pub seq: Seq,
    /// When the agent took it, ms since the Unix epoch.
    pub source_time_ms: u64,
    /// Crash- or application-consistent.
    pub kind: PointKind,
    /// When its tag was durable here, ms since the Unix epoch.
    pub received_ms: u64,
}

impl PointRecord {
    fn from_tag(tag: &Tag) -> PointRecord {
        PointRecord {
            point: tag.point,
            seq: tag.seq,
            source_time_ms: tag.source_time_ms,
            kind: match tag.kind {
                TagKind::Crash => PointKind::Crash,
                TagKind::App => PointKind::App,
            },
            received_ms: now_ms(),
        }
    }
}

/// A point as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    /// The point.
    #[serde(flatten)]
    pub record: PointRecord,
    /// `available`, or `in-use` (a test failover or failover uses it).
    pub state: String,
}

/// Where an item is in the failover state machine (module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ItemState {
    /// Replicating.
    #[default]
    Protected,
    /// A point is being materialised; replication is stopped.
    FailingOver,
    /// The image of the point is complete.
    FailedOver,
    /// The failover is final; the other points are gone.
    Committed,
    /// Materialising failed; `haven failover` may be retried.
    FailoverFailed,
}

impl ItemState {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            ItemState::Protected => "protected",
            ItemState::FailingOver => "failing-over",
            ItemState::FailedOver => "failed-over",
            ItemState::Committed => "committed",
            ItemState::FailoverFailed => "failover-failed",
        }
    }
}

/// One recorded transition or event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// State before.
    pub from: ItemState,
    /// State after (equal to `from` for an event such as a test failover).
    pub to: ItemState,
    /// Why.
    pub cause: String,
}

/// What the master target keeps about an item's failover.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemRecord {
    /// Current state.
    pub state: ItemState,
    /// The point failed over to.
    #[serde(default)]
    pub point: Option<PointRecord>,
    /// The failover image, below the writer's storage root.
    #[serde(default)]
    pub image: Option<String>,
    /// Whether the failover was planned.
    #[serde(default)]
    pub planned: bool,
    /// Every transition, oldest first.
    #[serde(default)]
    pub history: Vec<Transition>,
}

/// A running test failover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestFailoverInfo {
    /// The point presented.
    pub point: PointRecord,
    /// Where NBD clients reach it.
    pub uri: String,
    /// Whether writes are accepted (into a scratch overlay).
    pub writable: bool,
    /// When it started, ms since the Unix epoch.
    pub started_ms: u64,
}

/// A running test failover as redb keeps it, to serve it again after a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TestRecord {
    info: TestFailoverInfo,
    /// The NBD export's name and port.
    export: String,
    port: u16,
}

/// An item as listed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemInfo {
    /// The source agent's id.
    pub agent_id: String,
    /// The protected machine.
    pub machine_name: String,
    /// The disk.
    pub disk: u32,
    /// Size in bytes.
    pub size: u64,
    /// The failover state machine.
    pub item: ItemRecord,
    /// Points held.
    pub points: usize,
    /// The running test failover, if any.
    pub test_failover: Option<TestFailoverInfo>,
    /// Bytes the journal holds.
    pub journal_bytes: u64,
    /// The base replica's applied seq.
    pub applied_seq: Seq,
}

/// A running test failover's parts.
pub(crate) struct ActiveTest {
    info: TestFailoverInfo,
    view: Arc<View>,
    server: Arc<haven_nbd::Server>,
    port: u16,
}

impl ActiveTest {
    /// Where NBD clients reach it.
    pub fn uri(&self) -> &str {
        &self.info.uri
    }
}

/// What a replica keeps for recovery.
#[derive(Default)]
pub(crate) struct ReplicaRecovery {
    /// Points by tag seq.
    pub points: Mutex<BTreeMap<Seq, PointRecord>>,
    /// The base replica is held at or below this seq (test failover, failover).
    pub hold: Mutex<Option<Seq>>,
    pub item: Mutex<ItemRecord>,
    pub test: Mutex<Option<ActiveTest>>,
    /// Highest tag seq ever registered: a tag at or below it that is not listed was dropped
    /// by retention and is not registered again.
    pub registered: std::sync::atomic::AtomicU64,
    /// A failover request is running (planned ones wait for the source).
    pub busy: std::sync::atomic::AtomicBool,
}

impl ReplicaRecovery {
    /// Where the applier may advance the base replica to, given what is durable.
    pub fn apply_target(&self, durable: Seq, keep_points: bool) -> Seq {
        let mut target = durable;
        if keep_points && let Some((&oldest, _)) = lock(&self.points).first_key_value() {
            target = target.min(oldest);
        }
        if let Some(h) = *lock(&self.hold) {
            target = target.min(h);
        }
        target
    }

    /// The newest point held.
    pub fn newest(&self) -> Option<PointRecord> {
        lock(&self.points).values().next_back().copied()
    }
}

/// Why a recovery request failed: a class (for the HTTP status) and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RecoveryError {
    /// The class.
    pub kind: ErrorKind,
    /// What happened and what to do.
    pub message: String,
}

/// Classes of [`RecoveryError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such item or point.
    NotFound,
    /// Not possible in the item's current state.
    Conflict,
    /// A bad argument.
    Invalid,
    /// The source cannot be reached.
    Unavailable,
    /// Something failed here.
    Internal,
}

fn err(kind: ErrorKind, message: impl Into<String>) -> RecoveryError {
    RecoveryError {
        kind,
        message: message.into(),
    }
}

fn internal(e: impl std::fmt::Display) -> RecoveryError {
    err(ErrorKind::Internal, e.to_string())
}

/// Which point a request means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointSel {
    /// The newest point held.
    Latest,
    /// The point with this id.
    Id(u64),
}

impl std::str::FromStr for PointSel {
    type Err = RecoveryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "latest" {
            return Ok(PointSel::Latest);
        }
        s.parse().map(PointSel::Id).map_err(|_| {
            err(
                ErrorKind::Invalid,
                format!("point {s:?} is neither `latest` nor a point id (see `haven point list`)"),
            )
        })
    }
}

/// The prefix of a disk's point keys: one key per point, so registering or dropping one
/// writes only that one.
fn points_prefix(key: StreamKey) -> String {
    format!("point/{key}/")
}

fn point_key(key: StreamKey, seq: Seq) -> String {
    format!("point/{key}/{seq:020}")
}

fn item_key(key: StreamKey) -> String {
    format!("item/{key}")
}

fn test_key(key: StreamKey) -> String {
    format!("test/{key}")
}

impl MasterTarget {
    /// Loads a replica's points and item state (at open), adding tags the journal holds that
    /// redb missed, and clearing what a previous run's test failover left.
    pub(crate) fn load_recovery(&self, replica: &Replica, applied: Seq) -> anyhow::Result<()> {
        let key = replica.stream.key;
        let rec = &replica.recovery;
        let stored: BTreeMap<Seq, PointRecord> = self
            .state
            .json_with_prefix::<PointRecord>(&points_prefix(key))?
            .into_iter()
            .map(|(_, p)| (p.seq, p))
            .collect();
        let mut points = stored.clone();
        {
            let journal = replica.stream.journal();
            for e in journal.entries() {
                if e.kind == haven_store::journal::EntryKind::Tag
                    && e.seq > applied
                    && !points.contains_key(&e.seq)
                    && let Ok(Record::Tag(t)) = journal.get(e.seq)
                {
                    points.insert(t.seq, PointRecord::from_tag(&t));
                }
            }
        }
        // A point below the base replica can no longer be presented.
        points.retain(|&seq, _| seq >= applied);
        let added: Vec<PointRecord> = points
            .values()
            .filter(|p| !stored.contains_key(&p.seq))
            .copied()
            .collect();
        let dropped: Vec<Seq> = stored
            .keys()
            .filter(|s| !points.contains_key(s))
            .copied()
            .collect();
        let newest = points.keys().next_back().copied().unwrap_or(0);
        rec.registered.store(newest.max(applied), Ordering::Release);
        *lock(&rec.points) = points;
        store_points(&self.state, key, &added, &dropped)?;
        let item: ItemRecord = self.state.get_json(&item_key(key))?.unwrap_or_default();
        if matches!(
            item.state,
            ItemState::FailingOver | ItemState::FailedOver | ItemState::Committed
        ) {
            *lock(&rec.hold) = Some(applied);
        }
        *lock(&rec.item) = item;
        // A recorded test failover is served again (`restore_test`, once the replica is open);
        // until then the base stays where it is. Anything else in its folder is a leftover of
        // one that was starting or being cleaned up.
        let test: Option<TestRecord> = self.state.get_json(&test_key(key))?;
        match test {
            Some(t) if t.info.point.seq >= applied => {
                let mut hold = lock(&rec.hold);
                *hold = Some(hold.map_or(applied, |h| h.min(applied)));
            }
            _ => {
                let dir = self.test_dir(key);
                if dir.exists() {
                    tracing::info!(dir = %dir.display(), "removing a test failover left by an earlier run");
                    std::fs::remove_dir_all(&dir)?;
                }
            }
        }
        Ok(())
    }

    /// Serves again the test failover a previous run recorded for `r` (at start). One that
    /// cannot be served is cleaned up, and its history says why.
    pub(crate) fn restore_test(&self, r: &Replica) {
        let key = r.stream.key;
        let record: TestRecord = match self.state.get_json(&test_key(key)) {
            Ok(Some(t)) => t,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(item = %key, error = %e, "reading the recorded test failover");
                return;
            }
        };
        let applied = r.applied.load(Ordering::Acquire);
        let point = record.info.point;
        let state = lock(&r.recovery.item).state;
        if point.seq < applied || !lock(&r.recovery.points).contains_key(&point.seq) {
            tracing::error!(item = %key, point = point.point, "the test failover's point is gone");
            let _ = std::fs::remove_dir_all(self.test_dir(key));
            let _ = self.state.remove_json(&test_key(key));
            if state == ItemState::Protected {
                *lock(&r.recovery.hold) = None;
                r.wake();
            }
            let _ = self.transition(
                r,
                state,
                format!(
                    "test failover at point {} could not be served again after a restart (the \
                     point is no longer held; the base replica is at seq {applied}) and was \
                     cleaned up",
                    point.point
                ),
                |_| {},
            );
            return;
        }
        match self.start_test(r, &record, applied, true) {
            Ok(active) => {
                let uri = active.info.uri.clone();
                let moved = active.port != record.port;
                let record = TestRecord {
                    info: active.info.clone(),
                    export: record.export,
                    port: active.port,
                };
                *lock(&r.recovery.test) = Some(active);
                if let Err(e) = self.state.put_json(&test_key(key), &record) {
                    tracing::warn!(item = %key, error = %e, "recording the test failover");
                }
                let cause = if !moved {
                    format!(
                        "test failover at point {} served again after a restart ({uri})",
                        point.point
                    )
                } else {
                    format!(
                        "test failover at point {} served again after a restart, at a new address \
                         ({uri}; its port was taken)",
                        point.point
                    )
                };
                let _ = self.transition(r, state, cause, |_| {});
            }
            // Kept as it is (record, scratch, the base held): the cause may pass, and what the
            // drill wrote is not thrown away without the operator.
            Err(e) => {
                tracing::error!(item = %key, error = %format!("{e:#}"), "test failover not served again");
                let machine = lock(&r.stream.machine_name).clone();
                let _ = self.transition(
                    r,
                    state,
                    format!(
                        "test failover at point {} could not be served again after a restart: \
                         {e:#}; it is kept with its writes: restart the master target once the \
                         cause is fixed, or discard it with `haven failover cleanup {machine}`",
                        point.point
                    ),
                    |_| {},
                );
            }
        }
    }

    fn test_dir(&self, key: StreamKey) -> PathBuf {
        self.config.data_dir.join("test-failover").join(format!(
            "{}-{}",
            peer_hex(&key.peer),
            key.disk
        ))
    }

    fn transition(
        &self,
        replica: &Replica,
        to: ItemState,
        cause: impl Into<String>,
        f: impl FnOnce(&mut ItemRecord),
    ) -> Result<ItemRecord, RecoveryError> {
        let mut item = lock(&replica.recovery.item);
        let mut next = item.clone();
        let cause = cause.into();
        tracing::info!(item = %replica.stream.key, from = next.state.name(), to = to.name(), %cause, "item transition");
        next.history.push(Transition {
            at_ms: now_ms(),
            from: next.state,
            to,
            cause,
        });
        next.state = to;
        f(&mut next);
        self.state
            .put_json(&item_key(replica.stream.key), &next)
            .map_err(internal)?;
        *item = next.clone();
        Ok(next)
    }

    /// Finds an item by agent id (or a unique prefix of at least 6 hex digits), or by machine
    /// name; `NAME/DISK` picks a disk.
    pub(crate) fn find_item(&self, item: &str) -> Result<Arc<Replica>, RecoveryError> {
        let (name, disk) = match item.rsplit_once('/') {
            Some((n, d)) => match d.parse::<u32>() {
                Ok(d) => (n, Some(d)),
                Err(_) => (item, None),
            },
            None => (item, None),
        };
        let replicas: Vec<Arc<Replica>> = lock(&self.replicas).values().cloned().collect();
        let reports = lock(&self.reports).clone();
        let matches: Vec<Arc<Replica>> = replicas
            .into_iter()
            .filter(|r| disk.is_none_or(|d| r.stream.key.disk == d))
            .filter(|r| {
                let id = peer_hex(&r.stream.key.peer);
                let machine = reports.get(&id).map_or_else(
                    || lock(&r.stream.machine_name).clone(),
                    |x| x.machine_name.clone(),
                );
                id == name || (name.len() >= 6 && id.starts_with(name)) || machine == name
            })
            .collect();
        match matches.len() {
            1 => Ok(matches.into_iter().next().expect("one match")),
            0 => Err(err(
                ErrorKind::NotFound,
                format!(
                    "no protected item {item:?} at this master target: name a machine or an agent \
                     id as `haven status` lists them"
                ),
            )),
            n => Err(err(
                ErrorKind::Invalid,
                format!(
                    "{item:?} names {n} items: use the agent id, or MACHINE/DISK to pick a disk"
                ),
            )),
        }
    }

    /// Every item.
    pub fn items(&self) -> Vec<ItemInfo> {
        let replicas: Vec<Arc<Replica>> = lock(&self.replicas).values().cloned().collect();
        let reports = lock(&self.reports).clone();
        let mut out: Vec<ItemInfo> = replicas
            .iter()
            .map(|r| {
                let id = peer_hex(&r.stream.key.peer);
                ItemInfo {
                    machine_name: reports.get(&id).map_or_else(
                        || lock(&r.stream.machine_name).clone(),
                        |x| x.machine_name.clone(),
                    ),
                    agent_id: id,
                    disk: r.stream.key.disk,
                    size: r.stream.info.size,
                    item: lock(&r.recovery.item).clone(),
                    points: lock(&r.recovery.points).len(),
                    test_failover: lock(&r.recovery.test).as_ref().map(|t| t.info.clone()),
                    journal_bytes: r.stream.journal().stats().bytes,
                    applied_seq: r.applied.load(Ordering::Acquire),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.machine_name, a.disk).cmp(&(&b.machine_name, b.disk)));
        out
    }

    /// One item.
    pub fn item(&self, item: &str) -> Result<ItemInfo, RecoveryError> {
        let r = self.find_item(item)?;
        self.items()
            .into_iter()
            .find(|i| i.agent_id == peer_hex(&r.stream.key.peer) && i.disk == r.stream.key.disk)
            .ok_or_else(|| err(ErrorKind::NotFound, format!("no item {item:?}")))
    }

    /// The item's points, oldest first.
    pub fn points(&self, item: &str) -> Result<Vec<PointInfo>, RecoveryError> {
        let r = self.find_item(item)?;
        let in_use = in_use(&r);
        Ok(lock(&r.recovery.points)
            .values()
            .map(|p| PointInfo {
                record: *p,
                state: if in_use.contains(&p.seq) {
                    "in-use".into()
                } else {
                    "available".into()
                },
            })
            .collect())
    }

    fn pick(&self, r: &Replica, item: &str, sel: PointSel) -> Result<PointRecord, RecoveryError> {
        let points = lock(&r.recovery.points);
        match sel {
            PointSel::Latest => points
                .values()
                .next_back()
                .copied()
                .ok_or_else(|| err(ErrorKind::Conflict, self.no_points_message(r, item))),
            PointSel::Id(id) => points
                .values()
                .find(|p| p.point == id)
                .copied()
                .ok_or_else(|| {
                    let range = match (points.values().next(), points.values().next_back()) {
                        (Some(a), Some(b)) => format!(
                            "it holds {} points, from {} to {}",
                            points.len(),
                            a.point,
                            b.point
                        ),
                        _ => "it holds none".into(),
                    };
                    err(
                        ErrorKind::NotFound,
                        format!(
                            "item {item}: no point {id}: it is outside the retention window or was \
                         never taken ({range}); `haven point list {item}` lists them"
                        ),
                    )
                }),
        }
    }

    fn no_points_message(&self, r: &Replica, item: &str) -> String {
        let id = peer_hex(&r.stream.key.peer);
        let disk = lock(&self.reports).get(&id).and_then(|rep| {
            rep.disks
                .iter()
                .find(|d| d.disk == r.stream.key.disk)
                .cloned()
        });
        match disk {
            Some(d) if d.state == haven_net::stream::DiskState::InitialSync => format!(
                "item {item} is in its initial sync ({}% done) and has no recovery point yet: wait \
                 until `haven status` shows it protected",
                d.sync_done_bytes * 100 / d.size.max(1)
            ),
            Some(d) if d.state == haven_net::stream::DiskState::Resyncing => format!(
                "item {item} is resyncing and has no recovery point: wait until `haven status` \
                 shows it protected"
            ),
            _ if self.config.retention.window.is_zero() => format!(
                "item {item} has no recovery point: this master target keeps none (retention \
                 window 0s); set [master_target.retention] window in its config"
            ),
            _ => format!(
                "item {item} has no recovery point yet: points arrive every few seconds once it is \
                 protected (check `haven status`), or take one with `haven point create {item}`"
            ),
        }
    }

    fn route(&self, r: &Replica) -> Result<haven_net::quinn::Connection, RecoveryError> {
        let id = peer_hex(&r.stream.key.peer);
        lock(&self.routes)
            .get(&id)
            .filter(|c| c.close_reason().is_none())
            .cloned()
            .ok_or_else(|| {
                err(
                    ErrorKind::Unavailable,
                    format!(
                        "the source of item {} ({id}) is not reachable: no process server \
                         forwards for it now; check that its agent and process server run \
                         (`haven status` on both sites)",
                        lock(&r.stream.machine_name)
                    ),
                )
            })
    }

    async fn ask_agent(
        &self,
        r: &Replica,
        command: Command,
    ) -> Result<haven_net::control::PointTaken, RecoveryError> {
        let conn = self.route(r)?;
        let req = Request {
            agent_id: peer_hex(&r.stream.key.peer),
            command,
        };
        match control::call(&conn, &req, CONTROL_TIMEOUT).await {
            Ok(Reply::Taken(points)) => points
                .into_iter()
                .find(|p| p.disk == r.stream.key.disk)
                .ok_or_else(|| err(ErrorKind::Internal, "the agent tagged another disk")),
            // The relay's own failures (agent not connected, no answer) mean "try later".
            Ok(Reply::Failed(why))
                if why.starts_with("process server:") || why.contains("control stream") =>
            {
                Err(err(ErrorKind::Unavailable, why))
            }
            Ok(Reply::Failed(why)) => Err(err(ErrorKind::Conflict, format!("the agent: {why}"))),
            Err(e) => Err(err(ErrorKind::Unavailable, e.to_string())),
        }
    }

    async fn await_point(&self, r: &Replica, seq: Seq) -> Result<PointRecord, RecoveryError> {
        let deadline = Instant::now() + POINT_ARRIVAL;
        loop {
            if let Some(p) = lock(&r.recovery.points).get(&seq) {
                return Ok(*p);
            }
            if self.config.retention.window.is_zero() && r.stream.durable() >= seq {
                // Durable but not kept (retention window 0).
                return Err(err(
                    ErrorKind::Conflict,
                    "the point arrived but retention dropped it at once (window 0s)",
                ));
            }
            if Instant::now() > deadline {
                return Err(err(
                    ErrorKind::Unavailable,
                    format!(
                        "the agent took the point (tag seq {seq}) but it has not arrived here \
                         within {POINT_ARRIVAL:?}; it arrives once replication catches up — \
                         check `haven status`"
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `haven point create`: the agent tags its stream now; returns once the point is here.
    pub async fn create_point(&self, item: &str, app: bool) -> Result<PointRecord, RecoveryError> {
        let r = self.find_item(item)?;
        require_protected(&r, item, "no points are taken after a failover")?;
        let taken = self.ask_agent(&r, Command::Point { app }).await?;
        self.await_point(&r, taken.seq).await
    }

    /// `haven failover test`: presents a point over NBD; returns at once.
    pub fn test_failover(
        &self,
        item: &str,
        sel: PointSel,
        writable: bool,
    ) -> Result<TestFailoverInfo, RecoveryError> {
        let r = self.find_item(item)?;
        require_protected(&r, item, "a test failover needs a protected item")?;
        if r.recovery.busy.load(Ordering::Acquire) {
            return Err(err(
                ErrorKind::Conflict,
                format!("a failover of item {item} is running"),
            ));
        }
        let mut test = lock(&r.recovery.test);
        if let Some(t) = test.as_ref() {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "a test failover of item {item} is running (point {}, {}): clean it up first \
                     with `haven failover cleanup {item}`",
                    t.info.point.point, t.info.uri
                ),
            ));
        }
        let point = self.pick(&r, item, sel)?;
        let base_seq = self.hold_base(&r);
        let machine = lock(&r.stream.machine_name).clone();
        let export = format!("{machine}-{}-{}", r.stream.key.disk, point.point);
        let want = TestRecord {
            info: TestFailoverInfo {
                point,
                uri: String::new(),
                writable,
                started_ms: now_ms(),
            },
            export: export.clone(),
            port: 0,
        };
        let started = self
            .start_test(&r, &want, base_seq, false)
            .and_then(|active| {
                let record = TestRecord {
                    info: active.info.clone(),
                    export: export.clone(),
                    port: active.port,
                };
                match self.state.put_json(&test_key(r.stream.key), &record) {
                    Ok(()) => Ok(active),
                    Err(e) => {
                        active.server.close();
                        Err(anyhow::anyhow!("recording it: {e}"))
                    }
                }
            });
        let active = match started {
            Ok(a) => a,
            Err(e) => {
                *lock(&r.recovery.hold) = None;
                let _ = std::fs::remove_dir_all(self.test_dir(r.stream.key));
                return Err(internal(format!(
                    "item {item}: starting the test failover: {e:#}"
                )));
            }
        };
        let info = active.info.clone();
        *test = Some(active);
        drop(test);
        let state = lock(&r.recovery.item).state;
        self.transition(
            &r,
            state,
            format!(
                "test failover started at point {} ({}, {})",
                info.point.point,
                info.uri,
                if writable { "writable" } else { "read-only" }
            ),
            |_| {},
        )?;
        Ok(info)
    }

    /// Builds the view of `want`'s point over the base (at `base_seq`, held) and serves it
    /// over NBD as `want.export` on `want.port` (0: any; a taken port falls back to any).
    /// `reopen` keeps the scratch an earlier run left.
    fn start_test(
        &self,
        r: &Replica,
        want: &TestRecord,
        base_seq: Seq,
        reopen: bool,
    ) -> anyhow::Result<ActiveTest> {
        let TestRecord { info, export, port } = want;
        let (point, writable, port) = (info.point, info.writable, *port);
        let dir = self.test_dir(r.stream.key);
        let scratch_path = dir.join("scratch.raw");
        let scratch = match (writable, reopen) {
            (false, _) => Scratch::None,
            (true, false) => Scratch::Create(&scratch_path),
            (true, true) => Scratch::Reopen(&scratch_path),
        };
        let base = self.open_base(r)?;
        let view = Arc::new(View::build(
            r.stream.clone(),
            base,
            base_seq,
            point.seq,
            scratch,
        )?);
        let listener = match std::net::TcpListener::bind((self.config.nbd_host, port)) {
            Ok(l) => l,
            Err(e) if port != 0 && e.kind() == std::io::ErrorKind::AddrInUse => {
                tracing::warn!(
                    port,
                    "the test failover's port is taken; serving it on another"
                );
                std::net::TcpListener::bind((self.config.nbd_host, 0))?
            }
            Err(e) => return Err(e.into()),
        };
        let addr = listener.local_addr()?;
        let server = Arc::new(haven_nbd::Server::new(
            Arc::new(ViewBackend(view.clone())),
            export.clone(),
        ));
        let s = server.clone();
        std::thread::Builder::new()
            .name(format!("nbd-test-{}", r.stream.key))
            .spawn(move || {
                if let Err(e) = s.serve_tcp(listener) {
                    tracing::warn!(error = %e, "test failover NBD server stopped");
                }
            })?;
        Ok(ActiveTest {
            info: TestFailoverInfo {
                point,
                uri: format!("nbd://{addr}/{export}"),
                writable,
                started_ms: info.started_ms,
            },
            view,
            server,
            port: addr.port(),
        })
    }

    /// Holds the base replica where it is and returns its applied seq (see
    /// [`ReplicaRecovery::release_limit`]: nothing is freed above the hold).
    fn hold_base(&self, r: &Replica) -> Seq {
        // The applier records its applied seq and frees the journal under this lock, so the
        // seq read here is what the journal holds everything after. A batch being written now
        // may still raise the applied seq, but nothing above the hold is freed.
        let mut hold = lock(&r.recovery.hold);
        let applied = r.applied.load(Ordering::Acquire);
        *hold = Some(hold.map_or(applied, |h| h.min(applied)));
        hold.unwrap_or(applied)
    }

    fn open_base(&self, r: &Replica) -> anyhow::Result<Base> {
        let mut plugin = self.host.load_writer(&self.config.writer)?;
        let disk = plugin.open(&r.path, Access::ReadOnly, &[])?;
        Ok(Base::new(plugin, disk))
    }

    /// `haven failover cleanup`: ends the test failover and discards what it wrote.
    pub fn cleanup_test(&self, item: &str) -> Result<TestFailoverInfo, RecoveryError> {
        let r = self.find_item(item)?;
        let key = r.stream.key;
        let active = lock(&r.recovery.test).take();
        let info = match active {
            Some(active) => {
                let ActiveTest {
                    info, view, server, ..
                } = active;
                server.close();
                drop(server);
                // The accept loop and the connections' threads hold the view; they end once
                // closed.
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut view = view;
                let discarded = loop {
                    match Arc::try_unwrap(view) {
                        Ok(v) => break v.discard(),
                        Err(v) if Instant::now() < deadline => {
                            view = v;
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(_) => break Ok(()),
                    }
                };
                if let Err(e) = discarded {
                    tracing::warn!(error = %format!("{e:#}"), "discarding the test failover's view");
                }
                info
            }
            // One a restart could not serve again is only recorded.
            None => match self
                .state
                .get_json::<TestRecord>(&test_key(key))
                .map_err(internal)?
            {
                Some(record) => record.info,
                None => {
                    return Err(err(
                        ErrorKind::Conflict,
                        format!("item {item} has no test failover to clean up"),
                    ));
                }
            },
        };
        // Whatever fails from here, the hold is released: files left behind are removed at
        // the next start, as is a record whose files are gone.
        let forgotten = self.state.remove_json(&test_key(key));
        let dir = self.test_dir(key);
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "removing the test failover's files");
        }
        let state = lock(&r.recovery.item).state;
        if state == ItemState::Protected && !r.recovery.busy.load(Ordering::Acquire) {
            *lock(&r.recovery.hold) = None;
            r.wake();
        }
        self.transition(
            &r,
            state,
            format!("test failover at point {} cleaned up", info.point.point),
            |_| {},
        )?;
        forgotten.map_err(|e| {
            internal(format!(
                "item {item}: the test failover is stopped and its files removed, but its \
                 record could not be removed ({e}); run the cleanup again"
            ))
        })?;
        Ok(info)
    }

    /// `haven failover`: fails the item over to a point (unplanned), or (planned) stops the
    /// source, takes a final point and fails over to it. Returns when materialising started.
    pub async fn failover(
        self: &Arc<Self>,
        item: &str,
        sel: PointSel,
        planned: bool,
    ) -> Result<ItemRecord, RecoveryError> {
        let r = self.find_item(item)?;
        if r.recovery.busy.swap(true, Ordering::AcqRel) {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "a failover of item {item} is already running; see `haven failover show {item}`"
                ),
            ));
        }
        let _busy = Busy(&r.recovery.busy);
        let state = lock(&r.recovery.item).state;
        match state {
            ItemState::Protected | ItemState::FailoverFailed => {}
            s => {
                return Err(err(
                    ErrorKind::Conflict,
                    format!(
                        "item {item} is {}: it can fail over only when protected (or after a \
                         failed failover)",
                        s.name()
                    ),
                ));
            }
        }
        if let Some(t) = lock(&r.recovery.test).as_ref() {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "a test failover of item {item} is running (point {}): clean it up first \
                     with `haven failover cleanup {item}`",
                    t.info.point.point
                ),
            ));
        }
        let point = if planned {
            if lock(&r.recovery.points).is_empty() {
                return Err(err(ErrorKind::Conflict, self.no_points_message(&r, item)));
            }
            let taken = self.ask_agent(&r, Command::Stop).await?;
            self.await_point(&r, taken.seq).await.map_err(|e| RecoveryError {
                message: format!(
                    "the source of item {item} is stopped (its final point is {}), but: {}; once \
                     the point has arrived (`haven point list {item}`), fail over with `haven \
                     failover {item} --point {}`",
                    taken.point, e.message, taken.point
                ),
                ..e
            })?
        } else {
            self.pick(&r, item, sel)?
        };
        self.hold_base(&r);
        let cause = if planned {
            format!(
                "planned failover: the source stopped at point {}",
                point.point
            )
        } else {
            format!("failover to point {} requested", point.point)
        };
        let record = self.transition(&r, ItemState::FailingOver, cause, |i| {
            i.point = Some(point);
            i.planned = planned;
            i.image = None;
        })?;
        self.stop_replication(&r);
        self.spawn_materialise(r.clone());
        Ok(record)
    }

    /// Cuts the item's replication: its process-server connection is closed and
    /// [`MasterTarget::refusal`] refuses it from now on.
    fn stop_replication(&self, r: &Replica) {
        let id = peer_hex(&r.stream.key.peer);
        if let Some(conn) = lock(&self.routes).remove(&id) {
            conn.close(0u32.into(), b"item failed over");
        }
    }

    /// Why the item's stream is refused, if it is.
    pub(crate) fn refusal(&self, r: &Replica) -> Option<String> {
        let item = lock(&r.recovery.item);
        (item.state != ItemState::Protected).then(|| {
            format!(
                "disk {} was failed over at the master target (state {}, point {}): replication \
                 of it is stopped",
                r.stream.key,
                item.state.name(),
                item.point.map_or(0, |p| p.point)
            )
        })
    }

    /// A failover a stop cut short: its image is made again from the start.
    pub(crate) fn resume_failover(self: &Arc<Self>, r: Arc<Replica>) {
        if let Err(e) = self.transition(
            &r,
            ItemState::FailingOver,
            "materialising again after a restart (the incomplete image is replaced)",
            |_| {},
        ) {
            tracing::error!(error = %e, "recording a failover transition");
        }
        self.spawn_materialise(r);
    }

    pub(crate) fn spawn_materialise(self: &Arc<Self>, r: Arc<Replica>) {
        let mt = self.clone();
        let name = format!("materialise-{}", r.stream.key);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let Some(point) = lock(&r.recovery.item).point else {
                return;
            };
            let result = mt.materialise(&r, point);
            let outcome = match result {
                Ok(image) => mt.transition(
                    &r,
                    ItemState::FailedOver,
                    format!("point {} materialised into {image}", point.point),
                    |i| i.image = Some(image.clone()),
                ),
                Err(e) => mt.transition(
                    &r,
                    ItemState::FailoverFailed,
                    format!(
                        "materialising point {} failed: {e:#}; retry `haven failover`",
                        point.point
                    ),
                    |_| {},
                ),
            };
            if let Err(e) = outcome {
                tracing::error!(error = %e, "recording a failover transition");
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start materialising");
        }
    }

    /// Writes the point into a new image through the writer plugin; returns its full path.
    ///
    /// The image is written in a staging folder (`failover/<agent>/.staging-disk<N>/`) and
    /// renamed to its final name only once it is complete and flushed, with the folder synced
    /// after: whoever sees `failover/<agent>/disk<N>-point<P>.<writer>` sees a whole image. (A
    /// format of several files keeps their relative names: the others are moved first, the
    /// named file last.) What an interrupted run left is removed and made again.
    fn materialise(&self, r: &Replica, point: PointRecord) -> anyhow::Result<String> {
        let key = r.stream.key;
        let agent_dir = format!("failover/{}", peer_hex(&key.peer));
        let name = format!(
            "disk{}-point{}.{}",
            key.disk, point.point, self.config.writer.name
        );
        let staging = format!("{agent_dir}/.staging-disk{}", key.disk);
        let image = format!("{staging}/{name}");
        let root = self
            .config
            .writer
            .grants
            .storage_root
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the writer plugin has no storage root"))?;
        let (final_dir, staging_dir) = (root.join(&agent_dir), root.join(&staging));
        let full = final_dir.join(&name);
        if staging_dir.exists() {
            tracing::info!(folder = %staging_dir.display(), "removing an incomplete failover image");
            std::fs::remove_dir_all(&staging_dir)?;
        }
        if full.exists() {
            tracing::info!(image = %full.display(), "replacing a failover image made before a restart");
            std::fs::remove_file(&full)?;
        }
        // Each folder made is durable in its parent (the image's folder too, for the rename).
        haven_fsutil::create_dir_all(&staging_dir)?;
        let base_seq = r.applied.load(Ordering::Acquire);
        let view = View::build(
            r.stream.clone(),
            self.open_base(r)?,
            base_seq,
            point.seq,
            Scratch::None,
        )?;
        let mut plugin = self.host.load_writer(&self.config.writer)?;
        let disk = plugin.create(&image, view.size(), 512, &[])?;
        let started = Instant::now();
        let size = view.size();
        // Reading the view and writing the image overlap: a reader thread fills chunks (at
        // most two ahead) while this one writes the last.
        let (tx, rx) = std::sync::mpsc::sync_channel::<anyhow::Result<(u64, Vec<u8>)>>(2);
        std::thread::scope(|scope| -> anyhow::Result<()> {
            // Owned here, so an error below drops it and ends the reader before the scope
            // joins it.
            let rx = rx;
            let view = &view;
            scope.spawn(move || {
                let mut pos = 0u64;
                while pos < size {
                    let n = (size - pos).min(COPY_CHUNK as u64) as usize;
                    let mut buf = vec![0u8; n];
                    let read = view.read(pos, &mut buf).map(|()| (pos, buf));
                    let failed = read.is_err();
                    // The writer stopped (an error of its own): nothing more to read for.
                    if tx.send(read).is_err() || failed {
                        return;
                    }
                    pos += n as u64;
                }
            });
            let mut half_hit = false;
            for chunk in &rx {
                let (pos, mut buf) = chunk?;
                // Runs of blocks that are not all zero are written; the rest stays a hole of
                // the new (all-zero) image.
                let mut run: Option<usize> = None;
                for (i, block) in buf.chunks(SPARSE_BLOCK).enumerate() {
                    let zero = haven_store::is_all_zero(block);
                    match (run, zero) {
                        (None, false) => run = Some(i * SPARSE_BLOCK),
                        (Some(start), true) => {
                            let mut data = buf[start..i * SPARSE_BLOCK].to_vec();
                            plugin.write(&disk, pos + start as u64, &mut data)?;
                            run = None;
                        }
                        _ => {}
                    }
                }
                let end = pos + buf.len() as u64;
                match run {
                    Some(0) => plugin.write(&disk, pos, &mut buf)?,
                    Some(start) => {
                        let mut data = buf[start..].to_vec();
                        plugin.write(&disk, pos + start as u64, &mut data)?;
                    }
                    None => {}
                }
                if !half_hit && end >= size / 2 {
                    half_hit = true;
                    failpoint::hit("failover.mid-copy");
                }
            }
            Ok(())
        })?;
        plugin.flush(&disk)?;
        plugin.close(disk)?;
        let _ = view.discard();
        publish(&staging_dir, &final_dir, &name)?;
        tracing::info!(
            image = %full.display(),
            bytes = size,
            seconds = started.elapsed().as_secs_f64(),
            "failover image complete"
        );
        Ok(full.display().to_string())
    }

    /// `haven failover commit`: the failover is final; the other points are discarded.
    pub fn commit(&self, item: &str) -> Result<ItemRecord, RecoveryError> {
        let r = self.find_item(item)?;
        let state = lock(&r.recovery.item).state;
        if state != ItemState::FailedOver {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "item {item} is {}: only a failed-over item can be committed",
                    state.name()
                ),
            ));
        }
        let keep = lock(&r.recovery.item).point.map(|p| p.seq);
        let dropped: Vec<Seq> = {
            let mut points = lock(&r.recovery.points);
            let dropped = points
                .keys()
                .filter(|seq| Some(**seq) != keep)
                .copied()
                .collect();
            points.retain(|seq, _| Some(*seq) == keep);
            dropped
        };
        store_points(&self.state, r.stream.key, &[], &dropped).map_err(internal)?;
        self.transition(
            &r,
            ItemState::Committed,
            format!("committed; {} other points discarded", dropped.len()),
            |_| {},
        )
    }

    /// One pass of retention over every item at `now_ms` (see the module docs).
    pub fn retention_pass(&self, now_ms: u64) {
        let replicas: Vec<Arc<Replica>> = lock(&self.replicas).values().cloned().collect();
        for r in replicas {
            if let Err(e) = self.retain(&r, now_ms) {
                tracing::warn!(item = %r.stream.key, error = %format!("{e:#}"), "retention pass");
            }
        }
    }

    fn retain(&self, r: &Replica, now_ms: u64) -> anyhow::Result<()> {
        let policy = &self.config.retention;
        let used = in_use(r);
        let dropped: Vec<PointRecord> = {
            let mut points = lock(&r.recovery.points);
            if points.is_empty() {
                return Ok(());
            }
            let mut keep: BTreeSet<u64> = if policy.window.is_zero() {
                BTreeSet::new()
            } else {
                let ages: Vec<PointAge> = points
                    .values()
                    .map(|p| PointAge {
                        id: p.seq,
                        time_ms: p.source_time_ms,
                        app: p.kind == PointKind::App,
                    })
                    .collect();
                retention::keep(policy, &ages, now_ms)
            };
            // The newest point stays, however old: a source that has been away longer than
            // the window must still be recoverable.
            if !policy.window.is_zero()
                && let Some((&newest, _)) = points.last_key_value()
            {
                keep.insert(newest);
            }
            // Journal space: drop the oldest points until enough would be freed — the newest
            // too when needed (a long stretch without points, e.g. a resync): replication must
            // never stall on a full journal.
            let stats = r.stream.journal().stats();
            let high = self.config.journal.max_bytes / 100 * JOURNAL_HIGH_PERCENT;
            if stats.bytes > high && !keep.is_empty() {
                let excess = stats.bytes - high;
                let entries = r.stream.journal().entries();
                let mut freed = 0u64;
                let mut i = 0;
                let kept: Vec<u64> = keep.iter().copied().collect();
                tracing::warn!(
                    item = %r.stream.key,
                    journal_bytes = stats.bytes,
                    "the journal is {JOURNAL_HIGH_PERCENT}% full: dropping the oldest points early"
                );
                for &seq in &kept {
                    while i < entries.len() && entries[i].seq <= seq {
                        freed += entries[i].stored_bytes;
                        i += 1;
                    }
                    if used.contains(&seq) {
                        break;
                    }
                    keep.remove(&seq);
                    if freed >= excess {
                        break;
                    }
                }
            }
            keep.extend(used.iter().copied());
            let dropped: Vec<PointRecord> = points
                .values()
                .filter(|p| !keep.contains(&p.seq))
                .copied()
                .collect();
            points.retain(|seq, _| keep.contains(seq));
            dropped
        };
        if dropped.is_empty() {
            return Ok(());
        }
        tracing::debug!(item = %r.stream.key, dropped = dropped.len(), "retention dropped points");
        let seqs: Vec<Seq> = dropped.iter().map(|p| p.seq).collect();
        store_points(&self.state, r.stream.key, &[], &seqs)?;
        r.wake();
        Ok(())
    }

    /// Runs the retention pass once a second until the process ends.
    pub(crate) fn spawn_retention(self: &Arc<Self>) {
        let mt = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("retention".into())
            .spawn(move || {
                while let Some(mt) = mt.upgrade() {
                    mt.retention_pass((mt.clock)());
                    drop(mt);
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
    }
}

/// Records `added` points and forgets the `removed` ones, in one transaction.
fn store_points(
    state: &StateDb,
    key: StreamKey,
    added: &[PointRecord],
    removed: &[Seq],
) -> anyhow::Result<()> {
    if added.is_empty() && removed.is_empty() {
        return Ok(());
    }
    let puts: Vec<(String, PointRecord)> =
        added.iter().map(|p| (point_key(key, p.seq), *p)).collect();
    let removes: Vec<String> = removed.iter().map(|&seq| point_key(key, seq)).collect();
    state.update_json(&puts, &removes)?;
    Ok(())
}

/// Registers a point whose tag is durable here (idempotent; a tag retention already dropped is
/// not registered again). Returns whether it was new.
pub(crate) fn register_tag(state: &StateDb, replica: &Replica, tag: &Tag) -> bool {
    let inserted = {
        let mut points = lock(&replica.recovery.points);
        if tag.seq <= replica.recovery.registered.load(Ordering::Acquire) {
            return false;
        }
        replica
            .recovery
            .registered
            .fetch_max(tag.seq, Ordering::AcqRel);
        match points.entry(tag.seq) {
            std::collections::btree_map::Entry::Occupied(_) => None,
            std::collections::btree_map::Entry::Vacant(v) => {
                Some(*v.insert(PointRecord::from_tag(tag)))
            }
        }
    };
    // A point redb misses (a crash right here) is found again in the journal at start.
    if let Some(p) = inserted
        && let Err(e) = store_points(state, replica.stream.key, &[p], &[])
    {
        tracing::warn!(item = %replica.stream.key, error = %format!("{e:#}"), "recording a point");
    }
    inserted.is_some()
}

/// Moves a complete image's files from `staging` into `dir`, `name` last, syncs both folders
/// and removes `staging`. Each file is synced before it moves (the writer flushed its data,
/// this makes sure of it whatever the plugin did).
fn publish(staging: &Path, dir: &Path, name: &str) -> anyhow::Result<()> {
    let mut files: Vec<_> = std::fs::read_dir(staging)
        .with_context(|| format!("reading {}", staging.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    // The named file last: once it appears, its companions are in place.
    files.sort_by_key(|f| f == name);
    for f in &files {
        let from = staging.join(f);
        haven_fsutil::sync_file(&from)?;
        std::fs::rename(&from, dir.join(f))
            .with_context(|| format!("moving {} into {}", from.display(), dir.display()))?;
    }
    haven_fsutil::sync_dir(dir)?;
    std::fs::remove_dir(staging).with_context(|| format!("removing {}", staging.display()))?;
    Ok(haven_fsutil::sync_dir(dir)?)
}

/// Refuses with `why` unless the item is protected.
fn require_protected(r: &Replica, item: &str, why: &str) -> Result<(), RecoveryError> {
    let state = lock(&r.recovery.item).state;
    if state == ItemState::Protected {
        return Ok(());
    }
    Err(err(
        ErrorKind::Conflict,
        format!("item {item} is {}: {why}", state.name()),
    ))
}

/// Clears a replica's `busy` flag when a failover request ends.
struct Busy<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Seqs of the points a test failover or failover uses.
fn in_use(r: &Replica) -> BTreeSet<Seq> {
    let mut used = BTreeSet::new();
    if let Some(t) = lock(&r.recovery.test).as_ref() {
        used.insert(t.info.point.seq);
    }
    if let Some(p) = lock(&r.recovery.item).point {
        used.insert(p.seq);
    }
    used
}

/// A view served over NBD.
struct ViewBackend(Arc<View>);

impl ViewBackend {
    /// A write with FUA is durable before it is acknowledged.
    fn flush_if(&self, fua: bool) -> Result<(), haven_nbd::Error> {
        if fua {
            self.0.flush().map_err(nbd_err)?;
        }
        Ok(())
    }
}

fn nbd_err(e: anyhow::Error) -> haven_nbd::Error {
    haven_nbd::Error::failed(5, format!("{e:#}"))
}

impl haven_nbd::Backend for ViewBackend {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_only(&self) -> bool {
        !self.0.writable()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), haven_nbd::Error> {
        self.0.read(offset, buf).map_err(nbd_err)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), haven_nbd::Error> {
        self.0.write(offset, data).map_err(nbd_err)?;
        self.flush_if(fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_punch: bool,
        fua: bool,
    ) -> Result<(), haven_nbd::Error> {
        self.0.write_zeroes(offset, len).map_err(nbd_err)?;
        self.flush_if(fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), haven_nbd::Error> {
        self.0.write_zeroes(offset, len).map_err(nbd_err)?;
        self.flush_if(fua)
    }

    fn flush(&self) -> Result<(), haven_nbd::Error> {
        self.0.flush().map_err(nbd_err)
    }
}

impl Replica {
    /// Wakes the applier (coalesced).
    pub(crate) fn wake(&self) {
        if !self.change_queued.swap(true, Ordering::AcqRel) {
            let _ = lock(&self.wake).send(Wake::Changed);
        }
    }
}
