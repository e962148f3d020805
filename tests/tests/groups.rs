//! Multi-machine consistency groups, through the configuration server: three machines, each
//! protected by its own agent, form one group. A workload writes to them in turn, each write
//! acknowledged before the next starts, so the machines' disks at any instant hold a prefix of
//! one sequence. A group point holds such a prefix on every member (test failovers of the
//! members at the point show it); the group's policy takes points on its own; a member that
//! cannot hold its writes makes the point fail, naming it, while the others write on; a plan
//! fails the group over to one group point, whose images hold one prefix too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use haven_e2e::nbd::NbdClient;
use haven_e2e::{Agent, Cluster, ClusterOptions, mixed_disk, poll};

const MEMBERS: [&str; 3] = ["app1", "app2", "app3"];

fn pipeline(c: &Cluster) -> Result<String> {
    let mut text = format!(
        r#"{head}[[policy]]
name = "fast"
kind = "replication"
crash_consistent_interval = "1s"
app_consistent_interval = "off"

[[policy]]
name = "grouped"
kind = "replication"
crash_consistent_interval = "1s"
app_consistent_interval = "off"

[[group]]
name = "app"
machines = ["app1", "app2", "app3"]
policy = "grouped"

[[plan]]
name = "dr"

[[plan.step]]
kind = "failover"
groups = ["app"]
"#,
        head = c.pipeline_head("groups")?,
    );
    for m in MEMBERS {
        text.push_str(&format!(
            "\n[[machine]]\nname = \"{m}\"\nsite = \"primary\"\npolicy = \"fast\"\n\
             process_server = \"ps1\"\nmaster_target = \"mt1\"\nwriter = \"raw\"\n"
        ));
    }
    Ok(text)
}

/// Block 0 of each member's disk at a point, as the sequence number written there last.
fn check_prefix(values: &[u64], what: &str) -> Result<u64> {
    let last = *values.iter().max().context("no members")?;
    let n = values.len() as u64;
    let expected: Vec<u64> = (0..n).map(|m| last - ((last + n - m) % n)).collect();
    if values != expected {
        bail!("{what}: the members hold {values:?}, not one prefix of the sequence ({expected:?})");
    }
    Ok(last)
}

/// The sequence number in the first 8 bytes of `block`.
fn seq_of(block: &[u8]) -> Result<u64> {
    Ok(u64::from_le_bytes(block[..8].try_into()?))
}

#[test]
fn a_group_point_is_one_instant_of_all_its_machines() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disks: Vec<_> = MEMBERS
        .iter()
        .map(|m| tmp.path().join(format!("{m}.raw")))
        .collect();
    for (n, d) in disks.iter().enumerate() {
        mixed_disk(d, 4 << 20, 40 + n as u64)?;
    }
    let c = Cluster::start(
        tmp.path(),
        &disks[0],
        ClusterOptions {
            config_server: true,
            machine: Some(MEMBERS[0].into()),
            retention: Some("window = \"1h\"".into()),
            ..ClusterOptions::default()
        },
    )?;
    let cs = c.cs.as_ref().context("cs")?;
    let bins = haven_e2e::default_bin_dir();
    let mut others = Vec::new();
    for (m, disk) in MEMBERS.iter().zip(&disks).skip(1) {
        others.push(Agent::enroll_and_start(
            &bins,
            &c.ps,
            &tmp.path().join(format!("agent-{m}")),
            disk,
            m,
            Vec::new(),
        )?);
    }
    let file = tmp.path().join("groups.toml");
    std::fs::write(&file, pipeline(&c)?)?;
    cs.haven(&["apply", file.to_str().context("path")?])?;
    for m in MEMBERS {
        haven_e2e::wait_for_point(cs, m)?;
    }

    // The workload: write i goes to block 0 of member i % 3 (holding i), once write i - 1 was
    // acknowledged. Writes to a member that does not answer are retried until it does.
    let ports: Vec<u16> = std::iter::once(c.agent.nbd_port)
        .chain(others.iter().map(|a| a.nbd_port))
        .collect();
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workload = {
        let (written, stop) = (Arc::clone(&written), Arc::clone(&stop));
        std::thread::spawn(move || -> Result<()> {
            let connect = |p: u16| NbdClient::connect(&format!("127.0.0.1:{p}"), "disk");
            let mut clients = ports
                .iter()
                .map(|p| connect(*p).map(Some))
                .collect::<Result<Vec<_>>>()?;
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let m = (i % 3) as usize;
                let block = i.to_le_bytes().repeat(512);
                let done = match &mut clients[m] {
                    Some(client) => client.write(0, &block).is_ok(),
                    None => false,
                };
                if !done {
                    // The member's agent is down: connect again, then write i again.
                    std::thread::sleep(Duration::from_millis(50));
                    clients[m] = connect(ports[m]).ok();
                    continue;
                }
                i += 1;
                written.store(i, Ordering::Release);
            }
            Ok(())
        })
    };
    let wait_writes = |n: u64| {
        poll(Duration::from_secs(30), Duration::from_millis(20), || {
            let w = written.load(Ordering::Acquire);
            Ok(if w >= n {
                Ok(w)
            } else {
                Err(format!("{w} writes"))
            })
        })
    };
    wait_writes(300)?;

    // A group point now: every member at one instant of the sequence.
    let out = cs.haven(&["group", "point", "app"])?;
    let point: u64 = out.trim().parse().with_context(|| format!("{out:?}"))?;
    let mut at_point = Vec::new();
    for m in MEMBERS {
        let uri = cs.haven(&["failover", "test", m, "--point", &point.to_string()])?;
        let (addr, export) = uri
            .trim()
            .trim_start_matches("nbd://")
            .split_once('/')
            .with_context(|| format!("not an NBD URI: {uri}"))?;
        at_point.push(seq_of(&NbdClient::connect(addr, export)?.read(0, 4096)?)?);
        cs.haven(&["failover", "cleanup", m])?;
    }
    let last = check_prefix(&at_point, &format!("group point {point}"))?;
    // Each member lists it as a group point (retention prefers it to the member's own).
    for m in MEMBERS {
        let points: Vec<serde_json::Value> =
            serde_json::from_str(&cs.haven(&["point", "list", m, "--json"])?)?;
        let p = points
            .iter()
            .find(|p| p["point"] == point)
            .with_context(|| format!("{m} does not list group point {point}"))?;
        assert_eq!(p["group"], true, "{m}: {p}");
    }
    assert!(
        last >= 299,
        "the point holds {last} writes, taken after 300"
    );

    // The group's policy takes points on its own (one a second).
    poll(Duration::from_secs(30), Duration::from_millis(500), || {
        let points: Vec<serde_json::Value> =
            serde_json::from_str(&cs.haven(&["group", "points", "app", "--json"])?)?;
        let newer = points
            .iter()
            .filter(|p| p["point"].as_u64().is_some_and(|id| id > point))
            .count();
        Ok(if newer >= 2 {
            Ok(())
        } else {
            Err(format!("{newer} group points after {point}"))
        })
    })?;

    // A member that cannot hold: no point, naming it; the other members write on.
    others[1].proc.kill();
    let failed = cs
        .haven(&["group", "point", "app", "--hold-ms", "300"])
        .expect_err("a group point without app3");
    let message = format!("{failed:#}");
    assert!(
        message.contains("no group point") && message.contains("app3"),
        "{message}"
    );
    // app1 was let go: a write to it (past block 0, which the sequence owns) is answered.
    let mut app1 = NbdClient::connect(&format!("127.0.0.1:{}", c.agent.nbd_port), "disk")?;
    app1.write(4096, &[7u8; 4096])?;
    drop(app1);
    let before = written.load(Ordering::Acquire);
    others[1].restart()?;
    wait_writes(before + 300)?;
    haven_e2e::wait_for_point(cs, "app3")?;

    // The plan fails the group over to its latest group point.
    let out = cs.haven(&["plan", "failover", "dr"])?;
    assert!(!out.contains("failed"), "{out}");
    stop.store(true, Ordering::Release);
    match workload.join() {
        Ok(r) => r?,
        Err(_) => bail!("the workload panicked"),
    }
    let job = cs.jobs()?;
    let job = job.into_iter().next().context("no job")?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let first = job["steps"][1]["name"].as_str().unwrap_or_default();
    assert_eq!(first, "latest point of group app", "{job:#}");
    let group_point: u64 = job["steps"][1]["output"]
        .as_str()
        .and_then(|o| o.strip_prefix("group point "))
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("no group point in {job:#}"))?;
    assert!(group_point > point, "{job:#}");
    let mut in_images = Vec::new();
    for m in MEMBERS {
        let item: serde_json::Value =
            serde_json::from_str(&cs.haven(&["failover", "show", m, "--json"])?)?;
        assert_eq!(item["item"]["point"]["point"], group_point, "{item:#}");
        let image = item["item"]["image"].as_str().context("no image")?;
        let bytes = std::fs::read(image)?;
        in_images.push(seq_of(&bytes)?);
    }
    check_prefix(
        &in_images,
        &format!("the failover images at group point {group_point}"),
    )?;
    Ok(())
}
