//! From retrieved properties to [`Machine`]s: one `RetrievePropertiesEx` over a container view
//! of virtual machines, hosts, networks, folders and datacenters gives everything inventory
//! needs, so it costs one round trip (plus paging) however many machines there are.
//!
//! - A disk is a `VirtualDisk` device: id = device key, name = its label, size =
//!   `capacityInBytes` (vSphere 5.5+; else `capacityInKB` × 1024), location = its backing's
//!   `fileName` (`[ds] vm/vm.vmdk`). Sectors are 512 bytes.
//! - A network adapter is a device with a `macAddress` (every `VirtualEthernetCard`): its
//!   network is the backing's `deviceName` (a standard network) or the name of the distributed
//!   port group whose key the backing names; its addresses are what VMware Tools reports for
//!   that device (`guest.net`).
//! - Templates are left out: they cannot run, so there is nothing to protect.

use std::collections::HashMap;

use crate::model::{Disk, Machine, Nic, PowerState};
use crate::soap::{ObjectContent, PropSpec};
use crate::xml::Element;

/// The types the inventory view shows.
pub const VIEW_KINDS: &[&str] = &[
    "VirtualMachine",
    "HostSystem",
    "Network",
    "Folder",
    "Datacenter",
];

/// Virtual machine properties read.
pub const VM_PATHS: &[&str] = &[
    "name",
    "parent",
    "config.uuid",
    "config.template",
    "config.guestId",
    "config.guestFullName",
    "config.files.vmPathName",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "runtime.powerState",
    "runtime.host",
    "guest.toolsRunningStatus",
    "guest.net",
];

/// What to retrieve of each type of the view.
pub fn prop_specs() -> Vec<PropSpec<'static>> {
    vec![
        PropSpec {
            kind: "VirtualMachine",
            paths: VM_PATHS,
        },
        PropSpec {
            kind: "HostSystem",
            paths: &["name"],
        },
        PropSpec {
            kind: "Network",
            paths: &["name"],
        },
        PropSpec {
            kind: "DistributedVirtualPortgroup",
            paths: &["key"],
        },
        PropSpec {
            kind: "Folder",
            paths: &["name", "parent"],
        },
        PropSpec {
            kind: "Datacenter",
            paths: &["name", "parent"],
        },
    ]
}

/// Names of the things a machine refers to, by managed object id.
#[derive(Debug, Default)]
struct Names {
    hosts: HashMap<String, String>,
    /// Distributed port group key → port group name.
    portgroups: HashMap<String, String>,
    /// Folder or datacenter id → (name, parent id, whether it is a datacenter).
    tree: HashMap<String, (String, Option<String>, bool)>,
}

impl Names {
    fn of(objects: &[ObjectContent]) -> Self {
        let mut names = Names::default();
        for o in objects {
            match o.obj.kind.as_str() {
                "HostSystem" => {
                    names
                        .hosts
                        .insert(o.obj.value.clone(), o.text("name").to_owned());
                }
                "DistributedVirtualPortgroup" => {
                    let key = match o.text("key") {
                        "" => o.obj.value.clone(),
                        key => key.to_owned(),
                    };
                    names.portgroups.insert(key, o.text("name").to_owned());
                }
                "Folder" | "Datacenter" => {
                    names.tree.insert(
                        o.obj.value.clone(),
                        (
                            o.text("name").to_owned(),
                            o.moref("parent").map(|p| p.value),
                            o.obj.kind == "Datacenter",
                        ),
                    );
                }
                _ => {}
            }
        }
        names
    }

    /// The folders and datacenters from `folder` up, nearest first: (name, is a datacenter).
    /// The root folder (not in the view) ends the walk.
    fn ancestors(&self, folder: &str) -> Vec<(&str, bool)> {
        let mut chain = Vec::new();
        let mut at = Some(folder);
        while let Some(id) = at {
            let Some((name, parent, is_dc)) = self.tree.get(id) else {
                break;
            };
            chain.push((name.as_str(), *is_dc));
            at = parent.as_deref();
            if chain.len() > 64 {
                break; // a cycle would be vCenter's bug; do not loop on it
            }
        }
        chain
    }

    /// `/DC0/vm/team` for a folder.
    fn path(&self, folder: &str) -> String {
        let names: Vec<&str> = self
            .ancestors(folder)
            .iter()
            .rev()
            .map(|(n, _)| *n)
            .collect();
        format!("/{}", names.join("/"))
    }

    /// The datacenter a folder is in.
    fn datacenter(&self, folder: &str) -> Option<&str> {
        self.ancestors(folder)
            .into_iter()
            .find(|(_, is_dc)| *is_dc)
            .map(|(n, _)| n)
    }
}

/// The machines among `objects` (only those of datacenter `datacenter`, when given), sorted by
/// name (then id).
pub fn machines(objects: &[ObjectContent], datacenter: Option<&str>) -> Vec<Machine> {
    let names = Names::of(objects);
    let mut machines: Vec<Machine> = objects
        .iter()
        .filter(|o| o.obj.kind == "VirtualMachine")
        .filter(|o| o.text("config.template") != "true")
        .filter(|o| {
            datacenter.is_none_or(|dc| {
                o.moref("parent")
                    .is_some_and(|p| names.datacenter(&p.value) == Some(dc))
            })
        })
        .map(|o| machine(o, &names))
        .collect();
    machines.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
    machines
}

fn machine(o: &ObjectContent, names: &Names) -> Machine {
    let devices: &[Element] = o
        .prop("config.hardware.device")
        .map(|d| d.children.as_slice())
        .unwrap_or_default();
    let guest_nets: &[Element] = o
        .prop("guest.net")
        .map(|d| d.children.as_slice())
        .unwrap_or_default();
    let mut properties = Vec::new();
    let mut property = |key: &str, value: String| {
        if !value.is_empty() {
            properties.push((key.to_owned(), value));
        }
    };
    property("guest-id", o.text("config.guestId").to_owned());
    property("guest-name", o.text("config.guestFullName").to_owned());
    if let Some(host) = o.moref("runtime.host") {
        property(
            "host",
            names.hosts.get(&host.value).cloned().unwrap_or(host.value),
        );
    }
    if let Some(parent) = o.moref("parent") {
        property("folder", names.path(&parent.value));
    }
    property("vm-path", o.text("config.files.vmPathName").to_owned());
    property("tools", o.text("guest.toolsRunningStatus").to_owned());
    Machine {
        id: o.obj.value.clone(),
        name: o.text("name").to_owned(),
        uuid: o.text("config.uuid").to_owned(),
        power: PowerState::from_vim(o.text("runtime.powerState")),
        cpus: o.text("config.hardware.numCPU").parse().unwrap_or(0),
        memory_mib: o.text("config.hardware.memoryMB").parse().unwrap_or(0),
        disks: devices.iter().filter_map(disk).collect(),
        nics: devices
            .iter()
            .filter_map(|d| nic(d, guest_nets, names))
            .collect(),
        properties,
    }
}

/// The device as a disk, if it is a `VirtualDisk`.
pub fn disk(device: &Element) -> Option<Disk> {
    if device.xsi_type.as_deref() != Some("VirtualDisk") {
        return None;
    }
    let bytes = device
        .text_at(&["capacityInBytes"])
        .and_then(|b| b.parse::<u64>().ok())
        .filter(|b| *b > 0);
    let kib = device
        .text_at(&["capacityInKB"])
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0);
    Some(Disk {
        id: device.text_at(&["key"]).unwrap_or_default().to_owned(),
        name: device
            .text_at(&["deviceInfo", "label"])
            .unwrap_or_default()
            .to_owned(),
        size: bytes.unwrap_or(kib.saturating_mul(1024)),
        sector_size: 512,
        location: device
            .text_at(&["backing", "fileName"])
            .unwrap_or_default()
            .to_owned(),
    })
}

/// The device as a network adapter, if it is one (it has a MAC address field).
fn nic(device: &Element, guest_nets: &[Element], names: &Names) -> Option<Nic> {
    let mac = device.text_at(&["macAddress"])?.to_ascii_lowercase();
    let key = device.text_at(&["key"]).unwrap_or_default().to_owned();
    let backing = device.child("backing");
    let network = match backing.and_then(|b| b.xsi_type.as_deref()) {
        Some("VirtualEthernetCardDistributedVirtualPortBackingInfo") => {
            let pg = backing
                .and_then(|b| b.text_at(&["port", "portgroupKey"]))
                .unwrap_or_default();
            names.portgroups.get(pg).cloned().unwrap_or(pg.to_owned())
        }
        Some("VirtualEthernetCardOpaqueNetworkBackingInfo") => backing
            .and_then(|b| b.text_at(&["opaqueNetworkId"]))
            .unwrap_or_default()
            .to_owned(),
        _ => backing
            .and_then(|b| b.text_at(&["deviceName"]))
            .unwrap_or_default()
            .to_owned(),
    };
    let addresses = guest_nets
        .iter()
        .filter(|g| g.text_at(&["deviceConfigId"]) == Some(key.as_str()))
        .flat_map(|g| g.children_named("ipAddress").map(|a| a.value().to_owned()))
        .filter(|a| !a.is_empty())
        .collect();
    Some(Nic {
        id: key,
        network,
        mac,
        addresses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soap::{parse_answer, parse_objects};

    /// A trimmed answer of vcsim 0.24.2 (namespace prefix and device list as it sends them),
    /// plus a standard-network NIC with a guest address and a template.
    const ANSWER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><RetrievePropertiesExResponse xmlns="urn:vim25"><returnval>
<objects><obj type="VirtualMachine">vm-57</obj>
<propSet><name>name</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:string">DC0_H0_VM0</val></propSet>
<propSet><name>config.uuid</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:string">265104de-1472-547c-b873-6dc7883fb6cb</val></propSet>
<propSet><name>runtime.powerState</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="VirtualMachinePowerState">poweredOn</val></propSet>
<propSet><name>config.hardware.numCPU</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:int">1</val></propSet>
<propSet><name>config.hardware.memoryMB</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:int">32</val></propSet>
<propSet><name>config.hardware.device</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="ArrayOfVirtualDevice">
 <VirtualDevice XMLSchema-instance:type="ParaVirtualSCSIController"><key>202</key><deviceInfo XMLSchema-instance:type="Description"><label>pvscsi-202</label><summary>pvscsi-202</summary></deviceInfo><busNumber>0</busNumber></VirtualDevice>
 <VirtualDevice XMLSchema-instance:type="VirtualCdrom"><key>1697971134</key><deviceInfo XMLSchema-instance:type="Description"><label>cdrom-1697971134</label><summary>cdrom</summary></deviceInfo><backing XMLSchema-instance:type="VirtualCdromAtapiBackingInfo"><deviceName>cdrom--201-824638397344</deviceName><useAutoDetect>false</useAutoDetect></backing><controllerKey>202</controllerKey><unitNumber>0</unitNumber></VirtualDevice>
 <VirtualDevice XMLSchema-instance:type="VirtualDisk"><key>255511522</key><deviceInfo XMLSchema-instance:type="Description"><label>disk-202-0</label><summary>1,024 KB</summary></deviceInfo><backing XMLSchema-instance:type="VirtualDiskFlatVer2BackingInfo"><fileName>[LocalDS_0] DC0_H0_VM0/disk1.vmdk</fileName><datastore type="Datastore">/tmp/x@folder-5</datastore><diskMode>persistent</diskMode></backing><controllerKey>202</controllerKey><unitNumber>0</unitNumber><capacityInKB>1024</capacityInKB></VirtualDevice>
 <VirtualDevice XMLSchema-instance:type="VirtualDisk"><key>2001</key><deviceInfo XMLSchema-instance:type="Description"><label>Hard disk 2</label><summary>x</summary></deviceInfo><backing XMLSchema-instance:type="VirtualDiskFlatVer2BackingInfo"><fileName>[LocalDS_0] DC0_H0_VM0/disk2.vmdk</fileName></backing><capacityInKB>1</capacityInKB><capacityInBytes>1000</capacityInBytes></VirtualDevice>
 <VirtualDevice XMLSchema-instance:type="VirtualE1000"><key>4000</key><deviceInfo XMLSchema-instance:type="Description"><label>ethernet-0</label><summary>DVSwitch: fea9</summary></deviceInfo><backing XMLSchema-instance:type="VirtualEthernetCardDistributedVirtualPortBackingInfo"><port><switchUuid>fea9</switchUuid><portgroupKey>dvportgroup-13</portgroupKey></port></backing><controllerKey>100</controllerKey><unitNumber>7</unitNumber><addressType>generated</addressType><macAddress>00:0C:29:36:63:62</macAddress></VirtualDevice>
 <VirtualDevice XMLSchema-instance:type="VirtualVmxnet3"><key>4001</key><backing XMLSchema-instance:type="VirtualEthernetCardNetworkBackingInfo"><deviceName>VM Network</deviceName><network type="Network">network-7</network></backing><macAddress>00:50:56:00:00:02</macAddress></VirtualDevice>
</val></propSet>
<propSet><name>config.guestId</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:string">otherGuest</val></propSet>
<propSet><name>runtime.host</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="ManagedObjectReference" type="HostSystem">host-21</val></propSet>
<propSet><name>guest.net</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="ArrayOfGuestNicInfo"><GuestNicInfo><macAddress>00:50:56:00:00:02</macAddress><connected>true</connected><deviceConfigId>4001</deviceConfigId><ipAddress>10.0.0.5</ipAddress><ipAddress>fe80::1</ipAddress></GuestNicInfo></val></propSet>
<propSet><name>config.template</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:boolean">false</val></propSet>
<propSet><name>guest.toolsRunningStatus</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="xsd:string">guestToolsNotRunning</val></propSet>
<propSet><name>parent</name><val xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="ManagedObjectReference" type="Folder">folder-3</val></propSet>
</objects>
<objects><obj type="VirtualMachine">vm-99</obj>
<propSet><name>name</name><val>a-template</val></propSet>
<propSet><name>config.template</name><val>true</val></propSet>
</objects>
<objects><obj type="HostSystem">host-21</obj><propSet><name>name</name><val>DC0_H0</val></propSet></objects>
<objects><obj type="Network">network-7</obj><propSet><name>name</name><val>VM Network</val></propSet></objects>
<objects><obj type="DistributedVirtualPortgroup">dvportgroup-13</obj><propSet><name>name</name><val>DC0_DVPG0</val></propSet><propSet><name>key</name><val>dvportgroup-13</val></propSet></objects>
<objects><obj type="Folder">folder-3</obj><propSet><name>name</name><val>vm</val></propSet><propSet><name>parent</name><val type="Datacenter">datacenter-2</val></propSet></objects>
<objects><obj type="Datacenter">datacenter-2</obj><propSet><name>name</name><val>DC0</val></propSet><propSet><name>parent</name><val type="Folder">group-d1</val></propSet></objects>
</returnval></RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>"#;

    #[test]
    fn a_vcsim_machine() {
        let response = parse_answer(200, ANSWER.as_bytes()).unwrap().unwrap();
        let (objects, _) = parse_objects(&response);
        assert!(machines(&objects, Some("DC1")).is_empty());
        assert_eq!(machines(&objects, Some("DC0")), machines(&objects, None));
        let machines = machines(&objects, None);
        assert_eq!(machines.len(), 1, "the template is left out");
        assert_eq!(
            machines[0],
            Machine {
                id: "vm-57".into(),
                name: "DC0_H0_VM0".into(),
                uuid: "265104de-1472-547c-b873-6dc7883fb6cb".into(),
                power: PowerState::Running,
                cpus: 1,
                memory_mib: 32,
                disks: vec![
                    Disk {
                        id: "255511522".into(),
                        name: "disk-202-0".into(),
                        size: 1024 * 1024,
                        sector_size: 512,
                        location: "[LocalDS_0] DC0_H0_VM0/disk1.vmdk".into(),
                    },
                    Disk {
                        id: "2001".into(),
                        name: "Hard disk 2".into(),
                        size: 1000,
                        sector_size: 512,
                        location: "[LocalDS_0] DC0_H0_VM0/disk2.vmdk".into(),
                    },
                ],
                nics: vec![
                    Nic {
                        id: "4000".into(),
                        network: "DC0_DVPG0".into(),
                        mac: "00:0c:29:36:63:62".into(),
                        addresses: vec![],
                    },
                    Nic {
                        id: "4001".into(),
                        network: "VM Network".into(),
                        mac: "00:50:56:00:00:02".into(),
                        addresses: vec!["10.0.0.5".into(), "fe80::1".into()],
                    },
                ],
                properties: vec![
                    ("guest-id".into(), "otherGuest".into()),
                    ("host".into(), "DC0_H0".into()),
                    ("folder".into(), "/DC0/vm".into()),
                    ("tools".into(), "guestToolsNotRunning".into()),
                ],
            }
        );
    }
}
