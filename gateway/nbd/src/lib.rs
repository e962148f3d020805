//! haven-nbd: an NBD server over any block [`Backend`].
//!
//! The agent exports a protected disk through it (every write goes through its write
//! splitter); the master target exports recovery-point overlays through it (read-only or
//! writable).
//!
//! # What it speaks
//!
//! - Handshake: fixed newstyle with `NBD_OPT_GO`, `INFO`, `EXPORT_NAME`, `LIST`, `ABORT`;
//!   `STRUCTURED_REPLY` and `EXTENDED_HEADERS` (64-bit requests and replies);
//!   `LIST_META_CONTEXT` and `SET_META_CONTEXT` (`base:allocation` on every export, plus the
//!   backend's own contexts); `STARTTLS` when the server has [`Tls`], which it then requires.
//!   Any other option is answered `NBD_REP_ERR_UNSUP`. `NBD_INFO_BLOCK_SIZE` advertises
//!   [`proto::MIN_BLOCK`], [`proto::PREFERRED_BLOCK`] and [`proto::MAX_BLOCK`].
//! - Transmission: READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES (with `NO_HOLE` and
//!   `FAST_ZERO`), CACHE (a no-op) and BLOCK_STATUS (with `REQ_ONE`); FUA on all changes. With
//!   structured or extended replies a READ sends the extents the backend reports as zero as
//!   holes, without reading them, and honours `DF`. `NBD_FLAG_CAN_MULTI_CONN` when the backend
//!   says several connections are safe. A read-only export advertises `NBD_FLAG_READ_ONLY` and
//!   refuses changes with `EPERM`. Bad requests are answered with an error (`EINVAL`,
//!   `EOVERFLOW`, `EPERM`, `ENOTSUP` from a backend), not a disconnect (see `transmission`).
//! - Limits: at most [`DEFAULT_MAX_CONNECTIONS`] connections per export in transmission (or
//!   [`Server::with_max_connections`]); requests in flight bounded per connection (below).
//!
//! A thread per connection reads its requests and runs the quick ones (small writes); up to
//! [`WORKERS`] more run the ones that may block (reads, flushes, block status, FUA, large
//! writes) meanwhile, with at most [`MAX_IN_FLIGHT`] requests and [`MAX_IN_FLIGHT_BYTES`] of
//! payload queued; replies go out in the order requests finish, and a FLUSH waits for every
//! change received before it. Several connections may be open at once, all on the same
//! backend. [`Server::close`] stops the accept loops and shuts every open connection down.
//!
//! - [`proto`]: the wire format; no I/O.
//! - `handshake`: option haggling as a state machine; no I/O.
//! - `meta`, `reply`: metadata contexts and extents, reply framing and layout; no I/O.
//! - [`Server`]: accept loops, the handshake driven over blocking std sockets, TLS started.
//! - `tls`: the rustls session split into a reading and a writing half.
//! - `transmission`: one connection's requests: reader, workers, bounds, ordering, ending.
//! - [`Backend`], [`Extent`], [`Error`]: what is exported, and how a request fails.
//!
//! Std sockets and threads only: no async runtime.

mod backend;
mod handshake;
mod meta;
pub mod proto;
mod reply;
mod server;
mod tls;
mod transmission;

pub use backend::{Backend, Error, Extent};
pub use handshake::MAX_QUERIES;
pub use meta::{MAX_BACKEND_CALLS, MAX_CONTEXTS, MAX_EXTENTS, MAX_READ_CHUNKS};
/// The rustls this crate's [`Tls`] takes a configuration of.
pub use rustls;
pub use server::{DEFAULT_MAX_CONNECTIONS, Server, bind_unix};
pub use tls::Tls;
pub use transmission::{
    KEPT_BUFFER_BYTES, MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES, QUICK_BYTES, REPLY_BATCH, WORKERS,
};
