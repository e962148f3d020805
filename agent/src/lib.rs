//! haven-agent: the write splitter of a protected machine's disks.
//!
//! - [`nbd`]: the NBD front end a workload (QEMU, qemu-io, any NBD client) writes through.
//! - [`splitter`]: the write path: every change lands on the backing disk and in the log.
//! - [`log`]: the durable change log, shipped downstream and released once acknowledged.
//! - [`replay`]: applies a log onto a raw image (operators and tests).
//! - [`identity`]: enrollment and the stored identity.
//! - [`state`]: `disk.state` and atomic writes.
//! - [`disk`]: each protected disk's shared state (splitter, `disk.state`, progress) and the
//!   machine's (its disks, the report).
//! - [`points`]: recovery points (a tag on every disk at one instant) on an interval and on
//!   request; the planned-failover stop.
//! - [`replicate`]: the shipper, the initial pass, resync by hash compare, reports.
//! - [`protect`]: `serve` and `protect`: opening the protected disks and running them.

pub mod cache;
pub mod director;
pub mod disk;
pub mod identity;
pub mod log;
pub mod nbd;
pub mod points;
pub mod protect;
pub mod quiesce;
pub mod replay;
pub mod replicate;
pub mod splitter;
pub mod state;
pub mod trail;
