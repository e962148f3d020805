//! Haven's replication wire protocol, shared by the agent and the gateway.
//!
//! One protocol carries protected disks' write streams on both hops: agent → process server and
//! process server → master target. It runs inside a mutual-TLS QUIC stream that the caller owns.
//!
//! Sans-IO, in the style of `quinn-proto`: nothing here opens a socket, reads a file or a clock.
//! The caller feeds received bytes to a [`Decoder`], hands frames to a state machine with
//! `handle(now, frame)`, and sends what `poll_transmit(now)` returns; it acts on
//! `poll_event()` and calls `handle_timeout(now)` at `poll_timeout()`. `now` is an
//! [`std::time::Instant`] the caller passes in, so tests run on virtual time.
//!
//! - [`frame`]: frame types, limits and the incremental codec (layout table there).
//! - [`stream`]: [`Sender`] and [`Receiver`], the replication state machines (resume rules there).
//!
//! Architecture invariant: this crate depends on no async runtime and does no I/O.

pub mod crc32c;
pub mod frame;
pub mod stream;

pub use frame::{
    Ack, Decoder, DiskId, DiskInfo, ErrorFrame, Frame, FrameType, HashRequest, Hashes, Hello,
    Payload, PeerId, Resume, Role, Seq, Tag, TagKind, Welcome, WireError, Write,
};
pub use stream::{
    Receiver, ReceiverConfig, ReceiverEvent, Record, Sender, SenderConfig, SenderEvent,
    StreamError, Violation,
};

/// Version of the replication protocol spoken on the wire.
pub const PROTOCOL_VERSION: u16 = 1;
