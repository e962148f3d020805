//! The NBD front end: a workload (QEMU, qemu-io, qemu-img, any NBD client) uses the protected
//! disk through this server, so every write goes through the [`crate::splitter`].
//!
//! Fixed newstyle handshake with `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_LIST` and `NBD_OPT_ABORT` (any other option is answered `NBD_REP_ERR_UNSUP`); simple
//! replies; commands READ, WRITE, DISC, FLUSH, TRIM and WRITE_ZEROES, FUA on all changes. One
//! thread per connection; several connections may be open at once, all on the same splitter.

pub mod proto;
mod server;

pub use server::{Server, bind_unix};
