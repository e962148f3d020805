//! Haven's HTTP API (hyper, HTTP/1.1), served by every gateway.
//!
//! | method | path          | what                                                          |
//! |--------|---------------|---------------------------------------------------------------|
//! | GET    | `/v1/status`  | the roles' status as JSON ([`GatewayStatus`])                 |
//! | POST   | `/v1/tokens`  | a one-time enrollment token; query `ttl=SECONDS` (default 3600) |
//! | GET    | `/v1/agents`  | certificates this site's CA issued to agents (and process servers) |
//! | POST   | `/v1/agents/ID/revoke` | revokes every certificate of agent `ID` and cuts its live connections |
//! | GET    | `/metrics`    | Prometheus text: lag, throughput, cache and journal sizes     |
//! | GET    | `/v1/items`   | protected items at this master target, with their failover state |
//! | GET    | `/v1/items/ITEM` | one item, with its state history                          |
//! | GET    | `/v1/items/ITEM/points` | the item's recovery points                        |
//! | POST   | `/v1/items/ITEM/points` | takes a point now (`kind=crash\|app`); answers once it is here |
//! | POST   | `/v1/items/ITEM/test-failover` | exports a point over NBD (`point=ID\|latest`, `writable=true`) |
//! | DELETE | `/v1/items/ITEM/test-failover` | ends the test failover, discarding its writes |
//! | POST   | `/v1/items/ITEM/failover` | fails over (`point=ID\|latest`, or `planned=true`) |
//! | POST   | `/v1/items/ITEM/commit` | makes a failover final                              |
//!
//! `ITEM` is a machine name, an agent id (or a unique prefix of 6+ hex digits), or
//! `MACHINE%2FDISK`. Errors are `{"error": "..."}` with 404 (unknown item or point), 409 (not
//! possible in the item's state), 400 (bad argument), 503 (the source cannot be reached).
//!
//! The API has no authentication of its own: it listens on loopback by default, and whoever
//! can reach it can mint enrollment tokens. Bind it elsewhere only behind access control.
//!
//! Architecture invariant: this is the only crate with an HTTP server.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use haven_engine::master_target::MasterTarget;
use haven_engine::recovery::{ErrorKind, PointSel, RecoveryError};
use haven_engine::status::GatewayStatus;
use haven_net::SiteCa;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// Produces the gateway's status on demand.
pub type StatusFn = Arc<dyn Fn() -> GatewayStatus + Send + Sync>;

/// Called after a revocation with the new CRL and the agent id: the roles load the CRL for new
/// connections and close the agent's live ones.
pub type RevokeFn = Arc<dyn Fn(Vec<String>, &str) + Send + Sync>;

/// What the API serves.
#[derive(Clone)]
pub struct Api {
    /// The gateway's status.
    pub status: StatusFn,
    /// The site CA, for tokens and revocation.
    pub ca: Option<Arc<Mutex<SiteCa>>>,
    /// What to do after a revocation.
    pub on_revoke: Option<RevokeFn>,
    /// The master target, for recovery points and failover.
    pub recovery: Option<Arc<MasterTarget>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").finish_non_exhaustive()
    }
}

/// Binds `addr` and serves the API until the task is dropped. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    api: Api,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for the API on {addr}"))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "API listening");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let api = api.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(api.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok((local, task))
}

fn reply(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json_error(code: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    reply(code, "application/json", body)
}

impl Api {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if let Some(rest) = req.uri().path().strip_prefix("/v1/items") {
            let query = req.uri().query().unwrap_or("").to_string();
            return self.items(req.method(), rest, &query).await;
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/v1/status") => {
                let status = (self.status)();
                match serde_json::to_vec_pretty(&status) {
                    Ok(body) => reply(StatusCode::OK, "application/json", body),
                    Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                }
            }
            (&Method::POST, "/v1/tokens") => self.token(req.uri().query().unwrap_or("")),
            (&Method::GET, "/v1/agents") => self.agents(),
            (&Method::POST, path)
                if path.starts_with("/v1/agents/") && path.ends_with("/revoke") =>
            {
                let id = &path["/v1/agents/".len()..path.len() - "/revoke".len()];
                self.revoke(id)
            }
            (&Method::GET, "/metrics") => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics(&(self.status)()),
            ),
            (_, "/v1/status" | "/v1/tokens" | "/v1/agents" | "/metrics") => {
                json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            (_, path) => json_error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no such endpoint {path}; see /v1/status, /v1/tokens, /v1/agents, /metrics"
                ),
            ),
        }
    }

    /// `/v1/items…`: `rest` is the path after `/v1/items`.
    async fn items(&self, method: &Method, rest: &str, query: &str) -> Response<Full<Bytes>> {
        let Some(mt) = &self.recovery else {
            return json_error(
                StatusCode::NOT_FOUND,
                "this gateway is not a master target: items, points and failover live at the \
                 secondary site's gateway",
            );
        };
        let q = Query::parse(query);
        let rest = rest.trim_start_matches('/');
        let (item, action) = match rest.split_once('/') {
            Some((i, a)) => (percent_decode(i), a),
            None => (percent_decode(rest), ""),
        };
        let result: Result<serde_json::Value, RecoveryError> = match (method, item.as_str(), action)
        {
            (&Method::GET, "", "") => Ok(serde_json::json!(mt.items())),
            (&Method::GET, item, "") => mt.item(item).map(|i| serde_json::json!(i)),
            (&Method::GET, item, "points") => mt.points(item).map(|p| serde_json::json!(p)),
            (&Method::POST, item, "points") => match q.get("kind").unwrap_or("crash") {
                kind @ ("crash" | "app") => mt
                    .create_point(item, kind == "app")
                    .await
                    .map(|p| serde_json::json!(p)),
                other => Err(bad(format!("kind {other:?}: use crash or app"))),
            },
            // Plugin calls, files and redb commits: off the async workers.
            (&Method::POST, item, "test-failover") => match (q.point(), q.flag("writable")) {
                (Ok(sel), Ok(w)) => {
                    let (mt, item) = (mt.clone(), item.to_string());
                    blocking(move || mt.test_failover(&item, sel, w)).await
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            },
            (&Method::DELETE, item, "test-failover") => {
                // It also waits for the export's connections to end.
                let (mt, item) = (mt.clone(), item.to_string());
                blocking(move || mt.cleanup_test(&item)).await
            }
            (&Method::POST, item, "failover") => match (q.point(), q.flag("planned")) {
                (Ok(sel), Ok(planned)) => mt
                    .failover(item, sel, planned)
                    .await
                    .map(|i| serde_json::json!(i)),
                (Err(e), _) | (_, Err(e)) => Err(e),
            },
            (&Method::POST, item, "commit") => {
                let (mt, item) = (mt.clone(), item.to_string());
                blocking(move || mt.commit(&item)).await
            }
            _ => {
                return json_error(
                    StatusCode::NOT_FOUND,
                    &format!(
                        "no such endpoint {method} /v1/items/{rest}; see the API table in the \
                         README"
                    ),
                );
            }
        };
        match result {
            Ok(v) => reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&v).unwrap_or_default(),
            ),
            Err(e) => json_error(
                match e.kind {
                    ErrorKind::NotFound => StatusCode::NOT_FOUND,
                    ErrorKind::Conflict => StatusCode::CONFLICT,
                    ErrorKind::Invalid => StatusCode::BAD_REQUEST,
                    ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                    ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
                },
                &e.message,
            ),
        }
    }

    fn no_ca() -> Response<Full<Bytes>> {
        json_error(
            StatusCode::NOT_FOUND,
            "this gateway has no site CA; run `haven-gateway init` for its data folder",
        )
    }

    fn agents(&self) -> Response<Full<Bytes>> {
        let Some(ca) = &self.ca else {
            return Self::no_ca();
        };
        let ca = ca.lock().unwrap_or_else(|e| e.into_inner());
        let agents: Vec<_> = ca
            .issued()
            .iter()
            .filter(|(_, r)| r.kind == "agent")
            .map(|(serial, r)| {
                serde_json::json!({
                    "agent_id": r.subject,
                    "machine_name": r.names,
                    "serial": serial,
                    "issued_at": r.issued_at,
                    "not_after": r.not_after,
                    "revoked": ca.revoked().iter().any(|x| &x.serial == serial),
                })
            })
            .collect();
        reply(
            StatusCode::OK,
            "application/json",
            serde_json::Value::Array(agents).to_string(),
        )
    }

    fn revoke(&self, agent_id: &str) -> Response<Full<Bytes>> {
        let Some(ca) = &self.ca else {
            return Self::no_ca();
        };
        let (serials, crl) = {
            let mut ca = ca.lock().unwrap_or_else(|e| e.into_inner());
            let serials: Vec<String> = ca
                .issued()
                .iter()
                .filter(|(_, r)| r.kind == "agent" && r.subject == agent_id)
                .map(|(s, _)| s.clone())
                .collect();
            if serials.is_empty() {
                return json_error(
                    StatusCode::NOT_FOUND,
                    &format!("no agent {agent_id} was enrolled here; see GET /v1/agents"),
                );
            }
            for serial in &serials {
                if let Err(e) = ca.revoke(serial) {
                    return json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
                }
            }
            match ca.crl_pem() {
                Ok(crl) => (serials, crl),
                Err(e) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        };
        if let Some(f) = &self.on_revoke {
            f(vec![crl], agent_id);
        }
        tracing::info!(agent = %agent_id, ?serials, "agent revoked");
        reply(
            StatusCode::OK,
            "application/json",
            serde_json::json!({ "agent_id": agent_id, "revoked_serials": serials }).to_string(),
        )
    }

    fn token(&self, query: &str) -> Response<Full<Bytes>> {
        let Some(ca) = &self.ca else {
            return Self::no_ca();
        };
        let mut ttl = 3600;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("ttl", v)) => match v.parse::<u64>() {
                    Ok(v) if (1..=30 * 24 * 3600).contains(&v) => ttl = v,
                    _ => {
                        return json_error(
                            StatusCode::BAD_REQUEST,
                            &format!("ttl={v}: give whole seconds from 1 to 2592000 (30 days)"),
                        );
                    }
                },
                _ => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        &format!("unknown query parameter `{pair}`; only ttl=SECONDS is known"),
                    );
                }
            }
        }
        let created = ca
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .create_token(Duration::from_secs(ttl));
        match created {
            Ok(token) => reply(
                StatusCode::OK,
                "application/json",
                serde_json::json!({ "token": token.to_string(), "ttl_seconds": ttl }).to_string(),
            ),
            Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }
}

/// Prometheus text exposition of `status`. Units are in the metric names.
pub fn metrics(status: &GatewayStatus) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    if let Some(ps) = &status.process_server {
        let label = |d: &haven_engine::status::CachedDisk| {
            format!(
                "agent=\"{}\",machine=\"{}\",disk=\"{}\"",
                d.agent_id, d.machine_name, d.disk
            )
        };
        metric(
            "haven_cache_bytes",
            "gauge",
            "Bytes the process server's cache holds for a disk.",
            ps.disks
                .iter()
                .map(|d| (label(d), d.cache_bytes as f64))
                .collect(),
        );
        metric(
            "haven_received_bytes_total",
            "counter",
            "Bytes of disk extent received from agents.",
            ps.disks
                .iter()
                .map(|d| (label(d), d.received_bytes_total as f64))
                .collect(),
        );
        metric(
            "haven_cache_stored_bytes_total",
            "counter",
            "Bytes stored in the cache after compression.",
            ps.disks
                .iter()
                .map(|d| (label(d), d.stored_bytes_total as f64))
                .collect(),
        );
    }
    if let Some(mt) = &status.master_target {
        let label = |r: &haven_engine::status::ReplicaStatus| {
            format!(
                "agent=\"{}\",machine=\"{}\",disk=\"{}\"",
                r.agent_id, r.machine_name, r.disk
            )
        };
        metric(
            "haven_replication_lag_seconds",
            "gauge",
            "Age of the oldest journaled record in no recovery point yet (without points: not \
             yet applied to the replica), counted from its arrival at the master target.",
            mt.replicas
                .iter()
                .map(|r| (label(r), r.lag_seconds))
                .collect(),
        );
        metric(
            "haven_rpo_seconds",
            "gauge",
            "Recovery point objective achieved now: how far back a failover now would go \
             (absent before the first point and once failed over).",
            mt.replicas
                .iter()
                .filter_map(|r| Some((label(r), r.rpo_seconds?)))
                .collect(),
        );
        metric(
            "haven_replication_lag_bytes",
            "gauge",
            "Bytes of extent journaled and in no recovery point yet (without points: not yet \
             applied to the replica).",
            mt.replicas
                .iter()
                .map(|r| (label(r), r.lag_bytes as f64))
                .collect(),
        );
        metric(
            "haven_applied_bytes_total",
            "counter",
            "Bytes of extent applied to the replica.",
            mt.replicas
                .iter()
                .map(|r| (label(r), r.applied_bytes_total as f64))
                .collect(),
        );
        metric(
            "haven_journal_bytes",
            "gauge",
            "Bytes the master target's journal holds for a disk.",
            mt.replicas
                .iter()
                .map(|r| (label(r), r.journal_bytes as f64))
                .collect(),
        );
    }
    out
}

fn bad(message: String) -> RecoveryError {
    RecoveryError {
        kind: ErrorKind::Invalid,
        message,
    }
}

/// A request's query string.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Query {
        Query(
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (percent_decode(k), percent_decode(v)),
                    None => (percent_decode(p), String::new()),
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `point=ID|latest`, `latest` when absent.
    fn point(&self) -> Result<PointSel, RecoveryError> {
        self.get("point").unwrap_or("latest").parse()
    }

    fn flag(&self, key: &str) -> Result<bool, RecoveryError> {
        match self.get(key) {
            None | Some("false") => Ok(false),
            Some("true" | "") => Ok(true),
            Some(v) => Err(bad(format!("{key}={v:?}: use true or false"))),
        }
    }
}

/// Decodes `%XX` escapes (and `+` as a space) of a URL component.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs a recovery call that does blocking work (plugins, files, redb) on the blocking pool and
/// serialises its answer.
async fn blocking<T: serde::Serialize + Send + 'static>(
    call: impl FnOnce() -> Result<T, RecoveryError> + Send + 'static,
) -> Result<serde_json::Value, RecoveryError> {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or_else(|e| {
            Err(RecoveryError {
                kind: ErrorKind::Internal,
                message: format!("the request's task failed: {e}"),
            })
        })
        .map(|v| serde_json::json!(v))
}
