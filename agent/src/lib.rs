//! haven-agent: the write splitter of a protected disk.
//!
//! - [`nbd`]: the NBD front end a workload (QEMU, qemu-io, any NBD client) writes through.
//! - [`splitter`]: the write path: every change lands on the backing disk and in the log.
//! - [`log`]: the durable change log, shipped downstream and released once acknowledged.
//! - [`replay`]: applies a log onto a raw image (operators and tests).

pub mod log;
pub mod nbd;
pub mod replay;
pub mod splitter;
