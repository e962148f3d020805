//! What an NBD export serves: a [`Backend`], the [`Extent`]s of its block status, and the
//! [`Error`] a request fails with.

use crate::proto;

/// One run of a block-status answer: `len` bytes that share `flags`.
///
/// For `base:allocation` the flags are [`proto::STATE_HOLE`] (not allocated) and
/// [`proto::STATE_ZERO`] (reads as zeroes); a backend's own contexts define their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes; never 0.
    pub len: u64,
    /// The context's status flags for these bytes.
    pub flags: u32,
}

/// A block device exported over NBD.
///
/// The server calls [`Backend::check_range`] before every `read`, `write`, `write_zeroes`,
/// `trim`, `allocation` and `context_status`, and calls those only with a range it accepted;
/// `read` and `write` get at most [`proto::MAX_BLOCK`] bytes. Calls come concurrently: up to
/// 1 + [`crate::WORKERS`] at once per connection, from every connection open. The server
/// orders only FLUSH: it is called once every change received before it on that connection
/// has returned; changes in flight together may reach the backend in any order (NBD does not
/// order them), so a backend that needs one order of changes (the agent's log) takes its own
/// lock.
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
    ///
    /// With `fast` (the client sent `NBD_CMD_FLAG_FAST_ZERO`: it asks whether zeroing is cheaper
    /// than writing zeroes, typically before copying a sparse image), a backend that cannot
    /// zero the range faster than a WRITE of zeroes (punch a hole, record the range) returns
    /// `Error::refused(proto::ENOTSUP, ..)` at once and changes nothing; the client then
    /// writes the zeroes itself. The server passes that error on unchanged.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), Error>;

    /// Discards `len` bytes at `offset` (what they read as afterwards is the backend's choice);
    /// with `fua`, durable before returning.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Error>;

    /// Makes every change completed so far durable.
    fn flush(&self) -> Result<(), Error>;

    /// `base:allocation` of `[offset, offset + len)`: extents from `offset` on, covering at
    /// least one byte and at most `len` (fewer is fine: the server asks again from where they
    /// end), with the flags [`proto::STATE_HOLE`] | [`proto::STATE_ZERO`]. The server answers
    /// `NBD_CMD_BLOCK_STATUS` with it and, with structured replies, sends the `STATE_ZERO`
    /// extents of a read as holes without reading them. Lengths should be multiples of
    /// [`proto::MIN_BLOCK`] except at the end of the export.
    ///
    /// The default: one extent, all data (flags 0), which is always true.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        let _ = offset;
        Ok(vec![Extent { len, flags: 0 }])
    }

    /// Names of the backend's own metadata contexts matching `query`: a full name
    /// (`"haven:changed-since:3"`), a namespace prefix ending in `':'` (`"haven:"`: every
    /// context of that namespace), or `""` (every context the backend has; a client listing
    /// all contexts). A name is `namespace:leaf`. The server answers `base:` queries itself
    /// and never passes them on. The default: none.
    fn meta_contexts(&self, query: &str) -> Vec<String> {
        let _ = query;
        Vec::new()
    }

    /// Block status of one of the backend's own contexts (a name [`Backend::meta_contexts`]
    /// returned); the same extent rules as [`Backend::allocation`]. The default refuses with
    /// `ENOTSUP`.
    fn context_status(&self, name: &str, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        let _ = (offset, len);
        Err(Error::refused(
            proto::ENOTSUP,
            format!("metadata context {name:?} has no block status"),
        ))
    }

    /// Whether writes made on one connection and flushed (FLUSH, or FUA) on any connection
    /// are durable and visible to every connection, so that clients may spread their requests
    /// over several connections (`NBD_FLAG_CAN_MULTI_CONN`): true when the backend has no
    /// cache of its own per connection. The default: false.
    fn multi_conn(&self) -> bool {
        false
    }
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
