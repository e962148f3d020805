//! The NBD server: accept loops, handshake and transmission over blocking sockets.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use crate::backend::Backend;
use crate::proto;
use crate::transmission;

/// Largest option data read into memory; `INFO`/`GO` with a 4096-byte name fit.
const MAX_OPTION_DATA: u32 = 8 * 1024;
/// Larger option data than this is not even drained: the connection is closed.
const MAX_OPTION_DRAIN: u32 = 1024 * 1024;
const DRAIN_CHUNK: usize = 64 * 1024;
/// What a connection reads from its socket at once: several small requests, or the start of a
/// large write's payload (the rest is read straight into the payload's buffer). Small requests
/// found buffered are run before their replies are sent (see `transmission`).
const READ_BUFFER: usize = 64 * 1024;
/// How long [`Server::close`] waits to reach a TCP listener it wakes.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// An NBD server exporting one [`Backend`] under one name.
///
/// [`Server::serve_tcp`] and [`Server::serve_unix`] run accept loops (any number, on their
/// own threads) until [`Server::close`], which also shuts down every connection they accepted.
pub struct Server {
    backend: Arc<dyn Backend>,
    export: String,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// Addresses of the running accept loops, so that `close` can wake them.
    listeners: Mutex<HashMap<u64, Listening>>,
    /// A clone of each live connection's socket, so that `close` can shut it down.
    connections: Mutex<HashMap<u64, Socket>>,
}

/// Where an accept loop listens.
enum Listening {
    Tcp(SocketAddr),
    /// `None`: an unnamed socket, which `close` cannot reach.
    Unix(Option<PathBuf>),
}

/// A connection's socket.
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn shutdown(&self) {
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

/// Removes a connection from the registry when dropped (its thread ended, or never started).
struct Registered {
    server: Arc<Server>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.server.connections).remove(&self.id);
    }
}

/// Removes an accept loop's address when dropped.
struct ListenerEntry<'a> {
    server: &'a Server,
    id: u64,
}

impl Drop for ListenerEntry<'_> {
    fn drop(&mut self) {
        lock(&self.server.listeners).remove(&self.id);
    }
}

/// How a handshake ended.
enum Handshake {
    /// Go on to transmission.
    Transmission,
    /// The client left (abort, disconnect) or was sent away.
    Closed,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("export", &self.export)
            .field("size", &self.backend.size())
            .field("read_only", &self.backend.read_only())
            .field("closed", &self.is_closed())
            .field("connections", &self.connections())
            .finish()
    }
}

impl Server {
    /// A server for `backend`, exported as `export` (the empty name reaches it too).
    pub fn new(backend: Arc<dyn Backend>, export: impl Into<String>) -> Server {
        Server {
            backend,
            export: export.into(),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            listeners: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
        }
    }

    /// The export's name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// Accepts TCP connections, one thread each (and its workers), until [`Server::close`];
    /// then returns `Ok` and drops the listener. An error means a connection's thread could not
    /// be started.
    pub fn serve_tcp(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        let _entry = self.listening(Listening::Tcp(listener.local_addr()?));
        loop {
            if self.is_closed() {
                return Ok(());
            }
            let (stream, peer) = match listener.accept() {
                Ok(c) => c,
                Err(_) if self.is_closed() => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a TCP connection failed");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let Some(registered) = self.register(stream.try_clone().map(Socket::Tcp)) else {
                continue;
            };
            let server = Arc::clone(self);
            let peer = peer.to_string();
            thread::Builder::new()
                .name(format!("nbd {peer}"))
                .spawn(move || {
                    let reader = match stream.try_clone() {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(error = %e, "cloning a TCP stream failed");
                            return;
                        }
                    };
                    let shut_down = || {
                        let _ = stream.shutdown(Shutdown::Both);
                    };
                    server.serve_connection(registered.id, reader, &stream, &shut_down, &peer);
                    let _ = stream.shutdown(Shutdown::Both);
                    drop(registered);
                })?;
        }
    }

    /// Accepts Unix-socket connections, one thread each (and its workers), until
    /// [`Server::close`]; then returns `Ok` and drops the listener. An error means a
    /// connection's thread could not be started.
    pub fn serve_unix(self: &Arc<Self>, listener: UnixListener) -> io::Result<()> {
        let path = listener.local_addr()?.as_pathname().map(PathBuf::from);
        let _entry = self.listening(Listening::Unix(path));
        loop {
            if self.is_closed() {
                return Ok(());
            }
            let (stream, _) = match listener.accept() {
                Ok(c) => c,
                Err(_) if self.is_closed() => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a Unix-socket connection failed");
                    continue;
                }
            };
            let Some(registered) = self.register(stream.try_clone().map(Socket::Unix)) else {
                continue;
            };
            let server = Arc::clone(self);
            thread::Builder::new()
                .name("nbd unix".into())
                .spawn(move || {
                    let reader = match stream.try_clone() {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(error = %e, "cloning a Unix stream failed");
                            return;
                        }
                    };
                    let shut_down = || {
                        let _ = stream.shutdown(Shutdown::Both);
                    };
                    server.serve_connection(registered.id, reader, &stream, &shut_down, "unix");
                    let _ = stream.shutdown(Shutdown::Both);
                    drop(registered);
                })?;
        }
    }

    /// Stops serving: every accept loop returns `Ok` (a loop blocked in `accept` is woken by a
    /// connection to its own address), every open connection is shut down (its client sees the
    /// connection end; requests running on the backend finish first, queued ones are dropped),
    /// and connections that still arrive are refused. Returns without waiting for connections'
    /// threads to end: [`Server::connections`] reaches 0 when they have (workers included).
    /// Connections served by [`Server::run_connection`] are not reached. Calling it again does
    /// nothing more.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::info!(export = %self.export, "closing the NBD server");
        // Every loop registered after this sees `closed` (it checks after registering).
        let listeners: Vec<Listening> = lock(&self.listeners)
            .values()
            .map(|l| match l {
                Listening::Tcp(a) => Listening::Tcp(*a),
                Listening::Unix(p) => Listening::Unix(p.clone()),
            })
            .collect();
        for l in listeners {
            match l {
                Listening::Tcp(addr) => {
                    let _ = TcpStream::connect_timeout(&reachable(addr), WAKE_TIMEOUT);
                }
                Listening::Unix(Some(path)) => {
                    let _ = UnixStream::connect(&path);
                }
                Listening::Unix(None) => {
                    tracing::warn!(
                        "an accept loop on an unnamed Unix socket cannot be woken; it stops at \
                         its next connection"
                    );
                }
            }
        }
        // Registration checks `closed` under this lock, so no connection is added after.
        for socket in lock(&self.connections).values() {
            socket.shutdown();
        }
    }

    /// Whether [`Server::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// How many connections accepted by the serve loops are live (their threads still running).
    pub fn connections(&self) -> usize {
        lock(&self.connections).len()
    }

    /// Records an accept loop's address until the returned entry drops.
    fn listening(&self, at: Listening) -> ListenerEntry<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.listeners).insert(id, at);
        ListenerEntry { server: self, id }
    }

    /// Records an accepted connection's socket, unless the server is closed.
    fn register(self: &Arc<Self>, socket: io::Result<Socket>) -> Option<Registered> {
        let socket = match socket {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cloning an accepted socket failed");
                return None;
            }
        };
        let mut connections = lock(&self.connections);
        if self.is_closed() {
            socket.shutdown();
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        connections.insert(id, socket);
        Some(Registered {
            server: Arc::clone(self),
            id,
        })
    }

    /// Serves one connection until the client disconnects or breaks the protocol, its
    /// requests run by worker threads that write their replies to `writer` (hence `Send`). For
    /// transports other than the serve loops' sockets; [`Server::close`] does not reach it, and
    /// a reply that cannot be written does not wake a read blocked on `reader` (the serve loops
    /// shut their socket down).
    pub fn run_connection<R: Read, W: Write + Send>(&self, reader: R, writer: W, peer: &str) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.serve_connection(id, reader, writer, &|| {}, peer);
    }

    /// `shut_down` shuts the socket down when the connection breaks.
    fn serve_connection<R: Read, W: Write + Send>(
        &self,
        conn: u64,
        reader: R,
        mut writer: W,
        shut_down: &(dyn Fn() + Sync),
        peer: &str,
    ) {
        let span = tracing::info_span!("nbd", conn, peer);
        let _enter = span.enter();
        tracing::info!("client connected");
        let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
        let result = self
            .handshake(&mut reader, &mut writer)
            .and_then(|h| match h {
                Handshake::Transmission => transmission::run(
                    self.backend.as_ref(),
                    &self.export,
                    &mut reader,
                    writer,
                    shut_down,
                ),
                Handshake::Closed => Ok(()),
            });
        match result {
            Ok(()) => tracing::info!("client disconnected"),
            Err(_) if self.is_closed() => tracing::info!("connection shut down: server closed"),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::info!("client closed the connection")
            }
            Err(e) => tracing::warn!(error = %e, "connection ended"),
        }
    }

    fn handshake<R: Read, W: Write>(&self, r: &mut R, w: &mut W) -> io::Result<Handshake> {
        w.write_all(&proto::greeting())?;
        let mut cf = [0u8; 4];
        r.read_exact(&mut cf)?;
        let client_flags = u32::from_be_bytes(cf);
        let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        if client_flags & !known != 0 {
            tracing::warn!(client_flags, "unknown client flags; closing");
            return Ok(Handshake::Closed);
        }
        let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
        let size = self.backend.size();
        let flags = proto::transmission_flags(self.backend.read_only());
        loop {
            let mut hb = [0u8; proto::OPTION_HEADER_LEN];
            r.read_exact(&mut hb)?;
            let Some(opt) = proto::parse_option_header(&hb) else {
                tracing::warn!("bad option magic; closing");
                return Ok(Handshake::Closed);
            };
            if opt.len > MAX_OPTION_DATA {
                if opt.len > MAX_OPTION_DRAIN || opt.option == proto::OPT_EXPORT_NAME {
                    tracing::warn!(
                        option = opt.option,
                        len = opt.len,
                        "option too long; closing"
                    );
                    return Ok(Handshake::Closed);
                }
                drain(r, u64::from(opt.len))?;
                let msg = format!("option data of {} bytes is too long", opt.len);
                w.write_all(&proto::option_reply(
                    opt.option,
                    proto::REP_ERR_TOO_BIG,
                    msg.as_bytes(),
                ))?;
                continue;
            }
            let mut data = vec![0u8; opt.len as usize];
            r.read_exact(&mut data)?;
            match opt.option {
                proto::OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data);
                    if !self.is_export(&name) {
                        tracing::warn!(export = %name, "unknown export asked with EXPORT_NAME; closing");
                        return Ok(Handshake::Closed);
                    }
                    w.write_all(&proto::export_name_reply(size, flags, no_zeroes))?;
                    tracing::info!(export = %self.export, size, "transmission (EXPORT_NAME)");
                    return Ok(Handshake::Transmission);
                }
                proto::OPT_ABORT => {
                    w.write_all(&proto::option_reply(opt.option, proto::REP_ACK, &[]))?;
                    return Ok(Handshake::Closed);
                }
                proto::OPT_LIST => {
                    if !data.is_empty() {
                        let msg = b"NBD_OPT_LIST takes no data";
                        w.write_all(&proto::option_reply(
                            opt.option,
                            proto::REP_ERR_INVALID,
                            msg,
                        ))?;
                        continue;
                    }
                    let mut out = proto::option_reply(
                        opt.option,
                        proto::REP_SERVER,
                        &proto::rep_server(&self.export),
                    );
                    out.extend(proto::option_reply(opt.option, proto::REP_ACK, &[]));
                    w.write_all(&out)?;
                }
                proto::OPT_INFO | proto::OPT_GO => {
                    let req = match proto::parse_info_request(&data) {
                        Ok(req) => req,
                        Err(why) => {
                            w.write_all(&proto::option_reply(
                                opt.option,
                                proto::REP_ERR_INVALID,
                                why.as_bytes(),
                            ))?;
                            continue;
                        }
                    };
                    if !self.is_export(&req.name) {
                        let msg = format!(
                            "no export named {:?} (this server exports {:?})",
                            req.name, self.export
                        );
                        w.write_all(&proto::option_reply(
                            opt.option,
                            proto::REP_ERR_UNKNOWN,
                            msg.as_bytes(),
                        ))?;
                        continue;
                    }
                    let mut out = proto::option_reply(
                        opt.option,
                        proto::REP_INFO,
                        &proto::info_export(size, flags),
                    );
                    out.extend(proto::option_reply(
                        opt.option,
                        proto::REP_INFO,
                        &proto::info_block_size(),
                    ));
                    if req.requests.contains(&proto::INFO_NAME) {
                        out.extend(proto::option_reply(
                            opt.option,
                            proto::REP_INFO,
                            &proto::info_name(&self.export),
                        ));
                    }
                    out.extend(proto::option_reply(opt.option, proto::REP_ACK, &[]));
                    w.write_all(&out)?;
                    if opt.option == proto::OPT_GO {
                        tracing::info!(export = %self.export, size, "transmission (GO)");
                        return Ok(Handshake::Transmission);
                    }
                }
                other => {
                    w.write_all(&proto::option_reply(other, proto::REP_ERR_UNSUP, &[]))?;
                }
            }
        }
    }

    fn is_export(&self, name: &str) -> bool {
        name.is_empty() || name == self.export
    }
}

/// A server's own listening address as something it can connect to: an unspecified address
/// (`0.0.0.0`, `::`) becomes the loopback address.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// Locks a registry; a panic while it was held cannot leave it inconsistent (single inserts
/// and removes).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads and discards `len` bytes in bounded chunks.
pub(crate) fn drain<R: Read>(r: &mut R, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; DRAIN_CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(DRAIN_CHUNK as u64) as usize;
        r.read_exact(&mut buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Binds a Unix socket at `path`, replacing a stale socket file left by an earlier run.
pub fn bind_unix(path: &std::path::Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
        && UnixStream::connect(path).is_err()
    {
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}
