//! The API over real TCP: `serve` on 127.0.0.1:0, asked as `haven` asks it (HTTP/1.1,
//! `Connection: close`, the answer read to the end of the connection, no chunked decoding).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use haven_api::Api;
use haven_engine::status::{
    CachedDisk, GatewayStatus, MasterTargetStatus, ProcessServerStatus, ReplicaStatus,
};
use haven_net::SiteCa;
use serde_json::{Value, json};

/// A served API and the runtime serving it (dropped with it).
struct Served {
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

fn start(api: Api) -> Served {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let (addr, _task) = runtime
        .block_on(haven_api::serve(
            "127.0.0.1:0".parse().expect("an address"),
            api,
            None,
        ))
        .expect("the API serves");
    Served {
        addr,
        _runtime: runtime,
    }
}

/// An API of a gateway with neither the site CA nor the master-target role.
fn bare(status: GatewayStatus) -> Api {
    Api {
        status: Arc::new(move || status.clone()),
        ca: None,
        on_revoke: None,
        recovery: None,
        auth: None,
        deployment: None,
    }
}

/// An answer: its status code, its headers (names in lower case) and its body.
struct Answer {
    code: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts a JSON error answer: `code` and `{"error": message}`.
    fn assert_error(&self, code: u16, message: &str) {
        assert_eq!(self.code, code, "{}", self.body);
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert_eq!(self.json(), json!({ "error": message }));
    }
}

impl Served {
    fn request(&self, method: &str, path: &str) -> Answer {
        self.request_as(None, method, path)
    }

    /// A request with `Authorization: Bearer TOKEN` when given.
    fn request_as(&self, token: Option<&str>, method: &str, path: &str) -> Answer {
        let mut tcp = TcpStream::connect(self.addr).expect("connect to the API");
        tcp.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("a read timeout");
        let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            tcp,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Connection: close\r\nContent-Length: 0\r\n\r\n",
            self.addr
        )
        .expect("send the request");
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).expect("read the answer");
        let text = String::from_utf8(raw).expect("a UTF-8 answer");
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("a status line");
        let code = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s[..3].parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let headers: BTreeMap<String, String> = lines
            .map(|l| {
                let (name, value) = l.split_once(':').expect("a header");
                (name.trim().to_ascii_lowercase(), value.trim().to_string())
            })
            .collect();
        // A length, never chunks: `haven` reads the body as it comes.
        if method != "HEAD" {
            assert_eq!(
                headers.get("content-length").map(String::as_str),
                Some(body.len().to_string().as_str()),
                "{method} {path}: {head}"
            );
        }
        Answer {
            code,
            headers,
            body: body.to_string(),
        }
    }
}

/// A gateway with both roles: one disk through the process server, two replicas at the
/// master target (one before its first point).
fn both_roles() -> GatewayStatus {
    GatewayStatus {
        site: "primary".into(),
        process_server: Some(ProcessServerStatus {
            listen: "0.0.0.0:7400".into(),
            upstream: "10.0.0.2:7500".into(),
            upstream_connected: true,
            cache_bytes: 8192,
            cache_max_bytes: 1 << 30,
            churn_bytes_per_second: 0.0,
            upload_bytes_per_second: 0.0,
            achievable_rpo_seconds: None,
            disks: vec![CachedDisk {
                agent_id: "a1b2c3d4e5f6".into(),
                machine_name: "web01".into(),
                disk: 0,
                agent_connected: true,
                durable_seq: 40,
                forwarded_seq: 38,
                cache_bytes: 8192,
                receive_bytes_per_second: 1024.5,
                received_bytes_total: 1_048_576,
                stored_bytes_total: 524_288,
                report: None,
                error: None,
                failed_over: None,
                policy_refused: None,
            }],
            drain: None,
        }),
        master_target: Some(MasterTargetStatus {
            listen: "0.0.0.0:7500".into(),
            writer: "file".into(),
            journal_max_bytes: 1 << 30,
            plugin_traps: 0,
            last_plugin_trap: None,
            replicas: vec![
                replica("a1b2c3d4e5f6", "web01", 0, 2.5, Some(3.25), 65536),
                replica("0f1e2d3c4b5a", "db01", 1, 0.0, None, 0),
            ],
        }),
        config_server: None,
    }
}

fn replica(
    agent: &str,
    machine: &str,
    disk: u32,
    lag_seconds: f64,
    rpo_seconds: Option<f64>,
    lag_bytes: u64,
) -> ReplicaStatus {
    ReplicaStatus {
        agent_id: agent.into(),
        machine_name: machine.into(),
        disk,
        size: 1 << 30,
        path: format!("{machine}/{disk}.raw"),
        seeding: false,
        reprotect: None,
        durable_seq: 40,
        applied_seq: 36,
        lag_bytes,
        lag_seconds,
        rpo_seconds,
        item_state: "protected".into(),
        points: 3,
        newest_point_ms: Some(1_700_000_000_000),
        test_failover: None,
        apply_bytes_per_second: 0.0,
        applied_bytes_total: 2_097_152 + u64::from(disk),
        journal_bytes: 131_072,
        report: None,
        error: None,
    }
}

const NOT_MASTER_TARGET: &str = "this gateway is not a master target: items, points and failover \
                                 live at the secondary site's gateway";
const NO_CA: &str = "this gateway has no site CA; run `haven-gateway init` for its data folder";

#[test]
fn openapi_document_lists_every_route_with_its_answers() {
    let api = start(bare(GatewayStatus::default()));
    let answer = api.request("GET", "/v1/openapi.json");
    assert_eq!(answer.code, 200);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let doc = answer.json();
    let version = doc["openapi"].as_str().expect("an openapi version");
    assert!(version.starts_with("3.1."), "openapi {version}");
    assert_eq!(doc["info"]["title"], "Haven gateway API");

    // Every route of the table, and nothing else.
    let routes: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("a path item")
                .keys()
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("get", "/v1/status"),
        ("post", "/v1/tokens"),
        ("get", "/v1/agents"),
        ("post", "/v1/agents/{id}/revoke"),
        ("get", "/metrics"),
        ("get", "/v1/openapi.json"),
        ("get", "/v1/ca"),
        ("get", "/v1/whoami"),
        ("get", "/v1/gateways"),
        ("get", "/v1/pipeline"),
        ("post", "/v1/pipeline"),
        ("get", "/v1/events"),
        ("get", "/v1/jobs"),
        ("get", "/v1/jobs/{id}"),
        ("get", "/v1/items"),
        ("get", "/v1/items/{item}"),
        ("get", "/v1/items/{item}/points"),
        ("post", "/v1/items/{item}/points"),
        ("post", "/v1/items/{item}/test-failover"),
        ("delete", "/v1/items/{item}/test-failover"),
        ("post", "/v1/items/{item}/failover"),
        ("post", "/v1/items/{item}/commit"),
        ("post", "/v1/items/{item}/reprotect"),
        ("get", "/v1/seeds"),
        ("post", "/v1/seeds"),
        ("get", "/v1/api-tokens"),
        ("post", "/v1/api-tokens"),
        ("delete", "/v1/api-tokens/{id}"),
        ("get", "/v1/audit"),
        ("get", "/v1/plans"),
        ("post", "/v1/plans/{name}/failover"),
        ("post", "/v1/plans/{name}/test-failover"),
        ("post", "/v1/plans/{name}/cleanup"),
        ("post", "/v1/plans/{name}/commit"),
        ("post", "/v1/plans/{name}/resume"),
        ("post", "/v1/plans/{name}/reprotect"),
        ("post", "/v1/plans/{name}/failback"),
        ("post", "/v1/groups/{name}/reprotect"),
        ("post", "/v1/groups/{name}/failback"),
        ("post", "/v1/machines/{name}/reprotect"),
        ("post", "/v1/machines/{name}/failback"),
        ("post", "/v1/group-points"),
        ("get", "/v1/groups/{name}/points"),
        ("post", "/v1/groups/{name}/points"),
        ("get", "/v1/platforms"),
        ("get", "/v1/platforms/{name}/machines"),
        ("post", "/v1/platforms/{name}/refresh"),
        ("get", "/v1/secrets"),
        ("put", "/v1/secrets/{name}"),
        ("delete", "/v1/secrets/{name}"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(routes, expected);

    let op = |method: &str, path: &str| &doc["paths"][path][method];
    let params = |method: &str, path: &str| -> BTreeSet<(String, String)> {
        op(method, path)["parameters"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        let s = |k: &str| p[k].as_str().expect("name and in").to_string();
                        (s("in"), s("name"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let set = |ps: &[(&str, &str)]| -> BTreeSet<(String, String)> {
        ps.iter()
            .map(|(i, n)| (i.to_string(), n.to_string()))
            .collect()
    };
    assert_eq!(params("post", "/v1/tokens"), set(&[("query", "ttl")]));
    assert_eq!(
        params("post", "/v1/agents/{id}/revoke"),
        set(&[("path", "id")])
    );
    assert_eq!(params("get", "/v1/items/{item}"), set(&[("path", "item")]));
    assert_eq!(
        params("post", "/v1/items/{item}/points"),
        set(&[("path", "item"), ("query", "kind"), ("query", "quiesced")])
    );
    assert_eq!(
        params("post", "/v1/items/{item}/test-failover"),
        set(&[
            ("path", "item"),
            ("query", "point"),
            ("query", "writable"),
            ("query", "files")
        ])
    );
    assert_eq!(
        params("post", "/v1/items/{item}/failover"),
        set(&[
            ("path", "item"),
            ("query", "point"),
            ("query", "planned"),
            ("query", "in_place")
        ])
    );
    assert_eq!(
        params("post", "/v1/items/{item}/reprotect"),
        set(&[("path", "item"), ("query", "to")])
    );
    assert_eq!(
        params("post", "/v1/seeds"),
        set(&[
            ("query", "agent_id"),
            ("query", "disk"),
            ("query", "path"),
            ("query", "machine_name"),
            ("query", "from"),
            ("query", "gateway")
        ])
    );
    assert_eq!(params("get", "/v1/seeds"), set(&[("query", "gateway")]));

    // Answers: the engine's types, and `{"error"}` for every error listed.
    let schema_of = |method: &str, path: &str, code: &str| -> Value {
        let content = op(method, path)["responses"][code]["content"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path}: no {code} content"))
            .clone();
        assert_eq!(content.len(), 1, "{method} {path} {code}");
        content.values().next().expect("one media type")["schema"].clone()
    };
    let reference = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let array_of = |name: &str| json!({ "type": "array", "items": reference(name) });
    assert_eq!(
        schema_of("get", "/v1/status", "200"),
        reference("GatewayStatus")
    );
    assert_eq!(schema_of("get", "/v1/items", "200"), array_of("ItemInfo"));
    assert_eq!(schema_of("get", "/v1/seeds", "200"), array_of("SeedRecord"));
    assert_eq!(
        schema_of("post", "/v1/seeds", "200"),
        reference("SeedRecord")
    );

    assert_eq!(
        schema_of("get", "/v1/items/{item}", "200"),
        reference("ItemInfo")
    );
    assert_eq!(
        schema_of("get", "/v1/items/{item}/points", "200"),
        array_of("PointInfo")
    );
    assert_eq!(
        schema_of("post", "/v1/items/{item}/points", "200"),
        reference("PointRecord")
    );
    assert_eq!(
        schema_of("post", "/v1/items/{item}/test-failover", "200"),
        reference("TestFailoverInfo")
    );
    assert_eq!(
        schema_of("delete", "/v1/items/{item}/test-failover", "200"),
        reference("TestFailoverInfo")
    );
    assert_eq!(
        schema_of("post", "/v1/items/{item}/failover", "200"),
        reference("ItemRecord")
    );
    assert_eq!(
        schema_of("post", "/v1/items/{item}/commit", "200"),
        reference("ItemRecord")
    );
    assert_eq!(
        schema_of("post", "/v1/tokens", "200"),
        reference("TokenAnswer")
    );
    assert_eq!(schema_of("get", "/v1/agents", "200"), array_of("AgentCert"));
    assert_eq!(
        schema_of("post", "/v1/agents/{id}/revoke", "200"),
        reference("Revocation")
    );
    assert!(
        op("get", "/metrics")["responses"]["200"]["content"]
            ["text/plain; version=0.0.4; charset=utf-8"]
            .is_object(),
        "{}",
        op("get", "/metrics")
    );
    for (method, path) in &expected {
        let responses = op(method, path)["responses"]
            .as_object()
            .expect("responses");
        assert!(responses.contains_key("200"), "{method} {path}");
        for (code, response) in responses.iter().filter(|(code, _)| *code != "200") {
            // Every error is `{"error": …}`; a refused pipeline lists its problems too.
            let schema = &response["content"]["application/json"]["schema"];
            let problems = *path == "/v1/pipeline" && (*code == "409" || *code == "422");
            assert_eq!(
                *schema,
                reference(if problems {
                    "PipelineProblems"
                } else {
                    "ErrorBody"
                }),
                "{method} {path} {code}"
            );
        }
        if path.starts_with("/v1/items") {
            assert!(responses.contains_key("404"), "{method} {path}");
        }
    }
    assert_eq!(
        op("post", "/v1/items/{item}/failover")["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["200", "400", "404", "409", "500", "503"]
    );

    // Every reference resolves, and the engine's types are described field by field.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in &refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("reference {r}"));
        assert!(schemas.contains_key(name), "{r} is not in the components");
    }
    let fields = |name: &str| -> BTreeSet<String> {
        schemas[name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{name} has no properties: {}", schemas[name]))
            .keys()
            .cloned()
            .collect()
    };
    let names = |ns: &[&str]| -> BTreeSet<String> { ns.iter().map(|n| n.to_string()).collect() };
    assert_eq!(
        fields("GatewayStatus"),
        names(&["site", "process_server", "master_target", "config_server"])
    );
    assert_eq!(
        fields("PointRecord"),
        names(&[
            "point",
            "seq",
            "source_time_ms",
            "kind",
            "received_ms",
            "group"
        ])
    );
    assert_eq!(fields("TokenAnswer"), names(&["token", "ttl_seconds"]));
    for name in [
        "ProcessServerStatus",
        "CachedDisk",
        "MasterTargetStatus",
        "ReplicaStatus",
        "Report",
        "DiskReport",
        "DiskState",
        "WriteMark",
        "ItemInfo",
        "ItemRecord",
        "ItemState",
        "Transition",
        "PointInfo",
        "PointKind",
        "TestFailoverInfo",
        "AgentCert",
        "Revocation",
        "ErrorBody",
    ] {
        assert!(
            schemas.contains_key(name),
            "{name} is not in the components"
        );
    }
    assert_eq!(
        schemas["ItemState"]["enum"],
        json!([
            "protected",
            "failing-over",
            "failed-over",
            "committed",
            "failover-failed",
            "reprotected"
        ])
    );
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[test]
fn status_answers_the_roles_as_json() {
    let api = start(bare(both_roles()));
    let answer = api.request("GET", "/v1/status");
    assert_eq!(answer.code, 200);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let status: GatewayStatus = serde_json::from_str(&answer.body).expect("a GatewayStatus");
    assert_eq!(status, both_roles());

    let empty = start(bare(GatewayStatus::default()));
    let answer = empty.request("GET", "/v1/status");
    assert_eq!(answer.code, 200);
    assert_eq!(
        answer.json(),
        json!({ "site": "", "process_server": null, "master_target": null })
    );
}

#[test]
fn unknown_paths_answer_404() {
    let api = start(bare(GatewayStatus::default()));
    api.request("GET", "/v1/nothing").assert_error(
        404,
        "no such endpoint /v1/nothing; see /v1/status, /v1/tokens, /v1/agents, /metrics, \
         /v1/openapi.json",
    );
    api.request("POST", "/v2/status").assert_error(
        404,
        "no such endpoint /v2/status; see /v1/status, /v1/tokens, /v1/agents, /metrics, \
         /v1/openapi.json",
    );
    // A method the revocation path does not take is no endpoint either, as it always was.
    api.request("GET", "/v1/agents/a1b2/revoke").assert_error(
        404,
        "no such endpoint /v1/agents/a1b2/revoke; see /v1/status, /v1/tokens, /v1/agents, \
         /metrics, /v1/openapi.json",
    );
}

#[test]
fn wrong_methods_answer_405() {
    let api = start(bare(GatewayStatus::default()));
    for (method, path, allow) in [
        ("DELETE", "/v1/status", "GET,HEAD"),
        ("POST", "/metrics", "GET,HEAD"),
        ("GET", "/v1/tokens", "POST"),
        ("PUT", "/v1/agents", "GET,HEAD"),
        ("POST", "/v1/openapi.json", "GET,HEAD"),
    ] {
        let answer = api.request(method, path);
        answer.assert_error(405, "method not allowed");
        assert_eq!(answer.header("allow"), Some(allow), "{method} {path}");
    }
}

#[test]
fn items_need_the_master_target_role() {
    let api = start(bare(both_roles()));
    for (method, path) in [
        ("GET", "/v1/items"),
        ("GET", "/v1/items/web01"),
        ("GET", "/v1/items/web01%2F0/points"),
        ("POST", "/v1/items/web01/points?kind=app"),
        // Checked before the arguments.
        ("POST", "/v1/items/web01/points?kind=snapshot"),
        (
            "POST",
            "/v1/items/web01/test-failover?point=latest&writable=true",
        ),
        ("DELETE", "/v1/items/web01/test-failover"),
        ("POST", "/v1/items/web01/failover?planned"),
        ("POST", "/v1/items/web01/commit"),
        // No such endpoint, or no such method, under /v1/items: the role is missing first.
        ("GET", "/v1/items/web01/snapshots"),
        ("PUT", "/v1/items/web01/commit"),
    ] {
        api.request(method, path)
            .assert_error(404, NOT_MASTER_TARGET);
    }
    // `MACHINE%2FDISK` is one segment: the item's route, which takes GET only.
    let answer = api.request("DELETE", "/v1/items/web01%2F0");
    answer.assert_error(404, NOT_MASTER_TARGET);
    assert_eq!(answer.header("allow"), Some("GET,HEAD"));
    let answer = api.request("PATCH", "/v1/items/web01%2F0/commit");
    answer.assert_error(404, NOT_MASTER_TARGET);
    assert_eq!(answer.header("allow"), Some("POST"));
}

#[test]
fn metrics_are_prometheus_text() {
    let api = start(bare(both_roles()));
    let answer = api.request("GET", "/metrics");
    assert_eq!(answer.code, 200);
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let web01 = r#"{agent="a1b2c3d4e5f6",machine="web01",disk="0"}"#;
    let db01 = r#"{agent="0f1e2d3c4b5a",machine="db01",disk="1"}"#;
    let expected = [
        "# HELP haven_cache_bytes Bytes the process server's cache holds for a disk.",
        "# TYPE haven_cache_bytes gauge",
        &format!("haven_cache_bytes{web01} 8192"),
        "# HELP haven_received_bytes_total Bytes of disk extent received from agents.",
        "# TYPE haven_received_bytes_total counter",
        &format!("haven_received_bytes_total{web01} 1048576"),
        "# HELP haven_cache_stored_bytes_total Bytes stored in the cache after compression.",
        "# TYPE haven_cache_stored_bytes_total counter",
        &format!("haven_cache_stored_bytes_total{web01} 524288"),
        "# HELP haven_replication_lag_seconds Age of the oldest journaled record in no recovery \
         point yet (without points: not yet applied to the replica), counted from its arrival \
         at the master target.",
        "# TYPE haven_replication_lag_seconds gauge",
        &format!("haven_replication_lag_seconds{web01} 2.5"),
        &format!("haven_replication_lag_seconds{db01} 0.0"),
        "# HELP haven_rpo_seconds Recovery point objective achieved now: how far back a \
         failover now would go (absent before the first point and once failed over).",
        "# TYPE haven_rpo_seconds gauge",
        &format!("haven_rpo_seconds{web01} 3.25"),
        "# HELP haven_replication_lag_bytes Bytes of extent journaled and in no recovery point \
         yet (without points: not yet applied to the replica).",
        "# TYPE haven_replication_lag_bytes gauge",
        &format!("haven_replication_lag_bytes{web01} 65536"),
        &format!("haven_replication_lag_bytes{db01} 0"),
        "# HELP haven_applied_bytes_total Bytes of extent applied to the replica.",
        "# TYPE haven_applied_bytes_total counter",
        &format!("haven_applied_bytes_total{web01} 2097152"),
        &format!("haven_applied_bytes_total{db01} 2097153"),
        "# HELP haven_journal_bytes Bytes the master target's journal holds for a disk.",
        "# TYPE haven_journal_bytes gauge",
        &format!("haven_journal_bytes{web01} 131072"),
        &format!("haven_journal_bytes{db01} 131072"),
    ];
    assert_eq!(answer.body.lines().collect::<Vec<_>>(), expected);
    assert_eq!(haven_api::metrics(&both_roles()), answer.body);

    // No role, no metric.
    assert_eq!(haven_api::metrics(&GatewayStatus::default()), "");
}

#[test]
fn enrollment_needs_the_site_ca() {
    let api = start(bare(GatewayStatus::default()));
    api.request("POST", "/v1/tokens").assert_error(404, NO_CA);
    api.request("POST", "/v1/tokens?ttl=0")
        .assert_error(404, NO_CA);
    api.request("GET", "/v1/agents").assert_error(404, NO_CA);
    api.request("POST", "/v1/agents/a1b2/revoke")
        .assert_error(404, NO_CA);
}

/// Revocations the API reported: (CRLs, agent id).
type Revocations = Arc<Mutex<Vec<(Vec<String>, String)>>>;

#[test]
fn tokens_agents_and_revocation_with_a_site_ca() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let ca = Arc::new(Mutex::new(
        SiteCa::init(dir.path().join("ca"), "primary").expect("a site CA"),
    ));
    let revocations = Revocations::default();
    let seen = revocations.clone();
    let api = start(Api {
        status: Arc::new(GatewayStatus::default),
        ca: Some(ca.clone()),
        on_revoke: Some(Arc::new(move |crls, agent| {
            seen.lock()
                .expect("the revocations")
                .push((crls, agent.to_string()));
        })),
        recovery: None,
        auth: None,
        deployment: None,
    });

    // Tokens.
    let answer = api.request("POST", "/v1/tokens");
    assert_eq!(answer.code, 200, "{}", answer.body);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let token = answer.json();
    assert_eq!(token["ttl_seconds"], 3600);
    assert_eq!(token.as_object().map(|o| o.len()), Some(2));
    let token = token["token"].as_str().expect("a token").to_string();
    assert_eq!(
        api.request("POST", "/v1/tokens?ttl=60").json()["ttl_seconds"],
        60
    );
    api.request("POST", "/v1/tokens?ttl=0")
        .assert_error(400, "ttl=0: give whole seconds from 1 to 2592000 (30 days)");
    api.request("POST", "/v1/tokens?ttl=2592001").assert_error(
        400,
        "ttl=2592001: give whole seconds from 1 to 2592000 (30 days)",
    );
    api.request("POST", "/v1/tokens?ttl=1h").assert_error(
        400,
        "ttl=1h: give whole seconds from 1 to 2592000 (30 days)",
    );
    api.request("POST", "/v1/tokens?name=web01").assert_error(
        400,
        "unknown query parameter `name=web01`; only ttl=SECONDS is known",
    );
    assert_eq!(
        ca.lock().expect("the CA").pending_tokens().len(),
        2,
        "only the two good requests made tokens"
    );

    // No agent yet; then one, enrolled with the first token.
    let answer = api.request("GET", "/v1/agents");
    assert_eq!(answer.code, 200);
    assert_eq!(answer.json(), json!([]));
    let key = rcgen::KeyPair::generate().expect("a key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("a CSR")
        .pem()
        .expect("PEM");
    let issued = ca
        .lock()
        .expect("the CA")
        .enroll(&token, &csr, "web01")
        .expect("enrolled");
    let listed = api.request("GET", "/v1/agents").json();
    let issued_at = listed[0]["issued_at"].as_u64().expect("issued_at");
    assert_eq!(
        listed,
        json!([{
            "agent_id": issued.agent_id,
            "machine_name": "web01",
            "serial": issued.serial,
            "issued_at": issued_at,
            "not_after": issued.not_after,
            "revoked": false,
        }])
    );

    // Revocation.
    api.request("POST", "/v1/agents/0000000000/revoke")
        .assert_error(
            404,
            "no agent 0000000000 was enrolled here; see GET /v1/agents",
        );
    assert!(revocations.lock().expect("the revocations").is_empty());
    let answer = api.request("POST", &format!("/v1/agents/{}/revoke", issued.agent_id));
    assert_eq!(answer.code, 200, "{}", answer.body);
    assert_eq!(
        answer.json(),
        json!({ "agent_id": issued.agent_id, "revoked_serials": [issued.serial] })
    );
    {
        let revocations = revocations.lock().expect("the revocations");
        assert_eq!(revocations.len(), 1);
        let (crls, agent) = &revocations[0];
        assert_eq!(agent, &issued.agent_id);
        assert_eq!(crls.len(), 1);
        assert!(
            crls[0].starts_with("-----BEGIN X509 CRL-----"),
            "{}",
            crls[0]
        );
    }
    assert_eq!(api.request("GET", "/v1/agents").json()[0]["revoked"], true);
}

/// Tokens with roles: no token 401, a bad one 401, too small a role 403 naming the role
/// needed; an admin manages tokens through the API; every change is audited.
#[test]
fn tokens_and_roles_decide_who_may_call_what_and_changes_are_audited() {
    use haven_api::auth::Auth;
    use haven_store::tokens::{ApiTokens, Role};

    let tmp = tempfile::tempdir().expect("tempdir");
    let tokens = Arc::new(ApiTokens::open(&tmp.path().join("api-tokens.json")).expect("tokens"));
    let (admin, _) = tokens.create("first-admin", Role::Admin, 1).expect("admin");
    let (operator, _) = tokens.create("ops", Role::Operator, 2).expect("operator");
    let (viewer, _) = tokens.create("grafana", Role::Viewer, 3).expect("viewer");
    let mut api = bare(GatewayStatus::default());
    api.auth = Some(Arc::new(Auth::new(tokens, &tmp.path().join("audit.jsonl"))));
    let api = start(api);

    // The document is public; everything else needs a token.
    assert_eq!(api.request("GET", "/v1/openapi.json").code, 200);
    let none = api.request("GET", "/v1/status");
    none.assert_error(
        401,
        "this API needs a token (Authorization: Bearer; the CLI sends --token or HAVEN_TOKEN): \
         `haven-gateway init` printed the first admin token, and `haven api-token create` makes \
         more",
    );
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    let mut forged = viewer.clone();
    forged.replace_range(
        forged.len() - 1..,
        if viewer.ends_with('0') { "1" } else { "0" },
    );
    api.request_as(Some(&forged), "GET", "/v1/status")
        .assert_error(
            401,
            "API token not valid here: unknown at this gateway, revoked or mistyped",
        );

    // Each role reaches what it may, and no further.
    assert_eq!(api.request_as(Some(&viewer), "GET", "/v1/status").code, 200);
    assert_eq!(api.request_as(Some(&viewer), "GET", "/metrics").code, 200);
    api.request_as(Some(&viewer), "POST", "/v1/items/web01/points")
        .assert_error(
            403,
            "token `grafana` has role viewer; POST /v1/items/web01/points needs operator or above",
        );
    // The operator passes, and meets the role's own answer (no master target here).
    api.request_as(Some(&operator), "POST", "/v1/items/web01/points")
        .assert_error(404, NOT_MASTER_TARGET);
    api.request_as(Some(&operator), "POST", "/v1/tokens")
        .assert_error(
            403,
            "token `ops` has role operator; POST /v1/tokens needs admin",
        );
    api.request_as(Some(&operator), "GET", "/v1/audit")
        .assert_error(
            403,
            "token `ops` has role operator; GET /v1/audit needs admin",
        );

    // An admin makes a token through the API; it works, until revoked.
    let made = api.request_as(Some(&admin), "POST", "/v1/api-tokens?name=ci&role=operator");
    assert_eq!(made.code, 200, "{}", made.body);
    let made = made.json();
    let (new, id) = (
        made["token"].as_str().expect("a token").to_string(),
        made["info"]["id"].as_str().expect("an id").to_string(),
    );
    assert_eq!(made["info"]["role"], "operator");
    assert_eq!(api.request_as(Some(&new), "GET", "/v1/status").code, 200);
    let listed = api.request_as(Some(&admin), "GET", "/v1/api-tokens").json();
    let names: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|t| t["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(names, vec!["first-admin", "ops", "grafana", "ci"]);
    assert!(!listed.to_string().contains("sha256"), "{listed}");
    api.request_as(Some(&admin), "POST", "/v1/api-tokens?name=x&role=root")
        .assert_error(400, "role \"root\": use admin, operator or viewer");
    assert_eq!(
        api.request_as(Some(&admin), "DELETE", &format!("/v1/api-tokens/{id}"))
            .code,
        200
    );
    api.request_as(Some(&new), "GET", "/v1/status")
        .assert_error(
            401,
            "API token not valid here: unknown at this gateway, revoked or mistyped",
        );

    // Every change was audited, refused ones included, with who made it and the outcome.
    let audit = api
        .request_as(Some(&admin), "GET", "/v1/audit?limit=100")
        .json();
    let lines: Vec<(String, String, String, u64)> = audit
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["token_name"].as_str().unwrap_or("-").to_string(),
                e["method"].as_str().expect("a method").to_string(),
                e["path"].as_str().expect("a path").to_string(),
                e["status"].as_u64().expect("a status"),
            )
        })
        .collect();
    let line = |who: &str, m: &str, p: &str, code: u64| (who.into(), m.into(), p.into(), code);
    assert_eq!(
        lines,
        vec![
            line("grafana", "POST", "/v1/items/web01/points", 403),
            line("ops", "POST", "/v1/items/web01/points", 404),
            line("ops", "POST", "/v1/tokens", 403),
            line(
                "first-admin",
                "POST",
                "/v1/api-tokens?name=ci&role=operator",
                200
            ),
            line(
                "first-admin",
                "POST",
                "/v1/api-tokens?name=x&role=root",
                400
            ),
            line(
                "first-admin",
                "DELETE",
                &format!("/v1/api-tokens/{id}"),
                200
            ),
        ]
    );
}
