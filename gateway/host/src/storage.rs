//! The `storage` capability: files below the root granted to a plugin instance.
//!
//! Paths are checked twice: lexically here (no absolute paths, no `..`, nothing odd), then by
//! cap-std, which resolves every component beneath the root's directory handle and refuses a
//! symbolic link that leads out of it. A plugin without a storage grant is refused at load (it
//! may not even import the interface); every call still checks the grant.

use std::fs::File;
use std::io::ErrorKind as IoKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cap_std::fs::{Dir, OpenOptions};
use wasmtime::component::Resource;

use crate::State;
use crate::buffers::Buffer;
use crate::wit::since_v0_1_0::writer::haven::plugin::storage::{Host, HostFile, OpenFlags};
use crate::wit::since_v0_1_0::writer::haven::plugin::types::{Error, Extent};

/// Largest single read a plugin may ask for: 64 MiB.
pub const MAX_READ: u32 = 64 << 20;
/// Most extents one `data-extents` call returns before failing with `limit`.
pub const MAX_EXTENTS: usize = 1 << 20;
/// Most files one plugin instance may have open at once.
pub const MAX_OPEN_FILES: usize = 256;

/// A granted storage root, opened once.
#[derive(Debug)]
pub struct StorageGrant {
    root: PathBuf,
    dir: Dir,
    read_only: bool,
    /// Block devices granted by absolute path, besides the root.
    devices: Vec<PathBuf>,
}

impl StorageGrant {
    /// Opens `root`; it must be an existing directory. `devices` are block devices the plugin
    /// may open by their absolute path too.
    pub fn new(root: &Path, read_only: bool, devices: &[PathBuf]) -> std::io::Result<Self> {
        let dir = Dir::open_ambient_dir(root, cap_std::ambient_authority())?;
        Ok(Self {
            root: root.to_owned(),
            dir,
            read_only,
            devices: devices.to_vec(),
        })
    }

    /// Opens a granted block device (an absolute path named in the grant, exactly).
    fn open_device(&self, path: &str, flags: OpenFlags) -> Result<OpenFile, Error> {
        if flags.intersects(OpenFlags::CREATE | OpenFlags::TRUNCATE) {
            return Err(self.denied(path, "a granted device is never created or truncated"));
        }
        let write = flags.contains(OpenFlags::WRITE);
        if write {
            self.check_writable(path)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| Error::Io(format!("open `{path}`: {e}")))?;
        use std::os::unix::fs::FileTypeExt;
        if file
            .metadata()
            .map(|m| !m.file_type().is_block_device())
            .unwrap_or(true)
        {
            return Err(Error::InvalidArgument(format!(
                "open `{path}`: the grant names it as a device, but it is not a block device"
            )));
        }
        Ok(OpenFile {
            path: path.to_owned(),
            file,
            writable: write,
            device: true,
        })
    }

    fn check_writable(&self, path: &str) -> Result<(), Error> {
        if self.read_only {
            Err(self.denied(path, "the grant is read-only"))
        } else {
            Ok(())
        }
    }

    fn denied(&self, path: &str, why: &str) -> Error {
        Error::Denied(format!(
            "storage grant (root {}) refuses path `{path}`: {why}",
            self.root.display()
        ))
    }

    /// Lexical checks: relative, no `..`, no empty or odd components.
    fn check(&self, path: &str) -> Result<(), Error> {
        if path.is_empty() {
            return Err(self.denied(path, "the path is empty"));
        }
        if path.starts_with('/') {
            return Err(self.denied(
                path,
                "absolute paths are not allowed; name a path relative to the root",
            ));
        }
        if path.contains('\0') || path.contains('\\') {
            return Err(self.denied(path, "the path contains a NUL or backslash"));
        }
        if path.split('/').any(|c| c == "..") {
            return Err(self.denied(path, "`..` would leave the granted root"));
        }
        Ok(())
    }

    fn io_error(&self, path: &str, what: &str, e: std::io::Error) -> Error {
        match e.kind() {
            IoKind::NotFound => Error::NotFound(format!(
                "{what} `{path}`: no such file below the storage root"
            )),
            IoKind::AlreadyExists => {
                Error::AlreadyExists(format!("{what} `{path}`: the file exists"))
            }
            // cap-std reports an escape (through a symlink or otherwise) as PermissionDenied.
            IoKind::PermissionDenied => self.denied(path, "it leads outside the granted root"),
            _ => Error::Io(format!("{what} `{path}`: {e}")),
        }
    }

    fn open(&self, path: &str, flags: OpenFlags) -> Result<OpenFile, Error> {
        if self.devices.iter().any(|d| d.as_os_str() == path) {
            return self.open_device(path, flags);
        }
        self.check(path)?;
        let mut options = OpenOptions::new();
        let write = flags.intersects(OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE);
        if write {
            self.check_writable(path)?;
        }
        options.read(true).write(write);
        if flags.contains(OpenFlags::CREATE) {
            if flags.contains(OpenFlags::EXCLUSIVE) {
                options.create_new(true);
            } else {
                options.create(true);
            }
        }
        if flags.contains(OpenFlags::TRUNCATE) {
            options.truncate(true);
        }
        // Opening a FIFO or a terminal can block or change the host's state before the
        // regular-file check below: open without blocking and without a controlling terminal.
        {
            use cap_std::fs::OpenOptionsExt;
            use rustix::fs::OFlags;
            options.custom_flags((OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32);
        }
        let file = self
            .dir
            .open_with(path, &options)
            .map_err(|e| self.io_error(path, "open", e))?;
        let file = file.into_std();
        if file.metadata().map(|m| !m.is_file()).unwrap_or(true) {
            return Err(Error::InvalidArgument(format!(
                "open `{path}`: not a regular file"
            )));
        }
        Ok(OpenFile {
            path: path.to_owned(),
            file,
            writable: write,
            device: false,
        })
    }

    /// Makes a rename or removal below the root durable by syncing the folder it happened in.
    /// cap-std's directory handles cannot be synced (they are `O_PATH`), so the folder is
    /// opened by path: it was checked lexically, and syncing a folder changes nothing in it.
    fn sync_parent(&self, path: &str) -> Result<(), Error> {
        let parent = Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty());
        let folder = match parent {
            Some(p) => self.root.join(p),
            None => self.root.clone(),
        };
        // Only the plugin's own path in the message: the host's folders are not its business.
        haven_fsutil::sync_dir(&folder)
            .map_err(|e| Error::Io(format!("sync folder of `{path}`: {}", e.source)))
    }
}

/// A file a plugin opened.
#[derive(Debug)]
pub struct OpenFile {
    path: String,
    file: File,
    writable: bool,
    /// A granted block device: its size is where it ends, it has no holes and cannot be
    /// resized or punched (zeroes are written instead).
    device: bool,
}

impl OpenFile {
    fn io(&self, what: &str, e: std::io::Error) -> Error {
        Error::Io(format!("{what} `{}`: {e}", self.path))
    }

    fn check_writable(&self) -> Result<(), Error> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "`{}` was opened read-only",
                self.path
            )))
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == IoKind::Interrupted => {}
                Err(e) => return Err(self.io("read", e)),
            }
        }
        Ok(done)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.check_writable()?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.io("write", e))
    }
}

impl State {
    fn grant(&self, call: &str) -> Result<&StorageGrant, Error> {
        self.storage.as_ref().ok_or_else(|| {
            Error::Denied(format!(
                "storage.{call}: plugin `{}` has no storage grant (give it `storage_root` in its config)",
                self.name
            ))
        })
    }
}

/// Runs `f`, turning its error into the WIT result (host failures inside are plugin-visible).
fn ok<T>(r: Result<T, Error>) -> wasmtime::Result<Result<T, Error>> {
    Ok(r)
}

impl Host for State {
    fn open(
        &mut self,
        path: String,
        flags: OpenFlags,
    ) -> wasmtime::Result<Result<Resource<OpenFile>, Error>> {
        if self.open_files >= MAX_OPEN_FILES {
            return ok(Err(Error::Limit(format!(
                "open `{path}`: plugin `{}` has {MAX_OPEN_FILES} files open, the most allowed; \
                 close some first",
                self.name
            ))));
        }
        let file = match self.grant("open").and_then(|g| g.open(&path, flags)) {
            Ok(f) => f,
            Err(e) => return ok(Err(e)),
        };
        let handle = self.table.push(file)?;
        self.open_files += 1;
        ok(Ok(handle))
    }

    fn remove(&mut self, path: String) -> wasmtime::Result<Result<(), Error>> {
        ok(self.grant("remove").and_then(|g| {
            g.check(&path)?;
            g.check_writable(&path)?;
            g.dir
                .remove_file(&path)
                .map_err(|e| g.io_error(&path, "remove", e))?;
            g.sync_parent(&path)
        }))
    }

    fn rename(&mut self, from: String, to: String) -> wasmtime::Result<Result<(), Error>> {
        ok(self.grant("rename").and_then(|g| {
            g.check(&from)?;
            g.check(&to)?;
            g.check_writable(&from)?;
            g.dir
                .rename(&from, &g.dir, &to)
                .map_err(|e| g.io_error(&from, "rename", e))?;
            g.sync_parent(&to)
        }))
    }

    fn exists(&mut self, path: String) -> wasmtime::Result<Result<bool, Error>> {
        ok(self.grant("exists").and_then(|g| {
            g.check(&path)?;
            g.dir
                .try_exists(&path)
                .map_err(|e| g.io_error(&path, "look up", e))
        }))
    }
}

impl HostFile for State {
    fn read(
        &mut self,
        this: Resource<OpenFile>,
        offset: u64,
        len: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, Error>> {
        if len > MAX_READ {
            return ok(Err(Error::Limit(format!(
                "read of {len} bytes exceeds the {MAX_READ}-byte limit"
            ))));
        }
        let file = self.table.get(&this)?;
        let mut buf = vec![0; len as usize];
        ok(file.read_at(offset, &mut buf).map(|n| {
            buf.truncate(n);
            buf
        }))
    }

    fn read_into(
        &mut self,
        this: Resource<OpenFile>,
        offset: u64,
        dst: Resource<Buffer>,
        dst_offset: u32,
        len: u32,
    ) -> wasmtime::Result<Result<u32, Error>> {
        let buffer = self.table.get_mut(&dst)?;
        let range = match buffer.range_mut(dst_offset, len) {
            Ok(r) => r,
            Err(e) => return ok(Err(e)),
        };
        // The file and the buffer live in the same table: move the bytes out for the call and
        // put them back whatever happens.
        let mut data = std::mem::take(&mut buffer.data);
        let result = self
            .table
            .get(&this)
            .map(|f| f.read_at(offset, &mut data[range]));
        self.table.get_mut(&dst)?.data = data;
        ok(result?.map(|n| n as u32))
    }

    fn write(
        &mut self,
        this: Resource<OpenFile>,
        offset: u64,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), Error>> {
        ok(self.table.get(&this)?.write_at(offset, &data))
    }

    fn write_from(
        &mut self,
        this: Resource<OpenFile>,
        offset: u64,
        src: Resource<Buffer>,
        src_offset: u32,
        len: u32,
    ) -> wasmtime::Result<Result<(), Error>> {
        let buffer = self.table.get(&src)?;
        let range = match buffer.range(src_offset, len) {
            Ok(r) => r,
            Err(e) => return ok(Err(e)),
        };
        let data = std::mem::take(&mut self.table.get_mut(&src)?.data);
        let result = self
            .table
            .get(&this)
            .map(|f| f.write_at(offset, &data[range]));
        self.table.get_mut(&src)?.data = data;
        ok(result?)
    }

    fn length(&mut self, this: Resource<OpenFile>) -> wasmtime::Result<Result<u64, Error>> {
        let file = self.table.get(&this)?;
        if file.device {
            use std::io::Seek;
            return ok((&file.file)
                .seek(std::io::SeekFrom::End(0))
                .map_err(|e| file.io("size", e)));
        }
        ok(file
            .file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| file.io("stat", e)))
    }

    fn set_length(
        &mut self,
        this: Resource<OpenFile>,
        len: u64,
    ) -> wasmtime::Result<Result<(), Error>> {
        let file = self.table.get(&this)?;
        if file.device {
            return ok(Err(Error::Unsupported(format!(
                "`{}` is a device: it cannot be resized",
                file.path
            ))));
        }
        ok(file
            .check_writable()
            .and_then(|()| file.file.set_len(len).map_err(|e| file.io("resize", e))))
    }

    fn punch_hole(
        &mut self,
        this: Resource<OpenFile>,
        offset: u64,
        len: u64,
    ) -> wasmtime::Result<Result<(), Error>> {
        let file = self.table.get(&this)?;
        if file.device {
            // The caller writes zeroes instead.
            return ok(Err(Error::Unsupported(format!(
                "`{}` is a device: holes are not punched in it",
                file.path
            ))));
        }
        ok(file.check_writable().and_then(|()| {
            let size = file.file.metadata().map_err(|e| file.io("stat", e))?.len();
            let end = offset.saturating_add(len).min(size);
            if end <= offset {
                return Ok(());
            }
            haven_image::std_backend::punch_hole(&file.file, offset, end - offset)
                .map_err(|e| file.io("punch a hole in", e))
        }))
    }

    fn data_extents(
        &mut self,
        this: Resource<OpenFile>,
        offset: u64,
        len: u64,
    ) -> wasmtime::Result<Result<Vec<Extent>, Error>> {
        let file = self.table.get(&this)?;
        if file.device {
            // A device has no holes: all of it is data.
            return ok(Ok((len > 0)
                .then_some(Extent {
                    offset,
                    length: len,
                })
                .into_iter()
                .collect()));
        }
        let extents = match haven_image::std_backend::data_extents_at_most(
            &file.file,
            offset,
            len,
            MAX_EXTENTS + 1,
        ) {
            Ok(e) => e,
            Err(e) => return ok(Err(file.io("map holes of", e))),
        };
        if extents.len() > MAX_EXTENTS {
            return ok(Err(Error::Limit(format!(
                "`{}` has more than {MAX_EXTENTS} allocated extents in the range; ask for a smaller range",
                file.path
            ))));
        }
        ok(Ok(extents
            .into_iter()
            .map(|e| Extent {
                offset: e.offset,
                length: e.length,
            })
            .collect()))
    }

    fn flush(&mut self, this: Resource<OpenFile>) -> wasmtime::Result<Result<(), Error>> {
        let file = self.table.get(&this)?;
        ok(file.file.sync_all().map_err(|e| file.io("fsync", e)))
    }

    fn drop(&mut self, this: Resource<OpenFile>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        self.open_files -= 1;
        Ok(())
    }
}
