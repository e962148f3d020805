//! Protocol corners no client library sends on purpose, on a raw socket: structured and
//! extended replies chunk by chunk, 64-bit lengths, DF, and requests the server refuses —
//! answered with their error while the connection goes on, except where the protocol says to
//! disconnect.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::{EXPORT, FileDisk, Serving, pattern, sparse_file};
use haven_nbd::{Server, proto};

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Simple,
    Structured,
    Extended,
}

/// One chunk (or a simple reply: type `None`, error in `error`).
#[derive(Debug)]
struct Chunk {
    flags: u16,
    typ: Option<u16>,
    handle: u64,
    error: u32,
    payload: Vec<u8>,
}

impl Chunk {
    fn done(&self) -> bool {
        self.typ.is_none() || self.flags & proto::REPLY_FLAG_DONE != 0
    }

    /// The errno and message of an error chunk (0 for any other).
    fn error(&self) -> (u32, String) {
        match self.typ {
            None => (self.error, String::new()),
            Some(t) if t & (1 << 15) == 0 => (0, String::new()),
            Some(_) => {
                let p = &self.payload;
                let len = u16::from_be_bytes([p[4], p[5]]) as usize;
                (
                    u32::from_be_bytes(p[0..4].try_into().unwrap()),
                    String::from_utf8_lossy(&p[6..6 + len]).into_owned(),
                )
            }
        }
    }
}

struct Raw {
    s: UnixStream,
    mode: Mode,
}

impl Raw {
    /// Connects, negotiates `mode` (with `contexts` selected) and enters transmission.
    fn connect(serving: &Serving, mode: Mode, contexts: &[&str]) -> Raw {
        let mut s = UnixStream::connect(&serving.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut raw = Raw { s, mode };
        match mode {
            Mode::Simple => {}
            Mode::Structured => assert_eq!(
                raw.option(proto::OPT_STRUCTURED_REPLY, &[])[0].0,
                proto::REP_ACK
            ),
            Mode::Extended => assert_eq!(
                raw.option(proto::OPT_EXTENDED_HEADERS, &[])[0].0,
                proto::REP_ACK
            ),
        }
        if !contexts.is_empty() {
            let mut d = (EXPORT.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(EXPORT.as_bytes());
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for c in contexts {
                d.extend_from_slice(&(c.len() as u32).to_be_bytes());
                d.extend_from_slice(c.as_bytes());
            }
            let replies = raw.option(proto::OPT_SET_META_CONTEXT, &d);
            assert_eq!(replies.len(), contexts.len() + 1, "every context selected");
        }
        let mut d = (EXPORT.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(EXPORT.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let replies = raw.option(proto::OPT_GO, &d);
        assert_eq!(replies.last().unwrap().0, proto::REP_ACK, "{replies:?}");
        raw
    }

    /// Sends an option; returns its replies (type, data) up to the final one.
    fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            self.s.read_exact(&mut d).unwrap();
            let last = typ != proto::REP_INFO && typ != proto::REP_META_CONTEXT;
            out.push((typ, d));
            if last {
                return out;
            }
        }
    }

    /// Sends a request (compact or extended as negotiated) and `payload`.
    fn send(&mut self, flags: u16, cmd: u16, handle: u64, offset: u64, len: u64, payload: &[u8]) {
        let mut b = Vec::new();
        if self.mode == Mode::Extended {
            b.extend_from_slice(&proto::EXTENDED_REQUEST_MAGIC.to_be_bytes());
        } else {
            b.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        }
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        if self.mode == Mode::Extended {
            b.extend_from_slice(&len.to_be_bytes());
        } else {
            b.extend_from_slice(&(len as u32).to_be_bytes());
        }
        self.s.write_all(&b).unwrap();
        self.s.write_all(payload).unwrap();
    }

    /// The next chunk; a simple reply to a READ brings `read_len` bytes of data.
    fn chunk(&mut self, read_len: usize, request_offset: u64) -> Chunk {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).unwrap();
        match u32::from_be_bytes(magic) {
            proto::SIMPLE_REPLY_MAGIC => {
                assert_eq!(self.mode, Mode::Simple);
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).unwrap();
                let error = u32::from_be_bytes(h[0..4].try_into().unwrap());
                let mut payload = vec![0u8; if error == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut payload).unwrap();
                Chunk {
                    flags: 0,
                    typ: None,
                    handle: u64::from_be_bytes(h[4..12].try_into().unwrap()),
                    error,
                    payload,
                }
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                assert_eq!(self.mode, Mode::Structured);
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).unwrap();
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
                self.payload(&h[0..12], len)
            }
            proto::EXTENDED_REPLY_MAGIC => {
                assert_eq!(self.mode, Mode::Extended);
                let mut h = [0u8; 28];
                self.s.read_exact(&mut h).unwrap();
                assert_eq!(
                    h[12..20],
                    request_offset.to_be_bytes(),
                    "the request's offset"
                );
                let len = u64::from_be_bytes(h[20..28].try_into().unwrap()) as usize;
                self.payload(&h[0..12], len)
            }
            other => panic!("reply magic {other:#x}"),
        }
    }

    fn payload(&mut self, h: &[u8], len: usize) -> Chunk {
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload).unwrap();
        Chunk {
            flags: u16::from_be_bytes([h[0], h[1]]),
            typ: Some(u16::from_be_bytes([h[2], h[3]])),
            handle: u64::from_be_bytes(h[4..12].try_into().unwrap()),
            error: 0,
            payload,
        }
    }

    /// Every chunk of the reply to a request sent alone.
    fn reply(&mut self, handle: u64, read_len: usize, offset: u64) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            let c = self.chunk(read_len, offset);
            assert_eq!(c.handle, handle);
            let done = c.done();
            out.push(c);
            if done {
                return out;
            }
        }
    }

    /// Sends a request and checks it was refused with `errno` (and, with chunks, a message).
    fn refused(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
        errno: u32,
    ) -> String {
        self.send(flags, cmd, 77, offset, len, payload);
        let r = self.reply(77, 0, offset);
        assert_eq!(r.len(), 1, "{r:?}");
        let (e, msg) = r[0].error();
        assert_eq!(e, errno, "command {cmd}: {msg}");
        if self.mode != Mode::Simple {
            assert_eq!(r[0].typ, Some(proto::REPLY_TYPE_ERROR));
            assert!(!msg.is_empty(), "an error without a message");
        }
        msg
    }

    /// Whether the connection still serves: a FLUSH is answered.
    fn serves(&mut self) -> bool {
        self.send(0, proto::CMD_FLUSH, 5, 0, 0, &[]);
        let r = self.reply(5, 0, 0);
        r.len() == 1 && r[0].error().0 == 0
    }

    fn ended(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// A 64 MiB disk: data at 1..2 MiB (nonzero) and 3..3.5 MiB, holes elsewhere.
fn serve(dir: &std::path::Path, size: u64) -> (Serving, Arc<FileDisk>) {
    let path = sparse_file(dir, "disk.img", size, &[(MIB, MIB), (3 * MIB, MIB / 2)]);
    let disk = Arc::new(FileDisk::open(&path, false));
    (Serving::start(dir, Server::new(disk.clone(), EXPORT)), disk)
}

fn content_chunks(chunks: &[Chunk]) -> Vec<(u16, u64, usize)> {
    chunks
        .iter()
        .map(|c| {
            let offset = u64::from_be_bytes(c.payload[0..8].try_into().unwrap());
            let len = match c.typ.unwrap() {
                proto::REPLY_TYPE_OFFSET_HOLE => {
                    u32::from_be_bytes(c.payload[8..12].try_into().unwrap()) as usize
                }
                _ => c.payload.len() - 8,
            };
            (c.typ.unwrap(), offset, len)
        })
        .collect()
}

#[test]
fn structured_reads_are_data_and_hole_chunks_and_one_chunk_with_df() {
    let dir = tempfile::tempdir().unwrap();
    let (s, disk) = serve(dir.path(), 64 * MIB);
    for mode in [Mode::Structured, Mode::Extended] {
        let mut c = Raw::connect(&s, mode, &[]);
        let before = disk.read();
        // 512 KiB hole, 1 MiB data, 1 MiB hole, 256 KiB data.
        let (offset, len) = (MIB / 2, 3 * MIB);
        c.send(0, proto::CMD_READ, 1, offset, len, &[]);
        let r = c.reply(1, 0, offset);
        assert_eq!(
            content_chunks(&r),
            [
                (proto::REPLY_TYPE_OFFSET_HOLE, MIB / 2, (MIB / 2) as usize),
                (proto::REPLY_TYPE_OFFSET_DATA, MIB, MIB as usize),
                (proto::REPLY_TYPE_OFFSET_HOLE, 2 * MIB, MIB as usize),
                (proto::REPLY_TYPE_OFFSET_DATA, 3 * MIB, (MIB / 2) as usize),
            ]
        );
        assert_eq!(r[1].payload[8..8 + 4096], pattern(MIB, 4096)[..]);
        assert!(r.last().unwrap().done() && r.iter().filter(|c| c.done()).count() == 1);
        assert_eq!(disk.read() - before, 3 * MIB / 2, "only the data was read");

        // DF: one data chunk, the holes as zeroes.
        c.send(proto::CMD_FLAG_DF, proto::CMD_READ, 2, offset, len, &[]);
        let r = c.reply(2, 0, offset);
        assert_eq!(
            content_chunks(&r),
            [(proto::REPLY_TYPE_OFFSET_DATA, offset, len as usize)]
        );
        let data = &r[0].payload[8..];
        assert!(data[..(MIB / 2) as usize].iter().all(|&b| b == 0));
        assert_eq!(data[(MIB / 2) as usize..][..4096], pattern(MIB, 4096)[..]);
        // A read of a hole alone: one hole chunk.
        c.send(proto::CMD_FLAG_DF, proto::CMD_READ, 3, 8 * MIB, 4096, &[]);
        let r = c.reply(3, 0, 8 * MIB);
        assert_eq!(
            content_chunks(&r),
            [(proto::REPLY_TYPE_OFFSET_HOLE, 8 * MIB, 4096)]
        );
        assert!(c.serves());
    }
}

#[test]
fn bad_requests_are_answered_with_their_error_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (s, disk) = serve(dir.path(), 64 * MIB);
    let max = u64::from(proto::MAX_BLOCK);
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = Raw::connect(&s, mode, &[]);
        let msg = c.refused(0, 99, 0, 4096, &[], proto::EINVAL);
        assert!(
            mode == Mode::Simple || msg.contains("unknown command 99"),
            "{msg}"
        );
        c.refused(0, proto::CMD_READ, 64 * MIB, 4096, &[], proto::EINVAL);
        c.refused(0, proto::CMD_READ, 0, 0, &[], proto::EINVAL);
        c.refused(0, proto::CMD_READ, 0, max + 4096, &[], proto::EOVERFLOW);
        c.refused(1 << 9, proto::CMD_WRITE, 0, 512, &[1; 512], proto::EINVAL);
        c.refused(0, proto::CMD_BLOCK_STATUS, 0, 4096, &[], proto::EINVAL);
        if mode == Mode::Simple {
            // DF needs structured replies.
            c.refused(
                proto::CMD_FLAG_DF,
                proto::CMD_READ,
                0,
                512,
                &[],
                proto::EINVAL,
            );
        }
        // A compact WRITE past the largest payload: read and dropped, then refused. (With
        // extended headers it ends the connection: see below.)
        if mode != Mode::Extended {
            let payload = vec![0xee; (max + 512) as usize];
            let msg = c.refused(
                0,
                proto::CMD_WRITE,
                0,
                max + 512,
                &payload,
                proto::EOVERFLOW,
            );
            assert!(
                mode == Mode::Simple || msg.contains("longer than the maximum"),
                "{msg}"
            );
        }
        // Another command with a payload (extended headers): drained, refused.
        if mode == Mode::Extended {
            let flags = proto::CMD_FLAG_PAYLOAD_LEN;
            c.refused(flags, proto::CMD_FLUSH, 0, 512, &[7; 512], proto::EINVAL);
        }
        assert!(c.serves(), "{mode:?}");
    }
    assert_eq!(disk.read(), 0, "nothing refused reached the disk");
}

#[test]
fn an_extended_payload_longer_than_the_maximum_ends_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = serve(dir.path(), 64 * MIB);
    let mut c = Raw::connect(&s, Mode::Extended, &[]);
    // 1 TiB announced: it cannot be drained; the protocol says the server SHOULD disconnect.
    // It decides on the header alone (no payload sent: a write could meet the closed socket).
    let flags = proto::CMD_FLAG_PAYLOAD_LEN;
    c.send(flags, proto::CMD_WRITE, 1, 0, 1 << 40, &[]);
    assert!(c.ended());
}

#[test]
fn extended_headers_carry_64_bit_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16u64 << 30;
    let (s, disk) = serve(dir.path(), size);
    let mut c = Raw::connect(&s, Mode::Extended, &["base:allocation", "test:written"]);

    // Block status of 8 GiB from 4 MiB: one hole longer than 4 GiB.
    let (offset, len) = (4 * MIB, 8u64 << 30);
    c.send(0, proto::CMD_BLOCK_STATUS, 1, offset, len, &[]);
    let r = c.reply(1, 0, offset);
    assert_eq!(r.len(), 2);
    for (i, chunk) in r.iter().enumerate() {
        assert_eq!(chunk.typ, Some(proto::REPLY_TYPE_BLOCK_STATUS_EXT));
        let p = &chunk.payload;
        let id = u32::from_be_bytes(p[0..4].try_into().unwrap());
        let count = u32::from_be_bytes(p[4..8].try_into().unwrap());
        assert_eq!((count as usize, p.len()), (1, 8 + 16));
        let extent = u64::from_be_bytes(p[8..16].try_into().unwrap());
        let flags = u64::from_be_bytes(p[16..24].try_into().unwrap());
        assert_eq!(extent, len, "context {id}");
        let want = if id == 0 {
            u64::from(proto::STATE_HOLE | proto::STATE_ZERO)
        } else {
            0
        };
        assert_eq!(flags, want, "context {id}");
        assert_eq!(chunk.done(), i == 1);
    }

    // A 64-bit TRIM and WRITE_ZEROES; a WRITE with its payload flag.
    c.send(0, proto::CMD_TRIM, 2, 8u64 << 30, 5u64 << 30, &[]);
    assert_eq!(
        c.reply(2, 0, 8u64 << 30)[0].typ,
        Some(proto::REPLY_TYPE_NONE)
    );
    c.send(0, proto::CMD_WRITE_ZEROES, 3, 1 << 30, 6u64 << 30, &[]);
    assert_eq!(c.reply(3, 0, 1 << 30)[0].typ, Some(proto::REPLY_TYPE_NONE));
    let data = pattern(42, 4096);
    c.send(
        proto::CMD_FLAG_PAYLOAD_LEN,
        proto::CMD_WRITE,
        4,
        15u64 << 30,
        4096,
        &data,
    );
    assert_eq!(
        c.reply(4, 0, 15u64 << 30)[0].typ,
        Some(proto::REPLY_TYPE_NONE)
    );
    c.send(0, proto::CMD_READ, 5, 15u64 << 30, 4096, &[]);
    let r = c.reply(5, 0, 15u64 << 30);
    assert_eq!(r[0].payload[8..], data[..]);

    // REQ_ONE: one extent per context, within the request; the write shows in test:written.
    c.send(
        proto::CMD_FLAG_REQ_ONE,
        proto::CMD_BLOCK_STATUS,
        6,
        15u64 << 30,
        1 << 30,
        &[],
    );
    let r = c.reply(6, 0, 15u64 << 30);
    let extents: Vec<(u64, u64)> = r
        .iter()
        .map(|c| {
            let p = &c.payload;
            assert_eq!(u32::from_be_bytes(p[4..8].try_into().unwrap()), 1);
            (
                u64::from_be_bytes(p[8..16].try_into().unwrap()),
                u64::from_be_bytes(p[16..24].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(extents, [(4096, 0), (64 << 10, 1)]);
    assert!(disk.read() <= 2 * 4096);
}
