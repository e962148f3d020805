//! The replication policy as sans-IO state machines.
//!
//! What the agent's shipper and the process server's forwarder decide — what to send next,
//! resync and the mapping of log seqs onto stream seqs, the hash-pass gate, when to free what
//! was acknowledged, a downstream that lost what this side freed — lives here, in machines that
//! do no I/O and read no clock, in the style of [`haven_wire::Sender`]: inputs are methods
//! taking `now`, outputs are polled ([`Shipper::poll_action`], [`Forwarder::poll_action`],
//! `poll_transmit`, `poll_timeout`). Thin async drivers (`agent/src/replicate.rs`,
//! `gateway/engine/src/process_server.rs`) run the actions (read the log, free segments, write
//! state, compare blocks) and feed their results back. [`store`] is the contract of a disk's
//! record store (written apart from durable) that the real journal keeps, with an in-memory
//! store that injects faults. `tests/whole_path.rs` wires both machines, with the wire's
//! `Receiver`s and in-memory stores, into one simulation on virtual time.

pub mod forwarder;
pub mod shipper;
pub mod store;

pub use forwarder::{Forwarder, ForwarderAction, ForwarderConfig, ForwarderEnd, LaneStart};
pub use shipper::{Change, Resync, Shipper, ShipperAction, ShipperConfig, ShipperEnd, Start};
pub use store::{MemStore, RecordStore};
