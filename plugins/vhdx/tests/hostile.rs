//! Damaged and hostile VHDX images: clear errors, never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use haven_image::{ErrorKind, OpenMode};

const MIB: u64 = 1 << 20;

/// A small qemu-made image with data in a few blocks.
fn sample(dir: &Path) -> PathBuf {
    let path = dir.join("s.vhdx");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            &path.display().to_string(),
            "8M",
        ],
    );
    qemu_io(
        &path,
        &["write -P 0x61 0 100k".into(), "write -P 0x62 3M 1M".into()],
    );
    path
}

fn open_err(dir: &Path) -> haven_image::Error {
    match open(dir, "s.vhdx", OpenMode::ReadOnly) {
        Ok(_) => panic!("damaged image opened"),
        Err(e) => e,
    }
}

fn expect(dir: &Path, kind: ErrorKind, words: &[&str]) {
    let e = open_err(dir);
    assert_eq!(e.kind, kind, "{}", e.message);
    for w in words {
        assert!(e.message.contains(w), "`{w}` not in: {}", e.message);
    }
}

#[test]
fn bad_file_identifier() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path());
    patch(&p, 0, b"vhdxfilf");
    expect(
        dir.path(),
        ErrorKind::Corrupt,
        &["file type identifier", "s.vhdx"],
    );
}

#[test]
fn header_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path());
    // One damaged header: the other one is used.
    let (cur, _) = current_header(&p);
    patch(&p, cur + 100, &[0xff]);
    let mut img = open(dir.path(), "s.vhdx", OpenMode::ReadOnly).unwrap();
    let mut b = vec![0u8; 512];
    img.read(3 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x62));
    drop(img);
    let other = if cur == 64 * 1024 {
        128 * 1024
    } else {
        64 * 1024
    };
    patch(&p, other + 100, &[0xff]);
    expect(dir.path(), ErrorKind::Corrupt, &["headers", "checksum"]);
}

#[test]
fn region_table_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path());
    patch(&p, 192 * 1024 + 20, &[0xee]);
    open(dir.path(), "s.vhdx", OpenMode::ReadOnly).unwrap();
    patch(&p, 256 * 1024 + 20, &[0xee]);
    expect(
        dir.path(),
        ErrorKind::Corrupt,
        &["region table", "checksum"],
    );
}

#[test]
fn bat_entry_past_end_of_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path());
    let (bat, _) = region(&p, &BAT_GUID);
    patch(&p, bat + 8, &((1u64 << 40) | 6).to_le_bytes());
    expect(
        dir.path(),
        ErrorKind::Corrupt,
        &["BAT entry", "block 1", "outside the file"],
    );
    patch(&p, bat + 8, &4u64.to_le_bytes());
    expect(
        dir.path(),
        ErrorKind::Corrupt,
        &["BAT entry", "invalid state 4"],
    );
    patch(&p, bat + 8, &7u64.to_le_bytes());
    expect(dir.path(), ErrorKind::Corrupt, &["partially present"]);
}

#[test]
fn truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path());
    let data_end = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(data_end - MIB / 2).unwrap();
    expect(
        dir.path(),
        ErrorKind::Corrupt,
        &["BAT entry", "outside the file"],
    );
    f.set_len(200 * 1024).unwrap();
    expect(
        dir.path(),
        ErrorKind::Corrupt,
        &["region table", "truncated"],
    );
    f.set_len(5).unwrap();
    expect(
        dir.path(),
        ErrorKind::Corrupt,
        &["file type identifier", "truncated"],
    );
}

#[test]
fn absurd_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path());
    let (size_at, _) = metadata_item(&p, &DISK_SIZE_GUID);
    patch(&p, size_at, &(1u64 << 62).to_le_bytes());
    expect(dir.path(), ErrorKind::Limit, &["disk size"]);
    patch(&p, size_at, &(8 * MIB + 1).to_le_bytes());
    expect(dir.path(), ErrorKind::Corrupt, &["disk size", "sector"]);
    patch(&p, size_at, &(1u64 << 40).to_le_bytes());
    expect(dir.path(), ErrorKind::Corrupt, &["BAT region", "too small"]);
    patch(&p, size_at, &(8 * MIB).to_le_bytes());
    let (fp, entry) = metadata_item(&p, &FILE_PARAMS_GUID);
    patch(&p, fp, &(3 * MIB as u32).to_le_bytes());
    expect(dir.path(), ErrorKind::Corrupt, &["block size"]);
    patch(&p, fp, &(MIB as u32).to_le_bytes());
    patch(&p, entry + 16, &0xfff0_0000u32.to_le_bytes());
    expect(
        dir.path(),
        ErrorKind::Corrupt,
        &["metadata table", "outside"],
    );
}

#[test]
fn hostile_log() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path());
    // A log GUID with no valid entry: nothing to replay, the image opens.
    edit_header(&p, |h| h[48..64].fill(0x42));
    open(dir.path(), "s.vhdx", OpenMode::ReadOnly).unwrap();
    // A log placed inside the headers is refused.
    edit_header(&p, |h| h[72..80].copy_from_slice(&4096u64.to_le_bytes()));
    expect(dir.path(), ErrorKind::Corrupt, &["log"]);
    // A log larger than memory limits is refused.
    edit_header(&p, |h| {
        h[68..72].copy_from_slice(&(0xfff0_0000u32).to_le_bytes());
        h[72..80].copy_from_slice(&MIB.to_le_bytes());
    });
    expect(dir.path(), ErrorKind::Limit, &["log"]);
}

/// Seeded byte mutations of the metadata and BAT (not checksummed): open, read and map either
/// fail with an error or work, never panic.
#[test]
fn mutations_never_panic() {
    let seed = 0x5eed;
    eprintln!("seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path());
    let (bat, _) = region(&p, &BAT_GUID);
    let (meta, _) = region(&p, &METADATA_GUID);
    let mut rng = Rng(seed);
    for i in 0..400 {
        let base = match i % 3 {
            0 => bat,
            1 => meta,
            _ => meta + 65536,
        };
        let n = 1 + rng.below(4);
        let mut saved = Vec::new();
        for _ in 0..n {
            let at = base + rng.below(if i % 3 == 0 { 128 } else { 256 });
            saved.push((at, read_at(&p, at, 1)));
            patch(&p, at, &[rng.next_u64() as u8]);
        }
        for mode in [OpenMode::ReadOnly, OpenMode::ReadWrite] {
            if let Ok(mut img) = open(dir.path(), "s.vhdx", mode) {
                let info = img.info().unwrap();
                let mut b = vec![0u8; 1 << 20];
                let len = (info.size.min(1 << 20) / 512) * 512;
                let _ = img.read(0, &mut b[..len as usize]);
                let _ = img.map(0, info.size);
                if mode == OpenMode::ReadWrite {
                    let _ = img.write(0, &b[..4096]);
                    let _ = img.close();
                }
            }
        }
        for (at, b) in saved.into_iter().rev() {
            patch(&p, at, &b);
        }
    }
}
