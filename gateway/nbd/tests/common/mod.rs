//! What the client tests share: a disk in a sparse file whose allocation comes from
//! `SEEK_DATA`/`SEEK_HOLE` and which has a metadata context of its own (`test:written`), a
//! server serving it on a Unix socket and TCP, and the real clients' checks.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use haven_nbd::{Backend, Error, Extent, Server, bind_unix, proto};
use rustix::fs::{FallocateFlags, SeekFrom};

pub const EXPORT: &str = "vdb";
/// The granule of `test:written`.
pub const GRANULE: u64 = 64 << 10;
/// `test:written`'s one flag: written through NBD since the disk was opened.
pub const WRITTEN: u32 = 1;

/// A disk in a (sparse) file.
pub struct FileDisk {
    file: File,
    size: u64,
    read_only: bool,
    /// Whether a fast zero is done (by punching a hole) or refused with `ENOTSUP`.
    fast_zero: bool,
    multi_conn: bool,
    /// Bytes the server read from the disk.
    pub bytes_read: AtomicU64,
    /// Granules written through NBD, for `test:written`.
    written: Mutex<Vec<bool>>,
}

impl FileDisk {
    pub fn open(path: &Path, read_only: bool) -> FileDisk {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .unwrap();
        let size = file.metadata().unwrap().len();
        FileDisk {
            file,
            size,
            read_only,
            fast_zero: true,
            multi_conn: true,
            bytes_read: AtomicU64::new(0),
            written: Mutex::new(vec![false; size.div_ceil(GRANULE) as usize]),
        }
    }

    /// Fast zeroes refused with `ENOTSUP`.
    pub fn without_fast_zero(mut self) -> FileDisk {
        self.fast_zero = false;
        self
    }

    pub fn without_multi_conn(mut self) -> FileDisk {
        self.multi_conn = false;
        self
    }

    pub fn read(&self) -> u64 {
        self.bytes_read.load(Ordering::SeqCst)
    }

    fn mark_written(&self, offset: u64, len: u64) {
        let mut w = self.written.lock().unwrap();
        for g in offset / GRANULE..(offset + len).div_ceil(GRANULE) {
            w[g as usize] = true;
        }
    }

    fn io(what: &str, offset: u64, e: impl std::fmt::Display) -> Error {
        Error::io(format!("test disk: {what} at {offset}: {e}"))
    }
}

impl Backend for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Self::io("read", offset, e))?;
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::SeqCst);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), Error> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Self::io("write", offset, e))?;
        self.mark_written(offset, data.len() as u64);
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), Error> {
        if fast && !(self.fast_zero && may_punch) {
            return Err(Error::refused(
                proto::ENOTSUP,
                "test disk: zeroes are written, not fast",
            ));
        }
        if may_punch {
            self.trim(offset, len, fua)?;
        } else {
            let zeroes = vec![0u8; 1 << 20];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeroes.len() as u64) as usize;
                self.write(at, &zeroes[..n], false)?;
                at += n as u64;
            }
            if fua {
                self.flush()?;
            }
        }
        self.mark_written(offset, len);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Error> {
        let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        rustix::fs::fallocate(&self.file, mode, offset, len)
            .map_err(|e| Self::io("punch", offset, e))?;
        self.mark_written(offset, len);
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        self.file.sync_data().map_err(|e| Self::io("sync", 0, e))
    }

    /// One extent per call, as the file says: the server gathers the rest.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        let end = offset + len;
        let hole = proto::STATE_HOLE | proto::STATE_ZERO;
        let data = match rustix::fs::seek(&self.file, SeekFrom::Data(offset)) {
            Ok(d) => d,
            // No data past offset.
            Err(rustix::io::Errno::NXIO) => end,
            Err(e) => return Err(Self::io("SEEK_DATA", offset, e)),
        };
        if data > offset {
            return Ok(vec![Extent {
                len: data.min(end) - offset,
                flags: hole,
            }]);
        }
        let next_hole = rustix::fs::seek(&self.file, SeekFrom::Hole(offset))
            .map_err(|e| Self::io("SEEK_HOLE", offset, e))?;
        Ok(vec![Extent {
            len: next_hole.min(end) - offset,
            flags: 0,
        }])
    }

    fn meta_contexts(&self, query: &str) -> Vec<String> {
        let name = "test:written";
        if query.is_empty() || query == name || query == "test:" {
            vec![name.to_string()]
        } else {
            Vec::new()
        }
    }

    fn context_status(&self, name: &str, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        if name != "test:written" {
            return Err(Error::refused(proto::ENOTSUP, format!("no context {name}")));
        }
        let w = self.written.lock().unwrap();
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            let next = ((at / GRANULE) + 1) * GRANULE;
            let e = Extent {
                len: next.min(end) - at,
                flags: if w[(at / GRANULE) as usize] {
                    WRITTEN
                } else {
                    0
                },
            };
            match out.last_mut() {
                Some(last) if last.flags == e.flags => last.len += e.len,
                _ => out.push(e),
            }
            at += e.len;
        }
        Ok(out)
    }

    fn multi_conn(&self) -> bool {
        self.multi_conn
    }
}

/// Bytes of data `i` of a test: never zero (so no client takes them for a hole).
pub fn pattern(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| ((k as u64 * 31 + i * 7) % 251 + 1) as u8)
        .collect()
}

/// A sparse file of `size` bytes with data at `ranges` (offset, len); returns its path.
pub fn sparse_file(dir: &Path, name: &str, size: u64, ranges: &[(u64, u64)]) -> PathBuf {
    let path = dir.join(name);
    let f = File::create(&path).unwrap();
    f.set_len(size).unwrap();
    for (i, &(offset, len)) in ranges.iter().enumerate() {
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(4 << 20);
            f.write_all_at(&pattern(i as u64 + at, n as usize), at)
                .unwrap();
            at += n;
        }
    }
    f.sync_all().unwrap();
    path
}

/// The layout `ranges` of data make in `size` bytes: (offset, len, is_data), holes between.
pub fn layout(size: u64, ranges: &[(u64, u64)]) -> Vec<(u64, u64, bool)> {
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut out = Vec::new();
    let mut at = 0;
    for (offset, len) in sorted {
        if offset > at {
            push_run(&mut out, (at, offset - at, false));
        }
        push_run(&mut out, (offset, len, true));
        at = offset + len;
    }
    if at < size {
        push_run(&mut out, (at, size - at, false));
    }
    out
}

/// Appends a run, merged with the last one when both are data or both holes.
pub fn push_run(out: &mut Vec<(u64, u64, bool)>, run: (u64, u64, bool)) {
    match out.last_mut() {
        Some(last) if last.2 == run.2 && last.0 + last.1 == run.0 => last.1 += run.1,
        _ => out.push(run),
    }
}

/// A server on a Unix socket and on TCP 127.0.0.1, each accept loop on its thread; closed
/// when dropped.
pub struct Serving {
    pub server: Arc<Server>,
    pub socket: PathBuf,
    pub tcp: SocketAddr,
}

impl Serving {
    pub fn start(dir: &Path, server: Server) -> Serving {
        let server = Arc::new(server);
        let socket = dir.join("nbd.sock");
        let unix = bind_unix(&socket).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let s = Arc::clone(&server);
        thread::spawn(move || s.serve_unix(unix));
        let s = Arc::clone(&server);
        thread::spawn(move || s.serve_tcp(tcp));
        Serving {
            server,
            socket,
            tcp: addr,
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///{EXPORT}?socket={}", self.socket.display())
    }

    /// qemu's `--image-opts` for the export over the Unix socket.
    pub fn qemu_opts(&self) -> String {
        format!("driver=nbd,path={},export={EXPORT}", self.socket.display())
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.server.close();
    }
}

/// Runs a client; a missing program fails the test naming the Debian package that has it.
pub fn run(program: &str, package: &str, args: &[&str]) -> Output {
    match Command::new(program).args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            panic!("{program} is not installed: apt-get install {package}")
        }
        Err(e) => panic!("running {program}: {e}"),
    }
}

pub fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Runs a client that must succeed; returns its standard output.
pub fn run_ok(program: &str, package: &str, args: &[&str]) -> String {
    let out = run(program, package, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Python with Debian's libnbd bindings (`nbdsh`'s; a `python3` earlier on PATH may lack
/// them).
pub const PYTHON: &str = "/usr/bin/python3";

/// Runs a Python script using libnbd (`import nbd`) with `args`; it must succeed.
pub fn python_ok(script: &str, args: &[&str]) -> String {
    let check = run(PYTHON, "python3-libnbd", &["-c", "import nbd"]);
    assert!(
        check.status.success(),
        "Python cannot import nbd: apt-get install python3-libnbd\n{}",
        text(&check)
    );
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    run_ok(PYTHON, "python3-libnbd", &all)
}
