//! The appliers: a small pool of threads that apply every replica's journal through the
//! target writer plugin (module docs of [`crate::master_target`]). A replica is work, not a
//! thread: it belongs to one applier for its life, and each applier owns one instance of the
//! writer with the replicas it serves open in it, so threads and plugin instances stay the same
//! whatever the number of replicas.
//!
//! An applier takes the replicas that have work in turn (round robin), one batch of at most
//! [`APPLY_BATCH_BYTES`] each, so one replica's backlog or initial sync delays the others by one
//! batch at most. For each replica it applies journaled records strictly in sequence order, up
//! to the oldest recovery point kept and never above a hold
//! ([`ReplicaRecovery::apply_target`]), flushes the replica, records the applied seq in redb
//! and only then releases the journal up to it: after a crash anywhere, the journal still holds
//! every record after the recorded applied seq, and re-applying a record the replica already
//! has is harmless (writes are idempotent in order). A record that fails its authentication is
//! never applied: that replica stops for good, the others go on. A failure of the plugin or the
//! state pauses only the replica it hit for [`RETRY_AFTER`]; when the plugin's instance was
//! replaced (a trap), the other replicas' handles are reopened in the new one. Resync hashes
//! are computed once everything journaled for the replica is applied.
//!
//! [`ReplicaRecovery::apply_target`]: crate::recovery::ReplicaRecovery::apply_target

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use haven_host::{Access, Disk, Host, PluginSpec, WriterPlugin};
use haven_store::state::{StateDb, StreamKey};
use haven_store::{StoreError, decompress};
use haven_wire::{HashRequest, Hashes, Payload, Record, Seq};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::failpoint;
use crate::ingest::{RecordExt, lock};
use crate::master_target::Replica;

/// Most bytes of extent applied between two flushes of a replica, and in one turn.
const APPLY_BATCH_BYTES: u64 = 64 << 20;
/// Bytes read from a replica per plugin call when hashing.
const HASH_READ: u64 = 4 << 20;
/// How long a replica whose plugin or state failed waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// Most applier threads: replicas are spread over them.
pub(crate) const MAX_APPLIERS: usize = 4;

/// What an applier is asked to do.
pub(crate) enum Job {
    /// Serve this replica from now on.
    Add(Arc<Replica>),
    /// The replica's journal or apply target changed.
    Changed(StreamKey),
    /// Hash a range of the replica once everything journaled is applied.
    Hash(
        StreamKey,
        HashRequest,
        oneshot::Sender<Result<Hashes, String>>,
    ),
}

/// The appliers of a master target.
pub(crate) struct Appliers {
    senders: Vec<std_mpsc::Sender<Job>>,
    /// Replicas given to each applier so far (new ones go to the one with fewest).
    load: std::sync::Mutex<Vec<usize>>,
    /// The writer plugin's traps in every applier.
    pub(crate) traps: Arc<Traps>,
}

/// Traps of the writer plugin (a timeout, out of memory, a crash) since the gateway started:
/// each replaced the instance; the replica it hit was retried after a pause.
#[derive(Debug, Default)]
pub(crate) struct Traps {
    pub(crate) count: std::sync::atomic::AtomicU64,
    /// The latest: which replica, and the plugin's error.
    pub(crate) last: std::sync::Mutex<Option<String>>,
}

impl Appliers {
    /// Starts `count` (at least 1) applier threads; `keep_points` when the retention window is
    /// above 0.
    pub(crate) fn start(
        count: usize,
        keep_points: bool,
        host: Arc<Host>,
        spec: PluginSpec,
        create_options: Vec<(String, String)>,
        state: Arc<StateDb>,
    ) -> Result<Appliers> {
        let mut senders = Vec::new();
        let traps = Arc::new(Traps::default());
        for i in 0..count.max(1) {
            let (tx, rx) = std_mpsc::channel();
            let applier = Applier {
                traps: traps.clone(),
                keep_points,
                host: host.clone(),
                spec: spec.clone(),
                create_options: create_options.clone(),
                state: state.clone(),
                jobs: rx,
                plugin: None,
                slots: HashMap::new(),
                ready: VecDeque::new(),
                queued: HashSet::new(),
            };
            std::thread::Builder::new()
                .name(format!("apply-{i}"))
                .spawn(move || applier.run())
                .context("starting an applier thread")?;
            senders.push(tx);
        }
        Ok(Appliers {
            load: std::sync::Mutex::new(vec![0; senders.len()]),
            senders,
            traps,
        })
    }

    /// The jobs of the applier with the fewest replicas, counted as taking one more: a new
    /// replica sends [`Job::Add`] there, then its wakes and hash requests.
    pub(crate) fn sender(&self) -> std_mpsc::Sender<Job> {
        let mut load = lock(&self.load);
        let i = (0..load.len()).min_by_key(|&i| load[i]).unwrap_or(0);
        load[i] += 1;
        self.senders[i].clone()
    }
}

/// A replica as its applier holds it.
struct Slot {
    replica: Arc<Replica>,
    /// Its handle in the applier's plugin instance, once opened.
    disk: Option<Disk>,
    /// The handle is read-only: a seed waiting for its first point is never written, not even
    /// by a format that marks itself open.
    read_only: bool,
    /// Hash requests waiting for the journal to be fully applied.
    deferred: VecDeque<(HashRequest, oneshot::Sender<Result<Hashes, String>>)>,
    /// Paused after a failure until then.
    retry_at: Option<Instant>,
    /// Stopped for good: its journal is damaged or was tampered with.
    refused: bool,
}

/// One applier thread: its plugin instance and the replicas it serves.
struct Applier {
    traps: Arc<Traps>,
    /// Points are kept (retention window above 0): the base stops at the oldest.
    keep_points: bool,
    host: Arc<Host>,
    spec: PluginSpec,
    /// Options a new replica is created with (`[master_target] writer_options`).
    create_options: Vec<(String, String)>,
    state: Arc<StateDb>,
    jobs: std_mpsc::Receiver<Job>,
    plugin: Option<WriterPlugin>,
    slots: HashMap<StreamKey, Slot>,
    /// Replicas that may have work, in turn order.
    ready: VecDeque<StreamKey>,
    queued: HashSet<StreamKey>,
}

/// Why applying stopped.
enum Stop {
    /// A record failed authentication or the journal is damaged: never retried.
    Refused(String),
    /// The plugin or the state failed: retried after a pause.
    Failed(String),
}

/// What a turn of a replica ended with.
enum Turn {
    /// It applied a batch: it may have more.
    More,
    /// Nothing to do until it is woken (or its pause ends).
    Idle,
}

impl Applier {
    fn run(mut self) {
        loop {
            // Jobs first, without waiting while replicas have work.
            let job = if self.ready.is_empty() {
                match self.next_retry() {
                    Some(at) => match self
                        .jobs
                        .recv_timeout(at.saturating_duration_since(Instant::now()))
                    {
                        Ok(job) => Some(job),
                        Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                        Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                    },
                    None => match self.jobs.recv() {
                        Ok(job) => Some(job),
                        Err(_) => return,
                    },
                }
            } else {
                self.jobs.try_recv().ok()
            };
            if let Some(job) = job {
                self.take(job);
                while let Ok(job) = self.jobs.try_recv() {
                    self.take(job);
                }
            }
            self.requeue_paused();
            if let Some(key) = self.ready.pop_front() {
                self.queued.remove(&key);
                if let Turn::More = self.turn(key) {
                    self.enqueue(key);
                }
            }
        }
    }

    fn take(&mut self, job: Job) {
        match job {
            Job::Add(replica) => {
                let key = replica.stream.key;
                // A wake sent before it was added found no slot; the first turn covers it.
                replica.change_queued.store(false, Ordering::Release);
                self.slots.insert(
                    key,
                    Slot {
                        replica,
                        disk: None,
                        read_only: false,
                        deferred: VecDeque::new(),
                        retry_at: None,
                        refused: false,
                    },
                );
                self.enqueue(key);
            }
            Job::Changed(key) => {
                if let Some(slot) = self.slots.get(&key) {
                    slot.replica.change_queued.store(false, Ordering::Release);
                    self.enqueue(key);
                }
            }
            Job::Hash(key, req, tx) => match self.slots.get_mut(&key) {
                Some(slot) => {
                    slot.deferred.push_back((req, tx));
                    self.enqueue(key);
                }
                None => {
                    let _ = tx.send(Err(format!("no replica for disk {key}")));
                }
            },
        }
    }

    fn enqueue(&mut self, key: StreamKey) {
        if self.queued.insert(key) {
            self.ready.push_back(key);
        }
    }

    /// The end of the earliest pause, if any replica is paused.
    fn next_retry(&self) -> Option<Instant> {
        self.slots.values().filter_map(|s| s.retry_at).min()
    }

    /// Queues the replicas whose pause has ended.
    fn requeue_paused(&mut self) {
        let now = Instant::now();
        let due: Vec<StreamKey> = self
            .slots
            .iter()
            .filter(|(_, s)| s.retry_at.is_some_and(|at| at <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            if let Some(slot) = self.slots.get_mut(&key) {
                slot.retry_at = None;
            }
            self.enqueue(key);
        }
    }

    /// One turn of replica `key`: at most one batch applied, or its waiting hash requests
    /// answered once it is caught up.
    fn turn(&mut self, key: StreamKey) -> Turn {
        let Some(mut slot) = self.slots.remove(&key) else {
            return Turn::Idle;
        };
        let turn = self.turn_of(&mut slot);
        self.slots.insert(key, slot);
        turn
    }

    fn turn_of(&mut self, slot: &mut Slot) -> Turn {
        if slot.refused {
            while let Some((_, tx)) = slot.deferred.pop_front() {
                let _ = tx.send(Err(
                    "the replica's journal is damaged; see the gateway's status".into(),
                ));
            }
            return Turn::Idle;
        }
        if slot.retry_at.is_some() {
            return Turn::Idle;
        }
        let restarts = self.plugin.as_ref().map(WriterPlugin::restarts);
        let outcome = self.apply_turn(slot);
        // A trap replaced the instance: every other replica's handle is stale. (A first
        // load is no trap: there was no instance before.)
        let after = self.plugin.as_ref().map(WriterPlugin::restarts);
        if after != restarts {
            for other in self.slots.values_mut() {
                other.disk = None;
            }
        }
        if let Some(after) = after
            && after != restarts.unwrap_or(0)
        {
            self.traps.count.fetch_add(1, Ordering::Relaxed);
            let why = match &outcome {
                Err(Stop::Failed(m) | Stop::Refused(m)) => m.clone(),
                Ok(_) => "the plugin trapped".to_string(),
            };
            *lock(&self.traps.last) = Some(format!(
                "writer plugin `{}` trapped on replica {}: {why}",
                self.spec.name, slot.replica.path
            ));
        }
        match outcome {
            Ok(turn) => turn,
            Err(stop) => {
                let key = slot.replica.stream.key;
                if let (Some(plugin), Some(disk)) = (self.plugin.as_mut(), slot.disk.take()) {
                    let _ = plugin.close(disk);
                }
                match stop {
                    Stop::Refused(msg) => {
                        tracing::error!(replica = %key, error = %msg, "applying stopped");
                        slot.replica.stream.set_error(Some(msg));
                        slot.refused = true;
                        // Answers the waiting hash requests.
                        self.turn_of(slot)
                    }
                    Stop::Failed(msg) => {
                        tracing::warn!(replica = %key, error = %msg,
                            "applying failed; retrying in {}s", RETRY_AFTER.as_secs());
                        slot.replica.stream.set_error(Some(msg));
                        slot.retry_at = Some(Instant::now() + RETRY_AFTER);
                        Turn::Idle
                    }
                }
            }
        }
    }

    /// Opens what is missing, then applies one batch or answers the hash requests.
    fn apply_turn(&mut self, slot: &mut Slot) -> Result<Turn, Stop> {
        let replica = slot.replica.clone();
        let waiting = *lock(&replica.recovery.seed) == crate::recovery::SeedHold::Waiting;
        if slot.read_only && !waiting {
            // The seed may be written from now on: opened again for writing.
            if let (Some(plugin), Some(disk)) = (self.plugin.as_mut(), slot.disk.take()) {
                let _ = plugin.close(disk);
            }
        }
        if slot.disk.is_none() {
            let disk = self.open(&replica, waiting).map_err(|e| {
                Stop::Failed(format!("cannot open replica {}: {e:#}", replica.path))
            })?;
            slot.disk = Some(disk);
            slot.read_only = waiting;
            replica.created.store(true, Ordering::Release);
            replica.stream.set_error(None);
        }
        let (Some(plugin), Some(disk)) = (self.plugin.as_mut(), slot.disk.as_ref()) else {
            return Err(Stop::Failed("the writer plugin is not loaded".into()));
        };
        let durable = replica.stream.durable();
        let applied = replica.applied.load(Ordering::Acquire);
        let target = replica.recovery.apply_target(durable, self.keep_points);
        if target > applied && !failpoint::paused("apply") {
            let ctx = Apply {
                keep_points: self.keep_points,
                state: &self.state,
                replica: &replica,
            };
            ctx.apply(plugin, disk, applied, target)?;
            return Ok(Turn::More);
        }
        // Caught up: answer the hash requests that waited for it.
        while let Some((req, tx)) = slot.deferred.pop_front() {
            let ctx = Hasher {
                host: &self.host,
                spec: &self.spec,
                replica: &replica,
            };
            let answer = ctx.hash(plugin, disk, req);
            if answer.is_ok() {
                crate::recovery::seed_compared(&self.state, &replica, req.offset + req.len);
            }
            let _ = tx.send(answer);
        }
        Ok(Turn::Idle)
    }

    /// Loads the writer when it is not, and opens the replica in it, creating it (sparse, all
    /// zero) when new; a seed read-only when `read_only` (it waits for its first point).
    fn open(&mut self, replica: &Replica, read_only: bool) -> Result<Disk> {
        let plugin = match &mut self.plugin {
            Some(p) => p,
            slot => slot.insert(self.host.load_writer(&self.spec)?),
        };
        let path = &replica.path;
        let root = self.spec.grants.storage_root.as_ref();
        let Some(root) = root else {
            // A writer that keeps disks elsewhere (page blobs): it tells whether the disk is
            // there by opening it.
            let access = match (replica.seeded, read_only) {
                (true, true) => Access::ReadOnly,
                _ => Access::ReadWrite,
            };
            return match plugin.open(path, access, &[]) {
                Ok(disk) if replica.seeded => seed_sized(plugin, disk, replica),
                Ok(disk) => Ok(disk),
                Err(e)
                    if e.plugin_error()
                        .is_some_and(|e| e.kind == haven_image::ErrorKind::NotFound) =>
                {
                    anyhow::ensure!(
                        !replica.seeded,
                        "the seed {path} is gone from the writer's store; the reprotect must \
                         start again"
                    );
                    Ok(plugin.create(path, replica.stream.info.size, 512, &self.create_options)?)
                }
                Err(e) => Err(e.into()),
            };
        };
        let exists = root.join(path).exists();
        let disk = if replica.seeded {
            // A seed is the disk that was here: never made anew, and as large as the source.
            anyhow::ensure!(
                exists,
                "the seed {} is gone from {}; the reprotect must start again",
                path,
                root.display()
            );
            let access = match read_only {
                true => Access::ReadOnly,
                false => Access::ReadWrite,
            };
            let disk = plugin.open(path, access, &[])?;
            seed_sized(plugin, disk, replica)?
        } else if exists {
            plugin.open(path, Access::ReadWrite, &[])?
        } else {
            if let Some(parent) = root.join(path).parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            plugin.create(path, replica.stream.info.size, 512, &self.create_options)?
        };
        Ok(disk)
    }
}

/// `disk`, a seed, when it is as large as the source announces.
fn seed_sized(plugin: &mut WriterPlugin, disk: Disk, replica: &Replica) -> Result<Disk> {
    let size = plugin.info(&disk)?.size;
    let want = replica.stream.info.size;
    if size != want {
        let _ = plugin.close(disk);
        anyhow::bail!(
            "the seed {} holds {size} bytes but the source announces {want}: a reprotect needs \
             the disk the machine failed over from",
            replica.path
        );
    }
    Ok(disk)
}

/// Applying one replica's records (borrowed from its applier for one turn).
struct Apply<'a> {
    keep_points: bool,
    state: &'a StateDb,
    replica: &'a Replica,
}

impl Apply<'_> {
    /// Applies records `applied+1 ..= durable`, at most [`APPLY_BATCH_BYTES`] of them (one
    /// turn), flushed and recorded.
    fn apply(
        &self,
        plugin: &mut WriterPlugin,
        disk: &Disk,
        applied: Seq,
        durable: Seq,
    ) -> Result<(), Stop> {
        let stream = &self.replica.stream;
        let mut reader = None;
        let mut batch_bytes = 0;
        let mut last = applied;
        while last < durable {
            // Fresh records come from memory; older ones are read back and verified.
            let record = match stream.take_fresh(last + 1) {
                Some(r) => {
                    reader = None;
                    r
                }
                None => {
                    let r = reader.get_or_insert_with(|| stream.journal().read_from(last + 1));
                    let Some(record) = r.next() else { break };
                    record.map_err(|e| match e {
                        e @ (StoreError::Tampered { .. } | StoreError::Damaged { .. }) => {
                            Stop::Refused(format!("replica {}: {e}", self.replica.path))
                        }
                        e => Stop::Failed(format!("replica {}: {e}", self.replica.path)),
                    })?
                }
            };
            if record.seq() > durable {
                break;
            }
            if let Record::Write(w) = &record {
                let failed = |e: &dyn std::fmt::Display| {
                    Stop::Failed(format!(
                        "replica {}: applying record {} at {}: {e}",
                        self.replica.path, w.seq, w.offset
                    ))
                };
                match &w.data {
                    Payload::Data(_) | Payload::Compressed { .. } => {
                        let bytes = decompress(&w.data).map_err(|e| {
                            Stop::Refused(format!(
                                "replica {}: record {}: {e}",
                                self.replica.path, w.seq
                            ))
                        })?;
                        // Without a copy when the bytes are not shared (they were just read).
                        let mut buf = Vec::from(bytes);
                        plugin
                            .write(disk, w.offset, &mut buf)
                            .map_err(|e| failed(&e))?;
                    }
                    Payload::Zero { len } => plugin
                        .write_zeroes(disk, w.offset, *len, false)
                        .map_err(|e| failed(&e))?,
                    Payload::Trim { len } => plugin
                        .write_zeroes(disk, w.offset, *len, true)
                        .map_err(|e| failed(&e))?,
                }
            }
            batch_bytes += record.wire_extent();
            last = record.seq();
            // A new point (its tag durable before `on_durable` listed it): the base may stop
            // here, and the target is computed again with it.
            if let Record::Tag(t) = &record
                && self.keep_points
                && crate::recovery::register_tag(self.state, self.replica, t)
            {
                break;
            }
            if batch_bytes >= APPLY_BATCH_BYTES {
                break;
            }
        }
        if last > self.replica.applied.load(Ordering::Acquire) {
            self.commit(plugin, disk, last, batch_bytes)?;
        }
        Ok(())
    }

    /// Flushes the replica, records `seq` as applied, then frees the journal up to it.
    fn commit(
        &self,
        plugin: &mut WriterPlugin,
        disk: &Disk,
        seq: Seq,
        bytes: u64,
    ) -> Result<(), Stop> {
        let stream = &self.replica.stream;
        let fail = |e: &dyn std::fmt::Display| {
            Stop::Failed(format!(
                "replica {}: committing seq {seq}: {e}",
                self.replica.path
            ))
        };
        failpoint::hit("apply.after-write");
        plugin.flush(disk).map_err(|e| fail(&e))?;
        // What a test failover or failover reads stays in the journal; the hold is locked from
        // here until the journal is freed (see `hold_base`).
        let hold = lock(&self.replica.recovery.hold);
        let release = hold.map_or(seq, |h| seq.min(h));
        // A seed that reaches its first point is an ordinary replica from this commit on.
        let seed_done = crate::recovery::seed_reached(self.replica, seq);
        self.state
            .update_stream(stream.key, move |r| {
                r.applied_seq = seq;
                if seed_done {
                    r.seeding = false;
                }
            })
            .map_err(|e| fail(&e))?
            .ok_or_else(|| fail(&"stream record missing"))?;
        self.replica.applied.store(seq, Ordering::Release);
        if seed_done {
            *lock(&self.replica.recovery.seed) = crate::recovery::SeedHold::Off;
            tracing::info!(replica = %stream.key, path = %self.replica.path,
                "the seeded replica reached its first point");
        }
        failpoint::hit("apply.after-commit");
        stream.journal().release(release).map_err(|e| fail(&e))?;
        drop(hold);
        self.replica.note_applied(seq, bytes);
        stream.freed.notify_one();
        Ok(())
    }
}

/// Hashing a range of one replica (borrowed from its applier for one turn).
struct Hasher<'a> {
    host: &'a Host,
    spec: &'a PluginSpec,
    replica: &'a Replica,
}

impl Hasher<'_> {
    /// SHA-256 of each block of the requested range of the replica.
    fn hash(
        &self,
        plugin: &mut WriterPlugin,
        disk: &Disk,
        req: HashRequest,
    ) -> Result<Hashes, String> {
        let size = self.replica.stream.info.size;
        let end = req
            .offset
            .checked_add(req.len)
            .filter(|e| *e <= size)
            .ok_or_else(|| {
                format!(
                    "hash request {}+{} lies past the end of the {size}-byte replica",
                    req.offset, req.len
                )
            })?;
        let block = u64::from(req.block_size);
        let chunk = HASH_READ.max(block) / block * block;
        let mut hashes = Vec::new();
        let mut pos = req.offset;
        let mut buf = Vec::new();
        // With points kept, the base stops at the oldest one: the digests describe the base
        // with every durable record laid over it, as a view at the durable seq.
        let durable = self.replica.stream.durable();
        let applied = self.replica.applied.load(Ordering::Acquire);
        // Only records that touch the range make the view differ from the base there; without
        // any (a seeded replica's comparison meets few), the base is read as it is.
        let touched = durable > applied
            && self
                .replica
                .stream
                .journal()
                .entries_from(applied + 1)
                .iter()
                .any(|e| {
                    e.seq <= durable
                        && e.len > 0
                        && e.offset < end
                        && e.offset.saturating_add(e.len) > req.offset
                });
        let view = if touched {
            let mut base = self
                .host
                .load_writer(self.spec)
                .map_err(|e| format!("loading the writer to read the replica: {e}"))?;
            let d = base
                .open(&self.replica.path, Access::ReadOnly, &[])
                .map_err(|e| format!("opening the replica: {e}"))?;
            Some(
                crate::overlay::View::build(
                    self.replica.stream.clone(),
                    crate::overlay::Base::new(base, d),
                    applied,
                    durable,
                    crate::overlay::Scratch::None,
                )
                .map_err(|e| format!("building a view of the replica: {e:#}"))?,
            )
        } else {
            None
        };
        while pos < end {
            let n = chunk.min(end - pos);
            buf.resize(n as usize, 0);
            match &view {
                Some(v) => v
                    .read(pos, &mut buf)
                    .map_err(|e| format!("reading the replica's view at {pos}: {e:#}"))?,
                None => plugin
                    .read(disk, pos, &mut buf)
                    .map_err(|e| format!("reading the replica at {pos}: {e}"))?,
            }
            hashes.extend(buf.chunks(block as usize).map(|b| {
                let d: [u8; 32] = Sha256::digest(b).into();
                d
            }));
            pos += n;
        }
        if let Some(v) = view {
            let _ = v.discard();
        }
        Ok(Hashes {
            disk: req.disk,
            offset: req.offset,
            block_size: req.block_size,
            hashes,
        })
    }
}
