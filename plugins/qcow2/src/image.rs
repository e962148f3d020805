//! An open qcow2 image: L1/L2 mapping, refcounts, backing files, reading and writing.

use std::collections::HashMap;

use haven_image::{
    Backend, Error, ErrorKind, ExtentState, FileIo, Image, ImageInfo, MapEntry, OpenMode, Result,
    check_range, is_zero, limits, push_map,
};
use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};

use crate::bitmap;
use crate::header::{
    self, AUTOCLEAR_BITMAPS, FMT, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, be64, l1_entries_for,
    l2_entries,
};

/// Host offset bits of L1/L2 entries (9..55).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount table entries keep their offset in bits 9..63.
const RT_OFFSET_MASK: u64 = !0x1ff;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

/// Bytes of L2 tables kept in memory before they are written back and dropped.
const L2_CACHE_BYTES: u64 = 32 << 20;
/// Bytes of refcount blocks kept in memory before they are written back and dropped.
const RC_CACHE_BYTES: u64 = 16 << 20;
/// Refcount table preallocated at create: enough for the disk, at most this many bytes.
const MAX_PREALLOC_RT_BYTES: u64 = 1 << 20;

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    /// Not allocated: reads from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `host` may be preallocated (0 if not).
    Zero { host: u64 },
    /// Stored uncompressed at `host`; `copied` means its refcount is exactly 1.
    Normal { host: u64, copied: bool },
    /// Stored deflated at `offset`, `len` bytes at most.
    Compressed { offset: u64, len: u64 },
}

struct L2Table {
    entries: Vec<u64>,
    dirty: bool,
}

struct RcBlock {
    data: Vec<u8>,
    dirty: bool,
}

/// Refcount state, loaded only for writable images.
struct Refcounts {
    table: Vec<u64>,
    table_dirty: bool,
    blocks: HashMap<u64, RcBlock>,
    /// Clusters per refcount block.
    per_block: u64,
    /// Where the next cluster is appended.
    end: u64,
    /// Clusters freed in an earlier flush cycle: safe to reuse.
    free: Vec<u64>,
    /// Clusters freed since the last flush: still referenced by on-disk tables.
    pending_free: Vec<u64>,
}

enum Backing<F: FileIo> {
    Qcow2(Box<Qcow2Image<F>>),
    Raw { file: F, size: u64 },
}

pub(crate) struct Qcow2Image<F: FileIo> {
    file: F,
    path: String,
    writable: bool,
    h: Header,
    cs: u64,
    sector: u32,
    l1: Vec<u64>,
    l1_dirty: bool,
    l2: HashMap<u64, L2Table>,
    rc: Option<Refcounts>,
    header_dirty: bool,
    file_len: u64,
    backing: Option<Backing<F>>,
    files: Vec<String>,
    inflater: Option<Box<DecompressorOxide>>,
    /// The last decompressed cluster: its L2 entry and bytes.
    inflated: Option<(u64, Vec<u8>)>,
    modified: bool,
}

fn rc_get(data: &[u8], i: u64, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1u64 << order;
            let bit = i * bits;
            let byte = data[(bit / 8) as usize];
            (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
        }
        3 => u64::from(data[i as usize]),
        4 => u64::from(header::be16(data, (i * 2) as usize)),
        5 => u64::from(header::be32(data, (i * 4) as usize)),
        _ => be64(data, (i * 8) as usize),
    }
}

fn rc_set(data: &mut [u8], i: u64, order: u32, v: u64) {
    match order {
        0..=2 => {
            let bits = 1u64 << order;
            let bit = i * bits;
            let mask = (((1u64 << bits) - 1) << (bit % 8)) as u8;
            let byte = &mut data[(bit / 8) as usize];
            *byte = (*byte & !mask) | (((v << (bit % 8)) as u8) & mask);
        }
        3 => data[i as usize] = v as u8,
        4 => {
            data[(i * 2) as usize..(i * 2 + 2) as usize].copy_from_slice(&(v as u16).to_be_bytes())
        }
        5 => {
            data[(i * 4) as usize..(i * 4 + 4) as usize].copy_from_slice(&(v as u32).to_be_bytes())
        }
        _ => data[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&v.to_be_bytes()),
    }
}

fn parse_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

fn encode_table(entries: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        out.extend_from_slice(&e.to_be_bytes());
    }
    out
}

/// Reads as much as the file has at `offset` and zero-fills the rest.
fn read_or_zero<F: FileIo>(file: &F, offset: u64, buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(offset + done as u64, &mut buf[done..])?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Opens `path` (read-only) as a backing image: qcow2 or raw.
fn open_backing<B: Backend>(
    backend: &B,
    path: &str,
    format: Option<&str>,
    chain: &mut Vec<String>,
) -> Result<Backing<B::File>> {
    let format = match format {
        Some(f) => f.to_owned(),
        None => {
            let f = backend.open(path, OpenMode::ReadOnly)?;
            let mut magic = [0u8; 4];
            let n = f.read_at(0, &mut magic)?;
            if n == 4 && magic == header::MAGIC {
                "qcow2".into()
            } else {
                "raw".into()
            }
        }
    };
    match format.as_str() {
        "qcow2" => Ok(Backing::Qcow2(Box::new(Qcow2Image::open_chain(
            backend,
            path,
            OpenMode::ReadOnly,
            chain,
        )?))),
        "raw" | "file" => {
            let file = backend.open(path, OpenMode::ReadOnly)?;
            let size = file.len()?;
            chain.push(haven_image::normalize_path(path));
            Ok(Backing::Raw { file, size })
        }
        other => Err(Error::unsupported(format!(
            "qcow2: backing file {path} has format `{other}`; only qcow2 and raw backing files \
             are supported"
        ))),
    }
}

impl<F: FileIo + 'static> Qcow2Image<F> {
    /// Opens `path` and its backing chain; `chain` holds the images opened so far (children).
    pub(crate) fn open_chain<B: Backend<File = F>>(
        backend: &B,
        path: &str,
        mode: OpenMode,
        chain: &mut Vec<String>,
    ) -> Result<Self> {
        let norm = haven_image::normalize_path(path);
        if chain.contains(&norm) {
            return Err(Error::corrupt(
                FMT,
                path,
                "backing file chain",
                8,
                format!(
                    "loops back to {path} (chain: {} -> {path})",
                    chain.join(" -> ")
                ),
            ));
        }
        if chain.len() > limits::MAX_CHAIN_DEPTH {
            return Err(Error::limit(format!(
                "qcow2: backing chain of {} is deeper than {} images at {path}",
                chain.first().map_or(path, String::as_str),
                limits::MAX_CHAIN_DEPTH
            )));
        }
        chain.push(norm);
        let file = backend.open(path, mode)?;
        let h = Header::read(&file)?;
        let writable = mode == OpenMode::ReadWrite;
        let file_len = file.len()?;
        let cs = h.cluster_size();

        if writable {
            if h.incompatible & INCOMPAT_CORRUPT != 0 {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "qcow2: file {path} is marked corrupt (incompatible feature bit 1); \
                         it can only be opened read-only: repair it with `qemu-img check -r all`"
                    ),
                ));
            }
            if h.incompatible & INCOMPAT_DIRTY != 0 {
                return Err(Error::unsupported(format!(
                    "qcow2: file {path} is dirty (lazy refcounts not written back, incompatible \
                     feature bit 0); repair it with `qemu-img check -r all` before writing"
                )));
            }
            if h.nb_snapshots != 0 {
                return Err(Error::unsupported(format!(
                    "qcow2: file {path} has {} internal snapshots; writing to images with \
                     internal snapshots is not supported (open it read-only)",
                    h.nb_snapshots
                )));
            }
            if h.version == 3 && h.autoclear & !AUTOCLEAR_BITMAPS != 0 {
                return Err(Error::unsupported(format!(
                    "qcow2: file {path} has unknown autoclear feature bits {:#x}; writing is \
                     not supported",
                    h.autoclear & !AUTOCLEAR_BITMAPS
                )));
            }
        }

        // L1 table.
        let l1_bytes = u64::from(h.l1_size) * 8;
        if h.l1_size > 0 && h.l1_table_offset.saturating_add(l1_bytes) > file_len {
            return Err(Error::corrupt(
                FMT,
                path,
                "L1 table",
                h.l1_table_offset,
                format!("({l1_bytes} bytes) points past end of file ({file_len} bytes)"),
            ));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read_exact_at(h.l1_table_offset, &mut raw, "qcow2 L1 table")?;
        let l1 = parse_table(&raw);

        let mut img = Qcow2Image {
            file,
            path: path.to_owned(),
            writable,
            cs,
            sector: 512,
            l1,
            l1_dirty: false,
            l2: HashMap::new(),
            rc: None,
            header_dirty: false,
            file_len,
            backing: None,
            files: vec![path.to_owned()],
            inflater: None,
            inflated: None,
            modified: false,
            h,
        };
        if writable {
            img.load_refcounts()?;
        }
        if let Some(name) = img.h.backing_file.clone() {
            if name.starts_with("json:") || name.contains("://") {
                return Err(Error::unsupported(format!(
                    "qcow2: file {path} names backing file `{name}`, which is not a plain file \
                     name; only files next to the image are supported"
                )));
            }
            let bpath = haven_image::sibling(path, &name);
            let fmt = img.h.backing_format.clone();
            let backing = open_backing(backend, &bpath, fmt.as_deref(), chain)?;
            match &backing {
                Backing::Qcow2(b) => img.files.extend(b.files.iter().cloned()),
                Backing::Raw { .. } => img.files.push(bpath),
            }
            img.backing = Some(backing);
        }
        Ok(img)
    }

    /// Creates a new version 3 image at `path`.
    pub(crate) fn create<B: Backend<File = F>>(
        backend: &B,
        path: &str,
        size: u64,
        cluster_size: u64,
        sector: u32,
    ) -> Result<Self> {
        let cluster_bits = cluster_size.trailing_zeros();
        let cs = cluster_size;
        let l1_size = l1_entries_for(size, cluster_bits);
        let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
        if l1_size * 8 > limits::MAX_TABLE_BYTES {
            return Err(Error::limit(format!(
                "qcow2: a {size}-byte disk with {cs}-byte clusters needs an L1 table larger \
                 than {} bytes; use a larger cluster_size",
                limits::MAX_TABLE_BYTES
            )));
        }
        // Refcount table for everything the disk can need: data, L2 tables, L1, header, and
        // the refcount blocks themselves, bounded; it grows later if needed.
        let per_block = cs * 8 / 16;
        let mut rt_clusters = 1u64;
        loop {
            let clusters = 1
                + rt_clusters
                + l1_clusters
                + size.div_ceil(cs)
                + l1_size
                + size.div_ceil(cs).div_ceil(per_block)
                + 2;
            let blocks = clusters.div_ceil(per_block) + 1;
            let need = (blocks * 8)
                .div_ceil(cs)
                .min(MAX_PREALLOC_RT_BYTES.div_ceil(cs))
                .max(1);
            if need <= rt_clusters {
                break;
            }
            rt_clusters = need;
        }
        let file = backend.create(path)?;
        let rt_offset = cs;
        let l1_offset = cs * (1 + rt_clusters);
        let h = Header {
            version: 3,
            cluster_bits,
            size,
            l1_size: l1_size as u32,
            l1_table_offset: l1_offset,
            refcount_table_offset: rt_offset,
            refcount_table_clusters: rt_clusters as u32,
            nb_snapshots: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            backing_file: None,
            backing_format: None,
            bitmaps: None,
        };
        let hdr = header::encode_v3(
            size,
            cluster_bits,
            l1_size as u32,
            l1_offset,
            rt_offset,
            rt_clusters as u32,
        );
        let mut first = vec![0u8; cs as usize];
        first[..hdr.len()].copy_from_slice(&hdr);
        file.write_at(0, &first)?;
        let end = l1_offset + l1_clusters * cs;
        file.set_len(end)?;
        let mut img = Qcow2Image {
            file,
            path: path.to_owned(),
            writable: true,
            cs,
            sector,
            l1: vec![0; l1_size as usize],
            l1_dirty: true,
            l2: HashMap::new(),
            rc: Some(Refcounts {
                table: vec![0; (rt_clusters * cs / 8) as usize],
                table_dirty: true,
                blocks: HashMap::new(),
                per_block,
                end,
                free: Vec::new(),
                pending_free: Vec::new(),
            }),
            header_dirty: false,
            file_len: end,
            backing: None,
            files: vec![path.to_owned()],
            inflater: None,
            inflated: None,
            modified: true,
            h,
        };
        for c in 0..end / cs {
            img.rc_update(c * cs, 1)?;
        }
        img.flush_inner()?;
        Ok(img)
    }

    fn corrupt(&self, structure: &str, offset: u64, problem: impl std::fmt::Display) -> Error {
        Error::corrupt(FMT, &self.path, structure, offset, problem)
    }

    // ---- refcounts -----------------------------------------------------------------------

    fn load_refcounts(&mut self) -> Result<()> {
        let cs = self.cs;
        let bytes = u64::from(self.h.refcount_table_clusters) * cs;
        if self.h.refcount_table_offset.saturating_add(bytes) > self.file_len || bytes == 0 {
            return Err(self.corrupt(
                "refcount table",
                self.h.refcount_table_offset,
                format!(
                    "({} clusters) is empty or points past end of file ({} bytes)",
                    self.h.refcount_table_clusters, self.file_len
                ),
            ));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.file.read_exact_at(
            self.h.refcount_table_offset,
            &mut raw,
            "qcow2 refcount table",
        )?;
        let table = parse_table(&raw);
        let per_block = (cs * 8) >> self.h.refcount_order;
        let mut end = self.file_len.div_ceil(cs) * cs;
        // The highest cluster in use may lie past the end of the file (qemu allows it).
        if let Some(bi) = table.iter().rposition(|&e| e & RT_OFFSET_MASK != 0) {
            let off = table[bi] & RT_OFFSET_MASK;
            let data = self.read_rc_block(off)?;
            if let Some(i) = (0..per_block)
                .rev()
                .find(|&i| rc_get(&data, i, self.h.refcount_order) != 0)
            {
                end = end.max((bi as u64 * per_block + i + 1) * cs);
            }
        }
        self.rc = Some(Refcounts {
            table,
            table_dirty: false,
            blocks: HashMap::new(),
            per_block,
            end,
            free: Vec::new(),
            pending_free: Vec::new(),
        });
        Ok(())
    }

    fn read_rc_block(&self, off: u64) -> Result<Vec<u8>> {
        if !off.is_multiple_of(self.cs) || off.saturating_add(self.cs) > self.file_len {
            return Err(self.corrupt(
                "refcount block",
                off,
                format!(
                    "is unaligned or points past end of file ({} bytes)",
                    self.file_len
                ),
            ));
        }
        let mut data = vec![0u8; self.cs as usize];
        self.file
            .read_exact_at(off, &mut data, "qcow2 refcount block")?;
        Ok(data)
    }

    fn rc_mut(&mut self) -> Result<&mut Refcounts> {
        self.rc
            .as_mut()
            .ok_or_else(|| Error::invalid(format!("qcow2: image {} is open read-only", self.path)))
    }

    /// Makes sure refcount block `bi` exists (allocating it, and growing the table, if not).
    fn ensure_rc_block(&mut self, bi: u64) -> Result<()> {
        if bi >= self.rc_mut()?.table.len() as u64 {
            self.grow_refcount_table(bi + 1)?;
        }
        let cs = self.cs;
        let rc = self.rc_mut()?;
        if rc.table[bi as usize] & RT_OFFSET_MASK == 0 {
            let b = rc.end;
            rc.end += cs;
            rc.table[bi as usize] = b;
            rc.table_dirty = true;
            rc.blocks.insert(
                bi,
                RcBlock {
                    data: vec![0; cs as usize],
                    dirty: true,
                },
            );
            self.rc_update(b, 1)?;
        }
        Ok(())
    }

    /// Loads refcount block `bi` into the cache (it must exist in the table).
    fn load_rc_block(&mut self, bi: u64) -> Result<()> {
        let rc = self
            .rc
            .as_ref()
            .ok_or_else(|| Error::invalid("qcow2: read-only"))?;
        if rc.blocks.contains_key(&bi) {
            return Ok(());
        }
        let off = rc.table[bi as usize] & RT_OFFSET_MASK;
        let data = self.read_rc_block(off)?;
        if (self.rc_mut()?.blocks.len() as u64 + 1) * self.cs > RC_CACHE_BYTES {
            self.write_rc_blocks()?;
            self.rc_mut()?.blocks.clear();
        }
        self.rc_mut()?
            .blocks
            .insert(bi, RcBlock { data, dirty: false });
        Ok(())
    }

    /// Adds `delta` to the refcount of the cluster at `host`; returns the new refcount.
    fn rc_update(&mut self, host: u64, delta: i64) -> Result<u64> {
        let cs = self.cs;
        let order = self.h.refcount_order;
        let ci = host / cs;
        let per_block = self.rc_mut()?.per_block;
        let (bi, ei) = (ci / per_block, ci % per_block);
        self.ensure_rc_block(bi)?;
        self.load_rc_block(bi)?;
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << order)) - 1
        };
        let path = self.path.clone();
        let rc = self.rc_mut()?;
        let blk = rc
            .blocks
            .get_mut(&bi)
            .ok_or_else(|| Error::io("qcow2: refcount cache"))?;
        let old = rc_get(&blk.data, ei, order);
        let new = if delta < 0 {
            old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                Error::corrupt(
                    FMT,
                    &path,
                    "refcount of cluster",
                    host,
                    "would drop below zero: the refcounts are inconsistent \
                     (repair with `qemu-img check -r all`)",
                )
            })?
        } else {
            old.checked_add(delta as u64)
                .filter(|&v| v <= max)
                .ok_or_else(|| {
                    Error::corrupt(FMT, &path, "refcount of cluster", host, "would overflow")
                })?
        };
        rc_set(&mut blk.data, ei, order, new);
        blk.dirty = true;
        if new == 0 {
            rc.pending_free.push(host);
        }
        Ok(new)
    }

    /// Moves the refcount table to a larger place at the end of the file.
    fn grow_refcount_table(&mut self, min_entries: u64) -> Result<()> {
        let cs = self.cs;
        let (old_len, end, per_block) = {
            let rc = self.rc_mut()?;
            (rc.table.len() as u64, rc.end, rc.per_block)
        };
        let mut entries = min_entries.max(old_len * 2).max(cs / 8);
        let mut clusters;
        loop {
            clusters = (entries * 8).div_ceil(cs);
            // The new table and the blocks it may need must themselves be covered.
            let last = end / cs + clusters + clusters.div_ceil(per_block) + 2;
            if last.div_ceil(per_block) < entries {
                break;
            }
            entries *= 2;
        }
        if clusters * cs > limits::MAX_TABLE_BYTES {
            return Err(Error::limit(format!(
                "qcow2: refcount table of {} would grow past {} bytes",
                self.path,
                limits::MAX_TABLE_BYTES
            )));
        }
        let old_off = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        let rc = self.rc_mut()?;
        let new_off = rc.end;
        rc.end += clusters * cs;
        rc.table.resize((clusters * cs / 8) as usize, 0);
        rc.table_dirty = true;
        self.h.refcount_table_offset = new_off;
        self.h.refcount_table_clusters = clusters as u32;
        self.header_dirty = true;
        for c in 0..clusters {
            self.rc_update(new_off + c * cs, 1)?;
        }
        for c in 0..old_clusters {
            self.rc_update(old_off + c * cs, -1)?;
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters (refcount 1) and returns the first one's offset.
    fn alloc(&mut self, n: u64) -> Result<u64> {
        let cs = self.cs;
        let rc = self.rc_mut()?;
        let off = if n == 1
            && let Some(c) = rc.free.pop()
        {
            c
        } else {
            let off = rc.end;
            rc.end += n * cs;
            off
        };
        for i in 0..n {
            let r = self.rc_update(off + i * cs, 1)?;
            if r != 1 {
                return Err(self.corrupt(
                    "refcount of newly allocated cluster",
                    off + i * cs,
                    format!("is {r}, not 1: the refcounts are inconsistent"),
                ));
            }
        }
        Ok(off)
    }

    /// Drops the reference an L2 entry held.
    fn release(&mut self, entry: u64) -> Result<()> {
        match self.decode(entry)? {
            Cluster::Normal { host, .. } | Cluster::Zero { host }
                if host != 0 && self.rc_update(host, -1)? == 0 =>
            {
                self.file.punch_hole(host, self.cs)?;
            }
            Cluster::Compressed { offset, len } => {
                let start = offset & !511;
                let end = offset + len;
                let mut c = start / self.cs * self.cs;
                while c < end {
                    self.rc_update(c, -1)?;
                    c += self.cs;
                }
                if self.inflated.as_ref().is_some_and(|(e, _)| *e == entry) {
                    self.inflated = None;
                }
            }
            _ => {}
        }
        Ok(())
    }

    // ---- mapping ---------------------------------------------------------------------------

    fn decode(&self, e: u64) -> Result<Cluster> {
        if e & COMPRESSED != 0 {
            let x = 62 - (self.h.cluster_bits - 8);
            let offset = e & ((1u64 << x) - 1);
            let sectors = ((e >> x) & ((1u64 << (62 - x)) - 1)) + 1;
            let len = sectors * 512 - (offset & 511);
            if offset >= self.file_len {
                return Err(self.corrupt(
                    "compressed cluster",
                    offset,
                    format!("points past end of file ({} bytes)", self.file_len),
                ));
            }
            return Ok(Cluster::Compressed { offset, len });
        }
        let host = e & OFFSET_MASK;
        if !host.is_multiple_of(self.cs) {
            return Err(self.corrupt("L2 entry data cluster", host, "is not aligned to a cluster"));
        }
        if e & ZERO != 0 {
            return Ok(Cluster::Zero { host });
        }
        if host == 0 {
            return Ok(Cluster::Unallocated);
        }
        if host >= self.file_len {
            return Err(self.corrupt(
                "data cluster",
                host,
                format!("points past end of file ({} bytes)", self.file_len),
            ));
        }
        Ok(Cluster::Normal {
            host,
            copied: e & COPIED != 0,
        })
    }

    fn l2_per_table(&self) -> u64 {
        l2_entries(self.h.cluster_bits)
    }

    /// Loads the L2 table at `off` into the cache.
    fn load_l2(&mut self, off: u64) -> Result<()> {
        if self.l2.contains_key(&off) {
            return Ok(());
        }
        if !off.is_multiple_of(self.cs) || off.saturating_add(self.cs) > self.file_len {
            return Err(self.corrupt(
                "L2 table",
                off,
                format!(
                    "is unaligned or points past end of file ({} bytes)",
                    self.file_len
                ),
            ));
        }
        let mut raw = vec![0u8; self.cs as usize];
        self.file.read_exact_at(off, &mut raw, "qcow2 L2 table")?;
        if (self.l2.len() as u64 + 1) * self.cs > L2_CACHE_BYTES {
            self.write_l2_tables()?;
            self.l2.clear();
        }
        self.l2.insert(
            off,
            L2Table {
                entries: parse_table(&raw),
                dirty: false,
            },
        );
        Ok(())
    }

    /// The L2 table offset for guest cluster `vc` (0 if none), and the index in it.
    fn l2_slot(&self, vc: u64) -> (u64, usize) {
        let per = self.l2_per_table();
        let l1i = (vc / per) as usize;
        let off = self.l1.get(l1i).map_or(0, |e| e & OFFSET_MASK);
        (off, (vc % per) as usize)
    }

    /// The L2 entry of guest cluster `vc`.
    fn entry(&mut self, vc: u64) -> Result<u64> {
        let (off, i) = self.l2_slot(vc);
        if off == 0 {
            return Ok(0);
        }
        self.load_l2(off)?;
        Ok(self.l2.get(&off).map_or(0, |t| t.entries[i]))
    }

    /// Sets the L2 entry of guest cluster `vc`, allocating its L2 table if needed.
    fn set_entry(&mut self, vc: u64, value: u64) -> Result<()> {
        let per = self.l2_per_table();
        let l1i = (vc / per) as usize;
        let (mut off, i) = self.l2_slot(vc);
        if off == 0 {
            off = self.alloc(1)?;
            if (self.l2.len() as u64 + 1) * self.cs > L2_CACHE_BYTES {
                self.write_l2_tables()?;
                self.l2.clear();
            }
            self.l2.insert(
                off,
                L2Table {
                    entries: vec![0; per as usize],
                    dirty: true,
                },
            );
            self.l1[l1i] = off | COPIED;
            self.l1_dirty = true;
        } else if self.l1[l1i] & COPIED == 0 {
            return Err(Error::unsupported(format!(
                "qcow2: L2 table at offset {off:#x} of {} is shared (refcount > 1); writing \
                 to shared tables is not supported",
                self.path
            )));
        }
        self.load_l2(off)?;
        let t = self
            .l2
            .get_mut(&off)
            .ok_or_else(|| Error::io("qcow2: L2 cache"))?;
        t.entries[i] = value;
        t.dirty = true;
        Ok(())
    }

    // ---- reading ---------------------------------------------------------------------------

    fn inflate(&mut self, entry: u64, offset: u64, len: u64) -> Result<()> {
        if self.inflated.as_ref().is_some_and(|(e, _)| *e == entry) {
            return Ok(());
        }
        let mut input = vec![0u8; len as usize];
        read_or_zero(&self.file, offset, &mut input)?;
        let mut out = self.inflated.take().map(|(_, v)| v).unwrap_or_default();
        out.resize(self.cs as usize, 0);
        let d = self
            .inflater
            .get_or_insert_with(|| Box::new(DecompressorOxide::new()));
        d.init();
        let (status, _, n) = decompress(
            d,
            &input,
            &mut out,
            0,
            inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
        );
        let ok = n == out.len() && matches!(status, TINFLStatus::Done | TINFLStatus::HasMoreOutput);
        if !ok {
            return Err(self.corrupt(
                "compressed cluster",
                offset,
                format!(
                    "({len} bytes) does not inflate to {} bytes ({status:?})",
                    self.cs
                ),
            ));
        }
        self.inflated = Some((entry, out));
        Ok(())
    }

    /// Reads any byte range inside the disk (no alignment needed).
    fn read_inner(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.cs;
        let total = buf.len() as u64;
        let mut pos = 0u64;
        while pos < total {
            let voff = offset + pos;
            let vc = voff / cs;
            let in_c = voff % cs;
            let n = (cs - in_c).min(total - pos);
            let e = self.entry(vc)?;
            match self.decode(e)? {
                Cluster::Normal { host, .. } => {
                    // Extend over clusters stored contiguously.
                    let mut run = n;
                    let mut next = host + cs;
                    while pos + run < total {
                        let e2 = self.entry(vc + run.div_ceil(cs))?;
                        match self.decode(e2)? {
                            Cluster::Normal { host: h, .. } if h == next => {
                                run += cs.min(total - pos - run);
                                next += cs;
                            }
                            _ => break,
                        }
                    }
                    let b = &mut buf[pos as usize..(pos + run) as usize];
                    read_or_zero(&self.file, host + in_c, b)?;
                    pos += run;
                    continue;
                }
                Cluster::Zero { .. } => buf[pos as usize..(pos + n) as usize].fill(0),
                Cluster::Unallocated => {
                    let b = &mut buf[pos as usize..(pos + n) as usize];
                    match &mut self.backing {
                        None => b.fill(0),
                        Some(bk) => bk.read_clipped(voff, b)?,
                    }
                }
                Cluster::Compressed { offset: co, len } => {
                    self.inflate(e, co, len)?;
                    let data = &self.inflated.as_ref().expect("just inflated").1;
                    buf[pos as usize..(pos + n) as usize]
                        .copy_from_slice(&data[in_c as usize..(in_c + n) as usize]);
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn map_inner(&mut self, offset: u64, len: u64, out: &mut Vec<MapEntry>) -> Result<()> {
        let cs = self.cs;
        let per = self.l2_per_table();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let vc = pos / cs;
            let (l2off, _) = self.l2_slot(vc);
            let (n, state) = if l2off == 0 {
                // A whole unallocated L2 range.
                let range_end = ((vc / per + 1) * per * cs).min(end);
                (range_end - pos, None)
            } else {
                let n = ((vc + 1) * cs).min(end) - pos;
                let e = self.entry(vc)?;
                match self.decode(e)? {
                    Cluster::Normal { .. } | Cluster::Compressed { .. } => {
                        (n, Some(ExtentState::Data))
                    }
                    Cluster::Zero { .. } => (n, Some(ExtentState::Zero)),
                    Cluster::Unallocated => (n, None),
                }
            };
            match state {
                Some(s) => push_map(
                    out,
                    MapEntry {
                        offset: pos,
                        length: n,
                        state: s,
                    },
                ),
                None => match &mut self.backing {
                    None => push_map(
                        out,
                        MapEntry {
                            offset: pos,
                            length: n,
                            state: ExtentState::Zero,
                        },
                    ),
                    Some(b) => b.map_clipped(pos, n, out)?,
                },
            }
            pos += n;
        }
        Ok(())
    }

    // ---- writing ---------------------------------------------------------------------------

    /// Checks the image is writable and, on the first change, marks enabled persistent
    /// bitmaps in use: this implementation does not update them, so they stop being trusted.
    fn before_modify(&mut self) -> Result<()> {
        if !self.writable {
            return Err(Error::invalid(format!(
                "qcow2: image {} is open read-only",
                self.path
            )));
        }
        if !self.modified {
            self.modified = true;
            if let Some(ext) = self.h.bitmaps
                && self.h.autoclear & AUTOCLEAR_BITMAPS != 0
            {
                bitmap::mark_enabled_in_use(&self.file, &self.path, &self.h, ext)?;
                self.file.flush()?;
            }
        }
        Ok(())
    }

    fn fwrite(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_at(offset, data)?;
        self.file_len = self.file_len.max(offset + data.len() as u64);
        Ok(())
    }

    /// True when guest cluster `vc` with entry `e` reads as zeros without the backing file.
    fn reads_zero(&self, e: u64) -> Result<bool> {
        Ok(match self.decode(e)? {
            Cluster::Zero { .. } => true,
            Cluster::Unallocated => self.backing.is_none(),
            _ => false,
        })
    }

    fn write_inner(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let cs = self.cs;
        let per = self.l2_per_table();
        let total = data.len() as u64;
        let mut pos = 0u64;
        while pos < total {
            let voff = offset + pos;
            let vc = voff / cs;
            let in_c = voff % cs;
            let n = (cs - in_c).min(total - pos);
            let e = self.entry(vc)?;
            let cl = self.decode(e)?;
            if let Cluster::Normal { host, copied: true } = cl {
                // In place, extended over clusters stored contiguously.
                let mut run = n;
                let mut next = host + cs;
                while pos + run < total {
                    let e2 = self.entry(vc + run.div_ceil(cs))?;
                    match self.decode(e2)? {
                        Cluster::Normal {
                            host: h,
                            copied: true,
                        } if h == next => {
                            run += cs.min(total - pos - run);
                            next += cs;
                        }
                        _ => break,
                    }
                }
                self.fwrite(host + in_c, &data[pos as usize..(pos + run) as usize])?;
                pos += run;
                continue;
            }
            if in_c == 0 && n == cs {
                let chunk = &data[pos as usize..(pos + cs) as usize];
                if is_zero(chunk) && self.reads_zero(e)? {
                    pos += cs;
                    continue;
                }
                // A run of whole clusters needing new space, within one L2 table.
                let mut k = 1u64;
                let limit = per - vc % per;
                while k < limit && pos + (k + 1) * cs <= total {
                    let e2 = self.entry(vc + k)?;
                    if matches!(self.decode(e2)?, Cluster::Normal { copied: true, .. }) {
                        break;
                    }
                    let c2 = &data[(pos + k * cs) as usize..(pos + (k + 1) * cs) as usize];
                    if is_zero(c2) && self.reads_zero(e2)? {
                        break;
                    }
                    k += 1;
                }
                // Make sure the L2 table exists before allocating, so the run stays contiguous.
                if self.l2_slot(vc).0 == 0 {
                    self.set_entry(vc, 0)?;
                }
                let host = self.alloc(k)?;
                self.fwrite(host, &data[pos as usize..(pos + k * cs) as usize])?;
                for j in 0..k {
                    let old = self.entry(vc + j)?;
                    self.set_entry(vc + j, (host + j * cs) | COPIED)?;
                    self.release(old)?;
                }
                pos += k * cs;
                continue;
            }
            // A partial cluster into new space: the old contents around it are kept.
            if is_zero(&data[pos as usize..(pos + n) as usize]) && self.reads_zero(e)? {
                pos += n;
                continue;
            }
            let mut buf = vec![0u8; cs as usize];
            let base = vc * cs;
            let disk_end = self.h.size;
            let valid = (disk_end - base).min(cs) as usize;
            if !matches!(cl, Cluster::Zero { .. }) {
                self.read_inner(base, &mut buf[..valid])?;
            }
            buf[in_c as usize..(in_c + n) as usize]
                .copy_from_slice(&data[pos as usize..(pos + n) as usize]);
            if self.l2_slot(vc).0 == 0 {
                self.set_entry(vc, 0)?;
            }
            let host = self.alloc(1)?;
            self.fwrite(host, &buf)?;
            self.set_entry(vc, host | COPIED)?;
            self.release(e)?;
            pos += n;
        }
        Ok(())
    }

    /// Zeroes a range. Whole clusters are always deallocated (unallocated without a backing
    /// file, the zero flag with one), so `discard` makes no difference.
    fn zero_inner(&mut self, offset: u64, len: u64) -> Result<()> {
        let cs = self.cs;
        let per = self.l2_per_table();
        let end = offset + len;
        let mut pos = offset;
        let zeros = vec![0u8; cs as usize];
        while pos < end {
            let vc = pos / cs;
            let in_c = pos % cs;
            let n = (cs - in_c).min(end - pos);
            let whole = n == cs || (in_c == 0 && pos + n == self.h.size);
            if !whole {
                let e = self.entry(vc)?;
                if !self.reads_zero(e)? {
                    self.write_inner(pos, &zeros[..n as usize])?;
                }
                pos += n;
                continue;
            }
            if self.l2_slot(vc).0 == 0 && self.backing.is_none() {
                // A whole unallocated L2 range already reads as zeros.
                let range_end = ((vc / per + 1) * per * cs).min(end);
                pos = range_end.max(pos + n);
                continue;
            }
            let e = self.entry(vc)?;
            let target = if self.backing.is_none() {
                0
            } else if self.h.version >= 3 {
                ZERO
            } else {
                // Version 2 has no zero flag: store zeros over the backing file.
                self.write_inner(pos, &zeros[..n as usize])?;
                pos += n;
                continue;
            };
            if e != target {
                if !(target == 0 && self.l2_slot(vc).0 == 0) {
                    self.set_entry(vc, target)?;
                }
                self.release(e)?;
            }
            pos += n;
        }
        Ok(())
    }

    // ---- flushing --------------------------------------------------------------------------

    fn write_l2_tables(&mut self) -> Result<()> {
        let mut dirty: Vec<u64> = self
            .l2
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&off, _)| off)
            .collect();
        dirty.sort_unstable();
        for off in dirty {
            let bytes = encode_table(&self.l2[&off].entries);
            self.fwrite(off, &bytes)?;
            if let Some(t) = self.l2.get_mut(&off) {
                t.dirty = false;
            }
        }
        Ok(())
    }

    fn write_rc_blocks(&mut self) -> Result<()> {
        let Some(rc) = self.rc.as_mut() else {
            return Ok(());
        };
        let mut dirty: Vec<u64> = rc
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(&bi, _)| bi)
            .collect();
        dirty.sort_unstable();
        for bi in dirty {
            let off = rc.table[bi as usize] & RT_OFFSET_MASK;
            let blk = rc.blocks.get_mut(&bi).expect("listed");
            self.file.write_at(off, &blk.data)?;
            self.file_len = self.file_len.max(off + blk.data.len() as u64);
            blk.dirty = false;
        }
        Ok(())
    }

    pub(crate) fn flush_inner(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        // Refcounts first (a crash then leaks clusters but never loses references)...
        self.write_rc_blocks()?;
        if let Some(rc) = self.rc.as_mut()
            && rc.table_dirty
        {
            let bytes = encode_table(&rc.table);
            rc.table_dirty = false;
            let off = self.h.refcount_table_offset;
            self.fwrite(off, &bytes)?;
        }
        if self.header_dirty {
            let mut f = [0u8; 12];
            f[..8].copy_from_slice(&self.h.refcount_table_offset.to_be_bytes());
            f[8..].copy_from_slice(&self.h.refcount_table_clusters.to_be_bytes());
            self.fwrite(48, &f)?;
            self.header_dirty = false;
        }
        self.file.flush()?;
        // ...then the mapping.
        self.write_l2_tables()?;
        if self.l1_dirty {
            let bytes = encode_table(&self.l1);
            let off = self.h.l1_table_offset;
            self.fwrite(off, &bytes)?;
            self.l1_dirty = false;
        }
        self.file.flush()?;
        if let Some(rc) = self.rc.as_mut() {
            let pending = std::mem::take(&mut rc.pending_free);
            rc.free.extend(pending);
        }
        Ok(())
    }
}

impl<F: FileIo + 'static> Backing<F> {
    /// Reads `buf` at `offset`; bytes past the backing image's end read as zeros.
    fn read_clipped(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = match self {
            Backing::Qcow2(b) => b.h.size,
            Backing::Raw { size, .. } => *size,
        };
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail == 0 {
            return Ok(());
        }
        match self {
            Backing::Qcow2(b) => b.read_inner(offset, &mut buf[..avail]),
            Backing::Raw { file, .. } => read_or_zero(file, offset, &mut buf[..avail]),
        }
    }

    fn map_clipped(&mut self, offset: u64, len: u64, out: &mut Vec<MapEntry>) -> Result<()> {
        let size = match self {
            Backing::Qcow2(b) => b.h.size,
            Backing::Raw { size, .. } => *size,
        };
        let avail = size.saturating_sub(offset).min(len);
        if avail > 0 {
            match self {
                Backing::Qcow2(b) => b.map_inner(offset, avail, out)?,
                Backing::Raw { file, .. } => {
                    let mut pos = offset;
                    for ext in file.data_extents(offset, avail)? {
                        let s = ext.offset.max(pos);
                        push_map(
                            out,
                            MapEntry {
                                offset: pos,
                                length: s - pos,
                                state: ExtentState::Zero,
                            },
                        );
                        let e = (ext.offset + ext.length).min(offset + avail);
                        if e > s {
                            push_map(
                                out,
                                MapEntry {
                                    offset: s,
                                    length: e - s,
                                    state: ExtentState::Data,
                                },
                            );
                            pos = e;
                        }
                    }
                    push_map(
                        out,
                        MapEntry {
                            offset: pos,
                            length: offset + avail - pos,
                            state: ExtentState::Zero,
                        },
                    );
                }
            }
        }
        push_map(
            out,
            MapEntry {
                offset: offset + avail,
                length: len - avail,
                state: ExtentState::Zero,
            },
        );
        Ok(())
    }
}

impl<F: FileIo + 'static> Image for Qcow2Image<F> {
    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            format: FMT.into(),
            subformat: format!("v{}", self.h.version),
            size: self.h.size,
            sector_size: self.sector,
            files: self.files.clone(),
            allocated_bytes: self.file.len()?,
        })
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(FMT, offset, buf.len() as u64, self.h.size, self.sector)?;
        self.read_inner(offset, buf)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(FMT, offset, data.len() as u64, self.h.size, self.sector)?;
        self.before_modify()?;
        self.write_inner(offset, data)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _discard: bool) -> Result<()> {
        check_range(FMT, offset, len, self.h.size, self.sector)?;
        self.before_modify()?;
        self.zero_inner(offset, len)
    }

    fn flush(&mut self) -> Result<()> {
        self.flush_inner()
    }

    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        check_range(FMT, offset, len, self.h.size, 1)?;
        let mut out = Vec::new();
        self.map_inner(offset, len, &mut out)?;
        Ok(out)
    }
}
