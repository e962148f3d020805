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

/// UDP sockets a process holds: its socket fds found in `/proc/net/udp` and `udp6`.
fn udp_sockets(pid: u32) -> Result<usize> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(link) = std::fs::read_link(fd?.path()) else {
            continue;
        };
        if let Some(inode) = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    let mut n = 0;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        for line in std::fs::read_to_string(table)?.lines().skip(1) {
            if line
                .split_whitespace()
                .nth(9)
                .is_some_and(|i| inodes.contains(i))
            {
                n += 1;
            }
        }
    }
    Ok(n)
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
    // One connection to the master target carries every agent: the process server holds its
    // agents' listening socket and the one socket of that connection.
    let ps_udp = udp_sockets(c.ps.proc.pid().context("process server pid")?)?;
    assert_eq!(
        ps_udp, 2,
        "the process server holds {ps_udp} UDP sockets for {n} agents (expected its listener \
         and one connection to the master target)"
    );
    Ok(())
}

/// What the process server's caches hold: all together, and by machine.
fn ps_cache(c: &Cluster) -> Result<(u64, HashMap<String, u64>)> {
    let ps =
        c.ps.status()?
            .process_server
            .context("no process server role")?;
    let disks = ps
        .disks
        .into_iter()
        .map(|d| (d.machine_name, d.cache_bytes))
        .collect();
    Ok((ps.cache_bytes, disks))
}

/// The process server's caches share one limit: a disk whose initial sync fills it to three
/// quarters (the master target reads nothing, so nothing is freed) holds the rest back, and a
/// disk that joins later still gets its records into the cache, which stays within the limit.
#[test]
fn a_full_shared_cache_still_takes_the_records_of_a_quiet_disk() -> Result<()> {
    const TOTAL: u64 = 64 * MIB;
    let dir = tempfile::tempdir()?;
    let heavy = dir.path().join("heavy.raw");
    haven_e2e::mixed_disk(&heavy, 512 * MIB, 3)?;
    let mut c = Cluster::start(
        &dir.path().join("sites"),
        &heavy,
        ClusterOptions {
            ps_config: format!(
                "cache_max_bytes = {}\ncache_total_max_bytes = {TOTAL}",
                256 * MIB
            ),
            mt_env: vec![("HAVEN_FAILPOINTS".into(), "ingest=pause".into())],
            ..Default::default()
        },
    )?;
    // The heavy disk fills the shared cache to three quarters and stops there.
    poll(Duration::from_secs(120), Duration::from_millis(250), || {
        c.check_alive()?;
        let (total, _) = ps_cache(&c)?;
        Ok(if total >= TOTAL / 4 * 3 - 8 * MIB {
            Ok(())
        } else {
            Err(format!("the caches hold {total} bytes"))
        })
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let (_, disks) = ps_cache(&c)?;
    let heavy_bytes = disks.get("web01").copied().unwrap_or(0);
    assert!(
        heavy_bytes <= TOTAL / 4 * 3 + 8 * MIB,
        "the heavy disk's cache holds {heavy_bytes} bytes, past three quarters of {TOTAL}"
    );

    // A quiet disk joins: its initial sync is taken (acknowledged = durable in the cache).
    let light = dir.path().join("light.raw");
    disk_with_data(&light, 1)?;
    let agent = Agent::enroll_and_start(
        &default_bin_dir(),
        &c.ps,
        &dir.path().join("light"),
        &light,
        "light01",
        Vec::new(),
    )?;
    poll(Duration::from_secs(60), Duration::from_millis(250), || {
        c.check_alive()?;
        Ok(match agent.report() {
            Some(r)
                if r.disks.iter().all(|d| {
                    d.state == DiskState::Protected && d.last_seq > 0 && d.acked_seq == d.last_seq
                }) =>
            {
                Ok(())
            }
            r => Err(format!("the light disk is not in the cache yet: {r:?}")),
        })
    })?;
    let (total, disks) = ps_cache(&c)?;
    assert!(
        disks.get("light01").is_some_and(|b| *b >= MIB),
        "the light disk's records are not in the cache: {disks:?}"
    );
    assert!(
        total <= TOTAL,
        "the caches hold {total} bytes, past their limit of {TOTAL}: {disks:?}"
    );
    Ok(())
}
