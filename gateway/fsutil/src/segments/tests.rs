use std::os::unix::fs::FileExt;

use super::*;

/// A toy log format: segment header `TOYSEG01`; record `TREC`, seq u32 LE, payload length u8,
/// the payload, then the wrapping byte sum of everything before it. Sequence numbers are
/// contiguous from 1.
const EXT: &str = "toy";
const HEADER: &[u8] = b"TOYSEG01";
const START: u64 = HEADER.len() as u64;

#[derive(Debug)]
struct Toy {
    next: u32,
}

impl Toy {
    fn new(first: u32) -> Toy {
        Toy { next: first }
    }

    /// The record at `pos`: (seq, length) or what is wrong.
    fn read(file: &File, pos: u64, file_len: u64) -> io::Result<Result<(u32, u64), String>> {
        let mut h = [0u8; 9];
        let got = read_at_most(file, &mut h, pos)?;
        if got < h.len() {
            return Ok(Err(format!("record header cut short ({got} of 9 bytes)")));
        }
        if h[0..4] != *b"TREC" {
            return Ok(Err("bad record magic".into()));
        }
        let seq = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let len = 9 + u64::from(h[8]) + 1;
        if pos + len > file_len {
            return Ok(Err(format!("record {seq} cut short")));
        }
        let mut rec = vec![0u8; len as usize];
        read_at_most(file, &mut rec, pos)?;
        let (body, sum) = rec.split_at(rec.len() - 1);
        if body.iter().fold(0u8, |a, b| a.wrapping_add(*b)) != sum[0] {
            return Ok(Err(format!("record {seq} checksum mismatch")));
        }
        Ok(Ok((seq, len)))
    }
}

impl RecordFormat for Toy {
    const RECORD_MAGIC: &'static [u8] = b"TREC";

    fn check_next(&mut self, file: &File, pos: u64, file_len: u64) -> io::Result<RecordCheck> {
        Ok(match Toy::read(file, pos, file_len)? {
            Ok((seq, len)) if seq == self.next => {
                self.next += 1;
                RecordCheck::Valid(len)
            }
            Ok((seq, _)) => {
                RecordCheck::Invalid(format!("record {seq} where {} was expected", self.next))
            }
            Err(why) => RecordCheck::Invalid(why),
        })
    }

    fn intact_record_at(&self, file: &File, pos: u64, file_len: u64) -> io::Result<Option<u64>> {
        Ok(match Toy::read(file, pos, file_len)? {
            Ok((seq, _)) if seq >= self.next => Some(u64::from(seq)),
            _ => None,
        })
    }
}

fn record(seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut r = b"TREC".to_vec();
    r.extend_from_slice(&seq.to_le_bytes());
    r.push(u8::try_from(payload.len()).expect("short payload"));
    r.extend_from_slice(payload);
    r.push(r.iter().fold(0u8, |a, b| a.wrapping_add(*b)));
    r
}

/// A segment holding records `first..first + count`, each with a payload of `seq` bytes.
fn segment(first: u32, count: u32) -> Vec<u8> {
    let mut s = HEADER.to_vec();
    for seq in first..first + count {
        s.extend_from_slice(&record(seq, &vec![seq as u8; seq as usize]));
    }
    s
}

/// Offset of record `n` (0-based) of a segment made by [`segment`] from `first`.
fn offset_of(first: u32, n: u32) -> u64 {
    START
        + (first..first + n)
            .map(|seq| 10 + u64::from(seq))
            .sum::<u64>()
}

fn write_segment(dir: &Path, number: u64, bytes: &[u8]) -> PathBuf {
    let path = dir.join(segment_file_name(number, EXT));
    fs::write(&path, bytes).expect("write segment");
    path
}

/// Opens `path` and walks it as the format's caller does: header first, then the records.
fn recover(path: &Path, is_last: bool, toy: &mut Toy) -> Result<Recovered, RecoverError> {
    let seg = OpenSegment::open(path, is_last).expect("open");
    let mut h = [0u8; HEADER.len()];
    assert_eq!(read_at_most(&seg.file, &mut h, 0).expect("header"), h.len());
    assert_eq!(h, HEADER);
    seg.recover_records(START, toy)
}

fn damaged(r: Result<Recovered, RecoverError>) -> (PathBuf, u64, String) {
    match r {
        Err(RecoverError::Damaged { path, offset, what }) => (path, offset, what),
        other => panic!("expected Damaged, got {other:?}"),
    }
}

#[test]
fn names_round_trip_and_nothing_else_parses() {
    assert_eq!(segment_file_name(42, "hlog"), "000000000042.hlog");
    assert_eq!(
        segment_file_name(u64::MAX, "hjnl"),
        "18446744073709551615.hjnl"
    );
    for n in [0, 1, 4711, 999_999_999_999, 1_000_000_000_000, u64::MAX] {
        assert_eq!(
            parse_segment_file_name(&segment_file_name(n, EXT), EXT),
            Some(n)
        );
    }
    for name in [
        "000000000042.hlog",
        "00000000042.toy",
        "000000000042toy",
        "000000000042.toyx",
        "00000000004x.toy",
        "+00000000042.toy",
        ".000000000042.toy",
        "18446744073709551616.toy",
        ".toy",
    ] {
        assert_eq!(parse_segment_file_name(name, EXT), None, "{name}");
    }
}

#[test]
fn segments_are_listed_by_number_and_crash_leftovers_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let segments = [
        "000000000010.toy",
        "000000000002.toy",
        "1000000000000.toy",
        "0000000000003.toy",
    ];
    let leftovers = [
        ".000000000011.toy.4242.0.tmp",
        "000000000011.toy.tmp",
        ".overflowed.4242.1.tmp",
    ];
    let others = [
        "lock",
        "overflowed",
        "00000000001.toy",
        "000000000005.hlog",
        "000000000005.hlog.tmp.x",
        "00000000000x.toy",
        ".000000000012.toy",
    ];
    for name in segments.iter().chain(&leftovers).chain(&others) {
        fs::write(d.join(name), b"x").expect("write");
    }
    let listing = list_segments(d, EXT).expect("list");
    let found: Vec<(u64, PathBuf)> = listing
        .segments
        .iter()
        .map(|s| (s.number, s.path.clone()))
        .collect();
    assert_eq!(
        found,
        vec![
            (2, d.join("000000000002.toy")),
            (3, d.join("0000000000003.toy")),
            (10, d.join("000000000010.toy")),
            (1_000_000_000_000, d.join("1000000000000.toy")),
        ]
    );
    let mut removed = listing.removed.clone();
    removed.sort();
    let mut want: Vec<PathBuf> = leftovers.iter().map(|n| d.join(n)).collect();
    want.sort();
    assert_eq!(removed, want);
    for name in leftovers {
        assert!(!d.join(name).exists(), "{name} left");
    }
    for name in segments.iter().chain(&others) {
        assert!(d.join(name).exists(), "{name} removed");
    }

    // An empty folder lists nothing; a missing one is an error naming it and the step.
    let empty = d.join("empty");
    fs::create_dir(&empty).expect("mkdir");
    assert_eq!(
        list_segments(&empty, EXT).expect("list"),
        Listing::default()
    );
    let e = list_segments(&d.join("missing"), EXT).expect_err("missing folder");
    assert_eq!((e.step, e.kind()), ("listing", io::ErrorKind::NotFound));
    assert_eq!(e.path, d.join("missing"));
}

#[test]
fn a_clean_log_is_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = write_segment(dir.path(), 1, &segment(1, 3));
    let last = write_segment(dir.path(), 4, &segment(4, 5));
    let before = (
        fs::read(&first).expect("read"),
        fs::read(&last).expect("read"),
    );

    let mut toy = Toy::new(1);
    let r = recover(&first, false, &mut toy).expect("first segment");
    assert_eq!(
        r,
        Recovered {
            end: offset_of(1, 3),
            torn: None
        }
    );
    let r = recover(&last, true, &mut toy).expect("last segment");
    assert_eq!(
        r,
        Recovered {
            end: offset_of(4, 5),
            torn: None
        }
    );
    assert_eq!(r.end, before.1.len() as u64);
    assert_eq!(toy.next, 9);
    assert_eq!(
        (
            fs::read(&first).expect("read"),
            fs::read(&last).expect("read")
        ),
        before
    );
}

#[test]
fn a_torn_tail_of_the_last_segment_is_cut_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = segment(1, 3);
    let good = bytes.len() as u64;
    // Record 4 with its payload cut short, as a crash in the middle of an append leaves it.
    bytes.extend_from_slice(&record(4, &[4; 40])[..25]);
    let path = write_segment(dir.path(), 1, &bytes);

    let mut toy = Toy::new(1);
    let r = recover(&path, true, &mut toy).expect("recover");
    assert_eq!(
        r,
        Recovered {
            end: good,
            torn: Some(TornTail {
                offset: good,
                dropped_bytes: 25,
                reason: "record 4 cut short".into(),
            }),
        }
    );
    assert_eq!(toy.next, 4);
    assert_eq!(fs::read(&path).expect("read"), segment(1, 3));

    // Recovering again finds a clean segment; so does a log appended to after the cut.
    let r = recover(&path, true, &mut Toy::new(1)).expect("again");
    assert_eq!(
        r,
        Recovered {
            end: good,
            torn: None
        }
    );

    // A stale copy of an earlier record after the bad bytes does not follow: still a torn tail.
    let f = OpenOptions::new().append(true).open(&path).expect("open");
    let mut tail = vec![0xAB; 7];
    tail.extend_from_slice(&record(2, b"old"));
    io::Write::write_all(&mut &f, &tail).expect("append");
    drop(f);
    let r = recover(&path, true, &mut Toy::new(1)).expect("recover");
    let torn = r.torn.expect("torn");
    assert_eq!(
        (torn.offset, torn.dropped_bytes, torn.reason.as_str()),
        (good, tail.len() as u64, "bad record magic")
    );
    assert_eq!(fs::metadata(&path).expect("meta").len(), good);
}

#[test]
fn a_record_header_cut_short_is_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = segment(1, 2);
    for (junk, reason) in [
        (&b"TREC\x03"[..], "record header cut short (5 of 9 bytes)"),
        (&b"T"[..], "record header cut short (1 of 9 bytes)"),
        (&[0u8; 20][..], "bad record magic"),
    ] {
        let mut bytes = good.clone();
        bytes.extend_from_slice(junk);
        let path = write_segment(dir.path(), 1, &bytes);
        let r = recover(&path, true, &mut Toy::new(1)).expect("recover");
        assert_eq!(
            r.torn,
            Some(TornTail {
                offset: good.len() as u64,
                dropped_bytes: junk.len() as u64,
                reason: reason.into(),
            })
        );
        assert_eq!(fs::read(&path).expect("read"), good);
    }
}

#[test]
fn an_empty_last_segment_is_left_as_it_is_or_cut_back_to_its_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_segment(dir.path(), 7, HEADER);
    let mut toy = Toy::new(7);
    let r = recover(&path, true, &mut toy).expect("recover");
    assert_eq!(
        r,
        Recovered {
            end: START,
            torn: None
        }
    );
    assert_eq!(toy.next, 7);
    assert_eq!(fs::read(&path).expect("read"), HEADER);

    // Its first record torn: back to the header alone.
    let mut bytes = HEADER.to_vec();
    bytes.extend_from_slice(&record(7, b"seven")[..12]);
    fs::write(&path, &bytes).expect("write");
    let r = recover(&path, true, &mut Toy::new(7)).expect("recover");
    assert_eq!(r.end, START);
    assert_eq!(r.torn.map(|t| t.dropped_bytes), Some(12));
    assert_eq!(fs::read(&path).expect("read"), HEADER);
}

#[test]
fn damage_in_a_middle_segment_is_an_error_naming_file_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_segment(dir.path(), 1, &segment(1, 3));
    let mut middle = segment(4, 3);
    // A payload byte of record 5.
    let bad = offset_of(4, 1);
    middle[bad as usize + 10] ^= 0x40;
    write_segment(dir.path(), 4, &middle);
    write_segment(dir.path(), 7, &segment(7, 2));

    let listing = list_segments(dir.path(), EXT).expect("list");
    let count = listing.segments.len();
    let mut toy = Toy::new(1);
    let mut outcome = Ok(());
    for (i, s) in listing.segments.iter().enumerate() {
        if let Err(e) = recover(&s.path, i + 1 == count, &mut toy) {
            outcome = Err(e);
            break;
        }
    }
    let e = outcome.expect_err("damage");
    let text = e.to_string();
    let (path, offset, what) = damaged(Err(e));
    assert_eq!(
        (path.as_path(), offset, what.as_str()),
        (
            listing.segments[1].path.as_path(),
            bad,
            "record 5 checksum mismatch"
        )
    );
    assert!(
        text.contains("000000000004.toy") && text.contains(&format!(", offset {bad}: ")),
        "{text}"
    );
    assert_eq!(fs::read(&listing.segments[1].path).expect("read"), middle);

    // A torn tail of a segment before the last is damage too, and is not cut.
    let mut torn = segment(4, 3);
    torn.truncate(torn.len() - 3);
    fs::write(&listing.segments[1].path, &torn).expect("write");
    let r = recover(&listing.segments[1].path, false, &mut Toy::new(4));
    assert_eq!(
        damaged(r).1,
        offset_of(4, 2),
        "the last record of the middle segment"
    );
    assert_eq!(fs::read(&listing.segments[1].path).expect("read"), torn);
}

#[test]
fn a_bad_record_before_an_intact_one_in_the_last_segment_is_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = segment(1, 4);
    let bad = offset_of(1, 1);
    bytes[bad as usize + 10] ^= 1;
    let path = write_segment(dir.path(), 1, &bytes);
    let r = recover(&path, true, &mut Toy::new(1));
    let (p, offset, what) = damaged(r);
    assert_eq!((p, offset), (path.clone(), bad));
    assert_eq!(
        what,
        format!(
            "record 2 checksum mismatch; an intact record 3 follows at offset {}",
            offset_of(1, 2)
        )
    );
    assert_eq!(fs::read(&path).expect("read"), bytes);
}

#[test]
fn an_intact_record_across_the_scan_window_edge_is_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = segment(1, 1);
    let bad = good.len() as u64;
    // The search starts one byte after the bad record; its first window ends SCAN_CHUNK later.
    let edge = bad + 1 + SCAN_CHUNK as u64;
    for before_edge in 0..=5u64 {
        let at = edge - before_edge;
        let mut bytes = good.clone();
        bytes.resize(at as usize, 0xAB);
        bytes.extend_from_slice(&record(2, b"after the edge"));
        let path = write_segment(dir.path(), 1, &bytes);
        let (_, offset, what) = damaged(recover(&path, true, &mut Toy::new(1)));
        assert_eq!(offset, bad);
        assert_eq!(
            what,
            format!("bad record magic; an intact record 2 follows at offset {at}"),
            "{before_edge} bytes before the edge"
        );
    }
}

/// A format that fails reads, or breaks its contract by taking a record of no bytes.
struct Broken {
    fail: bool,
}

impl RecordFormat for Broken {
    const RECORD_MAGIC: &'static [u8] = b"X";

    fn check_next(&mut self, _: &File, _: u64, _: u64) -> io::Result<RecordCheck> {
        if self.fail {
            Err(io::Error::other("disk on fire"))
        } else {
            Ok(RecordCheck::Valid(0))
        }
    }

    fn intact_record_at(&self, _: &File, _: u64, _: u64) -> io::Result<Option<u64>> {
        Ok(None)
    }
}

#[test]
fn a_failed_read_or_a_broken_format_cuts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_segment(dir.path(), 1, &segment(1, 2));
    let seg = OpenSegment::open(&path, true).expect("open");
    match seg.recover_records(START, &mut Broken { fail: true }) {
        Err(RecoverError::Io(e)) => {
            assert_eq!((e.step, e.path.as_path()), ("reading", path.as_path()));
        }
        other => panic!("expected Io, got {other:?}"),
    }
    let r = seg.recover_records(START, &mut Broken { fail: false });
    assert_eq!(damaged(r).1, START);
    assert_eq!(fs::read(&path).expect("read"), segment(1, 2));

    // A missing file: the step and the path.
    let e = OpenSegment::open(&dir.path().join("gone.toy"), false).expect_err("missing");
    assert_eq!((e.step, e.kind()), ("opening", io::ErrorKind::NotFound));
    // A middle segment is opened read-only.
    let seg = OpenSegment::open(&path, false).expect("open");
    assert!(seg.file.write_all_at(b"x", 0).is_err());
}
