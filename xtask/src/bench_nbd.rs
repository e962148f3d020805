//! `cargo xtask bench nbd`: Haven's NBD exports against `qemu-nbd` serving the same data, in
//! one run.
//!
//! 1. Copy out: a 16 GiB disk holding 1 GiB of data (64 extents of 16 MiB spread over it) is
//!    protected, a point taken and presented by a test failover; `nbdcopy` and
//!    `qemu-img convert -O raw` copy the point out, and the same two copy the source file out
//!    of `qemu-nbd -r`. Every copy is compared with the source (`qemu-img compare`).
//! 2. Writes: `nbdcopy --requests=16 --request-size=SIZE --connections=N --flush` of random
//!    data (1 GiB at 1 MiB, 256 MiB at 4 KiB) into the agent's export while it replicates, and
//!    into `qemu-nbd` serving a file of the same size (`--cache=writeback`, `--shared=N`, which
//!    advertises multi-conn when N > 1, as the agent's export always does).
//!
//! Release builds; results in `target/bench-nbd/results.txt`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use haven_e2e::nbd::NbdClient;
use haven_e2e::{Cluster, Rng, free_tcp_port, images_equal, run_ok};

use crate::bench_points::{Out, dur, mib_s, random_mib, start, target_dir, vary, wait_protected};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The copy-out disk and the data it holds.
const COPY_DISK: u64 = 16 * GIB;
const EXTENTS: u64 = 64;
const EXTENT: u64 = 16 * MIB;
/// Write runs: request size, bytes written.
const WRITES: [(u64, u64); 2] = [(MIB, GIB), (4096, 256 * MIB)];
const CONNECTIONS: [u32; 2] = [1, 4];

/// `qemu-nbd` serving `file` on a TCP port of loopback, killed when dropped.
struct QemuNbd {
    child: Child,
    uri: String,
}

impl QemuNbd {
    fn start(file: &Path, read_only: bool, shared: u32) -> Result<QemuNbd> {
        let port = free_tcp_port();
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "-t", "-x", "disk", "--cache=writeback"])
            .args(["-p", &port.to_string(), "-e", &shared.to_string()]);
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start qemu-nbd")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("qemu-nbd did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(QemuNbd {
            child,
            uri: format!("nbd://127.0.0.1:{port}/disk"),
        })
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command; how long it took.
fn timed(cmd: &mut Command) -> Result<Duration> {
    let started = Instant::now();
    run_ok(cmd)?;
    Ok(started.elapsed())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("a path that is not UTF-8")
}

/// One copy-out: the tool, the source, how long.
struct CopyOut {
    tool: &'static str,
    haven: Duration,
    qemu: Duration,
}

/// Copies `uri` out with each tool into `dir`, checking each copy against `source`.
fn copy_out(uri: &str, source: &Path, dir: &Path) -> Result<[Duration; 2]> {
    let out = dir.join("copy.raw");
    let mut times = [Duration::ZERO; 2];
    for (i, tool) in ["nbdcopy", "qemu-img"].into_iter().enumerate() {
        let _ = std::fs::remove_file(&out);
        times[i] = match tool {
            "nbdcopy" => timed(Command::new("nbdcopy").args([uri, path_str(&out)?]))?,
            _ => timed(Command::new("qemu-img").args([
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                uri,
                path_str(&out)?,
            ]))?,
        };
        if !images_equal(&out, source)? {
            bail!("{tool}'s copy of {uri} differs from {}", source.display());
        }
    }
    let _ = std::fs::remove_file(&out);
    Ok(times)
}

fn copy_run(dir: &Path, bins: &Path) -> Result<Vec<CopyOut>> {
    let dir = dir.join("copy");
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("source.raw");
    std::fs::File::create(&disk)?.set_len(COPY_DISK)?;
    // A change log that holds the whole gigabyte: no overflow, no resync of 16 GiB.
    let mut c = start(&dir, &disk, bins, &["--log-max-bytes", "3221225472"])?;
    wait_protected(&mut c)?;
    write_extents(&c)?;
    point_when_caught_up(&mut c)?;
    let uri =
        c.mt.haven(&["failover", "test", "web01", "--point", "latest"])?;
    let haven = copy_out(uri.trim(), &disk, &dir)?;
    c.mt.haven(&["failover", "cleanup", "web01"])?;
    let qemu = {
        let server = QemuNbd::start(&disk, true, 1)?;
        copy_out(&server.uri, &disk, &dir)?
    };
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(vec![
        CopyOut {
            tool: "nbdcopy",
            haven: haven[0],
            qemu: qemu[0],
        },
        CopyOut {
            tool: "qemu-img convert",
            haven: haven[1],
            qemu: qemu[1],
        },
    ])
}

/// Takes a point once the agent has shipped what was written (a point is refused while the
/// disk resyncs or ships its backlog).
fn point_when_caught_up(c: &mut Cluster) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        c.check_alive()?;
        match c.mt.haven(&["point", "create", "web01"]) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.context("taking the point")),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// 1 GiB of random data in [`EXTENTS`] extents spread evenly over the disk, flushed.
fn write_extents(c: &Cluster) -> Result<()> {
    let mut client = NbdClient::connect(&format!("127.0.0.1:{}", c.agent.nbd_port), "disk")?;
    let mut rng = Rng(0x5eed);
    let mut data = random_mib(&mut rng);
    let stride = COPY_DISK / EXTENTS;
    for e in 0..EXTENTS {
        for m in 0..EXTENT / MIB {
            vary(&mut data, e * 64 + m);
            client.write(e * stride + m * MIB, &data)?;
        }
    }
    client.flush()?;
    client.disconnect()
}

/// One write run.
struct WriteRun {
    request: u64,
    bytes: u64,
    connections: u32,
    haven: Duration,
    qemu: Duration,
}

/// `nbdcopy` of `source` into `uri` with these settings, flushed at the end.
fn nbdcopy_in(source: &Path, uri: &str, request: u64, connections: u32) -> Result<Duration> {
    timed(Command::new("nbdcopy").args([
        "--flush",
        "--requests=16",
        &format!("--request-size={request}"),
        &format!("--connections={connections}"),
        path_str(source)?,
        uri,
    ]))
}

fn write_runs(dir: &Path, bins: &Path) -> Result<Vec<WriteRun>> {
    let dir = dir.join("writes");
    std::fs::create_dir_all(&dir)?;
    let biggest = WRITES.iter().map(|&(_, b)| b).max().unwrap_or(GIB);
    // Random data, so that compression does not flatter either side.
    let mut rng = Rng(0xfeed);
    let mut sources = Vec::new();
    for &(_, bytes) in &WRITES {
        let path = dir.join(format!("data-{}m.raw", bytes / MIB));
        let mut data = Vec::with_capacity(bytes as usize);
        for n in 0..bytes / MIB {
            let mut mib = random_mib(&mut rng);
            vary(&mut mib, n);
            data.extend_from_slice(&mib);
        }
        std::fs::write(&path, data)?;
        sources.push(path);
    }
    let disk = dir.join("source.raw");
    std::fs::File::create(&disk)?.set_len(biggest)?;
    let mut c = start(&dir, &disk, bins, &[])?;
    wait_protected(&mut c)?;
    let target = dir.join("qemu.raw");
    std::fs::File::create(&target)?.set_len(biggest)?;
    let mut runs = Vec::new();
    for (&(request, bytes), source) in WRITES.iter().zip(&sources) {
        for connections in CONNECTIONS {
            let haven = nbdcopy_in(source, &c.agent.nbd, request, connections)?;
            c.check_alive()?;
            let qemu = {
                let server = QemuNbd::start(&target, false, connections)?;
                nbdcopy_in(source, &server.uri, request, connections)?
            };
            runs.push(WriteRun {
                request,
                bytes,
                connections,
                haven,
                qemu,
            });
        }
    }
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(runs)
}

fn size_name(bytes: u64) -> String {
    if bytes >= MIB {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

pub fn run(root: &Path) -> Result<()> {
    let target = target_dir(root);
    let bins: PathBuf = target.join("release");
    let dir = target.join("bench-nbd");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let begun = Instant::now();
    let mut out = Out(String::new());

    eprintln!("1/2 copy out a point of a 16 GiB disk holding 1 GiB …");
    let copies = copy_run(&dir, &bins)?;
    eprintln!("2/2 writes through the agent's export while it replicates …");
    let writes = write_runs(&dir, &bins)?;

    out.line(format!(
        "1. copy out: {} GiB disk holding {} GiB ({EXTENTS} extents of {} MiB); Haven: a test \
         failover of a point; baseline: qemu-nbd -r serving the source file; every copy \
         compared identical with the source",
        COPY_DISK / GIB,
        EXTENTS * EXTENT / GIB,
        EXTENT / MIB
    ));
    out.line(
        "2. writes: nbdcopy --requests=16 --flush of random data into the agent's export \
         (protecting, replicating) vs qemu-nbd --cache=writeback --shared=N serving a file \
         (multi-conn on both with 4 connections)",
    );
    out.line("");
    out.line(format!(
        "{:<52} {:>10} {:>10} {:>7}",
        "", "Haven", "baseline", "ratio"
    ));
    for c in &copies {
        out.line(format!(
            "{:<52} {:>10} {:>10} {:>6.2}x",
            format!("copy out, {}", c.tool),
            dur(c.haven),
            dur(c.qemu),
            c.qemu.as_secs_f64() / c.haven.as_secs_f64().max(1e-9)
        ));
    }
    for w in &writes {
        out.line(format!(
            "{:<52} {:>6.0}MB/s {:>6.0}MB/s {:>6.2}x",
            format!(
                "writes {} x {}, {} connection{}",
                size_name(w.bytes),
                size_name(w.request),
                w.connections,
                if w.connections == 1 { "" } else { "s" }
            ),
            mib_s(w.bytes, w.haven),
            mib_s(w.bytes, w.qemu),
            w.qemu.as_secs_f64() / w.haven.as_secs_f64().max(1e-9)
        ));
    }
    out.line(format!(
        "ratio: baseline time / Haven time (above 1: Haven is faster); MB = MiB; whole bench {:.0}s",
        begun.elapsed().as_secs_f64()
    ));
    std::fs::write(dir.join("results.txt"), &out.0)?;
    Ok(())
}
