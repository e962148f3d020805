//! Payload helpers: zero detection and decompression of stored data.

use bytes::Bytes;
use haven_wire::Payload;
use haven_wire::frame::MAX_DATA_LEN;

use crate::error::{Result, StoreError};

/// Whether every byte of `data` is zero (true for an empty slice). Reads 16 bytes at a time and
/// stops at the first 4 KiB block holding a non-zero byte.
pub fn is_all_zero(data: &[u8]) -> bool {
    for block in data.chunks(4096) {
        let mut chunks = block.chunks_exact(16);
        let mut acc = 0u128;
        for c in &mut chunks {
            let mut a = [0u8; 16];
            a.copy_from_slice(c);
            acc |= u128::from_ne_bytes(a);
        }
        let tail = chunks.remainder().iter().fold(0u8, |acc, b| acc | b);
        if acc != 0 || tail != 0 {
            return false;
        }
    }
    true
}

/// The bytes a data payload stands for.
///
/// - `Data`: the bytes themselves (shared, not copied).
/// - `Compressed`: zstd-decoded, never more than `raw_len` bytes (at most
///   [`MAX_DATA_LEN`]); refused with [`StoreError::Invalid`] when the frame is corrupt or decodes
///   to a length other than `raw_len`.
/// - `Zero` and `Trim` carry no bytes: refused with [`StoreError::Invalid`] (the caller writes
///   zeroes or discards the extent instead; materialising up to 2⁶⁴ zero bytes is not this
///   function's job).
pub fn decompress(payload: &Payload) -> Result<Bytes> {
    match payload {
        Payload::Data(b) => Ok(b.clone()),
        Payload::Compressed { raw_len, bytes } => {
            if *raw_len == 0 || *raw_len > MAX_DATA_LEN {
                return Err(StoreError::Invalid(format!(
                    "compressed payload claims {raw_len} bytes, outside 1..={MAX_DATA_LEN}; the \
                     sender is broken, resync the disk"
                )));
            }
            let out = zstd::bulk::decompress(bytes, *raw_len as usize).map_err(|e| {
                StoreError::Invalid(format!(
                    "compressed payload of {} bytes (claiming {raw_len} raw bytes) does not \
                     decode: {e}; the data is corrupt, resync the disk",
                    bytes.len()
                ))
            })?;
            if out.len() != *raw_len as usize {
                return Err(StoreError::Invalid(format!(
                    "compressed payload decodes to {} bytes but claims {raw_len}; the data is \
                     corrupt, resync the disk",
                    out.len()
                )));
            }
            Ok(Bytes::from(out))
        }
        Payload::Zero { len } | Payload::Trim { len } => Err(StoreError::Invalid(format!(
            "a zero or trim payload ({len} bytes) carries no data to decompress; write zeroes or \
             discard the extent instead"
        ))),
    }
}
