//! Azure virtual machines through Azure Resource Manager (ARM): the inventory of a resource
//! group's VMs (size, disks, network adapters, power), power off and on, and at failover a
//! replica VM made from the master target's page blobs.
//!
//! A replica is three kinds of resource, each tagged `haven-replica` with the VM's name so a
//! cleanup deletes exactly what was made: a managed disk per replica disk, imported from its
//! page blob (`createOption: Import`, the blob's URL and the storage account's id); a network
//! adapter per network, in the subnet named by the machine's `subnet` of the mapped virtual
//! network (`vnet` for a machine without known adapters), with its static address when one is
//! given; then the VM (`vmSize`, the first disk attached as the OS disk, the others as data
//! disks, the adapters, the availability set), started.
//!
//! The service principal's token comes from the Microsoft identity platform's token endpoint
//! (client credentials) and is kept until a minute before it expires. Long operations are
//! followed through `Azure-AsyncOperation` (or `Location`) until they succeed. This file is the
//! ARM logic over a [`Transport`] (natively testable); `plugin.rs` is the component.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde_json::{Value, json};

#[cfg(target_arch = "wasm32")]
mod plugin;

/// API versions spoken, per resource provider.
pub const API_COMPUTE: &str = "2024-07-01";
pub const API_DISKS: &str = "2024-03-02";
pub const API_NETWORK: &str = "2024-05-01";
pub const API_SUBSCRIPTIONS: &str = "2022-12-01";

/// Most disks (or adapters) of one replica VM looked for when cleaning up after it.
const MAX_RESOURCES: usize = 64;

/// Longest a long-running operation is followed.
const OPERATION_POLLS: u32 = 600;

/// An HTTP answer: status, headers (lower-case names) and body.
pub type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// A VM size: its name, CPUs and memory (MiB).
type Size = (String, u32, u64);

/// What the adapter sends requests through (the host's HTTP in the component).
pub trait Transport {
    /// Sends one request; the status, headers (lower-case names) and body.
    fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Answer, String>;
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// Waits about `ms` milliseconds between polls of an operation.
    fn pause(&self, ms: u64);
}

/// The adapter's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub subscription_id: String,
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: String,
    /// `https://management.azure.com` unless said.
    pub arm_endpoint: String,
    /// `https://login.microsoftonline.com` unless said.
    pub login_endpoint: String,
    /// The resource group whose VMs the inventory lists; none: the whole subscription.
    pub resource_group: Option<String>,
    /// Where replicas are made unless a machine says (`location`).
    pub location: Option<String>,
    /// The container of the replica page blobs (`https://ACCOUNT.blob.core.windows.net/C`).
    pub blob_container_url: Option<String>,
    /// The storage account's resource id (ARM needs it to import a blob).
    pub storage_account_id: Option<String>,
}

/// The settings an adapter instance knows.
pub const SETTINGS: [&str; 10] = [
    "subscription_id",
    "tenant_id",
    "client_id",
    "client_secret",
    "arm_endpoint",
    "login_endpoint",
    "resource_group",
    "location",
    "blob_container_url",
    "storage_account_id",
];

impl Settings {
    pub fn from(get: impl Fn(&str) -> Option<String>) -> Result<Settings, String> {
        let required = |name: &str| {
            get(name).filter(|v| !v.is_empty()).ok_or_else(|| {
                format!("setting `{name}` is required; add it to the adapter's `settings`")
            })
        };
        let endpoint = |name: &str, default: &str| {
            get(name)
                .unwrap_or_else(|| default.to_string())
                .trim_end_matches('/')
                .to_string()
        };
        Ok(Settings {
            subscription_id: required("subscription_id")?,
            tenant_id: required("tenant_id")?,
            client_id: required("client_id")?,
            client_secret: required("client_secret")?,
            arm_endpoint: endpoint("arm_endpoint", "https://management.azure.com"),
            login_endpoint: endpoint("login_endpoint", "https://login.microsoftonline.com"),
            resource_group: get("resource_group"),
            location: get("location"),
            blob_container_url: get("blob_container_url").map(|u| u.trim_end_matches('/').into()),
            storage_account_id: get("storage_account_id"),
        })
    }
}

/// Power state as the inventory reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    Running,
    Stopped,
    Unknown,
}

/// A disk of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// The managed disk's resource id.
    pub id: String,
    pub name: String,
    pub size: u64,
}

/// A network adapter of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    pub id: String,
    /// `VNET/SUBNET`.
    pub network: String,
    pub mac: String,
    pub addresses: Vec<String>,
}

/// A VM as the inventory sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub uuid: String,
    pub power: Power,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    pub properties: Vec<(String, String)>,
}

/// A replica to define: what the host's `replica-spec` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    /// Each disk's location in the replica container (the master target's image name).
    pub disks: Vec<String>,
    /// Each network adapter: the mapped network (a virtual network's name) and its address.
    pub nics: Vec<(String, Option<String>)>,
    /// The machine's target settings (`resource-group`, `vm-size`, …).
    pub options: BTreeMap<String, String>,
}

/// The ARM client.
pub struct Arm<T: Transport> {
    pub t: T,
    pub s: Settings,
    token: RefCell<Option<(String, u64)>>,
    sizes: RefCell<BTreeMap<String, Vec<Size>>>,
}

/// The last part of a resource id (its name).
fn leaf(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

/// The value after `/key/` in resource id `id`.
fn part<'a>(id: &'a str, key: &str) -> Option<&'a str> {
    let mut it = id.split('/');
    while let Some(p) = it.next() {
        if p.eq_ignore_ascii_case(key) {
            return it.next();
        }
    }
    None
}

/// The api-version of requests on resource id (or path) `id`.
fn api_version(id: &str) -> &'static str {
    let lower = id.to_ascii_lowercase();
    if lower.contains("/microsoft.network/") {
        API_NETWORK
    } else if lower.contains("/microsoft.compute/disks") {
        API_DISKS
    } else if lower.contains("/providers/") {
        API_COMPUTE
    } else {
        API_SUBSCRIPTIONS
    }
}

fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The ARM error of an answer: `code: message`.
fn arm_error(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    match (v["error"]["code"].as_str(), v["error"]["message"].as_str()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        _ => String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
    }
}

impl<T: Transport> Arm<T> {
    pub fn new(t: T, s: Settings) -> Arm<T> {
        Arm {
            t,
            s,
            token: RefCell::new(None),
            sizes: RefCell::new(BTreeMap::new()),
        }
    }

    /// The service principal's access token for ARM (kept until a minute before it expires).
    fn token(&self) -> Result<String, String> {
        let now = self.t.now_ms();
        if let Some((token, until)) = self.token.borrow().as_ref()
            && now < *until
        {
            return Ok(token.clone());
        }
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            self.s.login_endpoint, self.s.tenant_id
        );
        let body = format!(
            "grant_type=client_credentials&client_id={}&client_secret={}&scope={}",
            form_encode(&self.s.client_id),
            form_encode(&self.s.client_secret),
            form_encode(&format!("{}/.default", self.s.arm_endpoint))
        );
        let (status, _, answer) = self.t.send(
            "POST",
            &url,
            &[("content-type", "application/x-www-form-urlencoded")],
            body.as_bytes(),
        )?;
        let v: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
        if status != 200 {
            return Err(format!(
                "the token endpoint refused the service principal {} (HTTP {status}): {}; \
                 check `tenant_id`, `client_id` and `client_secret`",
                self.s.client_id,
                v["error_description"]
                    .as_str()
                    .or(v["error"].as_str())
                    .unwrap_or("no reason given")
            ));
        }
        let token = v["access_token"]
            .as_str()
            .ok_or("the token endpoint answered without an access_token")?
            .to_string();
        let expires = v["expires_in"].as_u64().unwrap_or(3600);
        let until = now + expires.saturating_sub(60) * 1000;
        *self.token.borrow_mut() = Some((token.clone(), until));
        Ok(token)
    }

    /// `method` on ARM path `path` (from `/subscriptions/…`, `query` appended after the
    /// api-version), following a long-running operation to its end. The answer's body.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        query: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let url = format!(
            "{}{path}?api-version={}{query}",
            self.s.arm_endpoint,
            api_version(path)
        );
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let auth = format!("Bearer {}", self.token()?);
        let mut headers = vec![("authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        let (status, answer_headers, answer) = self.t.send(method, &url, &headers, &bytes)?;
        if !(200..300).contains(&status) {
            return Err(format!(
                "ARM {method} {path}: HTTP {status}: {}",
                arm_error(&answer)
            ));
        }
        let header = |name: &str| {
            answer_headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        if (status == 201 || status == 202)
            && let Some(op) = header("azure-asyncoperation").or_else(|| header("location"))
        {
            self.follow(&op, method, path)?;
        }
        let v = match answer.is_empty() {
            true => Value::Null,
            false => serde_json::from_slice(&answer)
                .map_err(|e| format!("ARM {method} {path}: an answer that is not JSON: {e}"))?,
        };
        Ok((status, v))
    }

    /// Polls operation `url` until it succeeds (or fails, or takes too long).
    fn follow(&self, url: &str, method: &str, path: &str) -> Result<(), String> {
        for _ in 0..OPERATION_POLLS {
            let auth = format!("Bearer {}", self.token()?);
            let (status, _, body) = self.t.send("GET", url, &[("authorization", &auth)], &[])?;
            if status == 200 || status == 201 || status == 202 {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                match v["status"].as_str() {
                    Some("Succeeded") | None if status != 202 => return Ok(()),
                    Some("Failed") | Some("Canceled") => {
                        return Err(format!(
                            "ARM {method} {path}: the operation {}: {}",
                            v["status"].as_str().unwrap_or("failed").to_lowercase(),
                            v["error"]["message"].as_str().unwrap_or("no reason given")
                        ));
                    }
                    _ => {}
                }
            } else {
                return Err(format!(
                    "ARM {method} {path}: following its operation: HTTP {status}: {}",
                    arm_error(&body)
                ));
            }
            self.t.pause(1000);
        }
        Err(format!(
            "ARM {method} {path}: the operation did not end in time"
        ))
    }

    /// The subscription's display name: the credentials and the endpoint work.
    pub fn check(&self) -> Result<String, String> {
        let (_, v) = self.call(
            "GET",
            &format!("/subscriptions/{}", self.s.subscription_id),
            "",
            None,
        )?;
        Ok(format!(
            "subscription {} ({})",
            v["displayName"].as_str().unwrap_or("?"),
            self.s.subscription_id
        ))
    }

    fn scope(&self) -> String {
        match &self.s.resource_group {
            Some(rg) => format!(
                "/subscriptions/{}/resourceGroups/{rg}",
                self.s.subscription_id
            ),
            None => format!("/subscriptions/{}", self.s.subscription_id),
        }
    }

    /// CPUs and memory of size `size` in `location`.
    fn size_of(&self, location: &str, size: &str) -> Result<(u32, u64), String> {
        if !self.sizes.borrow().contains_key(location) {
            let path = format!(
                "/subscriptions/{}/providers/Microsoft.Compute/locations/{location}/vmSizes",
                self.s.subscription_id
            );
            let (_, v) = self.call("GET", &path, "", None)?;
            let sizes = v["value"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or_default().to_string(),
                        s["numberOfCores"].as_u64().unwrap_or(0) as u32,
                        s["memoryInMB"].as_u64().unwrap_or(0),
                    )
                })
                .collect();
            self.sizes.borrow_mut().insert(location.to_string(), sizes);
        }
        Ok(self.sizes.borrow()[location]
            .iter()
            .find(|(n, _, _)| n.eq_ignore_ascii_case(size))
            .map_or((0, 0), |(_, c, m)| (*c, *m)))
    }

    /// The VMs of the resource group (or subscription).
    pub fn inventory(&self) -> Result<Vec<Vm>, String> {
        let path = format!(
            "{}/providers/Microsoft.Compute/virtualMachines",
            self.scope()
        );
        let (_, v) = self.call("GET", &path, "", None)?;
        let mut vms = Vec::new();
        for vm in v["value"].as_array().into_iter().flatten() {
            vms.push(self.vm(vm)?);
        }
        Ok(vms)
    }

    fn vm(&self, vm: &Value) -> Result<Vm, String> {
        let id = vm["id"].as_str().unwrap_or_default().to_string();
        let p = &vm["properties"];
        let location = vm["location"].as_str().unwrap_or_default();
        let size = p["hardwareProfile"]["vmSize"].as_str().unwrap_or_default();
        let (cpus, memory_mib) = self.size_of(location, size)?;
        let (_, view) = self.call("GET", &format!("{id}/instanceView"), "", None)?;
        let power = view["statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["code"].as_str())
            .find_map(|c| c.strip_prefix("PowerState/"))
            .map_or(Power::Unknown, |s| match s {
                "running" | "starting" => Power::Running,
                "stopped" | "deallocated" | "stopping" | "deallocating" => Power::Stopped,
                _ => Power::Unknown,
            });
        let storage = &p["storageProfile"];
        let disks = std::iter::once(&storage["osDisk"])
            .chain(storage["dataDisks"].as_array().into_iter().flatten())
            .filter(|d| !d.is_null())
            .map(|d| Disk {
                id: d["managedDisk"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                name: d["name"].as_str().unwrap_or_default().to_string(),
                size: d["diskSizeGB"].as_u64().unwrap_or(0) << 30,
            })
            .collect();
        let mut nics = Vec::new();
        for n in p["networkProfile"]["networkInterfaces"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let nic_id = n["id"].as_str().unwrap_or_default();
            let (_, nic) = self.call("GET", nic_id, "", None)?;
            let configs: Vec<&Value> = nic["properties"]["ipConfigurations"]
                .as_array()
                .into_iter()
                .flatten()
                .collect();
            let subnet = configs
                .first()
                .and_then(|c| c["properties"]["subnet"]["id"].as_str())
                .unwrap_or_default();
            nics.push(Nic {
                id: nic_id.to_string(),
                network: format!(
                    "{}/{}",
                    part(subnet, "virtualNetworks").unwrap_or_default(),
                    part(subnet, "subnets").unwrap_or_default()
                ),
                mac: nic["properties"]["macAddress"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                addresses: configs
                    .iter()
                    .filter_map(|c| c["properties"]["privateIPAddress"].as_str())
                    .map(str::to_string)
                    .collect(),
            });
        }
        Ok(Vm {
            name: vm["name"].as_str().unwrap_or_default().to_string(),
            uuid: p["vmId"].as_str().unwrap_or_default().to_string(),
            power,
            cpus,
            memory_mib,
            disks,
            nics,
            properties: vec![
                ("vm-size".into(), size.to_string()),
                ("location".into(), location.to_string()),
                (
                    "resource-group".into(),
                    part(&id, "resourceGroups").unwrap_or_default().to_string(),
                ),
            ],
            id,
        })
    }

    pub fn power_off(&self, id: &str, hard: bool) -> Result<(), String> {
        let query = if hard { "&skipShutdown=true" } else { "" };
        self.call("POST", &format!("{id}/powerOff"), query, None)
            .map(drop)
    }

    pub fn power_on(&self, id: &str) -> Result<(), String> {
        self.call("POST", &format!("{id}/start"), "", None)
            .map(drop)
    }

    /// Defines the replica VM of `spec` (module docs); its id and a summary.
    pub fn define(&self, spec: &Spec) -> Result<(String, String), String> {
        let (plan, resources) = replica_plan(&self.s, spec)?;
        for (path, body) in &resources {
            self.call("PUT", path, "", Some(body))?;
        }
        Ok((plan.vm_id, plan.summary))
    }

    /// Deletes VM `id` and the disks and adapters made with it (tagged so). Asked again after
    /// the VM is gone (a retry), it deletes what is left of them, found by their names.
    pub fn delete(&self, id: &str) -> Result<(), String> {
        let vm = match self.call("GET", id, "", None) {
            Ok((_, vm)) => vm,
            Err(e) if e.contains("HTTP 404") => return self.delete_leftovers(id),
            Err(e) => return Err(e),
        };
        let name = vm["name"].as_str().unwrap_or_default().to_string();
        if vm["tags"]["haven-replica"].as_str() != Some(name.as_str()) {
            return Err(format!(
                "VM {id} was not made by Haven (no haven-replica tag): it is not deleted"
            ));
        }
        let storage = &vm["properties"]["storageProfile"];
        let disks: Vec<String> = std::iter::once(&storage["osDisk"])
            .chain(storage["dataDisks"].as_array().into_iter().flatten())
            .filter_map(|d| d["managedDisk"]["id"].as_str().map(str::to_string))
            .collect();
        let nics: Vec<String> = vm["properties"]["networkProfile"]["networkInterfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["id"].as_str().map(str::to_string))
            .collect();
        self.call("DELETE", id, "", None)?;
        for r in nics.iter().chain(&disks) {
            let (_, v) = self.call("GET", r, "", None)?;
            if v["tags"]["haven-replica"].as_str() == Some(name.as_str()) {
                self.call("DELETE", r, "", None)?;
            }
        }
        Ok(())
    }
}

impl<T: Transport> Arm<T> {
    /// Deletes the disks and adapters made for the replica VM `id` that is gone: those named
    /// as [`replica_plan`] names them and tagged with its name.
    fn delete_leftovers(&self, id: &str) -> Result<(), String> {
        let name = leaf(id);
        let group = id
            .split("/providers/")
            .next()
            .ok_or_else(|| format!("{id} is not a resource id"))?;
        for kind in [
            "Microsoft.Network/networkInterfaces/",
            "Microsoft.Compute/disks/",
        ] {
            let suffix = if kind.ends_with("disks/") {
                "disk"
            } else {
                "nic"
            };
            // Deleted in order: the first ones may be gone already, the rest follow on.
            let mut seen = false;
            for i in 0..=MAX_RESOURCES {
                let r = format!("{group}/providers/{kind}{name}-{suffix}{i}");
                let v = match self.call("GET", &r, "", None) {
                    Ok((_, v)) => v,
                    Err(e) if e.contains("HTTP 404") && seen => break,
                    Err(e) if e.contains("HTTP 404") => continue,
                    Err(e) => return Err(e),
                };
                seen = true;
                if v["tags"]["haven-replica"].as_str() == Some(name) {
                    self.call("DELETE", &r, "", None)?;
                }
            }
        }
        Ok(())
    }
}

/// The ids of what a replica is made of, and a summary of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub vm_id: String,
    pub summary: String,
}

/// The resources of replica `spec`, in the order they are made (disks, adapters, the VM):
/// each path and body.
pub fn replica_plan(s: &Settings, spec: &Spec) -> Result<(Plan, Vec<(String, Value)>), String> {
    let opt = |k: &str| spec.options.get(k).filter(|v| !v.is_empty()).cloned();
    let need = |k: &str| {
        opt(k).ok_or_else(|| {
            format!(
                "machine target setting `{}` is needed for an Azure replica",
                k.replace('-', "_")
            )
        })
    };
    let rg = need("resource-group")?;
    let location = opt("location")
        .or(s.location.clone())
        .ok_or("`location`: give it in the machine's target settings or the adapter's settings")?;
    let vm_size = need("vm-size")?;
    let subnet = need("subnet")?;
    let blob_url = s
        .blob_container_url
        .clone()
        .ok_or("adapter setting `blob_container_url` (the replica container's URL) is needed")?;
    let storage_account = s.storage_account_id.clone().ok_or(
        "adapter setting `storage_account_id` (the storage account's resource id) is needed",
    )?;
    if spec.disks.is_empty() {
        return Err(format!("replica {}: no disks", spec.name));
    }
    let group = format!("/subscriptions/{}/resourceGroups/{rg}", s.subscription_id);
    let tags = json!({ "haven-replica": spec.name });
    let mut resources = Vec::new();
    let mut disk_ids = Vec::new();
    for (i, location_in_container) in spec.disks.iter().enumerate() {
        let id = format!(
            "{group}/providers/Microsoft.Compute/disks/{}-disk{i}",
            spec.name
        );
        let mut props = json!({
            "creationData": {
                "createOption": "Import",
                "sourceUri": format!("{blob_url}/{location_in_container}"),
                "storageAccountId": storage_account,
            },
        });
        if i == 0 {
            props["osType"] = json!(opt("os-type").unwrap_or_else(|| "Linux".into()));
        }
        resources.push((
            id.clone(),
            json!({ "location": location, "tags": tags, "sku": { "name": "Standard_LRS" }, "properties": props }),
        ));
        disk_ids.push(id);
    }
    // One adapter per network (a virtual network's name); without any, one in `vnet`. The
    // first takes `static-ip` when the network mapping gave it no address.
    let mut nets: Vec<(String, Option<String>)> = spec.nics.clone();
    if nets.is_empty() {
        nets.push((need("vnet")?, None));
    }
    if let Some(first) = nets.first_mut()
        && first.1.is_none()
    {
        first.1 = opt("static-ip");
    }
    let mut nic_ids = Vec::new();
    for (i, (vnet, address)) in nets.iter().enumerate() {
        let id = format!(
            "{group}/providers/Microsoft.Network/networkInterfaces/{}-nic{i}",
            spec.name
        );
        let vnet_rg = opt("vnet-resource-group").unwrap_or_else(|| rg.clone());
        let subnet_id = format!(
            "/subscriptions/{}/resourceGroups/{vnet_rg}/providers/Microsoft.Network/virtualNetworks/{vnet}/subnets/{subnet}",
            s.subscription_id
        );
        let mut ip =
            json!({ "subnet": { "id": subnet_id }, "privateIPAllocationMethod": "Dynamic" });
        if let Some(a) = address {
            ip["privateIPAllocationMethod"] = json!("Static");
            ip["privateIPAddress"] = json!(a);
        }
        resources.push((
            id.clone(),
            json!({
                "location": location,
                "tags": tags,
                "properties": { "ipConfigurations": [ { "name": "ipconfig1", "properties": ip } ] },
            }),
        ));
        nic_ids.push(id);
    }
    let vm_id = format!(
        "{group}/providers/Microsoft.Compute/virtualMachines/{}",
        spec.name
    );
    let data_disks: Vec<Value> = disk_ids[1..]
        .iter()
        .enumerate()
        .map(|(lun, id)| json!({ "lun": lun, "createOption": "Attach", "managedDisk": { "id": id } }))
        .collect();
    let mut props = json!({
        "hardwareProfile": { "vmSize": vm_size },
        "storageProfile": {
            "osDisk": {
                "osType": opt("os-type").unwrap_or_else(|| "Linux".into()),
                "createOption": "Attach",
                "managedDisk": { "id": disk_ids[0] },
            },
            "dataDisks": data_disks,
        },
        "networkProfile": {
            "networkInterfaces": nic_ids.iter().enumerate()
                .map(|(i, id)| json!({ "id": id, "properties": { "primary": i == 0 } }))
                .collect::<Vec<_>>(),
        },
    });
    if let Some(set) = opt("availability-set") {
        props["availabilitySet"] = json!({
            "id": format!("{group}/providers/Microsoft.Compute/availabilitySets/{set}")
        });
    }
    resources.push((
        vm_id.clone(),
        json!({ "location": location, "tags": tags, "properties": props }),
    ));
    let summary = format!(
        "{} ({vm_size}) in {rg}, {location}: {} disk(s) imported from {blob_url}, network {}",
        spec.name,
        disk_ids.len(),
        nets.iter()
            .map(|(v, a)| format!(
                "{v}/{subnet}{}",
                a.as_ref().map_or(String::new(), |a| format!(" {a}"))
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok((Plan { vm_id, summary }, resources))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::from(|k| {
            Some(
                match k {
                    "subscription_id" => "sub1",
                    "tenant_id" => "t1",
                    "client_id" => "c1",
                    "client_secret" => "s1",
                    "location" => "westeurope",
                    "blob_container_url" => "https://acct.blob.core.windows.net/replicas/",
                    "storage_account_id" => "/subscriptions/sub1/resourceGroups/rg-s/providers/Microsoft.Storage/storageAccounts/acct",
                    _ => return None,
                }
                .to_string(),
            )
        })
        .unwrap()
    }

    fn spec() -> Spec {
        let options: BTreeMap<String, String> = [
            ("resource-group", "rg-dr"),
            ("vnet", "vnet-dr"),
            ("subnet", "snet-app"),
            ("availability-set", "avset-app"),
            ("vm-size", "Standard_D2s_v5"),
            ("static-ip", "10.1.0.5"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Spec {
            name: "web01".into(),
            disks: vec![
                "failover/ab/disk1-point7.azure".into(),
                "failover/ab/disk2-point7.azure".into(),
            ],
            nics: vec![],
            options,
        }
    }

    #[test]
    fn a_replica_is_disks_imported_from_blobs_an_adapter_and_the_vm() {
        let (plan, r) = replica_plan(&settings(), &spec()).unwrap();
        let g = "/subscriptions/sub1/resourceGroups/rg-dr/providers";
        let paths: Vec<&str> = r.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                format!("{g}/Microsoft.Compute/disks/web01-disk0"),
                format!("{g}/Microsoft.Compute/disks/web01-disk1"),
                format!("{g}/Microsoft.Network/networkInterfaces/web01-nic0"),
                format!("{g}/Microsoft.Compute/virtualMachines/web01"),
            ]
        );
        assert_eq!(plan.vm_id, paths[3]);
        let disk = &r[0].1;
        assert_eq!(
            disk["properties"]["creationData"]["sourceUri"],
            "https://acct.blob.core.windows.net/replicas/failover/ab/disk1-point7.azure"
        );
        assert_eq!(disk["properties"]["osType"], "Linux");
        assert!(r[1].1["properties"]["osType"].is_null());
        let ip = &r[2].1["properties"]["ipConfigurations"][0]["properties"];
        assert_eq!(ip["privateIPAddress"], "10.1.0.5");
        assert!(
            ip["subnet"]["id"]
                .as_str()
                .unwrap()
                .ends_with("virtualNetworks/vnet-dr/subnets/snet-app")
        );
        let vm = &r[3].1["properties"];
        assert_eq!(
            vm["storageProfile"]["dataDisks"][0]["managedDisk"]["id"],
            paths[1]
        );
        assert!(
            vm["availabilitySet"]["id"]
                .as_str()
                .unwrap()
                .ends_with("availabilitySets/avset-app")
        );
    }

    #[test]
    fn missing_target_settings_are_named() {
        let mut s = spec();
        s.options.remove("vm-size");
        let e = replica_plan(&settings(), &s).unwrap_err();
        assert!(e.contains("`vm_size`"), "{e}");
        let e = Settings::from(|_| None).unwrap_err();
        assert!(e.contains("`subscription_id`"), "{e}");
    }

    #[test]
    fn ids_give_their_parts() {
        let id = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v1/subnets/sn";
        assert_eq!(part(id, "virtualNetworks"), Some("v1"));
        assert_eq!(part(id, "resourceGroups"), Some("rg"));
        assert_eq!(leaf(id), "sn");
        assert_eq!(api_version(id), API_NETWORK);
        assert_eq!(api_version("/subscriptions/s"), API_SUBSCRIPTIONS);
    }
}
