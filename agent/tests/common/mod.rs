//! Helpers for the agent's end-to-end tests: the real binary, real qemu-io and qemu-img.
#![allow(dead_code)]

use std::fs::{self, File};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const DISK_SIZE: u64 = 64 * 1024 * 1024;
pub const EXPORT: &str = "vda";

pub fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_haven-agent")
}

/// A sparse zeroed raw file.
pub fn sparse_file(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running agent, killed when dropped.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub stderr: PathBuf,
    pub port: Option<u16>,
}

impl Agent {
    /// Starts `haven-agent serve` on `disk` and `log_dir`, listening on `DIR/nbd.sock` (and on a
    /// TCP port with `tcp`), and waits until it accepts.
    pub fn start(dir: &Path, disk: &Path, log_dir: &Path, tcp: bool, extra: &[&str]) -> Agent {
        let socket = dir.join("nbd.sock");
        let stderr = unique(dir.join("agent.log"));
        let port = tcp.then(free_port);
        let mut cmd = Command::new(agent_bin());
        cmd.arg("serve")
            .arg("--disk")
            .arg(disk)
            .arg("--log-dir")
            .arg(log_dir)
            .arg("--socket")
            .arg(&socket)
            .args(["--export", EXPORT])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap());
        if let Some(port) = port {
            cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if UnixStream::connect(&socket).is_ok()
                && port.is_none_or(|p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok())
            {
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "agent exited with {status} before accepting:\n{}",
                    fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "agent did not start in time");
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent {
            child,
            socket,
            stderr,
            port,
        }
    }

    pub fn unix_url(&self) -> String {
        format!("nbd+unix:///{EXPORT}?socket={}", self.socket.display())
    }

    pub fn tcp_url(&self) -> String {
        format!(
            "nbd://127.0.0.1:{}/{EXPORT}",
            self.port.expect("started with tcp")
        )
    }

    /// SIGKILL, like a crash of the agent process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn unique(p: PathBuf) -> PathBuf {
    let mut p = p;
    let mut n = 0;
    while p.exists() {
        n += 1;
        p = p.with_extension(format!("{n}.log"));
    }
    p
}

/// Runs qemu-io on `target` (a raw file or an NBD URL) with `cmds`.
pub fn qemu_io(target: &str, cmds: &[String]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(target);
    c.output().expect("qemu-io runs")
}

/// Like [`qemu_io`], and fails the test when qemu-io reports an error.
pub fn qemu_io_ok(target: &str, cmds: &[String]) -> String {
    let out = qemu_io(target, cmds);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stdout.contains("failed") && !stderr.contains("failed"),
        "qemu-io on {target} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// `qemu-img compare -f raw -F raw a b`: true when identical.
pub fn images_equal(a: &str, b: &str) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", a, b])
        .output()
        .expect("qemu-img runs");
    match out.status.code() {
        Some(0) => true,
        Some(1) => {
            eprintln!(
                "qemu-img compare {a} {b}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            false
        }
        _ => panic!(
            "qemu-img compare {a} {b} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Runs a haven-agent subcommand that must succeed; returns its stdout.
pub fn agent_cmd(args: &[&str]) -> String {
    let out = Command::new(agent_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "haven-agent {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `log-replay` of `log_dir` onto a fresh zeroed image at `image`.
pub fn replay_onto_zeroes(log_dir: &Path, image: &Path) -> String {
    sparse_file(image, DISK_SIZE);
    agent_cmd(&[
        "log-replay",
        "--log-dir",
        log_dir.to_str().unwrap(),
        "--onto",
        image.to_str().unwrap(),
    ])
}

/// `log-dump` parsed into (seq, kind, offset, len).
pub fn log_dump(log_dir: &Path) -> Vec<(u64, String, u64, u64)> {
    agent_cmd(&["log-dump", "--log-dir", log_dir.to_str().unwrap()])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].to_string(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
            )
        })
        .collect()
}

/// A small seeded generator (xorshift64*), so failures replay with the printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Seeded random qemu-io commands within `lo..hi`: pattern writes (aligned and unaligned, some
/// with FUA), zero writes, discards and flushes.
pub fn workload(rng: &mut Rng, n: usize, lo: u64, hi: u64) -> Vec<String> {
    let mut cmds = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = rng.below(100);
        let (off, len) = if kind < 45 {
            // Unaligned: any byte offset and length.
            let len = 1 + rng.below(192 * 1024);
            (lo + rng.below(hi - lo - len), len)
        } else if kind < 60 {
            // Large and aligned.
            let len = (1 + rng.below(1024)) * 4096;
            let off = lo + rng.below((hi - lo - len) / 4096) * 4096;
            (off, len)
        } else {
            let len = (1 + rng.below(64)) * 512;
            let off = lo + rng.below((hi - lo - len) / 512) * 512;
            (off, len)
        };
        let pattern = 1 + rng.below(255);
        let cmd = match kind {
            0..=69 => {
                let fua = if rng.below(8) == 0 { " -f" } else { "" };
                format!("write{fua} -P {pattern} {off} {len}")
            }
            70..=81 => format!("write -z {off} {len}"),
            82..=91 => {
                // Discards are hints that qemu may shorten at unaligned edges: keep them on
                // 64 KiB boundaries so the reference file and the agent see the same ranges.
                let len = (1 + rng.below(16)) * 65536;
                let off = lo + rng.below((hi - lo - len) / 65536) * 65536;
                format!("discard {off} {len}")
            }
            _ => "flush".to_string(),
        };
        cmds.push(cmd);
    }
    cmds
}
