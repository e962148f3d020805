//! Test plugin: an adapter whose behaviour the `mode` setting picks, for the host's and the
//! engine's tests of badly behaved adapters.
//!
//! - `ok`: one running machine `vm-1` with one 1 MiB disk; every call succeeds.
//! - `trap`: every call panics (a trap).
//! - `loop`: every call spins forever (stopped by the host's deadline).
//! - `garbage`: `inventory` returns a machine with an empty id and a disk whose size is not a
//!   multiple of its sector size; other calls answer a platform error.
//! - `fail-once`: like `ok`, but the first call of each instance fails with an I/O error (the
//!   host's retries must hide it).
//! - `chatty`: like `ok`, but every call first writes 100 KiB to stderr.
//! - `no-quiesce`: like `ok`, but `quiesce` is `unsupported` (a platform without guest tools).
//! - `quiesce-fails`: like `ok`, but `quiesce` fails with a platform error.
//!
//! Every mode echoes the settings it was given in `check`, so tests see what arrived.

use std::cell::Cell;

use haven_plugin_sdk::adapter::{
    Buffer, DiskRef, Extent, Machine, Nic, OptionPair, Platform, PluginGuest, PluginInfo,
    PowerOffMode, PowerState, ReplicaMachine, ReplicaSpec, Snapshot, WitError as Error,
    required_setting, setting,
};

struct Unruly;

thread_local! {
    static CALLS: Cell<u64> = const { Cell::new(0) };
}

/// Behaves as the mode says; `Ok(())` means "go on and answer normally".
fn misbehave() -> Result<(), Error> {
    let mode = required_setting("mode")?;
    let calls = CALLS.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    match mode.as_str() {
        "ok" => Ok(()),
        "trap" => panic!("unruly adapter: told to trap"),
        "loop" => {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "garbage" => Ok(()),
        "fail-once" if calls == 1 => Err(Error::Io("unruly adapter: first call fails".into())),
        "fail-once" | "no-quiesce" | "quiesce-fails" => Ok(()),
        "chatty" => {
            let line = "x".repeat(1023);
            for _ in 0..100 {
                eprintln!("{line}");
            }
            Ok(())
        }
        other => Err(Error::InvalidArgument(format!(
            "setting `mode`: unknown mode `{other}` (ok, trap, loop, garbage, fail-once, chatty, \
             no-quiesce, quiesce-fails)"
        ))),
    }
}

fn garbage() -> bool {
    setting("mode").as_deref() == Some("garbage")
}

fn refuse<T>() -> Result<T, Error> {
    if garbage() {
        Err(Error::Platform("unruly adapter: \u{0}\u{1}garbage".into()))
    } else {
        Err(Error::Unsupported("unruly adapter: not implemented".into()))
    }
}

impl PluginGuest for Unruly {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "unruly".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: env!("CARGO_PKG_DESCRIPTION").into(),
            kinds: vec!["test".into()],
        }
    }
}

impl Platform for Unruly {
    fn check() -> Result<String, Error> {
        misbehave()?;
        let mut names = haven_plugin_sdk::adapter::bindings::haven::plugin0_2_0::settings::names();
        names.sort();
        let pairs: Vec<String> = names
            .iter()
            .map(|n| format!("{n}={}", setting(n).unwrap_or_default()))
            .collect();
        Ok(format!("unruly adapter; settings: {}", pairs.join(" ")))
    }

    fn inventory() -> Result<Vec<Machine>, Error> {
        misbehave()?;
        let bad = garbage();
        Ok(vec![Machine {
            id: if bad { String::new() } else { "vm-1".into() },
            name: "unruly-1".into(),
            uuid: "4210aaaa-bbbb-cccc-dddd-eeeeffff0001".into(),
            power: PowerState::Running,
            cpus: 2,
            memory_mib: 2048,
            disks: vec![DiskRef {
                id: "2000".into(),
                name: "disk-0".into(),
                size: if bad { 1000 } else { 1 << 20 },
                sector_size: 512,
                location: "[ds1] unruly-1/disk-0.vmdk".into(),
            }],
            nics: vec![Nic {
                id: "4000".into(),
                network: "VM Network".into(),
                mac: "00:50:56:00:00:01".into(),
                addresses: vec![],
            }],
            properties: vec![OptionPair {
                key: "guest".into(),
                value: "otherGuest".into(),
            }],
        }])
    }

    fn quiesce(_: String, _: u32) -> Result<(), Error> {
        misbehave()?;
        match setting("mode").as_deref() {
            Some("garbage") => refuse(),
            Some("no-quiesce") => Err(Error::Unsupported(
                "unruly adapter: no guest tools to quiesce with".into(),
            )),
            Some("quiesce-fails") => Err(Error::Platform(
                "unruly adapter: the guest did not answer the quiesce request".into(),
            )),
            _ => Ok(()),
        }
    }

    fn thaw(_: String) -> Result<(), Error> {
        misbehave()
    }

    fn power_off(_: String, _: PowerOffMode) -> Result<(), Error> {
        misbehave()?;
        if garbage() { refuse() } else { Ok(()) }
    }

    fn power_on(_: String) -> Result<(), Error> {
        misbehave()?;
        if garbage() { refuse() } else { Ok(()) }
    }

    fn create_snapshot(_: String, _: String) -> Result<Snapshot, Error> {
        misbehave()?;
        refuse()
    }

    fn delete_snapshot(_: String, _: String) -> Result<(), Error> {
        misbehave()?;
        refuse()
    }

    fn changed_extents(
        _: String,
        _: String,
        _: String,
        _: Option<String>,
        _: u64,
        _: u64,
    ) -> Result<Vec<Extent>, Error> {
        misbehave()?;
        refuse()
    }

    fn read_snapshot(
        _: String,
        _: String,
        _: String,
        _: u64,
        _: &Buffer,
        _: u32,
        _: u32,
    ) -> Result<(), Error> {
        misbehave()?;
        refuse()
    }

    fn define_replica(spec: ReplicaSpec) -> Result<ReplicaMachine, Error> {
        misbehave()?;
        if garbage() {
            return refuse();
        }
        Ok(ReplicaMachine {
            id: format!("replica-{}", spec.name),
            definition: format!("{{\"name\":\"{}\"}}", spec.name),
        })
    }

    fn delete_machine(_: String) -> Result<(), Error> {
        misbehave()?;
        if garbage() { refuse() } else { Ok(()) }
    }
}

haven_plugin_sdk::export_adapter!(Unruly);
