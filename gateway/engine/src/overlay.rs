//! A recovery point as a disk, without copying it: the base replica, with the journal's
//! records up to the point laid over it, and (for a writable test failover) a scratch file
//! over both.
//!
//! ```text
//! read(x) = scratch(x)            if a test-failover client wrote x
//!         | 0                     if a client zeroed or trimmed x, or the newest journal
//!                                 record touching x is a zero or trim record
//!         | record(seq)(x)        the newest journal record in (base, point] touching x
//!         | base replica(x)       otherwise
//! ```
//!
//! A writable view's scratch is two files: the data (sparse, at the disk's offsets) and a map
//! log with one entry per client write or zero, appended in the order the extent map took
//! them. A flush syncs the data, then the map. Reopening replays the map over the journal's
//! extents, so a test failover comes back after a restart with every flushed write (and, after
//! a process crash rather than a power loss, every write), and rewrites the map compacted.
//!
//! # The scratch map (`SCRATCH.map`, version 1)
//!
//! ```text
//! header (32 bytes): magic "HVNSCMAP", version u32 = 1, entry length u32 = 24,
//!                    disk size u64, zero u32, CRC32C of the 28 bytes before it
//! entry  (24 bytes): kind u8 (1 data, 2 zero), 3 zero bytes, offset u64, length u64,
//!                    CRC32C of the 20 bytes before it
//! ```
//!
//! Little-endian. The file is created, and rewritten compacted, whole by
//! [`haven_fsutil::write_atomic`]; entries are appended after it. On reopening, an entry that
//! fails its checksum is a torn tail when it is the last whole entry or only zeroes follow it
//! (a crash mid-append, or the size made durable before the bytes): it and what follows are
//! left out, as are the bytes of a partial entry at the end. A failing entry anywhere else, an
//! entry whose checksum holds but whose content cannot be (a kind other than 1 or 2, an extent
//! past the disk's end), and a bad header are errors naming the file and the offset. A map
//! without the header (written before it existed) is refused, not guessed at: cleaning the test
//! failover up and starting it again is the way on.
//!
//! Building a view reads only the journal's in-memory index (offset, length, seq of every
//! record), so it takes the same short time whatever the disk's size; bytes are read when a
//! client asks for them. While a view exists, the master target holds the base replica where it
//! was when the view was built (the applier does not advance it and the journal is not freed),
//! so neither changes under the view.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use haven_host::{Disk, WriterPlugin};
use haven_image::ExtentState;
use haven_store::decompress;
use haven_store::journal::EntryKind;
use haven_wire::crc32c::crc32c;
use haven_wire::{Payload, Record, Seq};

use crate::ingest::{DiskStream, lock};

/// The unit the base replica is read in.
const SECTOR: u64 = 512;
/// Decoded journal records kept for reads that hit the same record again.
const RECORD_CACHE: usize = 16;
/// Most runs one block-status answer of a view holds ([`View::allocation`],
/// [`View::changed_since`]); a client asks again from where the answer stopped.
pub const MAX_RUNS: usize = 4096;
/// Most "changed since" extent sets a view keeps (one per earlier point asked about).
const CHANGED_SETS: usize = 4;

/// The scratch map's magic (see the module docs for the layout).
const MAP_MAGIC: [u8; 8] = *b"HVNSCMAP";
/// The scratch map's format version, written and understood.
const MAP_VERSION: u32 = 1;
/// Length of the scratch map's header.
const MAP_HEADER: usize = 32;
/// Length of a scratch map entry.
const MAP_ENTRY: usize = 24;
const MAP_DATA: u8 = 1;
const MAP_ZERO: u8 = 2;
/// What to do about a damaged scratch map.
const MAP_ADVICE: &str = "clean the test failover up (`haven failover cleanup ITEM`) and \
                          start it again";
/// Permissions of new scratch files, as before the map was written atomically (`File::create`).
const SCRATCH_MODE: u32 = 0o666;

/// What covers an extent of the view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The journal record with this seq (a write record's data).
    Record(Seq),
    /// Zeroes: a zero or trim record, or a client's zero or trim on a writable view. Nothing
    /// is read or stored for them.
    Zero,
    /// The scratch file (a client's write to a writable view).
    Scratch,
}

/// Disjoint extents `start → (end, source)`; inserting an extent replaces what it overlaps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentMap {
    map: BTreeMap<u64, (u64, Source)>,
}

impl ExtentMap {
    /// Lays `start..end` from `source` over what is there.
    pub fn insert(&mut self, start: u64, end: u64, source: Source) {
        if start >= end {
            return;
        }
        // An extent starting before `start` and reaching into it is cut (and split if it also
        // reaches past `end`).
        if let Some((&s, &(e, src))) = self.map.range(..start).next_back()
            && e > start
        {
            self.map.insert(s, (start, src));
            if e > end {
                self.map.insert(end, (e, src));
            }
        }
        // Extents starting inside `start..end` are removed; the last may keep its tail.
        let inside: Vec<u64> = self.map.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some((e, src)) = self.map.remove(&s)
                && e > end
            {
                self.map.insert(end, (e, src));
            }
        }
        self.map.insert(start, (end, source));
    }

    /// The pieces of `start..end`, in order: `(start, end, Some(source))` where an extent
    /// covers it, `None` for gaps.
    pub fn pieces(&self, start: u64, end: u64) -> Vec<(u64, u64, Option<Source>)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        let mut pos = start;
        let first = self
            .map
            .range(..=start)
            .next_back()
            .filter(|(_, (e, _))| *e > start)
            .map(|(&s, &v)| (s, v));
        let rest = self
            .map
            .range(start.saturating_add(1)..end)
            .map(|(&s, &v)| (s, v));
        for (s, (e, src)) in first.into_iter().chain(rest) {
            if s > pos {
                out.push((pos, s.min(end), None));
            }
            let (a, b) = (s.max(pos), e.min(end));
            if a < b {
                out.push((a, b, Some(src)));
                pos = b;
            }
            if pos >= end {
                break;
            }
        }
        if pos < end {
            out.push((pos, end, None));
        }
        out
    }

    /// Every extent, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, Source)> + '_ {
        self.map.iter().map(|(&s, &(e, src))| (s, e, src))
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The runs of one block-status answer, merged where neighbours share a state, at most
/// [`MAX_RUNS`]; once one is refused, so is every later one (the answer ends there).
struct Runs<T> {
    runs: Vec<(u64, T)>,
    closed: bool,
}

impl<T> Default for Runs<T> {
    fn default() -> Self {
        Runs {
            runs: Vec::new(),
            closed: false,
        }
    }
}

impl<T: PartialEq + Copy> Runs<T> {
    fn push(&mut self, len: u64, state: T) {
        if len == 0 || self.closed {
            return;
        }
        if let Some((l, s)) = self.runs.last_mut()
            && *s == state
        {
            *l += len;
        } else if self.runs.len() < MAX_RUNS {
            self.runs.push((len, state));
        } else {
            self.closed = true;
        }
    }

    fn full(&self) -> bool {
        self.closed || self.runs.len() >= MAX_RUNS
    }

    fn into_vec(self) -> Vec<(u64, T)> {
        self.runs
    }
}

/// The base replica, read through the writer plugin.
pub struct Base {
    plugin: WriterPlugin,
    disk: Disk,
    buf: Vec<u8>,
}

impl Base {
    /// A base opened by the caller (read-only).
    pub fn new(plugin: WriterPlugin, disk: Disk) -> Base {
        Base {
            plugin,
            disk,
            buf: Vec::new(),
        }
    }
}

/// A point as a disk. See the module docs.
pub struct View {
    size: u64,
    /// The point's tag seq: the view holds every record up to it.
    pub point_seq: Seq,
    /// The base replica's applied seq when the view was built.
    pub base_seq: Seq,
    stream: Arc<DiskStream>,
    base: Mutex<Base>,
    extents: Mutex<ExtentMap>,
    scratch: Option<ScratchFiles>,
    /// Recently decoded records: seq, disk offset, bytes.
    cache: Mutex<Vec<(Seq, u64, Bytes)>>,
    /// The extents written after an earlier point's seq, per seq asked for (at most
    /// [`CHANGED_SETS`]).
    changed: Mutex<Vec<(Seq, Arc<ExtentMap>)>>,
}

/// How a view gets its scratch.
#[derive(Clone, Copy, Debug)]
pub enum Scratch<'a> {
    /// Read-only: no scratch.
    None,
    /// A new, empty scratch at this path (its map beside it, `.map` appended).
    Create(&'a Path),
    /// The scratch an earlier view left at this path, its writes kept.
    Reopen(&'a Path),
}

/// A writable view's data file and map log.
struct ScratchFiles {
    path: PathBuf,
    file: File,
    map_path: PathBuf,
    map: File,
    /// Bytes of whole entries in the map: the next entry goes here, so an append that failed
    /// part-way is overwritten rather than shifting every later entry.
    map_len: std::sync::atomic::AtomicU64,
}

fn map_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".map");
    PathBuf::from(p)
}

fn map_header(size: u64) -> [u8; MAP_HEADER] {
    let mut h = [0u8; MAP_HEADER];
    h[0..8].copy_from_slice(&MAP_MAGIC);
    h[8..12].copy_from_slice(&MAP_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(MAP_ENTRY as u32).to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    let crc = crc32c(&h[..MAP_HEADER - 4]);
    h[MAP_HEADER - 4..].copy_from_slice(&crc.to_le_bytes());
    h
}

fn map_entry(kind: u8, offset: u64, len: u64) -> [u8; MAP_ENTRY] {
    let mut e = [0u8; MAP_ENTRY];
    e[0] = kind;
    e[4..12].copy_from_slice(&offset.to_le_bytes());
    e[12..20].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c(&e[..MAP_ENTRY - 4]);
    e[MAP_ENTRY - 4..].copy_from_slice(&crc.to_le_bytes());
    e
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks the header of the map `log` read from `path` for a disk of `size` bytes.
fn check_map_header(path: &Path, log: &[u8], size: u64) -> anyhow::Result<()> {
    let bad = |what: String| {
        anyhow::anyhow!(
            "scratch map {}, offset 0: {what}; {MAP_ADVICE}",
            path.display()
        )
    };
    if log.len() < MAP_MAGIC.len() || log[..MAP_MAGIC.len()] != MAP_MAGIC {
        return Err(bad(format!(
            "no {:?} header: not a scratch map, or one written by an older Haven (before maps \
             had a header), which this one does not read",
            String::from_utf8_lossy(&MAP_MAGIC)
        )));
    }
    if log.len() < MAP_HEADER {
        return Err(bad(format!(
            "the header is cut short ({} of {MAP_HEADER} bytes)",
            log.len()
        )));
    }
    if crc32c(&log[..MAP_HEADER - 4]) != le32(log, MAP_HEADER - 4) {
        return Err(bad("header checksum mismatch (the file is damaged)".into()));
    }
    let version = le32(log, 8);
    if version != MAP_VERSION {
        return Err(bad(format!(
            "format version {version} is not supported (this build reads version {MAP_VERSION})"
        )));
    }
    let entry = le32(log, 12);
    if entry as usize != MAP_ENTRY {
        return Err(bad(format!(
            "entries of {entry} bytes (version {MAP_VERSION} has {MAP_ENTRY})"
        )));
    }
    let for_size = le64(log, 16);
    if for_size != size {
        return Err(bad(format!(
            "the map is for a {for_size}-byte disk, this disk has {size} bytes"
        )));
    }
    Ok(())
}

/// The entries of the map `log` read from `path` (header checked), in order; a torn tail is
/// left out (see the module docs).
fn read_map_entries(path: &Path, log: &[u8], size: u64) -> anyhow::Result<Vec<(u64, u64, Source)>> {
    check_map_header(path, log, size)?;
    let whole = (log.len() - MAP_HEADER) / MAP_ENTRY;
    let mut out = Vec::with_capacity(whole);
    for i in 0..whole {
        let at = MAP_HEADER + i * MAP_ENTRY;
        let e = &log[at..at + MAP_ENTRY];
        let damaged = |what: String| {
            anyhow::anyhow!(
                "scratch map {}, offset {at}: {what}; the map is damaged, {MAP_ADVICE}",
                path.display()
            )
        };
        if crc32c(&e[..MAP_ENTRY - 4]) != le32(e, MAP_ENTRY - 4) {
            if i + 1 == whole || log[at..].iter().all(|&b| b == 0) {
                tracing::warn!(
                    map = %path.display(),
                    offset = at,
                    dropped_bytes = log.len() - at,
                    "leaving out the torn tail of a scratch map (written, never flushed)"
                );
                break;
            }
            return Err(damaged(format!(
                "entry {i} fails its checksum and entries follow it"
            )));
        }
        let (offset, len) = (le64(e, 4), le64(e, 12));
        let source = match e[0] {
            MAP_DATA => Source::Scratch,
            MAP_ZERO => Source::Zero,
            k => {
                return Err(damaged(format!(
                    "entry {i} has kind {k}, not 1 (data) or 2 (zero)"
                )));
            }
        };
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(damaged(format!(
                "entry {i} ({offset}+{len}) reaches past the {size}-byte disk"
            )));
        }
        out.push((offset, offset + len, source));
    }
    Ok(out)
}

impl ScratchFiles {
    fn create(path: &Path, size: u64) -> anyhow::Result<ScratchFiles> {
        if let Some(dir) = path.parent() {
            haven_fsutil::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("creating scratch {}: {e}", path.display()))?;
        file.set_len(size)?;
        // The map appears whole, with its header; that also syncs the folder (the data
        // file's entry too).
        let map_path = map_path(path);
        haven_fsutil::write_atomic(&map_path, &map_header(size), SCRATCH_MODE)?;
        let map = std::fs::OpenOptions::new()
            .write(true)
            .open(&map_path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", map_path.display()))?;
        Ok(ScratchFiles {
            path: path.to_path_buf(),
            file,
            map_path,
            map,
            map_len: (MAP_HEADER as u64).into(),
        })
    }

    /// Opens the scratch at `path`, replays its map over `extents` and rewrites the map
    /// compacted (written beside it, synced, renamed over it).
    fn reopen(path: &Path, size: u64, extents: &mut ExtentMap) -> anyhow::Result<ScratchFiles> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("opening scratch {}: {e}", path.display()))?;
        let map_path = map_path(path);
        let log = std::fs::read(&map_path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", map_path.display()))?;
        for (start, end, source) in read_map_entries(&map_path, &log, size)? {
            extents.insert(start, end, source);
        }
        // One entry per run of touching extents of one kind.
        let mut runs: Vec<(u8, u64, u64)> = Vec::new();
        for (start, end, source) in extents.iter() {
            let kind = match source {
                Source::Scratch => MAP_DATA,
                Source::Zero => MAP_ZERO,
                Source::Record(_) => continue,
            };
            match runs.last_mut() {
                Some((k, _, e)) if *k == kind && *e == start => *e = end,
                _ => runs.push((kind, start, end)),
            }
        }
        let compact: Vec<u8> = map_header(size)
            .into_iter()
            .chain(
                runs.iter()
                    .flat_map(|&(kind, start, end)| map_entry(kind, start, end - start)),
            )
            .collect();
        haven_fsutil::write_atomic(&map_path, &compact, SCRATCH_MODE)?;
        let map = std::fs::OpenOptions::new()
            .write(true)
            .open(&map_path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", map_path.display()))?;
        Ok(ScratchFiles {
            path: path.to_path_buf(),
            file,
            map_path,
            map,
            map_len: (compact.len() as u64).into(),
        })
    }

    /// Appends an entry; called under the extent map's lock, so the log's order is the map's.
    fn log(&self, kind: u8, offset: u64, len: u64) -> anyhow::Result<()> {
        use std::sync::atomic::Ordering;
        let at = self.map_len.load(Ordering::Acquire);
        self.map
            .write_all_at(&map_entry(kind, offset, len), at)
            .map_err(|e| anyhow::anyhow!("appending to {}: {e}", self.map_path.display()))?;
        self.map_len.store(at + MAP_ENTRY as u64, Ordering::Release);
        Ok(())
    }
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("size", &self.size)
            .field("point_seq", &self.point_seq)
            .field("base_seq", &self.base_seq)
            .finish_non_exhaustive()
    }
}

impl View {
    /// The view of `stream` at `point_seq` over `base` (the replica after `base_seq`). With a
    /// scratch, writes are accepted and kept in it (the data file sparse; both removed by
    /// [`View::discard`]).
    pub fn build(
        stream: Arc<DiskStream>,
        base: Base,
        base_seq: Seq,
        point_seq: Seq,
        scratch: Scratch<'_>,
    ) -> anyhow::Result<View> {
        if point_seq < base_seq {
            anyhow::bail!(
                "point at seq {point_seq} is older than the base replica (seq {base_seq}): it \
                 can no longer be presented"
            );
        }
        let mut extents = ExtentMap::default();
        for e in stream.journal().entries_from(base_seq + 1) {
            if e.seq > point_seq {
                break;
            }
            match e.kind {
                EntryKind::Write => {
                    extents.insert(e.offset, e.offset + e.len, Source::Record(e.seq))
                }
                EntryKind::Zero | EntryKind::Trim => {
                    extents.insert(e.offset, e.offset + e.len, Source::Zero)
                }
                EntryKind::Tag => {}
            }
        }
        let scratch = match scratch {
            Scratch::None => None,
            Scratch::Create(path) => Some(ScratchFiles::create(path, stream.info.size)?),
            Scratch::Reopen(path) => {
                Some(ScratchFiles::reopen(path, stream.info.size, &mut extents)?)
            }
        };
        Ok(View {
            size: stream.info.size,
            point_seq,
            base_seq,
            stream,
            base: Mutex::new(base),
            extents: Mutex::new(extents),
            scratch,
            cache: Mutex::new(Vec::new()),
            changed: Mutex::new(Vec::new()),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are accepted.
    pub fn writable(&self) -> bool {
        self.scratch.is_some()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        let end = self.checked_end(offset, buf.len() as u64)?;
        let pieces = lock(&self.extents).pieces(offset, end);
        for (a, b, src) in pieces {
            let out = &mut buf[(a - offset) as usize..(b - offset) as usize];
            match src {
                None => {
                    // Writers read whole sectors: a piece that a client's unaligned write
                    // bounds is read from the sectors around it.
                    let lo = a - a % SECTOR;
                    let hi = b.next_multiple_of(SECTOR).min(self.size());
                    let mut base = lock(&self.base);
                    let Base { plugin, disk, buf } = &mut *base;
                    buf.resize((hi - lo) as usize, 0);
                    plugin
                        .read(disk, lo, buf)
                        .map_err(|e| anyhow::anyhow!("reading the base replica at {lo}: {e}"))?;
                    out.copy_from_slice(&buf[(a - lo) as usize..(b - lo) as usize]);
                }
                Some(Source::Scratch) => {
                    let s = self
                        .scratch
                        .as_ref()
                        .ok_or_else(|| anyhow::anyhow!("no scratch file"))?;
                    s.file
                        .read_exact_at(out, a)
                        .map_err(|e| anyhow::anyhow!("reading {} at {a}: {e}", s.path.display()))?;
                }
                Some(Source::Zero) => out.fill(0),
                Some(Source::Record(seq)) => self.read_record(seq, a, out)?,
            }
        }
        Ok(())
    }

    /// How `offset..offset + len` is stored, as runs `(length, state)` from `offset` on, in
    /// order, merged where they touch: journal records and scratch writes are data, zeroed
    /// and trimmed ranges are zero, and the rest is what the base replica's writer maps. At
    /// most [`MAX_RUNS`] runs: they may stop short of the end.
    pub fn allocation(&self, offset: u64, len: u64) -> anyhow::Result<Vec<(u64, ExtentState)>> {
        let end = self.checked_end(offset, len)?;
        let pieces = lock(&self.extents).pieces(offset, end);
        let mut runs = Runs::default();
        for (a, b, src) in pieces {
            match src {
                Some(Source::Zero) => runs.push(b - a, ExtentState::Zero),
                Some(Source::Record(_) | Source::Scratch) => runs.push(b - a, ExtentState::Data),
                None => {
                    let mut base = lock(&self.base);
                    let Base { plugin, disk, .. } = &mut *base;
                    let map = plugin.map(disk, a, b - a).map_err(|e| {
                        anyhow::anyhow!("mapping the base replica at {a}+{}: {e}", b - a)
                    })?;
                    for e in map {
                        runs.push(e.length, e.state);
                    }
                }
            }
            if runs.full() {
                break;
            }
        }
        Ok(runs.into_vec())
    }

    /// Which parts of `offset..offset + len` differ between the point at `since` (a tag seq
    /// between the base and this view's point) and this view: runs `(length, changed)` from
    /// `offset` on, merged where they touch, at most [`MAX_RUNS`]. Changed are the extents of
    /// every journal record after `since` up to the view's point, and what a client wrote or
    /// zeroed in a writable view. (There every zeroed range counts: a client's zero is not
    /// told apart from a zero record before `since`, so an incremental copy may copy more,
    /// never less.)
    pub fn changed_since(
        &self,
        since: Seq,
        offset: u64,
        len: u64,
    ) -> anyhow::Result<Vec<(u64, bool)>> {
        let end = self.checked_end(offset, len)?;
        if since < self.base_seq || since > self.point_seq {
            anyhow::bail!(
                "seq {since} is outside this view's range {}..={}: changes are known only \
                 between the base replica and the view's point",
                self.base_seq,
                self.point_seq
            );
        }
        let set = self.changed_set(since);
        let scratch = lock(&self.extents);
        let mut runs = Runs::default();
        for (a, b, src) in set.pieces(offset, end) {
            if src.is_some() {
                runs.push(b - a, true);
                continue;
            }
            // Unchanged in the journal: a client's write or zero in the scratch still counts.
            for (c, d, s) in scratch.pieces(a, b) {
                let by_client = matches!(s, Some(Source::Scratch))
                    || (self.scratch.is_some() && s == Some(Source::Zero));
                runs.push(d - c, by_client);
            }
            if runs.full() {
                break;
            }
        }
        Ok(runs.into_vec())
    }

    /// The extents of the journal records in `since + 1..=point_seq`, built once per `since`.
    fn changed_set(&self, since: Seq) -> Arc<ExtentMap> {
        if let Some((_, set)) = lock(&self.changed).iter().find(|(s, _)| *s == since) {
            return set.clone();
        }
        let mut set = ExtentMap::default();
        for e in self.stream.journal().entries_from(since + 1) {
            if e.seq > self.point_seq {
                break;
            }
            if e.kind != EntryKind::Tag {
                set.insert(e.offset, e.offset + e.len, Source::Zero);
            }
        }
        let set = Arc::new(set);
        let mut cache = lock(&self.changed);
        if cache.len() >= CHANGED_SETS {
            cache.remove(0);
        }
        cache.push((since, set.clone()));
        set
    }

    fn checked_end(&self, offset: u64, len: u64) -> anyhow::Result<u64> {
        offset
            .checked_add(len)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "range {offset}+{len} is past the end of the {}-byte disk",
                    self.size
                )
            })
    }

    /// Copies the part of record `seq` at `at` into `out`. Decoded records are kept, with
    /// their disk offset, in a small cache.
    fn read_record(&self, seq: Seq, at: u64, out: &mut [u8]) -> anyhow::Result<()> {
        let cached = lock(&self.cache)
            .iter()
            .find(|(s, _, _)| *s == seq)
            .map(|(_, o, b)| (*o, b.clone()));
        let (rec_offset, bytes) = match cached {
            Some(c) => c,
            None => {
                let Record::Write(w) = self.stream.journal().get(seq)? else {
                    anyhow::bail!("journal record {seq} is a tag where data was expected");
                };
                if matches!(w.data, Payload::Zero { .. } | Payload::Trim { .. }) {
                    out.fill(0);
                    return Ok(());
                }
                let bytes = decompress(&w.data)?;
                let mut cache = lock(&self.cache);
                if cache.len() >= RECORD_CACHE {
                    cache.remove(0);
                }
                cache.push((seq, w.offset, bytes.clone()));
                (w.offset, bytes)
            }
        };
        let from = (at - rec_offset) as usize;
        let slice = bytes
            .get(from..from + out.len())
            .ok_or_else(|| anyhow::anyhow!("journal record {seq} is shorter than its extent"))?;
        out.copy_from_slice(slice);
        Ok(())
    }

    /// Writes `data` at `offset` into the scratch file (writable views only).
    pub fn write(&self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        let s = self.scratch_file(offset, data.len() as u64)?;
        s.file
            .write_all_at(data, offset)
            .map_err(|e| anyhow::anyhow!("writing {} at {offset}: {e}", s.path.display()))?;
        let len = data.len() as u64;
        let mut extents = lock(&self.extents);
        s.log(MAP_DATA, offset, len)?;
        extents.insert(offset, offset + len, Source::Scratch);
        Ok(())
    }

    /// Zeroes (or trims) `len` bytes at `offset` (writable views only). Nothing is written:
    /// the range reads as zeroes from the extent map, and what the scratch held there is
    /// released (a hole is punched; where the file system cannot, the bytes stay allocated
    /// but are never read again).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> anyhow::Result<()> {
        let s = self.scratch_file(offset, len)?;
        let mut extents = lock(&self.extents);
        let held = extents
            .pieces(offset, offset + len)
            .iter()
            .any(|(_, _, src)| *src == Some(Source::Scratch));
        if held && len > 0 {
            use rustix::fs::{FallocateFlags, fallocate};
            match fallocate(
                &s.file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) | Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {}
                Err(e) => anyhow::bail!("punching {offset}+{len} in {}: {e}", s.path.display()),
            }
        }
        s.log(MAP_ZERO, offset, len)?;
        extents.insert(offset, offset + len, Source::Zero);
        Ok(())
    }

    /// Makes the scratch durable: the data first, then the map that points at it.
    pub fn flush(&self) -> anyhow::Result<()> {
        if let Some(s) = &self.scratch {
            s.file
                .sync_data()
                .map_err(|e| anyhow::anyhow!("syncing {}: {e}", s.path.display()))?;
            s.map
                .sync_data()
                .map_err(|e| anyhow::anyhow!("syncing {}: {e}", s.map_path.display()))?;
        }
        Ok(())
    }

    fn scratch_file(&self, offset: u64, len: u64) -> anyhow::Result<&ScratchFiles> {
        let scratch = self
            .scratch
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this view is read-only"))?;
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            anyhow::bail!(
                "write {offset}+{len} past the end of the {}-byte disk",
                self.size
            );
        }
        Ok(scratch)
    }

    /// Closes the base and removes the scratch files.
    pub fn discard(self) -> anyhow::Result<()> {
        let base = self.base.into_inner().unwrap_or_else(|e| e.into_inner());
        let _ = base.plugin_close();
        if let Some(s) = self.scratch {
            let ScratchFiles { path, map_path, .. } = s;
            for p in [path, map_path] {
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => anyhow::bail!("removing {}: {e}", p.display()),
                }
            }
        }
        Ok(())
    }
}

impl Base {
    fn plugin_close(self) -> anyhow::Result<()> {
        let Base {
            mut plugin, disk, ..
        } = self;
        plugin.close(disk).map_err(|e| anyhow::anyhow!("{e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte map of the disk, the straightforward way.
    fn model(ops: &[(u64, u64, u8)], size: usize) -> Vec<Option<u8>> {
        let mut m = vec![None; size];
        for &(s, e, v) in ops {
            for x in &mut m[s as usize..e as usize] {
                *x = Some(v);
            }
        }
        m
    }

    #[test]
    fn a_reopened_scratch_has_the_extents_it_logged_and_a_compacted_map() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("scratch.raw");
        let journal = |m: &mut ExtentMap| m.insert(0, 100, Source::Record(7));
        let mut want = ExtentMap::default();
        journal(&mut want);
        {
            let s = ScratchFiles::create(&path, 1000).expect("create");
            for (kind, off, len) in [
                (MAP_DATA, 10, 20),
                (MAP_ZERO, 15, 5),
                (MAP_DATA, 200, 50),
                (MAP_DATA, 210, 10),
                (MAP_ZERO, 900, 100),
            ] {
                s.log(kind, off, len).expect("log");
                let src = if kind == MAP_DATA {
                    Source::Scratch
                } else {
                    Source::Zero
                };
                want.insert(off, off + len, src);
            }
            // A torn entry at the end (a power loss mid-append) is left out.
            let at = s.map_len.load(std::sync::atomic::Ordering::Acquire);
            s.map.write_all_at(&[MAP_DATA, 1, 2], at).expect("torn");
        }
        let mut got = ExtentMap::default();
        journal(&mut got);
        ScratchFiles::reopen(&path, 1000, &mut got).expect("reopen");
        assert_eq!(got, want);
        // Compacted: one entry per scratch or zero extent (10..15, 15..20, 20..30, 200..250,
        // 900..1000), and it replays to the same map.
        let log = std::fs::read(map_path(&path)).expect("map");
        assert_eq!(log.len(), MAP_HEADER + 5 * MAP_ENTRY);
        assert_eq!(&log[..8], b"HVNSCMAP");
        let replay = |log: &[u8]| {
            std::fs::write(map_path(&path), log).expect("write map");
            let mut m = ExtentMap::default();
            journal(&mut m);
            ScratchFiles::reopen(&path, 1000, &mut m).map(|_| m)
        };
        let bytes = |m: &ExtentMap| {
            m.pieces(0, 1000)
                .into_iter()
                .flat_map(|(a, b, src)| (a..b).map(move |_| src))
                .collect::<Vec<_>>()
        };
        assert_eq!(bytes(&replay(&log).expect("reopen again")), bytes(&want));
        // So are all-zero entries at the end (the size durable before the bytes), a last entry
        // failing its checksum, and a partial entry after one.
        let with = |tail: &[u8]| [log.as_slice(), tail].concat();
        let mut bad_last = map_entry(MAP_DATA, 500, 10);
        bad_last[6] ^= 1;
        for tail in [
            with(&[0u8; 2 * MAP_ENTRY]),
            with(&bad_last),
            with(&[bad_last.as_slice(), &[7, 7, 7]].concat()),
        ] {
            assert_eq!(bytes(&replay(&tail).expect("torn tail")), bytes(&want));
        }
        // A compacted rewrite leaves no torn tail and no temporary file behind.
        assert_eq!(std::fs::read(map_path(&path)).expect("map"), log);
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        // Damage a crash cannot explain is refused, naming the file and the offset.
        let refused = |log: &[u8], want: &str| {
            let e = replay(log).expect_err("refused").to_string();
            assert!(
                e.contains(&format!("scratch map {}", map_path(&path).display()))
                    && e.contains(want)
                    && e.contains("haven failover cleanup"),
                "{e}"
            );
        };
        // A bad entry with an intact one after it.
        let mut middle = log.clone();
        middle[MAP_HEADER + MAP_ENTRY + 5] ^= 1;
        refused(
            &middle,
            &format!(
                "offset {}: entry 1 fails its checksum and entries follow it",
                MAP_HEADER + MAP_ENTRY
            ),
        );
        // Intact entries that cannot be.
        refused(
            &with(&map_entry(MAP_DATA, 990, 20)),
            &format!(
                "offset {}: entry 5 (990+20) reaches past the 1000-byte disk",
                MAP_HEADER + 5 * MAP_ENTRY
            ),
        );
        refused(&with(&map_entry(3, 0, 1)), "entry 5 has kind 3");
        // The header: damaged, another version, another disk, cut short.
        let mut header = log.clone();
        header[20] ^= 1;
        refused(&header, "offset 0: header checksum mismatch");
        let mut v2 = map_header(1000);
        v2[8] = 2;
        let crc = crc32c(&v2[..MAP_HEADER - 4]);
        v2[MAP_HEADER - 4..].copy_from_slice(&crc.to_le_bytes());
        refused(&v2, "format version 2 is not supported");
        refused(&map_header(2000), "the map is for a 2000-byte disk");
        refused(&log[..12], "the header is cut short");
        // A map of the format before the header (17-byte entries) is refused, not guessed at.
        let mut old = vec![MAP_DATA];
        old.extend(10u64.to_le_bytes());
        old.extend(20u64.to_le_bytes());
        refused(&old, "written by an older Haven");
        refused(&[], "written by an older Haven");
    }

    #[test]
    fn extent_map_matches_a_byte_model() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _round in 0..200 {
            let size = 64u64;
            let mut map = ExtentMap::default();
            let mut ops = Vec::new();
            for i in 0..12u8 {
                let a = next() % size;
                let b = (a + 1 + next() % 20).min(size);
                map.insert(a, b, Source::Record(u64::from(i)));
                ops.push((a, b, i));
            }
            let want = model(&ops, size as usize);
            let (qa, qb) = {
                let a = next() % size;
                (a, (a + 1 + next() % size).min(size))
            };
            let mut got = vec![None; size as usize];
            let pieces = map.pieces(qa, qb);
            let mut pos = qa;
            for (a, b, src) in pieces {
                assert_eq!(a, pos, "pieces are contiguous");
                assert!(a < b);
                for x in a..b {
                    got[x as usize] = src.map(|s| match s {
                        Source::Record(v) => v as u8,
                        Source::Zero => 254,
                        Source::Scratch => 255,
                    });
                }
                pos = b;
            }
            assert_eq!(pos, qb);
            assert_eq!(
                &got[qa as usize..qb as usize],
                &want[qa as usize..qb as usize]
            );
        }
    }
}
