//! The semantic checks: names, references, roles, minimums. See the crate documentation for the
//! rules; each diagnostic points at the value that breaks one.
//!
//! The checks run on whatever decoded: a resource that failed to decode is skipped, and a
//! reference to it counts as resolved (its own diagnostics say what is wrong), so one mistake
//! is reported once.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use haven_engine::retention::format_duration;

use crate::decode::{
    Decoded, Entry, Spans, article, backticked, did_you_mean, key_segment, split_hint,
};
use crate::diagnostics::Reporter;
use crate::model::*;

/// Longest a plugin call may be allowed to run, in milliseconds (an hour).
const MAX_CALL_TIMEOUT_MS: u64 = 3_600_000;

/// Shortest and longest script step timeouts.
const MIN_SCRIPT_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_SCRIPT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Runs every semantic check on `d`.
pub(crate) fn check(d: &Decoded, spans: &Spans, r: &mut Reporter<'_>) {
    let mut c = Checker {
        d,
        spans,
        r,
        names: HashMap::new(),
    };
    c.all();
}

/// How a reference resolved.
enum Lookup<'a, T> {
    /// To this entry.
    Found(&'a T),
    /// To an entry that did not decode (already reported).
    Broken,
    /// To nothing (reported).
    Missing,
}

impl<'a, T> Lookup<'a, T> {
    fn found(self) -> Option<&'a T> {
        match self {
            Lookup::Found(t) => Some(t),
            _ => None,
        }
    }
}

struct Checker<'a, 's> {
    d: &'a Decoded,
    spans: &'a Spans,
    r: &'a mut Reporter<'s>,
    /// Per kind (`"machine"`), each name's first index in the file.
    names: HashMap<&'static str, HashMap<&'a str, usize>>,
}

/// The decoded entries with their index in the file.
fn decoded<T>(entries: &[Entry<T>]) -> impl Iterator<Item = (usize, &T)> {
    entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.value.as_ref().map(|v| (i, v)))
}

impl<'a> Checker<'a, '_> {
    fn all(&mut self) {
        let d = self.d;
        if let Some(dep) = &d.deployment {
            self.name_syntax(&dep.name, "deployment.name");
        }
        self.names("site", &d.sites);
        self.names("gateway", &d.gateways);
        self.names("plugin", &d.plugins);
        self.names("policy", &d.policies);
        self.names("network_mapping", &d.network_mappings);
        self.names("cache_account", &d.cache_accounts);
        self.names("machine", &d.machines);
        self.names("group", &d.groups);
        self.names("plan", &d.plans);
        self.names("webhook", &d.webhooks);
        self.gateways();
        self.plugins();
        self.policies();
        self.network_mappings();
        self.cache_accounts();
        self.machines();
        self.groups();
        self.plans();
        self.webhooks();
    }

    fn at(&mut self, path: &str, message: impl Into<String>, hint: impl Into<String>) {
        let span = self.spans.get(path);
        self.r.report(span, path, message, hint);
    }

    // --- names and references ---

    fn name_syntax(&mut self, name: &str, path: &str) -> bool {
        if let Err(why) = check_name(name) {
            self.at(
                path,
                format!("`{name}` is not a valid name: {why}"),
                "use 1 to 63 letters, digits, `.`, `_` or `-`, starting with a letter or digit",
            );
            return false;
        }
        true
    }

    /// Checks the names of one kind's entries and indexes them.
    fn names<T>(&mut self, kind: &'static str, entries: &'a [Entry<T>]) {
        let mut first: HashMap<&'a str, usize> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            let Some(name) = e.name.as_deref() else {
                continue;
            };
            let path = format!("{kind}[{i}].name");
            self.name_syntax(name, &path);
            if let Some(&j) = first.get(name) {
                let (line, _) = self
                    .r
                    .position(self.spans.get(&format!("{kind}[{j}]")).start);
                self.at(
                    &path,
                    format!("duplicate {kind} name `{name}`, also {kind}[{j}] at line {line}"),
                    format!("names are unique among `[[{kind}]]` entries: rename one"),
                );
            } else {
                first.insert(name, i);
            }
        }
        self.names.insert(kind, first);
    }

    /// Resolves a reference to a `kind` entry named `name`, reporting an unknown name at
    /// `path`.
    fn resolve<T>(
        &mut self,
        kind: &'static str,
        entries: &'a [Entry<T>],
        name: &str,
        path: &str,
    ) -> Lookup<'a, T> {
        let index = self.names.get(kind).and_then(|n| n.get(name)).copied();
        match index {
            Some(i) => match &entries[i].value {
                Some(v) => Lookup::Found(v),
                None => Lookup::Broken,
            },
            None => {
                let known: Vec<&str> = {
                    let mut v: Vec<&str> = self
                        .names
                        .get(kind)
                        .map(|n| n.keys().copied().collect())
                        .unwrap_or_default();
                    v.sort_unstable();
                    v
                };
                let hint = match did_you_mean(name, &known) {
                    Some(h) => h,
                    None if known.is_empty() => {
                        format!("add a `[[{kind}]]` named `{name}`")
                    }
                    None => format!(
                        "name one of {}, or add a `[[{kind}]]` named `{name}`",
                        backticked(&known[..known.len().min(8)])
                    ),
                };
                self.at(path, format!("unknown {kind} `{name}`"), hint);
                Lookup::Missing
            }
        }
    }

    fn site(&mut self, name: &str, path: &str) -> Lookup<'a, Site> {
        self.resolve("site", &self.d.sites, name, path)
    }

    fn gateway(&mut self, name: &str, path: &str) -> Lookup<'a, Gateway> {
        self.resolve("gateway", &self.d.gateways, name, path)
    }

    fn plugin(&mut self, name: &str, path: &str) -> Lookup<'a, Plugin> {
        self.resolve("plugin", &self.d.plugins, name, path)
    }

    fn machine(&mut self, name: &str, path: &str) -> Lookup<'a, Machine> {
        self.resolve("machine", &self.d.machines, name, path)
    }

    /// A reference to a plugin of `kind`.
    fn plugin_of_kind(&mut self, name: &str, path: &str, kind: PluginKind) -> Option<&'a Plugin> {
        let plugin = self.plugin(name, path).found()?;
        if plugin.kind != kind {
            self.at(
                path,
                format!(
                    "plugin `{name}` is {} {}",
                    article(plugin.kind.name()),
                    plugin.kind
                ),
                format!("name {} {kind} plugin", article(kind.name())),
            );
            return None;
        }
        Some(plugin)
    }

    /// A reference to a replication policy.
    fn replication_policy(&mut self, name: &str, path: &str) {
        if let Lookup::Found(Policy::Failback(_)) =
            self.resolve("policy", &self.d.policies, name, path)
        {
            self.at(
                path,
                format!("policy `{name}` is a failback policy"),
                "name a policy with `kind = \"replication\"`",
            );
        }
    }

    /// Checks that `plugin` is loaded on the gateway `gateway`.
    fn runs_on(&mut self, plugin: &Plugin, gateway: &str, path: &str, why: &str) {
        if plugin.gateways.is_empty() || plugin.gateways.iter().any(|g| g == gateway) {
            return;
        }
        self.at(
            path,
            format!(
                "plugin `{}` is not loaded on gateway `{gateway}`, {why}",
                plugin.name
            ),
            format!(
                "add `{gateway}` to that plugin's `gateways`, or leave `gateways` out to load it \
                 everywhere"
            ),
        );
    }

    // --- resources ---

    fn gateways(&mut self) {
        let d = self.d;
        let mut addresses: HashMap<&str, usize> = HashMap::new();
        let mut config_server: Option<usize> = None;
        for (i, g) in decoded(&d.gateways) {
            let p = format!("gateway[{i}]");
            self.site(&g.site, &format!("{p}.site"));
            if g.roles.is_empty() {
                self.at(
                    &format!("{p}.roles"),
                    "`roles` is empty",
                    format!(
                        "give it at least one of {}",
                        backticked(&Role::ALL.map(Role::name))
                    ),
                );
            }
            if g.roles.contains(&Role::ConfigServer) {
                if let Some(j) = config_server {
                    let name = d.gateways[j].name.as_deref().unwrap_or("?");
                    self.at(
                        &format!("{p}.roles"),
                        format!(
                            "gateway `{name}` (gateway[{j}]) already has the config-server role"
                        ),
                        "a deployment has one configuration server: remove the role from one",
                    );
                } else {
                    config_server = Some(i);
                }
            }
            let replicating = g
                .roles
                .iter()
                .find(|r| matches!(r, Role::ProcessServer | Role::MasterTarget));
            match (&g.address, replicating) {
                (None, Some(role)) => self.at(
                    &p,
                    format!("gateway `{}` has the {role} role but no `address`", g.name),
                    "add `address = \"host:port\"`, the UDP address its peers send replication to",
                ),
                (Some(addr), _) => {
                    let path = format!("{p}.address");
                    if let Err(why) = check_host_port(addr, true) {
                        self.at(
                            &path,
                            format!("address `{addr}` {why}"),
                            "write host:port, e.g. \"ps1.example.net:9443\" or \"[2001:db8::1]:9443\"",
                        );
                    } else if let Some(&j) = addresses.get(addr.as_str()) {
                        self.at(
                            &path,
                            format!("address `{addr}` is also gateway[{j}]'s"),
                            "give each gateway its own address",
                        );
                    } else {
                        addresses.insert(addr, i);
                    }
                }
                (None, None) => {}
            }
            // Plain HTTP only on loopback, as the gateway serves it.
            let schemes: &[&str] = match &g.api {
                Some(api) if is_loopback_url(api) => &["http", "https"],
                _ => &["https"],
            };
            if let Some(api) = &g.api
                && let Err(why) = check_url(api, schemes)
            {
                self.at(
                    &format!("{p}.api"),
                    format!("api `{api}` {why}"),
                    "write the API's URL, e.g. \"https://ps1.example.net:9480\" (plain \
                     http:// on a loopback address only)",
                );
            }
        }
    }

    fn plugins(&mut self) {
        let d = self.d;
        for (i, plugin) in decoded(&d.plugins) {
            let p = format!("plugin[{i}]");
            let path = &plugin.path;
            if !path.is_absolute() {
                self.at(
                    &format!("{p}.path"),
                    format!("path `{}` is relative", path.display()),
                    "write the absolute path of the component on the gateways, e.g. \
                     \"/opt/haven/plugins/haven_vmdk.wasm\"",
                );
            } else if path.extension().is_none_or(|e| e != "wasm") {
                self.at(
                    &format!("{p}.path"),
                    format!(
                        "path `{}` does not name a `.wasm` component",
                        path.display()
                    ),
                    "name the plugin's component file, which ends in `.wasm`",
                );
            }
            let mut seen = BTreeSet::new();
            for (j, g) in plugin.gateways.iter().enumerate() {
                let at = format!("{p}.gateways[{j}]");
                if !seen.insert(g.as_str()) {
                    self.at(
                        &at,
                        format!("gateway `{g}` is listed twice"),
                        "list it once",
                    );
                    continue;
                }
                self.gateway(g, &at);
            }
            self.grants(&plugin.grants, &format!("{p}.grants"));
            for (key, value) in &plugin.settings {
                self.setting(key, value, &format!("{p}.settings"));
            }
        }
    }

    fn grants(&mut self, g: &Grants, p: &str) {
        if let Some(root) = &g.storage_root
            && !root.is_absolute()
        {
            self.at(
                &format!("{p}.storage_root"),
                format!("storage_root `{}` is relative", root.display()),
                "write the absolute path of the folder on the gateways",
            );
        }
        if g.storage_read_only && g.storage_root.is_none() {
            self.at(
                &format!("{p}.storage_read_only"),
                "storage_read_only without storage_root",
                "add `storage_root`, the folder it may read, or remove storage_read_only",
            );
        }
        let mut seen = BTreeSet::new();
        for (j, host) in g.http_hosts.iter().enumerate() {
            let at = format!("{p}.http_hosts[{j}]");
            if let Err(why) = check_host_port(host, false) {
                let hint = if host.contains("://") {
                    "write the host name only, e.g. \"vcenter.example.net\" or \
                     \"vcenter.example.net:443\""
                } else {
                    "write \"host\" (any port) or \"host:port\""
                };
                self.at(&at, format!("http host `{host}` {why}"), hint);
            } else if !seen.insert(host.as_str()) {
                self.at(
                    &at,
                    format!("http host `{host}` is listed twice"),
                    "list it once",
                );
            }
        }
        if !(1..=MAX_MEMORY_MIB).contains(&g.memory_mib) {
            self.at(
                &format!("{p}.memory_mib"),
                format!("memory_mib {} is out of range", g.memory_mib),
                format!("grant from 1 to {MAX_MEMORY_MIB} MiB"),
            );
        }
        if !(1..=MAX_CALL_TIMEOUT_MS).contains(&g.call_timeout_ms) {
            self.at(
                &format!("{p}.call_timeout_ms"),
                format!("call_timeout_ms {} is out of range", g.call_timeout_ms),
                format!("allow from 1 to {MAX_CALL_TIMEOUT_MS} ms (an hour)"),
            );
        }
    }

    /// One entry of a `settings` or `target` table.
    fn setting(&mut self, key: &str, value: &str, table: &str) {
        let at = format!("{table}.{}", key_segment(key));
        if let Err(why) = check_name(key) {
            self.at(
                &at,
                format!("setting name `{key}` is not valid: {why}"),
                "use letters, digits, `.`, `_` or `-`, starting with a letter or digit",
            );
        }
        match value.strip_prefix("secret:") {
            Some(secret) => {
                if let Err(why) = check_name(secret) {
                    self.at(
                        &at,
                        format!("`{value}` does not name a secret: {why}"),
                        "write `secret:NAME`, NAME being a secret held by the configuration server",
                    );
                }
            }
            None if looks_secret(key) => self.at(
                &at,
                format!("`{key}` holds a secret written in the file"),
                format!(
                    "store it as a secret of the configuration server and write \
                     `{key} = \"secret:NAME\"`"
                ),
            ),
            None => {}
        }
    }

    fn policies(&mut self) {
        let d = self.d;
        for (i, policy) in decoded(&d.policies) {
            let Policy::Replication(rp) = policy else {
                continue;
            };
            let p = format!("policy[{i}]");
            let f = format_duration;
            let crash = rp.crash_consistent_interval;
            if crash < MIN_CRASH_CONSISTENT_INTERVAL {
                self.at(
                    &format!("{p}.crash_consistent_interval"),
                    format!(
                        "crash_consistent_interval {} is below the agent's minimum, {}",
                        f(crash),
                        f(MIN_CRASH_CONSISTENT_INTERVAL)
                    ),
                    format!("write at least \"{}\"", f(MIN_CRASH_CONSISTENT_INTERVAL)),
                );
            }
            if rp.process_server_grace < crate::model::MIN_PROCESS_SERVER_GRACE {
                self.at(
                    &format!("{p}.process_server_grace"),
                    format!(
                        "process_server_grace {} is shorter than the {} after which a process \
                         server is taken for gone",
                        f(rp.process_server_grace),
                        f(crate::model::MIN_PROCESS_SERVER_GRACE)
                    ),
                    format!(
                        "write at least \"{}\"",
                        f(crate::model::MIN_PROCESS_SERVER_GRACE)
                    ),
                );
            }
            if crash >= MIN_CRASH_CONSISTENT_INTERVAL && crash > rp.rpo_threshold {
                self.at(
                    &format!("{p}.crash_consistent_interval"),
                    format!(
                        "crash_consistent_interval {} is longer than rpo_threshold {}: the RPO \
                         alert would be raised between every two points",
                        f(crash),
                        f(rp.rpo_threshold)
                    ),
                    "shorten crash_consistent_interval or raise rpo_threshold",
                );
            }
            if let Some(app) = rp.app_consistent_interval {
                let at = format!("{p}.app_consistent_interval");
                let window = rp.retention.window;
                if app < MIN_APP_CONSISTENT_INTERVAL {
                    self.at(
                        &at,
                        format!(
                            "app_consistent_interval {} is below the minimum, {}",
                            f(app),
                            f(MIN_APP_CONSISTENT_INTERVAL)
                        ),
                        format!(
                            "write at least \"{}\", or \"off\"",
                            f(MIN_APP_CONSISTENT_INTERVAL)
                        ),
                    );
                } else if window.is_zero() {
                    self.at(
                        &at,
                        "app-consistent points are taken but retention keeps no points \
                         (window 0s)",
                        "write app_consistent_interval = \"off\", or give retention a window",
                    );
                } else if app > window {
                    self.at(
                        &at,
                        format!(
                            "app_consistent_interval {} is longer than the retention window {}: \
                             at times no app-consistent point would be kept",
                            f(app),
                            f(window)
                        ),
                        "shorten app_consistent_interval or lengthen retention.window",
                    );
                }
            }
            if let Err(errors) = rp.retention.validate() {
                for line in errors.lines() {
                    let field = line
                        .split([' ', ':'])
                        .next()
                        .map(|f| format!("{p}.retention.{f}"))
                        .filter(|f| self.spans.has(f))
                        .unwrap_or_else(|| format!("{p}.retention"));
                    let (message, hint) = split_colon_hint(line);
                    self.at(&field, message, hint);
                }
            }
        }
    }

    fn network_mappings(&mut self) {
        let d = self.d;
        let mut mapped: HashMap<(&str, &str, &str), usize> = HashMap::new();
        for (i, m) in decoded(&d.network_mappings) {
            let p = format!("network_mapping[{i}]");
            self.site(&m.source_site, &format!("{p}.source_site"));
            self.site(&m.target_site, &format!("{p}.target_site"));
            if m.source_site == m.target_site {
                self.at(
                    &format!("{p}.target_site"),
                    format!("source and target site are both `{}`", m.source_site),
                    "map a network of the source site to one of the site replicas run at",
                );
            }
            for (key, value) in [
                ("source_network", &m.source_network),
                ("target_network", &m.target_network),
                ("test_network", &m.test_network),
            ] {
                if value.trim().is_empty() {
                    self.at(
                        &format!("{p}.{key}"),
                        format!("`{key}` is empty"),
                        "name the network as its platform does",
                    );
                }
            }
            if m.test_network == m.target_network {
                self.at(
                    &format!("{p}.test_network"),
                    format!(
                        "test_network `{}` is the target network; a test failover would put \
                         copies of production machines on it",
                        m.test_network
                    ),
                    "name an isolated network for test failovers",
                );
            }
            let key = (
                m.source_site.as_str(),
                m.target_site.as_str(),
                m.source_network.as_str(),
            );
            if let Some(&j) = mapped.get(&key) {
                self.at(
                    &format!("{p}.source_network"),
                    format!(
                        "network `{}` of site `{}` is already mapped to site `{}` by \
                         network_mapping[{j}]",
                        m.source_network, m.source_site, m.target_site
                    ),
                    "map each source network once per target site",
                );
            } else {
                mapped.insert(key, i);
            }
        }
    }

    fn machines(&mut self) {
        let d = self.d;
        let all_gateways_decoded = d.gateways.iter().all(|g| g.value.is_some());
        for (i, m) in decoded(&d.machines) {
            let p = format!("machine[{i}]");
            let site_ok = matches!(self.site(&m.site, &format!("{p}.site")), Lookup::Found(_));

            self.replication_policy(&m.policy, &format!("{p}.policy"));
            if let Some(fb) = &m.failback_policy {
                let at = format!("{p}.failback_policy");
                if let Lookup::Found(Policy::Replication(_)) =
                    self.resolve("policy", &d.policies, fb, &at)
                {
                    self.at(
                        &at,
                        format!("policy `{fb}` is a replication policy"),
                        "name a policy with `kind = \"failback\"`",
                    );
                }
            }

            // The process servers that may serve the machine (drain its cache account).
            let mut process_servers: Vec<&Gateway> = Vec::new();
            match (&m.process_server, &m.cache_account) {
                (Some(_), Some(_)) => self.at(
                    &format!("{p}.cache_account"),
                    "a machine ships to a process server or to a cache account, not both",
                    "remove `process_server` (the account's `drained_by` gateways forward its \
                     changes) or `cache_account`",
                ),
                (None, Some(name)) => {
                    let at = format!("{p}.cache_account");
                    if let Some(c) = self
                        .resolve("cache_account", &d.cache_accounts, name, &at)
                        .found()
                    {
                        if c.site != m.site {
                            self.at(
                                &at,
                                format!(
                                    "cache account `{name}` is for site `{}`, the machine is at `{}`",
                                    c.site, m.site
                                ),
                                "name the cache account of the machine's site",
                            );
                        }
                        process_servers = decoded(&d.gateways)
                            .map(|(_, g)| g)
                            .filter(|g| c.drained_by.contains(&g.name))
                            .collect();
                    }
                }
                (Some(ps), None) => {
                    let at = format!("{p}.process_server");
                    if let Some(g) = self.gateway(ps, &at).found() {
                        if !g.roles.contains(&Role::ProcessServer) {
                            self.at(
                                &at,
                                format!(
                                    "gateway `{ps}` does not have the process-server role (its \
                                     roles: {})",
                                    roles_text(&g.roles)
                                ),
                                format!(
                                    "name a gateway with the process-server role at site `{}`",
                                    m.site
                                ),
                            );
                        } else if g.site != m.site {
                            self.at(
                                &at,
                                format!(
                                    "process server `{ps}` is at site `{}`, the machine at `{}`",
                                    g.site, m.site
                                ),
                                "name a process server at the machine's site",
                            );
                        } else {
                            process_servers.push(g);
                        }
                    }
                }
                (None, None) => {
                    process_servers = decoded(&d.gateways)
                        .map(|(_, g)| g)
                        .filter(|g| g.site == m.site && g.roles.contains(&Role::ProcessServer))
                        .collect();
                    if process_servers.is_empty() && site_ok && all_gateways_decoded {
                        self.at(
                            &format!("{p}.site"),
                            format!(
                                "no gateway at site `{}` has the process-server role",
                                m.site
                            ),
                            "add the process-server role to a gateway at that site",
                        );
                    }
                }
            }

            let at = format!("{p}.master_target");
            let mut master_target = None;
            if let Some(g) = self.gateway(&m.master_target, &at).found() {
                if !g.roles.contains(&Role::MasterTarget) {
                    self.at(
                        &at,
                        format!(
                            "gateway `{}` does not have the master-target role (its roles: {})",
                            g.name,
                            roles_text(&g.roles)
                        ),
                        "name a gateway with the master-target role at another site",
                    );
                } else if g.site == m.site {
                    self.at(
                        &at,
                        format!(
                            "master target `{}` is at the machine's own site, `{}`",
                            g.name, m.site
                        ),
                        "name a master target at another site, where replicas survive the loss \
                         of this one",
                    );
                } else {
                    master_target = Some(g);
                }
            }

            if let Some(name) = &m.platform {
                let at = format!("{p}.platform");
                if let Some(plugin) = self.plugin_of_kind(name, &at, PluginKind::Adapter) {
                    for ps in &process_servers {
                        self.runs_on(plugin, &ps.name, &at, "a process server of the machine");
                    }
                }
            }
            let at = format!("{p}.writer");
            if let Some(plugin) = self.plugin_of_kind(&m.writer, &at, PluginKind::TargetWriter)
                && let Some(mt) = master_target
            {
                self.runs_on(plugin, &mt.name, &at, "the machine's master target");
            }
            if let Some(name) = &m.target_platform {
                let at = format!("{p}.target_platform");
                if let Some(plugin) = self.plugin_of_kind(name, &at, PluginKind::Adapter)
                    && let Some(mt) = master_target
                {
                    self.runs_on(plugin, &mt.name, &at, "the machine's master target");
                }
            } else if !m.target.is_empty() {
                self.at(
                    &format!("{p}.target"),
                    "`target` settings without a `target_platform` to apply them",
                    "add `target_platform`, the adapter that defines the replica machine, or \
                     remove `target`",
                );
            }

            let mut seen = BTreeSet::new();
            for (j, disk) in m.disks.iter().enumerate() {
                let at = format!("{p}.disks[{j}]");
                if disk.trim().is_empty() {
                    self.at(&at, "empty disk selector", "write a disk's path or id");
                } else if !seen.insert(disk.as_str()) {
                    self.at(
                        &at,
                        format!("disk `{disk}` is listed twice"),
                        "list it once",
                    );
                }
            }
            for (key, value) in &m.target {
                self.setting(key, value, &format!("{p}.target"));
            }
        }
    }

    fn groups(&mut self) {
        let d = self.d;
        // Machine → the group (index) that has it.
        let mut member_of: HashMap<&str, usize> = HashMap::new();
        for (i, g) in decoded(&d.groups) {
            let p = format!("group[{i}]");
            if g.machines.len() > MAX_GROUP_MACHINES {
                self.at(
                    &format!("{p}.machines[{MAX_GROUP_MACHINES}]"),
                    format!(
                        "the group has {} machines, more than {MAX_GROUP_MACHINES}",
                        g.machines.len()
                    ),
                    "split it into groups of at most 64 machines",
                );
            }
            let mut first: Option<&Machine> = None;
            let mut seen = BTreeSet::new();
            for (j, name) in g.machines.iter().enumerate() {
                let at = format!("{p}.machines[{j}]");
                if !seen.insert(name.as_str()) {
                    self.at(
                        &at,
                        format!("machine `{name}` is listed twice"),
                        "list it once",
                    );
                    continue;
                }
                if let Some(&k) = member_of.get(name.as_str()) {
                    let other = d.groups[k].name.as_deref().unwrap_or("?");
                    self.at(
                        &at,
                        format!("machine `{name}` is already in group `{other}` (group[{k}])"),
                        "a machine belongs to at most one group: remove it from one",
                    );
                    continue;
                }
                member_of.insert(name, i);
                let Some(m) = self.machine(name, &at).found() else {
                    continue;
                };
                match first {
                    None => first = Some(m),
                    Some(f) if f.site != m.site => self.at(
                        &at,
                        format!(
                            "machine `{name}` is at site `{}`, `{}` at site `{}`",
                            m.site, f.name, f.site
                        ),
                        "a group's members run at one site: move it to another group",
                    ),
                    Some(f) if f.master_target != m.master_target => self.at(
                        &at,
                        format!(
                            "machine `{name}` replicates to `{}`, `{}` to `{}`",
                            m.master_target, f.name, f.master_target
                        ),
                        "a group's points are taken at one master target: give its members the \
                         same master_target",
                    ),
                    Some(_) => {}
                }
            }
            if let Some(policy) = &g.policy {
                self.replication_policy(policy, &format!("{p}.policy"));
            }
        }
    }

    fn plans(&mut self) {
        let d = self.d;
        for (i, plan) in decoded(&d.plans) {
            let p = format!("plan[{i}]");
            // Machine → the step that fails it over, and through which group.
            let mut failed_over: HashMap<String, (usize, Option<String>)> = HashMap::new();
            for (j, step) in plan.steps.iter().enumerate() {
                let sp = format!("{p}.step[{j}]");
                match step {
                    Step::Failover(f) => {
                        if f.machines.is_empty() && f.groups.is_empty() {
                            self.at(
                                &sp,
                                "a failover step names no machine and no group",
                                "add `machines = [...]` or `groups = [...]`",
                            );
                        }
                        for (k, name) in f.machines.iter().enumerate() {
                            let at = format!("{sp}.machines[{k}]");
                            if self.machine(name, &at).found().is_some() {
                                self.once(&mut failed_over, name, j, None, &at);
                            }
                        }
                        for (k, name) in f.groups.iter().enumerate() {
                            let at = format!("{sp}.groups[{k}]");
                            let group = self.resolve("group", &d.groups, name, &at).found();
                            for member in group.map(|g| g.machines.as_slice()).unwrap_or_default() {
                                self.once(&mut failed_over, member, j, Some(name), &at);
                            }
                        }
                    }
                    Step::Script(s) => {
                        if s.run.trim().is_empty() {
                            self.at(
                                &format!("{sp}.run"),
                                "`run` is empty",
                                "write the command line to run",
                            );
                        }
                        if !(MIN_SCRIPT_TIMEOUT..=MAX_SCRIPT_TIMEOUT).contains(&s.timeout) {
                            self.at(
                                &format!("{sp}.timeout"),
                                format!("timeout {} is out of range", format_duration(s.timeout)),
                                "allow from \"1s\" to \"24h\"",
                            );
                        }
                    }
                    Step::Manual(m) => {
                        if m.message.trim().is_empty() {
                            self.at(
                                &format!("{sp}.message"),
                                "`message` is empty",
                                "tell the operator what to do before resuming the plan",
                            );
                        }
                    }
                }
            }
        }
    }

    /// Records that step `step` fails `machine` over, reporting a second time at `path`.
    fn once(
        &mut self,
        failed_over: &mut HashMap<String, (usize, Option<String>)>,
        machine: &str,
        step: usize,
        group: Option<&str>,
        path: &str,
    ) {
        if let Some((earlier, via)) = failed_over.get(machine) {
            let via = via
                .as_deref()
                .map(|g| format!(" (in group `{g}`)"))
                .unwrap_or_default();
            let this = group
                .map(|g| format!(" (in group `{g}`)"))
                .unwrap_or_default();
            self.at(
                path,
                format!("machine `{machine}`{this} already fails over in step[{earlier}]{via}"),
                "a plan fails each machine over once: remove it from one step",
            );
        } else {
            failed_over.insert(machine.to_string(), (step, group.map(str::to_string)));
        }
    }

    fn cache_accounts(&mut self) {
        let d = self.d;
        for (i, c) in decoded(&d.cache_accounts) {
            let p = format!("cache_account[{i}]");
            self.site(&c.site, &format!("{p}.site"));
            let container = c
                .container_url
                .split_once("://")
                .map(|(_, rest)| rest.split('?').next().unwrap_or(rest))
                .and_then(|rest| rest.trim_end_matches('/').split_once('/'))
                .is_some_and(|(host, path)| !host.is_empty() && !path.is_empty());
            if let Err(why) = check_url(&c.container_url, &["http", "https"]) {
                self.at(
                    &format!("{p}.container_url"),
                    format!("container_url `{}` {why}", c.container_url),
                    "write the container's URL, e.g. \"https://ACCOUNT.blob.core.windows.net/haven-cache\"",
                );
            } else if !container || c.container_url.contains('?') {
                self.at(
                    &format!("{p}.container_url"),
                    format!(
                        "container_url `{}` does not name a container, or carries a token",
                        c.container_url
                    ),
                    "write https://ACCOUNT.blob.core.windows.net/CONTAINER; credentials stay in \
                     the gateways' [process_server.drain] and the agents' options",
                );
            }
            if c.drained_by.is_empty() {
                self.at(
                    &format!("{p}.drained_by"),
                    "`drained_by` is empty: nothing would forward the account's changes",
                    "name the gateways with the process-server role that drain it",
                );
            }
            for (j, name) in c.drained_by.iter().enumerate() {
                let at = format!("{p}.drained_by[{j}]");
                if let Some(g) = self.gateway(name, &at).found()
                    && !g.roles.contains(&Role::ProcessServer)
                {
                    self.at(
                        &at,
                        format!(
                            "gateway `{name}` does not have the process-server role (its roles: {})",
                            roles_text(&g.roles)
                        ),
                        "name gateways with the process-server role (and [process_server.drain] \
                         in their configuration)",
                    );
                }
            }
        }
    }

    fn webhooks(&mut self) {
        let d = self.d;
        for (i, w) in decoded(&d.webhooks) {
            let p = format!("webhook[{i}]");
            if let Err(why) = check_url(&w.url, &["http", "https"]) {
                self.at(
                    &format!("{p}.url"),
                    format!("url `{}` {why}", w.url),
                    "write an http:// or https:// URL, e.g. \"https://hooks.example.net/haven\"",
                );
            }
            if w.events.is_empty() {
                self.at(
                    &format!("{p}.events"),
                    "`events` is empty",
                    "list event kinds, or write [\"*\"] for every event",
                );
            }
            let mut seen = BTreeSet::new();
            for (j, event) in w.events.iter().enumerate() {
                let at = format!("{p}.events[{j}]");
                if event == "*" && w.events.len() > 1 {
                    self.at(
                        &at,
                        "`*` selects every event, the others are redundant",
                        "write [\"*\"] alone, or list the events",
                    );
                } else if !seen.insert(event.as_str()) {
                    self.at(
                        &at,
                        format!("event `{event}` is listed twice"),
                        "list it once",
                    );
                } else if !known_event(event) {
                    let hint = did_you_mean(event, EVENT_KINDS).unwrap_or_else(|| {
                        "write an event kind (e.g. `rpo.exceeded`), a prefix (`failover.*`) or \
                         `*`"
                        .into()
                    });
                    self.at(&at, format!("unknown event kind `{event}`"), hint);
                }
            }
        }
    }
}

/// Why `name` is not `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`.
pub fn check_name(name: &str) -> Result<(), String> {
    let Some(first) = name.chars().next() else {
        return Err("it is empty".into());
    };
    if name.len() > MAX_NAME_LEN {
        return Err(format!("it is longer than {MAX_NAME_LEN} characters"));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(format!("it starts with `{first}`"));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("it contains `{c}`"));
    }
    Ok(())
}

/// Whether a setting's name says it holds a secret: it ends in `password`, `secret`, `token`
/// or `key` (any case).
fn looks_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "key"]
        .iter()
        .any(|s| key.ends_with(s))
}

/// Whether `event` is a known kind, `*`, or `PREFIX.*` of a known prefix.
fn known_event(event: &str) -> bool {
    if event == "*" || EVENT_KINDS.contains(&event) {
        return true;
    }
    event.strip_suffix(".*").is_some_and(|prefix| {
        EVENT_KINDS
            .iter()
            .any(|k| k.split_once('.').is_some_and(|(p, _)| p == prefix))
    })
}

/// Why `s` is not `host:port` (or `host` when `port_required` is false).
fn check_host_port(s: &str, port_required: bool) -> Result<(), String> {
    if s.contains("://") {
        return Err("is a URL".into());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "has an unclosed `[`".to_string())?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("has `{p}` after the address"))?,
            ),
        };
        (host, port)
    } else {
        match s.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err("is an IPv6 address without brackets".into());
            }
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    if let Some(c) = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')))
    {
        return Err(format!("has `{c}` in its host"));
    }
    match port {
        None if port_required => Err("has no port".into()),
        None => Ok(()),
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(()),
            _ => Err(format!(
                "has `{p}` as its port, not a number from 1 to 65535"
            )),
        },
    }
}

/// Why `url` is not an absolute URL with one of `schemes` and a host.
fn check_url(url: &str, schemes: &[&str]) -> Result<(), String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "is not a URL (no `{}://`)",
            schemes[schemes.len() - 1]
        ));
    };
    if !schemes.contains(&scheme) {
        return Err(format!(
            "has the scheme `{scheme}`, expected {}",
            schemes.join(" or ")
        ));
    }
    if url.chars().any(char::is_whitespace) {
        return Err("contains white space".into());
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    check_host_port(host_port, false)
}

/// Whether `url`'s host is a loopback address (`127.0.0.0/8`, `[::1]`, `localhost`).
fn is_loopback_url(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn roles_text(roles: &BTreeSet<Role>) -> String {
    if roles.is_empty() {
        return "none".into();
    }
    roles
        .iter()
        .map(|r| r.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A retention error line: the part after `": "` is what to do.
fn split_colon_hint(line: &str) -> (String, String) {
    let default = "list tiers youngest first; each tier's `every` a whole multiple of the finer \
                   tiers' and at most its span; the window at least the last tier's for_last";
    match line.split_once(": ") {
        Some((m, h)) if !m.is_empty() => (m.to_string(), h.to_string()),
        _ => split_hint(line, default),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_pattern() {
        assert!(check_name("web01").is_ok());
        assert!(check_name("a.b_c-d").is_ok());
        assert!(check_name(&"a".repeat(63)).is_ok());
        assert_eq!(
            check_name(&"a".repeat(64)).unwrap_err(),
            "it is longer than 63 characters"
        );
        assert_eq!(check_name("-a").unwrap_err(), "it starts with `-`");
        assert_eq!(check_name("a b").unwrap_err(), "it contains ` `");
        assert_eq!(check_name("").unwrap_err(), "it is empty");
    }

    #[test]
    fn addresses_and_urls() {
        assert!(check_host_port("ps1.example.net:9443", true).is_ok());
        assert!(check_host_port("[2001:db8::1]:9443", true).is_ok());
        assert!(check_host_port("10.0.0.1:9443", true).is_ok());
        assert_eq!(check_host_port("ps1", true).unwrap_err(), "has no port");
        assert!(check_host_port("ps1", false).is_ok());
        assert_eq!(
            check_host_port("2001:db8::1:9443", true).unwrap_err(),
            "is an IPv6 address without brackets"
        );
        assert_eq!(
            check_host_port("ps1:0", true).unwrap_err(),
            "has `0` as its port, not a number from 1 to 65535"
        );
        assert!(check_url("https://a.example.net:9480/x?y", &["https"]).is_ok());
        assert!(is_loopback_url("http://127.0.0.1:9480"));
        assert!(is_loopback_url("http://[::1]:9480/"));
        assert!(is_loopback_url("http://localhost:9480"));
        assert!(!is_loopback_url("http://10.0.0.1:9480"));
        assert!(!is_loopback_url("http://127.example.net:9480"));
        assert_eq!(
            check_url("http://a", &["https"]).unwrap_err(),
            "has the scheme `http`, expected https"
        );
        assert_eq!(
            check_url("a.example.net", &["http", "https"]).unwrap_err(),
            "is not a URL (no `https://`)"
        );
    }

    #[test]
    fn events_and_secrets() {
        assert!(known_event("*"));
        assert!(known_event("rpo.exceeded"));
        assert!(known_event("failover.*"));
        assert!(!known_event("nothing.*"));
        assert!(!known_event("rpo.exceed"));
        assert!(looks_secret("password"));
        assert!(looks_secret("storage_account_key"));
        assert!(looks_secret("api_token"));
        assert!(!looks_secret("vcenter_url"));
    }
}
