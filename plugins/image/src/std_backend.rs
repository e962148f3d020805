//! [`Backend`] over plain files below a directory, for native tests, fuzzing and tools.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind as IoKind;
use std::path::{Path, PathBuf};

use crate::{Backend, Error, ErrorKind, Extent, FileIo, OpenMode, Result};

/// Files below `root`. Paths are joined to the root as given: this backend trusts its caller (the
/// sandboxed one is the plugin host's).
#[derive(Debug, Clone)]
pub struct StdBackend {
    root: PathBuf,
}

impl StdBackend {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    fn path(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }
}

fn io_error(path: &str, what: &str, e: std::io::Error) -> Error {
    let kind = match e.kind() {
        IoKind::NotFound => ErrorKind::NotFound,
        IoKind::AlreadyExists => ErrorKind::AlreadyExists,
        IoKind::PermissionDenied => ErrorKind::Denied,
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("{what} {path}: {e}"))
}

/// A file of a [`StdBackend`].
#[derive(Debug)]
pub struct StdFile {
    name: String,
    file: File,
}

impl StdFile {
    /// Opens `path` directly (outside any backend), for tools.
    pub fn open(path: &Path, mode: OpenMode) -> Result<Self> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(mode == OpenMode::ReadWrite)
            .open(path)
            .map_err(|e| io_error(&name, "cannot open", e))?;
        Ok(Self { name, file })
    }
}

impl Backend for StdBackend {
    type File = StdFile;

    fn open(&self, path: &str, mode: OpenMode) -> Result<StdFile> {
        let mut file = StdFile::open(&self.path(path), mode)?;
        file.name = path.to_owned();
        Ok(file)
    }

    fn create(&self, path: &str) -> Result<StdFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.path(path))
            .map_err(|e| io_error(path, "cannot create", e))?;
        Ok(StdFile {
            name: path.to_owned(),
            file,
        })
    }

    fn exists(&self, path: &str) -> Result<bool> {
        Ok(self.path(path).exists())
    }

    fn remove(&self, path: &str) -> Result<()> {
        std::fs::remove_file(self.path(path)).map_err(|e| io_error(path, "cannot remove", e))
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        std::fs::rename(self.path(from), self.path(to))
            .map_err(|e| io_error(from, "cannot rename", e))
    }
}

impl FileIo for StdFile {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == IoKind::Interrupted => {}
                Err(e) => return Err(io_error(&self.name, "cannot read", e)),
            }
        }
        Ok(done)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| io_error(&self.name, "cannot write", e))
    }

    fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| io_error(&self.name, "cannot stat", e))?
            .len())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| io_error(&self.name, "cannot resize", e))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.len()?;
        let end = offset.saturating_add(len).min(size);
        if end <= offset {
            return Ok(());
        }
        punch_hole(&self.file, offset, end - offset)
            .map_err(|e| io_error(&self.name, "cannot punch a hole in", e))
    }

    fn data_extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        data_extents(&self.file, offset, len)
            .map_err(|e| io_error(&self.name, "cannot map holes of", e))
    }

    fn flush(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| io_error(&self.name, "cannot fsync", e))
    }
}

/// Deallocates `[offset, offset+len)` of `file`, keeping its size.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(std::io::Error::from)
}

/// The allocated ranges of `file` within `[offset, offset+len)` (SEEK_DATA / SEEK_HOLE).
pub fn data_extents(file: &File, offset: u64, len: u64) -> std::io::Result<Vec<Extent>> {
    data_extents_at_most(file, offset, len, usize::MAX)
}

/// Like [`data_extents`], but stops after `most` extents (a caller that enforces a limit asks
/// for one more than it allows, and never holds more).
pub fn data_extents_at_most(
    file: &File,
    offset: u64,
    len: u64,
    most: usize,
) -> std::io::Result<Vec<Extent>> {
    use rustix::fs::{SeekFrom, seek};
    let size = file.metadata()?.len();
    let end = offset.saturating_add(len).min(size);
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < most {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(p) => p,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = seek(file, SeekFrom::Hole(data)).map_err(std::io::Error::from)?;
        let stop = hole.min(end);
        out.push(Extent {
            offset: data,
            length: stop - data,
        });
        pos = stop;
    }
    Ok(out)
}
