//! Recovery plans run by the configuration server: steps in order, scripts with the plan's
//! environment, a manual step that waits for `haven plan resume`, machines failed over (or
//! test-failed-over, cleaned up) through their master target, a failing step that stops the
//! plan, and `continue_on_error`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use haven_e2e::{Cluster, ClusterOptions, http_get, mixed_disk, step_names};

fn pipeline(c: &Cluster, marks: &Path) -> Result<String> {
    let m = marks.display();
    Ok(format!(
        r#"{head}[[policy]]
name = "fast"
kind = "replication"
crash_consistent_interval = "1s"
app_consistent_interval = "off"

[[machine]]
name = "web01"
site = "primary"
policy = "fast"
process_server = "ps1"
master_target = "mt1"
writer = "raw"

[[plan]]
name = "dr"

[[plan.step]]
kind = "script"
run = "echo \"$HAVEN_PLAN $HAVEN_ACTION\" > {m}/first; echo checked"

[[plan.step]]
kind = "manual"
message = "Check the load balancer"

[[plan.step]]
kind = "failover"
machines = ["web01"]

[[plan.step]]
kind = "script"
run = "test -e {m}/first && touch {m}/second"

[[plan]]
name = "broken"

[[plan.step]]
kind = "script"
run = "echo oops; exit 3"

[[plan.step]]
kind = "script"
run = "touch {m}/never"

[[plan]]
name = "again"

[[plan.step]]
kind = "failover"
machines = ["web01"]
continue_on_error = true

[[plan]]
name = "resumable"

[[plan.step]]
kind = "script"
run = "echo run >> {m}/runs"

[[plan.step]]
kind = "manual"
message = "Restart the configuration server"

[[plan.step]]
kind = "failover"
machines = ["web01"]

[[plan.step]]
kind = "script"
run = "touch {m}/resumed"

[[plan]]
name = "lenient"

[[plan.step]]
kind = "script"
run = "exit 4"
continue_on_error = true

[[plan.step]]
kind = "script"
run = "touch {m}/lenient"
"#,
        head = c.pipeline_head("plans")?,
    ))
}

fn item(c: &Cluster) -> Result<serde_json::Value> {
    let cs = c.cs.as_ref().context("cs")?;
    Ok(serde_json::from_str(&http_get(
        &format!("{}/v1/items/web01", cs.api),
        &cs.admin_token,
    )?)?)
}

fn newest_job(c: &Cluster) -> Result<serde_json::Value> {
    let cs = c.cs.as_ref().context("cs")?;
    let jobs = cs.jobs()?;
    jobs.into_iter().next().context("no job")
}

#[test]
fn a_plan_runs_its_steps_in_order_and_waits_for_its_operator() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, 4 << 20, 9)?;
    let c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            config_server: true,
            retention: Some("window = \"1h\"".into()),
            ..ClusterOptions::default()
        },
    )?;
    let cs = c.cs.as_ref().context("cs")?;
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks)?;
    let file = tmp.path().join("plans.toml");
    std::fs::write(&file, pipeline(&c, &marks)?)?;
    cs.haven(&["apply", file.to_str().context("path")?])?;
    haven_e2e::wait_for_point(cs, "web01")?;

    let listed = cs.haven(&["plan", "list"])?;
    assert!(
        listed.contains("dr\n  1. script: echo")
            && listed.contains("  2. manual: Check the load balancer\n  3. failover: web01\n"),
        "{listed}"
    );

    // The test failover runs the first script and stops at the manual step.
    let out = cs.haven(&["plan", "test-failover", "dr"])?;
    assert!(
        out.contains(
            "plan dr waits for an operator: Check the load balancer\nThen: haven plan resume dr"
        ),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(marks.join("first"))?,
        "dr test-failover\n"
    );
    assert!(!marks.join("second").exists());
    assert!(
        item(&c)?["test_failover"].is_null(),
        "the machine went before its step"
    );
    // One run at a time.
    let err = cs
        .haven(&["plan", "test-failover", "dr"])
        .expect_err("a second run of a running plan started");
    assert!(
        format!("{err:#}").contains("plan `dr` is running"),
        "{err:#}"
    );

    // Resumed: the machine's test failover, then the last script.
    let out = cs.haven(&["plan", "resume", "dr"])?;
    assert!(out.contains("plan dr: done"), "{out}");
    assert!(
        marks.join("second").exists(),
        "the last script did not run: {out}"
    );
    assert!(item(&c)?["test_failover"].is_object(), "{}", item(&c)?);
    let job = newest_job(&c)?;
    assert_eq!(job["kind"], "plan-test-failover");
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let names = step_names(&job);
    assert_eq!(names[0], "start plan dr (test-failover)");
    assert!(names[1].starts_with("script: echo"), "{names:?}");
    assert_eq!(names[2], "wait for an operator: Check the load balancer");
    assert_eq!(names[3], "test-failover web01 at mt1");
    assert!(names[4].starts_with("script: test -e"), "{names:?}");
    assert_eq!(job["steps"][1]["output"], "checked");
    // Nothing waits any more.
    let err = cs
        .haven(&["plan", "resume", "dr"])
        .expect_err("resumed twice");
    assert!(
        format!("{err:#}").contains("plan `dr` does not wait at a manual step"),
        "{err:#}"
    );

    // A machine that fails (its test failover runs already) does not stop a plan that says
    // continue_on_error, and the job ends even when that machine was its last step.
    let out = cs.haven(&["plan", "test-failover", "again"])?;
    assert!(
        out.contains("FAILED test-failover web01 at mt1 — HTTP 409"),
        "{out}"
    );
    assert!(out.contains("plan again: done"), "{out}");
    let job = newest_job(&c)?;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["steps"][1]["state"], "failed", "{job:#}");

    // Cleanup ends the test failover, without the scripts or the manual step.
    let out = cs.haven(&["plan", "cleanup", "dr"])?;
    assert!(out.contains("plan dr: done"), "{out}");
    assert!(item(&c)?["test_failover"].is_null(), "{}", item(&c)?);
    assert_eq!(step_names(&newest_job(&c)?).len(), 2);

    // A failing script stops its plan, with its output.
    let err = cs
        .haven(&["plan", "test-failover", "broken"])
        .expect_err("a failing plan succeeded");
    assert!(
        format!("{err:#}").contains("plan broken stopped: exited with status 3: oops"),
        "{err:#}"
    );
    assert!(!marks.join("never").exists());
    assert_eq!(newest_job(&c)?["state"], "failed");

    // With continue_on_error the plan goes on.
    let out = cs.haven(&["plan", "test-failover", "lenient"])?;
    assert!(out.contains("FAILED script: exit 4"), "{out}");
    assert!(marks.join("lenient").exists(), "{out}");
    assert_eq!(newest_job(&c)?["state"], "succeeded");

    // A run a restart of the configuration server interrupts goes on at its step: the script
    // before it is not run again, the manual step waits again.
    let out = cs.haven(&["plan", "test-failover", "resumable"])?;
    assert!(out.contains("waits for an operator"), "{out}");
    let id = newest_job(&c)?["id"].clone();
    let mut c = c;
    c.cs.as_mut().context("cs")?.restart()?;
    let cs = c.cs.as_ref().context("cs")?;
    let job = haven_e2e::poll(Duration::from_secs(60), Duration::from_millis(200), || {
        let jobs = cs.jobs()?;
        let job = jobs
            .into_iter()
            .find(|j| j["id"] == id)
            .context("the plan's job is gone")?;
        let waiting = step_names(&job)
            .iter()
            .filter(|n| n.starts_with("wait for an operator"))
            .count();
        Ok(if waiting == 2 && job["state"] == "running" {
            Ok(job)
        } else {
            Err(format!("not waiting again yet: {job}"))
        })
    })?;
    assert_eq!(job["steps"][2]["state"], "failed", "{job:#}");
    assert!(
        job["steps"][2]["output"]
            .as_str()
            .unwrap_or_default()
            .starts_with("interrupted: the configuration server stopped during this step; the plan goes on from here"),
        "{job:#}"
    );
    // The master target is reached again before the plan goes on.
    haven_e2e::poll(Duration::from_secs(60), Duration::from_millis(200), || {
        Ok(cs
            .haven(&["failover", "show", "web01", "--json"])
            .map(|_| ())
            .map_err(|e| format!("{e:#}")))
    })?;
    let out = cs.haven(&["plan", "resume", "resumable"])?;
    assert!(out.contains("plan resumable: done"), "{out}");
    let job = newest_job(&c)?;
    assert_eq!(job["id"], id, "{job:#}");
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(std::fs::read_to_string(marks.join("runs"))?, "run\n");
    assert!(marks.join("resumed").exists());
    assert!(cs.haven(&["events"])?.contains("plan.resumed"));
    cs.haven(&["plan", "cleanup", "resumable"])?;

    // The real thing: a planned failover through the plan.
    cs.haven(&["plan", "failover", "dr", "--planned"])?;
    let out = cs.haven(&["plan", "resume", "dr"])?;
    assert!(out.contains("plan dr: done"), "{out}");
    let i = item(&c)?;
    assert_eq!(i["item"]["state"], "failed-over", "{i}");
    assert!(i["item"]["planned"].as_bool().unwrap_or(false), "{i}");
    let names = step_names(&newest_job(&c)?);
    assert_eq!(names[3], "failover web01 at mt1", "{names:?}");
    assert_eq!(names[4], "wait for the image at mt1", "{names:?}");

    // Each run is an event.
    let events = cs.haven(&["events"])?;
    for kind in [
        "plan.started",
        "plan.waiting",
        "plan.completed",
        "plan.failed",
    ] {
        assert!(events.contains(kind), "no {kind} in {events}");
    }
    Ok(())
}
