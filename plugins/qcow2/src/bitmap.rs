//! Persistent dirty bitmaps: the bitmaps extension, bitmap directory and bitmap tables.

use haven_image::{Error, ErrorKind, Extent, FileIo, Result, limits};

use crate::header::{AUTOCLEAR_BITMAPS, BitmapsExt, FMT, Header, be16, be32, be64};

const FLAG_IN_USE: u32 = 1 << 0;
const FLAG_AUTO: u32 = 1 << 1;
const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const TYPE_DIRTY_TRACKING: u8 = 1;
/// qemu's own limits on the bitmap directory.
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
const MAX_BITMAPS: u32 = 65535;
/// Most dirty extents returned for one bitmap (16 bytes each).
const MAX_EXTENTS: usize = 1 << 24;

/// One persistent bitmap of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of the disk one bit covers.
    pub granularity: u64,
    /// Left in use by a writer that did not close it: its contents cannot be trusted.
    pub in_use: bool,
    /// Enabled (qemu's `auto` flag): it records writes while the image is in use.
    pub enabled: bool,
}

/// A directory entry, with where it lies.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Offset of the entry in the file.
    pub at: u64,
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub granularity_bits: u8,
    pub name: String,
}

/// Reads and checks the bitmap directory.
pub(crate) fn directory<F: FileIo>(
    file: &F,
    path: &str,
    h: &Header,
    ext: BitmapsExt,
) -> Result<Vec<Entry>> {
    let cs = h.cluster_size();
    if ext.nb_bitmaps > MAX_BITMAPS
        || ext.directory_size > MAX_DIRECTORY_BYTES
        || !ext.directory_offset.is_multiple_of(cs)
    {
        return Err(Error::corrupt(
            FMT,
            path,
            "bitmap directory",
            ext.directory_offset,
            format!(
                "({} bitmaps, {} bytes) is unaligned or larger than qemu allows",
                ext.nb_bitmaps, ext.directory_size
            ),
        ));
    }
    let file_len = file.len()?;
    if ext.directory_offset.saturating_add(ext.directory_size) > file_len {
        return Err(Error::corrupt(
            FMT,
            path,
            "bitmap directory",
            ext.directory_offset,
            format!(
                "({} bytes) points past end of file ({file_len} bytes)",
                ext.directory_size
            ),
        ));
    }
    let mut dir = vec![0u8; ext.directory_size as usize];
    file.read_exact_at(ext.directory_offset, &mut dir, "qcow2 bitmap directory")?;
    let mut entries = Vec::new();
    let mut at = 0usize;
    for _ in 0..ext.nb_bitmaps {
        let here = ext.directory_offset + at as u64;
        let bad =
            |problem: String| Error::corrupt(FMT, path, "bitmap directory entry", here, problem);
        if at + 24 > dir.len() {
            return Err(bad(format!(
                "runs past the directory's {} bytes",
                dir.len()
            )));
        }
        let e = &dir[at..];
        let table_offset = be64(e, 0);
        let table_size = be32(e, 8);
        let flags = be32(e, 12);
        let ty = e[16];
        let granularity_bits = e[17];
        let name_size = be16(e, 18) as usize;
        let extra = be32(e, 20) as usize;
        let len = (24 + extra + name_size).div_ceil(8) * 8;
        if extra > 16 << 20 || at + 24 + extra + name_size > dir.len() {
            return Err(bad(format!(
                "(name {name_size} bytes, extra data {extra} bytes) runs past the directory"
            )));
        }
        let name = String::from_utf8_lossy(&e[24 + extra..24 + extra + name_size]).into_owned();
        if ty != TYPE_DIRTY_TRACKING {
            return Err(bad(format!(
                "of bitmap `{name}` has type {ty}, not 1 (dirty tracking)"
            )));
        }
        if !(9..=31).contains(&granularity_bits) {
            return Err(bad(format!(
                "of bitmap `{name}` has granularity bits {granularity_bits}, outside 9..31"
            )));
        }
        if extra != 0 && flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            return Err(Error::unsupported(format!(
                "qcow2: bitmap `{name}` of {path} has {extra} bytes of extra data of an unknown kind; it cannot be read"
            )));
        }
        entries.push(Entry {
            at: here,
            table_offset,
            table_size,
            flags,
            granularity_bits,
            name,
        });
        at += len;
    }
    Ok(entries)
}

fn check_consistent(path: &str, h: &Header) -> Result<Option<BitmapsExt>> {
    let Some(ext) = h.bitmaps else {
        return Ok(None);
    };
    if h.autoclear & AUTOCLEAR_BITMAPS == 0 {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "qcow2: the bitmaps of {path} are inconsistent (autoclear bit 0 is clear: a program \
                 without bitmap support wrote to the image); a full resync is needed"
            ),
        ));
    }
    Ok(Some(ext))
}

/// The persistent bitmaps of an open image file.
pub(crate) fn list<F: FileIo>(file: &F, path: &str) -> Result<Vec<BitmapInfo>> {
    let h = Header::read(file)?;
    let Some(ext) = check_consistent(path, &h)? else {
        return Ok(Vec::new());
    };
    Ok(directory(file, path, &h, ext)?
        .into_iter()
        .map(|e| BitmapInfo {
            name: e.name,
            granularity: 1 << e.granularity_bits,
            in_use: e.flags & FLAG_IN_USE != 0,
            enabled: e.flags & FLAG_AUTO != 0,
        })
        .collect())
}

/// Appends the disk range of bits `[first, first+count)` to `out`, merging.
fn push_bits(
    out: &mut Vec<Extent>,
    first: u64,
    count: u64,
    gran: u64,
    size: u64,
    path: &str,
) -> Result<()> {
    let offset = first * gran;
    let end = ((first + count) * gran).min(size);
    if end <= offset {
        return Ok(());
    }
    if let Some(last) = out.last_mut()
        && last.offset + last.length == offset
    {
        last.length = end - last.offset;
        return Ok(());
    }
    if out.len() >= MAX_EXTENTS {
        return Err(Error::limit(format!(
            "qcow2: a bitmap of {path} has more than {MAX_EXTENTS} dirty extents; a full resync is needed"
        )));
    }
    out.push(Extent {
        offset,
        length: end - offset,
    });
    Ok(())
}

/// The dirty ranges of bitmap `name`.
pub(crate) fn dirty_extents<F: FileIo>(file: &F, path: &str, name: &str) -> Result<Vec<Extent>> {
    let h = Header::read(file)?;
    let cs = h.cluster_size();
    let Some(ext) = check_consistent(path, &h)? else {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("qcow2: image {path} has no persistent bitmaps (looked for `{name}`)"),
        ));
    };
    let entries = directory(file, path, &h, ext)?;
    let Some(e) = entries.iter().find(|e| e.name == name) else {
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "qcow2: image {path} has no bitmap `{name}` (it has: {})",
                names.join(", ")
            ),
        ));
    };
    if e.flags & FLAG_IN_USE != 0 {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "qcow2: bitmap `{name}` of {path} is marked in-use (its writer did not close it \
                 cleanly), so it may have missed writes; a full resync is needed"
            ),
        ));
    }
    let gran = 1u64 << e.granularity_bits;
    let bits = h.size.div_ceil(gran);
    let bits_per_cluster = cs * 8;
    let want = bits.div_ceil(bits_per_cluster);
    if u64::from(e.table_size) != want || e.table_offset % cs != 0 {
        return Err(Error::corrupt(
            FMT,
            path,
            "bitmap table",
            e.table_offset,
            format!(
                "of bitmap `{name}` has {} entries (expected {want}) or is unaligned",
                e.table_size
            ),
        ));
    }
    let table_bytes = u64::from(e.table_size) * 8;
    if table_bytes > limits::MAX_TABLE_BYTES {
        return Err(Error::limit(format!(
            "qcow2: bitmap table of `{name}` in {path} is too large"
        )));
    }
    let file_len = file.len()?;
    if e.table_offset.saturating_add(table_bytes) > file_len {
        return Err(Error::corrupt(
            FMT,
            path,
            "bitmap table",
            e.table_offset,
            format!("of bitmap `{name}` points past end of file ({file_len} bytes)"),
        ));
    }
    let mut raw = vec![0u8; table_bytes as usize];
    file.read_exact_at(e.table_offset, &mut raw, "qcow2 bitmap table")?;
    let mut out = Vec::new();
    let mut data = vec![0u8; cs as usize];
    for (j, chunk) in raw.chunks_exact(8).enumerate() {
        let entry = be64(chunk, 0);
        let first = j as u64 * bits_per_cluster;
        let count = bits_per_cluster.min(bits - first);
        let off = entry & 0x00ff_ffff_ffff_fe00;
        if off == 0 {
            if entry & 1 != 0 {
                push_bits(&mut out, first, count, gran, h.size, path)?;
            }
            continue;
        }
        if off.saturating_add(cs) > file_len {
            return Err(Error::corrupt(
                FMT,
                path,
                "bitmap data cluster",
                off,
                format!("of bitmap `{name}` points past end of file ({file_len} bytes)"),
            ));
        }
        file.read_exact_at(off, &mut data, "qcow2 bitmap data cluster")?;
        let mut i = 0u64;
        while i < count {
            let byte = data[(i / 8) as usize];
            if i.is_multiple_of(8) && byte == 0 {
                i += 8;
                continue;
            }
            if i.is_multiple_of(8) && byte == 0xff && i + 8 <= count {
                push_bits(&mut out, first + i, 8, gran, h.size, path)?;
                i += 8;
                continue;
            }
            if byte >> (i % 8) & 1 != 0 {
                push_bits(&mut out, first + i, 1, gran, h.size, path)?;
            }
            i += 1;
        }
    }
    Ok(out)
}

/// Marks every enabled, consistent bitmap in use: writes this crate makes are not recorded in
/// them, so nobody may trust them afterwards (qemu then reports them as inconsistent).
pub(crate) fn mark_enabled_in_use<F: FileIo>(
    file: &F,
    path: &str,
    h: &Header,
    ext: BitmapsExt,
) -> Result<()> {
    for e in directory(file, path, h, ext)? {
        if e.flags & FLAG_AUTO != 0 && e.flags & FLAG_IN_USE == 0 {
            file.write_at(e.at + 12, &(e.flags | FLAG_IN_USE).to_be_bytes())?;
        }
    }
    Ok(())
}
