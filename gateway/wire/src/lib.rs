//! Haven's wire protocol, shared by the agent and the gateway.
//!
//! Sans-IO: frames, handshakes and the replication state machines take bytes and `now` and return
//! events or bytes to send; the agent and the gateway own the sockets and timers.
//!
//! Architecture invariant: this crate depends on no async runtime and does no I/O.

/// Version of the replication protocol spoken on the wire.
pub const PROTOCOL_VERSION: u16 = 1;
