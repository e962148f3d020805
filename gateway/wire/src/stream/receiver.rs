//! The receiving side: the process server's inbound side, and the master target.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::{Record, StreamError, Violation};
use crate::PROTOCOL_VERSION;
use crate::frame::{
    Ack, DiskId, ErrorFrame, Frame, FrameType, HashRequest, Hashes, Hello, Resume, Seq, Welcome,
};

/// How a [`Receiver`] behaves.
#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// The connection is dead after receiving nothing for this long; longer than the sender's
    /// keepalive interval.
    pub idle_timeout: Duration,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// What a [`Receiver`] tells its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// The peer introduced itself; the `Welcome` is queued. The owner checks the peer and its
    /// disks and drops the connection if it does not accept them.
    Hello(Hello),
    /// The next record of a disk, in seq order and exactly once: persist it, then
    /// [`Receiver::mark_durable`].
    Record(Record),
    /// The peer asks for digests (resync); answer with [`Receiver::send_hashes`].
    HashRequest(HashRequest),
    /// The peer sent an `Error` frame; the connection is over.
    PeerError(ErrorFrame),
    /// The peer broke the protocol; an `Error` frame is queued, then the connection is over.
    ProtocolError(Violation),
    /// Nothing received for the idle timeout: the connection is considered dead.
    ConnectionDead,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Disconnected,
    AwaitingHello,
    Streaming,
    Closed,
}

#[derive(Debug, Default)]
struct DiskState {
    /// Highest seq the owner made durable.
    durable: Seq,
    /// Highest seq handed to the owner (≥ `durable`).
    received: Seq,
    /// An `Ack` of `durable` is owed.
    ack_pending: bool,
    /// Announced in this connection's `Hello`.
    announced: bool,
}

/// Receives disks' record streams, in order and exactly once, and acknowledges what the owner
/// made durable. See the [module documentation](super) for the rules.
#[derive(Debug)]
pub struct Receiver {
    config: ReceiverConfig,
    disks: BTreeMap<DiskId, DiskState>,
    state: State,
    events: VecDeque<ReceiverEvent>,
    pending_error: Option<ErrorFrame>,
    welcome: Option<Welcome>,
    pong: Option<u64>,
    /// `Hashes` frames to send.
    hashes: VecDeque<Frame>,
    last_rx: Option<Instant>,
}

impl Receiver {
    /// A receiver that holds, durably, every record up to the given seq of each disk (after a
    /// restart: what the owner's store says). Disks not listed start empty (durable seq 0).
    pub fn new(config: ReceiverConfig, durable: impl IntoIterator<Item = (DiskId, Seq)>) -> Self {
        let disks = durable
            .into_iter()
            .map(|(id, seq)| {
                (
                    id,
                    DiskState {
                        durable: seq,
                        received: seq,
                        ..Default::default()
                    },
                )
            })
            .collect();
        Self {
            config,
            disks,
            state: State::Disconnected,
            events: VecDeque::new(),
            pending_error: None,
            welcome: None,
            pong: None,
            hashes: VecDeque::new(),
            last_rx: None,
        }
    }

    fn reset_connection(&mut self) {
        for d in self.disks.values_mut() {
            d.announced = false;
            d.ack_pending = false;
        }
        self.pending_error = None;
        self.welcome = None;
        self.pong = None;
        self.hashes.clear();
        self.last_rx = None;
    }

    /// A new transport is up: the receiver waits for `Hello`.
    pub fn connect(&mut self, now: Instant) {
        self.reset_connection();
        self.last_rx = Some(now);
        self.state = State::AwaitingHello;
    }

    /// The transport is gone. Records received and not yet durable stay received: their resend
    /// on the next connection is ignored, and `mark_durable` still applies to them.
    pub fn connection_lost(&mut self) {
        self.reset_connection();
        self.state = State::Disconnected;
    }

    /// The owner made every record of `disk` up to `seq` durable. An `Ack` follows (one per
    /// disk however many calls, carrying the highest seq).
    pub fn mark_durable(&mut self, disk: DiskId, seq: Seq) -> Result<(), StreamError> {
        let d = self
            .disks
            .get_mut(&disk)
            .ok_or(StreamError::UnknownDisk(disk))?;
        if seq > d.received {
            return Err(StreamError::NotReceived {
                disk,
                seq,
                received: d.received,
            });
        }
        if seq > d.durable {
            d.durable = seq;
            d.ack_pending = true;
        }
        Ok(())
    }

    /// Answers a [`ReceiverEvent::HashRequest`].
    pub fn send_hashes(&mut self, hashes: Hashes) -> Result<(), StreamError> {
        if self.state != State::Streaming {
            return Err(StreamError::NotConnected);
        }
        if !self.disks.get(&hashes.disk).is_some_and(|d| d.announced) {
            return Err(StreamError::UnknownDisk(hashes.disk));
        }
        let frame = Frame::Hashes(hashes);
        frame.validate()?;
        self.hashes.push_back(frame);
        Ok(())
    }

    /// Handles a frame received from the peer.
    pub fn handle(&mut self, now: Instant, frame: Frame) {
        let streaming = match self.state {
            State::AwaitingHello => false,
            State::Streaming => true,
            State::Disconnected | State::Closed => return,
        };
        self.last_rx = Some(now);
        match frame {
            Frame::Hello(h) if !streaming => self.on_hello(h),
            Frame::Write(w) if streaming => self.on_record(Record::Write(w)),
            Frame::Tag(t) if streaming => self.on_record(Record::Tag(t)),
            Frame::HashRequest(r) if streaming => {
                if self.announced(r.disk, FrameType::HashRequest) {
                    self.events.push_back(ReceiverEvent::HashRequest(r));
                }
            }
            Frame::Ping { nonce } => self.pong = Some(nonce),
            Frame::Pong { .. } => {}
            Frame::Error(e) => {
                self.events.push_back(ReceiverEvent::PeerError(e));
                self.state = State::Closed;
            }
            other => self.fail(Violation::UnexpectedFrame {
                frame_type: other.frame_type(),
                state: if streaming {
                    "while streaming"
                } else {
                    "before the Hello"
                },
            }),
        }
    }

    fn on_hello(&mut self, h: Hello) {
        if h.version != PROTOCOL_VERSION {
            return self.fail(Violation::UnsupportedVersion {
                got: h.version,
                supported: PROTOCOL_VERSION,
            });
        }
        let mut resume = Vec::with_capacity(h.disks.len());
        for info in &h.disks {
            let d = self.disks.entry(info.id).or_default();
            d.announced = true;
            resume.push(Resume {
                disk: info.id,
                next_seq: d.durable + 1,
            });
        }
        self.welcome = Some(Welcome { resume });
        self.state = State::Streaming;
        self.events.push_back(ReceiverEvent::Hello(h));
    }

    /// Whether `disk` was announced; a protocol error if not.
    fn announced(&mut self, disk: DiskId, frame_type: FrameType) -> bool {
        if self.disks.get(&disk).is_some_and(|d| d.announced) {
            return true;
        }
        self.fail(Violation::UnknownDisk { frame_type, disk });
        false
    }

    fn on_record(&mut self, record: Record) {
        let frame_type = match record {
            Record::Write(_) => FrameType::Write,
            Record::Tag(_) => FrameType::Tag,
        };
        let disk = record.disk();
        if !self.announced(disk, frame_type) {
            return;
        }
        let Some(d) = self.disks.get_mut(&disk) else {
            return;
        };
        let seq = record.seq();
        if seq <= d.received {
            return; // A resend of what the owner already has.
        }
        if seq != d.received + 1 {
            let expected = d.received + 1;
            return self.fail(Violation::SequenceGap {
                disk,
                expected,
                got: seq,
            });
        }
        d.received = seq;
        self.events.push_back(ReceiverEvent::Record(record));
    }

    fn fail(&mut self, v: Violation) {
        self.pending_error = Some(ErrorFrame::new(v.code(), v.to_string()));
        self.events.push_back(ReceiverEvent::ProtocolError(v));
        self.state = State::Closed;
    }

    /// Acts on timers: the idle timeout.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(t) = self.poll_timeout()
            && now >= t
        {
            self.events.push_back(ReceiverEvent::ConnectionDead);
            self.state = State::Closed;
        }
    }

    /// When [`Receiver::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingHello | State::Streaming => {
                self.last_rx.map(|t| t + self.config.idle_timeout)
            }
            State::Disconnected | State::Closed => None,
        }
    }

    /// The next frame to send, if any.
    pub fn poll_transmit(&mut self, _now: Instant) -> Option<Frame> {
        if let Some(e) = self.pending_error.take() {
            return Some(Frame::Error(e));
        }
        if !matches!(self.state, State::AwaitingHello | State::Streaming) {
            return None;
        }
        if let Some(w) = self.welcome.take() {
            return Some(Frame::Welcome(w));
        }
        if let Some(nonce) = self.pong.take() {
            return Some(Frame::Pong { nonce });
        }
        if self.state != State::Streaming {
            return None;
        }
        if let Some((&disk, d)) = self
            .disks
            .iter_mut()
            .find(|(_, d)| d.ack_pending && d.announced)
        {
            d.ack_pending = false;
            return Some(Frame::Ack(Ack {
                disk,
                durable_seq: d.durable,
            }));
        }
        self.hashes.pop_front()
    }

    /// The next event for the owner, if any.
    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }

    /// Whether the `Hello` was received and the connection is usable.
    pub fn is_streaming(&self) -> bool {
        self.state == State::Streaming
    }

    /// Whether the connection ended (an error or a dead peer) and the owner should close it.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The highest durable seq of `disk`.
    pub fn durable(&self, disk: DiskId) -> Option<Seq> {
        self.disks.get(&disk).map(|d| d.durable)
    }

    /// The highest seq of `disk` handed to the owner.
    pub fn received(&self, disk: DiskId) -> Option<Seq> {
        self.disks.get(&disk).map(|d| d.received)
    }
}
