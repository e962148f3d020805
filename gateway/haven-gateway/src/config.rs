//! The gateway's configuration file.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use haven_host::{Host, HostConfig, PluginSpec};
use serde::Deserialize;

/// A gateway's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Folder for the gateway's state: the site CA (`ca/`), its TLS certificate (`tls/`), its
    /// identity at the next hop (`upstream/`), each role's state (`ps/`, `mt/`), replicas
    /// (`replicas/` by default) and precompiled plugins (`cache/plugins`).
    pub data_dir: PathBuf,
    /// Run the process server role (primary site).
    #[serde(default)]
    pub process_server: Option<ProcessServerSection>,
    /// Run the master target role (secondary site).
    #[serde(default)]
    pub master_target: Option<MasterTargetSection>,
    /// Run the configuration-server role: gateways join it, and the deployment is run from
    /// its API.
    #[serde(default)]
    pub config_server: Option<ConfigServerSection>,
    /// Join a configuration server: report to it, take policies from it, answer the calls it
    /// forwards (`haven-gateway enroll --config-server` first).
    #[serde(default)]
    pub join: Option<JoinSection>,
    /// The HTTP API.
    #[serde(default)]
    pub api: ApiSection,
    /// The plugins this gateway runs, each with its grants.
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
}

/// `[process_server]`: receive agents' streams, cache, compress, encrypt, forward.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessServerSection {
    /// UDP address agents connect to.
    #[serde(default = "default_ps_listen")]
    pub listen: SocketAddr,
    /// The master target's address.
    pub upstream: SocketAddr,
    /// The name in the master target's certificate (default: the upstream's IP address).
    #[serde(default)]
    pub upstream_server_name: Option<String>,
    /// Most bytes the cache of one disk may hold (compressed); at least 64 MiB.
    #[serde(default = "default_cache_max_bytes")]
    pub cache_max_bytes: u64,
    /// Most bytes the caches of all disks hold together; at least 64 MiB. Above three quarters
    /// of it, only disks holding less than their fair share take more.
    #[serde(default = "default_cache_total_max_bytes")]
    pub cache_total_max_bytes: u64,
    /// Bytes forwarded to the master target and not yet acknowledged, per agent.
    #[serde(default = "default_window_bytes")]
    pub window_bytes: u64,
    /// `HOST:PORT` agents reach this process server at, which the configuration server hands
    /// to the agents it assigns here (with `[join]`). Default: `listen`, when it names a
    /// specific address.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Also drain a cache storage account (Azure → Azure): forward the records agents left
    /// there to the master target.
    #[serde(default)]
    pub drain: Option<DrainSection>,
}

/// `[process_server.drain]`: a cache storage account this process server drains.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainSection {
    /// The container's URL (`https://ACCOUNT.blob.core.windows.net/CONTAINER`), with a SAS
    /// token as its query, or with `account_key_file`.
    pub container_url: String,
    /// A file holding the storage account's key (base64).
    #[serde(default)]
    pub account_key_file: Option<PathBuf>,
    /// The deployment's cache key (64 hexadecimal digits, mode 600), the agents' too.
    pub cache_key_file: PathBuf,
    /// Length of the lease on each drained agent (15 to 60 s): how long the agents of a
    /// gateway that died wait before another takes them over.
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u32,
}

fn default_lease_seconds() -> u32 {
    haven_cache_account::LEASE_SECONDS
}

impl DrainSection {
    /// The account, or what is wrong with this section.
    pub fn open(&self) -> Result<haven_cache_account::CacheAccount, String> {
        let key = match &self.account_key_file {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
                format!("process_server.drain.account_key_file {}: {e}", p.display())
            })?),
            None => None,
        };
        let account = haven_cache_account::Account::from_container_url(
            &self.container_url,
            key.as_deref().map(str::trim),
        )
        .map_err(|e| format!("process_server.drain.container_url: {e}"))?;
        let cache_key = haven_cache_account::CacheKey::load(&self.cache_key_file)
            .map_err(|e| format!("process_server.drain.cache_key_file: {e}"))?;
        haven_cache_account::CacheAccount::new(account, cache_key)
            .with_lease_seconds(self.lease_seconds)
            .map_err(|e| format!("process_server.drain.lease_seconds: {e}"))
    }
}

impl ProcessServerSection {
    /// Where agents reach it, or why that is not known.
    pub fn advertised(&self) -> Result<String, String> {
        match &self.advertise {
            Some(a)
                if a.rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Ok(a.clone())
            }
            Some(a) => Err(format!(
                "process_server.advertise `{a}`: expected HOST:PORT, e.g. ps1.example.net:9443"
            )),
            None if self.listen.ip().is_unspecified() => Err(format!(
                "process_server.listen {} is every address: set process_server.advertise to \
                 the HOST:PORT agents reach this process server at",
                self.listen
            )),
            None => Ok(self.listen.to_string()),
        }
    }
}

/// `[master_target]`: journal streams and apply them to replicas.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterTargetSection {
    /// UDP address process servers connect to.
    #[serde(default = "default_mt_listen")]
    pub listen: SocketAddr,
    /// Name of the `target-writer` plugin that writes replicas. Default: the installed raw
    /// writer with its storage root at `<data_dir>/replicas`.
    #[serde(default)]
    pub writer: Option<String>,
    /// Options replicas and failover images are created with, passed to the writer as they
    /// are (e.g. `{ subformat = "monolithicFlat" }`: VMDKs a VMware host attaches, a
    /// descriptor and a flat extent).
    #[serde(default)]
    pub writer_options: std::collections::BTreeMap<String, String>,
    /// Most bytes the journal of one disk may hold. Above 75 % of it the oldest recovery
    /// points are dropped early.
    #[serde(default = "default_journal_max_bytes")]
    pub journal_max_bytes: u64,
    /// How long recovery points are kept, and how they thin out with age (`window = "0s"`
    /// keeps none: the replica then follows the stream).
    #[serde(default)]
    pub retention: haven_engine::retention::RetentionPolicy,
    /// Address test-failover NBD exports listen on (each on a free port).
    #[serde(default = "default_nbd_host")]
    pub nbd_host: std::net::IpAddr,
    /// Serve test-failover exports over TLS only (clients need a certificate from this site's
    /// CA: `haven-gateway nbd-cert --client NAME`). Default: on when `nbd_host` is not a
    /// loopback address, where it cannot be turned off.
    #[serde(default)]
    pub nbd_tls: Option<bool>,
}

impl MasterTargetSection {
    /// Whether exports use TLS, or why the setting is refused.
    pub fn nbd_tls(&self) -> Result<bool, String> {
        let loopback = self.nbd_host.is_loopback();
        match self.nbd_tls {
            Some(false) if !loopback => Err(format!(
                "master_target.nbd_tls = false with nbd_host = {}: plain NBD is served on \
                 loopback only; remove nbd_tls (TLS is then on) or set nbd_host to a loopback \
                 address",
                self.nbd_host
            )),
            Some(on) => Ok(on),
            None => Ok(!loopback),
        }
    }
}

fn default_nbd_host() -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
}

/// `[config_server]`: the deployment's configuration server.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigServerSection {
    /// UDP address gateways connect and enroll to.
    #[serde(default = "default_cs_listen")]
    pub listen: SocketAddr,
}

/// `[join]`: the configuration server this gateway reports to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSection {
    /// Its address (its `[config_server] listen`).
    pub server: SocketAddr,
    /// The name in its certificate (default: the address's IP).
    #[serde(default)]
    pub server_name: Option<String>,
}

fn default_cs_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9445))
}

/// `[api]`: the HTTP API (`/v1`, `/metrics`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// TCP address of the API. Every call needs an API token.
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    /// Serve HTTPS with the gateway's certificate from the site CA (clients pin the CA with
    /// `haven login`). Default: on when `listen` is not a loopback address, where it cannot be
    /// turned off (tokens would cross the network in clear).
    #[serde(default)]
    pub tls: Option<bool>,
}

impl ApiSection {
    /// Whether the API speaks HTTPS, or why the setting is refused.
    pub fn tls(&self) -> Result<bool, String> {
        let loopback = self.listen.ip().is_loopback();
        match self.tls {
            Some(false) if !loopback => Err(format!(
                "api.tls = false with api.listen = {}: plain HTTP is served on loopback only; \
                 remove api.tls (HTTPS is then on) or listen on a loopback address",
                self.listen
            )),
            Some(on) => Ok(on),
            None => Ok(!loopback),
        }
    }
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: default_api_listen(),
            tls: None,
        }
    }
}

fn default_ps_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9443))
}

fn default_mt_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9444))
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9480))
}

fn default_cache_max_bytes() -> u64 {
    4 << 30
}

fn default_cache_total_max_bytes() -> u64 {
    64 << 30
}

fn default_window_bytes() -> u64 {
    64 << 20
}

fn default_journal_max_bytes() -> u64 {
    16 << 30
}

impl GatewayConfig {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<GatewayConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The plugin named `name`.
    pub fn plugin(&self, name: &str) -> Option<&PluginConfig> {
        self.plugins.iter().find(|p| p.spec.name == name)
    }
}

/// One plugin: a component, the world it implements and what it is granted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// `target-writer` or `adapter`.
    pub kind: PluginKind,
    #[serde(flatten)]
    pub spec: PluginSpec,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    TargetWriter,
    Adapter,
}

/// Reads and checks `path`: the report on success, every problem on failure.
pub fn validate(path: &Path) -> Result<String, Vec<String>> {
    let config = GatewayConfig::load(path).map_err(|e| vec![e])?;
    let host = Host::new(HostConfig {
        cache_dir: Some(config.data_dir.join("cache/plugins")),
    })
    .map_err(|e| vec![format!("{e:#}")])?;
    let mut errors = Vec::new();
    let mut report = String::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, plugin) in config.plugins.iter().enumerate() {
        let spec = &plugin.spec;
        let at = format!("plugin[{i}] `{}`", spec.name);
        if !names.insert(spec.name.as_str()) {
            errors.push(format!(
                "{at}: the name is used by another plugin; names must be unique"
            ));
            continue;
        }
        if let Some(root) = &spec.grants.storage_root
            && !root.is_dir()
        {
            errors.push(format!(
                "{at}: grants.storage_root {} is not a folder; create it or fix the path",
                root.display()
            ));
            continue;
        }
        let info = match plugin.kind {
            PluginKind::TargetWriter => host.load_writer(spec).map(|mut p| p.describe()),
            PluginKind::Adapter => host.load_adapter(spec).map(|mut p| p.describe()),
        };
        match info {
            Ok(Ok(info)) => {
                let _ = writeln!(
                    report,
                    "{at}: ok — {} {} ({})",
                    info.name,
                    info.version,
                    grants_text(spec)
                );
            }
            Ok(Err(e)) => errors.push(format!("{at}: {e}")),
            Err(e) => errors.push(format!("{at}: {e}")),
        }
    }
    if config.process_server.is_none() && config.master_target.is_none() {
        let _ = writeln!(report, "roles: none (only plugins are checked)");
    }
    if let Some(ps) = &config.process_server {
        if ps.cache_max_bytes < 64 << 20 {
            errors.push(format!(
                "process_server.cache_max_bytes {}: at least 67108864 (64 MiB, two of the \
                 largest records) is needed",
                ps.cache_max_bytes
            ));
        }
        if ps.cache_total_max_bytes < 64 << 20 {
            errors.push(format!(
                "process_server.cache_total_max_bytes {}: at least 67108864 (64 MiB) is needed",
                ps.cache_total_max_bytes
            ));
        }
        let _ = writeln!(
            report,
            "process_server: listen {}, forwards to {}",
            ps.listen, ps.upstream
        );
        if config.join.is_some()
            && let Err(e) = ps.advertised()
        {
            errors.push(e);
        }
        match ps.drain.as_ref().map(DrainSection::open) {
            Some(Ok(a)) => {
                let _ = writeln!(report, "process_server: drains {}", a.describe());
            }
            Some(Err(e)) => errors.push(e),
            None => {}
        }
    }
    if let Err(e) = config.api.tls() {
        errors.push(e);
    }
    if let Some(mt) = &config.master_target {
        if mt.journal_max_bytes < 64 << 20 {
            errors.push(format!(
                "master_target.journal_max_bytes {}: at least 67108864 (64 MiB, two of the \
                 largest records) is needed",
                mt.journal_max_bytes
            ));
        }
        if let Err(e) = mt.nbd_tls() {
            errors.push(e);
        }
        if let Err(e) = mt.retention.validate() {
            for line in e.lines() {
                errors.push(format!("master_target.retention: {line}"));
            }
        }
        if let Some(name) = &mt.writer {
            match config.plugin(name) {
                Some(p) if p.kind == PluginKind::TargetWriter => {}
                Some(_) => errors.push(format!(
                    "master_target.writer `{name}` is an adapter; name a target-writer plugin"
                )),
                None => errors.push(format!(
                    "master_target.writer `{name}` names no [[plugin]]; add one or remove the \
                     field to use the built-in raw writer"
                )),
            }
        }
        let _ = writeln!(
            report,
            "master_target: listen {}, writer {}",
            mt.listen,
            mt.writer.as_deref().unwrap_or("raw (built in)")
        );
    }
    if errors.is_empty() {
        Ok(report)
    } else {
        Err(errors)
    }
}

fn grants_text(spec: &PluginSpec) -> String {
    let g = &spec.grants;
    let mut parts = Vec::new();
    match &g.storage_root {
        Some(root) if g.storage_read_only => {
            parts.push(format!("storage {} read-only", root.display()))
        }
        Some(root) => parts.push(format!("storage {}", root.display())),
        None => {}
    }
    if !g.devices.is_empty() {
        let devices: Vec<String> = g.devices.iter().map(|d| d.display().to_string()).collect();
        parts.push(format!("devices {}", devices.join(", ")));
    }
    if !g.http_hosts.is_empty() {
        parts.push(format!("http {}", g.http_hosts.join(", ")));
    }
    parts.push(format!("{} MiB", g.memory_mib));
    parts.push(format!("{} ms per call", g.call_timeout_ms));
    parts.join("; ")
}
