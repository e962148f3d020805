//! Haven's VHDX disk image format (Hyper-V's virtual hard disk v2): reader and writer.
//!
//! Reads dynamic, fixed and differencing images (following parent chains), writes dynamic and
//! fixed ones. A non-empty metadata log is replayed when the image is opened read-write and
//! refused (with what to do) when it is opened read-only.
//!
//! Writes bypass the log: new payload blocks are placed past the end of the file, their data is
//! flushed, and only then are the changed BAT entries written in place (in [`Image::flush`]). A
//! crash before the BAT write leaves the old, consistent BAT and an unreferenced block at the
//! end of the file; the headers' write GUIDs are changed (durably) before the first write of a
//! session, as the specification asks.

use std::collections::BTreeSet;

use haven_image::{
    Backend, CreateOptions, Error, ExtentState, FileIo, Format, Image, ImageInfo, MapEntry,
    OpenMode, Options, Result, check_range, is_zero, limits, push_map, sibling,
};

mod crc;
mod guid;
mod layout;
mod log;

pub use crc::crc32c;

use guid::Guid;
use layout::{FORMAT, Header, MIB, Metadata, Regions};

/// Payload block states (the low three bits of a BAT entry).
const NOT_PRESENT: u64 = 0;
const UNDEFINED: u64 = 1;
const ZERO: u64 = 2;
const UNMAPPED: u64 = 3;
const FULLY_PRESENT: u64 = 6;
const PARTIALLY_PRESENT: u64 = 7;
/// Sector bitmap block state: present.
const BITMAP_PRESENT: u64 = 6;
/// Size of a sector bitmap block.
const BITMAP_BLOCK: u64 = MIB;
const BAT_PAGE: u64 = 4096;

/// The VHDX format.
pub struct Vhdx;

impl Format for Vhdx {
    const NAME: &'static str = FORMAT;

    fn probe<B: Backend>(backend: &B, path: &str) -> Result<Option<String>> {
        let file = backend.open(path, OpenMode::ReadOnly)?;
        let mut sig = [0u8; 8];
        if file.read_at(0, &mut sig)? < 8 || &sig != layout::FILE_ID_SIGNATURE {
            return Ok(None);
        }
        // The subformat needs the metadata; a damaged image is still a VHDX image (opening it
        // gives the precise error).
        let sub = layout::read_regions(&file)
            .and_then(|r| layout::read_metadata(&file, &r))
            .map(|m| subformat(&m).to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        Ok(Some(sub))
    }

    fn open<B: Backend>(
        backend: &B,
        path: &str,
        mode: OpenMode,
        options: &Options,
    ) -> Result<Box<dyn Image>> {
        options.check_known(FORMAT, &[])?;
        let mut visited = Vec::new();
        Ok(Box::new(VhdxImage::open(
            backend,
            path,
            mode,
            0,
            &mut visited,
        )?))
    }

    fn create<B: Backend>(
        backend: &B,
        path: &str,
        options: &CreateOptions,
    ) -> Result<Box<dyn Image>> {
        let plan = CreatePlan::new(options)?;
        haven_image::create_file(backend, path, |file| plan.write(file))?;
        let mut visited = Vec::new();
        Ok(Box::new(VhdxImage::open(
            backend,
            path,
            OpenMode::ReadWrite,
            0,
            &mut visited,
        )?))
    }
}

fn subformat(m: &Metadata) -> &'static str {
    if m.has_parent {
        "differencing"
    } else if m.leave_allocated {
        "fixed"
    } else {
        "dynamic"
    }
}

/// An open VHDX image.
struct VhdxImage<B: Backend> {
    path: String,
    file: B::File,
    writable: bool,
    header: Header,
    header_slot: usize,
    meta: Metadata,
    regions: Regions,
    block_size: u64,
    chunk_ratio: u64,
    bat: Vec<u64>,
    /// 4 KiB pages of the BAT changed in memory and not yet written.
    dirty_pages: BTreeSet<u64>,
    /// Where the next new payload block goes (1 MiB aligned, at or past the end of the file).
    file_end: u64,
    /// Offsets of freed payload blocks (hole-punched) whose BAT change is durable: reusable.
    free: Vec<u64>,
    /// Freed blocks whose BAT change is not yet durable.
    pending_free: Vec<u64>,
    /// True once the write GUIDs were changed for this session.
    modified: bool,
    parent: Option<Box<VhdxImage<B>>>,
    files: Vec<String>,
}

impl<B: Backend> VhdxImage<B> {
    fn open(
        backend: &B,
        path: &str,
        mode: OpenMode,
        depth: usize,
        visited: &mut Vec<String>,
    ) -> Result<Self> {
        visited.push(haven_image::normalize_path(path));
        let file = backend.open(path, mode)?;
        let mut sig = [0u8; 8];
        file.read_exact_at(0, &mut sig, "vhdx file type identifier")?;
        if &sig != layout::FILE_ID_SIGNATURE {
            return Err(Error::corrupt(
                FORMAT,
                path,
                "file type identifier",
                0,
                "is not `vhdxfile`: this is not a VHDX image",
            ));
        }
        let (mut header, mut header_slot) = layout::read_headers(&file)?;
        if header.log_version != 0 {
            return Err(Error::unsupported(format!(
                "vhdx: log version {} of {path} is not supported (only version 0)",
                header.log_version
            )));
        }
        let mut modified = false;
        if !header.log_guid.is_zero() && header.log_length != 0 {
            let entries = log::Log::read(&file, &header)?.active_sequence()?;
            if !entries.is_empty() {
                if mode == OpenMode::ReadOnly {
                    return Err(log::needs_replay(path, header.log_guid));
                }
                log::replay(&file, &header, &entries)?;
            }
            if mode == OpenMode::ReadWrite {
                // Replay done (or nothing to replay): mark the log empty.
                header.log_guid = Guid::ZERO;
                header.file_write_guid = Guid::generate(header.sequence);
                header_slot = layout::update_headers(&file, &mut header, header_slot)?;
                modified = true;
            }
        }
        let regions = layout::read_regions(&file)?;
        let meta = layout::read_metadata(&file, &regions)?;
        if meta.has_parent && mode == OpenMode::ReadWrite {
            return Err(Error::unsupported(format!(
                "vhdx: {path} is a differencing image; Haven reads differencing images but does \
                 not write them (open it read-only)"
            )));
        }
        let block_size = u64::from(meta.block_size);
        let lss = u64::from(meta.logical_sector);
        let chunk_ratio = (1u64 << 23) * lss / block_size;
        let blocks = meta.disk_size.div_ceil(block_size);
        let entries = if meta.has_parent {
            blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            blocks + (blocks - 1) / chunk_ratio
        };
        let bat_bytes = entries * 8;
        if bat_bytes > limits::MAX_TABLE_BYTES {
            return Err(Error::limit(format!(
                "vhdx: BAT of {path} is {bat_bytes} bytes, more than the {} bytes Haven holds in \
                 memory",
                limits::MAX_TABLE_BYTES
            )));
        }
        if bat_bytes > regions.bat_length {
            return Err(Error::corrupt(
                FORMAT,
                path,
                "BAT region",
                regions.bat_offset,
                format!(
                    "is {} bytes, too small for the {entries} entries a {}-byte disk needs",
                    regions.bat_length, meta.disk_size
                ),
            ));
        }
        let mut raw = vec![0u8; bat_bytes as usize];
        file.read_exact_at(regions.bat_offset, &mut raw, "vhdx BAT")?;
        let bat: Vec<u64> = raw.chunks_exact(8).map(|c| layout::le64(c, 0)).collect();
        drop(raw);

        let file_len = file.len()?;
        let mut end = file_len
            .max(regions.bat_offset + regions.bat_length)
            .max(regions.metadata_offset + regions.metadata_length)
            .max(header.log_offset + u64::from(header.log_length));
        let bat_error = |index: usize, what: String| {
            Error::corrupt(
                FORMAT,
                path,
                "BAT entry",
                regions.bat_offset + index as u64 * 8,
                what,
            )
        };
        for block in 0..blocks {
            let index = (block + block / chunk_ratio) as usize;
            let entry = bat[index];
            match entry & 7 {
                NOT_PRESENT | UNDEFINED | ZERO | UNMAPPED => {}
                FULLY_PRESENT | PARTIALLY_PRESENT => {
                    if entry & 7 == PARTIALLY_PRESENT && !meta.has_parent {
                        return Err(bat_error(
                            index,
                            format!(
                                "of block {block} is partially present in an image without parent"
                            ),
                        ));
                    }
                    let off = entry & !(MIB - 1);
                    let need = block_size.min(meta.disk_size - block * block_size);
                    if off < MIB || off + need > file_len {
                        return Err(bat_error(
                            index,
                            format!(
                                "of block {block} points at {off:#x}, outside the file ({file_len} \
                                 bytes): the file is truncated or the BAT damaged"
                            ),
                        ));
                    }
                    let reserved = [
                        (regions.bat_offset, regions.bat_length),
                        (regions.metadata_offset, regions.metadata_length),
                        (header.log_offset, u64::from(header.log_length)),
                    ];
                    if reserved
                        .iter()
                        .any(|&(o, l)| off < o + l && o < off + block_size)
                    {
                        return Err(bat_error(
                            index,
                            format!(
                                "of block {block} points at {off:#x}, inside the BAT, metadata or \
                                 log region"
                            ),
                        ));
                    }
                    end = end.max(off + block_size);
                }
                s => {
                    return Err(bat_error(
                        index,
                        format!("of block {block} has invalid state {s}"),
                    ));
                }
            }
        }
        if meta.has_parent {
            for chunk in 0..blocks.div_ceil(chunk_ratio) {
                let index = (chunk * (chunk_ratio + 1) + chunk_ratio) as usize;
                let entry = bat[index];
                match entry & 7 {
                    NOT_PRESENT => {}
                    BITMAP_PRESENT => {
                        let off = entry & !(MIB - 1);
                        if off < MIB || off + BITMAP_BLOCK > file_len {
                            return Err(bat_error(
                                index,
                                format!(
                                    "of sector bitmap {chunk} points at {off:#x}, outside the file \
                                     ({file_len} bytes)"
                                ),
                            ));
                        }
                        end = end.max(off + BITMAP_BLOCK);
                    }
                    s => {
                        return Err(bat_error(
                            index,
                            format!("of sector bitmap {chunk} has invalid state {s}"),
                        ));
                    }
                }
            }
        }

        let mut files = vec![path.to_owned()];
        let parent = if meta.has_parent {
            let p = Self::open_parent(backend, path, &meta, depth, visited)?;
            files.extend(p.files.iter().cloned());
            Some(Box::new(p))
        } else {
            None
        };
        Ok(VhdxImage {
            path: path.to_owned(),
            file,
            writable: mode == OpenMode::ReadWrite,
            header,
            header_slot,
            meta,
            regions,
            block_size,
            chunk_ratio,
            bat,
            dirty_pages: BTreeSet::new(),
            file_end: end.next_multiple_of(MIB),
            free: Vec::new(),
            pending_free: Vec::new(),
            modified,
            parent,
            files,
        })
    }

    fn open_parent(
        backend: &B,
        path: &str,
        meta: &Metadata,
        depth: usize,
        visited: &mut Vec<String>,
    ) -> Result<Self> {
        if depth + 1 >= limits::MAX_CHAIN_DEPTH {
            return Err(Error::limit(format!(
                "vhdx: parent chain of {path} is deeper than {} images",
                limits::MAX_CHAIN_DEPTH
            )));
        }
        let get = |key: &str| {
            meta.parent_locator
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let corrupt = |what: String| {
            Error::corrupt(
                FORMAT,
                path,
                "parent locator",
                meta.parent_locator_offset,
                what,
            )
        };
        let linkage =
            get("parent_linkage").ok_or_else(|| corrupt("has no `parent_linkage` key".into()))?;
        let linkage = Guid::parse(linkage)
            .ok_or_else(|| corrupt(format!("has a malformed `parent_linkage` `{linkage}`")))?;
        let linkage2 = get("parent_linkage2").and_then(Guid::parse);
        let mut candidates = Vec::new();
        if let Some(rel) = get("relative_path") {
            let rel = rel.replace('\\', "/");
            let rel = rel.trim_start_matches("./");
            candidates.push(sibling(path, rel));
        }
        for key in ["absolute_win32_path", "volume_path"] {
            if let Some(abs) = get(key) {
                let abs = abs.replace('\\', "/");
                if let Some(base) = abs.rsplit('/').next().filter(|b| !b.is_empty()) {
                    candidates.push(sibling(path, base));
                }
            }
        }
        if candidates.is_empty() {
            return Err(corrupt(
                "names no parent path (no relative_path, absolute_win32_path or volume_path)"
                    .into(),
            ));
        }
        let mut found = None;
        for c in &candidates {
            if backend.exists(c)? {
                found = Some(c.clone());
                break;
            }
        }
        let parent_path = found.ok_or_else(|| {
            Error::new(
                haven_image::ErrorKind::NotFound,
                format!(
                    "vhdx: parent of {path} not found (looked for {}); place the parent image \
                     next to the child",
                    candidates.join(", ")
                ),
            )
        })?;
        if visited.contains(&haven_image::normalize_path(&parent_path)) {
            return Err(corrupt(format!(
                "names {parent_path} as parent, which is already in the chain: the parent chain \
                 loops"
            )));
        }
        let parent = Self::open(
            backend,
            &parent_path,
            OpenMode::ReadOnly,
            depth + 1,
            visited,
        )?;
        let pguid = parent.header.data_write_guid;
        if pguid != linkage && Some(pguid) != linkage2 {
            return Err(corrupt(format!(
                "expects parent {parent_path} with data write GUID {}, but it has {}: the parent \
                 was changed after the child was made, so the chain is broken",
                linkage.to_braced(),
                pguid.to_braced()
            )));
        }
        if parent.meta.logical_sector != meta.logical_sector {
            return Err(Error::unsupported(format!(
                "vhdx: parent {parent_path} has {}-byte sectors but child {path} has {}",
                parent.meta.logical_sector, meta.logical_sector
            )));
        }
        Ok(parent)
    }

    fn payload_index(&self, block: u64) -> usize {
        (block + block / self.chunk_ratio) as usize
    }

    fn set_entry(&mut self, index: usize, value: u64) {
        self.bat[index] = value;
        self.dirty_pages.insert(index as u64 * 8 / BAT_PAGE);
    }

    /// Reads `buf` at `offset` (already checked).
    fn read_inner(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bs = self.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min((buf.len() - done) as u64) as usize;
            let chunk = &mut buf[done..done + n];
            let entry = self.bat[self.payload_index(block)];
            match entry & 7 {
                FULLY_PRESENT => {
                    let off = entry & !(MIB - 1);
                    self.file
                        .read_exact_at(off + in_block, chunk, "vhdx payload block")?;
                }
                PARTIALLY_PRESENT => self.read_partial(block, entry, in_block, chunk)?,
                NOT_PRESENT | UNDEFINED if self.parent.is_some() => {
                    self.read_parent(pos, chunk)?;
                }
                _ => chunk.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn read_parent(&mut self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let Some(parent) = self.parent.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let psize = parent.meta.disk_size;
        let n = psize.saturating_sub(pos).min(buf.len() as u64) as usize;
        parent.read_inner(pos, &mut buf[..n])?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Reads part of a partially present block: sectors whose bitmap bit is set come from this
    /// file, the others from the parent.
    fn read_partial(
        &mut self,
        block: u64,
        entry: u64,
        in_block: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let lss = u64::from(self.meta.logical_sector);
        let chunk = block / self.chunk_ratio;
        let bm_index = (chunk * (self.chunk_ratio + 1) + self.chunk_ratio) as usize;
        let bm_entry = self.bat[bm_index];
        if bm_entry & 7 != BITMAP_PRESENT {
            return Err(Error::corrupt(
                FORMAT,
                &self.path,
                "BAT entry",
                self.regions.bat_offset + bm_index as u64 * 8,
                format!(
                    "of sector bitmap {chunk} is not present, but block {block} is partially \
                     present and needs it"
                ),
            ));
        }
        let bm_off = bm_entry & !(MIB - 1);
        let first = (block % self.chunk_ratio) * (self.block_size / lss) + in_block / lss;
        let count = buf.len() as u64 / lss;
        let byte0 = first / 8;
        let mut bits = vec![0u8; ((first + count).div_ceil(8) - byte0) as usize];
        self.file
            .read_exact_at(bm_off + byte0, &mut bits, "vhdx sector bitmap")?;
        let bit = |i: u64| {
            let s = first + i;
            (bits[(s / 8 - byte0) as usize] >> (s % 8)) & 1 == 1
        };
        let data_off = entry & !(MIB - 1);
        let mut i = 0;
        while i < count {
            let present = bit(i);
            let mut j = i + 1;
            while j < count && bit(j) == present {
                j += 1;
            }
            let part = &mut buf[(i * lss) as usize..(j * lss) as usize];
            let in_run = in_block + i * lss;
            if present {
                self.file
                    .read_exact_at(data_off + in_run, part, "vhdx payload block")?;
            } else {
                self.read_parent(block * self.block_size + in_run, part)?;
            }
            i = j;
        }
        Ok(())
    }

    fn map_inner(&mut self, offset: u64, len: u64, out: &mut Vec<MapEntry>) -> Result<()> {
        let bs = self.block_size;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let block = pos / bs;
            let n = (bs - pos % bs).min(end - pos);
            let entry = self.bat[self.payload_index(block)];
            let state = match entry & 7 {
                FULLY_PRESENT | PARTIALLY_PRESENT => Some(ExtentState::Data),
                NOT_PRESENT | UNDEFINED if self.parent.is_some() => None,
                _ => Some(ExtentState::Zero),
            };
            match state {
                Some(state) => push_map(
                    out,
                    MapEntry {
                        offset: pos,
                        length: n,
                        state,
                    },
                ),
                None => {
                    let parent = self.parent.as_mut().expect("checked");
                    let psize = parent.meta.disk_size;
                    let in_parent = psize.saturating_sub(pos).min(n);
                    if in_parent > 0 {
                        parent.map_inner(pos, in_parent, out)?;
                    }
                    push_map(
                        out,
                        MapEntry {
                            offset: pos + in_parent,
                            length: n - in_parent,
                            state: ExtentState::Zero,
                        },
                    );
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::invalid(format!(
                "vhdx: {} is open read-only",
                self.path
            )));
        }
        Ok(())
    }

    /// Before the first change of a session: new file and data write GUIDs, durably.
    fn begin_modification(&mut self) -> Result<()> {
        if self.modified {
            return Ok(());
        }
        self.header.file_write_guid = Guid::generate(self.header.sequence);
        self.header.data_write_guid = Guid::generate(!self.header.sequence);
        self.header_slot = layout::update_headers(&self.file, &mut self.header, self.header_slot)?;
        self.modified = true;
        Ok(())
    }

    /// A file offset for a new payload block whose bytes read as zeros.
    fn allocate(&mut self) -> Result<u64> {
        if let Some(off) = self.free.pop() {
            return Ok(off);
        }
        let off = self.file_end;
        let end = off + self.block_size;
        // Extending the file sparsely makes the whole new block read as zeros, so a partial
        // write needs no explicit zero fill.
        self.file.set_len(end)?;
        self.file_end = end;
        Ok(off)
    }
}

impl<B: Backend> Image for VhdxImage<B> {
    fn info(&self) -> Result<ImageInfo> {
        let blocks = self.meta.disk_size.div_ceil(self.block_size);
        let present = (0..blocks)
            .filter(|&b| {
                matches!(
                    self.bat[self.payload_index(b)] & 7,
                    FULLY_PRESENT | PARTIALLY_PRESENT
                )
            })
            .count() as u64;
        Ok(ImageInfo {
            format: FORMAT.to_owned(),
            subformat: subformat(&self.meta).to_owned(),
            size: self.meta.disk_size,
            sector_size: self.meta.logical_sector,
            files: self.files.clone(),
            allocated_bytes: present * self.block_size,
        })
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(
            FORMAT,
            offset,
            buf.len() as u64,
            self.meta.disk_size,
            self.meta.logical_sector,
        )?;
        self.read_inner(offset, buf)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(
            FORMAT,
            offset,
            data.len() as u64,
            self.meta.disk_size,
            self.meta.logical_sector,
        )?;
        self.check_writable()?;
        if data.is_empty() {
            return Ok(());
        }
        self.begin_modification()?;
        let bs = self.block_size;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min((data.len() - done) as u64) as usize;
            let piece = &data[done..done + n];
            let index = self.payload_index(block);
            let entry = self.bat[index];
            if entry & 7 == FULLY_PRESENT {
                self.file.write_at((entry & !(MIB - 1)) + in_block, piece)?;
            } else if !is_zero(piece) {
                // Every other state reads as zeros here (no parent), so zeros need no block.
                let off = self.allocate()?;
                self.file.write_at(off + in_block, piece)?;
                self.set_entry(index, off | FULLY_PRESENT);
            }
            done += n;
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _discard: bool) -> Result<()> {
        check_range(
            FORMAT,
            offset,
            len,
            self.meta.disk_size,
            self.meta.logical_sector,
        )?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        self.begin_modification()?;
        let bs = self.block_size;
        let size = self.meta.disk_size;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            let index = self.payload_index(block);
            let entry = self.bat[index];
            if entry & 7 == FULLY_PRESENT {
                let off = entry & !(MIB - 1);
                let whole = in_block == 0 && (n == bs || pos + n == size);
                if whole && !self.meta.leave_allocated {
                    // Free the block: zero state, space returned. The offset is reused only
                    // once the BAT no longer points at it durably (see flush).
                    self.file.punch_hole(off, bs)?;
                    self.pending_free.push(off);
                    self.set_entry(index, ZERO);
                } else {
                    self.file.punch_hole(off + in_block, n)?;
                }
            }
            // Every other state already reads as zeros (no parent: images with one are
            // read-only).
            pos += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if !self.dirty_pages.is_empty() {
            // Data first, then the BAT entries that point at it.
            self.file.flush()?;
            let pages: Vec<u64> = std::mem::take(&mut self.dirty_pages).into_iter().collect();
            let total = self.bat.len() as u64 * 8;
            let mut i = 0;
            while i < pages.len() {
                let mut j = i + 1;
                while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                    j += 1;
                }
                let start = pages[i] * BAT_PAGE;
                let stop = ((pages[j - 1] + 1) * BAT_PAGE).min(total);
                let bytes: Vec<u8> = self.bat[(start / 8) as usize..(stop / 8) as usize]
                    .iter()
                    .flat_map(|e| e.to_le_bytes())
                    .collect();
                self.file
                    .write_at(self.regions.bat_offset + start, &bytes)?;
                i = j;
            }
        }
        self.file.flush()?;
        self.free.append(&mut self.pending_free);
        Ok(())
    }

    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        check_range(
            FORMAT,
            offset,
            len,
            self.meta.disk_size,
            self.meta.logical_sector,
        )?;
        let mut out = Vec::new();
        self.map_inner(offset, len, &mut out)?;
        Ok(out)
    }
}

impl<B: Backend> Drop for VhdxImage<B> {
    /// Best effort for callers that forget `close`: write BAT changes still in memory. Errors
    /// cannot be reported here; `flush` and `close` report them.
    fn drop(&mut self) {
        if self.writable && !self.dirty_pages.is_empty() {
            let _ = self.flush();
        }
    }
}

/// Parses a byte size: digits with an optional K, M or G suffix (binary units).
fn parse_size(key: &str, text: &str) -> Result<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(1 << shift))
        .ok_or_else(|| Error::invalid(format!("vhdx: option `{key}={text}` is not a size")))
}

/// The block size qemu-img picks for a disk of `size` bytes, so images compare alike.
fn default_block_size(size: u64) -> u64 {
    const GIB: u64 = 1 << 30;
    if size > 32 << 40 {
        64 * MIB
    } else if size > 100 * GIB {
        32 * MIB
    } else if size > GIB {
        16 * MIB
    } else {
        8 * MIB
    }
}

/// Everything a new image needs, checked before any file is made.
struct CreatePlan {
    fixed: bool,
    size: u64,
    sector: u32,
    block_size: u64,
    log_size: u64,
}

impl CreatePlan {
    fn new(o: &CreateOptions) -> Result<Self> {
        o.options
            .check_known(FORMAT, &["subformat", "block_size", "log_size"])?;
        let fixed = match o.options.get("subformat").unwrap_or("dynamic") {
            "dynamic" => false,
            "fixed" => true,
            other => {
                return Err(Error::invalid(format!(
                    "vhdx: subformat `{other}` is not supported (dynamic or fixed)"
                )));
            }
        };
        let sector = if o.sector_size == 0 {
            512
        } else {
            o.sector_size
        };
        if sector != 512 && sector != 4096 {
            return Err(Error::invalid(format!(
                "vhdx: sector size {sector} is not supported (512 or 4096)"
            )));
        }
        if o.size == 0 || !o.size.is_multiple_of(u64::from(sector)) {
            return Err(Error::invalid(format!(
                "vhdx: disk size {} is not a positive multiple of the {sector}-byte sector",
                o.size
            )));
        }
        if o.size > limits::MAX_DISK_SIZE {
            return Err(Error::limit(format!(
                "vhdx: disk size {} exceeds VHDX's maximum of {} bytes",
                o.size,
                limits::MAX_DISK_SIZE
            )));
        }
        let block_size = match o.options.get("block_size") {
            Some(v) => match parse_size("block_size", v)? {
                0 => default_block_size(o.size),
                b => b,
            },
            None => default_block_size(o.size),
        };
        if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
            return Err(Error::invalid(format!(
                "vhdx: block_size {block_size} must be a power of two from 1 MiB to 256 MiB"
            )));
        }
        let log_size = match o.options.get("log_size") {
            Some(v) => parse_size("log_size", v)?,
            None => MIB,
        };
        if log_size == 0 || !log_size.is_multiple_of(MIB) || log_size > 256 * MIB {
            return Err(Error::invalid(format!(
                "vhdx: log_size {log_size} must be a whole number of MiB from 1 MiB to 256 MiB"
            )));
        }
        let plan = CreatePlan {
            fixed,
            size: o.size,
            sector,
            block_size,
            log_size,
        };
        if plan.bat_entries() * 8 > limits::MAX_TABLE_BYTES {
            return Err(Error::limit(format!(
                "vhdx: a {}-byte disk with {block_size}-byte blocks needs a BAT larger than the \
                 {} bytes Haven holds in memory; choose a larger block_size",
                o.size,
                limits::MAX_TABLE_BYTES
            )));
        }
        Ok(plan)
    }

    fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * u64::from(self.sector) / self.block_size
    }

    fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size)
    }

    fn bat_entries(&self) -> u64 {
        // Room for the sector bitmap entry of the last chunk too, so the BAT region also fits
        // a differencing layout.
        self.blocks().div_ceil(self.chunk_ratio()) * (self.chunk_ratio() + 1)
    }

    fn write<F: FileIo>(&self, file: &F) -> Result<()> {
        let log_offset = MIB;
        let metadata_offset = log_offset + self.log_size;
        let bat_offset = metadata_offset + MIB;
        let bat_length = (self.bat_entries() * 8).next_multiple_of(MIB);
        let data_start = bat_offset + bat_length;
        let regions = Regions {
            bat_offset,
            bat_length,
            metadata_offset,
            metadata_length: MIB,
        };

        let mut id = Vec::with_capacity(64);
        id.extend_from_slice(layout::FILE_ID_SIGNATURE);
        id.extend("Haven".encode_utf16().flat_map(u16::to_le_bytes));
        file.write_at(0, &id)?;
        let mut header = Header {
            sequence: 0,
            file_write_guid: Guid::generate(self.size),
            data_write_guid: Guid::generate(self.size ^ 1),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: self.log_size as u32,
            log_offset,
        };
        for slot in 0..2 {
            header.sequence += 1;
            file.write_at(layout::HEADER_OFFSETS[slot], &header.to_bytes())?;
        }
        let table = layout::region_table_bytes(&regions);
        for off in layout::REGION_TABLE_OFFSETS {
            file.write_at(off, &table)?;
        }
        let meta = Metadata {
            block_size: self.block_size as u32,
            leave_allocated: self.fixed,
            has_parent: false,
            disk_size: self.size,
            logical_sector: self.sector,
            physical_sector: 4096,
            page83: Guid::generate(self.size ^ 2),
            parent_locator: Vec::new(),
            parent_locator_offset: 0,
        };
        file.write_at(metadata_offset, &layout::metadata_bytes(&meta))?;
        if self.fixed {
            let cr = self.chunk_ratio();
            let mut bat = vec![0u8; (self.bat_entries() * 8) as usize];
            for block in 0..self.blocks() {
                let index = (block + block / cr) as usize;
                let entry = (data_start + block * self.block_size) | FULLY_PRESENT;
                bat[index * 8..index * 8 + 8].copy_from_slice(&entry.to_le_bytes());
            }
            file.write_at(bat_offset, &bat)?;
            file.set_len(data_start + self.blocks() * self.block_size)?;
        } else {
            file.set_len(data_start)?;
        }
        file.flush()
    }
}

// The vhdx target-writer plugin: this crate's `Format` over the host's storage.
#[cfg(target_arch = "wasm32")]
haven_plugin_sdk::export_format!(
    Vhdx,
    haven_plugin_sdk::writer::PluginInfo {
        name: "vhdx".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: "Hyper-V VHDX: dynamic, fixed; differencing read".into(),
        kinds: vec!["vhdx".into()],
    }
);
