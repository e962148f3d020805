//! Reprotect and failback at the master target.
//!
//! # Seeds
//!
//! After a failover the machine runs on its failover image at this site; to come back, the
//! direction is reversed: an agent protects the image and a master target at the original site
//! keeps the replica. That replica is not made from nothing: it is the old source disk, which
//! already holds most of the data. A *seed* (`POST /v1/seeds`, redb `seed/<agent>/<disk>`)
//! names, before the stream arrives, the existing disk below the writer's storage root that
//! agent `<agent>`'s disk `<disk>` replicates onto. When the stream arrives its record takes
//! the path (`StreamRecord::replica_path`) and `seeding`, and the seed goes.
//!
//! The agent starts seeded (`haven-agent protect --seeded`): instead of its initial copy, it
//! compares the whole disk with the replica by 4 KiB SHA-256 digests (the lost-log resync,
//! `agent/src/replicate.rs`) and sends only the blocks that differ. The digests are taken
//! through a view of the replica at the durable seq: the base plus the journal.
//!
//! # The old source stays whole
//!
//! While `seeding`, nothing is applied to the replica ([`SeedHold::Waiting`]), and the applier
//! holds it open read-only (a format that marks itself open does not write it either): the
//! differences wait in the journal, and the old disk stays as it was, usable whatever fails
//! mid-resync. The
//! agent takes points only once every difference is in its log (the disk is `protected`), so
//! the stream's first tag marks a state equal to the source. When that tag is durable here the
//! replica is applied up to it ([`SeedHold::Until`]), and `seeding` is cleared once it is:
//! from then on the replica is an ordinary one. After a restart the hold is found again from the
//! record and the journal's first tag above the applied seq.
//!
//! # Failback in place
//!
//! A failover with `in_place` writes the point into the base replica itself instead of a new
//! image: the points before it are dropped, the base is held at the point's tag and the
//! applier applies up to it; the image is the replica's own file. On a seeded replica that is
//! the old source disk, so the machine comes back on the disk it left, holding the point.
//!
//! # The reprotected item
//!
//! The item that failed over (here, at the site the machine left) is marked `reprotected`
//! (`haven reprotect`): its stream stays refused, its history is kept, and a machine name
//! that also names a newer item means the newer one.

use std::path::{Component, Path};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use haven_store::state::{StateDb, StreamKey};
use haven_wire::Seq;
use serde::{Deserialize, Serialize};

use super::item::record;
use super::points::store_points;
use super::{
    ErrorKind, ItemEvent, ItemRecord, PointRecord, RecoveryError, SeedHold, err, internal,
};
use crate::ingest::lock;
use crate::master_target::{MasterTarget, Replica};
use crate::{now_ms, parse_peer, peer_hex};

/// How long a replica may keep failing before an in-place failover gives up on it.
const IN_PLACE_STALL: Duration = Duration::from_secs(30);

/// `POST /v1/seeds`: the existing disk a stream that has not arrived yet replicates onto.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SeedSpec {
    /// The agent that will protect the machine (its id, as `haven-agent enroll` printed it).
    pub agent_id: String,
    /// Its disk (1, 2, … in the order of its `--disk` arguments).
    pub disk: u32,
    /// The existing disk, below the writer's storage root.
    pub path: String,
    /// The machine's name.
    pub machine_name: String,
    /// Where the machine runs now (shown in the item's history).
    #[serde(default)]
    pub from: String,
}

/// A seed as kept, until its stream arrives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SeedRecord {
    /// What was asked.
    #[serde(flatten)]
    pub spec: SeedSpec,
    /// When, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

fn seed_key(key: StreamKey) -> String {
    format!("seed/{key}")
}

/// Refuses a path that is absolute or leaves the storage root.
/// `path`, absolute and below `root` (both as given or both resolved), relative to `root`.
fn below(root: &Path, path: &str) -> Option<String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return None;
    }
    let rel = p
        .strip_prefix(root)
        .ok()
        .map(Path::to_path_buf)
        .or_else(|| {
            let (p, r) = (
                std::fs::canonicalize(p).ok()?,
                std::fs::canonicalize(root).ok()?,
            );
            p.strip_prefix(r).ok().map(Path::to_path_buf)
        })?;
    Some(rel.to_str()?.to_string()).filter(|r| !r.is_empty())
}

fn check_relative(path: &str) -> Result<(), RecoveryError> {
    let p = Path::new(path);
    if path.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(err(
            ErrorKind::Invalid,
            format!(
                "seed path {path:?}: name the disk relative to the writer's storage root, \
                 without `..`"
            ),
        ));
    }
    Ok(())
}

impl MasterTarget {
    /// `POST /v1/seeds`: agent `spec.agent_id`'s disk `spec.disk` will replicate onto the
    /// existing disk `spec.path` (module docs).
    pub fn add_seed(&self, mut spec: SeedSpec) -> Result<SeedRecord, RecoveryError> {
        let peer = parse_peer(&spec.agent_id).ok_or_else(|| {
            err(
                ErrorKind::Invalid,
                format!(
                    "agent id {:?}: give the 32 hex digits `haven-agent enroll` printed",
                    spec.agent_id
                ),
            )
        })?;
        if spec.disk == 0 {
            return Err(err(ErrorKind::Invalid, "disk 0: disks count from 1"));
        }
        if spec.machine_name.trim().is_empty() {
            return Err(err(ErrorKind::Invalid, "the seed needs the machine's name"));
        }
        let grants = &self.config.writer.grants;
        let root = self.replica_root();
        // A file named by its full path below the root (as a failover's image is shown): the
        // same file, relative to the root.
        if let Some(rel) = root.as_deref().and_then(|root| below(root, &spec.path)) {
            spec.path = rel;
        }
        if let Some(kept) = self.seed_of_spec(&spec)? {
            // Asked again (a resumed reprotect): the same seed is the answer.
            return Ok(kept);
        }
        if grants
            .devices
            .iter()
            .any(|d| d.as_os_str() == spec.path.as_str())
        {
            // A physical server's disk the writer is granted: written in place at failback.
            use std::os::unix::fs::FileTypeExt;
            let device =
                std::fs::metadata(&spec.path).is_ok_and(|m| m.file_type().is_block_device());
            if !device {
                return Err(err(
                    ErrorKind::Invalid,
                    format!(
                        "seed {}: the writer's grant names it, but it is not a block device",
                        spec.path
                    ),
                ));
            }
        } else {
            check_relative(&spec.path).map_err(|mut e| {
                e.message.push_str(&format!(
                    " (or a block device the writer's grant names in `devices`: {})",
                    if grants.devices.is_empty() {
                        "none".to_string()
                    } else {
                        grants
                            .devices
                            .iter()
                            .map(|d| d.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ));
                e
            })?;
            match &root {
                Some(root) => self.check_seed_file(root, &spec.path)?,
                // A writer that keeps disks elsewhere (page blobs) says whether it is there.
                None => self.check_seed_disk(&spec.path)?,
            }
        }
        // One writer per disk: no other seed or replica may use it.
        let taken = self.seeds()?.into_iter().any(|s| s.spec.path == spec.path)
            || lock(&self.replicas).values().any(|r| r.path == spec.path);
        if taken {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "seed {}: another replica or seed uses that disk already",
                    spec.path
                ),
            ));
        }
        let key = StreamKey {
            peer,
            disk: spec.disk,
        };
        let known = lock(&self.replicas).contains_key(&key)
            || self.state.get_stream(key).map_err(internal)?.is_some();
        if known {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "agent {} disk {} replicates here already: a seed is for a stream that has \
                     not started; enroll a new agent for the reprotect",
                    spec.agent_id, spec.disk
                ),
            ));
        }
        let record = SeedRecord {
            spec,
            created_ms: now_ms(),
        };
        self.state
            .put_json(&seed_key(key), &record)
            .map_err(internal)?;
        tracing::info!(stream = %key, path = %record.spec.path, "seed recorded");
        Ok(record)
    }

    /// The seed recorded already for exactly `spec` (agent, disk, path and machine).
    fn seed_of_spec(&self, spec: &SeedSpec) -> Result<Option<SeedRecord>, RecoveryError> {
        let Some(peer) = parse_peer(&spec.agent_id) else {
            return Ok(None);
        };
        let key = StreamKey {
            peer,
            disk: spec.disk,
        };
        Ok(self
            .seed_of(key)
            .map_err(internal)?
            .filter(|s| s.spec.path == spec.path && s.spec.machine_name == spec.machine_name))
    }

    /// A seed in a writer without a storage root: a disk it opens.
    fn check_seed_disk(&self, path: &str) -> Result<(), RecoveryError> {
        let mut plugin = self
            .host
            .load_writer(&self.config.writer)
            .map_err(|e| err(ErrorKind::Internal, e.to_string()))?;
        match plugin.open(path, haven_host::Access::ReadOnly, &[]) {
            Ok(disk) => {
                let _ = plugin.close(disk);
                Ok(())
            }
            Err(e)
                if e.plugin_error()
                    .is_some_and(|e| e.kind == haven_image::ErrorKind::NotFound) =>
            {
                Err(err(
                    ErrorKind::NotFound,
                    format!(
                        "seed {path}: no such disk in the store of writer `{}`",
                        self.config.writer.name
                    ),
                ))
            }
            Err(e) => Err(err(
                ErrorKind::Invalid,
                format!(
                    "seed {path}: not a disk writer `{}` opens: {e}",
                    self.config.writer.name
                ),
            )),
        }
    }

    /// A seed below the storage root: a regular file inside it, not a link out of it.
    fn check_seed_file(&self, root: &Path, path: &str) -> Result<(), RecoveryError> {
        let full = root.join(path);
        let inside = std::fs::canonicalize(&full)
            .ok()
            .zip(std::fs::canonicalize(root).ok())
            .is_some_and(|(f, r)| f.starts_with(r));
        match std::fs::symlink_metadata(&full) {
            Ok(m) if m.is_file() && inside => Ok(()),
            Ok(_) => Err(err(
                ErrorKind::Invalid,
                format!(
                    "seed {path}: not a disk file below the writer's storage root {} (a folder, \
                     a link or a device)",
                    root.display()
                ),
            )),
            Err(_) => Err(err(
                ErrorKind::NotFound,
                format!(
                    "seed {path}: no such disk below the writer's storage root {}",
                    root.display()
                ),
            )),
        }
    }

    /// The seeds whose streams have not arrived yet.
    pub fn seeds(&self) -> Result<Vec<SeedRecord>, RecoveryError> {
        Ok(self
            .state
            .json_with_prefix::<SeedRecord>("seed/")
            .map_err(internal)?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// The seed of a stream arriving now, if one was recorded.
    pub(crate) fn seed_of(&self, key: StreamKey) -> anyhow::Result<Option<SeedRecord>> {
        Ok(self.state.get_json(&seed_key(key))?)
    }

    /// The arriving stream took its seed (it is in the stream's record now): the item's
    /// history says where it comes from, and the seed goes.
    pub(crate) fn seed_adopted(&self, r: &Replica, seed: &SeedRecord) {
        let from = match seed.spec.from.as_str() {
            "" => String::new(),
            from => format!(" from {from}"),
        };
        let cause = format!(
            "reprotected{from}: replicates onto {}, which is not written before the first \
             point after the comparison",
            seed.spec.path
        );
        let key = r.stream.key;
        if let Err(e) = record(
            &self.state,
            r,
            &key.to_string(),
            ItemEvent::Seeded,
            cause,
            |_| {},
        ) {
            tracing::warn!(stream = %key, error = %e, "recording a seed in the history");
        }
        if let Err(e) = self.state.remove_json(&seed_key(key)) {
            tracing::warn!(stream = %key, error = %e, "removing a used seed");
        }
        tracing::info!(stream = %key, path = %seed.spec.path, "the stream replicates onto its seed");
    }

    /// `haven reprotect` at the site the machine left: its failed-over item is marked
    /// `reprotected` (every disk of the machine), with where it replicates now.
    pub fn reprotect(&self, item: &str, to: &str) -> Result<ItemRecord, RecoveryError> {
        let disks = self.find_machine(item)?;
        for r in &disks {
            let st = lock(&r.recovery.state);
            super::transition(st.item.state, ItemEvent::Reprotected)
                .map_err(|e| e.into_error(item))?;
            if st.item.image.is_none() {
                return Err(err(
                    ErrorKind::Conflict,
                    format!("item {item} has no failover image to reprotect from"),
                ));
            }
        }
        let mut first = None;
        for r in &disks {
            let name = format!("{item}/{}", r.stream.key.disk);
            let rec = record(
                &self.state,
                r,
                &name,
                ItemEvent::Reprotected,
                format!("reprotected: the machine replicates to {to} now"),
                |i| i.reprotected_to = Some(to.to_string()),
            )?;
            first.get_or_insert(rec);
        }
        Ok(first.expect("a machine has disks"))
    }

    /// A failover `in_place`: the base replica is advanced to `point` and is the image (module
    /// docs); returns its full path.
    pub(super) fn materialise_in_place(
        &self,
        r: &Replica,
        point: PointRecord,
    ) -> anyhow::Result<String> {
        let dropped: Vec<Seq> = {
            let mut st = lock(&r.recovery.state);
            let dropped = st.points.range(..point.seq).map(|(s, _)| *s).collect();
            st.points.retain(|s, _| *s >= point.seq);
            dropped
        };
        store_points(&self.state, r.stream.key, &[], &dropped)?;
        {
            // Held at or below the point since the failover was recorded: raised to it.
            let mut hold = lock(&r.recovery.hold);
            let applied = r.applied.load(Ordering::Acquire);
            anyhow::ensure!(
                applied <= point.seq,
                "the replica is applied past point {} already (seq {applied}): fail over to a \
                 newer point, or without --in-place",
                point.point
            );
            *hold = Some(point.seq);
        }
        r.wake();
        let mut failing_since: Option<Instant> = None;
        while r.applied.load(Ordering::Acquire) < point.seq {
            match r.stream.error() {
                Some(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > IN_PLACE_STALL {
                        anyhow::bail!("the replica cannot be applied up to the point: {e}");
                    }
                }
                None => failing_since = None,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Named as the writer keeps it: its full path below a storage root, else its name in
        // the writer's store (a page blob's).
        let image = match self.replica_root() {
            Some(root) => root.join(&r.path).display().to_string(),
            None => r.path.clone(),
        };
        tracing::info!(image, point = point.point, "failed over in place");
        Ok(image)
    }
}

/// A tag of `r`'s stream is durable: a seeded replica waiting for its first point is applied
/// up to it, once the agent's comparison covered the whole disk. A tag before that means the
/// agent copied instead of comparing (started without `--seeded`): what it did not copy (its
/// zero blocks) would keep the old disk's data, so the replica keeps waiting, with an error
/// that says what to do.
pub(crate) fn seed_tag(r: &Replica, seq: Seq) {
    let mut seed = lock(&r.recovery.seed);
    if *seed != SeedHold::Waiting {
        return;
    }
    let compared = r.recovery.seed_compared.load(Ordering::Acquire);
    if compared >= r.stream.info.size {
        *seed = SeedHold::Until(seq);
        // A refusal of an earlier agent's point is over.
        if r.stream
            .error()
            .is_some_and(|e| e.contains("reprotect's seed"))
        {
            r.stream.set_error(None);
        }
        return;
    }
    let msg = format!(
        "replica {} is a reprotect's seed, but a point arrived after only {compared} of {} bytes \
         were compared: the agent copies instead of comparing; stop it, remove its data folder's \
         disk state and log, and start it with `--seeded` (the seed is not written meanwhile)",
        r.path, r.stream.info.size
    );
    tracing::error!("{msg}");
    r.stream.set_error(Some(msg));
}

/// The agent's comparison asked the digests of a seeded replica up to `end`: recorded, so a
/// restart keeps it.
pub(crate) fn seed_compared(state: &StateDb, r: &Replica, end: u64) {
    if *lock(&r.recovery.seed) != SeedHold::Waiting
        || r.recovery.seed_compared.fetch_max(end, Ordering::AcqRel) >= end
    {
        return;
    }
    if let Err(e) = state.update_stream(r.stream.key, move |rec| {
        rec.seed_compared = rec.seed_compared.max(end);
    }) {
        tracing::warn!(replica = %r.stream.key, error = %e, "recording a seed's comparison");
    }
}

/// Whether applying up to `seq` ends `r`'s seeding (its first point is then applied).
pub(crate) fn seed_reached(r: &Replica, seq: Seq) -> bool {
    matches!(*lock(&r.recovery.seed), SeedHold::Until(s) if seq >= s)
}

/// At open: a replica still `seeding` (compared up to `compared`) waits for its first tag
/// above `applied`, found in the journal if it is there.
pub(crate) fn restore_seed(r: &Replica, applied: Seq, compared: u64) {
    r.recovery.seed_compared.store(compared, Ordering::Release);
    *lock(&r.recovery.seed) = SeedHold::Waiting;
    let first_tag = r
        .stream
        .journal()
        .entries_from(applied + 1)
        .into_iter()
        .find(|e| e.kind == haven_store::journal::EntryKind::Tag)
        .map(|e| e.seq);
    if let Some(seq) = first_tag {
        seed_tag(r, seq);
    }
    tracing::info!(replica = %r.stream.key, agent = %peer_hex(&r.stream.key.peer),
        "seeded replica: nothing is applied before its first point after the comparison");
}
