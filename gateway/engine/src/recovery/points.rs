//! Recovery points: their records, registration when a tag is durable, listing, the rebuild
//! from the journal at start, points taken on request, and the retention pass (module docs of
//! [`super`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use haven_net::control::Command;
use haven_store::state::{StateDb, StreamKey};
use haven_wire::{Record, Seq, Tag, TagKind};
use serde::{Deserialize, Serialize};

use super::{ErrorKind, PointSel, RecoveryError, err, point_key, points_prefix, require_protected};
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

    /// The item's points, oldest first.
    pub fn points(&self, item: &str) -> Result<Vec<PointInfo>, RecoveryError> {
        let r = self.find_item(item)?;
        let st = lock(&r.recovery.state);
        let in_use = st.in_use();
        Ok(st
            .points
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
    pub async fn create_point(&self, item: &str, app: bool) -> Result<PointRecord, RecoveryError> {
        let r = self.find_item(item)?;
        require_protected(&r, item, "no points are taken after a failover")?;
        let taken = self.ask_agent(&r, Command::Point { app }).await?;
        self.await_point(&r, taken.seq).await
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
