//! The protected disks' shared state: per disk ([`Shared`]) the splitter, `disk.state`, the
//! progress and link facts the report shows; per machine ([`Machine`]) its disks, the data
//! folder and the report of them all. The shipper (`replicate.rs`), the initial pass, recovery
//! points (`points.rs`) and the reporter each hold them; none of them imports another.
//!
//! # Disks of a machine
//!
//! One agent protects every disk of its machine, with ids 1, 2, … in the order the command
//! line names them. Disk 1 keeps its state in the data folder itself (`DATA/disk.state`,
//! `DATA/log/`), disk N ≥ 2 in `DATA/disk<N>/`; the machine's files (identity, `status.json`,
//! `boot-id`, `clean-stop`, `failed-over`, `assignment.json`, `disks.json`) stay in `DATA/`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use haven_net::quinn;
use haven_net::stream::{DiskReport, DiskState, Report};
pub use haven_replication::shipper::seq_add;

use crate::splitter::Splitter;
use crate::state::{DiskRecord, Phase};

/// Most disks one agent protects (the stream's limit is higher; a machine with more disks
/// runs an agent per group of them).
pub const MAX_DISKS: usize = 64;

/// The folder holding disk `id`'s state and change log (see the module documentation).
pub fn disk_dir(data_dir: &Path, id: u32) -> PathBuf {
    if id == 1 {
        data_dir.to_path_buf()
    } else {
        data_dir.join(format!("disk{id}"))
    }
}

/// The file in the data folder that marks the disk failed over (planned failover): it is never
/// served again.
pub const FAILED_OVER: &str = "failed-over";

/// Why the disk was failed over, if the data folder says it was.
pub fn failed_over(data_dir: &Path) -> Option<String> {
    let path: PathBuf = data_dir.join(FAILED_OVER);
    let text = std::fs::read_to_string(&path).ok()?;
    Some(format!("{} ({})", text.trim(), path.display()))
}

/// State of one disk shared by its shipper, its initial pass, the reporter, points and the
/// main thread.
#[derive(Debug)]
pub struct Shared {
    /// The disk's id in the stream (1, 2, …).
    pub disk: u32,
    /// The protected disk.
    pub splitter: Arc<Splitter>,
    /// The disk's folder (its `disk.state`, log and resync ranges).
    dir: PathBuf,
    /// The machine's data folder.
    machine_dir: PathBuf,
    state_path: PathBuf,
    record: Mutex<DiskRecord>,
    pub(crate) log_max_bytes: u64,
    pub(crate) sync_done: AtomicU64,
    pub(crate) resync_sent: AtomicU64,
    pub(crate) resync_compared: AtomicU64,
    /// What the records shipped lately wrote (see `trail.rs`).
    pub(crate) trail: Mutex<crate::trail::Trail>,
    pub(crate) shipped_total: AtomicU64,
    pub(crate) acked_seq: AtomicU64,
    pub(crate) conn: Mutex<Option<quinn::Connection>>,
    pub(crate) stopping: AtomicBool,
    /// Why the disk is not protected, for the report.
    message: Mutex<Option<String>>,
    /// Why the agent is not connected to the process server (refusal, loss), until it is again.
    link: Mutex<Option<String>>,
    /// The disk was failed over at the secondary site (the gateway said so): replication is
    /// stopped for good.
    pub(crate) failed_over: Mutex<Option<String>>,
    /// When the change log reached which seq, for the report.
    marks: Mutex<haven_net::stream::WriteMarks>,
}

impl Shared {
    /// Shared state over opened disk `disk` (of the machine whose data folder is `data_dir`)
    /// and its (already stored) `disk.state`.
    pub fn new(
        disk: u32,
        splitter: Arc<Splitter>,
        data_dir: &Path,
        record: DiskRecord,
        log_max_bytes: u64,
    ) -> Shared {
        let dir = disk_dir(data_dir, disk);
        let sync_done = match record.state {
            Phase::InitialSync | Phase::Resyncing => record.sync_offset,
            Phase::Protected => record.size,
        };
        let log_first = splitter.log_stats().first_seq;
        let acked = seq_add(log_first, record.seq_base).saturating_sub(1);
        Shared {
            disk,
            splitter,
            state_path: dir.join("disk.state"),
            dir,
            machine_dir: data_dir.to_path_buf(),
            record: Mutex::new(record),
            log_max_bytes,
            sync_done: AtomicU64::new(sync_done),
            resync_sent: AtomicU64::new(0),
            resync_compared: AtomicU64::new(0),
            trail: Mutex::new(crate::trail::Trail::new(log_first)),
            shipped_total: AtomicU64::new(0),
            acked_seq: AtomicU64::new(acked),
            conn: Mutex::new(None),
            stopping: AtomicBool::new(false),
            message: Mutex::new(None),
            link: Mutex::new(None),
            failed_over: Mutex::new(None),
            marks: Mutex::new(Default::default()),
        }
    }

    pub(crate) fn set_link(&self, m: Option<String>) {
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = m;
    }

    pub(crate) fn set_message(&self, m: Option<String>) {
        *self.message.lock().unwrap_or_else(|e| e.into_inner()) = m;
    }

    /// The current `disk.state`.
    pub fn record(&self) -> DiskRecord {
        *self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes `disk.state` and writes it (with the log's durable seq refreshed). Never called
    /// with the splitter's lock held.
    pub fn update(&self, f: impl FnOnce(&mut DiskRecord)) -> anyhow::Result<DiskRecord> {
        let mut rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = *rec;
        f(&mut next);
        next.log_seq = self.splitter.log_stats().durable_seq;
        next.store(&self.state_path)?;
        *rec = next;
        Ok(next)
    }

    /// Asks the initial pass and the shipper to stop.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Whether the agent is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping()
    }

    /// The disk's folder (see the module documentation).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The machine's data folder.
    pub fn machine_dir(&self) -> &Path {
        &self.machine_dir
    }

    /// Whether the disk has a live connection to its process server.
    pub fn connected(&self) -> bool {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|c| c.close_reason().is_none())
    }

    /// The stream seq of change-log record `log_seq`.
    pub fn wire_seq(&self, log_seq: u64) -> u64 {
        seq_add(log_seq, self.record().seq_base)
    }

    /// Every record up to this stream seq is acknowledged durable downstream.
    pub fn acked_seq(&self) -> u64 {
        self.acked_seq.load(Ordering::Relaxed)
    }

    /// How much of the initial pass or resync is done, in whole percent.
    pub fn sync_percent(&self) -> u64 {
        let size = self.record().size.max(1);
        self.sync_done.load(Ordering::Relaxed).min(size) * 100 / size
    }

    /// The disk's part of the report of this moment.
    pub fn report(&self) -> DiskReport {
        let rec = self.record();
        let st = self.splitter.log_stats();
        let sync_done = match rec.state {
            Phase::Protected => rec.size,
            Phase::InitialSync | Phase::Resyncing => self.sync_done.load(Ordering::Relaxed),
        };
        let resync_sent = self.resync_sent.load(Ordering::Relaxed);
        // Failed over: told by the gateway, or (planned) marked in the data folder.
        let failed_over = self
            .failed_over
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .or_else(|| failed_over(&self.machine_dir));
        let (state, message) = match failed_over {
            Some(why) => (DiskState::FailedOver, Some(why)),
            None => (
                rec.state.report_state(),
                self.message
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .or_else(|| self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            ),
        };
        DiskReport {
            disk: self.disk,
            size: rec.size,
            state,
            sync_done_bytes: sync_done,
            resync_sent_bytes: resync_sent,
            resync_compared_bytes: self.resync_compared.load(Ordering::Relaxed),
            log_bytes: st.bytes_used,
            log_max_bytes: self.log_max_bytes,
            written_bytes_total: self.splitter.client_bytes(),
            shipped_bytes_total: self.shipped_total.load(Ordering::Relaxed),
            last_seq: seq_add(st.last_seq, rec.seq_base),
            acked_seq: self.acked_seq.load(Ordering::Relaxed),
            message,
            written: self.marks.lock().unwrap_or_else(|e| e.into_inner()).marks(),
        }
    }

    /// Notes the change log's last seq now (every [`WriteMarks::FINE_EVERY`]).
    ///
    /// [`WriteMarks::FINE_EVERY`]: haven_net::stream::WriteMarks::FINE_EVERY
    pub fn sample_writes(&self) {
        let last = seq_add(self.splitter.log_stats().last_seq, self.record().seq_base);
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sample(ms, last);
    }
}

/// The protected machine: its disks, in id order, and what the report names it by.
#[derive(Debug)]
pub struct Machine {
    /// Disk 1, 2, ….
    pub disks: Vec<Arc<Shared>>,
    data_dir: PathBuf,
    machine_name: String,
    /// The agent's id, from its certificate.
    agent_id: String,
}

impl Machine {
    pub fn new(
        disks: Vec<Arc<Shared>>,
        data_dir: &Path,
        machine_name: String,
        agent_id: String,
    ) -> Machine {
        Machine {
            disks,
            data_dir: data_dir.to_path_buf(),
            machine_name,
            agent_id,
        }
    }

    /// The machine's data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether any disk has a live connection to the process server.
    pub fn connected(&self) -> bool {
        self.disks.iter().any(|d| d.connected())
    }

    /// A live connection to the process server (reports go on it).
    pub fn connection(&self) -> Option<quinn::Connection> {
        self.disks.iter().find_map(|d| {
            d.conn
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .filter(|c| c.close_reason().is_none())
        })
    }

    /// Whether the agent is stopping.
    pub fn is_stopping(&self) -> bool {
        self.disks.iter().any(|d| d.is_stopping())
    }

    /// Asks every disk's initial pass and shipper to stop.
    pub fn stop(&self) {
        for d in &self.disks {
            d.stop();
        }
    }

    /// The report of this moment.
    pub fn report(&self) -> Report {
        Report {
            agent_id: self.agent_id.clone(),
            machine_name: self.machine_name.clone(),
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            disks: self.disks.iter().map(|d| d.report()).collect(),
        }
    }

    /// Writes `status.json` (atomically).
    pub fn write_status(&self) -> anyhow::Result<()> {
        let body = serde_json::to_vec_pretty(&self.report())?;
        Ok(haven_fsutil::write_atomic(
            &self.data_dir.join("status.json"),
            &body,
            0o644,
        )?)
    }
}
