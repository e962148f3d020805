//! Resuming after a restart, and the source side's view of a failover: a restarted gateway is
//! noticed at once (its stateless reset ends the old connection), a restarted agent's new
//! stream supersedes the old one, and a failed-over item stops replicating at every party,
//! each saying so.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use haven_e2e::{Cluster, ClusterOptions, mixed_disk, now_ms, poll, qemu_io};
use haven_net::stream::DiskState;

const DISK: u64 = 16 << 20;
/// The goal: data flows again this soon after a gateway restarted.
const RESUMED_WITHIN: Duration = Duration::from_secs(3);

fn cluster(root: &std::path::Path, options: ClusterOptions) -> Result<Cluster> {
    let disk = root.join("disk.raw");
    mixed_disk(&disk, DISK, 11)?;
    let mut c = Cluster::start(root, &disk, options)?;
    c.wait_caught_up(now_ms(), Duration::from_secs(120), |_, _| {})?;
    Ok(c)
}

/// Restarts a gateway (SIGKILL, start at once), then writes a probe: the master target must
/// have applied it within [`RESUMED_WITHIN`].
fn probe_resumes_after_restart(which: &str) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut c = cluster(tmp.path(), ClusterOptions::default())?;
    match which {
        "process server" => c.ps.restart()?,
        _ => c.mt.restart()?,
    }
    qemu_io(&c.agent.nbd, &["write -P 0x5a 4M 64k".into()])?;
    let (end, end_ms) = (Instant::now(), now_ms());
    let took = c.applied_after(end, end_ms, Duration::from_secs(60))?;
    eprintln!("probe applied {took:?} after the {which}'s restart");
    assert!(
        took <= RESUMED_WITHIN,
        "the probe took {took:?} to reach the replica after the {which} restarted"
    );
    Ok(())
}

#[test]
fn a_restarted_process_server_has_data_flowing_within_seconds() -> Result<()> {
    probe_resumes_after_restart("process server")
}

#[test]
fn a_restarted_master_target_has_data_flowing_within_seconds() -> Result<()> {
    probe_resumes_after_restart("master target")
}

/// The process server's view of the agent's disk.
fn agent_connected(c: &Cluster) -> Result<bool> {
    let s = c.ps.status()?;
    let ps = s.process_server.context("no process server role")?;
    Ok(ps.disks.first().context("no disk")?.agent_connected)
}

#[test]
fn a_restarted_agent_stays_connected_after_its_old_connection_ends() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut c = cluster(tmp.path(), ClusterOptions::default())?;
    c.agent.restart()?;
    poll(Duration::from_secs(30), Duration::from_millis(100), || {
        Ok(if agent_connected(&c)? {
            Ok(())
        } else {
            Err("the restarted agent is not shown connected".to_string())
        })
    })?;
    // The killed agent's connection ends when the process server's idle timeout expires; its
    // stream was superseded by the new one, so its end must not mark the agent away.
    let log = c.ps.data_dir.join("gateway.log");
    poll(Duration::from_secs(60), Duration::from_millis(200), || {
        let text = std::fs::read_to_string(&log)?;
        Ok(if text.contains("agent disconnected") {
            Ok(())
        } else {
            Err("the old connection never ended".to_string())
        })
    })?;
    assert!(
        agent_connected(&c)?,
        "the agent is shown away after its old connection ended"
    );
    assert!(
        std::fs::read_to_string(&log)?.contains("a newer replication stream took over"),
        "the old stream was not superseded"
    );
    Ok(())
}

#[test]
fn after_a_failover_the_source_side_says_so_and_stops() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut c = cluster(
        tmp.path(),
        ClusterOptions {
            retention: Some("window = \"1h\"".into()),
            ..Default::default()
        },
    )?;
    let id = poll(Duration::from_secs(60), Duration::from_millis(500), || {
        Ok(c.mt
            .haven(&["point", "create", "web01"])
            .map(|id| id.trim().to_string())
            .map_err(|e| format!("{e:#}")))
    })?;
    c.mt.haven(&["failover", "web01", "--point", &id])?;

    // The agent is told, reports it and says what to do.
    let report = poll(Duration::from_secs(30), Duration::from_millis(200), || {
        Ok(match c.agent.report() {
            Some(r) if r.disks[0].state == DiskState::FailedOver => Ok(r),
            r => Err(format!("the agent does not report failed-over: {r:?}")),
        })
    })?;
    assert_eq!(report.agent_id.len(), 32, "the agent's own id: {report:?}");
    let message = report.disks[0].message.clone().unwrap_or_default();
    assert!(message.contains("failed over"), "{message}");
    assert!(message.contains("enroll the agent anew"), "{message}");
    // The process server shows it and stops forwarding it.
    let ps = c.ps.status()?.process_server.context("no process server")?;
    let disk = ps.disks.first().context("no disk")?;
    assert_eq!(disk.state(), "failed-over", "{disk:?}");
    let table = c.ps.haven(&["status"])?;
    assert!(
        table.contains("failed-over") && table.contains("every item failed over"),
        "{table}"
    );
    let log = std::fs::read_to_string(c.ps.data_dir.join("gateway.log"))?;
    assert_eq!(
        log.matches("forwarding stopped").count(),
        1,
        "forwarding was not stopped once:\n{log}"
    );
    // The master target's table says replication is stopped.
    let mt = c.mt.status()?.master_target.context("no master target")?;
    assert_eq!(mt.replicas[0].state(), "stopped");
    // `haven-agent status` prints it.
    let out = std::process::Command::new(haven_e2e::default_bin_dir().join("haven-agent"))
        .args(["status", "--data-dir"])
        .arg(&c.agent.data_dir)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("failed-over"), "{text}");
    c.check_alive()?;
    Ok(())
}
