//! The NBD server: accept loops, handshake and transmission over blocking sockets.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use super::proto::{self, Request};
use crate::splitter::{SplitError, Splitter};

/// Largest option data read into memory; `INFO`/`GO` with a 4096-byte name fit.
const MAX_OPTION_DATA: u32 = 8 * 1024;
/// Larger option data than this is not even drained: the connection is closed.
const MAX_OPTION_DRAIN: u32 = 1024 * 1024;
const DRAIN_CHUNK: usize = 64 * 1024;

/// An NBD server exporting one protected disk under one name.
#[derive(Debug)]
pub struct Server {
    splitter: Arc<Splitter>,
    export: String,
    next_conn: AtomicU64,
}

/// How a handshake ended.
enum Handshake {
    /// Go on to transmission.
    Transmission,
    /// The client left (abort, disconnect) or was sent away.
    Closed,
}

impl Server {
    /// A server for `splitter`, exported as `export` (the empty name reaches it too).
    pub fn new(splitter: Arc<Splitter>, export: impl Into<String>) -> Server {
        Server {
            splitter,
            export: export.into(),
            next_conn: AtomicU64::new(1),
        }
    }

    /// Accepts TCP connections forever, one thread each.
    pub fn serve_tcp(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a TCP connection failed");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let server = Arc::clone(self);
            let peer = peer.to_string();
            thread::Builder::new()
                .name(format!("nbd {peer}"))
                .spawn(move || {
                    let reader = match stream.try_clone() {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(error = %e, "cloning a TCP stream failed");
                            return;
                        }
                    };
                    server.run_connection(reader, &stream, &peer);
                    let _ = stream.shutdown(Shutdown::Both);
                })?;
        }
    }

    /// Accepts Unix-socket connections forever, one thread each.
    pub fn serve_unix(self: &Arc<Self>, listener: UnixListener) -> io::Result<()> {
        loop {
            let (stream, _) = match listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a Unix-socket connection failed");
                    continue;
                }
            };
            let server = Arc::clone(self);
            thread::Builder::new()
                .name("nbd unix".into())
                .spawn(move || {
                    let reader = match stream.try_clone() {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(error = %e, "cloning a Unix stream failed");
                            return;
                        }
                    };
                    server.run_connection(reader, &stream, "unix");
                    let _ = stream.shutdown(Shutdown::Both);
                })?;
        }
    }

    /// Serves one connection until the client disconnects or breaks the protocol.
    pub fn run_connection<R: Read, W: Write>(&self, reader: R, mut writer: W, peer: &str) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("nbd", conn, peer);
        let _enter = span.enter();
        tracing::info!("client connected");
        let mut reader = BufReader::with_capacity(256 * 1024, reader);
        let result = self
            .handshake(&mut reader, &mut writer)
            .and_then(|h| match h {
                Handshake::Transmission => self.transmission(&mut reader, &mut writer),
                Handshake::Closed => Ok(()),
            });
        match result {
            Ok(()) => tracing::info!("client disconnected"),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::info!("client closed the connection")
            }
            Err(e) => tracing::warn!(error = %e, "connection ended"),
        }
    }

    fn handshake<R: Read, W: Write>(&self, r: &mut R, w: &mut W) -> io::Result<Handshake> {
        w.write_all(&proto::greeting())?;
        let mut cf = [0u8; 4];
        r.read_exact(&mut cf)?;
        let client_flags = u32::from_be_bytes(cf);
        let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        if client_flags & !known != 0 {
            tracing::warn!(client_flags, "unknown client flags; closing");
            return Ok(Handshake::Closed);
        }
        let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
        let size = self.splitter.size();
        let flags = proto::TRANSMISSION_FLAGS;
        loop {
            let mut hb = [0u8; proto::OPTION_HEADER_LEN];
            r.read_exact(&mut hb)?;
            let Some(opt) = proto::parse_option_header(&hb) else {
                tracing::warn!("bad option magic; closing");
                return Ok(Handshake::Closed);
            };
            if opt.len > MAX_OPTION_DATA {
                if opt.len > MAX_OPTION_DRAIN || opt.option == proto::OPT_EXPORT_NAME {
                    tracing::warn!(
                        option = opt.option,
                        len = opt.len,
                        "option too long; closing"
                    );
                    return Ok(Handshake::Closed);
                }
                drain(r, u64::from(opt.len))?;
                let msg = format!("option data of {} bytes is too long", opt.len);
                w.write_all(&proto::option_reply(
                    opt.option,
                    proto::REP_ERR_TOO_BIG,
                    msg.as_bytes(),
                ))?;
                continue;
            }
            let mut data = vec![0u8; opt.len as usize];
            r.read_exact(&mut data)?;
            match opt.option {
                proto::OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data);
                    if !self.is_export(&name) {
                        tracing::warn!(export = %name, "unknown export asked with EXPORT_NAME; closing");
                        return Ok(Handshake::Closed);
                    }
                    w.write_all(&proto::export_name_reply(size, flags, no_zeroes))?;
                    tracing::info!(export = %self.export, size, "transmission (EXPORT_NAME)");
                    return Ok(Handshake::Transmission);
                }
                proto::OPT_ABORT => {
                    w.write_all(&proto::option_reply(opt.option, proto::REP_ACK, &[]))?;
                    return Ok(Handshake::Closed);
                }
                proto::OPT_LIST => {
                    if !data.is_empty() {
                        let msg = b"NBD_OPT_LIST takes no data";
                        w.write_all(&proto::option_reply(
                            opt.option,
                            proto::REP_ERR_INVALID,
                            msg,
                        ))?;
                        continue;
                    }
                    let mut out = proto::option_reply(
                        opt.option,
                        proto::REP_SERVER,
                        &proto::rep_server(&self.export),
                    );
                    out.extend(proto::option_reply(opt.option, proto::REP_ACK, &[]));
                    w.write_all(&out)?;
                }
                proto::OPT_INFO | proto::OPT_GO => {
                    let req = match proto::parse_info_request(&data) {
                        Ok(req) => req,
                        Err(why) => {
                            w.write_all(&proto::option_reply(
                                opt.option,
                                proto::REP_ERR_INVALID,
                                why.as_bytes(),
                            ))?;
                            continue;
                        }
                    };
                    if !self.is_export(&req.name) {
                        let msg = format!(
                            "no export named {:?} (this agent exports {:?})",
                            req.name, self.export
                        );
                        w.write_all(&proto::option_reply(
                            opt.option,
                            proto::REP_ERR_UNKNOWN,
                            msg.as_bytes(),
                        ))?;
                        continue;
                    }
                    let mut out = proto::option_reply(
                        opt.option,
                        proto::REP_INFO,
                        &proto::info_export(size, flags),
                    );
                    out.extend(proto::option_reply(
                        opt.option,
                        proto::REP_INFO,
                        &proto::info_block_size(),
                    ));
                    if req.requests.contains(&proto::INFO_NAME) {
                        out.extend(proto::option_reply(
                            opt.option,
                            proto::REP_INFO,
                            &proto::info_name(&self.export),
                        ));
                    }
                    out.extend(proto::option_reply(opt.option, proto::REP_ACK, &[]));
                    w.write_all(&out)?;
                    if opt.option == proto::OPT_GO {
                        tracing::info!(export = %self.export, size, "transmission (GO)");
                        return Ok(Handshake::Transmission);
                    }
                }
                other => {
                    w.write_all(&proto::option_reply(other, proto::REP_ERR_UNSUP, &[]))?;
                }
            }
        }
    }

    fn is_export(&self, name: &str) -> bool {
        name.is_empty() || name == self.export
    }

    fn transmission<R: Read, W: Write>(&self, r: &mut R, w: &mut W) -> io::Result<()> {
        let mut payload = Vec::new();
        loop {
            let mut hb = [0u8; proto::REQUEST_LEN];
            match r.read_exact(&mut hb) {
                Ok(()) => {}
                // A client that closes between requests just leaves.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let Some(req) = proto::parse_request(&hb) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad request magic",
                ));
            };
            match req.command {
                proto::CMD_DISC => return Ok(()),
                proto::CMD_READ => self.do_read(&req, w)?,
                proto::CMD_WRITE => {
                    let len = u64::from(req.len);
                    if req.len > proto::MAX_BLOCK {
                        // Never hold an unbounded payload: drain it in bounded chunks.
                        drain(r, len)?;
                        tracing::warn!(offset = req.offset, len, "write larger than the maximum");
                        w.write_all(&proto::simple_reply(proto::EINVAL, req.handle))?;
                        continue;
                    }
                    payload.resize(req.len as usize, 0);
                    r.read_exact(&mut payload)?;
                    let result = check_flags(&req, proto::CMD_FLAG_FUA).and_then(|()| {
                        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
                        self.splitter.write(req.offset, &payload, fua)
                    });
                    self.reply(w, &req, result.map(drop))?;
                }
                proto::CMD_FLUSH => {
                    let result = self.splitter.flush().map(drop);
                    self.reply(w, &req, result)?;
                }
                proto::CMD_TRIM => {
                    let result = check_flags(&req, proto::CMD_FLAG_FUA).and_then(|()| {
                        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
                        self.splitter.trim(req.offset, u64::from(req.len), fua)
                    });
                    self.reply(w, &req, result)?;
                }
                proto::CMD_WRITE_ZEROES => {
                    let allowed = proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE;
                    let result = check_flags(&req, allowed).and_then(|()| {
                        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
                        let may_punch = req.flags & proto::CMD_FLAG_NO_HOLE == 0;
                        self.splitter
                            .write_zeroes(req.offset, u64::from(req.len), may_punch, fua)
                    });
                    self.reply(w, &req, result)?;
                }
                other => {
                    tracing::warn!(command = other, "unsupported command");
                    w.write_all(&proto::simple_reply(proto::EINVAL, req.handle))?;
                }
            }
        }
    }

    fn do_read<W: Write>(&self, req: &Request, w: &mut W) -> io::Result<()> {
        let len = u64::from(req.len);
        if req.len > proto::MAX_BLOCK {
            tracing::warn!(offset = req.offset, len, "read larger than the maximum");
            return w.write_all(&proto::simple_reply(proto::EINVAL, req.handle));
        }
        if let Err(e) =
            check_flags(req, 0).and_then(|()| self.splitter.check_range(req.offset, len))
        {
            return self.reply(w, req, Err(e));
        }
        let mut out = vec![0u8; 16 + req.len as usize];
        match self.splitter.read(req.offset, &mut out[16..]) {
            Ok(()) => {
                out[..16].copy_from_slice(&proto::simple_reply(0, req.handle));
                w.write_all(&out)
            }
            Err(e) => self.reply(w, req, Err(e)),
        }
    }

    fn reply<W: Write>(
        &self,
        w: &mut W,
        req: &Request,
        result: Result<(), SplitError>,
    ) -> io::Result<()> {
        let error = match result {
            Ok(()) => 0,
            Err(e) => {
                match &e {
                    SplitError::Invalid(_) => {
                        tracing::debug!(command = req.command, error = %e, "request refused")
                    }
                    _ => tracing::error!(command = req.command, error = %e, "request failed"),
                }
                e.errno()
            }
        };
        w.write_all(&proto::simple_reply(error, req.handle))
    }
}

fn check_flags(req: &Request, allowed: u16) -> Result<(), SplitError> {
    if req.flags & !allowed != 0 {
        return Err(SplitError::Invalid(format!(
            "command {} with unsupported flags {:#x}",
            req.command, req.flags
        )));
    }
    Ok(())
}

/// Reads and discards `len` bytes in bounded chunks.
fn drain<R: Read>(r: &mut R, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; DRAIN_CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(DRAIN_CHUNK as u64) as usize;
        r.read_exact(&mut buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Binds a Unix socket at `path`, replacing a stale socket file left by an earlier run.
pub fn bind_unix(path: &std::path::Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
        && UnixStream::connect(path).is_err()
    {
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}
