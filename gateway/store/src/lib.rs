//! Haven's durable state: configuration, journal index and progress, in redb.
//!
//! Architecture invariant: every update is one redb transaction; nothing here knows about
//! sockets or plugins.
