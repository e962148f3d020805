//! `cargo xtask bench points`: recovery points against what they replace, in one run.
//!
//! 1. RPO under sustained churn: one 4 GiB disk, `--point-interval 1s`, a writer pacing 1 MiB
//!    writes at random 1 MiB-aligned offsets through the agent's NBD front end at 25, 50 and
//!    100 MiB/s for 20 s each (one cluster, one rate after the other, draining in between),
//!    then 100 MiB/s again on a second cluster with `--point-interval 500ms`,
//!    while the master target's `GET /v1/status` is sampled every 100 ms. Printed: p50/p99/max
//!    of `lag_seconds` (age of the oldest journaled record in no point yet) and of the newest
//!    point's age (what a failover to `latest` loses, transit included), after the first 3 s.
//!    (the 1 s cluster also runs 100 MiB/s once more while a busy loop spins on one core: a
//!    machine busy with other work).
//!    No baseline: the goal is a point age p99 ≤ the point interval + 0.5 s at 100 MiB/s.
//! 2. Test-failover ready time for a 1 GiB and a 16 GiB disk: `haven failover test web01
//!    --point latest` from spawn to the URI printed, five times each, vs a copy-based test
//!    failover: `cp --sparse=never` of the 1 GiB disk plus `sync` (16 GiB estimated as 16×).
//! 3. Materialisation: `haven failover web01 --point ID` of a mixed disk (1 GiB;
//!    `HAVEN_BENCH_GIB` overrides) vs `cp` of the replica file plus `sync` of the copy (holes
//!    kept, and `--sparse=never`); the image is compared with a copy of the source taken at the
//!    point.
//!
//! Release builds; results in `target/bench-points/`: `results.txt` (what was printed) and
//! `rpo-RATEmibs-INTERVALms.csv` (every status sample of the churn runs).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use haven_e2e::nbd::NbdClient;
use haven_e2e::{Cluster, ClusterOptions, Rng, images_equal, mixed_disk, now_ms};
use haven_engine::status::{GatewayStatus, ReplicaStatus};
use haven_net::stream::DiskState;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Disk of the churn runs.
const CHURN_DISK: u64 = 4 * GIB;
/// Churn rates, MiB/s.
const RATES: [u64; 3] = [25, 50, 100];
/// The churn of the busy-machine case, MiB/s.
const BUSY_RATE: u64 = 100;
/// Point intervals of the churn runs, with the rates each runs: every rate at 1 s, the
/// highest again at 500 ms.
const INTERVALS: [(Duration, &[u64]); 2] = [
    (Duration::from_secs(1), &RATES),
    (Duration::from_millis(500), &[100]),
];
const CHURN_TIME: Duration = Duration::from_secs(20);
/// Samples before this are left out of the percentiles.
const WARMUP: Duration = Duration::from_secs(3);
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Longest wait for the replica to hold everything after a churn run.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const RETENTION: &str = "window = \"72h\"";
/// Disk sizes of the test-failover runs, GiB.
const READY_SIZES: [u64; 2] = [1, 16];
const READY_RUNS: usize = 5;
/// Goals, seconds.
/// RPO goal: the point age's p99 at most the point interval plus this.
const RPO_SLACK: f64 = 0.5;
const READY_GOAL: f64 = 1.0;
/// Longest wait for an initial sync and the first point.
const SYNC_TIMEOUT: Duration = Duration::from_secs(900);

/// Cargo's target folder: `$CARGO_TARGET_DIR` (relative to the workspace), else `target`.
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(d))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

pub(crate) fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64().max(1e-9)
}

/// Nearest-rank percentile of sorted values (`p` in 0..=1).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// `12ms` below a second, else `1.23s`.
pub(crate) fn dur(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.0}ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn max(v: &[Duration]) -> Duration {
    v.iter().copied().max().unwrap_or_default()
}

/// Prints a line and keeps it for `results.txt`.
pub(crate) struct Out(pub(crate) String);

impl Out {
    pub(crate) fn line(&mut self, line: impl AsRef<str>) {
        println!("{}", line.as_ref());
        let _ = writeln!(self.0, "{}", line.as_ref());
    }
}

/// 1 MiB of random bytes.
pub(crate) fn random_mib(rng: &mut Rng) -> Vec<u8> {
    let mut data = vec![0u8; MIB as usize];
    for w in data.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    data
}

/// Makes write `n` differ from every other: stamps each 4 KiB block of `data`.
pub(crate) fn vary(data: &mut [u8], n: u64) {
    for (k, block) in data.chunks_mut(4096).enumerate() {
        block[..8].copy_from_slice(&((n << 8) | k as u64).to_le_bytes());
    }
}

/// The master target's status through a raw `GET /v1/status` (no process spawned).
fn status(g: &haven_e2e::Gateway) -> Result<GatewayStatus> {
    let api = &g.api;
    let addr = api.strip_prefix("http://").context("API address")?;
    let mut tcp = TcpStream::connect(addr).with_context(|| format!("connecting to {api}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        tcp,
        "GET /v1/status HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Connection: close\r\n\r\n",
        g.admin_token
    )?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response from /v1/status")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "GET {api}/v1/status: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(serde_json::from_str(body)?)
}

/// The master target's one replica.
fn replica(g: &haven_e2e::Gateway) -> Result<ReplicaStatus> {
    status(g)?
        .master_target
        .and_then(|m| m.replicas.into_iter().next())
        .context("the master target has no replica yet")
}

pub(crate) fn start(dir: &Path, disk: &Path, bins: &Path, agent_args: &[&str]) -> Result<Cluster> {
    Cluster::start(
        &dir.join("sites"),
        disk,
        ClusterOptions {
            retention: Some(RETENTION.into()),
            agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
            bin_dir: Some(bins.to_owned()),
            ..ClusterOptions::default()
        },
    )
}

/// Waits until the agent has finished its initial sync (protected, everything acknowledged) and
/// the master target holds a point.
pub(crate) fn wait_protected(c: &mut Cluster) -> Result<()> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        c.check_alive()?;
        let protected = c.agent.report().is_some_and(|r| {
            r.disks
                .iter()
                .all(|d| d.state == DiskState::Protected && d.acked_seq == d.last_seq)
        });
        if protected && replica(&c.mt).is_ok_and(|r| r.points > 0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not protected with a point after {SYNC_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `count` MiB of random data at random 1 MiB-aligned offsets, flushed.
fn write_random(c: &Cluster, size: u64, count: u64, seed: u64) -> Result<()> {
    let mut client = NbdClient::connect(&format!("127.0.0.1:{}", c.agent.nbd_port), "disk")?;
    let mut rng = Rng(seed | 1);
    let mut data = random_mib(&mut rng);
    for n in 0..count {
        vary(&mut data, n ^ seed);
        client.write(rng.below(size / MIB) * MIB, &data)?;
    }
    client.flush()?;
    client.disconnect()
}

/// The writer's storage root (replicas and failover images live below it).
fn storage_root(replica: &Path) -> Result<PathBuf> {
    Ok(replica
        .parent()
        .and_then(Path::parent)
        .context("the replica's path has no storage root")?
        .to_path_buf())
}

/// Runs `cp ARGS FROM TO`, then `sync TO` (an fsync of the copy); the time of both.
fn cp_synced(args: &[&str], from: &Path, to: &Path) -> Result<Duration> {
    let started = Instant::now();
    let out = Command::new("cp").args(args).arg(from).arg(to).output()?;
    if !out.status.success() {
        bail!("cp failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    if !Command::new("sync").arg(to).status()?.success() {
        bail!("sync {} failed", to.display());
    }
    Ok(started.elapsed())
}

/// Deletes the files of 16 MiB and more below `dir` (disks, replicas, journals); logs stay.
fn remove_bulk(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        match e.metadata() {
            Ok(m) if m.is_dir() => remove_bulk(&path),
            Ok(m) if m.len() >= 16 * MIB => {
                let _ = std::fs::remove_file(&path);
            }
            _ => {}
        }
    }
}

// --- 1. RPO under churn ------------------------------------------------------------------------

/// What the writer did.
struct Churn {
    writes: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// Paces 1 MiB writes at `rate` MiB/s for [`CHURN_TIME`].
fn churn(port: u16, rate: u64, seed: u64) -> Result<Churn> {
    let mut client = NbdClient::connect(&format!("127.0.0.1:{port}"), "disk")?;
    let mut rng = Rng(seed | 1);
    let mut data = random_mib(&mut rng);
    let slots = CHURN_DISK / MIB;
    let interval = Duration::from_secs(1) / rate as u32;
    let started = Instant::now();
    let end = started + CHURN_TIME;
    let mut latencies = Vec::new();
    let mut n: u32 = 0;
    loop {
        let due = started + interval * n;
        if due >= end {
            break;
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        vary(&mut data, u64::from(n) ^ seed);
        let t = Instant::now();
        client.write(rng.below(slots) * MIB, &data)?;
        latencies.push(t.elapsed());
        n += 1;
    }
    let elapsed = started.elapsed();
    client.flush()?;
    client.disconnect()?;
    Ok(Churn {
        writes: u64::from(n),
        elapsed,
        latencies,
    })
}

/// One rate's results.
struct RpoRun {
    rate: u64,
    interval: Duration,
    achieved: f64,
    write_p99: Duration,
    samples: usize,
    /// Sorted `lag_seconds` samples after the warm-up.
    lag: Vec<f64>,
    /// Sorted ages of the newest point after the warm-up, seconds.
    point_age: Vec<f64>,
    /// Points the master target held before and after.
    points: (usize, usize),
    /// Most bytes the agent's change log held (its reports, about once a second).
    max_log: u64,
    /// Agent states other than protected seen during the run.
    states: Vec<&'static str>,
    /// From the writer's end until the replica held everything in a point.
    drain: Option<Duration>,
    /// CPU used during the run, percent of one core: agent, process server, master target.
    cpu: [f64; 3],
    /// A busy loop competed for one core during the run.
    busy: bool,
}

/// A process spinning on one core (other work on the machine) until dropped.
struct BusyCore(std::process::Child);

impl BusyCore {
    fn start() -> Result<BusyCore> {
        Ok(BusyCore(
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .context("starting a busy loop")?,
        ))
    }
}

impl Drop for BusyCore {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl RpoRun {
    fn sustained(&self) -> bool {
        self.achieved >= 0.95 * self.rate as f64
    }
}

/// The machine's dirty and under-writeback page cache, MiB (`/proc/meminfo`): every write of
/// the workload lands on this one disk four times (source, change log, process server cache,
/// master target journal).
fn dirty_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |name: &str| -> Option<u64> {
        info.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((kib("Dirty:")? + kib("Writeback:")?) / 1024)
}

fn cpu(c: &Cluster) -> [f64; 3] {
    let s = |p: &haven_e2e::Proc| p.cpu_seconds().unwrap_or(0.0);
    [s(&c.agent.proc), s(&c.ps.proc), s(&c.mt.proc)]
}

/// Runs the writer at `rate` MiB/s, samples the status, and writes the samples to `csv`.
fn rpo_run(c: &mut Cluster, rate: u64, interval: Duration, csv: &Path) -> Result<RpoRun> {
    let points_before = replica(&c.mt)?.points;
    let cpu_before = cpu(c);
    let port = c.agent.nbd_port;
    let started = Instant::now();
    let writer = std::thread::spawn(move || churn(port, rate, 0x9e37_79b9_7f4a_7c15 ^ rate));
    let mut lag = Vec::new();
    let mut point_age = Vec::new();
    let mut samples = 0;
    let mut max_log = 0;
    let mut states = Vec::new();
    let mut rows = String::from(
        "t_s,lag_seconds,point_age_s,mt_points,mt_durable_seq,mt_applied_seq,agent_last_seq,\
         agent_acked_seq,agent_log_bytes,dirty_mib\n",
    );
    let mut next = started;
    while !writer.is_finished() {
        let r = replica(&c.mt)?;
        let now = now_ms();
        let at = started.elapsed();
        samples += 1;
        let age = r
            .newest_point_ms
            .map(|ms| now.saturating_sub(ms) as f64 / 1000.0);
        if at >= WARMUP {
            lag.push(r.lag_seconds);
            point_age.extend(age);
        }
        let disk = c.agent.report().and_then(|r| r.disks.into_iter().next());
        if let Some(d) = &disk {
            max_log = max_log.max(d.log_bytes);
            if d.state != DiskState::Protected && !states.contains(&d.state.name()) {
                states.push(d.state.name());
            }
        }
        let _ = writeln!(
            rows,
            "{:.3},{:.3},{},{},{},{},{},{}",
            secs(at),
            r.lag_seconds,
            age.map_or_else(String::new, |a| format!("{a:.3}")),
            r.points,
            r.durable_seq,
            r.applied_seq,
            disk.map_or_else(
                || ",,".into(),
                |d| format!("{},{},{}", d.last_seq, d.acked_seq, d.log_bytes)
            ),
            dirty_mib().map_or_else(String::new, |m| m.to_string())
        );
        next += SAMPLE_EVERY;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    let churned = writer
        .join()
        .map_err(|_| anyhow!("the writer thread panicked"))?
        .with_context(|| format!("writing at {rate} MiB/s"))?;
    let elapsed = started.elapsed();
    let cpu_after = cpu(c);
    std::fs::write(csv, rows)?;
    let stop_ms = now_ms();

    // Drain: every acknowledged write durable at the master target and in a point.
    let stopped = Instant::now();
    let drain = loop {
        c.check_alive()?;
        let r = replica(&c.mt)?;
        if let Some(report) = c.agent.report()
            && report.time_ms > stop_ms
            && let Some(d) = report.disks.first()
            && d.acked_seq == d.last_seq
            && r.durable_seq >= d.last_seq
            && r.lag_seconds == 0.0
        {
            break Some(stopped.elapsed());
        }
        if stopped.elapsed() > DRAIN_TIMEOUT {
            break None;
        }
        std::thread::sleep(SAMPLE_EVERY);
    };
    let points_after = replica(&c.mt)?.points;
    let mut latencies = churned.latencies.clone();
    latencies.sort();
    let write_p99 = latencies
        .get((latencies.len() * 99).div_ceil(100).saturating_sub(1))
        .copied()
        .unwrap_or_default();
    let mut cpu = [0.0; 3];
    for (i, c) in cpu.iter_mut().enumerate() {
        *c = 100.0 * (cpu_after[i] - cpu_before[i]) / secs(elapsed);
    }
    Ok(RpoRun {
        rate,
        interval,
        achieved: mib_s(churned.writes * MIB, churned.elapsed),
        write_p99,
        samples,
        lag: sorted(lag),
        point_age: sorted(point_age),
        points: (points_before, points_after),
        max_log,
        states,
        drain,
        cpu,
        busy: false,
    })
}

fn rpo(dir: &Path, bins: &Path) -> Result<Vec<RpoRun>> {
    let mut runs = Vec::new();
    for (interval, rates) in INTERVALS {
        let ms = interval.as_millis();
        let sites = dir.join(format!("rpo-{ms}ms"));
        std::fs::create_dir_all(&sites)?;
        let disk = sites.join("source.raw");
        std::fs::File::create(&disk)?.set_len(CHURN_DISK)?;
        let mut c = start(
            &sites,
            &disk,
            bins,
            &["--point-interval", &format!("{ms}ms")],
        )?;
        wait_protected(&mut c)?;
        for &rate in rates {
            eprintln!(
                "churn at {rate} MiB/s for {}s, points every {ms} ms …",
                CHURN_TIME.as_secs()
            );
            let csv = dir.join(format!("rpo-{rate}mibs-{ms}ms.csv"));
            runs.push(rpo_run(&mut c, rate, interval, &csv)?);
        }
        // The same churn on a machine busy with other work: one core spinning meanwhile.
        if interval == Duration::from_secs(1) {
            let rate = BUSY_RATE;
            eprintln!("churn at {rate} MiB/s with one core busy, points every {ms} ms …");
            let csv = dir.join(format!("rpo-{rate}mibs-{ms}ms-busy.csv"));
            let _busy = BusyCore::start()?;
            let mut run = rpo_run(&mut c, rate, interval, &csv)?;
            run.busy = true;
            runs.push(run);
        }
        drop(c);
        remove_bulk(&sites);
    }
    Ok(runs)
}

// --- 2. Test-failover ready time ---------------------------------------------------------------

/// One disk size's results.
struct Ready {
    gib: u64,
    /// Spawn to URI printed.
    uri: Vec<Duration>,
    /// Spawn to the first 4 KiB read back through the export.
    first_read: Vec<Duration>,
    cleanup: Vec<Duration>,
    /// Initial sync until the first point.
    sync: Duration,
    /// `cp --sparse=never` + `sync` of the disk, when it was run.
    copy: Option<Duration>,
}

/// `host:port` and export of an `nbd://host:port/export` URI.
fn nbd_target(uri: &str) -> Result<(String, String)> {
    let rest = uri
        .strip_prefix("nbd://")
        .with_context(|| format!("not an nbd:// URI: {uri:?}"))?;
    let (addr, export) = rest
        .split_once('/')
        .with_context(|| format!("no export in {uri:?}"))?;
    Ok((addr.to_string(), export.to_string()))
}

fn ready(dir: &Path, bins: &Path, gib: u64, copy_baseline: bool) -> Result<Ready> {
    let dir = dir.join(format!("ready-{gib}g"));
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("source.raw");
    let size = gib * GIB;
    std::fs::File::create(&disk)?.set_len(size)?;
    let started = Instant::now();
    let mut c = start(&dir, &disk, bins, &[])?;
    wait_protected(&mut c)?;
    let sync = started.elapsed();

    // A few MiB spread over the disk, so the point has journal records.
    let mut client = NbdClient::connect(&format!("127.0.0.1:{}", c.agent.nbd_port), "disk")?;
    let mut rng = Rng(gib | 1);
    let mut data = random_mib(&mut rng);
    let mut first = Vec::new();
    for i in 0..8u64 {
        vary(&mut data, i);
        client.write(i * (size / 8), &data)?;
        if i == 0 {
            first = data[..4096].to_vec();
        }
    }
    client.flush()?;
    client.disconnect()?;
    c.mt.haven(&["point", "create", "web01"])?;

    let (mut uri_times, mut read_times, mut cleanup_times) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..READY_RUNS {
        let t = Instant::now();
        let uri =
            c.mt.haven(&["failover", "test", "web01", "--point", "latest"])?;
        uri_times.push(t.elapsed());
        let (addr, export) = nbd_target(uri.trim())?;
        let mut view = NbdClient::connect(&addr, &export)?;
        let got = view.read(0, 4096)?;
        read_times.push(t.elapsed());
        view.disconnect()?;
        if got != first {
            bail!("the test failover of the {gib} GiB disk does not hold the last write at 0");
        }
        let t = Instant::now();
        c.mt.haven(&["failover", "cleanup", "web01"])?;
        cleanup_times.push(t.elapsed());
    }

    let copy = if copy_baseline {
        let copy = dir.join("copy.raw");
        let took = cp_synced(&["--sparse=never", "--reflink=never"], &c.replica()?, &copy)?;
        let _ = std::fs::remove_file(&copy);
        Some(took)
    } else {
        None
    };
    drop(c);
    remove_bulk(&dir);
    Ok(Ready {
        gib,
        uri: uri_times,
        first_read: read_times,
        cleanup: cleanup_times,
        sync,
        copy,
    })
}

// --- 3. Materialisation ------------------------------------------------------------------------

struct Materialised {
    size: u64,
    haven: Duration,
    /// `cp` (holes kept) and `cp --sparse=never`, each with `sync` of the copy.
    copy: Duration,
    copy_full: Duration,
    /// Bytes the image and the copy occupy on disk.
    allocated: (u64, u64),
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn materialise(dir: &Path, bins: &Path) -> Result<Materialised> {
    // The materialisation run's disk: 1 GiB unless `HAVEN_BENCH_GIB` says.
    let size = crate::bench::disk_bytes(1);
    let dir = dir.join("materialise");
    std::fs::create_dir_all(&dir)?;
    let source = dir.join("source.raw");
    mixed_disk(&source, size, 42)?;
    let mut c = start(&dir, &source, bins, &[])?;
    wait_protected(&mut c)?;
    // Changes the point carries in its journal records, then a copy of the source with the
    // workload stopped, then the point, then changes the point must not hold.
    write_random(&c, size, 64, 7)?;
    let at_point = dir.join("source-at-point.raw");
    std::fs::copy(&source, &at_point)?;
    let id: u64 =
        c.mt.haven(&["point", "create", "web01"])?
            .trim()
            .parse()
            .context("`haven point create` printed no point id")?;
    write_random(&c, size, 32, 11)?;
    let replica = c.replica()?;

    let t = Instant::now();
    let image =
        c.mt.haven(&["failover", "web01", "--point", &id.to_string()])?;
    let haven = t.elapsed();
    let image = storage_root(&replica)?.join(image.trim());
    let copy = dir.join("replica-copy.raw");
    let copied = cp_synced(&["--reflink=never"], &replica, &copy)?;
    let allocated = (allocated(&image), allocated(&copy));
    let _ = std::fs::remove_file(&copy);
    let copied_full = cp_synced(&["--reflink=never", "--sparse=never"], &replica, &copy)?;
    if !images_equal(&at_point, &image)? {
        bail!(
            "the materialised image {} differs from the source at point {id} ({})",
            image.display(),
            at_point.display()
        );
    }
    let result = Materialised {
        size,
        haven,
        copy: copied,
        copy_full: copied_full,
        allocated,
    };
    drop(c);
    remove_bulk(&dir);
    Ok(result)
}

// --- The run -----------------------------------------------------------------------------------

pub fn run(root: &Path) -> Result<()> {
    let target = target_dir(root);
    let bins = target.join("release");
    let dir = target.join("bench-points");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let begun = Instant::now();
    let mut out = Out(String::new());

    eprintln!("1/3 RPO under churn …");
    let rpo = rpo(&dir, &bins)?;
    eprintln!("2/3 test-failover ready time …");
    let mut readies = Vec::new();
    for gib in READY_SIZES {
        readies.push(ready(&dir, &bins, gib, gib == 1)?);
    }
    eprintln!("3/3 materialisation …");
    let mat = materialise(&dir, &bins)?;

    // --- Details ---
    out.line(format!(
        "1. RPO under churn: {} GiB disk, 1 MiB writes at random offsets paced for {}s, \
         --point-interval as listed, master target status sampled every {} ms, percentiles after the \
         first {}s",
        CHURN_DISK / GIB,
        CHURN_TIME.as_secs(),
        SAMPLE_EVERY.as_millis(),
        WARMUP.as_secs()
    ));
    out.line(format!(
        "{:>8} {:>9} {:>11} {:>9} {:>7}  {:>23}  {:>23}  {:>7} {:>6} {:>6}  {}",
        "points",
        "target",
        "achieved",
        "write p99",
        "samples",
        "lag_seconds p50/p99/max",
        "point age p50/p99/max",
        "log max",
        "points",
        "drain",
        "CPU % agent/ps/mt"
    ));
    for r in &rpo {
        let three = |v: &[f64]| {
            format!(
                "{:.2}/{:.2}/{:.2}s",
                percentile(v, 0.5),
                percentile(v, 0.99),
                percentile(v, 1.0)
            )
        };
        out.line(format!(
            "{:>8} {:>5}MiB/s {:>5.1}MiB/s{} {:>9} {:>7}  {:>23}  {:>23}  {:>4}MiB {:>6} {:>6}  {:.0}/{:.0}/{:.0}{}",
            format!(
                "{}ms{}",
                r.interval.as_millis(),
                if r.busy { "+busy" } else { "" }
            ),
            r.rate,
            r.achieved,
            if r.sustained() { " " } else { "!" },
            dur(r.write_p99),
            r.samples,
            three(&r.lag),
            three(&r.point_age),
            r.max_log / MIB,
            r.points.1 - r.points.0.min(r.points.1),
            r.drain.map_or_else(|| "> 60s".into(), dur),
            r.cpu[0],
            r.cpu[1],
            r.cpu[2],
            if r.states.is_empty() {
                String::new()
            } else {
                format!("  agent was {}", r.states.join(", "))
            }
        ));
    }
    for r in rpo.iter().filter(|r| !r.sustained()) {
        out.line(format!(
            "! {} MiB/s was not sustained: the writer managed {:.1} MiB/s (each write waits for \
             its acknowledgement); its row measures that rate",
            r.rate, r.achieved
        ));
    }
    out.line(
        "lag_seconds: the master target's age of the oldest journaled record in no point yet \
         (counted from its arrival there); point age: now - the newest point's source time, i.e. \
         what a failover to `latest` loses, transit through agent and process server included; \
         log max: the agent's change-log backlog; drain: writer's end until every acknowledged \
         write is in a point at the master target; +busy: one core spun a busy loop meanwhile \
         (a machine busy with other work); samples in rpo-*.csv",
    );
    out.line("");

    out.line(format!(
        "2. test failover: `haven failover test web01 --point latest`, spawn to URI printed, \
         {READY_RUNS} runs per size"
    ));
    for r in &readies {
        out.line(format!(
            "{:>3} GiB: URI median {} max {}; first 4 KiB read back median {} max {}; cleanup \
             median {}; (initial sync to first point {})",
            r.gib,
            dur(median(&r.uri)),
            dur(max(&r.uri)),
            dur(median(&r.first_read)),
            dur(max(&r.first_read)),
            dur(median(&r.cleanup)),
            dur(r.sync)
        ));
    }
    let copy_1g = readies
        .iter()
        .find_map(|r| r.copy.map(|c| (r.gib, c)))
        .context("no copy baseline was run")?;
    out.line(format!(
        "baseline: cp --sparse=never of the {} GiB replica + sync of the copy: {} ({:.0} MiB/s); \
         larger disks estimated proportionally (not run)",
        copy_1g.0,
        dur(copy_1g.1),
        mib_s(copy_1g.0 * GIB, copy_1g.1)
    ));
    out.line("");

    out.line(format!(
        "3. materialisation: {} GiB mixed disk, a point after 64 MiB of random writes (32 MiB \
         more after it), `haven failover web01 --point ID` vs cp of the replica + sync of the copy",
        mat.size / GIB
    ));
    out.line(format!(
        "haven {} ({:.0} MiB/s, image {} MiB allocated); cp {} ({:.0} MiB/s, copy {} MiB \
         allocated); cp --sparse=never {} ({:.0} MiB/s)",
        dur(mat.haven),
        mib_s(mat.size, mat.haven),
        mat.allocated.0 / MIB,
        dur(mat.copy),
        mib_s(mat.size, mat.copy),
        mat.allocated.1 / MIB,
        dur(mat.copy_full),
        mib_s(mat.size, mat.copy_full),
    ));
    out.line(
        "the image equals the source copied at the point (qemu-img compare); the CLI polls the \
         failover every 100 ms, so Haven's time is rounded up by up to 0.1s; warm page cache",
    );
    out.line("");

    // --- Summary ---
    out.line(format!(
        "{:<62} {:>10} {:>10} {:>8}  {}",
        "", "Haven", "baseline", "ratio", "goal"
    ));
    let churn = |r: &RpoRun| {
        let every = format!(
            "{}ms points{}",
            r.interval.as_millis(),
            if r.busy { ", 1 core busy" } else { "" }
        );
        if r.sustained() {
            format!("{} MiB/s, {every}", r.rate)
        } else {
            format!("{:.0} of {} MiB/s, {every}", r.achieved, r.rate)
        }
    };
    for (what, pick) in [
        (
            "lag_seconds",
            (|r: &RpoRun| &r.lag) as fn(&RpoRun) -> &Vec<f64>,
        ),
        ("point age", |r: &RpoRun| &r.point_age),
    ] {
        for r in &rpo {
            let p99 = percentile(pick(r), 0.99);
            // The goal: a failover to `latest` loses at most the interval plus half a second.
            let goal_s = r.interval.as_secs_f64() + RPO_SLACK;
            let goal = if r.rate == 100 && what == "point age" {
                format!(
                    "<= {goal_s:.1}s: {}",
                    if p99 <= goal_s && r.sustained() {
                        "met"
                    } else {
                        "NOT met"
                    }
                )
            } else {
                String::new()
            };
            out.line(format!(
                "{:<62} {:>10} {:>10} {:>8}  {goal}",
                format!("RPO p99 ({what}), {}", churn(r)),
                format!("{p99:.2}s"),
                "-",
                "-"
            ));
        }
    }
    for r in &readies {
        let ours = median(&r.uri);
        let (theirs, how) = match r.copy {
            Some(c) => (c, "cp --sparse=never"),
            None => (copy_1g.1 * (r.gib / copy_1g.0) as u32, "cp, estimated"),
        };
        out.line(format!(
            "{:<62} {:>10} {:>10} {:>7.0}x  <= {READY_GOAL:.0}s: {} (max {})",
            format!("test failover ready, {} GiB (vs {how})", r.gib),
            dur(ours),
            dur(theirs),
            secs(theirs) / secs(ours).max(1e-9),
            if secs(max(&r.uri)) <= READY_GOAL {
                "met"
            } else {
                "NOT met"
            },
            dur(max(&r.uri)),
        ));
    }
    for (how, theirs) in [("cp", mat.copy), ("cp --sparse=never", mat.copy_full)] {
        out.line(format!(
            "{:<62} {:>6.0}MB/s {:>6.0}MB/s {:>7.2}x",
            format!("materialise {} GiB (vs {how} + sync)", mat.size / GIB),
            mib_s(mat.size, mat.haven),
            mib_s(mat.size, theirs),
            secs(theirs) / secs(mat.haven).max(1e-9)
        ));
    }
    out.line(format!(
        "ratio: baseline time / Haven time (above 1: Haven is faster); MB = MiB; whole bench {:.0}s",
        secs(begun.elapsed())
    ));
    std::fs::write(dir.join("results.txt"), &out.0)?;
    Ok(())
}
