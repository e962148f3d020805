use super::*;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn small() -> Limits {
    Limits {
        max_bytes: 1 << 20,
        segment_bytes: 8 * 1024,
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == SEGMENT_EXT))
        .collect();
    v.sort();
    v
}

/// Appends `n` writes of 1000 bytes (seeded by their sequence number), a zero and a trim.
fn fill(log: &mut ChangeLog, n: u64) {
    for i in 0..n {
        let data = pattern(i, 1000);
        let seq = log
            .append(Change::Write {
                offset: i * 512,
                data: &data,
            })
            .unwrap();
        assert_eq!(seq, i + 1);
    }
}

fn all(log: &ChangeLog, from: u64) -> Vec<Record> {
    log.read_from(from)
        .unwrap()
        .collect::<Result<Vec<_>>>()
        .unwrap()
}

#[test]
fn round_trip_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = ChangeLog::open(dir.path(), small()).unwrap();
    assert_eq!(log.stats().next_seq, 1);
    fill(&mut log, 20);
    assert_eq!(
        log.append(Change::Zero {
            offset: 4096,
            len: 1 << 30
        })
        .unwrap(),
        21
    );
    assert_eq!(
        log.append(Change::Trim {
            offset: 8192,
            len: 512
        })
        .unwrap(),
        22
    );
    assert_eq!(log.written_seq(), 22);
    assert!(
        log.durable_seq() < 22,
        "appended is not durable before sync"
    );
    assert_eq!(log.sync().unwrap(), 22);
    assert!(
        segment_files(dir.path()).len() > 1,
        "small segments roll over"
    );

    let check = |recs: &[Record], from: u64| {
        for r in recs {
            assert!(r.seq >= from);
            if r.seq <= 20 {
                let i = r.seq - 1;
                assert_eq!((r.kind, r.offset, r.len), (Kind::Write, i * 512, 1000));
                assert_eq!(r.data, pattern(i, 1000));
            }
        }
        assert_eq!(recs.len() as u64, 22 - from + 1);
        assert_eq!(recs.last().unwrap().kind, Kind::Trim);
    };
    check(&all(&log, 1), 1);
    check(&all(&log, 13), 13);
    assert_eq!(all(&log, 23).len(), 0);
    assert!(log.read_from(24).is_err());
    let stats = log.stats();
    drop(log);

    let mut log = ChangeLog::open(dir.path(), small()).unwrap();
    assert_eq!(log.stats(), stats);
    check(&all(&log, 1), 1);
    let zero = all(&log, 21);
    assert_eq!(
        (zero[0].kind, zero[0].offset, zero[0].len),
        (Kind::Zero, 4096, 1 << 30)
    );
    assert!(zero[0].data.is_empty());
    assert_eq!(
        log.append(Change::Trim {
            offset: 0,
            len: 512
        })
        .unwrap(),
        23
    );
}

#[test]
fn second_open_is_refused_while_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _log = ChangeLog::open(dir.path(), small()).unwrap();
    let err = ChangeLog::open(dir.path(), small()).unwrap_err();
    assert!(matches!(err, LogError::Locked { .. }), "{err}");
}

#[test]
fn damage_in_an_earlier_segment_names_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = ChangeLog::open(dir.path(), small()).unwrap();
    fill(&mut log, 30);
    log.sync().unwrap();
    drop(log);
    let files = segment_files(dir.path());
    assert!(files.len() >= 3);
    // Third record of the first segment: header 32, each record 36 + 1000.
    let rec = SEGMENT_HEADER_LEN + 2 * (RECORD_HEADER_LEN + 1000);
    let f = OpenOptions::new().write(true).open(&files[0]).unwrap();
    f.write_all_at(&[0xEE], rec + RECORD_HEADER_LEN + 77)
        .unwrap();
    drop(f);
    let err = ChangeLog::open(dir.path(), small()).unwrap_err();
    match &err {
        LogError::Damaged { path, offset, what } => {
            assert_eq!(path, &files[0]);
            assert_eq!(*offset, rec);
            assert!(what.contains("checksum"), "{what}");
        }
        other => panic!("expected Damaged, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("000000000001.hlog") && msg.contains(&format!("offset {rec}")),
        "{msg}"
    );
}

#[test]
fn damage_in_the_middle_of_the_last_segment_is_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_bytes: 1 << 20,
        segment_bytes: 1 << 20,
    };
    let mut log = ChangeLog::open(dir.path(), limits).unwrap();
    fill(&mut log, 10);
    log.sync().unwrap();
    drop(log);
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    let rec = SEGMENT_HEADER_LEN + 4 * (RECORD_HEADER_LEN + 1000);
    let f = OpenOptions::new().write(true).open(&files[0]).unwrap();
    f.write_all_at(&[0xFF; 4], rec + 8).unwrap(); // the sequence number
    drop(f);
    match ChangeLog::open(dir.path(), limits).unwrap_err() {
        LogError::Damaged { path, offset, what } => {
            assert_eq!((path, offset), (files[0].clone(), rec));
            assert!(what.contains("intact record 6"), "{what}");
        }
        other => panic!("expected Damaged, got {other}"),
    }
}

#[test]
fn damaged_header_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = ChangeLog::open(dir.path(), small()).unwrap();
    fill(&mut log, 30);
    drop(log);
    let files = segment_files(dir.path());
    let f = OpenOptions::new().write(true).open(&files[1]).unwrap();
    f.write_all_at(&[0], 3).unwrap();
    drop(f);
    match ChangeLog::open(dir.path(), small()).unwrap_err() {
        LogError::Damaged { path, offset, what } => {
            assert_eq!((path, offset), (files[1].clone(), 0));
            assert!(what.contains("magic"), "{what}");
        }
        other => panic!("expected Damaged, got {other}"),
    }
}

#[test]
fn torn_tail_is_truncated_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = ChangeLog::open(dir.path(), small()).unwrap();
    fill(&mut log, 30);
    log.sync().unwrap();
    drop(log);
    let last = segment_files(dir.path()).pop().unwrap();
    let good_len = fs::metadata(&last).unwrap().len();

    // A record cut short in its payload.
    let f = OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(good_len - 300).unwrap();
    drop(f);
    let mut log = ChangeLog::open(dir.path(), small()).unwrap();
    assert_eq!(log.written_seq(), 29);
    assert_eq!(log.durable_seq(), 29);
    assert_eq!(
        fs::metadata(&last).unwrap().len(),
        good_len - RECORD_HEADER_LEN - 1000
    );
    let data = pattern(29, 1000);
    assert_eq!(
        log.append(Change::Write {
            offset: 29 * 512,
            data: &data
        })
        .unwrap(),
        30
    );
    log.sync().unwrap();
    drop(log);

    // Garbage after the last record, and a header cut short.
    for junk in [
        &b"HVNR\x01\x00\x00\x00garbage"[..],
        &[0u8; 20][..],
        &[0xAB; 5000][..],
    ] {
        let f = OpenOptions::new().append(true).open(&last).unwrap();
        std::io::Write::write_all(&mut &f, junk).unwrap();
        drop(f);
        let log = ChangeLog::open(dir.path(), small()).unwrap();
        assert_eq!(log.written_seq(), 30);
        assert_eq!(fs::metadata(&last).unwrap().len(), good_len);
        assert_eq!(all(&log, 1).len(), 30);
    }
}

#[test]
fn leftover_temporary_segment_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = ChangeLog::open(dir.path(), small()).unwrap();
    fill(&mut log, 3);
    drop(log);
    // `haven_fsutil::write_atomic`'s temporary names, and the fixed one of older builds.
    let left = [
        "000000000004.hlog.tmp",
        ".000000000004.hlog.4242.0.tmp",
        ".overflowed.4242.1.tmp",
    ];
    for name in left {
        fs::write(dir.path().join(name), b"HVNC").unwrap();
    }
    let log = ChangeLog::open(dir.path(), small()).unwrap();
    assert_eq!(log.written_seq(), 3);
    assert!(!log.is_overflowed());
    for name in left {
        assert!(!dir.path().join(name).exists(), "{name} left");
    }
}

#[test]
fn log_full_refuses_and_appends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_bytes: 16 * 1024,
        segment_bytes: 8 * 1024,
    };
    let mut log = ChangeLog::open(dir.path(), limits).unwrap();
    let data = pattern(1, 1000);
    let mut n = 0;
    let err = loop {
        match log.append(Change::Write {
            offset: 0,
            data: &data,
        }) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            err,
            LogError::LogFull {
                max_bytes: 16384,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("change log full"), "{err}");
    let before = log.stats();
    let files_before: Vec<u64> = segment_files(dir.path())
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .collect();
    assert!(before.bytes_used <= 16 * 1024);
    assert_eq!(before.last_seq, n);
    assert!(
        log.append(Change::Write {
            offset: 0,
            data: &data
        })
        .is_err()
    );
    assert_eq!(log.stats(), before);
    let files_after: Vec<u64> = segment_files(dir.path())
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .collect();
    assert_eq!(files_before, files_after);
    // A record without payload may still fit.
    log.sync().unwrap();
    drop(log);
    let log = ChangeLog::open(dir.path(), limits).unwrap();
    assert_eq!(log.written_seq(), n);

    // Releasing makes room again.
    let mut log = log;
    log.release(n).unwrap();
    assert_eq!(
        log.append(Change::Write {
            offset: 0,
            data: &data
        })
        .unwrap(),
        n + 1
    );
}

#[test]
fn release_frees_whole_segments_and_keeps_numbering() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = ChangeLog::open(dir.path(), small()).unwrap();
    fill(&mut log, 40);
    log.sync().unwrap();
    let files = segment_files(dir.path());
    let before = log.stats();
    assert_eq!(before.segments, files.len());
    // Each 8 KiB segment holds 7 records of 1036 bytes: 1..=7, 8..=14, ...
    assert_eq!(
        log.release(10).unwrap(),
        SEGMENT_HEADER_LEN + 7 * (RECORD_HEADER_LEN + 1000)
    );
    let after = log.stats();
    assert_eq!(after.first_seq, 8);
    assert_eq!(after.segments, before.segments - 1);
    assert!(!files[0].exists());
    assert!(log.read_from(7).is_err());
    assert_eq!(all(&log, 8).len(), 33);

    // Everything released: a fresh active segment keeps the numbering across a restart.
    log.release(u64::MAX).unwrap();
    let st = log.stats();
    assert_eq!((st.segments, st.first_seq, st.next_seq), (1, 41, 41));
    assert_eq!(st.bytes_used, SEGMENT_HEADER_LEN);
    drop(log);
    let mut log = ChangeLog::open(dir.path(), small()).unwrap();
    assert_eq!(log.stats().next_seq, 41);
    assert_eq!(
        log.append(Change::Zero {
            offset: 0,
            len: 512
        })
        .unwrap(),
        41
    );
}

/// With `Durability::Process` nothing is synced while the log runs, yet everything reads back
/// after a reopen in the same boot (the kernel keeps it), a segment whose creation a killed
/// process cut short is removed, and `sync_to_disk` makes every record durable.
#[test]
fn process_durability_rolls_without_syncs_and_reopens_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = ChangeLog::open(dir.path(), small()).unwrap();
    log.set_durability(Durability::Process);
    fill(&mut log, 40);
    assert!(segment_files(dir.path()).len() > 3, "segments rolled");
    assert!(log.sync_handle().unwrap().file.is_none(), "nothing to sync");
    assert_eq!(log.sync().unwrap(), 40);
    assert_eq!(log.sync_to_disk().unwrap(), 40);
    drop(log);
    // A killed process left the next segment shorter than its header.
    let cut = dir.path().join(segment_file_name(41, SEGMENT_EXT));
    fs::write(&cut, &encode_segment_header(41)[..7]).unwrap();
    let log = ChangeLog::open(dir.path(), small()).unwrap();
    assert!(!cut.exists(), "the cut-short segment is removed");
    let records = all(&log, 1);
    assert_eq!(records.len(), 40);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.data, pattern(i as u64, 1000));
    }
    assert_eq!(log.stats().next_seq, 41);
}

/// With `Durability::Process` released segment files are reused: the records written over a
/// reused file's older bytes read back, and a log dropped without a clean stop (a killed
/// process) reopens with exactly the records written, the reused file's older tail cut off.
#[test]
fn process_durability_reuses_released_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = ChangeLog::open(dir.path(), small()).unwrap();
    log.set_durability(Durability::Process);
    fill(&mut log, 40);
    log.release(20).unwrap();
    assert_eq!(log.spares.len(), MAX_SPARES, "released files are kept");
    let spares = log.spares.clone();
    for i in 40..50 {
        let data = pattern(i, 1000);
        log.append(Change::Write {
            offset: i * 512,
            data: &data,
        })
        .unwrap();
    }
    assert!(log.spares.len() < MAX_SPARES, "spares were reused");
    assert!(spares.iter().any(|s| !s.exists()));
    let first = log.stats().first_seq;
    drop(log);
    let log = ChangeLog::open(dir.path(), small()).unwrap();
    let records = all(&log, first);
    assert_eq!(records.len() as u64, 50 - first + 1);
    for r in &records {
        assert_eq!(r.data, pattern(r.seq - 1, 1000), "record {}", r.seq);
    }
    assert_eq!(log.stats().next_seq, 51);
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(SPARE_PREFIX)
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "spares of the earlier run are removed"
    );
}
