//! What the roles report: served by the API at `GET /v1/status`, printed by `haven status`.

use haven_net::stream::{DiskState, Report};
use serde::{Deserialize, Serialize};

/// A gateway's status: the roles it runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GatewayStatus {
    /// The site this gateway belongs to.
    pub site: String,
    /// Present when the gateway is a process server.
    #[serde(default)]
    pub process_server: Option<ProcessServerStatus>,
    /// Present when the gateway is a master target.
    #[serde(default)]
    pub master_target: Option<MasterTargetStatus>,
    /// Present when the gateway is a configuration server: every gateway that joined it, with
    /// its last status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_server: Option<Vec<crate::config_server::GatewayView>>,
}

/// The process server's view.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// Churn: bytes the caches take in per second, as stored (compressed), over the last
    /// seconds.
    #[serde(default)]
    pub churn_bytes_per_second: f64,
    /// Throughput to the master target: bytes sent per second on its connection.
    #[serde(default)]
    pub upload_bytes_per_second: f64,
    /// The RPO achievable at the current churn: how long what the caches hold takes to reach
    /// the master target at the current throughput; `None` while the churn exceeds the
    /// throughput (the caches grow: no RPO holds) or nothing is sent while caches hold data.
    #[serde(default)]
    pub achievable_rpo_seconds: Option<f64>,
    /// One entry per protected disk whose stream passes here.
    pub disks: Vec<CachedDisk>,
    /// The cache storage account this process server drains (Azure → Azure), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainStatus>,
}

/// A cache storage account a process server drains.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DrainStatus {
    /// The container's URL (no credentials).
    pub account: String,
    /// The agents drained here now (this gateway holds their lease), by their last report.
    pub agents: Vec<DrainedAgent>,
}

/// An agent a process server drains from a cache account.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DrainedAgent {
    pub agent_id: String,
    pub machine_name: String,
    /// When the agent made its last report, ms since the Unix epoch.
    pub report_time_ms: u64,
}

/// One disk's stream through the process server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// The agent refused its machine's point policy from the configuration server, and why
    /// (it takes points on its own intervals meanwhile).
    #[serde(default)]
    pub policy_refused: Option<String>,
    /// Set when the master target failed the disk over: replication of it is stopped, and
    /// this says what happened and what to do.
    #[serde(default)]
    pub failed_over: Option<String>,
}

impl CachedDisk {
    /// The disk's replication state for an operator.
    pub fn state(&self) -> &'static str {
        if self.failed_over.is_some() {
            return "failed-over";
        }
        if self.error.is_some() {
            return "error";
        }
        self.report
            .as_ref()
            .and_then(|r| r.disks.iter().find(|d| d.disk == self.disk))
            .map_or("unknown", |d| d.state.name())
    }
}

/// The master target's view.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MasterTargetStatus {
    pub listen: String,
    /// The target writer plugin replicas are written with.
    pub writer: String,
    /// Most bytes the journal of one replica may hold.
    #[serde(default)]
    pub journal_max_bytes: u64,
    /// Traps of the writer plugin (timeout, out of memory, crash) since the gateway started,
    /// and the latest: each replaced the plugin's instance and paused the replica it hit.
    #[serde(default)]
    pub plugin_traps: u64,
    #[serde(default)]
    pub last_plugin_trap: Option<String>,
    pub replicas: Vec<ReplicaStatus>,
}

/// One replica on the master target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaStatus {
    pub agent_id: String,
    pub machine_name: String,
    pub disk: u32,
    pub size: u64,
    /// The replica's path below the writer's storage root.
    pub path: String,
    /// A reprotect's seed waiting for its first point: nothing is applied to it until then.
    #[serde(default)]
    pub seeding: bool,
    /// While seeding: the comparison's progress, from the agent's reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprotect: Option<ReprotectProgress>,
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

/// How far a reprotect's comparison is (a seeded replica, from its agent's reports).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReprotectProgress {
    /// Bytes of the disk compared with the replica so far.
    pub compared_bytes: u64,
    /// Bytes found different and sent (since the agent last started).
    pub sent_bytes: u64,
    /// Seconds until the comparison ends at its pace of the last minute; none before it has
    /// one (or while it is stalled), or once it is done.
    pub eta_seconds: Option<f64>,
}

/// How long the pace of a comparison looks back.
const PACE_WINDOW_MS: u64 = 60_000;

/// The recent pace of a comparison: samples of (ms, bytes compared), one per half second at
/// most, over the last [`PACE_WINDOW_MS`]. A restart of the gateway or of the agent starts it
/// again, so neither the downtime nor a pass started over makes the estimate wrong.
#[derive(Clone, Debug, Default)]
pub struct Pace {
    samples: std::collections::VecDeque<(u64, u64)>,
}

impl Pace {
    /// Notes that `compared` bytes were compared at `now_ms`.
    pub fn note(&mut self, now_ms: u64, compared: u64) {
        match self.samples.back() {
            // A pass that started over.
            Some(&(_, c)) if compared < c => self.samples.clear(),
            Some(&(t, _)) if now_ms < t + 500 => return,
            _ => {}
        }
        self.samples.push_back((now_ms, compared));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|&(t, _)| t + PACE_WINDOW_MS < now_ms)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes compared per second over the window; none without progress to measure.
    pub fn per_second(&self) -> Option<f64> {
        let (&(t0, c0), &(t1, c1)) = (self.samples.front()?, self.samples.back()?);
        (t1 > t0 && c1 > c0).then(|| (c1 - c0) as f64 * 1000.0 / (t1 - t0) as f64)
    }
}

impl ReprotectProgress {
    /// The progress of a comparison of `size` bytes as `disk` reports it at `now_ms`, its
    /// pace kept in `pace`.
    pub fn of(
        disk: &haven_net::stream::DiskReport,
        size: u64,
        pace: &mut Pace,
        now_ms: u64,
    ) -> Self {
        let done = disk.state != haven_net::stream::DiskState::Resyncing;
        let compared = if done { size } else { disk.sync_done_bytes };
        pace.note(now_ms, compared);
        ReprotectProgress {
            compared_bytes: compared,
            sent_bytes: disk.resync_sent_bytes,
            eta_seconds: pace
                .per_second()
                .filter(|_| !done)
                .map(|rate| (size - compared.min(size)) as f64 / rate),
        }
    }
}

impl ReplicaStatus {
    /// The disk's replication state for an operator: `stopped` once the item failed over;
    /// else the agent's state when the agent is heard from and the replica has no error of its
    /// own — but `catching-up` while the agent says `protected` and records it acknowledged
    /// before its latest report are not all here (journaled, and applied to the replica when
    /// no point is kept). So `protected` here means: this site holds every write the source
    /// acknowledged before its last report.
    pub fn state(&self) -> &'static str {
        if !matches!(self.item_state.as_str(), "" | "protected") {
            return "stopped";
        }
        if self.error.is_some() {
            return "error";
        }
        match self
            .report
            .as_ref()
            .and_then(|r| r.disks.iter().find(|d| d.disk == self.disk))
        {
            Some(d) if d.state == DiskState::Protected && self.behind(d.last_seq) => "catching-up",
            Some(d) => d.state.name(),
            None => "unknown",
        }
    }

    /// Whether records up to `seq` are not all held here: journaled, and applied to the
    /// replica when no point is kept (the replica file is then the latest state).
    fn behind(&self, seq: u64) -> bool {
        self.durable_seq < seq || (self.points == 0 && self.applied_seq < seq)
    }
}

#[cfg(test)]
mod tests {
    use haven_net::stream::DiskReport;

    use super::*;

    #[test]
    fn the_pace_is_the_last_minutes_and_starts_over_with_a_new_pass() {
        let mut pace = Pace::default();
        assert_eq!(pace.per_second(), None);
        pace.note(1_000, 0);
        pace.note(1_200, 10);
        // Half a second apart at least.
        assert_eq!(pace.per_second(), None);
        pace.note(2_000, 100 << 20);
        assert_eq!(pace.per_second(), Some(100.0 * (1 << 20) as f64));
        // A long stop (a restart) leaves the window: the pace is the recent one.
        pace.note(200_000, 110 << 20);
        pace.note(201_000, 120 << 20);
        assert_eq!(pace.per_second(), Some(10.0 * (1 << 20) as f64));
        // A pass started over: no pace until it has progress again.
        pace.note(202_000, 1 << 20);
        assert_eq!(pace.per_second(), None);
    }

    fn replica(durable: u64, applied: u64, points: usize, agent_last: u64) -> ReplicaStatus {
        ReplicaStatus {
            agent_id: "a".into(),
            machine_name: "web01".into(),
            disk: 1,
            size: 1 << 20,
            path: "a/disk1.raw".into(),
            seeding: false,
            reprotect: None,
            durable_seq: durable,
            applied_seq: applied,
            lag_bytes: 0,
            lag_seconds: 0.0,
            rpo_seconds: None,
            item_state: "protected".into(),
            points,
            newest_point_ms: None,
            test_failover: None,
            apply_bytes_per_second: 0.0,
            applied_bytes_total: 0,
            journal_bytes: 0,
            report: Some(Report {
                agent_id: "a".into(),
                machine_name: "web01".into(),
                time_ms: 1,
                disks: vec![DiskReport {
                    disk: 1,
                    size: 1 << 20,
                    state: DiskState::Protected,
                    sync_done_bytes: 1 << 20,
                    resync_sent_bytes: 0,
                    resync_compared_bytes: 0,
                    log_bytes: 0,
                    log_max_bytes: 1 << 30,
                    written_bytes_total: 0,
                    shipped_bytes_total: 0,
                    last_seq: agent_last,
                    acked_seq: agent_last,
                    message: None,
                    written: Vec::new(),
                }],
            }),
            error: None,
        }
    }

    #[test]
    fn protected_only_when_this_site_holds_what_the_agent_acknowledged() {
        // Without points the replica file must hold it: applied.
        assert_eq!(replica(10, 7, 0, 10).state(), "catching-up");
        assert_eq!(replica(10, 10, 0, 10).state(), "protected");
        // With points, journaled is enough (views read the journal).
        assert_eq!(replica(10, 3, 2, 10).state(), "protected");
        assert_eq!(replica(9, 3, 2, 10).state(), "catching-up");
    }

    #[test]
    fn a_failed_over_item_is_stopped_whatever_the_agent_says() {
        let mut r = replica(10, 10, 0, 10);
        r.item_state = "failed-over".into();
        assert_eq!(r.state(), "stopped");
        r.error = Some("boom".into());
        assert_eq!(r.state(), "stopped");
    }
}
