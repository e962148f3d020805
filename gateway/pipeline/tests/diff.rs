//! `diff`: what changes, in a stable order, and what is destroyed.

use haven_pipeline::{Action, FieldChange, Pipeline, ResourceKind, diff, parse};

const CURRENT: &str = r#"version = 1

[deployment]
name = "prod"

[[site]]
name = "a"

[[site]]
name = "b"

[[gateway]]
name = "ps1"
site = "a"
roles = ["process-server"]
address = "ps1.example.net:9443"

[[gateway]]
name = "mt1"
site = "b"
roles = ["config-server", "master-target"]
address = "mt1.example.net:9444"

[[gateway]]
name = "mt2"
site = "b"
roles = ["master-target"]
address = "mt2.example.net:9444"

[[plugin]]
name = "raw"
kind = "target-writer"
path = "/opt/haven/plugins/haven_raw.wasm"

[[policy]]
name = "gold"
kind = "replication"
crash_consistent_interval = "5s"

[[policy]]
name = "short"
kind = "replication"

[policy.retention]
window = "24h"
tiers = [{ for_last = "2h", every = "0s" }, { for_last = "24h", every = "1h" }]

[[machine]]
name = "web01"
site = "a"
policy = "gold"
master_target = "mt1"
writer = "raw"

[[machine]]
name = "db01"
site = "a"
policy = "short"
master_target = "mt1"
writer = "raw"
disks = ["/dev/sda", "/dev/sdb"]

[[machine]]
name = "old01"
site = "a"
policy = "gold"
master_target = "mt1"
writer = "raw"

[[group]]
name = "app"
machines = ["web01", "old01"]

[[group]]
name = "legacy"
machines = ["db01"]

[[webhook]]
name = "ops"
url = "https://hooks.example.net/haven"
events = ["rpo.exceeded"]
"#;

fn pipeline(source: &str) -> Pipeline {
    parse(source, "p.toml").unwrap_or_else(|d| panic!("{d}"))
}

/// The current file with each `(from, to)` replaced.
fn edited(edits: &[(&str, &str)]) -> Pipeline {
    let mut source = CURRENT.to_string();
    for (from, to) in edits {
        assert!(source.contains(from), "{from}");
        source = source.replacen(from, to, 1);
    }
    pipeline(&source)
}

#[test]
fn nothing_changes() {
    let p = pipeline(CURRENT);
    let plan = diff(&p, &p);
    assert!(plan.is_empty());
    assert!(plan.destructive().is_empty());
    assert_eq!(plan.to_string(), "No changes.\n");
}

#[test]
fn adds_changes_and_removals_in_a_stable_order() {
    let current = pipeline(CURRENT);
    let desired = edited(&[
        (
            "[[site]]\nname = \"b\"\n",
            "[[site]]\nname = \"b\"\n\n[[site]]\nname = \"c\"\n",
        ),
        (
            "[[gateway]]\nname = \"mt2\"\nsite = \"b\"\nroles = [\"master-target\"]\n\
             address = \"mt2.example.net:9444\"\n",
            "",
        ),
        (
            "crash_consistent_interval = \"5s\"",
            "crash_consistent_interval = \"10s\"",
        ),
        ("window = \"24h\"", "window = \"12h\""),
        (
            "{ for_last = \"24h\", every = \"1h\" }",
            "{ for_last = \"12h\", every = \"1h\" }",
        ),
        (
            "disks = [\"/dev/sda\", \"/dev/sdb\"]",
            "disks = [\"/dev/sda\"]",
        ),
        (
            "[[machine]]\nname = \"old01\"",
            "[[machine]]\nname = \"web02\"",
        ),
        (
            "machines = [\"web01\", \"old01\"]",
            "machines = [\"web01\", \"web02\"]",
        ),
        ("[[group]]\nname = \"legacy\"\nmachines = [\"db01\"]\n", ""),
        (
            "events = [\"rpo.exceeded\"]",
            "events = [\"rpo.exceeded\", \"failover.*\"]\nmin_severity = \"error\"",
        ),
    ]);
    let plan = diff(&current, &desired);
    assert_eq!(
        plan.to_string(),
        "+ site c\n\
         - gateway mt2  (destroys: the journals and replicas kept at master target `mt2`)\n\
         ~ policy gold: crash_consistent_interval 5s → 10s\n\
         ~ policy short: retention.tiers[1].for_last 24h → 12h, retention.window 24h → 12h  \
         (destroys: recovery points older than 12h (the retention window shrinks from 24h))\n\
         ~ machine db01: disks [/dev/sda, /dev/sdb] → [/dev/sda]  (destroys: the journals of \
         disks `/dev/sdb`)\n\
         - machine old01  (destroys: the journal and replica of `old01` at `mt1`)\n\
         + machine web02\n\
         ~ group app: machines [web01, old01] → [web01, web02]\n\
         - group legacy\n\
         ~ webhook ops: events [rpo.exceeded] → [rpo.exceeded, failover.*], min_severity \
         warning → error\n\
         Plan: 2 to add, 5 to change, 3 to remove; 4 destructive.\n"
    );
    let destructive: Vec<(ResourceKind, &str)> = plan
        .destructive()
        .iter()
        .map(|c| (c.kind, c.name.as_str()))
        .collect();
    assert_eq!(
        destructive,
        [
            (ResourceKind::Gateway, "mt2"),
            (ResourceKind::Policy, "short"),
            (ResourceKind::Machine, "db01"),
            (ResourceKind::Machine, "old01"),
        ]
    );
    assert_eq!(plan.counts(), (2, 5, 3));

    // The reverse: what was added is removed, and only removals and moves destroy.
    let back = diff(&desired, &current);
    assert_eq!(
        back.changes
            .iter()
            .map(|c| format!("{} {} {}", symbol(&c.action), c.kind, c.name))
            .collect::<Vec<_>>(),
        [
            "- site c",
            "+ gateway mt2",
            "~ policy gold",
            "~ policy short",
            "~ machine db01",
            "+ machine old01",
            "- machine web02",
            "~ group app",
            "+ group legacy",
            "~ webhook ops",
        ]
    );
    assert_eq!(
        back.destructive()
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["web02"]
    );
}

fn symbol(a: &Action) -> &'static str {
    match a {
        Action::Add => "+",
        Action::Change(_) => "~",
        Action::Remove => "-",
    }
}

#[test]
fn moving_a_replica_destroys_the_old_one() {
    let current = pipeline(CURRENT);
    let desired = edited(&[(
        "name = \"db01\"\nsite = \"a\"\npolicy = \"short\"\nmaster_target = \"mt1\"",
        "name = \"db01\"\nsite = \"a\"\npolicy = \"short\"\nmaster_target = \"mt2\"",
    )]);
    let plan = diff(&current, &desired);
    assert_eq!(plan.changes.len(), 1);
    let change = &plan.changes[0];
    assert_eq!(
        change.action,
        Action::Change(vec![FieldChange {
            path: "master_target".into(),
            old: Some("mt1".into()),
            new: Some("mt2".into()),
        }])
    );
    assert_eq!(
        change.destroys.as_deref(),
        Some("the journal and replica at `mt1` (the machine replicates anew to `mt2`)")
    );

    // Optional fields appear and disappear as `(none)`; a new process server destroys nothing.
    let desired = edited(&[(
        "name = \"web01\"\nsite = \"a\"\n",
        "name = \"web01\"\nsite = \"a\"\nprocess_server = \"ps1\"\n",
    )]);
    assert_eq!(
        diff(&current, &desired).to_string(),
        "~ machine web01: process_server (none) → ps1\n\
         Plan: 0 to add, 1 to change, 0 to remove.\n"
    );
}

#[test]
fn long_values_are_cut_and_the_deployment_is_compared() {
    let current = pipeline(CURRENT);
    let desired = edited(&[
        (
            "name = \"prod\"",
            "name = \"prod\"\ndescription = \"Production\"",
        ),
        (
            "events = [\"rpo.exceeded\"]",
            "events = [\"rpo.exceeded\", \"rpo.recovered\", \"failover.started\", \
             \"failover.completed\"]",
        ),
    ]);
    assert_eq!(
        diff(&current, &desired).to_string(),
        "~ deployment prod: description (none) → Production\n\
         ~ webhook ops: events [rpo.exceeded] → [rpo.exceeded, rpo.recovered, failover.started,…\n\
         Plan: 0 to add, 2 to change, 0 to remove.\n"
    );
}

#[test]
fn moving_to_a_policy_with_a_shorter_window_destroys_older_points() {
    let current = pipeline(CURRENT);
    // web01 itself moves from `gold` (the default 72 h) to `short` (24 h).
    let plan = diff(
        &current,
        &edited(&[(
            "name = \"web01\"\nsite = \"a\"\npolicy = \"gold\"",
            "name = \"web01\"\nsite = \"a\"\npolicy = \"short\"",
        )]),
    );
    let destroys: Vec<String> = plan.destructive().iter().map(|c| c.to_string()).collect();
    assert_eq!(
        destroys,
        [
            "~ machine web01: policy gold → short  (destroys: recovery points of `web01` older \
          than 24h (it moves from policy `gold`, 72h of points, to `short`))"
        ]
    );
    // Through its group: only the group changes in the file, the machines are named.
    let plan = diff(
        &current,
        &edited(&[(
            "name = \"app\"\nmachines = [\"web01\", \"old01\"]\n",
            "name = \"app\"\nmachines = [\"web01\", \"old01\"]\npolicy = \"short\"\n",
        )]),
    );
    let names: Vec<String> = plan
        .destructive()
        .iter()
        .map(|c| format!("{:?} {}", c.kind, c.name))
        .collect();
    assert_eq!(names, ["Machine old01", "Machine web01"]);
    // A longer window destroys nothing.
    let plan = diff(
        &edited(&[(
            "name = \"web01\"\nsite = \"a\"\npolicy = \"gold\"",
            "name = \"web01\"\nsite = \"a\"\npolicy = \"short\"",
        )]),
        &current,
    );
    assert!(plan.destructive().is_empty(), "{plan}");
}
