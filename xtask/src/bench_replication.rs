//! `cargo xtask bench replication`: Haven's replication against rsync, and the agent's write
//! path against writing the disk directly, in one run, with the processes' peak memory.
//!
//! 1. Initial replication of a 4 GiB mixed disk (1/3 never written, 1/3 text-like, 1/3
//!    random): agent → process server → master target on loopback, until the replica has
//!    applied everything, vs an rsync daemon on loopback receiving the same file.
//! 2. Delta replication of 1 % of the disk's 4 KiB blocks changed: from the workload's last
//!    write through the agent until the replica has applied it (the agent ships while the
//!    workload runs, as it does in production), vs `rsync --no-whole-file --inplace` of the
//!    changed file onto the old copy (default block size, and `-B 4096`).
//! 3. Write throughput: `qemu-img bench` writing 1 GiB in 1 MiB requests through the agent's NBD
//!    front end (while it replicates) vs onto a file directly, each ending with a flush; best of
//!    two rounds each.
//! 4. Peak resident memory (VmHWM) of the agent and both gateways.
//!
//! Release builds; every time includes making the result durable (`sync` for rsync, the
//! replica's own flush for Haven).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use haven_e2e::{Cluster, ClusterOptions, free_tcp_port, images_equal, mixed_disk, now_ms};

use crate::bench::{ratio, timed};

const BLOCK: u64 = 4096;
const WRITE_BYTES: u64 = 1 << 30;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1048576.0 / d.as_secs_f64()
}

pub fn run(root: &Path) -> Result<()> {
    let size = crate::bench::disk_bytes(4);
    let dir = root.join("target/bench-replication");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let source = dir.join("source.raw");
    mixed_disk(&source, size, 42)?;
    println!(
        "source: {} GiB raw, 1 MiB stripes: never written / text-like / random\n",
        size >> 30
    );

    // --- 1. Initial replication -------------------------------------------------------------
    let rsync_dir = dir.join("rsync");
    std::fs::create_dir_all(rsync_dir.join("module"))?;
    let port = free_tcp_port();
    let conf = rsync_dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = false\nuid = root\ngid = root\n[bench]\npath = {}\nread only = false\n",
            rsync_dir.join("module").display()
        ),
    )?;
    let mut daemon = Command::new("rsync")
        .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--config={}", conf.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the rsync daemon")?;
    std::thread::sleep(Duration::from_millis(500));
    let rsync_initial = timed(
        Command::new("rsync")
            .arg("--sparse")
            .arg(&source)
            .arg(format!("rsync://127.0.0.1:{port}/bench/disk.raw")),
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    let rsync_initial = rsync_initial?;
    let old_copy = rsync_dir.join("module/disk.raw");

    let bins = root.join("target/release");
    let started = Instant::now();
    let mut cluster = Cluster::start(
        &dir.join("sites"),
        &source,
        ClusterOptions {
            bin_dir: Some(bins.clone()),
            ..ClusterOptions::default()
        },
    )?;
    cluster.wait_caught_up(now_ms(), Duration::from_secs(3600), |_, _| {})?;
    let haven_initial = started.elapsed();
    let cpu = |p: &haven_e2e::Proc| p.cpu_seconds().unwrap_or(0.0);
    let initial_cpu = (
        cpu(&cluster.agent.proc),
        cpu(&cluster.ps.proc),
        cpu(&cluster.mt.proc),
    );
    let replica = cluster.replica()?;
    if !images_equal(&source, &replica)? {
        bail!("the replica differs from the source after the initial replication");
    }
    let ps = cluster.ps.status()?.process_server.unwrap_or_default();
    let cached = ps
        .disks
        .first()
        .map_or((0, 0), |d| (d.received_bytes_total, d.stored_bytes_total));

    // --- 2. Delta replication ---------------------------------------------------------------
    // Two copies of the old disk for rsync's two runs.
    let old_copy_b = rsync_dir.join("disk-b4096.raw");
    timed(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&old_copy)
            .arg(&old_copy_b),
    )?;
    let blocks = size / BLOCK;
    let changed = blocks / 100;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < changed {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        picked.insert(x % blocks);
    }
    let script: Vec<String> = picked
        .iter()
        .enumerate()
        .map(|(i, b)| format!("write -P {} {} {BLOCK}", 1 + i % 250, b * BLOCK))
        .chain(std::iter::once("flush".to_string()))
        .collect();
    let script_file = dir.join("delta.qemu-io");
    std::fs::write(&script_file, script.join("\n") + "\n")?;
    let started = Instant::now();
    // qemu-io reads its commands from standard input.
    let status = Command::new("qemu-io")
        .args(["-f", "raw", &cluster.agent.nbd])
        .stdin(std::fs::File::open(&script_file)?)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("the delta workload failed");
    }
    let workload = started.elapsed();
    let end = Instant::now();
    let haven_delta = cluster.applied_after(end, now_ms(), Duration::from_secs(3600))?;
    cluster.wait_caught_up(now_ms(), Duration::from_secs(3600), |_, _| {})?;
    if !images_equal(&source, &replica)? {
        bail!("the replica differs from the source after the delta");
    }
    let rsync_delta = timed(
        Command::new("rsync")
            .args(["--no-whole-file", "--inplace"])
            .arg(&source)
            .arg(&old_copy),
    )?;
    let rsync_delta_4k = timed(
        Command::new("rsync")
            .args(["--no-whole-file", "--inplace", "-B", "4096"])
            .arg(&source)
            .arg(&old_copy_b),
    )?;

    // --- 3. Write path ----------------------------------------------------------------------
    let direct = dir.join("direct.raw");
    std::fs::File::create(&direct)?.set_len(size)?;
    let count = (WRITE_BYTES >> 20).to_string();
    let bench = |target: &str| {
        timed(Command::new("qemu-img").args([
            "bench",
            "-w",
            "-f",
            "raw",
            "-s",
            "1M",
            "-d",
            "8",
            "-c",
            &count,
            "--flush-interval",
            &count,
            target,
        ]))
    };
    // Best of two rounds each, alternating.
    let (mut direct_time, mut nbd_time) = (Duration::MAX, Duration::MAX);
    for _ in 0..2 {
        direct_time = direct_time.min(bench(&direct.to_string_lossy())?);
        nbd_time = nbd_time.min(bench(&cluster.agent.nbd)?);
    }
    // The same transport with and without Haven behind it: qemu-nbd serving a file, the
    // agent's write splitter alone (`haven-agent serve`), the agent protecting (replicating).
    let transport = nbd_transport(&dir, &bins, &cluster.agent.nbd, cluster.ps.proc.pid())?;
    cluster.wait_caught_up(now_ms(), Duration::from_secs(3600), |_, _| {})?;
    if !images_equal(&source, &replica)? {
        bail!("the replica differs from the source after the write test");
    }

    // --- 4. Memory --------------------------------------------------------------------------
    let rss = |p: &haven_e2e::Proc| p.peak_rss().map_or(0.0, |b| b as f64 / 1048576.0);
    let (agent_rss, ps_rss, mt_rss) = (
        rss(&cluster.agent.proc),
        rss(&cluster.ps.proc),
        rss(&cluster.mt.proc),
    );

    println!(
        "{:<50} {:>10} {:>10} {:>8}",
        "", "Haven", "baseline", "speed-up"
    );
    println!(
        "{:<50} {:>9.2}s {:>9.2}s {:>7.2}x",
        format!("initial replication, {} GiB (vs rsync daemon)", size >> 30),
        secs(haven_initial),
        secs(rsync_initial),
        ratio(rsync_initial, haven_initial)
    );
    println!(
        "{:<50} {:>9.2}s {:>9.2}s {:>7.1}x",
        "delta, 1 % of 4 KiB blocks (vs rsync)",
        secs(haven_delta),
        secs(rsync_delta),
        ratio(rsync_delta, haven_delta)
    );
    println!(
        "{:<50} {:>9.2}s {:>9.2}s {:>7.1}x",
        "delta, 1 % of 4 KiB blocks (vs rsync -B 4096)",
        secs(haven_delta),
        secs(rsync_delta_4k),
        ratio(rsync_delta_4k, haven_delta)
    );
    println!(
        "{:<50} {:>7.0}MB/s {:>7.0}MB/s {:>7.0}%",
        "write 1 GiB, 1 MiB requests (NBD vs direct)",
        mib_s(WRITE_BYTES, nbd_time),
        mib_s(WRITE_BYTES, direct_time),
        100.0 * secs(direct_time) / secs(nbd_time)
    );
    for t in &transport {
        println!(
            "{:<50} {:>8.0}{} {:>8.0}{} {:>7.0}%",
            format!("NBD qd16 {}, {} (vs qemu-nbd)", t.size, t.who),
            t.haven,
            t.unit,
            t.qemu_nbd,
            t.unit,
            100.0 * t.haven / t.qemu_nbd
        );
    }
    println!();
    println!(
        "NBD qd16: `qemu-img bench -w -d 16` (sequential requests, a flush at the end) over TCP \
         loopback against qemu-nbd serving a file and against the agent, same file system; goal \
         >= 90 % of qemu-nbd while replicating; \"PS paused\": the protecting agent with its \
         process server stopped, so the gateways' work does not share the cores"
    );
    println!(
        "delta: Haven's time is from the workload's last write until the replica has applied it; \
         the workload ({changed} writes of 4 KiB, one at a time through NBD) took {:.2}s before",
        secs(workload),
    );
    println!(
        "initial: the process server received {} MiB and cached {} MiB (zstd + AES-256-GCM); \
         CPU seconds: agent {:.1}, process server {:.1}, master target {:.1}",
        cached.0 >> 20,
        cached.1 >> 20,
        initial_cpu.0,
        initial_cpu.1,
        initial_cpu.2
    );
    println!(
        "peak memory: agent {agent_rss:.0} MiB, process server {ps_rss:.0} MiB, master target \
         {mt_rss:.0} MiB"
    );
    println!("every replica state was checked with qemu-img compare");
    Ok(())
}

/// One row of the NBD transport comparison.
struct Transport {
    size: &'static str,
    who: &'static str,
    unit: &'static str,
    haven: f64,
    qemu_nbd: f64,
}

/// Kills a helper process when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `qemu-img bench -w -d 16` at 1 MiB and 4 KiB against qemu-nbd, `haven-agent serve` and the
/// protecting agent at `protecting` (an `nbd://` URI); best of two rounds each. With the
/// process server's pid, the protecting agent is measured once more with the process server
/// stopped (SIGSTOP): the agent's own write path, without the gateways' work competing for the
/// same cores (its log holds the writes until the process server continues).
fn nbd_transport(
    dir: &Path,
    bins: &Path,
    protecting: &str,
    process_server: Option<u32>,
) -> Result<Vec<Transport>> {
    const SIZE: u64 = 1 << 30;
    let file = |name: &str| -> Result<std::path::PathBuf> {
        let p = dir.join(name);
        std::fs::File::create(&p)?.set_len(SIZE)?;
        Ok(p)
    };
    let q_port = free_tcp_port();
    let _qemu_nbd = Killed(
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-x",
                "disk",
                "-t",
                "-b",
                "127.0.0.1",
                "--cache=writeback",
            ])
            .arg(format!("--port={q_port}"))
            .arg(file("qemu-nbd.raw")?)
            .stdout(Stdio::null())
            .spawn()
            .context("starting qemu-nbd")?,
    );
    let s_port = free_tcp_port();
    let ready = dir.join("serve.ready");
    let _serve = Killed(
        Command::new(bins.join("haven-agent"))
            .args([
                "serve",
                "--log-max-bytes",
                &(8u64 << 30).to_string(),
                "--disk",
            ])
            .arg(file("serve.raw")?)
            .arg("--log-dir")
            .arg(dir.join("serve-log"))
            .args(["--listen", &format!("127.0.0.1:{s_port}"), "--ready-file"])
            .arg(&ready)
            .stderr(Stdio::null())
            .spawn()
            .context("starting haven-agent serve")?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        if Instant::now() > deadline {
            bail!("haven-agent serve did not get ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let qemu_uri = format!("nbd://127.0.0.1:{q_port}/disk");
    let serve_uri = format!("nbd://127.0.0.1:{s_port}/disk");
    // qemu-nbd may take a moment to listen.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", q_port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let bench = |uri: &str, size: &str, count: u64| -> Result<Duration> {
        let count = count.to_string();
        let mut best = Duration::MAX;
        for _ in 0..2 {
            best = best.min(timed(Command::new("qemu-img").args([
                "bench",
                "-w",
                "-f",
                "raw",
                "-d",
                "16",
                "-s",
                size,
                "-c",
                &count,
                "--flush-interval",
                &count,
                uri,
            ]))?);
        }
        Ok(best)
    };
    let mut rows = Vec::new();
    // 512 MiB in 1 MiB requests (MB/s), 64 MiB in 4 KiB requests (IOPS).
    for (size, count, unit, per) in [
        ("1 MiB", 512u64, "MB/s", 1048576.0 / 1e6),
        ("4 KiB", 16384u64, "IOPS", 1.0),
    ] {
        let arg = if size == "1 MiB" { "1M" } else { "4K" };
        let rate = |d: Duration| count as f64 * per / d.as_secs_f64();
        let qemu_nbd = rate(bench(&qemu_uri, arg, count)?);
        for (who, uri) in [("serve", serve_uri.as_str()), ("protect", protecting)] {
            rows.push(Transport {
                size,
                who,
                unit,
                haven: rate(bench(uri, arg, count)?),
                qemu_nbd,
            });
        }
        if let Some(pid) = process_server {
            let signal = |sig: &str| {
                Command::new("kill")
                    .args([sig, &pid.to_string()])
                    .status()
                    .context("signalling the process server")
            };
            signal("-STOP")?;
            let paused = bench(protecting, arg, count);
            signal("-CONT")?;
            rows.push(Transport {
                size,
                who: "protect, PS paused",
                unit,
                haven: rate(paused?),
                qemu_nbd,
            });
        }
    }
    Ok(rows)
}
