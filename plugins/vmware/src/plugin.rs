//! The component: the contract's `plugin` and `platform` exports over [`Client`].
//!
//! One [`Client`] (one vCenter session) lives per instance, in a thread local, and is replaced
//! when the settings change. A trap throws the instance away with its session; the next
//! instance logs in again.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use haven_plugin_sdk::adapter::{
    self as sdk, Buffer, DiskRef, Extent, Level, Machine, Nic, OptionPair, Platform, PluginGuest,
    PluginInfo, PowerOffMode, PowerState, ReplicaMachine, ReplicaSpec, Snapshot, WitError,
};
use haven_plugin_sdk::http;

use crate::client::{Client, HttpAnswer, SETTINGS, Settings, Transport};
use crate::model::{self, Error, ErrorKind};
use crate::soap::SOAP_ACTION;

/// Outgoing HTTP through the host, std's clock and sleep, the host's log.
struct Wasi {
    start: Instant,
}

impl Transport for Wasi {
    fn post(&mut self, url: &str, cookie: Option<&str>, body: &str) -> Result<HttpAnswer, Error> {
        let action = format!("\"{SOAP_ACTION}\"");
        let mut headers = vec![
            ("content-type", "text/xml; charset=utf-8"),
            ("soapaction", action.as_str()),
            ("user-agent", "haven-vmware"),
        ];
        if let Some(c) = cookie {
            headers.push(("cookie", c));
        }
        let response = http::request("POST", url, &headers, body.as_bytes()).map_err(from_wit)?;
        Ok(HttpAnswer {
            status: response.status,
            set_cookie: response.header("set-cookie").map(str::to_owned).collect(),
            body: response.body,
        })
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn log(&mut self, message: &str) {
        sdk::log(Level::Info, message);
    }
}

thread_local! {
    static CLIENT: RefCell<Option<Client<Wasi>>> = const { RefCell::new(None) };
}

fn settings() -> Result<Settings, WitError> {
    sdk::refuse_unknown_settings(SETTINGS)?;
    let settings = Settings {
        url: sdk::required_setting("url")?,
        user: sdk::required_setting("user")?,
        password: sdk::required_setting("password")?,
        datacenter: sdk::setting("datacenter"),
    };
    settings.check().map_err(to_wit)?;
    Ok(settings)
}

/// Runs `f` with this instance's client, made (or remade) for the current settings.
fn with_client<R>(f: impl FnOnce(&mut Client<Wasi>) -> Result<R, Error>) -> Result<R, WitError> {
    let settings = settings()?;
    CLIENT.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|c| c.settings() != &settings) {
            *slot = Some(Client::new(
                Wasi {
                    start: Instant::now(),
                },
                settings,
            ));
        }
        let client = slot.as_mut().expect("client was just made");
        f(client).map_err(to_wit)
    })
}

fn to_wit(e: Error) -> WitError {
    let m = e.message;
    match e.kind {
        ErrorKind::InvalidArgument => WitError::InvalidArgument(m),
        ErrorKind::NotFound => WitError::NotFound(m),
        ErrorKind::AlreadyExists => WitError::AlreadyExists(m),
        ErrorKind::Unsupported => WitError::Unsupported(m),
        ErrorKind::Denied => WitError::Denied(m),
        ErrorKind::Io => WitError::Io(m),
        ErrorKind::Platform => WitError::Platform(m),
        ErrorKind::Limit => WitError::Limit(m),
    }
}

fn from_wit(e: WitError) -> Error {
    let (kind, m) = match e {
        WitError::InvalidArgument(m) => (ErrorKind::InvalidArgument, m),
        WitError::NotFound(m) => (ErrorKind::NotFound, m),
        WitError::AlreadyExists(m) => (ErrorKind::AlreadyExists, m),
        WitError::Unsupported(m) => (ErrorKind::Unsupported, m),
        WitError::Denied(m) => (ErrorKind::Denied, m),
        WitError::Io(m) => (ErrorKind::Io, m),
        WitError::Platform(m) | WitError::Corrupt(m) => (ErrorKind::Platform, m),
        WitError::Limit(m) => (ErrorKind::Limit, m),
    };
    Error::new(kind, m)
}

fn pairs(p: Vec<(String, String)>) -> Vec<OptionPair> {
    p.into_iter()
        .map(|(key, value)| OptionPair { key, value })
        .collect()
}

fn machine(m: model::Machine) -> Machine {
    Machine {
        id: m.id,
        name: m.name,
        uuid: m.uuid,
        power: match m.power {
            model::PowerState::Running => PowerState::Running,
            model::PowerState::Stopped => PowerState::Stopped,
            model::PowerState::Suspended => PowerState::Suspended,
            model::PowerState::Unknown => PowerState::Unknown,
        },
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
        properties: pairs(m.properties),
    }
}

fn replica_spec(s: ReplicaSpec) -> model::ReplicaSpec {
    model::ReplicaSpec {
        name: s.name,
        source_machine: s.source_machine,
        cpus: s.cpus,
        memory_mib: s.memory_mib,
        disks: s
            .disks
            .into_iter()
            .map(|d| model::ReplicaDisk {
                source_disk: d.source_disk,
                location: d.location,
                format: d.format,
                size: d.size,
            })
            .collect(),
        nics: s
            .nics
            .into_iter()
            .map(|n| model::ReplicaNic {
                source_nic: n.source_nic,
                network: n.network,
                static_address: n.static_address,
            })
            .collect(),
        options: s.options.into_iter().map(|o| (o.key, o.value)).collect(),
    }
}

fn unsupported<T>(what: &str) -> Result<T, WitError> {
    Err(WitError::Unsupported(format!(
        "vmware adapter: {what} is not supported: vCenter's changed block tracking \
         (QueryChangedDiskAreas) and disk reads are not spoken by this adapter; protect VMware \
         machines with the Haven agent"
    )))
}

struct Vmware;

impl PluginGuest for Vmware {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "vmware".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: env!("CARGO_PKG_DESCRIPTION").into(),
            kinds: vec!["vcenter".into()],
        }
    }
}

impl Platform for Vmware {
    fn check() -> Result<String, WitError> {
        with_client(Client::check)
    }

    fn inventory() -> Result<Vec<Machine>, WitError> {
        with_client(Client::inventory).map(|ms| ms.into_iter().map(machine).collect())
    }

    fn quiesce(_machine: String, _timeout_ms: u32) -> Result<(), WitError> {
        Err(WitError::Unsupported(
            "vmware adapter: quiesce is not supported (no guest operations); the Haven agent \
             quiesces inside the guest"
                .into(),
        ))
    }

    fn thaw(_machine: String) -> Result<(), WitError> {
        Ok(())
    }

    fn power_off(machine: String, mode: PowerOffMode) -> Result<(), WitError> {
        let mode = match mode {
            PowerOffMode::Graceful => model::PowerOffMode::Graceful,
            PowerOffMode::Hard => model::PowerOffMode::Hard,
        };
        with_client(|c| c.power_off(&machine, mode))
    }

    fn power_on(machine: String) -> Result<(), WitError> {
        with_client(|c| c.power_on(&machine))
    }

    fn create_snapshot(machine: String, name: String) -> Result<Snapshot, WitError> {
        with_client(|c| c.create_snapshot(&machine, &name)).map(|s| Snapshot {
            id: s.id,
            change_ids: pairs(s.change_ids),
        })
    }

    fn delete_snapshot(machine: String, snapshot: String) -> Result<(), WitError> {
        with_client(|c| c.delete_snapshot(&machine, &snapshot))
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
        let spec = replica_spec(spec);
        with_client(|c| c.define_replica(&spec)).map(|r| ReplicaMachine {
            id: r.id,
            definition: r.definition,
        })
    }

    fn delete_machine(machine: String) -> Result<(), WitError> {
        with_client(|c| c.delete_machine(&machine))
    }
}

haven_plugin_sdk::export_adapter!(Vmware);
