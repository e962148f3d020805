//! Finding and loading the plugins the CLI runs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use haven_host::{Grants, Host, HostConfig, PluginSpec, WriterPlugin};

/// The disk formats with a plugin, by the names `-f`/`-O` take.
pub const FORMATS: &[&str] = &["raw", "vmdk", "vhdx", "vhd", "qcow2"];
/// The order auto-detection asks plugins in; raw is what nothing else recognises.
pub const PROBE_ORDER: &[&str] = &["qcow2", "vmdk", "vhdx", "vhd"];

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Lists the plugins in the plugin folder with what they say about themselves.
    List,
    /// Shows what a component is and every capability it imports.
    Inspect {
        /// The component (`.wasm`).
        file: PathBuf,
    },
}

/// The plugin folder and the host that runs its plugins.
pub struct Plugins {
    dir: Option<PathBuf>,
    host: std::cell::OnceCell<Host>,
}

impl Plugins {
    pub fn new(dir: Option<PathBuf>) -> Self {
        let dir = dir.or_else(haven_host::default_plugin_dir);
        Self {
            dir,
            host: std::cell::OnceCell::new(),
        }
    }

    pub fn host(&self) -> Result<&Host> {
        if let Some(h) = self.host.get() {
            return Ok(h);
        }
        let host = Host::new(HostConfig {
            cache_dir: cache_dir(),
        })?;
        Ok(self.host.get_or_init(|| host))
    }

    fn dir(&self) -> Result<&Path> {
        self.dir.as_deref().context(
            "no plugin folder found: pass --plugin-dir or set HAVEN_PLUGIN_DIR (a development \
             build keeps them in target/wasm32-wasip2/release; build them with `cargo xtask build`)",
        )
    }

    /// The component file of format `format`'s plugin.
    pub fn component(&self, format: &str) -> Result<PathBuf> {
        let format = canonical_format(format)?;
        let path = self.dir()?.join(format!("haven_{format}.wasm"));
        if !path.exists() {
            bail!(
                "the {format} plugin is not installed: {} does not exist",
                path.display()
            );
        }
        Ok(path)
    }

    /// Loads format `format`'s plugin with storage below `root` (read-only unless `write`).
    pub fn writer(&self, format: &str, root: &Path, write: bool) -> Result<WriterPlugin> {
        let format = canonical_format(format)?;
        let spec = PluginSpec {
            name: format.to_owned(),
            path: self.component(format)?,
            grants: Grants {
                storage_root: Some(root.to_owned()),
                storage_read_only: !write,
                // Converting large images makes long calls; no call should take minutes.
                call_timeout_ms: 600_000,
                memory_mib: 1024,
                ..Grants::default()
            },
            settings: Default::default(),
        };
        Ok(self.host()?.load_writer(&spec)?)
    }
}

/// Maps qemu-img's names to Haven's (`vpc` is VHD) and refuses unknown formats.
pub fn canonical_format(format: &str) -> Result<&'static str> {
    let f = if format == "vpc" { "vhd" } else { format };
    FORMATS
        .iter()
        .copied()
        .find(|k| *k == f)
        .with_context(|| format!("unknown format `{format}` (known: {})", FORMATS.join(", ")))
}

/// Where precompiled plugins are kept between runs.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("HAVEN_CACHE_DIR") {
        return Some(d.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("haven/plugins"))
}

pub fn run(plugins: &Plugins, command: PluginCommand) -> Result<()> {
    match command {
        PluginCommand::List => {
            let dir = plugins.dir()?;
            println!("plugin folder: {}", dir.display());
            for format in FORMATS {
                let Ok(path) = plugins.component(format) else {
                    println!("  {format:<6} not installed");
                    continue;
                };
                let tmp = std::env::temp_dir();
                let mut w = plugins.writer(format, &tmp, false)?;
                let info = w.describe()?;
                println!(
                    "  {format:<6} {} {}: {}",
                    info.name, info.version, info.description
                );
                println!("         {}", path.display());
            }
            Ok(())
        }
        PluginCommand::Inspect { file } => {
            let imports = plugins.host()?.imports(&file)?;
            println!("component: {}", file.display());
            println!("imports:");
            for import in &imports {
                let verdict = match haven_host::grants::refuse_import(
                    import,
                    &Grants {
                        storage_root: Some(PathBuf::new()),
                        http_hosts: vec!["*".into()],
                        ..Grants::default()
                    },
                ) {
                    None => "grantable",
                    Some(_) => "never granted",
                };
                println!("  {import:<45} {verdict}");
            }
            Ok(())
        }
    }
}
