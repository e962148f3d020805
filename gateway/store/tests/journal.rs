//! The journal on real files: round trips, the nonce rule, crash recovery, tampering, release,
//! limits, and a seeded random sequence of operations checked against a model.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use haven_store::{
    Encoding, EntryKind, Journal, JournalOptions, Key, StoreError, decompress, is_all_zero,
};
use haven_wire::{Payload, Record, Tag, TagKind, Write};

fn key() -> Key {
    Key::from_bytes([7; 32])
}

fn write(seq: u64, offset: u64, data: Payload) -> Record {
    Record::Write(Write {
        disk: 3,
        seq,
        offset,
        data,
    })
}

fn tag(seq: u64, point: u64) -> Record {
    Record::Tag(Tag {
        disk: 3,
        seq,
        point,
        kind: TagKind::App,
        source_time_ms: 1_700_000_000_000 + point,
    })
}

/// Deterministic pseudo-random bytes (xorshift64*).
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

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

fn text(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    let mut i = 0;
    while v.len() < len {
        v.extend_from_slice(format!("{i:08} INFO haven: replicated block of web01/0\n").as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

/// A record in a form independent of how it is stored: data as its bytes, all-zero data as zero.
#[derive(Debug, PartialEq, Eq)]
enum Canon {
    Data(u64, u64, Vec<u8>),
    Zero(u64, u64, u64),
    Trim(u64, u64, u64),
    Tag(Tag),
}

fn canon(r: &Record) -> Canon {
    match r {
        Record::Tag(t) => Canon::Tag(*t),
        Record::Write(w) => match &w.data {
            Payload::Zero { len } => Canon::Zero(w.seq, w.offset, *len),
            Payload::Trim { len } => Canon::Trim(w.seq, w.offset, *len),
            p => {
                let b = decompress(p).expect("decompress");
                if is_all_zero(&b) {
                    Canon::Zero(w.seq, w.offset, b.len() as u64)
                } else {
                    Canon::Data(w.seq, w.offset, b.to_vec())
                }
            }
        },
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "hjnl"))
        .collect();
    v.sort();
    v
}

fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    b[0] ^= 0x40;
    f.write_all_at(&b, at).expect("write");
}

fn small() -> JournalOptions {
    JournalOptions {
        segment_bytes: 4096,
        max_bytes: 1 << 20,
        ..JournalOptions::default()
    }
}

#[test]
fn round_trip_every_payload_kind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("j");
    let text = text(64 * 1024);
    let random = Rng(42).bytes(64 * 1024);
    let precompressed = zstd::bulk::compress(&text[..8192], 3).expect("zstd");
    let records = [
        write(1, 0, Payload::Data(Bytes::from(text.clone()))),
        write(2, 1 << 20, Payload::Data(Bytes::from(random.clone()))),
        write(3, 2 << 20, Payload::Data(Bytes::from(vec![0u8; 65536]))),
        write(
            5,
            3 << 20,
            Payload::Compressed {
                raw_len: 8192,
                bytes: Bytes::from(precompressed.clone()),
            },
        ),
        write(6, 4 << 20, Payload::Zero { len: 1 << 20 }),
        write(7, 8 << 20, Payload::Trim { len: 4096 }),
        tag(8, 99),
    ];
    let expected_enc = [
        Encoding::Zstd,
        Encoding::Raw,
        Encoding::Zero,
        Encoding::Zstd,
        Encoding::Zero,
        Encoding::Trim,
        Encoding::Tag,
    ];
    let mut j = Journal::open(&dir, &key(), JournalOptions::default()).expect("open");
    for (r, enc) in records.iter().zip(expected_enc) {
        let info = j.append(r).expect("append");
        assert_eq!(info.encoding, enc, "record {}", r.seq());
        if r.seq() == 1 {
            assert!(
                info.stored_bytes < text.len() as u64 / 10,
                "text stored in {} bytes",
                info.stored_bytes
            );
        }
        if r.seq() == 2 {
            assert_eq!(info.stored_bytes, 56 + 65536 + 16);
        }
        if r.seq() == 3 {
            assert_eq!(info.stored_bytes, 56 + 16);
        }
    }
    assert_eq!(j.stats().durable_seq, 0);
    assert_eq!(j.stats().last_seq, 8);
    assert_eq!(j.sync().expect("sync"), 8);
    // Readable before reopening too.
    assert_eq!(canon(&j.get(2).expect("get")), canon(&records[1]));
    drop(j);

    let j = Journal::open(&dir, &key(), JournalOptions::default()).expect("reopen");
    let st = j.stats();
    assert_eq!(
        (
            st.first_seq,
            st.last_seq,
            st.durable_seq,
            st.records,
            st.segments
        ),
        (1, 8, 8, 7, 2)
    );
    assert_eq!(
        st.bytes,
        segment_files(&dir)
            .iter()
            .map(|p| fs::metadata(p).expect("meta").len())
            .sum::<u64>()
    );
    // Data that was compressed comes back compressed; zero data comes back as zero.
    match j.get(1).expect("get 1") {
        Record::Write(Write {
            data: Payload::Compressed { raw_len, bytes },
            offset: 0,
            disk: 3,
            seq: 1,
        }) => {
            assert_eq!(raw_len, 65536);
            let p = Payload::Compressed { raw_len, bytes };
            assert_eq!(decompress(&p).expect("decompress").as_ref(), &text[..]);
        }
        other => panic!("record 1 came back as {other:?}"),
    }
    assert_eq!(j.get(2).expect("get 2"), records[1]);
    assert_eq!(
        j.get(3).expect("get 3"),
        write(3, 2 << 20, Payload::Zero { len: 65536 })
    );
    // Already compressed data is kept byte for byte.
    assert_eq!(j.get(5).expect("get 5"), records[3]);
    for (i, seq) in [(4, 6), (5, 7), (6, 8)] {
        assert_eq!(j.get(seq).expect("get"), records[i]);
    }
    assert!(matches!(j.get(4), Err(StoreError::NotHeld { seq: 4, .. })));
    assert!(matches!(j.get(9), Err(StoreError::NotHeld { seq: 9, .. })));

    let all: Vec<Canon> = j.read_from(1).map(|r| canon(&r.expect("read"))).collect();
    assert_eq!(all, records.iter().map(canon).collect::<Vec<_>>());
    let tail: Vec<u64> = j.read_from(4).map(|r| r.expect("read").seq()).collect();
    assert_eq!(tail, vec![5, 6, 7, 8]);
    assert_eq!(j.read_from(9).count(), 0);

    let kinds: Vec<(u64, EntryKind, u64, u64)> = j
        .entries()
        .iter()
        .map(|e| (e.seq, e.kind, e.offset, e.len))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, EntryKind::Write, 0, 65536),
            (2, EntryKind::Write, 1 << 20, 65536),
            (3, EntryKind::Zero, 2 << 20, 65536),
            (5, EntryKind::Write, 3 << 20, 8192),
            (6, EntryKind::Zero, 4 << 20, 1 << 20),
            (7, EntryKind::Trim, 8 << 20, 4096),
            (8, EntryKind::Tag, 0, 0),
        ]
    );
    assert!(j.entries().iter().all(|e| e.segment == 1));
}

#[test]
fn every_open_starts_a_new_segment() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut expected = Vec::new();
    for round in 1..=3u64 {
        let mut j = Journal::open(dir, &key(), small()).expect("open");
        // Every open created a new segment: one per earlier round holding a record, plus this one.
        assert_eq!(segment_files(dir).len() as u64, round);
        let r = write(
            round,
            round * 4096,
            Payload::Data(Bytes::from(Rng(round).bytes(100))),
        );
        j.append(&r).expect("append");
        j.sync().expect("sync");
        expected.push(r);
    }
    let files = segment_files(dir);
    assert_eq!(files.len(), 3);
    let ids: Vec<Vec<u8>> = files
        .iter()
        .map(|p| fs::read(p).expect("read")[24..40].to_vec())
        .collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    // Opening without appending does not pile up empty segments.
    for _ in 0..3 {
        drop(Journal::open(dir, &key(), small()).expect("open"));
    }
    assert_eq!(segment_files(dir).len(), 4);
    let j = Journal::open(dir, &key(), small()).expect("open");
    let got: Vec<Record> = j.read_from(0).map(|r| r.expect("read")).collect();
    assert_eq!(got, expected);
    let segs: Vec<u64> = j.entries().iter().map(|e| e.segment).collect();
    assert_eq!(segs, vec![1, 2, 3]);
}

#[test]
fn torn_tail_is_truncated_and_appends_continue() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut rng = Rng(5);
    let recs: Vec<Record> = (1..=3)
        .map(|s| write(s, s * 8192, Payload::Data(Bytes::from(rng.bytes(1000)))))
        .collect();
    let mut j = Journal::open(dir, &key(), JournalOptions::default()).expect("open");
    for r in &recs {
        j.append(r).expect("append");
    }
    j.sync().expect("sync");
    let third = j.entries()[2];
    drop(j);
    let seg = &segment_files(dir)[0];
    let len = fs::metadata(seg).expect("meta").len();
    assert_eq!(len, 80 + 3 * (56 + 1000 + 16));
    // Cut the third record in the middle of its body.
    OpenOptions::new()
        .write(true)
        .open(seg)
        .expect("open")
        .set_len(len - third.stored_bytes / 2)
        .expect("truncate");

    let mut j = Journal::open(dir, &key(), JournalOptions::default()).expect("reopen");
    assert_eq!(j.stats().last_seq, 2);
    assert_eq!(
        fs::metadata(seg).expect("meta").len(),
        80 + 2 * (56 + 1000 + 16)
    );
    assert_eq!(j.get(1).expect("get"), recs[0]);
    assert_eq!(j.get(2).expect("get"), recs[1]);
    assert!(matches!(j.get(3), Err(StoreError::NotHeld { .. })));
    let new3 = write(3, 0, Payload::Data(Bytes::from(rng.bytes(500))));
    j.append(&new3).expect("append");
    j.sync().expect("sync");
    drop(j);

    // Zeroes after the last record (a file extended but never written) are a torn tail too.
    let last = segment_files(dir).pop().expect("segment");
    let f = OpenOptions::new().write(true).open(&last).expect("open");
    let end = f.metadata().expect("meta").len();
    f.set_len(end + 4096).expect("extend");
    drop(f);
    let j = Journal::open(dir, &key(), JournalOptions::default()).expect("reopen");
    assert_eq!(fs::metadata(&last).expect("meta").len(), end);
    let got: Vec<Record> = j.read_from(1).map(|r| r.expect("read")).collect();
    assert_eq!(got, vec![recs[0].clone(), recs[1].clone(), new3]);
}

#[test]
fn damage_before_an_intact_record_of_the_last_segment_is_not_a_torn_tail() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut j = Journal::open(dir, &key(), JournalOptions::default()).expect("open");
    for s in 1..=3 {
        j.append(&write(s, 0, Payload::Data(Bytes::from(Rng(s).bytes(300)))))
            .expect("append");
    }
    j.sync().expect("sync");
    let second = j.entries()[1];
    drop(j);
    let seg = &segment_files(dir)[0];
    // A body byte of record 2: authentication fails, and record 3 follows intact.
    let at = 80 + (56 + 300 + 16) + 56 + 10;
    flip(seg, at);
    match Journal::open(dir, &key(), JournalOptions::default()) {
        Err(StoreError::Damaged { path, offset, what }) => {
            assert_eq!(&path, seg);
            assert_eq!(offset, 80 + 56 + 300 + 16);
            assert!(what.contains("intact record 3"), "{what}");
            assert_eq!(second.seq, 2);
        }
        other => panic!("expected Damaged, got {other:?}"),
    }
}

#[test]
fn tampered_body_is_refused_on_read() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let recs: Vec<Record> = (1..=4)
        .map(|s| write(s, s * 4096, Payload::Data(Bytes::from(Rng(s).bytes(2000)))))
        .collect();
    let mut j = Journal::open(dir, &key(), JournalOptions::default()).expect("open");
    for r in &recs {
        j.append(r).expect("append");
    }
    j.sync().expect("sync");
    drop(j);
    // Reopen once so that segment 1 is closed (no longer the last one at open).
    drop(Journal::open(dir, &key(), JournalOptions::default()).expect("reopen"));
    let seg = segment_files(dir)[0].clone();
    let rec3 = 80 + 2 * (56 + 2000 + 16);
    flip(&seg, rec3 + 56 + 1234);

    let j = Journal::open(dir, &key(), JournalOptions::default()).expect("open with a bad body");
    assert_eq!(j.get(2).expect("get 2"), recs[1]);
    let err = j.get(3).expect_err("tampered record returned");
    match &err {
        StoreError::Tampered { path, offset, seq } => {
            assert_eq!((path, *offset, *seq), (&seg, rec3, 3));
        }
        other => panic!("expected Tampered, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("refused") && msg.contains("resync"), "{msg}");
    assert!(msg.contains(&seg.display().to_string()), "{msg}");
    let read: Vec<Result<Record, StoreError>> = j.read_from(1).collect();
    assert_eq!(read.len(), 3, "the reader stops at the bad record");
    assert!(matches!(read[2], Err(StoreError::Tampered { seq: 3, .. })));
    assert_eq!(j.get(4).expect("get 4"), recs[3]);
}

#[test]
fn tampered_header_is_damage_or_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut j = Journal::open(dir, &key(), JournalOptions::default()).expect("open");
    for s in 1..=3 {
        j.append(&write(
            s,
            s * 4096,
            Payload::Data(Bytes::from(Rng(s).bytes(100))),
        ))
        .expect("append");
    }
    j.sync().expect("sync");
    drop(j);
    drop(Journal::open(dir, &key(), JournalOptions::default()).expect("reopen"));
    let seg = segment_files(dir)[0].clone();
    let rec2 = 80 + 56 + 100 + 16;

    // A flipped header byte of a closed segment: the header CRC fails, open refuses.
    flip(&seg, rec2 + 24);
    match Journal::open(dir, &key(), JournalOptions::default()) {
        Err(StoreError::Damaged { path, offset, .. }) => {
            assert_eq!((path, offset), (seg.clone(), rec2))
        }
        other => panic!("expected Damaged, got {other:?}"),
    }
    flip(&seg, rec2 + 24);

    // An offset changed with the header CRC fixed up: scanning accepts it, reading refuses it.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .expect("open");
    let mut h = [0u8; 56];
    f.read_exact_at(&mut h, rec2).expect("read");
    h[24..32].copy_from_slice(&0u64.to_le_bytes());
    let crc = haven_wire::crc32c::crc32c(&h[0..52]);
    h[52..56].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&h, rec2).expect("write");
    drop(f);
    let j = Journal::open(dir, &key(), JournalOptions::default()).expect("open");
    assert_eq!(
        j.entries()[1].offset,
        0,
        "the plaintext header is what it says"
    );
    assert!(matches!(j.get(2), Err(StoreError::Tampered { seq: 2, .. })));

    // A damaged segment header.
    drop(j);
    flip(&seg, 30);
    match Journal::open(dir, &key(), JournalOptions::default()) {
        Err(StoreError::Damaged { path, offset, .. }) => {
            assert_eq!((path, offset), (seg.clone(), 76))
        }
        other => panic!("expected Damaged, got {other:?}"),
    }
    flip(&seg, 30);

    // A segment header altered with its CRC fixed up (here: the previous last sequence number
    // of the first segment) fails the key check.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .expect("open");
    let mut h = [0u8; 80];
    f.read_exact_at(&mut h, 0).expect("read");
    h[40] ^= 1;
    let crc = haven_wire::crc32c::crc32c(&h[0..76]);
    h[76..80].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&h, 0).expect("write");
    drop(f);
    match Journal::open(dir, &key(), JournalOptions::default()) {
        Err(StoreError::WrongKey { path }) => assert_eq!(path, seg),
        other => panic!("expected WrongKey, got {other:?}"),
    }
}

#[test]
fn wrong_key_is_refused_before_anything_is_truncated() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut j = Journal::open(dir, &key(), JournalOptions::default()).expect("open");
    j.append(&write(1, 0, Payload::Data(Bytes::from(Rng(1).bytes(100)))))
        .expect("append");
    j.sync().expect("sync");
    drop(j);
    let seg = segment_files(dir)[0].clone();
    let len = fs::metadata(&seg).expect("meta").len();
    // The segment holding the record is the last one: a wrong key must not look like a torn tail.
    let other = Key::from_bytes([8; 32]);
    match Journal::open(dir, &other, JournalOptions::default()) {
        Err(e @ StoreError::WrongKey { .. }) => {
            assert!(e.to_string().contains(&seg.display().to_string()), "{e}");
        }
        other => panic!("expected WrongKey, got {other:?}"),
    }
    assert_eq!(fs::metadata(&seg).expect("meta").len(), len);
    assert_eq!(segment_files(dir).len(), 1);
    let j = Journal::open(dir, &key(), JournalOptions::default()).expect("right key");
    assert_eq!(j.stats().records, 1);
}

#[test]
fn release_frees_segments_and_last_seq_survives() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut j = Journal::open(dir, &key(), small()).expect("open");
    let mut rng = Rng(9);
    for s in 1..=20 {
        j.append(&write(
            s,
            s * 4096,
            Payload::Data(Bytes::from(rng.bytes(1000))),
        ))
        .expect("append");
    }
    j.sync().expect("sync");
    let before = j.stats();
    assert!(before.segments >= 5, "{before:?}");
    let sizes: BTreeMap<u64, u64> = segment_files(dir)
        .iter()
        .map(|p| {
            let n: u64 = p
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok())
                .expect("name");
            (n, fs::metadata(p).expect("meta").len())
        })
        .collect();
    // Segments whose records are all <= 10.
    let entries = j.entries();
    let expect_freed: u64 = sizes
        .iter()
        .filter(|(n, _)| {
            entries
                .iter()
                .filter(|e| e.segment == **n)
                .all(|e| e.seq <= 10)
        })
        .map(|(_, l)| l)
        .sum();
    let freed = j.release(10).expect("release");
    assert!(freed > 0);
    assert_eq!(freed, expect_freed);
    let after = j.stats();
    assert_eq!(after.bytes, before.bytes - freed);
    assert!(after.first_seq > 1 && after.first_seq <= 11, "{after:?}");
    assert!(matches!(j.get(1), Err(StoreError::NotHeld { seq: 1, .. })));
    assert!(matches!(
        j.read_from(1).next(),
        Some(Err(StoreError::NotHeld { .. }))
    ));
    let seqs: Vec<u64> = j.read_from(11).map(|r| r.expect("read").seq()).collect();
    assert_eq!(seqs, (11..=20).collect::<Vec<_>>());

    // Release everything: the active segment is rolled and the journal is empty.
    j.release(20).expect("release all");
    let st = j.stats();
    assert_eq!(
        (st.first_seq, st.last_seq, st.records, st.segments, st.bytes),
        (21, 20, 0, 1, 80)
    );
    assert_eq!(segment_files(dir).len(), 1);
    drop(j);

    let mut j = Journal::open(dir, &key(), small()).expect("reopen");
    let st = j.stats();
    assert_eq!(
        (st.first_seq, st.last_seq, st.durable_seq, st.records),
        (21, 20, 20, 0)
    );
    assert!(matches!(
        j.append(&tag(20, 1)),
        Err(StoreError::OutOfOrder { last: 20, got: 20 })
    ));
    j.append(&tag(21, 1)).expect("append 21");
    assert_eq!(j.sync().expect("sync"), 21);
    assert_eq!(j.get(21).expect("get"), tag(21, 1));
}

#[test]
fn full_journal_refuses_and_appends_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let opts = JournalOptions {
        segment_bytes: 4096,
        max_bytes: 8192,
        ..JournalOptions::default()
    };
    let mut j = Journal::open(dir, &key(), opts).expect("open");
    let mut rng = Rng(3);
    let mut seq = 0;
    let err = loop {
        seq += 1;
        match j.append(&write(seq, 0, Payload::Data(Bytes::from(rng.bytes(1000))))) {
            Ok(_) => assert!(seq < 20, "never full"),
            Err(e) => break e,
        }
    };
    let st = j.stats();
    match err {
        StoreError::Full {
            used,
            needed,
            max_bytes,
        } => {
            assert_eq!(max_bytes, 8192);
            assert_eq!(used, st.bytes);
            assert!(used + needed > 8192);
        }
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(st.last_seq, seq - 1);
    assert!(st.bytes <= 8192);
    let on_disk: u64 = segment_files(dir)
        .iter()
        .map(|p| fs::metadata(p).expect("meta").len())
        .sum();
    assert_eq!(on_disk, st.bytes);
    assert!(matches!(j.get(seq), Err(StoreError::NotHeld { .. })));
    // Releasing makes room again.
    j.release(seq - 1).expect("release");
    j.append(&write(seq, 0, Payload::Data(Bytes::from(rng.bytes(1000)))))
        .expect("append after release");
}

#[test]
fn out_of_order_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut j = Journal::open(tmp.path(), &key(), JournalOptions::default()).expect("open");
    j.append(&tag(5, 1)).expect("append");
    for got in [5, 3, 0] {
        match j.append(&tag(got, 2)) {
            Err(StoreError::OutOfOrder { last: 5, got: g }) => assert_eq!(g, got),
            other => panic!("expected OutOfOrder, got {other:?}"),
        }
    }
    assert_eq!(j.stats().records, 1);
}

#[test]
fn second_open_is_locked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("j");
    let j = Journal::open(&dir, &key(), JournalOptions::default()).expect("open");
    match Journal::open(&dir, &key(), JournalOptions::default()) {
        Err(StoreError::Locked { path }) => assert_eq!(path, dir),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(j);
    Journal::open(&dir, &key(), JournalOptions::default()).expect("open after the first closed");
}

/// Temporary files a crash left mid-creation of a segment (`.NAME.PID.N.tmp` of
/// `haven_fsutil::write_atomic`, or `NAME.tmp` of builds before it) are removed at open.
#[test]
fn leftover_temporary_segments_are_removed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut j = Journal::open(dir, &key(), small()).expect("open");
    j.append(&write(1, 0, Payload::Data(Bytes::from(vec![1u8; 100]))))
        .expect("append");
    j.sync().expect("sync");
    drop(j);
    let left = [".000000000009.hjnl.4242.0.tmp", "000000000009.hjnl.tmp"];
    for name in left {
        fs::write(dir.join(name), b"HVNJ").expect("leftover");
    }
    let j = Journal::open(dir, &key(), small()).expect("open");
    assert_eq!(j.stats().records, 1);
    for name in left {
        assert!(!dir.join(name).exists(), "{name} left");
    }
    let names: Vec<String> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn decompress_and_zero_detection() {
    let text = text(10000);
    let z = zstd::bulk::compress(&text, 1).expect("zstd");
    let ok = Payload::Compressed {
        raw_len: 10000,
        bytes: Bytes::from(z.clone()),
    };
    assert_eq!(decompress(&ok).expect("decompress").as_ref(), &text[..]);
    for raw_len in [9999, 10001, 0] {
        let bad = Payload::Compressed {
            raw_len,
            bytes: Bytes::from(z.clone()),
        };
        assert!(
            matches!(decompress(&bad), Err(StoreError::Invalid(_))),
            "{raw_len}"
        );
    }
    let garbage = Payload::Compressed {
        raw_len: 100,
        bytes: Bytes::from_static(b"not zstd"),
    };
    assert!(decompress(&garbage).is_err());
    assert!(decompress(&Payload::Zero { len: 1 }).is_err());
    assert!(decompress(&Payload::Trim { len: 1 }).is_err());
    let d = Bytes::from_static(b"abc");
    assert_eq!(decompress(&Payload::Data(d.clone())).expect("data"), d);

    assert!(is_all_zero(&[]));
    for len in [1, 15, 16, 17, 4095, 4096, 4097, 10000] {
        let mut v = vec![0u8; len];
        assert!(is_all_zero(&v));
        for at in [0, len / 2, len - 1] {
            v[at] = 1;
            assert!(!is_all_zero(&v), "len {len} at {at}");
            v[at] = 0;
        }
    }
}

/// Random appends, syncs, releases and reopens, checked against a model after every step.
fn random_ops(seed: u64) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let opts = JournalOptions {
        segment_bytes: 8192,
        max_bytes: 64 * 1024,
        ..JournalOptions::default()
    };
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut j = Journal::open(dir, &key(), opts).expect("open");
    let mut model: BTreeMap<u64, Canon> = BTreeMap::new();
    let mut last = 0u64;
    let mut released = 0u64;
    for step in 0..150 {
        let ctx = format!("seed {seed} step {step}");
        match rng.below(10) {
            0..=5 => {
                let seq = last + 1 + rng.below(3);
                let offset = rng.below(64) * 4096;
                let len = 1 + rng.below(3000) as usize;
                let r = match rng.below(6) {
                    0 => write(seq, offset, Payload::Data(Bytes::from(rng.bytes(len)))),
                    1 => write(seq, offset, Payload::Data(Bytes::from(text(len)))),
                    2 => write(seq, offset, Payload::Data(Bytes::from(vec![0; len]))),
                    3 => write(seq, offset, Payload::Zero { len: len as u64 }),
                    4 => write(seq, offset, Payload::Trim { len: len as u64 }),
                    _ => tag(seq, rng.next()),
                };
                match j.append(&r) {
                    Ok(_) => {
                        model.insert(seq, canon(&r));
                        last = seq;
                    }
                    Err(StoreError::Full { .. }) => {}
                    Err(e) => panic!("{ctx}: append: {e}"),
                }
            }
            6 => {
                assert_eq!(j.sync().expect("sync"), last, "{ctx}");
                // The metadata from any seq is the tail of all of it.
                let all = j.entries();
                let from = rng.below(last + 2);
                let tail: Vec<_> = all.iter().filter(|e| e.seq >= from).copied().collect();
                assert_eq!(j.entries_from(from), tail, "{ctx}: entries from {from}");
            }
            7 => {
                let upto = if last == 0 { 0 } else { rng.below(last + 1) };
                j.release(upto).expect("release");
                released = released.max(upto);
            }
            _ => {
                j.sync().expect("sync");
                drop(j);
                j = Journal::open(dir, &key(), opts).expect("reopen");
            }
        }
        // Records may be released only up to what was asked; anything above must be held.
        let st = j.stats();
        assert_eq!(st.last_seq, last, "{ctx}");
        let held: Vec<Canon> = j
            .read_from(st.first_seq)
            .map(|r| canon(&r.unwrap_or_else(|e| panic!("{ctx}: read: {e}"))))
            .collect();
        let expect: Vec<&Canon> = model.range(st.first_seq..).map(|(_, c)| c).collect();
        assert_eq!(held.iter().collect::<Vec<_>>(), expect, "{ctx}");
        assert!(
            model.range(released + 1..).all(|(s, _)| *s >= st.first_seq),
            "{ctx}: {st:?}"
        );
        assert_eq!(st.records as usize, expect.len(), "{ctx}");
        let on_disk: u64 = segment_files(dir)
            .iter()
            .map(|p| fs::metadata(p).expect("meta").len())
            .sum();
        assert_eq!(on_disk, st.bytes, "{ctx}");
        if let Some((s, c)) = model.range(st.first_seq..).next() {
            assert_eq!(&canon(&j.get(*s).expect("get")), c, "{ctx}");
        }
    }
}

#[test]
fn random_operations_match_the_model() {
    let seeds: Vec<u64> = match std::env::var("HAVEN_STORE_SEED") {
        Ok(s) => vec![s.parse().expect("HAVEN_STORE_SEED must be a number")],
        Err(_) => (1..=12).collect(),
    };
    for seed in seeds {
        eprintln!("random_operations seed {seed} (replay: HAVEN_STORE_SEED={seed})");
        random_ops(seed);
    }
}

#[test]
fn random_operations_pinned_seed() {
    random_ops(0x5eed);
}

#[test]
fn without_compression_data_is_stored_as_it_came() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let opts = JournalOptions {
        compress: false,
        ..JournalOptions::default()
    };
    let mut j = Journal::open(tmp.path(), &key(), opts).expect("open");
    let text = bytes::Bytes::from(b"replica journal ".repeat(4096));
    let info = j
        .append(&Record::Write(Write {
            disk: 1,
            seq: 1,
            offset: 0,
            data: Payload::Data(text.clone()),
        }))
        .expect("append");
    assert_eq!(info.encoding, Encoding::Raw);
    assert!(info.stored_bytes > text.len() as u64);
    j.sync().expect("sync");
    match j.get(1).expect("get") {
        Record::Write(w) => assert_eq!(w.data, Payload::Data(text)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn append_reports_the_payload_as_get_returns_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut j = Journal::open(tmp.path(), &key(), JournalOptions::default()).expect("open");
    let mut rng = Rng(77);
    let payloads = [
        Payload::Data(Bytes::from(text(100_000))),
        Payload::Data(Bytes::from(rng.bytes(100_000))),
        Payload::Data(Bytes::from(vec![0; 8192])),
        Payload::Zero { len: 4096 },
        Payload::Trim { len: 4096 },
    ];
    for (i, p) in payloads.into_iter().enumerate() {
        let seq = i as u64 + 1;
        let info = j.append(&write(seq, 0, p)).expect("append");
        match j.get(seq).expect("get") {
            Record::Write(w) => assert_eq!(info.stored, Some(w.data), "record {seq}"),
            other => panic!("{other:?}"),
        }
    }
    let info = j.append(&tag(9, 1)).expect("append");
    assert_eq!(info.stored, None);
}

/// The journal keeps the record-store contract the replication machines and their simulation
/// are written against (the same check runs on the in-memory store there).
#[test]
fn the_journal_keeps_the_record_store_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("j");
    let mut rng = Rng(11);
    let records: Vec<Record> = (1..=8)
        .map(|seq| write(seq, seq * 4096, Payload::Data(Bytes::from(rng.bytes(4096)))))
        .collect();
    let open = || Journal::open(&path, &key(), JournalOptions::default()).expect("open");
    haven_replication::store::check_contract(
        open,
        |j| {
            drop(j);
            open()
        },
        &records,
    );
}
