//! Helpers shared by the VHDX tests: qemu-img/qemu-io runners, a seeded RNG, byte patching.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use haven_image::{Format, Image, OpenMode, Options, StdBackend};
use haven_vhdx::Vhdx;

/// A small deterministic generator (splitmix64): tests print their seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

pub fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .expect("run qemu tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

pub fn ok(cmd: &str, args: &[&str]) -> String {
    let (code, text) = run(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?} failed: {text}");
    text
}

/// Runs qemu-io commands against a vhdx file.
pub fn qemu_io(path: &Path, cmds: &[String]) {
    let mut args = vec!["-f".to_owned(), "vhdx".to_owned()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(path.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok("qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io: {out}"
    );
}

/// The whole disk as qemu-img converts it to raw.
pub fn qemu_raw(path: &Path, fmt: &str) -> Vec<u8> {
    let raw = path.with_extension("qemu.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            &path.display().to_string(),
            &raw.display().to_string(),
        ],
    );
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    data
}

pub fn open(dir: &Path, name: &str, mode: OpenMode) -> haven_image::Result<Box<dyn Image>> {
    Vhdx::open(&StdBackend::new(dir), name, mode, &Options::default())
}

pub fn read_all(img: &mut dyn Image) -> Vec<u8> {
    let size = img.info().unwrap().size;
    let mut out = vec![0u8; size as usize];
    for (i, chunk) in out.chunks_mut(3 << 20).enumerate() {
        img.read(i as u64 * (3 << 20), chunk).unwrap();
    }
    out
}

/// Random qemu-io commands over a disk of `size` bytes: pattern writes at sector-aligned random
/// offsets, zero writes and discards.
pub fn random_qemu_cmds(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    let mut cmds = Vec::new();
    for i in 0..n {
        let len = (1 + rng.below(600)) * 512;
        let off = rng.below((size - len) / 512) * 512;
        let cmd = match i % 7 {
            5 => format!("write -z {off} {len}"),
            6 => format!("discard {off} {len}"),
            _ => format!("write -P {} {off} {len}", 1 + rng.below(250)),
        };
        cmds.push(cmd);
    }
    cmds
}

pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

pub fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

pub fn read_at(path: &Path, at: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, at).unwrap();
    b
}

pub const BAT_GUID: [u8; 16] = [
    0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
];
pub const METADATA_GUID: [u8; 16] = [
    0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e,
];
pub const FILE_PARAMS_GUID: [u8; 16] = [
    0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b,
];
pub const DISK_SIZE_GUID: [u8; 16] = [
    0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8,
];
pub const PARENT_LOCATOR_GUID: [u8; 16] = [
    0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c,
];
pub const VHDX_LOCATOR_TYPE: [u8; 16] = [
    0xb7, 0xef, 0x4a, 0xb0, 0x9e, 0xd1, 0x81, 0x4a, 0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13,
];

/// (offset, length) of the region with `guid`, from the first region table.
pub fn region(path: &Path, guid: &[u8; 16]) -> (u64, u64) {
    let t = read_at(path, 192 * 1024, 4096);
    for i in 0..le32(&t, 8) as usize {
        let e = &t[16 + i * 32..48 + i * 32];
        if &e[..16] == guid {
            return (le64(e, 16), u64::from(le32(e, 24)));
        }
    }
    panic!("no region");
}

/// File offset of the value of metadata item `guid`, and the metadata table's entry offset.
pub fn metadata_item(path: &Path, guid: &[u8; 16]) -> (u64, u64) {
    let (base, _) = region(path, &METADATA_GUID);
    let t = read_at(path, base, 65536);
    for i in 0..usize::from(u16::from_le_bytes([t[10], t[11]])) {
        let e = &t[32 + i * 32..64 + i * 32];
        if &e[..16] == guid {
            return (base + u64::from(le32(e, 16)), base + 32 + i as u64 * 32);
        }
    }
    panic!("no metadata item");
}

/// (file offset, sequence number) of the current header.
pub fn current_header(path: &Path) -> (u64, u64) {
    let a = le64(&read_at(path, 64 * 1024, 16), 8);
    let b = le64(&read_at(path, 128 * 1024, 16), 8);
    if a >= b {
        (64 * 1024, a)
    } else {
        (128 * 1024, b)
    }
}

/// Rewrites the current header with `edit` applied and a fresh checksum.
pub fn edit_header(path: &Path, edit: impl FnOnce(&mut [u8])) {
    let (at, _) = current_header(path);
    let mut h = read_at(path, at, 4096);
    edit(&mut h);
    h[4..8].fill(0);
    let crc = haven_vhdx::crc32c(&h);
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    patch(path, at, &h);
}

/// The braced text form of an on-disk GUID.
pub fn guid_text(g: &[u8]) -> String {
    format!(
        "{{{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}}}",
        le32(g, 0),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10..16]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    )
}
