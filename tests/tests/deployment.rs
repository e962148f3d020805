//! A deployment run from its configuration server: the process server and the master target
//! join it, report their health and status every second, and the operator reaches items,
//! points and test failover through the configuration server's API alone.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use haven_e2e::{Cluster, ClusterOptions, http_get, mixed_disk, poll, run_ok};
use haven_engine::status::GatewayStatus;

/// `haven ARGS --server <the configuration server>`.
fn via_cs(c: &Cluster, args: &[&str]) -> Result<String> {
    let cs = c.cs.as_ref().context("no configuration server")?;
    cs.haven(args)
}

fn deployment(c: &Cluster) -> Result<GatewayStatus> {
    let out = via_cs(c, &["status", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(serde_json::from_value(v[0]["status"].clone())?)
}

#[test]
fn gateways_join_and_items_are_reached_through_the_configuration_server() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, 16 << 20, 7)?;
    let mut c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            config_server: true,
            retention: Some("window = \"1h\"".into()),
            ..ClusterOptions::default()
        },
    )?;

    // Both gateways report, with their roles, health and the item.
    let joined = poll(Duration::from_secs(60), Duration::from_millis(250), || {
        let s = deployment(&c)?;
        let gateways = s.config_server.clone().unwrap_or_default();
        let ready = gateways.len() == 2
            && gateways.iter().all(|g| g.connected)
            && gateways.iter().any(|g| {
                g.status
                    .as_ref()
                    .is_some_and(|st| st["master_target"]["replicas"][0]["machine_name"] == "web01")
            });
        Ok(if ready {
            Ok(gateways)
        } else {
            Err(format!("not joined yet: {gateways:?}"))
        })
    })?;
    let by_name = |n: &str| joined.iter().find(|g| g.record.name == n).cloned();
    let mt = by_name("mt1").context("mt1 joined")?;
    let ps = by_name("ps1").context("ps1 joined")?;
    assert_eq!(mt.record.site, "secondary");
    assert_eq!(mt.record.roles, ["master-target"]);
    assert_eq!(ps.record.site, "primary");
    assert_eq!(ps.record.roles, ["process-server"]);
    let health = ps.health.context("ps1 health")?;
    assert!(
        health.memory_bytes > 0 && health.total_bytes > 0,
        "{health:?}"
    );
    assert!(health.free_bytes <= health.total_bytes, "{health:?}");

    // The item, its points and a test failover, through the configuration server only.
    let cs = c.cs.as_ref().context("cs")?;
    let items: Vec<serde_json::Value> =
        serde_json::from_str(&http_get(&format!("{}/v1/items", cs.api), &cs.admin_token)?)?;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["machine_name"], "web01", "{items:?}");
    let point = poll(
        Duration::from_secs(60),
        Duration::from_millis(500),
        || match via_cs(&c, &["point", "create", "web01"]) {
            Ok(id) => Ok(Ok(id.trim().to_string())),
            Err(e) => Ok(Err(format!("{e:#}"))),
        },
    )?;
    let list = via_cs(&c, &["point", "list", "web01"])?;
    assert!(list.contains(&point), "{list}");
    let uri = via_cs(&c, &["failover", "test", "web01", "--point", &point])?;
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&disk)
        .arg(uri.trim())
        .output()?;
    assert!(
        cmp.status.success(),
        "the point differs from the source: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    via_cs(&c, &["failover", "cleanup", "web01"])?;

    // An item no master target holds.
    let out = cs
        .haven_command()
        .args(["point", "list", "db99", "--server", &cs.api])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "HTTP 404: no master target joined to this configuration server holds item `db99`"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A gateway that stops reporting is shown as gone, the other stays connected.
    c.ps.proc.kill();
    poll(Duration::from_secs(30), Duration::from_millis(250), || {
        let gateways = deployment(&c)?.config_server.unwrap_or_default();
        let gone = gateways
            .iter()
            .any(|g| g.record.name == "ps1" && !g.connected);
        let mt_up = gateways
            .iter()
            .any(|g| g.record.name == "mt1" && g.connected);
        Ok(if gone && mt_up {
            Ok(())
        } else {
            Err(format!("{gateways:?}"))
        })
    })?;
    let table = run_ok(cs.haven_command().args(["status", "--server", &cs.api]))?;
    assert!(
        table.contains("gateway ps1 (site primary, process-server): gone since"),
        "{table}"
    );
    assert!(
        table.contains("gateway mt1 (site secondary, master-target): connected"),
        "{table}"
    );
    Ok(())
}
