//! The gateway's configuration file.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use haven_host::{Host, HostConfig, PluginSpec};
use serde::Deserialize;

/// A gateway's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Folder for the gateway's state (precompiled plugins live in `cache/plugins` below it).
    pub data_dir: PathBuf,
    /// The plugins this gateway runs, each with its grants.
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
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
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
    let config: GatewayConfig =
        toml::from_str(&text).map_err(|e| vec![format!("{}: {e}", path.display())])?;
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
    if !g.http_hosts.is_empty() {
        parts.push(format!("http {}", g.http_hosts.join(", ")));
    }
    parts.push(format!("{} MiB", g.memory_mib));
    parts.push(format!("{} ms per call", g.call_timeout_ms));
    parts.join("; ")
}
