//! Opens fuzz input as a vmdk image (alone, and as the extent of a descriptor) and reads and
//! maps all of it. Errors are expected; panics, hangs and unbounded allocation are bugs.
#![no_main]

use haven_image::{Format, OpenMode, Options, StdBackend};
use haven_vmdk::Vmdk;
use libfuzzer_sys::fuzz_target;

fn exercise(backend: &StdBackend, path: &str) {
    let _ = Vmdk::probe(backend, path);
    let Ok(mut img) = Vmdk::open(backend, path, OpenMode::ReadOnly, &Options::default()) else {
        return;
    };
    let Ok(info) = img.info() else { return };
    let _ = img.map(0, info.size);
    // Read at most 16 MiB, in 1 MiB pieces.
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < info.size.min(16 << 20) {
        let n = (1u64 << 20).min(info.size - off);
        if img.read(off, &mut buf[..n as usize]).is_err() {
            break;
        }
        off += n;
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let backend = StdBackend::new(dir.path());
    if std::fs::write(dir.path().join("disk.vmdk"), data).is_err() {
        return;
    }
    exercise(&backend, "disk.vmdk");
    // The same bytes as the sparse extent and as the flat extent of a descriptor.
    let desc = "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n\
                createType=\"twoGbMaxExtentSparse\"\nRW 8192 SPARSE \"disk.vmdk\"\n\
                RW 16 FLAT \"flat.vmdk\" 1\nRW 64 ZERO\n";
    if std::fs::write(dir.path().join("flat.vmdk"), data).is_ok()
        && std::fs::write(dir.path().join("desc.vmdk"), desc).is_ok()
    {
        exercise(&backend, "desc.vmdk");
    }
});
