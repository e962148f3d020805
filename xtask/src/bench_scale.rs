//! `cargo xtask bench scale`: many protected disks on one process server and one master
//! target, each disk protected by an agent process of its own, over the real transport.
//!
//! For each N (1, 16, 128; `HAVEN_BENCH_SCALE=1,16,128,1000` chooses): one heavy disk (1 GiB
//! mixed data, whose initial sync runs during the churn) and N − 1 light sparse disks of
//! 64 MiB. Once the light disks are protected, every light disk takes 64 KiB random writes at
//! [`LIGHT_RATE`] for [`CHURN_TIME`] (points every second), while the master target's status
//! is sampled every 250 ms. Printed per N: the light disks' initial sync, the RPO p50/p99 of
//! the light disks and of the heavy one (the master target's `rpo_seconds`), each gateway's
//! RSS (now and peak), threads and open files, and the gateways' CPU per MiB/s of churn.
//!
//! Goals (issue "Scale"): RSS ≤ 2 GiB each, threads independent of N, light RPO p99 ≤ the
//! point interval + 1 s while the heavy disk syncs, ≤ 1 % of a core per MiB/s.
//!
//! Release builds; results in `target/bench-scale/results.txt`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use haven_e2e::nbd::NbdClient;
use haven_e2e::{Agent, Cluster, Proc, Rng, mixed_disk};
use haven_net::stream::DiskState;

use crate::bench_points::{Out, percentile, start, target_dir};

const MIB: u64 = 1 << 20;
const LIGHT_DISK: u64 = 64 * MIB;
const HEAVY_DISK: u64 = 1 << 30;
/// Churn of each light disk: 64 KiB writes, 4 a second.
const WRITE: usize = 64 * 1024;
const WRITES_PER_SECOND: u64 = 4;
const LIGHT_RATE: f64 = (WRITE as u64 * WRITES_PER_SECOND) as f64 / MIB as f64;
const CHURN_TIME: Duration = Duration::from_secs(20);
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
const POINT_INTERVAL: &str = "1s";
const SYNC_TIMEOUT: Duration = Duration::from_secs(900);

fn sizes() -> Vec<usize> {
    std::env::var("HAVEN_BENCH_SCALE")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![1, 16, 128])
}

/// A gateway's resources now.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    rss_mib: u64,
    peak_mib: u64,
    threads: usize,
    fds: usize,
}

fn usage(p: &Proc) -> Usage {
    let Some(pid) = p.pid() else {
        return Usage::default();
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let count = |dir: String| std::fs::read_dir(dir).map_or(0, |d| d.count());
    Usage {
        rss_mib: kib("VmRSS:") / 1024,
        peak_mib: kib("VmHWM:") / 1024,
        threads: count(format!("/proc/{pid}/task")),
        fds: count(format!("/proc/{pid}/fd")),
    }
}

/// One N's results.
struct Run {
    n: usize,
    light_sync: Duration,
    light_rpo: Vec<f64>,
    heavy_rpo: Vec<f64>,
    heavy_synced: bool,
    ps: Usage,
    mt: Usage,
    /// Gateways' CPU, percent of a core per MiB/s of churn.
    cpu_per_mibs: f64,
    churn_mibs: f64,
}

fn machine(i: usize) -> String {
    if i == 0 {
        "web01".into()
    } else {
        format!("vm{i:04}")
    }
}

/// The agents' states, by disk index, from their own reports.
fn protected(c: &Cluster, agents: &[Agent]) -> Vec<bool> {
    std::iter::once(&c.agent)
        .chain(agents)
        .map(|a| {
            a.report().is_some_and(|r| {
                r.disks
                    .iter()
                    .all(|d| d.state == DiskState::Protected && d.acked_seq == d.last_seq)
            })
        })
        .collect()
}

fn run_n(dir: &Path, bins: &Path, n: usize) -> Result<Run> {
    let dir = dir.join(format!("n{n}"));
    std::fs::create_dir_all(&dir)?;
    let heavy = dir.join("heavy.raw");
    mixed_disk(&heavy, HEAVY_DISK, 7)?;
    let mut c = start(&dir, &heavy, bins, &["--point-interval", POINT_INTERVAL])?;
    let began = Instant::now();
    let mut agents = Vec::new();
    for i in 1..n {
        let disk = dir.join(format!("light{i}.raw"));
        std::fs::File::create(&disk)?.set_len(LIGHT_DISK)?;
        agents.push(Agent::enroll_and_start(
            bins,
            &c.ps,
            &dir.join(format!("agent{i}")),
            &disk,
            &machine(i),
            vec!["--point-interval".into(), POINT_INTERVAL.into()],
        )?);
    }
    // The light disks' initial sync (the heavy one goes on). Each counts once seen done: with
    // a point every second, some disk always has its newest tag in flight.
    let mut synced = vec![false; n];
    loop {
        c.check_alive()?;
        for (s, p) in synced.iter_mut().zip(protected(&c, &agents)) {
            *s |= p;
        }
        if synced.iter().skip(1).all(|s| *s) {
            break;
        }
        if began.elapsed() > SYNC_TIMEOUT {
            bail!("the light disks were not protected after {SYNC_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let light_sync = began.elapsed();

    // Churn on every light disk, paced, one connection each.
    let mut clients = agents
        .iter()
        .map(|a| NbdClient::connect(&format!("127.0.0.1:{}", a.nbd_port), "disk"))
        .collect::<Result<Vec<_>>>()?;
    let cpu = |c: &Cluster| {
        c.ps.proc.cpu_seconds().unwrap_or(0.0) + c.mt.proc.cpu_seconds().unwrap_or(0.0)
    };
    let cpu_before = cpu(&c);
    let mut rng = Rng(0x5ca1e | 1);
    let mut data = vec![0u8; WRITE];
    let (mut light_rpo, mut heavy_rpo) = (Vec::new(), Vec::new());
    let started = Instant::now();
    let mut written = 0u64;
    let mut next_sample = started;
    let tick = Duration::from_secs(1) / WRITES_PER_SECOND as u32;
    let mut next_write = started;
    while started.elapsed() < CHURN_TIME {
        let now = Instant::now();
        if now >= next_write {
            for client in &mut clients {
                for w in data.chunks_exact_mut(8) {
                    w.copy_from_slice(&rng.next_u64().to_le_bytes());
                }
                let slot = rng.below(LIGHT_DISK / WRITE as u64);
                client.write(slot * WRITE as u64, &data)?;
                written += WRITE as u64;
            }
            next_write += tick;
        }
        if now >= next_sample {
            let status = c.mt.status()?;
            for r in status
                .master_target
                .context("no master target role")?
                .replicas
            {
                if let Some(rpo) = r.rpo_seconds {
                    if r.machine_name == machine(0) {
                        heavy_rpo.push(rpo);
                    } else {
                        light_rpo.push(rpo);
                    }
                }
            }
            next_sample += SAMPLE_EVERY;
        }
        let wake = next_write.min(next_sample);
        let now = Instant::now();
        if wake > now {
            std::thread::sleep(wake - now);
        }
    }
    let elapsed = started.elapsed();
    let cpu_used = cpu(&c) - cpu_before;
    for client in clients {
        client.disconnect()?;
    }
    let churn_mibs = written as f64 / MIB as f64 / elapsed.as_secs_f64();
    let (ps, mt) = (usage(&c.ps.proc), usage(&c.mt.proc));
    let heavy_synced = c
        .agent
        .report()
        .is_some_and(|r| r.disks.iter().all(|d| d.state == DiskState::Protected));
    c.check_alive()?;
    drop(agents);
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
    light_rpo.sort_by(f64::total_cmp);
    heavy_rpo.sort_by(f64::total_cmp);
    Ok(Run {
        n,
        light_sync,
        light_rpo,
        heavy_rpo,
        heavy_synced,
        ps,
        mt,
        cpu_per_mibs: if churn_mibs > 0.0 {
            cpu_used / elapsed.as_secs_f64() * 100.0 / churn_mibs
        } else {
            f64::NAN
        },
        churn_mibs,
    })
}

pub fn run(root: &Path) -> Result<()> {
    let target = target_dir(root);
    let bins = target.join("release");
    let dir = target.join("bench-scale");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let begun = Instant::now();
    let mut runs = Vec::new();
    for n in sizes() {
        eprintln!("N = {n} …");
        runs.push(run_n(&dir, &bins, n)?);
    }
    let mut out = Out(String::new());
    out.line(format!(
        "N disks on one process server and one master target (2 cores): 1 heavy (1 GiB mixed, \
         syncing during the churn) and N-1 light (64 MiB sparse, {LIGHT_RATE} MiB/s of 64 KiB \
         random writes each for {}s), one agent process per disk, points every {POINT_INTERVAL}; \
         RPO: the master target's rpo_seconds sampled every {} ms",
        CHURN_TIME.as_secs(),
        SAMPLE_EVERY.as_millis()
    ));
    out.line(format!(
        "{:>5} {:>10} {:>16} {:>16} {:>20} {:>20} {:>13} {:>11} {:>10}",
        "N",
        "light sync",
        "light RPO p50/99",
        "heavy RPO p50/99",
        "PS RSS/peak MiB",
        "MT RSS/peak MiB",
        "threads PS/MT",
        "fds PS/MT",
        "CPU%/MiB/s"
    ));
    for r in &runs {
        let two = |v: &[f64]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}/{:.2}s", percentile(v, 0.5), percentile(v, 0.99))
            }
        };
        out.line(format!(
            "{:>5} {:>9.1}s {:>16} {:>16} {:>20} {:>20} {:>13} {:>11} {:>10.2}",
            r.n,
            r.light_sync.as_secs_f64(),
            two(&r.light_rpo),
            format!(
                "{}{}",
                two(&r.heavy_rpo),
                if r.heavy_synced { "" } else { "*" }
            ),
            format!("{}/{}", r.ps.rss_mib, r.ps.peak_mib),
            format!("{}/{}", r.mt.rss_mib, r.mt.peak_mib),
            format!("{}/{}", r.ps.threads, r.mt.threads),
            format!("{}/{}", r.ps.fds, r.mt.fds),
            r.cpu_per_mibs
        ));
    }
    out.line(format!(
        "churn achieved (MiB/s): {}; *: the heavy disk was still in its initial sync at the end; \
         CPU%/MiB/s: process server + master target CPU during the churn, percent of one core, \
         per MiB/s written (goal <= 1); whole bench {:.0}s",
        runs.iter()
            .map(|r| format!("N={} {:.1}", r.n, r.churn_mibs))
            .collect::<Vec<_>>()
            .join(", "),
        begun.elapsed().as_secs_f64()
    ));
    std::fs::write(dir.join("results.txt"), &out.0)?;
    Ok(())
}
