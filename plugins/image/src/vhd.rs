//! VHD on-disk structures: the 512-byte footer, the 1024-byte dynamic disk header and its parent
//! locators, checksums and CHS geometry. Everything is big-endian. Pure functions over byte
//! buffers: no I/O here.

use crate::{Error, ErrorKind, Result};

/// Size of the footer (and of its copy at the start of dynamic and differencing files).
pub const FOOTER_SIZE: usize = 512;
/// Size of the dynamic disk header.
pub const HEADER_SIZE: usize = 1024;
/// The sector size of every VHD.
pub const SECTOR: u64 = 512;
/// A BAT entry of a block that is not allocated.
pub const UNUSED: u32 = 0xFFFF_FFFF;
/// Footer cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Dynamic header cookie.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// "No next structure" in a data offset field.
pub const NO_OFFSET: u64 = u64::MAX;
/// 65535 cylinders x 16 heads x 255 sectors: the largest geometry, which readers take to mean
/// "use the current size field".
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
/// The dynamic header version every implementation writes.
const HEADER_VERSION: u32 = 0x0001_0000;
/// The footer format version.
const FOOTER_VERSION: u32 = 0x0001_0000;
/// Footer feature bit 1 is reserved and must always be set.
const FEATURES_RESERVED: u32 = 2;
/// Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC, the VHD epoch.
const VHD_EPOCH_UNIX: u64 = 946_684_800;

const CHECKSUM_AT_FOOTER: usize = 64;
const CHECKSUM_AT_HEADER: usize = 36;
const LOCATORS_AT: usize = 576;
const LOCATOR_SIZE: usize = 24;

pub fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// One's complement of the byte sum of `buf`, the 4-byte checksum field at `skip` counted as 0.
pub fn checksum(buf: &[u8], skip: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

/// The kind of a VHD, from the footer's disk type field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    pub fn code(self) -> u32 {
        match self {
            Self::Fixed => 2,
            Self::Dynamic => 3,
            Self::Differencing => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Fixed => "fixed",
            Self::Dynamic => "dynamic",
            Self::Differencing => "differencing",
        }
    }
}

/// The hard disk footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the dynamic header; [`NO_OFFSET`] for fixed disks.
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
    pub disk_type: DiskType,
    pub unique_id: [u8; 16],
}

/// Creator fields of new disks. `win ` is what Hyper-V writes; readers (qemu among them) take
/// the disk size of such images from the current size field, which is what makes the exact
/// sizes Azure needs readable everywhere.
pub const CREATOR_APP: [u8; 4] = *b"win ";
pub const CREATOR_VERSION: u32 = 0x000a_0000;
pub const CREATOR_OS: [u8; 4] = *b"Wi2k";

/// The footer of a new fixed VHD of `size` bytes (a whole number of MiB): what follows the
/// data in the file, or in the last page of an Azure page blob.
pub fn fixed_footer(size: u64) -> Result<[u8; FOOTER_SIZE]> {
    const MIB: u64 = 1 << 20;
    if size == 0 || !size.is_multiple_of(MIB) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("a fixed VHD is a whole number of MiB; {size} bytes is not"),
        ));
    }
    Ok(Footer::new(size, DiskType::Fixed).encode())
}

/// The disk size of a fixed VHD whose footer is `footer` (read from `file` at `offset`); an
/// error naming what is wrong when it is not one.
pub fn fixed_size(footer: &[u8; FOOTER_SIZE], file: &str, offset: u64) -> Result<u64> {
    let f = Footer::parse(footer, file, offset)?;
    if f.disk_type != DiskType::Fixed {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{file}: a {} VHD; only fixed ones are kept this way",
                f.disk_type.name()
            ),
        ));
    }
    Ok(f.virtual_size())
}

impl Footer {
    /// The footer of a new disk of `size` bytes and `disk_type`, as Hyper-V writes it.
    pub fn new(size: u64, disk_type: DiskType) -> Footer {
        let (cylinders, heads, sectors_per_track) = geometry(size);
        Footer {
            data_offset: if disk_type == DiskType::Fixed {
                NO_OFFSET
            } else {
                512
            },
            timestamp: timestamp_now(),
            creator_app: CREATOR_APP,
            creator_version: CREATOR_VERSION,
            creator_os: CREATOR_OS,
            original_size: size,
            current_size: size,
            cylinders,
            heads,
            sectors_per_track,
            disk_type,
            unique_id: random_uuid(),
        }
    }

    /// True when `buf` starts with the footer cookie.
    pub fn has_cookie(buf: &[u8]) -> bool {
        buf.len() >= 8 && &buf[..8] == FOOTER_COOKIE
    }

    /// Parses and checks a footer read from `file` at `offset`.
    pub fn parse(buf: &[u8; FOOTER_SIZE], file: &str, offset: u64) -> Result<Self> {
        if !Self::has_cookie(buf) {
            return Err(Error::corrupt(
                "vhd",
                file,
                "footer",
                offset,
                "lacks the \"conectix\" cookie: the file is not a VHD image",
            ));
        }
        let stored = get_u32(buf, CHECKSUM_AT_FOOTER);
        let computed = checksum(buf, CHECKSUM_AT_FOOTER);
        if stored != computed {
            return Err(Error::corrupt(
                "vhd",
                file,
                "footer",
                offset,
                format!(
                    "has checksum {stored:#010x} but its contents sum to {computed:#010x}: \
                     the footer is damaged"
                ),
            ));
        }
        let disk_type = match get_u32(buf, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            other => {
                return Err(Error::corrupt(
                    "vhd",
                    file,
                    "footer",
                    offset,
                    format!(
                        "has disk type {other}, not 2 (fixed), 3 (dynamic) or 4 (differencing)"
                    ),
                ));
            }
        };
        Ok(Self {
            data_offset: get_u64(buf, 16),
            timestamp: get_u32(buf, 24),
            creator_app: buf[28..32].try_into().expect("4 bytes"),
            creator_version: get_u32(buf, 32),
            creator_os: buf[36..40].try_into().expect("4 bytes"),
            original_size: get_u64(buf, 40),
            current_size: get_u64(buf, 48),
            cylinders: get_u16(buf, 56),
            heads: buf[58],
            sectors_per_track: buf[59],
            disk_type,
            unique_id: buf[68..84].try_into().expect("16 bytes"),
        })
    }

    /// The footer's bytes, checksum included.
    pub fn encode(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[..8].copy_from_slice(FOOTER_COOKIE);
        put_u32(&mut b, 8, FEATURES_RESERVED);
        put_u32(&mut b, 12, FOOTER_VERSION);
        put_u64(&mut b, 16, self.data_offset);
        put_u32(&mut b, 24, self.timestamp);
        b[28..32].copy_from_slice(&self.creator_app);
        put_u32(&mut b, 32, self.creator_version);
        b[36..40].copy_from_slice(&self.creator_os);
        put_u64(&mut b, 40, self.original_size);
        put_u64(&mut b, 48, self.current_size);
        put_u16(&mut b, 56, self.cylinders);
        b[58] = self.heads;
        b[59] = self.sectors_per_track;
        put_u32(&mut b, 60, self.disk_type.code());
        b[68..84].copy_from_slice(&self.unique_id);
        let sum = checksum(&b, CHECKSUM_AT_FOOTER);
        put_u32(&mut b, CHECKSUM_AT_FOOTER, sum);
        b
    }

    /// The size the disk presents, by the rule qemu and Hyper-V agree on: the current size field,
    /// except for images from Virtual PC-era creators, whose size is their CHS geometry (unless
    /// that geometry is the maximum, which means "too big for CHS, see current size").
    pub fn virtual_size(&self) -> u64 {
        const CURRENT_SIZE_CREATORS: [&[u8; 4]; 5] = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"];
        let chs =
            u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track);
        let use_chs = !CURRENT_SIZE_CREATORS.contains(&&self.creator_app);
        if !use_chs || chs == MAX_GEOMETRY_SECTORS {
            self.current_size / SECTOR * SECTOR
        } else {
            chs * SECTOR
        }
    }
}

/// The CHS geometry of a disk of `size` bytes, by the algorithm of the VHD specification
/// (appendix "CHS calculation"), which Hyper-V and qemu both use.
pub fn geometry(size: u64) -> (u16, u8, u8) {
    let total = (size / SECTOR).min(MAX_GEOMETRY_SECTORS);
    let (spt, heads, cyl_heads);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cyl_heads = total / spt;
    } else {
        let mut s = 17;
        let mut ch = total / s;
        let mut h = ch.div_ceil(1024).max(4);
        if ch >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            ch = total / s;
        }
        if ch >= h * 1024 {
            s = 63;
            h = 16;
            ch = total / s;
        }
        spt = s;
        heads = h;
        cyl_heads = ch;
    }
    // Bounded above: cylinders <= 65535, heads <= 16, spt <= 255.
    (
        (cyl_heads / heads).min(65535) as u16,
        heads as u8,
        spt as u8,
    )
}

/// Now as a VHD timestamp (seconds since 2000-01-01 UTC).
pub fn timestamp_now() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH_UNIX);
    (unix.saturating_sub(VHD_EPOCH_UNIX) & 0xFFFF_FFFF) as u32
}

/// A random (version 4) UUID, from the standard library's randomly keyed hasher so that no
/// dependency is needed.
pub fn random_uuid() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    for (i, half) in out.chunks_exact_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(u64::from(timestamp_now()));
        h.write_usize(i);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out[6] = (out[6] & 0x0f) | 0x40;
    out[8] = (out[8] & 0x3f) | 0x80;
    out
}

/// One parent locator entry of a differencing disk's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Locator {
    /// Platform code, e.g. `W2ru`.
    pub platform: u32,
    pub data_length: u32,
    pub data_offset: u64,
}

/// Relative Windows path, UTF-16LE.
pub const PLATFORM_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
/// Absolute Windows path, UTF-16LE.
pub const PLATFORM_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
/// macOS file URL, UTF-8.
pub const PLATFORM_MACX: u32 = u32::from_be_bytes(*b"MacX");

/// The dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: u32,
    /// The parent's file name (UTF-16BE in the file).
    pub parent_name: String,
    pub locators: [Locator; 8],
}

impl DynHeader {
    /// Parses and checks a dynamic header read from `file` at `offset`.
    pub fn parse(buf: &[u8; HEADER_SIZE], file: &str, offset: u64) -> Result<Self> {
        if &buf[..8] != HEADER_COOKIE {
            return Err(Error::corrupt(
                "vhd",
                file,
                "dynamic disk header",
                offset,
                "lacks the \"cxsparse\" cookie: the footer's data offset is wrong or the header \
                 is damaged",
            ));
        }
        let stored = get_u32(buf, CHECKSUM_AT_HEADER);
        let computed = checksum(buf, CHECKSUM_AT_HEADER);
        if stored != computed {
            return Err(Error::corrupt(
                "vhd",
                file,
                "dynamic disk header",
                offset,
                format!(
                    "has checksum {stored:#010x} but its contents sum to {computed:#010x}: \
                     the header is damaged"
                ),
            ));
        }
        let block_size = get_u32(buf, 32);
        if !block_size.is_power_of_two() || u64::from(block_size) < SECTOR {
            return Err(Error::corrupt(
                "vhd",
                file,
                "dynamic disk header",
                offset,
                format!("has block size {block_size}, which is not a power of two of at least 512"),
            ));
        }
        let name_units: Vec<u16> = buf[64..576]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let mut locators = [Locator::default(); 8];
        for (i, loc) in locators.iter_mut().enumerate() {
            let at = LOCATORS_AT + i * LOCATOR_SIZE;
            *loc = Locator {
                platform: get_u32(buf, at),
                data_length: get_u32(buf, at + 8),
                data_offset: get_u64(buf, at + 16),
            };
        }
        Ok(Self {
            table_offset: get_u64(buf, 16),
            max_table_entries: get_u32(buf, 28),
            block_size,
            parent_unique_id: buf[40..56].try_into().expect("16 bytes"),
            parent_timestamp: get_u32(buf, 56),
            parent_name: String::from_utf16_lossy(&name_units),
            locators,
        })
    }

    /// The header of a new dynamic disk (no parent).
    pub fn encode_dynamic(table_offset: u64, max_table_entries: u32, block_size: u32) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..8].copy_from_slice(HEADER_COOKIE);
        put_u64(&mut b, 8, NO_OFFSET);
        put_u64(&mut b, 16, table_offset);
        put_u32(&mut b, 24, HEADER_VERSION);
        put_u32(&mut b, 28, max_table_entries);
        put_u32(&mut b, 32, block_size);
        let sum = checksum(&b, CHECKSUM_AT_HEADER);
        put_u32(&mut b, CHECKSUM_AT_HEADER, sum);
        b
    }
}

/// Bytes of the sector bitmap in front of each block of `block_size` bytes: one bit per
/// sector, padded to whole sectors.
pub fn bitmap_size(block_size: u64) -> u64 {
    (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR)
}

/// Decodes a parent locator's data into a path, per its platform code. `None` for platforms
/// that carry no usable path (the old `Mac ` alias records, `Wi2r`/`Wi2k` ANSI paths in an
/// unknown code page are decoded as Latin-1 best effort).
pub fn locator_path(platform: u32, data: &[u8]) -> Option<String> {
    let text = match platform {
        PLATFORM_W2RU | PLATFORM_W2KU => {
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            String::from_utf16_lossy(&units)
        }
        PLATFORM_MACX => {
            let s = String::from_utf8_lossy(data);
            let s = s.trim_end_matches('\0');
            s.strip_prefix("file://localhost")
                .or_else(|| s.strip_prefix("file://"))
                .unwrap_or(s)
                .to_owned()
        }
        p if p == u32::from_be_bytes(*b"Wi2r") || p == u32::from_be_bytes(*b"Wi2k") => data
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| char::from(b))
            .collect(),
        _ => return None,
    };
    let text = text.trim().to_owned();
    if text.is_empty() { None } else { Some(text) }
}

/// True when `path` is absolute on some platform (`/x`, `C:\x`, `\\server\x`).
pub fn is_absolute(path: &str) -> bool {
    let b = path.as_bytes();
    path.starts_with('/')
        || path.starts_with('\\')
        || (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':')
}

/// The last component of a Windows or Unix path.
pub fn base_name(path: &str) -> &str {
    path.rsplit(['/', '\\']).next().unwrap_or(path)
}

/// An error for a value of the footer or header that is valid but beyond what Haven handles.
pub fn limit(file: &str, what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Limit, format!("vhd: {what} (file {file})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_spec_examples() {
        // 64 MiB: 963 x 8 x 17 (what qemu writes for a 64M vpc image).
        assert_eq!(geometry(64 << 20), (963, 8, 17));
        assert_eq!(geometry(u64::MAX), (65535, 16, 255));
    }

    #[test]
    fn footer_round_trips() {
        let f = Footer {
            data_offset: 512,
            timestamp: 7,
            creator_app: *b"win ",
            creator_version: 0x000a_0000,
            creator_os: *b"Wi2k",
            original_size: 1 << 20,
            current_size: 1 << 20,
            cylinders: 30,
            heads: 4,
            sectors_per_track: 17,
            disk_type: DiskType::Dynamic,
            unique_id: [9; 16],
        };
        let b = f.encode();
        assert_eq!(Footer::parse(&b, "x", 0).unwrap(), f);
        assert_eq!(f.virtual_size(), 1 << 20);
    }

    #[test]
    fn paths() {
        assert_eq!(crate::normalize_path("a/./b/../c.vhd"), "a/c.vhd");
        assert_eq!(crate::normalize_path(".\\base.vhd"), "base.vhd");
        assert_eq!(base_name("C:\\vms\\base.vhd"), "base.vhd");
        assert!(is_absolute("C:\\x"));
        assert!(!is_absolute(".\\x"));
    }
}
