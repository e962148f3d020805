//! A hosted sparse extent ("KDMV"): grain directory, grain tables and grains, plain or
//! compressed, and the streamOptimized writer.

use std::collections::{BTreeMap, BTreeSet};

use haven_image::{Error, ErrorKind, FileIo, Result, is_zero, limits};

use crate::header::{
    self, COMPRESS_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NL_DETECT, FLAG_RGD, GD_AT_END,
    Header, MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT, SECTOR,
};

/// Largest grain accepted: 16 MiB (VMware uses 64 KiB).
const MAX_GRAIN_SECTORS: u64 = 32768;
/// Largest grain table accepted, in entries (VMware uses 512).
const MAX_GTES_PER_GT: u32 = 4096;
/// Partially written grains a stream writer holds before compressing them as they are.
const MAX_PENDING_GRAINS: usize = 64;
/// Compressed stream output gathered before one write to the file.
const STREAM_BUFFER_BYTES: usize = 4 << 20;
/// The grain size Haven creates: 64 KiB.
pub const NEW_GRAIN_SECTORS: u64 = 128;
/// Grain table entries per table Haven creates.
pub const NEW_GTES_PER_GT: u32 = 512;
/// Compression level of stream grains (zlib's default).
const DEFLATE_LEVEL: u8 = 6;

/// Reads the parent's bytes at an extent offset; `None` when there is no parent (unallocated
/// grains read as zeros).
pub type ParentRead<'a> = Option<&'a mut dyn FnMut(u64, &mut [u8]) -> Result<()>>;

/// Where a grain's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grain {
    /// Not stored: the parent's data, or zeros without a parent.
    Unallocated,
    /// Reads as zeros (GTE 1, or past the extent's capacity).
    Zero,
    /// Plain grain at this byte offset.
    Data(u64),
    /// Compressed grain whose record starts at this byte offset.
    Compressed(u64),
}

/// What a range of an extent holds, for maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alloc {
    Data,
    Zero,
    Unallocated,
}

/// A sparse extent's write state when Haven is writing it as a stream.
struct Stream {
    /// Partially written grains: contents and which sectors were written.
    pending: BTreeMap<u64, (Vec<u8>, u128)>,
    /// Compressed records not yet written, starting at byte `out_start`.
    out: Vec<u8>,
    out_start: u64,
    closed: bool,
}

pub struct Sparse<F: FileIo> {
    pub file: F,
    pub header: Header,
    file_len: u64,
    grain_bytes: u64,
    gtes: u64,
    gd: Vec<u32>,
    rgd: Vec<u32>,
    gt: Vec<u32>,
    dirty_gts: BTreeSet<usize>,
    dirty_gd: bool,
    next_sector: u64,
    cache: Option<(u64, Vec<u8>)>,
    stream: Option<Stream>,
}

fn corrupt<F: FileIo>(f: &F, what: &str, at: u64, problem: impl std::fmt::Display) -> Error {
    Error::corrupt("vmdk", f.name(), what, at, problem)
}

fn le_u32s(b: &[u8]) -> impl Iterator<Item = u32> + '_ {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
}

fn u32s_le(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

impl<F: FileIo> Sparse<F> {
    /// Opens the sparse extent in `file`. `budget` is the table memory the image has left.
    pub fn open(file: F, writable: bool, budget: &mut u64) -> Result<Self> {
        let file_len = file.len()?;
        let mut sector = [0u8; 512];
        file.read_exact_at(0, &mut sector, "vmdk sparse extent header")?;
        let mut header = Header::parse(&sector, file.name(), 0)?;
        if header.gd_offset == GD_AT_END {
            // streamOptimized: the footer (a header copy) sits before the end-of-stream marker.
            if file_len < 3 * SECTOR + SECTOR {
                return Err(corrupt(
                    &file,
                    "stream footer",
                    file_len,
                    "is missing: the file is too short (truncated stream?)",
                ));
            }
            let at = file_len - 2 * SECTOR;
            file.read_exact_at(at, &mut sector, "vmdk stream footer")?;
            let footer = Header::parse(&sector, file.name(), at)?;
            if header.markers() {
                let mut m = [0u8; 512];
                file.read_exact_at(at - SECTOR, &mut m, "vmdk footer marker")?;
                let (_, _, kind) = header::parse_marker(&m);
                if kind != MARKER_FOOTER {
                    return Err(corrupt(
                        &file,
                        "footer marker",
                        at - SECTOR,
                        format!("has type {kind}, not {MARKER_FOOTER} (footer): truncated stream?"),
                    ));
                }
            }
            if footer.gd_offset == GD_AT_END {
                return Err(corrupt(
                    &file,
                    "stream footer",
                    at,
                    "has no grain directory offset either",
                ));
            }
            header = footer;
        }
        let name = file.name().to_owned();
        let bad = |what: &str, problem: String| Error::corrupt("vmdk", &name, what, 0, problem);
        if header.grain == 0 || header.grain > MAX_GRAIN_SECTORS {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "vmdk: sparse extent header at offset 0x0 has a grain of {} sectors; \
                     1 to {MAX_GRAIN_SECTORS} are supported (file {name})",
                    header.grain
                ),
            ));
        }
        if header.gtes_per_gt == 0 || header.gtes_per_gt > MAX_GTES_PER_GT {
            return Err(bad(
                "sparse extent header",
                format!(
                    "has {} entries per grain table (1 to {MAX_GTES_PER_GT} accepted)",
                    header.gtes_per_gt
                ),
            ));
        }
        if header.capacity > limits::MAX_DISK_SIZE / SECTOR {
            return Err(Error::limit(format!(
                "vmdk: sparse extent {name} claims {} sectors, more than the {} bytes Haven accepts",
                header.capacity,
                limits::MAX_DISK_SIZE
            )));
        }
        if header.compressed() && header.compress != COMPRESS_DEFLATE {
            return Err(Error::unsupported(format!(
                "vmdk: sparse extent {name} uses compression algorithm {}, only deflate (1) is \
                 supported",
                header.compress
            )));
        }
        if writable && header.compressed() {
            return Err(Error::unsupported(format!(
                "vmdk: {name} is a compressed (streamOptimized) extent and can only be read; \
                 convert it to monolithicSparse to change it"
            )));
        }
        let grain_bytes = header.grain * SECTOR;
        let gtes = u64::from(header.gtes_per_gt);
        let grains = div_ceil(header.capacity, header.grain);
        let num_gts = div_ceil(grains, gtes);
        let table_bytes = num_gts * gtes * 4 + num_gts * 4 * if writable { 2 } else { 1 };
        if table_bytes > *budget {
            return Err(Error::limit(format!(
                "vmdk: grain tables of {name} need {table_bytes} bytes of memory, more than the \
                 {} bytes left of the {} bytes limit",
                *budget,
                limits::MAX_TABLE_BYTES
            )));
        }
        *budget -= table_bytes;
        let gt_bytes = gtes * 4;
        let read_dir = |offset: u64, what: &str| -> Result<Vec<u32>> {
            let at = offset
                .checked_mul(SECTOR)
                .filter(|&a| a != 0 && a.checked_add(num_gts * 4).is_some_and(|e| e <= file_len));
            let Some(at) = at else {
                return Err(corrupt(
                    &file,
                    what,
                    offset.saturating_mul(SECTOR),
                    format!(
                        "({} bytes) lies outside the file ({file_len} bytes)",
                        num_gts * 4
                    ),
                ));
            };
            let mut b = vec![0u8; (num_gts * 4) as usize];
            file.read_exact_at(at, &mut b, what)?;
            let dir: Vec<u32> = le_u32s(&b).collect();
            for (i, &e) in dir.iter().enumerate() {
                if e != 0 && u64::from(e) * SECTOR + gt_bytes > file_len {
                    return Err(corrupt(
                        &file,
                        what,
                        at + i as u64 * 4,
                        format!(
                            "entry {i} points to a grain table at sector {e}, past the end of \
                             the file ({file_len} bytes)"
                        ),
                    ));
                }
            }
            Ok(dir)
        };
        let gd = read_dir(header.gd_offset, "grain directory")?;
        let rgd = if writable && header.flags & FLAG_RGD != 0 && header.rgd_offset != 0 {
            read_dir(header.rgd_offset, "redundant grain directory")?
        } else {
            Vec::new()
        };
        let mut gt = vec![0u32; (num_gts * gtes) as usize];
        // Read the grain tables, several at once where they are contiguous.
        let mut i = 0usize;
        while i < gd.len() {
            if gd[i] == 0 {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < gd.len()
                && gd[j] != 0
                && u64::from(gd[j]) * SECTOR == u64::from(gd[j - 1]) * SECTOR + gt_bytes
                && (j - i) as u64 * gt_bytes < (8 << 20)
            {
                j += 1;
            }
            let at = u64::from(gd[i]) * SECTOR;
            let mut b = vec![0u8; ((j - i) as u64 * gt_bytes) as usize];
            file.read_exact_at(at, &mut b, "vmdk grain table")?;
            let dst = &mut gt[i * gtes as usize..j * gtes as usize];
            for (d, s) in dst.iter_mut().zip(le_u32s(&b)) {
                *d = s;
            }
            i = j;
        }
        // Every grain must lie inside the file.
        let min_len = if header.compressed() { 12 } else { grain_bytes };
        for (k, &e) in gt.iter().enumerate() {
            if e > 1 && u64::from(e) * SECTOR + min_len > file_len {
                let table = k / gtes as usize;
                let at = u64::from(gd[table]) * SECTOR + (k as u64 % gtes) * 4;
                return Err(corrupt(
                    &file,
                    "grain table",
                    at,
                    format!(
                        "entry for grain {k} points to sector {e}, past the end of the file \
                         ({file_len} bytes)"
                    ),
                ));
            }
        }
        let next_sector = div_ceil(file_len, SECTOR).max(header.overhead);
        Ok(Self {
            file,
            header,
            file_len,
            grain_bytes,
            gtes,
            gd,
            rgd,
            gt,
            dirty_gts: BTreeSet::new(),
            dirty_gd: false,
            next_sector,
            cache: None,
            stream: None,
        })
    }

    /// Creates a monolithicSparse extent in the empty `file` (layout as qemu-img makes it:
    /// header, embedded descriptor, redundant directory and tables, directory and tables).
    pub fn create(file: F, capacity: u64, descriptor: &str, budget: &mut u64) -> Result<Self> {
        let grain = NEW_GRAIN_SECTORS;
        let gtes = u64::from(NEW_GTES_PER_GT);
        let num_gts = div_ceil(div_ceil(capacity, grain), gtes);
        let gd_sectors = div_ceil(num_gts * 4, SECTOR);
        let gt_sectors = div_ceil(gtes * 4, SECTOR);
        let desc_size = 20u64;
        if descriptor.len() as u64 > desc_size * SECTOR {
            return Err(Error::invalid(
                "vmdk: descriptor too long for its 10 KiB slot",
            ));
        }
        let rgd_offset = 1 + desc_size;
        let gd_offset = rgd_offset + gd_sectors + num_gts * gt_sectors;
        let end = gd_offset + gd_sectors + num_gts * gt_sectors;
        let overhead = div_ceil(end, grain) * grain;
        if overhead > u64::from(u32::MAX) {
            return Err(Error::limit("vmdk: disk too large for a sparse extent"));
        }
        let table_bytes = num_gts * gtes * 4 + num_gts * 8;
        if table_bytes > *budget {
            return Err(Error::limit(format!(
                "vmdk: grain tables would need {table_bytes} bytes of memory, more than the {} \
                 bytes limit",
                limits::MAX_TABLE_BYTES
            )));
        }
        *budget -= table_bytes;
        let header = Header {
            version: 1,
            flags: FLAG_NL_DETECT | FLAG_RGD,
            capacity,
            grain,
            desc_offset: 1,
            desc_size,
            gtes_per_gt: NEW_GTES_PER_GT,
            rgd_offset,
            gd_offset,
            overhead,
            compress: 0,
        };
        let dir = |first_gt: u64| -> Vec<u32> {
            (0..num_gts)
                .map(|i| (first_gt + i * gt_sectors) as u32)
                .collect()
        };
        let rgd = dir(rgd_offset + gd_sectors);
        let gd = dir(gd_offset + gd_sectors);
        let mut meta = vec![0u8; (gd_offset + gd_sectors) as usize * SECTOR as usize];
        meta[..512].copy_from_slice(&header.encode());
        meta[512..512 + descriptor.len()].copy_from_slice(descriptor.as_bytes());
        let at = (rgd_offset * SECTOR) as usize;
        meta[at..at + gd.len() * 4].copy_from_slice(&u32s_le(&rgd));
        let at = (gd_offset * SECTOR) as usize;
        meta[at..at + gd.len() * 4].copy_from_slice(&u32s_le(&gd));
        // Grain tables start zeroed: leave them as holes of the sparse file.
        file.set_len(overhead * SECTOR)?;
        file.write_at(0, &meta)?;
        file.flush()?;
        Ok(Self {
            file,
            header,
            file_len: overhead * SECTOR,
            grain_bytes: grain * SECTOR,
            gtes,
            gd,
            rgd,
            gt: vec![0; (num_gts * gtes) as usize],
            dirty_gts: BTreeSet::new(),
            dirty_gd: false,
            next_sector: overhead,
            cache: None,
            stream: None,
        })
    }

    /// Creates a streamOptimized extent in the empty `file`; grains are compressed as they are
    /// written and the tables and footer are written at flush and close.
    pub fn create_stream(
        file: F,
        capacity: u64,
        descriptor: &str,
        budget: &mut u64,
    ) -> Result<Self> {
        let grain = NEW_GRAIN_SECTORS;
        let gtes = u64::from(NEW_GTES_PER_GT);
        let num_gts = div_ceil(div_ceil(capacity, grain), gtes);
        let desc_size = 20u64;
        if descriptor.len() as u64 > desc_size * SECTOR {
            return Err(Error::invalid(
                "vmdk: descriptor too long for its 10 KiB slot",
            ));
        }
        let table_bytes = num_gts * gtes * 4 + num_gts * 4;
        if table_bytes > *budget {
            return Err(Error::limit(format!(
                "vmdk: grain tables would need {table_bytes} bytes of memory, more than the {} \
                 bytes limit",
                limits::MAX_TABLE_BYTES
            )));
        }
        *budget -= table_bytes;
        let overhead = 128;
        let header = Header {
            version: 3,
            flags: FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity,
            grain,
            desc_offset: 1,
            desc_size,
            gtes_per_gt: NEW_GTES_PER_GT,
            rgd_offset: 0,
            gd_offset: GD_AT_END,
            overhead,
            compress: COMPRESS_DEFLATE,
        };
        let mut meta = vec![0u8; (overhead * SECTOR) as usize];
        meta[..512].copy_from_slice(&header.encode());
        meta[512..512 + descriptor.len()].copy_from_slice(descriptor.as_bytes());
        file.write_at(0, &meta)?;
        let mut s = Self {
            file,
            header,
            file_len: overhead * SECTOR,
            grain_bytes: grain * SECTOR,
            gtes,
            gd: vec![0; num_gts as usize],
            rgd: Vec::new(),
            gt: vec![0; (num_gts * gtes) as usize],
            dirty_gts: BTreeSet::new(),
            dirty_gd: false,
            next_sector: overhead,
            cache: None,
            stream: Some(Stream {
                pending: BTreeMap::new(),
                out: Vec::new(),
                out_start: overhead * SECTOR,
                closed: false,
            }),
        };
        s.flush()?;
        Ok(s)
    }

    fn lookup(&self, g: u64) -> Grain {
        let Some(&e) = self.gt.get(g as usize) else {
            return Grain::Zero;
        };
        match e {
            0 => Grain::Unallocated,
            1 => Grain::Zero,
            s if self.header.compressed() => Grain::Compressed(u64::from(s) * SECTOR),
            s => Grain::Data(u64::from(s) * SECTOR),
        }
    }

    fn set_gte(&mut self, g: u64, value: u32) {
        let slot = &mut self.gt[g as usize];
        if *slot != value {
            *slot = value;
            self.dirty_gts.insert((g / self.gtes) as usize);
        }
    }

    /// Reads file bytes, including stream output not yet written.
    fn read_file(&self, at: u64, buf: &mut [u8], what: &str) -> Result<()> {
        if let Some(s) = &self.stream
            && at >= s.out_start
        {
            let from = (at - s.out_start) as usize;
            let n = buf.len().min(s.out.len().saturating_sub(from));
            buf[..n].copy_from_slice(&s.out[from..from + n]);
            buf[n..].fill(0);
            return Ok(());
        }
        self.file.read_exact_at(at, buf, what)
    }

    /// Inflates compressed grain `g` whose record is at byte `at` into the cache.
    fn load_compressed(&mut self, g: u64, at: u64) -> Result<&[u8]> {
        if self.cache.as_ref().is_none_or(|(cg, _)| *cg != g) {
            let gb = self.grain_bytes as usize;
            let max = self.grain_bytes * 2 + 4096;
            let data = if self.header.markers() {
                let mut m = [0u8; 12];
                self.read_file(at, &mut m, "vmdk grain marker")?;
                let lba = u64::from_le_bytes(m[..8].try_into().expect("8 bytes"));
                let size = u64::from(u32::from_le_bytes(m[8..12].try_into().expect("4 bytes")));
                if lba != g * self.header.grain {
                    return Err(corrupt(
                        &self.file,
                        "grain marker",
                        at,
                        format!(
                            "names sector {lba}, but the grain table has it for sector {}",
                            g * self.header.grain
                        ),
                    ));
                }
                if size == 0 || size > max {
                    return Err(corrupt(
                        &self.file,
                        "grain marker",
                        at,
                        format!("gives a compressed size of {size} bytes (at most {max} expected)"),
                    ));
                }
                let mut d = vec![0u8; size as usize];
                self.read_file(at + 12, &mut d, "vmdk compressed grain")?;
                d
            } else {
                let n = max.min(self.file_len.saturating_sub(at));
                let mut d = vec![0u8; n as usize];
                self.read_file(at, &mut d, "vmdk compressed grain")?;
                d
            };
            let mut out = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(&data, gb)
                .map_err(|e| {
                    corrupt(
                        &self.file,
                        "compressed grain",
                        at,
                        format!("does not inflate ({:?})", e.status),
                    )
                })?;
            out.resize(gb, 0);
            self.cache = Some((g, out));
        }
        Ok(&self.cache.as_ref().expect("cached").1)
    }

    /// The current contents of grain `g` (`None`: unallocated).
    fn grain_contents(&mut self, g: u64) -> Result<Option<Vec<u8>>> {
        if let Some(s) = &self.stream
            && let Some((b, _)) = s.pending.get(&g)
        {
            return Ok(Some(b.clone()));
        }
        Ok(match self.lookup(g) {
            Grain::Unallocated => None,
            Grain::Zero => Some(vec![0; self.grain_bytes as usize]),
            Grain::Data(at) => {
                let mut b = vec![0; self.grain_bytes as usize];
                self.read_file(at, &mut b, "vmdk grain")?;
                Some(b)
            }
            Grain::Compressed(at) => Some(self.load_compressed(g, at)?.to_vec()),
        })
    }

    /// Reads `buf` at byte `off` of the extent. Unallocated ranges are zero-filled and
    /// reported in `holes` (offsets into `buf`) for the caller to fill from a parent.
    pub fn read(
        &mut self,
        off: u64,
        buf: &mut [u8],
        holes: &mut Vec<(usize, usize)>,
    ) -> Result<()> {
        let gb = self.grain_bytes;
        let mut pos = 0usize;
        // A run of plain grains contiguous in the file: (file offset, buf start, len).
        let mut run: Option<(u64, usize, usize)> = None;
        while pos < buf.len() {
            let o = off + pos as u64;
            let g = o / gb;
            let in_g = (o % gb) as usize;
            let n = (gb as usize - in_g).min(buf.len() - pos);
            let pending = self.stream.as_ref().and_then(|s| s.pending.get(&g));
            if let Some((b, _)) = pending {
                buf[pos..pos + n].copy_from_slice(&b[in_g..in_g + n]);
                pos += n;
                continue;
            }
            match self.lookup(g) {
                Grain::Data(at) => {
                    let fo = at + in_g as u64;
                    match &mut run {
                        Some((ro, rs, rl)) if *ro + *rl as u64 == fo && *rs + *rl == pos => {
                            *rl += n
                        }
                        _ => {
                            if let Some((ro, rs, rl)) = run.take() {
                                self.read_file(ro, &mut buf[rs..rs + rl], "vmdk grain")?;
                            }
                            run = Some((fo, pos, n));
                        }
                    }
                }
                Grain::Compressed(at) => {
                    let data = self.load_compressed(g, at)?;
                    buf[pos..pos + n].copy_from_slice(&data[in_g..in_g + n]);
                }
                Grain::Zero => buf[pos..pos + n].fill(0),
                Grain::Unallocated => {
                    buf[pos..pos + n].fill(0);
                    match holes.last_mut() {
                        Some((hs, hl)) if *hs + *hl == pos => *hl += n,
                        _ => holes.push((pos, n)),
                    }
                }
            }
            pos += n;
        }
        if let Some((ro, rs, rl)) = run {
            self.read_file(ro, &mut buf[rs..rs + rl], "vmdk grain")?;
        }
        Ok(())
    }

    /// Allocation of `[off, off+len)` of the extent as runs `(offset, length, state)`.
    pub fn map(&self, off: u64, len: u64, out: &mut Vec<(u64, u64, Alloc)>) {
        let gb = self.grain_bytes;
        let end = off + len;
        let mut o = off;
        while o < end {
            let g = o / gb;
            let n = (gb - o % gb).min(end - o);
            let pending = self
                .stream
                .as_ref()
                .is_some_and(|s| s.pending.contains_key(&g));
            let state = if pending {
                Alloc::Data
            } else {
                match self.lookup(g) {
                    Grain::Data(_) | Grain::Compressed(_) => Alloc::Data,
                    Grain::Zero => Alloc::Zero,
                    Grain::Unallocated => Alloc::Unallocated,
                }
            };
            match out.last_mut() {
                Some((lo, ll, ls)) if *ls == state && *lo + *ll == o => *ll += n,
                _ => out.push((o, n, state)),
            }
            o += n;
        }
    }

    fn alloc(&mut self, sectors: u64) -> Result<u64> {
        let s = self.next_sector;
        if s + sectors > u64::from(u32::MAX) {
            return Err(Error::limit(format!(
                "vmdk: sparse extent {} is full: grain offsets cannot pass 2 TiB",
                self.file.name()
            )));
        }
        self.next_sector += sectors;
        Ok(s)
    }

    /// Makes sure grain `g` has a grain table (in the file), allocating one if needed.
    fn ensure_gt(&mut self, g: u64) -> Result<()> {
        let t = (g / self.gtes) as usize;
        if self.gd[t] != 0 || self.stream.is_some() {
            return Ok(());
        }
        let sectors = div_ceil(self.gtes * 4, SECTOR);
        let zeros = vec![0u8; (sectors * SECTOR) as usize];
        let s = self.alloc(sectors)?;
        self.file.write_at(s * SECTOR, &zeros)?;
        self.gd[t] = s as u32;
        if !self.rgd.is_empty() {
            let r = self.alloc(sectors)?;
            self.file.write_at(r * SECTOR, &zeros)?;
            self.rgd[t] = r as u32;
        }
        self.dirty_gd = true;
        self.dirty_gts.insert(t);
        Ok(())
    }

    /// Writes `data` at byte `off` of the extent. `parent` reads the parent's bytes at an extent
    /// offset (None: there is no parent, unallocated reads as zeros).
    pub fn write(&mut self, off: u64, data: &[u8], parent: &mut ParentRead<'_>) -> Result<()> {
        if self.stream.is_some() {
            return self.stream_write(off, data);
        }
        let gb = self.grain_bytes;
        let mut pos = 0usize;
        let mut run: Option<(u64, usize, usize)> = None;
        while pos < data.len() {
            let o = off + pos as u64;
            let g = o / gb;
            let in_g = (o % gb) as usize;
            let n = (gb as usize - in_g).min(data.len() - pos);
            let chunk = &data[pos..pos + n];
            let fo = match self.lookup(g) {
                Grain::Data(at) => Some(at + in_g as u64),
                Grain::Compressed(_) => {
                    return Err(Error::unsupported(
                        "vmdk: compressed grains cannot be rewritten",
                    ));
                }
                state => {
                    let unalloc = state == Grain::Unallocated;
                    if g as usize >= self.gt.len() {
                        return Err(Error::unsupported(format!(
                            "vmdk: extent {} holds {} sectors; the descriptor's larger extent \
                             size cannot be written past them",
                            self.file.name(),
                            self.header.capacity
                        )));
                    }
                    if !(unalloc && parent.is_some()) && is_zero(chunk) {
                        None // already reads as these zeros
                    } else {
                        self.ensure_gt(g)?;
                        let sector = self.alloc(self.header.grain)?;
                        self.set_gte(g, sector as u32);
                        if n == gb as usize {
                            Some(sector * SECTOR)
                        } else {
                            if let Some((ro, rs, rl)) = run.take() {
                                self.file.write_at(ro, &data[rs..rs + rl])?;
                            }
                            let mut b = vec![0u8; gb as usize];
                            if unalloc && let Some(p) = parent.as_mut() {
                                p(g * gb, &mut b)?;
                            }
                            b[in_g..in_g + n].copy_from_slice(chunk);
                            self.file.write_at(sector * SECTOR, &b)?;
                            None
                        }
                    }
                }
            };
            if let Some(fo) = fo {
                match &mut run {
                    Some((ro, rs, rl)) if *ro + *rl as u64 == fo && *rs + *rl == pos => *rl += n,
                    _ => {
                        if let Some((ro, rs, rl)) = run.take() {
                            self.file.write_at(ro, &data[rs..rs + rl])?;
                        }
                        run = Some((fo, pos, n));
                    }
                }
            }
            pos += n;
        }
        if let Some((ro, rs, rl)) = run {
            self.file.write_at(ro, &data[rs..rs + rl])?;
        }
        self.file_len = self.file_len.max(self.next_sector * SECTOR);
        Ok(())
    }

    /// Makes `[off, off+len)` of the extent read as zeros. Whole grains are unallocated (their
    /// space is punched out of the file) when there is no parent, or marked zero when the extent
    /// has zero grains; partial grains are written with zeros.
    pub fn write_zeroes(&mut self, off: u64, len: u64, parent: &mut ParentRead<'_>) -> Result<()> {
        let gb = self.grain_bytes;
        let has_parent = parent.is_some();
        let zero_flag = self.header.flags & header::FLAG_ZERO_GRAIN != 0;
        let end = off + len;
        let mut o = off;
        while o < end {
            let g = o / gb;
            let in_g = o % gb;
            let n = (gb - in_g).min(end - o);
            if let Some(s) = &mut self.stream {
                if n == gb {
                    s.pending.remove(&g);
                    if (g as usize) < self.gt.len() {
                        self.gt[g as usize] = 0;
                    }
                } else {
                    self.stream_write(o, &vec![0u8; n as usize])?;
                }
                o += n;
                continue;
            }
            let state = self.lookup(g);
            let already_zero = state == Grain::Zero || (state == Grain::Unallocated && !has_parent);
            if already_zero {
                // Nothing to do.
            } else if n == gb && (!has_parent || zero_flag) {
                if let Grain::Data(at) = state {
                    self.file.punch_hole(at, gb)?;
                }
                self.set_gte(g, if has_parent { 1 } else { 0 });
            } else {
                self.write(o, &vec![0u8; n as usize], parent)?;
            }
            o += n;
        }
        Ok(())
    }

    // ---- streamOptimized writing ----

    fn stream_write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        if self.stream.as_ref().is_some_and(|s| s.closed) {
            return Err(Error::invalid(format!(
                "vmdk: stream {} is closed; it cannot be written any more",
                self.file.name()
            )));
        }
        let gb = self.grain_bytes as usize;
        let grain_sectors = self.header.grain as usize;
        let mut pos = 0usize;
        while pos < data.len() {
            let o = off + pos as u64;
            let g = o / gb as u64;
            let in_g = (o % gb as u64) as usize;
            let n = (gb - in_g).min(data.len() - pos);
            let chunk = &data[pos..pos + n];
            pos += n;
            if g as usize >= self.gt.len() {
                continue;
            }
            if n == gb {
                self.stream.as_mut().expect("stream").pending.remove(&g);
                self.emit(g, chunk)?;
                continue;
            }
            if !self
                .stream
                .as_ref()
                .expect("stream")
                .pending
                .contains_key(&g)
            {
                let b = match self.grain_contents(g)? {
                    Some(b) => b,
                    None => vec![0; gb],
                };
                self.stream
                    .as_mut()
                    .expect("stream")
                    .pending
                    .insert(g, (b, 0));
            }
            let s = self.stream.as_mut().expect("stream");
            let (b, covered) = s.pending.get_mut(&g).expect("pending grain");
            b[in_g..in_g + n].copy_from_slice(chunk);
            let first = in_g / 512;
            let count = n / 512;
            let bits = if count >= 128 {
                u128::MAX
            } else {
                ((1u128 << count) - 1) << first
            };
            *covered |= bits;
            let full_mask = if grain_sectors >= 128 {
                u128::MAX
            } else {
                (1u128 << grain_sectors) - 1
            };
            if *covered & full_mask == full_mask {
                let (b, _) = s.pending.remove(&g).expect("pending grain");
                self.emit(g, &b)?;
            } else if s.pending.len() > MAX_PENDING_GRAINS {
                let (fg, (b, _)) = s.pending.pop_first().expect("pending grain");
                self.emit(fg, &b)?;
            }
        }
        Ok(())
    }

    /// Compresses grain `g` into the stream (or unallocates it when it is all zeros).
    fn emit(&mut self, g: u64, data: &[u8]) -> Result<()> {
        if self.cache.as_ref().is_some_and(|(cg, _)| *cg == g) {
            self.cache = None;
        }
        if is_zero(data) {
            self.gt[g as usize] = 0;
            return Ok(());
        }
        let z = miniz_oxide::deflate::compress_to_vec_zlib(data, DEFLATE_LEVEL);
        let total = div_ceil(12 + z.len() as u64, SECTOR);
        let sector = self.alloc(total)?;
        let s = self.stream.as_mut().expect("stream");
        let start = s.out.len();
        s.out
            .extend_from_slice(&(g * self.header.grain).to_le_bytes());
        s.out.extend_from_slice(&(z.len() as u32).to_le_bytes());
        s.out.extend_from_slice(&z);
        s.out.resize(start + (total * SECTOR) as usize, 0);
        self.gt[g as usize] = sector as u32;
        if s.out.len() >= STREAM_BUFFER_BYTES {
            self.write_out()?;
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<()> {
        let s = self.stream.as_mut().expect("stream");
        if !s.out.is_empty() {
            self.file.write_at(s.out_start, &s.out)?;
            s.out_start += s.out.len() as u64;
            s.out.clear();
        }
        Ok(())
    }

    /// Writes grain tables, directory, footer and end-of-stream after the grains.
    fn write_stream_tail(&mut self) -> Result<u64> {
        let pending = std::mem::take(&mut self.stream.as_mut().expect("stream").pending);
        for (g, (b, _)) in pending {
            self.emit(g, &b)?;
        }
        self.write_out()?;
        let gt_sectors = div_ceil(self.gtes * 4, SECTOR);
        let gd_sectors = div_ceil(self.gd.len() as u64 * 4, SECTOR).max(1);
        let mut sector = self.next_sector;
        let mut tail = Vec::new();
        let mut gd = vec![0u32; self.gd.len()];
        for (t, table) in self.gt.chunks(self.gtes as usize).enumerate() {
            if table.iter().all(|&e| e == 0) {
                continue;
            }
            tail.extend_from_slice(&header::marker(gt_sectors, MARKER_GT));
            gd[t] = (sector + 1) as u32;
            let start = tail.len();
            tail.extend_from_slice(&u32s_le(table));
            tail.resize(start + (gt_sectors * SECTOR) as usize, 0);
            sector += 1 + gt_sectors;
        }
        tail.extend_from_slice(&header::marker(gd_sectors, MARKER_GD));
        let gd_offset = sector + 1;
        let start = tail.len();
        tail.extend_from_slice(&u32s_le(&gd));
        tail.resize(start + (gd_sectors * SECTOR) as usize, 0);
        sector += 1 + gd_sectors;
        if sector + 3 > u64::from(u32::MAX) {
            return Err(Error::limit(
                "vmdk: stream too large for a sparse extent (2 TiB)",
            ));
        }
        tail.extend_from_slice(&header::marker(1, MARKER_FOOTER));
        let mut footer = self.header.clone();
        footer.gd_offset = gd_offset;
        tail.extend_from_slice(&footer.encode());
        tail.extend_from_slice(&header::marker(0, MARKER_EOS));
        let at = self.next_sector * SECTOR;
        self.file.write_at(at, &tail)?;
        self.gd = gd;
        Ok(at + tail.len() as u64)
    }

    /// Writes the tables (and for a stream its tail) and makes the file durable.
    pub fn flush(&mut self) -> Result<()> {
        if let Some(s) = &self.stream {
            if s.closed {
                return Ok(());
            }
            let end = self.write_stream_tail()?;
            self.file_len = end;
            self.file.set_len(end)?;
            return self.file.flush();
        }
        let gt_bytes = self.gtes as usize * 4;
        for t in std::mem::take(&mut self.dirty_gts) {
            let bytes = u32s_le(&self.gt[t * self.gtes as usize..(t + 1) * self.gtes as usize]);
            debug_assert_eq!(bytes.len(), gt_bytes);
            self.file.write_at(u64::from(self.gd[t]) * SECTOR, &bytes)?;
            if let Some(&r) = self.rgd.get(t)
                && r != 0
            {
                self.file.write_at(u64::from(r) * SECTOR, &bytes)?;
            }
        }
        if std::mem::take(&mut self.dirty_gd) {
            self.file
                .write_at(self.header.gd_offset * SECTOR, &u32s_le(&self.gd))?;
            if !self.rgd.is_empty() {
                self.file
                    .write_at(self.header.rgd_offset * SECTOR, &u32s_le(&self.rgd))?;
            }
        }
        self.file.flush()
    }

    /// Flushes; a stream is finished and takes no more writes.
    pub fn close(&mut self) -> Result<()> {
        self.flush()?;
        if let Some(s) = &mut self.stream {
            s.closed = true;
        }
        Ok(())
    }
}
