//! A minimal NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies) for tests that need to
//! know exactly when each write was acknowledged.

use std::io::{Read, Write};
use std::net::TcpStream;

use anyhow::{Context, Result, bail};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

/// One connection to an export.
#[derive(Debug)]
pub struct NbdClient {
    tcp: TcpStream,
    /// The export's size in bytes.
    pub size: u64,
    handle: u64,
}

fn u64_of(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap_or_default())
}

impl NbdClient {
    /// Connects to `127.0.0.1:port` and opens `export`.
    pub fn connect(addr: &str, export: &str) -> Result<NbdClient> {
        let mut tcp = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let mut greet = [0u8; 18];
        tcp.read_exact(&mut greet)?;
        if u64_of(&greet[0..8]) != NBDMAGIC || u64_of(&greet[8..16]) != IHAVEOPT {
            bail!("{addr}: not an NBD server");
        }
        // Client flags: fixed newstyle, no zeroes.
        tcp.write_all(&3u32.to_be_bytes())?;
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        tcp.write_all(&opt)?;
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            tcp.read_exact(&mut h)?;
            if u64_of(&h[0..8]) != REPLY_MAGIC {
                bail!("{addr}: bad option reply");
            }
            let reply = u32::from_be_bytes(h[12..16].try_into()?);
            let len = u32::from_be_bytes(h[16..20].try_into()?) as usize;
            let mut body = vec![0u8; len];
            tcp.read_exact(&mut body)?;
            match reply {
                REP_INFO if body.len() >= 12 && body[0..2] == [0, 0] => {
                    size = Some(u64_of(&body[2..10]));
                }
                REP_INFO => {}
                REP_ACK => break,
                r => bail!(
                    "{addr}: export {export:?} refused (reply {r:#x}): {}",
                    String::from_utf8_lossy(&body)
                ),
            }
        }
        Ok(NbdClient {
            tcp,
            size: size.context("no export size")?,
            handle: 1,
        })
    }

    fn request(&mut self, cmd: u16, offset: u64, len: u32, data: &[u8]) -> Result<()> {
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&self.handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(data);
        self.tcp.write_all(&r)?;
        Ok(())
    }

    fn reply(&mut self) -> Result<()> {
        let mut h = [0u8; 16];
        self.tcp.read_exact(&mut h)?;
        if u32::from_be_bytes(h[0..4].try_into()?) != SIMPLE_REPLY_MAGIC {
            bail!("bad reply magic");
        }
        let error = u32::from_be_bytes(h[4..8].try_into()?);
        if u64_of(&h[8..16]) != self.handle {
            bail!("reply for another request");
        }
        self.handle += 1;
        if error != 0 {
            bail!("the server answered errno {error}");
        }
        Ok(())
    }

    /// Writes `data` at `offset`; returns once the server acknowledged it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.request(CMD_WRITE, offset, data.len() as u32, data)?;
        self.reply()
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.request(CMD_READ, offset, len, &[])?;
        self.reply()?;
        let mut buf = vec![0u8; len as usize];
        self.tcp.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Flushes.
    pub fn flush(&mut self) -> Result<()> {
        self.request(CMD_FLUSH, 0, 0, &[])?;
        self.reply()
    }

    /// Disconnects politely.
    pub fn disconnect(mut self) -> Result<()> {
        self.request(CMD_DISC, 0, 0, &[])
    }
}
