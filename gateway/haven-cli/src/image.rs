//! `haven image`: disk images through the format plugins, with qemu-img's flag conventions.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use haven_host::{Access, Disk, WriterPlugin};
use haven_image::{Extent, ExtentState, ImageInfo, MapEntry, Options};

use crate::plugins::{PROBE_ORDER, Plugins, canonical_format};

/// Bytes moved per read or write.
const CHUNK: u64 = 4 << 20;
/// Bytes of disk mapped per allocation-map call.
const MAP_WINDOW: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Shows an image's format, size and files.
    Info {
        /// The image's format; detected from its content when left out (a fixed VHD has no
        /// header and must be named with `-f vhd`, as with qemu-img).
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        file: PathBuf,
    },
    /// Creates an empty image.
    Create {
        #[arg(short = 'f', default_value = "raw")]
        format: String,
        /// Format options, e.g. `subformat=monolithicSparse`.
        #[arg(short = 'o')]
        options: Option<String>,
        file: PathBuf,
        /// Size in bytes, or with a K, M, G or T suffix (powers of 1024).
        size: String,
    },
    /// Copies an image into a new image of another (or the same) format.
    Convert {
        /// The source's format (detected when left out).
        #[arg(short = 'f')]
        format: Option<String>,
        /// The destination's format.
        #[arg(short = 'O')]
        out_format: String,
        /// Destination format options, e.g. `subformat=streamOptimized`.
        #[arg(short = 'o')]
        options: Option<String>,
        /// Shows progress.
        #[arg(short = 'p')]
        progress: bool,
        src: PathBuf,
        dst: PathBuf,
    },
    /// Compares the contents of two images: exit 0 when identical, 1 when they differ.
    Compare {
        /// The first image's format.
        #[arg(short = 'f')]
        format_a: Option<String>,
        /// The second image's format.
        #[arg(short = 'F')]
        format_b: Option<String>,
        /// Strict: images of different sizes differ even if the extra part reads as zeros.
        #[arg(short = 's')]
        strict: bool,
        a: PathBuf,
        b: PathBuf,
    },
    /// Shows which ranges of an image hold data and which read as zeros.
    Map {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        file: PathBuf,
    },
}

pub fn run(plugins: &Plugins, command: ImageCommand) -> Result<ExitCode> {
    match command {
        ImageCommand::Info {
            format,
            output,
            file,
        } => {
            let mut image = Image::open(plugins, &file, format.as_deref())?;
            let info = image.info()?;
            print_info(&file, &info, output);
            image.close()?;
        }
        ImageCommand::Create {
            format,
            options,
            file,
            size,
        } => {
            let size = parse_size(&size)?;
            let options = Options::parse(options.as_deref().unwrap_or(""))?;
            let (root, name) = split(&file)?;
            if file.exists() {
                bail!(
                    "{} exists; remove it first or choose another name",
                    file.display()
                );
            }
            let mut plugin = plugins.writer(&format, &root, true)?;
            let created = plugin
                .create(&name, size, 512, &options.0)
                .map_err(anyhow::Error::from);
            if let Err(e) = created.and_then(|disk| plugin.close(disk).map_err(Into::into)) {
                // The file did not exist before: whatever a failed create left there is ours.
                let _ = std::fs::remove_file(&file);
                return Err(e);
            }
            println!(
                "Formatting '{}', fmt={} size={size}",
                file.display(),
                canonical_format(&format)?
            );
        }
        ImageCommand::Convert {
            format,
            out_format,
            options,
            progress,
            src,
            dst,
        } => {
            let options = Options::parse(options.as_deref().unwrap_or(""))?;
            convert(
                plugins,
                &src,
                format.as_deref(),
                &dst,
                &out_format,
                &options,
                progress,
            )?;
        }
        ImageCommand::Compare {
            format_a,
            format_b,
            strict,
            a,
            b,
        } => {
            let mut a = Image::open(plugins, &a, format_a.as_deref())?;
            let mut b = Image::open(plugins, &b, format_b.as_deref())?;
            let verdict = compare(&mut a, &mut b, strict)?;
            a.close()?;
            b.close()?;
            return Ok(match verdict {
                None => {
                    println!("Images are identical.");
                    ExitCode::SUCCESS
                }
                Some(why) => {
                    println!("{why}");
                    ExitCode::from(1)
                }
            });
        }
        ImageCommand::Map {
            format,
            output,
            file,
        } => {
            let mut image = Image::open(plugins, &file, format.as_deref())?;
            let map = image.map_all()?;
            print_map(&map, output);
            image.close()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An image opened through its format's plugin.
struct Image {
    plugin: WriterPlugin,
    disk: Option<Disk>,
    size: u64,
}

/// The folder an image lives in (the plugin's storage root) and its name in it.
fn split(file: &Path) -> Result<(PathBuf, String)> {
    let name = file
        .file_name()
        .with_context(|| format!("{} names no file", file.display()))?
        .to_str()
        .with_context(|| format!("{} is not UTF-8", file.display()))?
        .to_owned();
    let parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let root = parent.canonicalize().with_context(|| {
        format!(
            "folder {} of {} does not exist",
            parent.display(),
            file.display()
        )
    })?;
    Ok((root, name))
}

impl Image {
    fn open(plugins: &Plugins, file: &Path, format: Option<&str>) -> Result<Self> {
        let (root, name) = split(file)?;
        if !file.exists() {
            bail!("{}: no such file", file.display());
        }
        let format = match format {
            Some(f) => canonical_format(f)?,
            None => detect(plugins, &root, &name)?,
        };
        let mut plugin = plugins.writer(format, &root, false)?;
        let disk = plugin
            .open(&name, Access::ReadOnly, &[])
            .with_context(|| format!("cannot open {} as {format}", file.display()))?;
        let size = plugin.info(&disk)?.size;
        Ok(Self {
            plugin,
            disk: Some(disk),
            size,
        })
    }

    fn info(&mut self) -> Result<ImageInfo> {
        let disk = self.disk.as_ref().expect("open until closed");
        Ok(self.plugin.info(disk)?)
    }

    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        let disk = self.disk.as_ref().expect("open until closed");
        Ok(self.plugin.map(disk, offset, len)?)
    }

    fn map_all(&mut self) -> Result<Vec<MapEntry>> {
        let mut all = Vec::new();
        let mut pos = 0;
        while pos < self.size {
            let len = MAP_WINDOW.min(self.size - pos);
            for e in self.map(pos, len)? {
                haven_image::push_map(&mut all, e);
            }
            pos += len;
        }
        Ok(all)
    }

    /// Ranges holding data within `[offset, offset+len)`.
    fn data(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(self
            .map(offset, len)?
            .into_iter()
            .filter(|e| e.state == ExtentState::Data)
            .map(|e| Extent {
                offset: e.offset,
                length: e.length,
            })
            .collect())
    }

    fn read(&mut self, offset: u64, buf: &mut Vec<u8>) -> Result<()> {
        let disk = self.disk.as_ref().expect("open until closed");
        Ok(self.plugin.read(disk, offset, buf)?)
    }

    fn close(&mut self) -> Result<()> {
        if let Some(disk) = self.disk.take() {
            self.plugin.close(disk)?;
        }
        Ok(())
    }
}

/// The format of `name` below `root`, asking each format plugin; raw when none recognises it.
fn detect(plugins: &Plugins, root: &Path, name: &str) -> Result<&'static str> {
    for format in PROBE_ORDER {
        if plugins.component(format).is_err() {
            tracing::warn!(
                "the {format} plugin is not installed; images of that format are not detected"
            );
            continue;
        }
        let mut plugin = plugins.writer(format, root, false)?;
        if plugin.probe(name)?.is_some() {
            return Ok(format);
        }
    }
    Ok("raw")
}

fn convert(
    plugins: &Plugins,
    src: &Path,
    format: Option<&str>,
    dst: &Path,
    out_format: &str,
    options: &Options,
    progress: bool,
) -> Result<()> {
    let out_format = canonical_format(out_format)?;
    let mut source = Image::open(plugins, src, format)?;
    let info = source.info()?;
    let (root, name) = split(dst)?;
    if dst.exists() {
        bail!(
            "{} exists; remove it first or choose another name",
            dst.display()
        );
    }
    let mut plugin = plugins.writer(out_format, &root, true)?;
    let fail =
        |e: anyhow::Error| e.context(format!("converting {} to {}", src.display(), dst.display()));
    let disk = match plugin.create(&name, info.size, info.sector_size, &options.0) {
        Ok(disk) => disk,
        Err(e) => {
            // `dst` did not exist before: whatever a failed create left there is ours.
            let _ = std::fs::remove_file(dst);
            return Err(fail(e.into()));
        }
    };
    let result = copy(&mut source, &mut plugin, &disk, progress);
    // The destination's files, as the plugin names them (a flat VMDK has a descriptor and an
    // extent). Only plain names in the destination's folder are trusted for removal.
    let mut files = plugin.info(&disk).map(|i| i.files).unwrap_or_default();
    files.retain(|f| is_plain_name(f));
    if !files.contains(&name) {
        files.push(name.clone());
    }
    let result = result.and_then(|()| plugin.close(disk).map_err(Into::into));
    if let Err(e) = source.close() {
        tracing::warn!("closing {}: {e:#}", src.display());
    }
    if let Err(e) = result {
        // Leave nothing half-written behind.
        for f in files {
            let _ = std::fs::remove_file(root.join(f));
        }
        return Err(fail(e));
    }
    Ok(())
}

/// A file name with no folder part: no `/`, not `.` or `..`, not empty.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Chunks read ahead of the writer.
const PIPELINE_DEPTH: usize = 4;

/// Copies every data range of `source` into `disk`; zero ranges stay unallocated. The source's
/// plugin reads on its own thread while the destination's plugin writes on this one (they are
/// separate instances), with at most `PIPELINE_DEPTH` chunks in between.
fn copy(source: &mut Image, plugin: &mut WriterPlugin, disk: &Disk, progress: bool) -> Result<()> {
    let size = source.size;
    let (chunks, received) = mpsc::sync_channel::<Result<(u64, Vec<u8>)>>(PIPELINE_DEPTH);
    let (recycle, spare) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || read_data(source, &chunks, &spare));
        let mut shown = None;
        let mut result = Ok(());
        while let Ok(chunk) = received.recv() {
            let (pos, mut buf) = match chunk {
                Ok(c) => c,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if let Err(e) = plugin.write(disk, pos, &mut buf) {
                result = Err(e.into());
                break;
            }
            if progress {
                show_progress(&mut shown, pos + buf.len() as u64, size);
            }
            let _ = recycle.send(buf);
        }
        // Stops the reader at its next chunk if the writer gave up.
        drop(received);
        if reader.join().is_err() {
            result = result.and(Err(anyhow::anyhow!("the reading thread panicked")));
        }
        if progress && result.is_ok() {
            show_progress(&mut shown, size, size);
            eprintln!();
        }
        result
    })
}

/// Reads the data ranges of `source` in chunks and sends those that are not all zeros.
fn read_data(
    source: &mut Image,
    chunks: &mpsc::SyncSender<Result<(u64, Vec<u8>)>>,
    spare: &mpsc::Receiver<Vec<u8>>,
) {
    let size = source.size;
    let mut window = 0;
    while window < size {
        let len = MAP_WINDOW.min(size - window);
        let extents = match source.data(window, len) {
            Ok(e) => e,
            Err(e) => {
                let _ = chunks.send(Err(e));
                return;
            }
        };
        for extent in extents {
            let mut pos = extent.offset;
            let end = extent.offset + extent.length;
            while pos < end {
                let n = CHUNK.min(end - pos);
                let mut buf = spare
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(CHUNK as usize));
                buf.resize(n as usize, 0);
                if let Err(e) = source.read(pos, &mut buf) {
                    let _ = chunks.send(Err(e));
                    return;
                }
                if !haven_image::is_zero(&buf) && chunks.send(Ok((pos, buf))).is_err() {
                    return;
                }
                pos += n;
            }
        }
        window += len;
    }
}

fn show_progress(shown: &mut Option<u64>, done: u64, total: u64) {
    let per_mille = (done * 1000).checked_div(total).unwrap_or(1000);
    if *shown != Some(per_mille) {
        *shown = Some(per_mille);
        eprint!("\r    ({:>5.1}/100%)", per_mille as f64 / 10.0);
        let _ = std::io::stderr().flush();
    }
}

/// `None` when identical, else the first difference in qemu-img's words.
fn compare(a: &mut Image, b: &mut Image, strict: bool) -> Result<Option<String>> {
    if a.size != b.size && strict {
        return Ok(Some(format!(
            "Strict mode: Image size mismatch! ({} and {} bytes)",
            a.size, b.size
        )));
    }
    let common = a.size.min(b.size);
    let mut buf_a = Vec::with_capacity(CHUNK as usize);
    let mut buf_b = Vec::with_capacity(CHUNK as usize);
    let mut window = 0;
    while window < common {
        let len = MAP_WINDOW.min(common - window);
        let mut ranges = a.data(window, len)?;
        ranges.extend(b.data(window, len)?);
        for range in union(ranges) {
            let mut pos = range.offset;
            while pos < range.offset + range.length {
                let n = CHUNK.min(range.offset + range.length - pos);
                buf_a.resize(n as usize, 0);
                buf_b.resize(n as usize, 0);
                a.read(pos, &mut buf_a)?;
                b.read(pos, &mut buf_b)?;
                if let Some(i) = buf_a.iter().zip(&buf_b).position(|(x, y)| x != y) {
                    return Ok(Some(format!(
                        "Content mismatch at offset {}!",
                        pos + i as u64
                    )));
                }
                pos += n;
            }
        }
        window += len;
    }
    // The larger image's extra part must read as zeros.
    let longer = if a.size > b.size { a } else { b };
    let mut buf = Vec::with_capacity(CHUNK as usize);
    let mut window = common;
    while window < longer.size {
        let len = MAP_WINDOW.min(longer.size - window);
        for range in longer.data(window, len)? {
            let mut pos = range.offset;
            while pos < range.offset + range.length {
                let n = CHUNK.min(range.offset + range.length - pos);
                buf.resize(n as usize, 0);
                longer.read(pos, &mut buf)?;
                if let Some(i) = buf.iter().position(|&x| x != 0) {
                    return Ok(Some(format!(
                        "Content mismatch at offset {}!",
                        pos + i as u64
                    )));
                }
                pos += n;
            }
        }
        window += len;
    }
    Ok(None)
}

/// Sorted, merged union of extents.
fn union(mut extents: Vec<Extent>) -> Vec<Extent> {
    extents.sort_by_key(|e| e.offset);
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        match out.last_mut() {
            Some(last) if e.offset <= last.offset + last.length => {
                let end = (e.offset + e.length).max(last.offset + last.length);
                last.length = end - last.offset;
            }
            _ => out.push(e),
        }
    }
    out
}

/// Parses `65536`, `64K`, `64M`, `1G`, `2T` (powers of 1024).
fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().with_context(|| {
        format!("size `{text}` is not a number of bytes with an optional K, M, G or T suffix")
    })?;
    n.checked_mul(1 << shift)
        .with_context(|| format!("size `{text}` is too large"))
}

fn human_size(bytes: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.3} {}", UNITS[unit]).replace(".000 ", " ")
    }
}

fn print_info(file: &Path, info: &ImageInfo, output: Output) {
    match output {
        Output::Json => {
            let v = serde_json::json!({
                "filename": file.display().to_string(),
                "format": info.format,
                "subformat": info.subformat,
                "virtual-size": info.size,
                "actual-size": info.allocated_bytes,
                "sector-size": info.sector_size,
                "files": info.files,
            });
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        }
        Output::Human => {
            println!("image: {}", file.display());
            println!("file format: {}", info.format);
            if !info.subformat.is_empty() {
                println!("subformat: {}", info.subformat);
            }
            println!(
                "virtual size: {} ({} bytes)",
                human_size(info.size),
                info.size
            );
            println!("disk size: {}", human_size(info.allocated_bytes));
            println!("sector size: {}", info.sector_size);
            println!("files: {}", info.files.join(", "));
        }
    }
}

fn print_map(map: &[MapEntry], output: Output) {
    match output {
        Output::Json => {
            let v: Vec<_> = map
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "start": e.offset,
                        "length": e.length,
                        "data": e.state == ExtentState::Data,
                        "zero": e.state == ExtentState::Zero,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string(&v).expect("json"));
        }
        Output::Human => {
            println!("{:<20}{:<20}State", "Offset", "Length");
            for e in map {
                let state = if e.state == ExtentState::Data {
                    "data"
                } else {
                    "zero"
                };
                println!("{:<#20x}{:<#20x}{state}", e.offset, e.length);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_are_removed_after_a_failed_convert() {
        assert!(is_plain_name("web01-flat.vmdk"));
        for bad in ["", ".", "..", "../x", "/etc/passwd", "a/b"] {
            assert!(!is_plain_name(bad), "{bad}");
        }
    }

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(
            parse_size("12Q")
                .unwrap_err()
                .to_string()
                .contains("optional K, M, G or T suffix")
        );
        assert!(
            parse_size("99999999T")
                .unwrap_err()
                .to_string()
                .contains("too large")
        );
    }

    #[test]
    fn union_merges_overlapping_and_touching_ranges() {
        let e = |offset, length| Extent { offset, length };
        assert_eq!(
            union(vec![e(10, 5), e(0, 4), e(4, 2), e(12, 10), e(30, 1)]),
            vec![e(0, 6), e(10, 12), e(30, 1)]
        );
    }
}
