//! The agent's identity after enrollment: `DATA/identity/{cert.pem, key.pem, ca.pem, agent.json}`.
//!
//! The folder is written whole and atomically: `identity.tmp/` is filled (each file synced,
//! `key.pem` mode 0600), synced, renamed to `identity/`, and the data folder synced. A data
//! folder therefore has a complete identity or none.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use haven_fsutil::{sync_dir, write_atomic};

/// Name of the identity folder inside the data folder.
pub const IDENTITY_DIR: &str = "identity";

/// `agent.json`: who this agent is and where it replicates to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentInfo {
    /// Format version of this file (1).
    pub version: u32,
    /// The agent id the site CA assigned (32 hex digits), as in the certificate.
    pub agent_id: String,
    /// The machine name sent at enrollment.
    pub machine_name: String,
    /// The gateway (`HOST:PORT`) enrolled with; the default replication target.
    pub server: String,
    /// The name the gateway's certificate is checked against.
    pub server_name: String,
    /// `server` is the deployment's configuration server, which names the process server to
    /// replicate to (and a new one when that one is lost).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub config_server: bool,
    /// The site this machine runs at, as given at enrollment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// A loaded identity.
#[derive(Clone)]
pub struct Identity {
    /// `agent.json`.
    pub info: AgentInfo,
    /// The agent certificate, PEM.
    pub cert_pem: String,
    /// The agent's private key, PEM.
    pub key_pem: String,
    /// The site CA certificate, PEM.
    pub ca_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The agent id as the wire's 16-byte peer id.
    pub fn peer_id(&self) -> anyhow::Result<[u8; 16]> {
        parse_agent_id(&self.info.agent_id)
    }

    /// Loads the identity of `data_dir`, or says how to enroll.
    pub fn load(data_dir: &Path) -> anyhow::Result<Identity> {
        let dir = data_dir.join(IDENTITY_DIR);
        if !dir.exists() {
            anyhow::bail!(
                "{} is not enrolled (no {}); run `haven-agent enroll --data-dir {} --server \
                 HOST:PORT --token TOKEN` first",
                data_dir.display(),
                dir.display(),
                data_dir.display()
            );
        }
        let read = |name: &str| -> anyhow::Result<String> {
            let p = dir.join(name);
            fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let info: AgentInfo = serde_json::from_str(&read("agent.json")?)
            .with_context(|| format!("parsing {}", dir.join("agent.json").display()))?;
        if info.version != 1 {
            anyhow::bail!(
                "{}: version {} is not supported (this agent reads 1)",
                dir.join("agent.json").display(),
                info.version
            );
        }
        let id = Identity {
            cert_pem: read("cert.pem")?,
            key_pem: read("key.pem")?,
            ca_pem: read("ca.pem")?,
            info,
        };
        id.peer_id()?;
        Ok(id)
    }

    /// Stores the identity in `data_dir/identity`, atomically; refuses when one exists.
    pub fn store(&self, data_dir: &Path) -> anyhow::Result<PathBuf> {
        let dir = data_dir.join(IDENTITY_DIR);
        if dir.exists() {
            anyhow::bail!(
                "{} is already enrolled ({} exists); to enroll again, stop the agent, remove \
                 that folder and run enroll with a new token",
                data_dir.display(),
                dir.display()
            );
        }
        haven_fsutil::create_dir_all(data_dir)?;
        let tmp = data_dir.join(format!("{IDENTITY_DIR}.tmp"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let info = serde_json::to_vec_pretty(&self.info)?;
        write_atomic(&tmp.join("cert.pem"), self.cert_pem.as_bytes(), 0o644)?;
        write_atomic(&tmp.join("key.pem"), self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&tmp.join("ca.pem"), self.ca_pem.as_bytes(), 0o644)?;
        write_atomic(&tmp.join("agent.json"), &info, 0o644)?;
        sync_dir(&tmp)?;
        fs::rename(&tmp, &dir).with_context(|| format!("renaming {}", tmp.display()))?;
        sync_dir(data_dir)?;
        Ok(dir)
    }
}

/// The 16 bytes of a 32-hex-digit agent id.
pub fn parse_agent_id(id: &str) -> anyhow::Result<[u8; 16]> {
    let bytes = id.as_bytes();
    if bytes.len() != 32 || !bytes.iter().all(u8::is_ascii_hexdigit) {
        anyhow::bail!("agent id {id:?} is not 32 hex digits");
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&id[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}

/// Splits `HOST:PORT` (`[v6]:PORT` too) into the host part, for the default server name.
pub fn host_part(server: &str) -> &str {
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Resolves `HOST:PORT` to one address.
pub async fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("{server} resolves to no address"))
}

/// This machine's host name.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `haven-agent enroll`: enrolls with the gateway and stores the identity.
pub fn enroll(
    data_dir: &Path,
    server: &str,
    server_name: Option<&str>,
    token: &str,
    machine_name: Option<&str>,
    with: Enrollment,
) -> anyhow::Result<Identity> {
    let dir = data_dir.join(IDENTITY_DIR);
    if dir.exists() {
        anyhow::bail!(
            "{} is already enrolled ({} exists); to enroll again, stop the agent, remove that \
             folder and run enroll with a new token",
            data_dir.display(),
            dir.display()
        );
    }
    let server_name = server_name.unwrap_or_else(|| host_part(server)).to_string();
    let machine_name = machine_name.map_or_else(hostname, str::to_string);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let enrolled = rt.block_on(async {
        let addr = resolve(server).await?;
        let id = haven_net::endpoint::enroll(addr, &server_name, token, &machine_name).await?;
        anyhow::Ok(id)
    })?;
    let id = Identity {
        info: AgentInfo {
            version: 1,
            agent_id: enrolled.agent_id.clone(),
            machine_name,
            server: server.to_string(),
            server_name,
            config_server: with.config_server,
            site: with.site,
        },
        cert_pem: enrolled.cert_pem.clone(),
        key_pem: enrolled.key_pem.clone(),
        ca_pem: enrolled.ca_pem.clone(),
    };
    id.peer_id()?;
    id.store(data_dir)?;
    Ok(id)
}

/// What kind of server an agent enrolls with.
#[derive(Clone, Debug, Default)]
pub struct Enrollment {
    /// The server is a configuration server (see [`AgentInfo::config_server`]).
    pub config_server: bool,
    /// The machine's site.
    pub site: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_and_hosts() {
        let id = parse_agent_id("00112233445566778899aabbccddeeff").unwrap();
        assert_eq!(id[0], 0x00);
        assert_eq!(id[15], 0xff);
        assert!(parse_agent_id("0011").is_err());
        assert!(parse_agent_id("zz112233445566778899aabbccddeeff").is_err());
        assert_eq!(host_part("gw.example:9443"), "gw.example");
        assert_eq!(host_part("[::1]:9443"), "::1");
        assert_eq!(host_part("127.0.0.1:9443"), "127.0.0.1");
    }
}
