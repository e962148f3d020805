//! Recovery points: their records, registration when a tag is durable, listing, the rebuild
//! from the journal at start, points taken on request, and the retention pass (module docs of
//! [`super`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use haven_net::control::{self, Command};
use haven_store::state::{StateDb, StreamKey};
use haven_wire::{Record, Seq, Tag, TagKind};
use serde::{Deserialize, Serialize};

use super::{
    ErrorKind, PointSel, RecoveryError, err, internal, point_key, points_prefix, require_protected,
};
use crate::ingest::lock;
use crate::master_target::{MasterTarget, Replica};
use crate::retention::{self, PointAge, RetentionPolicy};
use crate::{now_ms, peer_hex};

/// The journal is pruned of old points above this fill level (percent of `journal_max_bytes`).
pub const JOURNAL_HIGH_PERCENT: u64 = 75;
/// Longest the master target waits for a point's tag to arrive after the agent took it.
const POINT_ARRIVAL: Duration = Duration::from_secs(120);

/// Crash- or application-consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    /// As a power cut would leave the disks.
    Crash,
    /// Taken with the workload quiesced (hooks).
    App,
}

/// A recovery point the master target holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PointRecord {
    /// Its id (as the agent chose it).
    pub point: u64,
    /// Its tag's sequence number in the disk's stream.
    #[schema(value_type = u64)]
    pub seq: Seq,
    /// When the agent took it, ms since the Unix epoch.
    pub source_time_ms: u64,
    /// Crash- or application-consistent.
    pub kind: PointKind,
    /// When its tag was durable here, ms since the Unix epoch.
    pub received_ms: u64,
    /// A group point: every machine of its group holds it (retention prefers it).
    #[serde(default)]
    pub group: bool,
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
            group: false,
        }
    }
}

/// Most machines in one group point (the pipeline's groups hold at most 64).
pub const MAX_GROUP_MEMBERS: usize = 64;
/// Longest the members' writes are held for a group point.
pub const MAX_HOLD: Duration = Duration::from_secs(5);

/// A group point: one point id that every disk of every member holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupPointInfo {
    /// The point's id, the same on every member.
    pub point: u64,
    /// Each member's tags.
    pub members: Vec<GroupMemberPoint>,
    /// From the first hold asked to the last release answered, ms: the longest any member's
    /// writes waited.
    pub held_ms: u64,
}

/// A member's part of a group point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupMemberPoint {
    /// The member, as named.
    pub machine: String,
    /// The point on each of its disks, in disk order.
    pub points: Vec<PointRecord>,
}

/// A point as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PointInfo {
    /// The point.
    #[serde(flatten)]
    pub record: PointRecord,
    /// `available`, or `in-use` (a test failover or failover uses it).
    pub state: String,
}

/// Records `added` points and forgets the `removed` ones, in one transaction.
pub(super) fn store_points(
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
        let mut st = lock(&replica.recovery.state);
        if tag.seq <= st.registered {
            return false;
        }
        st.registered = st.registered.max(tag.seq);
        match st.points.entry(tag.seq) {
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

impl MasterTarget {
    /// A replica's points at open: redb's, with the tags the journal holds that redb missed,
    /// less those below the base replica; redb is brought up to date. Returns them and the
    /// highest tag seq registered so far.
    pub(super) fn rebuild_points(
        &self,
        replica: &Replica,
        applied: Seq,
    ) -> anyhow::Result<(BTreeMap<Seq, PointRecord>, Seq)> {
        let key = replica.stream.key;
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
        store_points(&self.state, key, &added, &dropped)?;
        Ok((points, newest.max(applied)))
    }

    /// The item's points, oldest first. For a machine of several disks, its points: those
    /// every disk holds (each listed with its first disk's tag).
    pub fn points(&self, item: &str) -> Result<Vec<PointInfo>, RecoveryError> {
        let disks = self.find_machine(item)?;
        // One disk: all its points (common_ids of one disk would be the same, at a cost).
        let common = (disks.len() > 1).then(|| common_ids(&disks));
        let st = lock(&disks[0].recovery.state);
        let in_use = st.in_use();
        Ok(st
            .points
            .values()
            .filter(|p| common.as_ref().is_none_or(|c| c.contains(&p.point)))
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

    /// The point `sel` means among `points` (the replica's, locked by the caller).
    pub(super) fn pick(
        &self,
        r: &Replica,
        points: &BTreeMap<Seq, PointRecord>,
        item: &str,
        sel: PointSel,
    ) -> Result<PointRecord, RecoveryError> {
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

    /// A group point ([`GroupPointInfo`]): the members' writes are held (every member
    /// answers [`Command::Hold`] within `hold`), then every member tags every disk with one id,
    /// above every point any member took, and lets its writes go. A member that does not
    /// answer the hold in time makes the point fail; the others are let go at once, and each
    /// agent lets its writes go on its own at the deadline whatever happens here. So every
    /// write acknowledged before the point on any member is in it, and none acknowledged after.
    pub async fn group_point(
        &self,
        members: &[String],
        hold: Duration,
    ) -> Result<GroupPointInfo, RecoveryError> {
        use haven_net::control::{Reply, Request};
        if members.is_empty() || members.len() > MAX_GROUP_MEMBERS {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "a group point needs 1 to {MAX_GROUP_MEMBERS} members, not {}",
                    members.len()
                ),
            ));
        }
        let hold = hold.clamp(Duration::from_millis(10), MAX_HOLD);
        let mut machines = Vec::new();
        for m in members {
            let named = |e: RecoveryError| RecoveryError {
                message: format!("no group point: {m}: {}", e.message),
                ..e
            };
            let disks = self.find_machine(m).map_err(named)?;
            for r in &disks {
                require_protected(r, m, "no points are taken after a failover").map_err(named)?;
            }
            let conn = self.route(&disks[0]).map_err(named)?;
            machines.push((m.clone(), disks, conn));
        }
        let started = Instant::now();
        let agent_of = |disks: &[Arc<Replica>]| peer_hex(&disks[0].stream.key.peer);
        // First half: every member holds its writes. The answers are awaited half the hold
        // at most: the other half is for the releases to reach members that hold already,
        // before their own deadline lets their writes go without the point.
        let answer_within = hold / 2;
        let mut asks = tokio::task::JoinSet::new();
        for (i, (_, disks, conn)) in machines.iter().enumerate() {
            let (conn, request) = (
                conn.clone(),
                Request {
                    agent_id: agent_of(disks),
                    command: Command::Hold {
                        hold_ms: hold.as_millis() as u64,
                    },
                },
            );
            asks.spawn(async move { (i, control::call(&conn, &request, answer_within).await) });
        }
        let mut held: Vec<Option<(u64, u64)>> = vec![None; machines.len()];
        let mut refused = Vec::new();
        while let Some(joined) = asks.join_next().await {
            let (i, reply) = joined.map_err(internal)?;
            let name = &machines[i].0;
            match reply {
                Ok(Reply::Held { hold, last_point }) => held[i] = Some((hold, last_point)),
                Ok(Reply::Failed(why) | Reply::Done(why)) => refused.push(format!("{name}: {why}")),
                Ok(Reply::Taken(_)) => {
                    refused.push(format!("{name}: answered a hold with a point"))
                }
                Err(e) => refused.push(format!("{name}: {e}")),
            }
        }
        tracing::debug!(
            held_in_ms = started.elapsed().as_millis() as u64,
            refused = refused.len(),
            "group point: the holds answered"
        );
        let point = if refused.is_empty() {
            let last = held.iter().flatten().map(|(_, l)| *l).max().unwrap_or(0);
            Some((last + 1).max(now_ms()))
        } else {
            None
        };
        // Second half: every member that holds tags (or, when one did not hold, lets go).
        let mut releases = tokio::task::JoinSet::new();
        for (i, (_, disks, conn)) in machines.iter().enumerate() {
            let Some((number, _)) = held[i] else { continue };
            let (conn, request) = (
                conn.clone(),
                Request {
                    agent_id: agent_of(disks),
                    command: Command::Release {
                        hold: number,
                        point,
                    },
                },
            );
            releases.spawn(async move {
                (
                    i,
                    control::call(&conn, &request, Duration::from_secs(30)).await,
                )
            });
        }
        let mut taken = vec![Vec::new(); machines.len()];
        while let Some(joined) = releases.join_next().await {
            let (i, reply) = joined.map_err(internal)?;
            let name = &machines[i].0;
            match reply {
                Ok(Reply::Taken(t)) => taken[i] = t,
                Ok(_) if point.is_none() => {}
                Ok(Reply::Failed(why) | Reply::Done(why)) => refused.push(format!("{name}: {why}")),
                Ok(Reply::Held { .. }) => {
                    refused.push(format!("{name}: answered a release with a hold"));
                }
                Err(e) => refused.push(format!("{name}: {e}")),
            }
        }
        let held_ms = started.elapsed().as_millis() as u64;
        tracing::debug!(
            held_ms,
            refused = refused.len(),
            "group point: the releases answered"
        );
        let Some(point) = point.filter(|_| refused.is_empty()) else {
            return Err(err(
                ErrorKind::Unavailable,
                format!(
                    "no group point: {} (every member's writes went on; try again)",
                    refused.join("; ")
                ),
            ));
        };
        let mut out = Vec::new();
        for ((machine, disks, _), tags) in machines.iter().zip(&taken) {
            let mut records = Vec::new();
            for r in disks {
                records.push(
                    self.await_tag(r, tags, point)
                        .await
                        .map_err(|e| RecoveryError {
                            message: format!("{machine}: {}", e.message),
                            ..e
                        })?,
                );
            }
            for (r, p) in disks.iter().zip(records.iter_mut()) {
                *p = self.mark_group(r, p.seq)?.unwrap_or(*p);
            }
            out.push(GroupMemberPoint {
                machine: machine.clone(),
                points: records,
            });
        }
        Ok(GroupPointInfo {
            point,
            members: out,
            held_ms,
        })
    }

    /// The id of the point `sel` means among the points every disk of a machine holds.
    pub(super) fn pick_common(
        &self,
        disks: &[Arc<Replica>],
        item: &str,
        sel: PointSel,
    ) -> Result<u64, RecoveryError> {
        let common = common_ids(disks);
        match sel {
            PointSel::Latest => common.last().copied().ok_or_else(|| {
                let message = match disks
                    .iter()
                    .find(|r| lock(&r.recovery.state).points.is_empty())
                {
                    Some(r) => self.no_points_message(r, &format!("{item}/{}", r.stream.key.disk)),
                    None => format!(
                        "machine {item} has no point all its {} disks hold (a point whose tag \
                         some disk lacks is not a point of the machine); take one with `haven \
                         point create {item}`",
                        disks.len()
                    ),
                };
                err(ErrorKind::Conflict, message)
            }),
            PointSel::Id(id) if common.contains(&id) => Ok(id),
            PointSel::Id(id) => Err(err(
                ErrorKind::NotFound,
                format!(
                    "machine {item}: no point {id} on all its {} disks (it holds {} points of \
                     the machine{}); `haven point list {item}` lists them",
                    disks.len(),
                    common.len(),
                    match (common.first(), common.last()) {
                        (Some(a), Some(b)) => format!(", from {a} to {b}"),
                        _ => String::new(),
                    }
                ),
            )),
        }
    }

    /// Why the item has no point, and what to do.
    pub(super) fn no_points_message(&self, r: &Replica, item: &str) -> String {
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

    /// Marks the point whose tag is `seq` a group point (kept so in redb); the record, if the
    /// point is still held.
    fn mark_group(&self, r: &Replica, seq: Seq) -> Result<Option<PointRecord>, RecoveryError> {
        let _one = lock(&r.recovery.recording);
        let marked = {
            let mut st = lock(&r.recovery.state);
            st.points.get_mut(&seq).map(|p| {
                p.group = true;
                *p
            })
        };
        if let Some(p) = &marked {
            store_points(&self.state, r.stream.key, std::slice::from_ref(p), &[])
                .map_err(internal)?;
        }
        Ok(marked)
    }

    /// Waits until disk `r`'s tag of point `point`, among the tags the agent answered, is
    /// registered here.
    pub(super) async fn await_tag(
        &self,
        r: &Replica,
        taken: &[haven_net::control::PointTaken],
        point: u64,
    ) -> Result<PointRecord, RecoveryError> {
        let tag = taken
            .iter()
            .find(|t| t.disk == r.stream.key.disk && t.point == point)
            .ok_or_else(|| {
                err(
                    ErrorKind::Internal,
                    format!(
                        "the agent answered point {point} without a tag on disk {}",
                        r.stream.key.disk
                    ),
                )
            })?;
        self.await_point(r, tag.seq).await
    }

    /// Waits until the point whose tag is `seq` is registered here.
    pub(super) async fn await_point(
        &self,
        r: &Replica,
        seq: Seq,
    ) -> Result<PointRecord, RecoveryError> {
        let deadline = Instant::now() + POINT_ARRIVAL;
        loop {
            let registered = lock(&r.recovery.state).points.get(&seq).copied();
            if let Some(p) = registered {
                return Ok(p);
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
    /// For a machine of several disks the point covers all of them (one tag each, at one
    /// instant); the record returned is its first disk's. `quiesced`: the machine's platform
    /// quiesced it (see [`Command::Point`]).
    pub async fn create_point(
        &self,
        item: &str,
        app: bool,
        quiesced: bool,
    ) -> Result<PointRecord, RecoveryError> {
        let disks = self.find_machine(item)?;
        for r in &disks {
            require_protected(r, item, "no points are taken after a failover")?;
        }
        let taken = self
            .ask_agent_all(&disks[0], Command::Point { app, quiesced })
            .await?;
        let id = taken.first().map_or(0, |t| t.point);
        let mut first = None;
        for r in &disks {
            let point = self.await_tag(r, &taken, id).await?;
            first.get_or_insert(point);
        }
        Ok(first.expect("a machine has disks"))
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

    /// Takes the configuration server's retention policies, by machine name. They apply where
    /// this master target keeps points (`[master_target.retention] window` above zero); the
    /// machines it does not name keep this gateway's own policy.
    pub fn set_retention(&self, by_machine: HashMap<String, RetentionPolicy>) {
        *lock(&self.retention_by_machine) = by_machine;
    }

    fn retain(&self, r: &Replica, now_ms: u64) -> anyhow::Result<()> {
        let machine = lock(&r.stream.machine_name).clone();
        let assigned = lock(&self.retention_by_machine).get(&machine).cloned();
        let policy = match &assigned {
            Some(p) if !self.config.retention.window.is_zero() => p,
            _ => &self.config.retention,
        };
        if lock(&r.recovery.state).points.is_empty() {
            return Ok(());
        }
        // What the journal holds is read before the replica's state is locked: the journal's
        // lock is held across appends and syncs.
        let stats = r.stream.journal().stats();
        let high = self.config.journal.max_bytes / 100 * JOURNAL_HIGH_PERCENT;
        let entries = if stats.bytes > high {
            r.stream.journal().entries()
        } else {
            Vec::new()
        };
        let dropped: Vec<PointRecord> = {
            let mut st = lock(&r.recovery.state);
            let used = st.in_use();
            let points = &mut st.points;
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
                        group: p.group,
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
            if stats.bytes > high && !keep.is_empty() {
                let excess = stats.bytes - high;
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
                    mt.sample_rpo();
                    drop(mt);
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
    }
}

/// The ids of the points every one of `disks` holds.
fn common_ids(disks: &[Arc<Replica>]) -> BTreeSet<u64> {
    let mut common: Option<BTreeSet<u64>> = None;
    for r in disks {
        let ids: BTreeSet<u64> = lock(&r.recovery.state)
            .points
            .values()
            .map(|p| p.point)
            .collect();
        common = Some(match common {
            None => ids,
            Some(c) => c.intersection(&ids).copied().collect(),
        });
    }
    common.unwrap_or_default()
}
