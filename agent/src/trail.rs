//! The extents of the records the agent shipped lately, so that a downstream that lost
//! records it had acknowledged (a process server lost for good, the agent moved to another)
//! costs a resync of just what those records wrote, not a comparison of the whole disk.
//!
//! The trail is kept in memory (a restart starts it again from the log's first record) and
//! bounded ([`TRAIL_MAX`] extents): it knows every record from log seq [`Trail::from`] on. When
//! the shipper names the log seqs the downstream lacks (`Change::Resync::lost`) and the trail
//! knows them all, their extents, widened to the resync block and merged, are the only ranges
//! compared; they are kept in `DATA/resync.ranges` beside `disk.state` while the resync runs.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use haven_wire::Record;
use serde::{Deserialize, Serialize};

/// Most extents remembered (24 bytes each).
pub const TRAIL_MAX: usize = 1 << 16;

/// See the module documentation.
#[derive(Debug)]
pub struct Trail {
    /// (log seq, offset, length) of each record shipped, in log order.
    entries: VecDeque<(u64, u64, u64)>,
    /// Every record from this log seq on is in `entries`.
    from: u64,
}

impl Trail {
    /// A trail that knows nothing before `log_first`, the log's oldest record.
    pub fn new(log_first: u64) -> Trail {
        Trail {
            entries: VecDeque::new(),
            from: log_first,
        }
    }

    /// The first log seq the trail knows.
    pub fn from(&self) -> u64 {
        self.from
    }

    /// Notes records read from the log to be shipped: (log seq, record), in log order. A record
    /// read again (after a reconnection) is noted once.
    pub fn note(&mut self, records: &[(u64, Record)]) {
        for (seq, record) in records {
            let Record::Write(w) = record else { continue };
            if self.entries.back().is_some_and(|e| e.0 >= *seq) {
                continue;
            }
            if self.entries.is_empty() && *seq < self.from {
                continue;
            }
            self.entries
                .push_back((*seq, w.offset, w.data.extent_len()));
            if self.entries.len() > TRAIL_MAX
                && let Some((old, ..)) = self.entries.pop_front()
            {
                self.from = old + 1;
            }
        }
    }

    /// The log was emptied (an overflow): nothing before `log_first` is known.
    pub fn reset(&mut self, log_first: u64) {
        self.entries.clear();
        self.from = log_first;
    }

    /// The ranges the records of log seqs `first..=last` wrote, widened to `block` and merged,
    /// within `size`; `None` when the trail does not know them all.
    pub fn ranges(&self, first: u64, last: u64, block: u64, size: u64) -> Option<Vec<(u64, u64)>> {
        if first < self.from {
            return None;
        }
        let mut spans: Vec<(u64, u64)> = self
            .entries
            .iter()
            .filter(|e| (first..=last).contains(&e.0) && e.2 > 0)
            .map(|&(_, offset, len)| {
                let start = offset / block * block;
                let end = offset
                    .saturating_add(len)
                    .div_ceil(block)
                    .saturating_mul(block);
                (start.min(size), end.min(size))
            })
            .filter(|(s, e)| e > s)
            .collect();
        spans.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in spans {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Some(merged.into_iter().map(|(s, e)| (s, e - s)).collect())
    }
}

/// `DATA/resync.ranges`: the only ranges the running resync compares.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredRanges {
    /// The `seq_base` of the resync they belong to.
    pub seq_base: i64,
    /// (offset, length), sorted and apart.
    pub ranges: Vec<(u64, u64)>,
}

/// Where the ranges are kept.
pub fn ranges_path(data_dir: &Path) -> PathBuf {
    data_dir.join("resync.ranges")
}

/// The ranges of the resync with `seq_base`, if they were kept (else the whole disk is
/// compared).
pub fn load_ranges(data_dir: &Path, seq_base: i64) -> Option<Vec<(u64, u64)>> {
    let path = ranges_path(data_dir);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice::<StoredRanges>(&bytes) {
        Ok(stored) => (stored.seq_base == seq_base).then_some(stored.ranges),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e,
                "unreadable resync ranges: the whole disk is compared");
            None
        }
    }
}

/// Forgets the ranges (the resync they belong to is over, or starts over). Blocking.
pub fn remove_ranges(data_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(ranges_path(data_dir)) {
        Ok(()) => haven_fsutil::sync_dir(data_dir).map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use haven_wire::{Payload, Write};

    fn rec(seq: u64, offset: u64, len: u64) -> (u64, Record) {
        (
            seq,
            Record::Write(Write {
                disk: 0,
                seq,
                offset,
                data: Payload::Data(Bytes::from(vec![1; len as usize])),
            }),
        )
    }

    #[test]
    fn the_ranges_of_lost_records_are_widened_and_merged() {
        let mut t = Trail::new(5);
        t.note(&[rec(4, 0, 512)]); // before the trail starts: not noted
        t.note(&[
            rec(5, 70_000, 4096),
            rec(6, 65_536, 100),
            rec(7, 1 << 20, 512),
        ]);
        t.note(&[rec(6, 0, 512)]); // read again: noted once
        assert_eq!(
            t.ranges(5, 6, 65_536, 1 << 30),
            Some(vec![(65_536, 65_536)])
        );
        assert_eq!(
            t.ranges(5, 7, 65_536, 1 << 30),
            Some(vec![(65_536, 65_536), (1 << 20, 65_536)])
        );
        // Clipped to the disk.
        assert_eq!(
            t.ranges(7, 7, 65_536, (1 << 20) + 512),
            Some(vec![(1 << 20, 512)])
        );
        // Before what the trail knows: unknown.
        assert_eq!(t.ranges(4, 7, 65_536, 1 << 30), None);
        t.reset(8);
        assert_eq!(t.ranges(5, 7, 65_536, 1 << 30), None);
        assert_eq!(t.ranges(8, 9, 65_536, 1 << 30), Some(vec![]));
    }

    #[test]
    fn the_oldest_extents_go_beyond_the_limit() {
        let mut t = Trail::new(1);
        let records: Vec<_> = (1..=TRAIL_MAX as u64 + 10)
            .map(|s| rec(s, s * 512, 512))
            .collect();
        t.note(&records);
        assert_eq!(t.from(), 11);
        assert_eq!(t.ranges(10, 20, 512, 1 << 40), None);
        assert_eq!(t.ranges(11, 11, 512, 1 << 40), Some(vec![(11 * 512, 512)]));
    }
}
