//! The server against real clients over a disk in a sparse file: nbdinfo, qemu-img, nbdcopy
//! (Debian's libnbd-bin and qemu-utils) and libnbd's Python bindings (python3-libnbd, what
//! nbdsh runs). What they see of the allocation is the file's real data and holes, a sparse
//! export is copied reading only its data, and the protocol's corners are answered with the
//! right errors.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{
    EXPORT, FileDisk, Serving, layout, pattern, push_run, python_ok, run_ok, sparse_file,
};
use haven_nbd::Server;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Data of the 64 MiB test disk: unaligned to anything larger than 64 KiB, and ending at the
/// end of the disk.
const SIZE: u64 = 64 * MIB;
const DATA: &[(u64, u64)] = &[
    (4 * MIB, MIB),
    (20 * MIB, 64 << 10),
    (20 * MIB + (128 << 10), 192 << 10),
    (60 * MIB, 4 * MIB),
];

fn data_bytes(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|r| r.1).sum()
}

/// A server for a fresh sparse disk with [`DATA`].
fn serve_disk(dir: &Path, disk: impl FnOnce(FileDisk) -> FileDisk) -> (Serving, Arc<FileDisk>) {
    let path = sparse_file(dir, "disk.img", SIZE, DATA);
    let disk = Arc::new(disk(FileDisk::open(&path, false)));
    let s = Serving::start(dir, Server::new(disk.clone(), EXPORT));
    (s, disk)
}

/// `nbdinfo --map` lines as (offset, len, type).
fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let out = run_ok("nbdinfo", "libnbd-bin", &[&format!("--map={context}"), uri]);
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

/// qemu-img map's JSON as data runs (offset, len, is_data), merged.
fn qemu_map(args: &[&str]) -> Vec<(u64, u64, bool)> {
    let mut all = vec!["map", "--output=json"];
    all.extend_from_slice(args);
    let out = run_ok("qemu-img", "qemu-utils", &all);
    let entries: Vec<Value> = serde_json::from_str(&out).unwrap();
    let mut runs = Vec::new();
    for e in entries {
        let run = (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["data"].as_bool().unwrap(),
        );
        push_run(&mut runs, run);
    }
    runs
}

#[test]
fn nbdinfo_sees_the_files_data_and_holes_and_the_features() {
    let dir = tempfile::tempdir().unwrap();
    let (s, disk) = serve_disk(dir.path(), |d| d);

    let mut runs = Vec::new();
    for (offset, len, typ) in nbdinfo_map(&s.uri(), "base:allocation") {
        assert!(typ == 0 || typ == 3, "type {typ} at {offset}");
        push_run(&mut runs, (offset, len, typ == 0));
    }
    assert_eq!(
        runs,
        layout(SIZE, DATA),
        "nbdinfo --map against what was written"
    );
    assert_eq!(disk.read(), 0, "block status reads nothing");

    let json = run_ok("nbdinfo", "libnbd-bin", &["--json", &s.uri()]);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["structured"], true, "{json}");
    assert_eq!(v["TLS"], false, "{json}");
    let e = &v["exports"][0];
    for flag in [
        "can_multi_conn",
        "can_fast_zero",
        "can_df",
        "can_cache",
        "can_zero",
        "can_fua",
    ] {
        assert_eq!(e[flag], true, "{flag}: {json}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(e["export-size"], SIZE);
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(contexts, ["base:allocation", "test:written"]);

    // The backend's own context, after writes through NBD (whole 64 KiB granules).
    run_ok(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 7 8M 64k",
            "-c",
            "write -z 9M 128k",
            &s.uri(),
        ],
    );
    let written: Vec<(u64, u64, u32)> = nbdinfo_map(&s.uri(), "test:written");
    assert_eq!(
        written,
        [
            (0, 8 * MIB, 0),
            (8 * MIB, 64 << 10, 1),
            (8 * MIB + (64 << 10), MIB - (64 << 10), 0),
            (9 * MIB, 128 << 10, 1),
            (9 * MIB + (128 << 10), SIZE - 9 * MIB - (128 << 10), 0),
        ]
    );
}

#[test]
fn nbdinfo_sees_multi_conn_only_when_the_backend_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = serve_disk(dir.path(), FileDisk::without_multi_conn);
    let json = run_ok("nbdinfo", "libnbd-bin", &["--json", &s.uri()]);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["exports"][0]["can_multi_conn"], false, "{json}");
}

#[test]
fn qemu_img_maps_and_converts_a_sparse_export_keeping_its_holes() {
    let dir = tempfile::tempdir().unwrap();
    let (s, disk) = serve_disk(dir.path(), |d| d);
    // qemu speaks extended headers: 64-bit block status.
    assert_eq!(qemu_map(&["-f", "raw", &s.uri()]), layout(SIZE, DATA));

    let qcow2 = dir.path().join("copy.qcow2");
    let qcow2 = qcow2.to_str().unwrap();
    run_ok(
        "qemu-img",
        "qemu-utils",
        &["convert", "-f", "raw", "-O", "qcow2", &s.uri(), qcow2],
    );
    let data = data_bytes(DATA);
    assert!(
        (data..=data + MIB).contains(&disk.read()),
        "convert read {} bytes of an export with {data} bytes of data",
        disk.read()
    );
    assert_eq!(
        qemu_map(&["-f", "qcow2", qcow2]),
        layout(SIZE, DATA),
        "holes kept"
    );
    let allocated = std::fs::metadata(qcow2).unwrap().len();
    assert!(allocated < data + 2 * MIB, "a qcow2 of {allocated} bytes");
    let out = run_ok(
        "qemu-img",
        "qemu-utils",
        &["compare", "-f", "raw", "-F", "qcow2", &s.uri(), qcow2],
    );
    assert!(out.contains("identical"), "{out}");
}

/// 16 GiB apparent, 64 MiB of data: nbdcopy (four connections, multi-conn) reads the data
/// only, and the copy is the same, holes and all.
#[test]
fn nbdcopy_of_a_large_sparse_export_reads_only_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16u64 << 30;
    let ranges: Vec<(u64, u64)> = (0..16u64)
        .map(|i| (i * (1 << 30) + i * MIB, 4 * MIB))
        .collect();
    let path = sparse_file(dir.path(), "big.img", size, &ranges);
    let disk = Arc::new(FileDisk::open(&path, true));
    let s = Serving::start(dir.path(), Server::new(disk.clone(), EXPORT));

    let copy = dir.path().join("copy.img");
    std::fs::File::create(&copy).unwrap().set_len(size).unwrap();
    let copy = copy.to_str().unwrap();
    run_ok("nbdcopy", "libnbd-bin", &[&s.uri(), copy]);
    let data = data_bytes(&ranges);
    assert_eq!(data, 64 * MIB);
    assert!(
        (data..=data + 4 * MIB).contains(&disk.read()),
        "nbdcopy read {} bytes of a 16 GiB export with {data} bytes of data",
        disk.read()
    );
    let out = run_ok(
        "qemu-img",
        "qemu-utils",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            path.to_str().unwrap(),
            copy,
        ],
    );
    assert!(out.contains("identical"), "{out}");
    assert_eq!(
        qemu_map(&["-f", "raw", copy]),
        layout(size, &ranges),
        "holes kept"
    );
}

/// Block status with and without REQ_ONE, contexts by name, and reads of holes: answered from
/// the allocation, with nothing read from the disk.
const STATUS_AND_HOLES: &str = r#"
import sys, nbd
uri, hole, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
for c in ["base:allocation", "test:written", "x-unknown:thing"]:
    h.add_meta_context(c)
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation") and h.can_meta_context("test:written")
assert not h.can_meta_context("x-unknown:thing"), "an unknown context was selected"

seen = {}
def status(ctx, offset, entries, err):
    seen[ctx] = (offset, list(entries))
    return 0
h.block_status(4 << 20, hole, status, nbd.CMD_FLAG_REQ_ONE)
assert seen["base:allocation"] == (hole, [1 << 20, 3]), seen
assert seen["test:written"] == (hole, [4 << 20, 0]), seen
seen.clear()
h.block_status(2 << 20, data - (1 << 20), status)
assert seen["base:allocation"] == (data - (1 << 20), [1 << 20, 3, 1 << 20, 0]), seen

chunks = []
def chunk(buf, offset, kind, err):
    chunks.append((kind, offset, len(buf), bytes(buf) == bytes(len(buf))))
    return 0
buf = h.pread_structured(1 << 20, hole, chunk)
assert buf == bytes(1 << 20)
assert chunks == [(nbd.READ_HOLE, hole, 1 << 20, True)], chunks
chunks.clear()
buf = h.pread_structured(65536, hole + 4096, chunk, nbd.CMD_FLAG_DF)
assert chunks == [(nbd.READ_HOLE, hole + 4096, 65536, True)], chunks
h.shutdown()
print("ok")
"#;

#[test]
fn libnbd_block_status_req_one_and_hole_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (s, disk) = serve_disk(dir.path(), |d| d);
    // 3 MiB..4 MiB is a hole followed by data at 4 MiB.
    let (hole, data) = (3 * MIB, 4 * MIB);
    let out = python_ok(
        STATUS_AND_HOLES,
        &[&s.uri(), &hole.to_string(), &data.to_string()],
    );
    assert_eq!(out.trim(), "ok");
    assert_eq!(disk.read(), 0, "holes are not read");
}

/// Requests the server refuses, each with its error and a message (libnbd logs it), the
/// connection serving on after each.
const REFUSED: &str = r#"
import sys, nbd
uri = sys.argv[1]
h = nbd.NBD()
said = []
h.set_debug(True)
h.set_debug_callback(lambda ctx, m: said.append(m) if "server message" in m else None)
h.set_strict_mode(0)  # send what libnbd itself would refuse
h.connect_uri(uri)
size = h.get_size()
def refused(want, fn, *args):
    said.clear()
    try:
        fn(*args)
    except nbd.Error as e:
        assert e.errno == want, (fn.__name__, args[:2], e.errno, e.string)
        assert said, "no message from the server for %s" % fn.__name__
        print(want, said[0])
        assert h.pread(512, 0) is not None  # still connected
        return
    raise AssertionError("%s %r succeeded" % (fn.__name__, args[:2]))
refused("ENOTSUP", h.zero, 65536, 0, nbd.CMD_FLAG_FAST_ZERO)
refused("EINVAL", h.pread, 4096, size)
refused("EINVAL", h.zero, 4096, size - 2048)
refused("EOVERFLOW", h.pread, 48 << 20, 0)
refused("EOVERFLOW", h.pwrite, bytes(48 << 20), 0)
refused("EINVAL", h.block_status, 4096, 0, lambda *a: 0)
h.zero(65536, 0)  # without FAST_ZERO: written
assert h.pread(65536, 0) == bytes(65536)
h.shutdown()
print("ok")
"#;

#[test]
fn libnbd_refused_requests_get_their_errors_not_a_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = serve_disk(dir.path(), FileDisk::without_fast_zero);
    let out = python_ok(REFUSED, &[&s.uri()]);
    assert!(out.ends_with("ok\n"), "{out}");
    for said in [
        "ENOTSUP structured error server message: test disk: zeroes are written, not fast",
        "EINVAL structured error server message: request 67108864+4096 is past the end",
        "EOVERFLOW structured error server message: read of 50331648 bytes is longer than the \
         maximum 33554432",
        "EOVERFLOW structured error server message: write of 50331648 bytes",
        "EINVAL structured error server message: BLOCK_STATUS without a metadata context selected",
    ] {
        assert!(out.contains(said), "{said:?} not in:\n{out}");
    }
}

/// A fast zero the disk can do punches a hole.
#[test]
fn a_fast_zero_the_backend_can_do_punches_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = serve_disk(dir.path(), |d| d);
    let script = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.can_fast_zero()
h.zero(1 << 20, 4 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.shutdown()
"#;
    python_ok(script, &[&s.uri()]);
    let mut want = DATA.to_vec();
    want[0] = (5 * MIB, 0);
    want.retain(|r| r.1 > 0);
    let mut runs = Vec::new();
    for (offset, len, typ) in nbdinfo_map(&s.uri(), "base:allocation") {
        push_run(&mut runs, (offset, len, typ == 0));
    }
    assert_eq!(runs, layout(SIZE, &want));
}

const LIMIT: &str = r#"
import sys, time, nbd
uri, limit = sys.argv[1], int(sys.argv[2])
open_ = []
for _ in range(limit):
    h = nbd.NBD()
    h.connect_uri(uri)
    open_.append(h)
over = nbd.NBD()
said = []
over.set_debug(True)
over.set_debug_callback(lambda ctx, m: said.append(m) if "server" in m else None)
try:
    over.connect_uri(uri)
    raise AssertionError("a connection over the limit was served")
except nbd.Error as e:
    print(e.string)
    print("\n".join(said))
open_.pop().shutdown()
# Its slot comes back once the server has seen it go.
for _ in range(200):
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        break
    except nbd.Error:
        time.sleep(0.01)
else:
    raise AssertionError("no slot after a connection ended")
assert h.pread(512, 0) is not None
"#;

#[test]
fn connections_over_the_limit_are_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk.img", SIZE, DATA);
    let disk = Arc::new(FileDisk::open(&path, false));
    let s = Serving::start(
        dir.path(),
        Server::new(disk, EXPORT).with_max_connections(2),
    );
    let out = python_ok(LIMIT, &[&s.uri(), "2"]);
    assert!(
        out.contains("server policy prevents NBD_OPT_GO"),
        "libnbd said: {out}"
    );
    assert!(
        out.contains("export \"vdb\" already has 2 connections, the most it allows"),
        "libnbd said: {out}"
    );
}

/// qemu-io (extended headers) reads holes without the disk being read.
#[test]
fn qemu_io_reads_holes_without_reading_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (s, disk) = serve_disk(dir.path(), |d| d);
    run_ok(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0 0 4M",
            "-c",
            "write -P 9 4M 64k",
            "-c",
            "read -P 9 4M 64k",
            "-c",
            "read -P 0 32M 16M",
            &s.uri(),
        ],
    );
    assert_eq!(
        disk.read(),
        64 << 10,
        "only the data was read from the disk"
    );
    let out = run_ok(
        "qemu-io",
        "qemu-utils",
        &["-f", "raw", "-r", "-c", "read -v 60M 16", &s.uri()],
    );
    let first = pattern(3 + 60 * MIB, 16);
    let hex: Vec<String> = first.iter().map(|b| format!("{b:02x}")).collect();
    assert!(out.contains(&hex.join(" ")), "{out}");
}
