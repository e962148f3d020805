//! quinn endpoints: the gateway's [`Server`], and the agent's [`connect`] and [`enroll`].
//!
//! # One endpoint, two ALPNs
//!
//! The server listens on one UDP port with two ALPNs. Client authentication is *optional* at the
//! TLS level and enforced per ALPN by the server code. One port is simpler to deploy (one firewall
//! rule, one address for agents) than two endpoints, and the rule stays in one place:
//!
//! - `haven/1` (replication): a client certificate issued by the site CA, unexpired and not in the
//!   CRL, is required. A presented certificate that fails verification fails the TLS handshake
//!   (the client sees a TLS alert, see [`Refusal`]); a connection without a certificate completes the
//!   handshake and is then closed by the server with application code [`CLOSE_CERT_REQUIRED`].
//!   Accepted connections come out of [`Server::accept`] with the [`PeerIdentity`] read from the
//!   certificate.
//! - `haven-enroll/1` (enrollment): no client certificate. The server serves exactly one exchange
//!   on one bidirectional stream and then closes; nothing else is served on this ALPN.
//!
//! # Enrollment
//!
//! 1. An operator creates a token on the CA ([`SiteCa::create_token`]) and gives its string form to
//!    the new agent.
//! 2. The agent ([`enroll`]) generates its key pair locally and connects with ALPN `haven-enroll/1`.
//!    It accepts the server only if the server's chain contains a certificate whose SHA-256 is the
//!    token's CA fingerprint, and the server certificate verifies against it
//!    ([`EnrollError::CaMismatch`] / [`EnrollError::ServerCertInvalid`] otherwise).
//! 3. The agent sends one frame `{token, csr_pem, machine_name}`; the server calls
//!    [`SiteCa::enroll`], which consumes the token durably, and answers one frame with the
//!    certificate and the CA certificate, or a refusal with a kind and the CA's message
//!    ([`EnrollError::Refused`]).
//! 4. The agent stores [`EnrolledIdentity`] (certificate, key, CA) and uses it with [`connect`].
//!
//! Frames are a 4-byte big-endian length and a JSON body, at most [`MAX_ENROLL_FRAME`] bytes;
//! the whole exchange must finish within 10 s. Refusal kinds: `token_malformed`, `token_wrong_ca`,
//! `token_unknown`, `token_secret_mismatch`, `token_expired`, `token_already_used`, `csr_invalid`,
//! `machine_name_invalid`, `internal`. The CA is shared behind a `std::sync::Mutex`; an enrollment
//! holds it for one signature and one fsynced state write.
//!
//! # Refusals, as the client sees them
//!
//! A client certificate is checked by the server after the client considers its handshake done,
//! so [`connect`] can return `Ok` and the refusal arrives at the first use of the connection as a
//! [`quinn::ConnectionError`]; [`Refusal::of`] names it: [`Refusal::CertificateRequired`] (no
//! certificate: enroll first), [`Refusal::UnknownCa`] (self-signed or another CA's certificate),
//! [`Refusal::CertificateExpired`] (renew), [`Refusal::CertificateRevoked`] (enroll again with a new
//! token).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::ca::{CaError, PeerIdentity, SiteCa, TokenString, sha256_hex};
use crate::tls::{self, ALPN_ENROLL, ALPN_HAVEN, PinFailure, PinnedCaVerifier, TlsError};

/// Application close code: `haven/1` without a client certificate.
pub const CLOSE_CERT_REQUIRED: u32 = 0x4801;
/// Application close code: the certificate verified but carries no Haven agent identity.
pub const CLOSE_BAD_IDENTITY: u32 = 0x4802;
/// Application close code: this server does not serve enrollment (no CA attached).
pub const CLOSE_ENROLL_DISABLED: u32 = 0x4803;
/// Application close code: the enrollment exchange is over.
pub const CLOSE_ENROLL_DONE: u32 = 0x4804;
/// Application close code: the peer's certificate was revoked while it was connected.
pub const CLOSE_REVOKED: u32 = 0x4805;
/// Largest enrollment frame body, in bytes.
pub const MAX_ENROLL_FRAME: usize = 64 * 1024;
const ENROLL_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of endpoints and connections.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("transport TLS configuration: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {addr} ({server_name}): {source}")]
    Connect {
        addr: SocketAddr,
        server_name: String,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("connection to {addr} failed: {source}")]
    Connection {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
}

/// Errors of [`enroll`].
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("enrollment: {0}")]
    Token(#[from] CaError),
    #[error(
        "enrollment: the server at {addr} does not present the CA pinned by the token (expected CA sha256 {expected}, chain has {presented:?}); check the gateway address or get a token from this gateway's site"
    )]
    CaMismatch {
        addr: SocketAddr,
        expected: String,
        presented: Vec<String>,
    },
    #[error(
        "enrollment: the server at {addr} presents the pinned CA but its certificate does not verify against it: {detail}; check the server name"
    )]
    ServerCertInvalid { addr: SocketAddr, detail: String },
    #[error("enrollment: {0}")]
    Net(#[from] NetError),
    #[error("enrollment refused by the gateway ({kind}): {message}")]
    Refused { kind: String, message: String },
    #[error("enrollment: protocol error with {addr}: {detail}")]
    Protocol { addr: SocketAddr, detail: String },
    #[error("enrollment: cannot create the agent key or CSR: {0}")]
    Key(#[from] rcgen::Error),
}

/// Why the server refused a replication connection, read from the close the client received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No client certificate on `haven/1`: enroll first.
    CertificateRequired,
    /// The certificate was not issued by the site CA (self-signed or another CA).
    UnknownCa,
    /// The certificate has expired: renew it.
    CertificateExpired,
    /// The certificate was revoked: enroll again with a new token.
    CertificateRevoked,
    /// Another TLS alert (its code).
    TlsAlert(u8),
    /// Another application close code.
    Application(u64),
}

impl Refusal {
    /// Classifies a connection error as a server refusal, if it is one.
    pub fn of(err: &quinn::ConnectionError) -> Option<Refusal> {
        match err {
            quinn::ConnectionError::ApplicationClosed(c) => {
                let code = u64::from(c.error_code);
                Some(if code == u64::from(CLOSE_CERT_REQUIRED) {
                    Refusal::CertificateRequired
                } else if code == u64::from(CLOSE_REVOKED) {
                    Refusal::CertificateRevoked
                } else {
                    Refusal::Application(code)
                })
            }
            quinn::ConnectionError::ConnectionClosed(c) => {
                let code = u64::from(c.error_code);
                if !(0x100..0x200).contains(&code) {
                    return None;
                }
                Some(match (code - 0x100) as u8 {
                    44 => Refusal::CertificateRevoked,
                    45 => Refusal::CertificateExpired,
                    48 => Refusal::UnknownCa,
                    116 => Refusal::CertificateRequired,
                    a => Refusal::TlsAlert(a),
                })
            }
            _ => None,
        }
    }
}

/// TLS material of a server.
#[derive(Clone)]
pub struct ServerTls {
    /// Server certificate, PEM (from [`SiteCa::issue_server_cert`]).
    pub cert_pem: String,
    /// Server private key, PEM.
    pub key_pem: String,
    /// Site CA certificate, PEM: the only issuer accepted for client certificates.
    pub ca_pem: String,
    /// CRLs, PEM (from [`SiteCa::crl_pem`]); may be empty.
    pub crl_pems: Vec<String>,
    /// Other CAs whose client certificates are accepted too, PEM: a joined process server
    /// accepts the agents its configuration server enrolled. Their CRLs go in `crl_pems`.
    pub client_ca_pems: Vec<String>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

/// An accepted replication connection and the verified identity of its agent.
#[derive(Debug)]
pub struct AgentConnection {
    pub connection: quinn::Connection,
    pub peer: PeerIdentity,
}

/// The gateway's QUIC server.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    tls: Mutex<ServerTls>,
    accepted: tokio::sync::Mutex<mpsc::Receiver<AgentConnection>>,
    task: JoinHandle<()>,
}

/// How often an idle connection is probed (a QUIC PING): a peer that restarted is found at
/// the next probe (see [`endpoint_config`]), not when a timeout expires.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A connection that hears nothing for this long is closed: the peer (or the path to it) is
/// gone without a word. Probes every [`KEEP_ALIVE`] keep a live idle connection open.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a replication sender waits, after an in-band ping (or its `Hello`), for any frame
/// of its peer before it gives the connection up. QUIC itself finds a dead or restarted peer
/// (probes every [`KEEP_ALIVE`], [`IDLE_TIMEOUT`], stateless resets), outside the streams and
/// whatever they carry; the in-band ping travels behind up to a window of data that a busy
/// gateway may take long to read, so it only guards against a peer whose stream is stuck.
pub const STREAM_WATCHDOG: Duration = Duration::from_secs(120);
/// A connection attempt that has no answer in this time is given up (and tried again by the
/// caller's backoff): a handshake takes a few round trips, and a gateway that is restarting
/// answers a fresh attempt at once but a retransmitted one only after QUIC's own backoff.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Streams of each kind a peer may have open at once on one connection. A process server
/// carries every agent it serves on one connection to its master target (one replication
/// stream per agent, one report stream per agent a second), so this is the number of agents
/// one process server can forward; quinn's default of 100 would queue the rest.
pub const MAX_STREAMS: u32 = 4096;

/// Flow-control windows for replication: a stream may have 16 MiB in flight (a receiver that
/// pauses to sync its journal must not stall the sender at quinn's default of ~1.2 MiB), a
/// connection 64 MiB. Memory per connection stays bounded by these, however many streams
/// share it.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(MAX_STREAMS));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("the idle timeout fits QUIC's range"),
    ));
    Arc::new(t)
}

/// The server endpoint's stateless-reset key and connection-id key, derived from the server's
/// private key, which the gateway keeps across restarts. So a restarted gateway recognises the
/// connection ids it issued before and answers a packet of a connection it no longer has with a
/// stateless reset its client accepts (RFC 9000 §10.3): the client's connection ends at once
/// and it reconnects, instead of waiting for a keepalive or idle timeout. (With keys drawn at
/// random per process, the reset would not verify and the packet would be dropped.)
fn endpoint_config(key_pem: &str) -> quinn::EndpointConfig {
    use sha2::{Digest, Sha256};
    let derive = |label: &[u8]| {
        let mut h = Sha256::new();
        h.update(b"haven quic endpoint v1\0");
        h.update(label);
        h.update(key_pem.as_bytes());
        h.finalize()
    };
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &derive(b"stateless-reset\0"));
    let cid_key = u64::from_le_bytes(derive(b"connection-id\0")[..8].try_into().expect("8 bytes"));
    let mut config = quinn::EndpointConfig::new(Arc::new(reset));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

fn quinn_server_config(tls: &ServerTls) -> Result<quinn::ServerConfig, NetError> {
    let cfg = tls::server_config(
        &tls.cert_pem,
        &tls.key_pem,
        &tls.ca_pem,
        &tls.client_ca_pems,
        &tls.crl_pems,
    )?;
    let quic = QuicServerConfig::try_from(cfg).map_err(|e| TlsError::Config {
        what: "QUIC server configuration",
        detail: e.to_string(),
    })?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport());
    Ok(config)
}

impl Server {
    /// Binds `addr` (port 0 picks one). With `enrollment`, the server serves `haven-enroll/1` with
    /// that CA; without, enrollment connections are closed with [`CLOSE_ENROLL_DISABLED`].
    /// Must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        tls: ServerTls,
        enrollment: Option<Arc<Mutex<SiteCa>>>,
    ) -> Result<Server, NetError> {
        let cfg = quinn_server_config(&tls)?;
        let bind = |source| NetError::Bind { addr, source };
        let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind(std::io::Error::other("no async runtime")))?;
        let endpoint =
            quinn::Endpoint::new(endpoint_config(&tls.key_pem), Some(cfg), socket, runtime)
                .map_err(bind)?;
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(accept_loop(endpoint.clone(), tx, enrollment));
        Ok(Server {
            endpoint,
            tls: Mutex::new(tls),
            accepted: tokio::sync::Mutex::new(rx),
            task,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Replaces the CRLs checked for new connections (after [`SiteCa::revoke`]). Connections
    /// already accepted are not affected.
    pub fn set_crls(&self, crl_pems: Vec<String>) -> Result<(), NetError> {
        let mut tls = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = tls.clone();
        next.crl_pems = crl_pems;
        let cfg = quinn_server_config(&next)?;
        self.endpoint.set_server_config(Some(cfg));
        *tls = next;
        Ok(())
    }

    /// The next accepted replication connection; `None` once the server is closed.
    pub async fn accept(&self) -> Option<AgentConnection> {
        self.accepted.lock().await.recv().await
    }

    /// Closes the endpoint and every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"server closing");
        self.task.abort();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    tx: mpsc::Sender<AgentConnection>,
    enrollment: Option<Arc<Mutex<SiteCa>>>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let tx = tx.clone();
        let enrollment = enrollment.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(%remote, error = %e, "transport: handshake refused");
                    return;
                }
            };
            let alpn = conn
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol);
            match alpn.as_deref() {
                Some(ALPN_HAVEN) => admit(conn, tx).await,
                Some(ALPN_ENROLL) => match enrollment {
                    Some(ca) => serve_enrollment(conn, ca).await,
                    None => conn.close(
                        CLOSE_ENROLL_DISABLED.into(),
                        b"this gateway does not serve enrollment; enroll at the configuration server",
                    ),
                },
                _ => conn.close(0u32.into(), b"unknown ALPN"),
            }
        });
    }
}

async fn admit(conn: quinn::Connection, tx: mpsc::Sender<AgentConnection>) {
    let remote = conn.remote_address();
    let certs = conn
        .peer_identity()
        .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok());
    let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
        tracing::info!(%remote, "transport: haven/1 without a client certificate refused");
        conn.close(
            CLOSE_CERT_REQUIRED.into(),
            b"client certificate required on haven/1: enroll this agent first (haven-enroll/1)",
        );
        return;
    };
    match PeerIdentity::from_cert_der(leaf) {
        Ok(peer) => {
            tracing::info!(%remote, agent = %peer.agent_id, machine = %peer.machine_name, "transport: agent connected");
            let _ = tx
                .send(AgentConnection {
                    connection: conn,
                    peer,
                })
                .await;
        }
        Err(detail) => {
            tracing::info!(%remote, %detail, "transport: client certificate without agent identity refused");
            conn.close(CLOSE_BAD_IDENTITY.into(), detail.as_bytes());
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    v: u32,
    token: String,
    csr_pem: String,
    machine_name: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum EnrollResponse {
    Ok {
        cert_pem: String,
        ca_pem: String,
        agent_id: String,
    },
    Refused {
        kind: String,
        message: String,
    },
}

fn refusal_kind(e: &CaError) -> &'static str {
    match e {
        CaError::TokenMalformed { .. } => "token_malformed",
        CaError::TokenWrongCa { .. } => "token_wrong_ca",
        CaError::TokenUnknown { .. } => "token_unknown",
        CaError::TokenSecretMismatch { .. } => "token_secret_mismatch",
        CaError::TokenExpired { .. } => "token_expired",
        CaError::TokenAlreadyUsed { .. } => "token_already_used",
        CaError::CsrInvalid { .. } => "csr_invalid",
        CaError::MachineNameInvalid { .. } => "machine_name_invalid",
        _ => "internal",
    }
}

async fn serve_enrollment(conn: quinn::Connection, ca: Arc<Mutex<SiteCa>>) {
    let remote = conn.remote_address();
    let exchange = async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let req: EnrollRequest = read_frame(&mut recv).await?;
        if req.v != 1 {
            return Err(format!(
                "enrollment request version {} is not supported",
                req.v
            ));
        }
        let result = {
            let mut ca = ca.lock().unwrap_or_else(|e| e.into_inner());
            ca.enroll(&req.token, &req.csr_pem, &req.machine_name)
                .map(|issued| (issued, ca.ca_cert_pem().to_string()))
        };
        let resp = match result {
            Ok((issued, ca_pem)) => {
                tracing::info!(%remote, agent = %issued.agent_id, machine = %req.machine_name, "transport: agent enrolled");
                EnrollResponse::Ok {
                    cert_pem: issued.cert_pem,
                    ca_pem,
                    agent_id: issued.agent_id,
                }
            }
            Err(e) => {
                tracing::info!(%remote, error = %e, "transport: enrollment refused");
                EnrollResponse::Refused {
                    kind: refusal_kind(&e).to_string(),
                    message: e.to_string(),
                }
            }
        };
        write_frame(&mut send, &resp).await?;
        let _ = send.finish();
        // Wait for the agent to close after reading the answer.
        conn.closed().await;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(ENROLL_TIMEOUT, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(detail)) => {
            tracing::info!(%remote, %detail, "transport: enrollment exchange failed");
            conn.close(CLOSE_ENROLL_DONE.into(), b"enrollment protocol error");
        }
        Err(_) => conn.close(CLOSE_ENROLL_DONE.into(), b"enrollment timed out"),
    }
}

async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), String> {
    let body = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
    if body.len() > MAX_ENROLL_FRAME {
        return Err(format!(
            "frame of {} bytes exceeds {MAX_ENROLL_FRAME}",
            body.len()
        ));
    }
    send.write_all(&(body.len() as u32).to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    send.write_all(&body).await.map_err(|e| e.to_string())
}

async fn read_frame<T: for<'de> Deserialize<'de>>(
    recv: &mut quinn::RecvStream,
) -> Result<T, String> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| format!("reading frame length: {e}"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_ENROLL_FRAME {
        return Err(format!("frame of {len} bytes exceeds {MAX_ENROLL_FRAME}"));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| format!("reading frame body: {e}"))?;
    serde_json::from_slice(&body).map_err(|e| format!("frame does not parse: {e}"))
}

fn client_endpoint(addr: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::client(local).map_err(|source| NetError::Bind {
        addr: local,
        source,
    })
}

fn quic_client(cfg: rustls::ClientConfig) -> Result<quinn::ClientConfig, NetError> {
    let quic = QuicClientConfig::try_from(cfg).map_err(|e| TlsError::Config {
        what: "QUIC client configuration",
        detail: e.to_string(),
    })?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport());
    Ok(config)
}

/// Opens a replication connection (ALPN `haven/1`) presenting the agent's certificate.
/// A refusal of the certificate may arrive after this returns; see [`Refusal::of`].
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<quinn::Connection, NetError> {
    let cfg = quic_client(tls::client_config(ca_pem, cert_pem, key_pem)?)?;
    let endpoint = client_endpoint(addr)?;
    let connecting = endpoint
        .connect_with(cfg, addr, server_name)
        .map_err(|source| NetError::Connect {
            addr,
            server_name: server_name.to_string(),
            source,
        })?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(connected) => connected.map_err(|source| NetError::Connection { addr, source }),
        Err(_) => Err(NetError::Connection {
            addr,
            source: quinn::ConnectionError::TimedOut,
        }),
    }
}

/// What an agent keeps after enrolling.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrolledIdentity {
    /// The agent certificate, PEM.
    pub cert_pem: String,
    /// The agent's private key, PEM (generated locally, never sent).
    pub key_pem: String,
    /// The site CA certificate, PEM (its SHA-256 is the token's fingerprint).
    pub ca_pem: String,
    /// The agent id the CA assigned.
    pub agent_id: String,
}

impl std::fmt::Debug for EnrolledIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrolledIdentity")
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

/// Enrolls this machine with the gateway at `addr` using a one-time token (see the module docs).
pub async fn enroll(
    addr: SocketAddr,
    server_name: &str,
    token: &str,
    machine_name: &str,
) -> Result<EnrolledIdentity, EnrollError> {
    let parsed: TokenString = token.parse()?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, machine_name.to_string());
    let csr_pem = params.serialize_request(&key)?.pem()?;

    let verifier = Arc::new(PinnedCaVerifier::new(&parsed.ca_fingerprint));
    let cfg = quic_client(tls::enroll_client_config(verifier.clone()).map_err(NetError::from)?)?;
    let endpoint = client_endpoint(addr)?;
    let connecting = endpoint
        .connect_with(cfg, addr, server_name)
        .map_err(|source| NetError::Connect {
            addr,
            server_name: server_name.to_string(),
            source,
        })?;
    let conn = match connecting.await {
        Ok(c) => c,
        Err(source) => {
            return Err(match verifier.failure() {
                Some(PinFailure::CaNotPresented {
                    expected,
                    presented,
                }) => EnrollError::CaMismatch {
                    addr,
                    expected,
                    presented,
                },
                Some(PinFailure::ServerCertInvalid { detail }) => {
                    EnrollError::ServerCertInvalid { addr, detail }
                }
                None => NetError::Connection { addr, source }.into(),
            });
        }
    };
    let protocol = |detail: String| EnrollError::Protocol { addr, detail };
    let result = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| protocol(e.to_string()))?;
        let req = EnrollRequest {
            v: 1,
            token: token.trim().to_string(),
            csr_pem,
            machine_name: machine_name.to_string(),
        };
        write_frame(&mut send, &req).await.map_err(protocol)?;
        let _ = send.finish();
        let resp: EnrollResponse = read_frame(&mut recv).await.map_err(protocol)?;
        match resp {
            EnrollResponse::Refused { kind, message } => {
                Err(EnrollError::Refused { kind, message })
            }
            EnrollResponse::Ok {
                cert_pem,
                ca_pem,
                agent_id,
            } => {
                let ca_der =
                    tls::cert_from_pem("CA certificate", &ca_pem).map_err(NetError::from)?;
                if sha256_hex(&ca_der) != parsed.ca_fingerprint {
                    return Err(protocol(
                        "the gateway returned a CA certificate other than the pinned one".into(),
                    ));
                }
                let cert_der =
                    tls::cert_from_pem("agent certificate", &cert_pem).map_err(NetError::from)?;
                let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
                    .map_err(|e| protocol(format!("issued certificate does not parse: {e}")))?;
                if cert.tbs_certificate.subject_pki.raw != key.subject_public_key_info() {
                    return Err(protocol(
                        "the issued certificate is not for this agent's key".into(),
                    ));
                }
                Ok(EnrolledIdentity {
                    cert_pem,
                    key_pem: key.serialize_pem(),
                    ca_pem,
                    agent_id,
                })
            }
        }
    }
    .await;
    conn.close(CLOSE_ENROLL_DONE.into(), b"enrollment done");
    endpoint.wait_idle().await;
    result
}
