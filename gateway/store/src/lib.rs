//! Haven's durable storage, used by the gateway's roles: the process server's durable cache and
//! the master target's journal ([`journal::Journal`]), the at-rest key ([`key::Key`]) and small
//! durable state in redb ([`state::StateDb`]).
//!
//! # On-disk artefacts
//!
//! | artefact        | where                    | magic / version      | checksum | format |
//! |-----------------|--------------------------|----------------------|----------|--------|
//! | at-rest key     | one file, mode 0600      | `HVNATKEY`, 1        | CRC32C   | [`key`] |
//! | journal segment | `DIR/NNNNNNNNNNNN.hjnl`  | `HVNJOURN`, 1        | CRC32C of every header, AES-256-GCM of every body | [`journal`] |
//! | journal record  | inside a segment         | `HVNJ`, segment's    | CRC32C of the header, GCM tag over header and body | [`journal`] |
//! | state database  | one redb file            | redb's, schema 1     | redb's   | [`state`] |
//!
//! Every file is created atomically (temporary file, sync, rename or link, folder sync) or
//! updated inside a redb transaction. Damage is reported naming the file and offset, never
//! repaired by guessing; only a torn tail of a journal's last segment (a crash mid-append) is
//! truncated.
//!
//! Journal data is encrypted at rest with AES-256-GCM under a key per segment derived from the
//! at-rest key (HKDF-SHA256, the segment's random id as salt); nonces are a counter per segment
//! and a segment is never reopened for append. See [`journal`] for the rule in full.
//!
//! Architecture invariant: nothing here knows about sockets or plugins; every `StateDb` update
//! is one redb transaction; no journal record is returned without its checksum and
//! authentication tag verified.

pub mod error;
pub mod journal;
pub mod key;
pub mod payload;
mod record_store;
pub mod secrets;
pub mod state;
pub mod tokens;
mod util;

pub use error::{Result, StoreError};
pub use journal::{
    AppendInfo, Encoding, EntryKind, EntryMeta, Journal, JournalOptions, JournalReader,
    JournalStats,
};
pub use key::Key;
pub use payload::{decompress, is_all_zero};
pub use secrets::{SecretInfo, Secrets};
pub use state::{StateDb, StreamKey, StreamRecord};
