//! Opens the input as a VHD (and as the parent `base.vhd` a differencing input may name), reads,
//! maps, and writes to a copy. Errors are fine; panics, hangs and huge allocations are not.

#![no_main]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use haven_image::{Backend, Error, ErrorKind, Extent, FileIo, Format, OpenMode, Options, Result};
use haven_vhd::Vhd;
use libfuzzer_sys::fuzz_target;

type Bytes = Rc<RefCell<Vec<u8>>>;

/// Files in memory.
#[derive(Clone, Default)]
struct Mem(Rc<RefCell<HashMap<String, Bytes>>>);

struct MemFile {
    name: String,
    data: Bytes,
}

/// Files may not grow past this, so a hostile image cannot make the target allocate much.
const MAX_FILE: u64 = 64 << 20;

impl FileIo for MemFile {
    fn name(&self) -> &str {
        &self.name
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let data = self.data.borrow();
        let start = offset.min(data.len() as u64) as usize;
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }
    fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        let end = offset.saturating_add(bytes.len() as u64);
        if end > MAX_FILE {
            return Err(Error::io("file too large for the fuzz backend"));
        }
        let mut data = self.data.borrow_mut();
        if data.len() < end as usize {
            data.resize(end as usize, 0);
        }
        data[offset as usize..end as usize].copy_from_slice(bytes);
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        Ok(self.data.borrow().len() as u64)
    }
    fn set_len(&self, len: u64) -> Result<()> {
        if len > MAX_FILE {
            return Err(Error::io("file too large for the fuzz backend"));
        }
        self.data.borrow_mut().resize(len as usize, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let mut data = self.data.borrow_mut();
        let end = offset.saturating_add(len).min(data.len() as u64) as usize;
        let start = (offset as usize).min(end);
        data[start..end].fill(0);
        Ok(())
    }
    fn data_extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let size = self.data.borrow().len() as u64;
        let end = offset.saturating_add(len).min(size);
        Ok(if end > offset {
            vec![Extent {
                offset,
                length: end - offset,
            }]
        } else {
            Vec::new()
        })
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

impl Backend for Mem {
    type File = MemFile;
    fn open(&self, path: &str, _mode: OpenMode) -> Result<MemFile> {
        let data = self.0.borrow().get(path).cloned();
        data.map(|data| MemFile {
            name: path.to_owned(),
            data,
        })
        .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no file {path}")))
    }
    fn create(&self, path: &str) -> Result<MemFile> {
        let data: Bytes = Rc::default();
        self.0.borrow_mut().insert(path.to_owned(), data.clone());
        Ok(MemFile {
            name: path.to_owned(),
            data,
        })
    }
    fn exists(&self, path: &str) -> Result<bool> {
        Ok(self.0.borrow().contains_key(path))
    }
    fn remove(&self, path: &str) -> Result<()> {
        self.0.borrow_mut().remove(path);
        Ok(())
    }
    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let mut files = self.0.borrow_mut();
        let data = files
            .remove(from)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, from))?;
        files.insert(to.to_owned(), data);
        Ok(())
    }
}

fn exercise(mem: &Mem, path: &str, mode: OpenMode) {
    let Ok(mut image) = Vhd::open(mem, path, mode, &Options::default()) else {
        return;
    };
    let Ok(info) = image.info() else { return };
    let size = info.size;
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0;
    while pos < size.min(1 << 20) {
        let n = (size - pos).min(buf.len() as u64) as usize;
        let _ = image.read(pos, &mut buf[..n]);
        pos += n as u64;
    }
    if size >= 8192 {
        let _ = image.read(size - 8192, &mut buf[..8192]);
    }
    let _ = image.map(0, size);
    if mode == OpenMode::ReadWrite && size >= 8192 {
        buf[..4096].fill(0xA5);
        let _ = image.write(size / 2 / 512 * 512, &buf[..4096]);
        let _ = image.write(size - 4096, &buf[..4096]);
        let _ = image.write_zeroes(0, size.min(3 << 20) / 512 * 512, true);
        let _ = image.flush();
        let _ = image.read(size - 4096, &mut buf[..4096]);
        let _ = image.map(0, size);
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = Mem::default();
    for name in ["a.vhd", "base.vhd"] {
        mem.0
            .borrow_mut()
            .insert(name.to_owned(), Rc::new(RefCell::new(data.to_vec())));
    }
    let _ = Vhd::probe(&mem, "a.vhd");
    exercise(&mem, "a.vhd", OpenMode::ReadOnly);
    exercise(&mem, "a.vhd", OpenMode::ReadWrite);
});
