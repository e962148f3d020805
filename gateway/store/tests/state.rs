//! The redb state database.

use haven_store::{StateDb, StoreError, StreamKey, StreamRecord};
use serde::{Deserialize, Serialize};

fn sk(p: u8, disk: u32) -> StreamKey {
    StreamKey {
        peer: [p; 16],
        disk,
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
        applied_seq: 8,
        released_seq: 5,
        created_ms: 1_700_000_000_000,
        error: None,
        replica_path: Some("site-a/web01.raw".into()),
        seeding: true,
        seed_compared: 1 << 29,
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
fn concurrent_updates_of_different_fields_keep_both() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = std::sync::Arc::new(StateDb::open(&tmp.path().join("state.redb")).expect("open"));
    db.put_stream(sk(1, 0), &StreamRecord::default())
        .expect("put");
    // One writer advances the applied seq while another names the machine, over and over.
    let applier = {
        let db = db.clone();
        std::thread::spawn(move || {
            for seq in 1..=200 {
                db.update_stream(sk(1, 0), move |r| r.applied_seq = seq)
                    .expect("update");
            }
        })
    };
    for i in 0..200 {
        db.update_stream(sk(1, 0), move |r| r.machine_name = format!("web{i:02}"))
            .expect("update");
    }
    applier.join().expect("applier thread");
    let r = db.get_stream(sk(1, 0)).expect("get").expect("stored");
    assert_eq!((r.applied_seq, r.machine_name.as_str()), (200, "web199"));
    assert_eq!(
        db.update_stream(sk(9, 9), |r| r.applied_seq = 1)
            .expect("update"),
        None
    );
}

#[test]
fn stream_record_grows_compatibly() {
    // An older record with only `size` (and an unknown newer field) still decodes.
    let r: StreamRecord = serde_json::from_str(r#"{"size": 42, "future": true}"#).expect("decode");
    assert_eq!(r.size, 42);
    assert_eq!(r.machine_name, "");
    assert!(serde_json::from_str::<StreamRecord>("{}").is_err());
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

#[test]
fn writes_from_many_threads_are_each_durable_when_they_return() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("state.redb");
    let db = std::sync::Arc::new(StateDb::open(&path).expect("open"));
    // Eight writers at once: their writes are committed in groups, each one durable (and
    // visible) by the time its call returns.
    let writers: Vec<_> = (0..8u32)
        .map(|t| {
            let db = db.clone();
            std::thread::spawn(move || {
                for i in 0..100u32 {
                    let key = format!("w/{t}/{i:03}");
                    db.put_json(&key, &(t * 1000 + i)).expect("put");
                    assert_eq!(db.get_json::<u32>(&key).expect("get"), Some(t * 1000 + i));
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread");
    }
    drop(db);
    let db = StateDb::open(&path).expect("reopen");
    let all: Vec<(String, u32)> = db.json_with_prefix("w/").expect("list");
    assert_eq!(all.len(), 800);
    for (key, value) in all {
        let mut parts = key
            .split('/')
            .skip(1)
            .map(|p| p.parse::<u32>().expect("number"));
        let (t, i) = (parts.next().expect("t"), parts.next().expect("i"));
        assert_eq!(value, t * 1000 + i, "{key}");
    }
}
