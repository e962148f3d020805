//! `haven-agent enroll` and `protect` against a real QUIC receiver (written here: the gateway is
//! built elsewhere): initial sync under a workload, SIGKILL at any moment, resync after the log
//! is lost, a log that overflows while the gateway is away, graceful stop, status.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Rng, agent_bin, qemu_io, qemu_io_ok, workload};
use haven_net::SiteCa;
use haven_net::endpoint::{Server, ServerTls};
use haven_net::stream::{FrameReader, Report, read_report, write_frames};
use haven_wire::{
    Frame, HashRequest, Hashes, Payload, Receiver, ReceiverConfig, ReceiverEvent, Record,
};
use sha2::{Digest, Sha256};

const NAME: &str = "127.0.0.1";

/// What the receiver holds.
#[derive(Clone, Default)]
struct Replica {
    /// Each record waits this long before it is taken (a slow downstream).
    delay: Duration,
    data: Vec<u8>,
    durable: u64,
    /// Bytes of `Data` payloads received.
    data_bytes: u64,
    records: u64,
    reports: Vec<Report>,
    connections: u64,
}

/// A CA, a QUIC server and a receiver applying every record to an in-memory replica.
struct Site {
    dir: tempfile::TempDir,
    ca: Arc<Mutex<SiteCa>>,
    addr: std::net::SocketAddr,
    replica: Arc<Mutex<Replica>>,
    /// While true the receiver is away: connections are closed, new ones refused.
    paused: tokio::sync::watch::Sender<bool>,
    _rt: tokio::runtime::Runtime,
    _server: Arc<Server>,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut ca = SiteCa::init(dir.path().join("ca"), "test-site").unwrap();
        let (cert_pem, key_pem) = ca.issue_server_cert(&[NAME.to_string()]).unwrap();
        let tls = ServerTls {
            cert_pem,
            key_pem,
            ca_pem: ca.ca_cert_pem().to_string(),
            crl_pems: vec![ca.crl_pem().unwrap()],
            client_ca_pems: Vec::new(),
        };
        let ca = Arc::new(Mutex::new(ca));
        let server = rt.block_on(async {
            Arc::new(Server::bind("127.0.0.1:0".parse().unwrap(), tls, Some(ca.clone())).unwrap())
        });
        let addr = server.local_addr().unwrap();
        let replica = Arc::new(Mutex::new(Replica::default()));
        let (srv, rep) = (server.clone(), replica.clone());
        let (paused, paused_rx) = tokio::sync::watch::channel(false);
        rt.spawn(async move {
            while let Some(conn) = srv.accept().await {
                if *paused_rx.borrow() {
                    conn.connection.close(0u32.into(), b"away");
                    continue;
                }
                tokio::spawn(serve_agent(conn.connection, rep.clone(), paused_rx.clone()));
            }
        });
        Site {
            dir,
            ca,
            addr,
            replica,
            paused,
            _rt: rt,
            _server: server,
        }
    }

    fn token(&self) -> String {
        self.ca
            .lock()
            .unwrap()
            .create_token(Duration::from_secs(600))
            .unwrap()
            .to_string()
    }

    /// Takes the receiver away (`true`) or brings it back.
    fn pause(&self, on: bool) {
        self.paused.send_replace(on);
    }

    fn server(&self) -> String {
        self.addr.to_string()
    }

    /// Enrolls `data` through the binary.
    fn enroll(&self, data: &Path) {
        let out = Command::new(agent_bin())
            .args(["enroll", "--data-dir", data.to_str().unwrap()])
            .args(["--server", &self.server(), "--token", &self.token()])
            .args(["--machine-name", "web01"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "enroll: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn replica_equals(&self, disk: &Path) -> bool {
        let want = fs::read(disk).unwrap();
        let r = self.replica.lock().unwrap();
        if r.data.len() != want.len() {
            eprintln!("replica {} bytes, disk {}", r.data.len(), want.len());
            return false;
        }
        let bad = r
            .data
            .chunks(65536)
            .zip(want.chunks(65536))
            .position(|(a, b)| a != b);
        if let Some(i) = bad {
            eprintln!("replica differs from the disk in the 64 KiB block {i}");
            return false;
        }
        true
    }
}

/// One agent connection: reports on uni streams, one replication stream.
async fn serve_agent(
    conn: haven_net::quinn::Connection,
    replica: Arc<Mutex<Replica>>,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    replica.lock().unwrap().connections += 1;
    let reports = conn.clone();
    let rep = replica.clone();
    tokio::spawn(async move {
        while let Ok(recv) = reports.accept_uni().await {
            if let Ok(r) = read_report(recv).await {
                rep.lock().unwrap().reports.push(r);
            }
        }
    });
    let Ok((mut send, recv)) = conn.accept_bi().await else {
        return;
    };
    let mut reader = FrameReader::new(recv);
    let durable = replica.lock().unwrap().durable;
    let mut rx = Receiver::new(ReceiverConfig::default(), [(1, durable)]);
    rx.connect(std::time::Instant::now());
    loop {
        while let Some(ev) = rx.poll_event() {
            match ev {
                ReceiverEvent::Hello(h) => {
                    let mut r = replica.lock().unwrap();
                    let size = h.disks[0].size as usize;
                    if r.data.len() != size {
                        r.data = vec![0; size];
                    }
                }
                ReceiverEvent::Record(Record::Write(w)) => {
                    let mut r = replica.lock().unwrap();
                    let off = w.offset as usize;
                    match &w.data {
                        Payload::Data(b) => {
                            r.data[off..off + b.len()].copy_from_slice(b);
                            r.data_bytes += b.len() as u64;
                        }
                        Payload::Zero { len } | Payload::Trim { len } => {
                            r.data[off..off + *len as usize].fill(0);
                        }
                        Payload::Compressed { .. } => panic!("the agent does not compress"),
                    }
                    r.durable = w.seq;
                    r.records += 1;
                    rx.mark_durable(1, w.seq).unwrap();
                }
                ReceiverEvent::Record(Record::Tag(t)) => {
                    replica.lock().unwrap().durable = t.seq;
                    rx.mark_durable(1, t.seq).unwrap();
                }
                ReceiverEvent::HashRequest(req) => {
                    let h = hashes(&replica.lock().unwrap().data, req);
                    rx.send_hashes(h).unwrap();
                }
                ReceiverEvent::PeerError(_)
                | ReceiverEvent::ProtocolError(_)
                | ReceiverEvent::ConnectionDead => {}
            }
        }
        let frames: Vec<Frame> = std::iter::from_fn(|| rx.poll_transmit(Instant::now())).collect();
        if !frames.is_empty() && write_frames(&mut send, frames).await.is_err() {
            return;
        }
        if rx.is_closed() {
            return;
        }
        // Away: nothing more is taken (frames already received included).
        if *paused.borrow() {
            conn.close(0u32.into(), b"away");
            return;
        }
        let frame = tokio::select! {
            f = reader.next() => f,
            _ = paused.wait_for(|p| *p) => {
                conn.close(0u32.into(), b"away");
                return;
            }
        };
        match frame {
            Ok(Some(f)) => {
                let delay = replica.lock().unwrap().delay;
                if matches!(f, Frame::Write(_)) && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                rx.handle(Instant::now(), f)
            }
            _ => return,
        }
    }
}

fn hashes(data: &[u8], req: HashRequest) -> Hashes {
    let bs = req.block_size as usize;
    let start = req.offset as usize;
    let end = ((req.offset + req.len) as usize).min(data.len());
    Hashes {
        disk: req.disk,
        offset: req.offset,
        block_size: req.block_size,
        hashes: data[start.min(end)..end]
            .chunks(bs)
            .map(|b| Sha256::digest(b).into())
            .collect(),
    }
}

/// A running `haven-agent protect`, SIGKILLed when dropped.
struct Agent {
    child: Child,
    socket: PathBuf,
    stderr: PathBuf,
}

impl Agent {
    fn start(data: &Path, disk: &Path, extra: &[&str]) -> Agent {
        let socket = data.join("nbd.sock");
        let _ = fs::remove_file(&socket);
        let mut n = 0;
        let stderr = loop {
            let p = data.join(format!("agent-{n}.log"));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        // The machine's boot id, as the agent sees it: a file the test may change to play a
        // machine restart.
        let boot = boot_file(data);
        if !boot.exists() {
            fs::write(&boot, "boot-1\n").unwrap();
        }
        let mut child = Command::new(agent_bin())
            .env("HAVEN_BOOT_ID_FILE", &boot)
            .args(["protect", "--data-dir", data.to_str().unwrap()])
            .args(["--disk", disk.to_str().unwrap()])
            .args(["--socket", socket.to_str().unwrap(), "--export", "vda"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&socket).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "agent exited with {status}:\n{}",
                    fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent {
            child,
            socket,
            stderr,
        }
    }

    fn url(&self) -> String {
        format!("nbd+unix:///vda?socket={}", self.socket.display())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; returns whether it exited with success.
    fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.success();
            }
            assert!(Instant::now() < deadline, "agent did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The file the agent of `data` reads its machine's boot id from.
fn boot_file(data: &Path) -> PathBuf {
    data.with_extension("boot-id")
}

fn status(data: &Path) -> Option<haven_net::stream::DiskReport> {
    let text = fs::read_to_string(data.join("status.json")).ok()?;
    let r: Report = serde_json::from_str(&text).ok()?;
    r.disks.into_iter().next()
}

/// Waits until the agent reports protected and everything acknowledged, and the replica has
/// caught up with the disk.
fn wait_converged(site: &Site, agent: &Agent, data: &Path, disk: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(d) = status(data)
            && d.state == haven_net::stream::DiskState::Protected
            && d.acked_seq == d.last_seq
            && site.replica_equals(disk)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no convergence; status {:?}\nagent log:\n{}",
            status(data),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A disk with data in most 1 MiB chunks, whole zero chunks and half-zero chunks.
fn prefilled_disk(path: &Path, size: u64, seed: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng::new(seed);
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..size >> 20 {
        match i % 5 {
            0 => continue,
            1 => {
                chunk.fill(0);
                for b in chunk[..512 << 10].chunks_mut(8) {
                    b.copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            _ => {
                for b in chunk.chunks_mut(8) {
                    b.copy_from_slice(&rng.next().to_le_bytes());
                }
            }
        }
        f.write_all_at(&chunk, i << 20).unwrap();
    }
}

fn seed() -> u64 {
    let seed = std::env::var("HAVEN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_0042u64);
    eprintln!("seed {seed} (set HAVEN_TEST_SEED to replay)");
    seed
}

/// A site with an agent enrolled in `<site>/agent`, and its disk `<site>/disk.raw` of `size`
/// bytes prefilled from `seed`.
fn enrolled_site(size: u64, seed: u64) -> (Site, PathBuf, PathBuf) {
    let site = Site::new();
    let data = site.dir.path().join("agent");
    let disk = site.dir.path().join("disk.raw");
    prefilled_disk(&disk, size, seed);
    site.enroll(&data);
    (site, data, disk)
}

/// Starts the agent, runs 20 writes of the workload of `seed`, and waits until the replica
/// equals the disk.
fn converged_after_workload(site: &Site, data: &Path, disk: &Path, seed: u64, size: u64) -> Agent {
    let agent = Agent::start(data, disk, &[]);
    qemu_io_ok(&agent.url(), &workload(&mut Rng::new(seed), 20, 0, size));
    wait_converged(site, &agent, data, disk, Duration::from_secs(30));
    agent
}

#[test]
fn enroll_protect_initial_sync_under_workload_converges() {
    let seed = seed();
    const SIZE: u64 = 64 << 20;
    let (site, data, disk) = enrolled_site(SIZE, seed);
    assert!(data.join("identity/key.pem").exists());
    let mode = fs::metadata(data.join("identity/key.pem"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // Enrolling again is refused and says how to re-enroll.
    let again = Command::new(agent_bin())
        .args(["enroll", "--data-dir", data.to_str().unwrap()])
        .args(["--server", &site.server(), "--token", &site.token()])
        .output()
        .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already enrolled") && err.contains("remove"),
        "{err}"
    );

    // A small log, so the initial pass has to wait for shipping and the workload overlaps it.
    let agent = Agent::start(
        &data,
        &disk,
        &[
            "--log-max-bytes",
            "67108864",
            "--log-segment-bytes",
            "4194304",
        ],
    );
    let mut rng = Rng::new(seed);
    for _ in 0..3 {
        let cmds = workload(&mut rng, 30, 0, SIZE);
        qemu_io_ok(&agent.url(), &cmds);
    }
    wait_converged(&site, &agent, &data, &disk, Duration::from_secs(40));

    // The status command and the reports the gateway got.
    let out = Command::new(agent_bin())
        .args(["status", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("protected"), "{text}");
    std::thread::sleep(Duration::from_millis(1500));
    {
        let r = site.replica.lock().unwrap();
        let last = r.reports.last().expect("reports arrive");
        assert_eq!(last.machine_name, "web01");
        assert_eq!(last.disks[0].size, SIZE);
        assert!(last.disks[0].written_bytes_total > 0);
    }

    // Graceful stop.
    let mut agent = agent;
    assert!(agent.terminate(), "{}", agent.log_text());
    let st = fs::read_to_string(data.join("disk.state")).unwrap();
    assert!(st.contains("\"state\":\"protected\""), "{st}");
    // A resized disk is refused with what to do.
    File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(SIZE + (1 << 20))
        .unwrap();
    let out = Command::new(agent_bin())
        .args(["protect", "--data-dir", data.to_str().unwrap()])
        .args(["--disk", disk.to_str().unwrap()])
        .args(["--socket", data.join("x.sock").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs a new protection"),
        "{err}"
    );
}

#[test]
fn sigkill_during_initial_sync_and_workload_loses_nothing() {
    let seed = seed();
    const SIZE: u64 = 64 << 20;
    let (site, data, disk) = enrolled_site(SIZE, seed);
    let args = [
        "--log-max-bytes",
        "67108864",
        "--log-segment-bytes",
        "2097152",
        "--window-bytes",
        "4194304",
    ];
    let mut rng = Rng::new(seed);
    let mut killed_mid_sync = false;
    for round in 0..4 {
        let mut agent = Agent::start(&data, &disk, &args);
        // A workload that the kill interrupts.
        let url = agent.url();
        let cmds = workload(&mut rng, 60, 0, SIZE);
        let client = std::thread::spawn(move || qemu_io(&url, &cmds));
        std::thread::sleep(Duration::from_millis(150 + 100 * round));
        agent.kill();
        let _ = client.join();
        let st = fs::read_to_string(data.join("disk.state")).unwrap();
        killed_mid_sync |= st.contains("initial-sync");
    }
    assert!(killed_mid_sync, "no kill landed during the initial sync");
    let agent = Agent::start(&data, &disk, &args);
    qemu_io_ok(&agent.url(), &workload(&mut rng, 30, 0, SIZE));
    wait_converged(&site, &agent, &data, &disk, Duration::from_secs(40));
    drop(agent);
}

#[test]
fn lost_log_resyncs_only_the_differences() {
    let seed = seed();
    const SIZE: u64 = 32 << 20;
    let (site, data, disk) = enrolled_site(SIZE, seed);
    let mut agent = converged_after_workload(&site, &data, &disk, seed, SIZE);
    assert!(agent.terminate());
    let seq_before = site.replica.lock().unwrap().durable;

    // The log is lost, and with it writes that reached the disk: 16 blocks of 64 KiB at
    // 4 KiB-aligned offsets (each spans at most two 64 KiB hash blocks).
    fs::remove_dir_all(data.join("log")).unwrap();
    let f = File::options().write(true).open(&disk).unwrap();
    let mut rng = Rng::new(seed ^ 0xD1FF);
    let mut slots: Vec<u64> = (0..SIZE / (128 << 10)).collect();
    let mut changed = 0u64;
    for _ in 0..16 {
        let slot = slots.swap_remove(rng.below(slots.len() as u64) as usize);
        let off = slot * (128 << 10) + rng.below(16) * 4096;
        let mut block = vec![0u8; 64 << 10];
        for b in block.chunks_mut(8) {
            b.copy_from_slice(&rng.next().to_le_bytes());
        }
        f.write_all_at(&block, off).unwrap();
        changed += block.len() as u64;
    }
    f.sync_all().unwrap();
    drop(f);
    assert!(!site.replica_equals(&disk));
    let received_before = site.replica.lock().unwrap().data_bytes;

    let agent = Agent::start(&data, &disk, &[]);
    wait_converged(&site, &agent, &data, &disk, Duration::from_secs(30));
    let r = site.replica.lock().unwrap();
    let sent = r.data_bytes - received_before;
    eprintln!("changed {changed} bytes, resync sent {sent} bytes");
    assert!(
        sent >= changed && sent <= 2 * changed,
        "sent {sent}, changed {changed}"
    );
    assert!(
        r.durable > seq_before,
        "the stream continued from the replica's seq"
    );
    let log = agent.log_text();
    assert!(
        log.contains("change log") && log.contains("missing"),
        "{log}"
    );
    assert!(log.contains("resync done"), "{log}");
    drop(r);
    drop(agent);
}

/// The downstream loses records it acknowledged (a process server lost for good; the one
/// that takes the agent over resumes where the replica is): the agent resends what its log
/// still holds and resyncs the rest. `protected`: the loss comes after the initial pass, and
/// only what the lost records wrote is compared; else during it, and the whole disk is.
fn a_downstream_that_lost_acknowledged_records(protected: bool) {
    let seed = seed();
    const SIZE: u64 = 64 << 20;
    let (site, data, disk) = enrolled_site(SIZE, seed);
    // 1 MiB segments: what is acknowledged leaves the log soon. During the initial pass, a
    // slow downstream and a small window keep the pass from finishing before the loss (it
    // runs at most a window ahead of what is acknowledged).
    let mut args = vec!["--log-segment-bytes", "1048576"];
    if !protected {
        site.replica.lock().unwrap().delay = Duration::from_millis(100);
        args.extend(["--window-bytes", "4194304"]);
    }
    let agent = Agent::start(&data, &disk, &args);
    if protected {
        qemu_io_ok(&agent.url(), &workload(&mut Rng::new(seed), 20, 0, SIZE));
        wait_converged(&site, &agent, &data, &disk, Duration::from_secs(30));
    }
    let wait_durable = |at_least: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while site.replica.lock().unwrap().durable < at_least {
            assert!(Instant::now() < deadline, "the replica does not move");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_durable(8);
    let kept = site.replica.lock().unwrap().clone();
    if protected {
        qemu_io_ok(
            &agent.url(),
            &workload(&mut Rng::new(seed ^ 0x1057), 40, 0, SIZE),
        );
    }
    wait_durable(kept.durable + 24);
    let state = status(&data).map(|d| d.state);
    if !protected {
        assert_eq!(state, Some(haven_net::stream::DiskState::InitialSync));
    }
    // Released by the agent (it frees acknowledged records every 500 ms), then lost: the
    // downstream holds what it held at `kept` and nothing after.
    std::thread::sleep(Duration::from_secs(1));
    site.pause(true);
    std::thread::sleep(Duration::from_millis(300));
    {
        let mut r = site.replica.lock().unwrap();
        let reports = std::mem::take(&mut r.reports);
        *r = Replica {
            delay: Duration::ZERO,
            reports,
            ..kept.clone()
        };
    }
    site.pause(false);
    wait_converged(&site, &agent, &data, &disk, Duration::from_secs(60));
    // The status file is written every second: read one written after the resync.
    std::thread::sleep(Duration::from_millis(1500));
    let compared = status(&data).map_or(0, |d| d.resync_compared_bytes);
    let log = agent.log_text();
    if protected {
        assert!(
            compared > 0 && compared < SIZE / 2,
            "compared {compared} bytes of {SIZE}\n{log}"
        );
        assert!(log.contains("comparing only what the records"), "{log}");
    } else {
        assert!(
            compared >= SIZE,
            "compared {compared} bytes of {SIZE}\n{log}"
        );
        assert!(!log.contains("comparing only what the records"), "{log}");
    }
}

#[test]
fn a_downstream_that_lost_records_resyncs_only_what_they_wrote() {
    a_downstream_that_lost_acknowledged_records(true);
}

#[test]
fn a_downstream_that_lost_records_during_the_initial_pass_compares_everything() {
    a_downstream_that_lost_acknowledged_records(false);
}

/// The gateway is away and the workload writes three times the log's size: every write
/// succeeds, the agent reports a resync with the cause, and once the gateway is back the
/// replica converges, sending about what differs rather than the whole disk.
#[test]
fn a_full_log_while_the_gateway_is_away_resyncs_and_never_fails_a_write() {
    let seed = seed();
    const SIZE: u64 = 64 << 20;
    const LOG: u64 = 8 << 20;
    let (site, data, disk) = enrolled_site(SIZE, seed);
    let log_max = LOG.to_string();
    let args = [
        "--log-max-bytes",
        log_max.as_str(),
        "--log-segment-bytes",
        "1048576",
    ];
    let agent = Agent::start(&data, &disk, &args);
    wait_converged(&site, &agent, &data, &disk, Duration::from_secs(60));

    site.pause(true);
    // 3 × the log: an 8 MiB region written three times over, 1 MiB at a time.
    const REGION: u64 = 16 << 20;
    let mut cmds = Vec::new();
    for round in 0..3u64 {
        for i in 0..8u64 {
            let pattern = 0x11 + round * 16 + i;
            cmds.push(format!("write -P {pattern} {} 1M", REGION + (i << 20)));
        }
        cmds.push("flush".to_string());
    }
    qemu_io_ok(&agent.url(), &cmds);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = status(&data);
        if let Some(d) = &st
            && d.state == haven_net::stream::DiskState::Resyncing
            && d.message
                .as_deref()
                .is_some_and(|m| m.contains("change log full") && m.contains("--log-max-bytes"))
        {
            assert!(d.log_bytes <= LOG, "{d:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no resync reported: {st:?}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!site.replica_equals(&disk));
    let received_before = site.replica.lock().unwrap().data_bytes;

    site.pause(false);
    wait_converged(&site, &agent, &data, &disk, Duration::from_secs(60));
    let sent = site.replica.lock().unwrap().data_bytes - received_before;
    let changed = 8u64 << 20;
    eprintln!("changed {changed} bytes, sent {sent} bytes after the gateway came back");
    assert!(
        sent >= changed && sent <= 2 * changed + (1 << 20),
        "sent {sent}, changed {changed}"
    );
    let log = agent.log_text();
    assert!(log.contains("change log full"), "{log}");
    assert!(log.contains("resync done"), "{log}");
    assert!(
        status(&data).unwrap().message.is_none(),
        "{:?}",
        status(&data)
    );
}

/// The change log is not synced while the agent runs (a killed agent loses nothing of it, the
/// kernel keeps it), so after a machine restart the agent was not stopped cleanly for, the disk
/// may hold writes the log lost: the agent drops the log and resyncs, and the replica
/// converges. After a clean stop the same restart keeps the log and resyncs nothing.
#[test]
fn an_unclean_machine_restart_resyncs_and_a_clean_one_does_not() {
    let seed = seed();
    const SIZE: u64 = 32 << 20;
    let (site, data, disk) = enrolled_site(SIZE, seed);
    let mut agent = converged_after_workload(&site, &data, &disk, seed, SIZE);

    // A clean stop, then the machine restarts: the log is kept.
    assert!(agent.terminate());
    fs::write(boot_file(&data), "boot-2\n").unwrap();
    let mut agent = Agent::start(&data, &disk, &[]);
    qemu_io_ok(
        &agent.url(),
        &workload(&mut Rng::new(seed ^ 1), 20, 0, SIZE),
    );
    wait_converged(&site, &agent, &data, &disk, Duration::from_secs(30));
    let log = agent.log_text();
    assert!(!log.contains("the machine restarted"), "{log}");
    assert!(!log.contains("resync"), "{log}");

    // Killed, and the machine restarts: the disk kept writes the log did not (a power cut
    // loses the log's unsynced pages; here the writes go to the disk behind the agent's back).
    agent.kill();
    let f = File::options().write(true).open(&disk).unwrap();
    let mut rng = Rng::new(seed ^ 0xB007);
    for _ in 0..8 {
        let off = rng.below(SIZE / 4096) * 4096;
        f.write_all_at(&rng.next().to_le_bytes().repeat(512), off)
            .unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    assert!(!site.replica_equals(&disk));
    fs::write(boot_file(&data), "boot-3\n").unwrap();
    let agent = Agent::start(&data, &disk, &[]);
    wait_converged(&site, &agent, &data, &disk, Duration::from_secs(30));
    let log = agent.log_text();
    assert!(
        log.contains("the machine restarted since the agent last ran (boot boot-2, now boot-3)"),
        "{log}"
    );
    assert!(log.contains("resync done"), "{log}");
}
