//! The `target-writer` world: a disk image format.

use std::cell::RefCell;

use haven_image::{
    Backend, CreateOptions, ExtentState, FileIo, Format, Image, ImageInfo, MapEntry, OpenMode,
    Options, Result,
};

/// Generated bindings of the `target-writer` world.
#[allow(missing_docs, clippy::all, unsafe_code)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/haven-plugin@0.1.0",
        world: "target-writer",
        pub_export_macro: true,
        export_macro_name: "export_target_writer",
        default_bindings_module: "haven_plugin_sdk::writer::bindings",
    });
}

pub use bindings::exports::haven::plugin::plugin::PluginInfo;
use bindings::exports::haven::plugin::writer as wit;
pub use bindings::haven::plugin::buffers::Buffer;
pub use bindings::haven::plugin::log::Level;
use bindings::haven::plugin::storage;
pub use bindings::haven::plugin::types::Error as WitError;

crate::error_conversions!(bindings::haven::plugin::types::Error);

/// Writes a log line attributed to this plugin.
pub fn log(level: Level, message: &str) {
    bindings::haven::plugin::log::log(level, message);
}

/// An open disk of a target writer. The host serialises calls on one disk.
pub trait Disk: Sized + 'static {
    /// Creates a new disk at `path` below the storage root.
    fn create(path: &str, options: CreateOptions) -> Result<Self>;
    /// Opens an existing disk.
    fn open(path: &str, mode: OpenMode, options: Options) -> Result<Self>;
    /// The subformat when the file at `path` is an image of this format.
    fn probe(path: &str) -> Result<Option<String>>;
    fn info(&self) -> Result<ImageInfo>;
    /// Reads `len` bytes at `offset` into `dst` at `dst_offset`.
    fn read(&mut self, offset: u64, dst: &Buffer, dst_offset: u32, len: u32) -> Result<()>;
    /// Writes `len` bytes of `src` from `src_offset` at `offset`.
    fn write(&mut self, offset: u64, src: &Buffer, src_offset: u32, len: u32) -> Result<()>;
    fn write_zeroes(&mut self, offset: u64, len: u64, discard: bool) -> Result<()>;
    fn flush(&mut self) -> Result<()>;
    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<MapEntry>>;
    fn close(&mut self) -> Result<()>;
}

/// The resource behind the WIT `disk`: a [`Disk`], or nothing once closed.
pub struct DiskResource<D: Disk>(RefCell<Option<D>>);

impl<D: Disk> DiskResource<D> {
    fn with<T>(&self, f: impl FnOnce(&mut D) -> Result<T>) -> Result<T, WitError> {
        let mut slot = self.0.borrow_mut();
        let disk = slot
            .as_mut()
            .ok_or_else(|| WitError::InvalidArgument("the disk is closed".into()))?;
        f(disk).map_err(to_wit)
    }
}

fn options(pairs: Vec<bindings::haven::plugin::types::OptionPair>) -> Options {
    Options(pairs.into_iter().map(|p| (p.key, p.value)).collect())
}

impl<D: Disk> wit::GuestDisk for DiskResource<D> {
    fn create(path: String, o: wit::CreateOptions) -> Result<wit::Disk, WitError> {
        let o = CreateOptions {
            size: o.size,
            sector_size: o.sector_size,
            options: options(o.options),
        };
        let disk = D::create(&path, o).map_err(to_wit)?;
        Ok(wit::Disk::new(Self(RefCell::new(Some(disk)))))
    }

    fn open(
        path: String,
        access: wit::Access,
        o: Vec<bindings::haven::plugin::types::OptionPair>,
    ) -> Result<wit::Disk, WitError> {
        let mode = match access {
            wit::Access::ReadOnly => OpenMode::ReadOnly,
            wit::Access::ReadWrite => OpenMode::ReadWrite,
        };
        let disk = D::open(&path, mode, options(o)).map_err(to_wit)?;
        Ok(wit::Disk::new(Self(RefCell::new(Some(disk)))))
    }

    fn info(&self) -> Result<wit::DiskInfo, WitError> {
        let i = self.with(|d| d.info())?;
        Ok(wit::DiskInfo {
            format: i.format,
            subformat: i.subformat,
            size: i.size,
            sector_size: i.sector_size,
            files: i.files,
            allocated_bytes: i.allocated_bytes,
        })
    }

    fn read(&self, offset: u64, dst: &Buffer, dst_offset: u32, len: u32) -> Result<(), WitError> {
        self.with(|d| d.read(offset, dst, dst_offset, len))
    }

    fn write(&self, offset: u64, src: &Buffer, src_offset: u32, len: u32) -> Result<(), WitError> {
        self.with(|d| d.write(offset, src, src_offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, discard: bool) -> Result<(), WitError> {
        self.with(|d| d.write_zeroes(offset, len, discard))
    }

    fn flush(&self) -> Result<(), WitError> {
        self.with(|d| d.flush())
    }

    fn allocation_map(&self, offset: u64, len: u64) -> Result<Vec<wit::MapEntry>, WitError> {
        let map = self.with(|d| d.map(offset, len))?;
        Ok(map
            .into_iter()
            .map(|e| wit::MapEntry {
                offset: e.offset,
                length: e.length,
                state: match e.state {
                    ExtentState::Data => wit::ExtentState::Data,
                    ExtentState::Zero => wit::ExtentState::Zero,
                },
            })
            .collect())
    }

    fn close(&self) -> Result<(), WitError> {
        let result = self.with(|d| d.close());
        *self.0.borrow_mut() = None;
        result
    }
}

/// Exports a [`Disk`] implementation as this component's target writer.
///
/// ```ignore
/// haven_plugin_sdk::export_writer!(MyDisk, PluginInfo { name: "mine".into(), .. });
/// ```
#[macro_export]
macro_rules! export_writer {
    ($disk:ty, $describe:expr) => {
        struct HavenWriterExports;

        impl $crate::writer::bindings::exports::haven::plugin::plugin::Guest for HavenWriterExports {
            fn describe() -> $crate::writer::PluginInfo {
                $describe
            }
        }

        impl $crate::writer::bindings::exports::haven::plugin::writer::Guest for HavenWriterExports {
            type Disk = $crate::writer::DiskResource<$disk>;

            fn probe(path: String) -> Result<Option<String>, $crate::writer::WitError> {
                <$disk as $crate::writer::Disk>::probe(&path).map_err($crate::writer::to_wit)
            }
        }

        $crate::writer::bindings::export_target_writer!(
            HavenWriterExports with_types_in $crate::writer::bindings
        );
    };
}

/// Exports a [`haven_image::Format`] as this component's target writer, with files below the
/// storage root the host grants.
#[macro_export]
macro_rules! export_format {
    ($format:ty, $describe:expr) => {
        $crate::export_writer!($crate::writer::FormatDisk<$format>, $describe);
    };
}

/// A [`Disk`] made of a [`Format`]'s image over the host's storage. Data passes through plugin
/// memory (formats transform it); the raw writer implements [`Disk`] itself to avoid that.
pub struct FormatDisk<F: Format> {
    image: Box<dyn Image>,
    scratch: Vec<u8>,
    /// The file ranges the image stores unchanged are read and written through (see
    /// [`Image::direct_location`]), without the bytes entering plugin memory.
    direct: Option<DirectFile>,
    _format: std::marker::PhantomData<F>,
}

struct DirectFile {
    path: String,
    writable: bool,
    file: HostFile,
}

impl<F: Format + 'static> Disk for FormatDisk<F> {
    fn create(path: &str, options: CreateOptions) -> Result<Self> {
        Ok(Self::new(F::create(&HostBackend, path, &options)?))
    }

    fn open(path: &str, mode: OpenMode, options: Options) -> Result<Self> {
        Ok(Self::new(F::open(&HostBackend, path, mode, &options)?))
    }

    fn probe(path: &str) -> Result<Option<String>> {
        F::probe(&HostBackend, path)
    }

    fn info(&self) -> Result<ImageInfo> {
        self.image.info()
    }

    fn read(&mut self, offset: u64, dst: &Buffer, dst_offset: u32, len: u32) -> Result<()> {
        if let Some((handle, at)) = self.direct(offset, len, false)? {
            let n = handle
                .read_into(at, dst, dst_offset, len)
                .map_err(from_wit)?;
            if n < len {
                dst.zero(dst_offset + n, len - n).map_err(from_wit)?;
            }
            return Ok(());
        }
        self.scratch.resize(len as usize, 0);
        self.image.read(offset, &mut self.scratch)?;
        dst.write(dst_offset, &self.scratch).map_err(from_wit)
    }

    fn write(&mut self, offset: u64, src: &Buffer, src_offset: u32, len: u32) -> Result<()> {
        if let Some((handle, at)) = self.direct(offset, len, true)? {
            return handle
                .write_from(at, src, src_offset, len)
                .map_err(from_wit);
        }
        let data = src.read(src_offset, len).map_err(from_wit)?;
        self.image.write(offset, &data)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, discard: bool) -> Result<()> {
        self.image.write_zeroes(offset, len, discard)
    }

    fn flush(&mut self) -> Result<()> {
        self.image.flush()
    }

    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        self.image.map(offset, len)
    }

    fn close(&mut self) -> Result<()> {
        self.direct = None;
        self.image.close()
    }
}

impl<F: Format> FormatDisk<F> {
    fn new(image: Box<dyn Image>) -> Self {
        Self {
            image,
            scratch: Vec::new(),
            direct: None,
            _format: std::marker::PhantomData,
        }
    }

    /// The host file and offset holding `[offset, offset+len)` unchanged, if the image has one;
    /// the file is opened once and kept. (Its data reaches the disk with the image's own
    /// `flush`: an fsync covers the whole file, whichever handle wrote it.)
    fn direct(
        &mut self,
        offset: u64,
        len: u32,
        write: bool,
    ) -> Result<Option<(&storage::File, u64)>> {
        let Some((path, at)) = self.image.direct_location(offset, u64::from(len), write) else {
            return Ok(None);
        };
        let reuse = matches!(&self.direct, Some(d) if d.path == path && (d.writable || !write));
        if !reuse {
            let mode = if write {
                OpenMode::ReadWrite
            } else {
                OpenMode::ReadOnly
            };
            let file = HostBackend.open(path, mode)?;
            self.direct = Some(DirectFile {
                path: path.to_owned(),
                writable: write,
                file,
            });
        }
        let direct = self.direct.as_ref().expect("opened above");
        Ok(Some((direct.file.handle(), at)))
    }
}

/// Files below the storage root granted by the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostBackend;

/// A file of [`HostBackend`].
pub struct HostFile {
    name: String,
    file: storage::File,
}

impl HostFile {
    /// The host's file handle, for zero-copy transfers with [`Buffer`]s.
    pub fn handle(&self) -> &storage::File {
        &self.file
    }
}

/// Largest single read or write passed to the host in one call.
const MAX_IO: usize = 16 << 20;

impl FileIo for HostFile {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done).min(MAX_IO) as u32;
            let got = self
                .file
                .read(offset + done as u64, want)
                .map_err(from_wit)?;
            buf[done..done + got.len()].copy_from_slice(&got);
            done += got.len();
            if got.len() < want as usize {
                break;
            }
        }
        Ok(done)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        for (i, chunk) in data.chunks(MAX_IO).enumerate() {
            self.file
                .write(offset + (i * MAX_IO) as u64, chunk)
                .map_err(from_wit)?;
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        self.file.length().map_err(from_wit)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_length(len).map_err(from_wit)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.file.punch_hole(offset, len).map_err(from_wit)
    }

    fn data_extents(&self, offset: u64, len: u64) -> Result<Vec<haven_image::Extent>> {
        let extents = self.file.data_extents(offset, len).map_err(from_wit)?;
        Ok(extents
            .into_iter()
            .map(|e| haven_image::Extent {
                offset: e.offset,
                length: e.length,
            })
            .collect())
    }

    fn flush(&self) -> Result<()> {
        self.file.flush().map_err(from_wit)
    }
}

impl Backend for HostBackend {
    type File = HostFile;

    fn open(&self, path: &str, mode: OpenMode) -> Result<HostFile> {
        let flags = match mode {
            OpenMode::ReadOnly => storage::OpenFlags::empty(),
            OpenMode::ReadWrite => storage::OpenFlags::WRITE,
        };
        let file = storage::open(path, flags).map_err(from_wit)?;
        Ok(HostFile {
            name: path.to_owned(),
            file,
        })
    }

    fn create(&self, path: &str) -> Result<HostFile> {
        let flags =
            storage::OpenFlags::CREATE | storage::OpenFlags::EXCLUSIVE | storage::OpenFlags::WRITE;
        let file = storage::open(path, flags).map_err(from_wit)?;
        Ok(HostFile {
            name: path.to_owned(),
            file,
        })
    }

    fn exists(&self, path: &str) -> Result<bool> {
        storage::exists(path).map_err(from_wit)
    }

    fn remove(&self, path: &str) -> Result<()> {
        storage::remove(path).map_err(from_wit)
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        storage::rename(from, to).map_err(from_wit)
    }
}
