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

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::{self, ControlError};

/// Largest message in either direction: a master target's status with a thousand replicas is
/// a few MiB.
pub const MAX_MESSAGE: usize = 32 << 20;

/// How often a joined gateway reports.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

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
}

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
