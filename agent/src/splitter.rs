//! The write path: every change lands on the backing disk and in the change log.
//!
//! # Durability contract (standard block-device semantics)
//!
//! - A write acknowledged *without* FUA has been applied to the backing disk and appended to the
//!   log, but it is durable only after the next FLUSH completes: until then either copy may sit
//!   in the page cache and be lost with the machine (not with the agent process: both copies are
//!   in the kernel once a write is acknowledged).
//! - FLUSH (and a write with FUA, for itself and everything acknowledged before it) means
//!   durable on the backing disk (`fdatasync`) and in the log ([`ChangeLog::sync`], as durable
//!   as the log's [`Durability`](crate::log::Durability) says) before the reply is sent. So
//!   after a crash, every write acknowledged before the last completed FLUSH is on the backing
//!   disk; and in the log after a killed process (`Durability::Process`, `protect`: a machine
//!   crash makes the agent resync instead) or any crash (`Durability::Machine`, `serve`).
//!
//! # Ordering
//!
//! Changes are serialized by one lock held across "append to the log, apply to the disk", so
//! the log's order is the order in which changes were applied to the backing disk, and replaying
//! the log onto the disk's earlier state gives its current state. The record is appended first
//! (write-ahead). If appending fails with an I/O error, the disk is left untouched and the client
//! gets `EIO`. If the disk write then fails, the client gets `EIO` and the log holds a change
//! whose range is undefined on the disk, as for any failed block write.
//!
//! # A full log ([`OnFull`])
//!
//! - [`OnFull::Refuse`] (`haven-agent serve`, where the log is the product): the write is refused
//!   with `ENOSPC` before the disk is touched, so the log never misses a change the disk has.
//! - [`OnFull::Overflow`] (`haven-agent protect`): the protection degrades, the workload does
//!   not. The splitter becomes *overflowed*: it makes the log's overflow marker durable
//!   ([`ChangeLog::mark_overflowed`]) and only then applies the write, and that one and every
//!   later change go to the disk only (FLUSH and FUA still sync the disk). Nothing more is
//!   appended to the log — not even the replication's own block captures, which are refused
//!   with [`SplitError::Overflowed`] — so no record ever follows a change the log lacks (the
//!   replica would otherwise apply an older record over newer data it never got). The
//!   replication side sees [`Splitter::overflow`], records that the disk is resyncing, and calls
//!   [`Splitter::reset_log`], which, under the lock, drops every record and switches back to
//!   logging: every change before the switch is on the disk (and found by the hash pass, which
//!   starts after it), every change after it is in the fresh log.
//!
//! # Opening: the whole log is applied again
//!
//! [`Splitter::open`] applies every record the log holds to the backing disk, in order, then
//! syncs the disk. The records held are those not yet released, i.e. after the last point the
//! disk was synced for shipping; after a power loss the disk may lack any of them (its page
//! cache is lost; the log's group commit may have made them durable), and after a killed
//! process the last one may be missing from the disk (appended, not yet applied). Applying a
//! suffix of the disk's own history again, in order, onto a disk that already has some or all of
//! it gives the same bytes, so this is always safe. The cost is bounded by the log's size limit
//! (`--log-max-bytes`) and logged. A log marked overflowed is never applied (its records are
//! older than writes the disk has): with [`OnFull::Overflow`] the splitter opens overflowed (the
//! replication side resets the log and resyncs), with [`OnFull::Refuse`] opening fails.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rustix::fs::FallocateFlags;

use crate::log::{Change, ChangeLog, Kind, LogError, LogReader, LogStats};

/// Sector size: every request must be aligned to it.
pub const SECTOR: u64 = 512;

/// Why a change was refused or failed; maps onto an NBD error.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// A bad request (range, alignment).
    #[error("{0}")]
    Invalid(String),
    /// The log is full; nothing was applied.
    #[error(transparent)]
    LogFull(LogError),
    /// The log overflowed and is not appended to until it is reset; nothing was captured.
    #[error("the change log overflowed: nothing is appended until it is reset")]
    Overflowed,
    /// The log failed.
    #[error(transparent)]
    Log(LogError),
    /// The agent is stopping; nothing was applied.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// The backing disk failed.
    #[error("backing disk {path}: {what}: {source}", path = path.display())]
    Disk {
        /// The backing disk.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

impl SplitError {
    /// The errno sent to an NBD client.
    pub fn errno(&self) -> u32 {
        match self {
            SplitError::Invalid(_) => 22,    // EINVAL
            SplitError::LogFull(_) => 28,    // ENOSPC
            SplitError::ShuttingDown => 108, // ESHUTDOWN
            SplitError::Log(_) | SplitError::Overflowed | SplitError::Disk { .. } => 5, // EIO
        }
    }
}

impl From<LogError> for SplitError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::LogFull { .. } => SplitError::LogFull(e),
            other => SplitError::Log(other),
        }
    }
}

/// What a change does when the log is full (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFull {
    /// Refuse it with `ENOSPC`, the disk untouched.
    Refuse,
    /// Apply it to the disk only, and stop logging until [`Splitter::reset_log`].
    Overflow,
}

/// Why and when the log overflowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow {
    /// Bytes the log held.
    pub used: u64,
    /// Its limit.
    pub max_bytes: u64,
}

/// A protected disk: the backing disk plus its change log.
#[derive(Debug)]
pub struct Splitter {
    disk: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
    on_full: OnFull,
    log: Mutex<ChangeLog>,
    /// Taken (shared) by every client change for its whole course, and (exclusive) by a
    /// recovery point's [`Splitter::hold_all`]: a hold waits for the changes in progress and
    /// keeps new ones waiting, without holding the log's lock, so everything else (the
    /// shipper, the report) goes on meanwhile.
    gate: RwLock<()>,
    /// Set (under the log's lock) while the log is overflowed: changes go to the disk only.
    overflowed: AtomicBool,
    overflow: Mutex<Option<Overflow>>,
    /// Set by [`Splitter::shutdown`]: every later change is refused.
    closed: AtomicBool,
    /// Bytes changed by clients (writes, zeroes, trims) since the splitter was opened.
    client_bytes: AtomicU64,
    /// Every record up to this seq is durable in the log *and* on the disk.
    both_durable: AtomicU64,
    /// Log seq of the last copy record appended (0: none since the splitter opened and none in
    /// the log it opened). A copy record carries the disk's content when it ships, so a point
    /// tagged after it is consistent only once it has shipped.
    last_copy: AtomicU64,
}

/// What [`Splitter::capture_blocks`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    /// Blocks appended to the log as write records.
    pub blocks: u64,
    /// Bytes of those records.
    pub bytes: u64,
}

static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

impl Splitter {
    /// Opens the backing disk (a regular file or a block device) read-write. Its size must be a
    /// multiple of [`SECTOR`]. Every record of `log` is applied to it again (module docs).
    pub fn open(
        path: impl AsRef<Path>,
        log: ChangeLog,
        on_full: OnFull,
    ) -> anyhow::Result<Splitter> {
        let path = path.as_ref().to_path_buf();
        let mut disk = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("opening backing disk {}: {e}", path.display()))?;
        let meta = disk.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            disk.seek(SeekFrom::End(0))?
        } else {
            meta.len()
        };
        if !block_device && !meta.file_type().is_file() {
            anyhow::bail!(
                "backing disk {}: not a regular file or block device",
                path.display()
            );
        }
        if size == 0 || !size.is_multiple_of(SECTOR) {
            anyhow::bail!(
                "backing disk {}: size {size} is not a positive multiple of {SECTOR} bytes",
                path.display()
            );
        }
        let overflowed = log.is_overflowed();
        if overflowed && on_full == OnFull::Refuse {
            anyhow::bail!(
                "change log {} overflowed (it holds the marker file `{}`): its records are older \
                 than writes the disk has and must not be applied; move the folder away to serve \
                 {} with a fresh log",
                log.dir().display(),
                crate::log::OVERFLOW_MARKER,
                path.display()
            );
        }
        let overflow = overflowed.then(|| Overflow {
            used: log.stats().bytes_used,
            max_bytes: log.limits().max_bytes,
        });
        let splitter = Splitter {
            disk,
            path,
            size,
            block_device,
            on_full,
            log: Mutex::new(log),
            gate: RwLock::new(()),
            overflowed: AtomicBool::new(overflowed),
            overflow: Mutex::new(overflow),
            closed: AtomicBool::new(false),
            client_bytes: AtomicU64::new(0),
            both_durable: AtomicU64::new(0),
            last_copy: AtomicU64::new(0),
        };
        if overflowed {
            tracing::warn!(
                "the change log overflowed before the agent stopped: its records are not applied; \
                 the disk will be resynced by block comparison"
            );
        } else {
            splitter.reapply_log()?;
        }
        // What the previous process applied may still be only in the page cache.
        splitter.disk.sync_data()?;
        let durable = splitter.lock().durable_seq();
        splitter.both_durable.store(durable, Ordering::Release);
        Ok(splitter)
    }

    /// Applies every record the log holds to the disk again, in order (see the module docs).
    fn reapply_log(&self) -> anyhow::Result<()> {
        let log = self.lock();
        let st = log.stats();
        if st.last_seq < st.first_seq {
            return Ok(());
        }
        if log.max_record_end() > self.size {
            anyhow::bail!(
                "change log {} holds a record that lies past the end of backing disk {} ({} \
                 bytes; it reaches byte {}): the log belongs to another disk",
                log.dir().display(),
                self.path.display(),
                self.size,
                log.max_record_end()
            );
        }
        let started = std::time::Instant::now();
        let (mut records, mut bytes) = (0u64, 0u64);
        for record in log.read_from(st.first_seq)? {
            let record = record?;
            if record
                .offset
                .checked_add(record.len)
                .is_none_or(|end| end > self.size)
            {
                anyhow::bail!(
                    "change log record {} ({} at {}+{}) lies past the end of backing disk {} \
                     ({} bytes): the log belongs to another disk",
                    record.seq,
                    record.kind.name(),
                    record.offset,
                    record.len,
                    self.path.display(),
                    self.size
                );
            }
            match record.kind {
                Kind::Write => self.disk.write_all_at(&record.data, record.offset)?,
                // The disk's own content: nothing to apply.
                Kind::Copy => {
                    self.last_copy.fetch_max(record.seq, Ordering::AcqRel);
                    continue;
                }
                // A recovery point changes nothing on the disk.
                Kind::Tag => continue,
                Kind::Zero | Kind::Trim => zero_file_range(
                    &self.disk,
                    self.block_device,
                    record.offset,
                    record.len,
                    true,
                )?,
            }
            records += 1;
            bytes += record.len;
        }
        self.disk.sync_data()?;
        tracing::info!(
            records,
            bytes,
            first_seq = st.first_seq,
            last_seq = st.last_seq,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "re-applied the change log's records to the backing disk"
        );
        Ok(())
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Counters of the change log.
    pub fn log_stats(&self) -> LogStats {
        self.lock().stats()
    }

    fn lock(&self) -> MutexGuard<'_, ChangeLog> {
        // A panic while holding the lock cannot leave a half-appended record (append truncates
        // on failure), so the log stays usable.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that `offset..offset+len` is inside the disk and sector-aligned.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), SplitError> {
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(SplitError::Invalid(format!(
                "request {offset}+{len} is not aligned to {SECTOR} bytes"
            )));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(SplitError::Invalid(format!(
                "request {offset}+{len} is past the end of the disk ({} bytes)",
                self.size
            ))),
        }
    }

    fn disk_err(&self, what: &'static str) -> impl FnOnce(io::Error) -> SplitError + '_ {
        move |source| SplitError::Disk {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SplitError> {
        self.check_range(offset, buf.len() as u64)?;
        self.disk
            .read_exact_at(buf, offset)
            .map_err(self.disk_err("reading"))
    }

    /// How `offset..offset + len` is stored on the backing disk, as runs `(length, hole)` from
    /// `offset` on, in order: a regular file's holes (`SEEK_HOLE`/`SEEK_DATA`) read as zeroes
    /// without being stored; a block device is data throughout. A change made meanwhile may
    /// not be in the answer (NBD block status is advice, not a lock).
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, SplitError> {
        self.check_range(offset, len)?;
        let end = offset + len;
        if self.block_device || len == 0 {
            return Ok(vec![(len, false)]);
        }
        let seek = |whence: rustix::fs::SeekFrom| match rustix::fs::seek(&self.disk, whence) {
            Ok(at) => Ok(at.min(end)),
            // No data at or after the position: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => Ok(end),
            Err(e) => Err(SplitError::Disk {
                path: self.path.clone(),
                what: "mapping holes and data",
                source: e.into(),
            }),
        };
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = seek(rustix::fs::SeekFrom::Data(pos))?;
            if data > pos {
                runs.push((data - pos, true));
                pos = data;
                continue;
            }
            let hole = seek(rustix::fs::SeekFrom::Hole(pos))?.max(pos + 1).min(end);
            runs.push((hole - pos, false));
            pos = hole;
        }
        Ok(runs)
    }

    /// Whether [`Splitter::write_zeroes`] is cheap here (NBD `FAST_ZERO`): on a regular file it
    /// punches or allocates a zeroed range; on a block device it writes zeroes.
    pub fn zeroes_fast(&self) -> bool {
        !self.block_device
    }

    /// Writes `data` at `offset`: appended to the log, then applied to the disk. With `fua`,
    /// durable on both before returning; otherwise durable after the next [`Splitter::flush`].
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), SplitError> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let _gate = self.pass_gate();
        let mut log = self.lock_open()?;
        self.log_change(&mut log, Change::Write { offset, data })?;
        self.client_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.disk
            .write_all_at(data, offset)
            .map_err(self.disk_err("writing"))?;
        if fua {
            self.sync_locked(&mut log)?;
        }
        Ok(())
    }

    /// Sets `len` bytes at `offset` to zero (NBD `WRITE_ZEROES`). With `may_punch` (the client
    /// did not send `NO_HOLE`) a regular file gets a hole; otherwise the range stays allocated.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), SplitError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _gate = self.pass_gate();
        let mut log = self.lock_open()?;
        self.log_change(&mut log, Change::Zero { offset, len })?;
        self.client_bytes.fetch_add(len, Ordering::Relaxed);
        self.zero_range(offset, len, may_punch)?;
        if fua {
            self.sync_locked(&mut log)?;
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset` (NBD `TRIM`). The agent makes the range read as zeroes
    /// (a hole in a regular file, zeroes written on a block device) so that the log's replay and
    /// the disk agree byte for byte.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), SplitError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _gate = self.pass_gate();
        let mut log = self.lock_open()?;
        self.log_change(&mut log, Change::Trim { offset, len })?;
        self.client_bytes.fetch_add(len, Ordering::Relaxed);
        self.zero_range(offset, len, true)?;
        if fua {
            self.sync_locked(&mut log)?;
        }
        Ok(())
    }

    /// Makes every change applied so far durable on the backing disk and in the log; returns
    /// the log's durable sequence number.
    pub fn flush(&self) -> Result<u64, SplitError> {
        let mut log = self.lock();
        self.sync_locked(&mut log)
    }

    /// Appends a client's change (before it is applied to the disk), unless the log overflowed:
    /// then, or when it overflows now under [`OnFull::Overflow`], the change goes to the disk
    /// only. The marker is durable before this returns, so before the disk is touched.
    fn log_change(&self, log: &mut ChangeLog, change: Change<'_>) -> Result<(), SplitError> {
        if self.overflowed.load(Ordering::Acquire) {
            return Ok(());
        }
        match log.append(change) {
            Ok(_) => Ok(()),
            Err(LogError::LogFull {
                used, max_bytes, ..
            }) if self.on_full == OnFull::Overflow => {
                log.mark_overflowed(&format!(
                    "change log full ({used} of {max_bytes} bytes) at record {}",
                    log.stats().next_seq
                ))?;
                *self.overflow.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Overflow { used, max_bytes });
                self.overflowed.store(true, Ordering::Release);
                tracing::warn!(
                    used,
                    max_bytes,
                    "change log full: writes go to the disk only until the log is reset; the \
                     disk will be resynced by block comparison"
                );
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether (and how) the log overflowed and awaits [`Splitter::reset_log`].
    pub fn overflow(&self) -> Option<Overflow> {
        if !self.overflowed.load(Ordering::Acquire) {
            return None;
        }
        *self.overflow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops every record of the log (and its overflow marker) and, under the same lock, switches
    /// an overflowed splitter back to logging: every change applied before is on the disk, every
    /// change after is in the emptied log. Sequence numbers continue. The caller must have
    /// recorded durably that the disk needs a resync first. Returns the seq the next record gets.
    pub fn reset_log(&self) -> Result<u64, SplitError> {
        let mut log = self.lock();
        let freed = log.discard_all()?;
        self.overflowed.store(false, Ordering::Release);
        *self.overflow.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let next = log.stats().next_seq;
        tracing::info!(
            freed,
            next_seq = next,
            "change log reset: changes are logged again"
        );
        Ok(next)
    }

    /// Waits while a recovery point holds the writes; the guard lets them on again.
    fn pass_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock, unless the splitter was shut down.
    fn lock_open(&self) -> Result<MutexGuard<'_, ChangeLog>, SplitError> {
        let log = self.lock();
        if self.closed.load(Ordering::Acquire) {
            return Err(SplitError::ShuttingDown);
        }
        Ok(log)
    }

    /// Bytes changed by clients since the splitter was opened.
    pub fn client_bytes(&self) -> u64 {
        self.client_bytes.load(Ordering::Relaxed)
    }

    /// Makes the backing disk durable (`fdatasync`): the shipper calls it after reading the
    /// bytes of copy records, so that nothing it sends can be lost by the source in a power cut.
    pub fn sync_disk(&self) -> Result<(), SplitError> {
        self.disk.sync_data().map_err(self.disk_err("syncing"))
    }

    /// Reads `buf.len()` bytes at `offset` and, under the same lock (so that nothing changes
    /// the disk in between), appends every block of `block` bytes (the last one may be shorter)
    /// for which `keep(block_offset, block_data)` is true to the log as a copy record (the
    /// shipper reads the bytes from the disk when it ships the record, see `Kind::Copy`). The
    /// records are thereby ordered with the clients' changes: one made after this call gets a
    /// later sequence number. Used by the initial pass (`keep` = "not all zero") and by resync
    /// (`keep` = "differs from the replica's digest").
    ///
    /// On [`SplitError::LogFull`] the blocks before the refused one stay appended (each is a
    /// valid record of the disk's state at this moment); calling again appends them again,
    /// which is redundant but harmless. A full log never makes a capture overflow the splitter
    /// (only clients' changes do); an overflowed splitter refuses captures
    /// ([`SplitError::Overflowed`]).
    pub fn capture_blocks(
        &self,
        offset: u64,
        buf: &mut [u8],
        block: usize,
        mut keep: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<Captured, SplitError> {
        self.check_range(offset, buf.len() as u64)?;
        if block == 0 || block as u64 > crate::log::MAX_PAYLOAD {
            return Err(SplitError::Invalid(format!(
                "capture block size {block} must be 1..={}",
                crate::log::MAX_PAYLOAD
            )));
        }
        let mut log = self.lock_open()?;
        if self.overflowed.load(Ordering::Acquire) {
            return Err(SplitError::Overflowed);
        }
        self.disk
            .read_exact_at(buf, offset)
            .map_err(self.disk_err("reading"))?;
        let mut done = Captured::default();
        for (i, data) in buf.chunks(block).enumerate() {
            let at = offset + (i * block) as u64;
            if keep(at, data) {
                // The bytes are read again from the disk when shipped (see `Kind::Copy`).
                let seq = log.append(Change::Copy {
                    offset: at,
                    len: data.len() as u64,
                })?;
                self.last_copy.fetch_max(seq, Ordering::AcqRel);
                done.blocks += 1;
                done.bytes += data.len() as u64;
            }
        }
        Ok(done)
    }

    /// Group commit for the shipper: makes every change applied so far durable on the backing
    /// disk and in the log, without holding the lock during the syncs, and returns the seq up to
    /// which records are durable in both (only those may leave the machine).
    ///
    /// The disk is synced too: a record the downstream holds must never be missing from the
    /// disk after a power loss, or the replica would hold a change the source lost.
    pub fn sync_for_shipping(&self) -> Result<u64, SplitError> {
        let handle = {
            let log = self.lock();
            // Every record up to the handle's seq has been applied to the disk: the lock covers
            // both.
            let both = self.both_durable.load(Ordering::Acquire);
            if both >= log.written_seq() {
                return Ok(both);
            }
            log.sync_handle()?
        };
        self.disk.sync_data().map_err(self.disk_err("syncing"))?;
        handle.sync()?;
        self.lock().mark_synced(&handle);
        self.both_durable.fetch_max(handle.seq(), Ordering::AcqRel);
        Ok(handle.seq())
    }

    /// A reader of the log's records from `seq` up to the last one appended now. The reader
    /// needs no lock; `seq` must not have been released.
    pub fn read_log_from(&self, seq: u64) -> Result<LogReader, LogError> {
        self.lock().read_from(seq)
    }

    /// Frees the log's segments whose records are all at most `seq` (acknowledged downstream).
    pub fn release_log(&self, seq: u64) -> Result<u64, LogError> {
        self.lock().release(seq)
    }

    /// Log seq of the last copy record appended (0: none). See [`Splitter::tag`].
    pub fn last_copy_seq(&self) -> u64 {
        self.last_copy.load(Ordering::Acquire)
    }

    /// Appends the same tag (a recovery point) to the logs of all `splitters` — the disks of
    /// one machine — with all their writes held at once ([`Splitter::hold_all`], then
    /// [`Held::tag`]): no write on any of them is acknowledged while the tags go in, so every
    /// write acknowledged before the tag on any disk precedes the tag on its own disk, and
    /// every write that starts after follows it. With `close` every splitter is closed in the
    /// same step (a planned failover: no write is accepted after the tags). Returns each
    /// disk's tag seq, in order.
    pub fn tag_all(
        splitters: &[&Splitter],
        info: crate::log::TagInfo,
        close: bool,
    ) -> Result<Vec<u64>, SplitError> {
        Splitter::hold_all(splitters, close)?.tag(info, close)
    }

    /// Holds the client changes of all `splitters`, in the order given: once it returns, no
    /// change is in progress on any of them, and until the [`Held`] is tagged or dropped none
    /// starts (a write waits). The logs' locks are not held meanwhile. With `close` a closed
    /// splitter is held too (for its final tag); without, it is refused.
    pub fn hold_all<'a>(splitters: &[&'a Splitter], close: bool) -> Result<Held<'a>, SplitError> {
        let mut gates = Vec::with_capacity(splitters.len());
        for s in splitters {
            gates.push(s.gate.write().unwrap_or_else(|e| e.into_inner()));
        }
        if !close && splitters.iter().any(|s| s.closed.load(Ordering::Acquire)) {
            return Err(SplitError::ShuttingDown);
        }
        Ok(Held {
            splitters: splitters.to_vec(),
            _gates: gates,
        })
    }

    /// Makes everything durable (disk and log) and refuses every later change, so that what
    /// is durable is final: the agent then exits. Returns the log's durable seq.
    pub fn shutdown(&self) -> Result<u64, SplitError> {
        let mut log = self.lock();
        self.closed.store(true, Ordering::Release);
        self.sync_locked(&mut log)?;
        // Whatever the log's durability while running, a clean stop leaves it on the disk.
        Ok(log.sync_to_disk()?)
    }

    fn sync_locked(&self, log: &mut ChangeLog) -> Result<u64, SplitError> {
        self.disk.sync_data().map_err(self.disk_err("syncing"))?;
        let seq = log.sync()?;
        self.both_durable.fetch_max(seq, Ordering::AcqRel);
        Ok(seq)
    }

    fn zero_range(&self, offset: u64, len: u64, may_punch: bool) -> Result<(), SplitError> {
        zero_file_range(&self.disk, self.block_device, offset, len, may_punch)
            .map_err(self.disk_err("zeroing"))
    }
}

/// The client changes of several splitters, held ([`Splitter::hold_all`]): their writes wait.
pub struct Held<'a> {
    splitters: Vec<&'a Splitter>,
    _gates: Vec<RwLockWriteGuard<'a, ()>>,
}

impl Held<'_> {
    /// Appends the tag to every held log, closes every splitter with `close` and lets the
    /// writes go on. Returns each tag's seq, in the order held. Nothing is synced here: a tag, like a
    /// write, leaves the machine only once the shipper made it durable
    /// ([`Splitter::sync_for_shipping`]), so a point costs the workload no sync.
    ///
    /// Refused when a log overflowed (changes since then are not in it, so no point would hold
    /// them). The caller checks that no unshipped copy record precedes a tag
    /// ([`Splitter::last_copy_seq`]). A failure after some tags went in leaves those tags
    /// without the others: the point is then incomplete, and the master target keeps only
    /// points every disk has.
    pub fn tag(self, info: crate::log::TagInfo, close: bool) -> Result<Vec<u64>, SplitError> {
        let Held { splitters, _gates } = self;
        if splitters
            .iter()
            .any(|s| s.overflowed.load(Ordering::Acquire))
        {
            return Err(SplitError::Overflowed);
        }
        let mut seqs = Vec::with_capacity(splitters.len());
        for s in &splitters {
            // No client change is in progress: the tag follows every one applied so far.
            let mut log = s.lock();
            if s.overflowed.load(Ordering::Acquire) {
                return Err(SplitError::Overflowed);
            }
            seqs.push(log.append(Change::Tag(info))?);
            if close {
                s.closed.store(true, Ordering::Release);
            }
        }
        drop(_gates);
        Ok(seqs)
    }
}

/// Makes `offset..offset+len` of `file` read as zeroes: a hole (`may_punch`) or an allocated
/// zeroed range in a regular file, zeroes written on a block device or where the file system
/// cannot do either.
pub fn zero_file_range(
    file: &File,
    block_device: bool,
    offset: u64,
    len: u64,
    may_punch: bool,
) -> io::Result<()> {
    if !block_device {
        let mode = if may_punch {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        };
        match rustix::fs::fallocate(file, mode, offset, len) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROES.len() as u64) as usize;
        file.write_all_at(&ZEROES[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Limits;

    /// The agent died after appending a change to the log and before writing it to the disk:
    /// opening the splitter completes the disk from the log.
    #[test]
    fn a_change_logged_but_not_applied_is_applied_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let logs = dir.path().join("log");
        {
            let mut log = ChangeLog::open(&logs, Limits::default()).unwrap();
            log.append(Change::Write {
                offset: 4096,
                data: &[0x5a; 512],
            })
            .unwrap();
            log.sync().unwrap();
        }
        let log = ChangeLog::open(&logs, Limits::default()).unwrap();
        let splitter = Splitter::open(&disk, log, OnFull::Refuse).unwrap();
        let mut buf = [0u8; 512];
        splitter.read(4096, &mut buf).unwrap();
        assert_eq!(buf, [0x5a; 512]);
        assert_eq!(std::fs::read(&disk).unwrap()[4096..4608], [0x5a; 512]);
    }

    #[test]
    fn a_log_of_another_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let logs = dir.path().join("log");
        {
            let mut log = ChangeLog::open(&logs, Limits::default()).unwrap();
            log.append(Change::Zero {
                offset: 4 << 20,
                len: 512,
            })
            .unwrap();
            log.sync().unwrap();
        }
        let log = ChangeLog::open(&logs, Limits::default()).unwrap();
        let err = Splitter::open(&disk, log, OnFull::Refuse)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("lies past the end of backing disk") && err.contains("another disk"),
            "{err}"
        );
    }

    fn disk_of(dir: &Path, size: u64) -> PathBuf {
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk).unwrap().set_len(size).unwrap();
        disk
    }

    /// A power loss kept the log (group commit) but not the disk's page cache: every record
    /// held is applied again at open, in order.
    #[test]
    fn every_record_held_is_applied_again_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk_of(dir.path(), 1 << 20);
        let logs = dir.path().join("log");
        let limits = Limits {
            max_bytes: 1 << 20,
            segment_bytes: 16 << 10,
        };
        // Overlapping changes across several segments: the order matters.
        let mut ranges = Vec::new();
        {
            let s = Splitter::open(
                &disk,
                ChangeLog::open(&logs, limits).unwrap(),
                OnFull::Refuse,
            )
            .unwrap();
            for i in 0..40u64 {
                let off = (i * 7 % 64) * 4096;
                let data = vec![i as u8 + 1; 8192];
                s.write(off, &data, false).unwrap();
                ranges.push((off, 8192));
            }
            s.write_zeroes(8192, 4096, false, false).unwrap();
            s.trim(65536, 8192, false).unwrap();
            s.write(65536 + 4096, &[0xab; 512], false).unwrap();
            s.flush().unwrap();
            assert!(s.log_stats().segments > 2);
        }
        let want = std::fs::read(&disk).unwrap();
        // The disk lacks every change.
        let f = OpenOptions::new().write(true).open(&disk).unwrap();
        for &(off, len) in &ranges {
            f.write_all_at(&vec![0u8; len], off).unwrap();
        }
        drop(f);
        assert_ne!(std::fs::read(&disk).unwrap(), want);
        let s = Splitter::open(
            &disk,
            ChangeLog::open(&logs, limits).unwrap(),
            OnFull::Refuse,
        )
        .unwrap();
        assert_eq!(s.log_stats().last_seq, 43);
        drop(s);
        assert!(std::fs::read(&disk).unwrap() == want);
    }

    /// With `OnFull::Overflow`, a full log never fails a write: the splitter stops logging (the
    /// marker durable first), refuses captures, and logs again after `reset_log`. A log left
    /// overflowed is never applied at open.
    #[test]
    fn a_full_log_overflows_instead_of_failing_writes() {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk_of(dir.path(), 1 << 20);
        let logs = dir.path().join("log");
        let limits = Limits {
            max_bytes: 64 << 10,
            segment_bytes: 32 << 10,
        };
        let s = Splitter::open(
            &disk,
            ChangeLog::open(&logs, limits).unwrap(),
            OnFull::Overflow,
        )
        .unwrap();
        for i in 0..40u64 {
            s.write(i * 8192, &[i as u8 + 1; 8192], i % 5 == 0).unwrap();
        }
        let o = s.overflow().expect("overflowed");
        assert_eq!(o.max_bytes, 64 << 10);
        let logged = s.log_stats().last_seq;
        assert!((5..10).contains(&logged), "{logged}");
        assert!(logs.join(crate::log::OVERFLOW_MARKER).exists());
        s.write_zeroes(0, 8192, true, false).unwrap();
        s.flush().unwrap();
        assert_eq!(s.log_stats().last_seq, logged);
        let mut buf = vec![0u8; 65536];
        assert!(matches!(
            s.capture_blocks(0, &mut buf, 65536, |_, _| true),
            Err(SplitError::Overflowed)
        ));
        let want = std::fs::read(&disk).unwrap();
        assert!(want[..8192].iter().all(|&b| b == 0));
        assert!(want[39 * 8192..40 * 8192].iter().all(|&b| b == 40));
        drop(s);

        // Reopened: the void records are not applied (they would undo the zeroes at 0).
        let err = Splitter::open(
            &disk,
            ChangeLog::open(&logs, limits).unwrap(),
            OnFull::Refuse,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("overflowed"), "{err}");
        let s = Splitter::open(
            &disk,
            ChangeLog::open(&logs, limits).unwrap(),
            OnFull::Overflow,
        )
        .unwrap();
        assert!(s.overflow().is_some());
        assert!(std::fs::read(&disk).unwrap() == want);

        // Reset: empty, numbering continues, logging again.
        assert_eq!(s.reset_log().unwrap(), logged + 1);
        assert!(s.overflow().is_none());
        assert!(!logs.join(crate::log::OVERFLOW_MARKER).exists());
        let st = s.log_stats();
        assert_eq!((st.first_seq, st.last_seq), (logged + 1, logged));
        s.write(0, &[7; 512], false).unwrap();
        assert_eq!(s.log_stats().last_seq, logged + 1);
        // A capture logs copy records (no bytes: the shipper reads the disk), so even one of
        // more bytes than the log has room for fits, and never overflows the splitter.
        let blocks = buf.len() / 65536;
        let before = s.log_stats();
        assert_eq!(
            s.capture_blocks(0, &mut buf, 65536, |_, _| true)
                .unwrap()
                .blocks as usize,
            blocks
        );
        let after = s.log_stats();
        assert_eq!(after.last_seq, before.last_seq + blocks as u64);
        assert!(after.bytes_used - before.bytes_used < (blocks as u64) * 64);
        assert!(s.overflow().is_none());
    }
}
