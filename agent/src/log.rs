//! The durable change log: every change applied to a protected disk, in the order it was applied.
//!
//! # Format (version 1, all integers little-endian)
//!
//! The log is a folder of segment files named after the sequence number of their first record,
//! `000000000001.hlog`, `000000004711.hlog`, … Sequence numbers start at 1 and are contiguous
//! across segments. Only the last segment (the *active* one) is ever appended to.
//!
//! Segment header, [`SEGMENT_HEADER_LEN`] bytes:
//!
//! | bytes  | field                                   |
//! |--------|-----------------------------------------|
//! | 0..8   | magic `HVNCHLOG`                        |
//! | 8..12  | format version ([`FORMAT_VERSION`])     |
//! | 12..16 | header length (32)                      |
//! | 16..24 | sequence number of the first record     |
//! | 24..28 | reserved, zero                          |
//! | 28..32 | CRC32C of bytes 0..28                   |
//!
//! Record, [`RECORD_HEADER_LEN`] bytes of header then the payload (writes: `length` bytes;
//! tags: [`TAG_PAYLOAD_LEN`] bytes — point id u64, source time ms u64, kind u8 (1 crash, 2 app)):
//!
//! | bytes  | field                                            |
//! |--------|--------------------------------------------------|
//! | 0..4   | magic `HVNR`                                     |
//! | 4..6   | kind: 1 write, 2 zero, 3 trim, 4 copy, 5 tag     |
//! | 6..8   | flags, zero                                      |
//! | 8..16  | sequence number                                  |
//! | 16..24 | disk offset                                      |
//! | 24..32 | length in bytes                                  |
//! | 32..36 | CRC32C of bytes 0..32 followed by the payload    |
//!
//! # Durability
//!
//! [`ChangeLog::append`] writes a record (it is *written*); [`ChangeLog::sync`] makes every
//! written record durable and returns the durable sequence number. The two are tracked apart,
//! and only the durable sequence number may be used to acknowledge anything.
//!
//! A segment is created atomically (`haven_fsutil::write_atomic`: header written to a
//! temporary file, synced, renamed, folder synced; a temporary file a crash left is removed at
//! open), and the active segment is synced before the next one is created, so every segment
//! but the last is complete and durable. On [`ChangeLog::open`] a torn tail of the last segment
//! (a record cut short or never fully written by a crash, with no intact record after it) is
//! truncated; damage anywhere else is an error naming the segment file and the offset. The
//! folder listing and this recovery walk are `haven_fsutil::segments`, shared with the store's
//! journal; the record checks are this module's.
//!
//! # Overflow marker
//!
//! A splitter that keeps serving writes after the log filled up (see `splitter.rs`) first
//! creates the file [`OVERFLOW_MARKER`] in the folder, durably: from then on the disk may hold
//! writes the log lacks, so the records held no longer describe the disk's history and must
//! never be replayed onto it. [`ChangeLog::is_overflowed`] reports the marker;
//! [`ChangeLog::discard_all`] drops every record and then the marker. The marker's presence is
//! the whole information (its text is for people), so no damage to it can change its meaning.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use haven_fsutil::segments::{
    OpenSegment, RecordCheck, RecordFormat, RecoverError, list_segments, segment_file_name,
};
use haven_fsutil::{read_at_most, sync_dir};
use haven_wire::crc32c::{Crc32c, crc32c};

/// Magic at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"HVNCHLOG";
/// Magic at the start of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"HVNR";
/// Format version written and understood.
pub const FORMAT_VERSION: u32 = 1;
/// Size of a segment header.
pub const SEGMENT_HEADER_LEN: u64 = 32;
/// Size of a record header.
pub const RECORD_HEADER_LEN: u64 = 36;
/// Largest payload of one write record (the NBD front end's maximum request).
pub const MAX_PAYLOAD: u64 = 32 * 1024 * 1024;
/// Payload of a tag record: point id, source time, kind.
pub const TAG_PAYLOAD_LEN: u64 = 17;
/// File name extension of segments.
pub const SEGMENT_EXT: &str = "hlog";
/// File whose presence says the log overflowed: its records are void (see the module docs).
pub const OVERFLOW_MARKER: &str = "overflowed";
const IO_CHUNK: usize = 1024 * 1024;

/// Size limits of a change log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes all segments together may hold; an append beyond it is refused with
    /// [`LogError::LogFull`].
    pub max_bytes: u64,
    /// Size at which the active segment is closed and a new one started. A single record larger
    /// than this gets a segment of its own.
    pub segment_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
        }
    }
}

/// What a record changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Bytes written; the record carries them.
    Write,
    /// A range set to zero (NBD `WRITE_ZEROES`).
    Zero,
    /// A range discarded (NBD `TRIM`); the agent's backing disk reads it as zero afterwards.
    Trim,
    /// The disk's own content of a range, read when the record is shipped (initial sync and
    /// resync): it carries no bytes. Shipped later than it was logged, it is at least as new as
    /// the disk was at its place in the log, and every change made after that place follows it
    /// in the log, so replaying the log still ends at the disk's state.
    Copy,
    /// A recovery point: every change before it in the log, and none after, is in the point.
    /// It changes nothing on the disk.
    Tag,
}

impl Kind {
    fn code(self) -> u16 {
        match self {
            Kind::Write => 1,
            Kind::Zero => 2,
            Kind::Trim => 3,
            Kind::Copy => 4,
            Kind::Tag => 5,
        }
    }

    fn from_code(code: u16) -> Option<Kind> {
        match code {
            1 => Some(Kind::Write),
            2 => Some(Kind::Zero),
            3 => Some(Kind::Trim),
            4 => Some(Kind::Copy),
            5 => Some(Kind::Tag),
            _ => None,
        }
    }

    /// Lower-case name, as `log-dump` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Write => "write",
            Kind::Zero => "zero",
            Kind::Trim => "trim",
            Kind::Copy => "copy",
            Kind::Tag => "tag",
        }
    }
}

/// A change to append.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    /// `data` written at `offset`.
    Write {
        /// Disk offset in bytes.
        offset: u64,
        /// The bytes; at most [`MAX_PAYLOAD`].
        data: &'a [u8],
    },
    /// `len` bytes at `offset` set to zero.
    Zero {
        /// Disk offset in bytes.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `len` bytes at `offset` discarded.
    Trim {
        /// Disk offset in bytes.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `len` bytes at `offset` to be copied from the disk when shipped ([`Kind::Copy`]).
    Copy {
        /// Disk offset in bytes.
        offset: u64,
        /// Length in bytes; at most [`MAX_PAYLOAD`].
        len: u64,
    },
    /// A recovery point ([`Kind::Tag`]).
    Tag(TagInfo),
}

/// What a tag record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TagInfo {
    /// The point's id.
    pub point: u64,
    /// When it was taken, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Application-consistent (taken with the workload quiesced).
    pub app: bool,
}

impl TagInfo {
    fn encode(&self) -> [u8; TAG_PAYLOAD_LEN as usize] {
        let mut b = [0u8; TAG_PAYLOAD_LEN as usize];
        b[0..8].copy_from_slice(&self.point.to_le_bytes());
        b[8..16].copy_from_slice(&self.time_ms.to_le_bytes());
        b[16] = if self.app { 2 } else { 1 };
        b
    }

    fn decode(b: &[u8]) -> Option<TagInfo> {
        if b.len() != TAG_PAYLOAD_LEN as usize {
            return None;
        }
        let app = match b[16] {
            1 => false,
            2 => true,
            _ => return None,
        };
        Some(TagInfo {
            point: u64::from_le_bytes(b[0..8].try_into().ok()?),
            time_ms: u64::from_le_bytes(b[8..16].try_into().ok()?),
            app,
        })
    }
}

impl<'a> Change<'a> {
    fn parts(&self) -> (Kind, u64, u64, &'a [u8]) {
        match *self {
            Change::Write { offset, data } => (Kind::Write, offset, data.len() as u64, data),
            Change::Zero { offset, len } => (Kind::Zero, offset, len, &[]),
            Change::Trim { offset, len } => (Kind::Trim, offset, len, &[]),
            Change::Copy { offset, len } => (Kind::Copy, offset, len, &[]),
            Change::Tag(_) => (Kind::Tag, 0, 0, &[]),
        }
    }
}

/// A record read back from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Sequence number.
    pub seq: u64,
    /// What it changes.
    pub kind: Kind,
    /// Disk offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The bytes written (`len` of them) for [`Kind::Write`]; a tag's payload for [`Kind::Tag`];
    /// empty otherwise.
    pub data: Vec<u8>,
}

impl Record {
    /// What a tag record says; `None` for other kinds.
    pub fn tag(&self) -> Option<TagInfo> {
        (self.kind == Kind::Tag)
            .then(|| TagInfo::decode(&self.data))
            .flatten()
    }
}

/// Counters of a change log. Sequence number 0 means "none".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogStats {
    /// Bytes of all segment files.
    pub bytes_used: u64,
    /// Number of segment files.
    pub segments: usize,
    /// Sequence number of the oldest record held; equals `next_seq` when the log holds none.
    pub first_seq: u64,
    /// Sequence number of the last record appended (written, maybe not yet durable).
    pub last_seq: u64,
    /// Every record up to this one is durable.
    pub durable_seq: u64,
    /// Sequence number the next append gets.
    pub next_seq: u64,
}

/// Errors of the change log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The append would exceed `max_bytes`; nothing was appended.
    #[error(
        "change log full: a record of {needed} bytes would exceed the limit of {max_bytes} bytes \
         ({used} used); ship and release records or raise the limit (the agent must resync)"
    )]
    LogFull {
        /// Bytes in use.
        used: u64,
        /// Bytes the refused append needed.
        needed: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// A segment is damaged somewhere a crash cannot explain.
    #[error("change log damaged: {path}, offset {offset}: {what}", path = path.display())]
    Damaged {
        /// The segment file.
        path: PathBuf,
        /// Byte offset in that file.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// Another process holds the log folder.
    #[error(
        "change log folder {path} is in use by another process (a running haven-agent?)",
        path = path.display()
    )]
    Locked {
        /// The log folder.
        path: PathBuf,
    },
    /// A request the log cannot take.
    #[error("change log: {0}")]
    Invalid(String),
    /// An I/O error, with what was being done and where.
    #[error("change log: {what} {path}: {source}", path = path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Result of the change log.
pub type Result<T, E = LogError> = std::result::Result<T, E>;

impl From<haven_fsutil::Error> for LogError {
    fn from(e: haven_fsutil::Error) -> LogError {
        LogError::Io {
            what: e.step,
            path: e.path,
            source: e.source,
        }
    }
}

impl From<RecoverError> for LogError {
    fn from(e: RecoverError) -> LogError {
        match e {
            RecoverError::Damaged { path, offset, what } => {
                LogError::Damaged { path, offset, what }
            }
            RecoverError::Io(e) => e.into(),
        }
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Clone, Debug)]
struct Segment {
    path: PathBuf,
    first_seq: u64,
    /// `first_seq - 1` while empty.
    last_seq: u64,
    len: u64,
    /// Largest `offset + len` of its records (0 when empty).
    max_end: u64,
}

impl Segment {
    /// A segment holding only its header; its first record will be `first_seq`.
    fn empty(path: PathBuf, first_seq: u64) -> Segment {
        Segment {
            path,
            first_seq,
            last_seq: first_seq - 1,
            len: SEGMENT_HEADER_LEN,
            max_end: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.last_seq < self.first_seq
    }
}

/// The change log of one disk. See the module documentation for the format.
#[derive(Debug)]
pub struct ChangeLog {
    dir: PathBuf,
    limits: Limits,
    _lock: File,
    /// Sorted by sequence number; never empty; the last one is active.
    segments: Vec<Segment>,
    active: File,
    next_seq: u64,
    durable_seq: u64,
    bytes_used: u64,
    /// The overflow marker exists.
    overflowed: bool,
    /// What a record survives once [`ChangeLog::sync`] returned.
    durability: Durability,
    /// Released segment files kept for reuse ([`Durability::Process`] only): overwriting a
    /// file whose pages the kernel still caches costs far less than filling new ones.
    spares: Vec<PathBuf>,
}

/// Most released segment files kept for reuse.
const MAX_SPARES: usize = 2;
/// Name prefix of a spare segment file (not a segment's name: listings skip it).
const SPARE_PREFIX: &str = "spare-";

/// What a record survives once [`ChangeLog::sync`] says it is durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// A crash of the machine: segments are `fdatasync`ed (the active one by each sync, a full
    /// one when the next starts). `haven-agent serve`, where the log is the product.
    #[default]
    Machine,
    /// A killed process: the kernel keeps what was written, so nothing is `fdatasync`ed while
    /// the log runs (a sync only marks what was written durable) and
    /// [`ChangeLog::sync_to_disk`] makes it all durable at a clean stop. After a crash of the
    /// machine the log may lack any record written since it was opened; its owner must not
    /// trust it then (`haven-agent protect` resyncs the disk when the machine restarted and the
    /// agent had not stopped cleanly).
    Process,
}

/// What [`ChangeLog::sync_handle`] gives the group commit: the file to sync (none when the log
/// survives only a killed process) and the last record the sync covers. Sync it outside the
/// lock ([`SyncHandle::sync`]), then [`ChangeLog::mark_synced`].
#[derive(Debug)]
pub struct SyncHandle {
    file: Option<(File, PathBuf)>,
    seq: u64,
}

impl SyncHandle {
    /// The last record the sync covers.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// `fdatasync` of the active segment (earlier ones were synced when they were closed).
    pub fn sync(&self) -> Result<()> {
        if let Some((file, path)) = &self.file {
            file.sync_data().map_err(io_err("syncing", path))?;
        }
        Ok(())
    }
}

fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header; returns its first sequence number or what is wrong.
fn decode_segment_header(h: &[u8]) -> std::result::Result<u64, String> {
    if h.len() < SEGMENT_HEADER_LEN as usize {
        return Err(format!(
            "segment header cut short ({} of 32 bytes)",
            h.len()
        ));
    }
    if h[0..8] != SEGMENT_MAGIC {
        return Err("not a Haven change-log segment (bad magic)".into());
    }
    let stored = u32::from_le_bytes(h[28..32].try_into().unwrap_or_default());
    if crc32c(&h[0..28]) != stored {
        return Err("segment header checksum mismatch".into());
    }
    let version = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(format!(
            "segment format version {version} is not supported (this agent reads {FORMAT_VERSION})"
        ));
    }
    let len = u32::from_le_bytes(h[12..16].try_into().unwrap_or_default());
    if u64::from(len) != SEGMENT_HEADER_LEN {
        return Err(format!("segment header length {len}, expected 32"));
    }
    Ok(u64::from_le_bytes(h[16..24].try_into().unwrap_or_default()))
}

fn encode_record_header(kind: Kind, seq: u64, offset: u64, len: u64, payload: &[u8]) -> [u8; 36] {
    let mut h = [0u8; RECORD_HEADER_LEN as usize];
    h[0..4].copy_from_slice(&RECORD_MAGIC);
    h[4..6].copy_from_slice(&kind.code().to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&offset.to_le_bytes());
    h[24..32].copy_from_slice(&len.to_le_bytes());
    let mut crc = Crc32c::new();
    crc.update(&h[0..32]);
    crc.update(payload);
    h[32..36].copy_from_slice(&crc.finish().to_le_bytes());
    h
}

#[derive(Clone, Copy, Debug)]
struct RecordHeader {
    kind: Kind,
    seq: u64,
    offset: u64,
    len: u64,
    crc: u32,
    raw: [u8; 32],
}

impl RecordHeader {
    fn payload_len(&self) -> u64 {
        match self.kind {
            Kind::Write => self.len,
            Kind::Tag => TAG_PAYLOAD_LEN,
            _ => 0,
        }
    }

    fn total_len(&self) -> u64 {
        RECORD_HEADER_LEN + self.payload_len()
    }
}

/// Parses a record header (without checking the CRC, which covers the payload too).
fn decode_record_header(h: &[u8; 36]) -> std::result::Result<RecordHeader, String> {
    if h[0..4] != RECORD_MAGIC {
        return Err("bad record magic".into());
    }
    let code = u16::from_le_bytes([h[4], h[5]]);
    let kind = Kind::from_code(code).ok_or_else(|| format!("unknown record kind {code}"))?;
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if flags != 0 {
        return Err(format!("unknown record flags {flags:#x}"));
    }
    let seq = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
    let offset = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(h[24..32].try_into().unwrap_or_default());
    if kind == Kind::Write && len > MAX_PAYLOAD {
        return Err(format!(
            "write record of {len} bytes exceeds the maximum of {MAX_PAYLOAD}"
        ));
    }
    if offset.checked_add(len).is_none() {
        return Err(format!("record range {offset}+{len} overflows"));
    }
    if kind == Kind::Tag && (offset != 0 || len != 0) {
        return Err(format!("tag record with an extent {offset}+{len}"));
    }
    let crc = u32::from_le_bytes(h[32..36].try_into().unwrap_or_default());
    let mut raw = [0u8; 32];
    raw.copy_from_slice(&h[0..32]);
    Ok(RecordHeader {
        kind,
        seq,
        offset,
        len,
        crc,
        raw,
    })
}

/// Outcome of checking one record in place.
enum Check {
    Good(RecordHeader),
    Bad(String),
}

/// Checks the record at `pos` of a file of `file_len` bytes; with `want_data`, the payload is
/// returned too.
fn check_record(
    file: &File,
    pos: u64,
    file_len: u64,
    expected_seq: Option<u64>,
    want_data: Option<&mut Vec<u8>>,
) -> io::Result<Check> {
    let mut h = [0u8; RECORD_HEADER_LEN as usize];
    let got = read_at_most(file, &mut h, pos)?;
    if got < h.len() {
        return Ok(Check::Bad(format!(
            "record header cut short ({got} of 36 bytes)"
        )));
    }
    let hdr = match decode_record_header(&h) {
        Ok(hdr) => hdr,
        Err(why) => return Ok(Check::Bad(why)),
    };
    if let Some(want) = expected_seq
        && hdr.seq != want
    {
        return Ok(Check::Bad(format!(
            "sequence number {} where {want} was expected",
            hdr.seq
        )));
    }
    let payload = hdr.payload_len();
    if pos + RECORD_HEADER_LEN + payload > file_len {
        return Ok(Check::Bad(format!(
            "record payload cut short ({} of {payload} bytes)",
            file_len.saturating_sub(pos + RECORD_HEADER_LEN)
        )));
    }
    let mut crc = Crc32c::new();
    crc.update(&hdr.raw);
    if let Some(data) = want_data {
        data.clear();
        data.resize(payload as usize, 0);
        let got = read_at_most(file, data, pos + RECORD_HEADER_LEN)?;
        if got as u64 != payload {
            return Ok(Check::Bad("record payload cut short".into()));
        }
        crc.update(data);
    } else {
        let mut buf = vec![0u8; IO_CHUNK.min(payload as usize)];
        let mut done = 0u64;
        while done < payload {
            let n = (payload - done).min(buf.len() as u64) as usize;
            let got = read_at_most(file, &mut buf[..n], pos + RECORD_HEADER_LEN + done)?;
            if got != n {
                return Ok(Check::Bad("record payload cut short".into()));
            }
            crc.update(&buf[..n]);
            done += n as u64;
        }
    }
    if crc.finish() != hdr.crc {
        return Ok(Check::Bad(format!("record {} checksum mismatch", hdr.seq)));
    }
    Ok(Check::Good(hdr))
}

/// What [`ChangeLog::open`] walks a segment with: the sequence number the next record must
/// have, and the largest extent end of the records taken.
struct Recovery {
    next: u64,
    max_end: u64,
}

impl RecordFormat for Recovery {
    const RECORD_MAGIC: &'static [u8] = &RECORD_MAGIC;

    fn check_next(&mut self, file: &File, pos: u64, file_len: u64) -> io::Result<RecordCheck> {
        Ok(
            match check_record(file, pos, file_len, Some(self.next), None)? {
                Check::Good(hdr) => {
                    self.next += 1;
                    self.max_end = self.max_end.max(hdr.offset + hdr.len);
                    RecordCheck::Valid(hdr.total_len())
                }
                Check::Bad(why) => RecordCheck::Invalid(why),
            },
        )
    }

    /// A whole record (its payload's checksum too) whose sequence number is not below the
    /// next one expected.
    fn intact_record_at(&self, file: &File, pos: u64, file_len: u64) -> io::Result<Option<u64>> {
        Ok(match check_record(file, pos, file_len, None, None)? {
            Check::Good(h) if h.seq >= self.next => Some(h.seq),
            _ => None,
        })
    }
}

impl ChangeLog {
    /// Opens (or creates) the log in `dir`, recovering after a crash: every segment is
    /// validated, a torn tail of the last segment is truncated (and logged), damage anywhere
    /// else is [`LogError::Damaged`]. Everything recovered is durable when this returns.
    ///
    /// The folder is locked for this process (`flock` on `DIR/lock`).
    pub fn open(dir: impl AsRef<Path>, limits: Limits) -> Result<ChangeLog> {
        let dir = dir.as_ref().to_path_buf();
        if limits.segment_bytes < SEGMENT_HEADER_LEN + RECORD_HEADER_LEN
            || limits.max_bytes < limits.segment_bytes
        {
            return Err(LogError::Invalid(format!(
                "limits: segment_bytes ({}) must be at least {} and at most max_bytes ({})",
                limits.segment_bytes,
                SEGMENT_HEADER_LEN + RECORD_HEADER_LEN,
                limits.max_bytes
            )));
        }
        haven_fsutil::create_dir_all(&dir)?;
        let lock = match haven_fsutil::lock_dir(&dir) {
            Ok(lock) => lock,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(LogError::Locked { path: dir });
            }
            Err(e) => return Err(e.into()),
        };

        // Spare files of an earlier run are not reused (their pages are likely cold).
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(SPARE_PREFIX)
            {
                fs::remove_file(entry.path()).map_err(io_err("removing", &entry.path()))?;
            }
        }
        // A segment (or overflow marker) whose creation did not complete never held a record.
        let listing = list_segments(&dir, SEGMENT_EXT)?;
        for path in &listing.removed {
            tracing::warn!(path = %path.display(), "removed unfinished segment");
        }
        let mut files = listing.segments;
        if let Some(last) = files.last()
            && Self::creation_cut_short(&last.path)?
        {
            // Created without a sync and cut short by a killed process: it held no record.
            fs::remove_file(&last.path).map_err(io_err("removing", &last.path))?;
            tracing::warn!(path = %last.path.display(), "removed a segment whose creation did not complete");
            files.pop();
        }
        let mut segments = Vec::with_capacity(files.len());
        let count = files.len();
        for (i, file) in files.iter().enumerate() {
            let expected_first = segments.last().map(|s: &Segment| s.last_seq + 1);
            let seg =
                Self::recover_segment(&file.path, file.number, expected_first, i + 1 == count)?;
            segments.push(seg);
        }

        if segments.is_empty() {
            let seg = Self::create_segment(&dir, 1)?;
            segments.push(seg);
        }
        let last = segments[segments.len() - 1].clone();
        let active = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&last.path)
            .map_err(io_err("opening", &last.path))?;
        // What the previous process wrote may still be only in the page cache.
        active.sync_data().map_err(io_err("syncing", &last.path))?;
        sync_dir(&dir)?;
        let bytes_used = segments.iter().map(|s| s.len).sum();
        let next_seq = last.last_seq + 1;
        let overflowed = dir.join(OVERFLOW_MARKER).exists();
        let log = ChangeLog {
            dir,
            limits,
            _lock: lock,
            segments,
            active,
            next_seq,
            durable_seq: next_seq - 1,
            bytes_used,
            overflowed,
            durability: Durability::Machine,
            spares: Vec::new(),
        };
        tracing::info!(
            dir = %log.dir.display(),
            segments = log.segments.len(),
            first_seq = log.segments[0].first_seq,
            last_seq = log.next_seq - 1,
            bytes_used = log.bytes_used,
            overflowed = log.overflowed,
            "change log open"
        );
        Ok(log)
    }

    /// Whether a segment file is shorter than its header (a creation without a sync that a
    /// killed process cut short).
    fn creation_cut_short(path: &Path) -> Result<bool> {
        let file = File::open(path).map_err(io_err("opening", path))?;
        let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
        let got = read_at_most(&file, &mut h, 0).map_err(io_err("reading", path))?;
        Ok(got < h.len())
    }

    /// Validates one segment: its header here, then its records walked by
    /// `haven_fsutil::segments` with this format's checks ([`Recovery`]), which truncates a torn
    /// tail when it is the last segment.
    fn recover_segment(
        path: &Path,
        name_first: u64,
        expected_first: Option<u64>,
        is_last: bool,
    ) -> Result<Segment> {
        let seg = OpenSegment::open(path, is_last)?;
        let damaged = |offset: u64, what: String| LogError::Damaged {
            path: path.to_path_buf(),
            offset,
            what,
        };
        let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
        let got = read_at_most(&seg.file, &mut h, 0).map_err(io_err("reading", path))?;
        let first = decode_segment_header(&h[..got]).map_err(|why| damaged(0, why))?;
        if first != name_first {
            return Err(damaged(
                16,
                format!("header says first sequence {first} but the file name says {name_first}"),
            ));
        }
        if let Some(want) = expected_first
            && first != want
        {
            return Err(damaged(
                16,
                format!(
                    "first sequence {first}, but the previous segment ends at {} (records missing)",
                    want - 1
                ),
            ));
        }
        let mut records = Recovery {
            next: first,
            max_end: 0,
        };
        let recovered = seg.recover_records(SEGMENT_HEADER_LEN, &mut records)?;
        if let Some(torn) = &recovered.torn {
            tracing::warn!(
                path = %path.display(),
                offset = torn.offset,
                dropped_bytes = torn.dropped_bytes,
                reason = %torn.reason,
                "truncating torn tail of the change log"
            );
        }
        Ok(Segment {
            path: path.to_path_buf(),
            first_seq: first,
            last_seq: records.next - 1,
            len: recovered.end,
            max_end: records.max_end,
        })
    }

    /// Creates a segment atomically: temporary file, header, sync, rename, sync folder.
    fn create_segment(dir: &Path, first_seq: u64) -> Result<Segment> {
        let path = dir.join(segment_file_name(first_seq, SEGMENT_EXT));
        // Mode 0666 less the umask, as segments always had.
        haven_fsutil::write_atomic(&path, &encode_segment_header(first_seq), 0o666)?;
        Ok(Segment::empty(path, first_seq))
    }

    fn active_segment(&self) -> &Segment {
        // `segments` is never empty (open creates one, release keeps the active one).
        &self.segments[self.segments.len() - 1]
    }

    /// Starts a new active segment. With [`Durability::Machine`] the current one is synced
    /// first, so that every segment but the last is complete and durable, and the new one is
    /// created atomically; with [`Durability::Process`] neither is synced (the writer's lock is
    /// never held while a segment's worth of data goes to the disk).
    fn roll(&mut self) -> Result<()> {
        let old = self.active_segment().clone();
        let seg = match self.durability {
            Durability::Machine => {
                self.active
                    .sync_data()
                    .map_err(io_err("syncing", &old.path))?;
                self.durable_seq = self.durable_seq.max(old.last_seq);
                Self::create_segment(&self.dir, self.next_seq)?
            }
            Durability::Process => {
                // A reused file may hold older bytes past what was written: cut them, so that
                // every segment but the last ends with its last record.
                self.active
                    .set_len(old.len)
                    .map_err(io_err("truncating", &old.path))?;
                self.create_segment_unsynced(self.next_seq)?
            }
        };
        let active = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&seg.path)
            .map_err(io_err("opening", &seg.path))?;
        self.bytes_used += seg.len;
        self.segments.push(seg);
        self.active = active;
        Ok(())
    }

    /// Sets what a synced record survives (see [`Durability`]); [`Durability::Machine`] until
    /// then.
    pub fn set_durability(&mut self, durability: Durability) {
        self.durability = durability;
    }

    /// Makes every record durable on the disk whatever the [`Durability`]: every segment and
    /// the folder are synced (a clean stop). Returns the last record's seq.
    pub fn sync_to_disk(&mut self) -> Result<u64> {
        // A reused active file may hold older bytes past its last record.
        let active = self.active_segment();
        self.active
            .set_len(active.len)
            .map_err(io_err("truncating", &active.path))?;
        for spare in self.spares.drain(..) {
            let _ = fs::remove_file(&spare);
        }
        for seg in &self.segments {
            let file = File::open(&seg.path).map_err(io_err("opening", &seg.path))?;
            file.sync_data().map_err(io_err("syncing", &seg.path))?;
        }
        sync_dir(&self.dir)?;
        self.durable_seq = self.next_seq - 1;
        Ok(self.durable_seq)
    }

    /// Creates a segment with its header, without syncing it or its folder
    /// ([`Durability::Process`]), reusing a spare file when there is one (its older bytes past
    /// the new records hold older sequence numbers, which recovery never takes for records:
    /// a reopened last segment is cut after its last record). A killed process can leave a new
    /// file shorter than its header: [`ChangeLog::open`] removes such a last segment (it held
    /// no record).
    fn create_segment_unsynced(&mut self, first_seq: u64) -> Result<Segment> {
        let path = self.dir.join(segment_file_name(first_seq, SEGMENT_EXT));
        let file = match self.spares.pop() {
            Some(spare) => {
                fs::rename(&spare, &path).map_err(io_err("renaming", &spare))?;
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err("opening", &path))?
            }
            None => OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_err("creating", &path))?,
        };
        file.write_all_at(&encode_segment_header(first_seq), 0)
            .map_err(io_err("writing", &path))?;
        Ok(Segment::empty(path, first_seq))
    }

    /// Appends a record and returns its sequence number. The record is written, not durable:
    /// call [`ChangeLog::sync`] before acknowledging anything that depends on it. Refused with
    /// [`LogError::LogFull`] (nothing appended) when `max_bytes` would be exceeded.
    pub fn append(&mut self, change: Change<'_>) -> Result<u64> {
        let tag;
        let (kind, offset, len, payload) = match change {
            Change::Tag(info) => {
                tag = info.encode();
                (Kind::Tag, 0, 0, &tag[..])
            }
            other => other.parts(),
        };
        if payload.len() as u64 > MAX_PAYLOAD {
            return Err(LogError::Invalid(format!(
                "write of {} bytes exceeds the maximum record payload of {MAX_PAYLOAD}",
                payload.len()
            )));
        }
        if offset.checked_add(len).is_none() {
            return Err(LogError::Invalid(format!("range {offset}+{len} overflows")));
        }
        let size = RECORD_HEADER_LEN + payload.len() as u64;
        let active = self.active_segment();
        let roll = !active.is_empty() && active.len + size > self.limits.segment_bytes;
        let needed = size + if roll { SEGMENT_HEADER_LEN } else { 0 };
        if self.bytes_used + needed > self.limits.max_bytes {
            return Err(LogError::LogFull {
                used: self.bytes_used,
                needed,
                max_bytes: self.limits.max_bytes,
            });
        }
        if roll {
            self.roll()?;
        }
        let seq = self.next_seq;
        let header = encode_record_header(kind, seq, offset, len, payload);
        let at = self.active_segment().len;
        let written = self
            .active
            .write_all_at(&header, at)
            .and_then(|()| self.active.write_all_at(payload, at + RECORD_HEADER_LEN));
        if let Err(e) = written {
            // Leave no partial record behind; the next append starts at the same place.
            let _ = self.active.set_len(at);
            return Err(io_err("appending to", &self.active_segment().path)(e));
        }
        let idx = self.segments.len() - 1;
        let seg = &mut self.segments[idx];
        seg.len += size;
        seg.last_seq = seq;
        seg.max_end = seg.max_end.max(offset + len);
        self.bytes_used += size;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Makes every appended record durable (`fdatasync` of the active segment; segments are
    /// created with their folder synced) and returns the durable sequence number.
    pub fn sync(&mut self) -> Result<u64> {
        if self.durable_seq < self.next_seq - 1 {
            let handle = self.sync_handle()?;
            handle.sync()?;
            self.mark_synced(&handle);
        }
        Ok(self.durable_seq)
    }

    /// What [`ChangeLog::sync`] would sync, to be synced *outside* the caller's lock (group
    /// commit by the shipper): a handle on the active segment (none with
    /// [`Durability::Process`]) and the last record written. Syncing the handle makes every
    /// record up to that seq durable (with [`Durability::Machine`] earlier segments were synced
    /// when they were closed); then call [`ChangeLog::mark_synced`].
    pub fn sync_handle(&self) -> Result<SyncHandle> {
        let file = match self.durability {
            Durability::Machine => {
                let path = &self.active_segment().path;
                let file = self
                    .active
                    .try_clone()
                    .map_err(io_err("duplicating", path))?;
                Some((file, path.clone()))
            }
            Durability::Process => None,
        };
        Ok(SyncHandle {
            file,
            seq: self.next_seq - 1,
        })
    }

    /// Records that every record up to the handle's seq is durable, after the handle of
    /// [`ChangeLog::sync_handle`] was synced.
    pub fn mark_synced(&mut self, handle: &SyncHandle) {
        self.durable_seq = self.durable_seq.max(handle.seq.min(self.next_seq - 1));
    }

    /// Sequence number of the last appended record (0: none yet).
    pub fn written_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Every record up to this sequence number is durable (0: none).
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// The log's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The limits it was opened with.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Largest `offset + len` of the records held (0 when none).
    pub fn max_record_end(&self) -> u64 {
        self.segments.iter().map(|s| s.max_end).max().unwrap_or(0)
    }

    /// Whether the overflow marker exists: the records held are void (see the module docs).
    pub fn is_overflowed(&self) -> bool {
        self.overflowed
    }

    /// Creates the overflow marker durably (file synced, folder synced) before returning. The
    /// caller appends nothing more until [`ChangeLog::discard_all`].
    pub fn mark_overflowed(&mut self, why: &str) -> Result<()> {
        if self.overflowed {
            return Ok(());
        }
        let path = self.dir.join(OVERFLOW_MARKER);
        let text = format!(
            "HAVEN-LOG-OVERFLOWED 1\n{why}\nThe records in this folder are void: the disk has \
             writes they lack. The agent drops them and resyncs by block comparison.\n"
        );
        haven_fsutil::write_atomic(&path, text.as_bytes(), 0o666)?;
        self.overflowed = true;
        Ok(())
    }

    /// Drops every record held (written or not, acknowledged or not), then the overflow
    /// marker. Sequence numbers continue: the next record gets `next_seq` as before. Returns the
    /// bytes freed.
    pub fn discard_all(&mut self) -> Result<u64> {
        let freed = self.release(self.next_seq - 1)?;
        if self.overflowed {
            let path = self.dir.join(OVERFLOW_MARKER);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &path)(e)),
            }
            sync_dir(&self.dir)?;
            self.overflowed = false;
        }
        Ok(freed)
    }

    /// Counters.
    pub fn stats(&self) -> LogStats {
        LogStats {
            bytes_used: self.bytes_used,
            segments: self.segments.len(),
            first_seq: self
                .segments
                .iter()
                .find(|s| !s.is_empty())
                .map_or(self.next_seq, |s| s.first_seq),
            last_seq: self.next_seq - 1,
            durable_seq: self.durable_seq,
            next_seq: self.next_seq,
        }
    }

    /// Reads the records from `seq` up to the last one appended when this is called.
    /// `seq` must not be released yet; `written_seq() + 1` gives an empty reader.
    pub fn read_from(&self, seq: u64) -> Result<LogReader> {
        let first = self.stats().first_seq;
        if seq < first || seq > self.next_seq {
            return Err(LogError::Invalid(format!(
                "cannot read from sequence {seq}: the log holds {first}..{}",
                self.next_seq
            )));
        }
        let segments = self
            .segments
            .iter()
            .filter(|s| !s.is_empty() && s.last_seq >= seq)
            .cloned()
            .collect();
        Ok(LogReader {
            segments,
            next_seq: seq,
            upto: self.next_seq - 1,
            cur: None,
        })
    }

    /// Frees every whole segment whose records are all at most `upto_seq` (they were
    /// acknowledged downstream). When that includes the active segment, a new empty one is
    /// started first, so the sequence numbering survives a restart. Returns the bytes freed.
    pub fn release(&mut self, upto_seq: u64) -> Result<u64> {
        let upto = upto_seq.min(self.next_seq - 1);
        let active = self.active_segment();
        if !active.is_empty() && active.last_seq <= upto {
            self.roll()?;
        }
        let keep_from = self
            .segments
            .iter()
            .position(|s| s.last_seq > upto || s.is_empty())
            .unwrap_or(self.segments.len() - 1);
        let mut freed = 0;
        let drained: Vec<Segment> = self.segments.drain(..keep_from).collect();
        for seg in drained {
            if self.durability == Durability::Process && self.spares.len() < MAX_SPARES {
                let spare = self.dir.join(format!("{SPARE_PREFIX}{}", seg.first_seq));
                fs::rename(&seg.path, &spare).map_err(io_err("renaming", &seg.path))?;
                self.spares.push(spare);
            } else {
                fs::remove_file(&seg.path).map_err(io_err("removing", &seg.path))?;
            }
            freed += seg.len;
            tracing::debug!(path = %seg.path.display(), last_seq = seg.last_seq, "segment released");
        }
        // With `Durability::Process` the folder's entries need not survive a machine crash.
        if freed > 0 {
            self.bytes_used -= freed;
            if self.durability == Durability::Machine {
                sync_dir(&self.dir)?;
            }
        }
        Ok(freed)
    }
}

/// Iterator over records of a log, in sequence order (see [`ChangeLog::read_from`]). Each item
/// is checked again (magic, sequence, CRC32C) as it is read.
#[derive(Debug)]
pub struct LogReader {
    segments: Vec<Segment>,
    next_seq: u64,
    upto: u64,
    cur: Option<(File, u64, u64)>,
}

impl LogReader {
    fn open_segment(&mut self) -> Result<()> {
        let seg = self.segments.remove(0);
        let file = File::open(&seg.path).map_err(io_err("opening", &seg.path))?;
        let file_len = file
            .metadata()
            .map_err(io_err("reading metadata of", &seg.path))?
            .len();
        // Skip the records before `next_seq`, checking headers only.
        let mut pos = SEGMENT_HEADER_LEN;
        let mut seq = seg.first_seq;
        while seq < self.next_seq {
            let mut h = [0u8; RECORD_HEADER_LEN as usize];
            let got = read_at_most(&file, &mut h, pos).map_err(io_err("reading", &seg.path))?;
            let hdr = if got == h.len() {
                decode_record_header(&h)
            } else {
                Err("cut short".into())
            };
            match hdr {
                Ok(hdr) if hdr.seq == seq => pos += hdr.total_len(),
                Ok(hdr) => {
                    return Err(LogError::Damaged {
                        path: seg.path.clone(),
                        offset: pos,
                        what: format!("sequence number {} where {seq} was expected", hdr.seq),
                    });
                }
                Err(what) => {
                    return Err(LogError::Damaged {
                        path: seg.path.clone(),
                        offset: pos,
                        what,
                    });
                }
            }
            seq += 1;
        }
        self.cur = Some((file, pos, file_len));
        self.segments.insert(0, seg);
        Ok(())
    }

    fn read_next(&mut self) -> Result<Option<Record>> {
        if self.next_seq > self.upto {
            return Ok(None);
        }
        loop {
            let Some(seg) = self.segments.first() else {
                return Ok(None);
            };
            if seg.last_seq < self.next_seq {
                self.segments.remove(0);
                self.cur = None;
                continue;
            }
            if self.cur.is_none() {
                self.open_segment()?;
            }
            let path = self.segments[0].path.clone();
            let Some((file, pos, file_len)) = self.cur.as_mut() else {
                return Ok(None);
            };
            let mut data = Vec::new();
            let check = check_record(file, *pos, *file_len, Some(self.next_seq), Some(&mut data))
                .map_err(io_err("reading", &path))?;
            return match check {
                Check::Good(hdr) => {
                    *pos += hdr.total_len();
                    self.next_seq += 1;
                    Ok(Some(Record {
                        seq: hdr.seq,
                        kind: hdr.kind,
                        offset: hdr.offset,
                        len: hdr.len,
                        data,
                    }))
                }
                Check::Bad(what) => Err(LogError::Damaged {
                    path,
                    offset: *pos,
                    what,
                }),
            };
        }
    }
}

impl Iterator for LogReader {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.read_next() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => None,
            Err(e) => {
                // Stop after an error.
                self.upto = 0;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests;
