//! The fixed structures at the start of a VHDX file: file type identifier, headers, region
//! tables and the metadata region.

use haven_image::{Error, ErrorKind, FileIo, Result};

use crate::crc::{crc32c, crc32c_skip};
use crate::guid::{self, Guid};

pub const FORMAT: &str = "vhdx";
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

pub const FILE_ID_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const HEADER_SIZE: usize = 4096;
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
pub const METADATA_TABLE_SIZE: usize = 64 * 1024;
/// Entry count limit of region and metadata tables (the spec's own).
pub const MAX_TABLE_ENTRIES: u32 = 2047;

pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// One of the two VHDX headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parses a header; `None` when its signature or checksum is wrong (the other copy may do).
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < HEADER_SIZE || &b[..4] != b"head" {
            return None;
        }
        if crc32c_skip(&b[..HEADER_SIZE], 4) != le32(b, 4) {
            return None;
        }
        Some(Header {
            sequence: le64(b, 8),
            file_write_guid: Guid::from_slice(&b[16..]),
            data_write_guid: Guid::from_slice(&b[32..]),
            log_guid: Guid::from_slice(&b[48..]),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(b"head");
        put64(&mut b, 8, self.sequence);
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        put16(&mut b, 64, self.log_version);
        put16(&mut b, 66, self.version);
        put32(&mut b, 68, self.log_length);
        put64(&mut b, 72, self.log_offset);
        let crc = crc32c(&b);
        put32(&mut b, 4, crc);
        b
    }
}

/// Reads both headers and returns the current one (valid, highest sequence number) and its
/// slot (0 or 1).
pub fn read_headers<F: FileIo>(file: &F) -> Result<(Header, usize)> {
    let mut best: Option<(Header, usize)> = None;
    for (slot, &off) in HEADER_OFFSETS.iter().enumerate() {
        let mut b = vec![0u8; HEADER_SIZE];
        file.read_exact_at(off, &mut b, "vhdx header")?;
        if let Some(h) = Header::parse(&b)
            && best
                .as_ref()
                .is_none_or(|(cur, _)| h.sequence > cur.sequence)
        {
            best = Some((h, slot));
        }
    }
    let (h, slot) = best.ok_or_else(|| {
        Error::corrupt(
            FORMAT,
            file.name(),
            "both headers",
            HEADER_OFFSETS[0],
            "have a bad signature or checksum; the image cannot be opened (try `qemu-img check -r all`)",
        )
    })?;
    if h.version != 1 {
        return Err(Error::unsupported(format!(
            "vhdx: header version {} of {} is not supported (only version 1)",
            h.version,
            file.name()
        )));
    }
    Ok((h, slot))
}

/// Writes `header` with the next sequence number into both header slots, the non-current
/// slot first, flushing after each, so a crash leaves one valid header at every moment.
/// Returns the new current slot.
pub fn update_headers<F: FileIo>(file: &F, header: &mut Header, slot: usize) -> Result<usize> {
    let mut slot = slot;
    for _ in 0..2 {
        slot = 1 - slot;
        header.sequence = header.sequence.wrapping_add(1);
        file.write_at(HEADER_OFFSETS[slot], &header.to_bytes())?;
        file.flush()?;
    }
    Ok(slot)
}

/// Where the BAT and metadata regions are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regions {
    pub bat_offset: u64,
    pub bat_length: u64,
    pub metadata_offset: u64,
    pub metadata_length: u64,
}

fn parse_region_table(b: &[u8], name: &str, at: u64) -> Result<Regions> {
    let bad = |what: &str| Error::corrupt(FORMAT, name, "region table", at, what);
    if &b[..4] != b"regi" {
        return Err(bad("has a bad signature (expected `regi`)"));
    }
    if crc32c_skip(b, 4) != le32(b, 4) {
        return Err(bad("has a bad checksum"));
    }
    let count = le32(b, 8);
    if count > MAX_TABLE_ENTRIES {
        return Err(bad(&format!(
            "has {count} entries (at most {MAX_TABLE_ENTRIES})"
        )));
    }
    let mut bat = None;
    let mut meta = None;
    for i in 0..count as usize {
        let e = &b[16 + i * 32..16 + (i + 1) * 32];
        let id = Guid::from_slice(e);
        let offset = le64(e, 16);
        let length = u64::from(le32(e, 24));
        let required = le32(e, 28) & 1 != 0;
        let slot = if id == guid::BAT_REGION {
            &mut bat
        } else if id == guid::METADATA_REGION {
            &mut meta
        } else if required {
            return Err(Error::unsupported(format!(
                "vhdx: region table of {name} requires region {} which this implementation \
                 does not know",
                id.to_braced()
            )));
        } else {
            continue;
        };
        if offset < MIB || !offset.is_multiple_of(MIB) || length == 0 || !length.is_multiple_of(MIB)
        {
            return Err(bad(&format!(
                "entry {i} places region {} at {offset:#x}+{length:#x} (must be whole MiB \
                 past the first MiB)",
                id.to_braced()
            )));
        }
        if slot.replace((offset, length)).is_some() {
            return Err(bad(&format!("lists region {} twice", id.to_braced())));
        }
    }
    let (bat_offset, bat_length) = bat.ok_or_else(|| bad("has no BAT region"))?;
    let (metadata_offset, metadata_length) = meta.ok_or_else(|| bad("has no metadata region"))?;
    if bat_offset < metadata_offset + metadata_length && metadata_offset < bat_offset + bat_length {
        return Err(bad("has overlapping BAT and metadata regions"));
    }
    Ok(Regions {
        bat_offset,
        bat_length,
        metadata_offset,
        metadata_length,
    })
}

/// Reads the region table, falling back to the second copy when the first is damaged.
pub fn read_regions<F: FileIo>(file: &F) -> Result<Regions> {
    let mut first_err = None;
    for &off in &REGION_TABLE_OFFSETS {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        file.read_exact_at(off, &mut b, "vhdx region table")?;
        match parse_region_table(&b, file.name(), off) {
            Ok(r) => return Ok(r),
            Err(e) if e.kind == ErrorKind::Corrupt => {
                first_err.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(first_err.expect("two tries"))
}

pub fn region_table_bytes(r: &Regions) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    b[..4].copy_from_slice(b"regi");
    put32(&mut b, 8, 2);
    for (i, (id, off, len)) in [
        (guid::BAT_REGION, r.bat_offset, r.bat_length),
        (guid::METADATA_REGION, r.metadata_offset, r.metadata_length),
    ]
    .into_iter()
    .enumerate()
    {
        let e = 16 + i * 32;
        b[e..e + 16].copy_from_slice(&id.0);
        put64(&mut b, e + 16, off);
        put32(&mut b, e + 24, len as u32);
        put32(&mut b, e + 28, 1);
    }
    let crc = crc32c(&b);
    put32(&mut b, 4, crc);
    b
}

/// The parsed metadata items Haven uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u32,
    pub leave_allocated: bool,
    pub has_parent: bool,
    pub disk_size: u64,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub page83: Guid,
    /// Key/value pairs of the parent locator (differencing images only).
    pub parent_locator: Vec<(String, String)>,
    /// File offset of the parent locator item (for error messages).
    pub parent_locator_offset: u64,
}

fn utf16(b: &[u8]) -> Option<String> {
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).ok()
}

/// Reads and checks the metadata region at `r`.
pub fn read_metadata<F: FileIo>(file: &F, r: &Regions) -> Result<Metadata> {
    let name = file.name();
    let base = r.metadata_offset;
    let mut t = vec![0u8; METADATA_TABLE_SIZE];
    file.read_exact_at(base, &mut t, "vhdx metadata table")?;
    let bad = |at: u64, what: String| Error::corrupt(FORMAT, name, "metadata table", at, what);
    if &t[..8] != b"metadata" {
        return Err(bad(
            base,
            "has a bad signature (expected `metadata`)".into(),
        ));
    }
    let count = u32::from(le16(&t, 10));
    if count > MAX_TABLE_ENTRIES {
        return Err(bad(
            base,
            format!("has {count} entries (at most {MAX_TABLE_ENTRIES})"),
        ));
    }
    let mut items: Vec<(Guid, u64, u32)> = Vec::new();
    for i in 0..count as usize {
        let e = &t[32 + i * 32..32 + (i + 1) * 32];
        let id = Guid::from_slice(e);
        let offset = u64::from(le32(e, 16));
        let length = le32(e, 20);
        let flags = le32(e, 24);
        let required = flags & 4 != 0;
        let known = [
            guid::FILE_PARAMETERS,
            guid::VIRTUAL_DISK_SIZE,
            guid::PAGE83_DATA,
            guid::LOGICAL_SECTOR_SIZE,
            guid::PHYSICAL_SECTOR_SIZE,
            guid::PARENT_LOCATOR,
        ];
        if !known.contains(&id) {
            if required {
                return Err(Error::unsupported(format!(
                    "vhdx: metadata of {name} requires item {} which this implementation does \
                     not know",
                    id.to_braced()
                )));
            }
            continue;
        }
        if length > 0
            && (offset < METADATA_TABLE_SIZE as u64
                || offset + u64::from(length) > r.metadata_length)
        {
            return Err(bad(
                base + 32 + i as u64 * 32,
                format!(
                    "entry {i} ({}) places its value at {offset:#x}+{length:#x}, outside the \
                     {}-byte metadata region",
                    id.to_braced(),
                    r.metadata_length
                ),
            ));
        }
        if items.iter().any(|(g, _, _)| *g == id) {
            return Err(bad(base, format!("lists item {} twice", id.to_braced())));
        }
        items.push((id, offset, length));
    }
    let read_item = |id: Guid, what: &str, min: u32| -> Result<Option<Vec<u8>>> {
        let Some(&(_, off, len)) = items.iter().find(|(g, _, _)| *g == id) else {
            return Ok(None);
        };
        if len < min {
            return Err(bad(
                base + off,
                format!("item `{what}` is {len} bytes (needs {min})"),
            ));
        }
        let mut v = vec![0u8; len as usize];
        file.read_exact_at(base + off, &mut v, &format!("vhdx metadata item `{what}`"))?;
        Ok(Some(v))
    };
    let missing = |what: &str| bad(base, format!("lacks the required item `{what}`"));

    let fp = read_item(guid::FILE_PARAMETERS, "file parameters", 8)?
        .ok_or_else(|| missing("file parameters"))?;
    let block_size = le32(&fp, 0);
    let flags = le32(&fp, 4);
    if !block_size.is_power_of_two() || !(MIB as u32..=256 * MIB as u32).contains(&block_size) {
        return Err(bad(
            base,
            format!(
                "file parameters give block size {block_size} (must be a power of two, 1 MiB to 256 MiB)"
            ),
        ));
    }
    let size_item = read_item(guid::VIRTUAL_DISK_SIZE, "virtual disk size", 8)?
        .ok_or_else(|| missing("virtual disk size"))?;
    let disk_size = le64(&size_item, 0);
    let lss = read_item(guid::LOGICAL_SECTOR_SIZE, "logical sector size", 4)?
        .ok_or_else(|| missing("logical sector size"))?;
    let logical_sector = le32(&lss, 0);
    let pss = read_item(guid::PHYSICAL_SECTOR_SIZE, "physical sector size", 4)?
        .ok_or_else(|| missing("physical sector size"))?;
    let physical_sector = le32(&pss, 0);
    for (what, v) in [("logical", logical_sector), ("physical", physical_sector)] {
        if v != 512 && v != 4096 {
            return Err(bad(
                base,
                format!("{what} sector size is {v} (must be 512 or 4096)"),
            ));
        }
    }
    if disk_size == 0 || !disk_size.is_multiple_of(u64::from(logical_sector)) {
        return Err(bad(
            base,
            format!(
                "virtual disk size {disk_size} is not a positive multiple of the {logical_sector}-byte sector"
            ),
        ));
    }
    if disk_size > haven_image::limits::MAX_DISK_SIZE {
        return Err(Error::limit(format!(
            "vhdx: virtual disk size {disk_size} of {name} exceeds the {} byte limit",
            haven_image::limits::MAX_DISK_SIZE
        )));
    }
    let page83 = read_item(guid::PAGE83_DATA, "page 83 data", 16)?
        .map(|v| Guid::from_slice(&v))
        .unwrap_or_default();
    let has_parent = flags & 2 != 0;
    let mut parent_locator = Vec::new();
    let mut parent_locator_offset = 0;
    if has_parent {
        let item = read_item(guid::PARENT_LOCATOR, "parent locator", 20)?
            .ok_or_else(|| missing("parent locator"))?;
        let off = items
            .iter()
            .find(|(g, _, _)| *g == guid::PARENT_LOCATOR)
            .expect("found")
            .1;
        parent_locator_offset = base + off;
        parent_locator = parse_parent_locator(&item, name, base + off)?;
    }
    Ok(Metadata {
        block_size,
        leave_allocated: flags & 1 != 0,
        has_parent,
        disk_size,
        logical_sector,
        physical_sector,
        page83,
        parent_locator,
        parent_locator_offset,
    })
}

fn parse_parent_locator(item: &[u8], name: &str, at: u64) -> Result<Vec<(String, String)>> {
    let bad = |what: String| Error::corrupt(FORMAT, name, "parent locator", at, what);
    let kind = Guid::from_slice(item);
    if kind != guid::VHDX_PARENT_LOCATOR_TYPE {
        return Err(Error::unsupported(format!(
            "vhdx: parent locator of {name} has type {} (only VHDX parents are supported)",
            kind.to_braced()
        )));
    }
    let count = usize::from(le16(item, 18));
    if 20 + count * 12 > item.len() {
        return Err(bad(format!(
            "has {count} entries, more than its {} bytes hold",
            item.len()
        )));
    }
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let e = &item[20 + i * 12..];
        let (ko, vo) = (le32(e, 0) as usize, le32(e, 4) as usize);
        let (kl, vl) = (usize::from(le16(e, 8)), usize::from(le16(e, 10)));
        let text = |o: usize, l: usize| -> Result<String> {
            let end = o.checked_add(l).filter(|&end| end <= item.len());
            let bytes = end.map(|end| &item[o..end]).ok_or_else(|| {
                bad(format!(
                    "entry {i} points at {o:#x}+{l:#x}, outside the {}-byte item",
                    item.len()
                ))
            })?;
            utf16(bytes).ok_or_else(|| bad(format!("entry {i} is not valid UTF-16")))
        };
        pairs.push((text(ko, kl)?, text(vo, vl)?));
    }
    Ok(pairs)
}

/// Builds a metadata region (table and items) for a new image.
pub fn metadata_bytes(m: &Metadata) -> Vec<u8> {
    let mut b = vec![0u8; METADATA_TABLE_SIZE + 4096];
    b[..8].copy_from_slice(b"metadata");
    let mut items: Vec<(Guid, Vec<u8>, u32)> = Vec::new();
    let flags = u32::from(m.leave_allocated) | (u32::from(m.has_parent) << 1);
    let mut fp = m.block_size.to_le_bytes().to_vec();
    fp.extend_from_slice(&flags.to_le_bytes());
    // Flags: 4 = IsRequired, 2 = IsVirtualDisk.
    items.push((guid::FILE_PARAMETERS, fp, 4));
    items.push((
        guid::VIRTUAL_DISK_SIZE,
        m.disk_size.to_le_bytes().to_vec(),
        6,
    ));
    items.push((guid::PAGE83_DATA, m.page83.0.to_vec(), 6));
    items.push((
        guid::LOGICAL_SECTOR_SIZE,
        m.logical_sector.to_le_bytes().to_vec(),
        6,
    ));
    items.push((
        guid::PHYSICAL_SECTOR_SIZE,
        m.physical_sector.to_le_bytes().to_vec(),
        6,
    ));
    put16(&mut b, 10, items.len() as u16);
    let mut off = METADATA_TABLE_SIZE;
    for (i, (id, value, flags)) in items.iter().enumerate() {
        let e = 32 + i * 32;
        b[e..e + 16].copy_from_slice(&id.0);
        put32(&mut b, e + 16, off as u32);
        put32(&mut b, e + 20, value.len() as u32);
        put32(&mut b, e + 24, *flags);
        b[off..off + value.len()].copy_from_slice(value);
        off += value.len();
    }
    b
}
