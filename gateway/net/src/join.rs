//! A gateway joined to a configuration server: what travels on its connection.
//!
//! The gateway connects (ALPN `haven/1`, its certificate from the configuration server's CA,
//! got with `haven-gateway enroll --config-server`) and keeps the connection open:
//!
//! ```text
//! gateway ──bi stream: Report────────────▶ configuration server
//!         ◀────────────── Assignment ──────  (every REPORT_INTERVAL)
//! gateway ◀──bi stream: ApiRequest──────── configuration server
//!         ─────────────── ApiAnswer ──────▶  (an operator's call the server forwards)
//! ```
//!
//! Each exchange is one bidirectional stream: one JSON message of at most [`MAX_MESSAGE`]
//! bytes, finished, and one JSON answer, finished. Control streams go ahead of everything else
//! on the connection ([`crate::control::CONTROL_PRIORITY`]).
//!
//! An agent enrolled with the configuration server (`haven-agent enroll --config-server`)
//! connects the same way and asks where to replicate ([`Request::Agent`], answered by an
//! [`AgentAnswer`]): at start, every [`AGENT_ASK_INTERVAL`] while it replicates, and every
//! [`AGENT_RETRY_INTERVAL`] while it cannot reach its process server.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::{self, ControlError};

/// Largest message in either direction: a master target's status with a thousand replicas is
/// a few MiB.
pub const MAX_MESSAGE: usize = 32 << 20;

/// How often a joined gateway reports.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// How often a replicating agent asks its configuration server where to replicate.
pub const AGENT_ASK_INTERVAL: Duration = Duration::from_secs(10);

/// How often an agent that cannot reach its process server asks.
pub const AGENT_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// What opens a stream to the configuration server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// A gateway's report.
    Report(Report),
    /// An agent asks which process server to replicate to.
    Agent(AgentAsk),
}

/// What a gateway tells its configuration server, every [`REPORT_INTERVAL`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The name it enrolled with (also in its certificate).
    pub name: String,
    /// Its own site's name (its site CA's).
    pub site: String,
    /// `process-server`, `master-target`.
    pub roles: Vec<String>,
    /// Its status (`haven_engine::status::GatewayStatus`), as its API serves it.
    pub status: serde_json::Value,
    /// Host health.
    pub health: Health,
    /// The revision of the assignment it runs.
    pub assignment_revision: u64,
    /// How agents reach it, when it runs the process-server role.
    #[serde(default)]
    pub process_server: Option<ProcessServerContact>,
}

/// How an agent reaches a process server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessServerContact {
    /// `HOST:PORT` (UDP).
    pub address: String,
    /// The name its certificate is checked against.
    pub server_name: String,
    /// Its site CA's certificate, PEM, which issued its certificate.
    pub ca_pem: String,
}

/// An agent's question: where do I replicate?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentAsk {
    /// The site it said it runs at when it enrolled, if it did.
    pub site: Option<String>,
    /// The process server it replicates to now, by name.
    pub process_server: Option<String>,
    /// Whether it is connected to it.
    pub connected: bool,
}

/// The configuration server's answer to an [`AgentAsk`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentAnswer {
    /// The process server to replicate to; none when no process server of the agent's site is
    /// connected (then `message` says why).
    pub process_server: Option<AssignedProcessServer>,
    /// Why there is none, for the agent's log and status.
    pub message: Option<String>,
}

/// A process server assigned to an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignedProcessServer {
    /// Its name.
    pub name: String,
    /// How to reach it.
    pub contact: ProcessServerContact,
}

/// Host health, as operators of a process server watch it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// CPU used by the gateway process since the last report, percent of one core.
    pub cpu_percent: f64,
    /// Resident memory of the gateway process, bytes.
    pub memory_bytes: u64,
    /// Free bytes of the filesystem holding its data folder.
    pub free_bytes: u64,
    /// Size of that filesystem, bytes.
    pub total_bytes: u64,
}

/// What the configuration server wants a gateway to run: its answer to every report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// Grows with every change; a gateway applies an assignment once.
    pub revision: u64,
    /// The replication policy of each protected machine, by machine name.
    pub machines: BTreeMap<String, MachinePolicy>,
    /// The configuration server CA's revocation list, PEM: a process server refuses the agents
    /// it lists (they enrolled with that CA).
    #[serde(default)]
    pub crl_pem: Option<String>,
}

/// The parts of a replication policy a gateway enforces for one machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachinePolicy {
    /// The policy's name.
    pub policy: String,
    /// Crash-consistent points: one per this many milliseconds (the agent takes them).
    pub crash_consistent_interval_ms: u64,
    /// Application-consistent points: one per this many milliseconds; `None`: none.
    pub app_consistent_interval_ms: Option<u64>,
    /// How long points are kept and thinned (the master target applies it), as
    /// `[master_target.retention]` reads it.
    pub retention: serde_json::Value,
    /// Recovery-point objective: an event is raised above it, milliseconds.
    pub rpo_threshold_ms: u64,
    /// The site the machine runs at.
    #[serde(default)]
    pub site: Option<String>,
    /// The process server it must replicate to; none: the least loaded of its site.
    #[serde(default)]
    pub process_server: Option<String>,
    /// A process server gone this long has this machine's agent moved to another of its
    /// site, milliseconds.
    #[serde(default = "default_grace_ms")]
    pub process_server_grace_ms: u64,
}

fn default_grace_ms() -> u64 {
    DEFAULT_PROCESS_SERVER_GRACE.as_millis() as u64
}

/// How long a process server may be gone before its agents are moved, unless a policy says.
pub const DEFAULT_PROCESS_SERVER_GRACE: Duration = Duration::from_secs(300);

/// An operator's API call, forwarded to the gateway that serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiRequest {
    pub method: String,
    /// Path and query, e.g. `/v1/items/web01/points`.
    pub path: String,
    /// Who made it (the configuration server checked the token and its role).
    pub caller: String,
}

/// The gateway's answer to an [`ApiRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiAnswer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// Reads one JSON message (the whole stream, at most [`MAX_MESSAGE`] bytes).
pub async fn read<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, ControlError> {
    control::read_json(recv, MAX_MESSAGE).await
}

/// Writes one JSON message and finishes the stream.
pub async fn write<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
) -> Result<(), ControlError> {
    control::write_json(send, message, MAX_MESSAGE).await
}

/// One exchange on a new stream of `conn`: sends `message`, waits at most `timeout` for the
/// answer.
pub async fn exchange<Q: Serialize, A: serde::de::DeserializeOwned>(
    conn: &quinn::Connection,
    message: &Q,
    timeout: Duration,
) -> Result<A, ControlError> {
    let exchange = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| ControlError::Stream(e.to_string()))?;
        write(&mut send, message).await?;
        read::<A>(&mut recv).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ControlError::Timeout(timeout))?
}
