//! A loaded adapter, of either contract version, and the platform types the engine sees.
//!
//! `haven:plugin@0.2.0` adapters have every call; 0.1.0 adapters lack `check`, `power-on` and
//! `delete-machine` (those answer `unsupported`, naming the contract) and describe networks by
//! name only.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wit::since_v0_1_0::adapter::Adapter as AdapterV1;
use crate::wit::since_v0_1_0::adapter::exports::haven::plugin::platform as v1;
use crate::wit::since_v0_1_0::writer::haven::plugin::types::OptionPair;
use crate::wit::since_v0_2_0::adapter::Adapter as AdapterV2;
use crate::wit::since_v0_2_0::adapter::exports::haven::plugin0_2_0::platform as v2;
use crate::{CacheOutcome, PluginError, PluginInfo, Runner};

/// Plain types of the `platform` interface, for the engine and the API.
pub mod platform {
    use super::{Deserialize, Serialize};

    /// Power state of a machine.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum PowerState {
        Running,
        Stopped,
        Suspended,
        Unknown,
    }

    impl std::fmt::Display for PowerState {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(match self {
                Self::Running => "running",
                Self::Stopped => "stopped",
                Self::Suspended => "suspended",
                Self::Unknown => "unknown",
            })
        }
    }

    /// How a machine is stopped.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum PowerOffMode {
        Graceful,
        Hard,
    }

    /// A disk of a machine, as the platform names it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
    pub struct DiskRef {
        pub id: String,
        pub name: String,
        pub size: u64,
        pub sector_size: u32,
        /// Where the platform keeps it (`[ds1] vm/vm.vmdk`); empty when unknown.
        #[serde(default)]
        pub location: String,
    }

    /// A network adapter of a machine.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
    pub struct Nic {
        /// The platform's id of the adapter; empty from a 0.1.0 adapter.
        #[serde(default)]
        pub id: String,
        pub network: String,
        #[serde(default)]
        pub mac: String,
        #[serde(default)]
        pub addresses: Vec<String>,
    }

    /// A machine the platform runs.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
    pub struct Machine {
        pub id: String,
        pub name: String,
        /// The firmware (BIOS) UUID; empty when unknown.
        #[serde(default)]
        pub uuid: String,
        pub power: PowerState,
        pub cpus: u32,
        pub memory_mib: u64,
        pub disks: Vec<DiskRef>,
        pub nics: Vec<Nic>,
        /// Platform facts (guest OS, host, folder), as `[name, value]` pairs.
        #[serde(default)]
        #[schema(value_type = Vec<Vec<String>>)]
        pub properties: Vec<(String, String)>,
    }

    /// A snapshot of a machine.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
    pub struct Snapshot {
        pub id: String,
        #[schema(value_type = Vec<Vec<String>>)]
        pub change_ids: Vec<(String, String)>,
    }

    /// One disk of a replica machine.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
    pub struct ReplicaDisk {
        pub source_disk: String,
        pub location: String,
        pub format: String,
        pub size: u64,
    }

    /// A network adapter of a replica machine.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
    pub struct ReplicaNic {
        #[serde(default)]
        pub source_nic: String,
        pub network: String,
        #[serde(default)]
        pub static_address: Option<String>,
    }

    /// What to define at failover.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
    pub struct ReplicaSpec {
        pub name: String,
        pub source_machine: String,
        pub cpus: u32,
        pub memory_mib: u64,
        pub disks: Vec<ReplicaDisk>,
        pub nics: Vec<ReplicaNic>,
        #[serde(default)]
        #[schema(value_type = Vec<Vec<String>>)]
        pub options: Vec<(String, String)>,
    }

    /// What the platform defined.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
    pub struct ReplicaMachine {
        pub id: String,
        pub definition: String,
    }
}

use platform::*;

fn pairs(options: &[(String, String)]) -> Vec<OptionPair> {
    options
        .iter()
        .map(|(k, v)| OptionPair {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

fn unpair(options: Vec<OptionPair>) -> Vec<(String, String)> {
    options.into_iter().map(|p| (p.key, p.value)).collect()
}

macro_rules! power_state {
    ($m:ident, $p:expr) => {
        match $p {
            $m::PowerState::Running => PowerState::Running,
            $m::PowerState::Stopped => PowerState::Stopped,
            $m::PowerState::Suspended => PowerState::Suspended,
            $m::PowerState::Unknown => PowerState::Unknown,
        }
    };
}

macro_rules! power_off_mode {
    ($m:ident, $p:expr) => {
        match $p {
            PowerOffMode::Graceful => $m::PowerOffMode::Graceful,
            PowerOffMode::Hard => $m::PowerOffMode::Hard,
        }
    };
}

fn machine_v1(m: v1::Machine) -> Machine {
    Machine {
        id: m.id,
        name: m.name,
        uuid: String::new(),
        power: power_state!(v1, m.power),
        cpus: m.cpus,
        memory_mib: m.memory_mib,
        disks: m
            .disks
            .into_iter()
            .map(|d| DiskRef {
                id: d.id,
                name: d.name,
                size: d.size,
                sector_size: d.sector_size,
                location: String::new(),
            })
            .collect(),
        nics: m
            .networks
            .into_iter()
            .map(|network| Nic {
                id: String::new(),
                network,
                mac: String::new(),
                addresses: Vec::new(),
            })
            .collect(),
        properties: unpair(m.properties),
    }
}

fn machine_v2(m: v2::Machine) -> Machine {
    Machine {
        id: m.id,
        name: m.name,
        uuid: m.uuid,
        power: power_state!(v2, m.power),
        cpus: m.cpus,
        memory_mib: m.memory_mib,
        disks: m
            .disks
            .into_iter()
            .map(|d| DiskRef {
                id: d.id,
                name: d.name,
                size: d.size,
                sector_size: d.sector_size,
                location: d.location,
            })
            .collect(),
        nics: m
            .nics
            .into_iter()
            .map(|n| Nic {
                id: n.id,
                network: n.network,
                mac: n.mac,
                addresses: n.addresses,
            })
            .collect(),
        properties: unpair(m.properties),
    }
}

fn spec_v2(s: &ReplicaSpec) -> v2::ReplicaSpec {
    v2::ReplicaSpec {
        name: s.name.clone(),
        source_machine: s.source_machine.clone(),
        cpus: s.cpus,
        memory_mib: s.memory_mib,
        disks: s
            .disks
            .iter()
            .map(|d| v2::ReplicaDisk {
                source_disk: d.source_disk.clone(),
                location: d.location.clone(),
                format: d.format.clone(),
                size: d.size,
            })
            .collect(),
        nics: s
            .nics
            .iter()
            .map(|n| v2::ReplicaNic {
                source_nic: n.source_nic.clone(),
                network: n.network.clone(),
                static_address: n.static_address.clone(),
            })
            .collect(),
        options: pairs(&s.options),
    }
}

/// Builds a 0.1.0 replica spec; a 0.1.0 adapter cannot set static addresses.
fn spec_v1(s: &ReplicaSpec) -> Result<v1::ReplicaSpec, String> {
    if s.nics.iter().any(|n| n.static_address.is_some()) {
        return Err("static addresses need an adapter built against haven:plugin@0.2.0".into());
    }
    Ok(v1::ReplicaSpec {
        name: s.name.clone(),
        source_machine: s.source_machine.clone(),
        cpus: s.cpus,
        memory_mib: s.memory_mib,
        disks: s
            .disks
            .iter()
            .map(|d| v1::ReplicaDisk {
                source_disk: d.source_disk.clone(),
                location: d.location.clone(),
                format: d.format.clone(),
            })
            .collect(),
        networks: s
            .nics
            .iter()
            .map(|n| v1::NetworkMapping {
                source: n.source_nic.clone(),
                target: n.network.clone(),
            })
            .collect(),
        options: pairs(&s.options),
    })
}

pub(crate) enum Versioned {
    V1(Runner<AdapterV1>),
    V2(Runner<AdapterV2>),
}

/// A loaded adapter.
pub struct AdapterPlugin {
    pub(crate) inner: Versioned,
}

/// Runs the same call against whichever version is loaded.
macro_rules! both {
    ($self:ident, $call:literal, |$b:ident, $s:ident, $m:ident| $body:expr) => {
        match &mut $self.inner {
            Versioned::V1(r) => r.call($call, |$b, $s| {
                #[allow(unused_imports)]
                use v1 as $m;
                let $b = $b.haven_plugin_platform();
                $body
            }),
            Versioned::V2(r) => r.call($call, |$b, $s| {
                #[allow(unused_imports)]
                use v2 as $m;
                let $b = $b.haven_plugin0_2_0_platform();
                $body
            }),
        }
    };
}

impl AdapterPlugin {
    /// The contract version the component was built against (`0.1.0`, `0.2.0`).
    pub fn contract(&self) -> &'static str {
        match self.inner {
            Versioned::V1(_) => "0.1.0",
            Versioned::V2(_) => "0.2.0",
        }
    }

    /// The plugin's name as configured.
    pub fn name(&self) -> &str {
        match &self.inner {
            Versioned::V1(r) => &r.name,
            Versioned::V2(r) => &r.name,
        }
    }

    /// Where the component came from (compiled now or precompiled).
    pub fn cache_outcome(&self) -> CacheOutcome {
        match &self.inner {
            Versioned::V1(r) => r.outcome,
            Versioned::V2(r) => r.outcome,
        }
    }

    /// How many times the instance has been replaced after a trap.
    pub fn restarts(&self) -> u64 {
        match &self.inner {
            Versioned::V1(r) => r.generation,
            Versioned::V2(r) => r.generation,
        }
    }

    /// The longest one call may run.
    pub fn call_timeout(&self) -> Duration {
        let ms = match &self.inner {
            Versioned::V1(r) => r.spec.grants.call_timeout_ms,
            Versioned::V2(r) => r.spec.grants.call_timeout_ms,
        };
        Duration::from_millis(ms)
    }

    pub fn describe(&mut self) -> Result<PluginInfo, PluginError> {
        match &mut self.inner {
            Versioned::V1(r) => r.describe(),
            Versioned::V2(r) => r.describe(),
        }
    }

    fn unsupported(&self, call: &'static str, what: &str) -> PluginError {
        PluginError::Failed {
            plugin: self.name().to_owned(),
            call,
            error: haven_image::Error::new(
                haven_image::ErrorKind::Unsupported,
                format!(
                    "{what}: the adapter is built against haven:plugin@0.1.0; rebuild it \
                     against 0.2.0"
                ),
            ),
            denials: Vec::new(),
        }
    }

    /// Logs in with the instance's settings and describes the platform.
    pub fn check(&mut self) -> Result<String, PluginError> {
        match &mut self.inner {
            Versioned::V1(_) => Err(self.unsupported("platform.check", "checking the connection")),
            Versioned::V2(r) => r.call("platform.check", |b, s| {
                b.haven_plugin0_2_0_platform().call_check(s)
            }),
        }
    }

    /// Every machine the adapter can see.
    pub fn inventory(&mut self) -> Result<Vec<Machine>, PluginError> {
        match &mut self.inner {
            Versioned::V1(r) => r
                .call("platform.inventory", |b, s| {
                    b.haven_plugin_platform().call_inventory(s)
                })
                .map(|ms| ms.into_iter().map(machine_v1).collect()),
            Versioned::V2(r) => r
                .call("platform.inventory", |b, s| {
                    b.haven_plugin0_2_0_platform().call_inventory(s)
                })
                .map(|ms| ms.into_iter().map(machine_v2).collect()),
        }
    }

    /// Prepares `machine` for an application-consistent point.
    pub fn quiesce(&mut self, machine: &str, timeout: Duration) -> Result<(), PluginError> {
        // The plugin's own wait stays within nine tenths of the call's deadline, so it can give
        // up cleanly before the host stops it.
        let limit = self.call_timeout().as_millis() as u64 * 9 / 10;
        let ms = (timeout.as_millis() as u64)
            .min(limit)
            .min(u64::from(u32::MAX)) as u32;
        both!(self, "platform.quiesce", |b, s, m| b
            .call_quiesce(s, machine, ms))
    }

    /// Ends a quiesce.
    pub fn thaw(&mut self, machine: &str) -> Result<(), PluginError> {
        both!(self, "platform.thaw", |b, s, m| b.call_thaw(s, machine))
    }

    /// Stops `machine`.
    pub fn power_off(&mut self, machine: &str, mode: PowerOffMode) -> Result<(), PluginError> {
        both!(self, "platform.power-off", |b, s, m| b.call_power_off(
            s,
            machine,
            power_off_mode!(m, mode)
        ))
    }

    /// Starts `machine`.
    pub fn power_on(&mut self, machine: &str) -> Result<(), PluginError> {
        match &mut self.inner {
            Versioned::V1(_) => Err(self.unsupported("platform.power-on", "powering on")),
            Versioned::V2(r) => r.call("platform.power-on", |b, s| {
                b.haven_plugin0_2_0_platform().call_power_on(s, machine)
            }),
        }
    }

    /// Takes a snapshot of every disk of `machine`.
    pub fn create_snapshot(&mut self, machine: &str, name: &str) -> Result<Snapshot, PluginError> {
        both!(self, "platform.create-snapshot", |b, s, m| b
            .call_create_snapshot(s, machine, name)
            .map(|r| r.map(|snap| Snapshot {
                id: snap.id,
                change_ids: unpair(snap.change_ids),
            })))
    }

    /// Deletes a snapshot taken by [`Self::create_snapshot`].
    pub fn delete_snapshot(&mut self, machine: &str, snapshot: &str) -> Result<(), PluginError> {
        both!(self, "platform.delete-snapshot", |b, s, m| b
            .call_delete_snapshot(s, machine, snapshot))
    }

    /// Defines a replica machine from materialised disks.
    pub fn define_replica(&mut self, spec: &ReplicaSpec) -> Result<ReplicaMachine, PluginError> {
        let call = "platform.define-replica";
        match &mut self.inner {
            Versioned::V1(r) => {
                let wit = spec_v1(spec).map_err(|what| PluginError::Failed {
                    plugin: r.name.to_string(),
                    call,
                    error: haven_image::Error::new(haven_image::ErrorKind::Unsupported, what),
                    denials: Vec::new(),
                })?;
                r.call(call, |b, s| {
                    b.haven_plugin_platform().call_define_replica(s, &wit)
                })
                .map(|m| ReplicaMachine {
                    id: m.id,
                    definition: m.definition,
                })
            }
            Versioned::V2(r) => {
                let wit = spec_v2(spec);
                r.call(call, |b, s| {
                    b.haven_plugin0_2_0_platform().call_define_replica(s, &wit)
                })
                .map(|m| ReplicaMachine {
                    id: m.id,
                    definition: m.definition,
                })
            }
        }
    }

    /// Deletes a machine the adapter defined, keeping its disks.
    pub fn delete_machine(&mut self, machine: &str) -> Result<(), PluginError> {
        match &mut self.inner {
            Versioned::V1(_) => {
                Err(self.unsupported("platform.delete-machine", "deleting a replica machine"))
            }
            Versioned::V2(r) => r.call("platform.delete-machine", |b, s| {
                b.haven_plugin0_2_0_platform()
                    .call_delete_machine(s, machine)
            }),
        }
    }
}
