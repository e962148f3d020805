//! The NBD server over an in-memory backend, against the real qemu-io and a raw client: bytes
//! land in the backend, a read-only export refuses changes, `close` stops everything. Requests
//! pipelined on one connection are all answered (by handle, in any order) and run
//! concurrently; a FLUSH waits for the writes received before it; DISC and `close` with
//! requests in flight end the connection cleanly.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use haven_nbd::{Backend, Error, Server, bind_unix, proto};

const EXPORT: &str = "vdb";
const SIZE: u64 = 4 << 20;

/// A disk in memory, counting the changes and flushes that reach it.
struct MemBackend {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    changes: AtomicU64,
    flushes: AtomicU64,
}

impl MemBackend {
    fn new(size: u64, fill: u8, read_only: bool) -> Arc<MemBackend> {
        Arc::new(MemBackend {
            data: Mutex::new(vec![fill; size as usize]),
            read_only,
            changes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        })
    }

    fn bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].to_vec()
    }

    fn fill(&self, offset: u64, len: u64, byte: u8) {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(byte);
        self.changes.fetch_add(1, Ordering::SeqCst);
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), Error> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        self.changes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _punch: bool,
        _fast: bool,
        _fua: bool,
    ) -> Result<(), Error> {
        self.fill(offset, len, 0);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), Error> {
        self.fill(offset, len, 0);
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A server on a Unix socket and on TCP 127.0.0.1:0, each accept loop on its thread.
struct Serving {
    server: Arc<Server>,
    socket: PathBuf,
    tcp: SocketAddr,
    loops: Vec<thread::JoinHandle<io::Result<()>>>,
}

impl Serving {
    fn start(dir: &Path, backend: Arc<dyn Backend>) -> Serving {
        let server = Arc::new(Server::new(backend, EXPORT));
        let socket = dir.join("nbd.sock");
        let unix = bind_unix(&socket).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let loops = vec![
            {
                let server = Arc::clone(&server);
                thread::spawn(move || server.serve_unix(unix))
            },
            {
                let server = Arc::clone(&server);
                thread::spawn(move || server.serve_tcp(tcp))
            },
        ];
        Serving {
            server,
            socket,
            tcp: addr,
            loops,
        }
    }

    fn unix_url(&self) -> String {
        format!("nbd+unix:///{EXPORT}?socket={}", self.socket.display())
    }

    fn tcp_url(&self) -> String {
        format!("nbd://127.0.0.1:{}/{EXPORT}", self.tcp.port())
    }

    /// Closes the server and waits (bounded) for both accept loops to return `Ok`.
    fn close_and_join(&mut self) {
        self.server.close();
        let (tx, rx) = mpsc::channel();
        for t in self.loops.drain(..) {
            let tx = tx.clone();
            thread::spawn(move || tx.send(t.join()).unwrap());
        }
        for _ in 0..2 {
            let r = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("an accept loop returns after close");
            r.expect("no panic").expect("the accept loop returns Ok");
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.server.close();
    }
}

fn qemu_io(target: &str, read_only: bool, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if read_only {
        c.arg("-r");
    }
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(target);
    let out: Output = c.output().expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let ok = out.status.success() && !text.contains("failed") && !text.contains("error");
    (ok, text)
}

fn qemu_io_ok(target: &str, read_only: bool, cmds: &[&str]) {
    let (ok, text) = qemu_io(target, read_only, cmds);
    assert!(ok, "qemu-io {cmds:?} on {target}:\n{text}");
}

/// Waits until `cond` holds, or fails after 10 s.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A raw NBD client, for what qemu never sends.
struct Raw<S>(S);

impl<S: Read + Write> Raw<S> {
    /// Reads the greeting and answers with fixed newstyle and no zeroes.
    fn greet(mut s: S) -> Raw<S> {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(g[0..8], proto::NBDMAGIC.to_be_bytes());
        s.write_all(&3u32.to_be_bytes()).unwrap();
        Raw(s)
    }

    /// `NBD_OPT_GO` for `name`; returns the export's size and transmission flags.
    fn go(&mut self, name: &str) -> (u64, u16) {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = proto::IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        self.0.write_all(&opt).unwrap();
        let mut export = None;
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            self.0.read_exact(&mut d).unwrap();
            match typ {
                proto::REP_ACK => return export.expect("NBD_INFO_EXPORT before the ACK"),
                proto::REP_INFO if u16::from_be_bytes([d[0], d[1]]) == proto::INFO_EXPORT => {
                    export = Some((
                        u64::from_be_bytes(d[2..10].try_into().unwrap()),
                        u16::from_be_bytes(d[10..12].try_into().unwrap()),
                    ));
                }
                proto::REP_INFO => {}
                other => panic!("GO answered {other:#x}: {}", String::from_utf8_lossy(&d)),
            }
        }
    }

    /// Sends a request (and `payload` after it); returns the reply's error.
    fn request(&mut self, flags: u16, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> u32 {
        self.send(flags, cmd, 7, offset, len, payload);
        let (handle, error) = self.reply();
        assert_eq!(handle, 7);
        error
    }

    /// Sends a request (and `payload` after it) without waiting for its reply.
    fn send(&mut self, flags: u16, cmd: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.0.write_all(&b).unwrap();
    }

    /// The next reply's header: its handle and error (a read's data follows it).
    fn reply(&mut self) -> (u64, u32) {
        let mut r = [0u8; 16];
        self.0.read_exact(&mut r).unwrap();
        assert_eq!(r[0..4], proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
        )
    }

    /// Whether the server ended the connection: a read sees EOF or a reset.
    fn ended(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn qemu_io_writes_land_in_the_backend_over_unix_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let backend = MemBackend::new(SIZE, 0, false);
    let mut s = Serving::start(dir.path(), backend.clone());

    qemu_io_ok(
        &s.unix_url(),
        false,
        &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k", "flush"],
    );
    assert!(backend.bytes(0, 64 << 10).iter().all(|&b| b == 0x5a));
    assert!(backend.flushes.load(Ordering::SeqCst) >= 1);

    qemu_io_ok(
        &s.tcp_url(),
        false,
        &[
            "write -P 0xa5 1M 64k",
            "read -P 0xa5 1M 64k",
            "read -P 0x5a 0 64k",
            "write -z 1M 4k",
            "discard 8k 4k",
        ],
    );
    assert!(backend.bytes(1 << 20, 4096).iter().all(|&b| b == 0));
    let rest = backend.bytes((1 << 20) + 4096, (64 << 10) - 4096);
    assert!(rest.iter().all(|&b| b == 0xa5));
    assert!(backend.bytes(8 << 10, 4096).iter().all(|&b| b == 0));
    assert!(backend.bytes(0, 8 << 10).iter().all(|&b| b == 0x5a));
    assert!(backend.bytes(0, SIZE)[(2 << 20)..].iter().all(|&b| b == 0));

    // A read past the end is refused and the server goes on serving.
    let (ok, text) = qemu_io(&s.unix_url(), false, &["read 4M 512"]);
    assert!(!ok, "{text}");
    qemu_io_ok(&s.tcp_url(), true, &["read -P 0x5a 0 8k"]);

    s.close_and_join();
}

#[test]
fn read_only_export_refuses_changes_and_serves_reads() {
    let dir = tempfile::tempdir().unwrap();
    let backend = MemBackend::new(SIZE, 0x11, true);
    let mut s = Serving::start(dir.path(), backend.clone());

    // qemu-io opening it writable and writing: an error, the backend untouched.
    let (ok, text) = qemu_io(&s.unix_url(), false, &["write -P 0x5a 0 64k"]);
    assert!(!ok, "a write to a read-only export succeeded:\n{text}");
    let (ok, text) = qemu_io(&s.tcp_url(), false, &["write -P 0x5a 0 64k"]);
    assert!(!ok, "a write to a read-only export succeeded:\n{text}");
    // Reads are served.
    qemu_io_ok(&s.unix_url(), true, &["read -P 0x11 0 64k"]);
    qemu_io_ok(&s.tcp_url(), true, &["read -P 0x11 3M 1M"]);

    // A client that ignores the flag: every change is refused with EPERM.
    let mut c = Raw::greet(UnixStream::connect(&s.socket).unwrap());
    let (size, flags) = c.go(EXPORT);
    assert_eq!(size, SIZE);
    assert_eq!(flags, proto::transmission_flags(true, false, false));
    assert_ne!(flags & proto::TFLAG_READ_ONLY, 0);
    assert_eq!(
        c.request(0, proto::CMD_WRITE, 0, 512, &[0xee; 512]),
        proto::EPERM
    );
    assert_eq!(
        c.request(proto::CMD_FLAG_FUA, proto::CMD_WRITE, 0, 512, &[0xee; 512]),
        proto::EPERM
    );
    assert_eq!(c.request(0, proto::CMD_TRIM, 0, 4096, &[]), proto::EPERM);
    assert_eq!(
        c.request(0, proto::CMD_WRITE_ZEROES, 0, 4096, &[]),
        proto::EPERM
    );
    assert_eq!(c.request(0, proto::CMD_READ, 0, 512, &[]), 0);
    let mut back = [0u8; 512];
    c.0.read_exact(&mut back).unwrap();
    assert_eq!(back, [0x11; 512]);
    drop(c);

    assert_eq!(backend.changes.load(Ordering::SeqCst), 0);
    assert!(backend.bytes(0, SIZE).iter().all(|&b| b == 0x11));
    s.close_and_join();
}

#[test]
fn close_ends_the_serve_loops_and_drops_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let backend = MemBackend::new(SIZE, 0, false);
    let mut s = Serving::start(dir.path(), backend.clone());

    // One client in transmission over TCP, one still negotiating over the Unix socket.
    let mut tcp = Raw::greet(TcpStream::connect(s.tcp).unwrap());
    assert_eq!(tcp.go(EXPORT).0, SIZE);
    assert_eq!(tcp.request(0, proto::CMD_WRITE, 0, 512, &[1; 512]), 0);
    let mut unix = Raw::greet(UnixStream::connect(&s.socket).unwrap());
    wait_for("two live connections", || s.server.connections() == 2);

    s.close_and_join();
    assert!(s.server.is_closed());
    assert!(tcp.ended(), "the TCP connection stays open after close");
    assert!(unix.ended(), "the Unix connection stays open after close");
    wait_for("no live connection", || s.server.connections() == 0);

    // New connections are not served. (The freed TCP port may already be another process's
    // by now, so a connect can succeed; it must not reach this server.)
    let _late = TcpStream::connect(s.tcp);
    assert!(UnixStream::connect(&s.socket).is_err());
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(s.server.connections(), 0);
    assert_eq!(backend.bytes(0, 512), [1; 512]);

    // A closed server's accept loop returns at once.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    s.server.serve_tcp(listener).unwrap();
}

/// What a [`Recorder`] saw, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    WriteStarted(u64),
    WriteEnded(u64),
    Flush,
}

/// A [`MemBackend`] that records its writes and flushes in order, holds writes at the `gated`
/// offsets until [`Recorder::open_gate`], and, with `rendezvous` > 0, lets a read return only
/// once that many reads are in the backend at the same time (else it fails after 10 s).
struct Recorder {
    mem: Arc<MemBackend>,
    calls: Mutex<Vec<Call>>,
    gated: Vec<u64>,
    gate_open: Mutex<bool>,
    rendezvous: usize,
    reads_inside: Mutex<usize>,
    changed: Condvar,
}

impl Recorder {
    fn new(gated: Vec<u64>, rendezvous: usize) -> Arc<Recorder> {
        Arc::new(Recorder {
            mem: MemBackend::new(SIZE, 0, false),
            calls: Mutex::new(Vec::new()),
            gated,
            gate_open: Mutex::new(false),
            rendezvous,
            reads_inside: Mutex::new(0),
            changed: Condvar::new(),
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }

    fn open_gate(&self) {
        *self.gate_open.lock().unwrap() = true;
        self.changed.notify_all();
    }

    /// Whether the writes at `offsets` all ended.
    fn ended(&self, offsets: &[u64]) -> bool {
        let calls = self.calls();
        offsets
            .iter()
            .all(|o| calls.contains(&Call::WriteEnded(*o)))
    }

    /// Whether the writes at `offsets` all started.
    fn started_at(&self, offsets: &[u64]) -> bool {
        let calls = self.calls();
        offsets
            .iter()
            .all(|o| calls.contains(&Call::WriteStarted(*o)))
    }

    fn started(&self) -> usize {
        let calls = self.calls();
        calls
            .iter()
            .filter(|c| matches!(c, Call::WriteStarted(_)))
            .count()
    }
}

impl Backend for Recorder {
    fn size(&self) -> u64 {
        SIZE
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        if self.rendezvous > 0 {
            let mut inside = self.reads_inside.lock().unwrap();
            *inside += 1;
            self.changed.notify_all();
            let deadline = Instant::now() + Duration::from_secs(10);
            while *inside < self.rendezvous {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::io(format!(
                        "{} of {} reads in the backend at once after 10 s",
                        *inside, self.rendezvous
                    )));
                }
                inside = self.changed.wait_timeout(inside, left).unwrap().0;
            }
        }
        self.mem.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), Error> {
        self.record(Call::WriteStarted(offset));
        if self.gated.contains(&offset) {
            let mut open = self.gate_open.lock().unwrap();
            while !*open {
                open = self.changed.wait(open).unwrap();
            }
        }
        self.mem.write(offset, data, fua)?;
        self.record(Call::WriteEnded(offset));
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        punch: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), Error> {
        self.mem.write_zeroes(offset, len, punch, fast, fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Error> {
        self.mem.trim(offset, len, fua)
    }

    fn flush(&self) -> Result<(), Error> {
        self.record(Call::Flush);
        self.mem.flush()
    }
}

/// Content of write `i` of a test: its own byte, so a read shows which write it got.
fn pattern(i: u64, len: usize) -> Vec<u8> {
    vec![i as u8 + 1; len]
}

/// 16 writes sent without waiting, of every kind the server tells apart (quick ones the
/// reader runs, larger ones and FUA ones queued for the workers), then 16 reads of them sent
/// without waiting: every reply comes back once, under its handle, with its data.
fn pipeline_on<S: Read + Write>(c: &mut Raw<S>, backend: &MemBackend, base: u64) {
    let sizes = [
        4096,
        256 << 10,
        512,
        haven_nbd::QUICK_BYTES as usize,
        haven_nbd::QUICK_BYTES as usize + 512,
        128 << 10,
    ];
    let slot = 128u64 << 10;
    let writes: Vec<(u64, u64, usize)> = (0..16u64)
        .map(|i| {
            (
                100 + i,
                base + i * slot,
                sizes[i as usize % sizes.len()].min(slot as usize),
            )
        })
        .collect();
    for (i, &(handle, offset, len)) in writes.iter().enumerate() {
        let flags = if i % 5 == 4 { proto::CMD_FLAG_FUA } else { 0 };
        let data = pattern(i as u64, len);
        c.send(flags, proto::CMD_WRITE, handle, offset, len as u32, &data);
    }
    let mut answered = HashMap::new();
    for _ in 0..writes.len() {
        let (handle, error) = c.reply();
        assert_eq!(error, 0, "write {handle} failed");
        assert!(
            answered.insert(handle, ()).is_none(),
            "two replies for {handle}"
        );
    }
    assert!(writes.iter().all(|w| answered.contains_key(&w.0)));

    // Every write was answered, so every read sees it.
    for &(handle, offset, len) in &writes {
        c.send(0, proto::CMD_READ, handle + 1000, offset, len as u32, &[]);
    }
    let lens: HashMap<u64, (u64, usize)> = writes
        .iter()
        .enumerate()
        .map(|(i, &(h, _, len))| (h + 1000, (i as u64, len)))
        .collect();
    let mut read = HashMap::new();
    for _ in 0..writes.len() {
        let (handle, error) = c.reply();
        assert_eq!(error, 0, "read {handle} failed");
        let &(i, len) = lens.get(&handle).expect("a reply to a read sent");
        let mut data = vec![0u8; len];
        c.0.read_exact(&mut data).unwrap();
        assert!(data == pattern(i, len), "read {handle} got other data");
        assert!(
            read.insert(handle, ()).is_none(),
            "two replies for {handle}"
        );
    }
    for (i, &(_, offset, len)) in writes.iter().enumerate() {
        assert!(backend.bytes(offset, len as u64) == pattern(i as u64, len));
    }
}

#[test]
fn pipelined_requests_are_all_answered_by_handle_over_unix_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let backend = MemBackend::new(SIZE, 0, false);
    let mut s = Serving::start(dir.path(), backend.clone());

    let mut unix = Raw::greet(UnixStream::connect(&s.socket).unwrap());
    unix.go(EXPORT);
    pipeline_on(&mut unix, &backend, 0);
    let mut tcp = Raw::greet(TcpStream::connect(s.tcp).unwrap());
    tcp.go(EXPORT);
    pipeline_on(&mut tcp, &backend, 2 << 20);
    // Both still serve, one request at a time too.
    assert_eq!(unix.request(0, proto::CMD_FLUSH, 0, 0, &[]), 0);
    assert_eq!(tcp.request(0, proto::CMD_FLUSH, 0, 0, &[]), 0);
    s.close_and_join();
}

/// Two reads on one connection are in the backend at the same time (the backend lets each
/// return only once both are in): a server running one request at a time fails them.
#[test]
fn requests_on_one_connection_run_concurrently() {
    const { assert!(haven_nbd::WORKERS >= 2) };
    let dir = tempfile::tempdir().unwrap();
    let backend = Recorder::new(Vec::new(), 2);
    let mut s = Serving::start(dir.path(), backend.clone());
    let mut c = Raw::greet(UnixStream::connect(&s.socket).unwrap());
    c.go(EXPORT);
    c.send(0, proto::CMD_READ, 1, 0, 4096, &[]);
    c.send(0, proto::CMD_READ, 2, 4096, 4096, &[]);
    let mut handles = Vec::new();
    for _ in 0..2 {
        let (handle, error) = c.reply();
        assert_eq!(error, 0, "read {handle} did not overlap the other");
        let mut data = [0u8; 4096];
        c.0.read_exact(&mut data).unwrap();
        handles.push(handle);
    }
    handles.sort();
    assert_eq!(handles, [1, 2]);
    s.close_and_join();
}

/// A FLUSH runs only after every write received before it returned from the backend: the
/// first write is held in the backend while the others, and the writes sent after the FLUSH,
/// complete; the FLUSH reaches the backend only once the first one is let go.
#[test]
fn a_flush_waits_for_every_write_received_before_it() {
    // One worker holds the first write, one the waiting FLUSH, the rest run the others.
    const { assert!(haven_nbd::WORKERS >= 3) };
    let dir = tempfile::tempdir().unwrap();
    let backend = Recorder::new(vec![0], 0);
    let mut s = Serving::start(dir.path(), backend.clone());
    let mut c = Raw::greet(UnixStream::connect(&s.socket).unwrap());
    c.go(EXPORT);

    // Large writes are queued for the workers; every fourth is a quick one the reader runs.
    let slot = 128u64 << 10;
    let len = |i: u64| if i % 4 == 3 { 4096 } else { slot as usize };
    let before: Vec<u64> = (0..16).map(|i| i * slot).collect();
    let after: Vec<u64> = (16..20).map(|i| i * slot).collect();
    for (i, &offset) in before.iter().enumerate() {
        let i = i as u64;
        c.send(
            0,
            proto::CMD_WRITE,
            i,
            offset,
            len(i) as u32,
            &pattern(i, len(i)),
        );
    }
    c.send(0, proto::CMD_FLUSH, 99, 0, 0, &[]);
    for (i, &offset) in after.iter().enumerate() {
        let i = 16 + i as u64;
        c.send(
            0,
            proto::CMD_WRITE,
            i,
            offset,
            len(i) as u32,
            &pattern(i, len(i)),
        );
    }
    // Everything but the first write ran, the later writes too: the FLUSH was dequeued
    // before them, so a FLUSH that did not wait would be in the backend by now.
    wait_for("the writes but the first to end", || {
        backend.ended(&before[1..]) && backend.ended(&after)
    });
    assert!(
        !backend.calls().contains(&Call::Flush),
        "{:?}",
        backend.calls()
    );
    backend.open_gate();

    let mut handles: Vec<u64> = (0..21)
        .map(|_| {
            let (handle, error) = c.reply();
            assert_eq!(error, 0, "request {handle} failed");
            handle
        })
        .collect();
    handles.sort();
    let mut want: Vec<u64> = (0..20).collect();
    want.push(99);
    assert_eq!(handles, want);
    let calls = backend.calls();
    let flush = calls.iter().position(|c| *c == Call::Flush).unwrap();
    for offset in &before {
        let ended = calls.iter().position(|c| *c == Call::WriteEnded(*offset));
        assert!(
            ended < Some(flush),
            "write at {offset} ended after the flush: {calls:?}"
        );
    }
    s.close_and_join();
}

/// DISC with requests still in the backend: they finish, are answered, then the connection
/// ends, and its threads are gone.
#[test]
fn disconnect_answers_the_requests_in_flight_first() {
    let dir = tempfile::tempdir().unwrap();
    let slot = 128u64 << 10;
    let gated: Vec<u64> = (0..haven_nbd::WORKERS as u64).map(|i| i * slot).collect();
    let backend = Recorder::new(gated.clone(), 0);
    let mut s = Serving::start(dir.path(), backend.clone());
    let mut c = Raw::greet(UnixStream::connect(&s.socket).unwrap());
    c.go(EXPORT);

    // Every worker holds a write; a read and a quick write wait behind them.
    for (i, &offset) in gated.iter().enumerate() {
        c.send(
            0,
            proto::CMD_WRITE,
            i as u64,
            offset,
            slot as u32,
            &pattern(i as u64, slot as usize),
        );
    }
    c.send(0, proto::CMD_READ, 50, 0, 4096, &[]);
    c.send(0, proto::CMD_WRITE, 51, 3 << 20, 4096, &pattern(51, 4096));
    c.send(0, proto::CMD_DISC, 52, 0, 0, &[]);
    wait_for("every worker to hold a write", || {
        backend.started_at(&gated)
    });
    backend.open_gate();

    let mut handles = Vec::new();
    for _ in 0..gated.len() + 2 {
        let (handle, error) = c.reply();
        assert_eq!(error, 0, "request {handle} failed");
        if handle == 50 {
            let mut data = vec![0u8; 4096];
            c.0.read_exact(&mut data).unwrap();
            // Sent before the reply to the write at 0: either content is right.
            assert!(data == [0; 4096] || data == pattern(0, 4096));
        }
        handles.push(handle);
    }
    handles.sort();
    let mut want: Vec<u64> = (0..gated.len() as u64).collect();
    want.extend([50, 51]);
    assert_eq!(handles, want);
    assert!(c.ended(), "the connection stays open after DISC");
    wait_for("no live connection", || s.server.connections() == 0);
    assert!(backend.mem.bytes(3 << 20, 4096) == pattern(51, 4096));
    s.close_and_join();
}

/// `close` with requests in the backend and more queued: the connection ends at once for the
/// client, the requests in the backend finish, the queued ones never start, and the
/// connection's threads end.
#[test]
fn close_with_requests_in_flight_ends_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let slot = 128u64 << 10;
    let gated: Vec<u64> = (0..haven_nbd::WORKERS as u64).map(|i| i * slot).collect();
    let backend = Recorder::new(gated.clone(), 0);
    let mut s = Serving::start(dir.path(), backend.clone());
    let mut c = Raw::greet(TcpStream::connect(s.tcp).unwrap());
    c.go(EXPORT);
    for i in 0..8u64 {
        c.send(
            0,
            proto::CMD_WRITE,
            i,
            i * slot,
            slot as u32,
            &pattern(i, slot as usize),
        );
    }
    wait_for("every worker to hold a write", || {
        backend.started() == gated.len()
    });

    s.server.close();
    assert!(c.ended(), "the connection stays open after close");
    backend.open_gate();
    wait_for("no live connection", || s.server.connections() == 0);
    // What started finished; nothing is left half-run.
    let calls = backend.calls();
    let ended = calls
        .iter()
        .filter(|c| matches!(c, Call::WriteEnded(_)))
        .count();
    assert_eq!(ended, backend.started(), "{calls:?}");
    s.close_and_join();
}

/// A [`MemBackend`] whose writes at 2 MiB and above panic.
struct Panicky(Arc<MemBackend>);

impl Backend for Panicky {
    fn size(&self) -> u64 {
        SIZE
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.0.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), Error> {
        assert!(offset < 2 << 20, "test backend: a write at {offset} panics");
        self.0.write(offset, data, fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        punch: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), Error> {
        self.0.write_zeroes(offset, len, punch, fast, fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Error> {
        self.0.trim(offset, len, fua)
    }

    fn flush(&self) -> Result<(), Error> {
        self.0.flush()
    }
}

/// A backend's panic, in a quick write (on the connection's reader) or in a large one (on a
/// worker), ends that connection only: its threads end, the server serves the next one.
#[test]
fn a_backend_panic_ends_only_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBackend::new(SIZE, 0, false);
    let mut s = Serving::start(dir.path(), Arc::new(Panicky(mem.clone())));
    for len in [4096usize, 1 << 20] {
        let socket = UnixStream::connect(&s.socket).unwrap();
        // A server that hangs fails the test below instead of hanging it.
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut c = Raw::greet(socket);
        c.go(EXPORT);
        // A read queued for a worker meanwhile, so that one is idle when the panic comes.
        assert_eq!(c.request(0, proto::CMD_READ, 0, 512, &[]), 0);
        c.0.read_exact(&mut [0u8; 512]).unwrap();
        c.send(0, proto::CMD_WRITE, 1, 2 << 20, len as u32, &vec![1; len]);
        assert!(
            c.ended(),
            "the connection stays open after a panic ({len} bytes)"
        );
        wait_for("no live connection", || s.server.connections() == 0);
    }
    let mut c = Raw::greet(UnixStream::connect(&s.socket).unwrap());
    c.go(EXPORT);
    assert_eq!(c.request(0, proto::CMD_WRITE, 0, 512, &[3; 512]), 0);
    assert_eq!(mem.bytes(0, 512), [3; 512]);
    s.close_and_join();
}
