//! A loaded target writer and the disks it has open.

use haven_image::{ExtentState, ImageInfo, MapEntry};
use wasmtime::component::ResourceAny;

use crate::buffers::{Buffer, MAX_BUFFER};
use crate::wit::since_v0_1_0::writer::TargetWriter;
use crate::wit::since_v0_1_0::writer::exports::haven::plugin::writer as wit;
use crate::wit::since_v0_1_0::writer::haven::plugin::types::OptionPair;
use crate::{CacheOutcome, PluginError, PluginInfo, Runner, drop_resource};

/// How an existing disk is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// A disk opened by a [`WriterPlugin`]. Close it with [`WriterPlugin::close`]; dropping it
/// without closing leaks the plugin-side handle until the instance is restarted.
#[derive(Debug)]
pub struct Disk {
    resource: ResourceAny,
    generation: u64,
}

/// A loaded target writer.
pub struct WriterPlugin {
    runner: Runner<TargetWriter>,
}

fn pairs(options: &[(String, String)]) -> Vec<OptionPair> {
    options
        .iter()
        .map(|(k, v)| OptionPair {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

impl WriterPlugin {
    pub(crate) fn new(runner: Runner<TargetWriter>) -> Self {
        Self { runner }
    }

    /// The plugin's name as configured.
    pub fn name(&self) -> &str {
        &self.runner.name
    }

    /// Where the component came from (compiled now or precompiled).
    pub fn cache_outcome(&self) -> CacheOutcome {
        self.runner.outcome
    }

    /// How many times the instance has been replaced after a trap.
    pub fn restarts(&self) -> u64 {
        self.runner.generation
    }

    pub fn describe(&mut self) -> Result<PluginInfo, PluginError> {
        self.runner.describe()
    }

    /// The subformat when the file at `path` is an image of this plugin's format.
    pub fn probe(&mut self, path: &str) -> Result<Option<String>, PluginError> {
        self.runner.call("writer.probe", |b, s| {
            b.haven_plugin_writer().call_probe(s, path)
        })
    }

    /// Creates a disk at `path` below the plugin's storage root.
    pub fn create(
        &mut self,
        path: &str,
        size: u64,
        sector_size: u32,
        options: &[(String, String)],
    ) -> Result<Disk, PluginError> {
        let o = wit::CreateOptions {
            size,
            sector_size,
            options: pairs(options),
        };
        let resource = self.runner.call("disk.create", |b, s| {
            b.haven_plugin_writer().disk().call_create(s, path, &o)
        })?;
        Ok(Disk {
            resource,
            generation: self.runner.generation,
        })
    }

    /// Opens the disk at `path`.
    pub fn open(
        &mut self,
        path: &str,
        access: Access,
        options: &[(String, String)],
    ) -> Result<Disk, PluginError> {
        let access = match access {
            Access::ReadOnly => wit::Access::ReadOnly,
            Access::ReadWrite => wit::Access::ReadWrite,
        };
        let o = pairs(options);
        let resource = self.runner.call("disk.open", |b, s| {
            b.haven_plugin_writer()
                .disk()
                .call_open(s, path, access, &o)
        })?;
        Ok(Disk {
            resource,
            generation: self.runner.generation,
        })
    }

    pub fn info(&mut self, disk: &Disk) -> Result<ImageInfo, PluginError> {
        self.runner.check_generation(disk.generation, "disk.info")?;
        let i = self.runner.call("disk.info", |b, s| {
            b.haven_plugin_writer().disk().call_info(s, disk.resource)
        })?;
        Ok(ImageInfo {
            format: i.format,
            subformat: i.subformat,
            size: i.size,
            sector_size: i.sector_size,
            files: i.files,
            allocated_bytes: i.allocated_bytes,
        })
    }

    /// Lends `data` to the plugin as a buffer for one call and takes it back, whatever the
    /// outcome (also after a trap: from the instance that trapped). The bytes are moved, never
    /// copied. A `read_only` buffer is a source the plugin may read but not change.
    fn with_buffer<T>(
        &mut self,
        call: &'static str,
        data: &mut Vec<u8>,
        read_only: bool,
        f: impl FnOnce(
            &TargetWriter,
            &mut wasmtime::Store<crate::State>,
            wasmtime::component::Resource<Buffer>,
        ) -> wasmtime::Result<Result<T, crate::WitError>>,
    ) -> Result<T, PluginError> {
        if data.len() > MAX_BUFFER as usize {
            return Err(self.runner.host_error(
                call,
                format!(
                    "{} bytes exceed the {MAX_BUFFER}-byte buffer limit",
                    data.len()
                ),
            ));
        }
        let generation = self.runner.generation;
        let lent = {
            let plugin = self.runner.name.to_string();
            let store = self
                .runner
                .store()
                .ok_or(PluginError::Stale { plugin, call })?;
            let buffer = Buffer {
                data: std::mem::take(data),
                read_only,
            };
            match store.data_mut().table.push(buffer) {
                Ok(resource) => resource.rep(),
                Err(e) => {
                    return Err(self
                        .runner
                        .host_error(call, format!("cannot lend buffer: {e}")));
                }
            }
        };
        let result = self.runner.call(call, |b, s| {
            f(b, s, wasmtime::component::Resource::new_borrow(lent))
        });
        // Take the bytes back from the store they were lent to, live or trapped.
        if let Some(store) = self.runner.store_of(generation) {
            let own = wasmtime::component::Resource::<Buffer>::new_own(lent);
            if let Ok(buffer) = store.data_mut().table.delete(own) {
                *data = buffer.data;
            }
        }
        result
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub fn read(&mut self, disk: &Disk, offset: u64, buf: &mut Vec<u8>) -> Result<(), PluginError> {
        self.runner.check_generation(disk.generation, "disk.read")?;
        let len = buf.len() as u32;
        self.with_buffer("disk.read", buf, false, |b, s, r| {
            b.haven_plugin_writer()
                .disk()
                .call_read(s, disk.resource, offset, r, 0, len)
        })
    }

    /// Writes `data` at `offset`. `data` is lent to the plugin read-only and given back
    /// unchanged, also when the call fails or traps.
    pub fn write(
        &mut self,
        disk: &Disk,
        offset: u64,
        data: &mut Vec<u8>,
    ) -> Result<(), PluginError> {
        self.runner
            .check_generation(disk.generation, "disk.write")?;
        let len = data.len() as u32;
        self.with_buffer("disk.write", data, true, |b, s, r| {
            b.haven_plugin_writer()
                .disk()
                .call_write(s, disk.resource, offset, r, 0, len)
        })
    }

    pub fn write_zeroes(
        &mut self,
        disk: &Disk,
        offset: u64,
        len: u64,
        discard: bool,
    ) -> Result<(), PluginError> {
        self.runner
            .check_generation(disk.generation, "disk.write-zeroes")?;
        self.runner.call("disk.write-zeroes", |b, s| {
            b.haven_plugin_writer()
                .disk()
                .call_write_zeroes(s, disk.resource, offset, len, discard)
        })
    }

    pub fn flush(&mut self, disk: &Disk) -> Result<(), PluginError> {
        self.runner
            .check_generation(disk.generation, "disk.flush")?;
        self.runner.call("disk.flush", |b, s| {
            b.haven_plugin_writer().disk().call_flush(s, disk.resource)
        })
    }

    pub fn map(
        &mut self,
        disk: &Disk,
        offset: u64,
        len: u64,
    ) -> Result<Vec<MapEntry>, PluginError> {
        self.runner
            .check_generation(disk.generation, "disk.allocation-map")?;
        let map = self.runner.call("disk.allocation-map", |b, s| {
            b.haven_plugin_writer()
                .disk()
                .call_allocation_map(s, disk.resource, offset, len)
        })?;
        // A plugin's map is not trusted: it must cover exactly the range asked, in order.
        let mut pos = offset;
        for e in &map {
            let end = e.offset.checked_add(e.length);
            if e.offset != pos || e.length == 0 || end.is_none_or(|end| end > offset + len) {
                return Err(self.runner.host_error(
                    "disk.allocation-map",
                    format!(
                        "the plugin returned an invalid map entry {:#x}+{:#x} for the range \
                         {offset:#x}+{len:#x} (entries must be contiguous, non-empty and within it)",
                        e.offset, e.length
                    ),
                ));
            }
            pos = e.offset + e.length;
        }
        if pos != offset + len {
            return Err(self.runner.host_error(
                "disk.allocation-map",
                format!(
                    "the plugin's map stops at {pos:#x}, short of {:#x}",
                    offset + len
                ),
            ));
        }
        Ok(map
            .into_iter()
            .map(|e| MapEntry {
                offset: e.offset,
                length: e.length,
                state: match e.state {
                    wit::ExtentState::Data => ExtentState::Data,
                    wit::ExtentState::Zero => ExtentState::Zero,
                },
            })
            .collect())
    }

    /// Flushes and closes `disk`.
    pub fn close(&mut self, disk: Disk) -> Result<(), PluginError> {
        self.runner
            .check_generation(disk.generation, "disk.close")?;
        let result = self.runner.call("disk.close", |b, s| {
            b.haven_plugin_writer().disk().call_close(s, disk.resource)
        });
        if disk.generation == self.runner.generation
            && let Some(store) = self.runner.store()
        {
            drop_resource(store, disk.resource);
        }
        result
    }
}
