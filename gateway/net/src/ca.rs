//! The site CA: a folder holding the CA key and certificate and a small state file.
//!
//! # What is stored where
//!
//! | file | format | content |
//! |---|---|---|
//! | `ca.crt.pem` | PEM | the CA certificate (self-signed, ECDSA P-256, 10 years) |
//! | `ca.key.pem` | PEM (PKCS#8), mode 0600 | the CA private key |
//! | `ca.state` | Haven's own: header line `HAVEN-CA-STATE <version> <sha256-hex of body>` then a JSON body | site name, enrollment tokens (id, SHA-256 of the secret, expiry, when and by whom used), issued certificates, revoked serials, CRL number |
//!
//! Every file is written atomically: temp file, fsync, rename, fsync of the folder. A state file
//! whose checksum does not match its body, or with an unknown version, is refused on `open` with
//! an error naming the file.
//!
//! # Enrollment tokens
//!
//! [`SiteCa::create_token`] returns an [`EnrollToken`] whose string form is
//! `haven1.<id>.<secret>.<ca-sha256-hex>`. Only the SHA-256 of the secret is stored. The last part
//! is the fingerprint of the CA certificate: a new agent pins the CA with it (like kubeadm's
//! discovery hash), so it needs nothing else to trust the gateway. A token is consumed by its first
//! successful [`SiteCa::enroll`]; a consumed token stays in the state so that a second use is
//! refused as [`CaError::TokenAlreadyUsed`] rather than as unknown.
//!
//! # Agent certificates
//!
//! The agent's private key never leaves the agent: it sends a CSR, and [`SiteCa::enroll`] signs a
//! certificate for the CSR's public key (everything else in the CSR is ignored). The subject's
//! common name is the machine name, and the SAN carries `urn:haven:agent:<agent-id>` with a freshly
//! generated agent id. [`PeerIdentity::from_cert_der`] reads both back on the server.
//!
//! # Revocation
//!
//! [`SiteCa::revoke`] records a serial; [`SiteCa::crl_pem`] signs a CRL listing every revoked serial,
//! which the TLS layer checks (see [`crate::endpoint::Server::set_crls`]).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

const CA_CERT_FILE: &str = "ca.crt.pem";
const CA_KEY_FILE: &str = "ca.key.pem";
const STATE_FILE: &str = "ca.state";
const STATE_MAGIC: &str = "HAVEN-CA-STATE";
const STATE_VERSION: u32 = 1;
/// Prefix of the string form of an enrollment token (the token format version).
pub const TOKEN_PREFIX: &str = "haven1";
/// URI SAN prefix carrying the agent id in agent certificates.
pub const AGENT_URI_PREFIX: &str = "urn:haven:agent:";
/// Default validity of an agent certificate: one year.
pub const DEFAULT_CLIENT_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const CRL_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest machine name accepted at enrollment.
pub const MAX_MACHINE_NAME_LEN: usize = 253;

/// Errors of the site CA. Each names what went wrong and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(
        "site CA: {dir} already holds a CA ({file} exists); open it with SiteCa::open or choose an empty folder"
    )]
    AlreadyInitialised { dir: PathBuf, file: &'static str },
    #[error("site CA: {dir} holds no CA ({file} is missing); create one with SiteCa::init")]
    NotInitialised { dir: PathBuf, file: &'static str },
    #[error("site CA: {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("site CA: {path} is corrupt: {detail}; restore it from a backup")]
    Corrupt { path: PathBuf, detail: String },
    #[error("site CA: {what}: {source}")]
    Crypto {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error(
        "enrollment token is malformed: {detail} (expected {TOKEN_PREFIX}.<id>.<secret>.<ca-sha256-hex>)"
    )]
    TokenMalformed { detail: String },
    #[error(
        "enrollment token {id} was made for CA {token_ca}, but this site's CA is {site_ca}; create a token on this site"
    )]
    TokenWrongCa {
        id: String,
        token_ca: String,
        site_ca: String,
    },
    #[error("enrollment token {id} is not known to this site CA; create a new token")]
    TokenUnknown { id: String },
    #[error("enrollment token {id}: the secret does not match; check the token was copied whole")]
    TokenSecretMismatch { id: String },
    #[error(
        "enrollment token {id} expired at unix time {expired_at}; create a new token (tokens are one-time and short-lived)"
    )]
    TokenExpired { id: String, expired_at: u64 },
    #[error(
        "enrollment token {id} was already used at unix time {used_at} (agent {agent_id}); tokens are one-time, create a new one"
    )]
    TokenAlreadyUsed {
        id: String,
        used_at: u64,
        agent_id: String,
    },
    #[error("certificate signing request is invalid: {detail}")]
    CsrInvalid { detail: String },
    #[error("machine name {name:?} is invalid: {reason}")]
    MachineNameInvalid { name: String, reason: &'static str },
    #[error("invalid server certificate name {name:?}: {reason}")]
    ServerNameInvalid { name: String, reason: String },
    #[error(
        "serial {serial} was not issued by this site CA; list issued certificates with SiteCa::issued"
    )]
    UnknownSerial { serial: String },
    #[error("invalid certificate validity: {detail}")]
    InvalidValidity { detail: String },
}

type Result<T, E = CaError> = std::result::Result<T, E>;

/// Mode of the CA's private key (written through `haven_fsutil::write_atomic`).
const PRIVATE: u32 = 0o600;
/// Mode of its other files.
const PUBLIC: u32 = 0o644;

impl From<haven_fsutil::Error> for CaError {
    fn from(e: haven_fsutil::Error) -> CaError {
        CaError::Io {
            action: e.step,
            path: e.path,
            source: e.source,
        }
    }
}

/// A one-time enrollment token.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollToken {
    /// Public id of the token (16 hex characters).
    pub id: String,
    /// The secret (64 hex characters); only its SHA-256 is stored by the CA.
    pub secret: String,
    /// SHA-256 of the CA certificate (DER), 64 hex characters.
    pub ca_fingerprint: String,
    /// Unix seconds after which the token is refused.
    pub expires_at: u64,
}

impl fmt::Debug for EnrollToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl fmt::Display for EnrollToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.id, self.secret, self.ca_fingerprint
        )
    }
}

/// The parsed string form of a token (without the expiry, which only the CA knows).
#[derive(Clone, PartialEq, Eq)]
pub struct TokenString {
    pub id: String,
    pub secret: String,
    pub ca_fingerprint: String,
}

impl fmt::Debug for TokenString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenString")
            .field("id", &self.id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

impl FromStr for TokenString {
    type Err = CaError;
    fn from_str(s: &str) -> Result<Self> {
        let malformed = |detail: &str| CaError::TokenMalformed {
            detail: detail.to_string(),
        };
        let parts: Vec<&str> = s.trim().split('.').collect();
        if parts.len() != 4 {
            return Err(malformed("it must have 4 parts separated by '.'"));
        }
        if parts[0] != TOKEN_PREFIX {
            return Err(malformed("unknown prefix"));
        }
        let check = |p: &str, len: usize, what: &str| {
            if p.len() == len && p.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(p.to_ascii_lowercase())
            } else {
                Err(malformed(&format!(
                    "the {what} must be {len} hex characters"
                )))
            }
        };
        Ok(TokenString {
            id: check(parts[1], 16, "id")?,
            secret: check(parts[2], 64, "secret")?,
            ca_fingerprint: check(parts[3], 64, "CA fingerprint")?,
        })
    }
}

/// A certificate issued to an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The generated agent id carried in the certificate.
    pub agent_id: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Unix seconds at which the certificate expires.
    pub not_after: u64,
}

/// Validity window of a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From now (minus a minute of clock skew) for `d`.
    pub fn from_now(d: Duration) -> Self {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(60),
            not_after: now + d,
        }
    }
}

/// The identity an agent certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub agent_id: String,
    pub machine_name: String,
    /// Serial number, lowercase hex.
    pub serial: String,
}

impl PeerIdentity {
    /// Reads the identity from an agent certificate (DER). The certificate must already be verified.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("cannot parse the client certificate: {e}"))?;
        let machine_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or("the client certificate has no common name (machine name)")?
            .to_string();
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("bad subject alternative names: {e}"))?
            .ok_or("the client certificate has no subject alternative names (agent id)")?;
        let agent_id = san
            .value
            .general_names
            .iter()
            .find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix(AGENT_URI_PREFIX),
                _ => None,
            })
            .ok_or("the client certificate carries no agent id URI")?
            .to_string();
        Ok(PeerIdentity {
            agent_id,
            machine_name,
            serial: hex(cert.raw_serial()),
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRecord {
    secret_sha256: String,
    created_at: u64,
    expires_at: u64,
    used_at: Option<u64>,
    used_by_agent: Option<String>,
}

/// A certificate the CA issued (kept in the state file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedRecord {
    /// `agent` or `server`.
    pub kind: String,
    /// Agent id (agents) or the first name (servers).
    pub subject: String,
    /// Machine name (agents) or all names (servers), comma separated.
    pub names: String,
    pub not_after: u64,
    pub issued_at: u64,
}

/// A revoked serial.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Unix seconds.
    pub revoked_at: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    site_name: String,
    tokens: BTreeMap<String, TokenRecord>,
    /// By serial (hex).
    issued: BTreeMap<String, IssuedRecord>,
    revoked: Vec<Revoked>,
    crl_number: u64,
}

/// What [`SiteCa::sign_new_key`] records of a certificate it issues.
struct Leaf<'a> {
    kind: &'static str,
    subject: &'a str,
    names: &'a str,
    validity: Duration,
}

/// The site CA, opened from its folder.
pub struct SiteCa {
    dir: PathBuf,
    ca_cert_pem: String,
    ca_cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    state: State,
    client_cert_validity: Duration,
}

impl fmt::Debug for SiteCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteCa")
            .field("dir", &self.dir)
            .field("site_name", &self.state.site_name)
            .finish_non_exhaustive()
    }
}

impl SiteCa {
    /// Creates a new CA in `dir` (created if missing). Refuses a folder that already holds a CA.
    pub fn init(dir: impl AsRef<Path>, site_name: &str) -> Result<SiteCa> {
        let dir = dir.as_ref().to_path_buf();
        if site_name.trim().is_empty() {
            return Err(CaError::InvalidValidity {
                detail: "site name must not be empty".into(),
            });
        }
        for file in [CA_CERT_FILE, CA_KEY_FILE, STATE_FILE] {
            if dir.join(file).exists() {
                return Err(CaError::AlreadyInitialised { dir, file });
            }
        }
        haven_fsutil::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(io("set permissions of", &dir))?;

        let key = KeyPair::generate().map_err(crypto("generate the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Haven site CA {site_name}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Haven");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let v = Validity::from_now(CA_VALIDITY);
        params.not_before = to_odt(v.not_before);
        params.not_after = to_odt(v.not_after);
        params.serial_number = Some(random_serial().0);
        let cert = params
            .self_signed(&key)
            .map_err(crypto("self-sign the CA certificate"))?;

        let state = State {
            site_name: site_name.to_string(),
            tokens: BTreeMap::new(),
            issued: BTreeMap::new(),
            revoked: Vec::new(),
            crl_number: 1,
        };
        // Key first, certificate second, state last: `open` requires all three.
        let key_pem = key.serialize_pem();
        haven_fsutil::write_atomic(&dir.join(CA_KEY_FILE), key_pem.as_bytes(), PRIVATE)?;
        haven_fsutil::write_atomic(&dir.join(CA_CERT_FILE), cert.pem().as_bytes(), PUBLIC)?;
        haven_fsutil::write_atomic(&dir.join(STATE_FILE), &encode_state(&state), PUBLIC)?;
        Self::open(dir)
    }

    /// Opens the CA in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<SiteCa> {
        let dir = dir.as_ref().to_path_buf();
        let read = |file: &'static str| -> Result<Vec<u8>> {
            let path = dir.join(file);
            match fs::read(&path) {
                Ok(b) => Ok(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(CaError::NotInitialised {
                        dir: dir.clone(),
                        file,
                    })
                }
                Err(e) => Err(CaError::Io {
                    action: "read",
                    path,
                    source: e,
                }),
            }
        };
        let corrupt = |file: &str, detail: String| CaError::Corrupt {
            path: dir.join(file),
            detail,
        };
        let key_pem = String::from_utf8(read(CA_KEY_FILE)?)
            .map_err(|_| corrupt(CA_KEY_FILE, "not UTF-8 PEM".into()))?;
        let ca_cert_pem = String::from_utf8(read(CA_CERT_FILE)?)
            .map_err(|_| corrupt(CA_CERT_FILE, "not UTF-8 PEM".into()))?;
        let state_bytes = read(STATE_FILE)?;
        let state = decode_state(&state_bytes).map_err(|d| corrupt(STATE_FILE, d))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| corrupt(CA_KEY_FILE, format!("cannot load the key: {e}")))?;
        let ca_cert_der = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())
            .map_err(|e| corrupt(CA_CERT_FILE, format!("cannot parse PEM: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&ca_cert_der, key)
            .map_err(|e| corrupt(CA_CERT_FILE, format!("cannot load the CA certificate: {e}")))?;
        Ok(SiteCa {
            dir,
            ca_cert_pem,
            ca_cert_der,
            issuer,
            state,
            client_cert_validity: DEFAULT_CLIENT_CERT_VALIDITY,
        })
    }

    /// Sets the validity of agent certificates issued by [`SiteCa::enroll`] (default one year).
    pub fn with_client_cert_validity(mut self, validity: Duration) -> Self {
        self.client_cert_validity = validity;
        self
    }

    /// The folder of this CA.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The site name given at `init`.
    pub fn site_name(&self) -> &str {
        &self.state.site_name
    }

    /// The CA certificate, PEM.
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// SHA-256 of the CA certificate (DER), lowercase hex.
    pub fn ca_fingerprint(&self) -> String {
        sha256_hex(&self.ca_cert_der)
    }

    /// Issues a server certificate for a gateway. Each name is an IP address or a DNS name.
    /// Returns `(certificate PEM, private key PEM)`.
    pub fn issue_server_cert(&mut self, names: &[String]) -> Result<(String, String)> {
        if names.is_empty() {
            return Err(CaError::ServerNameInvalid {
                name: String::new(),
                reason: "give at least one DNS name or IP address".into(),
            });
        }
        let mut params = CertificateParams::default();
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    SanType::DnsName(name.clone().try_into().map_err(|e: rcgen::Error| {
                        CaError::ServerNameInvalid {
                            name: name.clone(),
                            reason: e.to_string(),
                        }
                    })?)
                }
            };
            params.subject_alt_names.push(san);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_identifier_method = KeyIdMethod::Sha256;
        let leaf = Leaf {
            kind: "server",
            subject: &names[0],
            names: &names.join(","),
            validity: SERVER_CERT_VALIDITY,
        };
        self.sign_new_key(params, leaf)
    }

    /// Issues a certificate for an NBD client (a tool such as qemu or nbdcopy that reads a
    /// Haven export over TLS): key generated here, `name` as its common name, valid for the
    /// client validity of this CA. Returns `(certificate PEM, private key PEM)`.
    pub fn issue_nbd_client_cert(&mut self, name: &str) -> Result<(String, String)> {
        validate_machine_name(name)?;
        let mut params = CertificateParams::default();
        // qemu refuses to load a client certificate whose (critical) key usage lacks key
        // encipherment, whatever the key type.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = Leaf {
            kind: "nbd-client",
            subject: name,
            names: name,
            validity: self.client_cert_validity,
        };
        self.sign_new_key(params, leaf)
    }

    /// Completes `params` (subject `leaf.subject` of this site, validity, serial), signs them
    /// with a key generated here, and records the certificate as issued. Returns
    /// `(certificate PEM, private key PEM)`.
    fn sign_new_key(
        &mut self,
        mut params: CertificateParams,
        leaf: Leaf<'_>,
    ) -> Result<(String, String)> {
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.subject.to_string());
        params
            .distinguished_name
            .push(DnType::OrganizationName, self.state.site_name.clone());
        params.use_authority_key_identifier_extension = true;
        let v = Validity::from_now(leaf.validity);
        params.not_before = to_odt(v.not_before);
        params.not_after = to_odt(v.not_after);
        let (serial, serial_hex) = random_serial();
        params.serial_number = Some(serial);
        let key = KeyPair::generate().map_err(crypto("generate a certificate's key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(crypto("sign a certificate"))?;
        let mut state = self.state.clone();
        state.issued.insert(
            serial_hex,
            IssuedRecord {
                kind: leaf.kind.into(),
                subject: leaf.subject.to_string(),
                names: leaf.names.to_string(),
                not_after: unix(v.not_after),
                issued_at: unix(SystemTime::now()),
            },
        );
        self.commit(state)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Creates a one-time enrollment token valid for `ttl`.
    pub fn create_token(&mut self, ttl: Duration) -> Result<EnrollToken> {
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut id);
        rand::rng().fill_bytes(&mut secret);
        let now = unix(SystemTime::now());
        let token = EnrollToken {
            id: hex(&id),
            secret: hex(&secret),
            ca_fingerprint: self.ca_fingerprint(),
            expires_at: now + ttl.as_secs(),
        };
        let mut state = self.state.clone();
        state.tokens.insert(
            token.id.clone(),
            TokenRecord {
                secret_sha256: sha256_hex(token.secret.as_bytes()),
                created_at: now,
                expires_at: token.expires_at,
                used_at: None,
                used_by_agent: None,
            },
        );
        self.commit(state)?;
        Ok(token)
    }

    /// Ids of tokens not yet used, with their expiry (unix seconds).
    pub fn pending_tokens(&self) -> Vec<(String, u64)> {
        self.state
            .tokens
            .iter()
            .filter(|(_, t)| t.used_at.is_none())
            .map(|(id, t)| (id.clone(), t.expires_at))
            .collect()
    }

    /// Enrolls an agent: checks and consumes `token`, and signs a certificate for the public key in
    /// `csr_pem` (PEM CSR, its signature is verified) with `machine_name` and a new agent id. The
    /// token is consumed durably before the certificate is returned.
    pub fn enroll(&mut self, token: &str, csr_pem: &str, machine_name: &str) -> Result<IssuedCert> {
        let t: TokenString = token.parse()?;
        let site_ca = self.ca_fingerprint();
        if t.ca_fingerprint != site_ca {
            return Err(CaError::TokenWrongCa {
                id: t.id,
                token_ca: t.ca_fingerprint,
                site_ca,
            });
        }
        let record = self
            .state
            .tokens
            .get(&t.id)
            .ok_or_else(|| CaError::TokenUnknown { id: t.id.clone() })?;
        if !constant_time_eq(
            sha256_hex(t.secret.as_bytes()).as_bytes(),
            record.secret_sha256.as_bytes(),
        ) {
            return Err(CaError::TokenSecretMismatch { id: t.id });
        }
        if let Some(used_at) = record.used_at {
            return Err(CaError::TokenAlreadyUsed {
                id: t.id,
                used_at,
                agent_id: record.used_by_agent.clone().unwrap_or_default(),
            });
        }
        if unix(SystemTime::now()) >= record.expires_at {
            return Err(CaError::TokenExpired {
                id: t.id,
                expired_at: record.expires_at,
            });
        }
        let issued = self.sign_agent(
            csr_pem,
            machine_name,
            Validity::from_now(self.client_cert_validity),
            Some(&t.id),
        )?;
        Ok(issued)
    }

    /// Signs an agent certificate without a token, with an explicit validity window (for renewal
    /// by an already authenticated agent, and for tests of expired certificates).
    pub fn issue_client_cert(
        &mut self,
        csr_pem: &str,
        machine_name: &str,
        validity: Validity,
    ) -> Result<IssuedCert> {
        self.sign_agent(csr_pem, machine_name, validity, None)
    }

    fn sign_agent(
        &mut self,
        csr_pem: &str,
        machine_name: &str,
        validity: Validity,
        token_id: Option<&str>,
    ) -> Result<IssuedCert> {
        validate_machine_name(machine_name)?;
        if validity.not_after <= validity.not_before {
            return Err(CaError::InvalidValidity {
                detail: "not_after must be after not_before".into(),
            });
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            CaError::CsrInvalid {
                detail: format!("{e} (send a PEM PKCS#10 request signed by the agent's key)"),
            }
        })?;
        let mut agent = [0u8; 16];
        rand::rng().fill_bytes(&mut agent);
        let agent_id = hex(&agent);
        let (serial, serial_hex) = random_serial();
        // Only the public key is taken from the CSR; everything else is set here.
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, machine_name.to_string());
        params
            .distinguished_name
            .push(DnType::OrganizationName, self.state.site_name.clone());
        params.subject_alt_names = vec![SanType::URI(
            format!("{AGENT_URI_PREFIX}{agent_id}")
                .try_into()
                .map_err(crypto("encode the agent id URI"))?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_odt(validity.not_before);
        params.not_after = to_odt(validity.not_after);
        params.serial_number = Some(serial);
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(crypto("sign the agent certificate"))?;

        let now = unix(SystemTime::now());
        let mut state = self.state.clone();
        if let Some(id) = token_id
            && let Some(t) = state.tokens.get_mut(id)
        {
            t.used_at = Some(now);
            t.used_by_agent = Some(agent_id.clone());
        }
        state.issued.insert(
            serial_hex.clone(),
            IssuedRecord {
                kind: "agent".into(),
                subject: agent_id.clone(),
                names: machine_name.to_string(),
                not_after: unix(validity.not_after),
                issued_at: now,
            },
        );
        self.commit(state)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            agent_id,
            serial: serial_hex,
            not_after: unix(validity.not_after),
        })
    }

    /// Certificates issued by this CA, by serial (hex).
    pub fn issued(&self) -> &BTreeMap<String, IssuedRecord> {
        &self.state.issued
    }

    /// Revokes the certificate with `serial` (hex, as in [`IssuedCert::serial`] or
    /// [`PeerIdentity::serial`]). Revoking twice is a no-op. Reload the CRL into running servers
    /// with [`crate::endpoint::Server::set_crls`].
    pub fn revoke(&mut self, serial: &str) -> Result<()> {
        let serial = serial.to_ascii_lowercase().replace(':', "");
        if !self.state.issued.contains_key(&serial) {
            return Err(CaError::UnknownSerial { serial });
        }
        if self.state.revoked.iter().any(|r| r.serial == serial) {
            return Ok(());
        }
        let mut state = self.state.clone();
        state.revoked.push(Revoked {
            serial,
            revoked_at: unix(SystemTime::now()),
        });
        state.crl_number += 1;
        self.commit(state)
    }

    /// Revoked serials.
    pub fn revoked(&self) -> &[Revoked] {
        &self.state.revoked
    }

    /// A freshly signed CRL (PEM) listing every revoked serial, valid for 7 days.
    pub fn crl_pem(&self) -> Result<String> {
        let now = SystemTime::now();
        let params = CertificateRevocationListParams {
            this_update: to_odt(now - Duration::from_secs(60)),
            next_update: to_odt(now + CRL_VALIDITY),
            crl_number: SerialNumber::from(self.state.crl_number),
            issuing_distribution_point: None,
            revoked_certs: self
                .state
                .revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&unhex(&r.serial)),
                    revocation_time: to_odt(UNIX_EPOCH + Duration::from_secs(r.revoked_at)),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(crypto("sign the CRL"))?;
        crl.pem().map_err(crypto("encode the CRL"))
    }

    fn commit(&mut self, state: State) -> Result<()> {
        haven_fsutil::write_atomic(&self.dir.join(STATE_FILE), &encode_state(&state), PUBLIC)?;
        self.state = state;
        Ok(())
    }
}

fn validate_machine_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(CaError::MachineNameInvalid {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_MACHINE_NAME_LEN {
        return bad("it is longer than 253 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    {
        return bad("use only letters, digits, '.', '-' and '_'");
    }
    Ok(())
}

fn encode_state(state: &State) -> Vec<u8> {
    let body = serde_json::to_vec_pretty(state).expect("state serialises");
    let mut out = format!("{STATE_MAGIC} {STATE_VERSION} {}\n", sha256_hex(&body)).into_bytes();
    out.extend_from_slice(&body);
    out
}

fn decode_state(bytes: &[u8]) -> Result<State, String> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not UTF-8")?;
    let body = &bytes[nl + 1..];
    let mut parts = header.split(' ');
    if parts.next() != Some(STATE_MAGIC) {
        return Err(format!("bad magic (expected {STATE_MAGIC})"));
    }
    let version = parts.next().unwrap_or("");
    if version != STATE_VERSION.to_string() {
        return Err(format!(
            "format version {version:?} is not supported (this build reads version {STATE_VERSION})"
        ));
    }
    let sum = parts.next().unwrap_or("");
    let actual = sha256_hex(body);
    if sum != actual {
        return Err(format!(
            "checksum mismatch (header {sum}, body {actual}): the file was damaged"
        ));
    }
    serde_json::from_slice(body).map_err(|e| format!("body does not parse: {e}"))
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CaError + use<> {
    let path = path.to_path_buf();
    move |source| CaError::Io {
        action,
        path,
        source,
    }
}

fn crypto(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |source| CaError::Crypto { what, source }
}

fn random_serial() -> (SerialNumber, String) {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    // Positive, and no leading zero byte, so DER keeps all 16 bytes and hex round-trips.
    b[0] = (b[0] & 0x7f) | 0x40;
    (SerialNumber::from_slice(&b), hex(&b))
}

fn to_odt(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// SHA-256 of `data`, lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_checksum_detects_damage() {
        let state = State {
            site_name: "s".into(),
            tokens: BTreeMap::new(),
            issued: BTreeMap::new(),
            revoked: vec![],
            crl_number: 1,
        };
        let mut bytes = encode_state(&state);
        assert!(decode_state(&bytes).is_ok());
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        assert!(decode_state(&bytes).unwrap_err().contains("checksum"));
    }

    #[test]
    fn token_string_round_trip() {
        let t = EnrollToken {
            id: "0123456789abcdef".into(),
            secret: "a".repeat(64),
            ca_fingerprint: "b".repeat(64),
            expires_at: 0,
        };
        let parsed: TokenString = t.to_string().parse().unwrap();
        assert_eq!(parsed.id, t.id);
        assert_eq!(parsed.ca_fingerprint, t.ca_fingerprint);
        assert!(matches!(
            "haven1.x.y".parse::<TokenString>(),
            Err(CaError::TokenMalformed { .. })
        ));
    }
}
