//! Opens the input as a qcow2 image (read-only, then read-write), reads, maps, writes and reads
//! dirty bitmaps, ignoring errors: nothing may panic, hang or allocate without bound.
#![no_main]

use std::cell::RefCell;
use std::rc::Rc;

use haven_image::{Backend, Error, Extent, FileIo, Format, OpenMode, Options, Result};
use haven_qcow2::Qcow2;
use libfuzzer_sys::fuzz_target;

/// Largest the in-memory file may grow to through writes.
const MAX_FILE: u64 = 64 << 20;
const NAME: &str = "fuzz.qcow2";

/// One in-memory file; any other name (a backing file) does not exist.
#[derive(Clone)]
struct Mem(Rc<RefCell<Vec<u8>>>);

struct MemFile(Rc<RefCell<Vec<u8>>>);

impl FileIo for MemFile {
    fn name(&self) -> &str {
        NAME
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let data = self.0.borrow();
        let Ok(start) = usize::try_from(offset) else { return Ok(0) };
        if start >= data.len() {
            return Ok(0);
        }
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }
    fn write_at(&self, offset: u64, src: &[u8]) -> Result<()> {
        let end = offset.saturating_add(src.len() as u64);
        if end > MAX_FILE {
            return Err(Error::io("fuzz: file too large"));
        }
        let mut data = self.0.borrow_mut();
        if data.len() < end as usize {
            data.resize(end as usize, 0);
        }
        data[offset as usize..end as usize].copy_from_slice(src);
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        Ok(self.0.borrow().len() as u64)
    }
    fn set_len(&self, len: u64) -> Result<()> {
        if len > MAX_FILE {
            return Err(Error::io("fuzz: file too large"));
        }
        self.0.borrow_mut().resize(len as usize, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let mut data = self.0.borrow_mut();
        let size = data.len() as u64;
        let (s, e) = (offset.min(size) as usize, offset.saturating_add(len).min(size) as usize);
        data[s..e].fill(0);
        Ok(())
    }
    fn data_extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(vec![Extent { offset, length: len }])
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

impl Backend for Mem {
    type File = MemFile;
    fn open(&self, path: &str, _mode: OpenMode) -> Result<MemFile> {
        if path == NAME {
            Ok(MemFile(self.0.clone()))
        } else {
            Err(Error::new(haven_image::ErrorKind::NotFound, format!("{path}: not found")))
        }
    }
    fn create(&self, path: &str) -> Result<MemFile> {
        Err(Error::new(haven_image::ErrorKind::Denied, format!("{path}: read-only")))
    }
    fn exists(&self, path: &str) -> Result<bool> {
        Ok(path == NAME)
    }
    fn remove(&self, _path: &str) -> Result<()> {
        Ok(())
    }
    fn rename(&self, _from: &str, _to: &str) -> Result<()> {
        Ok(())
    }
}

fn exercise(backend: &Mem, mode: OpenMode) {
    let Ok(mut img) = Qcow2::open(backend, NAME, mode, &Options::default()) else { return };
    let Ok(info) = img.info() else { return };
    let size = info.size;
    let _ = img.map(0, size);
    // Read the start, the end and a few places between, bounded.
    let mut buf = vec![0u8; 1 << 20];
    for k in 0..4u64 {
        let off = (size / 4 * k) & !511;
        let n = (size - off).min(buf.len() as u64) & !511;
        let _ = img.read(off, &mut buf[..n as usize]);
    }
    if mode == OpenMode::ReadWrite && size >= 1 << 16 {
        let _ = img.write(512, &[0xa5; 4096]);
        let _ = img.write_zeroes(0, 1 << 16, true);
        let _ = img.flush();
        let _ = img.read(0, &mut buf[..4096]);
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() as u64 > MAX_FILE {
        return;
    }
    let backend = Mem(Rc::new(RefCell::new(data.to_vec())));
    let _ = Qcow2::probe(&backend, NAME);
    exercise(&backend, OpenMode::ReadOnly);
    if let Ok(list) = haven_qcow2::list_bitmaps(&backend, NAME) {
        for b in list.iter().take(4) {
            let _ = haven_qcow2::dirty_extents(&backend, NAME, &b.name);
        }
    }
    exercise(&backend, OpenMode::ReadWrite);
});
