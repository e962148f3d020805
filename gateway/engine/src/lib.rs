//! Haven's replication engine: the gateway's roles.
//!
//! - [`process_server`]: the primary site's hop. Receives agents' record streams, makes each
//!   record durable in an encrypted, compressed cache ([`haven_store::journal`]) before
//!   acknowledging it, and forwards the cache to the master target, freeing it only once the
//!   master target has acknowledged durability.
//! - [`master_target`]: the secondary site's hop. Journals every record durably (encrypted,
//!   indexed in redb by disk, sequence and extent) before acknowledging it, and applies the
//!   journal in order to each disk's replica through a target writer plugin.
//! - [`ingest`]: the receiving loop both roles share: a `haven_wire::Receiver` over one QUIC
//!   stream, a journal per disk, group commit, acknowledgement of what is durable only.
//! - [`status`]: what the roles report (the API serves it, `haven status` prints it).
//! - [`config_server`]: the configuration-server role: the gateways joined to it, their
//!   reports and assignments, calls forwarded to them.
//! - [`join`]: a gateway's side of that: reporting, applying its assignment, answering
//!   forwarded calls.
//!
//! Both roles are tokio tasks; plugin calls run on blocking threads (one per replica).
//!
//! Architecture invariant: nothing is acknowledged upstream before it is durable here, and
//! nothing is freed here before it is durable downstream (or applied to the replica).

mod applier;
pub mod config_server;
pub mod drain;
pub mod events;
pub mod failpoint;
mod forward;
pub mod ingest;
pub mod jobs;
pub mod join;
pub mod master_target;
pub mod metrics;
pub mod overlay;
pub mod placement;
pub mod platforms;
pub mod process_server;
pub mod recovery;
pub mod retention;
pub mod status;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use haven_wire::PeerId;

/// A peer id as 32 lower-case hex digits (the agent id in its certificate).
pub fn peer_hex(peer: &PeerId) -> String {
    hex::encode(peer)
}

/// Parses 32 hex digits into a peer id.
pub fn parse_peer(hex_id: &str) -> Option<PeerId> {
    let bytes = hex::decode(hex_id).ok()?;
    bytes.try_into().ok()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The TLS identity a gateway presents to the next hop: its certificate from that site's CA.
#[derive(Clone)]
pub struct Identity {
    /// The upstream site's CA certificate, PEM.
    pub ca_pem: String,
    /// This gateway's certificate issued by that CA, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads `ca.pem`, `cert.pem` and `key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Identity> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "cannot read {}; enroll this gateway with the next hop first \
                     (`haven-gateway enroll`)",
                    path.display()
                )
            })
        };
        Ok(Identity {
            ca_pem: read("ca.pem")?,
            cert_pem: read("cert.pem")?,
            key_pem: read("key.pem")?,
        })
    }
}

/// Bytes per second over a sliding window of five seconds.
#[derive(Debug, Default)]
pub struct Rate {
    samples: std::collections::VecDeque<(Instant, u64)>,
    total: u64,
}

impl Rate {
    const WINDOW: Duration = Duration::from_secs(5);

    /// Counts `bytes` now.
    pub fn add(&mut self, now: Instant, bytes: u64) {
        self.total += bytes;
        self.samples.push_back((now, bytes));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Self::WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Every byte counted.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes per second over the window ending now.
    pub fn per_second(&self, now: Instant) -> f64 {
        let bytes: u64 = self
            .samples
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= Self::WINDOW)
            .map(|(_, b)| b)
            .sum();
        bytes as f64 / Self::WINDOW.as_secs_f64()
    }
}

/// A role's QUIC endpoint and its live connections by peer (the agent id of the peer's
/// certificate), so that after a revocation new connections are checked against the new CRL and
/// the revoked peer's live ones are cut at once.
#[derive(Debug, Default)]
pub struct Listener {
    server: std::sync::Mutex<Option<std::sync::Arc<haven_net::Server>>>,
    live: std::sync::Mutex<Vec<(String, usize, haven_net::quinn::Connection)>>,
    /// The CRLs in force: this site CA's, and the configuration server's (for the agents it
    /// enrolled), each replaced on its own.
    crls: std::sync::Mutex<(Vec<String>, Option<String>)>,
}

impl Listener {
    /// Binds the endpoint (see [`haven_net::Server::bind`]).
    pub fn bind(
        &self,
        addr: std::net::SocketAddr,
        tls: haven_net::endpoint::ServerTls,
        ca: Option<std::sync::Arc<std::sync::Mutex<haven_net::SiteCa>>>,
    ) -> Result<std::sync::Arc<haven_net::Server>> {
        let mut crls = ingest::lock(&self.crls);
        crls.0.clone_from(&tls.crl_pems);
        let mut tls = tls;
        tls.crl_pems.extend(crls.1.iter().cloned());
        let server = std::sync::Arc::new(haven_net::Server::bind(addr, tls, ca)?);
        *ingest::lock(&self.server) = Some(server.clone());
        Ok(server)
    }

    /// The bound address once bound.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        ingest::lock(&self.server).as_ref()?.local_addr().ok()
    }

    /// New CRLs of this site's CA for new connections, after a revocation.
    pub fn set_crls(&self, crl_pems: Vec<String>) -> Result<()> {
        let mut crls = ingest::lock(&self.crls);
        crls.0 = crl_pems;
        self.apply_crls(&crls)
    }

    /// The configuration server CA's CRL (from the assignment), when it changed.
    pub fn set_config_server_crl(&self, crl_pem: Option<String>) -> Result<()> {
        let mut crls = ingest::lock(&self.crls);
        if crls.1 == crl_pem {
            return Ok(());
        }
        crls.1 = crl_pem;
        self.apply_crls(&crls)
    }

    fn apply_crls(&self, crls: &(Vec<String>, Option<String>)) -> Result<()> {
        if let Some(server) = ingest::lock(&self.server).as_ref() {
            server.set_crls(crls.0.iter().chain(&crls.1).cloned().collect())?;
        }
        Ok(())
    }

    /// Registers a live connection; returns a ticket for [`Listener::remove`].
    pub fn add(&self, agent_id: &str, conn: &haven_net::quinn::Connection) -> usize {
        let ticket = conn.stable_id();
        ingest::lock(&self.live).push((agent_id.to_string(), ticket, conn.clone()));
        ticket
    }

    /// Forgets a connection that ended.
    pub fn remove(&self, ticket: usize) {
        ingest::lock(&self.live).retain(|(_, t, _)| *t != ticket);
    }

    /// The newest live connection of `agent_id`.
    pub fn connection(&self, agent_id: &str) -> Option<haven_net::quinn::Connection> {
        ingest::lock(&self.live)
            .iter()
            .rev()
            .find(|(id, _, c)| id == agent_id && c.close_reason().is_none())
            .map(|(_, _, c)| c.clone())
    }

    /// Closes every live connection of `agent_id` (its certificate was revoked); how many.
    pub fn disconnect(&self, agent_id: &str) -> usize {
        let mut live = ingest::lock(&self.live);
        let before = live.len();
        live.retain(|(id, _, c)| {
            if id == agent_id {
                c.close(
                    haven_net::endpoint::CLOSE_REVOKED.into(),
                    b"certificate revoked",
                );
            }
            id != agent_id
        });
        before - live.len()
    }
}

/// Backoff between reconnection attempts: 100 ms doubling to 2 s.
#[derive(Debug)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
        d
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_bytes_in_the_window() {
        let t0 = Instant::now();
        let mut r = Rate::default();
        for i in 0..10 {
            r.add(t0 + Duration::from_secs(i), 1000);
        }
        let now = t0 + Duration::from_secs(9);
        // Samples of the last five seconds (4..=9): six of 1000 bytes over five seconds.
        assert_eq!(r.per_second(now), 6000.0 / 5.0);
        assert_eq!(r.total(), 10_000);
        assert_eq!(r.per_second(t0 + Duration::from_secs(60)), 0.0);
    }

    #[test]
    fn peer_ids_round_trip_as_hex() {
        let p = [0xab; 16];
        assert_eq!(parse_peer(&peer_hex(&p)), Some(p));
        assert_eq!(parse_peer("zz"), None);
    }
}
