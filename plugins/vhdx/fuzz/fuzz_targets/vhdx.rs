//! Fuzzes the VHDX parser: the input becomes an image file, which is then opened (read-only and
//! read-write), read, mapped and written to. Errors are fine; panics, hangs and unbounded
//! allocation are bugs.
//!
//! A VHDX file is mostly zeros with its structures at MiB offsets, so the input is a sparse
//! encoding: records of a little-endian u16 page number and 4096 bytes written at that page
//! (4 KiB units). The seeds are qemu-made images with only their non-zero pages kept.
#![no_main]

use haven_image::{Format, OpenMode, Options, StdBackend};
use haven_vhdx::Vhdx;
use libfuzzer_sys::fuzz_target;

const PAGE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let mut file = vec![0u8; 0];
    for record in data.chunks_exact(2 + PAGE) {
        let at = usize::from(u16::from_le_bytes([record[0], record[1]])) * PAGE;
        if file.len() < at + PAGE {
            file.resize(at + PAGE, 0);
        }
        file[at..at + PAGE].copy_from_slice(&record[2..]);
    }
    if std::fs::write(dir.path().join("f.vhdx"), &file).is_err() {
        return;
    }
    let backend = StdBackend::new(dir.path());
    let _ = Vhdx::probe(&backend, "f.vhdx");
    for mode in [OpenMode::ReadOnly, OpenMode::ReadWrite] {
        let Ok(mut img) = Vhdx::open(&backend, "f.vhdx", mode, &Options::default()) else {
            continue;
        };
        let Ok(info) = img.info() else { continue };
        let len = info.size.min(1 << 20) / 512 * 512;
        let mut buf = vec![0u8; len as usize];
        let _ = img.read(0, &mut buf);
        let tail = info.size.saturating_sub(len);
        let _ = img.read(tail, &mut buf);
        let _ = img.map(0, info.size);
        if mode == OpenMode::ReadWrite {
            let _ = img.write(0, &buf[..len.min(4096) as usize]);
            let _ = img.write_zeroes(0, len, true);
            let _ = img.close();
        }
    }
});
