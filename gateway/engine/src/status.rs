//! What the roles report: served by the API at `GET /v1/status`, printed by `haven status`.

use haven_net::stream::Report;
use serde::{Deserialize, Serialize};

/// A gateway's status: the roles it runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayStatus {
    /// The site this gateway belongs to.
    pub site: String,
    /// Present when the gateway is a process server.
    #[serde(default)]
    pub process_server: Option<ProcessServerStatus>,
    /// Present when the gateway is a master target.
    #[serde(default)]
    pub master_target: Option<MasterTargetStatus>,
}

/// The process server's view.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessServerStatus {
    /// Where agents connect.
    pub listen: String,
    /// Where the cache is forwarded.
    pub upstream: String,
    /// Whether the connection to the master target is up.
    pub upstream_connected: bool,
    /// Bytes all caches hold, and their limit.
    pub cache_bytes: u64,
    pub cache_max_bytes: u64,
    /// One entry per protected disk whose stream passes here.
    pub disks: Vec<CachedDisk>,
}

/// One disk's stream through the process server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CachedDisk {
    pub agent_id: String,
    pub machine_name: String,
    pub disk: u32,
    /// Whether the agent is connected now.
    pub agent_connected: bool,
    /// Last record made durable in the cache (acknowledged to the agent).
    pub durable_seq: u64,
    /// Last record the master target acknowledged (freed from the cache).
    pub forwarded_seq: u64,
    /// Bytes the cache holds for this disk (compressed, encrypted).
    pub cache_bytes: u64,
    /// Bytes received from the agent per second (5 s window).
    pub receive_bytes_per_second: f64,
    /// Bytes received since the gateway started (before compression).
    pub received_bytes_total: u64,
    /// Bytes stored in the cache since the gateway started (after compression).
    pub stored_bytes_total: u64,
    /// The agent's latest report.
    pub report: Option<Report>,
    /// Why the stream stopped, and what to do.
    pub error: Option<String>,
}

/// The master target's view.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MasterTargetStatus {
    pub listen: String,
    /// The target writer plugin replicas are written with.
    pub writer: String,
    pub replicas: Vec<ReplicaStatus>,
}

/// One replica on the master target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub agent_id: String,
    pub machine_name: String,
    pub disk: u32,
    pub size: u64,
    /// The replica's path below the writer's storage root.
    pub path: String,
    /// Last record made durable in the journal.
    pub durable_seq: u64,
    /// Last record applied to the replica (and flushed).
    pub applied_seq: u64,
    /// Bytes of disk extent journaled but in no recovery point yet (without points: not yet
    /// applied to the replica).
    pub lag_bytes: u64,
    /// Age of the oldest journaled record in no recovery point yet (without points: not yet
    /// applied), in seconds, counted from its arrival here; 0 when every record is covered.
    pub lag_seconds: f64,
    /// The recovery point objective achieved now, in seconds: with points kept, the age of the
    /// newest point (on the source's clock) when the source has written since it or has not
    /// reported lately, else `lag_seconds`; without points, `lag_seconds`. `None` before the
    /// first point and once the item is failed over.
    #[serde(default)]
    pub rpo_seconds: Option<f64>,
    /// The item's failover state (`protected`, `failing-over`, `failed-over`, …).
    #[serde(default)]
    pub item_state: String,
    /// Recovery points held.
    #[serde(default)]
    pub points: usize,
    /// Source time of the newest point, ms since the Unix epoch.
    #[serde(default)]
    pub newest_point_ms: Option<u64>,
    /// The running test failover's NBD URI.
    #[serde(default)]
    pub test_failover: Option<String>,
    /// Bytes applied per second (5 s window).
    pub apply_bytes_per_second: f64,
    /// Bytes of extent applied since the gateway started.
    pub applied_bytes_total: u64,
    /// Bytes the journal holds.
    pub journal_bytes: u64,
    /// The source agent's latest report, as forwarded by the process server.
    pub report: Option<Report>,
    /// Why applying stopped, and what to do.
    pub error: Option<String>,
}

impl ReplicaStatus {
    /// The disk's replication state for an operator: the agent's state when the agent is
    /// heard from and the replica has no error of its own.
    pub fn state(&self) -> &'static str {
        if self.error.is_some() {
            return "error";
        }
        match self
            .report
            .as_ref()
            .and_then(|r| r.disks.iter().find(|d| d.disk == self.disk))
        {
            Some(d) => d.state.name(),
            None => "unknown",
        }
    }
}
