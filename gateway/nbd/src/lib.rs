//! haven-nbd: an NBD server over any block [`Backend`].
//!
//! The agent exports a protected disk through it (every write goes through its write
//! splitter); the master target exports recovery-point overlays through it (read-only or
//! writable).
//!
//! Fixed newstyle handshake with `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_LIST` and `NBD_OPT_ABORT` (any other option is answered `NBD_REP_ERR_UNSUP`); simple
//! replies; commands READ, WRITE, DISC, FLUSH, TRIM and WRITE_ZEROES, FUA on all changes. A
//! read-only export advertises `NBD_FLAG_READ_ONLY` and refuses changes with `EPERM`. One
//! thread per connection; several connections may be open at once, all on the same backend.
//! [`Server::close`] stops the accept loops and shuts every open connection down.
//!
//! - [`proto`]: the wire format; no I/O.
//! - [`Server`]: accept loops, handshake and transmission over blocking std sockets.
//! - [`Backend`], [`Error`]: what is exported, and how a request fails.
//!
//! Std sockets and threads only: no async runtime.

mod backend;
pub mod proto;
mod server;

pub use backend::{Backend, Error};
pub use server::{Server, bind_unix};
