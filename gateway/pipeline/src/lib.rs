//! Pipelines as code: a whole Haven deployment in one TOML file.
//!
//! A pipeline names the sites, the gateways and their roles, the plugins and everything they
//! are granted, the replication and failback policies, the network mappings, the protected
//! machines, their consistency groups, the recovery plans and the webhooks. The configuration
//! server applies it; this crate is the pure part of that: the typed model ([`Pipeline`]),
//! [`parse`] with exact positions, validation that reports every problem at once
//! ([`Diagnostics`]), [`diff`] between two pipelines, and [`to_toml`], the canonical file.
//! Nothing here does I/O but [`load`] reading the file; nothing is async.
//!
//! ```
//! let file = r#"
//! version = 1
//!
//! [deployment]
//! name = "branch"
//!
//! [[site]]
//! name = "primary"
//!
//! [[site]]
//! name = "secondary"
//!
//! [[gateway]]
//! name = "ps1"
//! site = "primary"
//! roles = ["config-server", "process-server"]
//! address = "ps1.example.net:9443"
//!
//! [[gateway]]
//! name = "mt1"
//! site = "secondary"
//! roles = ["master-target"]
//! address = "mt1.example.net:9444"
//!
//! ## Replicas as sparse raw files; the plugin may touch nothing but this folder.
//! [[plugin]]
//! name = "raw"
//! kind = "target-writer"
//! path = "/opt/haven/plugins/haven_raw.wasm"
//! gateways = ["mt1"]
//! grants = { storage_root = "/var/lib/haven/replicas" }
//!
//! [[policy]]
//! name = "gold"
//! kind = "replication"
//! crash_consistent_interval = "5s"
//!
//! [[machine]]
//! name = "files01"
//! site = "primary"
//! policy = "gold"
//! master_target = "mt1"
//! writer = "raw"
//! "#;
//! let pipeline = haven_pipeline::parse(file, "branch.toml").unwrap();
//! assert_eq!(pipeline.machines[0].process_server, None); // assigned by the configuration server
//! assert_eq!(haven_pipeline::parse(&haven_pipeline::to_toml(&pipeline), "x").unwrap(), pipeline);
//!
//! let mut desired = pipeline.clone();
//! desired.machines.clear();
//! let plan = haven_pipeline::diff(&pipeline, &desired);
//! assert_eq!(plan.changes[0].to_string(),
//!     "- machine files01  (destroys: the journal and replica of `files01` at `mt1`)");
//! assert_eq!(plan.destructive().len(), 1);
//!
//! let errors = haven_pipeline::parse(&file.replace("\"5s\"", "\"100ms\""), "branch.toml")
//!     .unwrap_err();
//! assert_eq!(errors.to_string(),
//!     "branch.toml:36:29: policy[0].crash_consistent_interval: crash_consistent_interval \
//!      100ms is below the agent's minimum, 250ms; write at least \"250ms\"\n");
//! ```
//!
//! # The file
//!
//! `version = 1` and `[deployment]` (`name`, `description`) are required; then any number of
//! `[[site]]`, `[[gateway]]`, `[[plugin]]` (with `[plugin.grants]` and `[plugin.settings]`),
//! `[[policy]]` (`kind = "replication"` with `[policy.retention]`, or `kind = "failback"`),
//! `[[network_mapping]]`, `[[cache_account]]`, `[[machine]]` (with `[machine.target]`),
//! `[[group]]`, `[[plan]]`
//! (with `[[plan.step]]`: `kind = "failover"`, `"script"` or `"manual"`) and `[[webhook]]`.
//! Each field is documented on its struct in [`model`]. Durations are written as
//! [`haven_engine::retention::parse_duration`] reads them (`"250ms"`, `"5s"`, `"15m"`, `"72h"`),
//! and a policy's `retention` is the gateway's `[master_target.retention]` table, read by the
//! same code. Secrets are never written in the file: a setting `secret:NAME` refers to one the
//! configuration server holds.
//!
//! Adapter plugins run at the configuration server. A machine's `[machine.target]` settings
//! shape its replica at failover: `name` (default the machine's), `cpus` and `memory_mib`
//! (default the source's), `datastore` and `datastore_folder` (where the master target's writer
//! keeps the replica's disk, as the target platform addresses it), `nicN_address` (a static
//! address for the replica's N-th network adapter), `power_on` (`"false"` leaves it stopped);
//! every other key (`folder`, `resource_pool`, `host`, …) goes to the target adapter as an
//! option, `_` written `-`.
//!
//! # The rules
//!
//! Every table rejects unknown fields (naming the field and the allowed ones). Names are
//! `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`, unique per kind. Every reference resolves to a resource
//! of the right kind: a gateway's `site`; a plugin's `gateways`; a network mapping's sites (two
//! different ones; its test network is not its target network); a machine's `site`, `policy`
//! (a replication policy), `failback_policy` (a failback one), `platform` and `target_platform`
//! (adapters), `writer` (a target writer), `process_server` (a gateway with that role at the
//! machine's site; when left out, the site must have one, unless the machine names a
//! `cache_account` of its site instead, whose `drained_by` gateways have the process-server
//! role and take the process servers' part) and `master_target` (a gateway with
//! that role at another site), and the plugins a machine uses must be loaded on the gateways
//! that use them; a group's 1 to 64 `machines` (each in at most one group, all at one site and
//! one master target) and `policy`; a plan step's `machines` and `groups` (each machine failed
//! over once per plan). A gateway with the process-server or master-target role has an
//! `address` (`host:port`); its `api` is `https://`; at most one gateway is the configuration
//! server. Plugin paths and storage roots are absolute (the component itself is checked by the
//! gateway at apply); `memory_mib` is 1 to 4096, `call_timeout_ms` 1 to 3600000, `http_hosts`
//! are `host` or `host:port`. A setting whose name ends in `password`, `secret`, `token` or
//! `key` must be a `secret:NAME` reference. A replication policy's crash-consistent interval is
//! at least 250 ms and at most its `rpo_threshold`; its app-consistent interval is `"off"` or at
//! least 1 min and at most the retention window (and `"off"` when the window is 0); its
//! retention passes [`haven_engine::retention::RetentionPolicy::validate`]. Script steps run a
//! non-empty command with a timeout of 1 s to 24 h; manual steps have a message. Webhook URLs
//! are `http://` or `https://`; `events` are [`EVENT_KINDS`], `PREFIX.*` or `["*"]`.
//!
//! # Diagnostics
//!
//! [`parse`] reports a syntax error alone (the first one in the file: what follows it may be
//! its echo). Otherwise it reports every type error, unknown field and broken rule of the whole
//! file at once, sorted by position, each as `FILE:LINE:COL: PATH: MESSAGE; HINT` — the
//! position of the offending key or value (of the table's header for a missing field), the
//! field's path (`machine[2].policy`, `plan[0].step[1].machines[0]`), what is wrong and what to
//! do. A resource with a missing field or a value of the wrong type is left out of the later
//! checks, and references to it count as resolved, so one mistake is reported once.

mod decode;
mod diagnostics;
mod diff;
pub mod model;
mod render;
mod validate;

use std::path::Path;

use toml::de::DeTable;

pub use diagnostics::{Diagnostic, Diagnostics};
pub use diff::{Action, Change, FieldChange, Plan, ResourceKind, diff};
pub use model::{
    CacheAccount, Deployment, EVENT_KINDS, FailbackPolicy, FailoverStep, Gateway, Grants, Group,
    MAX_NAME_LEN, Machine, ManualStep, NetworkMapping, Pipeline, Plugin, PluginKind, Policy,
    RecoveryPlan, ReplicationPolicy, Role, ScriptStep, Severity, Site, Step, VERSION, Webhook,
};
pub use render::to_toml;
pub use validate::check_name;

/// Parses and checks a pipeline file; `file` names it in the diagnostics.
pub fn parse(source: &str, file: &str) -> Result<Pipeline, Diagnostics> {
    let mut reporter = diagnostics::Reporter::new(source, file);
    let (doc, syntax) = DeTable::parse_recoverable(source);
    if let Some(first) = syntax
        .iter()
        .min_by_key(|e| e.span().map_or(usize::MAX, |s| s.start))
    {
        let span = first.span().unwrap_or(0..0);
        let message = first.message().trim();
        let message = if message == "duplicate key" {
            format!("duplicate key `{}`", reporter.text(span.clone()).trim())
        } else {
            message.to_string()
        };
        let hint = if message.starts_with("duplicate key") {
            "a key is set once per table; remove one of them, or start a new `[[...]]` entry"
        } else {
            "fix the TOML syntax here: strings in quotes, one `key = value` per line, tables as \
             `[name]` or `[[name]]`"
        };
        reporter.report(span, "", message, hint);
        return Err(reporter.finish());
    }
    let mut decoder = decode::Decoder::new(&mut reporter);
    let Some(decoded) = decoder.document(&doc) else {
        return Err(reporter.finish());
    };
    let spans = std::mem::take(&mut decoder.spans);
    validate::check(&decoded, &spans, decoder.reporter());
    if reporter.has_errors() {
        return Err(reporter.finish());
    }
    match decoded.into_pipeline() {
        Some(p) => Ok(p),
        // Every entry that did not decode was reported.
        None => Err(reporter.finish()),
    }
}

/// Reads and parses the pipeline file at `path`, named by its path in the diagnostics.
pub fn load(path: &Path) -> Result<Pipeline, Diagnostics> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(source) => parse(&source, &file),
        Err(e) => {
            let mut reporter = diagnostics::Reporter::new("", &file);
            reporter.report(
                0..0,
                "",
                format!("cannot read the file: {e}"),
                "check the path and its permissions",
            );
            Err(reporter.finish())
        }
    }
}
