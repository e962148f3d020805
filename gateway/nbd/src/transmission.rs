//! The transmission phase of one connection: requests read in order, the quick ones run by the
//! reader, the others by a small pool of workers, answered in whatever order they finish.
//!
//! # Who does what
//!
//! The connection's thread is the *reader*: it reads each request header, and a write's payload
//! straight into the buffer the backend will get. A *quick* request — a WRITE of at most
//! [`QUICK_BYTES`], a TRIM or WRITE_ZEROES, all without FUA, a CACHE, a request refused at
//! once — the reader runs itself, as the next ones are being sent: handing it to another
//! thread would cost a wake-up, which on two cores costs more than a small write to the page
//! cache. Its reply is held back while the next
//! request is already buffered (at most [`REPLY_BATCH`] replies); the replies held are sent in
//! one write before the reader reads from the socket again or queues a request.
//!
//! A request that *may block* — a READ (which may wait for the disk), a FLUSH, a
//! BLOCK_STATUS, a change with FUA, a WRITE of more than [`QUICK_BYTES`] — is queued for the
//! worker threads (at most [`WORKERS`], started as needed): each takes one request at a time,
//! in the order received, runs it on the backend and sends its reply at once (a read's headers
//! and data in one write).
//! Meanwhile the reader reads on. Every reply is written under a lock on the socket's write
//! half; NBD lets a server answer in any order, and the client matches replies to requests by
//! their handle.
//!
//! # Replies and requests
//!
//! Requests are compact, or extended (32 bytes, 64-bit lengths) once the client negotiated
//! extended headers; replies are framed as negotiated (see `reply`). A READ with structured
//! or extended replies asks the backend's `allocation` for its range and sends the zero
//! extents as holes without reading them; BLOCK_STATUS answers each selected metadata context
//! (see `meta`).
//!
//! A request the server will not run is answered with an error, never by dropping the
//! connection: an unknown command or flag, a zero-length READ or BLOCK_STATUS, a BLOCK_STATUS
//! with no context selected: `EINVAL`; a READ or WRITE longer than [`proto::MAX_BLOCK`]:
//! `EOVERFLOW` (a compact WRITE's payload, at most 4 GiB, is read and dropped in bounded
//! chunks first); a change to a read-only export: `EPERM`. The connection is broken only where
//! nothing else is possible: a request with a bad magic (the stream cannot be followed), and
//! with extended headers a payload longer than [`proto::MAX_BLOCK`] (64-bit: it cannot be
//! drained; the protocol says the server SHOULD disconnect). An extended WRITE's length is its
//! payload's whether or not it carries `NBD_CMD_FLAG_PAYLOAD_LEN` (qemu leaves the flag out).
//!
//! # Bounds
//!
//! At most [`MAX_IN_FLIGHT`] queued requests are in flight per connection (read, not yet run to
//! the end), holding at most [`MAX_IN_FLIGHT_BYTES`] bytes of payload (write payloads, read
//! buffers, block-status replies). When either is reached the reader stops reading until one
//! finishes, so a client that sends faster than the backend keeps up is held back by the
//! socket. Buffers are reused:
//! up to [`KEPT_BUFFER_BYTES`] of them stay with the connection between requests.
//!
//! # Ordering
//!
//! - FLUSH runs only once every change (WRITE, TRIM, WRITE_ZEROES) received before it on this
//!   connection has returned from the backend: a quick change has before the next request is
//!   read, a queued one is waited for. A FLUSH therefore covers every change whose reply was
//!   sent before it was received, as NBD requires (and the ones merely received before it).
//!   Changes received after a FLUSH may run while it waits.
//! - Nothing else is ordered: NBD does not order requests that are in flight together (a read
//!   sent before the reply to an overlapping write came back may see the data before or after
//!   it), and a backend takes its own locks (the agent's splitter serializes its changes).
//!
//! # Ending
//!
//! - `NBD_CMD_DISC`, or the client closing its side between requests: nothing more is read,
//!   every request already received is run and answered, then the connection ends.
//! - A broken connection (a read or a write failed, the client broke the protocol, or
//!   [`crate::Server::close`] shut the socket down): requests still queued are dropped
//!   unanswered, those running on the backend finish, then the connection ends. The socket is
//!   shut down at once so that a reader or a worker blocked on it returns.

use std::collections::VecDeque;
use std::io::{self, BufReader, Read, Write};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::{self, Scope};

use crate::backend::{Backend, Error};
use crate::handshake::Session;
use crate::meta::{self, Context};
use crate::proto::{self, Request};
use crate::reply::{Fill, Framing, Piece};

/// Most queued requests of one connection in flight at once (read, not yet run to the end):
/// qemu's NBD client sends up to 16.
pub const MAX_IN_FLIGHT: usize = 16;
/// Most payload bytes held by one connection's queued requests (write payloads, read buffers,
/// block-status replies). At least one request of [`proto::MAX_BLOCK`] bytes fits.
pub const MAX_IN_FLIGHT_BYTES: u64 = 64 * 1024 * 1024;
/// Most worker threads of one connection running requests on the backend at once.
pub const WORKERS: usize = 4;
/// Most bytes of buffers a connection keeps for reuse between requests.
pub const KEPT_BUFFER_BYTES: usize = 16 * 1024 * 1024;
/// A WRITE of at most this many bytes (without FUA) is quick: the reader runs it itself.
pub const QUICK_BYTES: u32 = 64 * 1024;
/// Most replies to quick requests the reader holds back to send them in one write.
pub const REPLY_BATCH: usize = 4;
/// Bytes a READ's reply buffer holds beyond its data: the headers of its chunks, at most
/// [`meta::MAX_READ_CHUNKS`] of the largest (extended) framing.
const READ_OVERHEAD: usize = Framing::Extended.read_overhead(meta::MAX_READ_CHUNKS);
/// Bytes a BLOCK_STATUS reply may take per context (extended descriptors are 16 bytes).
const STATUS_BYTES: u64 = meta::MAX_EXTENTS as u64 * 16 + 64;

const _: () = assert!(MAX_IN_FLIGHT_BYTES >= proto::MAX_BLOCK as u64 + READ_OVERHEAD as u64);
const _: () = assert!(MAX_IN_FLIGHT_BYTES >= STATUS_BYTES * meta::MAX_CONTEXTS as u64);

/// What to do with a request before running it.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Run it (a WRITE's payload is read first).
    Run,
    /// Answer it with an error without running it, once `drain` payload bytes are read and
    /// dropped.
    Refuse { errno: u32, why: String, drain: u64 },
    /// Break the connection: a payload too long to drain.
    Break(String),
}

/// Screens a request by its header alone: its payload, its length, its command.
fn admit(req: &Request, framing: Framing) -> Admit {
    let extended = framing == Framing::Extended;
    // A WRITE's length is its payload's, with or without NBD_CMD_FLAG_PAYLOAD_LEN: the
    // extension says an extended WRITE MUST carry the flag, but qemu (10.0) leaves it out, as
    // its own server allows. Any other command has a payload only with the flag.
    let payload = match req.command {
        proto::CMD_WRITE => req.len,
        _ if extended && req.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0 => req.len,
        _ => 0,
    };
    let max = u64::from(proto::MAX_BLOCK);
    if payload > max {
        if extended {
            return Admit::Break(format!(
                "a payload of {payload} bytes is longer than the maximum {max}"
            ));
        }
        return Admit::Refuse {
            errno: proto::EOVERFLOW,
            why: format!("write of {payload} bytes is longer than the maximum {max}"),
            drain: payload,
        };
    }
    let refuse = |errno, why: String| Admit::Refuse {
        errno,
        why,
        drain: payload,
    };
    match req.command {
        proto::CMD_WRITE => Admit::Run,
        command if payload > 0 => {
            refuse(proto::EINVAL, format!("command {command} takes no payload"))
        }
        proto::CMD_READ if req.len > max => refuse(
            proto::EOVERFLOW,
            format!("read of {} bytes is longer than the maximum {max}", req.len),
        ),
        proto::CMD_READ | proto::CMD_BLOCK_STATUS if req.len == 0 => {
            refuse(proto::EINVAL, format!("command {} of 0 bytes", req.command))
        }
        proto::CMD_READ
        | proto::CMD_FLUSH
        | proto::CMD_TRIM
        | proto::CMD_CACHE
        | proto::CMD_WRITE_ZEROES
        | proto::CMD_BLOCK_STATUS => Admit::Run,
        other => refuse(proto::EINVAL, format!("unknown command {other}")),
    }
}

/// The command flags a request may carry. FUA is valid on every command (the protocol says so;
/// clients send it on reads), and ignored where nothing is written.
fn allowed_flags(command: u16, framing: Framing) -> u16 {
    let fua = proto::CMD_FLAG_FUA;
    match command {
        proto::CMD_READ if framing.chunks() => fua | proto::CMD_FLAG_DF,
        proto::CMD_WRITE if framing == Framing::Extended => fua | proto::CMD_FLAG_PAYLOAD_LEN,
        proto::CMD_WRITE_ZEROES => fua | proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO,
        proto::CMD_BLOCK_STATUS => fua | proto::CMD_FLAG_REQ_ONE,
        _ => fua,
    }
}

/// Whether an admitted request may keep the thread that runs it long; those are run by
/// workers.
fn may_block(req: &Request) -> bool {
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    match req.command {
        proto::CMD_READ | proto::CMD_FLUSH | proto::CMD_BLOCK_STATUS => true,
        proto::CMD_WRITE => fua || req.len > u64::from(QUICK_BYTES),
        proto::CMD_TRIM | proto::CMD_WRITE_ZEROES => fua,
        // CACHE does nothing.
        _ => false,
    }
}

/// A request queued for the workers.
struct Job {
    req: Request,
    /// Its place in the order received.
    seq: u64,
    /// Bytes of [`MAX_IN_FLIGHT_BYTES`] it holds.
    bytes: u64,
    /// A change, which a later FLUSH waits for.
    change: bool,
    work: Work,
}

enum Work {
    /// The buffer the reply is built in: headers and `req.len` bytes of data.
    Read(Vec<u8>),
    /// The payload, `req.len` bytes at the start of the buffer.
    Write(Vec<u8>),
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

impl Job {
    fn into_buffer(self) -> Option<Vec<u8>> {
        match self.work {
            Work::Read(b) | Work::Write(b) => Some(b),
            Work::Flush | Work::Trim | Work::WriteZeroes | Work::BlockStatus => None,
        }
    }
}

/// Replies to quick requests held back by the reader, to be sent in one write.
struct Held {
    bytes: Vec<u8>,
    count: usize,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Requests are read.
    Open,
    /// Nothing more is read; every request queued is run and answered.
    Draining,
    /// Queued requests are dropped; nothing more is run.
    Broken,
}

/// How to get a worker for a request queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    /// All are busy: the first one done takes it.
    None,
    /// An idle worker was given a permit: notify it.
    Wake,
    /// A worker is to be started.
    Start,
}

/// The bookkeeping of one connection's queued requests and workers; no I/O, no waiting.
struct InFlight {
    phase: Phase,
    queue: VecDeque<Job>,
    /// Requests queued and not yet run to the end (or dropped).
    requests: usize,
    bytes: u64,
    /// Changes queued and not yet returned from the backend, by seq, oldest first.
    changes: VecDeque<u64>,
    next_seq: u64,
    /// Why the connection broke, when a worker found out (a reply could not be written).
    failure: Option<io::Error>,
    /// Buffers kept for reuse, and their bytes.
    buffers: Vec<Vec<u8>>,
    kept: usize,
    /// Workers started, and those of them waiting for a permit.
    workers: usize,
    idle: usize,
    /// Permits given to idle workers, each taken by the one that wakes up.
    permits: usize,
    /// The reader waits for room.
    reader_waiting: bool,
    /// FLUSHes wait for earlier changes.
    flushes_waiting: usize,
}

impl InFlight {
    fn new() -> InFlight {
        InFlight {
            phase: Phase::Open,
            queue: VecDeque::new(),
            requests: 0,
            bytes: 0,
            changes: VecDeque::new(),
            next_seq: 0,
            failure: None,
            buffers: Vec::new(),
            kept: 0,
            workers: 0,
            idle: 0,
            permits: 0,
            reader_waiting: false,
            flushes_waiting: 0,
        }
    }

    /// Whether one more request holding `bytes` fits the bounds.
    fn has_room(&self, bytes: u64) -> bool {
        self.requests < MAX_IN_FLIGHT && self.bytes + bytes <= MAX_IN_FLIGHT_BYTES
    }

    /// Counts a request in; returns its seq.
    fn admit(&mut self, bytes: u64, change: bool) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.requests += 1;
        self.bytes += bytes;
        if change {
            self.changes.push_back(seq);
        }
        seq
    }

    /// Counts a request out (run or dropped), keeping its buffer for reuse.
    fn finish(&mut self, seq: u64, bytes: u64, change: bool, buffer: Option<Vec<u8>>) {
        self.requests -= 1;
        self.bytes -= bytes;
        if change && let Some(at) = self.changes.iter().position(|&s| s == seq) {
            self.changes.remove(at);
        }
        if let Some(b) = buffer
            && self.kept + b.len() <= KEPT_BUFFER_BYTES
        {
            self.kept += b.len();
            self.buffers.push(b);
        }
    }

    /// Whether a FLUSH received as `seq` may run: no change queued before it is pending.
    fn flush_may_run(&self, seq: u64) -> bool {
        self.changes.front().is_none_or(|&c| c > seq)
    }

    /// A buffer of at least `len` bytes: a kept one when there is one.
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut b = match self.buffers.iter().position(|b| b.len() >= len) {
            Some(at) => self.buffers.swap_remove(at),
            None => self.buffers.pop().unwrap_or_default(),
        };
        self.kept -= b.len();
        if b.len() < len {
            // Zeroed once; a buffer keeps its length, so reusing it costs nothing.
            b.resize(len, 0);
        }
        b
    }

    /// Queues a request; says how to get a worker for it: an idle one gets a permit, else one
    /// is started, up to [`WORKERS`].
    fn push(&mut self, job: Job) -> Call {
        self.queue.push_back(job);
        if self.idle > 0 {
            self.idle -= 1;
            self.permits += 1;
            Call::Wake
        } else if self.workers < WORKERS {
            self.workers += 1;
            Call::Start
        } else {
            Call::None
        }
    }

    /// Drops every queued request (the connection broke).
    fn drop_queued(&mut self) {
        while let Some(job) = self.queue.pop_front() {
            let (seq, bytes, change) = (job.seq, job.bytes, job.change);
            self.finish(seq, bytes, change, job.into_buffer());
        }
    }
}

/// One connection in transmission.
struct Connection<'a, W> {
    backend: &'a dyn Backend,
    export: &'a str,
    framing: Framing,
    /// The selected metadata contexts; a context's id is its index.
    contexts: &'a [Context],
    state: Mutex<InFlight>,
    /// Idle workers wait here for a permit.
    work: Condvar,
    /// The reader waits here for room, FLUSHes for earlier changes.
    progress: Condvar,
    /// The socket's write half.
    writer: Mutex<W>,
    /// Shuts the socket down (the connection broke).
    on_break: &'a (dyn Fn() + Sync),
    span: tracing::Span,
}

/// Serves the transmission phase until the client disconnects, the connection breaks or the
/// client breaks the protocol (see the module docs). `on_break` shuts the socket down, so that
/// the reader blocked on it returns.
pub(crate) fn run<R: Read, W: Write + Send>(
    backend: &dyn Backend,
    export: &str,
    session: &Session<'_>,
    reader: &mut BufReader<R>,
    writer: W,
    on_break: &(dyn Fn() + Sync),
) -> io::Result<()> {
    let conn = Connection {
        backend,
        export,
        framing: session.framing,
        contexts: &session.contexts,
        state: Mutex::new(InFlight::new()),
        work: Condvar::new(),
        progress: Condvar::new(),
        writer: Mutex::new(writer),
        on_break,
        span: tracing::Span::current(),
    };
    // The scope joins every worker before it returns (also when the reader panics: the guard
    // breaks the connection so that idle workers end).
    thread::scope(|scope| {
        let _guard = BreakOnPanic(&conn);
        let read = conn.read_requests(scope, reader);
        let failure = conn.end(read.is_ok());
        read.and(failure)
    })
}

impl<'a, W: Write + Send> Connection<'a, W> {
    fn lock(&self) -> MutexGuard<'_, InFlight> {
        crate::server::lock(&self.state)
    }

    /// The reader: reads requests, runs the quick ones and queues the others, until DISC, the
    /// end of the stream or an error.
    fn read_requests<'s, R: Read>(
        &'s self,
        scope: &'s Scope<'s, '_>,
        r: &mut BufReader<R>,
    ) -> io::Result<()> {
        // Replies to quick requests held back, and the payload buffer of quick writes.
        let mut held = Held {
            bytes: Vec::with_capacity(REPLY_BATCH * proto::EXTENDED_REPLY_LEN),
            count: 0,
        };
        let mut payload = Vec::new();
        let header_len = self.framing.request_len();
        loop {
            // Before the socket is read (which may wait for the client), or when enough are
            // held, the replies held go out.
            if r.buffer().len() < header_len || held.count >= REPLY_BATCH {
                self.send_held(&mut held)?;
            }
            let Some(req) = self.read_request(r)? else {
                // A client that closes between requests just leaves.
                return self.send_held(&mut held);
            };
            if req.command == proto::CMD_DISC {
                return self.send_held(&mut held);
            }
            match admit(&req, self.framing) {
                Admit::Run => {}
                Admit::Refuse { errno, why, drain } => {
                    if drain > 0 {
                        // Never hold an unbounded payload: drain it in bounded chunks.
                        self.send_held(&mut held)?;
                        crate::server::drain(r, drain)?;
                    }
                    self.refuse(req, Error::refused(errno, why), &mut held);
                    continue;
                }
                Admit::Break(why) => {
                    tracing::warn!(command = req.command, len = req.len, "{why}; disconnecting");
                    return Err(io::Error::new(io::ErrorKind::InvalidData, why));
                }
            }
            if may_block(&req) {
                // Queueing may wait for room, and a large payload is read from the socket.
                self.send_held(&mut held)?;
                self.queue(scope, r, req)?;
            } else {
                self.run_quick(r, req, &mut payload, &mut held)?;
            }
        }
    }

    /// Reads the next request header; `None` when the client closed the connection before one.
    fn read_request<R: Read>(&self, r: &mut BufReader<R>) -> io::Result<Option<Request>> {
        let mut hb = [0u8; proto::EXTENDED_REQUEST_LEN];
        let hb = &mut hb[..self.framing.request_len()];
        match r.read_exact(hb) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let hb: &[u8] = hb;
        let req = match self.framing {
            Framing::Extended => hb.try_into().ok().and_then(proto::parse_extended_request),
            Framing::Simple | Framing::Structured => {
                hb.try_into().ok().and_then(proto::parse_request)
            }
        };
        match req {
            Some(req) => Ok(Some(req)),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad request magic",
            )),
        }
    }

    /// Runs a quick request on the reader's thread, holding its reply.
    fn run_quick<R: Read>(
        &self,
        r: &mut BufReader<R>,
        req: Request,
        payload: &mut Vec<u8>,
        held: &mut Held,
    ) -> io::Result<()> {
        let len = req.len;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let result = match req.command {
            proto::CMD_WRITE => {
                let n = req.len as usize;
                if payload.len() < n {
                    payload.resize(n, 0);
                }
                if r.buffer().len() < n {
                    self.send_held(held)?;
                }
                r.read_exact(&mut payload[..n])?;
                self.check_change(&req)
                    .and_then(|()| self.backend.write(req.offset, &payload[..n], fua))
            }
            proto::CMD_TRIM => self
                .check_change(&req)
                .and_then(|()| self.backend.trim(req.offset, len, fua)),
            proto::CMD_WRITE_ZEROES => self.write_zeroes(&req),
            // CACHE, a hint: checked, and answered at once.
            _ => self
                .check_flags(&req)
                .and_then(|()| self.backend.check_range(req.offset, len)),
        };
        self.framing
            .done(&mut held.bytes, &req, logged(&req, result).as_ref().err());
        held.count += 1;
        Ok(())
    }

    fn write_zeroes(&self, req: &Request) -> Result<(), Error> {
        self.check_change(req).and_then(|()| {
            let may_punch = req.flags & proto::CMD_FLAG_NO_HOLE == 0;
            let fast = req.flags & proto::CMD_FLAG_FAST_ZERO != 0;
            let fua = req.flags & proto::CMD_FLAG_FUA != 0;
            self.backend
                .write_zeroes(req.offset, req.len, may_punch, fast, fua)
        })
    }

    /// Refuses a request the server does not run at all.
    fn refuse(&self, req: Request, e: Error, held: &mut Held) {
        tracing::warn!(
            command = req.command,
            offset = req.offset,
            len = req.len,
            errno = e.errno(),
            "{e}"
        );
        self.framing.error(&mut held.bytes, &req, &e, None);
        held.count += 1;
    }

    /// Queues a request that may block for the workers, once there is room for it; a write's
    /// payload is read into the buffer the backend will get.
    fn queue<'s, R: Read>(
        &'s self,
        scope: &'s Scope<'s, '_>,
        r: &mut BufReader<R>,
        req: Request,
    ) -> io::Result<()> {
        let len = req.len;
        let (bytes, change) = match req.command {
            proto::CMD_READ => (READ_OVERHEAD as u64 + len, false),
            proto::CMD_WRITE => (len, true),
            proto::CMD_FLUSH => (0, false),
            proto::CMD_BLOCK_STATUS => (STATUS_BYTES * self.contexts.len() as u64, false),
            _ => (0, true),
        };
        let mut st = self.lock();
        loop {
            if st.phase == Phase::Broken {
                return Err(st.failure.take().unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::BrokenPipe, "the connection broke")
                }));
            }
            if st.has_room(bytes) {
                break;
            }
            st.reader_waiting = true;
            st = wait(&self.progress, st);
            st.reader_waiting = false;
        }
        let seq = st.admit(bytes, change);
        let work = match req.command {
            proto::CMD_READ => Work::Read(st.buffer(READ_OVERHEAD + req.len as usize)),
            proto::CMD_WRITE => Work::Write(st.buffer(req.len as usize)),
            proto::CMD_FLUSH => Work::Flush,
            proto::CMD_TRIM => Work::Trim,
            proto::CMD_BLOCK_STATUS => Work::BlockStatus,
            _ => Work::WriteZeroes,
        };
        drop(st);
        let mut job = Job {
            req,
            seq,
            bytes,
            change,
            work,
        };
        if let Work::Write(buf) = &mut job.work
            && let Err(e) = r.read_exact(&mut buf[..req.len as usize])
        {
            self.finish(job);
            return Err(e);
        }
        let call = self.lock().push(job);
        match call {
            Call::None => Ok(()),
            Call::Wake => {
                self.work.notify_one();
                Ok(())
            }
            Call::Start => {
                let started = thread::Builder::new()
                    .name("nbd worker".into())
                    .spawn_scoped(scope, || self.work());
                if let Err(e) = started {
                    let mut st = self.lock();
                    st.workers -= 1;
                    if st.workers == 0 {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("starting a worker thread failed: {e}"),
                        ));
                    }
                    let workers = st.workers;
                    tracing::warn!(error = %e, workers, "starting a worker thread failed");
                }
                Ok(())
            }
        }
    }

    /// Ends reading: `clean` (DISC, end of stream) drains the queue, otherwise the connection
    /// is broken. Returns why the connection broke when a worker found out first.
    fn end(&self, clean: bool) -> io::Result<()> {
        if !clean {
            self.break_off(None);
        }
        let mut st = self.lock();
        if st.phase == Phase::Open {
            st.phase = Phase::Draining;
            self.work.notify_all();
        }
        match st.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Breaks the connection: queued jobs are dropped, waiting threads woken, the socket shut
    /// down. The first `failure` is kept for the reader to return.
    fn break_off(&self, failure: Option<io::Error>) {
        {
            let mut st = self.lock();
            if st.phase == Phase::Broken {
                return;
            }
            st.phase = Phase::Broken;
            st.failure = failure;
            st.drop_queued();
            self.work.notify_all();
            self.progress.notify_all();
        }
        (self.on_break)();
    }

    /// A worker: runs queued requests until there are none left to run.
    fn work(&self) {
        let _span = self.span.enter();
        let _guard = BreakOnPanic(self);
        while let Some(job) = self.next_job() {
            if let Err(e) = self.serve(job) {
                self.break_off(Some(e));
            }
        }
    }

    /// The next queued request, or `None` when the worker is to end.
    fn next_job(&self) -> Option<Job> {
        let mut st = self.lock();
        loop {
            if st.phase == Phase::Broken {
                return None;
            }
            if let Some(job) = st.queue.pop_front() {
                return Some(job);
            }
            if st.phase == Phase::Draining {
                return None;
            }
            st.idle += 1;
            loop {
                st = wait(&self.work, st);
                if st.permits > 0 {
                    st.permits -= 1;
                    break;
                }
                if st.phase != Phase::Open {
                    st.idle -= 1;
                    break;
                }
            }
        }
    }

    /// Runs a queued request and sends its reply.
    fn serve(&self, mut job: Job) -> io::Result<()> {
        let req = job.req;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let sent = match &mut job.work {
            Work::Read(buf) => self.read(&req, buf),
            Work::Write(buf) => {
                let result = self.check_change(&req).and_then(|()| {
                    self.backend
                        .write(req.offset, &buf[..req.len as usize], fua)
                });
                self.reply(&req, result)
            }
            Work::Flush => {
                if self.wait_for_changes_before(job.seq) {
                    let result = self.check_flags(&req).and_then(|()| self.backend.flush());
                    self.reply(&req, result)
                } else {
                    Ok(())
                }
            }
            Work::Trim => {
                let result = self
                    .check_change(&req)
                    .and_then(|()| self.backend.trim(req.offset, req.len, fua));
                self.reply(&req, result)
            }
            Work::WriteZeroes => {
                let result = self.write_zeroes(&req);
                self.reply(&req, result)
            }
            Work::BlockStatus => self.block_status(&req),
        };
        self.finish(job);
        sent
    }

    /// Counts a request out and wakes whoever waits for that.
    fn finish(&self, job: Job) {
        let (seq, bytes, change) = (job.seq, job.bytes, job.change);
        let buffer = job.into_buffer();
        let mut st = self.lock();
        st.finish(seq, bytes, change, buffer);
        if st.reader_waiting || (change && st.flushes_waiting > 0) {
            self.progress.notify_all();
        }
    }

    /// Waits until every change queued before the FLUSH `seq` returned from the backend;
    /// false when the connection broke meanwhile (the FLUSH is dropped).
    fn wait_for_changes_before(&self, seq: u64) -> bool {
        let mut st = self.lock();
        while !st.flush_may_run(seq) {
            if st.phase == Phase::Broken {
                return false;
            }
            st.flushes_waiting += 1;
            st = wait(&self.progress, st);
            st.flushes_waiting -= 1;
        }
        true
    }

    fn check_flags(&self, req: &Request) -> Result<(), Error> {
        let allowed = allowed_flags(req.command, self.framing);
        if req.flags & !allowed != 0 {
            return Err(Error::invalid(format!(
                "command {} with unsupported flags {:#x}",
                req.command,
                req.flags & !allowed
            )));
        }
        Ok(())
    }

    /// Checks a change (WRITE, TRIM, WRITE_ZEROES) before the backend sees it: its flags, that
    /// the export is writable, its range.
    fn check_change(&self, req: &Request) -> Result<(), Error> {
        self.check_flags(req)?;
        if self.backend.read_only() {
            return Err(Error::refused(
                proto::EPERM,
                format!(
                    "command {} on read-only export {:?}",
                    req.command, self.export
                ),
            ));
        }
        self.backend.check_range(req.offset, req.len)
    }

    /// Answers a READ: the pieces of its range (with chunks, the zero extents as holes, not
    /// read) laid out in `buf` with their headers, the data read into place, all sent in one
    /// write. Nothing is sent before every read returned, so a failure is one error reply.
    fn read(&self, req: &Request, buf: &mut Vec<u8>) -> io::Result<()> {
        let checked = self
            .check_flags(req)
            .and_then(|()| self.backend.check_range(req.offset, req.len));
        if let Err(e) = checked {
            return self.reply(req, Err(e));
        }
        let whole = [Piece::Data {
            offset: req.offset,
            len: req.len,
        }];
        let plan;
        let pieces: &[Piece] = if self.framing.chunks() {
            plan = meta::plan_read(self.backend, req.offset, req.len);
            &plan
        } else {
            &whole
        };
        let df = req.flags & proto::CMD_FLAG_DF != 0;
        let (total, fills) = self.framing.layout_read(req, pieces, df, buf);
        for fill in fills {
            match fill {
                Fill::Zero { at, len } => buf[at..at + len].fill(0),
                Fill::Read { at, offset, len } => {
                    if let Err(e) = self.backend.read(offset, &mut buf[at..at + len]) {
                        let e = log_failure(req, e);
                        let mut out = Vec::new();
                        self.framing.error(&mut out, req, &e, Some(offset));
                        return self.send(&out);
                    }
                }
            }
        }
        self.send(&buf[..total])
    }

    /// Answers a BLOCK_STATUS: one status chunk per selected context.
    fn block_status(&self, req: &Request) -> io::Result<()> {
        let mut out = Vec::new();
        let req_one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
        let result = self
            .check_flags(req)
            .and_then(|()| {
                if self.contexts.is_empty() {
                    return Err(Error::invalid(
                        "BLOCK_STATUS without a metadata context selected \
                         (NBD_OPT_SET_META_CONTEXT)",
                    ));
                }
                self.backend.check_range(req.offset, req.len)
            })
            .and_then(|()| {
                for (id, context) in self.contexts.iter().enumerate() {
                    let extents =
                        meta::status(self.backend, context, req.offset, req.len, req_one)?;
                    let last = id + 1 == self.contexts.len();
                    self.framing
                        .block_status(&mut out, req, id as u32, &extents, last);
                }
                Ok(())
            });
        match logged(req, result) {
            Ok(()) => self.send(&out),
            Err(e) => {
                out.clear();
                self.framing.error(&mut out, req, &e, None);
                self.send(&out)
            }
        }
    }

    /// Sends the reply of a request answered without data.
    fn reply(&self, req: &Request, result: Result<(), Error>) -> io::Result<()> {
        let mut out = Vec::with_capacity(self.framing.header_len());
        self.framing
            .done(&mut out, req, logged(req, result).as_ref().err());
        self.send(&out)
    }

    /// Sends the replies held back, in one write.
    fn send_held(&self, held: &mut Held) -> io::Result<()> {
        if held.count == 0 {
            return Ok(());
        }
        let sent = self.send(&held.bytes);
        held.bytes.clear();
        held.count = 0;
        sent
    }

    /// Writes whole replies.
    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let mut w = crate::server::lock(&self.writer);
        w.write_all(bytes).and_then(|()| w.flush())
    }
}

/// Breaks the connection when its thread panics (a backend's panic), so that the reader and
/// the workers stop instead of waiting for a request that will never finish or for more work.
struct BreakOnPanic<'c, 'a, W: Write + Send>(&'c Connection<'a, W>);

impl<W: Write + Send> Drop for BreakOnPanic<'_, '_, W> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0
                .break_off(Some(io::Error::other("a worker panicked")));
        }
    }
}

fn wait<'m>(cv: &Condvar, guard: MutexGuard<'m, InFlight>) -> MutexGuard<'m, InFlight> {
    cv.wait(guard).unwrap_or_else(|e| e.into_inner())
}

/// Logs a failure: a client's fault at debug, the backend's at error.
fn log_failure(req: &Request, e: Error) -> Error {
    if e.is_client_fault() {
        tracing::debug!(command = req.command, errno = e.errno(), error = %e, "request refused")
    } else {
        tracing::error!(command = req.command, errno = e.errno(), error = %e, "request failed")
    }
    e
}

/// A request's result, its failure logged.
fn logged(req: &Request, result: Result<(), Error>) -> Result<(), Error> {
    result.map_err(|e| log_failure(req, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(command: u16, flags: u16, len: u64) -> Request {
        Request {
            flags,
            command,
            handle: 0,
            offset: 0,
            len,
        }
    }

    #[test]
    fn a_flush_waits_for_every_change_queued_before_it_only() {
        let mut st = InFlight::new();
        let w0 = st.admit(4096, true);
        let r1 = st.admit(4096, false);
        let w2 = st.admit(4096, true);
        let flush = st.admit(0, false);
        let w4 = st.admit(4096, true);
        assert!(!st.flush_may_run(flush));
        st.finish(w2, 4096, true, None);
        st.finish(r1, 4096, false, None);
        assert!(!st.flush_may_run(flush), "w0 is still running");
        st.finish(w0, 4096, true, None);
        assert!(st.flush_may_run(flush), "w4 came after the flush");
        st.finish(w4, 4096, true, None);
        st.finish(flush, 0, false, None);
        assert_eq!((st.requests, st.bytes), (0, 0));
    }

    #[test]
    fn room_is_bounded_by_requests_and_bytes() {
        let mut st = InFlight::new();
        for _ in 0..MAX_IN_FLIGHT {
            assert!(st.has_room(0));
            st.admit(0, false);
        }
        assert!(!st.has_room(0));

        let mut st = InFlight::new();
        let big = u64::from(proto::MAX_BLOCK);
        assert!(
            st.has_room(big + READ_OVERHEAD as u64),
            "one largest request fits"
        );
        let a = st.admit(big, true);
        st.admit(MAX_IN_FLIGHT_BYTES - big, true);
        assert!(!st.has_room(1));
        st.finish(a, big, true, None);
        assert!(st.has_room(big));
    }

    #[test]
    fn buffers_are_reused_up_to_the_kept_bound() {
        let mut st = InFlight::new();
        let b = st.buffer(1 << 20);
        assert_eq!(b.len(), 1 << 20);
        let seq = st.admit(1 << 20, true);
        st.finish(seq, 1 << 20, true, Some(b));
        assert_eq!(st.kept, 1 << 20);
        // A smaller request reuses it whole; its length stays, so nothing is zeroed again.
        let b = st.buffer(4096);
        assert_eq!((b.len(), st.kept), (1 << 20, 0));
        for _ in 0..=KEPT_BUFFER_BYTES >> 20 {
            let seq = st.admit(0, false);
            st.finish(seq, 0, false, Some(vec![0; 1 << 20]));
        }
        assert_eq!(st.kept, KEPT_BUFFER_BYTES);
        assert_eq!(st.buffers.len(), KEPT_BUFFER_BYTES >> 20);
    }

    #[test]
    fn requests_the_server_cannot_run_are_refused_or_break_the_connection() {
        let max = u64::from(proto::MAX_BLOCK);
        let refused = |r: Request, f: Framing| match admit(&r, f) {
            Admit::Refuse { errno, drain, .. } => Some((errno, drain)),
            Admit::Run | Admit::Break(_) => None,
        };
        for f in [Framing::Simple, Framing::Structured, Framing::Extended] {
            assert_eq!(admit(&req(proto::CMD_READ, 0, max), f), Admit::Run);
            assert_eq!(
                refused(req(proto::CMD_READ, 0, max + 1), f),
                Some((proto::EOVERFLOW, 0))
            );
            assert_eq!(
                refused(req(proto::CMD_READ, 0, 0), f),
                Some((proto::EINVAL, 0))
            );
            assert_eq!(
                refused(req(proto::CMD_BLOCK_STATUS, 0, 0), f),
                Some((proto::EINVAL, 0))
            );
            assert_eq!(refused(req(99, 0, 4096), f), Some((proto::EINVAL, 0)));
            // Effect lengths past the maximum payload are fine where there is no payload.
            assert_eq!(admit(&req(proto::CMD_TRIM, 0, 1 << 40), f), Admit::Run);
            assert_eq!(
                admit(&req(proto::CMD_BLOCK_STATUS, 0, u64::from(u32::MAX)), f),
                Admit::Run
            );
        }
        // A compact WRITE's payload is drained; an extended one past the maximum cannot be.
        let big = req(proto::CMD_WRITE, 0, max + 1);
        assert_eq!(
            refused(big, Framing::Simple),
            Some((proto::EOVERFLOW, max + 1))
        );
        let payload = proto::CMD_FLAG_PAYLOAD_LEN;
        let big = req(proto::CMD_WRITE, payload, 1 << 40);
        assert!(matches!(admit(&big, Framing::Extended), Admit::Break(_)));
        assert_eq!(
            admit(&req(proto::CMD_WRITE, payload, 512), Framing::Extended),
            Admit::Run
        );
        assert_eq!(
            admit(&req(proto::CMD_WRITE, 0, 512), Framing::Extended),
            Admit::Run
        );
        let big = req(proto::CMD_WRITE, 0, max + 1);
        assert!(matches!(admit(&big, Framing::Extended), Admit::Break(_)));
        // Another command with a payload: drained, then refused.
        let flush = req(proto::CMD_FLUSH, payload, 512);
        assert_eq!(
            refused(flush, Framing::Extended),
            Some((proto::EINVAL, 512))
        );
        // Flags: DF only with chunks, PAYLOAD_LEN only on an extended WRITE.
        assert_eq!(
            allowed_flags(proto::CMD_READ, Framing::Simple) & proto::CMD_FLAG_DF,
            0
        );
        assert_ne!(
            allowed_flags(proto::CMD_READ, Framing::Structured) & proto::CMD_FLAG_DF,
            0
        );
        assert_eq!(
            allowed_flags(proto::CMD_WRITE, Framing::Structured) & payload,
            0
        );
        assert_ne!(
            allowed_flags(proto::CMD_FLUSH, Framing::Simple) & proto::CMD_FLAG_FUA,
            0
        );
    }

    #[test]
    fn quick_requests_stay_on_the_reader_and_the_rest_get_workers() {
        let quick = u64::from(QUICK_BYTES);
        assert!(!may_block(&req(proto::CMD_WRITE, 0, quick)));
        assert!(may_block(&req(proto::CMD_WRITE, 0, quick + 512)));
        assert!(may_block(&req(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 512)));
        assert!(!may_block(&req(proto::CMD_TRIM, 0, 1 << 30)));
        assert!(may_block(&req(
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_FUA,
            512
        )));
        assert!(may_block(&req(proto::CMD_READ, 0, 512)));
        assert!(may_block(&req(proto::CMD_FLUSH, 0, 0)));
        assert!(may_block(&req(proto::CMD_BLOCK_STATUS, 0, 512)));
        assert!(!may_block(&req(proto::CMD_CACHE, 0, 1 << 20)));

        // Each queued request gets a worker while there are fewer than WORKERS, or an idle one.
        let mut st = InFlight::new();
        let job = |st: &mut InFlight| Job {
            req: req(proto::CMD_FLUSH, 0, 0),
            seq: st.admit(0, false),
            bytes: 0,
            change: false,
            work: Work::Flush,
        };
        for _ in 0..WORKERS {
            let j = job(&mut st);
            assert_eq!(st.push(j), Call::Start);
        }
        let j = job(&mut st);
        assert_eq!(st.push(j), Call::None);
        st.idle = 1;
        let j = job(&mut st);
        assert_eq!(st.push(j), Call::Wake);
        assert_eq!((st.idle, st.permits), (0, 1));
    }
}
