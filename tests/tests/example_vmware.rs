//! The VMware → VMware example pipeline (`examples/pipelines/vmware-to-vmware.toml`) end to
//! end: two vCenter simulators shaped as the example's datacentres (DC-A with the four VMs,
//! DC-B with the recovery folders, resource pools, port groups and datastore), an agent per
//! machine (the physical `files01` with three disks), and the example applied with only what
//! names this machine changed: gateway addresses, plugin files, vCenter URLs and users, the
//! datastore's folder, the health-check script and the webhook's address. Then its recovery
//! plan runs as an operator would: a test failover (every machine a `-test` VM on the isolated
//! network, its manual step resumed) and its cleanup (nothing left), then the failover, after
//! which the secondary vCenter runs every machine in its folder, pool and network, with the
//! CPUs and memory the example asks, on disks that `qemu-img compare` finds equal to the
//! sources.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use haven_e2e::example::{array, tables};
use haven_e2e::nbd::NbdClient;
use haven_e2e::vcsim::Vcsim;
use haven_e2e::{Agent, Cluster, ClusterOptions, mixed_disk, poll, run_ok};

/// The example's machines and their disks (files01 is the physical server).
const MACHINES: [(&str, usize); 5] = [
    ("erp-db01", 2),
    ("erp-app01", 1),
    ("web01", 1),
    ("web02", 1),
    ("files01", 3),
];

const DISK: u64 = 4 << 20;

fn example() -> PathBuf {
    haven_e2e::example::path("vmware-to-vmware.toml")
}

/// The example pipeline with what names this machine's parts put in.
fn localised(c: &Cluster, a: &Vcsim, b: &Vcsim, datastore: &Path) -> Result<String> {
    let text = std::fs::read_to_string(example())?;
    let mut p: toml::Table = text.parse().context("the example does not parse")?;
    let head: toml::Table = c.pipeline_head("dc-a-to-dc-b")?.parse()?;
    // This cluster's sites and gateways; the example's site names mapped onto them.
    p.insert("site".into(), head["site"].clone());
    p.insert("gateway".into(), head["gateway"].clone());
    let site = |s: &str| match s {
        "dc-a" => "primary".to_string(),
        "dc-b" => "secondary".to_string(),
        other => other.to_string(),
    };
    let set = |t: &mut toml::Table, key: &str, v: toml::Value| {
        t.insert(key.to_string(), v);
    };
    let s = |v: &str| toml::Value::String(v.to_string());

    let mut machines = tables(&p, "machine")?;
    for m in &mut machines {
        let name = m["site"].as_str().unwrap_or_default().to_string();
        set(m, "site", s(&site(&name)));
    }
    p.insert("machine".into(), array(machines));
    let mut mappings = tables(&p, "network_mapping")?;
    for m in &mut mappings {
        for key in ["source_site", "target_site"] {
            let name = m[key].as_str().unwrap_or_default().to_string();
            set(m, key, s(&site(&name)));
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
        set(plugin, "path", s(&wasm.join(&file).display().to_string()));
        let name = plugin["name"].as_str().unwrap_or_default().to_string();
        let vcenter = match name.as_str() {
            "vcenter-a" => Some(a),
            "vcenter-b" => Some(b),
            _ => None,
        };
        let grants = plugin
            .get_mut("grants")
            .and_then(toml::Value::as_table_mut)
            .context("a plugin without grants")?;
        match vcenter {
            Some(v) => {
                grants.insert(
                    "http_hosts".into(),
                    toml::Value::Array(vec![s(v.host_port())]),
                );
                let settings = plugin
                    .get_mut("settings")
                    .and_then(toml::Value::as_table_mut)
                    .context("an adapter without settings")?;
                settings.insert("url".into(), s(v.url()));
                settings.insert("user".into(), s(v.user()));
            }
            None => {
                grants.insert(
                    "storage_root".into(),
                    s(&datastore.join("haven").display().to_string()),
                );
            }
        }
    }
    p.insert("plugin".into(), array(plugins));

    let mut plans = tables(&p, "plan")?;
    for plan in &mut plans {
        let mut steps = tables(plan, "step")?;
        for step in &mut steps {
            if step["kind"].as_str() == Some("script") {
                set(
                    step,
                    "run",
                    s("test \"$HAVEN_PLAN\" = dc-a-lost && echo \"checked for $HAVEN_ACTION\""),
                );
            }
        }
        plan.insert("step".into(), array(steps));
    }
    p.insert("plan".into(), array(plans));
    let mut hooks = tables(&p, "webhook")?;
    for h in &mut hooks {
        set(h, "url", s("http://127.0.0.1:9/haven/dc-a"));
    }
    p.insert("webhook".into(), array(hooks));
    Ok(toml::to_string(&p)?)
}

/// The machines `platform` lists, by name.
fn machines(cs: &haven_e2e::Gateway, platform: &str) -> Result<Vec<serde_json::Value>> {
    cs.haven(&["platform", "refresh", platform])?;
    Ok(serde_json::from_str(
        &cs.haven(&["platform", "machines", platform, "--json"])?,
    )?)
}

fn named<'a>(list: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|m| m["name"] == name)
}

fn networks(m: &serde_json::Value) -> Vec<String> {
    m["nics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["network"].as_str().map(str::to_string))
        .collect()
}

fn locations(m: &serde_json::Value) -> Vec<String> {
    m["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["location"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn the_vmware_example_runs_from_apply_through_plan_failover() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let inventory = |name: &str, json: String| -> Result<PathBuf> {
        let file = tmp.path().join(name);
        std::fs::write(&file, json)?;
        Ok(file)
    };
    let vms: Vec<String> = MACHINES
        .iter()
        .filter(|(m, _)| *m != "files01")
        .map(|(m, disks)| {
            let (cpus, memory) = if m.starts_with("erp") {
                (4, 8192)
            } else {
                (2, 4096)
            };
            format!(
                r#"{{"name":"{m}","disks":{disks},"disk_mib":4,"network":"VM Network","cpus":{cpus},"memory_mib":{memory}}}"#
            )
        })
        .collect();
    let site_a = inventory(
        "dc-a.json",
        format!(r#"{{"datacenter":"DC-A","vms":[{}]}}"#, vms.join(",")),
    )?;
    let site_b = inventory(
        "dc-b.json",
        r#"{"datacenter":"DC-B","datastore":"dr-datastore01",
            "folders":["DR/ERP","DR/Web","DR/Files"],"pools":["DR-Gold","DR-Silver"],
            "portgroups":["DR-Production","DR-Test-Isolated"]}"#
            .into(),
    )?;
    let a = Vcsim::start_with(&["-inventory", site_a.to_str().context("path")?])?;
    let b = Vcsim::start_with(&["-inventory", site_b.to_str().context("path")?])?;
    let datastore = b
        .datastores()
        .iter()
        .find(|(name, _)| name == "dr-datastore01")
        .map(|(_, path)| path.clone())
        .context("the secondary simulator has no dr-datastore01")?;
    std::fs::create_dir_all(datastore.join("haven"))?;

    // Every machine's disks, each with data of its own.
    let mut disks: Vec<Vec<PathBuf>> = Vec::new();
    for (n, (m, count)) in MACHINES.iter().enumerate() {
        let mut own = Vec::new();
        for d in 1..=*count {
            let path = tmp.path().join(format!("{m}-disk{d}.raw"));
            mixed_disk(&path, DISK, 100 + (n * 10 + d) as u64)?;
            own.push(path);
        }
        disks.push(own);
    }
    let vmdk = haven_e2e::default_bin_dir().join("../wasm32-wasip2/release/haven_vmdk.wasm");
    let c = Cluster::start(
        tmp.path(),
        &disks[0][0],
        ClusterOptions {
            config_server: true,
            agent_via_config_server: true,
            machine: Some(MACHINES[0].0.into()),
            more_disks: disks[0][1..].to_vec(),
            retention: Some("window = \"1h\"".into()),
            mt_config: format!(
                "writer = \"vmdk\"\nwriter_options = {{ subformat = \"monolithicFlat\" }}\n\n\
                 [[plugin]]\nkind = \"target-writer\"\nname = \"vmdk\"\npath = {vmdk:?}\n\
                 grants = {{ storage_root = {:?} }}\n",
                datastore.join("haven")
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
    let mut agents = c.more_agents(&more, &[])?;

    // The secrets the example names, then the example itself.
    cs.set_secret("vcenter-a-password", a.password())?;
    cs.set_secret("vcenter-b-password", b.password())?;
    let file = tmp.path().join("vmware-to-vmware.toml");
    std::fs::write(&file, localised(&c, &a, &b, &datastore)?)?;
    run_ok(cs.haven_command().arg("validate").arg(&file))?;
    cs.haven(&["apply", file.to_str().context("path")?])?;

    // Both vCenters' inventories arrive: the four VMs at DC-A.
    poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let seen = machines(cs, "vcenter-a").unwrap_or_default();
        Ok(
            match MACHINES[..4].iter().all(|(m, _)| named(&seen, m).is_some()) {
                true => Ok(()),
                false => Err(format!("vcenter-a lists {} machines", seen.len())),
            },
        )
    })?;

    // What each machine holds at the point every plan step uses: written, then a point of
    // each machine and of the ERP group taken after it.
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
            client.write(1 << 20, &block.as_bytes()[..4096])?;
            client.flush()?;
        }
        cs.haven(&["point", "create", *m])?;
    }
    cs.haven(&["group", "point", "erp"])?;

    // A test failover of the plan: every machine a `-test` VM on the isolated network; the
    // plan waits at its manual step until resumed.
    let out = cs.haven(&["plan", "test-failover", "dc-a-lost"])?;
    assert!(
        out.contains("waits for an operator: Point erp.example.net"),
        "{out}"
    );
    let out = cs.haven(&["plan", "resume", "dc-a-lost"])?;
    assert!(out.contains("plan dc-a-lost: done"), "{out}");
    let seen = machines(cs, "vcenter-b")?;
    for (m, count) in MACHINES {
        let vm = named(&seen, &format!("{m}-test"))
            .with_context(|| format!("no test VM of {m} at vcenter-b"))?;
        assert_eq!(vm["power"], "running", "{vm}");
        assert_eq!(locations(vm).len(), count, "{vm}");
        if m != "files01" {
            assert_eq!(networks(vm), ["DR-Test-Isolated"], "{vm}");
        }
    }
    // Its cleanup leaves the secondary vCenter and the datastore as they were.
    cs.haven(&["plan", "cleanup", "dc-a-lost"])?;
    let seen = machines(cs, "vcenter-b")?;
    let left: Vec<&str> = seen
        .iter()
        .filter_map(|m| m["name"].as_str())
        .filter(|n| n.ends_with("-test"))
        .collect();
    assert!(left.is_empty(), "test VMs left: {left:?}");
    let files = haven_e2e::files_below(&datastore.join("haven/test-failover"));
    assert!(files.is_empty(), "test failover files left: {files:?}");

    // The failover: the ERP group at one group point, then the web tier and the file server,
    // the health check, and the operator's DNS change.
    let out = cs.haven(&["plan", "failover", "dc-a-lost"])?;
    assert!(out.contains("waits for an operator"), "{out}");
    let out = cs.haven(&["plan", "resume", "dc-a-lost"])?;
    assert!(out.contains("plan dc-a-lost: done"), "{out}");
    let jobs = cs.jobs()?;
    let job = jobs
        .iter()
        .find(|j| j["kind"] == "plan-failover")
        .context("no plan-failover job")?;
    let script = job["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"].as_str().is_some_and(|n| n.starts_with("script")))
        .with_context(|| format!("no script step: {job:#}"))?;
    assert_eq!(script["state"], "succeeded", "{job:#}");
    assert!(
        script["output"]
            .as_str()
            .is_some_and(|o| o.contains("checked for failover")),
        "{script}"
    );

    // Every machine runs at DC-B where the example puts it, on its replica disks.
    let seen = machines(cs, "vcenter-b")?;
    for ((m, count), sources) in MACHINES.iter().zip(&disks) {
        let vm = named(&seen, m).with_context(|| format!("no replica VM of {m} at vcenter-b"))?;
        assert_eq!(vm["power"], "running", "{vm}");
        let (cpus, memory, folder) = match *m {
            "erp-db01" | "erp-app01" => (4, 8192, "ERP"),
            "files01" => (4, 16384, "Files"),
            _ => (2, 4096, "Web"),
        };
        assert_eq!(vm["cpus"], cpus, "{vm}");
        assert_eq!(vm["memory_mib"], memory, "{vm}");
        let props = vm["properties"].to_string();
        assert!(
            props.contains(&format!("/DC-B/vm/DR/{folder}")),
            "{m} is not in folder DR/{folder}: {vm}"
        );
        if *m != "files01" {
            assert_eq!(networks(vm), ["DR-Production"], "{vm}");
        }
        let locations = locations(vm);
        assert_eq!(locations.len(), *count, "{vm}");
        for (d, source) in sources.iter().enumerate() {
            let location = locations
                .iter()
                .find(|l| l.contains(&format!("/disk{}-point", d + 1)))
                .with_context(|| format!("{m}: no disk {} in {locations:?}", d + 1))?;
            if !location.starts_with("[dr-datastore01] haven/failover/") {
                bail!("{m}: disk {location} is not a replica in the datastore's folder");
            }
            let out = run_ok(
                std::process::Command::new("qemu-img")
                    .args(["compare", "-f", "raw", "-F", "vmdk"])
                    .arg(source)
                    .arg(b.local_path(location)?),
            )?;
            assert!(
                out.contains("Images are identical"),
                "{m} disk {}: {out}",
                d + 1
            );
        }
    }
    fail_back_web01(&c, &a, &b, &mut agents[1], tmp.path())
}

/// Compares `a` (format `fa`) and `b` (format `fb`) with `qemu-img compare`.
fn identical(a: &Path, fa: &str, b: &Path, fb: &str) -> Result<bool> {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b)
        .output()?;
    Ok(out.status.success())
}

/// web01, failed over to DC-B's vCenter, comes back to its VM at DC-A by name: reprotected
/// onto the VM's own VMDK on DC-A's datastore (found in vcenter-a's inventory), then failed
/// back with the default failback policy: the replica VM powered off, the VM at DC-A
/// running, its VMDK holding every write the replica made, and web01 reprotected to DC-B.
fn fail_back_web01(
    c: &Cluster,
    a: &Vcsim,
    b: &Vcsim,
    source: &mut Agent,
    tmp: &Path,
) -> Result<()> {
    let cs = c.cs.as_ref().context("cs")?;
    let bins = haven_e2e::default_bin_dir();
    // The VM's disk at DC-A holds what web01 had there when it failed over: its agent's disk,
    // as the VM's VMDK (a descriptor and its flat extent).
    source.proc.kill();
    let vm_a = named(&machines(cs, "vcenter-a")?, "web01")
        .cloned()
        .context("no web01 at vcenter-a")?;
    let location = locations(&vm_a)
        .first()
        .cloned()
        .context("web01 has no disk")?;
    let vmdk_a = a.local_path(&location)?;
    run_ok(
        std::process::Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=monolithicFlat",
            ])
            .arg(&source.disk)
            .arg(&vmdk_a),
    )?;
    let (_, root_a) = a.datastores().first().context("no datastore at DC-A")?;
    let _rev = c.reverse_with(haven_e2e::ReverseWriter {
        format: "vmdk".into(),
        ..haven_e2e::ReverseWriter::raw(root_a)
    })?;
    cs.wait_joined("mt-a")?;

    // The replica VM's agent enrolls at DC-B; web01 reprotects by name alone.
    let dir_b = tmp.join("agent-web01-b");
    Agent::enroll_with_config_server(&bins, cs, "secondary", &dir_b, "web01")?;
    let out = cs.haven(&["reprotect", "web01"])?;
    assert!(out.contains("replicates to mt-a now"), "{out}");
    let vm_b = named(&machines(cs, "vcenter-b")?, "web01")
        .cloned()
        .context("no web01 at vcenter-b")?;
    let replica = b.local_path(locations(&vm_b).first().context("no disk")?)?;
    let flat_b = replica.with_file_name(format!(
        "{}-flat.vmdk",
        replica
            .file_stem()
            .and_then(|s| s.to_str())
            .context("image name")?
    ));
    let mut agent = Agent::start_disks(
        &bins,
        None,
        &dir_b,
        &flat_b,
        &[],
        vec!["--seeded".into(), "--point-interval".into(), "1h".into()],
    )?;
    agent.wait_protected()?;
    let mut client = NbdClient::connect(&format!("127.0.0.1:{}", agent.nbd_port), "disk")?;
    client.write(2 << 20, &[0x5a; 8192])?;
    client.flush()?;
    drop(client);

    // Its agent for the way back to DC-B enrolls at DC-A; then the failback.
    Agent::enroll_with_config_server(&bins, cs, "primary", &tmp.join("agent-web01-a2"), "web01")?;
    let out = cs.haven(&["failback", "web01"])?;
    assert!(out.contains("failback of machine web01: done"), "{out}");
    agent.proc.kill();
    assert!(
        identical(&vmdk_a, "vmdk", &flat_b, "raw")?,
        "web01's VMDK at DC-A lacks writes its replica made"
    );
    run_ok(
        std::process::Command::new("qemu-img")
            .args(["check", "-f", "vmdk"])
            .arg(&vmdk_a),
    )?;
    let on_b = named(&machines(cs, "vcenter-b")?, "web01")
        .cloned()
        .context("no web01 at vcenter-b")?;
    assert_eq!(on_b["power"], "stopped", "{on_b}");
    let on_a = named(&machines(cs, "vcenter-a")?, "web01")
        .cloned()
        .context("no web01 at vcenter-a")?;
    assert_eq!(on_a["power"], "running", "{on_a}");
    let jobs = cs.jobs()?;
    let job = jobs
        .iter()
        .find(|j| j["kind"] == "machine-failback")
        .context("no failback job")?;
    let steps: Vec<&str> = job["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    for step in [
        "power off replica",
        "power on web01 at vcenter-a",
        "reprotect web01",
    ] {
        assert!(
            steps.iter().any(|s| s.starts_with(step)),
            "{step}: {steps:?}"
        );
    }
    Ok(())
}
