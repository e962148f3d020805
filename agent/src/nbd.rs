//! The NBD front end: a workload (QEMU, qemu-io, qemu-img, any NBD client) uses the protected
//! disk through a [`haven_nbd::Server`] whose backend is the [`Splitter`], so every write goes
//! through the write splitter. The server itself (handshake, transmission, close) is the
//! `haven-nbd` crate; this module maps the splitter onto its [`Backend`] trait.
//!
//! Block status (`base:allocation`) reports the backing file's holes; several connections may
//! share the disk (multi-conn: a FLUSH on any makes every connection's completed writes
//! durable); `FAST_ZERO` is refused with `ENOTSUP` on a block device, where zeroing writes.
//!
//! Requests must be aligned to [`crate::splitter::SECTOR`] (advertised as the minimum block
//! size); a refused change ([`SplitError::Invalid`]) is the client's fault, anything else the
//! splitter's failure, with the errno of [`SplitError::errno`] (`ENOSPC` when the log is full).

pub use haven_nbd::{Server, bind_unix};

use haven_nbd::{Backend, Error, Extent, proto};

use crate::splitter::{SplitError, Splitter};

impl From<SplitError> for Error {
    fn from(e: SplitError) -> Error {
        match e {
            SplitError::Invalid(msg) => Error::invalid(msg),
            other => Error::failed(other.errno(), other.to_string()),
        }
    }
}

impl Backend for Splitter {
    fn size(&self) -> u64 {
        Splitter::size(self)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), Error> {
        Ok(Splitter::check_range(self, offset, len)?)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        Ok(Splitter::read(self, offset, buf)?)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), Error> {
        Ok(Splitter::write(self, offset, data, fua)?)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), Error> {
        if fast && !self.zeroes_fast() {
            return Err(Error::refused(
                proto::ENOTSUP,
                "zeroing a block device writes the zeroes: not fast",
            ));
        }
        Ok(Splitter::write_zeroes(self, offset, len, may_punch, fua)?)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Error> {
        Ok(Splitter::trim(self, offset, len, fua)?)
    }

    fn flush(&self) -> Result<(), Error> {
        Splitter::flush(self)?;
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        let runs = Splitter::allocation(self, offset, len)?;
        Ok(runs
            .into_iter()
            .map(|(len, hole)| Extent {
                len,
                flags: if hole {
                    proto::STATE_HOLE | proto::STATE_ZERO
                } else {
                    0
                },
            })
            .collect())
    }

    /// Every connection writes through the one splitter, and a FLUSH syncs the whole log and
    /// the whole disk: what any connection had completed is durable once it returns.
    fn multi_conn(&self) -> bool {
        true
    }
}
