//! The component: the `platform` export over [`crate::Arm`], through the host's HTTP.

use std::cell::RefCell;
use std::collections::BTreeMap;

use haven_plugin_sdk::adapter::bindings::haven::plugin0_1_0::types::Extent;
use haven_plugin_sdk::adapter::{
    Buffer, DiskRef, Machine, Nic, OptionPair, Platform, PluginGuest, PluginInfo, PowerOffMode,
    PowerState, ReplicaMachine, ReplicaSpec, Snapshot, WitError, refuse_unknown_settings, setting,
};
use haven_plugin_sdk::http;

use crate::{Arm, Power, SETTINGS, Settings, Spec, Transport};

struct Host;

impl Transport for Host {
    fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<crate::Answer, String> {
        let r = http::request(method, url, headers, body).map_err(|e| format!("{e:?}"))?;
        Ok((r.status, r.headers, r.body))
    }

    fn now_ms(&self) -> u64 {
        haven_plugin_sdk::adapter::bindings::haven::plugin0_1_0::clock::now_ms()
    }

    fn pause(&self, ms: u64) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

thread_local! {
    /// One client per instance: its token is reused until it expires.
    static ARM: RefCell<Option<Arm<Host>>> = const { RefCell::new(None) };
}

fn with_arm<T>(f: impl FnOnce(&Arm<Host>) -> Result<T, String>) -> Result<T, WitError> {
    refuse_unknown_settings(&SETTINGS)?;
    ARM.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_none() {
            let s = Settings::from(setting).map_err(WitError::InvalidArgument)?;
            *slot = Some(Arm::new(Host, s));
        }
        f(slot.as_ref().expect("set above")).map_err(WitError::Platform)
    })
}

fn unsupported<T>(call: &str) -> Result<T, WitError> {
    Err(WitError::Unsupported(format!(
        "azure adapter: {call} is not supported; the Haven agent in the VM captures its writes"
    )))
}

struct Azure;

impl PluginGuest for Azure {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "azure".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: env!("CARGO_PKG_DESCRIPTION").into(),
            kinds: vec!["azure".into()],
        }
    }
}

impl Platform for Azure {
    fn check() -> Result<String, WitError> {
        with_arm(Arm::check)
    }

    fn inventory() -> Result<Vec<Machine>, WitError> {
        let vms = with_arm(Arm::inventory)?;
        Ok(vms
            .into_iter()
            .map(|vm| Machine {
                id: vm.id,
                name: vm.name,
                uuid: vm.uuid,
                power: match vm.power {
                    Power::Running => PowerState::Running,
                    Power::Stopped => PowerState::Stopped,
                    Power::Unknown => PowerState::Unknown,
                },
                cpus: vm.cpus,
                memory_mib: vm.memory_mib,
                disks: vm
                    .disks
                    .into_iter()
                    .map(|d| DiskRef {
                        location: d.id.clone(),
                        id: d.id,
                        name: d.name,
                        size: d.size,
                        sector_size: 512,
                    })
                    .collect(),
                nics: vm
                    .nics
                    .into_iter()
                    .map(|n| Nic {
                        id: n.id,
                        network: n.network,
                        mac: n.mac,
                        addresses: n.addresses,
                    })
                    .collect(),
                properties: vm
                    .properties
                    .into_iter()
                    .map(|(key, value)| OptionPair { key, value })
                    .collect(),
            })
            .collect())
    }

    fn quiesce(_machine: String, _timeout_ms: u32) -> Result<(), WitError> {
        unsupported("quiesce")
    }

    fn thaw(_machine: String) -> Result<(), WitError> {
        Ok(())
    }

    fn power_off(machine: String, mode: PowerOffMode) -> Result<(), WitError> {
        with_arm(|a| a.power_off(&machine, mode == PowerOffMode::Hard))
    }

    fn power_on(machine: String) -> Result<(), WitError> {
        with_arm(|a| a.power_on(&machine))
    }

    fn create_snapshot(_machine: String, _name: String) -> Result<Snapshot, WitError> {
        unsupported("create-snapshot")
    }

    fn delete_snapshot(_machine: String, _snapshot: String) -> Result<(), WitError> {
        unsupported("delete-snapshot")
    }

    fn changed_extents(
        _machine: String,
        _snapshot: String,
        _disk: String,
        _since: Option<String>,
        _offset: u64,
        _len: u64,
    ) -> Result<Vec<Extent>, WitError> {
        unsupported("changed-extents")
    }

    fn read_snapshot(
        _machine: String,
        _snapshot: String,
        _disk: String,
        _offset: u64,
        _dst: &Buffer,
        _dst_offset: u32,
        _len: u32,
    ) -> Result<(), WitError> {
        unsupported("read-snapshot")
    }

    fn define_replica(spec: ReplicaSpec) -> Result<ReplicaMachine, WitError> {
        let spec = Spec {
            name: spec.name,
            disks: spec.disks.into_iter().map(|d| d.location).collect(),
            nics: spec
                .nics
                .into_iter()
                .map(|n| (n.network, n.static_address))
                .collect(),
            options: spec
                .options
                .into_iter()
                .map(|o| (o.key, o.value))
                .collect::<BTreeMap<_, _>>(),
        };
        let (id, definition) = with_arm(|a| a.define(&spec))?;
        Ok(ReplicaMachine { id, definition })
    }

    fn delete_machine(machine: String) -> Result<(), WitError> {
        with_arm(|a| a.delete(&machine))
    }
}

haven_plugin_sdk::export_adapter!(Azure);
