//! The vmdk reader and writer checked against qemu-img and qemu-io.

use std::path::Path;
use std::process::Command;

use haven_image::{
    Backend, CreateOptions, ErrorKind, ExtentState, Format, Image, OpenMode, Options, StdBackend,
};
use haven_vmdk::Vmdk;

const MIB: u64 = 1 << 20;
const GRAIN: u64 = 64 << 10;

fn run(cmd: &str, args: &[&str], dir: &Path) -> std::process::Output {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run qemu tool");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn qemu_img(dir: &Path, args: &[&str]) -> String {
    String::from_utf8(run("qemu-img", args, dir).stdout).unwrap()
}

/// Runs qemu-io commands on a vmdk image.
fn qemu_io(dir: &Path, file: &str, cmds: &[String]) {
    let mut args = vec!["-f".to_owned(), "vmdk".to_owned()];
    for c in cmds {
        args.push("-c".to_owned());
        args.push(c.clone());
    }
    args.push(file.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &args, dir);
}

/// Random qemu-io commands within `size` bytes: pattern writes (sector-aligned, not
/// grain-aligned), zero writes and discards.
fn random_commands(rng: &mut fastrand::Rng, size: u64, count: usize) -> Vec<String> {
    let mut cmds = Vec::new();
    for i in 0..count {
        let len = rng.u64(1..=(3 * GRAIN / 512)) * 512;
        let off = rng.u64(0..(size - len) / 512) * 512;
        let cmd = match i % 6 {
            4 => format!("write -z {off} {len}"),
            5 => format!("discard {off} {len}"),
            _ => format!("write -P {} {off} {len}", rng.u8(1..=255)),
        };
        cmds.push(cmd);
    }
    cmds
}

fn open(dir: &Path, file: &str, mode: OpenMode) -> Box<dyn Image> {
    Vmdk::open(&StdBackend::new(dir), file, mode, &Options::default()).unwrap()
}

/// Compares the whole disk with a raw file: data ranges of our map byte for byte, zero ranges
/// by checking that the raw file holds only zeros there and that we read zeros.
fn assert_same_as_raw(img: &mut dyn Image, raw: &Path) {
    use std::os::unix::fs::FileExt;
    let info = img.info().unwrap();
    let file = std::fs::File::open(raw).unwrap();
    assert_eq!(
        file.metadata().unwrap().len(),
        info.size,
        "size of {}",
        raw.display()
    );
    let map = img.map(0, info.size).unwrap();
    let mut expect_off = 0;
    for m in &map {
        assert_eq!(m.offset, expect_off, "map has a gap");
        expect_off += m.length;
    }
    assert_eq!(expect_off, info.size, "map covers the disk");
    let chunk = 4 * MIB;
    for m in map {
        match m.state {
            ExtentState::Data => {
                let mut off = m.offset;
                while off < m.offset + m.length {
                    let n = chunk.min(m.offset + m.length - off) as usize;
                    let mut ours = vec![0u8; n];
                    let mut theirs = vec![0u8; n];
                    img.read(off, &mut ours).unwrap();
                    file.read_exact_at(&mut theirs, off).unwrap();
                    if ours != theirs {
                        let at = ours.iter().zip(&theirs).position(|(a, b)| a != b).unwrap();
                        panic!("data differs at disk offset {:#x}", off + at as u64);
                    }
                    off += n as u64;
                }
            }
            ExtentState::Zero => {
                for x in haven_image::std_backend::data_extents(&file, m.offset, m.length).unwrap()
                {
                    let mut off = x.offset;
                    while off < x.offset + x.length {
                        let n = chunk.min(x.offset + x.length - off) as usize;
                        let mut theirs = vec![0u8; n];
                        file.read_exact_at(&mut theirs, off).unwrap();
                        assert!(
                            haven_image::is_zero(&theirs),
                            "map says zero at {off:#x} but qemu has data"
                        );
                        let mut ours = vec![1u8; n];
                        img.read(off, &mut ours).unwrap();
                        assert!(haven_image::is_zero(&ours), "map says zero at {off:#x}");
                        off += n as u64;
                    }
                }
                // The map's zero ranges read as zeros (ends of each range).
                for off in [m.offset, m.offset + m.length - 512.min(m.length)] {
                    let n = (64 << 10).min(m.offset + m.length - off) as usize;
                    let mut ours = vec![1u8; n];
                    img.read(off, &mut ours).unwrap();
                    assert!(haven_image::is_zero(&ours), "map says zero at {off:#x}");
                }
            }
        }
    }
}

fn to_raw(dir: &Path, file: &str, raw: &str) {
    let _ = std::fs::remove_file(dir.join(raw));
    qemu_img(dir, &["convert", "-f", "vmdk", "-O", "raw", file, raw]);
}

#[test]
fn reads_what_qemu_writes_in_every_subformat() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = fastrand::Rng::with_seed(0x5eed_0001);
    let cases: [(&str, u64); 4] = [
        ("monolithicSparse", 64 * MIB),
        ("monolithicFlat", 64 * MIB),
        ("twoGbMaxExtentSparse", 5 << 30),
        ("twoGbMaxExtentFlat", 5 << 30),
    ];
    for (sub, size) in cases {
        let file = format!("{sub}.vmdk");
        qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                &file,
                &size.to_string(),
            ],
        );
        let mut cmds = random_commands(&mut rng, size, 60);
        // Across the 2 GiB extent boundary, and the very end.
        if size > 2 << 30 {
            cmds.push(format!(
                "write -P 0x5a {} {}",
                (2u64 << 30) - 3 * 512,
                8 * 512
            ));
        }
        cmds.push(format!("write -P 0xa5 {} 4096", size - 4096));
        qemu_io(d, &file, &cmds);
        to_raw(d, &file, "expect.raw");
        let mut img = open(d, &file, OpenMode::ReadOnly);
        let info = img.info().unwrap();
        assert_eq!(info.subformat, sub);
        assert_eq!(info.size, size);
        assert_eq!(info.files[0], file);
        if sub.starts_with("twoGb") {
            assert_eq!(info.files.len(), 4, "{:?}", info.files);
        }
        assert_eq!(
            Vmdk::probe(&StdBackend::new(d), &file).unwrap().as_deref(),
            Some(sub)
        );
        assert_same_as_raw(img.as_mut(), &d.join("expect.raw"));

        // The same image as qemu's streamOptimized.
        if size == 64 * MIB && sub == "monolithicSparse" {
            qemu_img(
                d,
                &[
                    "convert",
                    "-f",
                    "vmdk",
                    "-O",
                    "vmdk",
                    "-o",
                    "subformat=streamOptimized",
                    &file,
                    "stream.vmdk",
                ],
            );
            let mut s = open(d, "stream.vmdk", OpenMode::ReadOnly);
            assert_eq!(s.info().unwrap().subformat, "streamOptimized");
            assert_same_as_raw(s.as_mut(), &d.join("expect.raw"));
        }
    }
}

#[test]
fn reads_zero_grains_and_parent_chains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = fastrand::Rng::with_seed(0x5eed_0002);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            "base.vmdk",
            "32M",
        ],
    );
    qemu_io(d, "base.vmdk", &random_commands(&mut rng, 32 * MIB, 40));
    qemu_io(d, "base.vmdk", &["write -P 0x77 0 4M".to_owned()]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            "child.vmdk",
            "48M",
        ],
    );
    let mut cmds = random_commands(&mut rng, 48 * MIB, 40);
    cmds.push("write -z 1M 256k".to_owned()); // zero grains over parent data
    cmds.push("write -P 0x33 2M 1536".to_owned()); // partial grain over parent data
    qemu_io(d, "child.vmdk", &cmds);
    for file in ["base.vmdk", "child.vmdk"] {
        to_raw(d, file, "expect.raw");
        let mut img = open(d, file, OpenMode::ReadOnly);
        assert_same_as_raw(img.as_mut(), &d.join("expect.raw"));
    }
    // Writing the child through Haven keeps reading the parent for the rest of the grain.
    let mut img = open(d, "child.vmdk", OpenMode::ReadWrite);
    img.write(3 * MIB + 512, &[0xee; 1024]).unwrap();
    img.write_zeroes(GRAIN * 10, GRAIN, true).unwrap();
    img.close().unwrap();
    drop(img);
    qemu_img(d, &["check", "-f", "vmdk", "child.vmdk"]);
    qemu_io(d, "base.vmdk", &[]);
    to_raw(d, "child.vmdk", "expect.raw");
    let mut img = open(d, "child.vmdk", OpenMode::ReadOnly);
    assert_same_as_raw(img.as_mut(), &d.join("expect.raw"));
    let mut b = vec![0u8; 2048];
    img.read(3 * MIB, &mut b).unwrap();
    assert!(b[..512].iter().all(|&x| x == 0x77) && b[512..1536].iter().all(|&x| x == 0xee));
}

/// Applies random writes, zero writes and discards to an image and to a model.
fn random_workload(img: &mut dyn Image, model: &mut [u8], rng: &mut fastrand::Rng, untouched: u64) {
    let size = model.len() as u64 - untouched;
    for i in 0..120 {
        let len = match i % 3 {
            0 => rng.u64(1..=8) * 512,
            1 => rng.u64(1..=(4 * GRAIN / 512)) * 512,
            _ => rng.u64(1..=16) * GRAIN,
        };
        let off = if i % 4 == 0 {
            rng.u64(0..(size - len) / GRAIN) * GRAIN
        } else {
            rng.u64(0..(size - len) / 512) * 512
        };
        let r = off as usize..(off + len) as usize;
        match i % 7 {
            5 => {
                img.write_zeroes(off, len, i % 2 == 0).unwrap();
                model[r].fill(0);
            }
            6 if i % 2 == 0 => {
                // An all-zero data write.
                img.write(off, &vec![0; len as usize]).unwrap();
                model[r].fill(0);
            }
            _ => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                // Some repetition so it compresses like a real disk.
                for c in data.chunks_mut(4096).step_by(2) {
                    c.fill(i as u8);
                }
                img.write(off, &data).unwrap();
                model[r].copy_from_slice(&data);
            }
        }
        if i == 60 {
            img.flush().unwrap();
        }
    }
}

fn create(d: &Path, file: &str, size: u64, opts: &str) -> Box<dyn Image> {
    let options = CreateOptions {
        size,
        sector_size: 512,
        options: Options::parse(opts).unwrap(),
    };
    Vmdk::create(&StdBackend::new(d), file, &options).unwrap()
}

#[test]
fn writes_images_qemu_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 48 * MIB + 7 * 512; // not a whole number of grains
    let untouched = 8 * MIB;
    for (n, sub) in ["monolithicSparse", "monolithicFlat", "streamOptimized"]
        .iter()
        .enumerate()
    {
        let mut rng = fastrand::Rng::with_seed(0x5eed_0100 + n as u64);
        let file = format!("out-{sub}.vmdk");
        let mut img = create(
            d,
            &file,
            size,
            &format!("subformat={sub},adapter_type=lsilogic"),
        );
        let mut model = vec![0u8; size as usize];
        random_workload(img.as_mut(), &mut model, &mut rng, untouched);
        // Read back before close (streams read pending and compressed grains).
        let mut back = vec![0u8; size as usize];
        img.read(0, &mut back).unwrap();
        assert!(back == model, "{sub}: read-back before close differs");
        img.close().unwrap();
        let info = img.info().unwrap();
        assert_eq!(info.subformat, *sub);
        drop(img);

        std::fs::write(d.join("model.raw"), &model).unwrap();
        if *sub != "monolithicFlat" {
            qemu_img(d, &["check", "-f", "vmdk", &file]);
        }
        let out = qemu_img(d, &["info", "-f", "vmdk", &file]);
        assert!(
            out.contains(&format!("virtual size: {}", "48 MiB")),
            "{out}"
        );
        qemu_img(
            d,
            &["compare", "-f", "raw", "-F", "vmdk", "model.raw", &file],
        );

        // The never-written tail is unallocated.
        let map = qemu_img(d, &["map", "--output=json", "-f", "vmdk", &file]);
        let tail = size - untouched;
        for line in map
            .lines()
            .filter(|l| l.contains("\"data\": true") && l.contains("\"zero\": false"))
        {
            let start: u64 = field(line, "\"start\": ");
            let length: u64 = field(line, "\"length\": ");
            assert!(
                start + length <= tail,
                "{sub}: qemu maps data in the untouched tail: {line}"
            );
        }

        // And Haven reads back what it wrote.
        let mut img = open(d, &file, OpenMode::ReadOnly);
        assert_same_as_raw(img.as_mut(), &d.join("model.raw"));
        let m = img.map(tail, untouched).unwrap();
        assert!(
            m.iter().all(|e| e.state == ExtentState::Zero),
            "{sub}: {m:?}"
        );
        if *sub == "streamOptimized" {
            assert!(matches!(
                Vmdk::open(&StdBackend::new(d), &file, OpenMode::ReadWrite, &Options::default()),
                Err(e) if e.kind == ErrorKind::Unsupported
            ));
        }
    }
}

fn field(line: &str, key: &str) -> u64 {
    let at = line.find(key).unwrap() + key.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn modifies_qemu_images_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = fastrand::Rng::with_seed(0x5eed_0200);
    for sub in ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat"] {
        let file = format!("m-{sub}.vmdk");
        let size = 40 * MIB;
        qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                &file,
                &size.to_string(),
            ],
        );
        qemu_io(d, &file, &random_commands(&mut rng, size, 20));
        to_raw(d, &file, "model.raw");
        let mut model = std::fs::read(d.join("model.raw")).unwrap();
        let mut img = open(d, &file, OpenMode::ReadWrite);
        random_workload(img.as_mut(), &mut model, &mut rng, 0);
        img.close().unwrap();
        drop(img);
        std::fs::write(d.join("model.raw"), &model).unwrap();
        qemu_img(d, &["check", "-f", "vmdk", &file]);
        qemu_img(
            d,
            &["compare", "-f", "raw", "-F", "vmdk", "model.raw", &file],
        );
    }
}

#[test]
fn stream_writes_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 16 * MIB;
    let mut img = create(d, "s.vmdk", size, "subformat=streamOptimized");
    let mut model = vec![0u8; size as usize];
    // Backwards, in pieces smaller than a grain, then rewriting compressed grains.
    let mut rng = fastrand::Rng::with_seed(7);
    let mut off = size;
    while off > 0 {
        let len = (rng.u64(1..=300) * 512).min(off);
        off -= len;
        let data = vec![(off / 512) as u8 | 1; len as usize];
        img.write(off, &data).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    img.flush().unwrap();
    img.write(GRAIN + 512, &[9; 512]).unwrap();
    model[GRAIN as usize + 512..GRAIN as usize + 1024].fill(9);
    img.write_zeroes(4 * GRAIN, 3 * GRAIN, true).unwrap();
    model[4 * GRAIN as usize..7 * GRAIN as usize].fill(0);
    img.close().unwrap();
    assert_eq!(
        img.write(0, &[0; 512]).unwrap_err().kind,
        ErrorKind::InvalidArgument
    );
    drop(img);
    std::fs::write(d.join("model.raw"), &model).unwrap();
    qemu_img(d, &["check", "-f", "vmdk", "s.vmdk"]);
    qemu_img(
        d,
        &["compare", "-f", "raw", "-F", "vmdk", "model.raw", "s.vmdk"],
    );
    let mut img = open(d, "s.vmdk", OpenMode::ReadOnly);
    assert_same_as_raw(img.as_mut(), &d.join("model.raw"));
}

#[test]
fn refuses_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = StdBackend::new(d);
    let opts = |o: &str, size: u64| CreateOptions {
        size,
        sector_size: 512,
        options: Options::parse(o).unwrap(),
    };
    let e = Vmdk::create(&b, "a.vmdk", &opts("subformat=vmfs", MIB))
        .err()
        .unwrap();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("subformat"), "{e}");
    let e = Vmdk::create(&b, "a.vmdk", &opts("colour=red", MIB))
        .err()
        .unwrap();
    assert!(e.message.contains("colour"), "{e}");
    let e = Vmdk::create(&b, "a.vmdk", &opts("", 1000)).err().unwrap();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    let mut img = create(d, "a.vmdk", MIB, "");
    assert_eq!(
        img.write(100, &[0; 512]).unwrap_err().kind,
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        img.write(MIB, &[0; 512]).unwrap_err().kind,
        ErrorKind::InvalidArgument
    );
    img.close().unwrap();
    drop(img);
    let e = Vmdk::create(&b, "a.vmdk", &opts("", MIB)).err().unwrap();
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    let mut ro = open(d, "a.vmdk", OpenMode::ReadOnly);
    assert_eq!(
        ro.write(0, &[0; 512]).unwrap_err().kind,
        ErrorKind::InvalidArgument
    );
}

// ---- hostile input ----

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn open_err(d: &Path, file: &str) -> haven_image::Error {
    match Vmdk::open(
        &StdBackend::new(d),
        file,
        OpenMode::ReadOnly,
        &Options::default(),
    ) {
        Ok(_) => panic!("{file} opened"),
        Err(e) => e,
    }
}

/// Opens, reads everything and maps; returns the first error. Never panics.
fn exercise(d: &Path, file: &str) -> Result<(), haven_image::Error> {
    let mut img = Vmdk::open(
        &StdBackend::new(d),
        file,
        OpenMode::ReadOnly,
        &Options::default(),
    )?;
    let size = img.info()?.size;
    img.map(0, size)?;
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size.min(64 * MIB) {
        let n = MIB.min(size - off);
        img.read(off, &mut buf[..n as usize])?;
        off += n;
    }
    Ok(())
}

fn sparse_fixture(d: &Path, name: &str) {
    qemu_img(d, &["create", "-q", "-f", "vmdk", name, "8M"]);
    qemu_io(
        d,
        name,
        &[
            "write -P 0x42 0 1M".to_owned(),
            "write -P 0x43 5M 64k".to_owned(),
        ],
    );
}

#[test]
fn hostile_sparse_images_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let copy = |name: &str| {
        std::fs::copy(d.join("good.vmdk"), d.join(name)).unwrap();
        d.join(name)
    };
    sparse_fixture(d, "good.vmdk");
    exercise(d, "good.vmdk").unwrap();
    // Header fields: gd at 56, rgd at 48, capacity at 12, grain at 20.
    let gd = {
        let b = std::fs::read(d.join("good.vmdk")).unwrap();
        u64::from_le_bytes(b[56..64].try_into().unwrap())
    };

    let p = copy("magic.vmdk");
    patch(&p, 0, b"XXXX");
    let e = open_err(d, "magic.vmdk");
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(e.message.contains("not a vmdk"), "{e}");

    let p = copy("trunc.vmdk");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(70_000)
        .unwrap();
    let e = open_err(d, "trunc.vmdk");
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(e.message.contains("grain table"), "{e}");

    let p = copy("gde.vmdk");
    patch(&p, gd * 512, &0x00ff_ffffu32.to_le_bytes());
    let e = open_err(d, "gde.vmdk");
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(
        e.message.contains("grain directory") && e.message.contains("past the end"),
        "{e}"
    );

    let p = copy("gdoff.vmdk");
    patch(&p, 56, &u64::MAX.wrapping_sub(5).to_le_bytes());
    let e = open_err(d, "gdoff.vmdk");
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(e.message.contains("grain directory"), "{e}");

    let p = copy("gte.vmdk");
    let gt0 = {
        let b = std::fs::read(&p).unwrap();
        u64::from(u32::from_le_bytes(
            b[(gd * 512) as usize..(gd * 512 + 4) as usize]
                .try_into()
                .unwrap(),
        ))
    };
    patch(&p, gt0 * 512 + 8, &0x7fff_fff0u32.to_le_bytes());
    let e = open_err(d, "gte.vmdk");
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(e.message.contains("grain table"), "{e}");

    let p = copy("cap.vmdk");
    patch(&p, 12, &(1u64 << 60).to_le_bytes());
    let e = open_err(d, "cap.vmdk");
    assert_eq!(e.kind, ErrorKind::Limit, "{e}");

    let p = copy("cap2.vmdk");
    patch(&p, 12, &(60u64 << 31).to_le_bytes()); // 60 TiB: tables too large for memory
    patch(&p, 20, &8u64.to_le_bytes());
    let e = open_err(d, "cap2.vmdk");
    assert_eq!(e.kind, ErrorKind::Limit, "{e}");
    assert!(e.message.contains("grain tables"), "{e}");

    let p = copy("grain.vmdk");
    patch(&p, 20, &0u64.to_le_bytes());
    let e = open_err(d, "grain.vmdk");
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(e.message.contains("grain"), "{e}");

    let p = copy("version.vmdk");
    patch(&p, 4, &9u32.to_le_bytes());
    assert_eq!(open_err(d, "version.vmdk").kind, ErrorKind::Unsupported);

    // Random damage anywhere in the metadata: errors or data, never a panic.
    let good = std::fs::read(d.join("good.vmdk")).unwrap();
    let meta_end = 64 << 10;
    let mut rng = fastrand::Rng::with_seed(0x5eed_0300);
    for round in 0..300 {
        let mut bad = good.clone();
        for _ in 0..rng.usize(1..8) {
            let at = if round % 2 == 0 {
                rng.usize(0..80)
            } else {
                rng.usize(0..meta_end)
            };
            bad[at] = rng.u8(..);
        }
        std::fs::write(d.join("fuzz.vmdk"), &bad).unwrap();
        let _ = exercise(d, "fuzz.vmdk");
    }
}

#[test]
fn hostile_streams_and_descriptors_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A Haven stream (grain directory in the footer).
    let mut img = create(d, "s.vmdk", 4 * MIB, "subformat=streamOptimized");
    img.write(0, &vec![0x61; 3 * GRAIN as usize]).unwrap();
    img.close().unwrap();
    drop(img);
    exercise(d, "s.vmdk").unwrap();
    let good = std::fs::read(d.join("s.vmdk")).unwrap();

    // Truncated: the footer is gone.
    std::fs::write(d.join("t.vmdk"), &good[..good.len() - 1024]).unwrap();
    let e = open_err(d, "t.vmdk");
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(
        e.message.contains("footer") || e.message.contains("sparse extent header"),
        "{e}"
    );

    // Damaged compressed data of the first grain (its record starts at 64 KiB).
    let mut bad = good.clone();
    bad[(64 << 10) + 12..(64 << 10) + 40].fill(0xff);
    std::fs::write(d.join("z.vmdk"), &bad).unwrap();
    let e = exercise(d, "z.vmdk").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(e.message.contains("compressed grain"), "{e}");

    // A grain marker with an absurd size.
    let mut bad = good.clone();
    bad[(64 << 10) + 8..(64 << 10) + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(d.join("m.vmdk"), &bad).unwrap();
    let e = exercise(d, "m.vmdk").unwrap_err();
    assert!(e.message.contains("grain marker"), "{e}");

    let mut rng = fastrand::Rng::with_seed(0x5eed_0400);
    for _ in 0..300 {
        let mut bad = good.clone();
        for _ in 0..rng.usize(1..6) {
            let at = match rng.u8(0..3) {
                0 => rng.usize(0..80),
                1 => rng.usize(good.len() - 4096..good.len()),
                _ => rng.usize(0..good.len()),
            };
            bad[at] = rng.u8(..);
        }
        std::fs::write(d.join("f.vmdk"), &bad).unwrap();
        let _ = exercise(d, "f.vmdk");
    }

    // Descriptors.
    let desc = |name: &str, text: &str| std::fs::write(d.join(name), text).unwrap();
    let head = "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n";
    desc(
        "noext.vmdk",
        &format!("{head}createType=\"monolithicFlat\"\n"),
    );
    assert!(open_err(d, "noext.vmdk").message.contains("no extents"));
    desc(
        "missing.vmdk",
        &format!("{head}createType=\"monolithicFlat\"\nRW 2048 FLAT \"nope.vmdk\" 0\n"),
    );
    assert_eq!(open_err(d, "missing.vmdk").kind, ErrorKind::NotFound);
    std::fs::write(d.join("short-flat.vmdk"), vec![0u8; 4096]).unwrap();
    desc(
        "short.vmdk",
        &format!("{head}createType=\"monolithicFlat\"\nRW 2048 FLAT \"short-flat.vmdk\" 0\n"),
    );
    let e = open_err(d, "short.vmdk");
    assert!(
        e.message.contains("flat extent") && e.message.contains("truncated"),
        "{e}"
    );
    desc(
        "badline.vmdk",
        &format!("{head}createType=\"monolithicFlat\"\nRW lots FLAT \"x\" 0\n"),
    );
    let e = open_err(d, "badline.vmdk");
    assert_eq!(e.kind, ErrorKind::Corrupt);
    assert!(e.message.contains("descriptor line"), "{e}");
    desc(
        "huge.vmdk",
        &format!("{head}createType=\"monolithicFlat\"\nRW 99999999999999999 ZERO\n"),
    );
    assert_eq!(open_err(d, "huge.vmdk").kind, ErrorKind::Limit);
    desc(
        "zero.vmdk",
        &format!("{head}createType=\"custom\"\nRW 2048 ZERO\n"),
    );
    exercise(d, "zero.vmdk").unwrap();
    let mut many = format!("{head}createType=\"custom\"\n");
    for _ in 0..5000 {
        many += "RW 1 ZERO\n";
    }
    desc("many.vmdk", &many);
    assert_eq!(open_err(d, "many.vmdk").kind, ErrorKind::Limit);
    std::fs::write(d.join("big.vmdk"), vec![b'#'; 2 << 20]).unwrap();
    patch(&d.join("big.vmdk"), 0, b"# Disk DescriptorFile\n");
    assert_eq!(open_err(d, "big.vmdk").kind, ErrorKind::Limit);
}

#[test]
fn parent_loops_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "vmdk", "b.vmdk", "4M"]);
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "vmdk", "-b", "b.vmdk", "-F", "vmdk", "c.vmdk", "4M",
        ],
    );
    exercise(d, "c.vmdk").unwrap();
    // Point the child's embedded descriptor at itself.
    let mut b = std::fs::read(d.join("c.vmdk")).unwrap();
    let text = b"parentFileNameHint=\"b.vmdk\"";
    let at = b.windows(text.len()).position(|w| w == text).unwrap();
    b[at..at + text.len()].copy_from_slice(b"parentFileNameHint=\"c.vmdk\"");
    std::fs::write(d.join("c.vmdk"), &b).unwrap();
    let e = open_err(d, "c.vmdk");
    assert_eq!(e.kind, ErrorKind::Limit);
    assert!(e.message.contains("parent chain"), "{e}");
    // A missing parent is named.
    b[at..at + text.len()].copy_from_slice(b"parentFileNameHint=\"x.vmdk\"");
    std::fs::write(d.join("c.vmdk"), &b).unwrap();
    let e = open_err(d, "c.vmdk");
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("x.vmdk"), "{e}");
    assert!(StdBackend::new(d).exists("b.vmdk").unwrap());
}

#[test]
fn fuzz_seeds_open() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for entry in std::fs::read_dir(&seeds).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(
            std::fs::metadata(&p).unwrap().len() <= 64 << 10,
            "{name} is too big for a seed"
        );
        std::fs::copy(&p, dir.path().join(&name)).unwrap();
        n += 1;
    }
    // The flat descriptor's extent file is not a seed: make it.
    std::fs::write(dir.path().join("f-flat.vmdk"), vec![0u8; 1 << 20]).unwrap();
    assert!(n >= 2);
    exercise(dir.path(), "monolithic-sparse-empty.vmdk").unwrap();
    exercise(dir.path(), "descriptor-flat.vmdk").unwrap();
}
