//! The API's HTTPS listener: TCP connections accepted, TLS handshakes run concurrently (a slow
//! or silent client holds up no one else), and finished sessions handed to axum.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use haven_net::rustls;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// An [`axum::serve::Listener`] yielding TLS sessions.
pub(crate) struct Listener {
    sessions: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    /// Accepts connections and runs their handshakes; stops with the listener.
    acceptor: tokio::task::JoinHandle<()>,
}

impl Listener {
    pub(crate) fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> Listener {
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, sessions) = mpsc::channel(64);
        let acceptor = tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), tx));
        Listener {
            sessions,
            local,
            acceptor,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

async fn accept_loop(
    tcp: TcpListener,
    tls: TlsAcceptor,
    sessions: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match tcp.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, mostly: wait for some to be freed, as axum does.
                tracing::warn!(error = %e, "API: accepting a connection");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let tls = tls.clone();
        let sessions = sessions.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(session)) => {
                    let _ = sessions.send((session, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "API: TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "API: TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for Listener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.sessions.recv().await {
            Some(session) => session,
            // The acceptor is gone only when the listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
