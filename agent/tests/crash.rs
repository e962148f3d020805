//! The agent killed (SIGKILL) in the middle of a workload: after a restart on the same log
//! folder, every write acknowledged before the last completed FLUSH is on the backing disk and
//! in the log.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const HALF: u64 = DISK_SIZE / 2;
const SLOT: u64 = 32 * 1024;
/// Offsets where the marker reads after each flush go (never written).
const MARKERS: u64 = 62 * 1024 * 1024;

fn log_bytes(dir: &std::path::Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn sigkill_during_a_workload_loses_nothing_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let reference = dir.path().join("reference.raw");
    let log_dir = dir.path().join("log");
    sparse_file(&disk, DISK_SIZE);
    sparse_file(&reference, DISK_SIZE);
    let seg = ["--log-segment-bytes", "2097152"];
    let mut agent = Agent::start(dir.path(), &disk, &log_dir, false, &seg);

    // Phase A, in the first half: a random workload that ends with a completed flush.
    let mut rng = Rng::new(0xC0A5_0001);
    let mut a = workload(&mut rng, 60, 0, HALF);
    a.push("flush".into());
    qemu_io_ok(&agent.unix_url(), &a);
    qemu_io_ok(reference.to_str().unwrap(), &a);

    // Phase B, in the second half: one write per 64 KiB slot (so each can be checked on its
    // own), a flush every 8 writes followed by a marker read that shows the flush completed.
    // The agent is killed while it runs.
    let mut b = Vec::new();
    let mut writes = Vec::new(); // (command index, offset, len, pattern)
    for i in 0..900u64 {
        let off = HALF + i * SLOT + rng.below(2048);
        let len = 1 + rng.below(SLOT - 2048);
        let pattern = 1 + (i % 255) as u8;
        writes.push((b.len(), off, len, pattern));
        b.push(format!("write -P {pattern} {off} {len}"));
        if i % 8 == 7 {
            b.push("flush".into());
            b.push(format!("read {} 512", MARKERS + b.len() as u64 * 512));
        }
    }
    let mut qio = Command::new("qemu-io");
    qio.args(["-f", "raw"]);
    for c in &b {
        qio.arg("-c").arg(c);
    }
    let qio = qio
        .arg(agent.unix_url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill once the log has grown by a few MiB: about a third of the way through phase B.
    let start = log_bytes(&log_dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while log_bytes(&log_dir) < start + 4 * 1024 * 1024 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    agent.kill();
    let out = qio.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);

    // The last flush whose marker read completed: every write before it was acknowledged and
    // must have survived.
    let mut last_flushed = 0;
    for (idx, c) in b.iter().enumerate() {
        if let Some(rest) = c.strip_prefix("read ") {
            let off = rest.split(' ').next().unwrap();
            if stdout.contains(&format!("read 512/512 bytes at offset {off}\n")) {
                last_flushed = idx;
            }
        }
    }
    let must_survive: Vec<_> = writes.iter().filter(|w| w.0 < last_flushed).collect();
    eprintln!(
        "killed after {} of {} phase-B writes were flushed",
        must_survive.len(),
        writes.len()
    );

    // A torn record at the end of the last segment, as a crash in the middle of an append
    // leaves it.
    let mut segs: Vec<_> = fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "hlog"))
        .collect();
    segs.sort();
    assert!(segs.len() > 1, "the log rolled over");
    let mut f = OpenOptions::new()
        .append(true)
        .open(segs.last().unwrap())
        .unwrap();
    f.write_all(b"HVNR\x01\x00\x00\x00 a record cut short by the crash")
        .unwrap();
    drop(f);

    // The agent restarts on the same log: the tail is truncated, phase A reads back.
    let mut agent = Agent::start(dir.path(), &disk, &log_dir, false, &seg);
    let text = agent.log_text();
    assert!(text.contains("truncating torn tail"), "{text}");
    let check_a: Vec<String> = vec![format!("read 0 {HALF}")];
    qemu_io_ok(&agent.unix_url(), &check_a);
    // It keeps logging after the restart, in sequence.
    let c = vec!["write -P 0xee 100 10000".to_string(), "flush".to_string()];
    qemu_io_ok(&agent.unix_url(), &c);
    qemu_io_ok(reference.to_str().unwrap(), &c);
    agent.kill();

    let records = log_dump(&log_dir);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(
            r.0,
            i as u64 + 1,
            "sequence numbers stay contiguous across the crash"
        );
    }
    let replayed = dir.path().join("replayed.raw");
    replay_onto_zeroes(&log_dir, &replayed);

    let disk_bytes = fs::read(&disk).unwrap();
    let ref_bytes = fs::read(&reference).unwrap();
    let replay_bytes = fs::read(&replayed).unwrap();
    let half = HALF as usize;
    assert!(
        disk_bytes[..half] == ref_bytes[..half],
        "phase A and C are on the backing disk"
    );
    assert!(
        replay_bytes[..half] == ref_bytes[..half],
        "phase A and C are in the log"
    );
    for &&(_, off, len, pattern) in &must_survive {
        let range = off as usize..(off + len) as usize;
        assert!(
            disk_bytes[range.clone()].iter().all(|&x| x == pattern),
            "flushed write at {off}+{len} missing from the backing disk"
        );
        assert!(
            replay_bytes[range].iter().all(|&x| x == pattern),
            "flushed write at {off}+{len} missing from the log"
        );
    }
    // Every slot holds its whole write or nothing in the log replay (order and completeness:
    // no record is cut or misplaced).
    for &(_, off, len, pattern) in &writes {
        let slot = &replay_bytes[off as usize..(off + len) as usize];
        assert!(
            slot.iter().all(|&x| x == pattern) || slot.iter().all(|&x| x == 0),
            "write at {off}+{len} is partial in the log"
        );
    }
}
