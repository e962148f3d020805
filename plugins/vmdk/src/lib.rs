//! Haven's VMDK format: reads monolithicSparse, monolithicFlat, twoGbMaxExtentSparse,
//! twoGbMaxExtentFlat and streamOptimized images (and parent chains of sparse images); creates
//! monolithicSparse, monolithicFlat and streamOptimized images.
//!
//! All file access goes through a [`Backend`]. Grain tables of every sparse extent are held in
//! memory (bounded by [`limits::MAX_TABLE_BYTES`]) and written back at flush.
//!
//! Options at create: `subformat` (`monolithicSparse`, the default, `monolithicFlat` or
//! `streamOptimized`) and `adapter_type` (`ide`, the default, `buslogic`, `lsilogic`,
//! `legacyESX`). A streamOptimized image is written as a stream of compressed grains; writes may
//! come in any order (a grain rewritten after it was compressed is appended again), and the grain
//! tables, directory and footer are written at flush and close.

mod descriptor;
mod header;
mod sparse;

use haven_image::{
    Backend, CreateOptions, Error, ErrorKind, ExtentState, FileIo, Format, Image, ImageInfo,
    MapEntry, OpenMode, Options, Result, check_range, limits, push_map, sibling,
};

use descriptor::{ExtentLine, ExtentType};
use header::{Header, SECTOR};
use sparse::{Alloc, ParentRead, Sparse};

/// The VMDK format.
pub struct Vmdk;

const NAME: &str = "vmdk";
const SUBFORMATS: [&str; 3] = ["monolithicSparse", "monolithicFlat", "streamOptimized"];
const ADAPTERS: [&str; 4] = ["ide", "buslogic", "lsilogic", "legacyESX"];

enum Kind<F: FileIo> {
    Sparse(Box<Sparse<F>>),
    Flat { file: F, offset: u64 },
    Zero,
}

struct Ext<F: FileIo> {
    /// Byte offset of the extent in the disk.
    start: u64,
    /// Length in bytes.
    len: u64,
    kind: Kind<F>,
}

struct Parent {
    image: Box<dyn Image>,
    size: u64,
}

struct VmdkImage<F: FileIo> {
    subformat: String,
    size: u64,
    files: Vec<String>,
    extents: Vec<Ext<F>>,
    parent: Option<Parent>,
    writable: bool,
    closed: bool,
}

/// Reads the parent's bytes at disk offset `off`; zeros past its end or without a parent.
fn read_parent(parent: &mut Option<Parent>, off: u64, buf: &mut [u8]) -> Result<()> {
    match parent {
        Some(p) if off < p.size => {
            let n = ((p.size - off).min(buf.len() as u64)) as usize;
            p.image.read(off, &mut buf[..n])?;
            buf[n..].fill(0);
        }
        _ => buf.fill(0),
    }
    Ok(())
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A CID for a new descriptor, derived from the path and size (FNV-1a).
fn new_cid(path: &str, size: u64) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in path.bytes().chain(size.to_le_bytes()) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    if h >= 0xffff_fffe { 1 } else { h }
}

fn read_descriptor_text<F: FileIo>(file: &F) -> Result<Vec<u8>> {
    let len = file.len()?;
    if len > limits::MAX_DESCRIPTOR_BYTES {
        return Err(Error::limit(format!(
            "vmdk: descriptor file {} is {len} bytes, more than the {} bytes accepted",
            file.name(),
            limits::MAX_DESCRIPTOR_BYTES
        )));
    }
    let mut text = vec![0u8; len as usize];
    file.read_exact_at(0, &mut text, "vmdk descriptor")?;
    Ok(text)
}

/// The embedded descriptor of a sparse extent, if it has one.
fn embedded_descriptor<F: FileIo>(s: &Sparse<F>) -> Result<Option<descriptor::Descriptor>> {
    let h = &s.header;
    if h.desc_offset == 0 || h.desc_size == 0 {
        return Ok(None);
    }
    let bytes = h
        .desc_size
        .saturating_mul(SECTOR)
        .min(limits::MAX_DESCRIPTOR_BYTES);
    let at = h.desc_offset.saturating_mul(SECTOR);
    let mut text = vec![0u8; bytes as usize];
    s.file
        .read_exact_at(at, &mut text, "vmdk embedded descriptor")?;
    descriptor::parse(&text, s.file.name(), at).map(Some)
}

fn open_image<B: Backend>(
    backend: &B,
    path: &str,
    mode: OpenMode,
    depth: usize,
) -> Result<VmdkImage<B::File>> {
    let writable = mode == OpenMode::ReadWrite;
    let file = backend.open(path, mode)?;
    let mut head = [0u8; 512];
    let n = file.read_at(0, &mut head)?;
    let mut budget = limits::MAX_TABLE_BYTES;
    let mut files = vec![path.to_owned()];
    let (desc, extents, subformat) = if Header::has_magic(&head[..n]) {
        let s = Sparse::open(file, writable, &mut budget)?;
        let desc = embedded_descriptor(&s)?;
        let subformat = match &desc {
            Some(d) => d.create_type.clone(),
            None if s.header.compressed() => "streamOptimized".to_owned(),
            None => "monolithicSparse".to_owned(),
        };
        let len = s.header.capacity * SECTOR;
        (
            desc,
            vec![Ext {
                start: 0,
                len,
                kind: Kind::Sparse(Box::new(s)),
            }],
            subformat,
        )
    } else if head[..n].starts_with(descriptor::SIGNATURE.as_bytes()) {
        let text = read_descriptor_text(&file)?;
        let d = descriptor::parse(&text, path, 0)?;
        if d.extents.is_empty() {
            return Err(Error::corrupt(
                NAME,
                path,
                "descriptor",
                0,
                "lists no extents: is this a descriptor of a disk whose files are elsewhere?",
            ));
        }
        let mut extents = Vec::with_capacity(d.extents.len());
        let mut start = 0u64;
        for line in &d.extents {
            let len = line.sectors.checked_mul(SECTOR).filter(|l| {
                start
                    .checked_add(*l)
                    .is_some_and(|end| end <= limits::MAX_DISK_SIZE)
            });
            let Some(len) = len else {
                return Err(Error::limit(format!(
                    "vmdk: extents of {path} add up to more than the {} bytes Haven accepts",
                    limits::MAX_DISK_SIZE
                )));
            };
            let kind = match line.kind {
                ExtentType::Zero => Kind::Zero,
                ExtentType::Flat | ExtentType::Sparse => {
                    let name = sibling(path, &line.file);
                    if files.contains(&name) {
                        return Err(Error::corrupt(
                            NAME,
                            path,
                            "descriptor",
                            0,
                            format!("names extent file {name} twice"),
                        ));
                    }
                    let f = backend.open(&name, mode)?;
                    files.push(name);
                    if line.kind == ExtentType::Sparse {
                        Kind::Sparse(Box::new(Sparse::open(f, writable, &mut budget)?))
                    } else {
                        let offset = line.offset.saturating_mul(SECTOR);
                        let flen = f.len()?;
                        if offset.saturating_add(len) > flen {
                            return Err(Error::corrupt(
                                NAME,
                                f.name(),
                                "flat extent",
                                offset,
                                format!(
                                    "of {len} bytes lies past the end of the file ({flen} \
                                     bytes): the file is truncated"
                                ),
                            ));
                        }
                        Kind::Flat { file: f, offset }
                    }
                }
            };
            extents.push(Ext { start, len, kind });
            start += len;
        }
        let subformat = d.create_type.clone();
        (Some(d), extents, subformat)
    } else {
        return Err(Error::corrupt(
            NAME,
            path,
            "file header",
            0,
            "is neither a sparse extent (\"KDMV\") nor a text descriptor (\"# Disk \
             DescriptorFile\"): not a vmdk image",
        ));
    };
    let size = extents.last().map_or(0, |e| e.start + e.len);
    if size > limits::MAX_DISK_SIZE {
        return Err(Error::limit(format!(
            "vmdk: {path} claims {size} bytes, more than the {} bytes Haven accepts",
            limits::MAX_DISK_SIZE
        )));
    }
    let mut parent = None;
    if let Some(d) = &desc
        && d.parent_cid.is_some_and(|c| c != 0xffff_ffff)
        && let Some(hint) = &d.parent_hint
    {
        if depth + 1 >= limits::MAX_CHAIN_DEPTH {
            return Err(Error::limit(format!(
                "vmdk: {path} has a parent chain longer than {} images (a loop?); parent hint \
                 {hint}",
                limits::MAX_CHAIN_DEPTH
            )));
        }
        let ppath = sibling(path, hint);
        let p = open_image(backend, &ppath, OpenMode::ReadOnly, depth + 1)?;
        parent = Some(Parent {
            size: p.size,
            image: Box::new(p),
        });
    }
    Ok(VmdkImage {
        subformat,
        size,
        files,
        extents,
        parent,
        writable,
        closed: false,
    })
}

impl<F: FileIo + 'static> VmdkImage<F> {
    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::invalid(format!(
                "vmdk: image {} is open read-only",
                self.files[0]
            )));
        }
        if self.closed {
            return Err(Error::invalid(format!(
                "vmdk: image {} is closed",
                self.files[0]
            )));
        }
        Ok(())
    }

    /// Calls `f(extent index, extent-relative offset, range start in the request, length)` for
    /// each extent overlapping `[offset, offset+len)`.
    fn for_extents(
        &mut self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut Self, usize, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let end = offset + len;
        let first = self.extents.partition_point(|e| e.start + e.len <= offset);
        for i in first..self.extents.len() {
            let e = &self.extents[i];
            if e.start >= end {
                break;
            }
            let from = offset.max(e.start);
            let to = end.min(e.start + e.len);
            let start = e.start;
            f(self, i, from - start, from - offset, to - from)?;
        }
        Ok(())
    }
}

impl<F: FileIo + 'static> Image for VmdkImage<F> {
    fn info(&self) -> Result<ImageInfo> {
        let mut allocated = 0;
        for e in &self.extents {
            let file: &dyn FileIo = match &e.kind {
                Kind::Sparse(s) => &s.file,
                Kind::Flat { file, .. } => file,
                Kind::Zero => continue,
            };
            let len = file.len()?;
            allocated += file
                .data_extents(0, len)?
                .iter()
                .map(|x| x.length)
                .sum::<u64>();
        }
        Ok(ImageInfo {
            format: NAME.to_owned(),
            subformat: self.subformat.clone(),
            size: self.size,
            sector_size: SECTOR as u32,
            files: self.files.clone(),
            allocated_bytes: allocated,
        })
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(NAME, offset, buf.len() as u64, self.size, SECTOR as u32)?;
        self.for_extents(offset, buf.len() as u64, |me, i, rel, at, n| {
            let (at, n) = (at as usize, n as usize);
            let out = &mut buf[at..at + n];
            let start = me.extents[i].start;
            match &mut me.extents[i].kind {
                Kind::Zero => out.fill(0),
                Kind::Flat { file, offset } => {
                    let got = file.read_at(*offset + rel, out)?;
                    out[got..].fill(0);
                }
                Kind::Sparse(s) => {
                    let mut holes = Vec::new();
                    s.read(rel, out, &mut holes)?;
                    if me.parent.is_some() {
                        for (hs, hl) in holes {
                            let disk = start + rel + hs as u64;
                            read_parent(&mut me.parent, disk, &mut out[hs..hs + hl])?;
                        }
                    }
                }
            }
            Ok(())
        })
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(NAME, offset, data.len() as u64, self.size, SECTOR as u32)?;
        self.check_writable()?;
        self.for_extents(offset, data.len() as u64, |me, i, rel, at, n| {
            let chunk = &data[at as usize..(at + n) as usize];
            let start = me.extents[i].start;
            let VmdkImage {
                extents, parent, ..
            } = me;
            match &mut extents[i].kind {
                Kind::Zero => Err(Error::unsupported(format!(
                    "vmdk: disk bytes {:#x}..{:#x} are a ZERO extent and cannot be written",
                    start,
                    start + extents[i].len
                ))),
                Kind::Flat { file, offset } => file.write_at(*offset + rel, chunk),
                Kind::Sparse(s) => {
                    let has_parent = parent.is_some();
                    let mut read = |o: u64, b: &mut [u8]| read_parent(parent, start + o, b);
                    let mut p: ParentRead<'_> = if has_parent { Some(&mut read) } else { None };
                    s.write(rel, chunk, &mut p)
                }
            }
        })
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, discard: bool) -> Result<()> {
        check_range(NAME, offset, len, self.size, SECTOR as u32)?;
        self.check_writable()?;
        let _ = discard; // Zeroed grains are always unallocated: vmdk reads them as zeros.
        self.for_extents(offset, len, |me, i, rel, _at, n| {
            let start = me.extents[i].start;
            let VmdkImage {
                extents, parent, ..
            } = me;
            match &mut extents[i].kind {
                Kind::Zero => Ok(()),
                Kind::Flat { file, offset } => file.punch_hole(*offset + rel, n),
                Kind::Sparse(s) => {
                    let has_parent = parent.is_some();
                    let mut read = |o: u64, b: &mut [u8]| read_parent(parent, start + o, b);
                    let mut p: ParentRead<'_> = if has_parent { Some(&mut read) } else { None };
                    s.write_zeroes(rel, n, &mut p)
                }
            }
        })
    }

    fn flush(&mut self) -> Result<()> {
        if !self.writable || self.closed {
            return Ok(());
        }
        for e in &mut self.extents {
            match &mut e.kind {
                Kind::Sparse(s) => s.flush()?,
                Kind::Flat { file, .. } => file.flush()?,
                Kind::Zero => {}
            }
        }
        Ok(())
    }

    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        check_range(NAME, offset, len, self.size, 1)?;
        let mut map = Vec::new();
        self.for_extents(offset, len, |me, i, rel, at, n| {
            let disk = offset + at;
            match &me.extents[i].kind {
                Kind::Zero => push_map(
                    &mut map,
                    MapEntry {
                        offset: disk,
                        length: n,
                        state: ExtentState::Zero,
                    },
                ),
                Kind::Flat { file, offset: fo } => {
                    let mut pos = 0;
                    for x in file.data_extents(fo + rel, n)? {
                        let x_rel = x.offset - (fo + rel);
                        push_map(
                            &mut map,
                            MapEntry {
                                offset: disk + pos,
                                length: x_rel - pos,
                                state: ExtentState::Zero,
                            },
                        );
                        push_map(
                            &mut map,
                            MapEntry {
                                offset: disk + x_rel,
                                length: x.length,
                                state: ExtentState::Data,
                            },
                        );
                        pos = x_rel + x.length;
                    }
                    push_map(
                        &mut map,
                        MapEntry {
                            offset: disk + pos,
                            length: n - pos,
                            state: ExtentState::Zero,
                        },
                    );
                }
                Kind::Sparse(s) => {
                    let mut runs = Vec::new();
                    s.map(rel, n, &mut runs);
                    for (ro, rl, state) in runs {
                        let d = disk + (ro - rel);
                        match (state, &mut me.parent) {
                            (Alloc::Data, _) => push_map(
                                &mut map,
                                MapEntry {
                                    offset: d,
                                    length: rl,
                                    state: ExtentState::Data,
                                },
                            ),
                            (Alloc::Unallocated, Some(p)) if d < p.size => {
                                let pl = rl.min(p.size - d);
                                for m in p.image.map(d, pl)? {
                                    push_map(&mut map, m);
                                }
                                push_map(
                                    &mut map,
                                    MapEntry {
                                        offset: d + pl,
                                        length: rl - pl,
                                        state: ExtentState::Zero,
                                    },
                                );
                            }
                            _ => push_map(
                                &mut map,
                                MapEntry {
                                    offset: d,
                                    length: rl,
                                    state: ExtentState::Zero,
                                },
                            ),
                        }
                    }
                }
            }
            Ok(())
        })?;
        Ok(map)
    }

    fn close(&mut self) -> Result<()> {
        if !self.writable || self.closed {
            self.closed = true;
            return Ok(());
        }
        for e in &mut self.extents {
            match &mut e.kind {
                Kind::Sparse(s) => s.close()?,
                Kind::Flat { file, .. } => file.flush()?,
                Kind::Zero => {}
            }
        }
        self.closed = true;
        Ok(())
    }
}

impl Format for Vmdk {
    const NAME: &'static str = NAME;

    fn probe<B: Backend>(backend: &B, path: &str) -> Result<Option<String>> {
        let file = backend.open(path, OpenMode::ReadOnly)?;
        let mut head = [0u8; 512];
        let n = file.read_at(0, &mut head)?;
        let head = &head[..n];
        if Header::has_magic(head) {
            if n < 512 {
                return Ok(Some("monolithicSparse".to_owned()));
            }
            let h = Header::parse(head.try_into().expect("512 bytes"), path, 0)?;
            let fallback = if h.compressed() {
                "streamOptimized"
            } else {
                "monolithicSparse"
            };
            if h.desc_offset != 0 && h.desc_size != 0 {
                let len = h.desc_size.saturating_mul(SECTOR).min(64 << 10) as usize;
                let mut text = vec![0u8; len];
                let got = file.read_at(h.desc_offset.saturating_mul(SECTOR), &mut text)?;
                if let Ok(d) = descriptor::parse(&text[..got], path, 0) {
                    return Ok(Some(d.create_type));
                }
            }
            return Ok(Some(fallback.to_owned()));
        }
        if head.starts_with(descriptor::SIGNATURE.as_bytes()) {
            let text = read_descriptor_text(&file)?;
            return Ok(Some(descriptor::parse(&text, path, 0)?.create_type));
        }
        Ok(None)
    }

    fn open<B: Backend>(
        backend: &B,
        path: &str,
        mode: OpenMode,
        options: &Options,
    ) -> Result<Box<dyn Image>> {
        options.check_known(NAME, &[])?;
        Ok(Box::new(open_image(backend, path, mode, 0)?))
    }

    fn create<B: Backend>(
        backend: &B,
        path: &str,
        options: &CreateOptions,
    ) -> Result<Box<dyn Image>> {
        options
            .options
            .check_known(NAME, &["subformat", "adapter_type"])?;
        let subformat = options
            .options
            .get("subformat")
            .unwrap_or("monolithicSparse");
        if !SUBFORMATS.contains(&subformat) {
            return Err(Error::invalid(format!(
                "vmdk: subformat `{subformat}` cannot be created (choose one of {})",
                SUBFORMATS.join(", ")
            )));
        }
        let adapter = options.options.get("adapter_type").unwrap_or("ide");
        if !ADAPTERS.contains(&adapter) {
            return Err(Error::invalid(format!(
                "vmdk: adapter_type `{adapter}` is not known (choose one of {})",
                ADAPTERS.join(", ")
            )));
        }
        if options.sector_size != SECTOR as u32 {
            return Err(Error::invalid(format!(
                "vmdk: sector size {} is not supported (only 512)",
                options.sector_size
            )));
        }
        let size = options.size;
        if size == 0 || !size.is_multiple_of(SECTOR) || size > limits::MAX_DISK_SIZE {
            return Err(Error::invalid(format!(
                "vmdk: disk size {size} must be a non-zero multiple of 512 up to {} bytes",
                limits::MAX_DISK_SIZE
            )));
        }
        let sectors = size / SECTOR;
        if subformat != "monolithicFlat" && size > (2u64 << 40) - (1 << 30) {
            return Err(Error::invalid(format!(
                "vmdk: {subformat} disks hold less than 2 TiB; use subformat=monolithicFlat for \
                 {size} bytes"
            )));
        }
        let cid = new_cid(path, size);
        let base = basename(path);
        let mut budget = limits::MAX_TABLE_BYTES;
        let image = match subformat {
            "monolithicFlat" => {
                let flat_name = match base.strip_suffix(".vmdk") {
                    Some(stem) => format!("{stem}-flat.vmdk"),
                    None => format!("{base}-flat.vmdk"),
                };
                let flat_path = sibling(path, &flat_name);
                if backend.exists(&flat_path)? {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("vmdk: extent file {flat_path} exists already"),
                    ));
                }
                let line = ExtentLine {
                    sectors,
                    kind: ExtentType::Flat,
                    file: flat_name,
                    offset: 0,
                };
                let text = descriptor::generate(cid, subformat, &[line], sectors, adapter);
                let desc = backend.create(path)?;
                let flat = backend.create(&flat_path)?;
                flat.set_len(size)?;
                desc.write_at(0, text.as_bytes())?;
                desc.flush()?;
                flat.flush()?;
                VmdkImage {
                    subformat: subformat.to_owned(),
                    size,
                    files: vec![path.to_owned(), flat_path],
                    extents: vec![Ext {
                        start: 0,
                        len: size,
                        kind: Kind::Flat {
                            file: flat,
                            offset: 0,
                        },
                    }],
                    parent: None,
                    writable: true,
                    closed: false,
                }
            }
            _ => {
                let line = ExtentLine {
                    sectors,
                    kind: ExtentType::Sparse,
                    file: base.to_owned(),
                    offset: 0,
                };
                let text = descriptor::generate(cid, subformat, &[line], sectors, adapter);
                let file = backend.create(path)?;
                let s = if subformat == "streamOptimized" {
                    Sparse::create_stream(file, sectors, &text, &mut budget)?
                } else {
                    Sparse::create(file, sectors, &text, &mut budget)?
                };
                VmdkImage {
                    subformat: subformat.to_owned(),
                    size,
                    files: vec![path.to_owned()],
                    extents: vec![Ext {
                        start: 0,
                        len: size,
                        kind: Kind::Sparse(Box::new(s)),
                    }],
                    parent: None,
                    writable: true,
                    closed: false,
                }
            }
        };
        Ok(Box::new(image))
    }
}

// The vmdk target-writer plugin: this crate's `Format` over the host's storage.
#[cfg(target_arch = "wasm32")]
haven_plugin_sdk::export_format!(
    Vmdk,
    haven_plugin_sdk::writer::PluginInfo {
        name: "vmdk".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description:
            "VMware VMDK: monolithicSparse, monolithicFlat, twoGbMaxExtent*, streamOptimized".into(),
        kinds: vec!["vmdk".into()],
    }
);
