//! Frames and their incremental codec.
//!
//! # Frame layout
//!
//! Every frame is a fixed 12-byte header, a payload, and a 4-byte trailer. Integers are
//! little-endian.
//!
//! | offset | size | field          | meaning                                                        |
//! |-------:|-----:|----------------|----------------------------------------------------------------|
//! | 0      | 4    | magic          | `"HVNW"` ([`MAGIC`])                                           |
//! | 4      | 2    | version        | protocol version, [`PROTOCOL_VERSION`]; any other is refused   |
//! | 6      | 1    | frame type     | [`FrameType`] code                                             |
//! | 7      | 1    | flags          | [`flags`]; `Write` at most one of its three, `Hello` `TAKEOVER` |
//! | 8      | 4    | payload length | bytes of payload, at most [`FrameType::max_payload_len`]       |
//! | 12     | n    | payload        | per frame type, below                                          |
//! | 12 + n | 4    | CRC32C         | of header and payload (Castagnoli, as in iSCSI and ext4)       |
//!
//! Payloads (`u16`/`u32`/`u64` little-endian; `disk` is a [`DiskId`] `u32`, `seq` a [`Seq`] `u64`):
//!
//! | type | code | payload                                                                                        | bytes |
//! |------|-----:|------------------------------------------------------------------------------------------------|-------|
//! | `Hello`       | 1  | version u16, role u8, peer id \[16\], count u16, count × (disk u32, size u64, block size u32) | 21 + 16·count |
//! | `Welcome`     | 2  | count u16, count × (disk u32, next seq u64)                                            | 2 + 12·count |
//! | `Write`       | 3  | disk u32, seq u64, offset u64, then by flag: none → data (rest); `COMPRESSED` → raw len u32, zstd bytes (rest); `ZERO` / `TRIM` → len u64 | 20 + … |
//! | `Tag`         | 4  | disk u32, seq u64, point u64, kind u8 (1 crash, 2 app), source time ms u64             | 29 |
//! | `Ack`         | 5  | disk u32, durable seq u64                                                              | 12 |
//! | `HashRequest` | 6  | disk u32, offset u64, len u64, block size u32                                          | 24 |
//! | `Hashes`      | 7  | disk u32, offset u64, block size u32, count u32, count × 32-byte digest                | 20 + 32·count |
//! | `Error`       | 8  | code u16 ([`error_code`]), length u16, UTF-8 message                                   | 4 + length |
//! | `Ping`        | 9  | nonce u64                                                                              | 8 |
//! | `Pong`        | 10 | nonce u64 (the ping's)                                                                 | 8 |
//!
//! # Limits
//!
//! Checked by the decoder before it waits for or allocates anything they bound, and by
//! [`Frame::encode`] before it writes: data per `Write` ≤ [`MAX_DATA_LEN`] (32 MiB, raw or
//! compressed; the uncompressed length of a compressed payload too), disks per `Hello` /
//! `Welcome` ≤ [`MAX_DISKS`], message ≤ [`MAX_MESSAGE_LEN`] bytes, digests per `Hashes` ≤
//! [`MAX_HASHES`] (and a `HashRequest` may not ask for more), block sizes are powers of two in
//! [`MIN_BLOCK_SIZE`]`..=`[`MAX_BLOCK_SIZE`]. Extents never wrap past `u64::MAX`, and a write,
//! zero or trim is never empty. A frame is therefore at most 12 + 24 + 32 MiB + 4 bytes.
//!
//! # Decoding
//!
//! [`Decoder::push`] appends received bytes; [`Decoder::next`] returns the next whole frame,
//! `Ok(None)` when more bytes are needed, or a [`WireError`]. Any split of the stream gives the
//! same frames. An error is final: framing is lost, the connection must be closed (after sending
//! an `Error` frame if possible), and the decoder returns the same error from then on. `Write`
//! data is returned as a [`Bytes`] slice of the received buffer, without copying.
//!
//! Hashes are SHA-256 of each block of the range; the last block of a range that is not a
//! multiple of the block size is hashed as it is (short).

use std::fmt;

use bytes::{Bytes, BytesMut};

use crate::PROTOCOL_VERSION;
use crate::crc32c;

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"HVNW";
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 12;
/// Bytes of the trailer (CRC32C).
pub const TRAILER_LEN: usize = 4;
/// Most data bytes in one `Write`: raw, compressed, and the uncompressed length of compressed data.
pub const MAX_DATA_LEN: u32 = 32 << 20;
/// Most disks in one `Hello` or `Welcome`.
pub const MAX_DISKS: usize = 256;
/// Most bytes in an `Error` message.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Most digests in one `Hashes` frame (2 MiB of digests), and most blocks one `HashRequest` covers.
pub const MAX_HASHES: usize = 65536;
/// Smallest disk or hash block size.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest disk or hash block size.
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;
/// The largest frame on the wire, header and trailer included.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + WRITE_FIXED + 4 + MAX_DATA_LEN as usize + TRAILER_LEN;

/// Header flags. `Write` frames carry at most one of `COMPRESSED`, `ZERO`, `TRIM`; `Hello`
/// frames may carry `TAKEOVER`; no other frame carries any.
pub mod flags {
    /// The write's data is zstd-compressed; the payload carries the uncompressed length.
    pub const COMPRESSED: u8 = 0x01;
    /// The write is an extent of zeroes, carried as a length.
    pub const ZERO: u8 = 0x02;
    /// The write is a trim (discard) of an extent, carried as a length.
    pub const TRIM: u8 = 0x04;
    /// On a process server's `Hello`: it takes the agent's streams over from whichever process
    /// server forwarded them before (the agent was moved to it). The master target then
    /// refuses that agent's streams from any other process server ([`super::error_code::MOVED`]).
    pub const TAKEOVER: u8 = 0x01;
}

/// Codes carried by `Error` frames. Unknown codes are passed through as they are.
pub mod error_code {
    /// The peer broke the protocol (an unexpected frame, an unknown disk, an ack beyond the stream).
    pub const PROTOCOL: u16 = 1;
    /// The peer speaks a protocol version this side does not.
    pub const UNSUPPORTED_VERSION: u16 = 2;
    /// A frame could not be decoded (see the message).
    pub const MALFORMED: u16 = 3;
    /// A record arrived after a gap in the sequence.
    pub const SEQUENCE_GAP: u16 = 4;
    /// The receiver needs records the sender no longer holds: the disk needs a resync.
    pub const RESUME_GAP: u16 = 5;
    /// The receiving side failed (storage, shutdown); retry later.
    pub const INTERNAL: u16 = 6;
    /// The disk was failed over at the master target: its replication is stopped for good (until
    /// it is protected again). The sender must not retry.
    pub const FAILED_OVER: u16 = 7;
    /// The agent's streams are forwarded by another process server now (it was moved there):
    /// this one must drop what it caches for the agent and not retry.
    pub const MOVED: u16 = 8;
}

/// Identifies a protected disk within a connection's `Hello`; stable across connections.
pub type DiskId = u32;
/// Sequence number of a record within one disk's stream; starts at 1, 0 means "nothing yet".
pub type Seq = u64;
/// Identifies a peer (an enrolled agent or gateway).
pub type PeerId = [u8; 16];
/// A block digest (SHA-256).
pub type Digest = [u8; 32];

const HELLO_FIXED: usize = 2 + 1 + 16 + 2;
const DISK_INFO_LEN: usize = 16;
const RESUME_LEN: usize = 12;
const WRITE_FIXED: usize = 4 + 8 + 8;
const TAG_LEN: usize = 29;
const ACK_LEN: usize = 12;
const HASH_REQUEST_LEN: usize = 24;
const HASHES_FIXED: usize = 20;
const ERROR_FIXED: usize = 4;
const NONCE_LEN: usize = 8;

/// The type of a frame, the byte at header offset 6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// The connecting side introduces itself and its disks.
    Hello = 1,
    /// The accepting side answers with where each disk resumes.
    Welcome = 2,
    /// A record: data, compressed data, zeroes or trim for one extent.
    Write = 3,
    /// A record: a consistency tag (recovery point).
    Tag = 4,
    /// Records up to a sequence number are durable downstream.
    Ack = 5,
    /// Resync: asks for block digests of a range.
    HashRequest = 6,
    /// Resync: block digests of a range.
    Hashes = 7,
    /// The peer reports an error and will close.
    Error = 8,
    /// Keepalive probe.
    Ping = 9,
    /// Keepalive answer.
    Pong = 10,
}

impl FrameType {
    /// The frame type of a header byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Write,
            4 => Self::Tag,
            5 => Self::Ack,
            6 => Self::HashRequest,
            7 => Self::Hashes,
            8 => Self::Error,
            9 => Self::Ping,
            10 => Self::Pong,
            _ => return None,
        })
    }

    /// The largest payload a frame of this type may have.
    pub const fn max_payload_len(self) -> u32 {
        (match self {
            Self::Hello => HELLO_FIXED + DISK_INFO_LEN * MAX_DISKS,
            Self::Welcome => 2 + RESUME_LEN * MAX_DISKS,
            Self::Write => WRITE_FIXED + 4 + MAX_DATA_LEN as usize,
            Self::Tag => TAG_LEN,
            Self::Ack => ACK_LEN,
            Self::HashRequest => HASH_REQUEST_LEN,
            Self::Hashes => HASHES_FIXED + 32 * MAX_HASHES,
            Self::Error => ERROR_FIXED + MAX_MESSAGE_LEN,
            Self::Ping | Self::Pong => NONCE_LEN,
        }) as u32
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why bytes could not be decoded, or a frame could not be encoded.
///
/// Offsets are within the frame's payload (the payload starts 12 bytes into the frame); see
/// [`Decoder::position`] for where the frame starts in the stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame does not start with `"HVNW"`.
    #[error(
        "bad magic {found:02x?} at the start of a frame (expected \"HVNW\"): not a Haven replication stream, or framing was lost"
    )]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The header names a protocol version this side does not speak.
    #[error("frame header has protocol version {got}, this side speaks version {supported}")]
    UnsupportedVersion {
        /// The version in the header.
        got: u16,
        /// The version this side speaks.
        supported: u16,
    },
    /// The header's frame type byte is not a known type.
    #[error("unknown frame type {0} in the frame header")]
    UnknownFrameType(u8),
    /// The payload is longer than the frame type allows.
    #[error("{frame_type} frame: payload length {len} exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The frame's type.
        frame_type: FrameType,
        /// The payload length in the header (or of the frame being encoded).
        len: u64,
        /// The limit for this frame type.
        max: u32,
    },
    /// The CRC32C of header and payload does not match the trailer.
    #[error(
        "{frame_type} frame: CRC32C mismatch (trailer {found:#010x}, computed {expected:#010x}): the frame was damaged in transit"
    )]
    BadChecksum {
        /// The frame's type.
        frame_type: FrameType,
        /// The checksum computed over header and payload.
        expected: u32,
        /// The checksum in the trailer.
        found: u32,
    },
    /// The header sets flags this frame type does not allow.
    #[error(
        "{frame_type} frame: flags {flags:#04x} not allowed (only Write may set one of COMPRESSED, ZERO, TRIM, and Hello TAKEOVER)"
    )]
    BadFlags {
        /// The frame's type.
        frame_type: FrameType,
        /// The flags byte.
        flags: u8,
    },
    /// The payload ends inside a field.
    #[error("{frame_type} frame: payload ends inside field `{field}` at payload offset {offset}")]
    Truncated {
        /// The frame's type.
        frame_type: FrameType,
        /// The field being read.
        field: &'static str,
        /// Payload offset of the field.
        offset: usize,
    },
    /// A count or length exceeds its limit.
    #[error("{frame_type} frame: `{field}` is {value}, more than the limit of {max}")]
    LimitExceeded {
        /// The frame's type.
        frame_type: FrameType,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// A field has a value the protocol does not allow.
    #[error("{frame_type} frame: field `{field}` at payload offset {offset}: {what}")]
    Malformed {
        /// The frame's type.
        frame_type: FrameType,
        /// The field.
        field: &'static str,
        /// Payload offset of the field.
        offset: usize,
        /// What is wrong with it.
        what: &'static str,
    },
}

/// Who sent a `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// The mobility agent on a protected machine.
    Agent = 1,
    /// A process server forwarding to a master target.
    ProcessServer = 2,
}

/// A protected disk, as announced in a `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DiskInfo {
    /// The disk's id on this connection.
    pub id: DiskId,
    /// Size in bytes.
    pub size: u64,
    /// Logical block size in bytes (a power of two, 512..=16 MiB).
    pub block_size: u32,
}

/// `Hello`: the connecting side introduces itself and the disks it will stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The protocol version the sender speaks.
    pub version: u16,
    /// What the sender is.
    pub role: Role,
    /// The sender's identity (its enrolment id).
    pub peer_id: PeerId,
    /// The disks the sender streams on this connection (distinct ids, at most [`MAX_DISKS`]).
    pub disks: Vec<DiskInfo>,
    /// A process server taking the agent over ([`flags::TAKEOVER`]).
    pub takeover: bool,
}

/// One disk's resume point in a `Welcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Resume {
    /// The disk.
    pub disk: DiskId,
    /// The first sequence number the receiver needs: everything below is durable downstream.
    pub next_seq: Seq,
}

/// `Welcome`: the accepting side's answer to `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Resume point of every disk of the `Hello` (distinct disks, at most [`MAX_DISKS`]).
    pub resume: Vec<Resume>,
}

/// What a `Write` carries for its extent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// The bytes themselves (1..=[`MAX_DATA_LEN`]).
    Data(Bytes),
    /// zstd-compressed bytes (1..=[`MAX_DATA_LEN`]) of `raw_len` (1..=[`MAX_DATA_LEN`]) bytes.
    Compressed {
        /// Length of the data once decompressed.
        raw_len: u32,
        /// The compressed bytes.
        bytes: Bytes,
    },
    /// `len` bytes of zeroes.
    Zero {
        /// Length of the extent.
        len: u64,
    },
    /// The extent of `len` bytes is discarded.
    Trim {
        /// Length of the extent.
        len: u64,
    },
}

impl Payload {
    /// Bytes of the disk the payload covers (the uncompressed length for compressed data).
    pub fn extent_len(&self) -> u64 {
        match self {
            Self::Data(b) => b.len() as u64,
            Self::Compressed { raw_len, .. } => u64::from(*raw_len),
            Self::Zero { len } | Self::Trim { len } => *len,
        }
    }

    fn flags(&self) -> u8 {
        match self {
            Self::Data(_) => 0,
            Self::Compressed { .. } => flags::COMPRESSED,
            Self::Zero { .. } => flags::ZERO,
            Self::Trim { .. } => flags::TRIM,
        }
    }
}

/// `Write`: one record of a disk's stream changing an extent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The disk.
    pub disk: DiskId,
    /// The record's sequence number in the disk's stream.
    pub seq: Seq,
    /// Byte offset of the extent on the disk.
    pub offset: u64,
    /// What the extent becomes.
    pub data: Payload,
}

/// The kind of a consistency tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TagKind {
    /// Crash-consistent: the disks as a power cut would leave them.
    Crash = 1,
    /// Application-consistent: taken with the workload quiesced.
    App = 2,
}

/// `Tag`: one record of a disk's stream marking a recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tag {
    /// The disk.
    pub disk: DiskId,
    /// The record's sequence number in the disk's stream.
    pub seq: Seq,
    /// The recovery point's id; the same on every disk (and machine) the point spans.
    pub point: u64,
    /// Crash- or application-consistent.
    pub kind: TagKind,
    /// When the point was taken on the source, milliseconds since the Unix epoch.
    pub source_time_ms: u64,
}

/// `Ack`: every record of `disk` up to `durable_seq` is durable downstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ack {
    /// The disk.
    pub disk: DiskId,
    /// The highest sequence number made durable (all below are too).
    pub durable_seq: Seq,
}

/// `HashRequest`: resync asks the replica's digests of `len` bytes from `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HashRequest {
    /// The disk.
    pub disk: DiskId,
    /// Start of the range in bytes.
    pub offset: u64,
    /// Length of the range in bytes (≥ 1, at most [`MAX_HASHES`] blocks).
    pub len: u64,
    /// Block size of the digests (a power of two, 512..=16 MiB).
    pub block_size: u32,
}

/// `Hashes`: the digests of consecutive blocks from `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hashes {
    /// The disk.
    pub disk: DiskId,
    /// Start of the first block in bytes.
    pub offset: u64,
    /// Block size (a power of two, 512..=16 MiB).
    pub block_size: u32,
    /// SHA-256 of each block, at most [`MAX_HASHES`].
    pub hashes: Vec<Digest>,
}

/// `Error`: the peer reports an error and closes the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorFrame {
    /// One of [`error_code`] (or a newer code).
    pub code: u16,
    /// Human-readable detail, at most [`MAX_MESSAGE_LEN`] bytes of UTF-8.
    pub message: String,
}

impl ErrorFrame {
    /// An error frame, cutting `message` to [`MAX_MESSAGE_LEN`] bytes on a character boundary.
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE_LEN {
            let mut end = MAX_MESSAGE_LEN;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Self { code, message }
    }

    /// The frame to send before closing a connection whose incoming bytes failed to decode.
    pub fn from_wire_error(err: &WireError) -> Self {
        let code = match err {
            WireError::UnsupportedVersion { .. } => error_code::UNSUPPORTED_VERSION,
            _ => error_code::MALFORMED,
        };
        Self::new(code, err.to_string())
    }
}

/// One frame of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Write`].
    Write(Write),
    /// See [`Tag`].
    Tag(Tag),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`HashRequest`].
    HashRequest(HashRequest),
    /// See [`Hashes`].
    Hashes(Hashes),
    /// See [`ErrorFrame`].
    Error(ErrorFrame),
    /// Keepalive probe; the peer answers with a `Pong` of the same nonce.
    Ping {
        /// Chosen by the pinging side.
        nonce: u64,
    },
    /// Keepalive answer.
    Pong {
        /// The nonce of the `Ping` answered.
        nonce: u64,
    },
}

fn block_size_ok(bs: u32) -> bool {
    bs.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs)
}

const BLOCK_SIZE_WHAT: &str = "not a power of two in 512..=16777216";

impl Frame {
    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Hello(_) => FrameType::Hello,
            Self::Welcome(_) => FrameType::Welcome,
            Self::Write(_) => FrameType::Write,
            Self::Tag(_) => FrameType::Tag,
            Self::Ack(_) => FrameType::Ack,
            Self::HashRequest(_) => FrameType::HashRequest,
            Self::Hashes(_) => FrameType::Hashes,
            Self::Error(_) => FrameType::Error,
            Self::Ping { .. } => FrameType::Ping,
            Self::Pong { .. } => FrameType::Pong,
        }
    }

    fn flags(&self) -> u8 {
        match self {
            Self::Write(w) => w.data.flags(),
            Self::Hello(h) if h.takeover => flags::TAKEOVER,
            _ => 0,
        }
    }

    /// Length of the payload once encoded.
    pub fn payload_len(&self) -> usize {
        match self {
            Self::Hello(h) => HELLO_FIXED + DISK_INFO_LEN * h.disks.len(),
            Self::Welcome(w) => 2 + RESUME_LEN * w.resume.len(),
            Self::Write(w) => {
                WRITE_FIXED
                    + match &w.data {
                        Payload::Data(b) => b.len(),
                        Payload::Compressed { bytes, .. } => 4 + bytes.len(),
                        Payload::Zero { .. } | Payload::Trim { .. } => 8,
                    }
            }
            Self::Tag(_) => TAG_LEN,
            Self::Ack(_) => ACK_LEN,
            Self::HashRequest(_) => HASH_REQUEST_LEN,
            Self::Hashes(h) => HASHES_FIXED + 32 * h.hashes.len(),
            Self::Error(e) => ERROR_FIXED + e.message.len(),
            Self::Ping { .. } | Self::Pong { .. } => NONCE_LEN,
        }
    }

    /// Length of the whole frame once encoded: header, payload and trailer.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len() + TRAILER_LEN
    }

    /// Checks every limit and rule the decoder checks, so what encodes also decodes.
    pub fn validate(&self) -> Result<(), WireError> {
        let ft = self.frame_type();
        let len = self.payload_len() as u64;
        if len > u64::from(ft.max_payload_len()) {
            return Err(WireError::FrameTooLarge {
                frame_type: ft,
                len,
                max: ft.max_payload_len(),
            });
        }
        let malformed = |field, offset, what| WireError::Malformed {
            frame_type: ft,
            field,
            offset,
            what,
        };
        let limit = |field, value: usize, max: usize| WireError::LimitExceeded {
            frame_type: ft,
            field,
            value: value as u64,
            max: max as u64,
        };
        match self {
            Self::Hello(h) => {
                if h.takeover && h.role != Role::ProcessServer {
                    return Err(malformed(
                        "role",
                        2,
                        "only a process server takes an agent over",
                    ));
                }
                if h.disks.len() > MAX_DISKS {
                    return Err(limit("disk count", h.disks.len(), MAX_DISKS));
                }
                for (i, d) in h.disks.iter().enumerate() {
                    let at = HELLO_FIXED + DISK_INFO_LEN * i;
                    if !block_size_ok(d.block_size) {
                        return Err(malformed("block_size", at + 12, BLOCK_SIZE_WHAT));
                    }
                    if h.disks[..i].iter().any(|e| e.id == d.id) {
                        return Err(malformed("disk", at, "the same disk is listed twice"));
                    }
                }
            }
            Self::Welcome(w) => {
                if w.resume.len() > MAX_DISKS {
                    return Err(limit("disk count", w.resume.len(), MAX_DISKS));
                }
                for (i, r) in w.resume.iter().enumerate() {
                    if w.resume[..i].iter().any(|e| e.disk == r.disk) {
                        return Err(malformed(
                            "disk",
                            2 + RESUME_LEN * i,
                            "the same disk is listed twice",
                        ));
                    }
                }
            }
            Self::Write(w) => {
                const MAX: usize = MAX_DATA_LEN as usize;
                match &w.data {
                    Payload::Data(b) => {
                        if b.is_empty() {
                            return Err(malformed("data", WRITE_FIXED, "empty write"));
                        }
                        if b.len() > MAX {
                            return Err(limit("data length", b.len(), MAX));
                        }
                    }
                    Payload::Compressed { raw_len, bytes } => {
                        if *raw_len == 0 {
                            return Err(malformed("raw_len", WRITE_FIXED, "empty write"));
                        }
                        if *raw_len > MAX_DATA_LEN {
                            return Err(limit("raw_len", *raw_len as usize, MAX));
                        }
                        if bytes.is_empty() {
                            return Err(malformed("data", WRITE_FIXED + 4, "no compressed bytes"));
                        }
                        if bytes.len() > MAX {
                            return Err(limit("compressed length", bytes.len(), MAX));
                        }
                    }
                    Payload::Zero { len } | Payload::Trim { len } => {
                        if *len == 0 {
                            return Err(malformed("len", WRITE_FIXED, "empty extent"));
                        }
                    }
                }
                if w.offset.checked_add(w.data.extent_len()).is_none() {
                    return Err(malformed("offset", 12, "extent ends past 2^64"));
                }
            }
            Self::HashRequest(r) => {
                if !block_size_ok(r.block_size) {
                    return Err(malformed("block_size", 20, BLOCK_SIZE_WHAT));
                }
                if r.len == 0 {
                    return Err(malformed("len", 12, "empty range"));
                }
                let blocks = r.len.div_ceil(u64::from(r.block_size));
                if blocks > MAX_HASHES as u64 {
                    return Err(WireError::LimitExceeded {
                        frame_type: ft,
                        field: "blocks",
                        value: blocks,
                        max: MAX_HASHES as u64,
                    });
                }
                if r.offset.checked_add(r.len).is_none() {
                    return Err(malformed("offset", 4, "range ends past 2^64"));
                }
            }
            Self::Hashes(h) => {
                if !block_size_ok(h.block_size) {
                    return Err(malformed("block_size", 12, BLOCK_SIZE_WHAT));
                }
                if h.hashes.len() > MAX_HASHES {
                    return Err(limit("hash count", h.hashes.len(), MAX_HASHES));
                }
                let span = h.hashes.len() as u64 * u64::from(h.block_size);
                if h.offset.checked_add(span).is_none() {
                    return Err(malformed("offset", 4, "range ends past 2^64"));
                }
            }
            Self::Error(e) => {
                if e.message.len() > MAX_MESSAGE_LEN {
                    return Err(limit("message length", e.message.len(), MAX_MESSAGE_LEN));
                }
            }
            Self::Tag(_) | Self::Ack(_) | Self::Ping { .. } | Self::Pong { .. } => {}
        }
        Ok(())
    }

    /// Appends the encoded frame to `out`. A frame that breaks a limit or rule is refused with
    /// the error the decoder would give, and `out` is left as it was.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        if let Some((data, trailer)) = self.encode_split(out)? {
            out.extend_from_slice(&data);
            out.extend_from_slice(&trailer);
        }
        Ok(())
    }

    /// Encodes the frame without copying a `Write`'s data: for a `Write` carrying bytes, appends
    /// everything before the data to `out` and returns the data (shared, not copied) and the
    /// 4-byte trailer, which follow it on the wire in that order. For any other frame appends the
    /// whole frame and returns `None`. Refused like [`Frame::encode`].
    pub fn encode_split(&self, out: &mut Vec<u8>) -> Result<Option<(Bytes, [u8; 4])>, WireError> {
        self.validate()?;
        let start = out.len();
        let data = match self {
            Self::Write(Write {
                data: Payload::Data(b) | Payload::Compressed { bytes: b, .. },
                ..
            }) => Some(b.clone()),
            _ => None,
        };
        out.reserve(self.encoded_len() - data.as_ref().map_or(0, Bytes::len));
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.push(self.frame_type() as u8);
        out.push(self.flags());
        out.extend_from_slice(&(self.payload_len() as u32).to_le_bytes());
        match self {
            Self::Hello(h) => {
                out.extend_from_slice(&h.version.to_le_bytes());
                out.push(h.role as u8);
                out.extend_from_slice(&h.peer_id);
                out.extend_from_slice(&(h.disks.len() as u16).to_le_bytes());
                for d in &h.disks {
                    out.extend_from_slice(&d.id.to_le_bytes());
                    out.extend_from_slice(&d.size.to_le_bytes());
                    out.extend_from_slice(&d.block_size.to_le_bytes());
                }
            }
            Self::Welcome(w) => {
                out.extend_from_slice(&(w.resume.len() as u16).to_le_bytes());
                for r in &w.resume {
                    out.extend_from_slice(&r.disk.to_le_bytes());
                    out.extend_from_slice(&r.next_seq.to_le_bytes());
                }
            }
            Self::Write(w) => {
                out.extend_from_slice(&w.disk.to_le_bytes());
                out.extend_from_slice(&w.seq.to_le_bytes());
                out.extend_from_slice(&w.offset.to_le_bytes());
                match &w.data {
                    // The data follows what `out` holds: see below.
                    Payload::Data(_) => {}
                    Payload::Compressed { raw_len, .. } => {
                        out.extend_from_slice(&raw_len.to_le_bytes());
                    }
                    Payload::Zero { len } | Payload::Trim { len } => {
                        out.extend_from_slice(&len.to_le_bytes())
                    }
                }
            }
            Self::Tag(t) => {
                out.extend_from_slice(&t.disk.to_le_bytes());
                out.extend_from_slice(&t.seq.to_le_bytes());
                out.extend_from_slice(&t.point.to_le_bytes());
                out.push(t.kind as u8);
                out.extend_from_slice(&t.source_time_ms.to_le_bytes());
            }
            Self::Ack(a) => {
                out.extend_from_slice(&a.disk.to_le_bytes());
                out.extend_from_slice(&a.durable_seq.to_le_bytes());
            }
            Self::HashRequest(r) => {
                out.extend_from_slice(&r.disk.to_le_bytes());
                out.extend_from_slice(&r.offset.to_le_bytes());
                out.extend_from_slice(&r.len.to_le_bytes());
                out.extend_from_slice(&r.block_size.to_le_bytes());
            }
            Self::Hashes(h) => {
                out.extend_from_slice(&h.disk.to_le_bytes());
                out.extend_from_slice(&h.offset.to_le_bytes());
                out.extend_from_slice(&h.block_size.to_le_bytes());
                out.extend_from_slice(&(h.hashes.len() as u32).to_le_bytes());
                for d in &h.hashes {
                    out.extend_from_slice(d);
                }
            }
            Self::Error(e) => {
                out.extend_from_slice(&e.code.to_le_bytes());
                out.extend_from_slice(&(e.message.len() as u16).to_le_bytes());
                out.extend_from_slice(e.message.as_bytes());
            }
            Self::Ping { nonce } | Self::Pong { nonce } => {
                out.extend_from_slice(&nonce.to_le_bytes())
            }
        }
        let crc = crc32c::crc32c(&out[start..]);
        if let Some(data) = data {
            let crc = crc32c::update(crc, &data);
            return Ok(Some((data, crc.to_le_bytes())));
        }
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len() - start, self.encoded_len());
        Ok(None)
    }

    /// The encoded frame in a new buffer.
    pub fn to_vec(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }
}

/// Reads fields of one payload, naming the field and offset in errors.
struct Reader<'a> {
    frame_type: FrameType,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() - self.pos < n {
            return Err(WireError::Truncated {
                frame_type: self.frame_type,
                field,
                offset: self.pos,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        self.array(field).map(u16::from_le_bytes)
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.array(field).map(u32::from_le_bytes)
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.array(field).map(u64::from_le_bytes)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn malformed(&self, field: &'static str, offset: usize, what: &'static str) -> WireError {
        WireError::Malformed {
            frame_type: self.frame_type,
            field,
            offset,
            what,
        }
    }
    fn limit(&self, field: &'static str, value: u64, max: usize) -> WireError {
        WireError::LimitExceeded {
            frame_type: self.frame_type,
            field,
            value,
            max: max as u64,
        }
    }
    fn end(&self) -> Result<(), WireError> {
        if self.remaining() != 0 {
            return Err(self.malformed("end", self.pos, "trailing bytes after the last field"));
        }
        Ok(())
    }
}

/// Parses a checked frame's payload. `payload` is a slice of the received bytes so that write
/// data can be returned without copying.
fn parse_payload(frame_type: FrameType, flags: u8, payload: Bytes) -> Result<Frame, WireError> {
    let mut r = Reader {
        frame_type,
        buf: &payload,
        pos: 0,
    };
    let frame = match frame_type {
        FrameType::Hello => {
            let version = r.u16("version")?;
            let at = r.pos;
            let role = match r.u8("role")? {
                1 => Role::Agent,
                2 => Role::ProcessServer,
                _ => {
                    return Err(r.malformed(
                        "role",
                        at,
                        "unknown role (1 agent, 2 process server)",
                    ));
                }
            };
            let peer_id = r.array("peer_id")?;
            let count = usize::from(r.u16("disk count")?);
            if count > MAX_DISKS {
                return Err(r.limit("disk count", count as u64, MAX_DISKS));
            }
            let mut disks = Vec::with_capacity(count);
            for _ in 0..count {
                disks.push(DiskInfo {
                    id: r.u32("disk")?,
                    size: r.u64("size")?,
                    block_size: r.u32("block_size")?,
                });
            }
            r.end()?;
            Frame::Hello(Hello {
                version,
                role,
                peer_id,
                disks,
                takeover: flags == flags::TAKEOVER,
            })
        }
        FrameType::Welcome => {
            let count = usize::from(r.u16("disk count")?);
            if count > MAX_DISKS {
                return Err(r.limit("disk count", count as u64, MAX_DISKS));
            }
            let mut resume = Vec::with_capacity(count);
            for _ in 0..count {
                resume.push(Resume {
                    disk: r.u32("disk")?,
                    next_seq: r.u64("next_seq")?,
                });
            }
            r.end()?;
            Frame::Welcome(Welcome { resume })
        }
        FrameType::Write => {
            let disk = r.u32("disk")?;
            let seq = r.u64("seq")?;
            let offset = r.u64("offset")?;
            let data = match flags {
                0 => {
                    if r.remaining() > MAX_DATA_LEN as usize {
                        return Err(r.limit(
                            "data length",
                            r.remaining() as u64,
                            MAX_DATA_LEN as usize,
                        ));
                    }
                    Payload::Data(payload.slice(r.pos..))
                }
                flags::COMPRESSED => {
                    let raw_len = r.u32("raw_len")?;
                    if r.remaining() > MAX_DATA_LEN as usize {
                        return Err(r.limit(
                            "compressed length",
                            r.remaining() as u64,
                            MAX_DATA_LEN as usize,
                        ));
                    }
                    Payload::Compressed {
                        raw_len,
                        bytes: payload.slice(r.pos..),
                    }
                }
                flags::ZERO | flags::TRIM => {
                    let len = r.u64("len")?;
                    r.end()?;
                    if flags == flags::ZERO {
                        Payload::Zero { len }
                    } else {
                        Payload::Trim { len }
                    }
                }
                // The header check lets only the flags above through.
                _ => return Err(WireError::BadFlags { frame_type, flags }),
            };
            Frame::Write(Write {
                disk,
                seq,
                offset,
                data,
            })
        }
        FrameType::Tag => {
            let disk = r.u32("disk")?;
            let seq = r.u64("seq")?;
            let point = r.u64("point")?;
            let at = r.pos;
            let kind = match r.u8("kind")? {
                1 => TagKind::Crash,
                2 => TagKind::App,
                _ => return Err(r.malformed("kind", at, "unknown tag kind (1 crash, 2 app)")),
            };
            let source_time_ms = r.u64("source_time_ms")?;
            r.end()?;
            Frame::Tag(Tag {
                disk,
                seq,
                point,
                kind,
                source_time_ms,
            })
        }
        FrameType::Ack => {
            let a = Ack {
                disk: r.u32("disk")?,
                durable_seq: r.u64("durable_seq")?,
            };
            r.end()?;
            Frame::Ack(a)
        }
        FrameType::HashRequest => {
            let h = HashRequest {
                disk: r.u32("disk")?,
                offset: r.u64("offset")?,
                len: r.u64("len")?,
                block_size: r.u32("block_size")?,
            };
            r.end()?;
            Frame::HashRequest(h)
        }
        FrameType::Hashes => {
            let disk = r.u32("disk")?;
            let offset = r.u64("offset")?;
            let block_size = r.u32("block_size")?;
            let count = r.u32("hash count")? as usize;
            if count > MAX_HASHES {
                return Err(r.limit("hash count", count as u64, MAX_HASHES));
            }
            let bytes = r.take(count * 32, "hashes")?;
            r.end()?;
            let hashes = bytes
                .chunks_exact(32)
                .map(|c| {
                    let mut d = [0u8; 32];
                    d.copy_from_slice(c);
                    d
                })
                .collect();
            Frame::Hashes(Hashes {
                disk,
                offset,
                block_size,
                hashes,
            })
        }
        FrameType::Error => {
            let code = r.u16("code")?;
            let len = usize::from(r.u16("message length")?);
            if len > MAX_MESSAGE_LEN {
                return Err(r.limit("message length", len as u64, MAX_MESSAGE_LEN));
            }
            let at = r.pos;
            let bytes = r.take(len, "message")?;
            r.end()?;
            let message = std::str::from_utf8(bytes)
                .map_err(|_| r.malformed("message", at, "not UTF-8"))?
                .to_owned();
            Frame::Error(ErrorFrame { code, message })
        }
        FrameType::Ping | FrameType::Pong => {
            let nonce = r.u64("nonce")?;
            r.end()?;
            if frame_type == FrameType::Ping {
                Frame::Ping { nonce }
            } else {
                Frame::Pong { nonce }
            }
        }
    };
    frame.validate()?;
    Ok(frame)
}

/// Incremental frame decoder: push bytes as they arrive, take frames out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
    /// Stream offset of the first byte in `buf`.
    position: u64,
    failed: Option<WireError>,
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes. Take frames out with [`Decoder::next`] between pushes: the
    /// decoder buffers whatever it is given.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Stream offset of the next frame (or of the frame that failed to decode).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Checks a header and returns the frame type, flags and payload length.
    fn header(h: &[u8]) -> Result<(FrameType, u8, usize), WireError> {
        let magic = [h[0], h[1], h[2], h[3]];
        if magic != MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion {
                got: version,
                supported: PROTOCOL_VERSION,
            });
        }
        let frame_type = FrameType::from_u8(h[6]).ok_or(WireError::UnknownFrameType(h[6]))?;
        let flags = h[7];
        let flags_ok = match frame_type {
            FrameType::Write => matches!(flags, 0 | flags::COMPRESSED | flags::ZERO | flags::TRIM),
            FrameType::Hello => matches!(flags, 0 | flags::TAKEOVER),
            _ => flags == 0,
        };
        if !flags_ok {
            return Err(WireError::BadFlags { frame_type, flags });
        }
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if len > frame_type.max_payload_len() {
            return Err(WireError::FrameTooLarge {
                frame_type,
                len: u64::from(len),
                max: frame_type.max_payload_len(),
            });
        }
        Ok((frame_type, flags, len as usize))
    }

    /// The next whole frame; `Ok(None)` if more bytes are needed. After an error, returns that
    /// error again: the stream cannot be resynchronised.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Frame>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.next_inner() {
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = BytesMut::new();
                Err(e)
            }
            ok => ok,
        }
    }

    fn next_inner(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let (frame_type, flags, len) = Self::header(&self.buf[..HEADER_LEN])?;
        let total = HEADER_LEN + len + TRAILER_LEN;
        if self.buf.len() < total {
            // Nothing is reserved ahead: a header alone does not make the decoder allocate.
            return Ok(None);
        }
        let frame = self.buf.split_to(total).freeze();
        let body = HEADER_LEN + len;
        let expected = crc32c::crc32c(&frame[..body]);
        let found = u32::from_le_bytes([
            frame[body],
            frame[body + 1],
            frame[body + 2],
            frame[body + 3],
        ]);
        if expected != found {
            return Err(WireError::BadChecksum {
                frame_type,
                expected,
                found,
            });
        }
        let frame = parse_payload(frame_type, flags, frame.slice(HEADER_LEN..body))?;
        self.position += total as u64;
        Ok(Some(frame))
    }
}
