//! CRC32C (Castagnoli, reflected polynomial `0x82F63B78`), the checksum that closes every frame
//! and guards every record Haven writes. Same values as iSCSI, ext4 and SSE4.2 `crc32`:
//! `crc32c(b"123456789") == 0xE306_9283`.
//!
//! Computed by the `crc32c` crate: the CPU's CRC32C instruction where there is one (SSE4.2,
//! ARMv8), a table-driven fallback elsewhere. Every replicated byte is checksummed several times
//! along the path, so this runs at memory speed rather than a table's ~1 GB/s.

#[cfg(test)]
const POLY: u32 = 0x82F6_3B78;

/// Continues a CRC32C over `data`; start with `0` (the pre- and post-inversion are done here).
pub fn update(crc: u32, data: &[u8]) -> u32 {
    ::crc32c::crc32c_append(crc, data)
}

/// CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    update(0, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitwise(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
        }
        !c
    }

    #[test]
    fn known_vectors() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        // RFC 3720 B.4: 32 bytes of zeroes, of 0xff, ascending.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let asc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&asc), 0x46DD_794E);
    }

    #[test]
    fn equals_bitwise_and_is_incremental() {
        let data: Vec<u8> = (0..1000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in [0, 1, 7, 8, 9, 63, 64, 65, 999, 1000] {
            let d = &data[..len];
            assert_eq!(crc32c(d), bitwise(d), "len {len}");
            for split in [0, len / 3, len] {
                assert_eq!(update(update(0, &d[..split]), &d[split..]), crc32c(d));
            }
        }
    }
}

/// A CRC32C computed over several pieces: `new`, `update` for each, `finish`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Crc32c(u32);

impl Crc32c {
    pub fn new() -> Self {
        Self(0)
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0 = update(self.0, data);
    }

    pub fn finish(self) -> u32 {
        self.0
    }
}
