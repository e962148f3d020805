//! The raw target writer: a disk is one sparse file holding the disk's bytes at their offsets.
//!
//! Data never enters plugin memory: writes pass the host's buffer handle to
//! `storage.file.write-from`, reads to `storage.file.read-into`. Zeroed ranges become holes and
//! the allocation map comes from the file's holes, so an image stays as sparse as its data.

use haven_plugin_sdk::image::{
    CreateOptions, Error, ExtentState, ImageInfo, MapEntry, OpenMode, Options, Result, check_range,
    push_map,
};
use haven_plugin_sdk::writer::bindings::haven::plugin::storage::{self, File, OpenFlags};
use haven_plugin_sdk::writer::{Buffer, Disk, PluginInfo, from_wit};

/// Options raw understands.
const OPTIONS: &[&str] = &["sector_size"];
/// Zeros written per call where holes cannot be punched.
const ZERO_CHUNK: u64 = 4 << 20;

struct RawDisk {
    path: String,
    file: File,
    size: u64,
    sector_size: u32,
    writable: bool,
}

fn sector_size(options: &Options, default: u32) -> Result<u32> {
    match options.get("sector_size") {
        None => Ok(default),
        Some("512") => Ok(512),
        Some("4096") => Ok(4096),
        Some(other) => Err(Error::invalid(format!(
            "raw: sector_size must be 512 or 4096, not `{other}`"
        ))),
    }
}

impl RawDisk {
    fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_range("raw", offset, len, self.size, self.sector_size)
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "raw: {} is open read-only",
                self.path
            )))
        }
    }
}

impl Disk for RawDisk {
    fn create(path: &str, options: CreateOptions) -> Result<Self> {
        options.options.check_known("raw", OPTIONS)?;
        let sector_size = sector_size(&options.options, options.sector_size)?;
        if sector_size != options.sector_size {
            return Err(Error::invalid(format!(
                "raw: sector size {} conflicts with option sector_size={sector_size}",
                options.sector_size
            )));
        }
        if !options.size.is_multiple_of(u64::from(sector_size)) {
            return Err(Error::invalid(format!(
                "raw: size {} is not a multiple of the {sector_size}-byte sector",
                options.size
            )));
        }
        let flags = OpenFlags::CREATE | OpenFlags::EXCLUSIVE | OpenFlags::WRITE;
        let file = storage::open(path, flags).map_err(from_wit)?;
        file.set_length(options.size).map_err(from_wit)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            size: options.size,
            sector_size,
            writable: true,
        })
    }

    fn open(path: &str, mode: OpenMode, options: Options) -> Result<Self> {
        options.check_known("raw", OPTIONS)?;
        let sector_size = sector_size(&options, 512)?;
        let flags = match mode {
            OpenMode::ReadOnly => OpenFlags::empty(),
            OpenMode::ReadWrite => OpenFlags::WRITE,
        };
        let file = storage::open(path, flags).map_err(from_wit)?;
        let size = file.length().map_err(from_wit)?;
        if !size.is_multiple_of(u64::from(sector_size)) {
            return Err(Error::invalid(format!(
                "raw: {path} is {size} bytes, not a whole number of {sector_size}-byte sectors; \
                 extend it to the next sector (truncate -s) or name its sector size"
            )));
        }
        let writable = mode == OpenMode::ReadWrite;
        Ok(Self {
            path: path.to_owned(),
            file,
            size,
            sector_size,
            writable,
        })
    }

    fn probe(_path: &str) -> Result<Option<String>> {
        // Any file is a raw image; callers use raw when no other format recognises a file.
        Ok(None)
    }

    fn info(&self) -> Result<ImageInfo> {
        let allocated = self.file.data_extents(0, self.size).map_err(from_wit)?;
        Ok(ImageInfo {
            format: "raw".into(),
            subformat: String::new(),
            size: self.size,
            sector_size: self.sector_size,
            files: vec![self.path.clone()],
            allocated_bytes: allocated.iter().map(|e| e.length).sum(),
        })
    }

    fn read(&mut self, offset: u64, dst: &Buffer, dst_offset: u32, len: u32) -> Result<()> {
        self.check(offset, u64::from(len))?;
        let n = self
            .file
            .read_into(offset, dst, dst_offset, len)
            .map_err(from_wit)?;
        if n < len {
            // The file is shorter than the disk (truncated behind our back): the rest reads as
            // zeros, as a hole would.
            dst.zero(dst_offset + n, len - n).map_err(from_wit)?;
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, src: &Buffer, src_offset: u32, len: u32) -> Result<()> {
        self.check_writable()?;
        self.check(offset, u64::from(len))?;
        self.file
            .write_from(offset, src, src_offset, len)
            .map_err(from_wit)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _discard: bool) -> Result<()> {
        self.check_writable()?;
        self.check(offset, len)?;
        // A hole reads as zeros and holds no space: the right answer with or without discard.
        if self.file.punch_hole(offset, len).is_ok() {
            return Ok(());
        }
        // A file system without holes: write zeros, a bounded buffer at a time.
        let chunk = len.min(ZERO_CHUNK) as u32;
        let zeros = Buffer::new(chunk);
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(u64::from(chunk)) as u32;
            self.file.write_from(pos, &zeros, 0, n).map_err(from_wit)?;
            pos += u64::from(n);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.writable {
            self.file.flush().map_err(from_wit)
        } else {
            Ok(())
        }
    }

    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "raw: map range {offset:#x}+{len:#x} lies outside the disk ({} bytes)",
                    self.size
                ))
            })?;
        let mut map = Vec::new();
        let mut pos = offset;
        for e in self.file.data_extents(offset, len).map_err(from_wit)? {
            push_map(
                &mut map,
                MapEntry {
                    offset: pos,
                    length: e.offset - pos,
                    state: ExtentState::Zero,
                },
            );
            push_map(
                &mut map,
                MapEntry {
                    offset: e.offset,
                    length: e.length,
                    state: ExtentState::Data,
                },
            );
            pos = e.offset + e.length;
        }
        push_map(
            &mut map,
            MapEntry {
                offset: pos,
                length: end - pos,
                state: ExtentState::Zero,
            },
        );
        Ok(map)
    }

    fn close(&mut self) -> Result<()> {
        self.flush()
    }
}

haven_plugin_sdk::export_writer!(
    RawDisk,
    PluginInfo {
        name: "raw".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: "Sparse raw image files: the disk's bytes at their offsets".into(),
        kinds: vec!["raw".into()],
    }
);
