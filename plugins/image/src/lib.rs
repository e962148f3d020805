//! Format-neutral pieces of Haven's disk image formats.
//!
//! A format crate (vmdk, vhdx, vhd, qcow2, …) implements [`Format`] over any [`Backend`]: inside a
//! plugin the backend is the host's `storage` import (see `haven-plugin-sdk`); in native tests,
//! fuzz targets and tools it is [`StdBackend`], plain files below a directory. The format code is
//! the same in both, so what the tests check against qemu-img is what the plugin runs.
//!
//! Everything here is synchronous and allocation-bounded by the caller: no call reads more than
//! the buffer it is given, and formats must bound every table they load (see [`limits`]).

use std::fmt;

#[cfg(not(target_arch = "wasm32"))]
pub mod std_backend;
pub mod vhd;
#[cfg(not(target_arch = "wasm32"))]
pub use std_backend::StdBackend;

/// What kind of failure an [`Error`] is. Mirrors the WIT `error` variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller passed something unacceptable (bad offset, unknown option).
    InvalidArgument,
    /// A file does not exist.
    NotFound,
    /// A file to be created exists already.
    AlreadyExists,
    /// Valid, but not supported by this format implementation.
    Unsupported,
    /// Stored data is damaged; the message names file, structure and offset.
    Corrupt,
    /// A capability was not granted.
    Denied,
    /// The backend's I/O failed.
    Io,
    /// A size, count or memory limit was reached.
    Limit,
}

/// An error with a message for an operator: what, where, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io, message)
    }
    pub fn limit(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Limit, message)
    }
    /// Damaged data: `"{format}: {structure} at offset {offset:#x} {problem} (file {file})"`.
    pub fn corrupt(
        format: &str,
        file: &str,
        structure: &str,
        offset: u64,
        problem: impl fmt::Display,
    ) -> Self {
        Self::new(
            ErrorKind::Corrupt,
            format!("{format}: {structure} at offset {offset:#x} {problem} (file {file})"),
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Limits every format enforces, so hostile images cannot exhaust memory.
pub mod limits {
    /// Largest virtual disk size accepted: 64 TiB (VHDX's own maximum).
    pub const MAX_DISK_SIZE: u64 = 64 << 40;
    /// Most bytes of metadata tables (BAT, grain directory, L1, refcount table) one open image
    /// may hold in memory: 256 MiB.
    pub const MAX_TABLE_BYTES: u64 = 256 << 20;
    /// Longest chain of parent images followed.
    pub const MAX_CHAIN_DEPTH: usize = 16;
    /// Most extent files one image may consist of.
    pub const MAX_EXTENT_FILES: usize = 4096;
    /// Largest text descriptor read.
    pub const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;
}

/// How a file or image is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    ReadOnly,
    ReadWrite,
}

/// A byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

/// One file below a backend's root. Positional I/O only; `&self` so images can share files.
#[allow(clippy::len_without_is_empty)]
pub trait FileIo {
    /// The path this file was opened by (for error messages).
    fn name(&self) -> &str;
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize>;
    /// Writes all of `data` at `offset`, extending the file if needed.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// The file's length.
    fn len(&self) -> Result<u64>;
    /// Truncates or sparsely extends the file.
    fn set_len(&self, len: u64) -> Result<()>;
    /// Makes the range read as zeros, freeing space where possible. Length unchanged.
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()>;
    /// Allocated ranges intersecting `[offset, offset+len)`, clipped to it, in order.
    fn data_extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// Makes all writes durable.
    fn flush(&self) -> Result<()>;

    /// Reads exactly `buf.len()` bytes at `offset`; a short read is a [`ErrorKind::Corrupt`]
    /// error naming `structure` (the file is truncated).
    fn read_exact_at(&self, offset: u64, buf: &mut [u8], structure: &str) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(offset + done as u64, &mut buf[done..])?;
            if n == 0 {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "{structure} at offset {:#x} ({} bytes) lies past the end of file {} \
                         ({} bytes): the file is truncated",
                        offset,
                        buf.len(),
                        self.name(),
                        offset + done as u64
                    ),
                ));
            }
            done += n;
        }
        Ok(())
    }
}

/// Where a format's files live: a directory, or the plugin's granted storage root.
pub trait Backend: Clone + 'static {
    type File: FileIo + 'static;
    /// Opens an existing file.
    fn open(&self, path: &str, mode: OpenMode) -> Result<Self::File>;
    /// Creates a new, empty file for reading and writing; fails if it exists.
    fn create(&self, path: &str) -> Result<Self::File>;
    /// True when a file exists at `path`.
    fn exists(&self, path: &str) -> Result<bool>;
    /// Removes a file.
    fn remove(&self, path: &str) -> Result<()>;
    /// Atomically renames `from` to `to`, replacing it.
    fn rename(&self, from: &str, to: &str) -> Result<()>;
}

/// The path of `name` next to `path` (in the same folder): for extent files named by a
/// descriptor and parents named by a child. Absolute names are returned as they are (the backend
/// will refuse them if they leave its root).
pub fn sibling(path: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_owned();
    }
    match path.rfind('/') {
        Some(i) => format!("{}/{}", &path[..i], name),
        None => name.to_owned(),
    }
}

/// `path` with `.` and `..` components resolved lexically and `\` taken as `/`, so the files of
/// a parent chain can be compared whatever the spelling (loop detection). A `..` above the start
/// is kept: `../a` and `a` are different files.
pub fn normalize_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." if parts.last().is_some_and(|p| *p != "..") => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    if path.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

/// Creates `path` and lets `layout` write the new image's structures into it; if that fails
/// the file is removed, so a failed create leaves nothing behind.
pub fn create_file<B: Backend>(
    backend: &B,
    path: &str,
    layout: impl FnOnce(&B::File) -> Result<()>,
) -> Result<()> {
    let file = backend.create(path)?;
    let result = layout(&file);
    drop(file);
    if result.is_err() {
        let _ = backend.remove(path);
    }
    result
}

/// Format options (`key=value`), as given by `-o` or a pipeline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options(pub Vec<(String, String)>);

impl Options {
    /// Parses `a=b,c=d`. An empty string gives no options.
    pub fn parse(text: &str) -> Result<Self> {
        let mut pairs = Vec::new();
        for item in text.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| {
                Error::invalid(format!("option `{item}` is not of the form key=value"))
            })?;
            pairs.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Ok(Self(pairs))
    }
    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    /// Refuses any key not in `known`, naming the format and the keys it knows.
    pub fn check_known(&self, format: &str, known: &[&str]) -> Result<()> {
        for (k, _) in &self.0 {
            if !known.contains(&k.as_str()) {
                return Err(Error::invalid(format!(
                    "{format}: unknown option `{k}` (known options: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )));
            }
        }
        Ok(())
    }
}

/// What a new image looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    pub size: u64,
    pub sector_size: u32,
    pub options: Options,
}

/// What an open image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    pub subformat: String,
    pub size: u64,
    pub sector_size: u32,
    /// Every file of the image, descriptor first.
    pub files: Vec<String>,
    pub allocated_bytes: u64,
}

/// State of a range in an allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentState {
    /// The image stores data for the range.
    Data,
    /// The range reads as zeros and stores no data.
    Zero,
}

/// One range of an allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    pub offset: u64,
    pub length: u64,
    pub state: ExtentState,
}

/// Appends `entry` to `map`, merging it with the last entry when they touch and agree.
pub fn push_map(map: &mut Vec<MapEntry>, entry: MapEntry) {
    if entry.length == 0 {
        return;
    }
    if let Some(last) = map.last_mut()
        && last.state == entry.state
        && last.offset + last.length == entry.offset
    {
        last.length += entry.length;
        return;
    }
    map.push(entry);
}

/// An open disk image.
///
/// Offsets and lengths are bytes of the virtual disk. Implementations check them with
/// [`check_range`] and refuse anything outside the disk.
pub trait Image {
    fn info(&self) -> Result<ImageInfo>;
    /// Fills `buf` with the disk's bytes at `offset`.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes the range read as zeros; with `discard`, frees it where the format allows.
    fn write_zeroes(&mut self, offset: u64, len: u64, discard: bool) -> Result<()>;
    /// Makes everything written so far durable and the image consistent on disk.
    fn flush(&mut self) -> Result<()>;
    /// Allocation map of `[offset, offset+len)`: consecutive entries covering it, merged.
    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<MapEntry>>;
    /// Where `[offset, offset+len)` of the disk is stored unchanged and contiguously in one of
    /// the image's files — `(that file's path, offset in it)` — when reading it (`write` false)
    /// or writing it (`write` true) needs nothing else from the format. A caller that can move
    /// bytes without copying them (a plugin lending the host's buffers) then reads or writes
    /// the file directly. `Some` promises the range is valid for the disk and, with `write`,
    /// that the image is writable. The default, `None`, means: go through `read`/`write`.
    fn direct_location(&self, offset: u64, len: u64, write: bool) -> Option<(&str, u64)> {
        let _ = (offset, len, write);
        None
    }

    /// Flushes and finishes the image (a streamOptimized VMDK writes its footer here).
    fn close(&mut self) -> Result<()> {
        self.flush()
    }
}

/// A disk image format: how to recognise, open and create its images.
pub trait Format {
    /// The format's name, e.g. `vmdk`.
    const NAME: &'static str;
    /// The subformat if the file at `path` is an image of this format, by its content.
    fn probe<B: Backend>(backend: &B, path: &str) -> Result<Option<String>>;
    /// Opens an existing image.
    fn open<B: Backend>(
        backend: &B,
        path: &str,
        mode: OpenMode,
        options: &Options,
    ) -> Result<Box<dyn Image>>;
    /// Creates a new image; fails if `path` exists.
    fn create<B: Backend>(
        backend: &B,
        path: &str,
        options: &CreateOptions,
    ) -> Result<Box<dyn Image>>;
}

/// Checks that `[offset, offset+len)` lies within a disk of `size` bytes and is aligned to
/// `sector` bytes.
pub fn check_range(format: &str, offset: u64, len: u64, size: u64, sector: u32) -> Result<()> {
    let end = offset.checked_add(len);
    if end.is_none_or(|end| end > size) {
        return Err(Error::invalid(format!(
            "{format}: range {offset:#x}+{len:#x} lies outside the disk ({size} bytes)"
        )));
    }
    let sector = u64::from(sector.max(1));
    if !offset.is_multiple_of(sector) || !len.is_multiple_of(sector) {
        return Err(Error::invalid(format!(
            "{format}: range {offset:#x}+{len:#x} is not aligned to the {sector}-byte sector"
        )));
    }
    Ok(())
}

/// True when every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let chunks = data.chunks_exact(16);
    let rest = chunks.remainder();
    chunks
        .map(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")))
        .all(|w| w == 0)
        && rest.iter().all(|&b| b == 0)
}
