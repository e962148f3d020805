//! A plugin's stderr: the last [`TAIL_BYTES`] it wrote, kept so a trap can show the panic
//! message that preceded it. Writes never fail and never block, however much is written.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Bytes of a plugin's stderr kept.
pub const TAIL_BYTES: usize = 16 * 1024;
/// Most bytes one write may hand over (the guest splits longer writes).
const WRITE_BUDGET: usize = 64 * 1024;

/// The tail of what a plugin wrote to stderr; clones share it.
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<u8>>>);

impl Tail {
    fn push(&self, bytes: &[u8]) {
        let mut tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let keep = bytes.len().min(TAIL_BYTES);
        tail.extend(&bytes[bytes.len() - keep..]);
        let excess = tail.len().saturating_sub(TAIL_BYTES);
        tail.drain(..excess);
    }

    /// What is kept, and forgets it (each call starts with an empty tail).
    pub fn take(&self) -> Vec<u8> {
        let mut tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
        tail.drain(..).collect()
    }
}

impl IsTerminal for Tail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Tail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for Tail {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_BUDGET)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Tail {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for Tail {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_last_bytes_and_never_fails() {
        let mut t = Tail::default();
        for _ in 0..100 {
            OutputStream::write(&mut t, bytes::Bytes::from(vec![b'x'; 1000])).unwrap();
        }
        OutputStream::write(&mut t, bytes::Bytes::from_static(b"panicked at here")).unwrap();
        let kept = t.take();
        assert_eq!(kept.len(), TAIL_BYTES);
        assert!(kept.ends_with(b"panicked at here"));
        assert!(t.take().is_empty());
    }
}
