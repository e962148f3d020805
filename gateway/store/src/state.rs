//! Small durable state in one redb file: streams and small JSON values. (The journal's index
//! lives in the journal itself, rebuilt from its segments at open: one index, one owner.)
//!
//! Every write is durable when its call returns: redb's default (immediate) durability; redb
//! checksums its pages and makes a commit atomic, so this file needs no magic of its own
//! beyond the schema version below.
//!
//! Writes are committed in groups: a write that arrives while another thread commits waits,
//! and the next committer takes every write waiting into one transaction and one commit (its
//! fsyncs). A thousand replicas each recording a point a second cost a few commits a second,
//! not a thousand. Each write is checked (encoded, its record read) before it changes
//! anything, so a write that fails leaves the others of its group intact.
//!
//! # Tables (schema version [`SCHEMA_VERSION`])
//!
//! | table           | key                                              | value |
//! |-----------------|--------------------------------------------------|-------|
//! | `schema`        | `"version"`                                      | `u32` schema version |
//! | `streams`       | peer id (16) + disk id (4, big-endian)           | [`StreamRecord`] as JSON |
//! | `meta`          | a string                                         | any JSON value |
//!

use std::fmt;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::util::hex;

/// Schema version written and understood.
pub const SCHEMA_VERSION: u32 = 1;

const SCHEMA: TableDefinition<'_, &str, u32> = TableDefinition::new("schema");
const STREAMS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("streams");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

/// One replication stream: a peer's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamKey {
    /// The peer's id (its enrolment id).
    pub peer: [u8; 16],
    /// The disk's id.
    pub disk: u32,
}

impl fmt::Display for StreamKey {
    /// `<32 hex digits of the peer>/<disk>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", hex(&self.peer), self.disk)
    }
}

impl StreamKey {
    fn bytes(&self) -> [u8; 20] {
        let mut k = [0u8; 20];
        k[0..16].copy_from_slice(&self.peer);
        k[16..20].copy_from_slice(&self.disk.to_be_bytes());
        k
    }

    fn from_bytes(b: &[u8]) -> Option<StreamKey> {
        if b.len() != 20 {
            return None;
        }
        let mut peer = [0u8; 16];
        peer.copy_from_slice(&b[0..16]);
        let mut disk = [0u8; 4];
        disk.copy_from_slice(&b[16..20]);
        Some(StreamKey {
            peer,
            disk: u32::from_be_bytes(disk),
        })
    }
}

/// What the gateway keeps about a stream. Stored as JSON; every field but `size` has a default
/// so that fields can be added.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRecord {
    /// Size of the disk in bytes.
    pub size: u64,
    /// Logical block size of the disk in bytes.
    #[serde(default)]
    pub block_size: u32,
    /// Name of the protected machine.
    #[serde(default)]
    pub machine_name: String,
    /// Every record up to this one is applied to the replica (master target).
    #[serde(default)]
    pub applied_seq: u64,
    /// Records up to this one were released from the journal.
    #[serde(default)]
    pub released_seq: u64,
    /// When the stream was first seen, milliseconds since the Unix epoch.
    #[serde(default)]
    pub created_ms: u64,
    /// The stream's last error, if it is stopped by one.
    #[serde(default)]
    pub error: Option<String>,
    /// A replica that existed before the stream (a reprotect's seed: the old source disk, or
    /// a failover image): its path below the writer's storage root. None: the master target's
    /// own `<agent>/disk<N>.raw`, created with the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_path: Option<String>,
    /// Seeded, and the first point after the source's comparison is not applied yet: nothing
    /// is written to the replica until then, so it stays the disk it was.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seeding: bool,
    /// Seeding: the end of the furthest range whose digests the agent's comparison asked. A
    /// point ends the seeding only once the whole disk was compared.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seed_compared: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The state database. See the module documentation for the tables.
pub struct StateDb {
    path: PathBuf,
    db: Database,
    group: Group,
}

/// One write of a group: it runs inside the group's transaction.
type Op = Box<dyn FnOnce(&StateDb, &redb::WriteTransaction) -> Result<()> + Send>;

/// The writes waiting for a commit, and whether a thread is committing.
#[derive(Default)]
struct Group {
    state: std::sync::Mutex<GroupState>,
    done: std::sync::Condvar,
}

impl Group {
    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct GroupState {
    waiting: Vec<(u64, Op)>,
    committing: bool,
    next: u64,
    results: std::collections::HashMap<u64, Result<()>>,
}

impl fmt::Debug for StateDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateDb")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl StateDb {
    /// Opens (or creates) the database at `path`. [`StoreError::Locked`] when another process
    /// has it open; [`StoreError::Db`] when it is damaged or of another schema version.
    pub fn open(path: &Path) -> Result<StateDb> {
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::Locked {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => return Err(db_err(path, "opening")(e)),
        };
        let this = StateDb {
            path: path.to_path_buf(),
            db,
            group: Group::default(),
        };
        let txn = this
            .db
            .begin_write()
            .map_err(this.err("starting a transaction"))?;
        {
            let mut schema = txn
                .open_table(SCHEMA)
                .map_err(this.err("opening table schema"))?;
            let found = schema
                .get("version")
                .map_err(this.err("reading the schema version"))?
                .map(|v| v.value());
            match found {
                None => {
                    schema
                        .insert("version", SCHEMA_VERSION)
                        .map_err(this.err("writing the schema version"))?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(v) => {
                    return Err(StoreError::Db(format!(
                        "{}: schema version {v} is not supported (this build reads \
                         {SCHEMA_VERSION}); use the matching haven-gateway version",
                        path.display()
                    )));
                }
            }
            txn.open_table(STREAMS)
                .map_err(this.err("creating table streams"))?;
            txn.open_table(META)
                .map_err(this.err("creating table meta"))?;
        }
        txn.commit().map_err(this.err("committing"))?;
        Ok(this)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err<'a, E: Into<redb::Error>>(
        &'a self,
        what: &'static str,
    ) -> impl FnOnce(E) -> StoreError + 'a {
        db_err(&self.path, what)
    }

    /// Runs `op` in a write transaction and commits it, with whatever other writes wait (see
    /// the module documentation); returns once `op`'s changes are durable.
    fn write(&self, op: Op) -> Result<()> {
        let mut st = self.group.lock();
        let id = st.next;
        st.next += 1;
        st.waiting.push((id, op));
        loop {
            if let Some(result) = st.results.remove(&id) {
                return result;
            }
            if st.committing {
                st = self.group.done.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // This thread commits the group, its own write among them.
            st.committing = true;
            let ops = std::mem::take(&mut st.waiting);
            drop(st);
            let results = self.commit_group(ops);
            st = self.group.lock();
            st.results.extend(results);
            st.committing = false;
            self.group.done.notify_all();
        }
    }

    /// One transaction for `ops`, one commit; each op's result.
    fn commit_group(&self, ops: Vec<(u64, Op)>) -> Vec<(u64, Result<()>)> {
        let txn = match self.db.begin_write() {
            Ok(txn) => txn,
            Err(e) => {
                let msg = self.err("starting a transaction")(e).to_string();
                return ops
                    .into_iter()
                    .map(|(id, _)| (id, Err(StoreError::Db(msg.clone()))))
                    .collect();
            }
        };
        let mut results: Vec<(u64, Result<()>)> = ops
            .into_iter()
            .map(|(id, op)| (id, op(self, &txn)))
            .collect();
        if let Err(e) = txn.commit() {
            let msg = self.err("committing")(e).to_string();
            for (_, r) in &mut results {
                if r.is_ok() {
                    *r = Err(StoreError::Db(msg.clone()));
                }
            }
        }
        results
    }

    /// `table` in a new read transaction (`what` names it in an error).
    fn read_table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        table: TableDefinition<'_, K, V>,
        what: &'static str,
    ) -> Result<redb::ReadOnlyTable<K, V>> {
        let txn = self
            .db
            .begin_read()
            .map_err(self.err("starting a transaction"))?;
        txn.open_table(table).map_err(self.err(what))
    }

    /// Stores (replaces) a stream's record.
    pub fn put_stream(&self, key: StreamKey, value: &StreamRecord) -> Result<()> {
        let json = encode_stream(key, value)?;
        self.write(Box::new(move |db, txn| db.put_stream_in(txn, key, &json)))
    }

    fn put_stream_in(
        &self,
        txn: &redb::WriteTransaction,
        key: StreamKey,
        json: &[u8],
    ) -> Result<()> {
        let mut t = txn
            .open_table(STREAMS)
            .map_err(self.err("opening table streams"))?;
        t.insert(key.bytes().as_slice(), json)
            .map_err(self.err("writing a stream"))?;
        Ok(())
    }

    /// Changes a stream's stored record with `change`, read and written in one transaction
    /// (so two writers of different fields, e.g. the applied seq and the machine's name, never
    /// lose each other's change); the record as stored after, or `None` when there is none.
    pub fn update_stream(
        &self,
        key: StreamKey,
        change: impl FnOnce(&mut StreamRecord) + Send + 'static,
    ) -> Result<Option<StreamRecord>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.write(Box::new(move |db, txn| {
            let record = {
                let t = txn
                    .open_table(STREAMS)
                    .map_err(db.err("opening table streams"))?;
                t.get(key.bytes().as_slice())
                    .map_err(db.err("reading a stream"))?
                    .map(|v| db.decode_stream(key, v.value()))
                    .transpose()?
            };
            if let Some(mut record) = record {
                change(&mut record);
                let json = encode_stream(key, &record)?;
                db.put_stream_in(txn, key, &json)?;
                let _ = tx.send(record);
            }
            Ok(())
        }))?;
        Ok(rx.try_recv().ok())
    }

    /// A stream's record, if stored.
    pub fn get_stream(&self, key: StreamKey) -> Result<Option<StreamRecord>> {
        let t = self.read_table(STREAMS, "opening table streams")?;
        let Some(v) = t
            .get(key.bytes().as_slice())
            .map_err(self.err("reading a stream"))?
        else {
            return Ok(None);
        };
        self.decode_stream(key, v.value()).map(Some)
    }

    fn decode_stream(&self, key: StreamKey, json: &[u8]) -> Result<StreamRecord> {
        serde_json::from_slice(json).map_err(|e| {
            StoreError::Db(format!(
                "{}: stream {key}: record does not decode ({e}); remove the stream and add it \
                 again",
                self.path.display()
            ))
        })
    }

    /// Every stream, in key order.
    pub fn streams(&self) -> Result<Vec<(StreamKey, StreamRecord)>> {
        let t = self.read_table(STREAMS, "opening table streams")?;
        let mut out = Vec::new();
        for item in t.iter().map_err(self.err("listing streams"))? {
            let (k, v) = item.map_err(self.err("listing streams"))?;
            let key = StreamKey::from_bytes(k.value()).ok_or_else(|| {
                StoreError::Db(format!(
                    "{}: table streams holds a key of {} bytes (20 expected); the file is \
                     damaged, restore it from a backup",
                    self.path.display(),
                    k.value().len()
                ))
            })?;
            out.push((key, self.decode_stream(key, v.value())?));
        }
        Ok(out)
    }

    /// Removes a stream's record.
    pub fn remove_stream(&self, key: StreamKey) -> Result<()> {
        self.write(Box::new(move |db, txn| {
            let mut t = txn
                .open_table(STREAMS)
                .map_err(db.err("opening table streams"))?;
            t.remove(key.bytes().as_slice())
                .map_err(db.err("removing a stream"))?;
            Ok(())
        }))
    }

    /// Stores (replaces) a JSON value under `table_key` in the `meta` table.
    pub fn put_json<T: Serialize>(&self, table_key: &str, value: &T) -> Result<()> {
        self.update_json(&[(table_key.to_string(), value)], &[])
    }

    /// Stores the values of `puts` and removes the keys of `removes` in the `meta` table, in one
    /// transaction.
    pub fn update_json<T: Serialize>(
        &self,
        puts: &[(String, T)],
        removes: &[String],
    ) -> Result<()> {
        let encoded = puts
            .iter()
            .map(|(k, v)| {
                serde_json::to_vec(v)
                    .map(|json| (k.clone(), json))
                    .map_err(|e| StoreError::Invalid(format!("meta {k}: cannot encode: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let removes = removes.to_vec();
        self.write(Box::new(move |db, txn| {
            let mut t = txn.open_table(META).map_err(db.err("opening table meta"))?;
            for (k, json) in &encoded {
                t.insert(k.as_str(), json.as_slice())
                    .map_err(db.err("writing a meta value"))?;
            }
            for k in &removes {
                t.remove(k.as_str())
                    .map_err(db.err("removing a meta value"))?;
            }
            Ok(())
        }))
    }

    /// Every value in the `meta` table whose key starts with `prefix`, in key order.
    pub fn json_with_prefix<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(String, T)>> {
        let t = self.read_table(META, "opening table meta")?;
        let mut out = Vec::new();
        for row in t.range(prefix..).map_err(self.err("reading meta values"))? {
            let (k, v) = row.map_err(self.err("reading a meta value"))?;
            let k = k.value();
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_string(), self.decode_meta(k, v.value())?));
        }
        Ok(out)
    }

    /// Removes the value under `table_key` from the `meta` table (nothing if absent).
    pub fn remove_json(&self, table_key: &str) -> Result<()> {
        self.update_json::<()>(&[], &[table_key.to_string()])
    }

    /// The JSON value under `table_key` in the `meta` table, if any.
    pub fn get_json<T: DeserializeOwned>(&self, table_key: &str) -> Result<Option<T>> {
        let t = self.read_table(META, "opening table meta")?;
        let Some(v) = t.get(table_key).map_err(self.err("reading a meta value"))? else {
            return Ok(None);
        };
        self.decode_meta(table_key, v.value()).map(Some)
    }

    fn decode_meta<T: DeserializeOwned>(&self, table_key: &str, json: &[u8]) -> Result<T> {
        serde_json::from_slice(json).map_err(|e| {
            StoreError::Db(format!(
                "{}: meta value {table_key:?} does not decode as the type asked for ({e}); \
                 store it again",
                self.path.display()
            ))
        })
    }
}

fn encode_stream(key: StreamKey, value: &StreamRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(value)
        .map_err(|e| StoreError::Invalid(format!("stream {key}: cannot encode: {e}")))
}

fn db_err<'a, E: Into<redb::Error>>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(E) -> StoreError + 'a {
    move |e| {
        StoreError::Db(format!(
            "{}: {what}: {}; check the disk, and if the file is damaged restore it from a backup",
            path.display(),
            e.into()
        ))
    }
}
