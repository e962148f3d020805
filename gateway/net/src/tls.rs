//! rustls configurations for Haven (ring provider, TLS 1.3 only, as QUIC requires).
//!
//! - The server presents `[server certificate, CA certificate]`, so that an enrolling agent, which
//!   knows only the CA's fingerprint, can find and pin the CA in the chain.
//! - The server's client verifier trusts only the site CA, checks the CRLs it was given, and
//!   accepts a connection without a client certificate (enrollment needs that); the server code then
//!   refuses such a connection on `haven/1` (see [`crate::endpoint`]). A client certificate that is
//!   presented but invalid (other CA, self-signed, expired, revoked) fails the TLS handshake itself.
//! - [`PinnedCaVerifier`] is the enrolling agent's server verifier: the chain must contain a
//!   certificate whose SHA-256 is the token's fingerprint, and the server certificate must verify
//!   against that certificate as the only root.

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::ca::sha256_hex;

/// ALPN of replication connections (client certificate required).
pub const ALPN_HAVEN: &[u8] = b"haven/1";
/// ALPN of enrollment connections (no client certificate).
pub const ALPN_ENROLL: &[u8] = b"haven-enroll/1";

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: cannot parse PEM: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("{what}: {detail}")]
    Config { what: &'static str, detail: String },
}

type Result<T, E = TlsError> = std::result::Result<T, E>;

/// The ring crypto provider used everywhere in Haven.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn cert_from_pem(what: &'static str, pem: &str) -> Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what,
        detail: e.to_string(),
    })
}

pub(crate) fn key_from_pem(what: &'static str, pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what,
        detail: e.to_string(),
    })
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>> {
    roots_of([ca_pem])
}

fn roots_of<'a>(ca_pems: impl IntoIterator<Item = &'a str>) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for ca_pem in ca_pems {
        roots
            .add(cert_from_pem("CA certificate", ca_pem)?)
            .map_err(|source| TlsError::Rustls {
                what: "CA certificate is not a usable trust anchor",
                source,
            })?;
    }
    Ok(Arc::new(roots))
}

/// The server's rustls configuration: both ALPNs, optional client certificate verified against
/// `ca_pem` and `crl_pems`.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    client_ca_pems: &[String],
    crl_pems: &[String],
) -> Result<rustls::ServerConfig> {
    let mut cfg = site_server_config(cert_pem, key_pem, ca_pem, client_ca_pems, crl_pems, false)?;
    cfg.alpn_protocols = vec![ALPN_HAVEN.to_vec(), ALPN_ENROLL.to_vec()];
    Ok(cfg)
}

/// The rustls configuration of an NBD export served over TLS (`NBD_OPT_STARTTLS`): this
/// gateway's certificate, and a client certificate from the site CA required (checked against
/// `ca_pem` and `crl_pems`); no ALPN (NBD clients send none).
pub fn nbd_server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    crl_pems: &[String],
) -> Result<rustls::ServerConfig> {
    site_server_config(cert_pem, key_pem, ca_pem, &[], crl_pems, true)
}

/// The rustls configuration of the HTTPS API: this gateway's certificate chain (the CA
/// certificate included, so a client that pinned the CA's fingerprint finds it), TLS 1.2 and
/// 1.3 (browsers and HTTP libraries speak both), ALPN `http/1.1`, and no client certificate:
/// callers are authenticated by their API token.
pub fn api_server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<rustls::ServerConfig> {
    let chain = vec![
        cert_from_pem("server certificate", cert_pem)?,
        cert_from_pem("CA certificate", ca_pem)?,
    ];
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "server protocol versions",
            source,
        })?
        .with_no_client_auth()
        .with_single_cert(chain, key_from_pem("server key", key_pem)?)
        .map_err(|source| TlsError::Rustls {
            what: "server certificate and key do not match",
            source,
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// TLS 1.3 with this certificate chain; client certificates verified against the site CA and
/// its CRLs, and `required` or optional.
fn site_server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    client_ca_pems: &[String],
    crl_pems: &[String],
    required: bool,
) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let crls = crl_pems
        .iter()
        .map(|p| {
            CertificateRevocationListDer::from_pem_slice(p.as_bytes()).map_err(|e| TlsError::Pem {
                what: "CRL",
                detail: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut verifier = WebPkiClientVerifier::builder_with_provider(
        roots_of(std::iter::once(ca_pem).chain(client_ca_pems.iter().map(String::as_str)))?,
        provider.clone(),
    )
    .with_crls(crls);
    if !required {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier.build().map_err(|e| TlsError::Config {
        what: "client certificate verifier",
        detail: e.to_string(),
    })?;
    let chain = vec![
        cert_from_pem("server certificate", cert_pem)?,
        cert_from_pem("CA certificate", ca_pem)?,
    ];
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "server protocol versions",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_from_pem("server key", key_pem)?)
        .map_err(|source| TlsError::Rustls {
            what: "server certificate and key do not match",
            source,
        })
}

/// The agent's replication configuration: trusts only `ca_pem`, presents its certificate.
pub fn client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "client protocol versions",
            source,
        })?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(
            vec![cert_from_pem("client certificate", cert_pem)?],
            key_from_pem("client key", key_pem)?,
        )
        .map_err(|source| TlsError::Rustls {
            what: "client certificate and key do not match",
            source,
        })?;
    cfg.alpn_protocols = vec![ALPN_HAVEN.to_vec()];
    Ok(cfg)
}

/// The enrolling agent's configuration: no client certificate, server pinned by CA fingerprint.
pub fn enroll_client_config(verifier: Arc<PinnedCaVerifier>) -> Result<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "client protocol versions",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_ENROLL.to_vec()];
    Ok(cfg)
}

/// Why a pinned server was refused, kept for a clear error after the handshake fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinFailure {
    /// No certificate in the server's chain has the token's fingerprint.
    CaNotPresented {
        expected: String,
        presented: Vec<String>,
    },
    /// The pinned CA is in the chain but the server certificate does not verify against it.
    ServerCertInvalid { detail: String },
}

/// Server verifier that pins the CA by SHA-256 fingerprint (enrollment).
#[derive(Debug)]
pub struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
    failure: Mutex<Option<PinFailure>>,
    ca: Mutex<Option<CertificateDer<'static>>>,
}

impl PinnedCaVerifier {
    /// `fingerprint`: SHA-256 of the CA certificate (DER), hex.
    pub fn new(fingerprint: &str) -> Self {
        PinnedCaVerifier {
            fingerprint: fingerprint.to_ascii_lowercase(),
            provider: provider(),
            failure: Mutex::new(None),
            ca: Mutex::new(None),
        }
    }

    /// Why the last verification failed, if it did.
    pub fn failure(&self) -> Option<PinFailure> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The pinned CA certificate as found in the server's chain.
    pub fn pinned_ca(&self) -> Option<CertificateDer<'static>> {
        self.ca.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn fail(&self, f: PinFailure) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| sha256_hex(c) == self.fingerprint)
        else {
            self.fail(PinFailure::CaNotPresented {
                expected: self.fingerprint.clone(),
                presented: std::iter::once(end_entity)
                    .chain(intermediates)
                    .map(|c| sha256_hex(c))
                    .collect(),
            });
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        match inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now) {
            Ok(v) => {
                *self.ca.lock().unwrap_or_else(|e| e.into_inner()) = Some(ca.clone().into_owned());
                Ok(v)
            }
            Err(e) => {
                self.fail(PinFailure::ServerCertInvalid {
                    detail: e.to_string(),
                });
                Err(e)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
