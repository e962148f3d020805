//! Platform adapters run by the configuration server: loaded from the pipeline's `[[plugin]]`
//! entries of kind `adapter`, given their settings (secrets resolved), checked once after
//! loading (and at each refresh), asked for their inventory every [`INVENTORY_INTERVAL`] and
//! called by failover jobs (power off, define the replica machine, power it on).
//!
//! Every call runs on a blocking thread under the plugin's deadline and is retried
//! ([`ATTEMPTS`] in all) when it failed in a way a retry can cure: a trap (the host restarts the
//! instance), a deadline, a host error, or an I/O or platform error (an adapter's `platform`
//! errors arrive as I/O errors). The contract makes every platform call safe
//! to repeat. A trapping adapter fails the call with a message naming the plugin and the call;
//! the gateway lives on. What each adapter last reported is kept in redb (`platform/<name>`),
//! so the machine list survives a restart and a platform that is down.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow};
use haven_host::platform::Machine;
use haven_host::{AdapterPlugin, Host, PluginError, PluginSpec};
use serde::{Deserialize, Serialize};

use crate::ingest::lock;
use crate::now_ms;

/// How often each adapter's inventory is taken.
pub const INVENTORY_INTERVAL: Duration = Duration::from_secs(60);
/// Calls per adapter operation, the first included.
pub const ATTEMPTS: u32 = 3;
/// Most machines one adapter may report.
pub const MAX_MACHINES: usize = 10_000;
/// Most disks and network adapters one machine may have.
pub const MAX_DEVICES: usize = 256;

/// What the configuration server knows of one adapter, as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlatformView {
    /// The plugin's name in the pipeline.
    pub name: String,
    /// The component's path.
    pub path: String,
    /// The contract it is built against (`0.1.0`, `0.2.0`); empty when it did not load.
    pub contract: String,
    /// What `check` said (product, version, user) at the last inventory.
    pub about: Option<String>,
    /// Machines at the last successful inventory.
    pub machines: usize,
    /// When that inventory was taken, ms since the Unix epoch.
    pub inventory_ms: Option<u64>,
    /// Why the last load, check or inventory failed; none when it worked.
    pub error: Option<String>,
    /// When that failure happened.
    pub error_ms: Option<u64>,
}

/// What is kept in redb per adapter.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Record {
    about: Option<String>,
    machines: Vec<Machine>,
    inventory_ms: Option<u64>,
    error: Option<String>,
    error_ms: Option<u64>,
}

/// One loaded adapter.
struct Loaded {
    spec: PluginSpec,
    contract: &'static str,
    plugin: Arc<Mutex<AdapterPlugin>>,
    /// Whether `check` ran since it was loaded (it logs in: once, not at every inventory).
    checked: Arc<AtomicBool>,
}

/// The adapters of the applied pipeline.
pub struct Platforms {
    host: Host,
    loaded: Mutex<BTreeMap<String, Result<Loaded, String>>>,
    /// Serialises inventories, so a refresh and the periodic pass do not overlap.
    inventorying: tokio::sync::Mutex<()>,
}

/// Whether a failed call may succeed when repeated.
fn retryable(e: &PluginError) -> bool {
    match e {
        PluginError::Trapped { .. } | PluginError::Host { .. } => true,
        PluginError::Failed { error, .. } => error.kind == haven_image::ErrorKind::Io,
        PluginError::Stale { .. } => false,
    }
}

/// Checks what an adapter reported before anything uses it.
pub fn check_inventory(adapter: &str, machines: &[Machine]) -> Result<()> {
    let bad = |what: String| {
        anyhow!(
            "adapter `{adapter}` answered an inventory that cannot be used: {what}; the adapter \
             is faulty or speaks to a platform it does not understand"
        )
    };
    if machines.len() > MAX_MACHINES {
        return Err(bad(format!(
            "{} machines, more than the {MAX_MACHINES} one adapter may report",
            machines.len()
        )));
    }
    let mut ids = std::collections::BTreeSet::new();
    for (i, m) in machines.iter().enumerate() {
        let at = format!("machine #{} (`{}`)", i + 1, m.name);
        if m.id.is_empty() || m.id.len() > 1024 {
            return Err(bad(format!("{at} has an id of {} bytes", m.id.len())));
        }
        if !ids.insert(m.id.as_str()) {
            return Err(bad(format!("{at} repeats the id `{}`", m.id)));
        }
        if m.name.len() > 1024 || m.name.chars().any(char::is_control) {
            return Err(bad(format!(
                "{at} has a name that is too long or holds control characters"
            )));
        }
        if m.disks.len() > MAX_DEVICES || m.nics.len() > MAX_DEVICES {
            return Err(bad(format!(
                "{at} has more than {MAX_DEVICES} disks or network adapters"
            )));
        }
        for d in &m.disks {
            if !matches!(d.sector_size, 512 | 4096)
                || !d.size.is_multiple_of(u64::from(d.sector_size))
            {
                return Err(bad(format!(
                    "{at}: disk `{}` is {} bytes with {}-byte sectors (sectors are 512 or 4096 \
                     bytes and the size a whole number of them)",
                    d.id, d.size, d.sector_size
                )));
            }
        }
    }
    Ok(())
}

impl Platforms {
    pub fn new() -> Result<Platforms> {
        Ok(Platforms {
            host: Host::new(haven_host::HostConfig::default())?,
            loaded: Mutex::new(BTreeMap::new()),
            inventorying: tokio::sync::Mutex::new(()),
        })
    }

    /// Loads the adapters `specs` names (and unloads the others). An adapter whose spec did not
    /// change keeps its instance. Returns, per adapter that failed to load, why.
    pub fn sync(&self, specs: Vec<PluginSpec>) -> BTreeMap<String, String> {
        let wanted: BTreeMap<String, PluginSpec> =
            specs.into_iter().map(|s| (s.name.clone(), s)).collect();
        // Loading compiles a component: never under the lock the API and the inventory take.
        let to_load: Vec<PluginSpec> = {
            let mut loaded = lock(&self.loaded);
            loaded.retain(|name, l| wanted.contains_key(name) && l.is_ok());
            wanted
                .values()
                .filter(|spec| !matches!(loaded.get(&spec.name), Some(Ok(l)) if l.spec == **spec))
                .cloned()
                .collect()
        };
        let mut failures = BTreeMap::new();
        let outcomes: Vec<(String, Result<Loaded, String>)> = to_load
            .into_iter()
            .map(|spec| {
                let name = spec.name.clone();
                let outcome = self
                    .host
                    .load_adapter(&spec)
                    .map(|plugin| Loaded {
                        contract: plugin.contract(),
                        plugin: Arc::new(Mutex::new(plugin)),
                        checked: Arc::new(AtomicBool::new(false)),
                        spec,
                    })
                    .map_err(|e| e.to_string());
                if let Err(e) = &outcome {
                    tracing::error!(adapter = %name, "{e}");
                    failures.insert(name.clone(), e.clone());
                }
                (name, outcome)
            })
            .collect();
        let mut loaded = lock(&self.loaded);
        for (name, outcome) in outcomes {
            loaded.insert(name, outcome);
        }
        failures
    }

    /// Records adapters that cannot be loaded because a secret they need is missing.
    pub fn unresolved(&self, failures: BTreeMap<String, String>) {
        let mut loaded = lock(&self.loaded);
        for (name, why) in failures {
            tracing::error!(adapter = %name, "{why}");
            loaded.insert(name, Err(why));
        }
    }

    /// The names of the adapters of the pipeline, loaded or not.
    pub fn names(&self) -> Vec<String> {
        lock(&self.loaded).keys().cloned().collect()
    }

    fn get(&self, name: &str) -> Result<Arc<Mutex<AdapterPlugin>>> {
        match lock(&self.loaded).get(name) {
            Some(Ok(l)) => Ok(l.plugin.clone()),
            Some(Err(e)) => Err(anyhow!("adapter `{name}` is not loaded: {e}")),
            None => Err(anyhow!(
                "no adapter `{name}` in the applied pipeline; `haven platform list` shows them"
            )),
        }
    }

    /// Runs `f` against adapter `name` on a blocking thread, with retries.
    pub async fn call<T: Send + 'static>(
        &self,
        name: &str,
        f: impl Fn(&mut AdapterPlugin) -> Result<T, PluginError> + Send + 'static,
    ) -> Result<T> {
        let plugin = self.get(name)?;
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut last = None;
            for attempt in 1..=ATTEMPTS {
                let outcome = f(&mut lock(&plugin));
                match outcome {
                    Ok(v) => return Ok(v),
                    Err(e) if retryable(&e) && attempt < ATTEMPTS => {
                        tracing::warn!(adapter = %name, attempt, "{e}; trying again");
                        std::thread::sleep(Duration::from_millis(500 * u64::from(attempt)));
                        last = Some(e);
                    }
                    Err(e) => {
                        let tries = if attempt > 1 {
                            format!(" (after {attempt} attempts)")
                        } else {
                            String::new()
                        };
                        return Err(anyhow!("{e}{tries}"));
                    }
                }
            }
            Err(anyhow!(
                "{}",
                last.map(|e| e.to_string()).unwrap_or_default()
            ))
        })
        .await
        .map_err(|e| anyhow!("adapter call panicked: {e}"))?
    }

    /// Takes adapter `name`'s inventory, checking it first when it was just loaded or when
    /// `check`; the outcome is stored either way. Returns the error text when it failed.
    pub async fn inventory(
        &self,
        state: &haven_store::StateDb,
        name: &str,
        check: bool,
    ) -> Option<String> {
        let _one = self.inventorying.lock().await;
        let key = format!("platform/{name}");
        let mut record: Record = state.get_json(&key).ok().flatten().unwrap_or_default();
        let (contract, checked) = match lock(&self.loaded).get(name) {
            Some(Ok(l)) => (l.contract, Some(l.checked.clone())),
            _ => ("", None),
        };
        let outcome = async {
            let must_check = contract != "0.1.0"
                && (check || checked.as_ref().is_some_and(|c| !c.load(Ordering::Acquire)));
            let about = match must_check {
                false => record.about.clone(),
                true => {
                    let about = self.call(name, |p| p.check()).await?;
                    if let Some(c) = &checked {
                        c.store(true, Ordering::Release);
                    }
                    Some(about)
                }
            };
            let machines = self.call(name, |p| p.inventory()).await?;
            check_inventory(name, &machines)?;
            anyhow::Ok((about, machines))
        }
        .await;
        let error = match outcome {
            Ok((about, machines)) => {
                record.about = about;
                record.machines = machines;
                record.inventory_ms = Some(now_ms());
                record.error = None;
                record.error_ms = None;
                None
            }
            Err(e) => {
                let text = format!("{e:#}");
                tracing::warn!(adapter = %name, "inventory failed: {text}");
                record.error = Some(text.clone());
                record.error_ms = Some(now_ms());
                Some(text)
            }
        };
        if let Err(e) = state.put_json(&key, &record) {
            tracing::error!(adapter = %name, error = %format!("{e:#}"), "storing an inventory");
        }
        error
    }

    /// What is known of every adapter of the pipeline.
    pub fn views(&self, state: &haven_store::StateDb) -> Result<Vec<PlatformView>> {
        let loaded = lock(&self.loaded);
        let mut out = Vec::new();
        for (name, l) in loaded.iter() {
            let record: Record = state
                .get_json(&format!("platform/{name}"))?
                .unwrap_or_default();
            let (path, contract, load_error) = match l {
                Ok(l) => (l.spec.path.display().to_string(), l.contract, None),
                Err(e) => (String::new(), "", Some(e.clone())),
            };
            out.push(PlatformView {
                name: name.clone(),
                path,
                contract: contract.to_owned(),
                about: record.about,
                machines: record.machines.len(),
                inventory_ms: record.inventory_ms,
                error: load_error.or(record.error),
                error_ms: record.error_ms,
            });
        }
        Ok(out)
    }

    /// The machines adapter `name` reported last.
    pub fn machines(
        &self,
        state: &haven_store::StateDb,
        name: &str,
    ) -> Result<Option<Vec<Machine>>> {
        if !lock(&self.loaded).contains_key(name) {
            return Ok(None);
        }
        let record: Record = state
            .get_json(&format!("platform/{name}"))?
            .unwrap_or_default();
        Ok(Some(record.machines))
    }
}
