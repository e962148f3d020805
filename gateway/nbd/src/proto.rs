//! NBD wire format: constants, parsing and encoding. No I/O here.
//!
//! Only what the server speaks: the fixed newstyle handshake (`EXPORT_NAME`, `INFO`, `GO`,
//! `LIST`, `ABORT`) and simple replies in the transmission phase. All integers are big-endian.

/// `NBDMAGIC`, the first thing the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

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
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export.
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
/// Option not supported.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Option malformed.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option data too long.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

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
/// What a writable export offers.
pub const TRANSMISSION_FLAGS: u16 =
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
/// What a read-only export offers: reads only.
pub const TRANSMISSION_FLAGS_READ_ONLY: u16 = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY;

/// The transmission flags of an export.
pub fn transmission_flags(read_only: bool) -> u16 {
    if read_only {
        TRANSMISSION_FLAGS_READ_ONLY
    } else {
        TRANSMISSION_FLAGS
    }
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
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: `WRITE_ZEROES` must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Errors sent in simple replies (the values the NBD protocol fixes, Linux's): not permitted
/// (a change to a read-only export).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space left (e.g. the agent's change log is full).
pub const ENOSPC: u32 = 28;
/// The server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Block sizes advertised with `NBD_INFO_BLOCK_SIZE`.
pub const MIN_BLOCK: u32 = 512;
/// Preferred block size.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ or WRITE payload.
pub const MAX_BLOCK: u32 = 32 * 1024 * 1024;

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
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
    let take = |at: usize, n: usize| data.get(at..at + n).ok_or("option data cut short");
    let name_len = u32::from_be_bytes(take(0, 4)?.try_into().map_err(|_| "bad length")?) as usize;
    if name_len > 4096 {
        return Err(format!(
            "export name of {name_len} bytes is longer than 4096"
        ));
    }
    let name = std::str::from_utf8(take(4, name_len)?)
        .map_err(|_| "export name is not UTF-8".to_string())?
        .to_string();
    let at = 4 + name_len;
    let count = u16::from_be_bytes(take(at, 2)?.try_into().map_err(|_| "bad count")?) as usize;
    let list = take(at + 2, count * 2)?;
    if data.len() != at + 2 + count * 2 {
        return Err("option data longer than its fields".into());
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, requests })
}

/// A transmission request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub command: u16,
    /// Client's handle, echoed in the reply.
    pub handle: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
}

/// Parses a request header; `None` when the magic is wrong (a protocol violation).
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Option<Request> {
    if u32::from_be_bytes(b[0..4].try_into().ok()?) != REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().ok()?),
        command: u16::from_be_bytes(b[6..8].try_into().ok()?),
        handle: u64::from_be_bytes(b[8..16].try_into().ok()?),
        offset: u64::from_be_bytes(b[16..24].try_into().ok()?),
        len: u32::from_be_bytes(b[24..28].try_into().ok()?),
    })
}

/// A simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
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
    }
}
