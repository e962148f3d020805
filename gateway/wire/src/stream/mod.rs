//! The replication state machines: [`Sender`] and [`Receiver`].
//!
//! Both are sans-IO, in the style of `quinn-proto`'s `Connection`. The owner
//!
//! 1. calls `connect(now)` when a transport (a QUIC stream) is up, and `connection_lost()` when
//!    it goes away; the machine outlives connections and keeps what must survive them;
//! 2. decodes received bytes with a [`Decoder`](crate::Decoder) and passes each frame to
//!    `handle(now, frame)` (a decode error ends the connection: send
//!    [`ErrorFrame::from_wire_error`](crate::ErrorFrame::from_wire_error), then close);
//! 3. sends, in order, every frame `poll_transmit(now)` returns until it returns `None`;
//! 4. acts on every `poll_event()`;
//! 5. calls `handle_timeout(now)` once `now` reaches `poll_timeout()`.
//!
//! After an event that ends the connection (`ProtocolError`, `PeerError`, `ConnectionDead`) the
//! machine is closed: the owner sends what `poll_transmit` still returns (an `Error` frame for a
//! protocol error), closes the transport and may `connect` again.
//!
//! ```
//! use std::time::Instant;
//! use haven_wire::*;
//!
//! let now = Instant::now();
//! let disk = DiskInfo { id: 1, size: 1 << 30, block_size: 4096 };
//! let mut sender = Sender::new(SenderConfig::new(Role::Agent, [0; 16]), [(disk, 1)]).unwrap();
//! let mut receiver = Receiver::new(ReceiverConfig::default(), []);
//! sender.push(Record::Write(Write { disk: 1, seq: 1, offset: 0, data: Payload::Zero { len: 4096 } }))
//!     .unwrap();
//! sender.connect(now);
//! receiver.connect(now);
//! // One round trip through the codec each way until both sides are quiet.
//! let (mut to_receiver, mut to_sender) = (Decoder::new(), Decoder::new());
//! loop {
//!     let mut sent = false;
//!     while let Some(frame) = sender.poll_transmit(now) {
//!         to_receiver.push(&frame.to_vec().unwrap());
//!         sent = true;
//!     }
//!     while let Some(frame) = to_receiver.next().unwrap() {
//!         receiver.handle(now, frame);
//!     }
//!     while let Some(event) = receiver.poll_event() {
//!         if let ReceiverEvent::Record(record) = event {
//!             // ... persist the record, then:
//!             receiver.mark_durable(record.disk(), record.seq()).unwrap();
//!         }
//!     }
//!     while let Some(frame) = receiver.poll_transmit(now) {
//!         to_sender.push(&frame.to_vec().unwrap());
//!         sent = true;
//!     }
//!     while let Some(frame) = to_sender.next().unwrap() {
//!         sender.handle(now, frame);
//!     }
//!     if !sent {
//!         break;
//!     }
//! }
//! let events: Vec<_> = std::iter::from_fn(|| sender.poll_event()).collect();
//! assert_eq!(events, [SenderEvent::Connected, SenderEvent::Released { disk: 1, up_to: 1 }]);
//! ```
//!
//! # The stream
//!
//! Each disk has its own stream of records ([`Record`]: a `Write` — data, compressed data, zeroes
//! or trim — or a `Tag`), numbered by [`Seq`] from 1 without gaps. The sending owner
//! numbers them and keeps each one in its own durable log until the [`Sender`] releases it.
//!
//! # Handshake and resume rules
//!
//! - The sender opens with `Hello` (its role, id and disks). The receiver answers `Welcome`
//!   with, for every disk of the `Hello`, `next_seq` = its durable seq + 1: everything below is
//!   durable downstream.
//! - On `Welcome` the sender releases every record below `next_seq` (an event tells the owner it
//!   may free them) and sends again, from `next_seq`, every record it holds. Records sent on
//!   the previous connection and not acknowledged are simply sent again.
//! - If the receiver needs a record the sender already released (`next_seq` ≤ the sender's
//!   released seq: the downstream lost durable data), the sender reports
//!   [`Violation::ResumeGap`]: the disk needs a resync by hash compare. If the receiver is ahead
//!   of what the owner has pushed, the records it already has are released as they are pushed.
//! - The receiver ignores a record whose seq it has already received (on this connection or an
//!   earlier one: a resend after a reconnect), so the owner sees each record once. A record
//!   after a gap is a protocol error.
//! - The receiver's owner persists each record and calls `mark_durable(disk, seq)`; the receiver
//!   then sends `Ack { disk, durable_seq }` — at most one pending per disk, carrying the highest
//!   durable seq. Acknowledgement therefore always means durable downstream, never merely received.
//! - A restarted receiver is rebuilt from its durable seqs ([`Receiver::new`]); a restarted
//!   sender from the records its log still holds ([`Sender::new`] with the seq of the oldest,
//!   then `push` of each). Nothing acknowledged is lost and nothing durable is re-sent beyond
//!   the window of what was in flight.
//!
//! # Backpressure
//!
//! The sender counts the encoded bytes of `Write` and `Tag` frames sent and not yet acknowledged
//! and sends the next record only while that stays within [`SenderConfig::window_bytes`]. A single
//! record larger than the window is sent alone, when nothing else is in flight.
//!
//! # Keepalive
//!
//! The sender pings when it has received nothing for [`SenderConfig::keepalive_interval`];
//! nothing at all received (no `Welcome` after `Hello`) within
//! [`SenderConfig::keepalive_timeout`] of the ping raises `ConnectionDead`: any frame answers a
//! ping, since its `Pong` may queue behind data the peer has yet to read. The receiver answers pings, and raises `ConnectionDead` when it has received
//! nothing for [`ReceiverConfig::idle_timeout`] (longer than the sender's interval).
//!
//! # Resync
//!
//! `HashRequest` and `Hashes` are carried as they are: the sender's owner asks with
//! [`Sender::request_hashes`] and gets [`SenderEvent::Hashes`]; the receiver's owner gets
//! [`ReceiverEvent::HashRequest`] and answers with [`Receiver::send_hashes`]. The blocks that
//! differ are then sent as ordinary records.

mod receiver;
mod sender;

pub use receiver::{Receiver, ReceiverConfig, ReceiverEvent};
pub use sender::{Sender, SenderConfig, SenderEvent};

use crate::frame::{DiskId, Frame, FrameType, Seq, Tag, WireError, Write, error_code};

/// One record of a disk's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// An extent changes: data, compressed data, zeroes or trim.
    Write(Write),
    /// A consistency tag (recovery point).
    Tag(Tag),
}

impl Record {
    /// The record's disk.
    pub fn disk(&self) -> DiskId {
        match self {
            Self::Write(w) => w.disk,
            Self::Tag(t) => t.disk,
        }
    }

    /// The record's sequence number.
    pub fn seq(&self) -> Seq {
        match self {
            Self::Write(w) => w.seq,
            Self::Tag(t) => t.seq,
        }
    }

    /// The frame that carries the record (data is shared, not copied).
    pub fn to_frame(&self) -> Frame {
        match self {
            Self::Write(w) => Frame::Write(w.clone()),
            Self::Tag(t) => Frame::Tag(*t),
        }
    }

    /// Bytes of the record's frame on the wire; what it counts against the window.
    pub fn wire_len(&self) -> u64 {
        self.to_frame().encoded_len() as u64
    }
}

impl From<Record> for Frame {
    fn from(r: Record) -> Self {
        match r {
            Record::Write(w) => Frame::Write(w),
            Record::Tag(t) => Frame::Tag(t),
        }
    }
}

/// The peer broke the protocol; the connection ends with an `Error` frame naming this.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A frame that is not allowed in the current state.
    #[error("unexpected {frame_type} frame {state}")]
    UnexpectedFrame {
        /// The frame's type.
        frame_type: FrameType,
        /// The state it arrived in.
        state: &'static str,
    },
    /// A frame names a disk that was not announced.
    #[error("{frame_type} frame names disk {disk}, which the Hello did not announce")]
    UnknownDisk {
        /// The frame's type.
        frame_type: FrameType,
        /// The disk.
        disk: DiskId,
    },
    /// A record arrived after a gap.
    #[error("disk {disk}: record {got} arrived while {expected} was expected next")]
    SequenceGap {
        /// The disk.
        disk: DiskId,
        /// The seq expected next.
        expected: Seq,
        /// The seq received.
        got: Seq,
    },
    /// An ack for records that were never pushed.
    #[error("disk {disk}: ack of seq {acked}, but the stream ends at seq {last}")]
    AckBeyondStream {
        /// The disk.
        disk: DiskId,
        /// The acknowledged seq.
        acked: Seq,
        /// The last seq pushed.
        last: Seq,
    },
    /// The Welcome does not give a resume point for a disk of the Hello.
    #[error("the Welcome gives no resume point for disk {disk}")]
    MissingResume {
        /// The disk.
        disk: DiskId,
    },
    /// The receiver needs records the sender has released.
    #[error(
        "disk {disk}: the receiver resumes at seq {next_seq}, but records up to {released} were \
         released after being acknowledged; the disk needs a resync"
    )]
    ResumeGap {
        /// The disk.
        disk: DiskId,
        /// Where the receiver resumes.
        next_seq: Seq,
        /// The highest seq released by the sender.
        released: Seq,
    },
    /// The peer's `Hello` names a protocol version this side does not speak.
    #[error("the peer speaks protocol version {got}, this side speaks {supported}")]
    UnsupportedVersion {
        /// The peer's version.
        got: u16,
        /// This side's version.
        supported: u16,
    },
}

impl Violation {
    /// The `Error` frame code for this violation.
    pub fn code(&self) -> u16 {
        match self {
            Self::SequenceGap { .. } => error_code::SEQUENCE_GAP,
            Self::ResumeGap { .. } => error_code::RESUME_GAP,
            Self::UnsupportedVersion { .. } => error_code::UNSUPPORTED_VERSION,
            _ => error_code::PROTOCOL,
        }
    }
}

/// The owner called a state machine in a way the protocol does not allow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The disk is not one of this stream's.
    #[error("disk {0} is not part of this stream")]
    UnknownDisk(DiskId),
    /// A record was pushed out of sequence.
    #[error("disk {disk}: record {got} pushed while {expected} was expected next")]
    OutOfOrder {
        /// The disk.
        disk: DiskId,
        /// The seq expected.
        expected: Seq,
        /// The seq pushed.
        got: Seq,
    },
    /// A record or frame breaks a wire limit or rule.
    #[error("cannot be sent: {0}")]
    Invalid(#[from] WireError),
    /// `mark_durable` named a record not yet received.
    #[error("disk {disk}: seq {seq} marked durable, but only up to {received} was received")]
    NotReceived {
        /// The disk.
        disk: DiskId,
        /// The seq given.
        seq: Seq,
        /// The highest seq received.
        received: Seq,
    },
    /// No connection to send on.
    #[error("not connected")]
    NotConnected,
    /// A sender's first seq must be at least 1.
    #[error("disk {0}: sequence numbers start at 1")]
    ZeroSeq(DiskId),
}
