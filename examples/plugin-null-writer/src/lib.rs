//! A target writer that stores nothing but an allocation map, in memory.
//!
//! It shows the whole `target-writer` contract in a few lines: the SDK's [`Disk`] trait, the
//! sector checks every writer makes, and `export_writer!`. Reads return zeros for ranges never
//! written and `0xff` for ranges written, so a caller can see what arrived.

use std::collections::BTreeMap;

use haven_plugin_sdk::image::{
    CreateOptions, Error, ExtentState, ImageInfo, MapEntry, OpenMode, Options, Result, check_range,
    push_map,
};
use haven_plugin_sdk::writer::{Buffer, Disk, PluginInfo, from_wit};

struct NullDisk {
    size: u64,
    /// Written ranges: start → end, disjoint and merged.
    written: BTreeMap<u64, u64>,
}

impl NullDisk {
    fn mark(&mut self, start: u64, end: u64, data: bool) {
        // Cut [start, end) out of every overlapping range, then add it back if it is data.
        let overlapping: Vec<(u64, u64)> = self
            .written
            .range(..end)
            .filter(|&(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            self.written.remove(&s);
            if s < start {
                self.written.insert(s, start);
            }
            if e > end {
                self.written.insert(end, e);
            }
        }
        if data {
            self.written.insert(start, end);
        }
    }
}

impl Disk for NullDisk {
    fn create(path: &str, options: CreateOptions) -> Result<Self> {
        options.options.check_known("null", &[])?;
        let _ = path;
        Ok(Self {
            size: options.size,
            written: BTreeMap::new(),
        })
    }

    fn open(path: &str, _: OpenMode, _: Options) -> Result<Self> {
        Err(Error::unsupported(format!(
            "null: {path}: a null disk keeps nothing to open"
        )))
    }

    fn probe(_: &str) -> Result<Option<String>> {
        Ok(None)
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            format: "null".into(),
            subformat: String::new(),
            size: self.size,
            sector_size: 512,
            files: vec![],
            allocated_bytes: self.written.iter().map(|(s, e)| e - s).sum(),
        })
    }

    fn read(&mut self, offset: u64, dst: &Buffer, dst_offset: u32, len: u32) -> Result<()> {
        check_range("null", offset, len.into(), self.size, 512)?;
        dst.zero(dst_offset, len).map_err(from_wit)?;
        for e in self.map(offset, len.into())? {
            if e.state == ExtentState::Data {
                let at = dst_offset + (e.offset - offset) as u32;
                dst.write(at, &vec![0xff; e.length as usize])
                    .map_err(from_wit)?;
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, _src: &Buffer, _src_offset: u32, len: u32) -> Result<()> {
        check_range("null", offset, len.into(), self.size, 512)?;
        self.mark(offset, offset + u64::from(len), true);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _discard: bool) -> Result<()> {
        check_range("null", offset, len, self.size, 512)?;
        self.mark(offset, offset + len, false);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn map(&mut self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        let end = offset + len;
        let mut map = Vec::new();
        let mut pos = offset;
        let zero = ExtentState::Zero;
        let data = ExtentState::Data;
        for (&s, &e) in self.written.range(..end).filter(|&(_, &e)| e > offset) {
            let (s, e) = (s.max(offset), e.min(end));
            push_map(
                &mut map,
                MapEntry {
                    offset: pos,
                    length: s - pos,
                    state: zero,
                },
            );
            push_map(
                &mut map,
                MapEntry {
                    offset: s,
                    length: e - s,
                    state: data,
                },
            );
            pos = e;
        }
        push_map(
            &mut map,
            MapEntry {
                offset: pos,
                length: end - pos,
                state: zero,
            },
        );
        Ok(map)
    }

    fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

haven_plugin_sdk::export_writer!(
    NullDisk,
    PluginInfo {
        name: "null".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: env!("CARGO_PKG_DESCRIPTION").into(),
        kinds: vec!["null".into()],
    }
);
