//! The journal: an append-only, encrypted log of one replication stream (one disk).
//!
//! The process server keeps one as its durable cache, the master target as its journal. Each
//! record is a [`haven_wire::Record`]; sequence numbers strictly increase (gaps are allowed).
//!
//! # Format (version 1, all integers little-endian)
//!
//! A journal is a folder of segment files named after their segment number,
//! `000000000001.hjnl`, `000000000002.hjnl`, …, plus a `lock` file. Only the last segment (the
//! *active* one) is appended to.
//!
//! Segment header, [`SEGMENT_HEADER_LEN`] bytes:
//!
//! | bytes  | field                                                              |
//! |--------|--------------------------------------------------------------------|
//! | 0..8   | magic `HVNJOURN`                                                   |
//! | 8..12  | format version ([`FORMAT_VERSION`])                                |
//! | 12..16 | header length (80)                                                 |
//! | 16..24 | segment number (as in the file name)                               |
//! | 24..40 | segment id: 128 random bits                                        |
//! | 40..48 | previous last sequence number: the last one appended to the journal before this segment (0: none) |
//! | 48..60 | reserved, zero                                                     |
//! | 60..76 | key check: AES-256-GCM tag of an empty plaintext under the segment key, nonce counter 2⁶⁴−1 (never a record's), bytes 0..60 as associated data |
//! | 76..80 | CRC32C of bytes 0..76                                              |
//!
//! The key check lets [`Journal::open`] tell a wrong at-rest key (or an altered segment header)
//! from a torn record before it truncates anything: [`StoreError::WrongKey`].
//!
//! Record: a plaintext header of [`RECORD_HEADER_LEN`] bytes, then the sealed body.
//!
//! | bytes  | field                                                              |
//! |--------|--------------------------------------------------------------------|
//! | 0..4   | magic `HVNJ`                                                       |
//! | 4      | encoding: 1 raw data, 2 zstd data, 3 zero, 4 trim, 5 tag           |
//! | 5..8   | reserved, zero                                                     |
//! | 8..12  | disk id                                                            |
//! | 12..16 | body length in bytes (plaintext length + 16-byte GCM tag)          |
//! | 16..24 | sequence number                                                    |
//! | 24..32 | disk offset of the extent (tags: 0)                                |
//! | 32..40 | extent length in bytes, uncompressed (tags: 0)                     |
//! | 40..48 | record index in the segment (0, 1, 2, …): the nonce counter        |
//! | 48..52 | reserved, zero                                                     |
//! | 52..56 | CRC32C of bytes 0..52                                              |
//!
//! Body: AES-256-GCM of the plaintext below, with the whole 56-byte header as associated data,
//! so a change to the header or the body fails authentication.
//!
//! | encoding | plaintext                                                        |
//! |----------|------------------------------------------------------------------|
//! | raw      | the extent's bytes                                               |
//! | zstd     | one zstd frame of the extent's bytes (only when smaller than the bytes) |
//! | zero     | empty (an all-zero `Data` payload is stored this way)            |
//! | trim     | empty                                                            |
//! | tag      | recovery point id (8), tag kind (1: 1 crash, 2 app), source time in ms (8) |
//!
//! The plaintext headers let the journal be scanned and indexed ([`Journal::entries`]) without
//! decrypting anything.
//!
//! # Keys and nonces (the nonce rule)
//!
//! Every segment has a random 128-bit id in its header. The segment's AES-256-GCM key is derived
//! from the master [`Key`] with HKDF-SHA256, salt = the segment id, info =
//! `haven-store journal segment key v1`. The 96-bit nonce of a record is its index in the
//! segment (8 bytes little-endian, then 4 zero bytes).
//!
//! A segment is appended to by one [`Journal`] instance only and is **never reopened for
//! append**: [`Journal::open`] always starts a fresh segment (new id, new key) for new appends,
//! even when the last segment has room. A torn tail truncated at open, or a record whose write
//! failed and was cut off, therefore never leads to a nonce being used again with a different
//! plaintext: after a failed write the instance also moves to a new segment before the next
//! append.
//!
//! # Durability
//!
//! [`Journal::append`] writes a record (it is *written*); [`Journal::sync`] makes every written
//! record durable (`fdatasync`) and returns the durable sequence number. The two are tracked
//! apart; only the durable one may be acknowledged.
//!
//! A segment is created atomically (`haven_fsutil::write_atomic`: header written to a temporary
//! file, synced, renamed, folder synced; a temporary file a crash left is removed at open), and
//! the active segment is synced before the next one is created, so every segment but
//! the last is complete and durable. On [`Journal::open`] every segment header and record header
//! is checked (CRC32C, lengths, increasing sequence numbers, record indexes, the chain of
//! "previous last sequence numbers"), and the records of the last segment are authenticated
//! too: a torn tail of the last segment (a record cut short or never fully written by a crash,
//! that is any bad record with no intact record after it, including one failing authentication)
//! is truncated and logged; damage anywhere else is [`StoreError::Damaged`] naming the file and
//! offset. A wrong at-rest key is found by the segment header's key check before anything is
//! truncated. The folder listing and this recovery walk are `haven_fsutil::segments`, shared
//! with the agent's change log; the record checks are this module's.
//! Record bodies of other segments are authenticated when read: a body altered after it was
//! written is refused with [`StoreError::Tampered`], never returned.
//!
//! Releasing every record still leaves the active segment, whose header keeps the last sequence
//! number, so [`JournalStats::last_seq`] survives a release and a restart.
//!
//! # Memory
//!
//! The journal keeps one small location entry (about 56 bytes) per record in memory, so that
//! [`Journal::get`] finds a record without reading the folder: about 56 MiB for a million
//! records.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use haven_fsutil::segments::{
    OpenSegment, RecordCheck, RecordFormat, RecoverError, list_segments, segment_file_name,
};
use haven_fsutil::{read_at_most, sync_dir};
use haven_wire::crc32c::crc32c;
use haven_wire::frame::MAX_DATA_LEN;
use haven_wire::{Payload, Record, Tag, TagKind, Write};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;

use crate::error::{Result, StoreError, io_err};
use crate::key::Key;
use crate::payload::is_all_zero;
use crate::util::{le32, le64, random};

/// Magic at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"HVNJOURN";
/// Magic at the start of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"HVNJ";
/// Format version written and understood.
pub const FORMAT_VERSION: u32 = 1;
/// Size of a segment header.
pub const SEGMENT_HEADER_LEN: u64 = 80;
/// Size of a record header.
pub const RECORD_HEADER_LEN: u64 = 56;
/// Size of the AES-GCM tag at the end of every body.
pub const AEAD_TAG_LEN: u64 = 16;
/// File name extension of segments.
pub const SEGMENT_EXT: &str = "hjnl";
/// HKDF info of segment keys.
const KEY_INFO: &[u8] = b"haven-store journal segment key v1";
/// Plaintext length of a tag body.
const TAG_BODY_LEN: u64 = 17;
const MAX_DATA: u64 = MAX_DATA_LEN as u64;
/// A segment is closed after this many records whatever its size.
const MAX_RECORDS_PER_SEGMENT: usize = u32::MAX as usize;
/// Nonce counter of a segment header's key check; records use 0..2³².
const KEY_CHECK_NONCE: u64 = u64::MAX;

/// Sizes and compression of a journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalOptions {
    /// Size at which the active segment is closed and a new one started (default 64 MiB; at
    /// least 1 KiB). A record larger than this gets a segment of its own.
    pub segment_bytes: u64,
    /// Most bytes all segments together may hold (default 4 GiB; at least `segment_bytes`); an
    /// append beyond it is refused with [`StoreError::Full`] and nothing is appended.
    pub max_bytes: u64,
    /// zstd level used to compress data at rest (default 1).
    pub zstd_level: i32,
    /// Whether uncompressed data is compressed at rest (default true). A journal fed by a
    /// hop that already compressed what compresses (the master target, fed by a process server)
    /// turns it off: data that arrives uncompressed did not compress.
    pub compress: bool,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            segment_bytes: 64 << 20,
            max_bytes: 4 << 30,
            zstd_level: 1,
            compress: true,
        }
    }
}

/// How a record's body is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Data as is (it did not compress).
    Raw,
    /// Data as one zstd frame.
    Zstd,
    /// An extent of zeroes (a `Zero` payload or all-zero data); no data stored.
    Zero,
    /// A discarded extent; no data stored.
    Trim,
    /// A consistency tag.
    Tag,
}

impl Encoding {
    fn code(self) -> u8 {
        match self {
            Encoding::Raw => 1,
            Encoding::Zstd => 2,
            Encoding::Zero => 3,
            Encoding::Trim => 4,
            Encoding::Tag => 5,
        }
    }

    fn from_code(code: u8) -> Option<Encoding> {
        Some(match code {
            1 => Encoding::Raw,
            2 => Encoding::Zstd,
            3 => Encoding::Zero,
            4 => Encoding::Trim,
            5 => Encoding::Tag,
            _ => return None,
        })
    }

    /// What a record of this encoding does.
    pub fn kind(self) -> EntryKind {
        match self {
            Encoding::Raw | Encoding::Zstd => EntryKind::Write,
            Encoding::Zero => EntryKind::Zero,
            Encoding::Trim => EntryKind::Trim,
            Encoding::Tag => EntryKind::Tag,
        }
    }
}

/// What a record does to its disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Bytes written.
    Write,
    /// An extent set to zero.
    Zero,
    /// An extent discarded.
    Trim,
    /// A consistency tag (recovery point); no extent.
    Tag,
}

/// What [`Journal::append`] stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendInfo {
    /// Bytes the record takes on disk (header and sealed body).
    pub stored_bytes: u64,
    /// How the body was stored.
    pub encoding: Encoding,
    /// A write's payload as [`Journal::get`] will return it (compressed when it was stored
    /// compressed), so that a consumer of fresh records can take them without reading them
    /// back; `None` for a tag.
    pub stored: Option<Payload>,
}

/// A record's metadata, read from its plaintext header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryMeta {
    /// Sequence number.
    pub seq: u64,
    /// What the record does.
    pub kind: EntryKind,
    /// Disk offset of the extent in bytes (tags: 0).
    pub offset: u64,
    /// Extent length in bytes, uncompressed (tags: 0).
    pub len: u64,
    /// Bytes the record takes on disk.
    pub stored_bytes: u64,
    /// Number of the segment holding it (its file name).
    pub segment: u64,
}

/// Counters of a journal. Sequence number 0 means "none".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalStats {
    /// Sequence number of the oldest record held; `last_seq + 1` when the journal holds none.
    pub first_seq: u64,
    /// Sequence number of the last record appended (written, maybe not durable), also after
    /// every record was released and across restarts.
    pub last_seq: u64,
    /// Every record up to this one is durable.
    pub durable_seq: u64,
    /// Bytes of all segment files.
    pub bytes: u64,
    /// Number of segment files.
    pub segments: u64,
    /// Number of records held.
    pub records: u64,
}

/// Where a record is.
#[derive(Clone, Copy, Debug)]
struct Loc {
    seq: u64,
    encoding: Encoding,
    offset: u64,
    len: u64,
    pos: u64,
    stored: u64,
}

#[derive(Clone)]
struct Segment {
    number: u64,
    path: PathBuf,
    prev_last: u64,
    len: u64,
    key: LessSafeKey,
    /// Record `i` has index (nonce counter) `i`.
    locs: Vec<Loc>,
}

impl Segment {
    fn last_seq(&self) -> u64 {
        self.locs.last().map_or(self.prev_last, |l| l.seq)
    }
}

fn segment_key(master: &Key, id: &[u8; 16]) -> Result<LessSafeKey> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, id).extract(master.bytes());
    let okm = prk.expand(&[KEY_INFO], &aead::AES_256_GCM).map_err(|_| {
        StoreError::Invalid("HKDF-SHA256 refused to derive a 32-byte segment key".into())
    })?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

fn nonce(index: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[0..8].copy_from_slice(&index.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn encode_segment_header(
    number: u64,
    id: &[u8; 16],
    prev_last: u64,
    key: &LessSafeKey,
) -> Result<[u8; SEGMENT_HEADER_LEN as usize]> {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&number.to_le_bytes());
    h[24..40].copy_from_slice(id);
    h[40..48].copy_from_slice(&prev_last.to_le_bytes());
    let check = key
        .seal_in_place_separate_tag(nonce(KEY_CHECK_NONCE), Aad::from(&h[0..60]), &mut [])
        .map_err(|_| StoreError::Invalid("AES-GCM sealing of a segment key check failed".into()))?;
    h[60..76].copy_from_slice(check.as_ref());
    let crc = crc32c(&h[0..76]);
    h[76..80].copy_from_slice(&crc.to_le_bytes());
    Ok(h)
}

/// Whether the key check of a segment header (checked by `decode_segment_header`) holds.
fn key_check_holds(h: &[u8], key: &LessSafeKey) -> bool {
    let mut tag = [0u8; AEAD_TAG_LEN as usize];
    tag.copy_from_slice(&h[60..76]);
    key.open_in_place(nonce(KEY_CHECK_NONCE), Aad::from(&h[0..60]), &mut tag)
        .is_ok()
}

/// Checks a segment header; returns (number, id, previous last seq) or what is wrong and where.
fn decode_segment_header(h: &[u8]) -> std::result::Result<(u64, [u8; 16], u64), (u64, String)> {
    if h.len() < SEGMENT_HEADER_LEN as usize {
        return Err((
            0,
            format!(
                "segment header cut short ({} of {SEGMENT_HEADER_LEN} bytes)",
                h.len()
            ),
        ));
    }
    if h[0..8] != SEGMENT_MAGIC {
        return Err((0, "not a Haven journal segment (bad magic)".into()));
    }
    if crc32c(&h[0..76]) != le32(h, 76) {
        return Err((76, "segment header checksum mismatch".into()));
    }
    let version = le32(h, 8);
    if version != FORMAT_VERSION {
        return Err((
            8,
            format!(
                "segment format version {version} is not supported (this build reads \
                 {FORMAT_VERSION})"
            ),
        ));
    }
    if u64::from(le32(h, 12)) != SEGMENT_HEADER_LEN {
        return Err((
            12,
            format!(
                "segment header length {}, expected {SEGMENT_HEADER_LEN}",
                le32(h, 12)
            ),
        ));
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&h[24..40]);
    Ok((le64(h, 16), id, le64(h, 40)))
}

/// A record header.
#[derive(Clone, Copy, Debug)]
struct RecHeader {
    encoding: Encoding,
    disk: u32,
    body_len: u32,
    seq: u64,
    offset: u64,
    len: u64,
    index: u64,
}

impl RecHeader {
    fn total_len(&self) -> u64 {
        RECORD_HEADER_LEN + u64::from(self.body_len)
    }

    fn encode(&self) -> [u8; RECORD_HEADER_LEN as usize] {
        let mut h = [0u8; RECORD_HEADER_LEN as usize];
        h[0..4].copy_from_slice(&RECORD_MAGIC);
        h[4] = self.encoding.code();
        h[8..12].copy_from_slice(&self.disk.to_le_bytes());
        h[12..16].copy_from_slice(&self.body_len.to_le_bytes());
        h[16..24].copy_from_slice(&self.seq.to_le_bytes());
        h[24..32].copy_from_slice(&self.offset.to_le_bytes());
        h[32..40].copy_from_slice(&self.len.to_le_bytes());
        h[40..48].copy_from_slice(&self.index.to_le_bytes());
        let crc = crc32c(&h[0..52]);
        h[52..56].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks a record header (CRC, fields, lengths).
    fn decode(h: &[u8; RECORD_HEADER_LEN as usize]) -> std::result::Result<RecHeader, String> {
        if h[0..4] != RECORD_MAGIC {
            return Err("bad record magic".into());
        }
        if crc32c(&h[0..52]) != le32(h, 52) {
            return Err("record header checksum mismatch".into());
        }
        let encoding =
            Encoding::from_code(h[4]).ok_or_else(|| format!("unknown record encoding {}", h[4]))?;
        if h[5..8] != [0, 0, 0] || h[48..52] != [0, 0, 0, 0] {
            return Err("reserved record header bytes are not zero".into());
        }
        let hdr = RecHeader {
            encoding,
            disk: le32(h, 8),
            body_len: le32(h, 12),
            seq: le64(h, 16),
            offset: le64(h, 24),
            len: le64(h, 32),
            index: le64(h, 40),
        };
        let body = u64::from(hdr.body_len);
        let ok = match encoding {
            Encoding::Raw => (1..=MAX_DATA).contains(&hdr.len) && body == hdr.len + AEAD_TAG_LEN,
            Encoding::Zstd => {
                (1..=MAX_DATA).contains(&hdr.len)
                    && (AEAD_TAG_LEN + 1..=MAX_DATA + AEAD_TAG_LEN).contains(&body)
            }
            Encoding::Zero | Encoding::Trim => body == AEAD_TAG_LEN,
            Encoding::Tag => hdr.offset == 0 && hdr.len == 0 && body == TAG_BODY_LEN + AEAD_TAG_LEN,
        };
        if !ok {
            return Err(format!(
                "record {} ({encoding:?}) has inconsistent lengths: extent {} bytes, body {body} \
                 bytes",
                hdr.seq, hdr.len
            ));
        }
        if hdr.offset.checked_add(hdr.len).is_none() {
            return Err(format!(
                "record {} extent {}+{} overflows",
                hdr.seq, hdr.offset, hdr.len
            ));
        }
        Ok(hdr)
    }
}

/// Why a record could not be read.
enum Bad {
    Io(io::Error),
    /// What is wrong; the header's sequence number when the header was readable.
    Record(String, Option<u64>),
}

impl From<io::Error> for Bad {
    fn from(e: io::Error) -> Self {
        Bad::Io(e)
    }
}

/// Reads the record header at `pos` and checks that the whole record lies within `file_len`.
fn read_header(file: &File, pos: u64, file_len: u64) -> std::result::Result<RecHeader, Bad> {
    let mut h = [0u8; RECORD_HEADER_LEN as usize];
    let got = read_at_most(file, &mut h, pos)?;
    if got < h.len() {
        return Err(Bad::Record(
            format!("record header cut short ({got} of {RECORD_HEADER_LEN} bytes)"),
            None,
        ));
    }
    let hdr = RecHeader::decode(&h).map_err(|why| Bad::Record(why, None))?;
    if pos + hdr.total_len() > file_len {
        return Err(Bad::Record(
            format!(
                "record {} cut short ({} of {} bytes)",
                hdr.seq,
                file_len.saturating_sub(pos),
                hdr.total_len()
            ),
            Some(hdr.seq),
        ));
    }
    Ok(hdr)
}

/// Reads, authenticates and decrypts the record at `pos`.
fn read_record(
    file: &File,
    key: &LessSafeKey,
    pos: u64,
    file_len: u64,
) -> std::result::Result<(RecHeader, Record), Bad> {
    let hdr = read_header(file, pos, file_len)?;
    let seq = Some(hdr.seq);
    let mut body = vec![0u8; hdr.body_len as usize];
    let got = read_at_most(file, &mut body, pos + RECORD_HEADER_LEN)?;
    if got != body.len() {
        return Err(Bad::Record(
            format!("record {} body cut short", hdr.seq),
            seq,
        ));
    }
    let aad = hdr.encode();
    let plain_len = key
        .open_in_place(nonce(hdr.index), Aad::from(&aad), &mut body)
        .map_err(|_| {
            Bad::Record(
                format!("record {} failed AES-GCM authentication", hdr.seq),
                seq,
            )
        })?
        .len();
    body.truncate(plain_len);
    let record = match hdr.encoding {
        Encoding::Tag => {
            let kind = match body[8] {
                1 => TagKind::Crash,
                2 => TagKind::App,
                k => {
                    return Err(Bad::Record(
                        format!("record {} has unknown tag kind {k}", hdr.seq),
                        seq,
                    ));
                }
            };
            Record::Tag(Tag {
                disk: hdr.disk,
                seq: hdr.seq,
                point: le64(&body, 0),
                kind,
                source_time_ms: le64(&body, 9),
            })
        }
        enc => {
            let data = match enc {
                Encoding::Raw => Payload::Data(Bytes::from(body)),
                Encoding::Zstd => Payload::Compressed {
                    // Checked against MAX_DATA_LEN by `decode`.
                    raw_len: hdr.len as u32,
                    bytes: Bytes::from(body),
                },
                Encoding::Zero => Payload::Zero { len: hdr.len },
                _ => Payload::Trim { len: hdr.len },
            };
            Record::Write(Write {
                disk: hdr.disk,
                seq: hdr.seq,
                offset: hdr.offset,
                data,
            })
        }
    };
    Ok((hdr, record))
}

/// What [`Journal::open`] walks a segment with: its key, whether its records are
/// authenticated (the last segment's) or only their headers checked, and the records taken.
struct Recovery<'a> {
    key: &'a LessSafeKey,
    authenticate: bool,
    /// The last sequence number taken (the segment's "previous last" before its first record).
    last: u64,
    locs: Vec<Loc>,
}

impl RecordFormat for Recovery<'_> {
    const RECORD_MAGIC: &'static [u8] = &RECORD_MAGIC;

    fn check_next(&mut self, file: &File, pos: u64, file_len: u64) -> io::Result<RecordCheck> {
        let index = self.locs.len() as u64;
        let checked = if self.authenticate {
            read_record(file, self.key, pos, file_len).map(|(hdr, _)| hdr)
        } else {
            read_header(file, pos, file_len)
        };
        let why = match checked {
            Ok(hdr) if hdr.index != index => {
                format!(
                    "record {} has index {} where {index} was expected",
                    hdr.seq, hdr.index
                )
            }
            Ok(hdr) if hdr.seq <= self.last => {
                format!("record {} does not follow record {}", hdr.seq, self.last)
            }
            Ok(hdr) => {
                self.locs.push(Loc {
                    seq: hdr.seq,
                    encoding: hdr.encoding,
                    offset: hdr.offset,
                    len: hdr.len,
                    pos,
                    stored: hdr.total_len(),
                });
                self.last = hdr.seq;
                return Ok(RecordCheck::Valid(hdr.total_len()));
            }
            Err(Bad::Io(e)) => return Err(e),
            Err(Bad::Record(why, _)) => why,
        };
        Ok(RecordCheck::Invalid(why))
    }

    /// An intact record header (not its body) with a sequence number above the last taken.
    fn intact_record_at(&self, file: &File, pos: u64, _file_len: u64) -> io::Result<Option<u64>> {
        let mut h = [0u8; RECORD_HEADER_LEN as usize];
        if read_at_most(file, &mut h, pos)? == h.len()
            && let Ok(hdr) = RecHeader::decode(&h)
            && hdr.seq > self.last
        {
            return Ok(Some(hdr.seq));
        }
        Ok(None)
    }
}

/// The journal of one replication stream. See the module documentation for the format and the
/// nonce rule.
pub struct Journal {
    dir: PathBuf,
    opts: JournalOptions,
    key: Key,
    _lock: File,
    /// Sorted by number; never empty; the last one is active.
    segments: Vec<Segment>,
    active: File,
    last_seq: u64,
    durable_seq: u64,
    bytes: u64,
    /// A write failed part-way: the next append starts a new segment.
    must_roll: bool,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.dir)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, recovering after a crash (see the module
    /// documentation), and starts a fresh segment for new appends. Everything recovered is
    /// durable when this returns. The folder is locked (`flock` on `DIR/lock`) while the
    /// `Journal` lives: a second opener gets [`StoreError::Locked`].
    pub fn open(dir: &Path, key: &Key, opts: JournalOptions) -> Result<Journal> {
        if opts.segment_bytes < 1024 || opts.max_bytes < opts.segment_bytes {
            return Err(StoreError::Invalid(format!(
                "journal options: segment_bytes ({}) must be at least 1024 and at most max_bytes \
                 ({})",
                opts.segment_bytes, opts.max_bytes
            )));
        }
        let levels = zstd::compression_level_range();
        if !levels.contains(&opts.zstd_level) {
            return Err(StoreError::Invalid(format!(
                "journal options: zstd_level {} is outside {}..={}",
                opts.zstd_level,
                levels.start(),
                levels.end()
            )));
        }
        let dir = dir.to_path_buf();
        haven_fsutil::create_dir_all(&dir)?;
        let lock = haven_fsutil::lock_dir(&dir).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => StoreError::Locked { path: dir.clone() },
            _ => e.into(),
        })?;

        // A segment whose creation did not complete never held a record.
        let listing = list_segments(&dir, SEGMENT_EXT)?;
        for path in &listing.removed {
            tracing::warn!(path = %path.display(), "removed unfinished journal segment");
        }
        let mut segments: Vec<Segment> = Vec::with_capacity(listing.segments.len() + 1);
        let count = listing.segments.len();
        for (i, file) in listing.segments.iter().enumerate() {
            let prev = segments.last().map(Segment::last_seq);
            let seg = recover_segment(&file.path, file.number, key, prev, i + 1 == count)?;
            segments.push(seg);
        }
        let last_seq = segments.last().map_or(0, Segment::last_seq);
        if let Some(last) = segments.last() {
            // What the previous process wrote may still be only in the page cache.
            File::open(&last.path)
                .and_then(|f| f.sync_data())
                .map_err(io_err("syncing", &last.path))?;
        }
        let number = segments.last().map_or(1, |s| s.number + 1);
        let seg = create_segment(&dir, key, number, last_seq)?;
        // Older segments without records carry nothing the new one does not.
        let mut removed = false;
        segments.retain(|s| {
            if s.locs.is_empty() {
                match fs::remove_file(&s.path) {
                    Ok(()) => {
                        removed = true;
                        false
                    }
                    Err(e) => {
                        tracing::warn!(path = %s.path.display(), error = %e, "cannot remove empty journal segment");
                        true
                    }
                }
            } else {
                true
            }
        });
        if removed {
            sync_dir(&dir)?;
        }
        let active = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&seg.path)
            .map_err(io_err("opening", &seg.path))?;
        segments.push(seg);
        let bytes = segments.iter().map(|s| s.len).sum();
        let journal = Journal {
            dir,
            opts,
            key: key.clone(),
            _lock: lock,
            segments,
            active,
            last_seq,
            durable_seq: last_seq,
            bytes,
            must_roll: false,
        };
        let stats = journal.stats();
        tracing::info!(
            dir = %journal.dir.display(),
            segments = stats.segments,
            records = stats.records,
            first_seq = stats.first_seq,
            last_seq = stats.last_seq,
            bytes = stats.bytes,
            "journal open"
        );
        Ok(journal)
    }

    fn active_segment(&self) -> &Segment {
        // `segments` is never empty: open creates one, release keeps the active one.
        &self.segments[self.segments.len() - 1]
    }

    /// Starts a new active segment; the current one is synced first so that every segment but
    /// the last is complete and durable.
    fn roll(&mut self) -> Result<()> {
        let (number, path) = {
            let old = self.active_segment();
            (old.number, old.path.clone())
        };
        self.active.sync_data().map_err(io_err("syncing", &path))?;
        self.durable_seq = self.last_seq;
        let seg = create_segment(&self.dir, &self.key, number + 1, self.last_seq)?;
        let active = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&seg.path)
            .map_err(io_err("opening", &seg.path))?;
        self.bytes += seg.len;
        self.segments.push(seg);
        self.active = active;
        self.must_roll = false;
        Ok(())
    }

    /// Appends a record. It is written, not durable: call [`Journal::sync`] before
    /// acknowledging it. Refused with [`StoreError::OutOfOrder`] when its sequence number is not
    /// above the last one appended, [`StoreError::Full`] when `max_bytes` would be exceeded and
    /// [`StoreError::Invalid`] for a payload the wire protocol does not allow; nothing is
    /// appended then.
    ///
    /// Data is stored as zero when all zero, zstd-compressed when that is smaller, as is
    /// otherwise; already compressed data is stored as it came (not decoded: a corrupt frame is
    /// found by whoever decompresses it).
    pub fn append(&mut self, record: &Record) -> Result<AppendInfo> {
        let seq = record.seq();
        if seq <= self.last_seq {
            return Err(StoreError::OutOfOrder {
                last: self.last_seq,
                got: seq,
            });
        }
        let header_len = RECORD_HEADER_LEN as usize;
        let mut buf: Vec<u8>;
        let mut stored = None;
        let (encoding, disk, offset, len) = match record {
            Record::Tag(t) => {
                buf = Vec::with_capacity(header_len + 17 + 16);
                buf.resize(header_len, 0);
                buf.extend_from_slice(&t.point.to_le_bytes());
                buf.push(t.kind as u8);
                buf.extend_from_slice(&t.source_time_ms.to_le_bytes());
                (Encoding::Tag, t.disk, 0, 0)
            }
            Record::Write(w) => {
                let (encoding, len) = match &w.data {
                    Payload::Data(data) => {
                        if data.len() as u64 > MAX_DATA {
                            return Err(StoreError::Invalid(format!(
                                "record {seq}: {} bytes of data exceed the maximum of \
                                 {MAX_DATA_LEN}",
                                data.len()
                            )));
                        }
                        if is_all_zero(data) {
                            buf = vec![0; header_len];
                            stored = Some(Payload::Zero {
                                len: data.len() as u64,
                            });
                            (Encoding::Zero, data.len() as u64)
                        } else {
                            let packed = if self.opts.compress {
                                zstd::bulk::compress(data, self.opts.zstd_level).map_err(|e| {
                                    StoreError::Invalid(format!(
                                        "record {seq}: zstd compression failed: {e}"
                                    ))
                                })?
                            } else {
                                Vec::new()
                            };
                            let (encoding, body): (_, &[u8]) =
                                if !packed.is_empty() && packed.len() < data.len() {
                                    (Encoding::Zstd, &packed)
                                } else {
                                    (Encoding::Raw, data)
                                };
                            buf = Vec::with_capacity(header_len + body.len() + 16);
                            buf.resize(header_len, 0);
                            buf.extend_from_slice(body);
                            stored = Some(if encoding == Encoding::Zstd {
                                Payload::Compressed {
                                    raw_len: data.len() as u32,
                                    bytes: Bytes::from(packed),
                                }
                            } else {
                                Payload::Data(data.clone())
                            });
                            (encoding, data.len() as u64)
                        }
                    }
                    Payload::Compressed { raw_len, bytes } => {
                        if *raw_len == 0
                            || *raw_len > MAX_DATA_LEN
                            || bytes.is_empty()
                            || bytes.len() as u64 > MAX_DATA
                        {
                            return Err(StoreError::Invalid(format!(
                                "record {seq}: compressed payload of {} bytes for {raw_len} raw \
                                 bytes is outside 1..={MAX_DATA_LEN}",
                                bytes.len()
                            )));
                        }
                        buf = Vec::with_capacity(header_len + bytes.len() + 16);
                        buf.resize(header_len, 0);
                        buf.extend_from_slice(bytes);
                        stored = Some(w.data.clone());
                        (Encoding::Zstd, u64::from(*raw_len))
                    }
                    Payload::Zero { len } => {
                        buf = vec![0; header_len];
                        stored = Some(w.data.clone());
                        (Encoding::Zero, *len)
                    }
                    Payload::Trim { len } => {
                        buf = vec![0; header_len];
                        stored = Some(w.data.clone());
                        (Encoding::Trim, *len)
                    }
                };
                if w.offset.checked_add(len).is_none() {
                    return Err(StoreError::Invalid(format!(
                        "record {seq}: extent {}+{len} overflows",
                        w.offset
                    )));
                }
                (encoding, w.disk, w.offset, len)
            }
        };
        let body_len = (buf.len() - header_len) as u64 + AEAD_TAG_LEN;
        let size = RECORD_HEADER_LEN + body_len;

        let active = self.active_segment();
        let roll = self.must_roll
            || active.locs.len() >= MAX_RECORDS_PER_SEGMENT
            || (!active.locs.is_empty() && active.len + size > self.opts.segment_bytes);
        let needed = size + if roll { SEGMENT_HEADER_LEN } else { 0 };
        if self.bytes + needed > self.opts.max_bytes {
            return Err(StoreError::Full {
                used: self.bytes,
                needed,
                max_bytes: self.opts.max_bytes,
            });
        }
        if roll {
            self.roll()?;
        }
        let active = self.active_segment();
        let index = active.locs.len() as u64;
        let at = active.len;
        let hdr = RecHeader {
            encoding,
            disk,
            // At most MAX_DATA_LEN + 16.
            body_len: body_len as u32,
            seq,
            offset,
            len,
            index,
        };
        let header = hdr.encode();
        buf[..header_len].copy_from_slice(&header);
        let tag = active
            .key
            .seal_in_place_separate_tag(nonce(index), Aad::from(&header), &mut buf[header_len..])
            .map_err(|_| StoreError::Invalid(format!("record {seq}: AES-GCM sealing failed")))?;
        buf.extend_from_slice(tag.as_ref());
        if let Err(e) = self.active.write_all_at(&buf, at) {
            // Leave no partial record behind, and never use this nonce again.
            let _ = self.active.set_len(at);
            self.must_roll = true;
            return Err(io_err("appending to", &self.active_segment().path)(e));
        }
        let idx = self.segments.len() - 1;
        let seg = &mut self.segments[idx];
        seg.locs.push(Loc {
            seq,
            encoding,
            offset,
            len,
            pos: at,
            stored: size,
        });
        seg.len += size;
        self.bytes += size;
        self.last_seq = seq;
        Ok(AppendInfo {
            stored_bytes: size,
            encoding,
            stored,
        })
    }

    /// Makes every appended record durable (`fdatasync` of the active segment; earlier segments
    /// were synced when closed) and returns the durable sequence number (0: none).
    pub fn sync(&mut self) -> Result<u64> {
        if self.durable_seq < self.last_seq {
            let path = &self.active_segment().path;
            self.active.sync_data().map_err(io_err("syncing", path))?;
            self.durable_seq = self.last_seq;
        }
        Ok(self.durable_seq)
    }

    /// The journal's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sequence number of the last record appended (0: none ever).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Every record up to this sequence number is durable (0: none).
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Records up to this sequence number were released (or never held): the oldest segment's
    /// "previous last sequence number".
    pub fn released_seq(&self) -> u64 {
        self.segments[0].prev_last
    }

    /// Counters.
    pub fn stats(&self) -> JournalStats {
        JournalStats {
            first_seq: self
                .segments
                .iter()
                .find_map(|s| s.locs.first())
                .map_or(self.last_seq + 1, |l| l.seq),
            last_seq: self.last_seq,
            durable_seq: self.durable_seq,
            bytes: self.bytes,
            segments: self.segments.len() as u64,
            records: self.segments.iter().map(|s| s.locs.len() as u64).sum(),
        }
    }

    /// Metadata of every record held, in order, from the plaintext headers (nothing is
    /// decrypted or read from disk).
    pub fn entries(&self) -> Vec<EntryMeta> {
        self.entries_from(0)
    }

    /// Metadata of the records held with seq ≥ `seq`, in order; its cost is in the number of
    /// segments plus the records returned.
    pub fn entries_from(&self, seq: u64) -> Vec<EntryMeta> {
        let mut out = Vec::new();
        for s in self.segments.iter().rev() {
            let start = s.locs.partition_point(|l| l.seq < seq);
            out.extend(s.locs[start..].iter().rev().map(|l| meta(s.number, l)));
            if start > 0 {
                break;
            }
        }
        out.reverse();
        out
    }

    fn not_held(&self, seq: u64) -> StoreError {
        let stats = self.stats();
        StoreError::NotHeld {
            path: self.dir.clone(),
            seq,
            first: stats.first_seq,
            last: stats.last_seq,
            released: self.released_seq(),
        }
    }

    /// Reads one record, checking its header and authenticating its body. Data comes back as
    /// stored: compressed data as [`Payload::Compressed`] (see [`crate::decompress`]), zeroes as
    /// [`Payload::Zero`]. [`StoreError::Tampered`] when verification fails,
    /// [`StoreError::NotHeld`] when the journal holds no record `seq`.
    pub fn get(&self, seq: u64) -> Result<Record> {
        let (seg, index) = self.find(seq).ok_or_else(|| self.not_held(seq))?;
        let loc = seg.locs[index];
        let file = File::open(&seg.path).map_err(io_err("opening", &seg.path))?;
        let tampered = || StoreError::Tampered {
            path: seg.path.clone(),
            offset: loc.pos,
            seq,
        };
        match read_record(&file, &seg.key, loc.pos, loc.pos + loc.stored) {
            Ok((hdr, record))
                if hdr.seq == seq && hdr.index == index as u64 && hdr.total_len() == loc.stored =>
            {
                Ok(record)
            }
            Ok(_) => Err(tampered()),
            Err(Bad::Io(e)) => Err(io_err("reading", &seg.path)(e)),
            Err(Bad::Record(why, _)) => {
                tracing::error!(path = %seg.path.display(), offset = loc.pos, seq, reason = %why, "journal record refused");
                Err(tampered())
            }
        }
    }

    /// The segment and index of record `seq`.
    fn find(&self, seq: u64) -> Option<(&Segment, usize)> {
        let i = self.segments.partition_point(|s| s.last_seq() < seq);
        let seg = self.segments.get(i)?;
        let j = seg.locs.binary_search_by_key(&seq, |l| l.seq).ok()?;
        Some((seg, j))
    }

    /// Reads the records with a sequence number of at least `seq`, up to the last one appended
    /// when this is called, in order. The reader opens the segment files itself and does not
    /// borrow the journal; records are verified as they are read (a failure ends the
    /// iteration with [`StoreError::Tampered`]). When records from `seq` on were already
    /// released, the reader yields [`StoreError::NotHeld`]. A segment released while the reader
    /// still needs it ends the iteration with an I/O error.
    pub fn read_from(&self, seq: u64) -> JournalReader {
        let mut reader = JournalReader {
            segments: VecDeque::new(),
            cur: None,
            pending_error: None,
            expected: seq,
        };
        let released = self.released_seq();
        if released > 0 && seq <= released {
            reader.pending_error = Some(self.not_held(seq));
            return reader;
        }
        for s in &self.segments {
            let start = s.locs.partition_point(|l| l.seq < seq);
            if start == s.locs.len() {
                continue;
            }
            reader.segments.push_back(ReadSegment {
                path: s.path.clone(),
                key: s.key.clone(),
                pos: s.locs[start].pos,
                index: start as u64,
                end: s.len,
                remaining: s.locs.len() - start,
            });
        }
        reader
    }

    /// Frees every whole segment whose records are all at most `upto_seq` (applied or
    /// forwarded downstream). When that includes the active segment, a new empty one is started
    /// first. Returns the bytes freed.
    pub fn release(&mut self, upto_seq: u64) -> Result<u64> {
        let upto = upto_seq.min(self.last_seq);
        let active = self.active_segment();
        if !active.locs.is_empty() && active.last_seq() <= upto {
            self.roll()?;
        }
        let last = self.segments.len() - 1;
        let keep_from = self
            .segments
            .iter()
            .position(|s| s.last_seq() > upto)
            .unwrap_or(last)
            .min(last);
        let mut freed = 0;
        for seg in self.segments.drain(..keep_from) {
            fs::remove_file(&seg.path).map_err(io_err("removing", &seg.path))?;
            freed += seg.len;
            tracing::debug!(path = %seg.path.display(), last_seq = seg.last_seq(), "journal segment released");
        }
        if freed > 0 {
            self.bytes -= freed;
            sync_dir(&self.dir)?;
        }
        Ok(freed)
    }
}

fn meta(segment: u64, l: &Loc) -> EntryMeta {
    EntryMeta {
        seq: l.seq,
        kind: l.encoding.kind(),
        offset: l.offset,
        len: l.len,
        stored_bytes: l.stored,
        segment,
    }
}

/// Creates a segment atomically: temporary file, header, sync, rename, sync folder.
fn create_segment(dir: &Path, master: &Key, number: u64, prev_last: u64) -> Result<Segment> {
    let id = random::<16>()?;
    let key = segment_key(master, &id)?;
    let path = dir.join(segment_file_name(number, SEGMENT_EXT));
    let header = encode_segment_header(number, &id, prev_last, &key)?;
    // Mode 0666 less the umask, as segments always had.
    haven_fsutil::write_atomic(&path, &header, 0o666)?;
    Ok(Segment {
        number,
        path,
        prev_last,
        len: SEGMENT_HEADER_LEN,
        key,
        locs: Vec::new(),
    })
}

/// Validates one segment: its header here, then its records walked by `haven_fsutil::segments`
/// with this format's checks ([`Recovery`]); the records of the last segment are authenticated
/// and its torn tail truncated.
fn recover_segment(
    path: &Path,
    name_number: u64,
    master: &Key,
    prev_last: Option<u64>,
    is_last: bool,
) -> Result<Segment> {
    let seg = OpenSegment::open(path, is_last)?;
    let damaged = |offset: u64, what: String| StoreError::Damaged {
        path: path.to_path_buf(),
        offset,
        what,
    };
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    let got = read_at_most(&seg.file, &mut h, 0).map_err(io_err("reading", path))?;
    let (number, id, seg_prev_last) =
        decode_segment_header(&h[..got]).map_err(|(at, why)| damaged(at, why))?;
    if number != name_number {
        return Err(damaged(
            16,
            format!("header says segment {number} but the file name says {name_number}"),
        ));
    }
    if let Some(want) = prev_last
        && seg_prev_last != want
    {
        return Err(damaged(
            40,
            format!(
                "segment follows sequence number {seg_prev_last}, but the previous segment ends \
                 at {want} (a segment is missing or was replaced)"
            ),
        ));
    }
    let key = segment_key(master, &id)?;
    if !key_check_holds(&h, &key) {
        return Err(StoreError::WrongKey {
            path: path.to_path_buf(),
        });
    }
    let mut records = Recovery {
        key: &key,
        authenticate: is_last,
        last: seg_prev_last,
        locs: Vec::new(),
    };
    let recovered = seg
        .recover_records(SEGMENT_HEADER_LEN, &mut records)
        .map_err(|e| match e {
            RecoverError::Damaged { path, offset, what } => {
                StoreError::Damaged { path, offset, what }
            }
            RecoverError::Io(e) => e.into(),
        })?;
    if let Some(torn) = &recovered.torn {
        tracing::warn!(
            path = %path.display(),
            offset = torn.offset,
            dropped_bytes = torn.dropped_bytes,
            reason = %torn.reason,
            "truncating torn tail of the journal"
        );
    }
    let locs = records.locs;
    Ok(Segment {
        number,
        path: path.to_path_buf(),
        prev_last: seg_prev_last,
        len: recovered.end,
        key,
        locs,
    })
}

struct ReadSegment {
    path: PathBuf,
    key: LessSafeKey,
    pos: u64,
    index: u64,
    end: u64,
    remaining: usize,
}

/// Iterator over a journal's records, in order (see [`Journal::read_from`]). It stops after the
/// first error.
pub struct JournalReader {
    segments: VecDeque<ReadSegment>,
    cur: Option<File>,
    pending_error: Option<StoreError>,
    /// The lowest sequence number the next record may have.
    expected: u64,
}

impl std::fmt::Debug for JournalReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalReader")
            .field("segments", &self.segments.len())
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl JournalReader {
    fn read_next(&mut self) -> Result<Option<Record>> {
        loop {
            let Some(seg) = self.segments.front_mut() else {
                return Ok(None);
            };
            if seg.remaining == 0 {
                self.segments.pop_front();
                self.cur = None;
                continue;
            }
            let file = match &self.cur {
                Some(f) => f,
                None => self
                    .cur
                    .insert(File::open(&seg.path).map_err(io_err("opening", &seg.path))?),
            };
            let tampered = |seq: Option<u64>| StoreError::Tampered {
                path: seg.path.clone(),
                offset: seg.pos,
                seq: seq.unwrap_or(self.expected),
            };
            return match read_record(file, &seg.key, seg.pos, seg.end) {
                Ok((hdr, record)) if hdr.index == seg.index && hdr.seq >= self.expected => {
                    seg.pos += hdr.total_len();
                    seg.index += 1;
                    seg.remaining -= 1;
                    self.expected = hdr.seq + 1;
                    Ok(Some(record))
                }
                Ok((hdr, _)) => Err(tampered(Some(hdr.seq))),
                Err(Bad::Io(e)) => Err(io_err("reading", &seg.path)(e)),
                Err(Bad::Record(why, seq)) => {
                    tracing::error!(path = %seg.path.display(), offset = seg.pos, reason = %why, "journal record refused");
                    Err(tampered(seq))
                }
            };
        }
    }
}

impl Iterator for JournalReader {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.pending_error.take() {
            self.segments.clear();
            return Some(Err(e));
        }
        match self.read_next() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => None,
            Err(e) => {
                self.segments.clear();
                Some(Err(e))
            }
        }
    }
}
