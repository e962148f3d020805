//! Segmented append-only logs: the folder layout and the recovery at open, one copy for the
//! agent's change log (`*.hlog`) and the store's journal (`*.hjnl`).
//!
//! # Layout
//!
//! A log is a folder of segment files named after a number, at least [`NAME_DIGITS`] decimal
//! digits then the format's extension: `000000000001.hlog`, `000000004711.hlog`, … Only the
//! last segment (highest number) is ever appended to. [`list_segments`] returns the segments in
//! number order and removes the temporary files a crash left in the folder (those of
//! [`write_atomic`](crate::write_atomic), `.NAME.PID.N.tmp`, and the fixed `NAME.EXT.tmp` of
//! builds before it): a segment whose creation did not complete never held a record. The
//! caller holds the folder's lock ([`lock_dir`](crate::lock_dir)).
//!
//! # Recovery contract
//!
//! What a record is (header, checksum, authentication, sequence rules) is the format's: it
//! implements [`RecordFormat`], and [`OpenSegment::recover_records`] walks one segment with it
//! from the first record to the end of the last whole valid record, then decides what a bad
//! record means:
//!
//! - in the **last** segment, a bad record with no intact record after it (none of the places
//!   where [`RecordFormat::RECORD_MAGIC`] appears holds one, as
//!   [`RecordFormat::intact_record_at`] judges) is a torn tail: an append a crash cut short or
//!   never wrote whole. The file is truncated at the end of the last valid record and synced
//!   (`fsync`) before the call returns, and [`Recovered::torn`] says what was cut, for the
//!   caller to log.
//! - anywhere else (any bad record of an earlier segment, which was synced whole before the
//!   next one was created; a bad record of the last segment with an intact one after it) it is
//!   damage a crash cannot explain: [`RecoverError::Damaged`] names the file and the offset,
//!   and nothing is changed.
//!
//! A segment without bad records is left untouched (not even synced).
//!
//! Std only: the formats do their own checksums and cryptography behind the trait, and log
//! what was removed or cut themselves.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::{Error, read_at_most};

/// Fewest digits of a segment file's number (shorter numbers are padded with zeroes).
pub const NAME_DIGITS: usize = 12;

/// Bytes read at once when looking for an intact record after a bad one.
const SCAN_CHUNK: usize = 1024 * 1024;

/// The file name of segment `number` with extension `ext` (no dot): `000000000042.hlog`.
pub fn segment_file_name(number: u64, ext: &str) -> String {
    format!("{number:0width$}.{ext}", width = NAME_DIGITS)
}

/// The number of a segment file named `name` with extension `ext` (no dot); `None` when the
/// name is not a segment's (fewer than [`NAME_DIGITS`] digits, other characters, another
/// extension, a number above `u64::MAX`).
pub fn parse_segment_file_name(name: &str, ext: &str) -> Option<u64> {
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    if stem.len() < NAME_DIGITS || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// A segment file found in a log folder.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentFile {
    /// The number its name gives.
    pub number: u64,
    /// The file.
    pub path: PathBuf,
}

/// What [`list_segments`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// The segment files, by number (the last is the one appended to).
    pub segments: Vec<SegmentFile>,
    /// Temporary files a crash left, removed.
    pub removed: Vec<PathBuf>,
}

/// Lists the segment files with extension `ext` (no dot) in `dir`, in number order, and removes
/// the temporary files a crash left there (see the module docs). Other files (the lock, names
/// that are not valid UTF-8, …) are left alone. The removals are not synced: the caller syncs
/// the folder (or creates a file in it atomically) before relying on them.
pub fn list_segments(dir: &Path, ext: &str) -> crate::Result<Listing> {
    let legacy_temporary = format!(".{ext}.tmp");
    let mut listing = Listing::default();
    let entries = fs::read_dir(dir).map_err(|e| Error::new("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::new("listing", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if crate::is_temporary(name) || name.ends_with(&legacy_temporary) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| Error::new("removing", &path, e))?;
            listing.removed.push(path);
        } else if let Some(number) = parse_segment_file_name(name, ext) {
            listing.segments.push(SegmentFile {
                number,
                path: entry.path(),
            });
        }
    }
    listing.segments.sort_unstable();
    Ok(listing)
}

/// What a [`RecordFormat`] says of the bytes at an offset of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordCheck {
    /// A whole, valid record of this many bytes (its header included) that follows the ones
    /// taken before: the format has taken it in.
    Valid(u64),
    /// Not a whole, valid record that follows: what is wrong, for the error or the log (`record
    /// header cut short (20 of 36 bytes)`, `record 7 checksum mismatch`).
    Invalid(String),
}

/// A record format, as [`OpenSegment::recover_records`] walks it. The format keeps its own state
/// of the records taken so far (the next sequence number, an index of the records, …).
pub trait RecordFormat {
    /// The bytes every record begins with (not empty): after a bad record of the last
    /// segment, the rest of the file is searched for them to tell a torn tail from damage.
    const RECORD_MAGIC: &'static [u8];

    /// Checks the record at `pos` of the segment `file` of `file_len` bytes, the one that
    /// should follow those taken so far. A whole, valid record is taken in (the format updates
    /// its state) and [`RecordCheck::Valid`] gives its length, at least 1 and at most
    /// `file_len - pos`; anything else is [`RecordCheck::Invalid`] and changes no state. An
    /// `Err` is a failed read (the walk stops with it).
    fn check_next(&mut self, file: &File, pos: u64, file_len: u64) -> io::Result<RecordCheck>;

    /// Whether an intact record that could follow the ones taken so far begins at `pos` (where
    /// [`RECORD_MAGIC`](RecordFormat::RECORD_MAGIC) appears, after a bad record of the last
    /// segment): its sequence number if so. How much it checks (the header, or the whole
    /// record) is the format's choice.
    fn intact_record_at(&self, file: &File, pos: u64, file_len: u64) -> io::Result<Option<u64>>;
}

/// A torn tail cut from the last segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// Where it began: the end of the last valid record, the segment's length now.
    pub offset: u64,
    /// Bytes cut.
    pub dropped_bytes: u64,
    /// What was wrong with the record at `offset`.
    pub reason: String,
}

/// What [`OpenSegment::recover_records`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// End of the last whole valid record (the start offset when there is none): the
    /// segment's length after the recovery.
    pub end: u64,
    /// The torn tail cut from the last segment, if there was one.
    pub torn: Option<TornTail>,
}

/// Why a segment could not be recovered.
#[derive(Debug)]
pub enum RecoverError {
    /// Damage a crash cannot explain; nothing was changed.
    Damaged {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the bad record in that file.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A read, the truncation or the sync failed.
    Io(Error),
}

impl fmt::Display for RecoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoverError::Damaged { path, offset, what } => {
                write!(f, "{}, offset {offset}: {what}", path.display())
            }
            RecoverError::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for RecoverError {}

impl From<Error> for RecoverError {
    fn from(e: Error) -> RecoverError {
        RecoverError::Io(e)
    }
}

/// A segment file opened for recovery: read-only, or read and write when it is the last one
/// (whose torn tail may be cut).
#[derive(Debug)]
pub struct OpenSegment {
    /// The file's path.
    pub path: PathBuf,
    /// The open file; the format reads its segment header from it.
    pub file: File,
    /// The file's length when it was opened.
    pub len: u64,
    /// Whether it is the last segment of its log.
    pub is_last: bool,
}

impl OpenSegment {
    /// Opens `path`, writable when `is_last`, and reads its length.
    pub fn open(path: &Path, is_last: bool) -> crate::Result<OpenSegment> {
        let file = OpenOptions::new()
            .read(true)
            .write(is_last)
            .open(path)
            .map_err(|e| Error::new("opening", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::new("reading metadata of", path, e))?
            .len();
        Ok(OpenSegment {
            path: path.to_path_buf(),
            file,
            len,
            is_last,
        })
    }

    /// Walks the records from `start` (the end of the segment header the caller checked) with
    /// `format`, and cuts a torn tail of the last segment or reports damage (see the module
    /// docs).
    pub fn recover_records<F: RecordFormat + ?Sized>(
        &self,
        start: u64,
        format: &mut F,
    ) -> Result<Recovered, RecoverError> {
        const {
            assert!(
                !F::RECORD_MAGIC.is_empty(),
                "RECORD_MAGIC must not be empty"
            )
        };
        let mut pos = start;
        while pos < self.len {
            let check = format
                .check_next(&self.file, pos, self.len)
                .map_err(|e| Error::new("reading", &self.path, e))?;
            let why = match check {
                RecordCheck::Valid(len) if len > 0 && len <= self.len - pos => {
                    pos += len;
                    continue;
                }
                // The format broke its contract: its state no longer matches the file, so
                // cutting anything would be a guess.
                RecordCheck::Valid(len) => {
                    return Err(self.damaged(
                        pos,
                        format!(
                            "the format took a record of {len} bytes where {} remain",
                            self.len - pos
                        ),
                    ));
                }
                RecordCheck::Invalid(why) => why,
            };
            if !self.is_last {
                return Err(self.damaged(pos, why));
            }
            if let Some((at, seq)) = self.find_intact_after(pos + 1, format)? {
                return Err(self.damaged(
                    pos,
                    format!("{why}; an intact record {seq} follows at offset {at}"),
                ));
            }
            self.file
                .set_len(pos)
                .map_err(|e| Error::new("truncating", &self.path, e))?;
            self.file
                .sync_all()
                .map_err(|e| Error::new("syncing", &self.path, e))?;
            return Ok(Recovered {
                end: pos,
                torn: Some(TornTail {
                    offset: pos,
                    dropped_bytes: self.len - pos,
                    reason: why,
                }),
            });
        }
        Ok(Recovered {
            end: pos,
            torn: None,
        })
    }

    fn damaged(&self, offset: u64, what: String) -> RecoverError {
        RecoverError::Damaged {
            path: self.path.clone(),
            offset,
            what,
        }
    }

    /// The first place at or after `start` where the format finds an intact record that could
    /// follow: (offset, sequence number).
    fn find_intact_after<F: RecordFormat + ?Sized>(
        &self,
        start: u64,
        format: &F,
    ) -> Result<Option<(u64, u64)>, RecoverError> {
        let magic = F::RECORD_MAGIC;
        let reading = |e: io::Error| Error::new("reading", &self.path, e);
        let mut buf = vec![0u8; SCAN_CHUNK.min(self.len.saturating_sub(start) as usize)];
        let mut base = start;
        while base < self.len {
            let n = read_at_most(&self.file, &mut buf, base).map_err(reading)?;
            if n < magic.len() {
                break;
            }
            for (i, window) in buf[..n].windows(magic.len()).enumerate() {
                if window == magic {
                    let pos = base + i as u64;
                    if let Some(seq) = format
                        .intact_record_at(&self.file, pos, self.len)
                        .map_err(reading)?
                    {
                        return Ok(Some((pos, seq)));
                    }
                }
            }
            // Overlap by the magic's length less one, so a magic across the window edge is seen.
            base += (n - (magic.len() - 1)) as u64;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests;
