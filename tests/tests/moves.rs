//! Agents placed by the configuration server: an agent enrolled there replicates to the
//! process server it names, and when that one is lost for good, to another of its site — with
//! what the lost process server acknowledged and never forwarded resent or resynced, and only
//! that.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use haven_e2e::{
    Cluster, ClusterOptions, Gateway, http_get, images_equal, mixed_disk, poll, qemu_io,
};
use haven_net::stream::DiskState;

const DISK: u64 = 64 << 20;

/// The deployment as a pipeline: web01 at `primary`, placed by the configuration server on
/// one of two process servers, moved after 5 s without its process server.
fn pipeline(c: &Cluster) -> Result<String> {
    Ok(format!(
        r#"{head}[[policy]]
name = "follow"
kind = "replication"
rpo_threshold = "1m"
crash_consistent_interval = "5s"
app_consistent_interval = "off"
process_server_grace = "5s"

[policy.retention]
window = "0s"
tiers = []

[[machine]]
name = "web01"
site = "primary"
policy = "follow"
master_target = "mt1"
writer = "raw"
"#,
        head = c.pipeline_head("moves")?,
    ))
}

/// The agent's placement at the configuration server: (process server, moves).
fn placement(cs: &Gateway) -> Result<Option<(String, u64)>> {
    let agents: Vec<serde_json::Value> = serde_json::from_str(&http_get(
        &format!("{}/v1/agents", cs.api),
        &cs.admin_token,
    )?)?;
    Ok(agents
        .iter()
        .find(|a| a["machine_name"] == "web01")
        .and_then(|a| {
            let p = &a["placement"];
            Some((
                p["process_server"].as_str()?.to_string(),
                p["moves"].as_u64()?,
            ))
        }))
}

#[test]
fn an_agent_moves_when_its_process_server_is_lost_and_resyncs_only_what_it_lost() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, DISK, 23)?;
    let mut c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            config_server: true,
            second_process_server: true,
            agent_via_config_server: true,
            // Small segments: what the process server acknowledges leaves the log soon.
            agent_args: vec!["--log-segment-bytes".into(), (1u64 << 20).to_string()],
            ..ClusterOptions::default()
        },
    )?;
    let file = tmp.path().join("moves.toml");
    std::fs::write(&file, pipeline(&c)?)?;
    // Kept here (it runs until dropped): the cluster is borrowed mutably below.
    let mut cs_gateway = c.cs.take().context("cs")?;
    let cs = &cs_gateway;
    let out = cs.haven(&["apply", file.to_str().context("path")?])?;
    assert!(out.contains("Applied: revision 1;"), "{out}");

    // Placed on the least loaded process server (both carry nothing: the first by name).
    c.wait_caught_up(haven_e2e::now_ms(), Duration::from_secs(180), |_, _| {})?;
    let (first, moves) = placement(cs)?.context("web01 is placed")?;
    assert_eq!((first.as_str(), moves), ("ps1", 0));
    assert!(
        images_equal(&c.replica()?, &disk)?,
        "the replica differs after the initial sync"
    );

    // The master target goes away: ps1 acknowledges writes it cannot forward, and the agent
    // frees them from its log.
    c.mt.proc.kill();
    let writes: Vec<String> = (0..48u64)
        .map(|i| {
            format!(
                "write -P {} {} 64k",
                0x40 + i,
                i * (DISK / 48) / 4096 * 4096
            )
        })
        .collect();
    qemu_io(&c.agent.nbd, &writes)?;
    poll(Duration::from_secs(60), Duration::from_millis(200), || {
        let r = c.agent.report().context("a report")?;
        let d = r.disks.first().context("a disk")?;
        Ok(if d.acked_seq == d.last_seq && d.log_bytes < 2 << 20 {
            Ok(())
        } else {
            Err(format!("not released yet: {d:?}"))
        })
    })?;

    // ps1 is lost for good; the master target comes back.
    c.ps.proc.kill();
    c.mt.spawn()?;

    // The configuration server moves the agent to ps2 once ps1 is gone past the grace; ps2
    // takes it over where the master target resumes, and the agent resyncs what ps1 lost.
    let since = haven_e2e::now_ms();
    poll(Duration::from_secs(180), Duration::from_millis(500), || {
        c.agent.proc.check_alive("haven-agent")?;
        let placed = placement(cs)?;
        let report = c.agent.report();
        let mt = c.mt.status()?;
        let done = placed
            .as_ref()
            .is_some_and(|(ps, moves)| ps == "ps2" && *moves == 1)
            && report.as_ref().is_some_and(|r| {
                r.time_ms > since
                    && r.disks.first().is_some_and(|d| {
                        d.state == DiskState::Protected
                            && d.acked_seq == d.last_seq
                            && mt
                                .master_target
                                .as_ref()
                                .and_then(|m| m.replicas.first())
                                .is_some_and(|x| x.applied_seq >= d.last_seq && x.error.is_none())
                    })
            });
        Ok(if done {
            Ok(())
        } else {
            Err(format!(
                "not moved and caught up yet: placement {placed:?}, agent {:?}",
                report.and_then(|r| r.disks.first().cloned())
            ))
        })
    })?;
    assert!(
        images_equal(&c.replica()?, &disk)?,
        "the replica differs from the disk after the move"
    );

    // Only what the lost records wrote was compared: each write touches two 64 KiB blocks
    // at most, and those the log still held were sent again, not compared.
    let report = c.agent.report().context("a report")?;
    let d = report.disks.first().context("a disk")?;
    let most = 48 * 2 * 65_536;
    if d.resync_compared_bytes == 0 || d.resync_compared_bytes > most || d.resync_sent_bytes > most
    {
        bail!(
            "the resync compared {} bytes and sent {}; expected what the 48 lost writes touched \
             (at most {most} of the disk's {DISK})",
            d.resync_compared_bytes,
            d.resync_sent_bytes,
        );
    }

    // The move is an event, and the agent list says where it went.
    let events = http_get(&format!("{}/v1/events?limit=1000", cs.api), &cs.admin_token)?;
    assert!(
        events.contains("\"agent.moved\"") && events.contains("from process server ps1"),
        "{events}"
    );
    let list = cs.haven(&["agent", "list"])?;
    assert!(
        list.lines()
            .any(|l| l.contains("web01") && l.contains("ps2")),
        "{list}"
    );

    // Without the configuration server, ps2 restarted still serves the agent it enrolled:
    // its CRL and assignment were kept.
    cs_gateway.proc.kill();
    c.ps2.as_mut().context("ps2")?.restart()?;
    qemu_io(&c.agent.nbd, &["write -P 0x7e 0 1M".to_string()])?;
    let since = haven_e2e::now_ms();
    poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let r = c.agent.report().context("a report")?;
        let d = r.disks.first().context("a disk")?;
        let mt = c.mt.status()?;
        let applied = mt
            .master_target
            .as_ref()
            .and_then(|m| m.replicas.first())
            .map_or(0, |x| x.applied_seq);
        Ok(
            if r.time_ms > since && d.acked_seq == d.last_seq && applied >= d.last_seq {
                Ok(())
            } else {
                Err(format!(
                    "not replicated after ps2's restart: {d:?}, applied {applied}"
                ))
            },
        )
    })?;
    assert!(
        images_equal(&c.replica()?, &disk)?,
        "the replica differs from the disk after ps2's restart"
    );
    Ok(())
}

/// Every replica of the master target equals its source, and is applied up to what the agent
/// reported last, when that report is newer than `since`.
fn caught_up(c: &Cluster, disks: &[std::path::PathBuf], since: u64) -> Result<Result<(), String>> {
    let Some(report) = c.agent.report().filter(|r| r.time_ms > since) else {
        return Ok(Err("no new report yet".into()));
    };
    let status = c.mt.status()?;
    let replicas = status.master_target.map(|m| m.replicas).unwrap_or_default();
    for (n, source) in disks.iter().enumerate() {
        let id = n as u32 + 1;
        let (Some(d), Some(r)) = (
            report.disks.iter().find(|d| d.disk == id),
            replicas.iter().find(|r| r.disk == id),
        ) else {
            return Ok(Err(format!("disk {id} is not replicated yet")));
        };
        if d.state != DiskState::Protected
            || d.acked_seq != d.last_seq
            || r.applied_seq < d.last_seq
        {
            return Ok(Err(format!(
                "disk {id} is not caught up: {d:?}, applied {}",
                r.applied_seq
            )));
        }
        if !images_equal(&c.mt.data_dir.join("replicas").join(&r.path), source)? {
            return Ok(Err(format!("disk {id}'s replica differs")));
        }
    }
    Ok(Ok(()))
}

#[test]
fn a_machine_of_two_disks_moves_whole() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disks = [tmp.path().join("disk1.raw"), tmp.path().join("disk2.raw")];
    mixed_disk(&disks[0], 16 << 20, 31)?;
    mixed_disk(&disks[1], 8 << 20, 32)?;
    let mut c = Cluster::start(
        tmp.path(),
        &disks[0],
        ClusterOptions {
            config_server: true,
            second_process_server: true,
            agent_via_config_server: true,
            more_disks: vec![disks[1].clone()],
            ..ClusterOptions::default()
        },
    )?;
    let file = tmp.path().join("moves.toml");
    std::fs::write(&file, pipeline(&c)?)?;
    let cs_gateway = c.cs.take().context("cs")?;
    let cs = &cs_gateway;
    cs.haven(&["apply", file.to_str().context("path")?])?;
    poll(Duration::from_secs(120), Duration::from_millis(300), || {
        caught_up(&c, &disks, 0)
    })?;
    assert_eq!(placement(cs)?.context("placed")?, ("ps1".to_string(), 0));

    // ps1 is lost: both disks go to ps2, taken over where the master target resumes each.
    c.ps.proc.kill();
    let more = format!(
        "nbd://127.0.0.1:{}/disk",
        c.agent.more_disks.first().context("disk 2")?.nbd_port
    );
    qemu_io(&c.agent.nbd, &["write -P 0x51 1M 256k".to_string()])?;
    qemu_io(&more, &["write -P 0x52 2M 256k".to_string()])?;
    let since = haven_e2e::now_ms();
    poll(Duration::from_secs(180), Duration::from_millis(500), || {
        c.agent.proc.check_alive("haven-agent")?;
        match placement(cs)? {
            Some((ps, 1)) if ps == "ps2" => caught_up(&c, &disks, since),
            other => Ok(Err(format!("not moved yet: {other:?}"))),
        }
    })?;
    Ok(())
}
