//! The sending side: the agent, and the process server's forwarding side.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{Record, StreamError, Violation};
use crate::PROTOCOL_VERSION;
use crate::frame::{
    DiskId, DiskInfo, ErrorFrame, Frame, HashRequest, Hashes, Hello, PeerId, Role, Seq, Welcome,
};

/// How a [`Sender`] behaves.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// What this side is, announced in `Hello`.
    pub role: Role,
    /// This side's identity, announced in `Hello`.
    pub peer_id: PeerId,
    /// Most bytes of `Write`/`Tag` frames sent and not yet acknowledged.
    pub window_bytes: u64,
    /// Ping after receiving nothing for this long.
    pub keepalive_interval: Duration,
    /// The connection is dead when nothing (or no `Welcome`) has come within this long of a
    /// ping (of the `Hello`).
    pub keepalive_timeout: Duration,
}

impl SenderConfig {
    /// A configuration with default window (64 MiB) and keepalive (5 s interval, 15 s timeout).
    pub fn new(role: Role, peer_id: PeerId) -> Self {
        Self {
            role,
            peer_id,
            window_bytes: 64 << 20,
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(15),
        }
    }
}

/// What a [`Sender`] tells its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SenderEvent {
    /// The `Welcome` was received; records flow.
    Connected,
    /// Records of `disk` up to `up_to` are durable downstream: the owner may free them.
    Released {
        /// The disk.
        disk: DiskId,
        /// The highest released seq (all below are released too).
        up_to: Seq,
    },
    /// Digests answering a [`Sender::request_hashes`].
    Hashes(Hashes),
    /// The peer sent an `Error` frame; the connection is over.
    PeerError(ErrorFrame),
    /// The peer broke the protocol; an `Error` frame is queued, then the connection is over.
    ProtocolError(Violation),
    /// No `Pong` or `Welcome` in time: the connection is considered dead.
    ConnectionDead,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Disconnected,
    AwaitingWelcome { deadline: Instant },
    Streaming,
    Closed,
}

#[derive(Debug)]
struct Queued {
    record: Record,
    cost: u64,
}

#[derive(Debug)]
struct DiskState {
    info: DiskInfo,
    /// The seq the next pushed record must carry.
    next_push: Seq,
    /// Every seq up to this one is released.
    released: Seq,
    /// Pushed, unreleased records, in seq order (the first is `released + 1`).
    queue: VecDeque<Queued>,
    /// How many records at the front of `queue` were sent on this connection.
    sent: usize,
}

/// Sends disks' record streams: windowed, resumable, with keepalive. See the
/// [module documentation](super) for the rules.
#[derive(Debug)]
pub struct Sender {
    config: SenderConfig,
    disks: Vec<DiskState>,
    state: State,
    in_flight: u64,
    /// Disk to try first for the next record (round robin).
    next_disk: usize,
    events: VecDeque<SenderEvent>,
    pending_error: Option<ErrorFrame>,
    hello_pending: bool,
    pong: Option<u64>,
    next_nonce: u64,
    /// The unanswered ping and when it times out.
    ping: Option<(u64, Instant)>,
    last_rx: Option<Instant>,
    hash_requests: VecDeque<HashRequest>,
}

impl Sender {
    /// A sender for `disks`, each with the seq of the first record the owner will push: the
    /// oldest record its log still holds, or the next it will write if it holds none. Fails if
    /// the disks could not be announced (too many, a repeated id, a bad block size) or a seq is 0.
    pub fn new(
        config: SenderConfig,
        disks: impl IntoIterator<Item = (DiskInfo, Seq)>,
    ) -> Result<Self, StreamError> {
        let mut states = Vec::new();
        for (info, first) in disks {
            if first == 0 {
                return Err(StreamError::ZeroSeq(info.id));
            }
            states.push(DiskState {
                info,
                next_push: first,
                released: first - 1,
                queue: VecDeque::new(),
                sent: 0,
            });
        }
        let sender = Self {
            config,
            disks: states,
            state: State::Disconnected,
            in_flight: 0,
            next_disk: 0,
            events: VecDeque::new(),
            pending_error: None,
            hello_pending: false,
            pong: None,
            next_nonce: 1,
            ping: None,
            last_rx: None,
            hash_requests: VecDeque::new(),
        };
        Frame::Hello(sender.hello()).validate()?;
        Ok(sender)
    }

    fn hello(&self) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            role: self.config.role,
            peer_id: self.config.peer_id,
            disks: self.disks.iter().map(|d| d.info).collect(),
            takeover: false,
        }
    }

    fn disk_index(&self, disk: DiskId) -> Option<usize> {
        self.disks.iter().position(|d| d.info.id == disk)
    }

    /// Forgets everything tied to the current connection; every unreleased record is unsent.
    fn reset_connection(&mut self) {
        for d in &mut self.disks {
            d.sent = 0;
        }
        self.in_flight = 0;
        self.pending_error = None;
        self.hello_pending = false;
        self.pong = None;
        self.ping = None;
        self.last_rx = None;
        self.hash_requests.clear();
    }

    /// A new transport is up: the sender will open with `Hello` and wait for `Welcome`.
    pub fn connect(&mut self, now: Instant) {
        self.reset_connection();
        self.hello_pending = true;
        self.last_rx = Some(now);
        self.state = State::AwaitingWelcome {
            deadline: now + self.config.keepalive_timeout,
        };
    }

    /// The transport is gone. Records sent and not acknowledged will be sent again after the
    /// next `connect` (from where the `Welcome` says).
    pub fn connection_lost(&mut self) {
        self.reset_connection();
        self.state = State::Disconnected;
    }

    /// Queues the next record of its disk. Seqs of a disk must follow each other from the first
    /// seq given to [`Sender::new`]. A record the receiver already holds durably (it resumed
    /// beyond it) is released at once.
    pub fn push(&mut self, record: Record) -> Result<(), StreamError> {
        let disk = record.disk();
        let i = self
            .disk_index(disk)
            .ok_or(StreamError::UnknownDisk(disk))?;
        let d = &mut self.disks[i];
        if record.seq() != d.next_push {
            return Err(StreamError::OutOfOrder {
                disk,
                expected: d.next_push,
                got: record.seq(),
            });
        }
        let frame = record.to_frame();
        frame.validate()?;
        d.next_push += 1;
        if record.seq() <= d.released {
            self.events.push_back(SenderEvent::Released {
                disk,
                up_to: record.seq(),
            });
        } else {
            let cost = frame.encoded_len() as u64;
            d.queue.push_back(Queued { record, cost });
        }
        Ok(())
    }

    /// Asks the receiver for the digests of a range (resync). Answered by
    /// [`SenderEvent::Hashes`]; lost if the connection ends first.
    pub fn request_hashes(&mut self, request: HashRequest) -> Result<(), StreamError> {
        if !matches!(self.state, State::AwaitingWelcome { .. } | State::Streaming) {
            return Err(StreamError::NotConnected);
        }
        self.disk_index(request.disk)
            .ok_or(StreamError::UnknownDisk(request.disk))?;
        Frame::HashRequest(request).validate()?;
        self.hash_requests.push_back(request);
        Ok(())
    }

    /// Handles a frame received from the peer.
    pub fn handle(&mut self, now: Instant, frame: Frame) {
        let streaming = match self.state {
            State::AwaitingWelcome { .. } => false,
            State::Streaming => true,
            State::Disconnected | State::Closed => return,
        };
        self.last_rx = Some(now);
        // Any frame shows the peer is reading and answering: an outstanding ping need not be
        // answered by its own pong (which may come late, behind what the peer still reads).
        if streaming {
            self.ping = None;
        }
        match frame {
            Frame::Welcome(w) if !streaming => self.on_welcome(&w),
            Frame::Ack(a) if streaming => {
                let Some(i) = self.disk_index(a.disk) else {
                    return self.fail(Violation::UnknownDisk {
                        frame_type: crate::FrameType::Ack,
                        disk: a.disk,
                    });
                };
                let last = self.disks[i].next_push - 1;
                if a.durable_seq > last {
                    return self.fail(Violation::AckBeyondStream {
                        disk: a.disk,
                        acked: a.durable_seq,
                        last,
                    });
                }
                self.release(i, a.durable_seq);
            }
            Frame::Hashes(h) if streaming => {
                if self.disk_index(h.disk).is_none() {
                    return self.fail(Violation::UnknownDisk {
                        frame_type: crate::FrameType::Hashes,
                        disk: h.disk,
                    });
                }
                self.events.push_back(SenderEvent::Hashes(h));
            }
            Frame::Ping { nonce } => self.pong = Some(nonce),
            Frame::Pong { nonce } => {
                if self.ping.is_some_and(|(n, _)| n == nonce) {
                    self.ping = None;
                }
            }
            Frame::Error(e) => {
                self.events.push_back(SenderEvent::PeerError(e));
                self.state = State::Closed;
            }
            other => self.fail(Violation::UnexpectedFrame {
                frame_type: other.frame_type(),
                state: if streaming {
                    "while streaming"
                } else {
                    "before the Welcome"
                },
            }),
        }
    }

    fn on_welcome(&mut self, w: &Welcome) {
        for r in &w.resume {
            if self.disk_index(r.disk).is_none() {
                return self.fail(Violation::UnknownDisk {
                    frame_type: crate::FrameType::Welcome,
                    disk: r.disk,
                });
            }
        }
        let mut resume = Vec::with_capacity(self.disks.len());
        for d in &self.disks {
            let Some(r) = w.resume.iter().find(|r| r.disk == d.info.id) else {
                return self.fail(Violation::MissingResume { disk: d.info.id });
            };
            if r.next_seq <= d.released {
                return self.fail(Violation::ResumeGap {
                    disk: d.info.id,
                    next_seq: r.next_seq,
                    released: d.released,
                });
            }
            resume.push(r.next_seq);
        }
        for (i, next_seq) in resume.into_iter().enumerate() {
            self.release(i, next_seq - 1);
        }
        self.state = State::Streaming;
        self.events.push_back(SenderEvent::Connected);
    }

    /// Releases the records of disk `i` up to `up_to` (beyond what was pushed too: those are
    /// released as they are pushed).
    fn release(&mut self, i: usize, up_to: Seq) {
        let d = &mut self.disks[i];
        if up_to <= d.released {
            return;
        }
        while d.queue.front().is_some_and(|q| q.record.seq() <= up_to) {
            let Some(q) = d.queue.pop_front() else { break };
            if d.sent > 0 {
                d.sent -= 1;
                self.in_flight -= q.cost;
            }
        }
        let before = d.released;
        d.released = up_to;
        let up_to = up_to.min(d.next_push - 1);
        if up_to > before {
            self.events.push_back(SenderEvent::Released {
                disk: d.info.id,
                up_to,
            });
        }
    }

    fn fail(&mut self, v: Violation) {
        self.pending_error = Some(ErrorFrame::new(v.code(), v.to_string()));
        self.events.push_back(SenderEvent::ProtocolError(v));
        self.state = State::Closed;
    }

    /// Acts on timers: the `Welcome` or `Pong` deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        let deadline = match self.state {
            State::AwaitingWelcome { deadline } => Some(deadline),
            State::Streaming => self.ping.map(|(_, d)| d),
            State::Disconnected | State::Closed => None,
        };
        if deadline.is_some_and(|d| now >= d) {
            self.events.push_back(SenderEvent::ConnectionDead);
            self.state = State::Closed;
        }
    }

    /// When [`Sender::handle_timeout`] (then [`Sender::poll_transmit`]) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingWelcome { deadline } => Some(deadline),
            State::Streaming => match self.ping {
                Some((_, deadline)) => Some(deadline),
                None => self.last_rx.map(|t| t + self.config.keepalive_interval),
            },
            State::Disconnected | State::Closed => None,
        }
    }

    /// The next frame to send, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Frame> {
        if let Some(e) = self.pending_error.take() {
            return Some(Frame::Error(e));
        }
        if matches!(self.state, State::Disconnected | State::Closed) {
            return None;
        }
        if self.hello_pending {
            self.hello_pending = false;
            return Some(Frame::Hello(self.hello()));
        }
        if let Some(nonce) = self.pong.take() {
            return Some(Frame::Pong { nonce });
        }
        if self.state != State::Streaming {
            return None;
        }
        if self.ping.is_none()
            && self
                .last_rx
                .is_some_and(|t| now >= t + self.config.keepalive_interval)
        {
            let nonce = self.next_nonce;
            self.next_nonce += 1;
            self.ping = Some((nonce, now + self.config.keepalive_timeout));
            return Some(Frame::Ping { nonce });
        }
        if let Some(r) = self.hash_requests.pop_front() {
            return Some(Frame::HashRequest(r));
        }
        let n = self.disks.len();
        for k in 0..n {
            let i = (self.next_disk + k) % n;
            let d = &mut self.disks[i];
            let Some(q) = d.queue.get(d.sent) else {
                continue;
            };
            if self.in_flight > 0 && self.in_flight + q.cost > self.config.window_bytes {
                continue;
            }
            self.in_flight += q.cost;
            d.sent += 1;
            self.next_disk = (i + 1) % n;
            return Some(q.record.to_frame());
        }
        None
    }

    /// The next event for the owner, if any.
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    /// Bytes of records sent on this connection and not yet acknowledged.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight
    }

    /// The configuration.
    pub fn config(&self) -> &SenderConfig {
        &self.config
    }

    /// Whether the `Welcome` was received and the connection is usable.
    pub fn is_streaming(&self) -> bool {
        self.state == State::Streaming
    }

    /// Whether the connection ended (an error or a dead peer) and the owner should close it.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The highest released seq of `disk` (everything up to it is durable downstream).
    pub fn released(&self, disk: DiskId) -> Option<Seq> {
        self.disk_index(disk).map(|i| self.disks[i].released)
    }

    /// Records pushed and not yet released, over all disks.
    pub fn unreleased(&self) -> usize {
        self.disks.iter().map(|d| d.queue.len()).sum()
    }
}
