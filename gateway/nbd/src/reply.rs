//! How replies are framed — simple, structured or extended, as the client negotiated — and
//! laid out. No I/O here: replies are built into buffers the transmission sends whole.
//!
//! With simple replies (the default) a reply is a 16-byte header, and a READ's data follows it.
//! Once the client negotiated structured replies (`NBD_OPT_STRUCTURED_REPLY`) or extended
//! headers (`NBD_OPT_EXTENDED_HEADERS`), every reply is a series of chunks, the last one
//! flagged DONE: a READ is answered with `OFFSET_DATA` and `OFFSET_HOLE` chunks (holes are not
//! read at all), a BLOCK_STATUS with one status chunk per selected context, an error with an
//! `ERROR` chunk carrying a message (`ERROR_OFFSET` when a read failed at an offset), and
//! anything else with `NONE`. Extended chunk headers differ from structured ones only in their
//! size (32 bytes, a 64-bit payload length) and in carrying the request's offset.

use crate::backend::{Error, Extent};
use crate::proto::{self, Request};

/// How replies are framed on one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Simple replies, compact requests.
    Simple,
    /// Structured reply chunks, compact requests.
    Structured,
    /// Extended reply chunks, extended (64-bit) requests.
    Extended,
}

/// One part of a READ's answer: bytes the backend reads, or zeroes it does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Read from the backend.
    Data { offset: u64, len: u64 },
    /// Reads as zeroes (`STATE_ZERO`): sent as a hole, never read.
    Zero { offset: u64, len: u64 },
}

impl Piece {
    pub(crate) fn len(self) -> u64 {
        match self {
            Piece::Data { len, .. } | Piece::Zero { len, .. } => len,
        }
    }
}

/// What is left to put into a laid-out READ reply: data to read from the backend into
/// `buf[at..at + len]`, or zeroes to fill it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    Read { at: usize, offset: u64, len: usize },
    Zero { at: usize, len: usize },
}

/// Payload bytes of an `OFFSET_HOLE` chunk: offset and 32-bit size.
const HOLE_PAYLOAD: usize = 12;
/// Payload bytes of an `OFFSET_DATA` chunk before its data: the offset.
const DATA_OFFSET: usize = 8;

impl Framing {
    /// Whether replies are chunks (structured or extended).
    pub(crate) fn chunks(self) -> bool {
        self != Framing::Simple
    }

    /// Size of a request header the client sends.
    pub(crate) fn request_len(self) -> usize {
        match self {
            Framing::Extended => proto::EXTENDED_REQUEST_LEN,
            Framing::Simple | Framing::Structured => proto::REQUEST_LEN,
        }
    }

    /// Size of one reply header (a simple reply's, or a chunk's).
    pub(crate) const fn header_len(self) -> usize {
        match self {
            Framing::Simple => proto::SIMPLE_REPLY_LEN,
            Framing::Structured => proto::STRUCTURED_REPLY_LEN,
            Framing::Extended => proto::EXTENDED_REPLY_LEN,
        }
    }

    /// Most bytes a READ reply needs beyond its data when it has at most `pieces` pieces.
    pub(crate) const fn read_overhead(self, pieces: usize) -> usize {
        // A hole chunk's payload is longer than a data chunk's before its data.
        const _: () = assert!(HOLE_PAYLOAD >= DATA_OFFSET);
        pieces * (self.header_len() + HOLE_PAYLOAD)
    }

    /// A chunk header into `dst` (exactly [`Framing::header_len`] bytes). Never called for
    /// simple framing, which has no chunks.
    fn chunk_header_into(self, dst: &mut [u8], req: &Request, flags: u16, typ: u16, len: usize) {
        match self {
            Framing::Extended => dst.copy_from_slice(&proto::extended_reply(
                flags, typ, req.handle, req.offset, len as u64,
            )),
            Framing::Simple | Framing::Structured => {
                dst.copy_from_slice(&proto::structured_reply(flags, typ, req.handle, len as u32))
            }
        }
    }

    /// Appends a chunk: its header and payload.
    fn put_chunk(self, out: &mut Vec<u8>, req: &Request, flags: u16, typ: u16, payload: &[u8]) {
        let at = out.len();
        out.resize(at + self.header_len(), 0);
        self.chunk_header_into(&mut out[at..], req, flags, typ, payload.len());
        out.extend_from_slice(payload);
    }

    /// Appends the whole reply to a request answered without data: success or `error`.
    pub(crate) fn done(self, out: &mut Vec<u8>, req: &Request, error: Option<&Error>) {
        match (self, error) {
            (_, Some(e)) => self.error(out, req, e, None),
            (Framing::Simple, None) => out.extend_from_slice(&proto::simple_reply(0, req.handle)),
            (_, None) => self.put_chunk(
                out,
                req,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                &[],
            ),
        }
    }

    /// Appends the whole reply of a failed request: its errno, and with chunks its message (and
    /// the offset where a read failed).
    pub(crate) fn error(self, out: &mut Vec<u8>, req: &Request, e: &Error, offset: Option<u64>) {
        if self == Framing::Simple {
            out.extend_from_slice(&proto::simple_reply(e.errno(), req.handle));
            return;
        }
        let typ = match offset {
            Some(_) => proto::REPLY_TYPE_ERROR_OFFSET,
            None => proto::REPLY_TYPE_ERROR,
        };
        let payload = proto::error_payload(e.errno(), e.message(), offset);
        self.put_chunk(out, req, proto::REPLY_FLAG_DONE, typ, &payload);
    }

    /// Appends one context's status chunk (32-bit lengths, or 64-bit with extended headers);
    /// `last` flags it DONE.
    pub(crate) fn block_status(
        self,
        out: &mut Vec<u8>,
        req: &Request,
        id: u32,
        extents: &[Extent],
        last: bool,
    ) {
        let flags = if last { proto::REPLY_FLAG_DONE } else { 0 };
        match self {
            Framing::Extended => self.put_chunk(
                out,
                req,
                flags,
                proto::REPLY_TYPE_BLOCK_STATUS_EXT,
                &proto::block_status_ext_payload(id, extents),
            ),
            Framing::Simple | Framing::Structured => self.put_chunk(
                out,
                req,
                flags,
                proto::REPLY_TYPE_BLOCK_STATUS,
                &proto::block_status_payload(id, extents),
            ),
        }
    }

    /// Lays a READ reply out in `buf` (grown when short; bytes not written are left as they
    /// are): headers written, room left for the data. Returns the reply's length and what is
    /// left to fill in. `pieces` cover the request in order, at most 32 MiB in all.
    ///
    /// Simple framing: one header, then the data (`pieces` is one data piece). Chunks: one
    /// `OFFSET_DATA` or `OFFSET_HOLE` chunk per piece; with `df` (don't fragment) and more
    /// than one piece, a single `OFFSET_DATA` chunk with the zeroes filled in. The last chunk
    /// is flagged DONE: the data is read before anything is sent, so no error can follow it.
    pub(crate) fn layout_read(
        self,
        req: &Request,
        pieces: &[Piece],
        df: bool,
        buf: &mut Vec<u8>,
    ) -> (usize, Vec<Fill>) {
        let data: u64 = pieces.iter().map(|p| p.len()).sum();
        let mut fills = Vec::with_capacity(pieces.len());
        let hl = self.header_len();
        if self == Framing::Simple || df {
            let head = if self == Framing::Simple {
                hl
            } else {
                hl + DATA_OFFSET
            };
            let total = head + data as usize;
            grow(buf, total);
            if self == Framing::Simple {
                buf[..hl].copy_from_slice(&proto::simple_reply(0, req.handle));
            } else if let [Piece::Zero { offset, len }] = pieces {
                // One hole: DF allows it as the one content chunk.
                return self.hole_only(req, *offset, *len, buf);
            } else {
                let typ = proto::REPLY_TYPE_OFFSET_DATA;
                self.chunk_header_into(
                    &mut buf[..hl],
                    req,
                    proto::REPLY_FLAG_DONE,
                    typ,
                    head - hl + data as usize,
                );
                buf[hl..head].copy_from_slice(&req.offset.to_be_bytes());
            }
            let mut at = head;
            for p in pieces {
                let len = p.len() as usize;
                fills.push(match *p {
                    Piece::Data { offset, .. } => Fill::Read { at, offset, len },
                    Piece::Zero { .. } => Fill::Zero { at, len },
                });
                at += len;
            }
            return (total, fills);
        }
        let total: usize = pieces
            .iter()
            .map(|p| match p {
                Piece::Data { len, .. } => hl + DATA_OFFSET + *len as usize,
                Piece::Zero { .. } => hl + HOLE_PAYLOAD,
            })
            .sum();
        grow(buf, total);
        let mut at = 0;
        for (i, p) in pieces.iter().enumerate() {
            let flags = if i + 1 == pieces.len() {
                proto::REPLY_FLAG_DONE
            } else {
                0
            };
            match *p {
                Piece::Data { offset, len } => {
                    let len = len as usize;
                    let typ = proto::REPLY_TYPE_OFFSET_DATA;
                    self.chunk_header_into(
                        &mut buf[at..at + hl],
                        req,
                        flags,
                        typ,
                        DATA_OFFSET + len,
                    );
                    buf[at + hl..at + hl + DATA_OFFSET].copy_from_slice(&offset.to_be_bytes());
                    at += hl + DATA_OFFSET;
                    fills.push(Fill::Read { at, offset, len });
                    at += len;
                }
                Piece::Zero { offset, len } => {
                    self.put_hole(
                        &mut buf[at..at + hl + HOLE_PAYLOAD],
                        req,
                        flags,
                        offset,
                        len,
                    );
                    at += hl + HOLE_PAYLOAD;
                }
            }
        }
        (total, fills)
    }

    /// A READ reply that is one hole chunk.
    fn hole_only(
        self,
        req: &Request,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> (usize, Vec<Fill>) {
        let total = self.header_len() + HOLE_PAYLOAD;
        grow(buf, total);
        self.put_hole(&mut buf[..total], req, proto::REPLY_FLAG_DONE, offset, len);
        (total, Vec::new())
    }

    /// An `OFFSET_HOLE` chunk into `dst` (header and payload). `len` is at most 32 MiB (a
    /// READ's largest), so it fits the chunk's 32-bit size.
    fn put_hole(self, dst: &mut [u8], req: &Request, flags: u16, offset: u64, len: u64) {
        let hl = self.header_len();
        self.chunk_header_into(
            &mut dst[..hl],
            req,
            flags,
            proto::REPLY_TYPE_OFFSET_HOLE,
            HOLE_PAYLOAD,
        );
        dst[hl..hl + 8].copy_from_slice(&offset.to_be_bytes());
        dst[hl + 8..hl + HOLE_PAYLOAD].copy_from_slice(&(len as u32).to_be_bytes());
    }
}

/// Grows `buf` to at least `len` bytes. A buffer keeps its length between requests, so a reused
/// one is not zeroed again.
fn grow(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(offset: u64, len: u64) -> Request {
        Request {
            flags: 0,
            command: proto::CMD_READ,
            handle: 9,
            offset,
            len,
        }
    }

    /// Splits chunks: (flags, type, payload), checking each header's magic, handle and, when
    /// extended, the request's offset.
    fn chunks(framing: Framing, req: &Request, mut b: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let (flags, typ, len, hl) = match framing {
                Framing::Structured => {
                    assert_eq!(b[0..4], proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
                    let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
                    (
                        u16::from_be_bytes([b[4], b[5]]),
                        u16::from_be_bytes([b[6], b[7]]),
                        len,
                        20,
                    )
                }
                Framing::Extended => {
                    assert_eq!(b[0..4], proto::EXTENDED_REPLY_MAGIC.to_be_bytes());
                    assert_eq!(b[16..24], req.offset.to_be_bytes());
                    let len = u64::from_be_bytes(b[24..32].try_into().unwrap()) as usize;
                    (
                        u16::from_be_bytes([b[4], b[5]]),
                        u16::from_be_bytes([b[6], b[7]]),
                        len,
                        32,
                    )
                }
                Framing::Simple => unreachable!(),
            };
            assert_eq!(b[8..16], req.handle.to_be_bytes());
            out.push((flags, typ, b[hl..hl + len].to_vec()));
            b = &b[hl + len..];
        }
        out
    }

    /// Fills a laid-out reply as the transmission does, data bytes being `0xdd`.
    fn fill(buf: &mut [u8], fills: &[Fill]) {
        for f in fills {
            match *f {
                Fill::Read { at, len, .. } => buf[at..at + len].fill(0xdd),
                Fill::Zero { at, len } => buf[at..at + len].fill(0),
            }
        }
    }

    #[test]
    fn a_sparse_read_is_data_and_hole_chunks_the_last_one_done() {
        let pieces = [
            Piece::Data {
                offset: 4096,
                len: 512,
            },
            Piece::Zero {
                offset: 4608,
                len: 1 << 20,
            },
            Piece::Data {
                offset: 4608 + (1 << 20),
                len: 1024,
            },
        ];
        for framing in [Framing::Structured, Framing::Extended] {
            let r = req(4096, 512 + (1 << 20) + 1024);
            // A dirty reused buffer, longer than needed.
            let mut buf = vec![0x55; 1 << 16];
            let (total, fills) = framing.layout_read(&r, &pieces, false, &mut buf);
            assert!(total <= buf.len());
            assert_eq!(fills.len(), 2, "holes are not read");
            fill(&mut buf, &fills);
            let c = chunks(framing, &r, &buf[..total]);
            assert_eq!(c.len(), 3);
            assert_eq!((c[0].0, c[0].1), (0, proto::REPLY_TYPE_OFFSET_DATA));
            assert_eq!(c[0].2[..8], 4096u64.to_be_bytes());
            assert!(c[0].2[8..].iter().all(|&b| b == 0xdd) && c[0].2.len() == 8 + 512);
            assert_eq!((c[1].0, c[1].1), (0, proto::REPLY_TYPE_OFFSET_HOLE));
            assert_eq!(c[1].2[..8], 4608u64.to_be_bytes());
            assert_eq!(c[1].2[8..], (1u32 << 20).to_be_bytes());
            let done = proto::REPLY_FLAG_DONE;
            assert_eq!((c[2].0, c[2].1), (done, proto::REPLY_TYPE_OFFSET_DATA));
            assert_eq!(c[2].2.len(), 8 + 1024);
            assert!(total <= 512 + 1024 + framing.read_overhead(pieces.len()));
        }
    }

    #[test]
    fn dont_fragment_is_one_data_chunk_with_the_holes_zeroed_or_one_hole() {
        let pieces = [
            Piece::Zero {
                offset: 0,
                len: 512,
            },
            Piece::Data {
                offset: 512,
                len: 512,
            },
        ];
        let r = req(0, 1024);
        let mut buf = vec![0x55; 4096];
        let (total, fills) = Framing::Structured.layout_read(&r, &pieces, true, &mut buf);
        fill(&mut buf, &fills);
        let c = chunks(Framing::Structured, &r, &buf[..total]);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].0, c[0].1),
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA)
        );
        assert_eq!(c[0].2[..8], 0u64.to_be_bytes());
        assert!(c[0].2[8..520].iter().all(|&b| b == 0));
        assert!(c[0].2[520..].iter().all(|&b| b == 0xdd));

        let hole = [Piece::Zero {
            offset: 0,
            len: 1024,
        }];
        let (total, fills) = Framing::Extended.layout_read(&r, &hole, true, &mut buf);
        assert!(fills.is_empty());
        let c = chunks(Framing::Extended, &r, &buf[..total]);
        assert_eq!((c.len(), c[0].1), (1, proto::REPLY_TYPE_OFFSET_HOLE));
    }

    #[test]
    fn a_simple_read_is_the_header_then_the_data() {
        let r = req(8192, 4096);
        let mut buf = Vec::new();
        let pieces = [Piece::Data {
            offset: 8192,
            len: 4096,
        }];
        let (total, fills) = Framing::Simple.layout_read(&r, &pieces, false, &mut buf);
        assert_eq!(total, 16 + 4096);
        assert_eq!(buf[..16], proto::simple_reply(0, 9));
        assert_eq!(
            fills,
            [Fill::Read {
                at: 16,
                offset: 8192,
                len: 4096
            }]
        );
    }

    #[test]
    fn errors_carry_their_message_with_chunks_and_only_the_errno_without() {
        let r = req(0, 512);
        let e = Error::invalid("request 0+512 is past the end");
        let mut out = Vec::new();
        Framing::Simple.done(&mut out, &r, Some(&e));
        assert_eq!(out, proto::simple_reply(proto::EINVAL, 9));
        for framing in [Framing::Structured, Framing::Extended] {
            let mut out = Vec::new();
            framing.error(&mut out, &r, &Error::io("disk gone"), Some(4096));
            let c = chunks(framing, &r, &out);
            assert_eq!(
                (c[0].0, c[0].1),
                (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR_OFFSET)
            );
            assert_eq!(
                c[0].2,
                proto::error_payload(proto::EIO, "disk gone", Some(4096))
            );
            let mut out = Vec::new();
            framing.done(&mut out, &r, None);
            let c = chunks(framing, &r, &out);
            assert_eq!(
                c,
                [(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, vec![])]
            );
        }
    }

    #[test]
    fn block_status_chunks_use_the_lengths_of_their_framing() {
        let r = req(0, 1 << 20);
        let extents = [
            Extent {
                len: 4096,
                flags: 3,
            },
            Extent {
                len: 8192,
                flags: 0,
            },
        ];
        let mut out = Vec::new();
        Framing::Structured.block_status(&mut out, &r, 1, &extents, true);
        let c = chunks(Framing::Structured, &r, &out);
        assert_eq!(c[0].1, proto::REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(c[0].2.len(), 4 + 2 * 8);
        let mut out = Vec::new();
        Framing::Extended.block_status(&mut out, &r, 1, &extents, false);
        let c = chunks(Framing::Extended, &r, &out);
        assert_eq!((c[0].0, c[0].1), (0, proto::REPLY_TYPE_BLOCK_STATUS_EXT));
        assert_eq!(c[0].2.len(), 8 + 2 * 16);
        assert_eq!(c[0].2[4..8], 2u32.to_be_bytes());
    }
}
