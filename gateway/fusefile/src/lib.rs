//! Block backends served as regular files of a FUSE folder.
//!
//! A platform that keeps disks as files (a vCenter datastore folder, a Hyper-V share, a KVM
//! host's image folder) and a tool that wants a file (`losetup`, `qemu-img`) use a Haven disk
//! without a copy: [`mount`] makes a folder whose files are [`Backend`]s, the same backends the
//! NBD server exports. A read reads the backend, a write writes it, `fsync` flushes it; a file's
//! size is its backend's and cannot change. Small fixed files ([`Content::Bytes`], e.g. a VMDK
//! descriptor that names a disk file beside it as its flat extent) are read-only.
//!
//! The folder is flat and fixed: its users cannot make, remove or rename anything in it. It is
//! served until [`Mount::unmount`] (or the [`Mount`] dropped); a folder a killed process left
//! mounted is cleared by [`clear_stale`], which [`mount`] calls first.
//!
//! Mounting needs `/dev/fuse` and the right to mount (root, or `fusermount3` installed): the
//! error then says so.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};
pub use haven_nbd::Backend;

/// How long the kernel may cache names and attributes (sizes never change).
const TTL: Duration = Duration::from_secs(60);
/// Threads serving requests.
const THREADS: usize = 4;
/// Most files one folder serves.
pub const MAX_FILES: usize = 256;
/// Longest file name.
const MAX_NAME: usize = 255;
/// Block size reported for every file.
const BLOCK: u32 = 4096;

/// What a file of the folder is.
#[derive(Clone)]
pub enum Content {
    /// A disk: reads and writes go to the backend (read-only when the backend is).
    Disk(Arc<dyn Backend>),
    /// Fixed bytes, read-only.
    Bytes(Vec<u8>),
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Content::Disk(b) => write!(f, "Disk({} bytes)", b.size()),
            Content::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
        }
    }
}

impl Content {
    fn size(&self) -> u64 {
        match self {
            Content::Disk(b) => b.size(),
            Content::Bytes(b) => b.len() as u64,
        }
    }

    fn writable(&self) -> bool {
        matches!(self, Content::Disk(b) if !b.read_only())
    }
}

/// One file of the folder.
#[derive(Clone, Debug)]
pub struct File {
    /// Its name in the folder: no `/`, not `.` or `..`, at most 255 bytes.
    pub name: String,
    pub content: Content,
}

/// A mounted folder; unmounted when dropped.
pub struct Mount {
    dir: PathBuf,
    session: Option<fuser::BackgroundSession>,
    disks: Vec<Arc<dyn Backend>>,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount").field("dir", &self.dir).finish()
    }
}

impl Mount {
    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts the folder, waits for its threads to end, then flushes every disk (what was
    /// written through the files up to the unmount is in them). A folder still in use (a
    /// process has a file open) is not unmounted: the error says so (`ResourceBusy`), and it
    /// goes on serving, so the call can be repeated once it is free.
    pub fn unmount(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // Not lazily: a folder in use stays mounted, and in this process's hands.
        let ended = match nix::mount::umount2(&self.dir, nix::mount::MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) => {
                self.session = Some(session);
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "{} is in use (a file in it is open); it stays mounted",
                        self.dir.display()
                    ),
                ));
            }
            // Unmounted (or no longer mounted): the session's threads end as the kernel
            // closes the connection.
            Ok(()) | Err(nix::errno::Errno::EINVAL) => session.join(),
            // Not ours to unmount (not root): the session does, through fusermount.
            Err(_) => session.umount_and_join(),
        }
        .map_err(|e| io::Error::new(e.kind(), format!("unmounting {}: {e}", self.dir.display())));
        self.flush_disks();
        ended
    }

    fn flush_disks(&self) {
        for disk in &self.disks {
            if let Err(e) = disk.flush() {
                tracing::warn!(dir = %self.dir.display(), error = %e, "flushing a disk file");
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            if let Err(e) = session.umount_and_join() {
                tracing::warn!(error = %e, "unmounting a disk folder");
            }
            self.flush_disks();
        }
    }
}

/// Unmounts `dir` when something is mounted there (a folder a killed process left mounted
/// answers every access with "transport endpoint is not connected"); nothing when not. Only
/// for a folder no live [`Mount`] of this process serves.
pub fn clear_stale(dir: &Path) -> io::Result<()> {
    use nix::errno::Errno as E;
    match nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), "unmounted a disk folder left mounted");
            Ok(())
        }
        // Not a mount point, or no such folder.
        Err(E::EINVAL | E::ENOENT) => Ok(()),
        // Not root: the kernel says so before it looks. A folder that is no mount point needs
        // nothing; one that is goes through the setuid helper.
        Err(E::EPERM) if !is_mount_point(dir) => Ok(()),
        Err(E::EPERM) => {
            let unmounted = ["fusermount3", "fusermount"].into_iter().any(|bin| {
                std::process::Command::new(bin)
                    .arg("-uz")
                    .arg(dir)
                    .status()
                    .is_ok_and(|s| s.success())
            });
            match unmounted {
                true => Ok(()),
                false => Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is left mounted and cannot be unmounted here (run as root, or \
                         install fusermount3)",
                        dir.display()
                    ),
                )),
            }
        }
        Err(e) => Err(io::Error::other(format!(
            "unmounting what is left mounted at {}: {e}",
            dir.display()
        ))),
    }
}

/// Whether `dir` is a mount point, per `/proc/self/mountinfo` (its fifth field, where a space
/// and the like are written as `\` and three octal digits).
fn is_mount_point(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_mount_path(m) == want)
}

fn unescape_mount_path(m: &str) -> String {
    let b = m.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\')
            .then(|| b.get(i + 1..i + 4))
            .flatten()
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves `files` as the folder `dir` (made when missing; it must be empty).
pub fn mount(dir: &Path, files: Vec<File>) -> io::Result<Mount> {
    check_names(&files)?;
    clear_stale(dir)?;
    std::fs::create_dir_all(dir)?;
    if std::fs::read_dir(dir)?.next().is_some() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} is not empty: a disk folder is mounted only on an empty folder",
                dir.display()
            ),
        ));
    }
    let meta = std::fs::metadata(dir)?;
    let writable = files.iter().any(|f| f.content.writable());
    let disks = files
        .iter()
        .filter_map(|f| match &f.content {
            Content::Disk(b) => Some(b.clone()),
            Content::Bytes(_) => None,
        })
        .collect();
    let fs = Folder {
        files,
        uid: meta.uid(),
        gid: meta.gid(),
        made: SystemTime::now(),
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName("haven".into()),
        MountOption::Subtype("haven".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        // The kernel checks the files' modes: `allow_other` lets other users in, not past them.
        MountOption::DefaultPermissions,
        if writable {
            MountOption::RW
        } else {
            MountOption::RO
        },
    ];
    // The platform's own processes (an NFS server, a hypervisor) run as other users.
    config.acl = SessionACL::All;
    config.n_threads = Some(THREADS);
    let session = fuser::spawn_mount(fs, dir, &config).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "mounting a disk folder at {} with FUSE: {e} (it needs /dev/fuse and the right \
                 to mount: run as root, or install fusermount3)",
                dir.display()
            ),
        )
    })?;
    Ok(Mount {
        dir: dir.to_path_buf(),
        session: Some(session),
        disks,
    })
}

fn check_names(files: &[File]) -> io::Result<()> {
    let bad = |why: String| Err(io::Error::new(io::ErrorKind::InvalidInput, why));
    if files.len() > MAX_FILES {
        return bad(format!(
            "{} files for one disk folder; at most {MAX_FILES}",
            files.len()
        ));
    }
    let mut seen = BTreeSet::new();
    for f in files {
        let n = f.name.as_str();
        if n.is_empty() || n == "." || n == ".." || n.contains('/') || n.contains('\0') {
            return bad(format!(
                "`{n}` cannot name a file of a disk folder (no `/`, not `.` or `..`)"
            ));
        }
        if n.len() > MAX_NAME {
            return bad(format!("file name `{n}` is longer than {MAX_NAME} bytes"));
        }
        if !seen.insert(n) {
            return bad(format!("two files of a disk folder are named `{n}`"));
        }
    }
    Ok(())
}

/// The folder: inode 1, its files 2, 3, … in order.
struct Folder {
    files: Vec<File>,
    uid: u32,
    gid: u32,
    made: SystemTime,
}

impl Folder {
    fn file(&self, ino: INodeNo) -> Option<&File> {
        let i = ino.0.checked_sub(2)?;
        self.files.get(usize::try_from(i).ok()?)
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0o755, 0, 2)
        } else {
            let f = self.file(ino)?;
            let perm = if f.content.writable() { 0o644 } else { 0o444 };
            (FileType::RegularFile, perm, f.content.size(), 1)
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.made,
            mtime: self.made,
            ctime: self.made,
            crtime: self.made,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: BLOCK,
        })
    }
}

fn errno(e: &haven_nbd::Error) -> Errno {
    i32::try_from(e.errno())
        .map(Errno::from_i32)
        .unwrap_or(Errno::EIO)
}

impl Filesystem for Folder {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let found = self
            .files
            .iter()
            .position(|f| OsStr::new(&f.name) == name)
            .and_then(|i| self.attr(INodeNo(i as u64 + 2)));
        match found {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// Times are accepted and not kept; a size other than the file's is refused.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        if size.is_some_and(|s| s != attr.size) {
            // A disk has the size it has.
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(f) = self.file(ino) else {
            return reply.error(if ino == INodeNo::ROOT {
                Errno::EISDIR
            } else {
                Errno::ENOENT
            });
        };
        let writes = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        if writes && !f.content.writable() {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let end = f.content.size();
        if offset >= end {
            // At or past the end: the end of the file.
            return reply.data(&[]);
        }
        let len = u64::from(size).min(end - offset) as usize;
        match &f.content {
            Content::Bytes(b) => reply.data(&b[offset as usize..][..len]),
            Content::Disk(disk) => {
                let mut buf = vec![0u8; len];
                let done = disk
                    .check_range(offset, len as u64)
                    .and_then(|()| disk.read(offset, &mut buf));
                match done {
                    Ok(()) => reply.data(&buf),
                    Err(e) => {
                        tracing::warn!(file = f.name, offset, len, error = %e, "reading a disk file");
                        reply.error(errno(&e));
                    }
                }
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let Content::Disk(disk) = &f.content else {
            return reply.error(Errno::EROFS);
        };
        if disk.read_only() {
            return reply.error(Errno::EROFS);
        }
        if offset.saturating_add(data.len() as u64) > disk.size() {
            // A disk does not grow.
            return reply.error(Errno::ENOSPC);
        }
        let sync =
            flags.0 & (nix::fcntl::OFlag::O_SYNC.bits() | nix::fcntl::OFlag::O_DSYNC.bits()) != 0;
        let done = disk
            .check_range(offset, data.len() as u64)
            .and_then(|()| disk.write(offset, data, sync));
        match done {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                tracing::warn!(file = f.name, offset, len = data.len(), error = %e, "writing a disk file");
                reply.error(errno(&e));
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.file(ino).map(|f| &f.content) {
            Some(Content::Disk(disk)) => match disk.flush() {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::warn!(error = %e, "flushing a disk file");
                    reply.error(errno(&e));
                }
            },
            Some(Content::Bytes(_)) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
        ]
        .into_iter()
        .chain(self.files.iter().enumerate().map(|(i, f)| {
            (
                INodeNo(i as u64 + 2),
                FileType::RegularFile,
                f.name.as_str(),
            )
        }));
        for (i, (ino, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// Nothing is made, removed or renamed in the folder.
    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bytes: u64 = self.files.iter().map(|f| f.content.size()).sum();
        let blocks = bytes.div_ceil(u64::from(BLOCK));
        reply.statfs(
            blocks,
            0,
            0,
            self.files.len() as u64,
            0,
            BLOCK,
            MAX_NAME as u32,
            BLOCK,
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mount_paths_are_unescaped_as_mountinfo_writes_them() {
        assert_eq!(super::unescape_mount_path(r"/srv/a\040b"), "/srv/a b");
        assert_eq!(super::unescape_mount_path(r"/srv/x\134y"), r"/srv/x\y");
        assert_eq!(super::unescape_mount_path(r"/srv/plain\"), r"/srv/plain\");
    }
}
