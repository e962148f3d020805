//! Haven's transport: QUIC with mutual TLS, the site CA and enrollment.
//!
//! - [`ca`]: the site CA persisted in a folder: server certificates, one-time enrollment tokens,
//!   agent certificates signed from a CSR, revocation and the CRL.
//! - [`tls`]: rustls configurations (ring provider, TLS 1.3 only) for both sides, including the
//!   CA-pinning verifier used at enrollment.
//! - [`endpoint`]: quinn endpoints: [`endpoint::Server`] (ALPNs `haven/1` and `haven-enroll/1`),
//!   [`endpoint::connect`] and [`endpoint::enroll`] for agents.
//! - [`stream`]: frames and reports over the streams of a `haven/1` connection.
//! - [`control`]: requests from the master target to a source agent (points, planned failover),
//!   relayed by the process server.

pub mod ca;
pub mod control;
pub mod endpoint;
pub mod join;
pub mod stream;
pub mod tls;

pub use ca::{CaError, EnrollToken, IssuedCert, PeerIdentity, SiteCa, Validity};
pub use endpoint::{AgentConnection, EnrollError, EnrolledIdentity, NetError, Refusal, Server};

pub use quinn;
pub use rustls;
