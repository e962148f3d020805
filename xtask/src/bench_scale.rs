//! `cargo xtask bench scale`: many protected disks on one process server and one master
//! target, over the real transport: each disk protected by an agent process of its own, or,
//! beyond [`MAX_AGENT_PROCESSES`], by agents simulated in this process ([`SimAgents`]).
//!
//! For each N (1, 16, 128, 1000; `HAVEN_BENCH_SCALE=1,16` chooses): one heavy disk (1 GiB
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
use crate::sim_agents::SimAgents;

const MIB: u64 = 1 << 20;
const LIGHT_DISK: u64 = 64 * MIB;
const HEAVY_DISK: u64 = 1 << 30;
/// Churn of each light disk: 64 KiB writes, 4 a second.
const WRITE: usize = 64 * 1024;
const WRITES_PER_SECOND: u64 = 4;
const LIGHT_RATE: f64 = (WRITE as u64 * WRITES_PER_SECOND) as f64 / MIB as f64;
const CHURN_TIME: Duration = Duration::from_secs(20);
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// How often the master target's status is sampled for N disks: every [`SAMPLE_EVERY`], or
/// 1 ms per disk when that is longer (the status of a thousand replicas is a few MiB of JSON,
/// whose making and reading would weigh on the gateways measured).
fn sample_every(n: usize) -> Duration {
    SAMPLE_EVERY.max(Duration::from_millis(n as u64))
}
const POINT_INTERVAL: &str = "1s";
const SYNC_TIMEOUT: Duration = Duration::from_secs(900);

fn sizes() -> Vec<usize> {
    std::env::var("HAVEN_BENCH_SCALE")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![1, 16, 128, 1000])
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
    /// The whole machine's CPU busy during the churn, percent of all cores.
    machine_busy: f64,
}

/// The machine's CPU time so far: (busy, total) in ticks, from `/proc/stat`.
fn machine_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = ticks.iter().sum();
    // idle and iowait are the 4th and 5th.
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn machine(i: usize) -> String {
    if i == 0 {
        "web01".into()
    } else {
        format!("vm{i:04}")
    }
}

/// Most agent processes started; beyond, the light disks' agents are simulated in this
/// process ([`SimAgents`]): the agent's own code over the real transport and gateways.
const MAX_AGENT_PROCESSES: usize = 128;
/// Light churn of all light disks together is capped at this many 64 KiB writes a second
/// (32 MiB/s): beyond it a 2-core machine measures its own saturation, not the gateways.
const MAX_WRITES_PER_SECOND: u64 = 512;

/// Agents enrolled at once (each enrollment is two short processes).
const ENROLL_THREADS: usize = 4;

/// Where simulated agents keep their folders and disks: in memory where there is `/dev/shm`.
fn sim_dir(n: usize) -> std::path::PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("haven-bench-scale-{}-n{n}", std::process::id()))
}

/// The light disks' agents: processes written to over NBD, or simulated in this process.
enum Lights {
    Procs(Vec<Agent>, Vec<NbdClient>),
    Sim(SimAgents),
}

impl Lights {
    fn start(c: &Cluster, dir: &Path, bins: &Path, n: usize) -> Result<Lights> {
        let disk = |i: usize| -> Result<std::path::PathBuf> {
            let disk = dir.join(format!("light{i}.raw"));
            std::fs::File::create(&disk)?.set_len(LIGHT_DISK)?;
            Ok(disk)
        };
        if n <= MAX_AGENT_PROCESSES {
            let mut agents = Vec::new();
            for i in 1..n {
                agents.push(Agent::enroll_and_start(
                    bins,
                    &c.ps,
                    &dir.join(format!("agent{i}")),
                    &disk(i)?,
                    &machine(i),
                    vec!["--point-interval".into(), POINT_INTERVAL.into()],
                )?);
            }
            return Ok(Lights::Procs(agents, Vec::new()));
        }
        // A thousand agents would share the gateways' disk here (each has its own on a real
        // machine): their folders and disks live in memory, so their fsyncs of `disk.state`
        // and `status.json` do not queue in front of the gateways'.
        let shm = sim_dir(n);
        let _ = std::fs::remove_dir_all(&shm);
        std::fs::create_dir_all(&shm)?;
        let disk = |i: usize| -> Result<std::path::PathBuf> {
            let disk = shm.join(format!("light{i}.raw"));
            std::fs::File::create(&disk)?.set_len(LIGHT_DISK)?;
            Ok(disk)
        };
        let next = std::sync::atomic::AtomicUsize::new(1);
        let enrolled: Vec<Result<Vec<(usize, std::path::PathBuf)>>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..ENROLL_THREADS)
                .map(|_| {
                    s.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= n {
                                return Ok(done);
                            }
                            let data_dir = shm.join(format!("agent{i}"));
                            Agent::enroll(bins, &c.ps, &data_dir, &machine(i))?;
                            done.push((i, data_dir));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| bail!("an enrolling thread panicked"))
                })
                .collect()
        });
        let mut dirs = Vec::new();
        for e in enrolled {
            dirs.extend(e?);
        }
        dirs.sort();
        let mut disks = Vec::new();
        for (i, data_dir) in dirs {
            disks.push((data_dir, disk(i)?));
        }
        let interval = haven_agent::points::parse_interval(POINT_INTERVAL)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Lights::Sim(SimAgents::start(disks, interval)?))
    }

    fn len(&self) -> usize {
        match self {
            Lights::Procs(a, _) => a.len(),
            Lights::Sim(s) => s.len(),
        }
    }

    /// Light disk `i`'s agent's report (0-based among the light disks).
    fn report(&self, i: usize) -> Option<haven_net::stream::Report> {
        match self {
            Lights::Procs(a, _) => a[i].report(),
            Lights::Sim(s) => s.report(i),
        }
    }

    /// Ready for the churn: NBD connections to the agent processes.
    fn connect(&mut self) -> Result<()> {
        if let Lights::Procs(agents, clients) = self {
            *clients = agents
                .iter()
                .map(|a| NbdClient::connect(&format!("127.0.0.1:{}", a.nbd_port), "disk"))
                .collect::<Result<Vec<_>>>()?;
        }
        Ok(())
    }

    fn write(&mut self, i: usize, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            Lights::Procs(_, clients) => clients[i].write(offset, data),
            Lights::Sim(s) => s.write(i, offset, data),
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Lights::Procs(agents, _) = self {
            for a in agents {
                a.proc.check_alive("haven-agent")?;
            }
        }
        Ok(())
    }

    fn disconnect(self) -> Result<()> {
        if let Lights::Sim(sim) = &self {
            eprintln!(
                "  simulated agents: the slowest round of points took {:?}",
                sim.slowest_points_round()
            );
        }
        if let Lights::Procs(_, clients) = self {
            for client in clients {
                client.disconnect()?;
            }
        }
        Ok(())
    }
}

fn protected(report: Option<haven_net::stream::Report>) -> bool {
    report.is_some_and(|r| {
        r.disks
            .iter()
            .all(|d| d.state == DiskState::Protected && d.acked_seq == d.last_seq)
    })
}

fn run_n(dir: &Path, bins: &Path, n: usize) -> Result<Run> {
    let dir = dir.join(format!("n{n}"));
    std::fs::create_dir_all(&dir)?;
    let heavy = dir.join("heavy.raw");
    mixed_disk(&heavy, HEAVY_DISK, 7)?;
    let mut c = start(&dir, &heavy, bins, &["--point-interval", POINT_INTERVAL])?;
    let enrolling = Instant::now();
    let mut lights = Lights::start(&c, &dir, bins, n)?;
    eprintln!(
        "  {} light agents enrolled and started in {:.1}s",
        lights.len(),
        enrolling.elapsed().as_secs_f64()
    );
    let began = Instant::now();
    // The light disks' initial sync (the heavy one goes on). Each counts once seen done: with
    // a point every second, some disk always has its newest tag in flight.
    let mut synced = vec![false; lights.len()];
    loop {
        c.check_alive()?;
        lights.check_alive()?;
        for (i, s) in synced.iter_mut().enumerate() {
            *s = *s || protected(lights.report(i));
        }
        if synced.iter().all(|s| *s) {
            break;
        }
        if began.elapsed() > SYNC_TIMEOUT {
            bail!(
                "{} of {} light disks were not protected after {SYNC_TIMEOUT:?}",
                synced.iter().filter(|s| !**s).count(),
                synced.len()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let light_sync = began.elapsed();

    // Churn on the light disks, paced, in turn: each takes 4 writes a second, fewer when all
    // together would pass MAX_WRITES_PER_SECOND.
    lights.connect()?;
    let cpu = |c: &Cluster| {
        c.ps.proc.cpu_seconds().unwrap_or(0.0) + c.mt.proc.cpu_seconds().unwrap_or(0.0)
    };
    let cpu_before = cpu(&c);
    let machine_before = machine_cpu();
    let mut rng = Rng(0x5ca1e | 1);
    let mut data = vec![0u8; WRITE];
    let (mut light_rpo, mut heavy_rpo) = (Vec::new(), Vec::new());
    let started = Instant::now();
    let mut written = 0u64;
    let mut next_sample = started;
    let total_rate = (WRITES_PER_SECOND * lights.len() as u64).clamp(1, MAX_WRITES_PER_SECOND);
    let tick = Duration::from_secs(1) / total_rate as u32;
    let mut next_write = started;
    let mut turn = 0usize;
    while started.elapsed() < CHURN_TIME {
        let now = Instant::now();
        while now >= next_write && lights.len() > 0 {
            for w in data.chunks_exact_mut(8) {
                w.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            let slot = rng.below(LIGHT_DISK / WRITE as u64);
            lights.write(turn, slot * WRITE as u64, &data)?;
            turn = (turn + 1) % lights.len();
            written += WRITE as u64;
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
            next_sample += sample_every(n);
        }
        let wake = next_write.min(next_sample);
        let now = Instant::now();
        if wake > now {
            std::thread::sleep(wake - now);
        }
    }
    let elapsed = started.elapsed();
    let cpu_used = cpu(&c) - cpu_before;
    let churn_mibs = written as f64 / MIB as f64 / elapsed.as_secs_f64();
    let machine_after = machine_cpu();
    let machine_busy = (machine_after.0 - machine_before.0) as f64 * 100.0
        / (machine_after.1 - machine_before.1).max(1) as f64;
    let (ps, mt) = (usage(&c.ps.proc), usage(&c.mt.proc));
    let heavy_synced = c
        .agent
        .report()
        .is_some_and(|r| r.disks.iter().all(|d| d.state == DiskState::Protected));
    c.check_alive()?;
    lights.disconnect()?;
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(sim_dir(n));
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
        machine_busy,
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
         random writes each for {}s, all light disks together at most {MAX_WRITES_PER_SECOND} \
         writes/s), one agent process per disk up to N = {MAX_AGENT_PROCESSES}, beyond it the \
         light agents simulated in one process (the agent's code without NBD), points every \
         {POINT_INTERVAL}; \
         RPO: the master target's rpo_seconds sampled every {} ms (1 ms per disk beyond); \
         light sync: from the last light agent's start until every light disk is protected",
        CHURN_TIME.as_secs(),
        SAMPLE_EVERY.as_millis()
    ));
    out.line(format!(
        "{:>5} {:>10} {:>16} {:>16} {:>20} {:>20} {:>13} {:>11} {:>10} {:>8}",
        "N",
        "light sync",
        "light RPO p50/99",
        "heavy RPO p50/99",
        "PS RSS/peak MiB",
        "MT RSS/peak MiB",
        "threads PS/MT",
        "fds PS/MT",
        "CPU%/MiB/s",
        "busy %"
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
            "{:>5} {:>9.1}s {:>16} {:>16} {:>20} {:>20} {:>13} {:>11} {:>10.2} {:>8.0}",
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
            r.cpu_per_mibs,
            r.machine_busy
        ));
    }
    out.line(format!(
        "churn achieved (MiB/s): {}; *: the heavy disk was still in its initial sync at the end; \
         CPU%/MiB/s: process server + master target CPU during the churn, percent of one core, \
         per MiB/s written (goal <= 1); busy %: the whole machine's CPU during the churn \
         (agents, bench and gateways; near 100 the RPO measures the machine's saturation); \
         whole bench {:.0}s",
        runs.iter()
            .map(|r| format!("N={} {:.1}", r.n, r.churn_mibs))
            .collect::<Vec<_>>()
            .join(", "),
        begun.elapsed().as_secs_f64()
    ));
    std::fs::write(dir.join("results.txt"), &out.0)?;
    Ok(())
}
