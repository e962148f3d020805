//! End to end at scale: many disks on one process server and one master target, with real
//! processes on loopback. `HAVEN_SCALE_DISKS` sets how many (default 64).

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use haven_e2e::{Agent, Cluster, ClusterOptions, default_bin_dir, poll};
use haven_net::stream::DiskState;

const MIB: u64 = 1 << 20;
/// Size of each disk: small, so that many fit; data in a few places of each.
const DISK: u64 = 8 * MIB;

fn disks() -> usize {
    std::env::var("HAVEN_SCALE_DISKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// A sparse disk with 1 MiB of data unique to `n` at two places.
fn disk_with_data(path: &Path, n: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(DISK)?;
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data: Vec<u8> = (0..MIB / 2 / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    f.write_all_at(&data, (n % 8) * MIB)?;
    f.write_all_at(&data, DISK - MIB / 2)?;
    Ok(())
}

/// Threads of a process (`/proc/PID/task`).
fn threads(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count())
}

#[test]
fn many_disks_replicate_through_one_process_server_and_one_master_target() -> Result<()> {
    let n = disks();
    let dir = tempfile::tempdir()?;
    let sources: Vec<_> = (0..n)
        .map(|i| dir.path().join(format!("disk{i}.raw")))
        .collect();
    for (i, path) in sources.iter().enumerate() {
        disk_with_data(path, i as u64)?;
    }
    let mut c = Cluster::start(
        &dir.path().join("sites"),
        &sources[0],
        ClusterOptions::default(),
    )?;
    let bins = default_bin_dir();
    let mut agents: Vec<Agent> = Vec::new();
    for (i, path) in sources.iter().enumerate().skip(1) {
        agents.push(Agent::enroll_and_start(
            &bins,
            &c.ps,
            &dir.path().join(format!("agent{i}")),
            path,
            &format!("vm{i:03}"),
            Vec::new(),
        )?);
    }

    let started = std::time::Instant::now();
    eprintln!("{n} agents started");
    // Every replica applied up to its agent's last record, the agent protected. Each disk is
    // seen so once (its points go on, changing no data), not all at one instant.
    let mut done = vec![false; n];
    let machine = |i: usize| {
        if i == 0 {
            "web01".to_string()
        } else {
            format!("vm{i:03}")
        }
    };
    let replicas = poll(Duration::from_secs(600), Duration::from_millis(500), || {
        c.check_alive()?;
        for a in &mut agents {
            a.proc.check_alive("haven-agent")?;
        }
        let status = c.mt.status()?;
        let replicas: HashMap<String, (String, u64)> = status
            .master_target
            .context("no master target role")?
            .replicas
            .into_iter()
            .map(|r| (r.machine_name, (r.path, r.applied_seq)))
            .collect();
        let all = std::iter::once(&c.agent).chain(&agents);
        for (i, a) in all.enumerate() {
            done[i] = done[i]
                || a.report().is_some_and(|r| {
                    r.disks.iter().all(|d| {
                        d.state == DiskState::Protected
                            && d.acked_seq == d.last_seq
                            && replicas
                                .get(&machine(i))
                                .is_some_and(|(_, applied)| *applied >= d.last_seq)
                    })
                });
        }
        let waiting = done.iter().filter(|d| !**d).count();
        Ok(if waiting == 0 {
            Ok(replicas)
        } else {
            Err(format!("{waiting} of {n} disks not replicated yet"))
        })
    })?;

    eprintln!("{n} disks replicated in {:?}", started.elapsed());
    // Every replica equals its source.
    for (i, source) in sources.iter().enumerate() {
        let (path, _) = replicas
            .get(&machine(i))
            .with_context(|| format!("no replica for {}", machine(i)))?;
        let replica = c.mt.data_dir.join("replicas").join(path);
        if std::fs::read(&replica)? != std::fs::read(source)? {
            bail!("the replica of {} differs from its source", machine(i));
        }
    }

    // A replica is work, not a thread: the gateways' threads do not grow with the disks.
    let mt_threads = threads(c.mt.proc.pid().context("master target pid")?)?;
    let ps_threads = threads(c.ps.proc.pid().context("process server pid")?)?;
    let mib = |b: Option<u64>| b.map_or(0, |b| b >> 20);
    eprintln!(
        "{n} disks: master target {mt_threads} threads, peak RSS {} MiB; process server \
         {ps_threads} threads, peak RSS {} MiB",
        mib(c.mt.proc.peak_rss()),
        mib(c.ps.proc.peak_rss())
    );
    assert!(
        mt_threads < 32,
        "the master target runs {mt_threads} threads for {n} disks"
    );
    assert!(
        ps_threads < 32,
        "the process server runs {ps_threads} threads for {n} disks"
    );
    Ok(())
}
