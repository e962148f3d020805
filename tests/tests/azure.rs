//! Replicas in Azure page blobs, against Azurite: the page-blob writer (a `haven:plugin@0.2.0`
//! target writer that reaches only its granted storage endpoint) keeps a replica as a fixed
//! VHD page blob, which an independent client (Python's `azure-storage-blob`) downloads and
//! `qemu-img compare` finds equal to the source.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use haven_e2e::azurite::{self, Azurite};
use haven_e2e::nbd::NbdClient;
use haven_e2e::{Cluster, ClusterOptions, default_bin_dir, images_equal_as, mixed_disk, qemu_io};
use haven_host::{Access, Grants, Host, HostConfig, PluginSpec};

const MIB: u64 = 1 << 20;

fn plugin() -> PathBuf {
    default_bin_dir().join("../wasm32-wasip2/release/haven_azure_blob.wasm")
}

fn settings(a: &Azurite, container: &str) -> std::collections::BTreeMap<String, String> {
    [
        ("endpoint", a.endpoint()),
        ("container", container.to_string()),
        ("key", azurite::KEY.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn spec(a: &Azurite, hosts: Vec<String>) -> PluginSpec {
    PluginSpec {
        name: "azure".into(),
        path: plugin(),
        grants: Grants {
            http_hosts: hosts,
            ..Grants::default()
        },
        settings: settings(a, "disks"),
    }
}

#[test]
fn a_page_blob_disk_is_a_fixed_vhd_an_independent_client_reads() -> Result<()> {
    let a = Azurite::start()?;
    let tmp = tempfile::tempdir()?;
    let host = Host::new(HostConfig::default())?;
    let mut w = host.load_writer(&spec(&a, vec![a.host()]))?;
    // Azure stores whole MiB only.
    let e = w.create("odd.vhd", 3 * MIB + 512, 512, &[]).unwrap_err();
    assert!(e.to_string().contains("whole number of MiB"), "{e}");

    let size = 6 * MIB;
    let disk = w.create("vm1/disk1.vhd", size, 512, &[])?;
    let source = tmp.path().join("source.raw");
    std::fs::write(&source, vec![0u8; size as usize])?;
    // Writes below, across and at the end of the 4 MiB a Put Page takes; a zeroed range.
    let mut expected = vec![0u8; size as usize];
    for (offset, len, byte) in [
        (0u64, 4096usize, 1u8),
        (3 * MIB, 2 * MIB as usize, 2),
        (size - 512, 512, 3),
        (MIB, 8192, 4),
    ] {
        let mut data = vec![byte; len];
        w.write(&disk, offset, &mut data)?;
        expected[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    w.write_zeroes(&disk, MIB, 4096, true)?;
    expected[MIB as usize..MIB as usize + 4096].fill(0);
    std::fs::write(&source, &expected)?;
    let mut back = vec![0u8; 8192];
    w.read(&disk, 3 * MIB - 4096, &mut back)?;
    assert_eq!(
        back,
        expected[3 * MIB as usize - 4096..3 * MIB as usize + 4096]
    );
    // The map: data where pages were written, zero elsewhere (cleared pages too).
    let map = w.map(&disk, 0, 2 * MIB)?;
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.state == haven_image::ExtentState::Data)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(data, vec![(0, 4096), (MIB + 4096, 4096)], "{map:?}");
    w.flush(&disk)?;
    w.close(disk)?;

    // Reopened: its size comes from the footer.
    let disk = w.open("vm1/disk1.vhd", Access::ReadOnly, &[])?;
    assert_eq!(w.info(&disk)?.size, size);
    w.close(disk)?;

    // An independent client sees a page blob of the data and the footer, which qemu-img
    // reads as a fixed VHD equal to what was written.
    let downloaded = tmp.path().join("downloaded.vhd");
    let (kind, length) = a.download("disks", "vm1/disk1.vhd", &downloaded)?;
    assert_eq!((kind.as_str(), length), ("BlobType.PAGEBLOB", size + 512));
    assert!(images_equal_as(&source, "raw", &downloaded, "vpc")?);
    Ok(())
}

#[test]
fn a_sas_token_is_enough() -> Result<()> {
    let a = Azurite::start()?;
    // The operator's container and a SAS for it, made with the independent client.
    let sas = a.python(&format!(
        "from datetime import datetime, timedelta, timezone\n\
         from azure.storage.blob import generate_container_sas, ContainerSasPermissions\n\
         client.create_container('sas')\n\
         print(generate_container_sas({:?}, 'sas', account_key={:?}, \
         permission=ContainerSasPermissions(read=True, write=True, create=True), \
         expiry=datetime.now(timezone.utc) + timedelta(hours=1)))",
        azurite::ACCOUNT,
        azurite::KEY
    ))?;
    let host = Host::new(HostConfig::default())?;
    let mut spec = spec(&a, vec![a.host()]);
    spec.settings.remove("key");
    spec.settings.insert("container".into(), "sas".into());
    spec.settings.insert("sas".into(), sas.trim().to_string());
    let mut w = host.load_writer(&spec)?;
    let disk = w.create("d.vhd", MIB, 512, &[])?;
    let mut data = vec![7u8; 4096];
    w.write(&disk, 8192, &mut data)?;
    let mut back = vec![0u8; 4096];
    w.read(&disk, 8192, &mut back)?;
    assert_eq!(back, data);
    w.close(disk)?;
    Ok(())
}

#[test]
fn the_writer_reaches_only_its_granted_endpoint() -> Result<()> {
    let a = Azurite::start()?;
    let host = Host::new(HostConfig::default())?;
    // Granted another port of the same host: the request is refused by the host.
    let mut w = host.load_writer(&spec(&a, vec!["127.0.0.1:1".into()]))?;
    let e = w.create("d.vhd", MIB, 512, &[]).unwrap_err().to_string();
    assert!(e.contains("denied") || e.contains("refused"), "{e}");
    // No HTTP grant at all: refused at load.
    let e = host
        .load_writer(&spec(&a, Vec::new()))
        .err()
        .context("loaded")?;
    assert!(e.to_string().contains("http_hosts"), "{e}");
    // A wrong key: the service refuses, and the error says what to check.
    let mut bad = spec(&a, vec![a.host()]);
    bad.settings
        .insert("key".into(), "d3Jvbmcga2V5IGZvciB0aGlzIGFjY291bnQ=".into());
    let mut w = host.load_writer(&bad)?;
    let e = w.create("d.vhd", MIB, 512, &[]).unwrap_err().to_string();
    assert!(e.contains("`key` or `sas`"), "{e}");
    Ok(())
}

/// The `[master_target]` lines and `[[plugin]]` of a master target writing into Azurite.
fn azure_writer(a: &Azurite) -> String {
    format!(
        "writer = \"azure\"\n\n[[plugin]]\nkind = \"target-writer\"\nname = \"azure\"\n\
         path = {:?}\ngrants = {{ http_hosts = [{:?}] }}\n\
         settings = {{ endpoint = {:?}, container = \"replicas\", key = {:?} }}\n",
        plugin(),
        a.host(),
        a.endpoint(),
        azurite::KEY
    )
}

#[test]
fn a_master_target_replicates_into_a_page_blob() -> Result<()> {
    let a = Azurite::start()?;
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("source.raw");
    mixed_disk(&disk, 16 * MIB, 7)?;
    let mut c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            mt_config: azure_writer(&a),
            ..ClusterOptions::default()
        },
    )?;
    let commands: Vec<String> = (0..24u64)
        .map(|i| format!("write -P {} {} 64k", 0x30 + i, (i * 37 % 256) * 65536))
        .collect();
    qemu_io(&c.agent.nbd, &commands)?;
    c.wait_caught_up(haven_engine::now_ms(), Duration::from_secs(120), |_, _| {})?;
    let status = c.mt.status()?;
    let replica = status
        .master_target
        .as_ref()
        .and_then(|m| m.replicas.first())
        .context("no replica")?;
    let downloaded = tmp.path().join("replica.vhd");
    let (kind, length) = a.download("replicas", &replica.path, &downloaded)?;
    assert_eq!(
        (kind.as_str(), length),
        ("BlobType.PAGEBLOB", 16 * MIB + 512)
    );
    assert!(
        images_equal_as(&disk, "raw", &downloaded, "vpc")?,
        "the page blob differs from the source"
    );
    Ok(())
}

#[test]
fn a_failover_materialises_its_point_into_a_page_blob() -> Result<()> {
    let a = Azurite::start()?;
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("source.raw");
    mixed_disk(&disk, 8 * MIB, 11)?;
    let c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            mt_config: azure_writer(&a),
            retention: Some("window = \"1h\"".into()),
            agent_args: vec!["--point-interval".into(), "1s".into()],
            ..ClusterOptions::default()
        },
    )?;
    let commands: Vec<String> = (0..16u64)
        .map(|i| format!("write -P {} {} 64k", 0x50 + i, (i * 11 % 128) * 65536))
        .collect();
    qemu_io(&c.agent.nbd, &commands)?;
    haven_e2e::wait_for_point(&c.mt, "web01")?;
    // Planned: the source stops at its final point, which the image holds.
    let image = c.mt.haven(&["failover", "web01", "--planned"])?;
    let image = image.trim();
    assert!(image.starts_with("failover/"), "{image}");
    let downloaded = tmp.path().join("image.vhd");
    let (kind, length) = a.download("replicas", image, &downloaded)?;
    assert_eq!(
        (kind.as_str(), length),
        ("BlobType.PAGEBLOB", 8 * MIB + 512)
    );
    assert!(
        images_equal_as(&disk, "raw", &downloaded, "vpc")?,
        "the failover image differs from the source at its final point"
    );
    Ok(())
}

const SUB: &str = "00000000-0000-0000-0000-00000000a2e5";

/// What the fake ARM holds at start: the DR resource group's network, availability set, sizes,
/// and one VM already running there.
fn arm_state() -> serde_json::Value {
    let rg = format!("/subscriptions/{SUB}/resourceGroups/rg-dr/providers");
    let subnet = format!("{rg}/Microsoft.Network/virtualNetworks/vnet-dr/subnets/snet-app");
    let test_subnet = format!("{rg}/Microsoft.Network/virtualNetworks/vnet-test/subnets/snet-app");
    let dc_nic = format!("{rg}/Microsoft.Network/networkInterfaces/dc01-nic");
    let dc_disk = format!("{rg}/Microsoft.Compute/disks/dc01-os");
    serde_json::json!({
        "subscription_id": SUB,
        "display_name": "DR-Prod",
        "tenant_id": "tenant-1",
        "client_id": "client-1",
        "client_secret": "the-secret",
        "vm_sizes": [
            { "name": "Standard_D2s_v5", "numberOfCores": 2, "memoryInMB": 8192 },
            { "name": "Standard_B1s", "numberOfCores": 1, "memoryInMB": 1024 }
        ],
        "resources": {
            subnet.clone(): { "id": subnet, "name": "snet-app", "properties": {} },
            test_subnet.clone(): { "id": test_subnet, "name": "snet-app", "properties": {} },
            format!("{rg}/Microsoft.Compute/availabilitySets/avset-app"): { "name": "avset-app" },
            dc_disk.clone(): { "id": dc_disk, "name": "dc01-os", "location": "westeurope" },
            dc_nic.clone(): { "id": dc_nic, "name": "dc01-nic", "location": "westeurope",
                "properties": { "macAddress": "00-0D-3A-00-00-01", "ipConfigurations": [
                    { "name": "ipconfig1", "properties": { "privateIPAddress": "10.1.0.4",
                        "subnet": { "id": subnet } } } ] } },
            format!("{rg}/Microsoft.Compute/virtualMachines/dc01"): {
                "id": format!("{rg}/Microsoft.Compute/virtualMachines/dc01"), "name": "dc01",
                "location": "westeurope", "_power": "running",
                "properties": { "vmId": "0b7e-dc01", "hardwareProfile": { "vmSize": "Standard_B1s" },
                    "storageProfile": { "osDisk": { "name": "dc01-os", "diskSizeGB": 32,
                        "managedDisk": { "id": dc_disk } }, "dataDisks": [] },
                    "networkProfile": { "networkInterfaces": [ { "id": dc_nic } ] } } }
        }
    })
}

/// A master target writing page blobs into Azurite, its configuration server with the
/// pipeline of web01 (a physical server of the primary site, its disk `disk`) protected to
/// Azure through the fake ARM; `extra` is added to its `[[machine]]`, `policies` to the
/// pipeline.
fn to_azure(
    tmp: &std::path::Path,
    a: &Azurite,
    arm: &haven_e2e::fake_arm::FakeArm,
    disk: &std::path::Path,
    extra: &str,
    policies: &str,
) -> Result<Cluster> {
    let c = Cluster::start(
        tmp,
        disk,
        ClusterOptions {
            config_server: true,
            mt_config: azure_writer(a),
            retention: Some("window = \"1h\"".into()),
            agent_args: vec!["--point-interval".into(), "1s".into()],
            ..ClusterOptions::default()
        },
    )?;
    let cs = c.cs.as_ref().context("cs")?;
    cs.set_secret("dr-sp", "the-secret")?;
    let pipeline = format!(
        r#"{head}[[plugin]]
name = "azure"
kind = "adapter"
path = {wasm:?}

[plugin.grants]
http_hosts = [{host:?}]

[plugin.settings]
subscription_id = "{SUB}"
tenant_id = "tenant-1"
client_id = "client-1"
client_secret = "secret:dr-sp"
arm_endpoint = "{endpoint}"
login_endpoint = "{endpoint}"
resource_group = "rg-dr"
location = "westeurope"
blob_container_url = "{blobs}/replicas"
storage_account_id = "{STORAGE}"

[[policy]]
name = "servers"
kind = "replication"
crash_consistent_interval = "1s"
app_consistent_interval = "off"
{policies}
[[network_mapping]]
name = "lan"
source_site = "primary"
target_site = "secondary"
source_network = "LAN"
target_network = "vnet-dr"
test_network = "vnet-test"

[[machine]]
name = "web01"
site = "primary"
target_platform = "azure"
policy = "servers"
master_target = "mt1"
writer = "raw"
{extra}
[machine.target]
resource_group = "rg-dr"
vnet = "vnet-dr"
subnet = "snet-app"
availability_set = "avset-app"
vm_size = "Standard_D2s_v5"
static_ip = "10.1.0.5"
"#,
        head = c.pipeline_head("to-azure")?,
        wasm = default_bin_dir().join("../wasm32-wasip2/release/haven_azure.wasm"),
        host = arm.host(),
        endpoint = arm.endpoint(),
        blobs = a.endpoint(),
    );
    let file = tmp.join("to-azure.toml");
    std::fs::write(&file, pipeline)?;
    cs.haven(&["apply", file.to_str().context("path")?])?;
    Ok(c)
}

const STORAGE: &str = "/subscriptions/00000000-0000-0000-0000-00000000a2e5/resourceGroups/rg-storage/providers/Microsoft.Storage/storageAccounts/devstoreaccount1";

#[test]
fn a_physical_server_fails_over_to_an_azure_vm_made_from_its_page_blobs() -> Result<()> {
    let a = Azurite::start()?;
    let tmp = tempfile::tempdir()?;
    let arm = haven_e2e::fake_arm::FakeArm::start(tmp.path(), &arm_state())?;
    let disk = tmp.path().join("source.raw");
    mixed_disk(&disk, 8 * MIB, 21)?;
    let c = to_azure(tmp.path(), &a, &arm, &disk, "", "")?;
    let cs = c.cs.as_ref().context("cs")?;
    let storage = STORAGE;

    // The adapter's inventory: the VM already in the resource group, as ARM describes it.
    cs.haven(&["platform", "refresh", "azure"])?;
    let seen: Vec<serde_json::Value> =
        serde_json::from_str(&cs.haven(&["platform", "machines", "azure", "--json"])?)?;
    let dc01 = seen
        .iter()
        .find(|m| m["name"] == "dc01")
        .context("no dc01")?;
    assert_eq!(
        (dc01["cpus"].as_u64(), dc01["memory_mib"].as_u64()),
        (Some(1), Some(1024))
    );
    assert_eq!(dc01["power"], "running", "{dc01}");
    assert_eq!(dc01["nics"][0]["network"], "vnet-dr/snet-app", "{dc01}");
    assert_eq!(dc01["nics"][0]["addresses"][0], "10.1.0.4", "{dc01}");

    let commands: Vec<String> = (0..8u64)
        .map(|i| format!("write -P {} {} 64k", 0x70 + i, (i * 13 % 128) * 65536))
        .collect();
    qemu_io(&c.agent.nbd, &commands)?;
    haven_e2e::wait_for_point(cs, "web01")?;
    let rg = format!("/subscriptions/{SUB}/resourceGroups/rg-dr/providers");

    // A test failover: a copy of the point in the test blob, a `-test` VM on the isolated
    // network; its cleanup deletes everything made for it and frees the copy.
    cs.haven(&["point", "create", "web01"])?;
    let at_point = tmp.path().join("at-point.raw");
    std::fs::copy(&disk, &at_point)?;
    cs.haven(&["failover", "test", "web01"])?;
    let job = cs.finished_job("test-failover")?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let made = arm.resources()?;
    let nic =
        &made[&format!("{rg}/Microsoft.Network/networkInterfaces/web01-test-nic0").to_lowercase()];
    assert_eq!(
        nic["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"],
        format!("{rg}/Microsoft.Network/virtualNetworks/vnet-test/subnets/snet-app")
    );
    let test_disk = &made[&format!("{rg}/Microsoft.Compute/disks/web01-test-disk0").to_lowercase()];
    let source_uri = test_disk["properties"]["creationData"]["sourceUri"]
        .as_str()
        .context("no sourceUri")?
        .to_string();
    let test_blob = source_uri
        .strip_prefix(&format!("{}/replicas/", a.endpoint()))
        .context("the test disk is not from the replica container")?
        .to_string();
    assert!(test_blob.starts_with("test-failover/"), "{test_blob}");
    let copy = tmp.path().join("test-copy.vhd");
    a.download("replicas", &test_blob, &copy)?;
    assert!(images_equal_as(&at_point, "raw", &copy, "vpc")?);
    cs.haven(&["failover", "cleanup", "web01"])?;
    let left: Vec<String> = arm
        .resources()?
        .keys()
        .filter(|k| k.contains("web01-test"))
        .cloned()
        .collect();
    assert!(left.is_empty(), "left after the cleanup: {left:?}");
    a.download("replicas", &test_blob, &copy)?;
    let data = std::fs::read(&copy)?;
    assert!(
        data[..data.len() - 512].iter().all(|b| *b == 0),
        "the test copy still holds data"
    );

    let image = cs.haven(&["failover", "web01", "--planned"])?;
    let image = image.trim().to_string();
    let job = cs.finished_job("failover")?;
    assert_eq!(job["state"], "succeeded", "{job:#}");

    // What the adapter asked of ARM, field by field: the disk imported from the image's page
    // blob, an adapter with the static address in the mapped subnet, the VM, then its start.
    let requests = arm.requests()?;
    let put = |path: &str| {
        requests
            .iter()
            .find(|r| r["method"] == "PUT" && r["path"] == path)
            .cloned()
            .with_context(|| format!("no PUT {path}: {requests:#?}"))
    };
    let disk_id = format!("{rg}/Microsoft.Compute/disks/web01-disk0");
    let d = put(&disk_id)?;
    assert_eq!(d["query"]["api-version"], "2024-03-02");
    assert_eq!(d["body"]["location"], "westeurope");
    let creation = &d["body"]["properties"]["creationData"];
    assert_eq!(creation["createOption"], "Import");
    assert_eq!(
        creation["sourceUri"],
        format!("{}/replicas/{image}", a.endpoint())
    );
    assert_eq!(creation["storageAccountId"], storage);
    let nic_id = format!("{rg}/Microsoft.Network/networkInterfaces/web01-nic0");
    let n = put(&nic_id)?;
    let ip = &n["body"]["properties"]["ipConfigurations"][0]["properties"];
    assert_eq!(ip["privateIPAllocationMethod"], "Static");
    assert_eq!(ip["privateIPAddress"], "10.1.0.5");
    assert_eq!(
        ip["subnet"]["id"],
        format!("{rg}/Microsoft.Network/virtualNetworks/vnet-dr/subnets/snet-app")
    );
    let vm_id = format!("{rg}/Microsoft.Compute/virtualMachines/web01");
    let vm = put(&vm_id)?;
    assert_eq!(vm["query"]["api-version"], "2024-07-01");
    let p = &vm["body"]["properties"];
    assert_eq!(p["hardwareProfile"]["vmSize"], "Standard_D2s_v5");
    assert_eq!(p["storageProfile"]["osDisk"]["createOption"], "Attach");
    assert_eq!(p["storageProfile"]["osDisk"]["managedDisk"]["id"], disk_id);
    assert_eq!(p["networkProfile"]["networkInterfaces"][0]["id"], nic_id);
    assert_eq!(
        p["availabilitySet"]["id"],
        format!("{rg}/Microsoft.Compute/availabilitySets/avset-app")
    );
    assert!(
        requests
            .iter()
            .any(|r| r["method"] == "POST" && r["path"] == format!("{vm_id}/start")),
        "the replica was not started"
    );
    let made = arm.resources()?;
    assert_eq!(made[&vm_id.to_lowercase()]["_power"], "running");

    // The disk ARM imports is the source at its final point.
    let blob = tmp.path().join("imported.vhd");
    a.download("replicas", &image, &blob)?;
    assert!(images_equal_as(&disk, "raw", &blob, "vpc")?);
    Ok(())
}

#[test]
fn a_server_fails_back_from_azure_sending_only_what_changed_there() -> Result<()> {
    let a = Azurite::start()?;
    let tmp = tempfile::tempdir()?;
    let arm = haven_e2e::fake_arm::FakeArm::start(tmp.path(), &arm_state())?;
    let site_a = tmp.path().join("site-a");
    std::fs::create_dir_all(&site_a)?;
    let disk_a = site_a.join("web01.raw");
    mixed_disk(&disk_a, 16 * MIB, 31)?;
    let extra = format!("disks = [{:?}]\n", disk_a.display().to_string());
    let c = to_azure(tmp.path(), &a, &arm, &disk_a, &extra, "")?;
    let cs = c.cs.as_ref().context("cs")?;
    haven_e2e::wait_for_point(cs, "web01")?;
    let image = cs
        .haven(&["failover", "web01", "--planned"])?
        .trim()
        .to_string();
    assert_eq!(cs.finished_job("failover")?["state"], "succeeded");

    // The VM runs in Azure on the imported disk, and changes it. (It cannot run here: its
    // disk is the page blob, downloaded, with its agent on it.)
    let blob = tmp.path().join("vm.vhd");
    a.download("replicas", &image, &blob)?;
    let vm_disk = tmp.path().join("vm-disk.raw");
    haven_e2e::run_ok(
        std::process::Command::new("qemu-img")
            .args(["convert", "-f", "vpc", "-O", "raw"])
            .arg(&blob)
            .arg(&vm_disk),
    )?;
    let commands: Vec<String> = (0..8u64)
        .map(|i| format!("write -P {} {} 4k", 0xa0 + i, (i * 331 % 4096) * 4096))
        .collect();
    let mut qemu = std::process::Command::new("qemu-io");
    qemu.args(["-f", "raw"]);
    for cmd in &commands {
        qemu.args(["-c", cmd]);
    }
    haven_e2e::run_ok(qemu.arg(&vm_disk))?;

    // Back to the premises: a process server in Azure (the secondary site) forwarding to the
    // master target at the primary site, whose writer reaches the server's disk.
    let _rev = c.reverse(&site_a)?;
    cs.wait_joined("mt-a")?;
    let bins = default_bin_dir();
    let dir = tmp.path().join("agent-azure-vm");
    haven_e2e::Agent::enroll_with_config_server(&bins, cs, "secondary", &dir, "web01")?;
    let out = cs.haven(&["reprotect", "web01"])?;
    assert!(out.contains("replicates to mt-a now"), "{out}");
    let mut agent = haven_e2e::Agent::start_disks(
        &bins,
        None,
        &dir,
        &vm_disk,
        &[],
        vec!["--seeded".into(), "--point-interval".into(), "1h".into()],
    )?;
    let sent = agent.wait_protected()?;
    assert!(
        sent <= 2 * 8 * 4096,
        "sent {sent} for 32 KiB changed in Azure"
    );
    // The default failback policy: planned (the VM's last writes first), the Azure VM
    // powered off, then protected to Azure again — onto the page blob of its failover, so its
    // agent (enrolled at the premises first) sends only what the VM changed since.
    let dir_a = tmp.path().join("agent-a2");
    haven_e2e::Agent::enroll_with_config_server(&bins, cs, "primary", &dir_a, "web01")?;
    let mut client = NbdClient::connect(&format!("127.0.0.1:{}", agent.nbd_port), "disk")?;
    client.write(5 * MIB, &[0x5c; 8192])?;
    client.flush()?;
    drop(client);
    let out = cs.haven(&["failback", "web01"])?;
    assert!(out.contains("failback of machine web01: done"), "{out}");
    agent.proc.kill();
    assert!(
        haven_e2e::images_equal(&disk_a, &vm_disk)?,
        "the server's disk lacks what the VM wrote in Azure"
    );
    let vm = format!(
        "/subscriptions/{SUB}/resourceGroups/rg-dr/providers/Microsoft.Compute/virtualMachines/web01"
    );
    assert_eq!(arm.resources()?[&vm.to_lowercase()]["_power"], "stopped");
    let mut back = haven_e2e::Agent::start_disks(
        &bins,
        None,
        &dir_a,
        &disk_a,
        &[],
        vec!["--seeded".into(), "--point-interval".into(), "1h".into()],
    )?;
    let sent = back.wait_protected()?;
    let changed = 8 * 4096 + 8192;
    assert!(sent <= 2 * changed, "sent {sent} for {changed} changed");
    let mut client = NbdClient::connect(&format!("127.0.0.1:{}", back.nbd_port), "disk")?;
    client.write(7 * MIB, &[0x7e; 4096])?;
    client.flush()?;
    drop(client);
    // Once the configuration server has heard that web01 replicates to Azure again.
    haven_e2e::poll(Duration::from_secs(30), Duration::from_millis(250), || {
        Ok(cs
            .haven(&["point", "create", "web01"])
            .map(drop)
            .map_err(|e| format!("{e:#}")))
    })?;
    // The page blob follows the server again.
    haven_e2e::poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let copy = tmp.path().join("back.vhd");
        a.download("replicas", &image, &copy)?;
        Ok(match images_equal_as(&disk_a, "raw", &copy, "vpc") {
            Ok(true) => Ok(()),
            other => Err(format!("not equal yet: {other:?}")),
        })
    })?;

    // A second failover to Azure: the replica VM the first one defined goes first, and a new
    // one of that name runs on the new image.
    cs.haven(&["failover", "web01", "--planned"])?;
    let job = cs.finished_job("failover")?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert!(
        job.to_string().contains("deleted the earlier replica"),
        "{job:#}"
    );
    assert_eq!(arm.resources()?[&vm.to_lowercase()]["_power"], "running");
    Ok(())
}
