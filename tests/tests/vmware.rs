//! The VMware adapter (`haven_vmware.wasm`) in the real plugin host against two real vCenter
//! simulators (vcsim, govmomi 0.24.2): a primary whose machines are protected and a secondary
//! where replicas are defined.
//!
//! What the adapter reports is checked against what the simulator holds, asked directly over
//! SOAP by the test harness ([`Vcsim::call`]), and against the files in the simulator's
//! datastore folders.
//!
//! Needs `haven_vmware.wasm` (`cd plugins && cargo build --release --target wasm32-wasip2 -p
//! haven-vmware`) and the simulator (`target/vcsim/vcsim`, see `haven_e2e::vcsim`); both are
//! made by `cargo xtask build`.

use std::path::{Path, PathBuf};
use std::process::Command;

use haven_e2e::vcsim::Vcsim;
use haven_host::platform::{
    Machine, PowerOffMode, PowerState, ReplicaDisk, ReplicaNic, ReplicaSpec,
};
use haven_host::{AdapterPlugin, Grants, Host, HostConfig, PluginError, PluginSpec};
use haven_image::ErrorKind;

/// The four VMs of vcsim's default vCenter model, by name.
const MODEL_VMS: [&str; 4] = [
    "DC0_C0_RP0_VM0",
    "DC0_C0_RP0_VM1",
    "DC0_H0_VM0",
    "DC0_H0_VM1",
];

fn component() -> PathBuf {
    let dir = std::env::var_os("HAVEN_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release")
        });
    let path = dir.join("haven_vmware.wasm");
    assert!(
        path.exists(),
        "{} is missing: build it with `cd plugins && cargo build --release --target \
         wasm32-wasip2 -p haven-vmware` (or `cargo xtask build`)",
        path.display()
    );
    path
}

fn vcsim() -> Vcsim {
    Vcsim::start().unwrap_or_else(|e| panic!("{e:#}"))
}

/// A spec for the adapter talking to `target` with its credentials, granted `granted`.
fn spec(name: &str, target: &Vcsim, granted: &[&Vcsim]) -> PluginSpec {
    let mut spec = PluginSpec {
        name: name.into(),
        path: component(),
        grants: Grants {
            http_hosts: granted.iter().map(|v| v.host_port().to_owned()).collect(),
            ..Grants::default()
        },
        settings: Default::default(),
    };
    spec.settings.insert("url".into(), target.url().into());
    spec.settings.insert("user".into(), target.user().into());
    spec.settings
        .insert("password".into(), target.password().into());
    spec
}

fn load(host: &Host, spec: &PluginSpec) -> AdapterPlugin {
    host.load_adapter(spec)
        .unwrap_or_else(|e| panic!("loading {}: {e}", spec.name))
}

fn kind(err: &PluginError) -> ErrorKind {
    err.plugin_error()
        .unwrap_or_else(|| panic!("not an error of the plugin: {err}"))
        .kind
}

fn machine<'a>(machines: &'a [Machine], name: &str) -> &'a Machine {
    machines
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("no machine {name} in {machines:?}"))
}

fn property<'a>(m: &'a Machine, key: &str) -> &'a str {
    m.properties
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| {
            panic!(
                "machine {} has no property {key}: {:?}",
                m.name, m.properties
            )
        })
}

/// What the simulator holds of a machine's property, asked without the adapter.
fn sim(v: &Vcsim, vm: &str, path: &str) -> String {
    v.property("VirtualMachine", vm, path)
        .unwrap()
        .unwrap_or_else(|| panic!("vcsim has no {vm}"))
}

fn power(adapter: &mut AdapterPlugin, id: &str) -> PowerState {
    adapter
        .inventory()
        .unwrap()
        .into_iter()
        .find(|m| m.id == id)
        .unwrap_or_else(|| panic!("{id} is not in the inventory"))
        .power
}

fn qemu_img_vmdk(path: &Path, size: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // vcsim attaches an existing disk only if its `-flat.vmdk` extent exists, as ESXi keeps
    // disks: a descriptor and a flat extent.
    let out = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
        ])
        .arg(path)
        .arg(size)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn inventory_power_and_snapshots_on_the_primary() {
    let primary = vcsim();
    let host = Host::new(HostConfig::default()).unwrap();
    let mut adapter = load(&host, &spec("vmware-primary", &primary, &[&primary]));
    assert_eq!(adapter.contract(), "0.2.0");
    let info = adapter.describe().unwrap();
    assert_eq!(
        (info.name.as_str(), info.kinds.clone()),
        ("vmware", vec!["vcenter".to_owned()])
    );

    // 1. check names the vCenter, the user and the datacenter.
    let about = primary
        .call(r#"<RetrieveServiceContent xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></RetrieveServiceContent>"#)
        .unwrap();
    let instance = about
        .split("<instanceUuid>")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .unwrap();
    assert_eq!(
        adapter.check().unwrap(),
        format!(
            "VMware vCenter Server 6.5.0 build-5973321 (API 6.5, instance {instance}) at {} as \
             haven; datacenter DC0",
            primary.url()
        )
    );

    // 1. inventory: the model's four VMs, as vcsim holds them.
    let machines = adapter.inventory().unwrap();
    let names: Vec<&str> = machines.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, MODEL_VMS);
    for m in &machines {
        assert!(m.id.starts_with("vm-"), "{}", m.id);
        assert_eq!(m.power, PowerState::Running, "{}", m.name);
        // The model creates 1 vCPU, 32 MiB, one 1 MiB disk and one NIC on DC0_DVPG0.
        assert_eq!((m.cpus, m.memory_mib), (1, 32), "{}", m.name);
        assert_eq!(m.disks.len(), 1, "{}", m.name);
        let d = &m.disks[0];
        assert_eq!((d.size, d.sector_size), (1 << 20, 512), "{}", m.name);
        assert_eq!(d.location, format!("[LocalDS_0] {}/disk1.vmdk", m.name));
        assert!(!d.id.is_empty() && !d.name.is_empty(), "{d:?}");
        assert!(
            primary.local_path(&d.location).unwrap().exists(),
            "{}",
            d.location
        );
        assert_eq!(m.nics.len(), 1, "{}", m.name);
        let n = &m.nics[0];
        assert_eq!(n.network, "DC0_DVPG0");
        assert!(
            n.mac.starts_with("00:0c:29:") && n.mac.len() == 17,
            "{}",
            n.mac
        );
        assert_eq!(property(m, "guest-id"), "otherGuest");
        assert_eq!(property(m, "folder"), "/DC0/vm");
        assert_eq!(
            property(m, "vm-path"),
            format!("[LocalDS_0] {0}/{0}.vmx", m.name)
        );
        let host_name = property(m, "host");
        if m.name.starts_with("DC0_H0") {
            assert_eq!(host_name, "DC0_H0");
        } else {
            assert!(host_name.starts_with("DC0_C0_H"), "{host_name}");
        }

        // Cross-checked with vcsim, asked directly (other properties than the adapter reads).
        assert_eq!(m.uuid, sim(&primary, &m.id, "config.uuid"));
        assert_eq!(sim(&primary, &m.id, "summary.config.numCpu"), "1");
        assert_eq!(sim(&primary, &m.id, "summary.config.memorySizeMB"), "32");
        assert_eq!(sim(&primary, &m.id, "summary.config.name"), m.name);
        let devices = sim(&primary, &m.id, "config.hardware.device");
        assert!(
            devices.contains(&format!("<key>{}</key>", d.id)),
            "{devices}"
        );
        assert!(devices.contains(&format!("<fileName>{}</fileName>", d.location)));
        assert!(devices.contains(&format!("<macAddress>{}</macAddress>", n.mac)));
    }
    let uuids: std::collections::BTreeSet<&str> =
        machines.iter().map(|m| m.uuid.as_str()).collect();
    assert_eq!(uuids.len(), 4, "uuids are distinct");

    // 2. power off / on change the power state; repeating either succeeds.
    let vm = machine(&machines, "DC0_H0_VM0").id.clone();
    adapter.power_off(&vm, PowerOffMode::Hard).unwrap();
    assert_eq!(power(&mut adapter, &vm), PowerState::Stopped);
    assert_eq!(sim(&primary, &vm, "runtime.powerState"), "poweredOff");
    adapter.power_off(&vm, PowerOffMode::Hard).unwrap();
    adapter.power_off(&vm, PowerOffMode::Graceful).unwrap();
    assert_eq!(power(&mut adapter, &vm), PowerState::Stopped);
    adapter.power_on(&vm).unwrap();
    assert_eq!(power(&mut adapter, &vm), PowerState::Running);
    assert_eq!(sim(&primary, &vm, "runtime.powerState"), "poweredOn");
    adapter.power_on(&vm).unwrap();
    // Graceful without VMware Tools running in the guest: the power is cut.
    adapter.power_off(&vm, PowerOffMode::Graceful).unwrap();
    assert_eq!(power(&mut adapter, &vm), PowerState::Stopped);
    adapter.power_on(&vm).unwrap();
    // The other machines were not touched.
    for m in adapter.inventory().unwrap() {
        assert_eq!(m.power, PowerState::Running, "{}", m.name);
    }
    let err = adapter.power_on("vm-999999").unwrap_err();
    assert_eq!(kind(&err), ErrorKind::NotFound, "{err}");
    assert!(
        err.to_string()
            .contains("virtual machine `vm-999999` does not exist"),
        "{err}"
    );

    // 3. snapshots.
    let snapshot = adapter.create_snapshot(&vm, "haven-test").unwrap();
    assert!(snapshot.id.starts_with("snapshot-"), "{}", snapshot.id);
    assert_eq!(
        snapshot.change_ids,
        vec![],
        "vcsim has no changed block tracking"
    );
    assert_eq!(sim(&primary, &vm, "snapshot.currentSnapshot"), snapshot.id);
    let other = machine(&machines, "DC0_H0_VM1").id.clone();
    let err = adapter.delete_snapshot(&other, &snapshot.id).unwrap_err();
    assert_eq!(kind(&err), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains(&format!(
        "snapshot {} is not a snapshot of machine {other}",
        snapshot.id
    )));
    adapter.delete_snapshot(&vm, &snapshot.id).unwrap();
    assert_eq!(
        primary
            .property("VirtualMachineSnapshot", &snapshot.id, "vm")
            .unwrap(),
        None,
        "the snapshot is gone"
    );
    adapter.delete_snapshot(&vm, &snapshot.id).unwrap();

    // Agentless capture and quiescing are not offered; thaw always succeeds.
    let err = adapter
        .quiesce(&vm, std::time::Duration::from_secs(1))
        .unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Unsupported, "{err}");
    adapter.thaw(&vm).unwrap();

    // A machine Haven did not define is never deleted.
    let err = adapter.delete_machine(&vm).unwrap_err();
    assert_eq!(kind(&err), ErrorKind::InvalidArgument, "{err}");
    assert!(
        err.to_string().contains(&format!(
            "{vm} (`DC0_H0_VM0`) was not defined by Haven (it has no extraConfig \
             `guestinfo.haven.source-machine`); refusing to delete it"
        )),
        "{err}"
    );
    assert_eq!(sim(&primary, &vm, "runtime.powerState"), "poweredOn");
}

#[test]
fn a_replica_is_defined_started_and_deleted_on_the_secondary() {
    let primary = vcsim();
    let secondary = vcsim();
    let host = Host::new(HostConfig::default()).unwrap();
    let mut source = load(&host, &spec("vmware-primary", &primary, &[&primary]));
    let mut target = load(&host, &spec("vmware-secondary", &secondary, &[&secondary]));

    let protected = machine(&source.inventory().unwrap(), "DC0_H0_VM0").clone();

    // The materialised disks, as Haven's VMDK writer would leave them in the secondary's
    // datastore: 8 MiB, 16 MiB and fourteen of 1 MiB (16 disks take two SCSI controllers, and
    // the request is larger than one 4 KiB write of the HTTP body).
    let location = |i: usize| format!("[LocalDS_0] haven/{}/disk-{i}.vmdk", protected.id);
    let size = |i: usize| -> u64 {
        match i {
            0 => 8 << 20,
            1 => 16 << 20,
            _ => 1 << 20,
        }
    };
    let files: Vec<PathBuf> = (0..16)
        .map(|i| secondary.local_path(&location(i)).unwrap())
        .collect();
    for (i, f) in files.iter().enumerate() {
        qemu_img_vmdk(f, &size(i).to_string());
    }
    let flat = |p: &Path| {
        p.with_file_name(
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .replace(".vmdk", "-flat.vmdk"),
        )
    };

    let spec = ReplicaSpec {
        name: "DC0_H0_VM0-replica".into(),
        source_machine: protected.id.clone(),
        cpus: 2,
        memory_mib: 256,
        disks: (0..16)
            .map(|i| ReplicaDisk {
                source_disk: if i == 0 {
                    protected.disks[0].id.clone()
                } else {
                    format!("extra-{i}")
                },
                location: location(i),
                format: "vmdk".into(),
                size: size(i),
            })
            .collect(),
        nics: vec![
            ReplicaNic {
                source_nic: protected.nics[0].id.clone(),
                network: "VM Network".into(),
                static_address: Some("10.1.2.3/24".into()),
            },
            ReplicaNic {
                source_nic: String::new(),
                network: "DC0_DVPG0".into(),
                static_address: None,
            },
        ],
        options: vec![("host".into(), "DC0_H0".into())],
    };

    // Refusals first: nothing may be created by them.
    let mut bad = spec.clone();
    bad.nics[1].network = "DMZ".into();
    let err = target.define_replica(&bad).unwrap_err();
    assert_eq!(kind(&err), ErrorKind::NotFound, "{err}");
    assert!(
        err.to_string().contains(
            "network adapter 1: target network `DMZ` does not exist in datacenter DC0; there \
             are: DC0_DVPG0, DVS0-DVUplinks-"
        ),
        "{err}"
    );
    let mut bad = spec.clone();
    bad.options.push(("colour".into(), "blue".into()));
    let err = target.define_replica(&bad).unwrap_err();
    assert_eq!(kind(&err), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("unknown option `colour`"), "{err}");
    assert_eq!(
        target.inventory().unwrap().len(),
        4,
        "no machine was created"
    );

    // 4. define the replica.
    let replica = target.define_replica(&spec).unwrap();
    assert!(replica.id.starts_with("vm-"), "{}", replica.id);
    let definition: serde_json::Value = serde_json::from_str(&replica.definition).unwrap();
    assert_eq!(definition["id"], replica.id.as_str());
    assert_eq!(definition["source_machine"], protected.id.as_str());
    assert_eq!(definition["datastore"], "LocalDS_0");
    assert_eq!(definition["nics"][0]["network"], "VM Network");
    assert_eq!(definition["nics"][0]["static_address"], "10.1.2.3/24");

    let machines = target.inventory().unwrap();
    assert_eq!(machines.len(), 5);
    let r = machine(&machines, "DC0_H0_VM0-replica");
    assert_eq!(r.id, replica.id);
    assert_eq!(
        (r.cpus, r.memory_mib, r.power),
        (2, 256, PowerState::Stopped)
    );
    let disks: Vec<(String, u64)> = r
        .disks
        .iter()
        .map(|d| (d.location.clone(), d.size))
        .collect();
    let expected: Vec<(String, u64)> = (0..16).map(|i| (location(i), size(i))).collect();
    assert_eq!(disks, expected);
    let devices = sim(&secondary, &r.id, "config.hardware.device");
    assert_eq!(
        devices.matches("VirtualLsiLogicSASController").count(),
        2,
        "{devices}"
    );
    let networks: Vec<&str> = r.nics.iter().map(|n| n.network.as_str()).collect();
    assert_eq!(networks, ["VM Network", "DC0_DVPG0"]);
    assert_eq!(property(r, "host"), "DC0_H0");
    assert_eq!(property(r, "guest-id"), "otherGuest64");
    let extra = sim(&secondary, &r.id, "config.extraConfig");
    assert!(
        extra.contains("<key>guestinfo.haven.nic0.address</key>"),
        "{extra}"
    );
    assert!(extra.contains(">10.1.2.3/24</value>"), "{extra}");
    assert!(
        extra.contains(&format!(">{}</value>", protected.id)),
        "{extra}"
    );
    assert!(!extra.contains("guestinfo.haven.nic1.address"), "{extra}");
    // The replica's own files live in a folder of their own, not beside its disks.
    let vm_folder = secondary
        .local_path(property(r, "vm-path"))
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    assert!(vm_folder.is_dir() && !vm_folder.starts_with(files[0].parent().unwrap()));

    target.power_on(&r.id).unwrap();
    assert_eq!(power(&mut target, &r.id), PowerState::Running);

    // Defining it again (a retry whose answer was lost) answers the same machine; another
    // machine of that name (other disks) is refused.
    let again = target.define_replica(&spec).unwrap();
    assert_eq!(again.id, r.id);
    let machines = target.inventory().unwrap();
    assert_eq!(
        machines.iter().filter(|m| m.name == spec.name).count(),
        1,
        "{machines:?}"
    );
    let mut other = spec.clone();
    other.disks.truncate(1);
    let err = target.define_replica(&other).unwrap_err();
    assert_eq!(kind(&err), ErrorKind::AlreadyExists, "{err}");
    assert!(err.to_string().contains("is not this replica"), "{err}");

    // Deleting powers off, keeps the disks, and is repeatable.
    target.delete_machine(&r.id).unwrap();
    let machines = target.inventory().unwrap();
    assert!(machines.iter().all(|m| m.id != r.id), "{machines:?}");
    assert_eq!(
        secondary.property("VirtualMachine", &r.id, "name").unwrap(),
        None
    );
    for f in &files {
        assert!(f.exists(), "{} was deleted", f.display());
        assert!(flat(f).exists(), "{} was deleted", flat(f).display());
    }
    assert_eq!(std::fs::metadata(flat(&files[1])).unwrap().len(), 16 << 20);
    assert!(!vm_folder.exists(), "the replica's own folder is removed");
    target.delete_machine(&r.id).unwrap();

    // The primary was not touched.
    assert_eq!(source.inventory().unwrap().len(), 4);
}

#[test]
fn refusals_name_the_grant_and_the_setting() {
    let primary = vcsim();
    let secondary = vcsim();
    let host = Host::new(HostConfig::default()).unwrap();

    // 5. Granted only the secondary, asked to talk to the primary.
    let mut adapter = load(&host, &spec("vmware-denied", &primary, &[&secondary]));
    let err = adapter.check().unwrap_err();
    let PluginError::Failed { denials, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(
        denials,
        &[format!(
            "plugin `vmware-denied`: HTTP request to {} denied: not in its grant http_hosts = \
             [\"{}\"]",
            primary.host_port(),
            secondary.host_port()
        )]
    );
    assert_eq!(kind(&err), ErrorKind::Denied, "{err}");
    assert!(
        err.to_string()
            .contains("is not in this plugin's grant `http_hosts`"),
        "{err}"
    );

    // A missing password.
    let mut no_password = spec("vmware-no-password", &primary, &[&primary]);
    no_password.settings.remove("password");
    let err = load(&host, &no_password).check().unwrap_err();
    assert_eq!(kind(&err), ErrorKind::InvalidArgument, "{err}");
    assert_eq!(
        err.to_string(),
        "plugin `vmware-no-password` call `platform.check` failed: setting `password` is \
         required; add it to the adapter's `settings`"
    );

    // A wrong password: the settings are named, the password is not shown.
    let mut wrong = spec("vmware-wrong-password", &primary, &[&primary]);
    wrong.settings.insert("password".into(), "not-it".into());
    let err = load(&host, &wrong).inventory().unwrap_err();
    assert_eq!(kind(&err), ErrorKind::InvalidArgument, "{err}");
    assert!(
        err.to_string().contains(&format!(
            "vCenter at {} refused the login of user `haven` (InvalidLogin): check the settings \
             `user` and `password`",
            primary.url()
        )),
        "{err}"
    );
    assert!(!err.to_string().contains("not-it"));

    // An unknown setting and an unknown datacenter.
    let mut unknown = spec("vmware-unknown", &primary, &[&primary]);
    unknown.settings.insert("insecure".into(), "true".into());
    let err = load(&host, &unknown).check().unwrap_err();
    assert_eq!(kind(&err), ErrorKind::InvalidArgument, "{err}");
    assert!(
        err.to_string().contains("unknown setting `insecure`"),
        "{err}"
    );
    let mut dc = spec("vmware-dc", &primary, &[&primary]);
    dc.settings.insert("datacenter".into(), "DC9".into());
    let err = load(&host, &dc).check().unwrap_err();
    assert_eq!(kind(&err), ErrorKind::NotFound, "{err}");
    assert!(
        err.to_string()
            .contains("setting `datacenter`: vCenter http://127.0.0.1:"),
        "{err}"
    );
    assert!(
        err.to_string()
            .ends_with("has no datacenter `DC9`; it has: DC0"),
        "{err}"
    );
}
