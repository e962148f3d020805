//! Adapters run by the configuration server: loaded from the applied pipeline with their
//! settings (secrets resolved from the configuration server's sealed store), their inventory
//! taken and shown by `haven platform`, and badly behaved adapters (trapping, answering
//! garbage) reported clearly while the gateway lives on. An application-consistent point of a
//! machine on a platform is taken with the platform quiescing the machine around it.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use haven_e2e::{Cluster, ClusterOptions, http_get, mixed_disk, poll};

fn unruly_wasm() -> Result<std::path::PathBuf> {
    let wasm =
        haven_e2e::default_bin_dir().join("../wasm32-wasip2/release/test_unruly_adapter.wasm");
    anyhow::ensure!(
        wasm.exists(),
        "{} is missing: run `cargo xtask build` first",
        wasm.display()
    );
    Ok(wasm)
}

/// An instance `name` of the unruly test adapter in `mode`.
fn adapter(wasm: &Path, name: &str, mode: &str) -> String {
    format!(
        "[[plugin]]\nname = \"{name}\"\nkind = \"adapter\"\npath = {wasm:?}\n\n\
         [plugin.grants]\ncall_timeout_ms = 2000\n\n\
         [plugin.settings]\nmode = \"{mode}\"\nregion = \"west\"\n\
         password = \"secret:unruly-pw\"\n\n"
    )
}

/// The pipeline: the cluster's gateways and three instances of the unruly test adapter.
fn pipeline(c: &Cluster) -> Result<String> {
    let wasm = unruly_wasm()?;
    Ok(format!(
        "{}{}{}{}",
        c.pipeline_head("platforms")?,
        adapter(&wasm, "good", "ok"),
        adapter(&wasm, "trapping", "trap"),
        adapter(&wasm, "garbage", "garbage"),
    ))
}

fn platforms(c: &Cluster) -> Result<Vec<serde_json::Value>> {
    let cs = c.cs.as_ref().context("cs")?;
    Ok(serde_json::from_str(
        &cs.haven(&["platform", "list", "--json"])?,
    )?)
}

fn platform(c: &Cluster, name: &str) -> Result<serde_json::Value> {
    platforms(c)?
        .into_iter()
        .find(|p| p["name"] == name)
        .with_context(|| format!("no platform {name}"))
}

#[test]
fn adapters_are_loaded_from_the_pipeline_with_their_secrets_and_faults_are_contained() -> Result<()>
{
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, 1 << 20, 5)?;
    let c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            config_server: true,
            ..ClusterOptions::default()
        },
    )?;
    let cs = c.cs.as_ref().context("cs")?;
    let file = tmp.path().join("platforms.toml");
    std::fs::write(&file, pipeline(&c)?)?;
    cs.haven(&["apply", file.to_str().context("path")?])?;

    // The secret is not held yet: the adapters do not load, and say why.
    let good = poll(Duration::from_secs(30), Duration::from_millis(200), || {
        let p = platform(&c, "good")?;
        Ok(match p["error"].is_string() {
            true => Ok(p),
            false => Err(format!("no error yet: {p}")),
        })
    })?;
    assert_eq!(
        good["error"],
        "setting `password` refers to secret `unruly-pw`, which this configuration server does \
         not hold; store it with `haven secret set unruly-pw`"
    );

    // Stored: every adapter loads and its inventory is taken.
    let secret_file = tmp.path().join("pw");
    std::fs::write(&secret_file, "s3cret-value\n")?;
    let out = cs.haven(&[
        "secret",
        "set",
        "unruly-pw",
        "--from-file",
        secret_file.to_str().context("path")?,
    ])?;
    assert_eq!(out.trim(), "Secret `unruly-pw` stored.");
    let listed = cs.haven(&["secret", "list"])?;
    assert!(listed.contains("unruly-pw"), "{listed}");
    assert!(
        !listed.contains("s3cret"),
        "a secret's value was listed: {listed}"
    );

    let good = poll(Duration::from_secs(30), Duration::from_millis(200), || {
        let p = platform(&c, "good")?;
        Ok(match p["machines"] == 1 {
            true => Ok(p),
            false => Err(format!("no inventory yet: {p}")),
        })
    })?;
    assert_eq!(good["contract"], "0.2.0");
    assert!(good["error"].is_null(), "{good}");
    // The adapter saw its settings, the secret's value resolved (the test adapter echoes them).
    assert_eq!(
        good["about"],
        "unruly adapter; settings: mode=ok password=s3cret-value region=west"
    );
    let machines = cs.haven(&["platform", "machines", "good"])?;
    let line = machines
        .lines()
        .find(|l| l.starts_with("vm-1"))
        .with_context(|| format!("no vm-1 in {machines}"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        fields,
        [
            "vm-1", "unruly-1", "running", "2", "2048Mi", "1", "VM", "Network"
        ],
        "{machines}"
    );
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&cs.haven(&["platform", "machines", "good", "--json"])?)?;
    assert_eq!(
        json[0]["disks"][0]["location"],
        "[ds1] unruly-1/disk-0.vmdk"
    );
    assert_eq!(json[0]["uuid"], "4210aaaa-bbbb-cccc-dddd-eeeeffff0001");

    // A trapping adapter: retried, then reported with the trap; the gateway lives on.
    let trapping = poll(Duration::from_secs(30), Duration::from_millis(200), || {
        let p = platform(&c, "trapping")?;
        Ok(
            match p["error"].as_str().is_some_and(|e| e.contains("trapped")) {
                true => Ok(p),
                false => Err(format!("no trap yet: {p}")),
            },
        )
    })?;
    let text = trapping["error"].as_str().unwrap_or_default();
    assert!(
        text.starts_with(
            "plugin `trapping` call `platform.check` trapped: wasm trap: wasm `unreachable` \
             instruction executed (in test_unruly_adapter::misbehave): panicked at "
        ) && text.contains("unruly adapter: told to trap"),
        "{trapping}"
    );
    assert!(
        trapping["error"]
            .as_str()
            .unwrap_or_default()
            .ends_with("; the instance was restarted (after 3 attempts)"),
        "{trapping}"
    );
    let garbage = platform(&c, "garbage")?;
    assert_eq!(
        garbage["error"],
        "adapter `garbage` answered an inventory that cannot be used: machine #1 (`unruly-1`) \
         has an id of 0 bytes; the adapter is faulty or speaks to a platform it does not \
         understand"
    );
    assert_eq!(garbage["machines"], 0);

    // `refresh` answers at once, with the adapter's failure as a 502.
    let out = cs.haven(&["platform", "refresh", "good"])?;
    assert_eq!(
        out.trim(),
        "good: 1 machine(s); unruly adapter; settings: mode=ok password=s3cret-value region=west"
    );
    let err = cs
        .haven(&["platform", "refresh", "garbage"])
        .expect_err("a refresh of a faulty adapter succeeded");
    assert!(
        format!("{err:#}").contains("answered an inventory that cannot be used"),
        "{err:#}"
    );

    // The faults are events, once per adapter.
    let events: Vec<serde_json::Value> = serde_json::from_str(&http_get(
        &format!("{}/v1/events?limit=1000", cs.api),
        &cs.admin_token,
    )?)?;
    let unreachable: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "platform.unreachable")
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(unreachable.len(), 3, "{unreachable:?}");
    assert!(
        unreachable
            .iter()
            .any(|t| t.starts_with("adapter garbage: ")),
        "{unreachable:?}"
    );

    // Removing the secret unloads the adapters that need it; the API still answers.
    cs.haven(&["secret", "delete", "unruly-pw"])?;
    let good = platform(&c, "good")?;
    assert!(
        good["error"]
            .as_str()
            .is_some_and(|e| e.contains("secret `unruly-pw`")),
        "{good}"
    );
    // The machine list of the last inventory is kept.
    assert_eq!(good["machines"], 1, "{good}");
    Ok(())
}

#[test]
fn an_app_point_of_a_machine_on_a_platform_is_quiesced_there() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, 1 << 20, 6)?;
    // The agent protects the machine the adapter's inventory has, and has no hooks of its own.
    let c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            config_server: true,
            machine: Some("unruly-1".into()),
            retention: Some("window = \"1h\"".into()),
            ..ClusterOptions::default()
        },
    )?;
    let cs = c.cs.as_ref().context("cs")?;
    cs.set_secret("unruly-pw", "pw\n")?;
    let wasm = unruly_wasm()?;
    let apply = |adapter_name: &str, app_interval: &str| -> Result<()> {
        let machine = format!(
            "[[policy]]\nname = \"p\"\nkind = \"replication\"\n\
             crash_consistent_interval = \"1s\"\napp_consistent_interval = \"{app_interval}\"\n\n\
             [[machine]]\nname = \"unruly-1\"\nsite = \"primary\"\nplatform = \"{adapter_name}\"\n\
             policy = \"p\"\nprocess_server = \"ps1\"\nmaster_target = \"mt1\"\nwriter = \"raw\"\n"
        );
        let file = tmp.path().join("platforms.toml");
        let more = format!(
            "{}{}",
            adapter(&wasm, "plain", "no-quiesce"),
            adapter(&wasm, "failing", "quiesce-fails")
        );
        std::fs::write(&file, format!("{}{more}{machine}", pipeline(&c)?))?;
        cs.haven(&["apply", file.to_str().context("path")?])?;
        poll(Duration::from_secs(30), Duration::from_millis(200), || {
            let p = platform(&c, adapter_name)?;
            Ok(match p["machines"] == 1 {
                true => Ok(()),
                false => Err(format!("no inventory yet: {p}")),
            })
        })
    };
    apply("good", "1m")?;
    haven_e2e::wait_for_point(cs, "unruly-1")?;

    // On the policy's app interval the configuration server takes them itself, quiesced at
    // the platform (the machine has no app point yet: one is due at once).
    let job = poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let jobs = cs.jobs()?;
        Ok(jobs
            .into_iter()
            .find(|j| j["kind"] == "point" && j["caller"] == "policy" && j["state"] != "running")
            .ok_or_else(|| "no point job by the policy yet".to_string()))
    })?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(
        job["steps"][0]["output"],
        "unruly-1 (vm-1) quiesced by good"
    );
    let newest: Vec<serde_json::Value> =
        serde_json::from_str(&cs.haven(&["point", "list", "unruly-1", "--json"])?)?;
    let apps = newest.iter().filter(|p| p["kind"] == "app").count();
    assert_eq!(apps, 1, "the policy's: {newest:#?}");
    // Not again before the interval has passed (the server looks every 5 s).
    std::thread::sleep(Duration::from_secs(11));
    let later: Vec<serde_json::Value> =
        serde_json::from_str(&cs.haven(&["point", "list", "unruly-1", "--json"])?)?;
    assert_eq!(later.iter().filter(|p| p["kind"] == "app").count(), 1);
    apply("good", "off")?;

    // The platform quiesces the machine, the point is taken, the platform thaws it.
    let out = cs.haven(&["point", "create", "unruly-1", "--app"])?;
    let id = out
        .split_whitespace()
        .find_map(|w| w.parse::<u64>().ok())
        .with_context(|| format!("no point id in {out:?}"))?;
    let job = newest_job(cs, "point")?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["steps"][0]["name"], "quiesce unruly-1 at its platform");
    assert_eq!(
        job["steps"][0]["output"],
        "unruly-1 (vm-1) quiesced by good"
    );
    let taken = job["steps"][1]["output"].as_str().unwrap_or_default();
    assert!(taken.ends_with("; thawed by good"), "{job:#}");
    let points = cs.haven(&["point", "list", "unruly-1"])?;
    let line = points
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id.to_string().as_str()))
        .with_context(|| format!("point {id} is not listed: {points}"))?;
    assert!(line.contains("app"), "{line}");

    // A platform that fails to quiesce: no point, the reason in the answer and the job.
    apply("failing", "off")?;
    let err = cs
        .haven(&["point", "create", "unruly-1", "--app"])
        .expect_err("an app point was taken although the platform could not quiesce");
    assert!(
        format!("{err:#}").contains(
            "HTTP 502: no application-consistent point of unruly-1: plugin `failing` call \
             `platform.quiesce` failed: "
        ) && format!("{err:#}").contains("the guest did not answer the quiesce request"),
        "{err:#}"
    );
    let job = newest_job(cs, "point")?;
    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["steps"].as_array().map(Vec::len), Some(1), "{job:#}");
    let after = cs.haven(&["point", "list", "unruly-1"])?;
    assert!(
        !after
            .lines()
            .any(|l| l.contains(" app ") && !points.contains(l)),
        "a new app point: {after}"
    );

    // A platform that offers no quiesce leaves it to the agent's hooks, which this agent
    // does not have: its refusal is the answer.
    apply("plain", "off")?;
    let err = cs
        .haven(&["point", "create", "unruly-1", "--app"])
        .expect_err("an app point was taken with nothing quiescing the workload");
    assert!(
        format!("{err:#}").contains("no quiesce hooks are configured on this agent"),
        "{err:#}"
    );
    let job = newest_job(cs, "point")?;
    assert_eq!(
        job["steps"][0]["output"],
        "plain offers no quiesce of unruly-1 (vm-1); the agent's hooks alone quiesce the \
         workload"
    );

    Ok(())
}

/// The newest job of `kind`.
fn newest_job(cs: &haven_e2e::Gateway, kind: &str) -> Result<serde_json::Value> {
    let jobs = cs.jobs()?;
    jobs.into_iter()
        .find(|j| j["kind"] == kind)
        .with_context(|| format!("no {kind} job"))
}
