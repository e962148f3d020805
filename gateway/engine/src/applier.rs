//! The applier: one thread per replica that applies its journal through its own instance of
//! the target writer plugin (module docs of [`crate::master_target`]).
//!
//! It applies journaled records strictly in sequence order, up to the oldest recovery point
//! kept and never above a hold ([`ReplicaRecovery::apply_target`]), flushes the replica,
//! records the applied seq in redb and only then releases the journal up to it: after a crash
//! anywhere, the journal still holds every record after the recorded applied seq, and
//! re-applying a record the replica already has is harmless (writes are idempotent in order).
//! A record that fails its authentication is never applied. Resync hashes are computed
//! between batches, once everything journaled is applied.
//!
//! [`ReplicaRecovery::apply_target`]: crate::recovery::ReplicaRecovery::apply_target

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use haven_host::{Access, Disk, Host, PluginSpec, WriterPlugin};
use haven_store::state::StateDb;
use haven_store::{StoreError, decompress};
use haven_wire::{HashRequest, Hashes, Payload, Record, Seq};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::failpoint;
use crate::ingest::{RecordExt, lock};
use crate::master_target::{Replica, Wake};

/// Most bytes of extent applied between two flushes of a replica.
const APPLY_BATCH_BYTES: u64 = 64 << 20;
/// Bytes read from a replica per plugin call when hashing.
const HASH_READ: u64 = 4 << 20;

/// The thread that applies one replica's journal.
pub(crate) struct Applier {
    /// Points are kept (retention window above 0): the base stops at the oldest.
    keep_points: bool,
    replica: Arc<Replica>,
    host: Arc<Host>,
    spec: PluginSpec,
    state: Arc<StateDb>,
    wake: std_mpsc::Receiver<Wake>,
    /// Hash requests waiting for the journal to be fully applied.
    deferred: VecDeque<(HashRequest, oneshot::Sender<Result<Hashes, String>>)>,
}

/// Why applying stopped.
enum Stop {
    /// A record failed authentication or the journal is damaged: never retried.
    Refused(String),
    /// The plugin or the state failed: retried after a pause.
    Failed(String),
}

impl Applier {
    /// Starts the applier thread of `replica`, woken through `wake`; `keep_points` when the
    /// retention window is above 0.
    pub(crate) fn spawn(
        keep_points: bool,
        replica: Arc<Replica>,
        host: Arc<Host>,
        spec: PluginSpec,
        state: Arc<StateDb>,
        wake: std_mpsc::Receiver<Wake>,
    ) -> Result<()> {
        let key = replica.stream.key;
        let applier = Applier {
            keep_points,
            replica,
            host,
            spec,
            state,
            wake,
            deferred: VecDeque::new(),
        };
        std::thread::Builder::new()
            .name(format!("apply-{key}"))
            .spawn(move || applier.run())
            .context("starting an applier thread")?;
        Ok(())
    }

    fn run(mut self) {
        let key = self.replica.stream.key;
        loop {
            match self.open() {
                Ok((plugin, disk)) => match self.serve(plugin, disk) {
                    Stop::Refused(msg) => {
                        tracing::error!(replica = %key, error = %msg, "applying stopped");
                        self.replica.stream.set_error(Some(msg));
                        // Nothing more is applied; hash requests are refused.
                        while let Ok(w) = self.wake.recv() {
                            if let Wake::Hash(_, tx) = w {
                                let _ = tx.send(Err(
                                    "the replica's journal is damaged; see the gateway's status"
                                        .into(),
                                ));
                            }
                        }
                        return;
                    }
                    Stop::Failed(msg) => {
                        tracing::warn!(replica = %key, error = %msg, "applying failed; retrying in 5 s");
                        self.replica.stream.set_error(Some(msg));
                    }
                },
                Err(e) => {
                    let msg = format!("replica {}: {e:#}", self.replica.path);
                    tracing::warn!(replica = %key, error = %msg, "cannot open the replica; retrying in 5 s");
                    self.replica.stream.set_error(Some(msg));
                }
            }
            std::thread::sleep(Duration::from_secs(5));
        }
    }

    /// Loads the writer and opens the replica, creating it (sparse, all zero) when new.
    fn open(&self) -> Result<(WriterPlugin, Disk)> {
        let mut plugin = self.host.load_writer(&self.spec)?;
        let path = &self.replica.path;
        let root = self
            .spec
            .grants
            .storage_root
            .as_ref()
            .context("the writer plugin has no storage root")?;
        let exists = root.join(path).exists();
        let disk = if exists {
            plugin.open(path, Access::ReadWrite, &[])?
        } else {
            if let Some(parent) = root.join(path).parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            plugin.create(path, self.replica.stream.info.size, 512, &[])?
        };
        Ok((plugin, disk))
    }

    fn serve(&mut self, mut plugin: WriterPlugin, disk: Disk) -> Stop {
        self.replica.stream.set_error(None);
        loop {
            let durable = self.replica.stream.durable();
            let applied = self.replica.applied.load(Ordering::Acquire);
            let target = self
                .replica
                .recovery
                .apply_target(durable, self.keep_points);
            if target > applied && !failpoint::paused("apply") {
                if let Err(stop) = self.apply(&mut plugin, &disk, applied, target) {
                    let _ = plugin.close(disk);
                    return stop;
                }
                continue;
            }
            // Caught up: answer the hash requests that waited for it.
            while let Some((req, tx)) = self.deferred.pop_front() {
                let _ = tx.send(self.hash(&mut plugin, &disk, req));
            }
            match self.wake.recv() {
                Ok(Wake::Changed) => self.replica.change_queued.store(false, Ordering::Release),
                Ok(Wake::Hash(req, tx)) => self.deferred.push_back((req, tx)),
                Err(_) => return Stop::Failed("the master target stopped".into()),
            }
            while let Ok(w) = self.wake.try_recv() {
                match w {
                    Wake::Hash(req, tx) => self.deferred.push_back((req, tx)),
                    Wake::Changed => self.replica.change_queued.store(false, Ordering::Release),
                }
            }
        }
    }

    /// Applies records `applied+1 ..= durable` in batches, each flushed and recorded.
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
                && crate::recovery::register_tag(&self.state, &self.replica, t)
            {
                break;
            }
            if batch_bytes >= APPLY_BATCH_BYTES {
                self.commit(plugin, disk, last, batch_bytes)?;
                batch_bytes = 0;
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
        let mut record = self
            .state
            .get_stream(stream.key)
            .map_err(|e| fail(&e))?
            .ok_or_else(|| fail(&"stream record missing"))?;
        record.applied_seq = seq;
        // What a test failover or failover reads stays in the journal; the hold is locked from
        // here until the journal is freed (see `hold_base`).
        let hold = lock(&self.replica.recovery.hold);
        let release = hold.map_or(seq, |h| seq.min(h));
        self.state
            .put_stream(stream.key, &record)
            .map_err(|e| fail(&e))?;
        self.replica.applied.store(seq, Ordering::Release);
        failpoint::hit("apply.after-commit");
        stream.journal().release(release).map_err(|e| fail(&e))?;
        drop(hold);
        self.replica.note_applied(seq, bytes);
        stream.freed.notify_one();
        Ok(())
    }

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
        let view = if durable > applied {
            let mut base = self
                .host
                .load_writer(&self.spec)
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
