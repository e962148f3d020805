//! The binary structures of a hosted sparse extent: its header and the stream markers.

use haven_image::{Error, Result};

/// "KDMV" as it appears in the file (little-endian `0x564d444b`).
pub const MAGIC: u32 = 0x564d_444b;
pub const SECTOR: u64 = 512;
/// Newline-detection characters are valid.
pub const FLAG_NL_DETECT: u32 = 1;
/// A redundant grain directory exists.
pub const FLAG_RGD: u32 = 1 << 1;
/// Grain table entry 1 means "grain reads as zeros".
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Grains and metadata are preceded by markers.
pub const FLAG_MARKERS: u32 = 1 << 17;
/// `gdOffset` value meaning "read the grain directory offset from the footer".
pub const GD_AT_END: u64 = u64::MAX;
pub const COMPRESS_DEFLATE: u16 = 1;

pub const MARKER_EOS: u32 = 0;
pub const MARKER_GT: u32 = 1;
pub const MARKER_GD: u32 = 2;
pub const MARKER_FOOTER: u32 = 3;

/// The 512-byte header of a hosted sparse extent (all sizes and offsets in sectors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub grain: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub overhead: u64,
    pub compress: u16,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// True when `b` starts with the sparse extent magic.
    pub fn has_magic(b: &[u8]) -> bool {
        b.len() >= 4 && u32_at(b, 0) == MAGIC
    }

    /// Parses a header sector; `file` and `at` name it in errors.
    pub fn parse(b: &[u8; 512], file: &str, at: u64) -> Result<Self> {
        let structure = "sparse extent header";
        if !Self::has_magic(b) {
            return Err(Error::corrupt(
                "vmdk",
                file,
                structure,
                at,
                "does not start with the magic \"KDMV\": not a sparse extent",
            ));
        }
        let h = Self {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            capacity: u64_at(b, 12),
            grain: u64_at(b, 20),
            desc_offset: u64_at(b, 28),
            desc_size: u64_at(b, 36),
            gtes_per_gt: u32_at(b, 44),
            rgd_offset: u64_at(b, 48),
            gd_offset: u64_at(b, 56),
            overhead: u64_at(b, 64),
            compress: u16::from_le_bytes([b[77], b[78]]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(Error::new(
                haven_image::ErrorKind::Unsupported,
                format!(
                    "vmdk: sparse extent header at offset {at:#x} has version {}, only 1-3 are \
                     supported (file {file})",
                    h.version
                ),
            ));
        }
        Ok(h)
    }

    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }
    pub fn markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }

    /// The header as its 512-byte sector.
    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = 0; // uncleanShutdown
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress.to_le_bytes());
        b
    }
}

/// A metadata marker sector of a stream: `val` sectors of metadata of `kind` follow it.
pub fn marker(val: u64, kind: u32) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..8].copy_from_slice(&val.to_le_bytes());
    b[12..16].copy_from_slice(&kind.to_le_bytes());
    b
}

/// `(val, size, type)` of a marker sector.
pub fn parse_marker(b: &[u8]) -> (u64, u32, u32) {
    (u64_at(b, 0), u32_at(b, 8), u32_at(b, 12))
}
