//! VHDX reader and writer checked against qemu-img / qemu-io.

mod common;

use std::path::Path;

use common::*;
use haven_image::{
    CreateOptions, ErrorKind, ExtentState, Format, Image, OpenMode, Options, StdBackend,
};
use haven_vhdx::Vhdx;

const MIB: u64 = 1 << 20;

/// A log descriptor to write: signature, file offset, data sector (data descriptors) and zero
/// length (zero descriptors).
type Desc<'a> = (&'a [u8; 4], u64, Option<&'a [u8]>, u64);

fn create(dir: &Path, name: &str, size: u64, opts: &str) -> Box<dyn Image> {
    Vhdx::create(
        &StdBackend::new(dir),
        name,
        &CreateOptions {
            size,
            sector_size: 512,
            options: Options::parse(opts).unwrap(),
        },
    )
    .unwrap()
}

fn check_reader_matches_qemu(subformat: &str, block_size: &str, seed: u64) {
    eprintln!("seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.vhdx");
    let size = 48 * MIB;
    let mut o = format!("subformat={subformat}");
    if !block_size.is_empty() {
        o.push_str(&format!(",block_size={block_size}"));
    }
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            &o,
            &path.display().to_string(),
            "48M",
        ],
    );
    let mut rng = Rng(seed);
    qemu_io(&path, &random_qemu_cmds(&mut rng, size, 60));
    let expected = qemu_raw(&path, "vhdx");
    let mut img = open(dir.path(), "q.vhdx", OpenMode::ReadOnly).unwrap();
    let info = img.info().unwrap();
    assert_eq!(info.size, size);
    assert_eq!(info.subformat, subformat);
    assert_eq!(info.files, vec!["q.vhdx".to_owned()]);
    let got = read_all(img.as_mut());
    assert!(
        got == expected,
        "reader differs from qemu-img convert (seed {seed})"
    );
    check_map(img.as_mut(), &got);
}

/// Every Zero entry of the map reads as zeros, and the map covers the disk in order.
fn check_map(img: &mut dyn Image, data: &[u8]) {
    let map = img.map(0, data.len() as u64).unwrap();
    let mut pos = 0;
    for e in &map {
        assert_eq!(e.offset, pos);
        if e.state == ExtentState::Zero {
            let r = &data[e.offset as usize..(e.offset + e.length) as usize];
            assert!(
                r.iter().all(|&b| b == 0),
                "map says zero at {:#x}",
                e.offset
            );
        }
        pos += e.length;
    }
    assert_eq!(pos, data.len() as u64);
}

#[test]
fn reads_qemu_dynamic() {
    check_reader_matches_qemu("dynamic", "", 1);
}

#[test]
fn reads_qemu_dynamic_1m_blocks() {
    check_reader_matches_qemu("dynamic", "1M", 2);
}

#[test]
fn reads_qemu_fixed() {
    check_reader_matches_qemu("fixed", "", 3);
}

/// 256 MiB blocks give a chunk ratio of 16, so payload entries past the first chunk sit behind
/// an interleaved sector bitmap entry.
#[test]
fn reads_qemu_past_the_first_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.vhdx");
    let p = path.display().to_string();
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=256M",
            &p,
            "4864M",
        ],
    );
    let offs = [
        15 * 256 * MIB + 4096,
        16 * 256 * MIB + 512,
        18 * 256 * MIB - 65536,
    ];
    let cmds: Vec<String> = offs
        .iter()
        .enumerate()
        .map(|(i, o)| format!("write -P {} {o} 65536", 0x41 + i))
        .collect();
    qemu_io(&path, &cmds);
    let mut img = open(dir.path(), "big.vhdx", OpenMode::ReadOnly).unwrap();
    for (i, &o) in offs.iter().enumerate() {
        let mut buf = vec![0u8; 4 * 65536];
        img.read(o - 65536, &mut buf).unwrap();
        assert!(buf[..65536].iter().all(|&b| b == 0));
        assert!(
            buf[65536..131072].iter().all(|&b| b == 0x41 + i as u8),
            "block at {o:#x}"
        );
        assert!(buf[131072..].iter().all(|&b| b == 0));
    }
    let map = img.map(0, 4864 * MIB).unwrap();
    let data: u64 = map
        .iter()
        .filter(|e| e.state == ExtentState::Data)
        .map(|e| e.length)
        .sum();
    assert_eq!(data, 3 * 256 * MIB);
}

/// Applies the same random writes, zero writes and discards to a new image and to a raw
/// buffer, then checks the image with qemu-img.
fn check_writer(subformat: &str, opts: &str, seed: u64) {
    eprintln!("seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let size = 40 * MIB + 7 * 512;
    let mut img = create(dir.path(), "w.vhdx", size, opts);
    let mut raw = vec![0u8; size as usize];
    let mut rng = Rng(seed);
    let mut touched = vec![false; size.div_ceil(MIB) as usize];
    // Leave [32 MiB, 40 MiB) untouched to check it stays unallocated.
    let limit = 32 * MIB;
    for i in 0..80 {
        let len = (1 + rng.below(if i % 10 == 0 { 20000 } else { 700 })) * 512;
        let off = rng.below((limit - len) / 512) * 512;
        for m in off / MIB..=(off + len - 1) / MIB {
            touched[m as usize] = true;
        }
        match i % 6 {
            4 => {
                img.write_zeroes(off, len, i % 12 == 4).unwrap();
                raw[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let v = (1 + rng.below(250)) as u8;
                let data = vec![v; len as usize];
                img.write(off, &data).unwrap();
                raw[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        if i == 40 {
            img.flush().unwrap();
        }
    }
    // A whole-block discard and a tail write that is not block-aligned.
    img.write_zeroes(8 * MIB, 8 * MIB, true).unwrap();
    raw[(8 * MIB) as usize..(16 * MIB) as usize].fill(0);
    let tail = vec![0x5a; 7 * 512];
    img.write(40 * MIB, &tail).unwrap();
    raw[(40 * MIB) as usize..].copy_from_slice(&tail);
    assert_eq!(read_all(img.as_mut()), raw);
    img.close().unwrap();
    drop(img);

    let path = dir.path().join("w.vhdx");
    let rawpath = dir.path().join("w.raw");
    std::fs::write(&rawpath, &raw).unwrap();
    let p = path.display().to_string();
    ok("qemu-img", &["check", "-f", "vhdx", &p]);
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "vhdx",
            &rawpath.display().to_string(),
            &p,
        ],
    );
    let info = ok("qemu-img", &["info", "-f", "vhdx", &p]);
    assert!(info.contains("file format: vhdx"), "{info}");

    let mut img = open(dir.path(), "w.vhdx", OpenMode::ReadOnly).unwrap();
    assert_eq!(img.info().unwrap().subformat, subformat);
    let got = read_all(img.as_mut());
    assert!(got == raw);
    check_map(img.as_mut(), &got);
    if subformat == "dynamic" {
        let map = img.map(32 * MIB, 8 * MIB).unwrap();
        assert_eq!(map.len(), 1, "{map:?}");
        assert_eq!(map[0].state, ExtentState::Zero);
        // The discarded block is no longer allocated.
        let map = img.map(8 * MIB, 8 * MIB).unwrap();
        assert_eq!(map[0].state, ExtentState::Zero);
    }
}

#[test]
fn writes_dynamic() {
    check_writer("dynamic", "", 11);
}

#[test]
fn writes_dynamic_1m_blocks() {
    check_writer("dynamic", "subformat=dynamic,block_size=1M", 12);
}

#[test]
fn writes_fixed() {
    check_writer("fixed", "subformat=fixed", 13);
}

#[test]
fn create_options() {
    let dir = tempfile::tempdir().unwrap();
    let b = StdBackend::new(dir.path());
    let mk = |name: &str, opts: &str| {
        Vhdx::create(
            &b,
            name,
            &CreateOptions {
                size: 64 * MIB,
                sector_size: 512,
                options: Options::parse(opts).unwrap(),
            },
        )
    };
    assert_eq!(
        mk("a", "colour=red").err().unwrap().kind,
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        mk("b", "subformat=stream").err().unwrap().kind,
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        mk("c", "block_size=3M").err().unwrap().kind,
        ErrorKind::InvalidArgument
    );
    assert!(!dir.path().join("c").exists());
    mk("d.vhdx", "block_size=32M,log_size=2M")
        .unwrap()
        .close()
        .unwrap();
    let info = ok(
        "qemu-img",
        &[
            "info",
            "-f",
            "vhdx",
            &dir.path().join("d.vhdx").display().to_string(),
        ],
    );
    assert!(info.contains("cluster_size: 33554432"), "{info}");
    mk("e.vhdx", "").unwrap().close().unwrap();
    let info = ok(
        "qemu-img",
        &[
            "info",
            "-f",
            "vhdx",
            &dir.path().join("e.vhdx").display().to_string(),
        ],
    );
    assert!(info.contains("cluster_size: 8388608"), "{info}");
    assert_eq!(
        Vhdx::probe(&b, "e.vhdx").unwrap().as_deref(),
        Some("dynamic")
    );
    std::fs::write(dir.path().join("r.raw"), vec![0u8; 4096]).unwrap();
    assert_eq!(Vhdx::probe(&b, "r.raw").unwrap(), None);
}

/// Haven modifies an image qemu made; qemu still agrees.
#[test]
fn modifies_qemu_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.vhdx");
    let p = path.display().to_string();
    ok("qemu-img", &["create", "-q", "-f", "vhdx", &p, "32M"]);
    qemu_io(
        &path,
        &["write -P 0x11 1M 3M".into(), "write -P 0x22 20M 1M".into()],
    );
    let mut img = open(dir.path(), "m.vhdx", OpenMode::ReadWrite).unwrap();
    img.write(2 * MIB, &vec![0x33; 4096]).unwrap();
    img.write(12 * MIB, &vec![0x44; 8192]).unwrap();
    img.write_zeroes(16 * MIB, 8 * MIB, true).unwrap();
    img.close().unwrap();
    drop(img);
    ok("qemu-img", &["check", "-f", "vhdx", &p]);
    let mut raw = vec![0u8; 32 * MIB as usize];
    raw[MIB as usize..4 * MIB as usize].fill(0x11);
    raw[2 * MIB as usize..2 * MIB as usize + 4096].fill(0x33);
    raw[12 * MIB as usize..12 * MIB as usize + 8192].fill(0x44);
    assert!(qemu_raw(&path, "vhdx") == raw);
}

/// A real qemu log: qemu-io's write updates the BAT through the log and then clears the log
/// GUID. Undo the BAT update and restore the log GUID, as if qemu crashed after writing the log:
/// replay must redo it.
#[test]
fn replays_qemu_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.vhdx");
    let p = path.display().to_string();
    ok("qemu-img", &["create", "-q", "-f", "vhdx", &p, "32M"]);
    let (bat, _) = region(&path, &BAT_GUID);
    let before = read_at(&path, bat, 4096);
    qemu_io(&path, &["write -P 0xab 8M 64k".into()]);
    assert_ne!(read_at(&path, bat, 4096), before, "qemu changed the BAT");
    let log_off = le64(&read_at(&path, current_header(&path).0, 80), 72);
    let entry = read_at(&path, log_off, 64);
    assert_eq!(&entry[..4], b"loge");
    let log_guid = entry[32..48].to_vec();
    patch(&path, bat, &before);
    edit_header(&path, |h| h[48..64].copy_from_slice(&log_guid));

    let err = open(dir.path(), "l.vhdx", OpenMode::ReadOnly)
        .err()
        .unwrap();
    assert_eq!(err.kind, ErrorKind::Unsupported);
    assert!(
        err.message.contains("log") && err.message.contains("read-write"),
        "{}",
        err.message
    );

    let mut img = open(dir.path(), "l.vhdx", OpenMode::ReadWrite).unwrap();
    let mut buf = vec![0u8; 65536 + 512];
    img.read(8 * MIB, &mut buf).unwrap();
    assert!(buf[..65536].iter().all(|&b| b == 0xab));
    assert!(buf[65536..].iter().all(|&b| b == 0));
    img.close().unwrap();
    drop(img);
    let h = read_at(&path, current_header(&path).0, 64);
    assert!(h[48..64].iter().all(|&b| b == 0), "log GUID cleared");
    ok("qemu-img", &["check", "-f", "vhdx", &p]);
    open(dir.path(), "l.vhdx", OpenMode::ReadOnly).unwrap();
}

/// Writes a log entry by hand (per the specification) into the log region: a data descriptor
/// that sets a BAT entry and a zero descriptor, in two entries forming one sequence that wraps
/// around the end of the log.
#[test]
fn replays_handmade_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = create(dir.path(), "h.vhdx", 16 * MIB, "block_size=1M");
    img.write(5 * MIB, &vec![0x77; 4096]).unwrap();
    img.close().unwrap();
    drop(img);
    let path = dir.path().join("h.vhdx");
    let (bat, _) = region(&path, &BAT_GUID);
    let hdr = read_at(&path, current_header(&path).0, 80);
    let (log_off, log_len) = (le64(&hdr, 72), u64::from(le32(&hdr, 68)));
    // Block 5's data lives where its BAT entry says; make block 2 point at the same data via the
    // log, and zero a 4 KiB sector of block 5's data through a zero descriptor.
    let bat_page = read_at(&path, bat, 4096);
    let b5 = le64(&bat_page, 5 * 8);
    let mut new_page = bat_page.clone();
    new_page[2 * 8..3 * 8].copy_from_slice(&b5.to_le_bytes());
    let data_off = b5 & !(MIB - 1);
    let guid = [0x5au8; 16];
    let file_len = std::fs::metadata(&path).unwrap().len();

    let entry = |seq: u64, tail: u64, descs: &[Desc<'_>]| -> Vec<u8> {
        let data_count = descs.iter().filter(|d| d.2.is_some()).count();
        let len = 4096 * (1 + data_count);
        let mut e = vec![0u8; len];
        e[..4].copy_from_slice(b"loge");
        e[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        e[12..16].copy_from_slice(&(tail as u32).to_le_bytes());
        e[16..24].copy_from_slice(&seq.to_le_bytes());
        e[24..28].copy_from_slice(&(descs.len() as u32).to_le_bytes());
        e[32..48].copy_from_slice(&guid);
        e[48..56].copy_from_slice(&file_len.to_le_bytes());
        e[56..64].copy_from_slice(&file_len.to_le_bytes());
        let mut ds = 1;
        for (i, (sig, off, data, zlen)) in descs.iter().enumerate() {
            let d = 64 + i * 32;
            e[d..d + 4].copy_from_slice(*sig);
            e[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
            e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
            if let Some(data) = data {
                e[d + 4..d + 8].copy_from_slice(&data[4092..]);
                e[d + 8..d + 16].copy_from_slice(&data[..8]);
                let s = ds * 4096;
                e[s..s + 4].copy_from_slice(b"data");
                e[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                e[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
                e[s + 4092..s + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
                ds += 1;
            } else {
                e[d + 8..d + 16].copy_from_slice(&zlen.to_le_bytes());
            }
        }
        let crc = haven_vhdx::crc32c(&e);
        e[4..8].copy_from_slice(&crc.to_le_bytes());
        e
    };
    // Entry 1 (seq 7) takes the last sector of the log and wraps its data sector to the start;
    // entry 2 (seq 8) follows it, and its tail names entry 1.
    let start1 = log_len - 4096;
    let e1 = entry(7, start1, &[(b"desc", bat, Some(&new_page), 0)]);
    let e2 = entry(8, start1, &[(b"zero", data_off + 4096, None, 4096)]);
    patch(&path, log_off + start1, &e1[..4096]);
    patch(&path, log_off, &e1[4096..]);
    patch(&path, log_off + 4096, &e2);
    edit_header(&path, |h| h[48..64].copy_from_slice(&guid));

    assert_eq!(
        open(dir.path(), "h.vhdx", OpenMode::ReadOnly)
            .err()
            .unwrap()
            .kind,
        ErrorKind::Unsupported
    );
    let mut img = open(dir.path(), "h.vhdx", OpenMode::ReadWrite).unwrap();
    let mut buf = vec![0u8; 8192];
    img.read(2 * MIB, &mut buf).unwrap();
    assert!(
        buf[..4096].iter().all(|&b| b == 0x77),
        "data descriptor applied"
    );
    assert!(
        buf[4096..].iter().all(|&b| b == 0),
        "zero descriptor applied"
    );
    drop(img);

    // The log is empty now: read-only opens work again.
    let mut img = open(dir.path(), "h.vhdx", OpenMode::ReadOnly).unwrap();
    img.read(2 * MIB, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x77));
}

/// Builds a differencing child of `parent` by making a dynamic image with Haven's writer and
/// turning it into a child: has-parent flag, parent locator, a partially present block with
/// its sector bitmap, and a block in the zero state.
fn make_child(dir: &Path, parent: &str, child: &str, relative: &str) {
    let ppath = dir.join(parent);
    let size = le64(
        &read_at(&ppath, metadata_item(&ppath, &DISK_SIZE_GUID).0, 8),
        0,
    );
    let mut img = create(dir, child, size, "block_size=8M");
    img.write(8 * MIB, &vec![0xc1; 8 * MIB as usize]).unwrap();
    img.close().unwrap();
    drop(img);
    let path = dir.join(child);

    let (fp, _) = metadata_item(&path, &FILE_PARAMS_GUID);
    let flags = le32(&read_at(&path, fp + 4, 4), 0) | 2;
    patch(&path, fp + 4, &flags.to_le_bytes());
    // Parent locator item at 128 KiB into the metadata region, in a new table entry.
    let (meta, _) = region(&path, &METADATA_GUID);
    let count = u16::from_le_bytes(read_at(&path, meta + 10, 2).try_into().unwrap());
    let (ph, _) = current_header(&ppath);
    let linkage = guid_text(&read_at(&ppath, ph + 32, 16));
    let pairs = [
        ("parent_linkage", linkage.as_str()),
        ("relative_path", relative),
    ];
    let mut item = vec![0u8; 20 + 12 * pairs.len()];
    item[..16].copy_from_slice(&VHDX_LOCATOR_TYPE);
    item[18..20].copy_from_slice(&(pairs.len() as u16).to_le_bytes());
    for (i, (k, v)) in pairs.iter().enumerate() {
        for (text, slot) in [(k, 0), (v, 4)] {
            let bytes: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
            let at = item.len() as u32;
            item[20 + i * 12 + slot..24 + i * 12 + slot].copy_from_slice(&at.to_le_bytes());
            item[28 + i * 12 + slot / 2..30 + i * 12 + slot / 2]
                .copy_from_slice(&(bytes.len() as u16).to_le_bytes());
            item.extend_from_slice(&bytes);
        }
    }
    let mut e = [0u8; 32];
    e[..16].copy_from_slice(&PARENT_LOCATOR_GUID);
    e[16..20].copy_from_slice(&(128u32 * 1024).to_le_bytes());
    e[20..24].copy_from_slice(&(item.len() as u32).to_le_bytes());
    e[24..28].copy_from_slice(&4u32.to_le_bytes());
    patch(&path, meta + 32 + u64::from(count) * 32, &e);
    patch(&path, meta + 10, &(count + 1).to_le_bytes());
    patch(&path, meta + 128 * 1024, &item);

    // Block 2: partially present; block 3: zero state; chunk 0's sector bitmap present.
    let (bat, _) = region(&path, &BAT_GUID);
    let end = std::fs::metadata(&path)
        .unwrap()
        .len()
        .next_multiple_of(MIB);
    let block2 = end;
    let bitmap = end + 8 * MIB;
    patch(&path, block2, &vec![0xc2; 8 * MIB as usize]);
    let mut bits = vec![0u8; MIB as usize];
    let present = child_present;
    for s in 0..16384u64 {
        if present(s) {
            let abs = 2 * 16384 + s;
            bits[(abs / 8) as usize] |= 1 << (abs % 8);
        }
    }
    patch(&path, bitmap, &bits);
    patch(&path, bat + 2 * 8, &(block2 | 7).to_le_bytes());
    patch(&path, bat + 3 * 8, &2u64.to_le_bytes());
    patch(&path, bat + 512 * 8, &(bitmap | 6).to_le_bytes());
}

fn child_present(s: u64) -> bool {
    (100..5000).contains(&s) || s == 9000 || (16000..16384).contains(&s)
}

/// What a child made by [`make_child`] reads as, given its parent's contents.
fn child_overlay(mut expected: Vec<u8>) -> Vec<u8> {
    expected[8 * MIB as usize..16 * MIB as usize].fill(0xc1);
    for s in 0..16384u64 {
        if child_present(s) {
            let at = (16 * MIB + s * 512) as usize;
            expected[at..at + 512].fill(0xc2);
        }
    }
    expected[24 * MIB as usize..32 * MIB as usize].fill(0);
    expected
}

#[test]
fn reads_differencing_chain() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("base")).unwrap();
    let ppath = dir.path().join("base/parent.vhdx");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            &ppath.display().to_string(),
            "40M",
        ],
    );
    let mut rng = Rng(21);
    let mut cmds = random_qemu_cmds(&mut rng, 40 * MIB, 40);
    cmds.push("write -P 0x99 16M 16M".into());
    qemu_io(&ppath, &cmds);
    make_child(
        dir.path(),
        "base/parent.vhdx",
        "base/child.vhdx",
        ".\\parent.vhdx",
    );
    let expected = child_overlay(qemu_raw(&ppath, "vhdx"));
    // A grandchild over the child: reads fall through two levels.
    make_child(
        dir.path(),
        "base/child.vhdx",
        "base/grandchild.vhdx",
        "child.vhdx",
    );
    let mut g = open(dir.path(), "base/grandchild.vhdx", OpenMode::ReadOnly).unwrap();
    assert_eq!(g.info().unwrap().files.len(), 3);
    assert!(read_all(g.as_mut()) == child_overlay(expected.clone()));
    drop(g);
    let mut img = open(dir.path(), "base/child.vhdx", OpenMode::ReadOnly).unwrap();
    let info = img.info().unwrap();
    assert_eq!(info.subformat, "differencing");
    assert_eq!(
        info.files,
        vec!["base/child.vhdx".to_owned(), "base/parent.vhdx".to_owned()]
    );
    let got = read_all(img.as_mut());
    assert!(
        got == expected,
        "child reads differ from the expected overlay"
    );
    check_map(img.as_mut(), &got);
    // Unaligned-to-block reads crossing the partial block's runs.
    let mut buf = vec![0u8; 3 * 512];
    img.read(16 * MIB + 99 * 512, &mut buf).unwrap();
    assert_eq!(buf, expected[(16 * MIB + 99 * 512) as usize..][..3 * 512]);

    // Differencing images are read-only here.
    let err = open(dir.path(), "base/child.vhdx", OpenMode::ReadWrite)
        .err()
        .unwrap();
    assert_eq!(err.kind, ErrorKind::Unsupported);

    // A parent changed after the child was made breaks the chain.
    let mut p = open(dir.path(), "base/parent.vhdx", OpenMode::ReadWrite).unwrap();
    p.write(0, &[1u8; 512]).unwrap();
    p.close().unwrap();
    drop(p);
    let err = open(dir.path(), "base/child.vhdx", OpenMode::ReadOnly)
        .err()
        .unwrap();
    assert_eq!(err.kind, ErrorKind::Corrupt);
    assert!(err.message.contains("data write GUID"), "{}", err.message);
}

#[test]
fn refuses_parent_loops_and_missing_parents() {
    let dir = tempfile::tempdir().unwrap();
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            &dir.path().join("p.vhdx").display().to_string(),
            "32M",
        ],
    );
    make_child(dir.path(), "p.vhdx", "gone.vhdx", "nowhere.vhdx");
    let err = open(dir.path(), "gone.vhdx", OpenMode::ReadOnly)
        .err()
        .unwrap();
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert!(err.message.contains("nowhere.vhdx"), "{}", err.message);

    // a -> b -> a: each child's linkage names the other's data write GUID.
    make_child(dir.path(), "p.vhdx", "a.vhdx", "b.vhdx");
    make_child(dir.path(), "a.vhdx", "b.vhdx", "a.vhdx");
    let (bh, _) = current_header(&dir.path().join("b.vhdx"));
    let bguid = read_at(&dir.path().join("b.vhdx"), bh + 32, 16);
    let a = dir.path().join("a.vhdx");
    let (loc, _) = metadata_item(&a, &PARENT_LOCATOR_GUID);
    let item = read_at(&a, loc, 200);
    let voff = le32(&item, 24) as u64;
    let text: Vec<u8> = guid_text(&bguid)
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    patch(&a, loc + voff, &text);
    let err = open(dir.path(), "a.vhdx", OpenMode::ReadOnly)
        .err()
        .unwrap();
    assert_eq!(err.kind, ErrorKind::Corrupt);
    assert!(err.message.contains("loops"), "{}", err.message);
}
