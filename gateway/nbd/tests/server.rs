//! The NBD server over an in-memory backend, against the real qemu-io and a raw client: bytes
//! land in the backend, a read-only export refuses changes, `close` stops everything.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
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

    fn write_zeroes(&self, offset: u64, len: u64, _punch: bool, _fua: bool) -> Result<(), Error> {
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
    fn start(dir: &Path, backend: Arc<MemBackend>) -> Serving {
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
        let mut b = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.0.write_all(&b).unwrap();
        let mut r = [0u8; 16];
        self.0.read_exact(&mut r).unwrap();
        assert_eq!(r[0..4], proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), 7);
        u32::from_be_bytes(r[4..8].try_into().unwrap())
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
    let mut s = Serving::start(dir.path(), Arc::clone(&backend));

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
    let mut s = Serving::start(dir.path(), Arc::clone(&backend));

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
    assert_eq!(flags, proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY);
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
    let mut s = Serving::start(dir.path(), Arc::clone(&backend));

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
