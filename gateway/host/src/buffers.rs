//! The `buffers` capability: host-owned byte buffers that plugins pass around by handle.

use wasmtime::component::Resource;

use crate::State;
use crate::wit::since_v0_1_0::writer::haven::plugin::buffers::{Host, HostBuffer};
use crate::wit::since_v0_1_0::writer::haven::plugin::types::Error;

/// Largest buffer a plugin may create: 64 MiB.
pub const MAX_BUFFER: u32 = 64 << 20;
/// Most bytes of buffers one plugin instance may hold at once (those the host lends for a call
/// do not count).
pub const MAX_BUFFER_BYTES: u64 = 256 << 20;

/// A buffer: bytes owned by the host, lent to a plugin by handle.
#[derive(Debug, Default)]
pub struct Buffer {
    pub data: Vec<u8>,
    /// Lent by the host as a source: the plugin may read it but not change it.
    pub read_only: bool,
}

impl Buffer {
    /// The range `[offset, offset+len)` for writing: refused on a read-only buffer.
    pub fn range_mut(&self, offset: u32, len: u32) -> Result<std::ops::Range<usize>, Error> {
        if self.read_only {
            return Err(Error::InvalidArgument(
                "the buffer is a read-only source lent for this call".into(),
            ));
        }
        self.range(offset, len)
    }

    /// The range `[offset, offset+len)`, or an error naming it.
    pub fn range(&self, offset: u32, len: u32) -> Result<std::ops::Range<usize>, Error> {
        let start = offset as usize;
        match start.checked_add(len as usize) {
            Some(end) if end <= self.data.len() => Ok(start..end),
            _ => Err(Error::InvalidArgument(format!(
                "buffer range {offset}+{len} lies outside the buffer ({} bytes)",
                self.data.len()
            ))),
        }
    }
}

impl Host for State {}

impl HostBuffer for State {
    fn new(&mut self, len: u32) -> wasmtime::Result<Resource<Buffer>> {
        if len > MAX_BUFFER {
            wasmtime::bail!("buffer of {len} bytes exceeds the {MAX_BUFFER}-byte limit");
        }
        if self.buffer_bytes + u64::from(len) > MAX_BUFFER_BYTES {
            wasmtime::bail!(
                "plugin `{}` holds {} bytes of buffers; another {len} would pass the \
                 {MAX_BUFFER_BYTES}-byte limit",
                self.name,
                self.buffer_bytes
            );
        }
        let handle = self.table.push(Buffer {
            data: vec![0; len as usize],
            read_only: false,
        })?;
        self.buffer_bytes += u64::from(len);
        Ok(handle)
    }

    fn len(&mut self, this: Resource<Buffer>) -> wasmtime::Result<u32> {
        Ok(self.table.get(&this)?.data.len() as u32)
    }

    fn read(
        &mut self,
        this: Resource<Buffer>,
        offset: u32,
        len: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, Error>> {
        let buffer = self.table.get(&this)?;
        Ok(buffer.range(offset, len).map(|r| buffer.data[r].to_vec()))
    }

    fn write(
        &mut self,
        this: Resource<Buffer>,
        offset: u32,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), Error>> {
        let buffer = self.table.get_mut(&this)?;
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        Ok(buffer
            .range_mut(offset, len)
            .map(|r| buffer.data[r].copy_from_slice(&data)))
    }

    fn copy_from(
        &mut self,
        this: Resource<Buffer>,
        offset: u32,
        src: Resource<Buffer>,
        src_offset: u32,
        len: u32,
    ) -> wasmtime::Result<Result<(), Error>> {
        if this.rep() == src.rep() {
            let buffer = self.table.get_mut(&this)?;
            let from = match buffer.range(src_offset, len) {
                Ok(r) => r,
                Err(e) => return Ok(Err(e)),
            };
            if let Err(e) = buffer.range_mut(offset, len) {
                return Ok(Err(e));
            }
            buffer.data.copy_within(from, offset as usize);
            return Ok(Ok(()));
        }
        let source = self.table.get(&src)?;
        let from = match source.range(src_offset, len) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        // Two distinct table entries cannot be borrowed at once: move the source out briefly.
        let bytes = std::mem::take(&mut self.table.get_mut(&src)?.data);
        let target = self.table.get_mut(&this)?;
        let result = target
            .range_mut(offset, len)
            .map(|to| target.data[to].copy_from_slice(&bytes[from]));
        self.table.get_mut(&src)?.data = bytes;
        Ok(result)
    }

    fn zero(
        &mut self,
        this: Resource<Buffer>,
        offset: u32,
        len: u32,
    ) -> wasmtime::Result<Result<(), Error>> {
        let buffer = self.table.get_mut(&this)?;
        Ok(buffer
            .range_mut(offset, len)
            .map(|r| buffer.data[r].fill(0)))
    }

    fn is_zero(
        &mut self,
        this: Resource<Buffer>,
        offset: u32,
        len: u32,
    ) -> wasmtime::Result<Result<bool, Error>> {
        let buffer = self.table.get(&this)?;
        Ok(buffer
            .range(offset, len)
            .map(|r| haven_image::is_zero(&buffer.data[r])))
    }

    fn drop(&mut self, this: Resource<Buffer>) -> wasmtime::Result<()> {
        // Only buffers the guest created (owned handles) are dropped by it; buffers the host
        // lends for a call are borrowed and taken back by the host after the call.
        let buffer = self.table.delete(this)?;
        self.buffer_bytes = self.buffer_bytes.saturating_sub(buffer.data.len() as u64);
        Ok(())
    }
}
