//! The disk state (`disk.state`). Atomic writes of this and the agent's other small files are
//! `haven_fsutil`'s.
//!
//! # `disk.state` (version 1)
//!
//! A header line, then a JSON body:
//!
//! ```text
//! HAVEN-DISK-STATE 1 <CRC32C of the body, 8 lowercase hex digits>\n
//! {"disk":1,"size":67108864,"block_size":512,"state":"protected","seq_base":0,"sync_offset":0,"log_seq":42,"remap":false}
//! ```
//!
//! `remap` may be absent (read as `false`): files written before it existed stay readable.
//!
//! Written by [`haven_fsutil::write_atomic`]: temporary file, fsync, rename, fsync of the
//! folder. A file whose magic, version or checksum does not match is refused with an error
//! naming it, never guessed at.

use std::fs::File;
use std::path::Path;

use haven_wire::crc32c::crc32c;
use serde::{Deserialize, Serialize};

/// First word of the header line.
pub const STATE_MAGIC: &str = "HAVEN-DISK-STATE";
/// Format version written and understood.
pub const STATE_VERSION: u32 = 1;
/// Digest block size of a seeded disk's comparison.
pub const SEEDED_COMPARE_BLOCK: u32 = 4096;
/// Largest `disk.state` read.
const MAX_STATE_LEN: u64 = 64 * 1024;

/// Where a protected disk's replication stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The first full pass over the disk is running (from `sync_offset`).
    InitialSync,
    /// Every change is in the change log and shipped from it.
    Protected,
    /// The change log was lost or overflowed, or the downstream lost records the agent had
    /// released: blocks are compared by hash with the replica and only differences are sent.
    Resyncing,
}

impl Phase {
    /// As reports carry it.
    pub fn report_state(self) -> haven_net::stream::DiskState {
        match self {
            Phase::InitialSync => haven_net::stream::DiskState::InitialSync,
            Phase::Protected => haven_net::stream::DiskState::Protected,
            Phase::Resyncing => haven_net::stream::DiskState::Resyncing,
        }
    }
}

/// The body of `disk.state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRecord {
    /// The disk's id in the replication stream (1: one disk per agent process).
    pub disk: u32,
    /// Size of the disk in bytes when protection started.
    pub size: u64,
    /// Logical block size announced downstream.
    pub block_size: u32,
    /// Where replication stands.
    pub state: Phase,
    /// Stream seq = change-log seq + `seq_base` (signed: a fresh log after a resync starts at 1
    /// wherever the downstream stands).
    pub seq_base: i64,
    /// Bytes of the disk the initial pass (or, resyncing, the hash pass) has appended to the
    /// log (durably); it resumes here.
    pub sync_offset: u64,
    /// A log seq known durable when this was written: a log found holding less was lost.
    pub log_seq: u64,
    /// Resyncing only: the stream seq of the log's first record is not known yet; at the next
    /// `Welcome`, `seq_base` is set so that it maps onto the downstream's resume point.
    #[serde(default)]
    pub remap: bool,
    /// Block size of the resync's digests; 0: the shipper's default (64 KiB). A seeded disk
    /// (`protect --seeded`) compares 4 KiB blocks, so a scattered change sends little more
    /// than itself.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub compare_block: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl DiskRecord {
    /// A disk about to start its initial pass.
    pub fn new(size: u64) -> DiskRecord {
        DiskRecord {
            disk: 1,
            size,
            block_size: 512,
            state: Phase::InitialSync,
            seq_base: 0,
            sync_offset: 0,
            log_seq: 0,
            remap: false,
            compare_block: 0,
        }
    }

    /// A disk whose replica already holds an older copy of it (reprotect, failback): instead
    /// of the initial pass, the whole disk is compared with the replica by 4 KiB digests and
    /// only the blocks that differ are sent.
    pub fn seeded(size: u64) -> DiskRecord {
        DiskRecord {
            state: Phase::Resyncing,
            remap: true,
            compare_block: SEEDED_COMPARE_BLOCK,
            ..DiskRecord::new(size)
        }
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = format!("{STATE_MAGIC} {STATE_VERSION} {:08x}\n", crc32c(&body)).into_bytes();
        out.extend_from_slice(&body);
        out.push(b'\n');
        out
    }

    /// Parses and checks the file's bytes; the error says what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<DiskRecord, String> {
        let nl = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no header line")?;
        let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not text")?;
        let mut words = header.split(' ');
        if words.next() != Some(STATE_MAGIC) {
            return Err(format!(
                "not a Haven disk state file (expected {STATE_MAGIC})"
            ));
        }
        let version = words.next().ok_or("header has no version")?;
        if version != STATE_VERSION.to_string() {
            return Err(format!(
                "format version {version} is not supported (this agent reads {STATE_VERSION})"
            ));
        }
        let crc = words
            .next()
            .and_then(|c| u32::from_str_radix(c, 16).ok())
            .ok_or("header has no checksum")?;
        let mut body = &bytes[nl + 1..];
        if body.last() == Some(&b'\n') {
            body = &body[..body.len() - 1];
        }
        if crc32c(body) != crc {
            return Err("checksum mismatch (the file is damaged)".into());
        }
        let rec: DiskRecord = serde_json::from_slice(body).map_err(|e| format!("bad body: {e}"))?;
        if rec.block_size < 512 || !rec.block_size.is_power_of_two() || rec.size == 0 {
            return Err(format!(
                "impossible values: size {} block size {}",
                rec.size, rec.block_size
            ));
        }
        Ok(rec)
    }

    /// Reads `path`; `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> anyhow::Result<Option<DiskRecord>> {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_STATE_LEN), &mut bytes)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        DiskRecord::decode(&bytes).map(Some).map_err(|why| {
            anyhow::anyhow!(
                "disk state {}: {why}; if the file is lost for good, remove it and the log \
                 folder next to it to protect the disk again from scratch (a full initial sync)",
                path.display()
            )
        })
    }

    /// Writes `path` atomically.
    pub fn store(&self, path: &Path) -> anyhow::Result<()> {
        Ok(haven_fsutil::write_atomic(path, &self.encode(), 0o644)?)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn sample() -> DiskRecord {
        DiskRecord {
            disk: 1,
            size: 64 << 20,
            block_size: 512,
            state: Phase::Resyncing,
            seq_base: -41,
            sync_offset: 12 << 20,
            log_seq: 4711,
            remap: true,
            compare_block: 4096,
        }
    }

    #[test]
    fn disk_state_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.state");
        assert_eq!(DiskRecord::load(&path).unwrap(), None);
        sample().store(&path).unwrap();
        assert_eq!(DiskRecord::load(&path).unwrap(), Some(sample()));
        let mut next = sample();
        next.state = Phase::Protected;
        next.store(&path).unwrap();
        assert_eq!(DiskRecord::load(&path).unwrap(), Some(next));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["disk.state"], "no temporary file is left");
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("HAVEN-DISK-STATE 1 "), "{text}");
        assert!(text.contains("\"state\":\"protected\""), "{text}");
    }

    #[test]
    fn damaged_disk_state_is_refused() {
        let good = sample().encode();
        // Every single-byte change is caught.
        for i in 0..good.len() - 1 {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert!(DiskRecord::decode(&bad).is_err(), "flip at {i} accepted");
        }
        // Cut short, other magic, other version.
        assert!(DiskRecord::decode(&good[..good.len() / 2]).is_err());
        let err = DiskRecord::decode(b"HAVEN-CA-STATE 1 00000000\n{}").unwrap_err();
        assert!(err.contains("not a Haven disk state"), "{err}");
        let text = String::from_utf8(good.clone()).unwrap();
        let err = DiskRecord::decode(text.replacen(" 1 ", " 2 ", 1).as_bytes()).unwrap_err();
        assert!(err.contains("version 2 is not supported"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.state");
        let mut bad = good;
        let at = bad.len() - 5;
        bad[at] = b'9';
        fs::write(&path, &bad).unwrap();
        let err = DiskRecord::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("disk.state") && err.contains("checksum mismatch"),
            "{err}"
        );
    }
}
