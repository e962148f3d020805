//! `cargo xtask demo`: a sample disk converted through every format plugin, each result checked.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Result, bail};

/// Sample disk size.
const SIZE: u64 = 256 << 20;

/// Destinations: label, `-O`, `-o`, file name, qemu-img's format name.
const TARGETS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "VMware datastore",
        "vmdk",
        "subformat=monolithicSparse",
        "web01.vmdk",
        "vmdk",
    ),
    (
        "VMware export (OVF)",
        "vmdk",
        "subformat=streamOptimized",
        "web01-stream.vmdk",
        "vmdk",
    ),
    ("Hyper-V", "vhdx", "", "web01.vhdx", "vhdx"),
    (
        "Azure page blob",
        "vhd",
        "subformat=fixed",
        "web01.vhd",
        "vpc",
    ),
    ("KVM", "qcow2", "", "web01.qcow2", "qcow2"),
];

pub fn run(root: &Path) -> Result<()> {
    let haven = root.join("target/debug/haven");
    let dir = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    println!("== Haven demo: one disk, every target format, each through its sandboxed plugin\n");
    let status = Command::new(&haven).args(["plugin", "list"]).status()?;
    if !status.success() {
        bail!("haven plugin list failed");
    }

    let source = dir.join("web01.raw");
    sample_disk(&source)?;
    println!(
        "\nsample disk {}: {} MiB, {} MiB of it data (text, random, a boot sector; the rest never written)\n",
        source.display(),
        SIZE >> 20,
        allocated(&source)? >> 20
    );

    println!(
        "{:<22} {:<42} {:>9} {:>10} {:>9}",
        "target", "image", "seconds", "on disk", "check"
    );
    for (label, format, options, name, qemu) in TARGETS {
        let image = dir.join(name);
        let mut convert = Command::new(&haven);
        convert.args(["image", "convert", "-O", format]);
        if !options.is_empty() {
            convert.args(["-o", options]);
        }
        let started = Instant::now();
        let status = convert.arg(&source).arg(&image).status()?;
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            bail!("converting to {format} failed");
        }
        // Haven's own compare, through the plugin that wrote the image…
        let ours = Command::new(&haven)
            .args(["image", "compare", "-f", "raw", "-F", format])
            .arg(&source)
            .arg(&image)
            .output()?;
        // …and qemu-img's, independently.
        let theirs = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", qemu])
            .arg(&source)
            .arg(&image)
            .status()?;
        let check = if ours.status.success() && theirs.success() {
            "identical"
        } else {
            "DIFFERS"
        };
        println!(
            "{label:<22} {:<42} {seconds:>9.2} {:>7} MiB {check:>9}",
            format!(
                "{name} ({format}{})",
                if options.is_empty() {
                    String::new()
                } else {
                    format!(", {}", options.trim_start_matches("subformat="))
                }
            ),
            allocated(&image)? >> 20
        );
        if check != "identical" {
            bail!("{name} does not match the source");
        }
    }
    println!(
        "\nevery image equals the source byte for byte (haven image compare and qemu-img compare);"
    );
    println!(
        "the Azure VHD is exactly {} MiB + its 512-byte footer; the images are in {}",
        SIZE >> 20,
        dir.display()
    );
    Ok(())
}

/// Bytes a file occupies on disk.
fn allocated(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// A sparse raw disk with a boot sector, text-like data, random data and holes.
fn sample_disk(path: &Path) -> Result<()> {
    let file = std::fs::File::create(path)?;
    file.set_len(SIZE)?;
    let mut boot = vec![0u8; 512];
    boot[510] = 0x55;
    boot[511] = 0xaa;
    file.write_all_at(&boot, 0)?;
    let text: Vec<u8> =
        b"Haven keeps the disks of protected machines replicated to a second site. "
            .iter()
            .copied()
            .cycle()
            .take(24 << 20)
            .collect();
    file.write_all_at(&text, 1 << 20)?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let random: Vec<u8> = (0..(8 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    file.write_all_at(&random, 100 << 20)?;
    file.write_all_at(&text[..4 << 20], SIZE - (4 << 20))?;
    file.sync_all()?;
    Ok(())
}
