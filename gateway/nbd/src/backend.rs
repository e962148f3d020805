//! What an NBD export serves: a [`Backend`], and the [`Error`] a request fails with.

use crate::proto;

/// A block device exported over NBD.
///
/// The server calls [`Backend::check_range`] before every `read`, `write`, `write_zeroes` and
/// `trim`, and calls those only with a range it accepted; `read` and `write` get at most
/// [`proto::MAX_BLOCK`] bytes. Calls come concurrently: up to 1 + [`crate::WORKERS`] at once
/// per connection, from every connection open. The server orders only FLUSH: it is called once
/// every change received before it on that connection has returned; changes in flight
/// together may reach the backend in any order (NBD does not order them), so a backend that
/// needs one order of changes (the agent's log) takes its own lock.
pub trait Backend: Send + Sync {
    /// Size of the export in bytes.
    fn size(&self) -> u64;

    /// Exported read-only: the server advertises `NBD_FLAG_READ_ONLY` and refuses WRITE, TRIM
    /// and WRITE_ZEROES with `EPERM` without calling the backend.
    fn read_only(&self) -> bool {
        false
    }

    /// Checks a request's range. The default accepts any range inside the export (no overflow);
    /// a backend with alignment rules adds them here.
    fn check_range(&self, offset: u64, len: u64) -> Result<(), Error> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::invalid(format!(
                "request {offset}+{len} is past the end of the export ({size} bytes)"
            ))),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error>;

    /// Writes `data` at `offset`; with `fua`, durable before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), Error>;

    /// Sets `len` bytes at `offset` to zero; `may_punch` is false when the client sent
    /// `NBD_CMD_FLAG_NO_HOLE` (the range must stay allocated). With `fua`, durable before
    /// returning.
    fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool, fua: bool) -> Result<(), Error>;

    /// Discards `len` bytes at `offset` (what they read as afterwards is the backend's choice);
    /// with `fua`, durable before returning.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Error>;

    /// Makes every change completed so far durable.
    fn flush(&self) -> Result<(), Error>;
}

/// Why a request was refused or failed: the errno sent to the client, a message for the log,
/// and whose fault it is. A client's fault (a bad range, a refused change) is logged at debug;
/// a failure of the backend at error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    errno: u32,
    message: String,
    client_fault: bool,
}

impl Error {
    /// The client asked for something it may not have (`errno` e.g. [`proto::EINVAL`],
    /// [`proto::EPERM`], [`proto::ENOSPC`]).
    pub fn refused(errno: u32, message: impl Into<String>) -> Error {
        Error {
            errno,
            message: message.into(),
            client_fault: true,
        }
    }

    /// A bad request (range, alignment, flags): `EINVAL`, the client's fault.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::refused(proto::EINVAL, message)
    }

    /// The backend failed (`errno` e.g. [`proto::EIO`], [`proto::ENOSPC`]).
    pub fn failed(errno: u32, message: impl Into<String>) -> Error {
        Error {
            errno,
            message: message.into(),
            client_fault: false,
        }
    }

    /// An I/O failure of the backend: `EIO`.
    pub fn io(message: impl Into<String>) -> Error {
        Error::failed(proto::EIO, message)
    }

    /// The errno sent to the client.
    pub fn errno(&self) -> u32 {
        self.errno
    }

    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the client caused it (logged at debug) rather than the backend failing (logged
    /// at error).
    pub fn is_client_fault(&self) -> bool {
        self.client_fault
    }
}
