//! A deployment run from its configuration server: the process server and the master target
//! join it, report their health and status every second, and the operator reaches items,
//! points and test failover through the configuration server's API alone.

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
    assert!(
        haven_e2e::images_equal(&disk, std::path::Path::new(uri.trim()))?,
        "the point at {uri} differs from the source"
    );
    via_cs(&c, &["failover", "cleanup", "web01"])?;

    // Each change ran as a job, kept with its outcome; one that fails is an event.
    let out = cs
        .haven_command()
        .args(["failover", "web01", "--point", "12345", "--server", &cs.api])
        .output()?;
    assert!(!out.status.success(), "{out:?}");
    let jobs = via_cs(&c, &["job", "list"])?;
    let kinds: Vec<(&str, &str)> = jobs
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((*f.get(3)?, *f.get(5)?))
        })
        .collect();
    for expected in [
        ("failover", "failed"),
        ("test-failover-cleanup", "succeeded"),
        ("test-failover", "succeeded"),
        ("point", "succeeded"),
    ] {
        assert!(kinds.contains(&expected), "{expected:?} not in {jobs}");
    }
    let failed: serde_json::Value = serde_json::from_str(&via_cs(&c, &["job", "list", "--json"])?)?;
    let id = failed[0]["id"].as_u64().context("a job id")?;
    let shown = via_cs(&c, &["job", "show", &id.to_string()])?;
    assert!(
        shown.contains("failover of web01): failed")
            && shown.contains("POST /v1/items/web01/failover"),
        "{shown}"
    );
    assert!(shown.contains("HTTP 404"), "{shown}");
    let events = via_cs(&c, &["events"])?;
    assert!(
        events
            .lines()
            .any(|l| l.contains("job.failed") && l.contains(&format!("job {id} "))),
        "{events}"
    );

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
    // Events of what happened, raised once each (checked every second for a silent gateway).
    poll(Duration::from_secs(10), Duration::from_millis(250), || {
        let events = cs.haven(&["events"])?;
        let missing: Vec<&str> = [
            "test-failover.started",
            "test-failover.cleaned-up",
            "gateway.unreachable",
        ]
        .into_iter()
        .filter(|k| events.matches(k).count() != 1)
        .collect();
        Ok(if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("not exactly once: {missing:?} in {events}"))
        })
    })?;
    // Loading the writer plugin is no trap.
    let events = cs.haven(&["events"])?;
    assert!(!events.contains("plugin.trapped"), "{events}");
    Ok(())
}

/// The test deployment as a pipeline: web01 protected from `primary` to `secondary` under the
/// replication policy `fast` (a point every `interval`, points older than 5 s thinned to one
/// per 10 s).
fn pipeline(c: &Cluster, interval: &str, with_machine: bool, hook: u16) -> Result<String> {
    let machine = if with_machine {
        "\n[[machine]]\nname = \"web01\"\nsite = \"primary\"\npolicy = \"fast\"\n\
         process_server = \"ps1\"\nmaster_target = \"mt1\"\nwriter = \"raw\"\n"
    } else {
        ""
    };
    Ok(format!(
        r#"{head}[[policy]]
name = "fast"
kind = "replication"
rpo_threshold = "1m"
crash_consistent_interval = "{interval}"
app_consistent_interval = "off"

[policy.retention]
window = "1h"
tiers = [{{ for_last = "5s", every = "0s" }}, {{ for_last = "1h", every = "10s" }}]

[[webhook]]
name = "ops"
url = "http://127.0.0.1:{hook}/haven"
events = ["agent.*"]
min_severity = "warning"
{machine}"#,
        head = c.pipeline_head("test")?,
    ))
}

/// web01's points at the master target, through the configuration server: source times, ms.
fn point_times(c: &Cluster) -> Result<Vec<u64>> {
    haven_e2e::point_times(&via_cs(c, &["point", "list", "web01", "--json"])?)
}

#[test]
fn a_pipeline_applied_at_the_configuration_server_reaches_agents_and_master_targets() -> Result<()>
{
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, 8 << 20, 11)?;
    // The agent's own interval is 30 s: every point faster than that comes from the policy.
    let c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            config_server: true,
            retention: Some("window = \"1h\"".into()),
            agent_args: vec!["--point-interval".into(), "30s".into()],
            ..ClusterOptions::default()
        },
    )?;
    let cs = c.cs.as_ref().context("cs")?;
    let (hook, posted) = receiver()?;
    let file = tmp.path().join("deployment.toml");
    std::fs::write(&file, pipeline(&c, "500ms", true, hook)?)?;
    let file_arg = file.to_str().context("path")?;

    let out = run_ok(cs.haven_command().args(["validate", file_arg]))?;
    assert!(out.contains("deployment `test` is valid"), "{out}");
    let out = cs.haven(&["apply", file_arg, "--dry-run"])?;
    assert!(out.contains("+ machine web01"), "{out}");
    assert!(out.contains("+ policy fast"), "{out}");
    assert!(out.contains("Dry run: nothing was applied."), "{out}");
    let out = cs.haven(&["export"]);
    assert!(
        format!("{out:?}").contains("no pipeline was applied to this deployment yet"),
        "{out:?}"
    );

    // Applied: the agent takes a point every 500 ms, and the master target thins them.
    poll(Duration::from_secs(120), Duration::from_millis(500), || {
        Ok(match via_cs(&c, &["point", "list", "web01"]) {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("web01 not protected yet: {e:#}")),
        })
    })?;
    let out = cs.haven(&["apply", file_arg])?;
    assert!(out.contains("Applied: revision 1;"), "{out}");
    let applied = haven_e2e::now_ms();
    let times = poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let times = point_times(&c)?;
        let recent: Vec<u64> = times.iter().copied().filter(|&t| t > applied).collect();
        Ok(if recent.len() >= 8 {
            Ok(recent)
        } else {
            Err(format!("points since the policy was applied: {recent:?}"))
        })
    })?;
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        haven_e2e::close_pairs(&times, 1500) >= 4,
        "the agent does not take points every 500 ms: gaps {gaps:?}"
    );
    // Older than 5 s: at most one per 10 s bucket (the gateway's own policy keeps them all).
    poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let times = point_times(&c)?;
        let now = haven_e2e::now_ms();
        let old: Vec<u64> = times
            .iter()
            .copied()
            .filter(|&t| t > applied && t + 6000 < now)
            .collect();
        let crowded = old.windows(2).any(|w| w[0] / 10_000 == w[1] / 10_000);
        Ok(if old.len() >= 2 && !crowded {
            Ok(())
        } else {
            Err(format!("points older than 5 s not thinned: {old:?}"))
        })
    })?;

    // Exported, the file applies unchanged.
    let exported = tmp.path().join("exported.toml");
    std::fs::write(&exported, cs.haven(&["export"])?)?;
    let out = cs.haven(&["apply", exported.to_str().context("path")?])?;
    assert!(out.contains("No changes."), "{out}");
    assert!(out.contains("Nothing to apply"), "{out}");

    // A change is shown as one.
    std::fs::write(&file, pipeline(&c, "1s", true, hook)?)?;
    let out = cs.haven(&["apply", file_arg])?;
    assert!(
        out.contains("~ policy fast: crash_consistent_interval 500ms → 1s"),
        "{out}"
    );
    assert!(out.contains("Applied: revision 2;"), "{out}");

    // Removing the machine would drop its journal: refused without --allow-destroy.
    std::fs::write(&file, pipeline(&c, "1s", false, hook)?)?;
    let out = cs
        .haven_command()
        .args(["apply", file_arg, "--server", &cs.api])
        .output()?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTP 409: 1 change(s) would destroy"),
        "{stderr}"
    );
    assert!(stderr.contains("- machine web01"), "{stderr}");
    let still = cs.haven(&["export"])?;
    assert!(still.contains("name = \"web01\""), "{still}");

    // With the configuration server down, a restarted process server still sends the agent
    // its policy: it runs the assignment it kept.
    let mut c = c;
    let kept = c.ps.data_dir.join("join/assignment.json");
    poll(Duration::from_secs(10), Duration::from_millis(200), || {
        let kept: serde_json::Value = serde_json::from_slice(&std::fs::read(&kept)?)?;
        let web01 = &kept["machines"]["web01"];
        Ok(
            if kept["revision"] == 2 && web01["crash_consistent_interval_ms"] == 1000 {
                Ok(())
            } else {
                Err(format!("revision 2 not kept: {kept}"))
            },
        )
    })?;
    c.cs.as_mut().context("cs")?.proc.kill();
    c.ps.restart()?;
    let restarted = haven_e2e::now_ms();
    poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let out = c.mt.haven(&["point", "list", "web01", "--json"])?;
        let times: Vec<u64> = haven_e2e::point_times(&out)?
            .into_iter()
            .filter(|&t| t > restarted)
            .collect();
        let fast = haven_e2e::close_pairs(&times, 1500);
        Ok(if fast >= 3 {
            Ok(())
        } else {
            Err(format!(
                "no points a second apart since the restart: {times:?}"
            ))
        })
    })?;
    c.cs.as_mut().context("cs")?.spawn()?;

    // The agent stops: an event, at the configuration server and at the webhook.
    c.agent.proc.kill();
    let cs = c.cs.as_ref().context("cs")?;
    let event: serde_json::Value = serde_json::from_slice(
        &posted
            .recv_timeout(Duration::from_secs(30))
            .context("no event posted to the webhook")?,
    )?;
    assert_eq!(event["kind"], "agent.disconnected", "{event}");
    assert_eq!(event["severity"], "warning", "{event}");
    assert_eq!(event["item"], "web01", "{event}");
    let listed = cs.haven(&["events"])?;
    assert!(
        listed
            .lines()
            .any(|l| l.contains("agent.disconnected") && l.contains("web01")),
        "{listed}"
    );
    let metrics = http_get(&format!("{}/metrics", cs.api), &cs.admin_token)?;
    assert!(
        metrics.contains(r#"haven_events_total{kind="agent.disconnected",severity="warning"} 1"#),
        "{metrics}"
    );

    // A file with mistakes: every one, with its place; nothing applied.
    std::fs::write(
        &file,
        pipeline(&c, "100ms", true, hook)?.replace("[[plugin]]", "[[plugin]]\ncolour = \"red\""),
    )?;
    let out = cs
        .haven_command()
        .args(["apply", file_arg, "--server", &cs.api])
        .output()?;
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("deployment.toml:"), "{stderr}");
    assert!(stderr.contains("colour"), "{stderr}");
    assert!(stderr.contains("crash_consistent_interval"), "{stderr}");
    assert!(
        stderr.contains("2 problem(s); nothing was applied"),
        "{stderr}"
    );

    // The machine leaves the pipeline: its agent goes back to its own interval (30 s).
    c.agent.restart()?;
    let back = haven_e2e::now_ms();
    poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let times: Vec<u64> = point_times(&c)?.into_iter().filter(|&t| t > back).collect();
        Ok(if haven_e2e::close_pairs(&times, 1500) >= 2 {
            Ok(())
        } else {
            Err(format!(
                "the restarted agent has not got its policy: {times:?}"
            ))
        })
    })?;
    std::fs::write(&file, pipeline(&c, "1s", false, hook)?)?;
    let out = cs.haven(&["apply", file_arg, "--allow-destroy"])?;
    assert!(out.contains("- machine web01"), "{out}");
    std::thread::sleep(Duration::from_secs(2));
    let since = haven_e2e::now_ms();
    std::thread::sleep(Duration::from_secs(6));
    let after: Vec<u64> =
        haven_e2e::point_times(&c.mt.haven(&["point", "list", "web01", "--json"])?)?
            .into_iter()
            .filter(|&t| t > since)
            .collect();
    assert!(
        after.len() <= 1,
        "the agent still takes points every second after its machine left: {after:?}"
    );
    Ok(())
}

/// A webhook receiver on a free loopback port: each POST's body arrives on the channel and is
/// answered 200.
fn receiver() -> Result<(u16, std::sync::mpsc::Receiver<Vec<u8>>)> {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().expect("a socket"));
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok() {
                let _ = tx.send(body);
            }
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    Ok((port, rx))
}

#[test]
fn a_trapping_writer_plugin_is_an_event_at_the_configuration_server() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, 4 << 20, 3)?;
    // The master target writes replicas with a plugin that never returns from `create`: each
    // attempt is cut at its 200 ms deadline, a trap.
    let spin = haven_e2e::default_bin_dir().join("../wasm32-wasip2/release/test_spin.wasm");
    let c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            config_server: true,
            mt_config: format!(
                "writer = \"spin\"\n\n[[plugin]]\nkind = \"target-writer\"\nname = \"spin\"\n\
                 path = {spin:?}\ngrants = {{ storage_root = {:?}, call_timeout_ms = 200 }}\n",
                tmp.path().join("mt")
            ),
            ..ClusterOptions::default()
        },
    )?;
    let cs = c.cs.as_ref().context("cs")?;
    let event = poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let events: Vec<serde_json::Value> = serde_json::from_str(&http_get(
            &format!("{}/v1/events?limit=1000", cs.api),
            &cs.admin_token,
        )?)?;
        Ok(events
            .into_iter()
            .find(|e| e["kind"] == "plugin.trapped")
            .ok_or_else(|| "no plugin.trapped event yet".to_string()))
    })?;
    assert_eq!(event["severity"], "error", "{event}");
    assert_eq!(event["gateway"], "mt1", "{event}");
    let text = event["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("writer plugin `spin` trapped") && text.contains("call_timeout_ms"),
        "{text}"
    );
    Ok(())
}
