//! `cargo xtask bench formats`: `haven image convert` against `qemu-img convert`, per format, on
//! one mixed image, in one run.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// Source image size.
const SIZE: u64 = 4 << 30;
/// Each 64 MiB of the source: 21 MiB text-like, 21 MiB random, the rest never written.
const STRIPE: u64 = 64 << 20;
const PART: u64 = 21 << 20;

/// Haven's `-O`/`-o`, qemu-img's `-O`/`-o`, file extension.
const FORMATS: &[(&str, &str, &str, &str, &str)] = &[
    ("raw", "", "raw", "", "raw"),
    ("qcow2", "", "qcow2", "", "qcow2"),
    (
        "vmdk",
        "subformat=monolithicSparse",
        "vmdk",
        "subformat=monolithicSparse",
        "vmdk",
    ),
    (
        "vmdk",
        "subformat=streamOptimized",
        "vmdk",
        "subformat=streamOptimized",
        "stream.vmdk",
    ),
    ("vhdx", "", "vhdx", "", "vhdx"),
    (
        "vhd",
        "subformat=fixed",
        "vpc",
        "subformat=fixed,force_size=on",
        "fixed.vhd",
    ),
    (
        "vhd",
        "subformat=dynamic",
        "vpc",
        "subformat=dynamic",
        "vhd",
    ),
];

pub fn formats(root: &Path) -> Result<()> {
    let haven = root.join("target/release/haven");
    let dir = root.join("target/bench-formats");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let source = dir.join("source.raw");
    mixed_image(&source)?;
    println!(
        "source: {} GiB raw, 1/3 text-like, 1/3 random, 1/3 never written",
        SIZE >> 30
    );
    println!("each time includes a final sync; haven and qemu-img run alternately, warm cache\n");
    println!(
        "{:<26} {:>9} {:>9} {:>7}   {:>9} {:>9} {:>7}",
        "format", "to: haven", "qemu-img", "ratio", "back: haven", "qemu-img", "ratio"
    );
    let mut worst: f64 = 0.0;
    for (i, (format, options, qformat, qoptions, ext)) in FORMATS.iter().enumerate() {
        let ours = dir.join(format!("haven{i}.{ext}"));
        let theirs = dir.join(format!("qemu{i}.{ext}"));
        let mut h = Command::new(&haven);
        h.args(["image", "convert", "-f", "raw", "-O", format]);
        if !options.is_empty() {
            h.args(["-o", options]);
        }
        let to_haven = timed(h.arg(&source).arg(&ours))?;
        let mut q = Command::new("qemu-img");
        q.args(["convert", "-f", "raw", "-O", qformat]);
        if !qoptions.is_empty() {
            q.args(["-o", qoptions]);
        }
        let to_qemu = timed(q.arg(&source).arg(&theirs))?;

        let back_ours = dir.join(format!("haven{i}.back.raw"));
        let back_theirs = dir.join(format!("qemu{i}.back.raw"));
        let back_haven = timed(
            Command::new(&haven)
                .args(["image", "convert", "-f", format, "-O", "raw"])
                .arg(&ours)
                .arg(&back_ours),
        )?;
        let back_qemu = timed(
            Command::new("qemu-img")
                .args(["convert", "-f", qformat, "-O", "raw"])
                .arg(&theirs)
                .arg(&back_theirs),
        )?;
        let same = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "raw"])
            .arg(&source)
            .arg(&back_ours)
            .status()?;
        if !same.success() {
            bail!("{format} {options}: the round trip through Haven changed the content");
        }
        let r1 = ratio(to_haven, to_qemu);
        let r2 = ratio(back_haven, back_qemu);
        worst = worst.max(r1).max(r2);
        let label = format!("{format} {}", options.trim_start_matches("subformat="));
        println!(
            "{label:<26} {:>9.2} {:>9.2} {:>6.2}x   {:>11.2} {:>9.2} {:>6.2}x",
            to_haven.as_secs_f64(),
            to_qemu.as_secs_f64(),
            r1,
            back_haven.as_secs_f64(),
            back_qemu.as_secs_f64(),
            r2
        );
        for f in [ours, theirs, back_ours, back_theirs] {
            let _ = std::fs::remove_file(f);
        }
    }
    println!(
        "\nratio = haven time / qemu-img time (lower is better); worst {worst:.2}x; goal <= 1.25x"
    );
    Ok(())
}

/// A bench's disk size in bytes: `HAVEN_BENCH_GIB` GiB, else `default_gib`.
pub(crate) fn disk_bytes(default_gib: u64) -> u64 {
    std::env::var("HAVEN_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(default_gib)
        << 30
}

pub(crate) fn ratio(ours: Duration, theirs: Duration) -> f64 {
    ours.as_secs_f64() / theirs.as_secs_f64().max(1e-9)
}

pub(crate) fn timed(cmd: &mut Command) -> Result<Duration> {
    let started = Instant::now();
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let sync = Command::new("sync").status()?;
    if !sync.success() {
        bail!("sync failed");
    }
    Ok(started.elapsed())
}

fn mixed_image(path: &Path) -> Result<()> {
    let file = std::fs::File::create(path)?;
    file.set_len(SIZE)?;
    let text: Vec<u8> =
        b"Replicated disks, recovery points and failover: the quick brown fox. 0123456789\n"
            .iter()
            .copied()
            .cycle()
            .take(PART as usize)
            .collect();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut random = vec![0u8; PART as usize];
    for stripe in 0..SIZE / STRIPE {
        for chunk in random.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let at = stripe * STRIPE;
        file.write_all_at(&text, at)?;
        file.write_all_at(&random, at + PART)?;
    }
    file.sync_all()?;
    Ok(())
}
