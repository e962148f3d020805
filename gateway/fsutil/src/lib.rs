//! haven-fsutil: Haven's crash-safe file layer, one copy for the agent, the gateways and the
//! store.
//!
//! # Durability contract
//!
//! - [`write_atomic`] replaces a file whole: once it returns, `path` holds the new bytes
//!   durably, and a crash or power loss at any moment leaves either the old content or the new
//!   one under the name, never a mix. Steps: a temporary file of this writer's own in the same
//!   folder (`.NAME.PID.N.tmp`, created exclusively, with the caller's mode), the bytes,
//!   `fsync`, rename over `path`, `fsync` of the folder. Writers of one path at once (threads
//!   or processes) each write their own temporary file: every one succeeds and the file holds
//!   one writer's bytes whole. On an error the temporary file is removed; a crash can leave one
//!   behind, which [`is_temporary`] recognises, so the owner of a folder (under its lock) can
//!   remove them when it opens it.
//! - [`write_new`] is the same with a link instead of the rename: the file appears whole, and
//!   only when it did not exist (an [`io::ErrorKind::AlreadyExists`] error otherwise).
//! - [`sync_dir`] makes a folder's entries (files created, renamed or removed in it) durable;
//!   [`sync_file`] a file's data and size; [`create_dir_all`] creates the missing folders of a
//!   path and makes each durable in its parent.
//! - [`lock_dir`] takes a folder for one owner (`flock` on `DIR/lock`).
//!
//! Every error is an [`Error`] naming the step and the file: `writing
//! /data/.disk.state.4242.0.tmp: No space left on device (os error 28)`. Callers wrap it in
//! their own error types (its parts are public) or pass it on.
//!
//! [`failpoint`]: named crash points (`HAVEN_FAILPOINTS`) for tests of real processes;
//! `fsutil.before-rename` sits between the temporary file's `fsync` and the rename.
//!
//! [`segments`]: the folder layout and the recovery at open of segmented append-only logs (the
//! agent's change log, the store's journal): segment files listed by number, crash leftovers
//! removed, each segment's records walked with the format's own checks, a torn tail of the
//! last segment truncated and synced, damage anywhere else an error naming file and offset.
//!
//! Std only, nothing async: the callers run it on threads of their own or blocking pools.

pub mod failpoint;
pub mod segments;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Name of the lock file [`lock_dir`] takes in a folder.
pub const LOCK_FILE: &str = "lock";

/// A failed step of a file operation: what was being done, to which file, and the error.
#[derive(Debug)]
pub struct Error {
    /// What was being done (`creating`, `writing`, `syncing`, `renaming into place`,
    /// `syncing folder`, …).
    pub step: &'static str,
    /// The file or folder it was done to (for a write, the temporary file until the rename).
    pub path: PathBuf,
    /// The operating system's error.
    pub source: io::Error,
}

impl Error {
    fn new(step: &'static str, path: &Path, source: io::Error) -> Error {
        Error {
            step,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The kind of the underlying error (e.g. `AlreadyExists` from [`write_new`],
    /// `WouldBlock` from [`lock_dir`]).
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.step, self.path.display(), self.source)
    }
}

// The message already carries the source: not repeated as `source()`, so a chain printed with
// `{:#}` says it once.
impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Replaces `path` with `bytes`, atomically and durably (see the crate docs). `mode` is the
/// new file's permissions as for `open(2)` (the umask applies): `0o600` for a private file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_atomic_with(path, mode, |f| f.write_all(bytes))
}

/// [`write_atomic`] with the content written by `write` into the temporary file (for content
/// made of parts, not worth gathering into one buffer).
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<()> {
    let tmp = write_temporary(path, mode, write)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::new("renaming into place", path, e));
    }
    sync_dir(folder_of(path))
}

/// Creates `path` holding `bytes`, atomically and durably, only if it does not exist: an error
/// of kind [`io::ErrorKind::AlreadyExists`] when it does (someone else's file is left alone).
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = write_temporary(path, mode, |f| f.write_all(bytes))?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked.map_err(|e| Error::new("creating", path, e))?;
    sync_dir(folder_of(path))
}

/// The temporary file of a write to `path`, written by `write` and synced; removed again if
/// anything failed. The failpoint `fsutil.before-rename` is hit once it is complete.
fn write_temporary(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        let why = io::Error::new(io::ErrorKind::InvalidInput, "the path names no file");
        Error::new("writing", path, why)
    })?;
    let dir = folder_of(path);
    let (tmp, mut file) = create_temporary(dir, name, mode)?;
    let written = write(&mut file)
        .map_err(|e| Error::new("writing", &tmp, e))
        .and_then(|()| file.sync_all().map_err(|e| Error::new("syncing", &tmp, e)));
    drop(file);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    failpoint::hit("fsutil.before-rename");
    Ok(tmp)
}

/// A new temporary file beside `name` in `dir`, created exclusively.
fn create_temporary(dir: &Path, name: &OsStr, mode: u32) -> Result<(PathBuf, File)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut attempts = 0;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.{n}.tmp", std::process::id()));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            // Left by a crashed process that had this pid: take the next number.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 1000 => {
                attempts += 1;
            }
            Err(e) => return Err(Error::new("creating", &tmp, e)),
        }
    }
}

/// Whether `file_name` is a temporary file of [`write_atomic`] or [`write_new`]
/// (`.NAME.PID.N.tmp`): one a crash left behind, if no writer is running in its folder.
pub fn is_temporary(file_name: &str) -> bool {
    let Some(rest) = file_name
        .strip_prefix('.')
        .and_then(|r| r.strip_suffix(".tmp"))
    else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mut parts = rest.rsplitn(3, '.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(n), Some(pid), Some(name)) => !name.is_empty() && digits(n) && digits(pid),
        _ => false,
    }
}

/// The folder holding `path` (`.` for a bare name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// `fsync` of a folder, so that a file created, renamed or removed in it stays so.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::new("syncing folder", dir, e))
}

/// `fsync` of a file by name (its data, size and attributes).
pub fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::new("syncing", path, e))
}

/// Creates `dir` and its missing parents, each made durable in its parent folder (a plain
/// `create_dir_all` leaves the new folders' entries to the next journal commit of the file
/// system, so files synced inside them could vanish with them at a power loss).
pub fn create_dir_all(dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    loop {
        match fs::symlink_metadata(at) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(at);
                match at.parent() {
                    Some(p) if !p.as_os_str().is_empty() => at = p,
                    _ => break,
                }
            }
            // Not a folder, or not reachable: `fs::create_dir_all` says which.
            Err(_) => break,
        }
    }
    fs::create_dir_all(dir).map_err(|e| Error::new("creating folder", dir, e))?;
    for created in missing.iter().rev() {
        sync_dir(folder_of(created))?;
    }
    Ok(())
}

/// Takes `dir` for this owner: an exclusive `flock` on `DIR/`[`LOCK_FILE`] (created if need
/// be), held until the returned file is dropped. When another owner (another process, or
/// another open of it in this one) holds it, the error's [`kind`](Error::kind) is
/// [`io::ErrorKind::WouldBlock`].
pub fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::new("opening", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(Error::new(
            "locking",
            &path,
            io::ErrorKind::WouldBlock.into(),
        )),
        Err(TryLockError::Error(e)) => Err(Error::new("locking", &path, e)),
    }
}

/// Reads up to `buf.len()` bytes of `file` at `pos`; returns how many were there (fewer only
/// at the end of the file).
pub fn read_at_most(file: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests;
