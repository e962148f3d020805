//! A disk's record store as the replication path sees it, and an in-memory one that injects
//! faults.
//!
//! Appended records are *written*; [`RecordStore::sync`] makes every written record *durable*.
//! Only durable records may be acknowledged upstream or forwarded downstream, and a crash of the
//! process (a power cut) loses what is written and not durable. The process server's cache and
//! the master target's journal (`haven_store::journal::Journal`) implement this contract; so
//! does [`MemStore`], which the whole-path simulation uses to test the machines with crashes
//! and failing syncs. [`check_contract`] is the contract as a test both run.

use std::collections::BTreeMap;
use std::fmt;

use haven_wire::{Record, Seq};

/// A disk's records, in seq order, with written and durable apart.
pub trait RecordStore {
    /// What goes wrong.
    type Error: fmt::Display;

    /// Appends the record following [`RecordStore::written`] (written, not yet durable).
    fn append(&mut self, record: &Record) -> Result<(), Self::Error>;
    /// Makes every written record durable; returns the durable seq.
    fn sync(&mut self) -> Result<Seq, Self::Error>;
    /// The highest seq written (0 for none).
    fn written(&self) -> Seq;
    /// The highest seq durable (0 for none).
    fn durable(&self) -> Seq;
    /// Records from `from` up to `to`, in order, about `budget` bytes (at least one if any).
    fn read(&self, from: Seq, to: Seq, budget: u64) -> Result<Vec<Record>, Self::Error>;
    /// Frees records up to `up_to` (they are durable downstream). A store may keep some until
    /// it can free them whole (segments).
    fn release(&mut self, up_to: Seq) -> Result<(), Self::Error>;
}

/// An in-memory [`RecordStore`] that fails when told to and loses what is not durable in a
/// [`MemStore::crash`].
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    records: BTreeMap<Seq, Record>,
    written: Seq,
    durable: Seq,
    fail_syncs: u32,
    fail_appends: u32,
}

/// What a [`MemStore`] refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemError {
    /// An injected failure.
    Injected(&'static str),
    /// The record is not the next one.
    OutOfOrder {
        /// The seq expected.
        expected: Seq,
        /// The seq given.
        got: Seq,
    },
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemError::Injected(what) => write!(f, "injected failure: {what}"),
            MemError::OutOfOrder { expected, got } => {
                write!(f, "record {got} appended, {expected} expected")
            }
        }
    }
}

impl MemStore {
    /// An empty store whose first record will be `after + 1`: everything before is durable
    /// downstream (a process server taking an agent over where its master target resumes).
    pub fn starting_after(after: Seq) -> MemStore {
        MemStore {
            written: after,
            durable: after,
            ..MemStore::default()
        }
    }

    /// The next `n` syncs fail (nothing becomes durable).
    pub fn fail_syncs(&mut self, n: u32) {
        self.fail_syncs = n;
    }

    /// The next `n` appends fail (nothing is written).
    pub fn fail_appends(&mut self, n: u32) {
        self.fail_appends = n;
    }

    /// A power cut: what was written and not durable is gone.
    pub fn crash(&mut self) {
        let d = self.durable;
        self.records.retain(|&s, _| s <= d);
        self.written = d;
    }

    /// The oldest record held, if any.
    pub fn first(&self) -> Option<Seq> {
        self.records.keys().next().copied()
    }

    /// Whether every seq in `from..=to` is held.
    pub fn holds(&self, from: Seq, to: Seq) -> bool {
        from > to || self.records.range(from..=to).count() as u64 == to - from + 1
    }

    /// The record with `seq`, if held.
    pub fn get(&self, seq: Seq) -> Option<&Record> {
        self.records.get(&seq)
    }

    /// Records held up to `to`, in order.
    pub fn iter_to(&self, to: Seq) -> impl Iterator<Item = &Record> {
        self.records.range(..=to).map(|(_, r)| r)
    }
}

impl RecordStore for MemStore {
    type Error = MemError;

    fn append(&mut self, record: &Record) -> Result<(), MemError> {
        if self.fail_appends > 0 {
            self.fail_appends -= 1;
            return Err(MemError::Injected("append"));
        }
        let expected = self.written + 1;
        if record.seq() != expected {
            return Err(MemError::OutOfOrder {
                expected,
                got: record.seq(),
            });
        }
        self.records.insert(record.seq(), record.clone());
        self.written = record.seq();
        Ok(())
    }

    fn sync(&mut self) -> Result<Seq, MemError> {
        if self.fail_syncs > 0 {
            self.fail_syncs -= 1;
            return Err(MemError::Injected("sync"));
        }
        self.durable = self.written;
        Ok(self.durable)
    }

    fn written(&self) -> Seq {
        self.written
    }

    fn durable(&self) -> Seq {
        self.durable
    }

    fn read(&self, from: Seq, to: Seq, budget: u64) -> Result<Vec<Record>, MemError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        if from > to {
            return Ok(out);
        }
        for r in self.records.range(from..=to).map(|(_, r)| r) {
            if bytes >= budget {
                break;
            }
            bytes += r.wire_len();
            out.push(r.clone());
        }
        Ok(out)
    }

    fn release(&mut self, up_to: Seq) -> Result<(), MemError> {
        self.records.retain(|&s, _| s > up_to);
        Ok(())
    }
}

/// The [`RecordStore`] contract, checked on a store `open` returns empty; `reopen` closes it
/// and opens it again (a restart). `records(n)` are `n` records of one disk with seqs 1..=n.
/// Panics with what was broken.
pub fn check_contract<S: RecordStore>(
    mut open: impl FnMut() -> S,
    mut reopen: impl FnMut(S) -> S,
    records: &[Record],
) {
    assert!(records.len() >= 8, "give at least 8 records");
    let mut s = open();
    assert_eq!((s.written(), s.durable()), (0, 0), "a new store is empty");
    for r in &records[..4] {
        s.append(r)
            .unwrap_or_else(|e| panic!("append {}: {e}", r.seq()));
    }
    assert_eq!(s.written(), 4, "appends are written");
    assert!(s.durable() < 4, "appends are not durable before a sync");
    assert_eq!(s.sync().unwrap_or_else(|e| panic!("sync: {e}")), 4);
    assert_eq!(s.durable(), 4, "a sync makes every written record durable");
    let got = s
        .read(2, 3, u64::MAX)
        .unwrap_or_else(|e| panic!("read: {e}"));
    assert_eq!(
        got,
        records[1..3].to_vec(),
        "read returns exactly the range, in order"
    );
    let one = s.read(1, 4, 1).unwrap_or_else(|e| panic!("read: {e}"));
    assert_eq!(
        one,
        records[..1].to_vec(),
        "a tiny budget still returns one record"
    );
    for r in &records[4..8] {
        s.append(r)
            .unwrap_or_else(|e| panic!("append {}: {e}", r.seq()));
    }
    s.sync().unwrap_or_else(|e| panic!("sync: {e}"));
    s.release(2).unwrap_or_else(|e| panic!("release: {e}"));
    let after = s
        .read(3, 8, u64::MAX)
        .unwrap_or_else(|e| panic!("read: {e}"));
    assert_eq!(
        after,
        records[2..8].to_vec(),
        "release keeps what is above it"
    );
    let mut s = reopen(s);
    assert_eq!(s.durable(), 8, "durable records survive a restart");
    assert_eq!(s.written(), 8);
    let again = s
        .read(3, 8, u64::MAX)
        .unwrap_or_else(|e| panic!("read: {e}"));
    assert_eq!(again, records[2..8].to_vec(), "and read back the same");
    s.release(8).unwrap_or_else(|e| panic!("release: {e}"));
    assert_eq!(s.durable(), 8, "release never lowers the durable seq");
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_wire::{Payload, Write};

    fn records(n: u64) -> Vec<Record> {
        (1..=n)
            .map(|seq| {
                Record::Write(Write {
                    disk: 1,
                    seq,
                    offset: seq * 512,
                    data: Payload::Zero { len: 512 },
                })
            })
            .collect()
    }

    #[test]
    fn the_memory_store_keeps_the_contract() {
        check_contract(MemStore::default, |s| s, &records(8));
    }

    #[test]
    fn a_crash_loses_exactly_what_was_not_durable() {
        let rs = records(6);
        let mut s = MemStore::default();
        for r in &rs[..3] {
            s.append(r).unwrap();
        }
        s.sync().unwrap();
        for r in &rs[3..] {
            s.append(r).unwrap();
        }
        s.crash();
        assert_eq!((s.written(), s.durable()), (3, 3));
        assert_eq!(s.read(1, 6, u64::MAX).unwrap(), rs[..3].to_vec());
        // Appending continues after the durable seq.
        s.append(&rs[3]).unwrap();
        assert_eq!(
            s.append(&rs[5]),
            Err(MemError::OutOfOrder {
                expected: 5,
                got: 6
            })
        );
    }

    #[test]
    fn injected_failures_change_nothing() {
        let rs = records(2);
        let mut s = MemStore::default();
        s.fail_appends(1);
        assert_eq!(s.append(&rs[0]), Err(MemError::Injected("append")));
        assert_eq!(s.written(), 0);
        s.append(&rs[0]).unwrap();
        s.fail_syncs(1);
        assert_eq!(s.sync(), Err(MemError::Injected("sync")));
        assert_eq!(s.durable(), 0);
        assert_eq!(s.sync(), Ok(1));
    }
}
