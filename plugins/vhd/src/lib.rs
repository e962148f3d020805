//! VHD (Virtual PC / Hyper-V / Azure) disk images: fixed, dynamic and differencing.
//!
//! - **Fixed**: the disk's bytes followed by a 512-byte footer. This is what Azure page blobs
//!   hold, so [`Vhd::create`] gives the exact requested size (never rounded to a CHS geometry)
//!   and refuses sizes that are not whole MiB. Data writes are positional writes; zero writes
//!   punch holes; the allocation map comes from the file's holes.
//! - **Dynamic**: a footer copy at offset 0, the dynamic disk header, the block allocation table
//!   (BAT) and blocks of a sector bitmap plus data, then the footer. Read and write.
//! - **Differencing**: a dynamic layout whose unallocated blocks, and sectors whose bitmap bit is
//!   clear, read from a parent found through the parent locators. Read only.
//!
//! A fixed VHD has no header at its start, so [`Vhd::probe`] does not recognise it (like
//! qemu-img, which sees it as raw); opening a file explicitly as VHD finds its footer at the end.

use haven_image::vhd as meta;

use haven_image::{
    Backend, CreateOptions, Error, ErrorKind, ExtentState, FileIo, Format, Image, ImageInfo,
    MapEntry, OpenMode, Options, Result, check_range, is_zero, limits, push_map, sibling,
};
use meta::{DiskType, DynHeader, FOOTER_SIZE, Footer, HEADER_SIZE, SECTOR, UNUSED, bitmap_size};

const NAME: &str = "vhd";
const MIB: u64 = 1 << 20;
/// Block size of new dynamic disks: 2 MiB, what Hyper-V and qemu use.
const DEFAULT_BLOCK_SIZE: u64 = 2 * MIB;
/// Smallest and largest block size accepted for new dynamic disks.
const MIN_BLOCK_SIZE: u64 = 4096;
const MAX_BLOCK_SIZE: u64 = 256 * MIB;
/// Largest dynamic disk: 2040 GiB, the limit of the VHD specification (qemu enforces it too).
const MAX_DYNAMIC_SIZE: u64 = 0xFF00_0000 * SECTOR;
/// Largest parent locator read.
const MAX_LOCATOR_BYTES: u32 = 64 << 10;
/// Bytes of the BAT converted per read while loading it.
const BAT_CHUNK: usize = 1 << 20;

/// The VHD format.
pub struct Vhd;

impl Format for Vhd {
    const NAME: &'static str = NAME;

    fn probe<B: Backend>(backend: &B, path: &str) -> Result<Option<String>> {
        let file = backend.open(path, OpenMode::ReadOnly)?;
        let mut head = [0u8; FOOTER_SIZE];
        let n = file.read_at(0, &mut head)?;
        if n < FOOTER_SIZE || !Footer::has_cookie(&head) {
            return Ok(None);
        }
        let subformat = match meta::get_u32(&head, 60) {
            4 => DiskType::Differencing,
            _ => DiskType::Dynamic,
        };
        Ok(Some(subformat.name().to_owned()))
    }

    fn open<B: Backend>(
        backend: &B,
        path: &str,
        mode: OpenMode,
        options: &Options,
    ) -> Result<Box<dyn Image>> {
        options.check_known(NAME, &["subformat"])?;
        let image = open_chain(backend, path, mode, &mut Chain::default())?;
        if let Some(wanted) = options.get("subformat") {
            let actual = image.footer.disk_type.name();
            if wanted != actual {
                return Err(Error::invalid(format!(
                    "vhd: {path} is a {actual} VHD, but subformat={wanted} was requested"
                )));
            }
        }
        Ok(Box::new(image))
    }

    fn create<B: Backend>(
        backend: &B,
        path: &str,
        options: &CreateOptions,
    ) -> Result<Box<dyn Image>> {
        let plan = CreatePlan::new(options)?;
        haven_image::create_file(backend, path, |file| plan.write(file))?;
        Ok(Box::new(open_chain(
            backend,
            path,
            OpenMode::ReadWrite,
            &mut Chain::default(),
        )?))
    }
}

/// A validated request for a new image.
struct CreatePlan {
    size: u64,
    disk_type: DiskType,
    block_size: u64,
}

impl CreatePlan {
    fn new(options: &CreateOptions) -> Result<Self> {
        options
            .options
            .check_known(NAME, &["subformat", "block_size"])?;
        if options.sector_size != SECTOR as u32 {
            return Err(Error::invalid(format!(
                "vhd: sector size {} is not possible: VHD disks have 512-byte sectors",
                options.sector_size
            )));
        }
        let size = options.size;
        let disk_type = match options.options.get("subformat").unwrap_or("dynamic") {
            "dynamic" => DiskType::Dynamic,
            "fixed" => DiskType::Fixed,
            other => {
                return Err(Error::invalid(format!(
                    "vhd: unknown subformat `{other}` (use fixed or dynamic)"
                )));
            }
        };
        let block_size = match options.options.get("block_size") {
            None => DEFAULT_BLOCK_SIZE,
            Some(_) if disk_type == DiskType::Fixed => {
                return Err(Error::invalid(
                    "vhd: option block_size applies only to subformat=dynamic",
                ));
            }
            Some(text) => {
                let bs = parse_size(text).ok_or_else(|| {
                    Error::invalid(format!(
                        "vhd: block_size `{text}` is not a size (e.g. 2M or 2097152)"
                    ))
                })?;
                if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
                    return Err(Error::invalid(format!(
                        "vhd: block_size {bs} must be a power of two from 4 KiB to 256 MiB \
                         (Hyper-V accepts 512 KiB and 2 MiB)"
                    )));
                }
                bs
            }
        };
        match disk_type {
            DiskType::Fixed => {
                if !size.is_multiple_of(MIB) {
                    let next = size.next_multiple_of(MIB);
                    return Err(Error::invalid(format!(
                        "vhd: a fixed VHD must have a virtual size of whole MiB because Azure \
                         requires it; {size} bytes is not: use {next} bytes ({} MiB)",
                        next / MIB
                    )));
                }
                if size > limits::MAX_DISK_SIZE {
                    return Err(Error::limit(format!(
                        "vhd: {size} bytes is larger than the largest disk Haven handles \
                         ({} bytes)",
                        limits::MAX_DISK_SIZE
                    )));
                }
            }
            _ => {
                if !size.is_multiple_of(SECTOR) {
                    return Err(Error::invalid(format!(
                        "vhd: disk size {size} is not a multiple of the 512-byte sector: use {}",
                        size.next_multiple_of(SECTOR)
                    )));
                }
                if size > MAX_DYNAMIC_SIZE {
                    return Err(Error::limit(format!(
                        "vhd: a dynamic VHD holds at most 2040 GiB ({MAX_DYNAMIC_SIZE} bytes), \
                         not {size}: use subformat=fixed or the vhdx format"
                    )));
                }
            }
        }
        Ok(Self {
            size,
            disk_type,
            block_size,
        })
    }

    fn footer(&self) -> Footer {
        Footer::new(self.size, self.disk_type)
    }

    fn write(&self, file: &impl FileIo) -> Result<()> {
        let footer = self.footer().encode();
        if self.disk_type == DiskType::Fixed {
            file.set_len(self.size)?;
            file.write_at(self.size, &footer)?;
            return file.flush();
        }
        // Footer copy, header at 512, BAT at 1536, footer.
        let entries = self.size.div_ceil(self.block_size);
        let table_offset = (FOOTER_SIZE + HEADER_SIZE) as u64;
        let bat_bytes = (entries * 4).next_multiple_of(SECTOR);
        let entries = u32::try_from(entries).map_err(|_| {
            Error::limit(format!(
                "vhd: {entries} blocks do not fit a VHD block table"
            ))
        })?;
        let fill = vec![0xFFu8; bat_bytes.min(BAT_CHUNK as u64) as usize];
        let mut done = 0;
        while done < bat_bytes {
            let n = (bat_bytes - done).min(fill.len() as u64) as usize;
            file.write_at(table_offset + done, &fill[..n])?;
            done += n as u64;
        }
        file.write_at(
            FOOTER_SIZE as u64,
            &DynHeader::encode_dynamic(table_offset, entries, self.block_size as u32),
        )?;
        file.write_at(0, &footer)?;
        file.write_at(table_offset + bat_bytes, &footer)?;
        file.flush()
    }
}

/// Parses `2097152`, `2M`, `512K`, `2MiB`.
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// The block structure of a dynamic or differencing disk.
struct Dynamic {
    block_size: u64,
    bitmap_size: u64,
    bat_offset: u64,
    /// Sector offsets of each block's bitmap, [`UNUSED`] when not allocated.
    bat: Vec<u32>,
    /// Where the next new block goes (the footer sits there).
    next_free: u64,
    /// The file's length when opened, or at the last footer written.
    file_len: u64,
    /// Where the footer was last written: the file grows without a footer at its end while
    /// blocks are added, and [`Image::flush`] writes it at `next_free` (writing it after each
    /// new block would extend the file out of order, which costs half the write speed).
    footer_at: u64,
    /// BAT entries changed since the last flush: `[lo, hi)`.
    dirty: Option<(usize, usize)>,
    /// Block slots freed by discards, reused before the file grows.
    free_slots: Vec<u64>,
    /// A bitmap with every sector present, written in front of new blocks.
    full_bitmap: Vec<u8>,
}

impl Dynamic {
    fn data_start(&self, entry: u32) -> u64 {
        u64::from(entry) * SECTOR + self.bitmap_size
    }
    fn mark_dirty(&mut self, idx: usize) {
        self.dirty = Some(match self.dirty {
            None => (idx, idx + 1),
            Some((lo, hi)) => (lo.min(idx), hi.max(idx + 1)),
        });
    }
}

/// The image a differencing disk reads through to.
struct Parent {
    image: Box<dyn Image>,
    size: u64,
    files: Vec<String>,
}

/// An open VHD.
struct VhdImage<F: FileIo> {
    file: F,
    path: String,
    mode: OpenMode,
    footer: Footer,
    /// The footer exactly as read, rewritten at the end when the file grows.
    footer_bytes: [u8; FOOTER_SIZE],
    size: u64,
    dynamic: Option<Dynamic>,
    parent: Option<Parent>,
}

/// Reads the footer: the copy at offset 0 for dynamic and differencing disks, else the one in
/// the last 512 bytes. Returns the footer, its bytes and where it was found.
fn read_footer(file: &impl FileIo, len: u64) -> Result<(Footer, [u8; FOOTER_SIZE], u64)> {
    let name = file.name();
    if len < FOOTER_SIZE as u64 {
        return Err(Error::corrupt(
            NAME,
            name,
            "footer",
            0,
            format!("cannot fit: the file is {len} bytes, less than a 512-byte VHD footer"),
        ));
    }
    let mut head = [0u8; FOOTER_SIZE];
    file.read_exact_at(0, &mut head, "vhd footer copy")?;
    let mut head_error = None;
    if Footer::has_cookie(&head) {
        match Footer::parse(&head, name, 0) {
            Ok(f) if f.disk_type != DiskType::Fixed => return Ok((f, head, 0)),
            Ok(_) => {}
            Err(e) => head_error = Some(e),
        }
    }
    let at = len - FOOTER_SIZE as u64;
    let mut tail = [0u8; FOOTER_SIZE];
    file.read_exact_at(at, &mut tail, "vhd footer")?;
    if Footer::has_cookie(&tail) {
        return Ok((Footer::parse(&tail, name, at)?, tail, at));
    }
    Err(head_error.unwrap_or_else(|| {
        Error::corrupt(
            NAME,
            name,
            "footer",
            at,
            "lacks the \"conectix\" cookie, and so does offset 0: the file is not a VHD image",
        )
    }))
}

/// What opening a chain of differencing disks has used so far.
#[derive(Default)]
struct Chain {
    /// Normalised paths of the children already open, to refuse loops and over-long chains.
    paths: Vec<String>,
    /// Bytes of block tables loaded for the whole chain, held to [`limits::MAX_TABLE_BYTES`].
    table_bytes: u64,
}

/// Opens `path` and, for a differencing disk, its parents.
fn open_chain<B: Backend>(
    backend: &B,
    path: &str,
    mode: OpenMode,
    chain: &mut Chain,
) -> Result<VhdImage<B::File>> {
    let file = backend.open(path, mode)?;
    let name = file.name().to_owned();
    let len = file.len()?;
    let (footer, footer_bytes, footer_at) = read_footer(&file, len)?;
    let size = footer.virtual_size();
    if size > limits::MAX_DISK_SIZE {
        return Err(meta::limit(
            &name,
            format_args!(
                "the footer declares a disk of {size} bytes, more than the {} bytes Haven handles",
                limits::MAX_DISK_SIZE
            ),
        ));
    }
    let mut image = VhdImage {
        file,
        path: path.to_owned(),
        mode,
        footer: footer.clone(),
        footer_bytes,
        size,
        dynamic: None,
        parent: None,
    };
    if footer.disk_type == DiskType::Fixed {
        if size > len - FOOTER_SIZE as u64 {
            return Err(Error::corrupt(
                NAME,
                &name,
                "footer",
                footer_at,
                format!(
                    "declares a fixed disk of {size} bytes, but only {} bytes precede the \
                     footer: the file is truncated",
                    len - FOOTER_SIZE as u64
                ),
            ));
        }
        return Ok(image);
    }
    if footer.disk_type == DiskType::Differencing && mode == OpenMode::ReadWrite {
        return Err(Error::unsupported(format!(
            "vhd: {name} is a differencing VHD, which Haven reads but does not write: convert \
             it to a dynamic or fixed VHD first"
        )));
    }
    let header_at = footer.data_offset;
    if header_at
        .checked_add(HEADER_SIZE as u64)
        .is_none_or(|end| end > len)
    {
        return Err(Error::corrupt(
            NAME,
            &name,
            "footer",
            footer_at,
            format!(
                "points to a dynamic disk header at {header_at:#x}, past the end of the file \
                 ({len} bytes)"
            ),
        ));
    }
    let mut hbuf = [0u8; HEADER_SIZE];
    image
        .file
        .read_exact_at(header_at, &mut hbuf, "vhd dynamic disk header")?;
    let header = DynHeader::parse(&hbuf, &name, header_at)?;
    let dynamic = load_dynamic(&image.file, &header, header_at, size, len, chain)?;
    image.dynamic = Some(dynamic);

    if footer.disk_type == DiskType::Differencing {
        chain.paths.push(haven_image::normalize_path(path));
        let parent = open_parent(backend, &image, &header, len, chain);
        chain.paths.pop();
        image.parent = Some(parent?);
    }
    Ok(image)
}

/// Loads and checks the BAT of a dynamic disk.
fn load_dynamic(
    file: &impl FileIo,
    header: &DynHeader,
    header_at: u64,
    size: u64,
    len: u64,
    chain: &mut Chain,
) -> Result<Dynamic> {
    let name = file.name();
    let block_size = u64::from(header.block_size);
    let bitmap_size = bitmap_size(block_size);
    let entries = u64::from(header.max_table_entries);
    let bat_bytes = entries * 4;
    if chain.table_bytes + bat_bytes > limits::MAX_TABLE_BYTES {
        return Err(meta::limit(
            name,
            format_args!(
                "the block allocation table has {entries} entries ({bat_bytes} bytes); with the \
                 {} bytes of its children's tables that is more than the {} bytes of tables \
                 Haven holds in memory",
                chain.table_bytes,
                limits::MAX_TABLE_BYTES
            ),
        ));
    }
    chain.table_bytes += bat_bytes;
    if entries * block_size < size {
        return Err(Error::corrupt(
            NAME,
            name,
            "dynamic disk header",
            header_at,
            format!(
                "has {entries} block table entries of {block_size}-byte blocks, too few for the \
                 disk's {size} bytes"
            ),
        ));
    }
    let bat_offset = header.table_offset;
    if bat_offset
        .checked_add(bat_bytes)
        .is_none_or(|end| end > len)
    {
        return Err(Error::corrupt(
            NAME,
            name,
            "block allocation table",
            bat_offset,
            format!("({bat_bytes} bytes) lies past the end of the file ({len} bytes)"),
        ));
    }
    let mut bat = Vec::with_capacity(entries as usize);
    let mut buf = vec![0u8; (bat_bytes as usize).min(BAT_CHUNK)];
    let mut done = 0u64;
    while done < bat_bytes {
        let n = (bat_bytes - done).min(buf.len() as u64) as usize;
        file.read_exact_at(
            bat_offset + done,
            &mut buf[..n],
            "vhd block allocation table",
        )?;
        bat.extend(buf[..n].chunks_exact(4).map(|c| meta::get_u32(c, 0)));
        done += n as u64;
    }
    let meta_regions = [
        (0, FOOTER_SIZE as u64, "footer copy"),
        (header_at, HEADER_SIZE as u64, "dynamic disk header"),
        (bat_offset, bat_bytes, "block allocation table"),
    ];
    let mut next_free = (bat_offset + bat_bytes)
        .next_multiple_of(SECTOR)
        .max(header_at + HEADER_SIZE as u64)
        .max((len - FOOTER_SIZE as u64).next_multiple_of(SECTOR));
    for (i, &entry) in bat.iter().enumerate() {
        if entry == UNUSED {
            continue;
        }
        let start = u64::from(entry) * SECTOR;
        let end = start + bitmap_size + block_size;
        let at = bat_offset + 4 * i as u64;
        if end > len {
            return Err(Error::corrupt(
                NAME,
                name,
                &format!("block allocation table entry {i}"),
                at,
                format!(
                    "points to a block at {start:#x}..{end:#x}, past the end of the file ({len} \
                     bytes): the file is truncated"
                ),
            ));
        }
        for (m_at, m_len, what) in meta_regions {
            if start < m_at + m_len && m_at < end {
                return Err(Error::corrupt(
                    NAME,
                    name,
                    &format!("block allocation table entry {i}"),
                    at,
                    format!("points to a block at {start:#x} that overlaps the {what}"),
                ));
            }
        }
        next_free = next_free.max(end);
    }
    let mut full_bitmap = Vec::new();
    full_bitmap.resize(bitmap_size as usize, 0xFF);
    Ok(Dynamic {
        block_size,
        bitmap_size,
        bat_offset,
        bat,
        next_free,
        footer_at: next_free,
        file_len: len,
        dirty: None,
        free_slots: Vec::new(),
        full_bitmap,
    })
}

/// Finds, opens and checks the parent of a differencing disk.
fn open_parent<B: Backend>(
    backend: &B,
    child: &VhdImage<B::File>,
    header: &DynHeader,
    len: u64,
    chain: &mut Chain,
) -> Result<Parent> {
    let name = child.file.name();
    if chain.paths.len() >= limits::MAX_CHAIN_DEPTH {
        return Err(meta::limit(
            name,
            format_args!(
                "the chain of differencing disks is deeper than {} images",
                limits::MAX_CHAIN_DEPTH
            ),
        ));
    }
    let mut candidates: Vec<String> = Vec::new();
    let add = |candidates: &mut Vec<String>, p: String| {
        let p = haven_image::normalize_path(&p);
        if !p.is_empty() && !candidates.contains(&p) {
            candidates.push(p);
        }
    };
    for (i, loc) in header.locators.iter().enumerate() {
        if loc.platform == 0 || loc.data_length == 0 {
            continue;
        }
        let at = child.footer.data_offset + 576 + 24 * i as u64;
        if loc.data_length > MAX_LOCATOR_BYTES {
            return Err(Error::corrupt(
                NAME,
                name,
                &format!("parent locator {i}"),
                at,
                format!(
                    "claims {} bytes of path, more than {MAX_LOCATOR_BYTES}",
                    loc.data_length
                ),
            ));
        }
        if loc
            .data_offset
            .checked_add(u64::from(loc.data_length))
            .is_none_or(|e| e > len)
        {
            return Err(Error::corrupt(
                NAME,
                name,
                &format!("parent locator {i}"),
                at,
                format!(
                    "points to data at {:#x} past the end of the file ({len} bytes)",
                    loc.data_offset
                ),
            ));
        }
        let mut data = vec![0u8; loc.data_length as usize];
        child
            .file
            .read_exact_at(loc.data_offset, &mut data, "vhd parent locator data")?;
        let Some(p) = meta::locator_path(loc.platform, &data) else {
            continue;
        };
        if meta::is_absolute(&p) {
            add(&mut candidates, sibling(&child.path, meta::base_name(&p)));
        } else {
            add(&mut candidates, sibling(&child.path, &p.replace('\\', "/")));
        }
    }
    if !header.parent_name.is_empty() {
        add(
            &mut candidates,
            sibling(&child.path, meta::base_name(&header.parent_name)),
        );
    }
    let Some(found) = candidates
        .iter()
        .find(|c| backend.exists(c).unwrap_or(false))
    else {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "vhd: the parent of differencing disk {name} was not found (tried: {}); put the \
                 parent image next to it under the name its parent locator gives",
                if candidates.is_empty() {
                    "no names recorded".to_owned()
                } else {
                    candidates.join(", ")
                }
            ),
        ));
    };
    if chain.paths.contains(found) {
        return Err(Error::corrupt(
            NAME,
            name,
            "parent locator",
            child.footer.data_offset,
            format!(
                "names {found} as the parent, which is already in the chain ({} -> {found}): the \
                 chain of differencing disks loops",
                chain.paths.join(" -> ")
            ),
        ));
    }
    let parent = open_chain(backend, found, OpenMode::ReadOnly, chain)?;
    if parent.footer.unique_id != header.parent_unique_id {
        return Err(Error::corrupt(
            NAME,
            name,
            "dynamic disk header",
            child.footer.data_offset,
            format!(
                "expects a parent with unique id {}, but {found} has {}: the parent was replaced \
                 or modified; restore the right parent",
                hex(&header.parent_unique_id),
                hex(&parent.footer.unique_id)
            ),
        ));
    }
    let info = parent.info()?;
    Ok(Parent {
        size: parent.size,
        files: info.files,
        image: Box::new(parent),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fills `out` from the parent at `pos`, with zeros where there is no parent or it ends.
fn read_parent(parent: &mut Option<Parent>, pos: u64, out: &mut [u8]) -> Result<()> {
    let Some(p) = parent else {
        out.fill(0);
        return Ok(());
    };
    let have = p.size.saturating_sub(pos).min(out.len() as u64) as usize;
    if have > 0 {
        p.image.read(pos, &mut out[..have])?;
    }
    out[have..].fill(0);
    Ok(())
}

impl<F: FileIo> VhdImage<F> {
    fn check_writable(&self) -> Result<()> {
        if self.mode == OpenMode::ReadOnly {
            return Err(Error::invalid(format!(
                "vhd: {} is open read-only",
                self.path
            )));
        }
        Ok(())
    }

    /// Reads `out` (within one block) of a differencing disk's allocated block: sectors whose
    /// bitmap bit is set come from this file, the others from the parent.
    fn read_differencing(
        &mut self,
        entry: u32,
        within: u64,
        pos: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let d = self.dynamic.as_ref().expect("dynamic");
        let data_start = d.data_start(entry);
        let first = within / SECTOR;
        let count = out.len() as u64 / SECTOR;
        let byte0 = first / 8;
        let byte1 = (first + count - 1) / 8;
        let mut bits = vec![0u8; (byte1 - byte0 + 1) as usize];
        self.file.read_exact_at(
            u64::from(entry) * SECTOR + byte0,
            &mut bits,
            "vhd sector bitmap",
        )?;
        let present = |s: u64| {
            let sec = first + s;
            bits[(sec / 8 - byte0) as usize] & (0x80 >> (sec % 8)) != 0
        };
        let mut s = 0;
        while s < count {
            let here = present(s);
            let mut e = s + 1;
            while e < count && present(e) == here {
                e += 1;
            }
            let part = &mut out[(s * SECTOR) as usize..(e * SECTOR) as usize];
            if here {
                self.file.read_exact_at(
                    data_start + (first + s) * SECTOR,
                    part,
                    "vhd data block",
                )?;
            } else {
                read_parent(&mut self.parent, pos + s * SECTOR, part)?;
            }
            s = e;
        }
        Ok(())
    }

    /// Gives block `idx` space in the file and returns its BAT entry.
    fn allocate(&mut self, idx: usize) -> Result<u32> {
        let name = self.file.name().to_owned();
        let d = self.dynamic.as_mut().expect("dynamic");
        let stride = d.bitmap_size + d.block_size;
        let (start, fresh) = match d.free_slots.pop() {
            Some(s) => (s, false),
            None => (d.next_free, true),
        };
        let entry = u32::try_from(start / SECTOR)
            .ok()
            .filter(|&e| e != UNUSED)
            .ok_or_else(|| {
                meta::limit(
                    &name,
                    "the file has reached the 2 TiB a VHD block table can address; no block can \
                 be added",
                )
            })?;
        self.file.write_at(start, &d.full_bitmap)?;
        let data = start + d.bitmap_size;
        if data < d.file_len {
            // Stale bytes (an old footer's tail, a discarded block): make them read as zeros.
            self.file
                .punch_hole(data, (start + stride).min(d.file_len) - data)?;
        }
        if fresh {
            d.next_free += stride;
        }
        d.bat[idx] = entry;
        d.mark_dirty(idx);
        Ok(entry)
    }

    /// Calls `f(idx, pos, within, n)` for each piece of `[offset, offset+len)` within one block.
    fn blocks(
        block_size: u64,
        offset: u64,
        len: u64,
        mut f: impl FnMut(usize, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let within = pos % block_size;
            let n = (block_size - within).min(end - pos);
            f((pos / block_size) as usize, pos, within, n)?;
            pos += n;
        }
        Ok(())
    }
}

impl<F: FileIo> Image for VhdImage<F> {
    fn info(&self) -> Result<ImageInfo> {
        let mut files = vec![self.path.clone()];
        let allocated_bytes = match &self.dynamic {
            None => self
                .file
                .data_extents(0, self.size)?
                .iter()
                .map(|e| e.length)
                .sum(),
            Some(d) => d.bat.iter().filter(|&&e| e != UNUSED).count() as u64 * d.block_size,
        };
        if let Some(p) = &self.parent {
            files.extend(p.files.iter().cloned());
        }
        Ok(ImageInfo {
            format: NAME.to_owned(),
            subformat: self.footer.disk_type.name().to_owned(),
            size: self.size,
            sector_size: SECTOR as u32,
            files,
            allocated_bytes,
        })
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(NAME, offset, buf.len() as u64, self.size, SECTOR as u32)?;
        let Some(d) = &self.dynamic else {
            return self.file.read_exact_at(offset, buf, "vhd fixed disk data");
        };
        let block_size = d.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = pos % block_size;
            let n = (block_size - within).min((buf.len() - done) as u64) as usize;
            let out = &mut buf[done..done + n];
            let d = self.dynamic.as_ref().expect("dynamic");
            let entry = d.bat[(pos / block_size) as usize];
            if entry == UNUSED {
                read_parent(&mut self.parent, pos, out)?;
            } else if self.parent.is_some() {
                self.read_differencing(entry, within, pos, out)?;
            } else {
                let at = d.data_start(entry) + within;
                let got = self.file.read_at(at, out)?;
                if got < n {
                    // A block added in this session whose end is not written yet.
                    if at + n as u64 > d.next_free {
                        return self.file.read_exact_at(at, out, "vhd data block");
                    }
                    out[got..].fill(0);
                }
            }
            done += n;
        }
        Ok(())
    }

    fn direct_location(&self, offset: u64, len: u64, write: bool) -> Option<(&str, u64)> {
        // A fixed disk's data lies at its own offsets at the start of the file; the footer
        // after it never changes. A dynamic disk's blocks need the BAT.
        if self.dynamic.is_some() || (write && self.mode == OpenMode::ReadOnly) {
            return None;
        }
        check_range(NAME, offset, len, self.size, SECTOR as u32).ok()?;
        Some((self.path.as_str(), offset))
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        check_range(NAME, offset, data.len() as u64, self.size, SECTOR as u32)?;
        let Some(d) = &self.dynamic else {
            return self.file.write_at(offset, data);
        };
        let block_size = d.block_size;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let within = pos % block_size;
            let n = (block_size - within).min((data.len() - done) as u64) as usize;
            let chunk = &data[done..done + n];
            let idx = (pos / block_size) as usize;
            let mut entry = self.dynamic.as_ref().expect("dynamic").bat[idx];
            if entry == UNUSED {
                if is_zero(chunk) {
                    done += n;
                    continue;
                }
                entry = self.allocate(idx)?;
            }
            let at = self.dynamic.as_ref().expect("dynamic").data_start(entry) + within;
            self.file.write_at(at, chunk)?;
            done += n;
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _discard: bool) -> Result<()> {
        self.check_writable()?;
        check_range(NAME, offset, len, self.size, SECTOR as u32)?;
        let size = self.size;
        let Some(d) = self.dynamic.as_mut() else {
            return self.file.punch_hole(offset, len);
        };
        let file = &self.file;
        // No parent (differencing disks are read-only): unallocated blocks read as zeros, so
        // whole blocks are freed and partial ones have their bytes punched out.
        Self::blocks(d.block_size, offset, len, |idx, pos, within, n| {
            let entry = d.bat[idx];
            if entry == UNUSED {
                return Ok(());
            }
            let block_end = (pos - within + d.block_size).min(size);
            if within == 0 && pos + n >= block_end {
                let start = u64::from(entry) * SECTOR;
                file.punch_hole(start, d.bitmap_size + d.block_size)?;
                d.bat[idx] = UNUSED;
                d.mark_dirty(idx);
                d.free_slots.push(start);
            } else {
                file.punch_hole(d.data_start(entry) + within, n)?;
            }
            Ok(())
        })
    }

    fn flush(&mut self) -> Result<()> {
        if self.mode == OpenMode::ReadOnly {
            return Ok(());
        }
        if let Some(d) = self.dynamic.as_mut()
            && d.footer_at != d.next_free
        {
            self.file.write_at(d.next_free, &self.footer_bytes)?;
            d.footer_at = d.next_free;
            d.file_len = d.file_len.max(d.next_free + FOOTER_SIZE as u64);
        }
        if let Some(d) = self.dynamic.as_mut()
            && let Some((lo, hi)) = d.dirty.take()
        {
            let mut buf = Vec::with_capacity(((hi - lo) * 4).min(BAT_CHUNK));
            let mut i = lo;
            while i < hi {
                let j = (i + BAT_CHUNK / 4).min(hi);
                buf.clear();
                buf.extend(d.bat[i..j].iter().flat_map(|e| e.to_be_bytes()));
                self.file.write_at(d.bat_offset + 4 * i as u64, &buf)?;
                i = j;
            }
        }
        self.file.flush()
    }

    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        check_range(NAME, offset, len, self.size, SECTOR as u32)?;
        let mut map = Vec::new();
        let Some(d) = &self.dynamic else {
            let mut pos = offset;
            for e in self.file.data_extents(offset, len)? {
                let e_end = e.offset + e.length;
                let (start, end) = (e.offset.max(pos), e_end.min(offset + len));
                if start >= end {
                    continue;
                }
                push_map(
                    &mut map,
                    MapEntry {
                        offset: pos,
                        length: start - pos,
                        state: ExtentState::Zero,
                    },
                );
                push_map(
                    &mut map,
                    MapEntry {
                        offset: start,
                        length: end - start,
                        state: ExtentState::Data,
                    },
                );
                pos = end;
            }
            push_map(
                &mut map,
                MapEntry {
                    offset: pos,
                    length: offset + len - pos,
                    state: ExtentState::Zero,
                },
            );
            return Ok(map);
        };
        // Runs of unallocated blocks are gathered and asked of the parent in one call.
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        Self::blocks(d.block_size, offset, len, |idx, pos, _, n| {
            let allocated = d.bat[idx] != UNUSED;
            match runs.last_mut() {
                Some(last) if last.2 == allocated && last.0 + last.1 == pos => last.1 += n,
                _ => runs.push((pos, n, allocated)),
            }
            Ok(())
        })?;
        for (pos, n, allocated) in runs {
            if allocated {
                push_map(
                    &mut map,
                    MapEntry {
                        offset: pos,
                        length: n,
                        state: ExtentState::Data,
                    },
                );
                continue;
            }
            let Some(p) = self.parent.as_mut() else {
                push_map(
                    &mut map,
                    MapEntry {
                        offset: pos,
                        length: n,
                        state: ExtentState::Zero,
                    },
                );
                continue;
            };
            let have = p.size.saturating_sub(pos).min(n);
            if have > 0 {
                for e in p.image.map(pos, have)? {
                    push_map(&mut map, e);
                }
            }
            push_map(
                &mut map,
                MapEntry {
                    offset: pos + have,
                    length: n - have,
                    state: ExtentState::Zero,
                },
            );
        }
        Ok(map)
    }
}

// The vhd target-writer plugin: this crate's `Format` over the host's storage.
#[cfg(target_arch = "wasm32")]
haven_plugin_sdk::export_format!(
    Vhd,
    haven_plugin_sdk::writer::PluginInfo {
        name: "vhd".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: "VHD (Azure, Hyper-V): fixed of exact size, dynamic; differencing read".into(),
        kinds: vec!["vhd".into()],
    }
);
