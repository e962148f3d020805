//! Azure → Azure through a cache storage account (Azurite): the agent ships over HTTP(S)
//! only, to a container; two gateways of the target region drain it to the master target,
//! one at a time under a lease; SIGKILLs of the agent and of the draining gateway lose
//! nothing, and the account is emptied of what the master target holds.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;

use haven_e2e::azurite::{self, Azurite};
use haven_e2e::example::{array, tables};
use haven_e2e::{
    Cluster, ClusterOptions, Gateway, Rng, images_equal, mixed_disk, now_ms, poll, qemu_io,
};

const DISK: u64 = 32 << 20;
const CONTAINER: &str = "haven-cache";

/// The agent's arguments and the gateways' `[process_server.drain]` for Azurite's account.
fn cache_config(dir: &Path, azurite: &Azurite) -> (Vec<String>, String) {
    use std::os::unix::fs::PermissionsExt as _;
    let cache_key = dir.join("cache.key");
    std::fs::write(&cache_key, format!("{}\n", "5c".repeat(32))).unwrap();
    std::fs::set_permissions(&cache_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The gateways' copy of the key.
    let drain_key = dir.join("drain-cache.key");
    std::fs::copy(&cache_key, &drain_key).unwrap();
    let account_key = dir.join("account.key");
    std::fs::write(&account_key, azurite::KEY).unwrap();
    let url = format!("{}/{CONTAINER}", azurite.endpoint());
    let agent = vec![
        "--cache-account".into(),
        url.clone(),
        "--cache-account-key-file".into(),
        account_key.display().to_string(),
        "--cache-key".into(),
        cache_key.display().to_string(),
    ];
    let gateway = format!(
        "\n[process_server.drain]\ncontainer_url = {url:?}\naccount_key_file = {:?}\n\
         cache_key_file = {:?}\nlease_seconds = 15\n",
        account_key.display().to_string(),
        drain_key.display().to_string()
    );
    (agent, gateway)
}

fn drains(g: &Gateway) -> usize {
    std::fs::read_to_string(&g.proc.log)
        .unwrap_or_default()
        .matches("draining the agent's streams")
        .count()
}

/// The names of the segments the account holds.
fn segments(azurite: &Azurite) -> Vec<String> {
    let out = azurite
        .python(&format!(
            "for b in client.get_container_client({CONTAINER:?}).list_blobs(name_starts_with='streams/'):\n    \
             print(b.name)"
        ))
        .unwrap();
    out.lines()
        .filter(|l| l.contains("/seg/"))
        .map(str::to_string)
        .collect()
}

fn workload(rng: &mut Rng, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let len = 1 + rng.below(128 << 10);
            let off = rng.below(DISK - len);
            match rng.below(8) {
                0 => format!("write -z {} {}", off / 512 * 512, (len / 512 + 1) * 512),
                1 => "flush".to_string(),
                _ => format!("write -P {} {off} {len}", rng.below(255) + 1),
            }
        })
        .collect()
}

#[test]
fn an_azure_vm_replicates_through_a_cache_account_any_gateway_drains() {
    let dir = tempfile::tempdir().unwrap();
    let azurite = Azurite::start().unwrap();
    let (agent_args, drain) = cache_config(dir.path(), &azurite);
    let disk = dir.path().join("shop-sql.raw");
    mixed_disk(&disk, DISK, 11).unwrap();
    let mut c = Cluster::start(
        dir.path(),
        &disk,
        ClusterOptions {
            config_server: true,
            second_process_server: true,
            agent_via_config_server: true,
            machine: Some("shop-sql".into()),
            agent_args,
            ps_config: drain,
            ..ClusterOptions::default()
        },
    )
    .unwrap();
    // The initial copy goes through the account.
    c.agent.wait_protected().unwrap();
    c.wait_caught_up(now_ms(), Duration::from_secs(120), |_, _| {})
        .unwrap();
    assert!(images_equal(&c.agent.disk, &c.replica().unwrap()).unwrap());

    // One gateway drains the agent; the other waits for its lease. `c.ps` is the waiting one
    // from here on.
    let ps2 = c.ps2.take().unwrap();
    let mut holder = match (drains(&c.ps), drains(&ps2)) {
        (1, 0) => std::mem::replace(&mut c.ps, ps2),
        (0, 1) => ps2,
        counts => panic!("exactly one gateway drains the agent, not {counts:?}"),
    };

    // A workload through SIGKILLs of the agent and of the draining gateway.
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (stop, nbd) = (stop.clone(), c.agent.nbd.clone());
        let mut rng = Rng(0xcac4e);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = qemu_io(&nbd, &workload(&mut rng, 20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    c.agent.restart().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    holder.proc.kill();
    std::thread::sleep(Duration::from_millis(1500));
    c.agent.restart().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    let done = now_ms();

    // The other gateway takes the agent over once the lease lapses (15 s).
    poll(Duration::from_secs(60), Duration::from_millis(250), || {
        Ok(match drains(&c.ps) {
            0 => Err("the waiting gateway has not taken the agent over".to_string()),
            _ => Ok(()),
        })
    })
    .unwrap();
    // The killed gateway comes back; it does not take the agent back while the lease holds.
    holder.spawn().unwrap();
    let drained_before = drains(&holder);
    c.wait_caught_up(done, Duration::from_secs(180), |_, _| {})
        .unwrap();
    let replica = c.replica().unwrap();
    assert!(
        images_equal(&c.agent.disk, &replica).unwrap(),
        "the replica differs from the source after the kills"
    );
    // The agent's reports reach the master target through the account too.
    poll(Duration::from_secs(30), Duration::from_millis(250), || {
        let mt = c.mt.status()?.master_target.context("no master target")?;
        let r = mt.replicas.first().context("no replica")?;
        Ok(match (r.machine_name.as_str(), r.state()) {
            ("shop-sql", "protected") => Ok(()),
            other => Err(format!("the replica shows {other:?}")),
        })
    })
    .unwrap();
    // The gateway that took over shows the agent among those it drains.
    let drain =
        c.ps.status()
            .unwrap()
            .process_server
            .unwrap()
            .drain
            .unwrap();
    assert_eq!(drain.account, format!("{}/{CONTAINER}", azurite.endpoint()));
    assert_eq!(
        drain
            .agents
            .iter()
            .map(|a| a.machine_name.as_str())
            .collect::<Vec<_>>(),
        ["shop-sql"]
    );
    // A point on request reaches the agent through the account, and its tag comes back
    // through it, drained by the gateway that took over. (This master target keeps no points,
    // window 0s, so that its replica follows the stream: it says the point arrived.)
    let e =
        c.mt.haven(&["point", "create", "shop-sql"])
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("the point arrived but retention dropped it at once"),
        "{e}"
    );
    // What the master target holds is freed from the account.
    poll(Duration::from_secs(30), Duration::from_millis(250), || {
        let left = segments(&azurite);
        Ok(match left.is_empty() {
            true => Ok(()),
            false => Err(format!("segments left in the account: {left:?}")),
        })
    })
    .unwrap();
    assert_eq!(
        drains(&holder),
        drained_before,
        "the restarted gateway took the agent back"
    );
    // The account holds no plaintext: the report, which names the machine, is sealed.
    let agent = c.agent.report().unwrap().agent_id;
    let out = azurite
        .python(&format!(
            "d = client.get_blob_client({CONTAINER:?}, 'streams/{agent}/report').download_blob().readall()\n\
             print(d[:8].decode(), b'shop-sql' in d, len(d) > 64)"
        ))
        .unwrap();
    assert_eq!(out.trim(), "HVNCACH1 False True");
}

const SUB: &str = "00000000-0000-0000-0000-000000000000";
/// The example's VMs.
const SHOP: [&str; 3] = ["shop-sql", "shop-web1", "shop-web2"];

/// `examples/pipelines/azure-to-azure.toml` with what names this machine's parts put in: the
/// sites and gateways of the cluster (West Europe is `primary`, North Europe `secondary`, the
/// drainers `ps1` and `ps2`, the master target `mt1`), plugin files, Azurite's containers and
/// the fake ARM's endpoints.
fn localised(c: &Cluster, a: &Azurite, arm: &haven_e2e::fake_arm::FakeArm) -> String {
    let text = std::fs::read_to_string(haven_e2e::example::path("azure-to-azure.toml")).unwrap();
    let mut p: toml::Table = text.parse().expect("the example parses");
    let head: toml::Table = c.pipeline_head("weu-to-neu").unwrap().parse().unwrap();
    p.insert("site".into(), head["site"].clone());
    p.insert("gateway".into(), head["gateway"].clone());
    let s = |v: &str| toml::Value::String(v.to_string());
    let names = |v: &[&str]| toml::Value::Array(v.iter().map(|n| s(n)).collect());

    let mut accounts = tables(&p, "cache_account").unwrap();
    for account in &mut accounts {
        account.insert("site".into(), s("primary"));
        account.insert(
            "container_url".into(),
            s(&format!("{}/{CONTAINER}", a.endpoint())),
        );
        account.insert("drained_by".into(), names(&["ps1", "ps2"]));
    }
    p.insert("cache_account".into(), array(accounts));
    let mut machines = tables(&p, "machine").unwrap();
    for m in &mut machines {
        m.insert("site".into(), s("primary"));
        m.insert("master_target".into(), s("mt1"));
    }
    p.insert("machine".into(), array(machines));
    let mut mappings = tables(&p, "network_mapping").unwrap();
    for m in &mut mappings {
        m.insert("source_site".into(), s("primary"));
        m.insert("target_site".into(), s("secondary"));
    }
    p.insert("network_mapping".into(), array(mappings));

    let wasm = haven_e2e::default_bin_dir().join("../wasm32-wasip2/release");
    let mut plugins = tables(&p, "plugin").unwrap();
    for plugin in &mut plugins {
        let file = plugin["path"]
            .as_str()
            .and_then(|f| f.rsplit('/').next())
            .unwrap_or_default()
            .to_string();
        plugin.insert("path".into(), s(&wasm.join(&file).display().to_string()));
        let source = plugin["name"].as_str() == Some("azure-weu");
        plugin.insert(
            "gateways".into(),
            names(if source { &["ps1", "ps2"] } else { &["mt1"] }),
        );
        let adapter = plugin["kind"].as_str() == Some("adapter");
        let host = if adapter { arm.host() } else { a.host() };
        let grants = plugin["grants"].as_table().cloned().unwrap_or_default();
        let mut grants = grants;
        grants.insert("http_hosts".into(), names(&[&host]));
        plugin.insert("grants".into(), toml::Value::Table(grants));
        let settings = plugin
            .get_mut("settings")
            .and_then(toml::Value::as_table_mut)
            .expect("a plugin with settings");
        if adapter {
            settings.insert("arm_endpoint".into(), s(&arm.endpoint()));
            settings.insert("login_endpoint".into(), s(&arm.endpoint()));
            if settings.contains_key("blob_container_url") {
                settings.insert(
                    "blob_container_url".into(),
                    s(&format!("{}/replicas", a.endpoint())),
                );
            }
        } else {
            settings.insert("endpoint".into(), s(&a.endpoint()));
        }
    }
    p.insert("plugin".into(), array(plugins));
    let mut hooks = tables(&p, "webhook").unwrap();
    for h in &mut hooks {
        h.insert("url".into(), s("http://127.0.0.1:9/haven/shop"));
    }
    p.insert("webhook".into(), array(hooks));
    toml::to_string(&p).unwrap()
}

/// North Europe as the fake ARM holds it: the service principal, the shop's resource group with
/// its networks (production and test) and availability sets.
fn arm_state() -> serde_json::Value {
    let mut resources = serde_json::Map::new();
    let rg = format!("/subscriptions/{SUB}/resourceGroups/rg-shop-neu/providers");
    for vnet in ["vnet-shop-neu", "vnet-shop-neu-test"] {
        for subnet in ["snet-data", "snet-web"] {
            let id = format!("{rg}/Microsoft.Network/virtualNetworks/{vnet}/subnets/{subnet}");
            resources.insert(id.clone(), serde_json::json!({ "id": id, "name": subnet }));
        }
    }
    for set in ["avset-shop-data", "avset-shop-web"] {
        resources.insert(
            format!("{rg}/Microsoft.Compute/availabilitySets/{set}"),
            serde_json::json!({ "name": set }),
        );
    }
    serde_json::json!({
        "subscription_id": SUB,
        "display_name": "Shop",
        "tenant_id": "11111111-1111-1111-1111-111111111111",
        "client_id": "22222222-2222-2222-2222-222222222222",
        "client_secret": "the-service-principal-secret",
        "vm_sizes": [
            { "name": "Standard_E8s_v5", "numberOfCores": 8, "memoryInMB": 65536 },
            { "name": "Standard_D2s_v5", "numberOfCores": 2, "memoryInMB": 8192 }
        ],
        "resources": resources,
    })
}

#[test]
fn the_azure_to_azure_example_runs_from_apply_through_plan_failover() {
    use haven_e2e::nbd::NbdClient;
    const MIB: u64 = 1 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let a = Azurite::start().unwrap();
    let arm = haven_e2e::fake_arm::FakeArm::start(tmp.path(), &arm_state()).unwrap();
    let (agent_args, drain) = cache_config(tmp.path(), &a);
    let disks: Vec<std::path::PathBuf> = SHOP
        .iter()
        .enumerate()
        .map(|(n, m)| {
            let path = tmp.path().join(format!("{m}.raw"));
            mixed_disk(&path, 4 * MIB, 500 + n as u64).unwrap();
            path
        })
        .collect();
    let plugin =
        haven_e2e::default_bin_dir().join("../wasm32-wasip2/release/haven_azure_blob.wasm");
    let c = Cluster::start(
        tmp.path(),
        &disks[0],
        ClusterOptions {
            config_server: true,
            second_process_server: true,
            agent_via_config_server: true,
            machine: Some(SHOP[0].into()),
            retention: Some("window = \"1h\"".into()),
            agent_args: agent_args.clone(),
            ps_config: drain,
            mt_config: format!(
                "writer = \"blobs-neu\"\n\n[[plugin]]\nkind = \"target-writer\"\n\
                 name = \"blobs-neu\"\npath = {plugin:?}\ngrants = {{ http_hosts = [{:?}] }}\n\
                 settings = {{ endpoint = {:?}, container = \"replicas\", key = {:?} }}\n",
                a.host(),
                a.endpoint(),
                azurite::KEY
            ),
            ..ClusterOptions::default()
        },
    )
    .unwrap();
    let cs = c.cs.as_ref().unwrap();
    let more: Vec<(&str, &[std::path::PathBuf])> = SHOP
        .iter()
        .zip(&disks)
        .skip(1)
        .map(|(m, d)| (*m, std::slice::from_ref(d)))
        .collect();
    let agents = c.more_agents(&more, &agent_args).unwrap();
    cs.set_secret("haven-sp", "the-service-principal-secret")
        .unwrap();
    cs.set_secret("havenreplicasneu-key", azurite::KEY).unwrap();
    let file = tmp.path().join("azure-to-azure.toml");
    std::fs::write(&file, localised(&c, &a, &arm)).unwrap();
    haven_e2e::run_ok(cs.haven_command().arg("validate").arg(&file)).unwrap();
    cs.haven(&["apply", file.to_str().unwrap()]).unwrap();

    // Every VM's points arrive through the cache account; then each is written.
    let ports: Vec<u16> = std::iter::once(&c.agent)
        .chain(&agents)
        .map(|a| a.nbd_port)
        .collect();
    for (m, port) in SHOP.iter().zip(&ports) {
        haven_e2e::wait_for_point(cs, m).unwrap();
        let mut client = NbdClient::connect(&format!("127.0.0.1:{port}"), "disk").unwrap();
        let block = format!("{m} written before West Europe was lost ").repeat(128);
        client.write(MIB, &block.as_bytes()[..4096]).unwrap();
        client.flush().unwrap();
    }

    // A point of the whole group: each agent holds its writes and tags at one point, on
    // requests that reach it through the account.
    cs.haven(&["group", "point", "shop"]).unwrap();

    // West Europe lost: the shop group to that point, then the operator's step.
    let out = cs.haven(&["plan", "failover", "westeurope-lost"]).unwrap();
    assert!(
        out.contains("waits for an operator: Switch the Traffic Manager"),
        "{out}"
    );
    let out = cs.haven(&["plan", "resume", "westeurope-lost"]).unwrap();
    assert!(out.contains("plan westeurope-lost: done"), "{out}");

    // The VMs in West Europe are told through the account, and stop shipping.
    for agent in std::iter::once(&c.agent).chain(&agents) {
        poll(Duration::from_secs(60), Duration::from_millis(250), || {
            Ok(match agent.report() {
                Some(r) if r.disks[0].state == haven_net::stream::DiskState::FailedOver => Ok(()),
                r => Err(format!("the agent does not report failed-over: {r:?}")),
            })
        })
        .unwrap();
    }

    // ARM runs each VM in North Europe where the example puts it, on disks imported from the
    // page blobs, each equal to its source with the last write.
    let resources = arm.resources().unwrap();
    let group = format!("/subscriptions/{SUB}/resourceGroups/rg-shop-neu/providers");
    let get = |kind: &str, name: &str| -> &serde_json::Value {
        let id = format!("{group}/{kind}/{name}").to_lowercase();
        resources.get(&id).unwrap_or_else(|| panic!("no {id}"))
    };
    for (m, source) in SHOP.iter().zip(&disks) {
        let (size, subnet, set) = match *m {
            "shop-sql" => ("Standard_E8s_v5", "snet-data", "avset-shop-data"),
            _ => ("Standard_D2s_v5", "snet-web", "avset-shop-web"),
        };
        let vm = get("Microsoft.Compute/virtualMachines", m);
        assert_eq!(vm["_power"], "running", "{m}");
        let p = &vm["properties"];
        assert_eq!(p["hardwareProfile"]["vmSize"], size, "{m}");
        assert!(
            p["availabilitySet"]["id"]
                .as_str()
                .is_some_and(|id| id.ends_with(set)),
            "{m}: {p}"
        );
        let nic = get("Microsoft.Network/networkInterfaces", &format!("{m}-nic0"));
        let ip = &nic["properties"]["ipConfigurations"][0]["properties"];
        assert!(
            ip["subnet"]["id"].as_str().is_some_and(
                |s| s.ends_with(&format!("virtualNetworks/vnet-shop-neu/subnets/{subnet}"))
            ),
            "{m}: {ip}"
        );
        if *m == "shop-sql" {
            assert_eq!(ip["privateIPAddress"], "10.20.1.10", "{m}");
        }
        let disk = get("Microsoft.Compute/disks", &format!("{m}-disk0"));
        let uri = disk["properties"]["creationData"]["sourceUri"]
            .as_str()
            .expect("a sourceUri");
        let blob = uri
            .strip_prefix(&format!("{}/replicas/", a.endpoint()))
            .unwrap_or_else(|| panic!("{m}: {uri} is not in the replica container"));
        let local = tmp.path().join(format!("{m}-imported.vhd"));
        a.download("replicas", blob, &local).unwrap();
        assert!(
            haven_e2e::images_equal_as(source, "raw", &local, "vpc").unwrap(),
            "{m}: the imported blob differs from the source"
        );
    }
}

#[test]
fn a_gateway_with_another_cache_key_drains_nothing_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let azurite = Azurite::start().unwrap();
    let (agent_args, drain) = cache_config(dir.path(), &azurite);
    let drain_key = dir.path().join("drain-cache.key");
    std::fs::write(&drain_key, format!("{}\n", "a7".repeat(32))).unwrap();
    let disk = dir.path().join("shop-web1.raw");
    mixed_disk(&disk, 8 << 20, 23).unwrap();
    let mut c = Cluster::start(
        dir.path(),
        &disk,
        ClusterOptions {
            config_server: true,
            agent_via_config_server: true,
            machine: Some("shop-web1".into()),
            agent_args,
            ps_config: drain,
            ..ClusterOptions::default()
        },
    )
    .unwrap();
    // The agent ships all the same: the account keeps its records.
    c.agent.wait_protected().unwrap();
    poll(Duration::from_secs(30), Duration::from_millis(250), || {
        let log = std::fs::read_to_string(&c.ps.proc.log).unwrap_or_default();
        Ok(
            match log.contains("do not open with this gateway's cache key")
                && log.contains("does not open with this cache key")
            {
                true => Ok(()),
                false => Err("the gateway has not said why it does not drain".to_string()),
            },
        )
    })
    .unwrap();
    assert_eq!(
        drains(&c.ps),
        0,
        "a gateway that cannot open the streams leased them"
    );
    assert!(
        !segments(&azurite).is_empty(),
        "the account lost the agent's records"
    );
    assert!(
        c.mt.status()
            .unwrap()
            .master_target
            .unwrap()
            .replicas
            .is_empty()
    );

    // With the deployment's key, it drains them, and nothing was lost.
    std::fs::copy(dir.path().join("cache.key"), &drain_key).unwrap();
    c.ps.restart().unwrap();
    c.wait_caught_up(now_ms(), Duration::from_secs(120), |_, _| {})
        .unwrap();
    assert!(images_equal(&c.agent.disk, &c.replica().unwrap()).unwrap());
}
