//! The VMware → VMware deployment through the configuration server, against two vCenter
//! simulators: the pipeline names the primary vCenter as the machine's platform and the
//! secondary as its target; the master target keeps the replica as VMDK in the secondary's
//! datastore folder. The machine has three disks, protected by one agent, under a workload
//! that writes to them in turn, each write acknowledged before the next starts: a point of the
//! machine, presented by a test failover, holds a prefix of that sequence on every disk. A
//! test failover also defines `<name>-test` on the test network at the secondary, its disks
//! the point presented as VMDK files in the datastore; its cleanup leaves no VM and no file. A
//! planned failover powers the source VM off through the primary vCenter and defines and
//! starts the replica VM on the secondary, with the mapped network, the overridden CPUs and
//! memory and the three failover images as its disks, each of which `qemu-img compare` finds
//! equal to its source.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use haven_e2e::nbd::NbdClient;
use haven_e2e::vcsim::Vcsim;
use haven_e2e::{Cluster, ClusterOptions, mixed_disk, poll, run_ok, step_names};

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

/// The newest job of `kind`, once it has ended.

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
    let disks: Vec<_> = (1..=3)
        .map(|n| tmp.path().join(format!("disk{n}.raw")))
        .collect();
    for (n, d) in disks.iter().enumerate() {
        mixed_disk(d, 4 << 20, 21 + n as u64)?;
    }
    let disk = &disks[0];
    let vmdk = haven_e2e::default_bin_dir().join("../wasm32-wasip2/release/haven_vmdk.wasm");
    let c = Cluster::start(
        tmp.path(),
        disk,
        ClusterOptions {
            config_server: true,
            machine: Some(MACHINE.into()),
            more_disks: disks[1..].to_vec(),
            retention: Some("window = \"1h\"".into()),
            mt_config: format!(
                "writer = \"vmdk\"\nwriter_options = {{ subformat = \"monolithicFlat\" }}\n\n[[plugin]]\nkind = \"target-writer\"\nname = \"vmdk\"\n\
                 path = {vmdk:?}\ngrants = {{ storage_root = {datastore:?} }}\n"
            ),
            ..ClusterOptions::default()
        },
    )?;
    let cs = c.cs.as_ref().context("cs")?;

    cs.set_secret("vc-a", primary.password())?;
    cs.set_secret("vc-b", secondary.password())?;
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

    // Replication has a point of the machine (every disk's tag).
    haven_e2e::wait_for_point(cs, MACHINE)?;

    // The workload: write i goes to block 0 of disk i % 3 (holding i), once write i - 1 was
    // acknowledged. It runs until the planned failover closes the disks.
    let ports: Vec<u16> = std::iter::once(c.agent.nbd_port)
        .chain(c.agent.more_disks.iter().map(|d| d.nbd_port))
        .collect();
    let written = Arc::new(AtomicU64::new(0));
    let workload = {
        let written = Arc::clone(&written);
        std::thread::spawn(move || -> Result<u64> {
            let mut clients = ports
                .iter()
                .map(|p| NbdClient::connect(&format!("127.0.0.1:{p}"), "disk"))
                .collect::<Result<Vec<_>>>()?;
            for i in 0u64.. {
                let block = i.to_le_bytes().repeat(512);
                if clients[(i % 3) as usize].write(0, &block).is_err() {
                    return Ok(i);
                }
                written.store(i + 1, Ordering::Release);
            }
            unreachable!()
        })
    };
    poll(Duration::from_secs(30), Duration::from_millis(50), || {
        let n = written.load(Ordering::Acquire);
        Ok(if n >= 300 {
            Ok(())
        } else {
            Err(format!("{n} writes"))
        })
    })?;

    // A point taken now, presented by a test failover: each disk's block 0 is the last write
    // of a prefix of the sequence that disk got.
    let point = cs.haven(&["point", "create", MACHINE])?;
    let point = point
        .split_whitespace()
        .find_map(|w| w.parse::<u64>().ok())
        .with_context(|| format!("no point id in {point:?}"))?;
    let out = cs.haven(&["failover", "test", MACHINE, "--point", &point.to_string()])?;
    let uris: Vec<&str> = out.lines().filter(|l| l.starts_with("nbd://")).collect();
    assert_eq!(uris.len(), 3, "one export per disk: {out}");
    let mut at_point = Vec::new();
    for uri in &uris {
        let (addr, export) = uri
            .trim_start_matches("nbd://")
            .split_once('/')
            .with_context(|| format!("not an NBD URI: {uri}"))?;
        let mut client = NbdClient::connect(addr, export)?;
        let block = client.read(0, 4096)?;
        at_point.push(u64::from_le_bytes(block[..8].try_into()?));
    }
    let last = *at_point.iter().max().context("three disks")?;
    let expected: Vec<u64> = (0..3u64).map(|d| last - ((last + 3 - d) % 3)).collect();
    assert_eq!(
        at_point, expected,
        "the disks at point {point} are not one instant of the write sequence"
    );
    assert!(
        last >= 300,
        "the point holds {last} writes, taken after 300"
    );

    // The test failover also defined `<name>-test` at the secondary vCenter, on the test
    // network, its disks the point presented as VMDK files in the datastore (the writable
    // overlay the NBD exports serve).
    let job = cs.finished_job("test-failover")?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let steps = step_names(&job);
    assert_eq!(steps.len(), 4, "{steps:?}");
    assert_eq!(steps[1], "disks as files at mt1");
    assert_eq!(
        steps[2],
        format!("define test replica {MACHINE}-replica-test at vcenter-b")
    );
    assert!(steps[3].starts_with("power on "), "{steps:?}");
    cs.haven(&["platform", "refresh", "vcenter-b"])?;
    let test_vm = platform_machines(&c, "vcenter-b")?
        .into_iter()
        .find(|m| m["name"] == format!("{MACHINE}-replica-test"))
        .context("no test replica VM at the secondary vCenter")?;
    assert_eq!(test_vm["power"], "running", "{test_vm}");
    let networks: Vec<&str> = test_vm["nics"]
        .as_array()
        .context("nics")?
        .iter()
        .filter_map(|n| n["network"].as_str())
        .collect();
    assert_eq!(networks, ["DC0_DVPG0"], "the test network: {test_vm}");
    let locations: Vec<String> = test_vm["disks"]
        .as_array()
        .context("no disks on the test replica")?
        .iter()
        .filter_map(|d| d["location"].as_str().map(str::to_string))
        .collect();
    assert_eq!(locations.len(), 3, "{test_vm}");
    for (n, uri) in uris.iter().enumerate() {
        let location = locations
            .iter()
            .find(|l| l.ends_with(&format!("/disk{n}-point{point}.vmdk", n = n + 1)))
            .with_context(|| format!("no disk {} on the test replica: {locations:?}", n + 1))?;
        let file = datastore.join(
            location
                .strip_prefix("[LocalDS_0] test-failover/")
                .map(|l| format!("test-failover/{l}"))
                .with_context(|| format!("{location} is not a test failover's file"))?,
        );
        // The file is the point, as its NBD export presents it.
        let out = run_ok(
            std::process::Command::new("qemu-img")
                .args(["compare", "-f", "vmdk", "-F", "raw"])
                .arg(&file)
                .arg(uri),
        )?;
        assert!(
            out.contains("Images are identical"),
            "disk {}: {out}",
            n + 1
        );
        // What the test VM writes is what the export reads, and the source never sees it.
        let flat = file.with_file_name(format!("disk{}-point{point}-flat.vmdk", n + 1));
        let f = std::fs::OpenOptions::new().write(true).open(&flat)?;
        std::os::unix::fs::FileExt::write_all_at(&f, b"test vm wrote here", 1 << 20)?;
        f.sync_all()?;
        let (addr, export) = uri
            .trim_start_matches("nbd://")
            .split_once('/')
            .context("uri")?;
        let read = NbdClient::connect(addr, export)?.read(1 << 20, 4096)?;
        assert_eq!(&read[..18], b"test vm wrote here", "disk {}", n + 1);
    }

    // The cleanup deletes the test VM, then ends the test failover: the secondary vCenter is
    // as it was, and no file is left in the datastore.
    cs.haven(&["failover", "cleanup", MACHINE])?;
    let job = cs.finished_job("test-failover-cleanup")?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(
        step_names(&job)[0],
        format!("delete the test replica of {MACHINE}")
    );
    cs.haven(&["platform", "refresh", "vcenter-b"])?;
    let names: Vec<String> = platform_machines(&c, "vcenter-b")?
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::to_string))
        .collect();
    assert!(
        !names.iter().any(|n| n.ends_with("-test")),
        "the test VM is still there: {names:?}"
    );
    let left: Vec<_> = haven_e2e::files_below(&datastore.join("test-failover"))
        .into_iter()
        .chain(haven_e2e::files_below(
            &datastore.join(format!("{MACHINE}-replica-test")),
        ))
        .collect();
    assert!(left.is_empty(), "the test failover left files: {left:?}");

    // The planned failover, through the configuration server, while the workload writes.
    let out = cs.haven(&["failover", MACHINE, "--planned"])?;
    let images: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(images.len(), 3, "one image per disk: {out}");
    for (n, image) in images.iter().enumerate() {
        assert!(
            image.ends_with(".vmdk") && image.contains(&format!("/disk{}-point", n + 1)),
            "{out}"
        );
    }
    let stopped_at = match workload.join() {
        Ok(r) => r?,
        Err(_) => bail!("the workload panicked"),
    };
    assert!(stopped_at > last, "the workload stopped at {stopped_at}");

    // The job goes on with the platforms' steps.
    let job = cs.finished_job("failover")?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let steps = step_names(&job);
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
    // Its disks are the sources at the final point: every disk whole, nothing lost.
    let locations: Vec<&str> = replica["disks"]
        .as_array()
        .context("no disks on the replica")?
        .iter()
        .filter_map(|d| d["location"].as_str())
        .collect();
    assert_eq!(locations.len(), 3, "{replica}");
    for (n, (source, image)) in disks.iter().zip(&images).enumerate() {
        let location = locations
            .iter()
            .find(|l| l.contains(&format!("/disk{}-point", n + 1)))
            .with_context(|| format!("no disk {} on the replica: {locations:?}", n + 1))?;
        let relative = location
            .strip_prefix("[LocalDS_0] ")
            .with_context(|| format!("the replica's disk {location} is not on LocalDS_0"))?;
        assert_eq!(
            datastore.join(relative),
            std::path::Path::new(image),
            "{location}"
        );
        let out = run_ok(
            std::process::Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "vmdk"])
                .arg(source)
                .arg(datastore.join(relative)),
        )?;
        assert!(
            out.contains("Images are identical"),
            "disk {}: {out}",
            n + 1
        );
    }
    Ok(())
}
