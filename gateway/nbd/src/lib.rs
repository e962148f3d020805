//! haven-nbd: an NBD server over any block [`Backend`].
//!
//! The agent exports a protected disk through it (every write goes through its write
//! splitter); the master target exports recovery-point overlays through it (read-only or
//! writable).
//!
//! Fixed newstyle handshake with `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_LIST` and `NBD_OPT_ABORT` (any other option is answered `NBD_REP_ERR_UNSUP`); simple
//! replies; commands READ, WRITE, DISC, FLUSH, TRIM and WRITE_ZEROES, FUA on all changes. A
//! read-only export advertises `NBD_FLAG_READ_ONLY` and refuses changes with `EPERM`. A thread
//! per connection reads its requests and runs the quick ones (small writes); up to [`WORKERS`]
//! more run the ones that may block (reads, flushes, FUA, large writes) meanwhile, with at most
//! [`MAX_IN_FLIGHT`] requests and [`MAX_IN_FLIGHT_BYTES`] of payload queued; replies go out in
//! the order requests finish, and a FLUSH waits for every change received before it. Several
//! connections may be open at once, all on the same backend. [`Server::close`] stops the
//! accept loops and shuts every open connection down.
//!
//! - [`proto`]: the wire format; no I/O.
//! - [`Server`]: accept loops and handshake over blocking std sockets.
//! - `transmission`: one connection's requests: reader, workers, bounds, ordering, ending.
//! - [`Backend`], [`Error`]: what is exported, and how a request fails.
//!
//! Std sockets and threads only: no async runtime.

mod backend;
pub mod proto;
mod server;
mod transmission;

pub use backend::{Backend, Error};
pub use server::{Server, bind_unix};
pub use transmission::{
    KEPT_BUFFER_BYTES, MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES, QUICK_BYTES, REPLY_BATCH, WORKERS,
};
