//! NBD wire format: constants, parsing and encoding. No I/O here.
//!
//! What the server speaks: the fixed newstyle handshake (`EXPORT_NAME`, `INFO`, `GO`, `LIST`,
//! `ABORT`, `STARTTLS`, `STRUCTURED_REPLY`, `EXTENDED_HEADERS`, `LIST_META_CONTEXT`,
//! `SET_META_CONTEXT`), compact and extended requests, and simple, structured and extended
//! replies. All integers are big-endian.

use crate::backend::Extent;

/// `NBDMAGIC`, the first thing the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended transmission request (after `NBD_OPT_EXTENDED_HEADERS`).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Soft disconnect during negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Use extended (64-bit) request and reply headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Option not supported.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Option refused by the server's policy (no TLS configured, too many connections).
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Option malformed.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option data too long.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
/// Extended headers were negotiated and take precedence.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

/// Information: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information: the export's name.
pub const INFO_NAME: u16 = 1;
/// Information: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// FLUSH supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// FUA supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// TRIM supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// WRITE_ZEROES supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// READ supports `NBD_CMD_FLAG_DF` (only with structured or extended replies).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Clients may use several connections at once.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// CACHE supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// WRITE_ZEROES supports `NBD_CMD_FLAG_FAST_ZERO`.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// What a writable export offers, whatever was negotiated.
pub const TRANSMISSION_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_SEND_CACHE
    | TFLAG_SEND_FAST_ZERO;
/// What a read-only export offers, whatever was negotiated: reads only.
pub const TRANSMISSION_FLAGS_READ_ONLY: u16 = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_CACHE;

/// The transmission flags of an export: `multi_conn` when the backend allows several
/// connections, `structured` when the client negotiated structured or extended replies (DF
/// needs them).
pub fn transmission_flags(read_only: bool, multi_conn: bool, structured: bool) -> u16 {
    let mut flags = if read_only {
        TRANSMISSION_FLAGS_READ_ONLY
    } else {
        TRANSMISSION_FLAGS
    };
    if multi_conn {
        flags |= TFLAG_CAN_MULTI_CONN;
    }
    if structured {
        flags |= TFLAG_SEND_DF;
    }
    flags
}

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write with payload.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Cache (prefetch hint).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status of the selected metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: `WRITE_ZEROES` must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: a READ answered with one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: `BLOCK_STATUS` answers one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: `WRITE_ZEROES` only if faster than a write, else `ENOTSUP` at once.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag (extended headers): the length is a payload that follows the header.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Reply chunk flag: the last chunk of its reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Reply chunk: nothing (the end of a reply).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Reply chunk: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Reply chunk: zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Reply chunk: block status with 32-bit lengths.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Reply chunk: block status with 64-bit lengths (extended headers).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Reply chunk: an error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Reply chunk: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` flag: not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context the protocol defines.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Errors sent in replies (the values the NBD protocol fixes, Linux's): not permitted (a
/// change to a read-only export).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space left (e.g. the agent's change log is full).
pub const ENOSPC: u32 = 28;
/// Value too large: a READ or WRITE longer than [`MAX_BLOCK`].
pub const EOVERFLOW: u32 = 75;
/// Not supported: a fast zero the backend cannot do fast, a context without block status.
pub const ENOTSUP: u32 = 95;
/// The server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Block sizes advertised with `NBD_INFO_BLOCK_SIZE`.
pub const MIN_BLOCK: u32 = 512;
/// Preferred block size.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ or WRITE payload.
pub const MAX_BLOCK: u32 = 32 * 1024 * 1024;
/// Longest string (name, query, message) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;
/// Size of an option header.
pub const OPTION_HEADER_LEN: usize = 16;

/// The server's greeting.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option header from the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub option: u32,
    /// Length of the data that follows.
    pub len: u32,
}

/// Parses an option header; `None` when the magic is wrong (a protocol violation).
pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Option<OptionHeader> {
    let magic = u64::from_be_bytes(b[0..8].try_into().ok()?);
    if magic != IHAVEOPT {
        return None;
    }
    Some(OptionHeader {
        option: u32::from_be_bytes(b[8..12].try_into().ok()?),
        len: u32::from_be_bytes(b[12..16].try_into().ok()?),
    })
}

/// Encodes an option reply.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// `NBD_INFO_EXPORT` payload.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE` payload.
pub fn info_block_size() -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&MIN_BLOCK.to_be_bytes());
    b.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
    b.extend_from_slice(&MAX_BLOCK.to_be_bytes());
    b
}

/// `NBD_INFO_NAME` payload.
pub fn info_name(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + name.len());
    b.extend_from_slice(&INFO_NAME.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// `NBD_REP_SERVER` payload for `NBD_OPT_LIST`.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// `NBD_REP_META_CONTEXT` payload: a context's id and name.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// The reply to `NBD_OPT_EXPORT_NAME`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(10 + 124);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// Option data read field by field; every read says what was cut short.
struct Fields<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(format!("option data cut short in {what}"));
        };
        let b = &self.data[self.at..end];
        self.at = end;
        Ok(b)
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A string preceded by its 32-bit length, at most [`MAX_STRING`] bytes of UTF-8.
    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u32(what)? as usize;
        if len > MAX_STRING {
            return Err(format!("{what} of {len} bytes is longer than {MAX_STRING}"));
        }
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn end(&self) -> Result<(), String> {
        if self.at != self.data.len() {
            return Err("option data longer than its fields".into());
        }
        Ok(())
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: an export name and the information asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (empty: the default export).
    pub name: String,
    /// Information types requested.
    pub requests: Vec<u16>,
}

/// Parses the data of `NBD_OPT_INFO` / `NBD_OPT_GO`, or says what is wrong with it.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, String> {
    let mut f = Fields { data, at: 0 };
    let name = f.string("export name")?;
    let count = f.u16("information request count")?;
    let requests = (0..count)
        .map(|_| f.u16("information requests"))
        .collect::<Result<Vec<u16>, String>>()?;
    f.end()?;
    Ok(InfoRequest { name, requests })
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: an export name and
/// queries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name (empty: the default export).
    pub name: String,
    /// Queries, each `namespace:` or `namespace:leaf`.
    pub queries: Vec<String>,
}

/// Parses the data of a meta-context option, or says what is wrong with it.
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, String> {
    let mut f = Fields { data, at: 0 };
    let name = f.string("export name")?;
    let count = f.u32("query count")?;
    // Each query takes at least its 4-byte length: a count beyond that is a lie.
    if count as usize > data.len() / 4 {
        return Err(format!(
            "{count} queries cannot fit in {} bytes",
            data.len()
        ));
    }
    let queries = (0..count)
        .map(|_| f.string("query"))
        .collect::<Result<Vec<String>, String>>()?;
    f.end()?;
    Ok(MetaRequest { name, queries })
}

/// A transmission request, compact or extended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub command: u16,
    /// Client's handle (cookie), echoed in the reply.
    pub handle: u64,
    /// Offset.
    pub offset: u64,
    /// Length: 32 bits in a compact request, 64 in an extended one.
    pub len: u64,
}

/// Parses a compact request header; `None` when the magic is wrong (a protocol violation).
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Option<Request> {
    if u32::from_be_bytes(b[0..4].try_into().ok()?) != REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().ok()?),
        command: u16::from_be_bytes(b[6..8].try_into().ok()?),
        handle: u64::from_be_bytes(b[8..16].try_into().ok()?),
        offset: u64::from_be_bytes(b[16..24].try_into().ok()?),
        len: u64::from(u32::from_be_bytes(b[24..28].try_into().ok()?)),
    })
}

/// Parses an extended request header; `None` when the magic is wrong.
pub fn parse_extended_request(b: &[u8; EXTENDED_REQUEST_LEN]) -> Option<Request> {
    if u32::from_be_bytes(b[0..4].try_into().ok()?) != EXTENDED_REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().ok()?),
        command: u16::from_be_bytes(b[6..8].try_into().ok()?),
        handle: u64::from_be_bytes(b[8..16].try_into().ok()?),
        offset: u64::from_be_bytes(b[16..24].try_into().ok()?),
        len: u64::from_be_bytes(b[24..32].try_into().ok()?),
    })
}

/// A simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header, for a payload of `len` bytes.
pub fn structured_reply(flags: u16, typ: u16, handle: u64, len: u32) -> [u8; STRUCTURED_REPLY_LEN] {
    let mut b = [0u8; STRUCTURED_REPLY_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// An extended reply chunk header: `offset` is the request's, `len` the payload's.
pub fn extended_reply(
    flags: u16,
    typ: u16,
    handle: u64,
    offset: u64,
    len: u64,
) -> [u8; EXTENDED_REPLY_LEN] {
    let mut b = [0u8; EXTENDED_REPLY_LEN];
    b[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&len.to_be_bytes());
    b
}

/// The payload of an error chunk: the errno and a message (cut to [`MAX_STRING`] bytes at a
/// character boundary), and for `NBD_REPLY_TYPE_ERROR_OFFSET` the offset.
pub fn error_payload(errno: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let mut cut = message.len().min(MAX_STRING);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let message = &message.as_bytes()[..cut];
    let mut b = Vec::with_capacity(6 + message.len() + 8);
    b.extend_from_slice(&errno.to_be_bytes());
    b.extend_from_slice(&(message.len() as u16).to_be_bytes());
    b.extend_from_slice(message);
    if let Some(offset) = offset {
        b.extend_from_slice(&offset.to_be_bytes());
    }
    b
}

/// The payload of `NBD_REPLY_TYPE_BLOCK_STATUS`: 32-bit lengths, so every extent must be
/// shorter than 4 GiB (a compact request's length is, and extents never pass it).
pub fn block_status_payload(id: u32, extents: &[Extent]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + 8 * extents.len());
    b.extend_from_slice(&id.to_be_bytes());
    for e in extents {
        b.extend_from_slice(&(e.len.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
    }
    b
}

/// The payload of `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: 64-bit lengths and status.
pub fn block_status_ext_payload(id: u32, extents: &[Extent]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 16 * extents.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&(extents.len() as u32).to_be_bytes());
    for e in extents {
        b.extend_from_slice(&e.len.to_be_bytes());
        b.extend_from_slice(&u64::from(e.flags).to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_round_trip_and_bad_data() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vda");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        let r = parse_info_request(&d).unwrap();
        assert_eq!(
            r,
            InfoRequest {
                name: "vda".into(),
                requests: vec![3, 1]
            }
        );
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        let mut longer = d.clone();
        longer.push(0);
        assert!(parse_info_request(&longer).is_err());
        let mut huge = (u32::MAX).to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert!(parse_info_request(&huge).is_err());
    }

    #[test]
    fn request_parse() {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = parse_request(&b).unwrap();
        assert_eq!(
            (r.flags, r.command, r.handle, r.offset, r.len),
            (1, 1, 7, 4096, 512)
        );
        b[0] ^= 1;
        assert!(parse_request(&b).is_none());

        let mut e = [0u8; EXTENDED_REQUEST_LEN];
        e[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        e[6..8].copy_from_slice(&CMD_BLOCK_STATUS.to_be_bytes());
        e[24..32].copy_from_slice(&(5u64 << 32).to_be_bytes());
        let r = parse_extended_request(&e).unwrap();
        assert_eq!((r.command, r.len), (CMD_BLOCK_STATUS, 5 << 32));
        assert!(parse_request(e[..REQUEST_LEN].try_into().unwrap()).is_none());
    }

    #[test]
    fn meta_request_round_trip_and_bad_data() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vda");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "haven:"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let r = parse_meta_request(&d).unwrap();
        assert_eq!(r.name, "vda");
        assert_eq!(r.queries, ["base:allocation", "haven:"]);
        assert!(parse_meta_request(&d[..d.len() - 1]).is_err());
        let mut longer = d.clone();
        longer.push(0);
        assert!(parse_meta_request(&longer).is_err());
        // A count of queries the data cannot hold is refused before anything is allocated.
        let mut lying = 0u32.to_be_bytes().to_vec();
        lying.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&lying).is_err());
    }

    #[test]
    fn error_messages_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_STRING);
        let p = error_payload(EIO, &long, Some(7));
        let len = u16::from_be_bytes([p[4], p[5]]) as usize;
        assert!(len <= MAX_STRING && len.is_multiple_of(2), "{len}");
        assert_eq!(p.len(), 6 + len + 8);
        assert_eq!(p[p.len() - 8..], 7u64.to_be_bytes());
    }
}
