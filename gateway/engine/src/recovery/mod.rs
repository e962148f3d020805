//! Recovery points, retention and failover at the master target.
//!
//! # Points
//!
//! A point is a tag record in a disk's stream (taken by the agent, see `agent/src/points.rs`).
//! When its tag is durable in the journal the master target lists it (redb `meta`, one key
//! per point, `point/<agent>/<disk>/<seq>`, so a point costs one small write however many are
//! kept; rebuilt from the journal's tags at start, so a crash between the journal and redb loses
//! none). The replica at point P is the base replica with every journal
//! record up to P's tag applied (`points.rs`).
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
//! A test failover (`test_failover.rs`) presents a point as an [`overlay::View`] exported over
//! NBD; the base replica is *held* (not advanced, the journal not freed) while it exists. It is
//! recorded in redb (`test/<agent>/<disk>`), so a restarted master target serves it again, at
//! the same address when that port is free, with its scratch's writes. A failover
//! (`failover.rs`) holds the base too, materialises the point into a new image through the
//! writer plugin, and stops the item's replication. The item's state machine is a pure
//! function ([`item::transition`]); each transition is recorded with time and cause.
//!
//! A planned failover first asks the agent to stop (its front end closes after a final flush
//! and a final tag), waits until that tag is durable here, then fails over to it.
//!
//! # Locking
//!
//! A replica's recovery facts (points, the item's record, its test failover, whether a
//! failover request runs) change together under one lock, `ReplicaRecovery::state`, which is
//! never held across a plugin call, a file operation or a redb write: a step that needs one
//! claims it first under the lock (a test failover being started or cleaned up, a failover
//! request running) and publishes its outcome under it after. Two other locks order I/O:
//! `hold` (the applier holds it from reading it until the journal is released) and `recording`
//! (serialises the item's redb writes). Order: `recording`, then `state`, then `hold`.
//!
//! [`overlay::View`]: crate::overlay::View

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use haven_host::Access;
use haven_store::state::StreamKey;
use haven_wire::Seq;
use serde::{Deserialize, Serialize};

use crate::ingest::lock;
use crate::master_target::{MasterTarget, Replica};
use crate::overlay::Base;
use crate::peer_hex;

mod failover;
pub mod item;
mod points;
mod reprotect;
mod test_failover;

pub use item::{ItemEvent, ItemRecord, ItemState, Refused, Transition, transition};
pub use points::{
    GroupMemberPoint, GroupPointInfo, JOURNAL_HIGH_PERCENT, MAX_GROUP_MEMBERS, MAX_HOLD, PointInfo,
    PointKind, PointRecord,
};
pub use reprotect::{SeedRecord, SeedSpec};
pub use test_failover::TestFailoverInfo;

pub(crate) use points::register_tag;
pub(crate) use reprotect::{restore_seed, seed_compared, seed_reached, seed_tag};
use test_failover::TestSlot;

/// An item as listed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    #[schema(value_type = u64)]
    pub applied_seq: Seq,
}

impl ItemInfo {
    /// Whether `item` names this item: its machine or agent id (or a prefix of at least 6 hex
    /// digits of it), every disk; `NAME/DISK` one disk.
    pub fn named(&self, item: &str) -> bool {
        let (name, disk) = split_item(item);
        (self.machine_name == name
            || self.agent_id == name
            || (name.len() >= 6 && self.agent_id.starts_with(name)))
            && disk.is_none_or(|d| self.disk == d)
    }
}

/// Keeps, of the items a name matches, the ones it means: a machine that came back keeps its
/// reprotected item (its history) beside the newer one, and its name means the newer.
pub fn current<T>(items: &mut Vec<T>, state: impl Fn(&T) -> ItemState) {
    if items.iter().any(|i| state(i) != ItemState::Reprotected) {
        items.retain(|i| state(i) != ItemState::Reprotected);
    }
}

/// `NAME/DISK` as the name and the disk; a name alone (or one whose last part is no number)
/// names every disk.
pub fn split_item(item: &str) -> (&str, Option<u32>) {
    match item.rsplit_once('/') {
        Some((n, d)) => match d.parse::<u32>() {
            Ok(d) => (n, Some(d)),
            Err(_) => (item, None),
        },
        None => (item, None),
    }
}

/// What a replica keeps for recovery (module docs, "Locking").
#[derive(Default)]
pub(crate) struct ReplicaRecovery {
    /// The replica's recovery facts, changed together under this one lock.
    pub state: Mutex<ReplicaState>,
    /// The base replica is held at or below this seq (test failover, failover).
    ///
    /// A lock of its own: the applier takes it to compute how far it may release the journal
    /// and keeps it until its applied seq is in redb and the journal is released (a redb write
    /// and file deletions), so that [`hold_base`] reads an applied seq the journal holds
    /// everything after. Under `state` that I/O would stall the ingest path's refusal check
    /// and tag registration on every applied batch.
    pub hold: Mutex<Option<Seq>>,
    /// Held while the item's record is written to redb ([`item::record`]), so recordings
    /// of one item are serialised without holding `state` across the write.
    pub recording: Mutex<()>,
    /// A seeded replica's wait for its first point (`reprotect.rs`).
    pub seed: Mutex<SeedHold>,
    /// Seeding: how far the agent's comparison asked digests (`StreamRecord::seed_compared`).
    pub seed_compared: std::sync::atomic::AtomicU64,
}

/// Where a seeded replica (a reprotect's old source) stands: its base is the disk it was until
/// the first point after the source's comparison is applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum SeedHold {
    /// Not seeded, or its first point is applied.
    #[default]
    Off,
    /// No point yet: nothing is applied.
    Waiting,
    /// Applied up to this point's tag, then `Off`.
    Until(Seq),
}

/// A replica's recovery facts (see [`ReplicaRecovery::state`]).
#[derive(Default)]
pub(crate) struct ReplicaState {
    /// Points by tag seq.
    pub points: BTreeMap<Seq, PointRecord>,
    /// Highest tag seq ever registered: a tag at or below it that is not listed was dropped
    /// by retention and is not registered again.
    pub registered: Seq,
    /// The item's failover state machine, as recorded in redb.
    pub item: ItemRecord,
    /// The test failover, as far as it has got.
    pub test: TestSlot,
    /// A failover request is running (planned ones wait for the source).
    pub busy: bool,
}

impl ReplicaState {
    /// Seqs of the points a test failover or failover uses.
    pub fn in_use(&self) -> BTreeSet<Seq> {
        let mut used = BTreeSet::new();
        if let Some(p) = self.test.point() {
            used.insert(p.seq);
        }
        if let Some(p) = self.item.point {
            used.insert(p.seq);
        }
        used
    }
}

impl ReplicaRecovery {
    /// Where the applier may advance the base replica to, given what is durable.
    pub fn apply_target(&self, durable: Seq, keep_points: bool) -> Seq {
        let mut target = durable;
        if keep_points && let Some((&oldest, _)) = lock(&self.state).points.first_key_value() {
            target = target.min(oldest);
        }
        if let Some(h) = *lock(&self.hold) {
            target = target.min(h);
        }
        match *lock(&self.seed) {
            SeedHold::Off => {}
            SeedHold::Waiting => target = 0,
            SeedHold::Until(seq) => target = target.min(seq),
        }
        target
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

/// Holds the base replica where it is and returns its applied seq (the applier frees nothing
/// above the hold).
fn hold_base(r: &Replica) -> Seq {
    // The applier records its applied seq and frees the journal under this lock, so the
    // seq read here is what the journal holds everything after. A batch being written now
    // may still raise the applied seq, but nothing above the hold is freed.
    let mut hold = lock(&r.recovery.hold);
    let applied = r.applied.load(Ordering::Acquire);
    *hold = Some(hold.map_or(applied, |h| h.min(applied)));
    hold.unwrap_or(applied)
}

/// Refuses with `why` unless the item is protected.
fn require_protected(r: &Replica, item: &str, why: &'static str) -> Result<(), RecoveryError> {
    let state = lock(&r.recovery.state).item.state;
    if state == ItemState::Protected {
        return Ok(());
    }
    Err(Refused { state, why }.into_error(item))
}

impl MasterTarget {
    /// Loads a replica's points and item state (at open), adding tags the journal holds that
    /// redb missed, and clearing what a previous run's test failover left.
    pub(crate) fn load_recovery(&self, replica: &Replica, applied: Seq) -> anyhow::Result<()> {
        let key = replica.stream.key;
        let (points, registered) = self.rebuild_points(replica, applied)?;
        let item: ItemRecord = self.state.get_json(&item_key(key))?.unwrap_or_default();
        // A recorded test failover is served again (`restore_test`, once the replica is
        // open); until then the base stays where it is.
        let test_recorded = self.recorded_test(key, applied)?;
        let held = test_recorded || item.state != ItemState::Protected;
        let mut st = lock(&replica.recovery.state);
        st.points = points;
        st.registered = registered;
        st.item = item;
        if held {
            *lock(&replica.recovery.hold) = Some(applied);
        }
        Ok(())
    }

    /// The replicas `item` names: by agent id (or a prefix of at least 6 hex digits) or by
    /// machine name, every disk of it; `NAME/DISK` picks one disk.
    fn matching(&self, item: &str) -> Vec<Arc<Replica>> {
        let (name, disk) = split_item(item);
        let replicas: Vec<Arc<Replica>> = lock(&self.replicas).values().cloned().collect();
        let reports = lock(&self.reports).clone();
        let mut matches: Vec<Arc<Replica>> = replicas
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
        matches.sort_by_key(|r| (r.stream.key.peer, r.stream.key.disk));
        current(&mut matches, |r| lock(&r.recovery.state).item.state);
        matches
    }

    fn no_item(item: &str) -> RecoveryError {
        err(
            ErrorKind::NotFound,
            format!(
                "no protected item {item:?} at this master target: name a machine or an agent \
                 id as `haven status` lists them"
            ),
        )
    }

    /// Finds one disk's item: by agent id (or a unique prefix of at least 6 hex digits), or by
    /// machine name when the machine has one disk; `NAME/DISK` picks a disk.
    pub(crate) fn find_item(&self, item: &str) -> Result<Arc<Replica>, RecoveryError> {
        let matches = self.matching(item);
        match matches.len() {
            1 => Ok(matches.into_iter().next().expect("one match")),
            0 => Err(Self::no_item(item)),
            n => Err(err(
                ErrorKind::Invalid,
                format!(
                    "{item:?} names {n} items: use the agent id, or MACHINE/DISK to pick a disk"
                ),
            )),
        }
    }

    /// Finds a machine's items: every disk of the one machine `item` names (in disk order), or
    /// the one disk `NAME/DISK` names.
    pub(crate) fn find_machine(&self, item: &str) -> Result<Vec<Arc<Replica>>, RecoveryError> {
        let matches = self.matching(item);
        let Some(first) = matches.first() else {
            return Err(Self::no_item(item));
        };
        let peer = first.stream.key.peer;
        if matches.iter().any(|r| r.stream.key.peer != peer) {
            let agents: BTreeSet<String> = matches
                .iter()
                .map(|r| peer_hex(&r.stream.key.peer))
                .collect();
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "{item:?} names {} machines (agents {}): use the agent id",
                    agents.len(),
                    agents.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        Ok(matches)
    }

    /// Every item.
    pub fn items(&self) -> Vec<ItemInfo> {
        let replicas: Vec<Arc<Replica>> = lock(&self.replicas).values().cloned().collect();
        let reports = lock(&self.reports).clone();
        let mut out: Vec<ItemInfo> = replicas
            .iter()
            .map(|r| {
                let id = peer_hex(&r.stream.key.peer);
                let (item, points, test_failover) = {
                    let st = lock(&r.recovery.state);
                    (
                        st.item.clone(),
                        st.points.len(),
                        st.test.running().map(|t| t.info.clone()),
                    )
                };
                ItemInfo {
                    machine_name: reports.get(&id).map_or_else(
                        || lock(&r.stream.machine_name).clone(),
                        |x| x.machine_name.clone(),
                    ),
                    agent_id: id,
                    disk: r.stream.key.disk,
                    size: r.stream.info.size,
                    item,
                    points,
                    test_failover,
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

    /// The base replica, read-only, through a writer plugin instance of its own.
    fn open_base(&self, r: &Replica) -> anyhow::Result<Base> {
        let mut plugin = self.host.load_writer(&self.config.writer)?;
        let disk = plugin.open(&r.path, Access::ReadOnly, &[])?;
        Ok(Base::new(plugin, disk))
    }
}
