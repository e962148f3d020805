//! A disk folder mounted for real (FUSE): files read and written through the kernel reach the
//! backend, and the folder refuses what a disk cannot do.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use haven_fusefile::{Backend, Content, File, mount};
use haven_nbd::Error;

/// A disk in memory that counts its flushes.
struct Mem {
    bytes: Mutex<Vec<u8>>,
    flushes: Mutex<u32>,
    read_only: bool,
}

impl Mem {
    fn new(size: usize, read_only: bool) -> Arc<Mem> {
        let bytes = (0..size).map(|i| (i % 251) as u8).collect();
        Arc::new(Mem {
            bytes: Mutex::new(bytes),
            flushes: Mutex::new(0),
            read_only,
        })
    }
}

impl Backend for Mem {
    fn size(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let b = self.bytes.lock().unwrap();
        buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), Error> {
        let mut b = self.bytes.lock().unwrap();
        b[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn write_zeroes(&self, o: u64, l: u64, _: bool, _: bool, f: bool) -> Result<(), Error> {
        self.write(o, &vec![0; l as usize], f)
    }
    fn trim(&self, o: u64, l: u64, f: bool) -> Result<(), Error> {
        self.write_zeroes(o, l, true, false, f)
    }
    fn flush(&self) -> Result<(), Error> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
}

#[test]
fn files_of_a_folder_reach_their_backends() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("disks");
    let disk = Mem::new(4 << 20, false);
    let frozen = Mem::new(1 << 20, true);
    let text = b"# Disk DescriptorFile\n".to_vec();
    let m = mount(
        &dir,
        vec![
            File {
                name: "disk1-flat.vmdk".into(),
                content: Content::Disk(disk.clone()),
            },
            File {
                name: "disk1.vmdk".into(),
                content: Content::Bytes(text.clone()),
            },
            File {
                name: "point.raw".into(),
                content: Content::Disk(frozen.clone()),
            },
        ],
    )
    .unwrap();

    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["disk1-flat.vmdk", "disk1.vmdk", "point.raw"]);
    assert_eq!(
        std::fs::metadata(dir.join("disk1-flat.vmdk"))
            .unwrap()
            .len(),
        4 << 20
    );
    assert_eq!(std::fs::read(dir.join("disk1.vmdk")).unwrap(), text);
    assert_eq!(
        std::fs::read(dir.join("point.raw")).unwrap(),
        *frozen.bytes.lock().unwrap()
    );

    // An unaligned write through the kernel, read back, is in the backend; fsync flushes it.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("disk1-flat.vmdk"))
        .unwrap();
    f.write_all_at(b"haven was here", 1_000_003).unwrap();
    f.sync_all().unwrap();
    assert_eq!(
        &disk.bytes.lock().unwrap()[1_000_003..1_000_017],
        b"haven was here"
    );
    assert!(*disk.flushes.lock().unwrap() >= 1);
    let mut back = [0u8; 14];
    f.read_exact_at(&mut back, 1_000_003).unwrap();
    assert_eq!(&back, b"haven was here");
    // Reading at or past the end is the end of the file.
    let mut tail = [0u8; 16];
    assert_eq!(f.read_at(&mut tail, 4 << 20).unwrap(), 0);
    assert_eq!(f.read_at(&mut tail, (4 << 20) + 4096).unwrap(), 0);

    // A disk does not grow or shrink; the fixed and read-only files refuse writes.
    f.seek(SeekFrom::Start(4 << 20)).unwrap();
    let grow = f.write_all(b"x").and_then(|()| f.sync_all());
    assert!(grow.is_err(), "writing past the end must fail");
    assert_eq!(
        std::fs::metadata(dir.join("disk1-flat.vmdk"))
            .unwrap()
            .len(),
        4 << 20
    );
    assert!(f.set_len(1 << 20).is_err());
    for name in ["disk1.vmdk", "point.raw"] {
        let e = OpenOptions::new()
            .write(true)
            .open(dir.join(name))
            .unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(30) | Some(13)),
            "{name}: {e}"
        );
    }
    assert_eq!(
        std::fs::write(dir.join("new"), b"x").unwrap_err().kind(),
        ErrorKind::PermissionDenied,
        "nothing is made in the folder"
    );
    assert_eq!(
        std::fs::remove_file(dir.join("disk1.vmdk"))
            .unwrap_err()
            .kind(),
        ErrorKind::PermissionDenied,
        "nothing is removed"
    );
    let mut all = Vec::new();
    std::fs::File::open(dir.join("disk1-flat.vmdk"))
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    assert_eq!(all, *disk.bytes.lock().unwrap());
    drop(f);

    // In use: it stays mounted and serving; free, it goes, and the disks are flushed after.
    let open = std::fs::File::open(dir.join("disk1.vmdk")).unwrap();
    let mut m = m;
    let e = m.unmount().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceBusy, "{e}");
    assert_eq!(std::fs::read(dir.join("disk1.vmdk")).unwrap(), text);
    drop(open);
    let flushes = *disk.flushes.lock().unwrap();
    m.unmount().unwrap();
    assert!(
        *disk.flushes.lock().unwrap() > flushes,
        "flushed after the unmount"
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "unmounted");
}

#[test]
fn bad_folders_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Mem::new(1 << 20, false);
    let file = |name: &str| File {
        name: name.into(),
        content: Content::Disk(disk.clone()),
    };
    let e = mount(tmp.path(), vec![file("a/b")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`a/b` cannot name a file of a disk folder (no `/`, not `.` or `..`)"
    );
    let e = mount(tmp.path(), vec![file("a"), file("a")]).unwrap_err();
    assert_eq!(e.to_string(), "two files of a disk folder are named `a`");
    std::fs::write(tmp.path().join("x"), b"").unwrap();
    let e = mount(tmp.path(), vec![file("a")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{} is not empty: a disk folder is mounted only on an empty folder",
            tmp.path().display()
        )
    );
}
