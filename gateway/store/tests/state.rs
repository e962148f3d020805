//! The redb state database.

use haven_store::{EntryKind, EntryMeta, StateDb, StoreError, StreamKey, StreamRecord};
use serde::{Deserialize, Serialize};

fn sk(p: u8, disk: u32) -> StreamKey {
    StreamKey {
        peer: [p; 16],
        disk,
    }
}

fn entry(seq: u64, kind: EntryKind, offset: u64, len: u64) -> EntryMeta {
    EntryMeta {
        seq,
        kind,
        offset,
        len,
        stored_bytes: len / 2 + 72,
        segment: seq / 10,
    }
}

#[test]
fn streams_survive_reopen() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("state.redb");
    let a = StreamRecord {
        size: 1 << 30,
        block_size: 512,
        machine_name: "web01".into(),
        durable_seq: 10,
        applied_seq: 8,
        released_seq: 5,
        created_ms: 1_700_000_000_000,
        error: None,
    };
    let b = StreamRecord {
        size: 4 << 30,
        error: Some("target writer failed".into()),
        ..StreamRecord::default()
    };
    {
        let db = StateDb::open(&path).expect("open");
        assert!(matches!(
            StateDb::open(&path),
            Err(StoreError::Locked { .. })
        ));
        db.put_stream(sk(2, 0), &b).expect("put");
        db.put_stream(sk(1, 1), &a).expect("put");
        db.put_stream(sk(1, 0), &a).expect("put");
        assert_eq!(db.get_stream(sk(1, 1)).expect("get"), Some(a.clone()));
        assert_eq!(db.get_stream(sk(9, 9)).expect("get"), None);
    }
    let db = StateDb::open(&path).expect("reopen");
    let all = db.streams().expect("streams");
    let keys: Vec<StreamKey> = all.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, vec![sk(1, 0), sk(1, 1), sk(2, 0)]);
    assert_eq!(all[2].1, b);
    assert_eq!(sk(0xab, 7).to_string(), format!("{}/7", "ab".repeat(16)));
    db.remove_stream(sk(1, 0)).expect("remove");
    assert_eq!(db.get_stream(sk(1, 0)).expect("get"), None);
}

#[test]
fn stream_record_grows_compatibly() {
    // An older record with only `size` (and an unknown newer field) still decodes.
    let r: StreamRecord = serde_json::from_str(r#"{"size": 42, "future": true}"#).expect("decode");
    assert_eq!(r.size, 42);
    assert_eq!(r.machine_name, "");
    assert!(serde_json::from_str::<StreamRecord>("{}").is_err());
}

#[test]
fn journal_index() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = StateDb::open(&tmp.path().join("state.redb")).expect("open");
    let s = sk(1, 0);
    let other = sk(1, 1);
    let entries = vec![
        entry(1, EntryKind::Write, 0, 4096),
        entry(2, EntryKind::Write, 8192, 4096),
        entry(3, EntryKind::Zero, 4096, 8192),
        entry(4, EntryKind::Tag, 0, 0),
        entry(5, EntryKind::Trim, 1 << 20, 1 << 20),
        entry(7, EntryKind::Write, 6000, 100),
    ];
    db.index_put(s, &entries).expect("put");
    db.index_put(other, &[entry(3, EntryKind::Write, 0, 1 << 30)])
        .expect("put other");
    assert_eq!(db.index_range(s, 0, u64::MAX).expect("range"), entries);
    assert_eq!(
        db.index_range(s, 2, 4).expect("range"),
        entries[1..4].to_vec()
    );
    assert_eq!(db.index_range(s, 6, 6).expect("range"), vec![]);
    assert_eq!(db.index_range(s, 5, 1).expect("range"), vec![]);

    let seqs = |v: Vec<EntryMeta>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
    // [4096, 8192) overlaps 3 (4096..12288) and 7 (6000..6100); 1 ends at 4096, 2 starts at 8192.
    assert_eq!(
        seqs(db.index_overlapping(s, 4096, 4096, 100).expect("overlap")),
        vec![3, 7]
    );
    assert_eq!(
        seqs(db.index_overlapping(s, 4096, 4096, 5).expect("overlap")),
        vec![3]
    );
    assert_eq!(
        seqs(db.index_overlapping(s, 0, 1, 100).expect("overlap")),
        vec![1]
    );
    assert_eq!(
        seqs(db.index_overlapping(s, 0, u64::MAX, 100).expect("overlap")),
        vec![1, 2, 3, 5, 7]
    );
    assert_eq!(
        seqs(db.index_overlapping(s, 4096, 0, 100).expect("overlap")),
        Vec::<u64>::new()
    );

    assert_eq!(db.index_remove_upto(s, 3).expect("remove"), 3);
    assert_eq!(
        seqs(db.index_range(s, 0, u64::MAX).expect("range")),
        vec![4, 5, 7]
    );
    assert_eq!(db.index_range(other, 0, u64::MAX).expect("range").len(), 1);
    // Replacing an entry.
    db.index_put(s, &[entry(5, EntryKind::Zero, 0, 1)])
        .expect("put");
    assert_eq!(
        db.index_range(s, 5, 5).expect("range"),
        vec![entry(5, EntryKind::Zero, 0, 1)]
    );
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Site {
    name: String,
    rpo_seconds: u32,
}

#[test]
fn meta_values() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("state.redb");
    let site = Site {
        name: "primary".into(),
        rpo_seconds: 30,
    };
    {
        let db = StateDb::open(&path).expect("open");
        assert_eq!(db.get_json::<Site>("site").expect("get"), None);
        db.put_json("site", &site).expect("put");
        db.put_json("agents/web01", &vec![1u32, 2, 3]).expect("put");
    }
    let db = StateDb::open(&path).expect("reopen");
    assert_eq!(db.get_json::<Site>("site").expect("get"), Some(site));
    assert_eq!(
        db.get_json::<Vec<u32>>("agents/web01").expect("get"),
        Some(vec![1, 2, 3])
    );
    assert!(matches!(
        db.get_json::<Site>("agents/web01"),
        Err(StoreError::Db(_))
    ));
    db.remove_json("site").expect("remove");
    db.remove_json("never stored").expect("removing nothing");
    assert_eq!(db.get_json::<Site>("site").expect("get"), None);
    assert!(
        db.get_json::<Vec<u32>>("agents/web01")
            .expect("get")
            .is_some()
    );

    // Values under a prefix, in key order; one transaction puts and removes.
    let puts: Vec<(String, u32)> = [3u32, 1, 2, 10]
        .iter()
        .map(|i| (format!("point/a/{i:03}"), *i))
        .collect();
    db.update_json(&puts, &[]).expect("puts");
    db.put_json("point/ab/001", &99u32).expect("put");
    db.put_json("point/b", &98u32).expect("put");
    db.update_json(
        &[("point/a/004".to_string(), 4u32)],
        &["point/a/002".to_string()],
    )
    .expect("update");
    let got: Vec<(String, u32)> = db.json_with_prefix("point/a/").expect("prefix");
    assert_eq!(
        got.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
        vec![1, 3, 4, 10]
    );
    assert_eq!(got[0].0, "point/a/001");
}
