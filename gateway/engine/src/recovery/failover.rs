//! Failover: the request (a chosen point, or planned: the source stopped through the control
//! path at a final point), materialising the point into an image through the writer plugin,
//! publishing the image under its name once whole, and the commit (module docs of [`super`]).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use haven_net::control::{self, Command, Reply, Request};
use haven_wire::Seq;

use super::item::{ItemEvent, ItemRecord, record, transition};
use super::points::store_points;
use super::{
    ErrorKind, PointRecord, PointSel, RecoveryError, ReplicaRecovery, err, hold_base, internal,
};
use crate::ingest::lock;
use crate::master_target::{MasterTarget, Replica};
use crate::overlay::{Scratch, View};
use crate::{failpoint, peer_hex};

/// Longest a control request to the agent may take (its quiesce hooks included).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(150);
/// Bytes copied per step of a materialisation.
const COPY_CHUNK: usize = 4 << 20;
/// All-zero blocks of this size are left as holes in a failover image.
const SPARSE_BLOCK: usize = 64 << 10;

/// Clears a replica's `busy` flag when a failover request ends.
struct Busy<'a>(&'a ReplicaRecovery);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).busy = false;
    }
}

/// Checks that a failover (`event`) of item `item` may start on `r` and claims it, in one
/// step: no test failover or other failover starts meanwhile. The claim ends when dropped.
fn claim<'a>(r: &'a Replica, item: &str, event: ItemEvent) -> Result<Busy<'a>, RecoveryError> {
    let mut st = lock(&r.recovery.state);
    if st.busy {
        return Err(err(
            ErrorKind::Conflict,
            format!(
                "a failover of item {item} is already running; see `haven failover show {item}`"
            ),
        ));
    }
    transition(st.item.state, event).map_err(|e| e.into_error(item))?;
    if let Some(p) = st.test.point() {
        return Err(err(
            ErrorKind::Conflict,
            format!(
                "a test failover of item {item} is running (point {}): clean it up first with \
                 `haven failover cleanup {item}`",
                p.point
            ),
        ));
    }
    st.busy = true;
    Ok(Busy(&r.recovery))
}

impl MasterTarget {
    /// The connection that forwards the item's stream: control requests for its agent go there.
    pub(super) fn route(&self, r: &Replica) -> Result<haven_net::quinn::Connection, RecoveryError> {
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

    /// Sends `command` to the item's agent through its process server; returns the point the
    /// agent took for the item's disk.
    pub(super) async fn ask_agent(
        &self,
        r: &Replica,
        command: Command,
    ) -> Result<haven_net::control::PointTaken, RecoveryError> {
        self.ask_agent_all(r, command)
            .await?
            .into_iter()
            .find(|p| p.disk == r.stream.key.disk)
            .ok_or_else(|| err(ErrorKind::Internal, "the agent tagged another disk"))
    }

    /// Sends `command` to the item's agent through its process server; returns the point the
    /// agent took, one tag per disk of the machine.
    pub(super) async fn ask_agent_all(
        &self,
        r: &Replica,
        command: Command,
    ) -> Result<Vec<haven_net::control::PointTaken>, RecoveryError> {
        let conn = self.route(r)?;
        let req = Request {
            agent_id: peer_hex(&r.stream.key.peer),
            command,
        };
        match control::call(&conn, &req, CONTROL_TIMEOUT).await {
            Ok(Reply::Taken(points)) => Ok(points),
            // The relay's own failures (agent not connected, no answer) mean "try later".
            Ok(Reply::Failed(why))
                if why.starts_with("process server:") || why.contains("control stream") =>
            {
                Err(err(ErrorKind::Unavailable, why))
            }
            Ok(Reply::Failed(why)) => Err(err(ErrorKind::Conflict, format!("the agent: {why}"))),
            Ok(Reply::Done(what)) => Err(err(
                ErrorKind::Internal,
                format!("the agent took no point: {what}"),
            )),
            Ok(Reply::Held { .. }) => Err(err(
                ErrorKind::Internal,
                "the agent answered a point request as a hold",
            )),
            Err(e) => Err(err(ErrorKind::Unavailable, e.to_string())),
        }
    }

    /// `haven failover`: fails the item over to a point (unplanned), or (planned) stops the
    /// source, takes a final point and fails over to it. Returns when materialising started.
    /// A machine of several disks fails over as one: every disk to the same point (the
    /// record returned is its first disk's).
    pub async fn failover(
        self: &Arc<Self>,
        item: &str,
        sel: PointSel,
        planned: bool,
        in_place: bool,
    ) -> Result<ItemRecord, RecoveryError> {
        let mut disks = self.find_machine(item)?;
        if in_place {
            for r in &disks {
                if lock(&r.recovery.state).test.running().is_some() {
                    return Err(err(
                        ErrorKind::Conflict,
                        format!(
                            "item {item} has a test failover running on its replica: end it \
                                 (`haven failover cleanup {item}`) before failing over in place"
                        ),
                    ));
                }
            }
        }
        if disks.len() > 1 {
            return self
                .failover_machine(&disks, item, sel, planned, in_place)
                .await;
        }
        let r = disks.pop().expect("one disk");
        // Materialising reads the replica: right after protection started it may not be
        // created yet.
        {
            let (r, item) = (r.clone(), item.to_string());
            tokio::task::spawn_blocking(move || super::test_failover::wait_created(&r, &item))
                .await
                .map_err(internal)??;
        }
        let event = if planned {
            ItemEvent::PlannedFailover
        } else {
            ItemEvent::FailoverStarted
        };
        let _busy = claim(&r, item, event)?;
        let point = if planned {
            let none = lock(&r.recovery.state).points.is_empty();
            if none {
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
            let picked = {
                let st = lock(&r.recovery.state);
                self.pick(&r, &st.points, item, sel)
            };
            picked?
        };
        hold_base(&r);
        let cause = if planned {
            format!(
                "planned failover{}: the source stopped at point {}",
                if in_place { " in place" } else { "" },
                point.point
            )
        } else {
            format!(
                "failover{} to point {} requested",
                if in_place { " in place" } else { "" },
                point.point
            )
        };
        let record = record(&self.state, &r, item, event, cause, |i| {
            i.point = Some(point);
            i.planned = planned;
            i.in_place = in_place;
            i.image = None;
        })?;
        self.stop_replication(&r);
        self.spawn_materialise(r.clone());
        Ok(record)
    }

    /// [`MasterTarget::failover`] of a machine of several disks: all of them claimed at once,
    /// then failed over to one point every disk holds (planned: the agent's final point, a tag
    /// on every disk at one instant).
    async fn failover_machine(
        self: &Arc<Self>,
        disks: &[Arc<Replica>],
        item: &str,
        sel: PointSel,
        planned: bool,
        in_place: bool,
    ) -> Result<ItemRecord, RecoveryError> {
        let name = |r: &Replica| format!("{item}/{}", r.stream.key.disk);
        for r in disks {
            let (r, item) = (r.clone(), name(r));
            tokio::task::spawn_blocking(move || super::test_failover::wait_created(&r, &item))
                .await
                .map_err(internal)??;
        }
        let event = if planned {
            ItemEvent::PlannedFailover
        } else {
            ItemEvent::FailoverStarted
        };
        // Every disk checked and claimed, or none.
        let mut claimed = Vec::new();
        for r in disks {
            claimed.push(claim(r, &name(r), event)?);
        }
        let points: Vec<PointRecord> = if planned {
            if let Some(r) = disks
                .iter()
                .find(|r| lock(&r.recovery.state).points.is_empty())
            {
                return Err(err(
                    ErrorKind::Conflict,
                    self.no_points_message(r, &name(r)),
                ));
            }
            let taken = self.ask_agent_all(&disks[0], Command::Stop).await?;
            let point = taken.first().map_or(0, |t| t.point);
            let mut points = Vec::new();
            for r in disks {
                points.push(self.await_tag(r, &taken, point).await.map_err(|e| RecoveryError {
                    message: format!(
                        "the source of {item} is stopped (its final point is {point}), but disk \
                         {}: {}; once the point has arrived (`haven point list {item}`), fail \
                         over with `haven failover {item} --point {point}`",
                        r.stream.key.disk, e.message
                    ),
                    ..e
                })?);
            }
            points
        } else {
            let id = self.pick_common(disks, item, sel)?;
            disks
                .iter()
                .map(|r| {
                    let st = lock(&r.recovery.state);
                    self.pick(r, &st.points, &name(r), PointSel::Id(id))
                })
                .collect::<Result<_, _>>()?
        };
        let mut first = None;
        for (r, point) in disks.iter().zip(points) {
            hold_base(r);
            let cause = if planned {
                format!(
                    "planned failover of {item}: the source stopped at point {}",
                    point.point
                )
            } else {
                format!("failover of {item} to point {} requested", point.point)
            };
            let record = record(&self.state, r, &name(r), event, cause, |i| {
                i.point = Some(point);
                i.planned = planned;
                i.in_place = in_place;
                i.image = None;
            })?;
            first.get_or_insert(record);
        }
        self.stop_replication(&disks[0]);
        for r in disks {
            self.spawn_materialise(r.clone());
        }
        drop(claimed);
        Ok(first.expect("a machine has disks"))
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
        let st = lock(&r.recovery.state);
        let item = &st.item;
        (item.state != super::ItemState::Protected).then(|| {
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
        if let Err(e) = record(
            &self.state,
            &r,
            &r.stream.key.to_string(),
            ItemEvent::FailoverResumed,
            "materialising again after a restart (the incomplete image is replaced)",
            |_| {},
        ) {
            tracing::error!(error = %e, "recording a failover transition");
        }
        self.spawn_materialise(r);
    }

    fn spawn_materialise(self: &Arc<Self>, r: Arc<Replica>) {
        let mt = self.clone();
        let name = format!("materialise-{}", r.stream.key);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let (point, in_place) = {
                let st = lock(&r.recovery.state);
                (st.item.point, st.item.in_place)
            };
            let Some(point) = point else {
                return;
            };
            let item = r.stream.key.to_string();
            let made = if in_place {
                mt.materialise_in_place(&r, point)
            } else {
                mt.materialise(&r, point)
            };
            let outcome = match made {
                Ok(image) => record(
                    &mt.state,
                    &r,
                    &item,
                    ItemEvent::Materialised,
                    format!("point {} materialised into {image}", point.point),
                    |i| i.image = Some(image.clone()),
                ),
                Err(e) => record(
                    &mt.state,
                    &r,
                    &item,
                    ItemEvent::MaterialiseFailed,
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
        let Some(root) = self.replica_root() else {
            return self.materialise_remote(r, point, &format!("{agent_dir}/{name}"));
        };
        let staging = format!("{agent_dir}/.staging-disk{}", key.disk);
        let image = format!("{staging}/{name}");
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
        let started = Instant::now();
        let size = self.write_point(r, point, &image, false)?;
        publish(&staging_dir, &final_dir, &name)?;
        tracing::info!(
            image = %full.display(),
            bytes = size,
            seconds = started.elapsed().as_secs_f64(),
            "failover image complete"
        );
        Ok(full.display().to_string())
    }

    /// [`MasterTarget::materialise`] through a writer that keeps disks elsewhere (page blobs,
    /// no storage root and no rename): the image is written at its final name, the whole disk
    /// over (zeros too) when one is there from a run a restart interrupted. It is the item's
    /// image only once this returns (the item's record says so), so a partial one is never
    /// used. The image's name in the writer's store.
    fn materialise_remote(
        &self,
        r: &Replica,
        point: PointRecord,
        image: &str,
    ) -> anyhow::Result<String> {
        let started = Instant::now();
        let size = self.write_point(r, point, image, true)?;
        tracing::info!(
            image,
            bytes = size,
            seconds = started.elapsed().as_secs_f64(),
            "failover image complete"
        );
        Ok(image.to_string())
    }

    /// Writes the disk at `point` into a new image `image`, flushed and closed; its size. With
    /// `reuse`, an image already at `image` is opened and written over, zeros included.
    pub(super) fn write_point(
        &self,
        r: &Replica,
        point: PointRecord,
        image: &str,
        reuse: bool,
    ) -> anyhow::Result<u64> {
        let base_seq = r.applied.load(Ordering::Acquire);
        let view = View::build(
            r.stream.clone(),
            self.open_base(r)?,
            base_seq,
            point.seq,
            Scratch::None,
        )?;
        let mut plugin = self.host.load_writer(&self.config.writer)?;
        let size = view.size();
        let opened = match reuse {
            true => match plugin.open(image, haven_host::Access::ReadWrite, &[]) {
                Ok(disk) => {
                    tracing::info!(image, "writing over a failover image made before a restart");
                    Some(disk)
                }
                Err(e)
                    if e.plugin_error()
                        .is_some_and(|e| e.kind == haven_image::ErrorKind::NotFound) =>
                {
                    None
                }
                Err(e) => return Err(e.into()),
            },
            false => None,
        };
        // A new image is all zeros: its zero runs stay holes. One written over gets them.
        let zeros = opened.is_some();
        let disk = match opened {
            Some(disk) => disk,
            None => plugin.create(image, size, 512, &self.config.writer_options)?,
        };
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
                let (pos, buf) = chunk?;
                // Runs of blocks that are not all zero are written; the rest stays a hole of
                // the new (all-zero) image, or is zeroed in one written over.
                let mut at = 0usize;
                while at < buf.len() {
                    let zero =
                        haven_store::is_all_zero(&buf[at..(at + SPARSE_BLOCK).min(buf.len())]);
                    let mut end = at;
                    while end < buf.len()
                        && haven_store::is_all_zero(&buf[end..(end + SPARSE_BLOCK).min(buf.len())])
                            == zero
                    {
                        end = (end + SPARSE_BLOCK).min(buf.len());
                    }
                    let offset = pos + at as u64;
                    match zero {
                        false => plugin.write(&disk, offset, &mut buf[at..end].to_vec())?,
                        true if zeros => {
                            plugin.write_zeroes(&disk, offset, (end - at) as u64, true)?
                        }
                        true => {}
                    }
                    at = end;
                }
                let end = pos + buf.len() as u64;
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
        Ok(size)
    }

    /// `haven failover commit`: the failover is final; the other points are discarded. Every
    /// disk of a machine is committed (the record returned is its first disk's).
    pub fn commit(&self, item: &str) -> Result<ItemRecord, RecoveryError> {
        let disks = self.find_machine(item)?;
        // Checked for every disk first: none is committed unless all can be.
        for r in &disks {
            let st = lock(&r.recovery.state);
            transition(st.item.state, ItemEvent::Committed).map_err(|e| e.into_error(item))?;
        }
        let mut first = None;
        for r in &disks {
            let name = if disks.len() > 1 {
                format!("{item}/{}", r.stream.key.disk)
            } else {
                item.to_string()
            };
            let record = self.commit_disk(r, &name)?;
            first.get_or_insert(record);
        }
        Ok(first.expect("a machine has disks"))
    }

    fn commit_disk(&self, r: &Replica, item: &str) -> Result<ItemRecord, RecoveryError> {
        let dropped: Vec<Seq> = {
            let mut st = lock(&r.recovery.state);
            transition(st.item.state, ItemEvent::Committed).map_err(|e| e.into_error(item))?;
            let keep = st.item.point.map(|p| p.seq);
            let dropped = st
                .points
                .keys()
                .filter(|seq| Some(**seq) != keep)
                .copied()
                .collect();
            st.points.retain(|seq, _| Some(*seq) == keep);
            dropped
        };
        store_points(&self.state, r.stream.key, &[], &dropped).map_err(internal)?;
        record(
            &self.state,
            r,
            item,
            ItemEvent::Committed,
            format!("committed; {} other points discarded", dropped.len()),
            |_| {},
        )
    }
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
