//! The protected disk's shared state: the splitter, `disk.state`, the progress and link facts
//! the report shows. The shipper (`replicate.rs`), the initial pass, recovery points
//! (`points.rs`) and the reporter each hold it; none of them imports another.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use haven_net::quinn;
use haven_net::stream::{DiskReport, DiskState, Report};
pub use haven_replication::shipper::seq_add;

use crate::splitter::Splitter;
use crate::state::{DiskRecord, Phase};

/// The disk's id in the stream: one disk per agent process.
pub const DISK_ID: u32 = 1;

/// The file in the data folder that marks the disk failed over (planned failover): it is never
/// served again.
pub const FAILED_OVER: &str = "failed-over";

/// Why the disk was failed over, if the data folder says it was.
pub fn failed_over(data_dir: &Path) -> Option<String> {
    let path: PathBuf = data_dir.join(FAILED_OVER);
    let text = std::fs::read_to_string(&path).ok()?;
    Some(format!("{} ({})", text.trim(), path.display()))
}

/// State shared by the shipper, the initial pass, the reporter and the main thread.
#[derive(Debug)]
pub struct Shared {
    /// The protected disk.
    pub splitter: Arc<Splitter>,
    data_dir: PathBuf,
    state_path: PathBuf,
    status_path: PathBuf,
    record: Mutex<DiskRecord>,
    pub(crate) log_max_bytes: u64,
    machine_name: String,
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
    /// The agent's id, from its certificate.
    agent_id: String,
    /// When the change log reached which seq, for the report.
    marks: Mutex<haven_net::stream::WriteMarks>,
}

impl Shared {
    /// Shared state over an opened disk and its (already stored) `disk.state`.
    pub fn new(
        splitter: Arc<Splitter>,
        data_dir: &Path,
        record: DiskRecord,
        log_max_bytes: u64,
        machine_name: String,
        agent_id: String,
    ) -> Shared {
        let sync_done = match record.state {
            Phase::InitialSync | Phase::Resyncing => record.sync_offset,
            Phase::Protected => record.size,
        };
        let log_first = splitter.log_stats().first_seq;
        let acked = seq_add(log_first, record.seq_base).saturating_sub(1);
        Shared {
            splitter,
            data_dir: data_dir.to_path_buf(),
            state_path: data_dir.join("disk.state"),
            status_path: data_dir.join("status.json"),
            record: Mutex::new(record),
            log_max_bytes,
            machine_name,
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
            agent_id,
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

    /// The agent's data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
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

    /// The report of this moment.
    pub fn report(&self) -> Report {
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
            .or_else(|| failed_over(&self.data_dir));
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
        Report {
            agent_id: self.agent_id.clone(),
            machine_name: self.machine_name.clone(),
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            disks: vec![DiskReport {
                disk: DISK_ID,
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
            }],
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

    /// Writes `status.json` (atomically).
    pub fn write_status(&self) -> anyhow::Result<()> {
        let body = serde_json::to_vec_pretty(&self.report())?;
        Ok(haven_fsutil::write_atomic(&self.status_path, &body, 0o644)?)
    }
}
