//! qcow2 disk images (versions 2 and 3), as qemu writes them.
//!
//! Reading: L1/L2 tables for every cluster size qemu supports (512 bytes to 2 MiB), zero
//! clusters, deflate-compressed clusters, backing files (qcow2 or raw, named relative to the
//! image, depth-limited and loop-checked). Writing: version 3 images like
//! `qemu-img create -f qcow2` (16-bit refcounts), with refcounts kept exact so that
//! `qemu-img check` finds neither errors nor leaks. Persistent dirty bitmaps can be listed and
//! read as dirty extents ([`list_bitmaps`], [`dirty_extents`]) for changed-block tracking.
//!
//! Refused with a clear error: encryption, external data files, extended L2 entries, zstd
//! compression, unknown incompatible features; writing to images with internal snapshots or a
//! dirty (lazy refcounts) or corrupt flag.

use haven_image::{
    Backend, CreateOptions, Error, Extent, Format, Image, OpenMode, Options, Result, limits,
};

mod bitmap;
mod header;
mod image;

pub use bitmap::BitmapInfo;

use image::Qcow2Image;

/// The qcow2 format.
pub struct Qcow2;

/// Default cluster size, as qemu-img uses.
pub const DEFAULT_CLUSTER_SIZE: u64 = 65536;

impl Format for Qcow2 {
    const NAME: &'static str = "qcow2";

    fn probe<B: Backend>(backend: &B, path: &str) -> Result<Option<String>> {
        let file = backend.open(path, OpenMode::ReadOnly)?;
        let mut head = [0u8; 8];
        let n = haven_image::FileIo::read_at(&file, 0, &mut head)?;
        if n < 8 || head[..4] != header::MAGIC {
            return Ok(None);
        }
        let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        Ok(Some(format!("v{version}")))
    }

    fn open<B: Backend>(
        backend: &B,
        path: &str,
        mode: OpenMode,
        options: &Options,
    ) -> Result<Box<dyn Image>> {
        options.check_known("qcow2", &[])?;
        let mut chain = Vec::new();
        Ok(Box::new(Qcow2Image::open_chain(
            backend, path, mode, &mut chain,
        )?))
    }

    fn create<B: Backend>(
        backend: &B,
        path: &str,
        options: &CreateOptions,
    ) -> Result<Box<dyn Image>> {
        options.options.check_known("qcow2", &["cluster_size"])?;
        let cluster_size = match options.options.get("cluster_size") {
            None => DEFAULT_CLUSTER_SIZE,
            Some(v) => parse_size(v).ok_or_else(|| {
                Error::invalid(format!(
                    "qcow2: option cluster_size=`{v}` is not a size (e.g. 65536 or 64k)"
                ))
            })?,
        };
        if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
            return Err(Error::invalid(format!(
                "qcow2: option cluster_size={cluster_size} must be a power of two from 512 to \
                 2097152"
            )));
        }
        if options.size > limits::MAX_DISK_SIZE {
            return Err(Error::limit(format!(
                "qcow2: disk size {} is larger than the {} bytes supported",
                options.size,
                limits::MAX_DISK_SIZE
            )));
        }
        let sector = if options.sector_size == 0 {
            512
        } else {
            options.sector_size
        };
        if !sector.is_power_of_two() || u64::from(sector) > cluster_size.max(4096) {
            return Err(Error::invalid(format!(
                "qcow2: sector size {sector} must be a power of two up to 4096"
            )));
        }
        Ok(Box::new(Qcow2Image::create(
            backend,
            path,
            options.size,
            cluster_size,
            sector,
        )?))
    }
}

/// Parses `65536`, `64k`, `2M`.
fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mult) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&v[..i], 1 << 20),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// The persistent bitmaps stored in the qcow2 image at `path`.
pub fn list_bitmaps<B: Backend>(backend: &B, path: &str) -> Result<Vec<BitmapInfo>> {
    let file = backend.open(path, OpenMode::ReadOnly)?;
    bitmap::list(&file, path)
}

/// The dirty ranges (bytes of the virtual disk, merged, in order) recorded by the persistent
/// bitmap `bitmap` of the qcow2 image at `path`. A bitmap left in use by a writer that did not
/// close it, or inconsistent bitmaps, are refused: a full resync is needed then.
pub fn dirty_extents<B: Backend>(backend: &B, path: &str, bitmap: &str) -> Result<Vec<Extent>> {
    let file = backend.open(path, OpenMode::ReadOnly)?;
    bitmap::dirty_extents(&file, path, bitmap)
}

// The qcow2 target-writer plugin: this crate's `Format` over the host's storage.
#[cfg(target_arch = "wasm32")]
haven_plugin_sdk::export_format!(
    Qcow2,
    haven_plugin_sdk::writer::PluginInfo {
        name: "qcow2".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: "QEMU qcow2 v3: read and write; compressed clusters and dirty bitmaps read"
            .into(),
        kinds: vec!["qcow2".into()],
    }
);
