//! VHD against qemu-img: images qemu makes read the same through haven-vhd, images haven-vhd
//! makes read the same through qemu-img, and damaged images give clear errors.

use std::path::Path;
use std::process::Command;

use haven_image::{
    CreateOptions, ErrorKind, ExtentState, Format, Image, OpenMode, Options, StdBackend,
};
use haven_vhd::Vhd;

const MIB: u64 = 1 << 20;

/// splitmix64: a small seeded generator, so every run writes the same patterns.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .expect("run qemu tool");
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(dir: &Path, file: &str, commands: &[String]) {
    let path = dir.join(file);
    let mut args = vec!["-f", "vpc"];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(path.to_str().unwrap());
    run("qemu-io", &args);
}

fn qemu_raw(dir: &Path, file: &str) -> Vec<u8> {
    let src = dir.join(file);
    let dst = dir.join(format!("{file}.raw"));
    let _ = std::fs::remove_file(&dst);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
        ],
    );
    std::fs::read(dst).unwrap()
}

fn qemu_size(dir: &Path, file: &str) -> u64 {
    let info = run(
        "qemu-img",
        &[
            "info",
            "-f",
            "vpc",
            "--output=json",
            dir.join(file).to_str().unwrap(),
        ],
    );
    let at = info.rfind("\"virtual-size\":").unwrap() + "\"virtual-size\":".len();
    info[at..]
        .trim_start()
        .split([',', '\n'])
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn open(dir: &Path, file: &str, mode: OpenMode) -> haven_image::Result<Box<dyn Image>> {
    Vhd::open(&StdBackend::new(dir), file, mode, &Options::default())
}

fn read_all(image: &mut dyn Image) -> Vec<u8> {
    let size = image.info().unwrap().size;
    let mut out = vec![0u8; size as usize];
    for (i, chunk) in out.chunks_mut(3 * MIB as usize).enumerate() {
        image.read(i as u64 * 3 * MIB, chunk).unwrap();
    }
    out
}

/// Every map entry marked Zero reads as zeros, and the map covers the disk.
fn check_map(image: &mut dyn Image, data: &[u8]) {
    let size = data.len() as u64;
    let map = image.map(0, size).unwrap();
    let mut pos = 0;
    for e in &map {
        assert_eq!(e.offset, pos, "map is contiguous: {map:?}");
        if e.state == ExtentState::Zero {
            let r = &data[e.offset as usize..(e.offset + e.length) as usize];
            assert!(r.iter().all(|&b| b == 0), "zero map entry {e:?} holds data");
        }
        pos += e.length;
    }
    assert_eq!(pos, size);
}

/// Random qemu-io writes (sector-aligned, not block-aligned), zero writes and discards.
fn qemu_commands(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    let sectors = size / 512;
    let mut cmds = Vec::new();
    for _ in 0..n {
        let off = rng.below(sectors - 1) * 512;
        let len = ((1 + rng.below(600)) * 512).min(size - off);
        match rng.below(6) {
            0 => cmds.push(format!("write -z {off} {len}")),
            1 => cmds.push(format!("discard {off} {len}")),
            _ => cmds.push(format!("write -P {} {off} {len}", 1 + rng.below(254))),
        }
    }
    cmds
}

fn footer_checksum_ok(f: &[u8]) -> bool {
    let stored = u32::from_be_bytes(f[64..68].try_into().unwrap());
    let sum: u32 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .map(|(_, &b)| u32::from(b))
        .sum();
    !sum == stored
}

fn header_checksum_ok(h: &[u8]) -> bool {
    let stored = u32::from_be_bytes(h[36..40].try_into().unwrap());
    let sum: u32 = h
        .iter()
        .enumerate()
        .filter(|(i, _)| !(36..40).contains(i))
        .map(|(_, &b)| u32::from(b))
        .sum();
    !sum == stored
}

fn fix_checksum(buf: &mut [u8], at: usize) {
    buf[at..at + 4].fill(0);
    let sum: u32 = buf.iter().map(|&b| u32::from(b)).sum();
    buf[at..at + 4].copy_from_slice(&(!sum).to_be_bytes());
}

#[test]
fn reads_qemu_dynamic_images_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "vpc",
            d.join("d.vhd").to_str().unwrap(),
            "64M",
        ],
    );
    let size = qemu_size(d, "d.vhd");
    let mut rng = Rng(0x5eed_0001);
    qemu_io(d, "d.vhd", &qemu_commands(&mut rng, size, 60));
    let want = qemu_raw(d, "d.vhd");
    assert_eq!(
        Vhd::probe(&StdBackend::new(d), "d.vhd").unwrap().as_deref(),
        Some("dynamic")
    );
    let mut img = open(d, "d.vhd", OpenMode::ReadOnly).unwrap();
    let info = img.info().unwrap();
    assert_eq!((info.size, info.subformat.as_str()), (size, "dynamic"));
    let got = read_all(img.as_mut());
    assert!(
        got == want,
        "dynamic VHD reads differently from qemu-img convert"
    );
    check_map(img.as_mut(), &got);

    // Block size other than 2 MiB and a size qemu force-sizes (creator qem2).
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "force_size=on",
            d.join("e.vhd").to_str().unwrap(),
            "10M",
        ],
    );
    qemu_io(d, "e.vhd", &qemu_commands(&mut rng, 10 * MIB, 20));
    let mut img = open(d, "e.vhd", OpenMode::ReadOnly).unwrap();
    assert_eq!(img.info().unwrap().size, 10 * MIB);
    assert!(read_all(img.as_mut()) == qemu_raw(d, "e.vhd"));
}

#[test]
fn reads_qemu_fixed_images_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(0x5eed_0002);
    for (name, opts) in [
        ("f.vhd", "subformat=fixed,force_size=on"),
        ("g.vhd", "subformat=fixed"),
    ] {
        run(
            "qemu-img",
            &[
                "create",
                "-f",
                "vpc",
                "-o",
                opts,
                d.join(name).to_str().unwrap(),
                "24M",
            ],
        );
        let size = qemu_size(d, name);
        qemu_io(d, name, &qemu_commands(&mut rng, size, 40));
        let want = qemu_raw(d, name);
        // A fixed VHD has nothing at its start: not recognised by content, like qemu-img.
        assert_eq!(Vhd::probe(&StdBackend::new(d), name).unwrap(), None);
        let mut img = open(d, name, OpenMode::ReadOnly).unwrap();
        let info = img.info().unwrap();
        assert_eq!((info.size, info.subformat.as_str()), (size, "fixed"));
        let got = read_all(img.as_mut());
        assert!(
            got == want,
            "{name} reads differently from qemu-img convert"
        );
        check_map(img.as_mut(), &got);
    }
    // Explicit subformat on open is checked.
    let opts = Options::parse("subformat=dynamic").unwrap();
    let e = Vhd::open(&StdBackend::new(d), "f.vhd", OpenMode::ReadOnly, &opts)
        .err()
        .unwrap();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    let opts = Options::parse("subformat=fixed").unwrap();
    assert!(Vhd::open(&StdBackend::new(d), "f.vhd", OpenMode::ReadOnly, &opts).is_ok());
}

/// Applies random writes, zero writes and discards to `img` and to `model`.
fn random_session(img: &mut dyn Image, model: &mut [u8], rng: &mut Rng, ops: usize, limit: u64) {
    let sectors = limit / 512;
    for _ in 0..ops {
        let off = rng.below(sectors - 1) * 512;
        let len = ((1 + rng.below(9000)) * 512).min(limit - off);
        let range = off as usize..(off + len) as usize;
        match rng.below(5) {
            0 | 1 => {
                let discard = rng.below(2) == 0;
                img.write_zeroes(off, len, discard).unwrap();
                model[range].fill(0);
            }
            _ => {
                let mut data = vec![0u8; len as usize];
                let fill = rng.next() as u8 | 1;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = fill.wrapping_add((i / 512) as u8);
                }
                img.write(off, &data).unwrap();
                model[range].copy_from_slice(&data);
            }
        }
    }
    // Whole blocks zeroed (freed) and written again (slot reuse).
    img.write_zeroes(4 * MIB, 4 * MIB, true).unwrap();
    model[4 * MIB as usize..8 * MIB as usize].fill(0);
    let data = vec![0x5au8; MIB as usize + 512];
    img.write(6 * MIB, &data).unwrap();
    model[6 * MIB as usize..(7 * MIB + 512) as usize].copy_from_slice(&data);
}

fn check_written(d: &Path, name: &str, model: &[u8]) {
    let raw = d.join(format!("{name}.model"));
    std::fs::write(&raw, model).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "vpc",
            raw.to_str().unwrap(),
            d.join(name).to_str().unwrap(),
        ],
    );
    let mut img = open(d, name, OpenMode::ReadOnly).unwrap();
    assert!(
        read_all(img.as_mut()) == model,
        "{name} reads back differently"
    );
    check_map(img.as_mut(), model);
}

#[test]
fn writes_dynamic_images_qemu_reads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backend = StdBackend::new(d);
    let size = 64 * MIB;
    let create = CreateOptions {
        size,
        sector_size: 512,
        options: Options::default(),
    };
    let mut img = Vhd::create(&backend, "w.vhd", &create).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0x5eed_0003);
    // Writes stay below 40 MiB: the rest must stay unallocated.
    random_session(img.as_mut(), &mut model, &mut rng, 80, 40 * MIB);
    // Before the first flush: blocks added in this session whose tail is not written yet.
    img.write(60 * MIB, &[0x33; 512]).unwrap();
    model[60 * MIB as usize..][..512].fill(0x33);
    assert!(read_all(img.as_mut()) == model, "reads before flush");
    img.write_zeroes(60 * MIB, 2 * MIB, true).unwrap();
    model[60 * MIB as usize..][..512].fill(0);
    img.close().unwrap();
    drop(img);

    assert_eq!(qemu_size(d, "w.vhd"), size, "exact virtual size");
    let bytes = std::fs::read(d.join("w.vhd")).unwrap();
    assert!(footer_checksum_ok(&bytes[..512]), "footer copy checksum");
    assert!(
        footer_checksum_ok(&bytes[bytes.len() - 512..]),
        "footer checksum"
    );
    assert_eq!(&bytes[..512], &bytes[bytes.len() - 512..]);
    assert!(
        header_checksum_ok(&bytes[512..1536]),
        "dynamic header checksum"
    );
    check_written(d, "w.vhd", &model);

    let map = run(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "-f",
            "vpc",
            d.join("w.vhd").to_str().unwrap(),
        ],
    );
    let tail = map.lines().last().unwrap();
    assert!(
        tail.contains("\"data\": false") && tail.contains(&format!("\"start\": {}", 40 * MIB)),
        "{map}"
    );
    let mut img = open(d, "w.vhd", OpenMode::ReadOnly).unwrap();
    let ours = img.map(40 * MIB, 24 * MIB).unwrap();
    assert_eq!(ours.len(), 1);
    assert_eq!(ours[0].state, ExtentState::Zero);
    drop(img);

    // A second session on the reopened image, then qemu writes on top of ours.
    let mut img = open(d, "w.vhd", OpenMode::ReadWrite).unwrap();
    random_session(img.as_mut(), &mut model, &mut rng, 40, 64 * MIB);
    img.close().unwrap();
    drop(img);
    check_written(d, "w.vhd", &model);
    qemu_io(d, "w.vhd", &["write -P 0x77 63M 1M".to_owned()]);
    model[63 * MIB as usize..].fill(0x77);
    check_written(d, "w.vhd", &model);

    // A small block size.
    let opts = Options::parse("subformat=dynamic,block_size=512K").unwrap();
    let create = CreateOptions {
        size: 9 * MIB + 512,
        sector_size: 512,
        options: opts,
    };
    let mut img = Vhd::create(&backend, "s.vhd", &create).unwrap();
    let mut model = vec![0u8; create.size as usize];
    random_session(img.as_mut(), &mut model, &mut rng, 30, create.size);
    img.close().unwrap();
    drop(img);
    assert_eq!(qemu_size(d, "s.vhd"), create.size);
    check_written(d, "s.vhd", &model);
}

#[test]
fn writes_fixed_images_of_exact_size() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backend = StdBackend::new(d);
    let mut rng = Rng(0x5eed_0004);
    for (name, size) in [("a.vhd", 64 * MIB), ("b.vhd", 101 * MIB)] {
        let opts = Options::parse("subformat=fixed").unwrap();
        let create = CreateOptions {
            size,
            sector_size: 512,
            options: opts,
        };
        let mut img = Vhd::create(&backend, name, &create).unwrap();
        assert_eq!(img.info().unwrap().subformat, "fixed");
        let mut model = vec![0u8; size as usize];
        random_session(img.as_mut(), &mut model, &mut rng, 50, 40 * MIB);
        img.close().unwrap();
        drop(img);
        let bytes = std::fs::read(d.join(name)).unwrap();
        assert_eq!(
            bytes.len() as u64,
            size + 512,
            "{name}: virtual size + footer"
        );
        let footer = &bytes[size as usize..];
        assert_eq!(&footer[..8], b"conectix");
        assert!(footer_checksum_ok(footer));
        assert_eq!(
            u64::from_be_bytes(footer[48..56].try_into().unwrap()),
            size,
            "current size"
        );
        assert_eq!(
            u32::from_be_bytes(footer[60..64].try_into().unwrap()),
            2,
            "disk type"
        );
        assert_eq!(qemu_size(d, name), size, "{name}: qemu sees the exact size");
        check_written(d, name, &model);
        // Never-written space stays a hole in the file.
        let mut img = open(d, name, OpenMode::ReadOnly).unwrap();
        let map = img.map(40 * MIB, size - 40 * MIB).unwrap();
        assert_eq!(map.len(), 1, "{map:?}");
        assert_eq!(map[0].state, ExtentState::Zero);
        assert!(img.info().unwrap().allocated_bytes < 41 * MIB);
    }
}

#[test]
fn create_refuses_what_azure_or_vhd_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let backend = StdBackend::new(dir.path());
    let create = |size, sector_size, opts: &str| {
        let options = Options::parse(opts).unwrap();
        Vhd::create(
            &backend,
            "x.vhd",
            &CreateOptions {
                size,
                sector_size,
                options,
            },
        )
        .err()
        .unwrap()
    };
    let e = create(100 * MIB + 512, 512, "subformat=fixed");
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(
        e.message.contains("whole MiB") && e.message.contains("Azure"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains(&(101 * MIB).to_string()),
        "names the next valid size: {}",
        e.message
    );
    assert!(!dir.path().join("x.vhd").exists());
    assert_eq!(create(MIB, 4096, "").kind, ErrorKind::InvalidArgument);
    assert_eq!(
        create(MIB, 512, "cluster_size=1").kind,
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        create(MIB, 512, "subformat=fixed,block_size=2M").kind,
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        create(MIB, 512, "block_size=3000").kind,
        ErrorKind::InvalidArgument
    );
    assert_eq!(create(MIB + 1, 512, "").kind, ErrorKind::InvalidArgument);
    assert_eq!(create(3 << 40, 512, "").kind, ErrorKind::Limit);
    assert_eq!(
        create(MIB, 512, "subformat=sparse").kind,
        ErrorKind::InvalidArgument
    );
}

// ---- differencing disks, built by hand (qemu-img cannot create them) ----

const BLOCK: u64 = 2 * MIB;

fn footer(size: u64, disk_type: u32, data_offset: u64, uuid: [u8; 16]) -> Vec<u8> {
    let mut f = vec![0u8; 512];
    f[..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x10000u32.to_be_bytes());
    f[16..24].copy_from_slice(&data_offset.to_be_bytes());
    f[28..32].copy_from_slice(b"win ");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
    f[60..64].copy_from_slice(&disk_type.to_be_bytes());
    f[68..84].copy_from_slice(&uuid);
    fix_checksum(&mut f, 64);
    f
}

struct Child<'a> {
    size: u64,
    uuid: [u8; 16],
    parent_uuid: [u8; 16],
    parent_name: &'a str,
    locators: Vec<(&'a [u8; 4], Vec<u8>)>,
    /// (block index, sectors present, data of the whole block)
    blocks: Vec<(usize, Vec<bool>, Vec<u8>)>,
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Writes a differencing VHD: footer copy, header, BAT, locator data, blocks, footer.
fn build_child(path: &Path, c: &Child<'_>) {
    let entries = c.size.div_ceil(BLOCK) as usize;
    let bat_at = 1536u64;
    let loc_at = bat_at + (entries as u64 * 4).next_multiple_of(512);
    let mut out = footer(c.size, 4, 512, c.uuid);
    let mut h = vec![0u8; 1024];
    h[..8].copy_from_slice(b"cxsparse");
    h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    h[16..24].copy_from_slice(&bat_at.to_be_bytes());
    h[24..28].copy_from_slice(&0x10000u32.to_be_bytes());
    h[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
    h[32..36].copy_from_slice(&(BLOCK as u32).to_be_bytes());
    h[40..56].copy_from_slice(&c.parent_uuid);
    for (i, u) in c.parent_name.encode_utf16().enumerate() {
        h[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
    }
    let mut loc_data = Vec::new();
    for (i, (platform, data)) in c.locators.iter().enumerate() {
        let at = 576 + 24 * i;
        let space = (data.len() as u64).next_multiple_of(512);
        h[at..at + 4].copy_from_slice(*platform);
        h[at + 4..at + 8].copy_from_slice(&(space as u32).to_be_bytes());
        h[at + 8..at + 12].copy_from_slice(&(data.len() as u32).to_be_bytes());
        let off = loc_at + loc_data.len() as u64;
        h[at + 16..at + 24].copy_from_slice(&off.to_be_bytes());
        loc_data.extend_from_slice(data);
        loc_data.resize(space as usize + loc_data.len() - data.len(), 0);
    }
    fix_checksum(&mut h, 36);
    out.extend_from_slice(&h);
    let mut bat = vec![0xffu8; (loc_at - bat_at) as usize];
    let mut blocks = Vec::new();
    let first_block = loc_at + loc_data.len() as u64;
    for (n, (idx, present, data)) in c.blocks.iter().enumerate() {
        let at = first_block + n as u64 * (512 + BLOCK);
        bat[idx * 4..idx * 4 + 4].copy_from_slice(&((at / 512) as u32).to_be_bytes());
        let mut bitmap = vec![0u8; 512];
        for (s, &p) in present.iter().enumerate() {
            if p {
                bitmap[s / 8] |= 0x80 >> (s % 8);
            }
        }
        blocks.extend_from_slice(&bitmap);
        blocks.extend_from_slice(data);
    }
    out.extend_from_slice(&bat);
    out.extend_from_slice(&loc_data);
    out.extend_from_slice(&blocks);
    out.extend_from_slice(&footer(c.size, 4, 512, c.uuid));
    std::fs::write(path, out).unwrap();
}

fn uuid_of(path: &Path) -> [u8; 16] {
    let b = std::fs::read(path).unwrap();
    b[68..84].try_into().unwrap()
}

/// A child block with random sectors present, and the expected disk updated.
fn child_block(rng: &mut Rng, idx: usize, expect: &mut [u8]) -> (usize, Vec<bool>, Vec<u8>) {
    let sectors = (BLOCK / 512) as usize;
    let mut present = vec![false; sectors];
    let mut s = 0;
    while s < sectors {
        let run = 1 + rng.below(40) as usize;
        let on = rng.below(2) == 0;
        for p in present.iter_mut().skip(s).take(run) {
            *p = on;
        }
        s += run;
    }
    let fill = rng.next() as u8 | 1;
    let data = vec![fill; BLOCK as usize];
    for (s, &p) in present.iter().enumerate() {
        if p {
            let at = idx * BLOCK as usize + s * 512;
            expect[at..at + 512].fill(fill);
        }
    }
    (idx, present, data)
}

#[test]
fn reads_differencing_chains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("vms")).unwrap();
    let size = 8 * MIB;
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "force_size=on",
            d.join("vms/base.vhd").to_str().unwrap(),
            "8M",
        ],
    );
    let mut rng = Rng(0x5eed_0005);
    let cmds = qemu_commands(&mut rng, size, 30);
    qemu_io(d, "vms/base.vhd", &cmds);
    let mut expect = qemu_raw(d, "vms/base.vhd");
    let base_uuid = uuid_of(&d.join("vms/base.vhd"));

    // Child: relative W2ru locator; blocks 0 and 2 partly present.
    let blocks = vec![
        child_block(&mut rng, 0, &mut expect),
        child_block(&mut rng, 2, &mut expect),
    ];
    let child = Child {
        size,
        uuid: [1; 16],
        parent_uuid: base_uuid,
        parent_name: "base.vhd",
        locators: vec![
            (b"W2ku", utf16le("C:\\Hyper-V\\base.vhd")),
            (b"W2ru", utf16le(".\\base.vhd")),
        ],
        blocks,
    };
    build_child(&d.join("vms/child.vhd"), &child);
    assert_eq!(
        Vhd::probe(&StdBackend::new(d), "vms/child.vhd")
            .unwrap()
            .as_deref(),
        Some("differencing")
    );
    let mut img = open(d, "vms/child.vhd", OpenMode::ReadOnly).unwrap();
    let info = img.info().unwrap();
    assert_eq!(info.files, ["vms/child.vhd", "vms/base.vhd"]);
    assert_eq!(info.subformat, "differencing");
    let got = read_all(img.as_mut());
    assert!(
        got == expect,
        "child reads differently from base + child sectors"
    );
    check_map(img.as_mut(), &got);
    // Odd-sized reads across runs of the bitmap.
    let mut buf = vec![0u8; 5 * 512];
    img.read(BLOCK * 2 + 77 * 512, &mut buf).unwrap();
    assert_eq!(buf, expect[(BLOCK * 2 + 77 * 512) as usize..][..5 * 512]);
    // Read-write open of a differencing disk is refused.
    assert_eq!(
        open(d, "vms/child.vhd", OpenMode::ReadWrite)
            .err()
            .unwrap()
            .kind,
        ErrorKind::Unsupported
    );
    drop(img);

    // Grandchild in another folder: relative path with `..`, and MacX as the only other name.
    std::fs::create_dir(d.join("snap")).unwrap();
    let blocks = vec![
        child_block(&mut rng, 1, &mut expect),
        child_block(&mut rng, 3, &mut expect),
    ];
    let grandchild = Child {
        size,
        uuid: [2; 16],
        parent_uuid: [1; 16],
        parent_name: "",
        locators: vec![
            (b"MacX", b"file://localhost/Users/x/child.vhd".to_vec()),
            (b"W2ru", utf16le("..\\vms\\child.vhd")),
        ],
        blocks,
    };
    build_child(&d.join("snap/gc.vhd"), &grandchild);
    let mut img = open(d, "snap/gc.vhd", OpenMode::ReadOnly).unwrap();
    assert_eq!(
        img.info().unwrap().files,
        ["snap/gc.vhd", "vms/child.vhd", "vms/base.vhd"]
    );
    let got = read_all(img.as_mut());
    assert!(got == expect, "grandchild reads differently");
    check_map(img.as_mut(), &got);
}

#[test]
fn differencing_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "force_size=on",
            d.join("base.vhd").to_str().unwrap(),
            "4M",
        ],
    );
    let base_uuid = uuid_of(&d.join("base.vhd"));
    let mk = |name: &str, uuid: [u8; 16], parent_uuid: [u8; 16], parent: &str| {
        let c = Child {
            size: 4 * MIB,
            uuid,
            parent_uuid,
            parent_name: parent,
            locators: vec![(b"W2ru", utf16le(&format!(".\\{parent}")))],
            blocks: Vec::new(),
        };
        build_child(&d.join(name), &c);
    };
    // Wrong parent unique id.
    mk("wrong.vhd", [3; 16], [9; 16], "base.vhd");
    let e = open(d, "wrong.vhd", OpenMode::ReadOnly).err().unwrap();
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(e.message.contains("unique id"), "{}", e.message);
    // Missing parent.
    mk("orphan.vhd", [4; 16], base_uuid, "gone.vhd");
    let e = open(d, "orphan.vhd", OpenMode::ReadOnly).err().unwrap();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("gone.vhd"), "{}", e.message);
    // A disk that is its own parent, and a two-disk loop.
    mk("self.vhd", [5; 16], [5; 16], "self.vhd");
    let e = open(d, "self.vhd", OpenMode::ReadOnly).err().unwrap();
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(e.message.contains("loops"), "{}", e.message);
    mk("p.vhd", [6; 16], [7; 16], "q.vhd");
    mk("q.vhd", [7; 16], [6; 16], "p.vhd");
    let e = open(d, "p.vhd", OpenMode::ReadOnly).err().unwrap();
    assert!(e.message.contains("loops"), "{}", e.message);
    // A chain deeper than the limit.
    let mut parent = ("base.vhd".to_owned(), base_uuid);
    for i in 0..20u8 {
        let name = format!("c{i}.vhd");
        mk(&name, [0x40 + i; 16], parent.1, &parent.0);
        parent = (name, [0x40 + i; 16]);
    }
    let e = open(d, &parent.0, OpenMode::ReadOnly).err().unwrap();
    assert_eq!(e.kind, ErrorKind::Limit, "{}", e.message);
    assert!(open(d, "c10.vhd", OpenMode::ReadOnly).is_ok());
}

// ---- hostile input ----

fn patched(d: &Path, from: &str, to: &str, patch: impl FnOnce(&mut Vec<u8>)) -> haven_image::Error {
    let mut b = std::fs::read(d.join(from)).unwrap();
    patch(&mut b);
    std::fs::write(d.join(to), &b).unwrap();
    let e = open(d, to, OpenMode::ReadOnly)
        .err()
        .unwrap_or_else(|| panic!("{to} opened"));
    assert!(
        e.message.contains("vhd") || e.message.contains(to),
        "{}",
        e.message
    );
    e
}

fn expect(e: haven_image::Error, kind: ErrorKind, words: &[&str]) {
    assert_eq!(e.kind, kind, "{}", e.message);
    for w in words {
        assert!(e.message.contains(w), "{:?} lacks {w:?}", e.message);
    }
}

/// Rewrites both footers (offset 0 and end) after `f` changed the one at offset 0.
fn edit_footer(b: &mut [u8], f: impl Fn(&mut [u8])) {
    f(&mut b[..512]);
    fix_checksum(&mut b[..512], 64);
    let copy = b[..512].to_vec();
    let n = b.len();
    b[n - 512..].copy_from_slice(&copy);
}

fn edit_header(b: &mut [u8], f: impl Fn(&mut [u8])) {
    f(&mut b[512..1536]);
    fix_checksum(&mut b[512..1536], 36);
}

#[test]
fn hostile_images_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "vpc",
            d.join("d.vhd").to_str().unwrap(),
            "16M",
        ],
    );
    qemu_io(d, "d.vhd", &["write -P 0x11 0 5M".to_owned()]);
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed,force_size=on",
            d.join("f.vhd").to_str().unwrap(),
            "2M",
        ],
    );

    expect(
        patched(d, "d.vhd", "small.vhd", |b| b.truncate(300)),
        ErrorKind::Corrupt,
        &["footer", "300 bytes"],
    );
    expect(
        patched(d, "d.vhd", "nocookie.vhd", |b| b.fill(7)),
        ErrorKind::Corrupt,
        &["footer", "not a VHD"],
    );
    expect(
        patched(d, "d.vhd", "sum.vhd", |b| {
            b[40] ^= 1;
            let n = b.len();
            b[n - 512 + 40] ^= 1;
        }),
        ErrorKind::Corrupt,
        &["footer", "checksum"],
    );
    expect(
        patched(d, "d.vhd", "type.vhd", |b| edit_footer(b, |f| f[63] = 9)),
        ErrorKind::Corrupt,
        &["disk type 9"],
    );
    expect(
        patched(d, "d.vhd", "huge.vhd", |b| {
            edit_footer(b, |f| {
                f[28..32].copy_from_slice(b"win ");
                f[48..56].copy_from_slice(&(1u64 << 60).to_be_bytes());
            })
        }),
        ErrorKind::Limit,
        &["bytes"],
    );
    expect(
        patched(d, "d.vhd", "hdroff.vhd", |b| {
            edit_footer(b, |f| {
                f[16..24].copy_from_slice(&(1u64 << 40).to_be_bytes())
            })
        }),
        ErrorKind::Corrupt,
        &["dynamic disk header", "past the end"],
    );
    expect(
        patched(d, "d.vhd", "hcookie.vhd", |b| b[513] = b'X'),
        ErrorKind::Corrupt,
        &["dynamic disk header", "cxsparse"],
    );
    expect(
        patched(d, "d.vhd", "hsum.vhd", |b| b[512 + 30] ^= 4),
        ErrorKind::Corrupt,
        &["dynamic disk header", "checksum"],
    );
    expect(
        patched(d, "d.vhd", "bs.vhd", |b| {
            edit_header(b, |h| h[32..36].copy_from_slice(&3000u32.to_be_bytes()))
        }),
        ErrorKind::Corrupt,
        &["block size 3000"],
    );
    expect(
        patched(d, "d.vhd", "entries.vhd", |b| {
            edit_header(b, |h| h[28..32].copy_from_slice(&u32::MAX.to_be_bytes()))
        }),
        ErrorKind::Limit,
        &["block allocation table"],
    );
    expect(
        patched(d, "d.vhd", "few.vhd", |b| {
            edit_header(b, |h| h[28..32].copy_from_slice(&2u32.to_be_bytes()))
        }),
        ErrorKind::Corrupt,
        &["too few"],
    );
    expect(
        patched(d, "d.vhd", "batoff.vhd", |b| {
            edit_header(b, |h| {
                h[16..24].copy_from_slice(&(1u64 << 50).to_be_bytes())
            })
        }),
        ErrorKind::Corrupt,
        &["block allocation table", "past the end"],
    );
    expect(
        patched(d, "d.vhd", "entry.vhd", |b| {
            b[1536..1540].copy_from_slice(&0x00ff_ffffu32.to_be_bytes())
        }),
        ErrorKind::Corrupt,
        &["block allocation table entry 0", "past the end"],
    );
    expect(
        patched(d, "d.vhd", "overlap.vhd", |b| {
            b[1540..1544].copy_from_slice(&2u32.to_be_bytes())
        }),
        ErrorKind::Corrupt,
        &["block allocation table entry 1", "overlaps"],
    );
    expect(
        patched(d, "d.vhd", "trunc.vhd", |b| {
            let n = b.len();
            b.truncate(n - MIB as usize);
        }),
        ErrorKind::Corrupt,
        &["block allocation table entry 2", "truncated"],
    );
    expect(
        patched(d, "f.vhd", "ftrunc.vhd", |b| {
            let footer = b[b.len() - 512..].to_vec();
            b.truncate(MIB as usize);
            b.extend_from_slice(&footer);
        }),
        ErrorKind::Corrupt,
        &["footer", "truncated"],
    );
    // Reads outside the disk and writes to read-only images are refused, not panics.
    let mut img = open(d, "d.vhd", OpenMode::ReadOnly).unwrap();
    let size = img.info().unwrap().size;
    let mut buf = vec![0u8; 1024];
    assert_eq!(
        img.read(size - 512, &mut buf).unwrap_err().kind,
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        img.read(100, &mut buf[..512]).unwrap_err().kind,
        ErrorKind::InvalidArgument
    );
    assert!(img.write(0, &buf).is_err());
}

#[test]
fn random_damage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "force_size=on",
            d.join("d.vhd").to_str().unwrap(),
            "6M",
        ],
    );
    qemu_io(d, "d.vhd", &["write -P 0x22 1M 3M".to_owned()]);
    let seed = std::fs::read(d.join("d.vhd")).unwrap();
    let mut rng = Rng(0x5eed_0006);
    for round in 0..400 {
        let mut b = seed.clone();
        for _ in 0..1 + rng.below(4) {
            // Mostly the metadata at the start, sometimes anywhere.
            let at = if rng.below(4) == 0 {
                rng.below(b.len() as u64)
            } else {
                rng.below(2048)
            } as usize;
            b[at] = rng.next() as u8;
        }
        if rng.below(2) == 0 {
            fix_checksum(&mut b[..512], 64);
            fix_checksum(&mut b[512..1536], 36);
        }
        if rng.below(8) == 0 {
            b.truncate(rng.below(b.len() as u64) as usize);
        }
        std::fs::write(d.join("x.vhd"), &b).unwrap();
        let Ok(mut img) = open(d, "x.vhd", OpenMode::ReadOnly) else {
            continue;
        };
        let size = img.info().unwrap().size;
        let mut buf = vec![0u8; 256 << 10];
        let mut pos = 0;
        while pos < size.min(8 * MIB) {
            let n = (size - pos).min(buf.len() as u64) as usize;
            let _ = img.read(pos, &mut buf[..n]);
            pos += n as u64;
        }
        let _ = img.map(0, size);
        let _ = round;
    }
}
