//! From a parsed TOML document to the model, reporting every type error and unknown field.
//!
//! The walk never stops at the first problem: each resource is decoded on its own, each field
//! on its own. A resource with a missing required field or a value of the wrong type is kept as
//! an [`Entry`] without a value (its name, when readable, still counts for duplicates and
//! references, so one mistake does not cascade); an unknown field is reported and the rest of
//! the resource is used. The span of every table, value and list element is recorded by its
//! path, for the semantic checks to point at.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use haven_engine::retention::{RetentionPolicy, parse_duration};
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::diagnostics::Reporter;
use crate::model::*;

type Val<'i> = Spanned<DeValue<'i>>;

/// One `[[kind]]` entry of the file: its name if readable, its value if it decoded.
pub(crate) struct Entry<T> {
    pub(crate) name: Option<String>,
    pub(crate) value: Option<T>,
}

/// The file as decoded, entries at their index in the file.
pub(crate) struct Decoded {
    pub(crate) deployment: Option<Deployment>,
    pub(crate) sites: Vec<Entry<Site>>,
    pub(crate) gateways: Vec<Entry<Gateway>>,
    pub(crate) plugins: Vec<Entry<Plugin>>,
    pub(crate) policies: Vec<Entry<Policy>>,
    pub(crate) network_mappings: Vec<Entry<NetworkMapping>>,
    pub(crate) cache_accounts: Vec<Entry<CacheAccount>>,
    pub(crate) machines: Vec<Entry<Machine>>,
    pub(crate) groups: Vec<Entry<Group>>,
    pub(crate) plans: Vec<Entry<RecoveryPlan>>,
    pub(crate) webhooks: Vec<Entry<Webhook>>,
}

impl Decoded {
    /// The pipeline, if every part decoded.
    pub(crate) fn into_pipeline(self) -> Option<Pipeline> {
        fn all<T>(entries: Vec<Entry<T>>) -> Option<Vec<T>> {
            entries.into_iter().map(|e| e.value).collect()
        }
        Some(Pipeline {
            version: VERSION,
            deployment: self.deployment?,
            sites: all(self.sites)?,
            gateways: all(self.gateways)?,
            plugins: all(self.plugins)?,
            policies: all(self.policies)?,
            network_mappings: all(self.network_mappings)?,
            cache_accounts: all(self.cache_accounts)?,
            machines: all(self.machines)?,
            groups: all(self.groups)?,
            plans: all(self.plans)?,
            webhooks: all(self.webhooks)?,
        })
    }
}

/// The span of every table, value and list element, by path.
#[derive(Default)]
pub(crate) struct Spans(HashMap<String, Range<usize>>);

impl Spans {
    fn record(&mut self, path: &str, span: Range<usize>) {
        self.0.insert(path.to_string(), span);
    }

    /// The span of `path`, else of its closest recorded parent, else the file's start.
    pub(crate) fn get(&self, path: &str) -> Range<usize> {
        let mut p = path;
        loop {
            if let Some(span) = self.0.get(p) {
                return span.clone();
            }
            match parent(p) {
                Some(up) => p = up,
                None => return 0..0,
            }
        }
    }

    /// Whether `path` itself was in the file.
    pub(crate) fn has(&self, path: &str) -> bool {
        self.0.contains_key(path)
    }
}

/// `a.b[2]` → `a.b`, `a.b` → `a`, `a` → none.
fn parent(path: &str) -> Option<&str> {
    if path.ends_with(']') {
        return path.rfind('[').map(|i| &path[..i]);
    }
    path.rfind('.').map(|i| &path[..i])
}

/// `base.key`, or `key` at the root.
fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}.{key}")
    }
}

/// Fields of the top level.
const ROOT_FIELDS: &[&str] = &[
    "version",
    "deployment",
    "site",
    "gateway",
    "plugin",
    "policy",
    "network_mapping",
    "cache_account",
    "machine",
    "group",
    "plan",
    "webhook",
];
const CACHE_ACCOUNT_FIELDS: &[&str] = &["name", "site", "container_url", "drained_by"];
const DEPLOYMENT_FIELDS: &[&str] = &["name", "description"];
const SITE_FIELDS: &[&str] = &["name", "description"];
const GATEWAY_FIELDS: &[&str] = &["name", "site", "roles", "address", "api"];
const PLUGIN_FIELDS: &[&str] = &["name", "kind", "path", "gateways", "grants", "settings"];
const GRANTS_FIELDS: &[&str] = &[
    "storage_root",
    "storage_read_only",
    "http_hosts",
    "memory_mib",
    "call_timeout_ms",
];
const REPLICATION_FIELDS: &[&str] = &[
    "name",
    "kind",
    "rpo_threshold",
    "crash_consistent_interval",
    "app_consistent_interval",
    "retention",
    "process_server_grace",
];
const FAILBACK_FIELDS: &[&str] = &[
    "name",
    "kind",
    "shutdown_replica",
    "reprotect_after_failback",
];
const NETWORK_MAPPING_FIELDS: &[&str] = &[
    "name",
    "source_site",
    "target_site",
    "source_network",
    "target_network",
    "test_network",
];
const MACHINE_FIELDS: &[&str] = &[
    "name",
    "site",
    "platform",
    "target_platform",
    "policy",
    "failback_policy",
    "process_server",
    "cache_account",
    "master_target",
    "writer",
    "disks",
    "target",
];
const GROUP_FIELDS: &[&str] = &["name", "machines", "policy"];
const PLAN_FIELDS: &[&str] = &["name", "step"];
const FAILOVER_STEP_FIELDS: &[&str] = &["kind", "machines", "groups", "continue_on_error"];
const SCRIPT_STEP_FIELDS: &[&str] = &["kind", "run", "timeout", "continue_on_error"];
const MANUAL_STEP_FIELDS: &[&str] = &["kind", "message"];
const WEBHOOK_FIELDS: &[&str] = &["name", "url", "events", "min_severity"];

/// A table being decoded: its entries, its path and span, and how the file writes it.
struct Obj<'a, 'i> {
    table: &'a DeTable<'i>,
    path: String,
    span: Range<usize>,
    /// `[[machine]]`, `[plugin.grants]`…, for messages.
    header: String,
}

impl<'a, 'i> Obj<'a, 'i> {
    fn get(&self, key: &str) -> Option<&'a Val<'i>> {
        self.table.get(key)
    }

    fn at(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The string value of `key`, without reporting anything.
    fn peek_str(&self, key: &str) -> Option<String> {
        self.get(key)
            .and_then(|v| v.get_ref().as_str())
            .map(str::to_string)
    }
}

/// Decodes a document into [`Decoded`], reporting into `r`.
pub(crate) struct Decoder<'r, 's> {
    r: &'r mut Reporter<'s>,
    pub(crate) spans: Spans,
}

impl<'r, 's> Decoder<'r, 's> {
    pub(crate) fn new(r: &'r mut Reporter<'s>) -> Self {
        Decoder {
            r,
            spans: Spans::default(),
        }
    }

    pub(crate) fn reporter(&mut self) -> &mut Reporter<'s> {
        self.r
    }

    /// Decodes the whole document; none when it is in another format version (reported).
    pub(crate) fn document(&mut self, doc: &Spanned<DeTable<'_>>) -> Option<Decoded> {
        let root = Obj {
            table: doc.get_ref(),
            path: String::new(),
            span: 0..0,
            header: "the top level".into(),
        };
        self.spans.record("", 0..0);
        if !self.version(&root) {
            return None;
        }
        self.deny_unknown(&root, ROOT_FIELDS);
        Some(Decoded {
            deployment: self.deployment(&root),
            sites: self.entries(&root, "site", Self::site),
            gateways: self.entries(&root, "gateway", Self::gateway),
            plugins: self.entries(&root, "plugin", Self::plugin),
            policies: self.entries(&root, "policy", Self::policy),
            network_mappings: self.entries(&root, "network_mapping", Self::network_mapping),
            cache_accounts: self.entries(&root, "cache_account", Self::cache_account),
            machines: self.entries(&root, "machine", Self::machine),
            groups: self.entries(&root, "group", Self::group),
            plans: self.entries(&root, "plan", Self::plan),
            webhooks: self.entries(&root, "webhook", Self::webhook),
        })
    }

    /// Checks `version`; false when the file is in another format version, whose other
    /// fields are then not worth reporting.
    fn version(&mut self, root: &Obj<'_, '_>) -> bool {
        let Some(v) = root.get("version") else {
            self.r.report(
                0..0,
                "version",
                "missing required field `version`",
                format!("add `version = {VERSION}` at the top of the file"),
            );
            return true;
        };
        match self.uint(v, "version") {
            Some(n) if n != u64::from(VERSION) => {
                self.r.report(
                    v.span(),
                    "version",
                    format!("pipeline format version {n} is not supported (supported: {VERSION})"),
                    format!(
                        "write the file in format version {VERSION}, with `version = {VERSION}`"
                    ),
                );
                false
            }
            _ => true,
        }
    }

    fn deployment(&mut self, root: &Obj<'_, '_>) -> Option<Deployment> {
        let Some(v) = root.get("deployment") else {
            self.r.report(
                0..0,
                "deployment",
                "missing required table `[deployment]`",
                "add `[deployment]` with `name = \"...\"`, the deployment this file describes",
            );
            return None;
        };
        let o = self.obj(v, "deployment".into(), "[deployment]".into())?;
        self.deny_unknown(&o, DEPLOYMENT_FIELDS);
        let name = self.req(&o, "name", "\"production\"", Self::string);
        let description = self.opt(&o, "description", Self::string);
        Some(Deployment {
            name: name?,
            description: description?,
        })
    }

    /// Every `[[key]]` entry, each decoded by `f`.
    fn entries<T>(
        &mut self,
        root: &Obj<'_, '_>,
        key: &str,
        f: fn(&mut Self, &Obj<'_, '_>) -> Option<T>,
    ) -> Vec<Entry<T>> {
        let Some(v) = root.get(key) else {
            return Vec::new();
        };
        self.spans.record(key, v.span());
        let Some(items) = v.get_ref().as_array() else {
            self.r.report(
                v.span(),
                key,
                format!(
                    "expected `[[{key}]]` entries (an array of tables), found {}",
                    a_type(v.get_ref())
                ),
                format!("write each entry under its own `[[{key}]]` header"),
            );
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let path = format!("{key}[{i}]");
                match self.obj(item, path, format!("[[{key}]]")) {
                    Some(o) => Entry {
                        name: o.peek_str("name"),
                        value: f(self, &o),
                    },
                    None => Entry {
                        name: None,
                        value: None,
                    },
                }
            })
            .collect()
    }

    fn site(&mut self, o: &Obj<'_, '_>) -> Option<Site> {
        self.deny_unknown(o, SITE_FIELDS);
        let name = self.req(o, "name", "\"primary\"", Self::string);
        let description = self.opt(o, "description", Self::string);
        Some(Site {
            name: name?,
            description: description?,
        })
    }

    fn gateway(&mut self, o: &Obj<'_, '_>) -> Option<Gateway> {
        self.deny_unknown(o, GATEWAY_FIELDS);
        let name = self.req(o, "name", "\"ps1\"", Self::string);
        let site = self.req(o, "site", "\"primary\"", Self::string);
        let roles = self.req(o, "roles", "[\"process-server\"]", Self::roles);
        let address = self.opt(o, "address", Self::string);
        let api = self.opt(o, "api", Self::string);
        Some(Gateway {
            name: name?,
            site: site?,
            roles: roles?,
            address: address?,
            api: api?,
        })
    }

    fn roles(&mut self, v: &Val<'_>, path: &str) -> Option<BTreeSet<Role>> {
        let names = self.list(v, path, Self::string)?;
        let mut roles = BTreeSet::new();
        let mut ok = true;
        for (i, name) in names.iter().enumerate() {
            let at = format!("{path}[{i}]");
            match Role::ALL.iter().find(|r| r.name() == name) {
                Some(&role) => {
                    if !roles.insert(role) {
                        self.at(
                            &at,
                            format!("role `{name}` is listed twice"),
                            "list each role once",
                        );
                    }
                }
                None => {
                    ok = false;
                    let allowed = Role::ALL.map(Role::name);
                    self.at(
                        &at,
                        format!(
                            "unknown role `{name}`, expected one of {}",
                            backticked(&allowed)
                        ),
                        did_you_mean(name, &allowed)
                            .unwrap_or_else(|| "use one of the roles listed".into()),
                    );
                }
            }
        }
        ok.then_some(roles)
    }

    fn plugin(&mut self, o: &Obj<'_, '_>) -> Option<Plugin> {
        self.deny_unknown(o, PLUGIN_FIELDS);
        let name = self.req(o, "name", "\"vmdk\"", Self::string);
        let kind = self.req(o, "kind", "\"target-writer\"", |d, v, p| {
            d.choice(
                v,
                p,
                "plugin kind",
                &[
                    ("adapter", PluginKind::Adapter),
                    ("target-writer", PluginKind::TargetWriter),
                ],
            )
        });
        let path = self.req(
            o,
            "path",
            "\"/opt/haven/plugins/haven_vmdk.wasm\"",
            Self::path,
        );
        let gateways = self
            .opt(o, "gateways", Self::names)
            .map(Option::unwrap_or_default);
        let grants = match o.get("grants") {
            None => Some(Grants::default()),
            Some(v) => self.grants(v, &o.at("grants")),
        };
        let settings = self
            .opt(o, "settings", Self::string_map)
            .map(Option::unwrap_or_default);
        Some(Plugin {
            name: name?,
            kind: kind?,
            path: path?,
            gateways: gateways?,
            grants: grants?,
            settings: settings?,
        })
    }

    fn grants(&mut self, v: &Val<'_>, path: &str) -> Option<Grants> {
        let o = self.obj(v, path.to_string(), "[plugin.grants]".into())?;
        self.deny_unknown(&o, GRANTS_FIELDS);
        let storage_root = self.opt(&o, "storage_root", Self::path);
        let storage_read_only = self.get_or(&o, "storage_read_only", false, Self::boolean);
        let http_hosts = self
            .opt(&o, "http_hosts", |d, v, p| d.list(v, p, Self::string))
            .map(Option::unwrap_or_default);
        let memory_mib = self.get_or(&o, "memory_mib", default_memory_mib(), Self::uint);
        let call_timeout_ms =
            self.get_or(&o, "call_timeout_ms", default_call_timeout_ms(), Self::uint);
        Some(Grants {
            storage_root: storage_root?,
            storage_read_only: storage_read_only?,
            http_hosts: http_hosts?,
            memory_mib: memory_mib?,
            call_timeout_ms: call_timeout_ms?,
        })
    }

    fn policy(&mut self, o: &Obj<'_, '_>) -> Option<Policy> {
        #[derive(Clone, Copy)]
        enum Kind {
            Replication,
            Failback,
        }
        let kind = self.req(o, "kind", "\"replication\"", |d, v, p| {
            d.choice(
                v,
                p,
                "policy kind",
                &[
                    ("replication", Kind::Replication),
                    ("failback", Kind::Failback),
                ],
            )
        });
        let name = self.req(o, "name", "\"gold\"", Self::string);
        let Some(kind) = kind else {
            // Unknown kind: report only the fields no kind has.
            let all: Vec<&str> = REPLICATION_FIELDS
                .iter()
                .chain(FAILBACK_FIELDS)
                .copied()
                .collect();
            self.deny_unknown(o, &all);
            return None;
        };
        match kind {
            Kind::Replication => {
                self.deny_unknown(o, REPLICATION_FIELDS);
                let rpo_threshold =
                    self.get_or(o, "rpo_threshold", default_rpo_threshold(), Self::duration);
                let crash = self.get_or(
                    o,
                    "crash_consistent_interval",
                    default_crash_consistent_interval(),
                    Self::duration,
                );
                let app = self.get_or(
                    o,
                    "app_consistent_interval",
                    default_app_consistent_interval(),
                    Self::interval_or_off,
                );
                let retention = match o.get("retention") {
                    None => Some(RetentionPolicy::default()),
                    Some(v) => self.retention(v, &o.at("retention")),
                };
                let grace = self.get_or(
                    o,
                    "process_server_grace",
                    default_process_server_grace(),
                    Self::duration,
                );
                Some(Policy::Replication(ReplicationPolicy {
                    name: name?,
                    rpo_threshold: rpo_threshold?,
                    crash_consistent_interval: crash?,
                    app_consistent_interval: app?,
                    retention: retention?,
                    process_server_grace: grace?,
                }))
            }
            Kind::Failback => {
                self.deny_unknown(o, FAILBACK_FIELDS);
                let shutdown = self.get_or(o, "shutdown_replica", true, Self::boolean);
                let reprotect = self.get_or(o, "reprotect_after_failback", true, Self::boolean);
                Some(Policy::Failback(FailbackPolicy {
                    name: name?,
                    shutdown_replica: shutdown?,
                    reprotect_after_failback: reprotect?,
                }))
            }
        }
    }

    /// The retention table, read by the gateway's own reader (serde) so that both read it the
    /// same way.
    fn retention(&mut self, v: &Val<'_>, path: &str) -> Option<RetentionPolicy> {
        self.record_tree(v, path);
        if !v.get_ref().is_table() {
            return self.type_error(v, path, "table");
        }
        match RetentionPolicy::deserialize(ValueDeserializer::from(v.clone())) {
            Ok(policy) => Some(policy),
            Err(e) => {
                let span = e.span().unwrap_or_else(|| v.span());
                let at = path_at(v, path, &span);
                let message = e.message().trim().to_string();
                let (message, hint) = if message.starts_with("unknown field") {
                    let hint = backtick_quoted(&message)
                        .and_then(|field| did_you_mean(field, RETENTION_FIELDS))
                        .unwrap_or_else(|| "remove it, or use one of the fields listed".into());
                    (message, hint)
                } else {
                    split_hint(
                        &message,
                        "write it as the gateway's `[master_target.retention]`: window, \
                         tiers = [{ for_last, every }], prefer_app_consistent",
                    )
                };
                self.r.report(span, at, message, hint);
                None
            }
        }
    }

    fn network_mapping(&mut self, o: &Obj<'_, '_>) -> Option<NetworkMapping> {
        self.deny_unknown(o, NETWORK_MAPPING_FIELDS);
        let name = self.req(o, "name", "\"lan\"", Self::string);
        let source_site = self.req(o, "source_site", "\"primary\"", Self::string);
        let target_site = self.req(o, "target_site", "\"secondary\"", Self::string);
        let source_network = self.req(o, "source_network", "\"VM Network\"", Self::string);
        let target_network = self.req(o, "target_network", "\"DR Network\"", Self::string);
        let test_network = self.req(o, "test_network", "\"DR Test\"", Self::string);
        Some(NetworkMapping {
            name: name?,
            source_site: source_site?,
            target_site: target_site?,
            source_network: source_network?,
            target_network: target_network?,
            test_network: test_network?,
        })
    }

    fn cache_account(&mut self, o: &Obj<'_, '_>) -> Option<CacheAccount> {
        self.deny_unknown(o, CACHE_ACCOUNT_FIELDS);
        let name = self.req(o, "name", "\"weu-cache\"", Self::string);
        let site = self.req(o, "site", "\"westeurope\"", Self::string);
        let container_url = self.req(
            o,
            "container_url",
            "\"https://ACCOUNT.blob.core.windows.net/haven-cache\"",
            Self::string,
        );
        let drained_by = self.req(o, "drained_by", "[\"mt-neu\"]", Self::names);
        Some(CacheAccount {
            name: name?,
            site: site?,
            container_url: container_url?,
            drained_by: drained_by?,
        })
    }

    fn machine(&mut self, o: &Obj<'_, '_>) -> Option<Machine> {
        self.deny_unknown(o, MACHINE_FIELDS);
        let name = self.req(o, "name", "\"web01\"", Self::string);
        let site = self.req(o, "site", "\"primary\"", Self::string);
        let platform = self.opt(o, "platform", Self::string);
        let target_platform = self.opt(o, "target_platform", Self::string);
        let policy = self.req(o, "policy", "\"gold\"", Self::string);
        let failback_policy = self.opt(o, "failback_policy", Self::string);
        let process_server = self.opt(o, "process_server", Self::string);
        let cache_account = self.opt(o, "cache_account", Self::string);
        let master_target = self.req(o, "master_target", "\"mt1\"", Self::string);
        let writer = self.req(o, "writer", "\"vmdk\"", Self::string);
        let disks = self
            .opt(o, "disks", Self::names)
            .map(Option::unwrap_or_default);
        let target = self
            .opt(o, "target", Self::string_map)
            .map(Option::unwrap_or_default);
        Some(Machine {
            name: name?,
            site: site?,
            platform: platform?,
            target_platform: target_platform?,
            policy: policy?,
            failback_policy: failback_policy?,
            process_server: process_server?,
            cache_account: cache_account?,
            master_target: master_target?,
            writer: writer?,
            disks: disks?,
            target: target?,
        })
    }

    fn group(&mut self, o: &Obj<'_, '_>) -> Option<Group> {
        self.deny_unknown(o, GROUP_FIELDS);
        let name = self.req(o, "name", "\"app\"", Self::string);
        let machines = self.req(o, "machines", "[\"web01\", \"db01\"]", Self::names);
        let policy = self.opt(o, "policy", Self::string);
        Some(Group {
            name: name?,
            machines: machines?,
            policy: policy?,
        })
    }

    fn plan(&mut self, o: &Obj<'_, '_>) -> Option<RecoveryPlan> {
        self.deny_unknown(o, PLAN_FIELDS);
        let name = self.req(o, "name", "\"site-failover\"", Self::string);
        let steps = match o.get("step") {
            None => {
                self.r.report(
                    o.span.clone(),
                    o.at("step"),
                    "a plan needs at least one step",
                    "add a `[[plan.step]]` after this `[[plan]]`, e.g. with \
                     `kind = \"failover\"` and `machines = [...]`",
                );
                None
            }
            Some(v) => self.steps(v, &o.at("step")),
        };
        Some(RecoveryPlan {
            name: name?,
            steps: steps?,
        })
    }

    fn steps(&mut self, v: &Val<'_>, path: &str) -> Option<Vec<Step>> {
        self.spans.record(path, v.span());
        let Some(items) = v.get_ref().as_array() else {
            self.r.report(
                v.span(),
                path,
                format!(
                    "expected `[[plan.step]]` entries (an array of tables), found {}",
                    a_type(v.get_ref())
                ),
                "write each step under its own `[[plan.step]]` header, in order",
            );
            return None;
        };
        let steps: Vec<Option<Step>> = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let o = self.obj(item, format!("{path}[{i}]"), "[[plan.step]]".into())?;
                self.step(&o)
            })
            .collect();
        steps.into_iter().collect()
    }

    fn step(&mut self, o: &Obj<'_, '_>) -> Option<Step> {
        #[derive(Clone, Copy)]
        enum Kind {
            Failover,
            Script,
            Manual,
        }
        let kind = self.req(o, "kind", "\"failover\"", |d, v, p| {
            d.choice(
                v,
                p,
                "step kind",
                &[
                    ("failover", Kind::Failover),
                    ("script", Kind::Script),
                    ("manual", Kind::Manual),
                ],
            )
        });
        let Some(kind) = kind else {
            let all: Vec<&str> = FAILOVER_STEP_FIELDS
                .iter()
                .chain(SCRIPT_STEP_FIELDS)
                .chain(MANUAL_STEP_FIELDS)
                .copied()
                .collect();
            self.deny_unknown(o, &all);
            return None;
        };
        match kind {
            Kind::Failover => {
                self.deny_unknown(o, FAILOVER_STEP_FIELDS);
                let machines = self.opt(o, "machines", Self::names);
                let groups = self.opt(o, "groups", Self::names);
                let continue_on_error = self.get_or(o, "continue_on_error", false, Self::boolean);
                Some(Step::Failover(FailoverStep {
                    machines: machines?.unwrap_or_default(),
                    groups: groups?.unwrap_or_default(),
                    continue_on_error: continue_on_error?,
                }))
            }
            Kind::Script => {
                self.deny_unknown(o, SCRIPT_STEP_FIELDS);
                let run = self.req(o, "run", "\"/opt/dr/check-app.sh\"", Self::string);
                let timeout = self.get_or(o, "timeout", default_script_timeout(), Self::duration);
                let continue_on_error = self.get_or(o, "continue_on_error", false, Self::boolean);
                Some(Step::Script(ScriptStep {
                    run: run?,
                    timeout: timeout?,
                    continue_on_error: continue_on_error?,
                }))
            }
            Kind::Manual => {
                self.deny_unknown(o, MANUAL_STEP_FIELDS);
                let message = self.req(o, "message", "\"Check the load balancer\"", Self::string);
                Some(Step::Manual(ManualStep { message: message? }))
            }
        }
    }

    fn webhook(&mut self, o: &Obj<'_, '_>) -> Option<Webhook> {
        self.deny_unknown(o, WEBHOOK_FIELDS);
        let name = self.req(o, "name", "\"ops\"", Self::string);
        let url = self.req(
            o,
            "url",
            "\"https://hooks.example.net/haven\"",
            Self::string,
        );
        let events = self.req(o, "events", "[\"*\"]", |d, v, p| d.list(v, p, Self::string));
        let min_severity = self.get_or(o, "min_severity", default_min_severity(), |d, v, p| {
            d.choice(v, p, "severity", &Severity::ALL.map(|s| (s.name(), s)))
        });
        Some(Webhook {
            name: name?,
            url: url?,
            events: events?,
            min_severity: min_severity?,
        })
    }

    // --- tables and fields ---

    /// `v` as a table at `path`, its span recorded.
    fn obj<'a, 'i>(&mut self, v: &'a Val<'i>, path: String, header: String) -> Option<Obj<'a, 'i>> {
        self.spans.record(&path, v.span());
        let Some(table) = v.get_ref().as_table() else {
            self.r.report(
                v.span(),
                &path,
                format!("expected a table ({header}), found {}", a_type(v.get_ref())),
                format!("write it as a `{header}` section or an inline table `{{ ... }}`"),
            );
            return None;
        };
        Some(Obj {
            table,
            path,
            span: v.span(),
            header,
        })
    }

    /// Reports every key of `o` that is not in `allowed`.
    fn deny_unknown(&mut self, o: &Obj<'_, '_>, allowed: &[&str]) {
        for key in o.table.keys() {
            let name: &str = key.get_ref();
            if allowed.contains(&name) {
                continue;
            }
            let hint = did_you_mean(name, allowed)
                .unwrap_or_else(|| "remove it, or use one of the fields listed".into());
            self.r.report(
                key.span(),
                o.at(name),
                format!(
                    "unknown field `{name}` in {}, expected one of {}",
                    o.header,
                    backticked(allowed)
                ),
                hint,
            );
        }
    }

    /// A required field.
    fn req<T>(
        &mut self,
        o: &Obj<'_, '_>,
        key: &str,
        example: &str,
        f: impl FnOnce(&mut Self, &Val<'_>, &str) -> Option<T>,
    ) -> Option<T> {
        match o.get(key) {
            Some(v) => f(self, v, &o.at(key)),
            None => {
                self.r.report(
                    o.span.clone(),
                    o.at(key),
                    format!("missing required field `{key}` in {}", o.header),
                    format!("add `{key} = {example}` to it"),
                );
                None
            }
        }
    }

    /// An optional field: `Some(None)` when absent, `None` when its value is bad.
    fn opt<T>(
        &mut self,
        o: &Obj<'_, '_>,
        key: &str,
        f: impl FnOnce(&mut Self, &Val<'_>, &str) -> Option<T>,
    ) -> Option<Option<T>> {
        match o.get(key) {
            Some(v) => f(self, v, &o.at(key)).map(Some),
            None => Some(None),
        }
    }

    /// A field with a default.
    fn get_or<T>(
        &mut self,
        o: &Obj<'_, '_>,
        key: &str,
        default: T,
        f: impl FnOnce(&mut Self, &Val<'_>, &str) -> Option<T>,
    ) -> Option<T> {
        self.opt(o, key, f).map(|v| v.unwrap_or(default))
    }

    // --- values ---

    fn string(&mut self, v: &Val<'_>, path: &str) -> Option<String> {
        self.spans.record(path, v.span());
        match v.get_ref().as_str() {
            Some(s) => Some(s.to_string()),
            None => self.type_error(v, path, "string"),
        }
    }

    fn path(&mut self, v: &Val<'_>, path: &str) -> Option<PathBuf> {
        self.string(v, path).map(PathBuf::from)
    }

    fn boolean(&mut self, v: &Val<'_>, path: &str) -> Option<bool> {
        self.spans.record(path, v.span());
        match v.get_ref().as_bool() {
            Some(b) => Some(b),
            None => self.type_error(v, path, "boolean"),
        }
    }

    fn uint(&mut self, v: &Val<'_>, path: &str) -> Option<u64> {
        self.spans.record(path, v.span());
        let Some(i) = v.get_ref().as_integer() else {
            return self.type_error(v, path, "integer");
        };
        match u64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Some(n),
            Err(_) => {
                self.r.report(
                    v.span(),
                    path,
                    format!("{i} is not a whole number from 0 to {}", u64::MAX),
                    "write a whole number that is not negative",
                );
                None
            }
        }
    }

    fn duration(&mut self, v: &Val<'_>, path: &str) -> Option<Duration> {
        let s = self.string(v, path)?;
        match parse_duration(&s) {
            Ok(d) => Some(d),
            Err(e) => {
                let (message, hint) = split_hint(
                    &e,
                    "write a whole number and a unit, e.g. \"30s\" or \"15m\"",
                );
                self.r.report(v.span(), path, message, hint);
                None
            }
        }
    }

    fn interval_or_off(&mut self, v: &Val<'_>, path: &str) -> Option<Option<Duration>> {
        if v.get_ref().as_str() == Some("off") {
            self.spans.record(path, v.span());
            return Some(None);
        }
        self.duration(v, path).map(Some)
    }

    /// A list whose elements are decoded by `f`, each element's span recorded.
    fn list<T>(
        &mut self,
        v: &Val<'_>,
        path: &str,
        f: fn(&mut Self, &Val<'_>, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        self.spans.record(path, v.span());
        let Some(items) = v.get_ref().as_array() else {
            return self.type_error(v, path, "array");
        };
        let items: Vec<Option<T>> = items
            .iter()
            .enumerate()
            .map(|(i, item)| f(self, item, &format!("{path}[{i}]")))
            .collect();
        items.into_iter().collect()
    }

    /// A non-empty list of strings (an empty one would read as "none", but the field left out
    /// means "all" or is missing).
    fn names(&mut self, v: &Val<'_>, path: &str) -> Option<Vec<String>> {
        let list = self.list(v, path, Self::string)?;
        if list.is_empty() {
            let key = path.rsplit('.').next().unwrap_or(path);
            let hint = match key {
                "gateways" => "name at least one gateway, or leave `gateways` out to load the \
                               plugin on every gateway"
                    .to_string(),
                "disks" => "name at least one disk, or leave `disks` out to protect every disk \
                            found"
                    .to_string(),
                _ if path.contains(".step[") => format!("name at least one, or leave `{key}` out"),
                _ => format!("a group has 1 to {MAX_GROUP_MACHINES} machines: name at least one"),
            };
            self.r
                .report(v.span(), path, format!("`{key}` is empty"), hint);
            return None;
        }
        Some(list)
    }

    /// A table of string values (`settings`, `target`).
    fn string_map(&mut self, v: &Val<'_>, path: &str) -> Option<BTreeMap<String, String>> {
        self.spans.record(path, v.span());
        let Some(table) = v.get_ref().as_table() else {
            return self.type_error(v, path, "table");
        };
        let mut map = BTreeMap::new();
        let mut ok = true;
        for (key, value) in table.iter() {
            let at = join(path, &key_segment(key.get_ref()));
            match self.string(value, &at) {
                Some(s) => {
                    map.insert(key.get_ref().to_string(), s);
                }
                None => ok = false,
            }
        }
        ok.then_some(map)
    }

    /// A string that must be one of `options`.
    fn choice<T: Copy>(
        &mut self,
        v: &Val<'_>,
        path: &str,
        what: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        let s = self.string(v, path)?;
        if let Some(&(_, t)) = options.iter().find(|(name, _)| *name == s) {
            return Some(t);
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.r.report(
            v.span(),
            path,
            format!(
                "unknown {what} `{s}`, expected one of {}",
                backticked(&names)
            ),
            did_you_mean(&s, &names).unwrap_or_else(|| "use one of the values listed".into()),
        );
        None
    }

    fn type_error<T>(&mut self, v: &Val<'_>, path: &str, expected: &str) -> Option<T> {
        let hint = match expected {
            "string" => "write the value in quotes, e.g. \"web01\"",
            "integer" => "write a whole number without quotes",
            "boolean" => "write true or false without quotes",
            "array" => "write a list in brackets, e.g. [\"a\", \"b\"]",
            _ => "write a table of keys and values, e.g. { key = \"value\" }",
        };
        self.r.report(
            v.span(),
            path,
            format!(
                "expected {} {expected}, found {}",
                article(expected),
                a_type(v.get_ref())
            ),
            hint,
        );
        None
    }

    /// Records the span of `v` and of everything below it.
    fn record_tree(&mut self, v: &Val<'_>, path: &str) {
        self.spans.record(path, v.span());
        match v.get_ref() {
            DeValue::Table(t) => {
                for (k, v) in t.iter() {
                    self.record_tree(v, &join(path, &key_segment(k.get_ref())));
                }
            }
            DeValue::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    self.record_tree(v, &format!("{path}[{i}]"));
                }
            }
            _ => {}
        }
    }

    /// Reports at the recorded span of `path`.
    fn at(&mut self, path: &str, message: impl Into<String>, hint: impl Into<String>) {
        let span = self.spans.get(path);
        self.r.report(span, path, message, hint);
    }
}

const RETENTION_FIELDS: &[&str] = &[
    "window",
    "tiers",
    "prefer_app_consistent",
    "for_last",
    "every",
];

/// The path of the innermost value below `v` whose span (or key's span) contains `span`.
fn path_at(v: &Val<'_>, path: &str, span: &Range<usize>) -> String {
    let inside = |s: Range<usize>| s.start <= span.start && span.end <= s.end.max(s.start + 1);
    match v.get_ref() {
        DeValue::Table(t) => {
            for (k, child) in t.iter() {
                let at = join(path, &key_segment(k.get_ref()));
                if inside(k.span()) {
                    return at;
                }
                if inside(child.span()) {
                    return path_at(child, &at, span);
                }
            }
        }
        DeValue::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                if inside(child.span()) {
                    return path_at(child, &format!("{path}[{i}]"), span);
                }
            }
        }
        _ => {}
    }
    path.to_string()
}

/// A key as a path segment: bare when it is a plain word, else quoted.
pub(crate) fn key_segment(key: &str) -> String {
    if is_bare_key(key) {
        key.to_string()
    } else {
        crate::render::quote(key)
    }
}

/// Whether `key` can be written without quotes in TOML.
pub(crate) fn is_bare_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `a` or `an` before a word.
pub(crate) fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// "a string", "an integer"…
fn a_type(v: &DeValue<'_>) -> String {
    let t = v.type_str();
    format!("{} {t}", article(t))
}

/// `` `a`, `b`, `c` ``.
pub(crate) fn backticked(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first `` `word` `` of a message.
fn backtick_quoted(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

/// `"message; hint"` split at the first `"; "`, else `default` as the hint.
pub(crate) fn split_hint(message: &str, default: &str) -> (String, String) {
    match message.split_once("; ") {
        Some((m, h)) => (m.to_string(), h.to_string()),
        None => (message.to_string(), default.to_string()),
    }
}

/// "did you mean `x`?" when one of `candidates` is close to `word`.
pub(crate) fn did_you_mean(word: &str, candidates: &[&str]) -> Option<String> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|&(d, _)| d <= limit)
        .min()
        .map(|(_, c)| format!("did you mean `{c}`?"))
}

/// Levenshtein distance, case-insensitive.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            let next = (prev + cost).min(row[j] + 1).min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_walk_up_the_path() {
        assert_eq!(
            parent("plan[0].step[1].machines[0]"),
            Some("plan[0].step[1].machines")
        );
        assert_eq!(parent("plan[0].step[1].machines"), Some("plan[0].step[1]"));
        assert_eq!(parent("plan[0].step[1]"), Some("plan[0].step"));
        assert_eq!(parent("plan[0]"), Some("plan"));
        assert_eq!(parent("plan"), None);
    }

    #[test]
    fn close_names_are_suggested() {
        assert_eq!(
            did_you_mean("polcy", MACHINE_FIELDS).as_deref(),
            Some("did you mean `policy`?")
        );
        assert_eq!(did_you_mean("colour", MACHINE_FIELDS), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
