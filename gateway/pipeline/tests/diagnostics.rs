//! Diagnostics: every problem at once, at its exact position, with its path and what to do.

use haven_pipeline::parse;

/// The rendered diagnostics of `source`, which must fail to parse.
fn errors(source: &str) -> Vec<String> {
    match parse(source, "p.toml") {
        Ok(_) => panic!("parsed without a diagnostic"),
        Err(d) => {
            assert_eq!(d.len(), d.iter().count());
            d.iter().map(ToString::to_string).collect()
        }
    }
}

/// A valid file to build bad ones from: two sites, a process server, a master target, a
/// writer, a policy, a machine.
const BASE: &str = r#"version = 1

[deployment]
name = "test"

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

[[plugin]]
name = "raw"
kind = "target-writer"
path = "/opt/haven/plugins/haven_raw.wasm"
gateways = ["mt1"]

[[policy]]
name = "gold"
kind = "replication"

[[machine]]
name = "web01"
site = "a"
policy = "gold"
master_target = "mt1"
writer = "raw"
"#;

#[test]
fn the_base_is_valid() {
    let p = parse(BASE, "p.toml").unwrap();
    assert_eq!(p.machines[0].name, "web01");
}

#[test]
fn several_mistakes_are_reported_at_once() {
    let source = r#"version = 1

[deployment]
name = "test"

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
roles = ["master-target"]
address = "mt1.example.net:9444"
colour = "blue"

[[plugin]]
name = "raw"
kind = "target-writer"
path = "/opt/haven/plugins/haven_raw.wasm"

[[policy]]
name = "gold"
kind = "replication"
crash_consistent_interval = "100ms"

[[machine]]
name = "web01"
site = "a"
policy = "gold"
master_target = "ps1"
writer = "raw"

[[machine]]
name = "web01"
site = "a"
policy = "gold"
master_target = "mt1"
writer = "raw"

[[machine]]
name = "db01"
site = "a"
master_target = "mt1"
writer = "raw"

[[plan]]
name = "site-a-lost"

[[plan.step]]
kind = "failover"
machines = ["web01", "web03"]
"#;
    assert_eq!(
        errors(source),
        [
            "p.toml:23:1: gateway[1].colour: unknown field `colour` in [[gateway]], expected \
             one of `name`, `site`, `roles`, `address`, `api`; remove it, or use one of the \
             fields listed",
            "p.toml:33:29: policy[0].crash_consistent_interval: crash_consistent_interval \
             100ms is below the agent's minimum, 250ms; write at least \"250ms\"",
            "p.toml:39:17: machine[0].master_target: gateway `ps1` does not have the \
             master-target role (its roles: process-server); name a gateway with the \
             master-target role at another site",
            "p.toml:43:8: machine[1].name: duplicate machine name `web01`, also machine[0] at \
             line 35; names are unique among `[[machine]]` entries: rename one",
            "p.toml:49:1: machine[2].policy: missing required field `policy` in [[machine]]; \
             add `policy = \"gold\"` to it",
            "p.toml:60:22: plan[0].step[0].machines[1]: unknown machine `web03`; did you mean \
             `web01`?",
        ]
    );
}

#[test]
fn a_syntax_error_is_reported_alone() {
    let source = "version = 1\n\n[deployment]\nname = \"test\nsite = [1, 2\n";
    assert_eq!(
        errors(source),
        [
            "p.toml:4:13: invalid basic string, expected `\"`; fix the TOML syntax here: strings \
             in quotes, one `key = value` per line, tables as `[name]` or `[[name]]`"
        ]
    );
    let twice = BASE.replace("name = \"a\"\n", "name = \"a\"\nname = \"b\"\n");
    assert_eq!(
        errors(&twice),
        [
            "p.toml:8:1: duplicate key `name`; a key is set once per table; remove one of them, or \
             start a new `[[...]]` entry"
        ]
    );
}

#[test]
fn type_errors_and_unknown_fields_name_the_field() {
    let source = BASE
        .replace("roles = [\"process-server\"]", "roles = \"process-server\"")
        .replace(
            "writer = \"raw\"",
            "writer = \"raw\"\npolcy = 3\ndisks = []",
        )
        .replace("kind = \"replication\"", "kind = \"replicaton\"");
    assert_eq!(
        errors(&source),
        [
            "p.toml:15:9: gateway[0].roles: expected an array, found a string; write a list in \
             brackets, e.g. [\"a\", \"b\"]",
            "p.toml:32:8: policy[0].kind: unknown policy kind `replicaton`, expected one of \
             `replication`, `failback`; did you mean `replication`?",
            "p.toml:40:1: machine[0].polcy: unknown field `polcy` in [[machine]], expected one \
             of `name`, `site`, `platform`, `target_platform`, `policy`, `failback_policy`, \
             `process_server`, `cache_account`, `master_target`, `writer`, `disks`, `target`; \
             did you mean `policy`?",
            "p.toml:41:9: machine[0].disks: `disks` is empty; name at least one disk, or leave \
             `disks` out to protect every disk found",
        ]
    );
}

#[test]
fn version_and_deployment_are_required() {
    assert_eq!(
        errors("[[site]]\nname = \"a\"\n"),
        [
            "p.toml:1:1: deployment: missing required table `[deployment]`; add `[deployment]` \
             with `name = \"...\"`, the deployment this file describes",
            "p.toml:1:1: version: missing required field `version`; add `version = 1` at the \
             top of the file",
        ]
    );
    // A file in another format version: its other fields are not reported.
    let future = BASE.replace("version = 1", "version = 2\n[[sensor]]\nname = \"x\"");
    assert_eq!(
        errors(&future),
        [
            "p.toml:1:11: version: pipeline format version 2 is not supported (supported: 1); \
             write the file in format version 1, with `version = 1`"
        ]
    );
}

#[test]
fn durations_and_retention_are_read_as_the_gateway_reads_them() {
    let source = BASE.replace(
        "kind = \"replication\"\n",
        "kind = \"replication\"\nrpo_threshold = \"15\"\n\n[policy.retention]\nwindow = \"1h\"\n\
         tiers = [{ for_last = \"2h\", every = \"0s\" }]\n",
    );
    assert_eq!(
        errors(&source),
        [
            "p.toml:33:17: policy[0].rpo_threshold: duration \"15\": missing unit; write e.g. \
          \"15s\" (units: d, h, m, s, ms, us, ns)"
        ]
    );
    let source = BASE.replace(
        "kind = \"replication\"\n",
        "kind = \"replication\"\n\n[policy.retention]\nwindow = \"1h\"\n\
         tiers = [{ for_last = \"2h\", every = \"0s\" }, { for_last = \"4h\", evry = \"1h\" }]\n",
    );
    assert_eq!(
        errors(&source),
        [
            "p.toml:36:64: policy[0].retention.tiers[1].evry: unknown field `evry`, expected \
          `for_last` or `every`; did you mean `every`?"
        ]
    );
    let source = BASE.replace(
        "kind = \"replication\"\n",
        "kind = \"replication\"\napp_consistent_interval = \"4h\"\n\n[policy.retention]\n\
         window = \"1h\"\ntiers = [{ for_last = \"2h\", every = \"0s\" }]\n",
    );
    assert_eq!(
        errors(&source),
        [
            "p.toml:33:27: policy[0].app_consistent_interval: app_consistent_interval 4h is \
             longer than the retention window 1h: at times no app-consistent point would be \
             kept; shorten app_consistent_interval or lengthen retention.window",
            "p.toml:36:10: policy[0].retention.window: window (1h) must be at least the last \
             tier's for_last, tiers[0].for_last (2h); list tiers youngest first; each tier's \
             `every` a whole multiple of the finer tiers' and at most its span; the window at \
             least the last tier's for_last",
        ]
    );
}

#[test]
fn references_roles_and_grants_are_checked() {
    let source = BASE
        .replace(
            "gateways = [\"mt1\"]\n",
            "gateways = [\"ps1\"]\n\n[plugin.grants]\nhttp_hosts = [\"https://vc.example.net\"]\n\
             memory_mib = 0\n\n[plugin.settings]\npassword = \"hunter2\"\n",
        )
        .replace(
            "writer = \"raw\"\n",
            "writer = \"raw\"\nprocess_server = \"mt1\"\nfailback_policy = \"gold\"\n",
        );
    assert_eq!(
        errors(&source),
        [
            "p.toml:31:15: plugin[0].grants.http_hosts[0]: http host `https://vc.example.net` \
             is a URL; write the host name only, e.g. \"vcenter.example.net\" or \
             \"vcenter.example.net:443\"",
            "p.toml:32:14: plugin[0].grants.memory_mib: memory_mib 0 is out of range; grant \
             from 1 to 4096 MiB",
            "p.toml:35:12: plugin[0].settings.password: `password` holds a secret written in \
             the file; store it as a secret of the configuration server and write `password = \
             \"secret:NAME\"`",
            "p.toml:46:10: machine[0].writer: plugin `raw` is not loaded on gateway `mt1`, the \
             machine's master target; add `mt1` to that plugin's `gateways`, or leave \
             `gateways` out to load it everywhere",
            "p.toml:47:18: machine[0].process_server: gateway `mt1` does not have the \
             process-server role (its roles: config-server, master-target); name a gateway \
             with the process-server role at site `a`",
            "p.toml:48:19: machine[0].failback_policy: policy `gold` is a replication policy; \
             name a policy with `kind = \"failback\"`",
        ]
    );
}

#[test]
fn groups_and_plans_are_checked() {
    let source = format!(
        "{BASE}\n[[machine]]\nname = \"db01\"\nsite = \"b\"\npolicy = \"gold\"\n\
         master_target = \"mt1\"\nwriter = \"raw\"\n\n\
         [[group]]\nname = \"app\"\nmachines = [\"web01\", \"db01\"]\n\n\
         [[group]]\nname = \"again\"\nmachines = [\"web01\"]\n\n\
         [[plan]]\nname = \"p\"\n\n[[plan.step]]\nkind = \"failover\"\ngroups = [\"app\"]\n\n\
         [[plan.step]]\nkind = \"failover\"\nmachines = [\"web01\"]\n\n\
         [[plan.step]]\nkind = \"script\"\nrun = \"\"\ntimeout = \"2d\"\n"
    );
    assert_eq!(
        errors(&source),
        [
            "p.toml:43:8: machine[1].site: no gateway at site `b` has the process-server role; \
             add the process-server role to a gateway at that site",
            "p.toml:45:17: machine[1].master_target: master target `mt1` is at the machine's \
             own site, `b`; name a master target at another site, where replicas survive the \
             loss of this one",
            "p.toml:50:22: group[0].machines[1]: machine `db01` is at site `b`, `web01` at site \
             `a`; a group's members run at one site: move it to another group",
            "p.toml:54:13: group[1].machines[0]: machine `web01` is already in group `app` \
             (group[0]); a machine belongs to at most one group: remove it from one",
            "p.toml:65:13: plan[0].step[1].machines[0]: machine `web01` already fails over in \
             step[0] (in group `app`); a plan fails each machine over once: remove it from one \
             step",
            "p.toml:69:7: plan[0].step[2].run: `run` is empty; write the command line to run",
            "p.toml:70:11: plan[0].step[2].timeout: timeout 48h is out of range; allow from \
             \"1s\" to \"24h\"",
        ]
    );
}

#[test]
fn columns_count_characters() {
    let source = BASE.replace(
        "name = \"a\"\n",
        "name = \"a\"\ndescription = \"Zürich\" \n",
    );
    parse(&source, "p.toml").unwrap();
    let source = BASE.replace(
        "[[site]]\nname = \"b\"",
        "[[site]]\nname = \"b\"\ndescription = \"Zürich\"; x = 1",
    );
    // The syntax error is after the string, counted in characters, not bytes.
    assert_eq!(
        errors(&source)[0].split(": ").next().unwrap(),
        "p.toml:11:23"
    );
}

#[test]
fn cache_accounts_stand_where_process_servers_would() {
    // A machine of a site without a process server ships through its site's cache account,
    // drained by a process server elsewhere.
    let drained = BASE
        .replace(
            "name = \"ps1\"\nsite = \"a\"",
            "name = \"ps1\"\nsite = \"b\"",
        )
        .replace(
            "[[machine]]",
            "[[cache_account]]\nname = \"a-cache\"\nsite = \"a\"\n\
             container_url = \"https://havencache.blob.core.windows.net/haven-cache\"\n\
             drained_by = [\"ps1\"]\n\n[[machine]]",
        )
        .replace(
            "writer = \"raw\"",
            "writer = \"raw\"\ncache_account = \"a-cache\"",
        );
    let p = parse(&drained, "p.toml").unwrap();
    assert_eq!(p.machines[0].cache_account.as_deref(), Some("a-cache"));
    assert_eq!(p.cache_accounts[0].drained_by, ["ps1"]);
    // Without it, the site has no process server.
    let without = drained.replace("cache_account = \"a-cache\"\n", "");
    let e = errors(&without);
    assert!(
        e.iter()
            .any(|e| e.contains("no gateway at site `a` has the process-server role")),
        "{e:?}"
    );

    let wrong = drained
        .replace(
            "cache_account = \"a-cache\"",
            "cache_account = \"a-cache\"\nprocess_server = \"ps1\"",
        )
        .replace("site = \"a\"\ncontainer_url", "site = \"b\"\ncontainer_url")
        .replace("drained_by = [\"ps1\"]", "drained_by = [\"mt1\"]")
        .replace("haven-cache\"", "haven-cache?sv=2024&sig=x\"");
    let e = errors(&wrong);
    for expected in [
        "cache_account[0].container_url: container_url \
         `https://havencache.blob.core.windows.net/haven-cache?sv=2024&sig=x` does not name a \
         container, or carries a token",
        "cache_account[0].drained_by[0]: gateway `mt1` does not have the process-server role",
        "machine[0].cache_account: a machine ships to a process server or to a cache account, \
         not both",
    ] {
        assert!(
            e.iter().any(|e| e.contains(expected)),
            "{expected}\nnot in {e:?}"
        );
    }
    let e = errors(&wrong.replace("process_server = \"ps1\"\n", ""));
    assert!(
        e.iter().any(|e| e.contains(
            "machine[0].cache_account: cache account `a-cache` is for site `b`, the machine is \
             at `a`"
        )),
        "{e:?}"
    );
}
