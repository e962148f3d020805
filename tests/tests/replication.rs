//! End to end: agent → process server → master target, real processes on loopback, real QUIC
//! with mutual TLS, qemu-io as the workload, qemu-img as the judge.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use haven_e2e::{Cluster, ClusterOptions, Rng, images_equal, mixed_disk, now_ms, qemu_io};

const DISK: u64 = 64 << 20;
const CATCH_UP: Duration = Duration::from_secs(180);

/// qemu-io commands: random offsets and lengths (unaligned ones too), zero writes, trims,
/// flushes.
fn workload(rng: &mut Rng, n: usize) -> Vec<String> {
    let mut cmds = Vec::new();
    for _ in 0..n {
        let len = 1 + rng.below(256 << 10);
        let off = rng.below(DISK - len);
        let cmd = match rng.below(10) {
            0 => format!("write -z {} {}", off / 512 * 512, (len / 512 + 1) * 512),
            1 => format!("discard {} {}", off / 4096 * 4096, (len / 4096 + 1) * 4096),
            2 => "flush".to_string(),
            _ => format!("write -P {} {off} {len}", rng.below(255) + 1),
        };
        cmds.push(cmd);
    }
    cmds
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn assert_replica_equal(c: &Cluster) {
    let replica = c.replica().unwrap();
    let equal = images_equal(&c.agent.disk, &replica).unwrap();
    assert!(
        equal,
        "replica {} differs from source {}\nagent log:\n{}\nps log:\n{}\nmt log:\n{}",
        replica.display(),
        c.agent.disk.display(),
        log_tail(&c.agent.proc.log),
        log_tail(&c.ps.proc.log),
        log_tail(&c.mt.proc.log)
    );
}

#[test]
fn workload_during_initial_sync_converges_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("web01.raw");
    mixed_disk(&disk, DISK, 7).unwrap();
    let mut c = Cluster::start(dir.path(), &disk, ClusterOptions::default()).unwrap();
    // The workload starts at once, while the initial pass runs.
    let mut rng = Rng(0x5eed_0001);
    for _ in 0..4 {
        qemu_io(&c.agent.nbd, &workload(&mut rng, 50)).unwrap();
    }
    let done = now_ms();
    c.wait_caught_up(done, CATCH_UP, |_, _| {}).unwrap();
    assert_replica_equal(&c);

    // The status surface reports the disk as protected with no lag (the agent's state reaches
    // the master target with its next forwarded report, within a few seconds).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mt = loop {
        let mt = c.mt.status().unwrap().master_target.unwrap();
        if mt.replicas[0].state() == "protected" || std::time::Instant::now() > deadline {
            break mt;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let r = &mt.replicas[0];
    assert_eq!(r.state(), "protected");
    assert_eq!(r.machine_name, "web01");
    assert_eq!(r.lag_bytes, 0);
    assert_eq!(r.size, DISK);
    let ps = c.ps.status().unwrap().process_server.unwrap();
    assert!(ps.upstream_connected);
    assert_eq!(ps.disks[0].durable_seq, ps.disks[0].forwarded_seq);

    // And delta replication continues.
    qemu_io(&c.agent.nbd, &workload(&mut rng, 30)).unwrap();
    c.wait_caught_up(now_ms(), CATCH_UP, |_, _| {}).unwrap();
    assert_replica_equal(&c);
}

#[test]
fn sigkill_of_any_process_loses_nothing() {
    // A pinned seed by default, so a run is repeatable; `HAVEN_CRASH_SEED=random` draws one
    // (printed, to replay), a number replays it.
    let seed: u64 = match std::env::var("HAVEN_CRASH_SEED").ok().as_deref() {
        Some("random") => now_ms() | 1,
        Some(s) => s.parse().expect("HAVEN_CRASH_SEED: a number, or `random`"),
        None => 0x4841_5645_4e01,
    };
    let kills: usize = std::env::var("HAVEN_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(21);
    eprintln!("crash schedule seed {seed} ({kills} kills); replay with HAVEN_CRASH_SEED={seed}");
    let mut rng = Rng(seed);

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("db01.raw");
    mixed_disk(&disk, DISK, seed).unwrap();
    let mut c = Cluster::start(dir.path(), &disk, ClusterOptions::default()).unwrap();

    // A workload runs on its own thread through every kill; a write cut short by the agent's
    // death is an error for qemu-io, and either reached the disk and the log or neither.
    let stop = Arc::new(AtomicBool::new(false));
    let nbd = c.agent.nbd.clone();
    let worker = {
        let stop = stop.clone();
        let mut wrng = Rng(seed.rotate_left(17) | 1);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = qemu_io(&nbd, &workload(&mut wrng, 20));
            }
        })
    };
    for i in 0..kills {
        std::thread::sleep(Duration::from_millis(200 + rng.below(800)));
        let victim = match (i % 3, rng.below(3)) {
            // Each process is killed at least once per three rounds.
            (0, _) => 0,
            (1, _) => 1,
            (_, v) => v,
        };
        match victim {
            0 => c.agent.restart().unwrap(),
            1 => c.ps.restart().unwrap(),
            _ => c.mt.restart().unwrap(),
        }
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    let done = now_ms();
    c.wait_caught_up(done, CATCH_UP, |_, _| {})
        .unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    assert_replica_equal(&c);
}

#[test]
fn lost_change_log_resyncs_only_the_differences() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("app01.raw");
    mixed_disk(&disk, DISK, 3).unwrap();
    let mut c = Cluster::start(dir.path(), &disk, ClusterOptions::default()).unwrap();
    c.wait_caught_up(now_ms(), CATCH_UP, |_, _| {}).unwrap();

    // The agent dies, its log is lost, and the disk changes behind its back: 16 blocks of
    // 64 KiB that neither the log nor the replica know about.
    c.agent.proc.kill();
    std::fs::remove_dir_all(c.agent.data_dir.join("log")).unwrap();
    let mut rng = Rng(0xd1ff);
    let mut changed = 0u64;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 16 {
            let block = rng.below(DISK / 65536);
            if seen.insert(block) {
                let fill = vec![(block as u8) ^ 0x5a; 65536];
                f.write_all_at(&fill, block * 65536).unwrap();
                changed += 65536;
            }
        }
        f.sync_all().unwrap();
    }
    let started = now_ms();
    c.agent.restart().unwrap();
    c.wait_caught_up(started, CATCH_UP, |_, _| {}).unwrap();
    assert_replica_equal(&c);
    let report = c.agent.report().unwrap();
    let sent = report.disks[0].resync_sent_bytes;
    assert!(
        sent >= changed && sent <= 2 * changed,
        "resync sent {sent} bytes for {changed} changed bytes of a {DISK}-byte disk"
    );
}

#[test]
fn a_tampered_cache_record_is_refused_never_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("fs01.raw");
    mixed_disk(&disk, 16 << 20, 5).unwrap();
    let mut c = Cluster::start(dir.path(), &disk, ClusterOptions::default()).unwrap();
    c.wait_caught_up(now_ms(), CATCH_UP, |_, _| {}).unwrap();

    // With the master target away, new writes stay in the process server's cache.
    c.mt.proc.kill();
    qemu_io(
        &c.agent.nbd,
        &["write -P 0xc3 1M 256k".to_string(), "flush".to_string()],
    )
    .unwrap();
    let written = now_ms();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ps = c.ps.status().unwrap().process_server.unwrap();
        let d = &ps.disks[0];
        if let Some(agent) = fresh_report(&c, written)
            && d.durable_seq == agent.disks[0].last_seq
            && d.durable_seq > d.forwarded_seq
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cache never filled: {ps:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // One more start of the process server closes the segment holding the write's record (a
    // journal never appends to a segment again after a restart): the record is then in a
    // sealed segment, where a failed verification cannot be a torn tail.
    c.ps.restart().unwrap();
    c.ps.proc.kill();
    // Flip one byte in the sealed body of the cached record of that write.
    let tampered = tamper_record_at(&c.ps.data_dir.join("ps/cache"), 1 << 20);
    assert!(
        tampered > 0,
        "the write's record was not found in the cache"
    );
    c.ps.restart().unwrap();
    c.mt.restart().unwrap();
    let error = wait_error(|| {
        let ps = c.ps.status().unwrap().process_server.unwrap();
        (ps.disks[0].error.clone(), format!("{ps:?}"))
    });
    assert!(error.contains("failed verification"), "{error}");
    assert_refused(&c, &error);
}

/// The agent's report if it was made after `since_ms`.
fn fresh_report(c: &Cluster, since_ms: u64) -> Option<haven_net::stream::Report> {
    c.agent.report().filter(|r| r.time_ms > since_ms)
}

/// The first error a status reports within a minute; `probe` returns it (if any) and the
/// status, for the failure message.
fn wait_error(mut probe: impl FnMut() -> (Option<String>, String)) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (error, status) = probe();
        if let Some(e) = error {
            return e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no error reported: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The error names the damaged file, and the replica never received the 0xc3 write at 1 MiB.
fn assert_refused(c: &Cluster, error: &str) {
    assert!(error.contains(".hjnl"), "the error names the file: {error}");
    let replica = std::fs::read(c.replica().unwrap()).unwrap();
    assert!(
        replica[1 << 20..(1 << 20) + (256 << 10)]
            .iter()
            .any(|b| *b != 0xc3),
        "the tampered record's data reached the replica"
    );
}

/// Each named failpoint in the gateways' durable paths ends the process exactly there (as a
/// SIGKILL would); after a restart nothing acknowledged is lost and the replica converges.
#[test]
fn a_crash_at_every_named_point_loses_nothing() {
    let points = [
        ("mt", "ingest.after-append"),
        ("mt", "ingest.after-sync"),
        ("mt", "apply.after-write"),
        ("mt", "apply.after-commit"),
        ("ps", "ingest.after-append"),
        ("ps", "ingest.after-sync"),
    ];
    for (side, point) in points {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("pt.raw");
        mixed_disk(&disk, 8 << 20, 9).unwrap();
        let env = vec![("HAVEN_FAILPOINTS".to_string(), format!("{point}=exit"))];
        let mut options = ClusterOptions::default();
        if side == "mt" {
            options.mt_env = env;
        } else {
            options.ps_env = env;
        }
        let mut c = Cluster::start(dir.path(), &disk, options).unwrap();
        qemu_io(
            &c.agent.nbd,
            &["write -P 0x42 64k 1M".to_string(), "flush".to_string()],
        )
        .unwrap();
        let gateway = if side == "mt" { &mut c.mt } else { &mut c.ps };
        let status = gateway
            .proc
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{side} {point}: {e:#}"));
        assert_eq!(status.code(), Some(137), "{side} {point}: {status}");
        gateway.env.clear();
        gateway.restart().unwrap();
        qemu_io(&c.agent.nbd, &["write -P 0x43 3M 64k".to_string()]).unwrap();
        c.wait_caught_up(now_ms(), CATCH_UP, |_, _| {})
            .unwrap_or_else(|e| panic!("{side} {point}: {e:#}"));
        assert_replica_equal(&c);
    }
}

#[test]
fn a_tampered_journal_record_is_refused_never_applied() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("db02.raw");
    mixed_disk(&disk, 8 << 20, 13).unwrap();
    // The master target journals but does not apply, so the journal keeps every record.
    let options = ClusterOptions {
        mt_env: vec![("HAVEN_FAILPOINTS".into(), "apply=pause".into())],
        ..ClusterOptions::default()
    };
    let mut c = Cluster::start(dir.path(), &disk, options).unwrap();
    qemu_io(
        &c.agent.nbd,
        // A later write keeps the tampered record from being the journal's last one (a bad
        // last record is a torn tail to the journal: truncated, and resent by the sender).
        &[
            "write -P 0xc3 1M 256k".to_string(),
            "write -P 0x01 5M 4k".to_string(),
            "flush".to_string(),
        ],
    )
    .unwrap();
    let written = now_ms();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mt = c.mt.status().unwrap().master_target.unwrap();
        // A report made after the writes, with the initial sync done: the journal then holds
        // every record, the tampered one followed by others.
        if let (Some(r), Some(a)) = (mt.replicas.first(), fresh_report(&c, written))
            && a.disks[0].state == haven_net::stream::DiskState::Protected
            && r.durable_seq == a.disks[0].last_seq
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "journal never caught up: {mt:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.mt.proc.kill();
    let tampered = tamper_record_at(&c.mt.data_dir.join("mt/journal"), 1 << 20);
    assert!(
        tampered > 0,
        "the write's record was not found in the journal"
    );
    c.mt.env.clear();
    c.mt.restart().unwrap();
    let error = wait_error(|| {
        let mt = c.mt.status().unwrap().master_target.unwrap();
        (mt.replicas[0].error.clone(), format!("{mt:?}"))
    });
    // Refused when read (failed verification) or, in the segment last written, already when
    // the journal is opened (a damaged record before intact ones): either way named, not applied.
    assert!(error.contains("AES-GCM"), "{error}");
    assert_refused(&c, &error);
}

/// Flips the first body byte of every journal record whose extent starts at `offset` (segment
/// header 80 bytes; record header 56 bytes, body length at 12..16, disk offset at 24..32; see
/// haven_store::journal). Returns how many.
fn tamper_record_at(dir: &Path, offset: u64) -> usize {
    let mut tampered = 0;
    for path in haven_e2e::files_below(dir) {
        if path.extension().is_none_or(|e| e != "hjnl") {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let mut at = 80;
        while at + 56 <= bytes.len() {
            let body = u32::from_le_bytes(bytes[at + 12..at + 16].try_into().unwrap()) as usize;
            let off = u64::from_le_bytes(bytes[at + 24..at + 32].try_into().unwrap());
            if off == offset && at + 56 + body <= bytes.len() {
                bytes[at + 56] ^= 0xff;
                tampered += 1;
            }
            at += 56 + body;
        }
        std::fs::write(&path, &bytes).unwrap();
    }
    tampered
}

/// The process server loses its cache (removed after damage): it resumes after what the master
/// target acknowledged, the agent resyncs what the lost cache held, and nothing is skipped.
#[test]
fn a_process_server_that_lost_its_cache_resumes_without_skipping() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("ps01.raw");
    mixed_disk(&disk, 16 << 20, 21).unwrap();
    let mut c = Cluster::start(dir.path(), &disk, ClusterOptions::default()).unwrap();
    c.wait_caught_up(now_ms(), CATCH_UP, |_, _| {}).unwrap();
    // With the master target away, writes pile up in the cache, which is then lost.
    c.mt.proc.kill();
    qemu_io(
        &c.agent.nbd,
        &[
            "write -P 0x5a 2M 512k".to_string(),
            "write -P 0xa5 9M 64k".to_string(),
            "flush".to_string(),
        ],
    )
    .unwrap();
    let written = now_ms();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ps = c.ps.status().unwrap().process_server.unwrap();
        let Some(agent) = fresh_report(&c, written) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        // Acknowledged by the process server and released from the agent's log: only the
        // cache holds these writes now.
        if ps.disks[0].durable_seq == agent.disks[0].last_seq
            && agent.disks[0].acked_seq == agent.disks[0].last_seq
            && agent.disks[0].log_bytes < 4096
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cache never filled: {ps:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.ps.proc.kill();
    std::fs::remove_dir_all(c.ps.data_dir.join("ps/cache")).unwrap();
    c.ps.restart().unwrap();
    c.mt.restart().unwrap();
    qemu_io(&c.agent.nbd, &["write -P 0x33 12M 64k".to_string()]).unwrap();
    c.wait_caught_up(now_ms(), CATCH_UP, |_, _| {}).unwrap();
    assert_replica_equal(&c);
    // The lost writes came back through a resync, not a full copy.
    let sent = c.agent.report().unwrap().disks[0].resync_sent_bytes;
    assert!(
        ((512 + 64) << 10..=4 << 20).contains(&sent),
        "resync sent {sent} bytes"
    );
}
