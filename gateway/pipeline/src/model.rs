//! The typed model of a pipeline: one struct per kind of resource.
//!
//! The field names are the file's keys, in TOML and in JSON alike: a [`Pipeline`] serialized
//! with serde has the shape of the file (`site`, `machine`, `plan[0].step`…), so a path in a
//! [`crate::Diagnostic`] or a [`crate::FieldChange`] reads the same in both. Defaults are the
//! same functions for the file reader and serde.
//!
//! A `Pipeline` returned by [`crate::parse`] is valid: every rule of the crate documentation
//! holds. One built in code or received as JSON is not checked until it goes through
//! [`Pipeline::validate`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use haven_engine::retention::{RetentionPolicy, duration_str};
use serde::{Deserialize, Serialize};

/// The only pipeline format version this crate reads and writes.
pub const VERSION: u32 = 1;

/// Longest resource name: names are `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`.
pub const MAX_NAME_LEN: usize = 63;

/// Most machines in one consistency group.
pub const MAX_GROUP_MACHINES: usize = 64;

/// Shortest crash-consistent interval: the agent tags no more often than this.
pub const MIN_CRASH_CONSISTENT_INTERVAL: Duration = Duration::from_millis(250);

/// Shortest app-consistent interval: quiescing a machine's applications costs more than a tag.
pub const MIN_APP_CONSISTENT_INTERVAL: Duration = Duration::from_secs(60);

/// Most linear memory a plugin may be granted (a 32-bit WebAssembly memory holds 4 GiB).
pub const MAX_MEMORY_MIB: u64 = 4096;

/// Event kinds a webhook can select, besides `"*"` (every event) and `"PREFIX.*"` (every event
/// of a prefix, e.g. `"failover.*"`).
pub const EVENT_KINDS: &[&str] = &[
    "agent.connected",
    "agent.disconnected",
    "agent.moved",
    "cache.full",
    "cache.recovered",
    "failback.completed",
    "failback.failed",
    "failover.committed",
    "failover.completed",
    "failover.failed",
    "failover.started",
    "gateway.reachable",
    "gateway.unreachable",
    "job.failed",
    "journal.full",
    "journal.recovered",
    "plan.completed",
    "plan.failed",
    "plan.started",
    "plan.step-completed",
    "plan.waiting",
    "platform.reachable",
    "platform.unreachable",
    "plugin.failed",
    "plugin.trapped",
    "points.suspect",
    "policy.accepted",
    "policy.refused",
    "reprotect.completed",
    "reprotect.started",
    "replication.resumed",
    "replication.resync-completed",
    "replication.resync-started",
    "replication.stalled",
    "rpo.exceeded",
    "rpo.recovered",
    "space.low",
    "space.recovered",
    "test-failover.cleaned-up",
    "test-failover.started",
];

/// A whole deployment: its sites, gateways, plugins, policies, protected machines, groups,
/// recovery plans and webhooks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// The format version; always [`VERSION`].
    pub version: u32,
    /// What the file describes.
    pub deployment: Deployment,
    /// `[[site]]`: the places machines run and replicate to.
    #[serde(rename = "site", default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<Site>,
    /// `[[gateway]]`: the `haven-gateway` instances and their roles.
    #[serde(rename = "gateway", default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<Gateway>,
    /// `[[plugin]]`: adapters and target writers, each with its grants.
    #[serde(rename = "plugin", default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<Plugin>,
    /// `[[policy]]`: replication and failback policies.
    #[serde(rename = "policy", default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Policy>,
    /// `[[network_mapping]]`: which network a replica joins at failover and test failover.
    #[serde(
        rename = "network_mapping",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub network_mappings: Vec<NetworkMapping>,
    /// `[[cache_account]]`: storage accounts agents ship to instead of a process server.
    #[serde(
        rename = "cache_account",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cache_accounts: Vec<CacheAccount>,
    /// `[[machine]]`: the protected machines.
    #[serde(rename = "machine", default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<Machine>,
    /// `[[group]]`: multi-machine consistency groups.
    #[serde(rename = "group", default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Group>,
    /// `[[plan]]`: recovery plans.
    #[serde(rename = "plan", default, skip_serializing_if = "Vec::is_empty")]
    pub plans: Vec<RecoveryPlan>,
    /// `[[webhook]]`: where events are posted.
    #[serde(rename = "webhook", default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<Webhook>,
}

impl Pipeline {
    /// An empty pipeline for the deployment `name`.
    pub fn new(name: impl Into<String>) -> Pipeline {
        Pipeline {
            version: VERSION,
            deployment: Deployment {
                name: name.into(),
                description: None,
            },
            sites: Vec::new(),
            gateways: Vec::new(),
            plugins: Vec::new(),
            policies: Vec::new(),
            network_mappings: Vec::new(),
            cache_accounts: Vec::new(),
            machines: Vec::new(),
            groups: Vec::new(),
            plans: Vec::new(),
            webhooks: Vec::new(),
        }
    }

    /// Checks a pipeline built in code or received as JSON with every rule [`crate::parse`]
    /// applies. Positions in the diagnostics refer to the canonical file, [`crate::to_toml`].
    pub fn validate(&self) -> Result<(), crate::Diagnostics> {
        crate::parse(&crate::to_toml(self), "pipeline.toml").map(|_| ())
    }

    /// The site named `name`.
    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.name == name)
    }

    /// The gateway named `name`.
    pub fn gateway(&self, name: &str) -> Option<&Gateway> {
        self.gateways.iter().find(|g| g.name == name)
    }

    /// The plugin named `name`.
    pub fn plugin(&self, name: &str) -> Option<&Plugin> {
        self.plugins.iter().find(|p| p.name == name)
    }

    /// The policy named `name`.
    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name() == name)
    }

    /// The machine named `name`.
    pub fn machine(&self, name: &str) -> Option<&Machine> {
        self.machines.iter().find(|m| m.name == name)
    }

    /// The replication policy machine `machine` runs under: its group's when the group names
    /// one, else its own.
    pub fn replication_policy_of(&self, machine: &str) -> Option<&ReplicationPolicy> {
        let m = self.machine(machine)?;
        let name = self
            .group_of(machine)
            .and_then(|g| g.policy.as_deref())
            .unwrap_or(&m.policy);
        match self.policy(name)? {
            Policy::Replication(r) => Some(r),
            Policy::Failback(_) => None,
        }
    }

    /// The group named `name`.
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The group `machine` belongs to, if any.
    pub fn group_of(&self, machine: &str) -> Option<&Group> {
        self.groups
            .iter()
            .find(|g| g.machines.iter().any(|m| m == machine))
    }

    /// The recovery plan named `name`.
    pub fn plan(&self, name: &str) -> Option<&RecoveryPlan> {
        self.plans.iter().find(|p| p.name == name)
    }
}

/// `[deployment]`: the name of what the file describes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// The deployment's name; the configuration server refuses a file for another deployment.
    pub name: String,
    /// Free text for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `[[site]]`: a place machines run in or replicate to (a datacentre, an Azure region).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// The site's name.
    pub name: String,
    /// Free text for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A gateway's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Holds the deployment's state and applies pipelines (at most one per deployment).
    ConfigServer,
    /// Receives agents' streams at the primary site, caches and forwards them.
    ProcessServer,
    /// Journals streams at the secondary site and applies them to replicas.
    MasterTarget,
}

impl Role {
    /// Every role, in order.
    pub const ALL: [Role; 3] = [Role::ConfigServer, Role::ProcessServer, Role::MasterTarget];

    /// The name in the file.
    pub fn name(self) -> &'static str {
        match self {
            Role::ConfigServer => "config-server",
            Role::ProcessServer => "process-server",
            Role::MasterTarget => "master-target",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `[[gateway]]`: one `haven-gateway` and the roles it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// The gateway's name (as in its certificate).
    pub name: String,
    /// The site it runs at.
    pub site: String,
    /// Its roles, at least one.
    pub roles: BTreeSet<Role>,
    /// `host:port` (UDP) it receives replication on; required with the process-server or
    /// master-target role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// URL of its HTTP API, `https://…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
}

/// The world a plugin implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    /// A platform: inventory, quiesce, power, snapshots, defining replica machines.
    Adapter,
    /// A disk format on a destination: replicas and failover images.
    TargetWriter,
}

impl PluginKind {
    /// The name in the file.
    pub fn name(self) -> &'static str {
        match self {
            PluginKind::Adapter => "adapter",
            PluginKind::TargetWriter => "target-writer",
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `[[plugin]]`: a WebAssembly component, where it runs, and everything it is granted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plugin {
    /// The plugin's name, as machines refer to it.
    pub name: String,
    /// `adapter` or `target-writer`.
    pub kind: PluginKind,
    /// Absolute path of the component (`.wasm`) on the gateways; checked there at apply.
    pub path: PathBuf,
    /// Gateways that load it; empty (the field left out) means every gateway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// What the plugin may use; nothing beyond it.
    #[serde(default)]
    pub grants: Grants,
    /// Settings passed to the plugin (e.g. a vCenter URL). A value `secret:NAME` refers to a
    /// secret held by the configuration server; a secret's value is never written here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
}

/// `[plugin.grants]`: a plugin's capabilities and limits, as the gateway's host enforces them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Absolute folder the plugin's file storage works below; none: no file access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_root: Option<PathBuf>,
    /// With `storage_root`: files may be read but not created, written or removed.
    #[serde(default)]
    pub storage_read_only: bool,
    /// Hosts the plugin may send HTTP requests to, `host` (any port) or `host:port`; none: no
    /// network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_hosts: Vec<String>,
    /// Most linear memory per instance, in MiB (default 256, at most [`MAX_MEMORY_MIB`]).
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Longest one call may run, in milliseconds (default 30000).
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
}

pub(crate) fn default_memory_mib() -> u64 {
    256
}

pub(crate) fn default_call_timeout_ms() -> u64 {
    30_000
}

impl Default for Grants {
    fn default() -> Self {
        Grants {
            storage_root: None,
            storage_read_only: false,
            http_hosts: Vec::new(),
            memory_mib: default_memory_mib(),
            call_timeout_ms: default_call_timeout_ms(),
        }
    }
}

/// `[[policy]]`: how machines replicate or fail back; `kind` tells which.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Policy {
    /// `kind = "replication"`.
    Replication(ReplicationPolicy),
    /// `kind = "failback"`.
    Failback(FailbackPolicy),
}

impl Policy {
    /// The policy's name.
    pub fn name(&self) -> &str {
        match self {
            Policy::Replication(p) => &p.name,
            Policy::Failback(p) => &p.name,
        }
    }

    /// `replication` or `failback`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Policy::Replication(_) => "replication",
            Policy::Failback(_) => "failback",
        }
    }
}

/// A replication policy: recovery point frequency, the RPO alert and retention.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationPolicy {
    /// The policy's name.
    pub name: String,
    /// An alert is raised when a machine's RPO exceeds this (default `"15m"`).
    #[serde(default = "default_rpo_threshold", with = "duration_str")]
    pub rpo_threshold: Duration,
    /// A crash-consistent point is tagged this often (default `"5s"`, at least `"250ms"`).
    #[serde(default = "default_crash_consistent_interval", with = "duration_str")]
    pub crash_consistent_interval: Duration,
    /// An app-consistent point (applications quiesced) is taken this often, `"off"` for never
    /// (default `"1h"`, at least `"1m"`).
    #[serde(default = "default_app_consistent_interval", with = "interval_or_off")]
    pub app_consistent_interval: Option<Duration>,
    /// Which points the master target keeps: the `[master_target.retention]` table of the
    /// gateway's configuration, read by the same code.
    #[serde(default)]
    pub retention: RetentionPolicy,
    /// A process server gone this long has the machines' agents moved to another process
    /// server of their site (default `"5m"`, at least `"5s"`).
    #[serde(default = "default_process_server_grace", with = "duration_str")]
    pub process_server_grace: Duration,
}

pub(crate) fn default_process_server_grace() -> Duration {
    Duration::from_secs(300)
}

/// The shortest grace: a process server is taken for gone after 5 s without a report.
pub const MIN_PROCESS_SERVER_GRACE: Duration = Duration::from_secs(5);

pub(crate) fn default_rpo_threshold() -> Duration {
    Duration::from_secs(15 * 60)
}

pub(crate) fn default_crash_consistent_interval() -> Duration {
    Duration::from_secs(5)
}

pub(crate) fn default_app_consistent_interval() -> Option<Duration> {
    Some(Duration::from_secs(3600))
}

/// A failback policy: how machines return to the primary site after a failover.
///
/// There is no choice of a full copy: failback resyncs by comparing block hashes with what the
/// primary site still holds and sends only the differences (a lost disk has nothing in common
/// and is copied whole that way).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailbackPolicy {
    /// The policy's name.
    pub name: String,
    /// Shut the replica down and send its last writes before the machine starts at the primary
    /// site, so nothing is lost (default true; changed blocks are synchronised first, while the
    /// replica still runs, so the shutdown waits only for the last ones). False fails back to
    /// the latest point the primary site holds while the replica keeps running.
    #[serde(default = "yes")]
    pub shutdown_replica: bool,
    /// Protect the machine again, primary to secondary, once failback is committed (default
    /// true).
    #[serde(default = "yes")]
    pub reprotect_after_failback: bool,
}

pub(crate) fn yes() -> bool {
    true
}

/// `[[network_mapping]]`: the network a replica joins, by source network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkMapping {
    /// The mapping's name.
    pub name: String,
    /// Site of the protected machines.
    pub source_site: String,
    /// Site the replicas run at.
    pub target_site: String,
    /// Network the machines use at the source site (port group, VM network, virtual network).
    pub source_network: String,
    /// Network replicas join at failover.
    pub target_network: String,
    /// Isolated network replicas join at test failover; never the target network.
    pub test_network: String,
}

/// `[[cache_account]]`: a storage account of a source site that its machines' agents ship their
/// changes to, over outbound HTTPS only (Azure → Azure), and that process servers drain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheAccount {
    /// The account's name in this file.
    pub name: String,
    /// The site whose machines ship to it (it should be in that region).
    pub site: String,
    /// The container's URL, `https://ACCOUNT.blob.core.windows.net/CONTAINER`.
    pub container_url: String,
    /// The gateways with the process-server role that drain it (each configured with
    /// `[process_server.drain]`); any of them takes over an agent another one left.
    pub drained_by: Vec<String>,
}

/// `[[machine]]`: a protected machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// The machine's name.
    pub name: String,
    /// The site it runs at (the source).
    pub site: String,
    /// The adapter plugin of its source platform; none for a physical server with the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// The adapter plugin that defines the replica machine at failover, with `target` as its
    /// settings; none: failover writes the disks' images only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_platform: Option<String>,
    /// Its replication policy.
    pub policy: String,
    /// Its failback policy, if it fails back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback_policy: Option<String>,
    /// The process server at its site that receives its stream; none: the configuration server
    /// assigns the least loaded one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_server: Option<String>,
    /// The cache account of its site its agent ships to instead of a process server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_account: Option<String>,
    /// The master target at another site that keeps its replica.
    pub master_target: String,
    /// The target-writer plugin that writes its replica's disks.
    pub writer: String,
    /// Disks to protect, by path or id; empty (the field left out) means every disk found.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// Settings of the replica machine for `target_platform` (resource group, subnet,
    /// datastore, static IP…); a value `secret:NAME` refers to a secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub target: BTreeMap<String, String>,
}

/// `[[group]]`: machines whose recovery points are consistent across all of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// The group's name.
    pub name: String,
    /// Its members, 1 to [`MAX_GROUP_MACHINES`]; a machine is in at most one group.
    pub machines: Vec<String>,
    /// Replication policy of the group's points, instead of the members' own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// `[[plan]]`: a recovery plan, its steps run in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryPlan {
    /// The plan's name.
    pub name: String,
    /// `[[plan.step]]`: the steps, at least one.
    #[serde(rename = "step")]
    pub steps: Vec<Step>,
}

/// `[[plan.step]]`: one step of a recovery plan; `kind` tells which.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Step {
    /// `kind = "failover"`: fail over machines and groups together.
    Failover(FailoverStep),
    /// `kind = "script"`: run a command.
    Script(ScriptStep),
    /// `kind = "manual"`: wait until an operator resumes the plan.
    Manual(ManualStep),
}

impl Step {
    /// `failover`, `script` or `manual`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Step::Failover(_) => "failover",
            Step::Script(_) => "script",
            Step::Manual(_) => "manual",
        }
    }
}

/// A failover step: its machines and groups fail over at once; at least one is named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverStep {
    /// Machines, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<String>,
    /// Groups, by name: all members fail over to the same group point.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// A machine that fails does not stop the plan (default false: it stops it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continue_on_error: bool,
}

/// A script step: a command line run by the configuration server (`sh -c`); a non-zero exit or
/// the timeout fails the step and stops the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptStep {
    /// The command line.
    pub run: String,
    /// Longest the command may run (default `"10m"`, from `"1s"` to `"24h"`).
    #[serde(default = "default_script_timeout", with = "duration_str")]
    pub timeout: Duration,
    /// A failing command does not stop the plan (default false: it stops it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continue_on_error: bool,
}

pub(crate) fn default_script_timeout() -> Duration {
    Duration::from_secs(600)
}

/// A manual step: the plan waits, showing the message, until an operator resumes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManualStep {
    /// What the operator is asked to do.
    pub message: String,
}

/// How severe an event is: the configuration server's events are the ones webhooks select.
pub use haven_engine::events::Severity;

/// `[[webhook]]`: events posted as JSON to a URL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// The webhook's name.
    pub name: String,
    /// `http://…` or `https://…`.
    pub url: String,
    /// Event kinds posted ([`EVENT_KINDS`]), `"PREFIX.*"`, or `["*"]` for all.
    pub events: Vec<String>,
    /// Events below this severity are not posted (default `"warning"`).
    #[serde(default = "default_min_severity")]
    pub min_severity: Severity,
}

pub(crate) fn default_min_severity() -> Severity {
    Severity::Warning
}

/// Serde for an interval that may be `"off"` (`None`).
pub mod interval_or_off {
    use std::time::Duration;

    use haven_engine::retention::{format_duration, parse_duration};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `"off"` or the duration.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_str("off"),
        }
    }

    /// Reads `"off"` or a duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        if s == "off" {
            return Ok(None);
        }
        parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}
