//! The physical → Azure example pipeline (`examples/pipelines/physical-to-azure.toml`) end to
//! end: Azurite as the replica storage account, the fake Azure Resource Manager seeded with the
//! example's subscription, service principal, resource groups, networks and availability set,
//! an agent per server (`files` with two disks), and the example applied with only what names
//! this machine changed: sites and gateways, plugin files, the storage endpoint and key, the
//! ARM and token endpoints, the DNS script and the webhook. Then its recovery plan runs as an
//! operator would: the ERP group to one group point, the file server, the script, the manual
//! step resumed — after which ARM holds a running VM per server where the example puts it, each
//! on disks imported from page blobs that `qemu-img compare` finds equal to the sources.

use std::path::PathBuf;

use anyhow::{Context, Result};
use haven_e2e::azurite::{self, Azurite};
use haven_e2e::example::{array, tables};
use haven_e2e::fake_arm::FakeArm;
use haven_e2e::nbd::NbdClient;
use haven_e2e::{Cluster, ClusterOptions, images_equal_as, mixed_disk};

const SUB: &str = "00000000-0000-0000-0000-000000000000";
const MIB: u64 = 1 << 20;
/// The example's servers and their disks.
const MACHINES: [(&str, usize); 3] = [("erp-db", 1), ("erp-app", 1), ("files", 2)];

fn example() -> PathBuf {
    haven_e2e::example::path("physical-to-azure.toml")
}

/// The example with what names this machine's parts put in.
fn localised(c: &Cluster, a: &Azurite, arm: &FakeArm) -> Result<String> {
    let text = std::fs::read_to_string(example())?;
    let mut p: toml::Table = text.parse().context("the example does not parse")?;
    let head: toml::Table = c.pipeline_head("onprem-to-azure")?.parse()?;
    p.insert("site".into(), head["site"].clone());
    p.insert("gateway".into(), head["gateway"].clone());
    let s = |v: &str| toml::Value::String(v.to_string());
    let rename = |v: &str| -> String {
        match v {
            "head-office" => "primary",
            "azure-weu" => "secondary",
            "ps-hq" => "ps1",
            "gw-weu" => "mt1",
            other => other,
        }
        .to_string()
    };

    let mut machines = tables(&p, "machine")?;
    for m in &mut machines {
        for key in ["site", "master_target", "process_server"] {
            if let Some(v) = m.get(key).and_then(toml::Value::as_str) {
                let v = rename(v);
                m.insert(key.into(), s(&v));
            }
        }
    }
    p.insert("machine".into(), array(machines));
    let mut mappings = tables(&p, "network_mapping")?;
    for m in &mut mappings {
        for key in ["source_site", "target_site"] {
            let v = rename(m[key].as_str().unwrap_or_default());
            m.insert(key.into(), s(&v));
        }
    }
    p.insert("network_mapping".into(), array(mappings));

    let wasm = haven_e2e::default_bin_dir().join("../wasm32-wasip2/release");
    let mut plugins = tables(&p, "plugin")?;
    for plugin in &mut plugins {
        let file = plugin["path"]
            .as_str()
            .and_then(|f| f.rsplit('/').next())
            .unwrap_or_default()
            .to_string();
        plugin.insert("path".into(), s(&wasm.join(&file).display().to_string()));
        plugin.insert("gateways".into(), toml::Value::Array(vec![s("mt1")]));
        let adapter = plugin["kind"].as_str() == Some("adapter");
        let host = if adapter { arm.host() } else { a.host() };
        plugin
            .get_mut("grants")
            .and_then(toml::Value::as_table_mut)
            .context("a plugin without grants")?
            .insert("http_hosts".into(), toml::Value::Array(vec![s(&host)]));
        let settings = plugin
            .get_mut("settings")
            .and_then(toml::Value::as_table_mut)
            .context("a plugin without settings")?;
        if adapter {
            settings.insert("arm_endpoint".into(), s(&arm.endpoint()));
            settings.insert("login_endpoint".into(), s(&arm.endpoint()));
            settings.insert(
                "blob_container_url".into(),
                s(&format!("{}/replicas", a.endpoint())),
            );
        } else {
            settings.insert("endpoint".into(), s(&a.endpoint()));
        }
    }
    p.insert("plugin".into(), array(plugins));

    let mut plans = tables(&p, "plan")?;
    for plan in &mut plans {
        let mut steps = tables(plan, "step")?;
        for step in &mut steps {
            if step["kind"].as_str() == Some("script") {
                step.insert(
                    "run".into(),
                    s("test \"$HAVEN_PLAN\" = head-office-lost && echo \"dns for $HAVEN_ACTION\""),
                );
            }
        }
        plan.insert("step".into(), array(steps));
    }
    p.insert("plan".into(), array(plans));
    let mut hooks = tables(&p, "webhook")?;
    for h in &mut hooks {
        h.insert("url".into(), s("http://127.0.0.1:9/haven/pager"));
    }
    p.insert("webhook".into(), array(hooks));
    Ok(toml::to_string(&p)?)
}

/// The example's subscription as the fake ARM holds it: its service principal, the DR
/// resource groups' networks (production and test) and the ERP availability set.
fn arm_state() -> serde_json::Value {
    let mut resources = serde_json::Map::new();
    for (rg, subnet) in [("rg-dr-erp", "snet-erp"), ("rg-dr-files", "snet-files")] {
        for vnet in ["vnet-dr-weu", "vnet-dr-test-weu"] {
            let id = format!(
                "/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Network/virtualNetworks/{vnet}/subnets/{subnet}"
            );
            resources.insert(id.clone(), serde_json::json!({ "id": id, "name": subnet }));
        }
    }
    resources.insert(
        format!("/subscriptions/{SUB}/resourceGroups/rg-dr-erp/providers/Microsoft.Compute/availabilitySets/avset-erp"),
        serde_json::json!({ "name": "avset-erp" }),
    );
    serde_json::json!({
        "subscription_id": SUB,
        "display_name": "DR-Prod",
        "tenant_id": "11111111-1111-1111-1111-111111111111",
        "client_id": "22222222-2222-2222-2222-222222222222",
        "client_secret": "the-service-principal-secret",
        "vm_sizes": [
            { "name": "Standard_E8s_v5", "numberOfCores": 8, "memoryInMB": 65536 },
            { "name": "Standard_D4s_v5", "numberOfCores": 4, "memoryInMB": 16384 },
            { "name": "Standard_D2s_v5", "numberOfCores": 2, "memoryInMB": 8192 }
        ],
        "resources": resources,
    })
}

#[test]
fn the_physical_to_azure_example_runs_from_apply_through_plan_failover() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let a = Azurite::start()?;
    let arm = FakeArm::start(tmp.path(), &arm_state())?;
    // Every server's disks, each with data of its own.
    let mut disks: Vec<Vec<PathBuf>> = Vec::new();
    for (n, (m, count)) in MACHINES.iter().enumerate() {
        let mut own = Vec::new();
        for d in 1..=*count {
            let path = tmp.path().join(format!("{m}-disk{d}.raw"));
            mixed_disk(&path, 4 * MIB, 300 + (n * 10 + d) as u64)?;
            own.push(path);
        }
        disks.push(own);
    }
    let plugin =
        haven_e2e::default_bin_dir().join("../wasm32-wasip2/release/haven_azure_blob.wasm");
    let c = Cluster::start(
        tmp.path(),
        &disks[0][0],
        ClusterOptions {
            config_server: true,
            agent_via_config_server: true,
            machine: Some(MACHINES[0].0.into()),
            retention: Some("window = \"1h\"".into()),
            mt_config: format!(
                "writer = \"page-blobs\"\n\n[[plugin]]\nkind = \"target-writer\"\n\
                 name = \"page-blobs\"\npath = {plugin:?}\ngrants = {{ http_hosts = [{:?}] }}\n\
                 settings = {{ endpoint = {:?}, container = \"replicas\", key = {:?} }}\n",
                a.host(),
                a.endpoint(),
                azurite::KEY
            ),
            ..ClusterOptions::default()
        },
    )?;
    let cs = c.cs.as_ref().context("cs")?;
    let more: Vec<(&str, &[PathBuf])> = MACHINES
        .iter()
        .zip(&disks)
        .skip(1)
        .map(|((m, _), own)| (*m, own.as_slice()))
        .collect();
    let agents = c.more_agents(&more, &[])?;
    cs.set_secret("haven-dr-sp", "the-service-principal-secret")?;
    cs.set_secret("havenreplicasweu-key", azurite::KEY)?;
    let file = tmp.path().join("physical-to-azure.toml");
    std::fs::write(&file, localised(&c, &a, &arm)?)?;
    haven_e2e::run_ok(cs.haven_command().arg("validate").arg(&file))?;
    cs.haven(&["apply", file.to_str().context("path")?])?;
    let out = cs.haven(&["platform", "refresh", "azure"])?;
    assert!(out.contains("DR-Prod"), "{out}");

    // Each server written, then a point of each and of the ERP group.
    let ports: Vec<Vec<u16>> = std::iter::once(&c.agent)
        .chain(&agents)
        .map(|a| {
            std::iter::once(a.nbd_port)
                .chain(a.more_disks.iter().map(|d| d.nbd_port))
                .collect()
        })
        .collect();
    for ((m, _), ports) in MACHINES.iter().zip(&ports) {
        haven_e2e::wait_for_point(cs, m)?;
        for (d, port) in ports.iter().enumerate() {
            let mut client = NbdClient::connect(&format!("127.0.0.1:{port}"), "disk")?;
            let block = format!("{m} disk {} written before the plan ", d + 1).repeat(128);
            client.write(MIB, &block.as_bytes()[..4096])?;
            client.flush()?;
        }
        cs.haven(&["point", "create", m])?;
    }
    cs.haven(&["group", "point", "erp"])?;

    // Head office lost: the ERP group to one point, the file server, the DNS script, then
    // the operator's step.
    let out = cs.haven(&["plan", "failover", "head-office-lost"])?;
    assert!(
        out.contains("waits for an operator: Tell the branch"),
        "{out}"
    );
    let out = cs.haven(&["plan", "resume", "head-office-lost"])?;
    assert!(out.contains("plan head-office-lost: done"), "{out}");

    // ARM runs a VM per server where the example puts it, on disks imported from the page
    // blobs, each equal to its source.
    let resources = arm.resources()?;
    for ((m, count), sources) in MACHINES.iter().zip(&disks) {
        let (rg, size, subnet, address, set) = match *m {
            "erp-db" => (
                "rg-dr-erp",
                "Standard_E8s_v5",
                "snet-erp",
                "10.1.10.20",
                true,
            ),
            "erp-app" => (
                "rg-dr-erp",
                "Standard_D4s_v5",
                "snet-erp",
                "10.1.10.21",
                true,
            ),
            _ => (
                "rg-dr-files",
                "Standard_D2s_v5",
                "snet-files",
                "10.1.20.5",
                false,
            ),
        };
        let group = format!("/subscriptions/{SUB}/resourceGroups/{rg}/providers");
        let get = |kind: &str, name: &str| -> Result<&serde_json::Value> {
            let id = format!("{group}/{kind}/{name}").to_lowercase();
            resources.get(&id).with_context(|| format!("no {id}"))
        };
        let vm = get("Microsoft.Compute/virtualMachines", m)?;
        assert_eq!(vm["_power"], "running", "{m}");
        let p = &vm["properties"];
        assert_eq!(p["hardwareProfile"]["vmSize"], size, "{m}");
        assert_eq!(p["availabilitySet"].is_object(), set, "{m}: {p}");
        assert_eq!(
            p["storageProfile"]["dataDisks"].as_array().map(Vec::len),
            Some(count - 1),
            "{m}"
        );
        let nic = get("Microsoft.Network/networkInterfaces", &format!("{m}-nic0"))?;
        let ip = &nic["properties"]["ipConfigurations"][0]["properties"];
        assert_eq!(ip["privateIPAddress"], address, "{m}");
        assert!(
            ip["subnet"]["id"].as_str().is_some_and(
                |s| s.ends_with(&format!("virtualNetworks/vnet-dr-weu/subnets/{subnet}"))
            ),
            "{m}: {ip}"
        );
        for (d, source) in sources.iter().enumerate() {
            let disk = get("Microsoft.Compute/disks", &format!("{m}-disk{d}"))?;
            let uri = disk["properties"]["creationData"]["sourceUri"]
                .as_str()
                .context("no sourceUri")?;
            let blob = uri
                .strip_prefix(&format!("{}/replicas/", a.endpoint()))
                .with_context(|| format!("{m}: {uri} is not in the replica container"))?;
            let local = tmp.path().join(format!("{m}-imported-{d}.vhd"));
            a.download("replicas", blob, &local)?;
            assert!(
                images_equal_as(source, "raw", &local, "vpc")?,
                "{m} disk {}: the imported blob differs from the source",
                d + 1
            );
        }
    }
    Ok(())
}
