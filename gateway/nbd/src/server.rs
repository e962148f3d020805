//! The NBD server: accept loops, and each connection driven through its handshake (options
//! read and answered, TLS started) into transmission, over blocking sockets.

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
use crate::handshake::{Export, Negotiation, Next, Session, Slots};
use crate::proto;
use crate::tls::{self, Tls};
use crate::transmission;

/// How many connections of an export may be in transmission at once unless
/// [`Server::with_max_connections`] says otherwise: several clients (qemu, nbdcopy's four
/// connections with multi-conn) with room to spare, while a client opening connections in a
/// loop is refused long before threads run out.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;

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
/// Built with [`Server::new`], then optionally [`Server::with_tls`] and
/// [`Server::with_max_connections`], before it serves. [`Server::serve_tcp`] and
/// [`Server::serve_unix`] run accept loops (any number, on their own threads) until
/// [`Server::close`], which also shuts down every connection they accepted.
pub struct Server {
    backend: Arc<dyn Backend>,
    export: String,
    /// TLS, required when set.
    tls: Option<Tls>,
    /// Connections in transmission, bounded.
    slots: Slots,
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

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("export", &self.export)
            .field("size", &self.backend.size())
            .field("read_only", &self.backend.read_only())
            .field("tls", &self.tls.is_some())
            .field("max_connections", &self.slots.max())
            .field("closed", &self.is_closed())
            .field("connections", &self.connections())
            .finish()
    }
}

impl Server {
    /// A server for `backend`, exported as `export` (the empty name reaches it too), without
    /// TLS, at most [`DEFAULT_MAX_CONNECTIONS`] connections in transmission.
    pub fn new(backend: Arc<dyn Backend>, export: impl Into<String>) -> Server {
        Server {
            backend,
            export: export.into(),
            tls: None,
            slots: Slots::new(DEFAULT_MAX_CONNECTIONS),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            listeners: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
        }
    }

    /// Requires TLS (`NBD_OPT_STARTTLS`) of every client: before it, every option but
    /// `STARTTLS` and `ABORT` is answered `NBD_REP_ERR_TLS_REQD` with a message, and
    /// `NBD_OPT_EXPORT_NAME` (which has no error reply) closes the connection; a client that
    /// does not speak fixed newstyle cannot start TLS and is closed at once. Whose certificate
    /// is accepted is up to `tls.config` (see [`Tls`]). Call before serving.
    pub fn with_tls(mut self, tls: Tls) -> Server {
        self.tls = Some(tls);
        self
    }

    /// At most `max` connections of the export in transmission at once (0 refuses every
    /// client). Over the limit, `NBD_OPT_GO` is answered `NBD_REP_ERR_POLICY` with a message
    /// (and the client may try again); `NBD_OPT_EXPORT_NAME`, which has no error reply, closes
    /// the connection. Connections still negotiating are not counted. Call before serving.
    pub fn with_max_connections(mut self, max: usize) -> Server {
        self.slots = Slots::new(max);
        self
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
        writer: W,
        shut_down: &(dyn Fn() + Sync),
        peer: &str,
    ) {
        let span = tracing::info_span!("nbd", conn, peer);
        let _enter = span.enter();
        tracing::info!("client connected");
        match self.converse(reader, writer, shut_down) {
            Ok(()) => tracing::info!("client disconnected"),
            Err(_) if self.is_closed() => tracing::info!("connection shut down: server closed"),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::info!("client closed the connection")
            }
            Err(e) => tracing::warn!(error = %e, "connection ended"),
        }
    }

    fn export_view(&self) -> Export<'_> {
        Export {
            backend: self.backend.as_ref(),
            name: &self.export,
            tls: self.tls.is_some(),
            slots: &self.slots,
        }
    }

    /// The whole conversation: greeting, options, TLS when the client starts it, transmission.
    fn converse<R: Read, W: Write + Send>(
        &self,
        reader: R,
        mut writer: W,
        shut_down: &(dyn Fn() + Sync),
    ) -> io::Result<()> {
        let mut r = BufReader::with_capacity(READ_BUFFER, reader);
        let Some(mut negotiation) = self.greet(&mut r, &mut writer)? else {
            return Ok(());
        };
        match negotiate(&mut negotiation, &mut r, &mut writer)? {
            Next::Option | Next::Close => Ok(()),
            Next::Transmission(session) => self.transmit(&session, &mut r, writer, shut_down),
            Next::StartTls => self.converse_over_tls(negotiation, r, writer, shut_down),
        }
    }

    /// After the ACK to `STARTTLS`: the TLS handshake, then the rest of the conversation over
    /// TLS, negotiation started over.
    fn converse_over_tls<R: Read, W: Write + Send>(
        &self,
        mut negotiation: Negotiation<'_>,
        r: BufReader<R>,
        writer: W,
        shut_down: &(dyn Fn() + Sync),
    ) -> io::Result<()> {
        let Some(config) = &self.tls else {
            return Ok(());
        };
        if !r.buffer().is_empty() {
            tracing::warn!("the client sent data before the TLS handshake; closing");
            return Ok(());
        }
        let (tls_reader, mut w) = tls::accept(config, r.into_inner(), writer)?;
        tracing::info!("TLS established");
        let closer = w.closer();
        let mut r = BufReader::with_capacity(READ_BUFFER, tls_reader);
        negotiation.secured();
        let result = match negotiate(&mut negotiation, &mut r, &mut w)? {
            Next::Transmission(session) => self.transmit(&session, &mut r, w, shut_down),
            Next::Option | Next::Close | Next::StartTls => Ok(()),
        };
        // A clean end (DISC, ABORT) closes the TLS session first; a client that already closed
        // the socket does not need to hear it.
        if result.is_ok()
            && let Err(e) = closer.close()
        {
            tracing::debug!(error = %e, "close_notify not sent");
        }
        result
    }

    fn transmit<R: Read, W: Write + Send>(
        &self,
        session: &Session<'_>,
        r: &mut BufReader<R>,
        writer: W,
        shut_down: &(dyn Fn() + Sync),
    ) -> io::Result<()> {
        transmission::run(
            self.backend.as_ref(),
            &self.export,
            session,
            r,
            writer,
            shut_down,
        )
    }

    /// Greets the client and reads its flags; `None` when it is to be sent away.
    fn greet<R: Read, W: Write>(
        &self,
        r: &mut R,
        w: &mut W,
    ) -> io::Result<Option<Negotiation<'_>>> {
        w.write_all(&proto::greeting())?;
        w.flush()?;
        let mut cf = [0u8; 4];
        r.read_exact(&mut cf)?;
        let client_flags = u32::from_be_bytes(cf);
        let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        if client_flags & !known != 0 {
            tracing::warn!(client_flags, "unknown client flags; closing");
            return Ok(None);
        }
        if self.tls.is_some() && client_flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
            // TLS needs fixed newstyle; such a client has no way to be told.
            tracing::warn!(
                "a client without fixed newstyle cannot start TLS, which is required; closing"
            );
            return Ok(None);
        }
        let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
        Ok(Some(Negotiation::new(self.export_view(), no_zeroes)))
    }
}

/// Reads options and sends their replies until one ends the negotiation.
fn negotiate<'a, R: Read, W: Write>(
    negotiation: &mut Negotiation<'a>,
    r: &mut R,
    w: &mut W,
) -> io::Result<Next<'a>> {
    loop {
        let mut hb = [0u8; proto::OPTION_HEADER_LEN];
        r.read_exact(&mut hb)?;
        let Some(opt) = proto::parse_option_header(&hb) else {
            tracing::warn!("bad option magic; closing");
            return Ok(Next::Close);
        };
        if opt.len > MAX_OPTION_DATA {
            if opt.len > MAX_OPTION_DRAIN || opt.option == proto::OPT_EXPORT_NAME {
                tracing::warn!(
                    option = opt.option,
                    len = opt.len,
                    "option too long; closing"
                );
                return Ok(Next::Close);
            }
            drain(r, u64::from(opt.len))?;
            let msg = format!("option data of {} bytes is too long", opt.len);
            w.write_all(&proto::option_reply(
                opt.option,
                proto::REP_ERR_TOO_BIG,
                msg.as_bytes(),
            ))?;
            w.flush()?;
            continue;
        }
        let mut data = vec![0u8; opt.len as usize];
        r.read_exact(&mut data)?;
        let step = negotiation.option(opt.option, &data);
        if !step.reply.is_empty() {
            w.write_all(&step.reply)?;
            w.flush()?;
        }
        match step.next {
            Next::Option => {}
            next => return Ok(next),
        }
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
