//! The journal as the replication path's [`RecordStore`]: the contract the machines and the
//! whole-path simulation are written against (`haven_replication::store`), kept by the real
//! store too (`tests/journal.rs` runs the same contract check on both).

use haven_replication::store::RecordStore;
use haven_wire::{Record, Seq};

use crate::error::StoreError;
use crate::journal::Journal;

impl RecordStore for Journal {
    type Error = StoreError;

    fn append(&mut self, record: &Record) -> Result<(), StoreError> {
        Journal::append(self, record).map(|_| ())
    }

    fn sync(&mut self) -> Result<Seq, StoreError> {
        Journal::sync(self)
    }

    fn written(&self) -> Seq {
        self.last_seq()
    }

    fn durable(&self) -> Seq {
        self.durable_seq()
    }

    fn read(&self, from: Seq, to: Seq, budget: u64) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        if from > to {
            return Ok(out);
        }
        for record in self.read_from(from) {
            let record = record?;
            if record.seq() > to || bytes >= budget {
                break;
            }
            bytes += record.wire_len();
            out.push(record);
        }
        Ok(out)
    }

    fn release(&mut self, up_to: Seq) -> Result<(), StoreError> {
        Journal::release(self, up_to).map(|_| ())
    }
}
