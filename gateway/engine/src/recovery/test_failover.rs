//! Test failover: a point presented as a view over the held base replica, exported over NBD on
//! a free port (writes, when allowed, go to a scratch overlay), recorded in redb and served
//! again after a restart; cleaned up on request (module docs of [`super`]).
//!
//! Starting and cleaning up build views, bind sockets and remove files: they claim the
//! replica's [`TestSlot`] under its state lock first (`Starting`, `Stopping`), do that work
//! without the lock, and publish the outcome under it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use haven_store::state::StreamKey;
use haven_wire::Seq;
use serde::{Deserialize, Serialize};

use super::item::{ItemEvent, ItemState, record, transition};
use super::{ErrorKind, PointRecord, PointSel, RecoveryError, err, hold_base, internal, test_key};
use crate::ingest::lock;
use crate::master_target::{MasterTarget, Replica};
use crate::overlay::{Scratch, View};
use crate::{now_ms, peer_hex};

/// A running test failover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TestFailoverInfo {
    /// The point presented.
    pub point: PointRecord,
    /// Where NBD clients reach it.
    pub uri: String,
    /// Whether writes are accepted (into a scratch overlay).
    pub writable: bool,
    /// When it started, ms since the Unix epoch.
    pub started_ms: u64,
    /// The disk as a file a platform can use (asked for with `files`): the full path of a
    /// VMDK descriptor whose flat extent is beside it (a `vmdk` writer) or of a raw file (a
    /// `raw` writer), in `test-failover/<agent>/disk<N>/` below the writer's storage root.
    /// Reads and writes of it are those of the NBD export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A running test failover as redb keeps it, to serve it again after a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TestRecord {
    info: TestFailoverInfo,
    /// The NBD export's name and port.
    export: String,
    port: u16,
    /// Also presented as files below the writer's storage root.
    #[serde(default)]
    files: bool,
}

/// A running test failover's parts.
pub(crate) struct ActiveTest {
    pub(super) info: TestFailoverInfo,
    view: Arc<View>,
    server: Arc<haven_nbd::Server>,
    port: u16,
    /// The files of the disk, when presented as files.
    files: Option<haven_fusefile::Mount>,
}

impl ActiveTest {
    /// Where NBD clients reach it.
    pub fn uri(&self) -> &str {
        &self.info.uri
    }
}

/// A replica's test failover, as far as it has got.
#[derive(Default)]
pub(crate) enum TestSlot {
    /// None runs (one a restart could not serve again may still be recorded in redb).
    #[default]
    Idle,
    /// Being started at this point (its view built, its export bound): the point is in use,
    /// and another test failover or a failover is refused.
    Starting(PointRecord),
    /// Served.
    Running(ActiveTest),
    /// Being cleaned up (its export closed, its files removed): another test failover is
    /// refused until it is gone.
    Stopping,
}

impl TestSlot {
    /// The running test failover.
    pub fn running(&self) -> Option<&ActiveTest> {
        match self {
            TestSlot::Running(t) => Some(t),
            _ => None,
        }
    }

    /// The point a test failover starting or running uses.
    pub fn point(&self) -> Option<PointRecord> {
        match self {
            TestSlot::Starting(p) => Some(*p),
            TestSlot::Running(t) => Some(t.info.point),
            TestSlot::Idle | TestSlot::Stopping => None,
        }
    }
}

impl MasterTarget {
    /// Whether a test failover a previous run recorded for `key` is to be served again (at
    /// open): one whose point is not below the base (`applied`). Anything else in its folder is
    /// a leftover of one that was starting or being cleaned up, and is removed.
    pub(super) fn recorded_test(&self, key: StreamKey, applied: Seq) -> anyhow::Result<bool> {
        let test: Option<TestRecord> = self.state.get_json(&test_key(key))?;
        if test.is_some_and(|t| t.info.point.seq >= applied) {
            return Ok(true);
        }
        let dir = self.test_dir(key);
        if dir.exists() {
            tracing::info!(dir = %dir.display(), "removing a test failover left by an earlier run");
            std::fs::remove_dir_all(&dir)?;
        }
        // Best effort: what is left is removed at the next start, and it must not keep the
        // replica from opening.
        if let Err(e) = self.remove_files(key) {
            tracing::warn!(item = %key, error = %e, "removing a test failover's presented files");
        }
        Ok(false)
    }

    /// Where a test failover of `key` presents its disk as files: `test-failover/<agent>/
    /// disk<N>/` below the writer's storage root.
    fn files_dir(&self, key: StreamKey) -> Option<PathBuf> {
        Some(
            self.replica_root()?
                .join("test-failover")
                .join(peer_hex(&key.peer))
                .join(format!("disk{}", key.disk)),
        )
    }

    /// The name, in a writer without a storage root, of the copy a test failover of `key`
    /// makes for a platform: `test-failover/<agent>/disk<N>.<writer>`, one per disk, written
    /// over by each test failover.
    fn test_image(&self, key: StreamKey) -> String {
        format!(
            "test-failover/{}/disk{}.{}",
            peer_hex(&key.peer),
            key.disk,
            self.config.writer.name
        )
    }

    /// Writes `point` of `r` into its test image (see [`Self::test_image`]); its name. A
    /// test failover served again after a restart keeps what its machine wrote there.
    fn copy_test_image(
        &self,
        r: &Replica,
        point: PointRecord,
        reopen: bool,
    ) -> anyhow::Result<String> {
        let image = self.test_image(r.stream.key);
        if !reopen {
            self.write_point(r, point, &image, true)?;
        }
        Ok(image)
    }

    /// Clears the test image of `key` in a writer without a storage root: its data is freed
    /// (zeroed, discarded), the empty image waits for the next test failover.
    fn clear_test_image(&self, key: StreamKey) -> anyhow::Result<()> {
        let mut plugin = self.host.load_writer(&self.config.writer)?;
        let disk = match plugin.open(&self.test_image(key), haven_host::Access::ReadWrite, &[]) {
            Ok(disk) => disk,
            Err(e)
                if e.plugin_error()
                    .is_some_and(|e| e.kind == haven_image::ErrorKind::NotFound) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let size = plugin.info(&disk)?.size;
        plugin.write_zeroes(&disk, 0, size, true)?;
        plugin.close(disk)?;
        Ok(())
    }

    /// Removes the folder a test failover of `key` presented its disk in (unmounting what a
    /// killed run left mounted there), and its agent's folder once empty.
    fn remove_files(&self, key: StreamKey) -> std::io::Result<()> {
        let Some(dir) = self.files_dir(key) else {
            return Ok(());
        };
        haven_fusefile::clear_stale(&dir)?;
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        if let Some(agent) = dir.parent() {
            // Another disk's folder may still be there: then it stays.
            let _ = std::fs::remove_dir(agent);
        }
        Ok(())
    }

    /// Serves again the test failover a previous run recorded for `r` (at start, before the
    /// replica is served). One that cannot be served is cleaned up, and its history says why.
    pub(crate) fn restore_test(&self, r: &Replica) {
        let key = r.stream.key;
        let name = key.to_string();
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
        let (state, held) = {
            let st = lock(&r.recovery.state);
            (st.item.state, st.points.contains_key(&point.seq))
        };
        if point.seq < applied || !held {
            tracing::error!(item = %key, point = point.point, "the test failover's point is gone");
            let _ = std::fs::remove_dir_all(self.test_dir(key));
            let _ = self.remove_files(key);
            let _ = self.state.remove_json(&test_key(key));
            if state == ItemState::Protected {
                *lock(&r.recovery.hold) = None;
                r.wake();
            }
            let _ = record_event(
                self,
                r,
                &name,
                ItemEvent::TestFailoverNotRestored,
                format!(
                    "test failover at point {} could not be served again after a restart (the \
                     point is no longer held; the base replica is at seq {applied}) and was \
                     cleaned up",
                    point.point
                ),
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
                    files: record.files,
                };
                lock(&r.recovery.state).test = TestSlot::Running(active);
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
                let _ = record_event(self, r, &name, ItemEvent::TestFailoverRestored, cause);
            }
            // Kept as it is (record, scratch, the base held): the cause may pass, and what the
            // drill wrote is not thrown away without the operator.
            Err(e) => {
                tracing::error!(item = %key, error = %format!("{e:#}"), "test failover not served again");
                let machine = lock(&r.stream.machine_name).clone();
                let _ = record_event(
                    self,
                    r,
                    &name,
                    ItemEvent::TestFailoverNotRestored,
                    format!(
                        "test failover at point {} could not be served again after a restart: \
                         {e:#}; it is kept with its writes: restart the master target once the \
                         cause is fixed, or discard it with `haven failover cleanup {machine}`",
                        point.point
                    ),
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

    /// `haven failover test`: presents a point over NBD, and with `files` also as files below
    /// the writer's storage root (for a platform to define a machine on); returns at once. A
    /// machine of several disks presents each disk at one point all of them hold, each on its
    /// own export (`haven failover list` shows them); the record returned is its first disk's.
    pub fn test_failover(
        &self,
        item: &str,
        sel: PointSel,
        writable: bool,
        files: bool,
    ) -> Result<TestFailoverInfo, RecoveryError> {
        let disks = self.find_machine(item)?;
        if files {
            self.files_format()?;
        }
        if disks.len() == 1 {
            return self.test_failover_disk(&disks[0], item, sel, writable, files);
        }
        let id = self.pick_common(&disks, item, sel)?;
        let mut started = Vec::new();
        for r in &disks {
            let name = format!("{item}/{}", r.stream.key.disk);
            match self.test_failover_disk(r, &name, PointSel::Id(id), writable, files) {
                Ok(info) => started.push((name, info)),
                Err(e) => {
                    // All disks or none: the ones started end again.
                    for (name, _) in &started {
                        if let Err(e) = self.cleanup_test(name) {
                            tracing::warn!(item = %name, error = %e, "ending a test failover again");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(started.swap_remove(0).1)
    }

    fn test_failover_disk(
        &self,
        r: &Arc<Replica>,
        item: &str,
        sel: PointSel,
        writable: bool,
        files: bool,
    ) -> Result<TestFailoverInfo, RecoveryError> {
        let r = r.clone();
        wait_created(&r, item)?;
        // Checked and claimed in one step: no failover or other test failover starts meanwhile,
        // and retention keeps the point.
        let point = {
            let mut st = lock(&r.recovery.state);
            transition(st.item.state, ItemEvent::TestFailoverStarted)
                .map_err(|e| e.into_error(item))?;
            if st.busy {
                return Err(err(
                    ErrorKind::Conflict,
                    format!("a failover of item {item} is running"),
                ));
            }
            let running = match &st.test {
                TestSlot::Idle => None,
                TestSlot::Starting(p) => Some((p.point, "starting".to_string())),
                TestSlot::Running(t) => Some((t.info.point.point, t.info.uri.clone())),
                TestSlot::Stopping => {
                    return Err(err(
                        ErrorKind::Conflict,
                        format!(
                            "the test failover of item {item} is being cleaned up: start another \
                             once `haven failover show {item}` no longer lists it"
                        ),
                    ));
                }
            };
            if let Some((point, uri)) = running {
                return Err(err(
                    ErrorKind::Conflict,
                    format!(
                        "a test failover of item {item} is running (point {point}, {uri}): clean \
                         it up first with `haven failover cleanup {item}`"
                    ),
                ));
            }
            let point = self.pick(&r, &st.points, item, sel)?;
            st.test = TestSlot::Starting(point);
            point
        };
        let base_seq = hold_base(&r);
        let machine = lock(&r.stream.machine_name).clone();
        let export = format!("{machine}-{}-{}", r.stream.key.disk, point.point);
        let want = TestRecord {
            info: TestFailoverInfo {
                point,
                uri: String::new(),
                writable,
                started_ms: now_ms(),
                image: None,
            },
            export: export.clone(),
            port: 0,
            files,
        };
        let started = self
            .start_test(&r, &want, base_seq, false)
            .and_then(|active| {
                let record = TestRecord {
                    info: active.info.clone(),
                    export: export.clone(),
                    port: active.port,
                    files,
                };
                match self.state.put_json(&test_key(r.stream.key), &record) {
                    Ok(()) => Ok(active),
                    Err(e) => {
                        drop(active.files);
                        active.server.close();
                        Err(anyhow::anyhow!("recording it: {e}"))
                    }
                }
            });
        let active = match started {
            Ok(a) => a,
            Err(e) => {
                // Its files first, then the hold and the claim: nothing else uses either
                // while it is `Starting`.
                let _ = std::fs::remove_dir_all(self.test_dir(r.stream.key));
                let _ = self.remove_files(r.stream.key);
                *lock(&r.recovery.hold) = None;
                lock(&r.recovery.state).test = TestSlot::Idle;
                return Err(internal(format!(
                    "item {item}: starting the test failover: {e:#}"
                )));
            }
        };
        let info = active.info.clone();
        lock(&r.recovery.state).test = TestSlot::Running(active);
        record_event(
            self,
            &r,
            item,
            ItemEvent::TestFailoverStarted,
            format!(
                "test failover started at point {} ({}, {})",
                info.point.point,
                info.uri,
                if writable { "writable" } else { "read-only" }
            ),
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
        let TestRecord {
            info,
            export,
            port,
            files,
        } = want;
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
        // Earlier points the view can tell its changes since: those at or above the base.
        let earlier: Vec<(u64, Seq)> = lock(&r.recovery.state)
            .points
            .range(base_seq..point.seq)
            .map(|(&seq, p)| (p.point, seq))
            .collect();
        let backend = Arc::new(ViewBackend {
            view: view.clone(),
            earlier,
        });
        // Presented as files first: a failure there leaves nothing served. A writer without
        // a storage root (page blobs) gets a copy of the point in its store instead.
        let (files, image) = match (files, self.replica_root().is_some()) {
            (true, true) => {
                let (mount, image) =
                    self.present_files(r.stream.key, backend.clone(), point.point, writable)?;
                (Some(mount), Some(image))
            }
            (true, false) => (None, Some(self.copy_test_image(r, point, reopen)?)),
            (false, _) => (None, None),
        };
        let mut server = haven_nbd::Server::new(backend, export.clone());
        let scheme = match &self.config.nbd_tls {
            Some(tls) => {
                server = server.with_tls(tls.clone());
                "nbds"
            }
            None => "nbd",
        };
        let server = Arc::new(server);
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
                uri: format!("{scheme}://{addr}/{export}"),
                writable,
                started_ms: info.started_ms,
                image,
            },
            view,
            server,
            port: addr.port(),
            files,
        })
    }

    /// How this master target presents disks as files: per its writer's format, a format of
    /// one file of plain data (or a descriptor naming one); a writer without a storage root
    /// (page blobs) gets a copy in its store. Refused (409) for another format.
    fn files_format(&self) -> Result<FilesFormat, RecoveryError> {
        if self.replica_root().is_none() {
            return Ok(FilesFormat::Copy);
        }
        match self.config.writer.name.as_str() {
            "vmdk" => Ok(FilesFormat::FlatVmdk),
            "raw" => Ok(FilesFormat::Raw),
            other => Err(err(
                ErrorKind::Conflict,
                format!(
                    "disks cannot be presented as files in the format of this master target's \
                     writer `{other}`: that needs the `vmdk` or `raw` writer (a test failover \
                     over NBD alone works with any)"
                ),
            )),
        }
    }

    /// Presents `disk` as files a platform can use, per [`Self::files_format`]; the mount and
    /// the path of the file that names the disk.
    fn present_files(
        &self,
        key: StreamKey,
        disk: Arc<ViewBackend>,
        point: u64,
        writable: bool,
    ) -> anyhow::Result<(haven_fusefile::Mount, String)> {
        use haven_fusefile::{Content, File};
        let format = self
            .files_format()
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let dir = self.files_dir(key).ok_or_else(|| {
            anyhow::anyhow!("the writer plugin has no storage root to present the disk in")
        })?;
        let stem = format!("disk{}-point{point}", key.disk);
        let size = haven_nbd::Backend::size(&*disk);
        let (files, image) = match format {
            FilesFormat::FlatVmdk => {
                let (descriptor, flat) = (format!("{stem}.vmdk"), format!("{stem}-flat.vmdk"));
                let text = flat_vmdk_descriptor(&flat, size, writable);
                let files = vec![
                    File {
                        name: descriptor.clone(),
                        content: Content::Bytes(text.into_bytes()),
                    },
                    File {
                        name: flat,
                        content: Content::Disk(disk),
                    },
                ];
                (files, descriptor)
            }
            FilesFormat::Copy => {
                anyhow::bail!("a writer without a storage root presents no files (a copy instead)")
            }
            FilesFormat::Raw => {
                let name = format!("{stem}.raw");
                let files = vec![File {
                    name: name.clone(),
                    content: Content::Disk(disk),
                }];
                (files, name)
            }
        };
        let mount = haven_fusefile::mount(&dir, files)?;
        Ok((mount, dir.join(image).display().to_string()))
    }

    /// `haven failover cleanup`: ends the test failover and discards what it wrote; of every
    /// disk, for a machine of several (the record returned is its first disk's).
    pub fn cleanup_test(&self, item: &str) -> Result<TestFailoverInfo, RecoveryError> {
        let disks = self.find_machine(item)?;
        if disks.len() == 1 {
            return self.cleanup_test_disk(&disks[0], item);
        }
        let mut first = None;
        let mut failed = Vec::new();
        for r in &disks {
            let name = format!("{item}/{}", r.stream.key.disk);
            match self.cleanup_test_disk(r, &name) {
                Ok(info) => {
                    first.get_or_insert(info);
                }
                Err(e) => failed.push(e),
            }
        }
        match (first, failed.is_empty()) {
            (Some(info), true) => Ok(info),
            _ => Err(failed.swap_remove(0)),
        }
    }

    fn cleanup_test_disk(
        &self,
        r: &Replica,
        item: &str,
    ) -> Result<TestFailoverInfo, RecoveryError> {
        let key = r.stream.key;
        let active = {
            let mut st = lock(&r.recovery.state);
            match std::mem::replace(&mut st.test, TestSlot::Stopping) {
                TestSlot::Running(active) => Some(active),
                TestSlot::Idle => None,
                other => {
                    let why = match other {
                        TestSlot::Starting(_) => "is still starting: clean it up once it runs",
                        _ => "is already being cleaned up",
                    };
                    st.test = other;
                    return Err(err(
                        ErrorKind::Conflict,
                        format!("the test failover of item {item} {why}"),
                    ));
                }
            }
        };
        let free = || lock(&r.recovery.state).test = TestSlot::Idle;
        let info = match active {
            Some(mut active) => {
                // The platform's files first: while something uses them, the test failover
                // goes on as it was (its view, its export, the base held).
                if let Some(files) = active.files.as_mut()
                    && let Err(e) = files.unmount()
                {
                    let dir = files.dir().display().to_string();
                    lock(&r.recovery.state).test = TestSlot::Running(active);
                    return Err(err(
                        ErrorKind::Conflict,
                        format!(
                            "the test failover of item {item} goes on: its files in {dir} are \
                             in use ({e}); stop what uses them (a machine defined on them) and \
                             clean up again"
                        ),
                    ));
                }
                let ActiveTest {
                    info,
                    view,
                    server,
                    files,
                    ..
                } = active;
                drop(files);
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
            None => match self.state.get_json::<TestRecord>(&test_key(key)) {
                Ok(Some(record)) => record.info,
                Ok(None) => {
                    free();
                    return Err(err(
                        ErrorKind::Conflict,
                        format!("item {item} has no test failover to clean up"),
                    ));
                }
                Err(e) => {
                    free();
                    return Err(internal(e));
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
        if let Err(e) = self.remove_files(key) {
            tracing::warn!(item, error = %e, "removing the test failover's presented files");
        }
        if self.replica_root().is_none()
            && let Err(e) = self.clear_test_image(key)
        {
            tracing::warn!(item, error = %format!("{e:#}"), "clearing the test failover's copy");
        }
        // A failover that started meanwhile (busy, or past `protected`) holds the base itself:
        // decided under the state lock, which a failover's claim takes too.
        let released = {
            let mut st = lock(&r.recovery.state);
            st.test = TestSlot::Idle;
            let release = st.item.state == ItemState::Protected && !st.busy;
            if release {
                *lock(&r.recovery.hold) = None;
            }
            release
        };
        if released {
            r.wake();
        }
        record_event(
            self,
            r,
            item,
            ItemEvent::TestFailoverCleanedUp,
            format!("test failover at point {} cleaned up", info.point.point),
        )?;
        forgotten.map_err(|e| {
            internal(format!(
                "item {item}: the test failover is stopped and its files removed, but its \
                 record could not be removed ({e}); run the cleanup again"
            ))
        })?;
        Ok(info)
    }
}

/// How a test failover presents a disk as files.
#[derive(Clone, Copy, Debug)]
enum FilesFormat {
    /// A monolithicFlat VMDK: a descriptor and its flat extent (the disk's bytes).
    FlatVmdk,
    /// The disk's bytes.
    Raw,
    /// A copy of the point in the writer's own store (a writer without a storage root).
    Copy,
}

/// Records a test failover event (history only: the item's state stays).
fn record_event(
    mt: &MasterTarget,
    r: &Replica,
    item: &str,
    event: ItemEvent,
    cause: String,
) -> Result<super::ItemRecord, RecoveryError> {
    record(&mt.state, r, item, event, cause, |_| {})
}

/// The prefix of the meta contexts that list what changed since an earlier point:
/// `haven:changed-since:ID` on the export of a point lists, as flag 1, every extent written
/// between point `ID` and the exported one (see ARCHITECTURE.md, "NBD exports").
pub const CHANGED_SINCE: &str = "haven:changed-since:";

/// Block-status flag of `haven:changed-since:ID`: the extent changed.
pub const STATE_CHANGED: u32 = 1;

/// A view served over NBD.
struct ViewBackend {
    view: Arc<View>,
    /// Earlier points (id, tag seq) whose changes since the view can list, oldest first.
    earlier: Vec<(u64, Seq)>,
}

impl ViewBackend {
    /// A write with FUA is durable before it is acknowledged.
    fn flush_if(&self, fua: bool) -> Result<(), haven_nbd::Error> {
        if fua {
            self.view.flush().map_err(nbd_err)?;
        }
        Ok(())
    }

    /// The tag seq of the earlier point a `haven:changed-since:ID` context names.
    fn since(&self, name: &str) -> Option<Seq> {
        let id: u64 = name.strip_prefix(CHANGED_SINCE)?.parse().ok()?;
        self.earlier
            .iter()
            .find(|(p, _)| *p == id)
            .map(|(_, seq)| *seq)
    }
}

fn nbd_err(e: anyhow::Error) -> haven_nbd::Error {
    haven_nbd::Error::failed(5, format!("{e:#}"))
}

impl haven_nbd::Backend for ViewBackend {
    fn size(&self) -> u64 {
        self.view.size()
    }

    fn read_only(&self) -> bool {
        !self.view.writable()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), haven_nbd::Error> {
        self.view.read(offset, buf).map_err(nbd_err)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), haven_nbd::Error> {
        self.view.write(offset, data).map_err(nbd_err)?;
        self.flush_if(fua)
    }

    /// Zeroing only records the range in the scratch map: always fast.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_punch: bool,
        _fast: bool,
        fua: bool,
    ) -> Result<(), haven_nbd::Error> {
        self.view.write_zeroes(offset, len).map_err(nbd_err)?;
        self.flush_if(fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), haven_nbd::Error> {
        self.view.write_zeroes(offset, len).map_err(nbd_err)?;
        self.flush_if(fua)
    }

    fn flush(&self) -> Result<(), haven_nbd::Error> {
        self.view.flush().map_err(nbd_err)
    }

    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<haven_nbd::Extent>, haven_nbd::Error> {
        use haven_image::ExtentState;
        let runs = self.view.allocation(offset, len).map_err(nbd_err)?;
        Ok(runs
            .into_iter()
            .map(|(len, state)| haven_nbd::Extent {
                len,
                flags: match state {
                    ExtentState::Data => 0,
                    ExtentState::Zero => {
                        haven_nbd::proto::STATE_HOLE | haven_nbd::proto::STATE_ZERO
                    }
                },
            })
            .collect())
    }

    fn meta_contexts(&self, query: &str) -> Vec<String> {
        let names = self
            .earlier
            .iter()
            .map(|(id, _)| format!("{CHANGED_SINCE}{id}"));
        if query.is_empty() || query.ends_with(':') {
            names.filter(|n| n.starts_with(query)).collect()
        } else {
            names.filter(|n| n == query).collect()
        }
    }

    fn context_status(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<haven_nbd::Extent>, haven_nbd::Error> {
        let since = self.since(name).ok_or_else(|| {
            haven_nbd::Error::refused(
                haven_nbd::proto::ENOTSUP,
                format!("this export has no meta context {name:?}"),
            )
        })?;
        let runs = self
            .view
            .changed_since(since, offset, len)
            .map_err(nbd_err)?;
        Ok(runs
            .into_iter()
            .map(|(len, changed)| haven_nbd::Extent {
                len,
                flags: if changed { STATE_CHANGED } else { 0 },
            })
            .collect())
    }

    /// One view behind every connection, and its flush syncs the whole scratch.
    fn multi_conn(&self) -> bool {
        true
    }
}

/// Longest a view waits for a new replica's applier to create it in the writer.
const CREATED_WAIT: Duration = Duration::from_secs(30);

/// Waits (at most [`CREATED_WAIT`]) until `r`'s applier has opened it in the writer: right
/// after protection starts, or after a restart, a point may be here before the replica is. A
/// test failover and a failover both read it.
pub(super) fn wait_created(r: &Replica, item: &str) -> Result<(), RecoveryError> {
    let deadline = Instant::now() + CREATED_WAIT;
    while !r.created.load(Ordering::Acquire) {
        if Instant::now() > deadline {
            return Err(err(
                ErrorKind::Unavailable,
                format!(
                    "item {item}: its replica is not created yet (the writer plugin has not \
                     opened it in {}s; see `haven status` for its error) — try again shortly",
                    CREATED_WAIT.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The descriptor of a VMDK whose data is the flat file `flat` beside it (`monolithicFlat`),
/// `size` bytes (a multiple of 512), with the geometry VMware computes for a SCSI disk.
fn flat_vmdk_descriptor(flat: &str, size: u64, writable: bool) -> String {
    let sectors = size / 512;
    let cylinders = (sectors / (255 * 63)).clamp(1, 65535);
    let access = if writable { "RW" } else { "RDONLY" };
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         CID=fffffffe\n\
         parentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\
         \n\
         # Extent description\n\
         {access} {sectors} FLAT \"{flat}\" 0\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"255\"\n\
         ddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"lsilogic\"\n"
    )
}
