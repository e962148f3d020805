//! haven-qcow2 against qemu-img/qemu-io: reading what qemu writes, writing what qemu checks.

use std::path::Path;
use std::process::Command;

use haven_image::{
    CreateOptions, ErrorKind, ExtentState, Format, Image, OpenMode, Options, StdBackend,
};
use haven_qcow2::Qcow2;

const MIB: u64 = 1 << 20;

/// xorshift64*: deterministic test data without dependencies.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// qemu-io with many commands at once.
fn qemu_io(dir: &Path, file: &str, cmds: &[String]) {
    for batch in cmds.chunks(200) {
        let mut args = vec!["qemu-io".to_owned(), "-f".into(), "qcow2".into()];
        for c in batch {
            args.push("-c".into());
            args.push(c.clone());
        }
        args.push(file.into());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run(dir, &refs);
    }
}

/// What qemu says the disk contains.
fn qemu_raw(dir: &Path, file: &str) -> Vec<u8> {
    let out = format!("{file}.qemu.raw");
    let _ = std::fs::remove_file(dir.join(&out));
    run(
        dir,
        &[
            "qemu-img", "convert", "-f", "qcow2", "-O", "raw", file, &out,
        ],
    );
    let data = std::fs::read(dir.join(&out)).expect("read raw");
    std::fs::remove_file(dir.join(&out)).expect("rm");
    data
}

fn read_all(img: &mut dyn Image) -> Vec<u8> {
    let size = img.info().expect("info").size;
    let mut out = vec![0u8; size as usize];
    // Odd chunk sizes so reads straddle clusters.
    let chunk = 3 * MIB / 2 + 512;
    let mut pos = 0u64;
    while pos < size {
        let n = chunk.min(size - pos);
        img.read(pos, &mut out[pos as usize..(pos + n) as usize])
            .expect("read");
        pos += n;
    }
    out
}

/// Every map entry is consistent with the data: zero entries read as zeros, and the map covers
/// the disk exactly.
fn check_map(img: &mut dyn Image, data: &[u8]) {
    let size = data.len() as u64;
    let map = img.map(0, size).expect("map");
    let mut pos = 0;
    for e in &map {
        assert_eq!(e.offset, pos, "map not contiguous: {map:?}");
        if e.state == ExtentState::Zero {
            let r = &data[e.offset as usize..(e.offset + e.length) as usize];
            assert!(
                r.iter().all(|&b| b == 0),
                "map says zero at {:#x}+{:#x}",
                e.offset,
                e.length
            );
        }
        pos += e.length;
    }
    assert_eq!(pos, size);
}

fn open(dir: &Path, file: &str, mode: OpenMode) -> haven_image::Result<Box<dyn Image>> {
    Qcow2::open(&StdBackend::new(dir), file, mode, &Options::default())
}

/// Random qemu-io commands: pattern writes at unaligned offsets, zero writes, discards.
fn random_cmds(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    let mut cmds = Vec::new();
    for i in 0..n {
        let off = rng.below(size / 512) * 512;
        let len = (rng.below(300 * 1024) / 512 + 1) * 512;
        let len = len.min(size - off);
        let cmd = match i % 6 {
            4 => format!("write -z {off} {len}"),
            5 => format!("discard {off} {len}"),
            _ => format!("write -P {} {off} {len}", rng.below(255) + 1),
        };
        cmds.push(cmd);
    }
    cmds
}

#[test]
fn reads_what_qemu_writes_in_every_cluster_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for (i, (opts, size)) in [
        ("cluster_size=65536", 16 * MIB),
        ("cluster_size=512", 4 * MIB),
        ("cluster_size=4096", 8 * MIB),
        ("cluster_size=2097152", 24 * MIB),
        ("compat=0.10", 16 * MIB),
        ("cluster_size=65536,refcount_bits=1", 8 * MIB),
        ("cluster_size=16384,refcount_bits=64", 8 * MIB),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 0x5eed + i as u64;
        let name = format!("r{i}.qcow2");
        run(
            d,
            &[
                "qemu-img",
                "create",
                "-f",
                "qcow2",
                "-o",
                opts,
                &name,
                &size.to_string(),
            ],
        );
        let mut rng = Rng(seed);
        qemu_io(d, &name, &random_cmds(&mut rng, size, 60));
        // A write not aligned to sectors, too.
        qemu_io(d, &name, &["write -P 0x5a 1000 3000".to_owned()]);
        let want = qemu_raw(d, &name);
        let mut img = open(d, &name, OpenMode::ReadOnly).expect("open");
        let got = read_all(img.as_mut());
        assert!(got == want, "contents differ for {opts} (seed {seed:#x})");
        check_map(img.as_mut(), &got);
    }
}

#[test]
fn reads_compressed_clusters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let size = 8 * MIB;
    run(
        d,
        &[
            "qemu-img",
            "create",
            "-f",
            "qcow2",
            "src.qcow2",
            &size.to_string(),
        ],
    );
    let mut rng = Rng(77);
    qemu_io(d, "src.qcow2", &random_cmds(&mut rng, size, 40));
    for (i, cs) in ["65536", "4096", "512"].iter().enumerate() {
        let out = format!("c{i}.qcow2");
        run(
            d,
            &[
                "qemu-img",
                "convert",
                "-c",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                "src.qcow2",
                &out,
            ],
        );
        let want = qemu_raw(d, &out);
        let mut img = open(d, &out, OpenMode::ReadOnly).expect("open");
        let got = read_all(img.as_mut());
        assert!(
            got == want,
            "compressed contents differ ({cs}-byte clusters)"
        );
        check_map(img.as_mut(), &got);
    }
    // Writing over compressed clusters frees them exactly.
    let mut img = open(d, "c0.qcow2", OpenMode::ReadWrite).expect("open rw");
    let mut shadow = qemu_raw(d, "c0.qcow2");
    let mut rng = Rng(78);
    apply_random(img.as_mut(), &mut shadow, &mut rng, 40);
    img.close().expect("close");
    drop(img);
    qemu_check(d, "c0.qcow2");
    assert_eq!(qemu_raw(d, "c0.qcow2"), shadow);
}

#[test]
fn reads_through_backing_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).expect("mkdir");
    // raw base (smaller than the overlay) <- qcow2 middle <- qcow2 top, named relatively.
    let mut base = vec![0u8; 6 * MIB as usize];
    let mut rng = Rng(9);
    for b in base.iter_mut().step_by(7) {
        *b = rng.next() as u8;
    }
    std::fs::write(d.join("sub/base.raw"), &base).expect("write base");
    run(
        d,
        &[
            "qemu-img",
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "sub/mid.qcow2",
            "8M",
        ],
    );
    qemu_io(d, "sub/mid.qcow2", &random_cmds(&mut rng, 8 * MIB, 20));
    run(
        d,
        &[
            "qemu-img",
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "sub/top.qcow2",
            "10M",
        ],
    );
    qemu_io(d, "sub/top.qcow2", &random_cmds(&mut rng, 10 * MIB, 30));
    let want = qemu_raw(d, "sub/top.qcow2");
    let mut img = open(d, "sub/top.qcow2", OpenMode::ReadOnly).expect("open");
    let info = img.info().expect("info");
    assert_eq!(
        info.files,
        vec!["sub/top.qcow2", "sub/mid.qcow2", "sub/base.raw"]
    );
    let got = read_all(img.as_mut());
    assert!(got == want, "backing chain contents differ");
    check_map(img.as_mut(), &got);

    // Writing to the top keeps the chain's data under partial writes and zeroes.
    let mut img = open(d, "sub/top.qcow2", OpenMode::ReadWrite).expect("open rw");
    let mut shadow = want;
    apply_random(img.as_mut(), &mut shadow, &mut rng, 60);
    img.close().expect("close");
    drop(img);
    qemu_check(d, "sub/top.qcow2");
    assert!(
        qemu_raw(d, "sub/top.qcow2") == shadow,
        "overlay writes differ"
    );

    // A backing file without a format extension is probed: turn the extension into an unknown
    // one, which readers skip.
    let mut top = std::fs::read(d.join("sub/top.qcow2")).expect("read top");
    let at = top
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("format ext");
    top[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(d.join("sub/top.qcow2"), &top).expect("write top");
    let mut img = open(d, "sub/top.qcow2", OpenMode::ReadOnly).expect("open probed");
    assert!(read_all(img.as_mut()) == shadow);
}

#[test]
fn refuses_backing_loops_and_deep_chains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    run(d, &["qemu-img", "create", "-f", "qcow2", "a.qcow2", "1M"]);
    run(
        d,
        &[
            "qemu-img", "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "1M",
        ],
    );
    run(
        d,
        &[
            "qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2",
        ],
    );
    let err = open(d, "b.qcow2", OpenMode::ReadOnly)
        .err()
        .expect("loop refused");
    assert_eq!(err.kind, ErrorKind::Corrupt, "{err}");
    assert!(err.message.contains("loops back"), "{err}");
    // A self-reference, with ./ in the name.
    run(d, &["qemu-img", "create", "-f", "qcow2", "s.qcow2", "1M"]);
    run(
        d,
        &[
            "qemu-img",
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "./s.qcow2",
            "-F",
            "qcow2",
            "s.qcow2",
        ],
    );
    let err = open(d, "s.qcow2", OpenMode::ReadOnly)
        .err()
        .expect("self loop refused");
    assert!(err.message.contains("loops back"), "{err}");
    // A chain of 20 images is longer than the limit.
    run(d, &["qemu-img", "create", "-f", "qcow2", "l0.qcow2", "1M"]);
    for i in 1..20 {
        let (p, c) = (format!("l{}.qcow2", i - 1), format!("l{i}.qcow2"));
        run(
            d,
            &[
                "qemu-img", "create", "-f", "qcow2", "-b", &p, "-F", "qcow2", &c, "1M",
            ],
        );
    }
    let err = open(d, "l19.qcow2", OpenMode::ReadOnly)
        .err()
        .expect("deep chain refused");
    assert_eq!(err.kind, ErrorKind::Limit, "{err}");
    assert!(open(d, "l10.qcow2", OpenMode::ReadOnly).is_ok());
}

fn qemu_check(dir: &Path, file: &str) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", file])
        .current_dir(dir)
        .output()
        .expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-img check {file}: {text}");
    assert!(
        text.contains("No errors were found"),
        "qemu-img check {file}: {text}"
    );
    assert!(!text.contains("leaked"), "qemu-img check {file}: {text}");
}

/// Random writes, zero writes and discards through `img`, mirrored in `shadow`.
fn apply_random(img: &mut dyn Image, shadow: &mut [u8], rng: &mut Rng, n: usize) {
    let size = shadow.len() as u64;
    for i in 0..n {
        let off = rng.below(size / 512) * 512;
        let len = ((rng.below(400 * 1024) / 512 + 1) * 512).min(size - off);
        let r = off as usize..(off + len) as usize;
        match i % 5 {
            3 => {
                img.write_zeroes(off, len, false).expect("write_zeroes");
                shadow[r].fill(0);
            }
            4 => {
                img.write_zeroes(off, len, true).expect("discard");
                shadow[r].fill(0);
            }
            _ => {
                let fill = rng.next() as u8 | 1;
                let data: Vec<u8> = (0..len).map(|j| fill.wrapping_add(j as u8)).collect();
                img.write(off, &data).expect("write");
                shadow[r].copy_from_slice(&data);
            }
        }
        if i % 17 == 16 {
            img.flush().expect("flush");
        }
    }
}

fn create(dir: &Path, file: &str, size: u64, opts: &str) -> Box<dyn Image> {
    let o = CreateOptions {
        size,
        sector_size: 512,
        options: Options::parse(opts).expect("opts"),
    };
    Qcow2::create(&StdBackend::new(dir), file, &o).expect("create")
}

fn qemu_compare(dir: &Path, raw: &str, img: &str) {
    run(
        dir,
        &["qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, img],
    );
}

#[test]
fn writes_images_qemu_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for (i, (opts, size)) in [
        ("", 64 * MIB),
        ("cluster_size=512", 6 * MIB),
        ("cluster_size=4096", 16 * MIB + 4096 * 3 + 512),
        ("cluster_size=2M", 40 * MIB),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 0xabc + i as u64;
        let name = format!("w{i}.qcow2");
        let mut img = create(d, &name, size, opts);
        let mut shadow = vec![0u8; size as usize];
        let mut rng = Rng(seed);
        // Leave the last quarter untouched: it must stay unallocated.
        let (touched, _) = shadow.split_at_mut((size as usize / 4 * 3) & !511);
        apply_random(img.as_mut(), touched, &mut rng, 80);
        // A large sequential write and an all-zero write that must not allocate.
        let big: Vec<u8> = (0..3 * MIB + 512).map(|j| (j % 251) as u8).collect();
        img.write(MIB, &big).expect("big write");
        shadow[MIB as usize..(4 * MIB + 512) as usize].copy_from_slice(&big);
        let zeros = vec![0u8; 2 * MIB as usize];
        let tail = size / 4 * 3 / MIB * MIB + MIB;
        if tail + 2 * MIB <= size {
            img.write(tail, &zeros).expect("zero write");
        }
        let got = read_all(img.as_mut());
        assert!(
            got == shadow,
            "read-back differs for {opts:?} (seed {seed:#x})"
        );
        check_map(img.as_mut(), &got);
        let map = img
            .map(size / 4 * 3, size - size / 4 * 3)
            .expect("map tail");
        let tail_start = ((size / 4 * 3) + (1 << 21)).min(size);
        assert!(
            map.iter()
                .all(|e| e.state == ExtentState::Zero || e.offset + e.length <= tail_start),
            "untouched tail allocated for {opts:?}: {map:?}"
        );
        img.close().expect("close");
        drop(img);
        std::fs::write(d.join("shadow.raw"), &shadow).expect("write shadow");
        qemu_check(d, &name);
        qemu_compare(d, "shadow.raw", &name);
        // qemu agrees the untouched quarter is unallocated.
        let out = run(
            d,
            &["qemu-img", "map", "--output=json", "-f", "qcow2", &name],
        );
        let json = String::from_utf8_lossy(&out.stdout);
        let last = json.lines().last().expect("map line");
        assert!(last.contains("\"data\": false"), "qemu map tail: {last}");

        // Reopen read-write and change it again.
        let mut img = open(d, &name, OpenMode::ReadWrite).expect("reopen");
        let mut rng = Rng(seed ^ 0xffff);
        apply_random(img.as_mut(), &mut shadow, &mut rng, 30);
        img.close().expect("close");
        drop(img);
        std::fs::write(d.join("shadow.raw"), &shadow).expect("write shadow");
        qemu_check(d, &name);
        qemu_compare(d, "shadow.raw", &name);
    }
}

#[test]
fn grows_the_refcount_table_of_qemu_images() {
    // qemu gives a 512-byte-cluster image a one-cluster refcount table covering 8 MiB of file;
    // writing 16 MiB of data forces it to move.
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let size = 20 * MIB;
    run(
        d,
        &[
            "qemu-img",
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "g.qcow2",
            &size.to_string(),
        ],
    );
    qemu_io(
        d,
        "g.qcow2",
        &[
            "write -P 0x11 0 1M".to_owned(),
            "write -P 0x22 10M 64k".to_owned(),
        ],
    );
    let mut shadow = qemu_raw(d, "g.qcow2");
    let mut img = open(d, "g.qcow2", OpenMode::ReadWrite).expect("open rw");
    let data: Vec<u8> = (0..16 * MIB).map(|j| (j % 253) as u8 | 1).collect();
    for k in 0..16 {
        let off = 2 * MIB + k * MIB;
        img.write(off, &data[(k * MIB) as usize..((k + 1) * MIB) as usize])
            .expect("write");
    }
    shadow[2 * MIB as usize..18 * MIB as usize].copy_from_slice(&data);
    img.write_zeroes(3 * MIB, 4 * MIB, true).expect("discard");
    shadow[3 * MIB as usize..7 * MIB as usize].fill(0);
    img.close().expect("close");
    drop(img);
    let after = std::fs::read(d.join("g.qcow2")).expect("read");
    let rt_clusters = u32::from_be_bytes(after[56..60].try_into().expect("4"));
    assert!(
        rt_clusters > 1,
        "refcount table did not grow ({rt_clusters} clusters)"
    );
    qemu_check(d, "g.qcow2");
    assert!(qemu_raw(d, "g.qcow2") == shadow);
}

#[test]
fn dirty_bitmaps_match_writes_after_the_bitmap_was_added() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let size = 64 * MIB;
    run(
        d,
        &[
            "qemu-img",
            "create",
            "-f",
            "qcow2",
            "d.qcow2",
            &size.to_string(),
        ],
    );
    // Writes before the bitmap exists are not tracked.
    qemu_io(d, "d.qcow2", &["write -P 1 0 8M".to_owned()]);
    run(
        d,
        &[
            "qemu-img", "bitmap", "--add", "--enable", "-g", "65536", "d.qcow2", "cbt0",
        ],
    );
    run(
        d,
        &[
            "qemu-img", "bitmap", "--add", "-g", "1M", "d.qcow2", "other",
        ],
    );
    run(d, &["qemu-img", "bitmap", "--disable", "d.qcow2", "other"]);
    assert!(
        haven_qcow2::dirty_extents(&StdBackend::new(d), "d.qcow2", "cbt0")
            .expect("empty bitmap")
            .is_empty()
    );
    let mut rng = Rng(0xb17);
    let mut dirty = vec![false; (size / 65536) as usize];
    let mut cmds = Vec::new();
    for i in 0..40 {
        let off = rng.below(size / 512) * 512;
        let len = ((rng.below(200 * 1024) / 512) + 1) * 512;
        let len = len.min(size - off);
        cmds.push(if i % 4 == 3 {
            format!("write -z {off} {len}")
        } else {
            format!("write -P 7 {off} {len}")
        });
        for c in off / 65536..(off + len).div_ceil(65536) {
            dirty[c as usize] = true;
        }
    }
    qemu_io(d, "d.qcow2", &cmds);
    let mut want = Vec::new();
    for (c, &isdirty) in dirty.iter().enumerate() {
        if isdirty {
            let off = c as u64 * 65536;
            match want.last_mut() {
                Some(haven_image::Extent { offset, length }) if *offset + *length == off => {
                    *length += 65536
                }
                _ => want.push(haven_image::Extent {
                    offset: off,
                    length: 65536,
                }),
            }
        }
    }
    let b = StdBackend::new(d);
    let got = haven_qcow2::dirty_extents(&b, "d.qcow2", "cbt0").expect("dirty extents");
    assert_eq!(got, want);
    let list = haven_qcow2::list_bitmaps(&b, "d.qcow2").expect("list");
    let names: Vec<(&str, u64, bool, bool)> = list
        .iter()
        .map(|b| (b.name.as_str(), b.granularity, b.enabled, b.in_use))
        .collect();
    assert_eq!(
        names,
        vec![("cbt0", 65536, true, false), ("other", MIB, false, false)]
    );
    let err = haven_qcow2::dirty_extents(&b, "d.qcow2", "nope").expect_err("unknown bitmap");
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert!(err.message.contains("cbt0"), "{err}");

    // Our own writes do not update bitmaps, so they mark the enabled one in use.
    let mut img = open(d, "d.qcow2", OpenMode::ReadWrite).expect("open rw");
    img.write(0, &[9u8; 512]).expect("write");
    img.close().expect("close");
    drop(img);
    let err = haven_qcow2::dirty_extents(&b, "d.qcow2", "cbt0").expect_err("in use refused");
    assert_eq!(err.kind, ErrorKind::Corrupt);
    assert!(err.message.contains("full resync"), "{err}");
    assert!(err.message.contains("in-use"), "{err}");
    qemu_check(d, "d.qcow2");
    // The disabled bitmap is still readable (empty: it never tracked anything).
    assert!(
        haven_qcow2::dirty_extents(&b, "d.qcow2", "other")
            .expect("other")
            .is_empty()
    );
}

#[test]
fn probes_by_magic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    run(d, &["qemu-img", "create", "-f", "qcow2", "p.qcow2", "1M"]);
    std::fs::write(d.join("p.raw"), vec![0u8; 4096]).expect("raw");
    let b = StdBackend::new(d);
    assert_eq!(
        Qcow2::probe(&b, "p.qcow2").expect("probe"),
        Some("v3".to_owned())
    );
    assert_eq!(Qcow2::probe(&b, "p.raw").expect("probe"), None);
}

// ---- hostile input ---------------------------------------------------------------------

fn patched(dir: &Path, name: &str, patches: &[(u64, &[u8])]) -> String {
    let mut data = std::fs::read(dir.join("good.qcow2")).expect("read good");
    for (off, bytes) in patches {
        let o = *off as usize;
        if data.len() < o + bytes.len() {
            data.resize(o + bytes.len(), 0);
        }
        data[o..o + bytes.len()].copy_from_slice(bytes);
    }
    std::fs::write(dir.join(name), data).expect("write patched");
    name.to_owned()
}

/// Opens and reads everything and maps; returns the first error.
fn try_all(dir: &Path, name: &str) -> haven_image::Error {
    let result = (|| {
        let mut img = open(dir, name, OpenMode::ReadOnly)?;
        let size = img.info()?.size;
        img.map(0, size)?;
        let mut buf = vec![0u8; MIB as usize];
        let mut pos = 0;
        while pos < size {
            let n = MIB.min(size - pos);
            img.read(pos, &mut buf[..n as usize])?;
            pos += n;
        }
        Ok::<(), haven_image::Error>(())
    })();
    result
        .err()
        .unwrap_or_else(|| panic!("{name}: expected an error"))
}

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}
fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

#[test]
fn hostile_images_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    run(
        d,
        &["qemu-img", "create", "-f", "qcow2", "good.qcow2", "4M"],
    );
    qemu_io(d, "good.qcow2", &["write -P 0x33 0 256k".to_owned()]);
    let good = std::fs::read(d.join("good.qcow2")).expect("read");
    let l1_off = u64::from_be_bytes(good[40..48].try_into().expect("8"));
    let l2_off = u64::from_be_bytes(
        good[l1_off as usize..l1_off as usize + 8]
            .try_into()
            .expect("8"),
    ) & 0x00ff_ffff_ffff_fe00;
    let len = good.len() as u64;

    let cases: Vec<(String, ErrorKind, &str)> = vec![
        (
            patched(d, "magic.qcow2", &[(0, b"QFI\0")]),
            ErrorKind::Corrupt,
            "magic",
        ),
        (
            patched(d, "version.qcow2", &[(4, &be32(9))]),
            ErrorKind::Unsupported,
            "version 9",
        ),
        (
            patched(d, "cbits.qcow2", &[(20, &be32(40))]),
            ErrorKind::Corrupt,
            "cluster_bits",
        ),
        (
            patched(d, "size.qcow2", &[(24, &be64(u64::MAX))]),
            ErrorKind::Limit,
            "virtual size",
        ),
        (
            patched(d, "l1small.qcow2", &[(24, &be64(1 << 40))]),
            ErrorKind::Corrupt,
            "l1_size",
        ),
        (
            patched(d, "l1huge.qcow2", &[(36, &be32(u32::MAX))]),
            ErrorKind::Limit,
            "L1 table",
        ),
        (
            patched(d, "l1eof.qcow2", &[(40, &be64(1 << 40))]),
            ErrorKind::Corrupt,
            "L1 table",
        ),
        (
            patched(d, "l2eof.qcow2", &[(l1_off, &be64((1 << 40) | (1 << 63)))]),
            ErrorKind::Corrupt,
            "L2 table",
        ),
        (
            patched(d, "l2unaligned.qcow2", &[(l1_off, &be64(l2_off + 512))]),
            ErrorKind::Corrupt,
            "L2 table",
        ),
        (
            patched(
                d,
                "dataeof.qcow2",
                &[(l2_off, &be64((1 << 63) | (len + (1 << 30))))],
            ),
            ErrorKind::Corrupt,
            "data cluster",
        ),
        (
            patched(
                d,
                "compressed.qcow2",
                &[(l2_off, &be64((1 << 62) | 0x10000 | (3u64 << 54)))],
            ),
            ErrorKind::Corrupt,
            "compressed cluster",
        ),
        (
            patched(d, "incompat.qcow2", &[(72, &be64(1 << 9))]),
            ErrorKind::Unsupported,
            "bit 9",
        ),
        (
            patched(d, "crypt.qcow2", &[(32, &be32(2))]),
            ErrorKind::Unsupported,
            "encrypted",
        ),
        (
            patched(d, "datafile.qcow2", &[(72, &be64(1 << 2))]),
            ErrorKind::Unsupported,
            "external data file",
        ),
        (
            patched(d, "extl2.qcow2", &[(72, &be64(1 << 4))]),
            ErrorKind::Unsupported,
            "extended L2",
        ),
        (
            patched(d, "zstd.qcow2", &[(72, &be64(1 << 3)), (104, &[1])]),
            ErrorKind::Unsupported,
            "zstd",
        ),
        (
            patched(d, "rcorder.qcow2", &[(96, &be32(7))]),
            ErrorKind::Corrupt,
            "refcount_order",
        ),
        (
            patched(d, "hlen.qcow2", &[(100, &be32(1 << 30))]),
            ErrorKind::Corrupt,
            "header_length",
        ),
        (
            patched(
                d,
                "ext.qcow2",
                &[(112, &be32(0x1234)), (116, &be32(1 << 20))],
            ),
            ErrorKind::Corrupt,
            "header extension",
        ),
        (
            patched(d, "backing.qcow2", &[(8, &be64(65000)), (16, &be32(1000))]),
            ErrorKind::Corrupt,
            "backing file name",
        ),
    ];
    for (name, kind, needle) in cases {
        let err = try_all(d, &name);
        assert_eq!(err.kind, kind, "{name}: {err}");
        assert!(
            err.message.contains(needle),
            "{name}: `{needle}` not in: {err}"
        );
    }

    // Truncated files, at every interesting length.
    let data_off = u64::from_be_bytes(
        good[l2_off as usize..l2_off as usize + 8]
            .try_into()
            .expect("8"),
    ) & 0x00ff_ffff_ffff_fe00;
    for cut in [0u64, 10, 71, 100, 4096, l1_off + 4, l2_off + 100, data_off] {
        let mut data = good.clone();
        data.truncate(cut as usize);
        std::fs::write(d.join("trunc.qcow2"), &data).expect("write");
        let err = try_all(d, "trunc.qcow2");
        assert_eq!(err.kind, ErrorKind::Corrupt, "cut at {cut}: {err}");
    }

    // Like qemu, a data cluster cut short at the end of the file reads as zeros past the end.
    let mut data = good.clone();
    data.truncate(data.len() - 4096);
    std::fs::write(d.join("short.qcow2"), &data).expect("write");
    let want = qemu_raw(d, "short.qcow2");
    let mut img = open(d, "short.qcow2", OpenMode::ReadOnly).expect("open short");
    assert!(read_all(img.as_mut()) == want);

    // A feature name table names the unknown bit.
    let names = patched(d, "named.qcow2", &[(72, &be64(1 << 9))]);
    let mut data = std::fs::read(d.join(&names)).expect("read");
    // qemu writes the feature name table first; add our own name for bit 9 in place of bit 0's.
    let pos = data
        .windows(5)
        .position(|w| w == b"dirty")
        .expect("feature table");
    data[pos - 1] = 9;
    data[pos..pos + 5].copy_from_slice(b"weird");
    std::fs::write(d.join(&names), &data).expect("write");
    let err = try_all(d, &names);
    assert!(err.message.contains("\"weird bit\""), "{err}");

    // Corrupt and dirty images open read-only but not for writing.
    let c = patched(d, "corruptbit.qcow2", &[(72, &be64(1 << 1))]);
    assert!(open(d, &c, OpenMode::ReadOnly).is_ok());
    let err = open(d, &c, OpenMode::ReadWrite)
        .err()
        .expect("corrupt rw refused");
    assert!(err.message.contains("corrupt"), "{err}");
    // A refcount table past the end of the file is refused for writing.
    let r = patched(d, "rteof.qcow2", &[(48, &be64(1 << 40))]);
    let err = open(d, &r, OpenMode::ReadWrite).err().expect("rt refused");
    assert!(err.message.contains("refcount table"), "{err}");
}

#[test]
fn hostile_bitmaps_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    run(
        d,
        &["qemu-img", "create", "-f", "qcow2", "good.qcow2", "16M"],
    );
    run(
        d,
        &[
            "qemu-img",
            "bitmap",
            "--add",
            "--enable",
            "-g",
            "65536",
            "good.qcow2",
            "cbt0",
        ],
    );
    qemu_io(d, "good.qcow2", &["write -P 1 1M 64k".to_owned()]);
    let good = std::fs::read(d.join("good.qcow2")).expect("read");
    // Find the bitmaps extension.
    let mut at = 112usize;
    let (ext_at, dir_off) = loop {
        let ty = u32::from_be_bytes(good[at..at + 4].try_into().expect("4"));
        let len = u32::from_be_bytes(good[at + 4..at + 8].try_into().expect("4")) as usize;
        assert_ne!(ty, 0, "no bitmaps extension");
        if ty == 0x2385_2875 {
            break (
                at,
                u64::from_be_bytes(good[at + 24..at + 32].try_into().expect("8")),
            );
        }
        at += 8 + len.div_ceil(8) * 8;
    };
    let b = StdBackend::new(d);
    let cases: Vec<(String, ErrorKind, &str)> = vec![
        (
            patched(d, "inuse.qcow2", &[(dir_off + 12, &be32(3))]),
            ErrorKind::Corrupt,
            "in-use",
        ),
        (
            patched(d, "autoclear.qcow2", &[(88, &be64(0))]),
            ErrorKind::Corrupt,
            "inconsistent",
        ),
        (
            patched(d, "dirsize.qcow2", &[(ext_at as u64 + 16, &be64(1 << 40))]),
            ErrorKind::Corrupt,
            "bitmap directory",
        ),
        (
            patched(d, "tbl.qcow2", &[(dir_off, &be64(1 << 40))]),
            ErrorKind::Corrupt,
            "bitmap table",
        ),
        (
            patched(d, "tblsize.qcow2", &[(dir_off + 8, &be32(77))]),
            ErrorKind::Corrupt,
            "bitmap table",
        ),
        (
            patched(d, "gran.qcow2", &[(dir_off + 17, &[60])]),
            ErrorKind::Corrupt,
            "granularity",
        ),
        (
            patched(d, "name.qcow2", &[(dir_off + 18, &[0xff, 0xff])]),
            ErrorKind::Corrupt,
            "directory",
        ),
    ];
    for (name, kind, needle) in cases {
        let err = haven_qcow2::dirty_extents(&b, &name, "cbt0").expect_err("error");
        assert_eq!(err.kind, kind, "{name}: {err}");
        assert!(
            err.message.contains(needle),
            "{name}: `{needle}` not in: {err}"
        );
    }
}

/// Seeded random corruption of qemu-made images (metadata bytes): every open, read, map, write
/// and bitmap read ends in a value or an error, never a panic. Replay a failure with its seed.
#[test]
fn mutated_images_never_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    run(
        d,
        &[
            "qemu-img",
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "m0.qcow2",
            "1M",
        ],
    );
    qemu_io(
        d,
        "m0.qcow2",
        &[
            "write -P 0x11 0 12k".to_owned(),
            "write -z 64k 8k".to_owned(),
        ],
    );
    run(
        d,
        &[
            "qemu-img", "bitmap", "--add", "--enable", "-g", "4096", "m0.qcow2", "cbt0",
        ],
    );
    qemu_io(d, "m0.qcow2", &["write -P 0x22 300k 4k".to_owned()]);
    std::fs::write(d.join("m.raw"), vec![0x5au8; 64 << 10]).expect("raw");
    run(
        d,
        &[
            "qemu-img",
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            "m.raw",
            "m1.qcow2",
        ],
    );
    let bases = [
        std::fs::read(d.join("m0.qcow2")).expect("m0"),
        std::fs::read(d.join("m1.qcow2")).expect("m1"),
    ];
    let b = StdBackend::new(d);
    for seed in 1..=200u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut data = bases[(seed % 2) as usize].clone();
        // Metadata lives in the first clusters and where the tables are: hit both.
        for _ in 0..1 + rng.below(6) {
            let at = if rng.below(2) == 0 {
                rng.below(256)
            } else {
                rng.below(data.len() as u64)
            };
            let v = match rng.below(4) {
                0 => 0xff,
                1 => 0,
                _ => rng.next() as u8,
            };
            data[at as usize] = v;
        }
        if rng.below(8) == 0 {
            data.truncate(rng.below(data.len() as u64) as usize);
        }
        std::fs::write(d.join("mut.qcow2"), &data).expect("write");
        for mode in [OpenMode::ReadOnly, OpenMode::ReadWrite] {
            let Ok(mut img) = open(d, "mut.qcow2", mode) else {
                continue;
            };
            let size = img.info().expect("info").size;
            let _ = img.map(0, size);
            let n = size.min(2 * MIB) & !511;
            let mut buf = vec![0u8; n as usize];
            let _ = img.read(0, &mut buf);
            if mode == OpenMode::ReadWrite && size >= 1 << 16 {
                let _ = img.write(512, &[7u8; 8192]);
                let _ = img.write_zeroes(0, 1 << 16, true);
                let _ = img.close();
            }
        }
        let _ = haven_qcow2::dirty_extents(&b, "mut.qcow2", "cbt0");
    }
}
