//! The error type of every store operation.

use std::io;
use std::path::{Path, PathBuf};

/// An error of the store. Every message says what went wrong, where (file, offset, sequence
/// number) and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O error, with what was being done and where.
    #[error("store: {what} {path}: {source}; check the disk and the folder's permissions", path = path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A file is damaged somewhere a crash cannot explain (or is not a file of ours).
    #[error(
        "store damaged: {path}, offset {offset}: {what}; move the file aside and resync the disk \
         from its source",
        path = path.display()
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Byte offset in that file.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A journal record failed its checksum or authentication when read: it was altered or
    /// damaged on disk after it was written.
    #[error(
        "journal record {seq} in {path} at offset {offset} failed verification (checksum or \
         AES-GCM authentication) and was refused; the data was altered or damaged on disk, \
         resync the disk from its source",
        path = path.display()
    )]
    Tampered {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the record in that file.
        offset: u64,
        /// The record's sequence number (for a record read in order whose header is unreadable,
        /// the sequence number that was expected next).
        seq: u64,
    },
    /// A journal segment does not authenticate under the at-rest key given: the key is not the
    /// one the journal was written with, or the segment header was altered. Nothing was changed.
    #[error(
        "journal segment {path} does not authenticate under the configured at-rest key: the key \
         file is not the one this journal was written with, or the segment header was altered; \
         configure the right key file, or move the journal folder aside and resync its disks",
        path = path.display()
    )]
    WrongKey {
        /// The segment file.
        path: PathBuf,
    },
    /// Another process (or another `Journal` in this one) holds the folder.
    #[error(
        "journal folder {path} is in use by another process or instance (a running \
         haven-gateway?); stop it or use another folder",
        path = path.display()
    )]
    Locked {
        /// The folder.
        path: PathBuf,
    },
    /// The append would exceed the journal's `max_bytes`; nothing was appended.
    #[error(
        "journal full: a record needing {needed} bytes would exceed the limit of {max_bytes} \
         bytes ({used} used); release records applied or forwarded downstream, or raise the limit"
    )]
    Full {
        /// Bytes in use.
        used: u64,
        /// Bytes the refused append needed.
        needed: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// A record's sequence number is not above the last one appended; nothing was appended.
    #[error(
        "journal: record {got} is out of order (the last appended is {last}); sequence numbers \
         must strictly increase, the sender must resume from {next}",
        next = last + 1
    )]
    OutOfOrder {
        /// The last sequence number appended.
        last: u64,
        /// The refused one.
        got: u64,
    },
    /// The journal does not hold the record asked for.
    #[error(
        "journal {path}: record {seq} is not held (it holds {first}..={last}, records up to \
         {released} were released); ask for a held record or resync",
        path = path.display()
    )]
    NotHeld {
        /// The journal's folder.
        path: PathBuf,
        /// The sequence number asked for.
        seq: u64,
        /// Oldest held sequence number.
        first: u64,
        /// Last appended sequence number.
        last: u64,
        /// Records up to this one were released.
        released: u64,
    },
    /// A request the store cannot take (bad argument, bad payload).
    #[error("store: {0}")]
    Invalid(String),
    /// An error of the state database (redb); the message names the file and the operation.
    #[error("state database: {0}")]
    Db(String),
    /// The at-rest key file cannot be used.
    #[error("key file {path}: {what}", path = path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong and what to do.
        what: String,
    },
}

/// Result of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<haven_fsutil::Error> for StoreError {
    fn from(e: haven_fsutil::Error) -> StoreError {
        StoreError::Io {
            what: e.step,
            path: e.path,
            source: e.source,
        }
    }
}

pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}
