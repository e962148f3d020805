//! TLS after `NBD_OPT_STARTTLS`: the handshake, then a reading half and a writing half over
//! one rustls connection.
//!
//! Transmission reads requests on one thread while workers write replies on others, so one
//! [`rustls::StreamOwned`] (one `&mut` for both directions) does not fit. Instead the rustls
//! connection sits behind a mutex that is only held to move bytes in or out of it, never
//! across a blocking socket call: the reader reads ciphertext from the socket unlocked, then
//! locks to decrypt it; a writer locks the socket's write half, then the connection to
//! encrypt, unlocks the connection and writes the records out. Records leave in the order
//! they were encrypted because encrypting and writing both happen under the write-half lock.
//! Lock order: write half, then connection.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use rustls::{ServerConfig, ServerConnection};

use crate::server::lock;

/// TLS for an NBD server (see [`crate::Server::with_tls`]): the server requires it before any
/// option but `STARTTLS` and `ABORT`.
///
/// Who may connect is the `config`'s business: for mutual TLS, build it with a client
/// certificate verifier (`rustls::server::WebPkiClientVerifier` over the site CA) that does
/// not allow unauthenticated clients. The protocol requires TLS 1.2 or later, which is all
/// rustls speaks.
#[derive(Clone)]
pub struct Tls {
    /// The server's rustls configuration: certificate, key, client verification.
    pub config: Arc<ServerConfig>,
}

impl Tls {
    /// TLS with `config`.
    pub fn new(config: Arc<ServerConfig>) -> Tls {
        Tls { config }
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

/// Ciphertext read from the socket at once.
const RAW_READ: usize = 64 * 1024;
/// Plaintext encrypted at once by a writer (rustls' default buffer bound).
const WRITE_CHUNK: usize = 64 * 1024;

/// What both halves share.
struct Shared<W> {
    conn: Mutex<ServerConnection>,
    socket: Mutex<WriteHalf<W>>,
}

struct WriteHalf<W> {
    socket: W,
    /// Records encrypted, being written out; kept for reuse.
    out: Vec<u8>,
}

impl<W: Write> Shared<W> {
    /// Writes out the records the connection has queued (alerts, key updates, close_notify,
    /// encrypted data).
    fn send_queued(&self, half: &mut WriteHalf<W>) -> io::Result<()> {
        {
            let mut conn = lock(&self.conn);
            while conn.wants_write() {
                conn.write_tls(&mut half.out)?;
            }
        }
        let sent = half
            .socket
            .write_all(&half.out)
            .and_then(|()| half.socket.flush());
        half.out.clear();
        sent
    }
}

/// Runs the TLS handshake over `reader` and `writer` (the client was just sent the ACK to
/// `STARTTLS`), and splits the connection into its halves.
pub(crate) fn accept<R: Read, W: Write>(
    tls: &Tls,
    mut reader: R,
    mut writer: W,
) -> io::Result<(TlsReader<R, W>, TlsWriter<W>)> {
    let mut conn = ServerConnection::new(Arc::clone(&tls.config))
        .map_err(|e| io::Error::other(format!("TLS setup failed: {e}")))?;
    {
        let mut duplex = Duplex {
            r: &mut reader,
            w: &mut writer,
        };
        while conn.is_handshaking() {
            let (read, written) = conn
                .complete_io(&mut duplex)
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
            if read == 0 && written == 0 && conn.is_handshaking() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS handshake failed: the client left",
                ));
            }
        }
        // Whatever the handshake left queued (session tickets) goes out before any data.
        while conn.wants_write() {
            conn.write_tls(&mut duplex)?;
        }
        duplex.flush()?;
    }
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        socket: Mutex::new(WriteHalf {
            socket: writer,
            out: Vec::new(),
        }),
    });
    Ok((
        TlsReader {
            shared: Arc::clone(&shared),
            raw: reader,
            buf: vec![0; RAW_READ].into_boxed_slice(),
            start: 0,
            end: 0,
        },
        TlsWriter { shared },
    ))
}

/// The socket's two directions as one stream, for the handshake.
struct Duplex<'a, R, W> {
    r: &'a mut R,
    w: &'a mut W,
}

impl<R: Read, W> Read for Duplex<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.r.read(buf)
    }
}

impl<R, W: Write> Write for Duplex<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// The reading half: decrypted bytes from the client. EOF (`Ok(0)`) when the client sent
/// close_notify; `UnexpectedEof` when it closed the socket without.
pub(crate) struct TlsReader<R, W> {
    shared: Arc<Shared<W>>,
    raw: R,
    /// Ciphertext read from the socket, `buf[start..end]` not yet given to rustls.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<R: Read, W: Write> Read for TlsReader<R, W> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(n) = self.plaintext(out)? {
                return Ok(n);
            }
            if self.start < self.end {
                self.decrypt()?;
                continue;
            }
            // Nothing buffered: wait for the socket, without holding the connection.
            let n = self.raw.read(&mut self.buf)?;
            (self.start, self.end) = (0, n);
            if n == 0 {
                // Tell rustls; its reader then answers EOF or UnexpectedEof.
                lock(&self.shared.conn).read_tls(&mut io::empty())?;
            }
        }
    }
}

impl<R, W: Write> TlsReader<R, W> {
    /// Plaintext already decrypted, `None` when there is none yet.
    fn plaintext(&self, out: &mut [u8]) -> io::Result<Option<usize>> {
        match lock(&self.shared.conn).reader().read(out) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Gives rustls ciphertext read from the socket, and sends what that queued (a key
    /// update's answer; the alert that ends a broken session).
    fn decrypt(&mut self) -> io::Result<()> {
        let (processed, queued) = {
            let mut conn = lock(&self.shared.conn);
            let mut rest = &self.buf[self.start..self.end];
            let taken = conn.read_tls(&mut rest)?;
            if taken == 0 {
                // Only after close_notify, which the plaintext reader answers first: never
                // loop on bytes rustls will not take.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS: data after close_notify",
                ));
            }
            self.start += taken;
            (conn.process_new_packets().map(|_| ()), conn.wants_write())
        };
        if queued {
            let mut half = lock(&self.shared.socket);
            let sent = self.shared.send_queued(&mut half);
            if processed.is_ok() {
                sent?;
            }
        }
        processed.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")))
    }
}

/// The writing half: encrypts and sends. Cheap to share behind the transmission's writer lock.
pub(crate) struct TlsWriter<W> {
    shared: Arc<Shared<W>>,
}

impl<W: Write> TlsWriter<W> {
    /// A handle that ends the TLS session (close_notify) once the writer itself is gone.
    pub(crate) fn closer(&self) -> TlsCloser<W> {
        TlsCloser {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<W: Write> Write for TlsWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut half = lock(&self.shared.socket);
        let n = {
            let mut conn = lock(&self.shared.conn);
            let n = conn.writer().write(&buf[..buf.len().min(WRITE_CHUNK)])?;
            while conn.wants_write() {
                conn.write_tls(&mut half.out)?;
            }
            n
        };
        let half = &mut *half;
        let sent = half.socket.write_all(&half.out);
        half.out.clear();
        sent.map(|()| n)
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.shared.socket).socket.flush()
    }
}

/// Ends a TLS session cleanly.
pub(crate) struct TlsCloser<W> {
    shared: Arc<Shared<W>>,
}

impl<W: Write> TlsCloser<W> {
    /// Sends close_notify, as the protocol asks before the socket closes (after `DISC` or
    /// `ABORT`).
    pub(crate) fn close(&self) -> io::Result<()> {
        let mut half = lock(&self.shared.socket);
        lock(&self.shared.conn).send_close_notify();
        self.shared.send_queued(&mut half)
    }
}
