//! `to_toml` writes a file `parse` reads back to an equal pipeline, over pipelines built in
//! code: every combination of the optional parts, with strings that need escaping.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use haven_engine::retention::{RetentionPolicy, Tier};
use haven_pipeline::*;

fn s(v: &str) -> String {
    v.to_string()
}

/// A valid pipeline; each bit of `mask` turns one optional part on.
fn build(mask: u32) -> Pipeline {
    let on = |bit: u32| mask & (1 << bit) != 0;
    let mut p = Pipeline::new("round-trip");
    if on(0) {
        p.deployment.description =
            Some(s("Quotes \" and \\ backslashes,\na new line, tabs\t, é ☃"));
    }
    for (name, description) in [("a", None), ("b", Some(s("# not a comment")))] {
        p.sites.push(Site {
            name: s(name),
            description: if on(1) { description } else { None },
        });
    }
    p.gateways.push(Gateway {
        name: s("ps1"),
        site: s("a"),
        roles: BTreeSet::from([Role::ProcessServer]),
        address: Some(s("[2001:db8::1]:9443")),
        api: on(2).then(|| s("https://ps1.example.net:9480/")),
    });
    p.gateways.push(Gateway {
        name: s("mt1"),
        site: s("b"),
        roles: BTreeSet::from([Role::MasterTarget, Role::ConfigServer]),
        address: Some(s("mt1.example.net:9444")),
        api: None,
    });
    p.plugins.push(Plugin {
        name: s("writer.v2"),
        kind: PluginKind::TargetWriter,
        path: PathBuf::from("/opt/haven/plugins/my writer.wasm"),
        gateways: if on(3) { vec![s("mt1")] } else { Vec::new() },
        grants: Grants {
            storage_root: on(4).then(|| PathBuf::from("/srv/replicas")),
            storage_read_only: on(4) && on(5),
            http_hosts: if on(5) {
                vec![s("blob.example.net"), s("api.example.net:8443")]
            } else {
                Vec::new()
            },
            memory_mib: 4096,
            call_timeout_ms: 1,
        },
        settings: if on(6) {
            BTreeMap::from([
                (s("account.name"), s("value with \"quotes\"")),
                (s("account_key"), s("secret:blob-key")),
                (s("empty"), s("")),
            ])
        } else {
            BTreeMap::new()
        },
    });
    p.plugins.push(Plugin {
        name: s("platform"),
        kind: PluginKind::Adapter,
        path: PathBuf::from("/opt/haven/plugins/platform.wasm"),
        gateways: Vec::new(),
        grants: Grants::default(),
        settings: BTreeMap::new(),
    });
    let retention = if on(7) {
        RetentionPolicy {
            window: Duration::ZERO,
            tiers: Vec::new(),
            prefer_app_consistent: false,
        }
    } else {
        RetentionPolicy {
            window: Duration::from_secs(90 * 60),
            tiers: vec![
                Tier {
                    for_last: Duration::from_millis(1500),
                    every: Duration::ZERO,
                },
                Tier {
                    for_last: Duration::from_secs(90 * 60),
                    every: Duration::from_secs(30 * 60),
                },
            ],
            prefer_app_consistent: true,
        }
    };
    p.policies.push(Policy::Replication(ReplicationPolicy {
        name: s("gold"),
        rpo_threshold: Duration::from_millis(250),
        crash_consistent_interval: Duration::from_millis(250),
        app_consistent_interval: (!on(7)).then(|| Duration::from_secs(60)),
        retention,
        process_server_grace: Duration::from_secs(30),
    }));
    p.policies.push(Policy::Failback(FailbackPolicy {
        name: s("home"),
        shutdown_replica: on(8),
        reprotect_after_failback: !on(8),
    }));
    p.network_mappings.push(NetworkMapping {
        name: s("lan"),
        source_site: s("a"),
        target_site: s("b"),
        source_network: s("VM Network"),
        target_network: s("DR \"Production\""),
        test_network: s("DR Test"),
    });
    if on(13) {
        p.cache_accounts.push(CacheAccount {
            name: s("a-cache"),
            site: s("a"),
            container_url: s("https://havencache.blob.core.windows.net/haven-cache"),
            drained_by: vec![s("ps1")],
        });
    }
    for name in ["web01", "db01"] {
        p.machines.push(Machine {
            name: s(name),
            site: s("a"),
            platform: on(9).then(|| s("platform")),
            target_platform: on(10).then(|| s("platform")),
            policy: s("gold"),
            failback_policy: on(11).then(|| s("home")),
            process_server: on(12).then(|| s("ps1")),
            cache_account: None,
            master_target: s("mt1"),
            writer: s("writer.v2"),
            disks: if on(13) {
                vec![s("/dev/disk/by-id/scsi-0:0"), s("C:\\disk 1")]
            } else {
                Vec::new()
            },
            target: if on(10) {
                BTreeMap::from([
                    (s("subnet"), s("10.0.0.0/24")),
                    (s("admin_password"), s("secret:admin")),
                ])
            } else {
                BTreeMap::new()
            },
        });
    }
    p.groups.push(Group {
        name: s("app"),
        machines: vec![s("db01"), s("web01")],
        policy: on(14).then(|| s("gold")),
    });
    let mut steps = vec![Step::Failover(FailoverStep {
        machines: Vec::new(),
        groups: vec![s("app")],
        continue_on_error: on(16),
    })];
    if on(15) {
        steps.push(Step::Script(ScriptStep {
            run: s("echo 'done' \"now\" \\ ok"),
            timeout: Duration::from_secs(86_400),
            continue_on_error: on(17),
        }));
        steps.push(Step::Manual(ManualStep {
            message: s("Line one\nline two"),
        }));
    }
    p.plans.push(RecoveryPlan {
        name: s("all"),
        steps,
    });
    p.webhooks.push(Webhook {
        name: s("ops"),
        url: s("http://hooks.example.net/haven?x=1&y=2"),
        events: if on(16) {
            vec![s("*")]
        } else {
            vec![s("rpo.exceeded"), s("plan.*")]
        },
        min_severity: if on(16) {
            Severity::Critical
        } else {
            Severity::Info
        },
    });
    p
}

#[test]
fn built_pipelines_round_trip() {
    for mask in 0u32..(1 << 18) {
        // Every bit alone, every pair, and a spread of the rest.
        if mask.count_ones() > 2 && mask % 97 != 0 {
            continue;
        }
        let p = build(mask);
        let file = to_toml(&p);
        let back =
            parse(&file, "built.toml").unwrap_or_else(|d| panic!("mask {mask:#x}:\n{d}\n{file}"));
        assert_eq!(back, p, "mask {mask:#x}:\n{file}");
        assert_eq!(to_toml(&back), file, "mask {mask:#x}");
        let json: Pipeline = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(json, p, "mask {mask:#x}");
    }
}

#[test]
fn the_canonical_file_of_a_small_pipeline() {
    let mut p = Pipeline::new("small");
    p.sites.push(Site {
        name: s("a"),
        description: None,
    });
    p.policies.push(Policy::Replication(ReplicationPolicy {
        name: s("gold"),
        rpo_threshold: Duration::from_secs(900),
        crash_consistent_interval: Duration::from_secs(5),
        app_consistent_interval: None,
        retention: RetentionPolicy::default(),
        process_server_grace: Duration::from_secs(300),
    }));
    assert_eq!(
        to_toml(&p),
        r#"version = 1

[deployment]
name = "small"

[[site]]
name = "a"

[[policy]]
name = "gold"
kind = "replication"
rpo_threshold = "15m"
crash_consistent_interval = "5s"
app_consistent_interval = "off"
process_server_grace = "5m"

[policy.retention]
window = "72h"
tiers = [
    { for_last = "2h", every = "0s" },
    { for_last = "24h", every = "1h" },
    { for_last = "72h", every = "4h" },
]
prefer_app_consistent = true
"#
    );
    assert_eq!(parse(&to_toml(&p), "small.toml").unwrap(), p);
}

#[test]
fn an_invalid_pipeline_from_json_is_refused() {
    let mut p = build(0);
    p.machines[0].policy = s("platinum");
    let d = p.validate().unwrap_err();
    assert_eq!(d.len(), 1);
    assert_eq!(d.as_slice()[0].path, "machine[0].policy");
    assert_eq!(d.as_slice()[0].message, "unknown policy `platinum`");
}
