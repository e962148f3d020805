//! Where to replicate, for an agent enrolled with the deployment's configuration server.
//!
//! The agent asks the configuration server (its own mutual-TLS QUIC connection, the
//! certificate it enrolled with) which process server to replicate to: at start, every
//! [`AGENT_ASK_INTERVAL`] while it replicates, every [`AGENT_RETRY_INTERVAL`] while it cannot
//! reach its process server, and at once when that one says the agent moved. The answer — the
//! process server's name, address and CA — is kept in `DATA/assignment.json`, so a restart
//! replicates to the same process server whether the configuration server answers or not; a
//! different answer switches the shipper over (the process server taking the agent over starts
//! where the master target resumes, and the agent resends what that one lacks, see
//! `replicate.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use haven_net::join::{
    AGENT_ASK_INTERVAL, AGENT_RETRY_INTERVAL, AgentAnswer, AgentAsk, AssignedProcessServer, Request,
};
use haven_net::{endpoint, quinn};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::disk::Machine;
use crate::identity::Identity;
use crate::identity::resolve;
use crate::replicate::Target;

/// `DATA/assignment.json`: the process server the configuration server named last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Kept {
    name: String,
    address: String,
    server_name: String,
    ca_pem: String,
}

impl From<&AssignedProcessServer> for Kept {
    fn from(a: &AssignedProcessServer) -> Kept {
        Kept {
            name: a.name.clone(),
            address: a.contact.address.clone(),
            server_name: a.contact.server_name.clone(),
            ca_pem: a.contact.ca_pem.clone(),
        }
    }
}

impl From<Kept> for Target {
    fn from(k: Kept) -> Target {
        Target {
            name: Some(k.name),
            server: k.address,
            server_name: k.server_name,
            ca_pem: Some(k.ca_pem),
        }
    }
}

fn kept_path(data_dir: &Path) -> PathBuf {
    data_dir.join("assignment.json")
}

/// The process server named last, if any (a damaged file is reported and ignored: the
/// configuration server is asked again).
pub fn kept(data_dir: &Path) -> Option<Target> {
    let path = kept_path(data_dir);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice::<Kept>(&bytes) {
        Ok(k) => Some(k.into()),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e,
                "ignoring a damaged assignment; asking the configuration server");
            None
        }
    }
}

/// Asks the configuration server until `stop`, publishing each new process server on
/// `targets`; `ask_now` asks at once.
pub async fn run(
    machine: Arc<Machine>,
    identity: Identity,
    targets: watch::Sender<Option<Target>>,
    ask_now: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conn: Option<quinn::Connection> = None;
    loop {
        let connected = machine.connected();
        let current = targets.borrow().as_ref().and_then(|t| t.name.clone());
        let ask = AgentAsk {
            site: identity.info.site.clone(),
            process_server: current.clone(),
            connected,
        };
        match ask_once(&identity, &mut conn, ask).await {
            Ok(AgentAnswer {
                process_server: Some(ps),
                ..
            }) => {
                let target = Target::from(Kept::from(&ps));
                if targets.borrow().as_ref() != Some(&target) {
                    tracing::info!(process_server = %ps.name, address = %ps.contact.address,
                        previous = ?current, "the configuration server names the process server");
                    keep(machine.data_dir(), &ps);
                    targets.send_replace(Some(target));
                }
            }
            Ok(AgentAnswer { message, .. }) => {
                tracing::warn!(
                    message = message.as_deref().unwrap_or("none"),
                    "the configuration server names no process server"
                );
            }
            Err(e) => {
                conn = None;
                tracing::warn!(server = %identity.info.server, error = %format!("{e:#}"),
                    "cannot ask the configuration server where to replicate");
            }
        }
        let wait = if connected {
            AGENT_ASK_INTERVAL
        } else {
            AGENT_RETRY_INTERVAL
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ask_now.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

/// Keeps `ps` as the process server named last (`DATA/assignment.json`).
fn keep(data_dir: &Path, ps: &AssignedProcessServer) {
    let path = kept_path(data_dir);
    let stored = serde_json::to_vec_pretty(&Kept::from(ps))
        .map_err(anyhow::Error::from)
        .and_then(|b| Ok(haven_fsutil::write_atomic(&path, &b, 0o644)?));
    if let Err(e) = stored {
        tracing::warn!(file = %path.display(), error = %format!("{e:#}"),
            "cannot keep the assignment");
    }
}

/// Right after enrollment: asks the configuration server once, so it knows the agent (its
/// machine and site: a reprotect finds the agent of a replica machine this way before it
/// runs) and names its process server, kept for `protect`. The process server's name, if it
/// named one.
pub fn register(data_dir: &Path) -> anyhow::Result<Option<String>> {
    let identity = Identity::load(data_dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ask = AgentAsk {
        site: identity.info.site.clone(),
        process_server: None,
        connected: false,
    };
    let answer = rt.block_on(async {
        let mut conn = None;
        let answer = ask_once(&identity, &mut conn, ask).await;
        if let Some(c) = conn {
            c.close(0u32.into(), b"registered");
        }
        answer
    })?;
    Ok(answer.process_server.map(|ps| {
        keep(data_dir, &ps);
        ps.name
    }))
}

async fn ask_once(
    identity: &Identity,
    conn: &mut Option<quinn::Connection>,
    ask: AgentAsk,
) -> anyhow::Result<AgentAnswer> {
    let c = match conn.as_ref().filter(|c| c.close_reason().is_none()) {
        Some(c) => c.clone(),
        None => {
            let addr = resolve(&identity.info.server).await?;
            let c = endpoint::connect(
                addr,
                &identity.info.server_name,
                &identity.ca_pem,
                &identity.cert_pem,
                &identity.key_pem,
            )
            .await?;
            *conn = Some(c.clone());
            c
        }
    };
    Ok(haven_net::join::exchange(&c, &Request::Agent(ask), Duration::from_secs(10)).await?)
}
