//! The VMware → VMware deployment through the configuration server, against two vCenter
//! simulators: the pipeline names the primary vCenter as the machine's platform and the
//! secondary as its target; the master target keeps the replica as VMDK in the secondary's
//! datastore folder. A planned failover powers the source VM off through the primary vCenter
//! and defines and starts the replica VM on the secondary, with the mapped network, the
//! overridden CPUs and memory and the failover image as its disk, which `qemu-img compare`
//! finds equal to the source.

use std::time::Duration;

use anyhow::{Context, Result};
use haven_e2e::vcsim::Vcsim;
use haven_e2e::{Cluster, ClusterOptions, mixed_disk, poll, run_ok};

const MACHINE: &str = "DC0_H0_VM0";

fn adapter(name: &str, v: &Vcsim, secret: &str) -> String {
    let wasm = haven_e2e::default_bin_dir().join("../wasm32-wasip2/release/haven_vmware.wasm");
    format!(
        "[[plugin]]\nname = \"{name}\"\nkind = \"adapter\"\npath = {wasm:?}\n\n\
         [plugin.grants]\nhttp_hosts = [\"{}\"]\n\n\
         [plugin.settings]\nurl = \"{}\"\nuser = \"{}\"\npassword = \"secret:{secret}\"\n\n",
        v.host_port(),
        v.url(),
        v.user()
    )
}

fn platform_machines(c: &Cluster, platform: &str) -> Result<Vec<serde_json::Value>> {
    let cs = c.cs.as_ref().context("cs")?;
    Ok(serde_json::from_str(
        &cs.haven(&["platform", "machines", platform, "--json"])?,
    )?)
}

#[test]
fn a_planned_failover_powers_the_source_off_and_starts_a_replica_vm() -> Result<()> {
    let primary = Vcsim::start()?;
    let secondary = Vcsim::start()?;
    let datastore = secondary
        .datastores()
        .iter()
        .find(|(name, _)| name == "LocalDS_0")
        .map(|(_, path)| path.clone())
        .context("the secondary simulator has no LocalDS_0")?;

    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, 4 << 20, 21)?;
    let vmdk = haven_e2e::default_bin_dir().join("../wasm32-wasip2/release/haven_vmdk.wasm");
    let c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            config_server: true,
            machine: Some(MACHINE.into()),
            retention: Some("window = \"1h\"".into()),
            mt_config: format!(
                "writer = \"vmdk\"\nwriter_options = {{ subformat = \"monolithicFlat\" }}\n\n[[plugin]]\nkind = \"target-writer\"\nname = \"vmdk\"\n\
                 path = {vmdk:?}\ngrants = {{ storage_root = {datastore:?} }}\n"
            ),
            ..ClusterOptions::default()
        },
    )?;
    let cs = c.cs.as_ref().context("cs")?;

    for (name, v) in [("vc-a", &primary), ("vc-b", &secondary)] {
        let file = tmp.path().join(name);
        std::fs::write(&file, v.password())?;
        cs.haven(&[
            "secret",
            "set",
            name,
            "--from-file",
            file.to_str().context("path")?,
        ])?;
    }
    let pipeline = format!(
        r#"{head}{a}{b}[[policy]]
name = "fast"
kind = "replication"
crash_consistent_interval = "1s"
app_consistent_interval = "off"

[[network_mapping]]
name = "lan"
source_site = "primary"
target_site = "secondary"
source_network = "DC0_DVPG0"
target_network = "VM Network"
test_network = "DC0_DVPG0"

[[machine]]
name = "{MACHINE}"
site = "primary"
platform = "vcenter-a"
target_platform = "vcenter-b"
policy = "fast"
process_server = "ps1"
master_target = "mt1"
writer = "raw"

[machine.target]
name = "{MACHINE}-replica"
datastore = "LocalDS_0"
cpus = "2"
memory_mib = "2048"
"#,
        head = c.pipeline_head("vmware")?,
        a = adapter("vcenter-a", &primary, "vc-a"),
        b = adapter("vcenter-b", &secondary, "vc-b"),
    );
    let file = tmp.path().join("vmware.toml");
    std::fs::write(&file, pipeline)?;
    cs.haven(&["apply", file.to_str().context("path")?])?;

    // Both vCenters' inventories arrive; the protected VM runs.
    let source = poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let machines = platform_machines(&c, "vcenter-a")?;
        Ok(machines
            .into_iter()
            .find(|m| m["name"] == MACHINE)
            .ok_or_else(|| "no inventory of vcenter-a yet".to_string()))
    })?;
    assert_eq!(source["power"], "running", "{source}");
    poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let n = platform_machines(&c, "vcenter-b")?.len();
        Ok(if n > 0 {
            Ok(())
        } else {
            Err("no inventory of vcenter-b yet".to_string())
        })
    })?;

    // Replication has a point; then the planned failover, through the configuration server.
    haven_e2e::wait_for_point(cs, MACHINE)?;
    let out = cs.haven(&["failover", MACHINE, "--planned"])?;
    let failover_image = out.trim().to_string();
    assert!(failover_image.ends_with(".vmdk"), "{out}");

    // The job goes on with the platforms' steps.
    let job = poll(Duration::from_secs(120), Duration::from_millis(500), || {
        let jobs: Vec<serde_json::Value> =
            serde_json::from_str(&cs.haven(&["job", "list", "--json"])?)?;
        let job = jobs
            .into_iter()
            .find(|j| j["kind"] == "failover")
            .context("no failover job")?;
        Ok(match job["state"].as_str() {
            Some("running") => Err(format!("still running: {job}")),
            _ => Ok(job),
        })
    })?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let steps: Vec<&str> = job["steps"]
        .as_array()
        .context("steps")?
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(steps.len(), 5, "{steps:?}");
    assert!(
        steps[1].starts_with("wait for the image at mt1"),
        "{steps:?}"
    );
    assert_eq!(steps[2], format!("power off {MACHINE} at vcenter-a"));
    let stopped = job["steps"][2]["output"].as_str().unwrap_or_default();
    assert!(
        stopped.starts_with(&format!("{MACHINE} (vm-")) && stopped.ends_with(") stopped"),
        "{job:#}"
    );
    assert_eq!(
        steps[3],
        format!("define replica {MACHINE}-replica at vcenter-b")
    );
    assert!(steps[4].starts_with("power on "), "{steps:?}");

    // The source VM is off at the primary vCenter.
    cs.haven(&["platform", "refresh", "vcenter-a"])?;
    let source = platform_machines(&c, "vcenter-a")?
        .into_iter()
        .find(|m| m["name"] == MACHINE)
        .context("the source VM is gone")?;
    assert_eq!(source["power"], "stopped", "{source}");

    // The replica VM runs at the secondary, as the pipeline asked.
    cs.haven(&["platform", "refresh", "vcenter-b"])?;
    let replica = platform_machines(&c, "vcenter-b")?
        .into_iter()
        .find(|m| m["name"] == format!("{MACHINE}-replica"))
        .context("no replica VM at the secondary vCenter")?;
    assert_eq!(replica["power"], "running", "{replica}");
    assert_eq!(replica["cpus"], 2, "{replica}");
    assert_eq!(replica["memory_mib"], 2048, "{replica}");
    let networks: Vec<&str> = replica["nics"]
        .as_array()
        .context("nics")?
        .iter()
        .filter_map(|n| n["network"].as_str())
        .collect();
    assert_eq!(networks, ["VM Network"], "{replica}");
    let location = replica["disks"][0]["location"]
        .as_str()
        .context("no disk on the replica")?;
    let image = location
        .strip_prefix("[LocalDS_0] ")
        .with_context(|| format!("the replica's disk {location} is not on LocalDS_0"))?;
    assert_eq!(
        datastore.join(image),
        std::path::Path::new(&failover_image),
        "{location}"
    );

    // Its disk is the source at the final point: the whole disk, nothing lost.
    let out = run_ok(
        std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "vmdk"])
            .arg(&disk)
            .arg(datastore.join(image)),
    )?;
    assert!(out.contains("Images are identical"), "{out}");
    Ok(())
}
