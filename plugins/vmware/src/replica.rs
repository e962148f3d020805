//! Defining a replica machine: checking the spec and its options, placing it (folder, resource
//! pool, host, datastore, networks) from what the datacenter holds, and the
//! `VirtualMachineConfigSpec` sent with `CreateVM_Task`. No I/O.
//!
//! The replica attaches the existing VMDKs where Haven materialised them (no file is created or
//! copied: `fileOperation` is left out) to SCSI controllers, 15 disks each. Its own files
//! (`.vmx`, `.nvram`, logs) go to a new folder of the datastore named after the machine
//! (`vmPathName` = `[datastore]`, vCenter picks the folder); that folder must never hold the
//! disks, since deleting a machine deletes its folder. Network adapters are attached to the
//! target networks by name (a standard network or a distributed port group) and left
//! disconnected until power-on.
//!
//! Two `extraConfig` keys are written, readable in the guest through VMware Tools
//! (`vmtoolsd --cmd "info-get guestinfo.haven.nic0.address"`):
//! - `guestinfo.haven.source-machine`: the protected machine's id. `delete-machine` deletes only
//!   machines that carry it.
//! - `guestinfo.haven.nic<N>.address`: the static address (`10.1.2.3/24`) for the N-th network
//!   adapter of the spec (N from 0, in the order of the spec's `nics`, which is the order of the
//!   machine's adapters), when one is given. A guest-side agent applies it.

use std::net::IpAddr;

use crate::model::{Error, ReplicaSpec};
use crate::soap::{Moref, ObjectContent, PropSpec};
use crate::xml::escape;

/// The option keys `define-replica` knows.
pub const OPTION_KEYS: &[&str] = &[
    "folder",
    "resource-pool",
    "host",
    "datastore",
    "guest-id",
    "nic-type",
    "scsi-controller",
];

/// The extraConfig key marking a machine Haven defined.
pub const SOURCE_KEY: &str = "guestinfo.haven.source-machine";

/// Disks per SCSI controller (units 0–15 but 7, the controller's own).
const DISKS_PER_CONTROLLER: usize = 15;
/// SCSI controllers per machine.
const MAX_CONTROLLERS: usize = 4;

/// The options of a `define-replica` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The VM folder to create it in (by name; default the datacenter's `vm` folder).
    pub folder: Option<String>,
    /// The resource pool (by name; default the root pool of `host`'s cluster or of the first
    /// host or cluster).
    pub resource_pool: Option<String>,
    /// The host to run it on (by name; default: vCenter picks).
    pub host: Option<String>,
    /// The datastore of its own files (by name; default the first disk's, else the first).
    pub datastore: Option<String>,
    /// The guest OS identifier (default `otherGuest64`).
    pub guest_id: String,
    /// The adapter type: `vmxnet3` (default), `e1000e` or `e1000`.
    pub nic_type: &'static str,
    /// The SCSI controller type: `lsilogic-sas` (default), `pvscsi` or `lsilogic`.
    pub scsi_controller: &'static str,
}

impl Options {
    /// Reads and checks the options; an unknown key or value is `invalid-argument`.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, Error> {
        let mut options = Options {
            folder: None,
            resource_pool: None,
            host: None,
            datastore: None,
            guest_id: "otherGuest64".into(),
            nic_type: "VirtualVmxnet3",
            scsi_controller: "VirtualLsiLogicSASController",
        };
        for (key, value) in pairs {
            let empty = || Error::invalid(format!("option `{key}` is empty"));
            if value.trim().is_empty() {
                return Err(empty());
            }
            match key.as_str() {
                "folder" => options.folder = Some(value.clone()),
                "resource-pool" => options.resource_pool = Some(value.clone()),
                "host" => options.host = Some(value.clone()),
                "datastore" => options.datastore = Some(value.clone()),
                "guest-id" => options.guest_id = value.clone(),
                "nic-type" => {
                    options.nic_type = match value.as_str() {
                        "vmxnet3" => "VirtualVmxnet3",
                        "e1000e" => "VirtualE1000e",
                        "e1000" => "VirtualE1000",
                        other => {
                            return Err(Error::invalid(format!(
                                "option `nic-type`: unknown type `{other}` (vmxnet3, e1000e, e1000)"
                            )));
                        }
                    }
                }
                "scsi-controller" => {
                    options.scsi_controller = match value.as_str() {
                        "lsilogic-sas" => "VirtualLsiLogicSASController",
                        "pvscsi" => "ParaVirtualSCSIController",
                        "lsilogic" => "VirtualLsiLogicController",
                        other => {
                            return Err(Error::invalid(format!(
                                "option `scsi-controller`: unknown type `{other}` (lsilogic-sas, pvscsi, lsilogic)"
                            )));
                        }
                    }
                }
                other => {
                    return Err(Error::invalid(format!(
                        "unknown option `{other}`; the VMware adapter knows: {}",
                        OPTION_KEYS.join(", ")
                    )));
                }
            }
        }
        Ok(options)
    }
}

/// A datastore path, `[datastore] folder/file.vmdk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatastorePath {
    pub datastore: String,
    pub path: String,
}

impl DatastorePath {
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.trim().strip_prefix('[')?;
        let (datastore, path) = rest.split_once(']')?;
        let path = path.trim();
        (!datastore.is_empty() && !path.is_empty()).then(|| Self {
            datastore: datastore.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// Checks what the spec says on its own (before asking vCenter anything).
pub fn check_spec(spec: &ReplicaSpec) -> Result<(), Error> {
    let name = spec.name.trim();
    if name.is_empty() || name.chars().count() > 80 {
        return Err(Error::invalid(format!(
            "replica name `{}`: vSphere needs 1 to 80 characters",
            spec.name
        )));
    }
    if spec.cpus == 0 {
        return Err(Error::invalid(format!("replica `{name}`: 0 CPUs")));
    }
    if spec.memory_mib < 4 || !spec.memory_mib.is_multiple_of(4) {
        return Err(Error::invalid(format!(
            "replica `{name}`: memory {} MiB; vSphere needs a multiple of 4 MiB",
            spec.memory_mib
        )));
    }
    if spec.disks.len() > DISKS_PER_CONTROLLER * MAX_CONTROLLERS {
        return Err(Error::new(
            crate::model::ErrorKind::Limit,
            format!(
                "replica `{name}`: {} disks; this adapter attaches at most {} ({MAX_CONTROLLERS} SCSI controllers)",
                spec.disks.len(),
                DISKS_PER_CONTROLLER * MAX_CONTROLLERS
            ),
        ));
    }
    for d in &spec.disks {
        let which = format!("replica `{name}`, disk `{}`", d.source_disk);
        if !d.format.eq_ignore_ascii_case("vmdk") {
            return Err(Error::unsupported(format!(
                "{which}: format `{}`; vSphere attaches only VMDK disks",
                d.format
            )));
        }
        if DatastorePath::parse(&d.location).is_none() {
            return Err(Error::invalid(format!(
                "{which}: location `{}` is not a datastore path like `[datastore] folder/disk.vmdk`",
                d.location
            )));
        }
        if d.size == 0 {
            return Err(Error::invalid(format!("{which}: size 0")));
        }
    }
    for (n, nic) in spec.nics.iter().enumerate() {
        if nic.network.trim().is_empty() {
            return Err(Error::invalid(format!(
                "replica `{name}`, network adapter {n}: no target network"
            )));
        }
        if let Some(address) = &nic.static_address {
            check_address(address).map_err(|why| {
                Error::invalid(format!(
                    "replica `{name}`, network adapter {n}: static address `{address}`: {why}"
                ))
            })?;
        }
    }
    Ok(())
}

/// `10.1.2.3/24`, `fd00::5/64` or a bare address.
fn check_address(s: &str) -> Result<(), &'static str> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (ip, Some(p)),
        None => (s, None),
    };
    let ip: IpAddr = ip.parse().map_err(|_| "not an IP address")?;
    if let Some(p) = prefix {
        let p: u8 = p.parse().map_err(|_| "the prefix length is not a number")?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if p > max {
            return Err("the prefix length is too long");
        }
    }
    Ok(())
}

/// What the datacenter holds, to place a replica: the view's types and properties.
pub const PLACEMENT_KINDS: &[&str] = &[
    "ComputeResource",
    "HostSystem",
    "ResourcePool",
    "Folder",
    "Datastore",
    "Network",
    "DistributedVirtualSwitch",
];

pub fn placement_specs() -> Vec<PropSpec<'static>> {
    vec![
        PropSpec {
            kind: "ComputeResource",
            paths: &["name", "resourcePool"],
        },
        PropSpec {
            kind: "HostSystem",
            paths: &["name", "parent"],
        },
        PropSpec {
            kind: "ResourcePool",
            paths: &["name"],
        },
        PropSpec {
            kind: "Folder",
            paths: &["name", "childType", "parent"],
        },
        PropSpec {
            kind: "Datastore",
            paths: &["name"],
        },
        PropSpec {
            kind: "Network",
            paths: &["name"],
        },
        PropSpec {
            kind: "DistributedVirtualPortgroup",
            paths: &["key", "config.distributedVirtualSwitch"],
        },
        PropSpec {
            kind: "DistributedVirtualSwitch",
            paths: &["uuid"],
        },
    ]
}

/// How a network adapter is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkBacking {
    /// A standard (host) network.
    Standard { name: String, network: Moref },
    /// A distributed port group.
    Distributed {
        name: String,
        switch_uuid: String,
        portgroup_key: String,
    },
}

impl NetworkBacking {
    pub fn name(&self) -> &str {
        match self {
            Self::Standard { name, .. } | Self::Distributed { name, .. } => name,
        }
    }
}

/// Where the replica goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub folder: Moref,
    pub pool: Moref,
    pub host: Option<Moref>,
    /// The datastore of the machine's own files.
    pub datastore: String,
    /// One per spec network adapter, in order.
    pub networks: Vec<NetworkBacking>,
}

fn named<'a>(objects: &'a [ObjectContent], kind: &str) -> impl Iterator<Item = &'a ObjectContent> {
    let kind = kind.to_owned();
    objects.iter().filter(move |o| {
        o.obj.kind == kind
            || match kind.as_str() {
                // Subtypes the view reports under their own names.
                "ComputeResource" => o.obj.kind == "ClusterComputeResource",
                "ResourcePool" => o.obj.kind == "VirtualApp",
                "Network" => {
                    o.obj.kind == "DistributedVirtualPortgroup" || o.obj.kind == "OpaqueNetwork"
                }
                "DistributedVirtualSwitch" => o.obj.kind == "VmwareDistributedVirtualSwitch",
                _ => false,
            }
    })
}

fn names_of(objects: &[ObjectContent], kind: &str) -> String {
    let mut names: Vec<&str> = named(objects, kind).map(|o| o.text("name")).collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The VM folder at `path`: folder names below the datacenter's VM folder, `/` between them
/// (`DR/ERP`), optionally starting with the VM folder's own name (`vm/DR/ERP`, `vm`). A single
/// name not found right below the VM folder names the one VM folder of that name at any depth
/// (none when several have it).
fn vm_folder_at(objects: &[ObjectContent], vm_folder: &Moref, path: &str) -> Option<Moref> {
    let holds_vms = |o: &ObjectContent| {
        o.prop("childType")
            .is_some_and(|t| t.children.iter().any(|c| c.value() == "VirtualMachine"))
    };
    let mut names: Vec<&str> = path.split('/').filter(|n| !n.is_empty()).collect();
    let own = objects
        .iter()
        .find(|o| &o.obj == vm_folder)
        .map(|o| o.text("name"));
    if names.first().is_some_and(|n| Some(*n) == own) {
        names.remove(0);
    }
    let below = |at: &Moref, name: &str| {
        named(objects, "Folder")
            .find(|o| {
                o.text("name") == name && o.moref("parent").as_ref() == Some(at) && holds_vms(o)
            })
            .map(|o| o.obj.clone())
    };
    if let [name] = names[..]
        && below(vm_folder, name).is_none()
    {
        let mut anywhere =
            named(objects, "Folder").filter(|o| o.text("name") == name && holds_vms(o));
        return match (anywhere.next(), anywhere.next()) {
            (Some(one), None) => Some(one.obj.clone()),
            _ => None,
        };
    }
    let mut at = vm_folder.clone();
    for name in names {
        at = below(&at, name)?;
    }
    Some(at)
}

/// Places the replica in datacenter `dc_name` (whose VM folder is `vm_folder`) from the
/// datacenter's `objects` (retrieved with [`placement_specs`]).
pub fn place(
    spec: &ReplicaSpec,
    options: &Options,
    dc_name: &str,
    vm_folder: &Moref,
    objects: &[ObjectContent],
) -> Result<Placement, Error> {
    let find = |kind: &str, what: &str, name: &str| {
        named(objects, kind)
            .find(|o| o.text("name") == name)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "{what} `{name}` does not exist in datacenter {dc_name}; there are: {}",
                    names_of(objects, kind)
                ))
            })
    };

    let folder = match &options.folder {
        None => vm_folder.clone(),
        Some(path) => vm_folder_at(objects, vm_folder, path).ok_or_else(|| {
            Error::not_found(format!(
                "option `folder`: VM folder `{path}` does not exist in datacenter {dc_name} \
                 (a path of folder names below the datacenter's VM folder, `/` between them)"
            ))
        })?,
    };

    let host = match &options.host {
        None => None,
        Some(name) => Some(find("HostSystem", "option `host`: host", name)?),
    };
    let pool = if let Some(name) = &options.resource_pool {
        find(
            "ResourcePool",
            "option `resource-pool`: resource pool",
            name,
        )?
        .obj
        .clone()
    } else {
        let compute = match host {
            Some(h) => {
                let parent = h.moref("parent");
                named(objects, "ComputeResource").find(|c| Some(&c.obj) == parent.as_ref())
            }
            None => named(objects, "ComputeResource").next(),
        };
        compute
            .and_then(|c| c.moref("resourcePool"))
            .ok_or_else(|| {
                Error::not_found(format!(
                    "datacenter {dc_name} has no host or cluster with a resource pool to run the replica in"
                ))
            })?
    };

    for d in &spec.disks {
        if let Some(p) = DatastorePath::parse(&d.location) {
            find(
                "Datastore",
                &format!("disk `{}`: datastore", d.source_disk),
                &p.datastore,
            )?;
        }
    }
    let datastore = match &options.datastore {
        Some(name) => find("Datastore", "option `datastore`: datastore", name)?
            .text("name")
            .to_owned(),
        None => match spec
            .disks
            .first()
            .and_then(|d| DatastorePath::parse(&d.location))
        {
            Some(p) => p.datastore,
            None => named(objects, "Datastore")
                .next()
                .map(|o| o.text("name").to_owned())
                .ok_or_else(|| {
                    Error::not_found(format!("datacenter {dc_name} has no datastore"))
                })?,
        },
    };

    let mut networks = Vec::new();
    for (n, nic) in spec.nics.iter().enumerate() {
        let net = find(
            "Network",
            &format!("network adapter {n}: target network"),
            &nic.network,
        )?;
        networks.push(match net.obj.kind.as_str() {
            "DistributedVirtualPortgroup" => {
                let switch = net.moref("config.distributedVirtualSwitch");
                let switch_uuid = named(objects, "DistributedVirtualSwitch")
                    .find(|s| Some(&s.obj) == switch.as_ref())
                    .map(|s| s.text("uuid").to_owned())
                    .filter(|u| !u.is_empty())
                    .ok_or_else(|| {
                        Error::platform(format!(
                            "port group `{}`: vCenter does not tell its switch's UUID",
                            nic.network
                        ))
                    })?;
                let key = match net.text("key") {
                    "" => net.obj.value.clone(),
                    key => key.to_owned(),
                };
                NetworkBacking::Distributed {
                    name: nic.network.clone(),
                    switch_uuid,
                    portgroup_key: key,
                }
            }
            "OpaqueNetwork" => {
                return Err(Error::unsupported(format!(
                    "network adapter {n}: `{}` is an NSX opaque network, which this adapter does not attach",
                    nic.network
                )));
            }
            _ => NetworkBacking::Standard {
                name: nic.network.clone(),
                network: net.obj.clone(),
            },
        });
    }

    Ok(Placement {
        folder,
        pool,
        host: host.map(|h| h.obj.clone()),
        datastore,
        networks,
    })
}

/// SCSI unit numbers in use order: 0–15 without 7.
fn unit_number(index_on_controller: usize) -> usize {
    if index_on_controller < 7 {
        index_on_controller
    } else {
        index_on_controller + 1
    }
}

/// The body of the `VirtualMachineConfigSpec` (elements in the schema's order).
pub fn config_spec(spec: &ReplicaSpec, options: &Options, placement: &Placement) -> String {
    let mut x = String::new();
    x += &format!("<name>{}</name>", escape(spec.name.trim()));
    x += &format!("<guestId>{}</guestId>", escape(&options.guest_id));
    x += &format!(
        "<files><vmPathName>[{}]</vmPathName></files>",
        escape(&placement.datastore)
    );
    x += &format!("<numCPUs>{}</numCPUs>", spec.cpus);
    x += &format!("<memoryMB>{}</memoryMB>", spec.memory_mib);

    let controllers = spec.disks.len().div_ceil(DISKS_PER_CONTROLLER).max(1);
    for c in 0..controllers {
        x += &format!(
            concat!(
                "<deviceChange><operation>add</operation>",
                r#"<device xsi:type="{}"><key>{}</key><busNumber>{}</busNumber>"#,
                "<sharedBus>noSharing</sharedBus></device></deviceChange>"
            ),
            options.scsi_controller,
            -100 - c as i64,
            c
        );
    }
    for (i, d) in spec.disks.iter().enumerate() {
        x += &format!(
            concat!(
                "<deviceChange><operation>add</operation>",
                r#"<device xsi:type="VirtualDisk"><key>{}</key>"#,
                r#"<backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>{}</fileName>"#,
                "<diskMode>persistent</diskMode></backing>",
                "<controllerKey>{}</controllerKey><unitNumber>{}</unitNumber>",
                "<capacityInKB>{}</capacityInKB><capacityInBytes>{}</capacityInBytes>",
                "</device></deviceChange>"
            ),
            -200 - i as i64,
            escape(d.location.trim()),
            -100 - (i / DISKS_PER_CONTROLLER) as i64,
            unit_number(i % DISKS_PER_CONTROLLER),
            d.size.div_ceil(1024),
            d.size
        );
    }
    for (i, net) in placement.networks.iter().enumerate() {
        let backing = match net {
            NetworkBacking::Standard { name, network } => format!(
                r#"<backing xsi:type="VirtualEthernetCardNetworkBackingInfo"><deviceName>{}</deviceName>{}</backing>"#,
                escape(name),
                network.xml("network")
            ),
            NetworkBacking::Distributed {
                switch_uuid,
                portgroup_key,
                ..
            } => format!(
                concat!(
                    r#"<backing xsi:type="VirtualEthernetCardDistributedVirtualPortBackingInfo">"#,
                    "<port><switchUuid>{}</switchUuid><portgroupKey>{}</portgroupKey></port></backing>"
                ),
                escape(switch_uuid),
                escape(portgroup_key)
            ),
        };
        x += &format!(
            concat!(
                "<deviceChange><operation>add</operation>",
                r#"<device xsi:type="{}"><key>{}</key>{}"#,
                "<connectable><startConnected>true</startConnected>",
                "<allowGuestControl>true</allowGuestControl><connected>false</connected></connectable>",
                "<addressType>generated</addressType></device></deviceChange>"
            ),
            options.nic_type,
            -300 - i as i64,
            backing
        );
    }

    let mut extra = vec![(SOURCE_KEY.to_owned(), spec.source_machine.clone())];
    for (i, nic) in spec.nics.iter().enumerate() {
        if let Some(address) = &nic.static_address {
            extra.push((format!("guestinfo.haven.nic{i}.address"), address.clone()));
        }
    }
    for (key, value) in extra {
        x += &format!(
            r#"<extraConfig xsi:type="OptionValue"><key>{}</key><value xsi:type="xsd:string">{}</value></extraConfig>"#,
            escape(&key),
            escape(&value)
        );
    }
    x
}

/// The `VirtualMachineConfigSpec` body removing every disk of `devices` (a machine's
/// `config.hardware.device`) without touching its files (no `fileOperation`), or `None` when
/// there is no disk. vCenter deletes the disks still attached when it destroys a machine.
pub fn detach_disks_spec(devices: &[crate::xml::Element]) -> Option<String> {
    let changes: String = devices
        .iter()
        .filter(|d| d.xsi_type.as_deref() == Some("VirtualDisk"))
        .map(|d| {
            let text = |path: &[&str]| escape(d.text_at(path).unwrap_or_default());
            let backing = d.child("backing");
            let mut device = format!("<key>{}</key>", text(&["key"]));
            if let Some(b) = backing {
                device += &format!(
                    r#"<backing xsi:type="{}"><fileName>{}</fileName>{}</backing>"#,
                    escape(b.xsi_type.as_deref().unwrap_or("VirtualDiskFlatVer2BackingInfo")),
                    text(&["backing", "fileName"]),
                    b.text_at(&["diskMode"])
                        .map(|m| format!("<diskMode>{}</diskMode>", escape(m)))
                        .unwrap_or_default()
                );
            }
            for field in ["controllerKey", "unitNumber", "capacityInKB"] {
                if let Some(v) = d.text_at(&[field]) {
                    device += &format!("<{field}>{}</{field}>", escape(v));
                }
            }
            format!(
                r#"<deviceChange><operation>remove</operation><device xsi:type="VirtualDisk">{device}</device></deviceChange>"#
            )
        })
        .collect();
    (!changes.is_empty()).then_some(changes)
}

/// `s` as a JSON string.
fn json(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What was defined, as JSON for the failover job's record.
pub fn definition(
    id: &str,
    spec: &ReplicaSpec,
    options: &Options,
    placement: &Placement,
) -> String {
    let disks: Vec<String> = spec
        .disks
        .iter()
        .map(|d| {
            format!(
                r#"{{"source_disk":{},"location":{},"size":{}}}"#,
                json(&d.source_disk),
                json(d.location.trim()),
                d.size
            )
        })
        .collect();
    let nics: Vec<String> = spec
        .nics
        .iter()
        .zip(&placement.networks)
        .map(|(n, net)| {
            format!(
                r#"{{"source_nic":{},"network":{},"static_address":{}}}"#,
                json(&n.source_nic),
                json(net.name()),
                n.static_address
                    .as_deref()
                    .map(json)
                    .unwrap_or_else(|| "null".into())
            )
        })
        .collect();
    format!(
        concat!(
            r#"{{"id":{},"name":{},"source_machine":{},"folder":{},"resource_pool":{},"host":{},"#,
            r#""datastore":{},"cpus":{},"memory_mib":{},"guest_id":{},"disks":[{}],"nics":[{}]}}"#
        ),
        json(id),
        json(spec.name.trim()),
        json(&spec.source_machine),
        json(&placement.folder.value),
        json(&placement.pool.value),
        placement
            .host
            .as_ref()
            .map(|h| json(&h.value))
            .unwrap_or_else(|| "null".into()),
        json(&placement.datastore),
        spec.cpus,
        spec.memory_mib,
        json(&options.guest_id),
        disks.join(","),
        nics.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ReplicaDisk, ReplicaNic};
    use crate::xml::Element;

    fn spec() -> ReplicaSpec {
        ReplicaSpec {
            name: "web01-replica".into(),
            source_machine: "vm-42".into(),
            cpus: 2,
            memory_mib: 512,
            disks: vec![ReplicaDisk {
                source_disk: "2000".into(),
                location: "[LocalDS_0] haven/vm-42/disk-0.vmdk".into(),
                format: "vmdk".into(),
                size: 8 << 20,
            }],
            nics: vec![ReplicaNic {
                source_nic: "4000".into(),
                network: "DC0_DVPG0".into(),
                static_address: Some("10.1.2.3/24".into()),
            }],
            options: vec![],
        }
    }

    fn object(kind: &str, id: &str, props: &[(&str, &str)]) -> ObjectContent {
        ObjectContent {
            obj: Moref::new(kind, id),
            props: props
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Element::parse(v).unwrap()))
                .collect(),
        }
    }

    /// DC0 of vcsim's VPX model.
    fn dc0() -> Vec<ObjectContent> {
        vec![
            object(
                "ComputeResource",
                "computeresource-23",
                &[
                    ("name", "<val>DC0_H0</val>"),
                    (
                        "resourcePool",
                        r#"<val type="ResourcePool">resgroup-22</val>"#,
                    ),
                ],
            ),
            object(
                "ClusterComputeResource",
                "clustercomputeresource-27",
                &[
                    ("name", "<val>DC0_C0</val>"),
                    (
                        "resourcePool",
                        r#"<val type="ResourcePool">resgroup-26</val>"#,
                    ),
                ],
            ),
            object(
                "HostSystem",
                "host-21",
                &[
                    ("name", "<val>DC0_H0</val>"),
                    (
                        "parent",
                        r#"<val type="ComputeResource">computeresource-23</val>"#,
                    ),
                ],
            ),
            object(
                "HostSystem",
                "host-34",
                &[
                    ("name", "<val>DC0_C0_H0</val>"),
                    (
                        "parent",
                        r#"<val type="ClusterComputeResource">clustercomputeresource-27</val>"#,
                    ),
                ],
            ),
            object(
                "ResourcePool",
                "resgroup-22",
                &[("name", "<val>Resources</val>")],
            ),
            object(
                "ResourcePool",
                "resgroup-26",
                &[("name", "<val>Resources</val>")],
            ),
            object(
                "Folder",
                "folder-3",
                &[
                    ("name", "<val>vm</val>"),
                    (
                        "childType",
                        "<val><string>Folder</string><string>VirtualMachine</string></val>",
                    ),
                ],
            ),
            object(
                "Folder",
                "folder-4",
                &[
                    ("name", "<val>host</val>"),
                    (
                        "childType",
                        "<val><string>Folder</string><string>ComputeResource</string></val>",
                    ),
                ],
            ),
            object("Datastore", "ds-1", &[("name", "<val>LocalDS_0</val>")]),
            object("Network", "network-7", &[("name", "<val>VM Network</val>")]),
            object(
                "DistributedVirtualPortgroup",
                "dvportgroup-13",
                &[
                    ("name", "<val>DC0_DVPG0</val>"),
                    ("key", "<val>dvportgroup-13</val>"),
                    (
                        "config.distributedVirtualSwitch",
                        r#"<val type="DistributedVirtualSwitch">dvs-9</val>"#,
                    ),
                ],
            ),
            object(
                "DistributedVirtualSwitch",
                "dvs-9",
                &[("uuid", "<val>fea9-uuid</val>")],
            ),
        ]
    }

    #[test]
    fn options_refuse_unknown_keys_and_values() {
        let o = |pairs: &[(&str, &str)]| {
            Options::parse(
                &pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(o(&[]).unwrap().guest_id, "otherGuest64");
        let err = o(&[("colour", "blue")]).unwrap_err();
        assert_eq!(err.kind, crate::model::ErrorKind::InvalidArgument);
        assert_eq!(
            err.message,
            "unknown option `colour`; the VMware adapter knows: folder, resource-pool, host, \
             datastore, guest-id, nic-type, scsi-controller"
        );
        assert!(
            o(&[("nic-type", "token-ring")])
                .unwrap_err()
                .message
                .contains("vmxnet3")
        );
        assert_eq!(
            o(&[("host", " ")]).unwrap_err().message,
            "option `host` is empty"
        );
        let set = o(&[
            ("guest-id", "windows9Server64Guest"),
            ("nic-type", "e1000e"),
            ("scsi-controller", "pvscsi"),
        ])
        .unwrap();
        assert_eq!(set.nic_type, "VirtualE1000e");
        assert_eq!(set.scsi_controller, "ParaVirtualSCSIController");
    }

    #[test]
    fn spec_checks() {
        check_spec(&spec()).unwrap();
        let mut s = spec();
        s.memory_mib = 1001;
        assert!(
            check_spec(&s)
                .unwrap_err()
                .message
                .contains("multiple of 4 MiB")
        );
        let mut s = spec();
        s.disks[0].location = "haven/disk.vmdk".into();
        assert!(
            check_spec(&s)
                .unwrap_err()
                .message
                .contains("is not a datastore path")
        );
        let mut s = spec();
        s.disks[0].format = "vhdx".into();
        assert_eq!(
            check_spec(&s).unwrap_err().kind,
            crate::model::ErrorKind::Unsupported
        );
        let mut s = spec();
        s.nics[0].static_address = Some("10.1.2.300/24".into());
        assert_eq!(
            check_spec(&s).unwrap_err().message,
            "replica `web01-replica`, network adapter 0: static address `10.1.2.300/24`: not an IP address"
        );
        let mut s = spec();
        s.nics[0].static_address = Some("fd00::5/64".into());
        check_spec(&s).unwrap();
    }

    #[test]
    fn placement_defaults_and_lookups() {
        let vm_folder = Moref::new("Folder", "folder-3");
        let options = Options::parse(&[]).unwrap();
        let p = place(&spec(), &options, "DC0", &vm_folder, &dc0()).unwrap();
        assert_eq!(
            p,
            Placement {
                folder: vm_folder.clone(),
                pool: Moref::new("ResourcePool", "resgroup-22"),
                host: None,
                datastore: "LocalDS_0".into(),
                networks: vec![NetworkBacking::Distributed {
                    name: "DC0_DVPG0".into(),
                    switch_uuid: "fea9-uuid".into(),
                    portgroup_key: "dvportgroup-13".into(),
                }],
            }
        );

        // A host: its cluster's root pool.
        let options = Options::parse(&[
            ("host".into(), "DC0_C0_H0".into()),
            ("folder".into(), "vm".into()),
        ])
        .unwrap();
        let p = place(&spec(), &options, "DC0", &vm_folder, &dc0()).unwrap();
        assert_eq!(p.host, Some(Moref::new("HostSystem", "host-34")));
        assert_eq!(p.pool, Moref::new("ResourcePool", "resgroup-26"));
        assert_eq!(p.folder, vm_folder);

        // Not found, naming what exists.
        let mut s = spec();
        s.nics[0].network = "DMZ".into();
        let err = place(&s, &Options::parse(&[]).unwrap(), "DC0", &vm_folder, &dc0()).unwrap_err();
        assert_eq!(err.kind, crate::model::ErrorKind::NotFound);
        assert_eq!(
            err.message,
            "network adapter 0: target network `DMZ` does not exist in datacenter DC0; there are: DC0_DVPG0, VM Network"
        );
        // A folder path below the VM folder; a folder of the same name elsewhere is not it.
        let mut objects = dc0();
        let vm_child = "<val><string>Folder</string><string>VirtualMachine</string></val>";
        for (id, name, parent) in [
            ("folder-50", "DR", "folder-3"),
            ("folder-51", "ERP", "folder-50"),
            ("folder-52", "ERP", "folder-3"),
        ] {
            objects.push(object(
                "Folder",
                id,
                &[
                    ("name", &format!("<val>{name}</val>")),
                    ("childType", vm_child),
                    ("parent", &format!(r#"<val type="Folder">{parent}</val>"#)),
                ],
            ));
        }
        for path in ["DR/ERP", "vm/DR/ERP", "/DR/ERP/"] {
            let options = Options::parse(&[("folder".into(), path.into())]).unwrap();
            let p = place(&spec(), &options, "DC0", &vm_folder, &objects).unwrap();
            assert_eq!(p.folder, Moref::new("Folder", "folder-51"), "{path}");
        }
        let options = Options::parse(&[("folder".into(), "ERP".into())]).unwrap();
        let p = place(&spec(), &options, "DC0", &vm_folder, &objects).unwrap();
        assert_eq!(p.folder, Moref::new("Folder", "folder-52"));
        // A single name found only deeper: the one folder of that name (none when several).
        let mut nested = objects.clone();
        nested.retain(|o| o.obj.value != "folder-52");
        let options = Options::parse(&[("folder".into(), "ERP".into())]).unwrap();
        let p = place(&spec(), &options, "DC0", &vm_folder, &nested).unwrap();
        assert_eq!(p.folder, Moref::new("Folder", "folder-51"));
        nested.push(object(
            "Folder",
            "folder-53",
            &[
                ("name", "<val>ERP</val>"),
                ("childType", vm_child),
                ("parent", r#"<val type="Folder">folder-4</val>"#),
            ],
        ));
        assert!(place(&spec(), &options, "DC0", &vm_folder, &nested).is_err());
        let options = Options::parse(&[("folder".into(), "DR/Web".into())]).unwrap();
        assert_eq!(
            place(&spec(), &options, "DC0", &vm_folder, &objects)
                .unwrap_err()
                .message,
            "option `folder`: VM folder `DR/Web` does not exist in datacenter DC0 (a path of \
             folder names below the datacenter's VM folder, `/` between them)"
        );

        let options = Options::parse(&[("folder".into(), "host".into())]).unwrap();
        assert!(
            place(&spec(), &options, "DC0", &vm_folder, &dc0())
                .unwrap_err()
                .message
                .contains("VM folder `host`")
        );
        let mut s = spec();
        s.disks[0].location = "[Nope] a/b.vmdk".into();
        assert!(
            place(&s, &Options::parse(&[]).unwrap(), "DC0", &vm_folder, &dc0())
                .unwrap_err()
                .message
                .starts_with("disk `2000`: datastore `Nope` does not exist")
        );
    }

    #[test]
    fn config_spec_attaches_existing_disks_and_writes_guestinfo() {
        let mut s = spec();
        s.nics.push(ReplicaNic {
            source_nic: String::new(),
            network: "VM Network".into(),
            static_address: None,
        });
        // 16 disks: two controllers, unit 7 skipped.
        s.disks = (0..16)
            .map(|i| ReplicaDisk {
                source_disk: format!("{}", 2000 + i),
                location: format!("[LocalDS_0] haven/vm-42/disk-{i}.vmdk"),
                format: "vmdk".into(),
                size: 1000,
            })
            .collect();
        let options = Options::parse(&[]).unwrap();
        let p = place(
            &s,
            &options,
            "DC0",
            &Moref::new("Folder", "folder-3"),
            &dc0(),
        )
        .unwrap();
        let xml = config_spec(&s, &options, &p);
        let doc = Element::parse(&format!(
            r#"<config xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">{xml}</config>"#
        ))
        .unwrap();
        assert_eq!(doc.text_at(&["files", "vmPathName"]), Some("[LocalDS_0]"));
        let changes: Vec<&Element> = doc.children_named("deviceChange").collect();
        assert_eq!(changes.len(), 2 + 16 + 2);
        assert!(
            changes.iter().all(|c| c.child("fileOperation").is_none()),
            "no file is created"
        );
        let disks: Vec<&Element> = changes
            .iter()
            .filter_map(|c| c.child("device"))
            .filter(|d| d.xsi_type.as_deref() == Some("VirtualDisk"))
            .collect();
        let units: Vec<(&str, &str)> = disks
            .iter()
            .map(|d| {
                (
                    d.text_at(&["controllerKey"]).unwrap(),
                    d.text_at(&["unitNumber"]).unwrap(),
                )
            })
            .collect();
        assert_eq!(units[6], ("-100", "6"));
        assert_eq!(units[7], ("-100", "8"));
        assert_eq!(units[14], ("-100", "15"));
        assert_eq!(units[15], ("-101", "0"));
        assert_eq!(disks[0].text_at(&["capacityInKB"]), Some("1"), "rounded up");
        assert_eq!(disks[0].text_at(&["capacityInBytes"]), Some("1000"));
        assert_eq!(
            disks[3].text_at(&["backing", "fileName"]),
            Some("[LocalDS_0] haven/vm-42/disk-3.vmdk")
        );
        let nics: Vec<&Element> = changes
            .iter()
            .filter_map(|c| c.child("device"))
            .filter(|d| d.xsi_type.as_deref() == Some("VirtualVmxnet3"))
            .collect();
        assert_eq!(
            nics[0].text_at(&["backing", "port", "portgroupKey"]),
            Some("dvportgroup-13")
        );
        assert_eq!(
            nics[1].text_at(&["backing", "deviceName"]),
            Some("VM Network")
        );
        let extra: Vec<(&str, &str)> = doc
            .children_named("extraConfig")
            .map(|e| (e.text_at(&["key"]).unwrap(), e.text_at(&["value"]).unwrap()))
            .collect();
        assert_eq!(
            extra,
            vec![
                ("guestinfo.haven.source-machine", "vm-42"),
                ("guestinfo.haven.nic0.address", "10.1.2.3/24")
            ]
        );

        let json = definition("vm-70", &s, &options, &p);
        assert!(json.starts_with(r#"{"id":"vm-70","name":"web01-replica","source_machine":"vm-42","folder":"folder-3","resource_pool":"resgroup-22","host":null,"datastore":"LocalDS_0","cpus":2,"memory_mib":512,"guest_id":"otherGuest64","disks":[{"source_disk":"2000""#), "{json}");
        assert!(json.ends_with(r#""nics":[{"source_nic":"4000","network":"DC0_DVPG0","static_address":"10.1.2.3/24"},{"source_nic":"","network":"VM Network","static_address":null}]}"#), "{json}");
    }

    #[test]
    fn detaching_disks_keeps_their_files() {
        let devices = Element::parse(concat!(
            r#"<val xmlns:x="http://www.w3.org/2001/XMLSchema-instance">"#,
            r#"<VirtualDevice x:type="ParaVirtualSCSIController"><key>202</key></VirtualDevice>"#,
            r#"<VirtualDevice x:type="VirtualDisk"><key>203</key><deviceInfo><label>disk-202-0</label></deviceInfo>"#,
            r#"<backing x:type="VirtualDiskFlatVer2BackingInfo"><fileName>[LocalDS_0] haven/vm-1/disk-0.vmdk</fileName><diskMode>persistent</diskMode></backing>"#,
            r#"<controllerKey>202</controllerKey><unitNumber>0</unitNumber><capacityInKB>8192</capacityInKB></VirtualDevice>"#,
            r#"<VirtualDevice x:type="VirtualVmxnet3"><key>4000</key><macAddress>00:0c:29:00:00:01</macAddress></VirtualDevice>"#,
            "</val>"
        ))
        .unwrap();
        assert_eq!(
            detach_disks_spec(&devices.children).unwrap(),
            concat!(
                r#"<deviceChange><operation>remove</operation><device xsi:type="VirtualDisk"><key>203</key>"#,
                r#"<backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[LocalDS_0] haven/vm-1/disk-0.vmdk</fileName><diskMode>persistent</diskMode></backing>"#,
                "<controllerKey>202</controllerKey><unitNumber>0</unitNumber><capacityInKB>8192</capacityInKB></device></deviceChange>"
            )
        );
        assert_eq!(detach_disks_spec(&devices.children[..1]), None);
    }

    #[test]
    fn datastore_paths() {
        assert_eq!(
            DatastorePath::parse("[LocalDS_0] haven/vm-1/disk-0.vmdk"),
            Some(DatastorePath {
                datastore: "LocalDS_0".into(),
                path: "haven/vm-1/disk-0.vmdk".into()
            })
        );
        assert_eq!(DatastorePath::parse("[ds] "), None);
        assert_eq!(DatastorePath::parse("ds/x.vmdk"), None);
        assert_eq!(json("a\"b\\c\n\u{1}"), r#""a\"b\\c\n\u0001""#);
    }
}
