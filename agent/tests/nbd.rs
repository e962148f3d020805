//! The agent's NBD front end against real qemu-io and qemu-img, and a raw client for requests
//! qemu never sends.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;

use common::*;

#[test]
fn qemu_workload_matches_reference_and_log_replays_to_the_disk() {
    let seed = std::env::var("HAVEN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_0001u64);
    eprintln!("seed {seed} (set HAVEN_TEST_SEED to replay)");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let reference = dir.path().join("reference.raw");
    let log_dir = dir.path().join("log");
    sparse_file(&disk, DISK_SIZE);
    sparse_file(&reference, DISK_SIZE);
    // Small segments so the log rolls over several times.
    let agent = Agent::start(
        dir.path(),
        &disk,
        &log_dir,
        true,
        &["--log-segment-bytes", "4194304"],
    );

    // qemu-img sees the size over NBD.
    let info = Command::new("qemu-img")
        .args(["info", &agent.tcp_url()])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("virtual size: 64 MiB (67108864 bytes)"),
        "{info}"
    );

    // Several clients one after the other, over TCP and the Unix socket.
    let mut rng = Rng::new(seed);
    for round in 0..4 {
        let cmds = workload(&mut rng, 40, 0, DISK_SIZE);
        let url = if round % 2 == 0 {
            agent.tcp_url()
        } else {
            agent.unix_url()
        };
        qemu_io_ok(&url, &cmds);
        qemu_io_ok(reference.to_str().unwrap(), &cmds);
    }
    // What one client wrote, the next reads back.
    let last = vec!["write -P 0x5a 12345 7000".to_string(), "flush".to_string()];
    qemu_io_ok(&agent.unix_url(), &last);
    qemu_io_ok(reference.to_str().unwrap(), &last);
    qemu_io_ok(&agent.tcp_url(), &["read -P 0x5a 12345 7000".to_string()]);

    assert!(images_equal(
        disk.to_str().unwrap(),
        reference.to_str().unwrap()
    ));
    assert!(images_equal(&agent.tcp_url(), reference.to_str().unwrap()));
    drop(agent);

    // The log is complete and ordered: replayed onto zeroes it gives the disk.
    let records = log_dump(&log_dir);
    assert!(records.len() > 100, "{} records", records.len());
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.0, i as u64 + 1, "sequence numbers are contiguous from 1");
    }
    for kind in ["write", "zero", "trim"] {
        assert!(records.iter().any(|r| r.1 == kind), "no {kind} record");
    }
    assert!(
        records.iter().all(|r| r.2 % 512 == 0 && r.3 % 512 == 0),
        "all aligned"
    );
    let segments = std::fs::read_dir(&log_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "hlog")
        })
        .count();
    assert!(segments > 1, "log rolled over ({segments} segments)");
    let replayed = dir.path().join("replayed.raw");
    let out = replay_onto_zeroes(&log_dir, &replayed);
    assert!(
        out.contains(&format!("applied {} records", records.len())),
        "{out}"
    );
    assert!(images_equal(
        replayed.to_str().unwrap(),
        disk.to_str().unwrap()
    ));
}

/// A minimal NBD client for requests qemu never sends.
struct Raw(UnixStream);

impl Raw {
    fn connect(agent: &Agent, client_flags: u32) -> Raw {
        let mut s = UnixStream::connect(&agent.socket).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        assert_eq!(&greet[0..8], b"NBDMAGIC");
        assert_eq!(&greet[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([greet[16], greet[17]]),
            3,
            "fixed newstyle, no zeroes"
        );
        s.write_all(&client_flags.to_be_bytes()).unwrap();
        Raw(s)
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = b"IHAVEOPT".to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }

    /// One option reply: (option, reply type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            0x3e889045565a9
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data,
        )
    }

    fn go(&mut self, name: &str) -> (u64, u16, [u32; 3]) {
        self.option(7, &info_data(name, &[3]));
        let (mut size, mut flags, mut bs) = (0, 0, [0; 3]);
        loop {
            let (opt, typ, d) = self.reply();
            assert_eq!(opt, 7);
            match typ {
                1 => return (size, flags, bs),
                3 if d[0..2] == [0, 0] => {
                    size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes([d[10], d[11]]);
                }
                3 if d[0..2] == [0, 3] => {
                    for (i, b) in bs.iter_mut().enumerate() {
                        *b = u32::from_be_bytes(d[2 + 4 * i..6 + 4 * i].try_into().unwrap());
                    }
                }
                other => panic!("unexpected reply {other:#x}"),
            }
        }
    }

    fn request(&mut self, flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) {
        let mut b = 0x25609513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&b).unwrap();
    }

    /// A simple reply: its error, after checking the handle.
    fn simple_reply(&mut self, handle: u64) -> u32 {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x67446698);
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), handle);
        u32::from_be_bytes(h[4..8].try_into().unwrap())
    }
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

const EINVAL: u32 = 22;
const EOVERFLOW: u32 = 75;

#[test]
fn handshake_options_and_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let log_dir = dir.path().join("log");
    sparse_file(&disk, DISK_SIZE);
    let agent = Agent::start(dir.path(), &disk, &log_dir, false, &[]);

    // Negotiation: LIST, an unsupported option, INFO of an unknown and of the real export.
    let mut c = Raw::connect(&agent, 3);
    c.option(3, &[]);
    let (_, typ, d) = c.reply();
    assert_eq!(typ, 2);
    assert_eq!(&d[4..], EXPORT.as_bytes());
    assert_eq!(c.reply().1, 1);
    c.option(4, &[]); // NBD_OPT_PEEK_EXPORT, withdrawn from the protocol
    assert_eq!(
        c.reply(),
        (
            4,
            0x8000_0001,
            b"option 4 is not supported by this server".to_vec()
        )
    );
    c.option(6, &info_data("nope", &[]));
    assert_eq!(c.reply().1, 0x8000_0006);
    c.option(6, &[0, 0, 0, 9]); // cut short
    assert_eq!(c.reply().1, 0x8000_0003);
    let (size, flags, bs) = c.go(EXPORT);
    assert_eq!(size, DISK_SIZE);
    assert_eq!(
        flags,
        1 | 4 | 8 | 32 | 64 | 256 | 1024 | 2048,
        "HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES CAN_MULTI_CONN SEND_CACHE \
         SEND_FAST_ZERO"
    );
    assert_eq!(bs, [512, 4096, 32 << 20]);

    // Bad requests get EINVAL (EOVERFLOW when too large) and the connection keeps serving.
    c.request(0, 0, 1, DISK_SIZE, 512); // read past the end
    assert_eq!(c.simple_reply(1), EINVAL);
    c.request(0, 0, 2, DISK_SIZE - 512, 1024); // read across the end
    assert_eq!(c.simple_reply(2), EINVAL);
    c.request(0, 0, 3, 100, 512); // unaligned
    assert_eq!(c.simple_reply(3), EINVAL);
    c.request(0, 0, 4, 0, (32 << 20) + 512); // read too large
    assert_eq!(c.simple_reply(4), EOVERFLOW);
    c.request(0, 1, 5, DISK_SIZE, 512); // write past the end, with its payload
    c.0.write_all(&[7u8; 512]).unwrap();
    assert_eq!(c.simple_reply(5), EINVAL);
    let big = (33u32 << 20) + 512; // write too large: the payload is drained, not held
    c.request(0, 1, 6, 0, big);
    let chunk = vec![9u8; 1 << 20];
    let mut left = big as usize;
    while left > 0 {
        let n = left.min(chunk.len());
        c.0.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    assert_eq!(c.simple_reply(6), EOVERFLOW);
    c.request(0, 4, 7, DISK_SIZE - 512, 4096); // trim past the end
    assert_eq!(c.simple_reply(7), EINVAL);
    c.request(0, 99, 8, 0, 0); // unknown command
    assert_eq!(c.simple_reply(8), EINVAL);

    // A good write with FUA, and reading it back.
    c.request(1, 1, 9, 4096, 1024);
    c.0.write_all(&[0xC3; 1024]).unwrap();
    assert_eq!(c.simple_reply(9), 0);
    c.request(0, 0, 10, 4096, 1024);
    assert_eq!(c.simple_reply(10), 0);
    let mut back = [0u8; 1024];
    c.0.read_exact(&mut back).unwrap();
    assert_eq!(back, [0xC3; 1024]);
    c.request(0, 3, 11, 0, 0); // flush
    assert_eq!(c.simple_reply(11), 0);
    c.request(0, 2, 12, 0, 0); // disconnect
    let mut rest = Vec::new();
    c.0.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // EXPORT_NAME without NO_ZEROES: size, flags, 124 zero bytes.
    let mut c = Raw::connect(&agent, 1);
    c.option(1, EXPORT.as_bytes());
    let mut r = [0u8; 134];
    c.0.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), DISK_SIZE);
    assert!(r[10..].iter().all(|&b| b == 0));
    c.request(0, 0, 1, 4096, 512);
    assert_eq!(c.simple_reply(1), 0);
    let mut back = [0u8; 512];
    c.0.read_exact(&mut back).unwrap();
    assert_eq!(back, [0xC3; 512]);
    drop(c);

    // ABORT is acknowledged.
    let mut c = Raw::connect(&agent, 3);
    c.option(2, &[]);
    assert_eq!(c.reply(), (2, 1, vec![]));
    drop(c);

    // qemu-io: a read past the end is an error, and the server goes on serving.
    let out = qemu_io(&agent.unix_url(), &[format!("read {DISK_SIZE} 512")]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("failed") || !out.status.success(), "{text}");
    qemu_io_ok(&agent.unix_url(), &["read -P 0xc3 4096 1024".to_string()]);

    // Only the one good write reached the log.
    drop(agent);
    let records = log_dump(&log_dir);
    assert_eq!(records, vec![(1, "write".to_string(), 4096, 1024)]);
}

#[test]
fn log_full_makes_writes_fail_with_enospc_and_leaves_the_disk_alone() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let log_dir = dir.path().join("log");
    sparse_file(&disk, DISK_SIZE);
    let limits = ["--log-max-bytes", "262144", "--log-segment-bytes", "131072"];
    let agent = Agent::start(dir.path(), &disk, &log_dir, false, &limits);
    qemu_io_ok(
        &agent.unix_url(),
        &["write -P 1 0 64k".to_string(), "write -P 2 64k 64k".into()],
    );
    let out = qemu_io(&agent.unix_url(), &["write -P 3 1M 512k".to_string()]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("No space left on device"), "{text}");
    qemu_io_ok(
        &agent.unix_url(),
        &["read -P 0 1M 512k".to_string(), "read -P 2 64k 64k".into()],
    );
    drop(agent);
    assert_eq!(log_dump(&log_dir).len(), 2);
}
