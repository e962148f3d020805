//! The VHDX metadata log: finding the active sequence of entries and replaying it.
//!
//! The log is a circular buffer of 4 KiB sectors. An entry is a header sector (64-byte header
//! and the first descriptors), more descriptor sectors if needed, then one data sector per data
//! descriptor. The active sequence ends at the valid entry with the highest sequence number and
//! starts at the entry its `tail` field names; every entry in between must be valid and number
//! one more than the one before.

use std::collections::HashMap;

use haven_image::{Error, ErrorKind, FileIo, Result, limits};

use crate::crc::crc32c_skip;
use crate::guid::Guid;
use crate::layout::{FORMAT, Header, MIB, le32, le64};

const SECTOR: usize = 4096;
const HEADER_BYTES: usize = 64;
const DESCRIPTOR_BYTES: usize = 32;
/// File offsets below this hold the file type identifier and the headers, which the log must
/// never touch.
const PROTECTED_END: u64 = 192 * 1024;

/// One change a log entry makes to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Write this 4 KiB sector at the file offset.
    Data { file_offset: u64, sector: Vec<u8> },
    /// Make this range read as zeros.
    Zero { file_offset: u64, length: u64 },
}

/// One valid log entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub start: usize,
    pub length: usize,
    pub tail: usize,
    pub sequence: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub changes: Vec<Change>,
}

/// The log region of the file, read whole into memory.
pub struct Log<'a> {
    bytes: Vec<u8>,
    guid: Guid,
    name: &'a str,
    offset: u64,
    budget: u64,
}

impl<'a> Log<'a> {
    /// Reads the log the header describes.
    pub fn read<F: FileIo>(file: &'a F, header: &Header) -> Result<Self> {
        let name = file.name();
        let offset = header.log_offset;
        let length = u64::from(header.log_length);
        let bad = |what: String| Error::corrupt(FORMAT, name, "log", offset, what);
        if offset < MIB || !offset.is_multiple_of(MIB) || !length.is_multiple_of(MIB) || length == 0
        {
            return Err(bad(format!(
                "of {length} bytes is misplaced (offset and length must be whole MiB past the first)"
            )));
        }
        if length > limits::MAX_TABLE_BYTES {
            return Err(Error::limit(format!(
                "vhdx: log of {name} is {length} bytes, more than the {} bytes Haven reads",
                limits::MAX_TABLE_BYTES
            )));
        }
        let mut bytes = vec![0u8; length as usize];
        file.read_exact_at(offset, &mut bytes, "vhdx log")?;
        Ok(Log {
            bytes,
            guid: header.log_guid,
            name,
            offset,
            budget: 2 * length + 16 * MIB,
        })
    }

    fn sectors(&self) -> usize {
        self.bytes.len() / SECTOR
    }

    /// `len` bytes starting at sector `start`, wrapping around the end of the log.
    fn span(&self, start: usize, len: usize) -> Vec<u8> {
        let at = start * SECTOR;
        let first = len.min(self.bytes.len() - at);
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&self.bytes[at..at + first]);
        v.extend_from_slice(&self.bytes[..len - first]);
        v
    }

    /// The entry starting at sector `start`, if it is a valid entry of this log.
    fn entry_at(&mut self, start: usize) -> Result<Option<Entry>> {
        let h = &self.bytes[start * SECTOR..start * SECTOR + HEADER_BYTES];
        if &h[..4] != b"loge" || Guid::from_slice(&h[32..]) != self.guid {
            return Ok(None);
        }
        let length = le32(h, 8) as usize;
        let tail = le32(h, 12) as usize;
        let sequence = le64(h, 16);
        let count = le32(h, 24) as usize;
        if length == 0
            || !length.is_multiple_of(SECTOR)
            || length > self.bytes.len()
            || sequence == 0
            || !tail.is_multiple_of(SECTOR)
            || tail >= self.bytes.len()
            || count > length / DESCRIPTOR_BYTES
        {
            return Ok(None);
        }
        let desc_sectors = (HEADER_BYTES + count * DESCRIPTOR_BYTES).div_ceil(SECTOR);
        if desc_sectors * SECTOR > length {
            return Ok(None);
        }
        self.budget = self.budget.checked_sub(length as u64).ok_or_else(|| {
            Error::limit(format!(
                "vhdx: validating the log of {} needs more checksum work than a real log does; \
                 the log is damaged or hostile (run `qemu-img check -r all`)",
                self.name
            ))
        })?;
        let e = self.span(start, length);
        if crc32c_skip(&e, 4) != le32(&e, 4) {
            return Ok(None);
        }
        let mut changes = Vec::with_capacity(count);
        let mut data_sector = desc_sectors;
        for i in 0..count {
            let d = &e[HEADER_BYTES + i * DESCRIPTOR_BYTES..][..DESCRIPTOR_BYTES];
            let file_offset = le64(d, 16);
            if le64(d, 24) != sequence || !file_offset.is_multiple_of(SECTOR as u64) {
                return Ok(None);
            }
            match &d[..4] {
                b"zero" => {
                    let length = le64(d, 8);
                    if !length.is_multiple_of(SECTOR as u64) {
                        return Ok(None);
                    }
                    changes.push(Change::Zero {
                        file_offset,
                        length,
                    });
                }
                b"desc" => {
                    if (data_sector + 1) * SECTOR > length {
                        return Ok(None);
                    }
                    let s = &e[data_sector * SECTOR..(data_sector + 1) * SECTOR];
                    let seq = (u64::from(le32(s, 4)) << 32) | u64::from(le32(s, SECTOR - 4));
                    if &s[..4] != b"data" || seq != sequence {
                        return Ok(None);
                    }
                    let mut sector = Vec::with_capacity(SECTOR);
                    sector.extend_from_slice(&d[8..16]);
                    sector.extend_from_slice(&s[8..SECTOR - 4]);
                    sector.extend_from_slice(&d[4..8]);
                    changes.push(Change::Data {
                        file_offset,
                        sector,
                    });
                    data_sector += 1;
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(Entry {
            start,
            length,
            tail: tail / SECTOR,
            sequence,
            flushed_file_offset: le64(h_of(&e), 48),
            last_file_offset: le64(h_of(&e), 56),
            changes,
        }))
    }

    /// The active sequence, oldest entry first; empty when the log holds no valid entry.
    pub fn active_sequence(&mut self) -> Result<Vec<Entry>> {
        let mut valid: HashMap<usize, Entry> = HashMap::new();
        for s in 0..self.sectors() {
            if let Some(e) = self.entry_at(s)? {
                valid.insert(s, e);
            }
        }
        if valid.is_empty() {
            return Ok(Vec::new());
        }
        let mut heads: Vec<&Entry> = valid.values().collect();
        heads.sort_by_key(|e| std::cmp::Reverse(e.sequence));
        for head in heads {
            let mut seq = Vec::new();
            let mut at = head.tail;
            let mut ok = false;
            for _ in 0..self.sectors() {
                let Some(e) = valid.get(&at) else { break };
                if seq
                    .last()
                    .is_some_and(|p: &Entry| e.sequence != p.sequence.wrapping_add(1))
                {
                    break;
                }
                seq.push(e.clone());
                if e.start == head.start {
                    ok = e.sequence == head.sequence;
                    break;
                }
                at = (at + e.length / SECTOR) % self.sectors();
            }
            if ok {
                return Ok(seq);
            }
        }
        Err(Error::corrupt(
            FORMAT,
            self.name,
            "log",
            self.offset,
            "holds valid entries but no complete sequence from a tail to a head; the image \
             cannot be recovered safely (run `qemu-img check -r all` on a copy)",
        ))
    }
}

fn h_of(entry: &[u8]) -> &[u8] {
    &entry[..HEADER_BYTES]
}

/// Applies `entries` to `file` and makes the result durable. The caller then clears the log
/// GUID in the headers.
pub fn replay<F: FileIo>(file: &F, header: &Header, entries: &[Entry]) -> Result<()> {
    let name = file.name();
    let log_start = header.log_offset;
    let log_end = log_start + u64::from(header.log_length);
    let file_len = file.len()?;
    let mut last = file_len;
    for e in entries {
        let at = log_start + (e.start * SECTOR) as u64;
        if e.flushed_file_offset > file_len {
            return Err(Error::corrupt(
                FORMAT,
                name,
                "log entry",
                at,
                format!(
                    "was written when the file held {} bytes, but it now holds {file_len}: the \
                     file was truncated",
                    e.flushed_file_offset
                ),
            ));
        }
        if e.last_file_offset > limits::MAX_DISK_SIZE * 2 {
            return Err(Error::corrupt(
                FORMAT,
                name,
                "log entry",
                at,
                "names an absurd file size",
            ));
        }
        last = last.max(e.last_file_offset);
    }
    let limit = last.next_multiple_of(MIB);
    for e in entries {
        let at = log_start + (e.start * SECTOR) as u64;
        for c in &e.changes {
            let (off, len) = match c {
                Change::Data { file_offset, .. } => (*file_offset, SECTOR as u64),
                Change::Zero {
                    file_offset,
                    length,
                } => (*file_offset, *length),
            };
            let end = off.saturating_add(len);
            if off < PROTECTED_END || end > limit || (off < log_end && log_start < end) {
                return Err(Error::corrupt(
                    FORMAT,
                    name,
                    "log entry",
                    at,
                    format!(
                        "would change {off:#x}+{len:#x}, which overlaps the headers or the log or \
                         lies past the file's end ({limit} bytes)"
                    ),
                ));
            }
        }
    }
    if limit > file_len {
        file.set_len(limit)?;
    }
    for e in entries {
        for c in &e.changes {
            match c {
                Change::Data {
                    file_offset,
                    sector,
                } => file.write_at(*file_offset, sector)?,
                Change::Zero {
                    file_offset,
                    length,
                } => file.punch_hole(*file_offset, *length)?,
            }
        }
    }
    file.flush()
}

/// The refusal for a read-only open of an image whose log must be replayed first.
pub fn needs_replay(name: &str, log_guid: Guid) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!(
            "vhdx: {name} has a metadata log (log GUID {}) that must be replayed before the \
             image can be read; open it read-write once (Haven replays the log) or run \
             `qemu-img check -r all {name}`",
            log_guid.to_braced()
        ),
    )
}
