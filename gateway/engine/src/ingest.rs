//! The receiving loop both roles share.
//!
//! One replication stream (a QUIC bidirectional stream) carries one source agent's disks. The
//! loop reads the `Hello` first — so the [`Receiver`] can be built with the durable sequence
//! numbers of exactly that peer's disks — then, for every batch of frames:
//!
//! 1. the records go, in order, into their disk's [`Journal`] (written);
//! 2. each journal touched is synced once (group commit) and the role is told what became
//!    durable ([`Sink::on_durable`]: the master target indexes it in redb);
//! 3. only then `Receiver::mark_durable`, so every `Ack` sent means durable here.
//!
//! The blocking steps run in `tokio::task::block_in_place`: the engine needs tokio's
//! multi-threaded runtime (the gateway's).
//!
//! A journal that is full (`StoreError::Full`), or a role that refuses more for now
//! ([`Sink::admit`]: the process server's limit across all disks), stops the loop from reading
//! the stream until the role frees space: QUIC flow control then slows the sender, whose own log absorbs the
//! rest. Records already received wait in order; none is dropped.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use haven_net::quinn;
use haven_net::stream::{FrameReader, write_frames};
use haven_store::StoreError;
use haven_store::journal::{AppendInfo, Journal};
use haven_store::state::StreamKey;
use haven_wire::frame::error_code;
use haven_wire::{
    DiskId, DiskInfo, ErrorFrame, Frame, HashRequest, Hashes, Hello, PeerId, Receiver,
    ReceiverConfig, ReceiverEvent, Record, Seq,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::Rate;

/// One disk's stream at this gateway: its journal and the progress around it.
#[derive(Debug)]
pub struct DiskStream {
    pub key: StreamKey,
    pub info: DiskInfo,
    pub machine_name: Mutex<String>,
    journal: Mutex<Journal>,
    /// Every record up to this seq is durable in the journal.
    durable: AtomicU64,
    /// Journal space was freed (wakes a blocked ingest loop).
    pub freed: Notify,
    /// The receiving loop that owns this disk now (0: none). A newer loop for the disk (the
    /// peer reconnected, perhaps after a restart) supersedes the older one, which ends; only
    /// the owner's end clears it.
    owner: watch::Sender<u64>,
    /// Why the stream was halted for good ([`DiskStream::halt`]): the running loop ends with it.
    halted: Mutex<Option<Refused>>,
    /// Held by the receiving loop that runs the stream, from before its resume point is taken
    /// until it ends: a loop that supersedes another waits for it to finish its batch, so two
    /// loops never append at once and the new resume point counts everything appended.
    running: Arc<tokio::sync::Mutex<()>>,
    pub received: Mutex<Rate>,
    pub stored_bytes_total: AtomicU64,
    /// Why this stream stopped; shown in status.
    pub error: Mutex<Option<String>>,
    /// Its journal refused a record as full, and has taken none since.
    journal_full: std::sync::atomic::AtomicBool,
    /// The latest records appended, as stored (compressed where they were), at most
    /// [`FRESH_BYTES`]: the consumer (forwarder, applier) takes them from here instead of
    /// reading and decrypting them back; older ones it reads from the journal.
    fresh: Mutex<(VecDeque<Record>, u64)>,
}

/// Most bytes of received records waiting for journal space before the stream stops being read.
const PENDING_MAX: u64 = 256 << 20;

fn pending_bytes(pending: &VecDeque<Record>) -> u64 {
    pending.iter().map(Record::wire_len).sum()
}

/// Bytes of fresh records a stream keeps in memory for its consumer.
pub const FRESH_BYTES: u64 = 16 << 20;
/// Bytes of fresh records all the streams of this process keep together: with a thousand
/// disks, memory stays bounded by this, not by the disks' number.
pub const FRESH_TOTAL_BYTES: u64 = 512 << 20;
/// Bytes of fresh records kept now, all streams together.
static FRESH_TOTAL: AtomicU64 = AtomicU64::new(0);

impl Drop for DiskStream {
    fn drop(&mut self) {
        let kept = lock(&self.fresh).1;
        FRESH_TOTAL.fetch_sub(kept, Ordering::Relaxed);
    }
}

impl DiskStream {
    /// A stream over an opened journal; its durable seq is what the journal holds.
    pub fn new(key: StreamKey, info: DiskInfo, machine_name: String, journal: Journal) -> Self {
        let durable = journal.stats().last_seq;
        DiskStream {
            key,
            info,
            machine_name: Mutex::new(machine_name),
            journal: Mutex::new(journal),
            durable: AtomicU64::new(durable),
            freed: Notify::new(),
            owner: watch::Sender::new(0),
            halted: Mutex::new(None),
            running: Arc::new(tokio::sync::Mutex::new(())),
            received: Mutex::new(Rate::default()),
            stored_bytes_total: AtomicU64::new(0),
            error: Mutex::new(None),
            journal_full: std::sync::atomic::AtomicBool::new(false),
            fresh: Mutex::new((VecDeque::new(), 0)),
        }
    }

    fn keep_fresh(&self, record: Record) {
        let len = record.wire_len();
        let mut fresh = lock(&self.fresh);
        // This stream's oldest make room, for its own limit and for the process's.
        while fresh.1 + len > FRESH_BYTES
            || (fresh.1 > 0 && FRESH_TOTAL.load(Ordering::Relaxed) + len > FRESH_TOTAL_BYTES)
        {
            let Some(old) = fresh.0.pop_front() else {
                break;
            };
            fresh.1 -= old.wire_len();
            FRESH_TOTAL.fetch_sub(old.wire_len(), Ordering::Relaxed);
        }
        if FRESH_TOTAL.fetch_add(len, Ordering::Relaxed) + len > FRESH_TOTAL_BYTES {
            // Not kept: the consumer reads it back from the journal.
            FRESH_TOTAL.fetch_sub(len, Ordering::Relaxed);
            return;
        }
        fresh.1 += len;
        fresh.0.push_back(record);
    }

    /// Record `seq` if it is among the fresh ones (those before it are dropped: the consumer
    /// is past them).
    pub fn take_fresh(&self, seq: Seq) -> Option<Record> {
        let mut fresh = lock(&self.fresh);
        while let Some(front) = fresh.0.front() {
            if front.seq() > seq {
                return None;
            }
            let r = fresh.0.pop_front()?;
            fresh.1 -= r.wire_len();
            FRESH_TOTAL.fetch_sub(r.wire_len(), Ordering::Relaxed);
            if r.seq() == seq {
                return Some(r);
            }
        }
        None
    }

    /// The journal, locked. Held only for one operation at a time.
    pub fn journal(&self) -> MutexGuard<'_, Journal> {
        lock(&self.journal)
    }

    /// Every record up to this seq is durable here.
    pub fn durable(&self) -> Seq {
        self.durable.load(Ordering::Acquire)
    }

    /// Everything up to `seq` is known durable downstream of here (e.g. acknowledged by the
    /// master target before this cache was lost): the stream resumes after it.
    pub fn raise_durable(&self, seq: Seq) {
        self.durable.fetch_max(seq, Ordering::AcqRel);
    }

    /// Whether a receiving loop is connected for this disk.
    pub fn connected(&self) -> bool {
        !matches!(*self.owner.borrow(), 0 | HALTED)
    }

    /// Makes loop `id` the disk's owner; the previous owner, if any, ends.
    fn claim(&self, id: u64) {
        self.owner.send_replace(id);
    }

    /// Loop `id` ended: the disk has no owner, unless a newer loop claimed it meanwhile.
    fn release(&self, id: u64) {
        self.owner.send_if_modified(|owner| {
            let mine = *owner == id;
            if mine {
                *owner = 0;
            }
            mine
        });
    }

    /// Ends the receiving loop, if one runs, with `why` (sent to the peer in an `Error` frame).
    pub fn halt(&self, why: Refused) {
        *lock(&self.halted) = Some(why);
        self.owner.send_replace(HALTED);
    }

    /// Resolves once a loop other than `id` owns the disk.
    async fn superseded(&self, id: u64) {
        let mut rx = self.owner.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = rx.wait_for(|owner| *owner != id).await;
    }

    /// Records why the stream stopped.
    pub fn set_error(&self, message: Option<String>) {
        *lock(&self.error) = message;
    }

    pub fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }
}

/// The owner of a halted stream: no loop.
const HALTED: u64 = u64::MAX;

/// A stream refused for a reason its sender must act on (not a failure to retry): carried in
/// the `Error` frame with its code.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    /// An [`error_code`].
    pub code: u16,
    pub message: String,
}

impl Refused {
    /// The agent is forwarded by another process server now.
    pub fn moved(message: impl Into<String>) -> anyhow::Error {
        Refused {
            code: error_code::MOVED,
            message: message.into(),
        }
        .into()
    }

    /// The disk was failed over: replication of it is stopped.
    pub fn failed_over(message: impl Into<String>) -> anyhow::Error {
        Refused {
            code: error_code::FAILED_OVER,
            message: message.into(),
        }
        .into()
    }
}

/// The `Error` frame's code for `e`: its own for a [`Refused`], else `fallback`.
fn code_of(e: &anyhow::Error, fallback: u16) -> u16 {
    e.downcast_ref::<Refused>().map_or(fallback, |r| r.code)
}

/// Locks a mutex, ignoring poisoning: every critical section leaves its data consistent.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Who is at the other end of a replication stream, from its certificate: an agent (at a
/// process server) or a process server (at a master target).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Via {
    /// The certificate's id.
    pub id: String,
    /// The name it enrolled with (an agent's machine name, a process server's name).
    pub name: String,
}

/// What a role does with a receiving loop's events.
pub trait Sink: Send + Sync + 'static {
    /// Before `hello`'s streams are opened: a process server that may not own the agent's
    /// streams any more confirms it with its master target here (or takes them over).
    fn prepare(
        &self,
        _hello: &Hello,
        _via: &Via,
    ) -> impl std::future::Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// The streams of `hello`'s disks for its peer, opened or created.
    fn open_disks(&self, hello: &Hello, via: &Via) -> Result<Vec<Arc<DiskStream>>>;

    /// Records up to `durable` of `stream` are durable in its journal; `appended` are the
    /// records appended in this batch (with what the journal stored). Wakes whatever consumes
    /// the journal.
    fn on_durable(
        &self,
        stream: &DiskStream,
        durable: Seq,
        appended: &[(Record, AppendInfo)],
    ) -> Result<()>;

    /// Whether `stream` may take a record of `bytes` more now: a role's limit across all its
    /// disks. A refused record waits, as for a full journal, until `stream.freed` is notified.
    fn admit(&self, _stream: &DiskStream, _bytes: u64) -> bool {
        true
    }

    /// `stream`'s journal became full (`full`), or takes records again (`!full`): a role
    /// that cannot free it itself says why the stream waits. Called on changes only.
    fn journal_full(&self, _stream: &DiskStream, _full: bool) {}

    /// Whether compressed payloads are decompressed once on arrival to prove them sound (the
    /// first hop that takes them from an agent; later hops trust it).
    fn check_compressed(&self) -> bool;

    /// Digests of the replica for a resync; answered when the replica reflects every record
    /// received so far.
    fn hashes(
        &self,
        stream: &Arc<DiskStream>,
        request: HashRequest,
    ) -> oneshot::Receiver<Result<Hashes, String>>;
}

/// Serves one replication stream until it ends. `expected_peer`, when given, is the only peer
/// id the `Hello` may carry (an agent must name itself as its certificate does).
pub async fn serve_stream<S: Sink>(
    sink: Arc<S>,
    expected_peer: Option<PeerId>,
    via: Via,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<()> {
    let mut reader = FrameReader::new(recv);
    let hello = match reader.next().await {
        Ok(Some(Frame::Hello(h))) => h,
        Ok(Some(other)) => {
            let msg = format!("expected Hello first, got {:?}", other.frame_type());
            refuse(&mut send, error_code::PROTOCOL, &msg).await;
            bail!("{msg}");
        }
        Ok(None) => return Ok(()),
        Err(e) => bail!("{e}"),
    };
    if let Some(expected) = expected_peer
        && hello.peer_id != expected
    {
        let msg = format!(
            "the Hello names peer {}, but the client certificate is agent {}",
            crate::peer_hex(&hello.peer_id),
            crate::peer_hex(&expected)
        );
        refuse(&mut send, error_code::PROTOCOL, &msg).await;
        bail!("{msg}");
    }
    let streams = match sink.prepare(&hello, &via).await {
        Ok(()) => sink.open_disks(&hello, &via),
        Err(e) => Err(e),
    };
    let streams = match streams {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("{e:#}");
            refuse(&mut send, code_of(&e, error_code::INTERNAL), &msg).await;
            return Err(e);
        }
    };
    let by_disk: BTreeMap<DiskId, Arc<DiskStream>> =
        streams.iter().map(|s| (s.info.id, s.clone())).collect();
    static LOOPS: AtomicU64 = AtomicU64::new(1);
    let id = LOOPS.fetch_add(1, Ordering::Relaxed);
    for s in &streams {
        s.claim(id);
    }
    // The loop this one supersedes ends its batch first (disk order: no two loops wait on
    // each other).
    let running = tokio::select! {
        guards = async {
            let mut guards = Vec::new();
            for s in by_disk.values() {
                guards.push(s.running.clone().lock_owned().await);
            }
            guards
        } => Some(guards),
        () = superseded(&streams, id) => None,
    };
    if running.is_none() {
        for s in &streams {
            s.release(id);
        }
        let _ = send.reset(quinn::VarInt::from_u32(u32::from(error_code::PROTOCOL)));
        return Ok(());
    }
    let result = tokio::select! {
        r = run(&sink, &by_disk, hello, &mut send, &mut reader) => match r {
            Err(e) if e.downcast_ref::<Refused>().is_some() => {
                refuse(&mut send, code_of(&e, error_code::INTERNAL), &format!("{e:#}")).await;
                Err(e)
            }
            r => r,
        },
        () = superseded(&streams, id) => {
            let halted = streams.iter().find_map(|s| lock(&s.halted).clone());
            if let Some(why) = halted {
                refuse(&mut send, why.code, &why.message).await;
                return Err(why.into());
            }
            tracing::info!(peer = %crate::peer_hex(&streams[0].key.peer),
                "a newer replication stream took over; closing the old one");
            // The old peer is most likely gone: nothing is awaited on its stream.
            let _ = send.reset(quinn::VarInt::from_u32(u32::from(error_code::PROTOCOL)));
            Ok(())
        }
    };
    for s in &streams {
        s.release(id);
    }
    drop(running);
    result
}

/// Resolves once another receiving loop owns any of `streams`.
async fn superseded(streams: &[Arc<DiskStream>], id: u64) {
    let mut waits = tokio::task::JoinSet::new();
    for s in streams {
        let s = s.clone();
        waits.spawn(async move { s.superseded(id).await });
    }
    match waits.join_next().await {
        Some(_) => {}
        None => std::future::pending().await,
    }
}

async fn refuse(send: &mut quinn::SendStream, code: u16, msg: &str) {
    let _ = write_frames(send, [Frame::Error(ErrorFrame::new(code, msg))]).await;
    let _ = send.finish();
}

async fn run<S: Sink>(
    sink: &Arc<S>,
    streams: &BTreeMap<DiskId, Arc<DiskStream>>,
    hello: Hello,
    send: &mut quinn::SendStream,
    reader: &mut FrameReader,
) -> Result<()> {
    // Whatever an earlier loop appended and did not get to sync (it failed, or a crash left it
    // written) is made durable now, so the journal and the resume point agree.
    tokio::task::block_in_place(|| -> Result<()> {
        for s in streams.values() {
            let synced = s
                .journal()
                .sync()
                .with_context(|| format!("disk {}: syncing the journal", s.key))?;
            if synced > s.durable() {
                s.raise_durable(synced);
                sink.on_durable(s, synced, &[])?;
            }
        }
        Ok(())
    })?;
    let durable = streams.values().map(|s| (s.info.id, s.durable()));
    let mut rx = Receiver::new(ReceiverConfig::default(), durable);
    let now = Instant::now();
    rx.connect(now);
    rx.handle(now, Frame::Hello(hello));
    let (hash_tx, mut hash_rx) = mpsc::channel::<Result<Hashes, String>>(16);
    let mut pending: VecDeque<Record> = VecDeque::new();
    loop {
        while let Some(event) = rx.poll_event() {
            match event {
                ReceiverEvent::Record(r) => pending.push_back(r),
                ReceiverEvent::HashRequest(q) => {
                    let Some(s) = streams.get(&q.disk) else {
                        continue;
                    };
                    let answer = sink.hashes(s, q);
                    let tx = hash_tx.clone();
                    tokio::spawn(async move {
                        let h = answer
                            .await
                            .unwrap_or_else(|_| Err("the replica's hashing stopped".into()));
                        let _ = tx.send(h).await;
                    });
                }
                ReceiverEvent::Hello(_) => {}
                ReceiverEvent::PeerError(e) => {
                    tracing::info!(code = e.code, message = %e.message, "peer closed the stream with an error");
                }
                ReceiverEvent::ProtocolError(v) => {
                    tracing::warn!(violation = %v, "peer broke the protocol");
                }
                ReceiverEvent::ConnectionDead => tracing::info!("replication stream idle; closing"),
            }
        }

        // Journal appends, fdatasync and the role's redb commit block: the worker's other tasks
        // move to another worker meanwhile. (Not `spawn_blocking`: a batch is never cut short
        // by the loop ending, so two loops never append to one journal at once.)
        let blocked = if pending.is_empty() {
            None
        } else {
            tokio::task::block_in_place(|| append_pending(sink, streams, &mut pending, &mut rx))?
        };

        let now = Instant::now();
        let frames: Vec<Frame> = std::iter::from_fn(|| rx.poll_transmit(now)).collect();
        if !frames.is_empty() {
            write_frames(send, frames).await?;
        }
        if rx.is_closed() {
            let _ = send.finish();
            return Ok(());
        }

        let deadline = rx.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            // While a journal is full, records wait in `pending` (bounded by the sender's
            // window; a sender that ignores it is cut off at PENDING_MAX) and control frames
            // (pings) keep being answered.
            // `HAVEN_FAILPOINTS=ingest=pause` stops reading (tests hold a sync mid-way).
            frame = reader.next(), if pending_bytes(&pending) < PENDING_MAX
                && !crate::failpoint::paused("ingest") => {
                let now = Instant::now();
                match frame {
                    Ok(Some(f)) => {
                        rx.handle(now, f);
                        // Everything already received joins this batch (one sync for all).
                        while let Ok(Some(f)) = reader.try_next() {
                            rx.handle(now, f);
                        }
                    }
                    Ok(None) => {
                        rx.connection_lost();
                        return Ok(());
                    }
                    Err(e) => {
                        refuse(send, error_code::MALFORMED, &e.to_string()).await;
                        return Err(e.into());
                    }
                }
            }
            () = wait_freed(blocked.as_deref()), if blocked.is_some() => {}
            Some(h) = hash_rx.recv() => match h {
                Ok(h) => {
                    if let Err(e) = rx.send_hashes(h) {
                        tracing::warn!(error = %e, "cannot send hashes");
                    }
                }
                Err(msg) => {
                    refuse(send, error_code::INTERNAL, &format!("resync hashes: {msg}")).await;
                    bail!("resync hashes: {msg}");
                }
            },
            () = sleep_until(deadline) => rx.handle_timeout(Instant::now()),
        }
    }
}

async fn wait_freed(stream: Option<&DiskStream>) {
    if let Some(s) = stream {
        s.freed.notified().await;
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Appends pending records in order, syncs each journal touched once, reports and acknowledges
/// what became durable. Returns the stream whose journal is full, if any.
fn append_pending<S: Sink>(
    sink: &Arc<S>,
    streams: &BTreeMap<DiskId, Arc<DiskStream>>,
    pending: &mut VecDeque<Record>,
    rx: &mut Receiver,
) -> Result<Option<Arc<DiskStream>>> {
    let mut appended: BTreeMap<DiskId, Vec<(Record, AppendInfo)>> = BTreeMap::new();
    let mut blocked = None;
    let mut failed = None;
    let now = Instant::now();
    while let Some(r) = pending.front() {
        let s = streams
            .get(&r.disk())
            .context("a record for a disk the Hello did not announce")?;
        if let Err(why) = check(r, s, sink.check_compressed()) {
            failed = Some(format!("disk {}: record {} refused: {why}", s.key, r.seq()));
            break;
        }
        if !sink.admit(s, r.wire_len()) {
            blocked = Some(s.clone());
            break;
        }
        let result = s.journal().append(r);
        match result {
            Ok(info) => {
                if s.journal_full.swap(false, Ordering::Relaxed) {
                    sink.journal_full(s, false);
                }
                lock(&s.received).add(now, r.wire_extent());
                s.stored_bytes_total
                    .fetch_add(info.stored_bytes, Ordering::Relaxed);
                let r = pending.pop_front().context("pending record vanished")?;
                s.keep_fresh(match (&r, &info.stored) {
                    (Record::Write(w), Some(data)) => Record::Write(haven_wire::Write {
                        data: data.clone(),
                        ..w.clone()
                    }),
                    _ => r.clone(),
                });
                appended.entry(r.disk()).or_default().push((r, info));
            }
            Err(StoreError::Full { .. }) => {
                if !s.journal_full.swap(true, Ordering::Relaxed) {
                    sink.journal_full(s, true);
                }
                blocked = Some(s.clone());
                break;
            }
            Err(e) => {
                let msg = format!("disk {}: cannot journal record {}: {e}", s.key, r.seq());
                s.set_error(Some(msg.clone()));
                failed = Some(msg);
                break;
            }
        }
    }
    // What was appended before a failure is still made durable and acknowledged below.
    if !appended.is_empty() {
        crate::failpoint::hit("ingest.after-append");
    }
    for (disk, records) in appended {
        let s = &streams[&disk];
        let durable = s
            .journal()
            .sync()
            .with_context(|| format!("disk {}: syncing the journal", s.key))?;
        s.durable.store(durable, Ordering::Release);
        sink.on_durable(s, durable, &records)?;
        crate::failpoint::hit("ingest.after-sync");
        rx.mark_durable(disk, durable)
            .with_context(|| format!("disk {}: acknowledging seq {durable}", s.key))?;
    }
    if let Some(msg) = failed {
        bail!("{msg}");
    }
    Ok(blocked)
}

/// What the wire cannot check: the extent lies on the disk, and (where asked) compressed data
/// decompresses to its declared length. A record failing either is never journaled.
fn check(r: &Record, s: &DiskStream, compressed: bool) -> Result<(), String> {
    let Record::Write(w) = r else { return Ok(()) };
    let end = w.offset.checked_add(w.data.extent_len());
    if end.is_none_or(|end| end > s.info.size) {
        return Err(format!(
            "extent {}+{} lies past the end of the {}-byte disk",
            w.offset,
            w.data.extent_len(),
            s.info.size
        ));
    }
    if compressed && matches!(w.data, haven_wire::Payload::Compressed { .. }) {
        haven_store::decompress(&w.data).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Bytes of disk a record covers (0 for a tag).
pub trait RecordExt {
    fn wire_extent(&self) -> u64;
}

impl RecordExt for Record {
    fn wire_extent(&self) -> u64 {
        match self {
            Record::Write(w) => w.data.extent_len(),
            Record::Tag(_) => 0,
        }
    }
}
