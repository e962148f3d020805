//! Haven's HTTP API (axum on hyper, HTTP/1.1), served by every gateway.
//!
//! | method | path          | what                                                          |
//! |--------|---------------|---------------------------------------------------------------|
//! | GET    | `/v1/status`  | the roles' status as JSON ([`GatewayStatus`])                 |
//! | POST   | `/v1/tokens`  | a one-time enrollment token; query `ttl=SECONDS` (default 3600) |
//! | GET    | `/v1/agents`  | certificates this site's CA issued to agents (and process servers) |
//! | POST   | `/v1/agents/ID/revoke` | revokes every certificate of agent `ID` and cuts its live connections |
//! | GET    | `/metrics`    | Prometheus text 0.0.4: lag, throughput, cache and journal sizes |
//! | GET    | `/v1/openapi.json` | this table as an OpenAPI 3.1 document, with every answer's schema |
//! | GET    | `/v1/items`   | protected items at this master target, with their failover state |
//! | GET    | `/v1/items/ITEM` | one item, with its state history                          |
//! | GET    | `/v1/items/ITEM/points` | the item's recovery points                        |
//! | POST   | `/v1/items/ITEM/points` | takes a point now (`kind=crash\|app`); answers once it is here |
//! | POST   | `/v1/items/ITEM/test-failover` | exports a point over NBD (`point=ID\|latest`, `writable=true`) |
//! | DELETE | `/v1/items/ITEM/test-failover` | ends the test failover, discarding its writes |
//! | POST   | `/v1/items/ITEM/failover` | fails over (`point=ID\|latest`, or `planned=true`) |
//! | POST   | `/v1/items/ITEM/failover?in_place=true` | fails back onto the replica itself (a reprotect's seed) |
//! | POST   | `/v1/items/ITEM/commit` | makes a failover final                              |
//! | POST   | `/v1/items/ITEM/reprotect` | marks a failed-over item reprotected (`to=WHERE`)    |
//! | GET    | `/v1/seeds`   | existing disks streams that have not arrived will replicate onto |
//! | POST   | `/v1/seeds`   | records one (`agent_id`, `disk`, `path`, `machine_name`, `from`) |
//! | POST   | `/v1/group-points` | a group point of machines held here (`members=A,B`, `hold_ms`) |
//! | GET    | `/v1/groups/NAME/points` | a group's points (configuration server)        |
//! | POST   | `/v1/groups/NAME/points` | takes a group point now (configuration server) |
//! | GET    | `/v1/api-tokens` | the API tokens (never their secrets)                        |
//! | POST   | `/v1/api-tokens` | a new API token, shown once (`name=`, `role=admin\|operator\|viewer`) |
//! | DELETE | `/v1/api-tokens/ID` | revokes an API token                                    |
//! | GET    | `/v1/audit`   | the newest changes made through the API (`limit=N`)           |
//! | GET    | `/v1/jobs`    | at a configuration server: the changes to items run through it, newest first, with their steps (`limit=N`) |
//! | GET    | `/v1/jobs/ID` | one job                                                        |
//! | GET    | `/v1/plans` | at a configuration server: the pipeline's recovery plans            |
//! | POST   | `/v1/plans/NAME/failover` | runs a plan as a job (`planned=true` or `point=ID\|latest`); also `test-failover`, `cleanup`, `commit` (operator) |
//! | POST   | `/v1/plans/NAME/resume` | resumes a plan waiting at a manual step (operator)   |
//! | POST   | `/v1/plans/NAME/reprotect` | reprotects the plan's failed-over machines, as a job (operator); also `failback` |
//! | POST   | `/v1/groups/NAME/reprotect` | the same for a group; also `failback`             |
//! | POST   | `/v1/machines/NAME/reprotect` | the same for one machine, agents and disks found by the server; also `failback` |
//! | GET    | `/v1/platforms` | at a configuration server: the pipeline's adapters, what they checked and saw |
//! | GET    | `/v1/platforms/NAME/machines` | the machines an adapter saw at its last inventory |
//! | POST   | `/v1/platforms/NAME/refresh` | checks an adapter and takes its inventory now (operator) |
//! | GET    | `/v1/secrets` | the secrets `secret:NAME` settings refer to (names only; admin) |
//! | PUT    | `/v1/secrets/NAME` | sets a secret from the body (admin)                    |
//! | DELETE | `/v1/secrets/NAME` | deletes a secret (admin)                               |
//!
//! `ITEM` is one path segment: a machine name, an agent id (or a unique prefix of 6+ hex
//! digits), or `MACHINE%2FDISK`. Errors are `{"error": "..."}` with 404 (unknown item, point
//! or endpoint; a gateway without the role or the site CA the path needs), 405 (a method the
//! path does not take; under `/v1/items` and at `/v1/agents/ID/revoke` that is a 404 "no such
//! endpoint"), 409 (not possible in the item's state), 400 (bad argument), 503 (the source
//! cannot be reached), 500 (a failure here).
//!
//! Routes and their description are written once: each handler's `#[utoipa::path]` states its
//! method, path, parameters and answers, and [`router`] registers the handlers through
//! `utoipa_axum::routes!`, which takes method and path from that attribute. The router and the
//! OpenAPI document are built from that one list, so neither has a route the other lacks; query
//! parameters are read into the structs that describe them, and answers are the engine's own
//! types (`utoipa::ToSchema`).
//!
//! Every route but `/v1/openapi.json` needs an API token with a role ([`auth`]): `viewer`
//! reads, `operator` also takes points and fails over, `admin` also mints enrollment tokens,
//! revokes agents, manages API tokens and reads the audit log. The API speaks plain HTTP: bind
//! it beyond loopback only behind TLS.
//!
//! Architecture invariant: this is the only crate with an HTTP server.

pub mod auth;
pub mod console;
pub mod deployment;
mod groups;
mod https;
mod machines;
mod plans;
mod platforms;
mod reprotect;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use haven_engine::config_server::{ConfigServer, GatewayView};
use haven_engine::master_target::MasterTarget;
use haven_engine::recovery::{
    ErrorKind, ItemInfo, ItemRecord, PointInfo, PointKind, PointRecord, PointSel, RecoveryError,
    SeedRecord, SeedSpec, TestFailoverInfo,
};
use haven_engine::status::GatewayStatus;
use haven_net::SiteCa;
use haven_net::rustls;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, prometheus_text,
};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
    /// API tokens and the audit log. `None` serves every call to anyone (tests, and the
    /// routes a configuration server's forwarded calls run through).
    pub auth: Option<Arc<auth::Auth>>,
    /// The configuration-server role: joined gateways; items are forwarded to the master
    /// target holding them when this gateway is none.
    pub deployment: Option<Arc<ConfigServer>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").finish_non_exhaustive()
    }
}

/// Binds `addr` and serves the API until the task is dropped: over HTTPS with `tls` (see
/// [`haven_net::tls::api_server_config`]), else plain HTTP. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    api: Api,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    if let Some(cs) = &api.deployment {
        tokio::spawn(groups::take_on_interval(Arc::downgrade(cs)));
        tokio::spawn(machines::app_points_on_interval(Arc::downgrade(cs)));
        tokio::spawn(plans::resume_interrupted(cs.clone()));
    }
    let router = router(api)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for the API on {addr}"))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, https = tls.is_some(), "API listening");
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    let task = tokio::spawn(async move {
        // Either waits out a failed accept (out of descriptors) and goes on; it never returns.
        let served = match tls {
            Some(config) => {
                use axum::serve::ListenerExt;
                // `tap_io` only so that axum hands the peer's address to the handlers.
                let listener = https::Listener::new(listener, config).tap_io(|_| ());
                axum::serve(listener, service).await
            }
            None => axum::serve(listener, service).await,
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "API stopped");
        }
    });
    Ok((local, task))
}

/// The description the routes add their paths to.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Haven gateway API",
        description = "A gateway's status, metrics, enrollment tokens and agents; at a master \
                       target, protected items, recovery points and failover. Every route but \
                       this document needs `Authorization: Bearer <API token>`; the token's \
                       role (viewer < operator < admin) decides what it may do. Errors are \
                       `{\"error\": \"...\"}`: 401 without a valid token, 403 when its role \
                       is too small."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "gateway", description = "The roles' status, metrics and this document"),
        (name = "enrollment", description = "Enrollment tokens and the agents this site's CA enrolled"),
        (name = "recovery", description = "At a master target: protected items, recovery points, test failover and failover"),
        (name = "access", description = "API tokens and the audit log (admin)"),
        (name = "deployment", description = "At a configuration server: the gateways joined to it"),
    )
)]
struct ApiDoc;

/// Declares the bearer-token scheme every route (but the document) requires.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("hvt_<id>_<secret>")
                        .build(),
                ),
            );
    }
}

/// The routes, and the OpenAPI document made from the same list.
fn router(api: Api) -> Result<axum::Router> {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(status))
        .routes(routes!(create_token))
        .routes(routes!(list_agents))
        .routes(routes!(revoke_agent))
        .routes(routes!(get_metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(site_ca))
        .routes(routes!(whoami))
        .routes(routes!(list_gateways))
        .routes(routes!(
            deployment::get_pipeline,
            deployment::apply_pipeline
        ))
        .routes(routes!(deployment::list_events))
        .routes(routes!(deployment::list_jobs))
        .routes(routes!(deployment::get_job))
        .routes(routes!(list_items))
        .routes(routes!(get_item))
        .routes(routes!(list_points, create_point))
        .routes(routes!(start_test_failover, end_test_failover))
        .routes(routes!(fail_over))
        .routes(routes!(commit))
        .routes(routes!(reprotect))
        .routes(routes!(list_seeds, add_seed))
        .routes(routes!(groups::take_group_point))
        .routes(routes!(
            groups::list_group_points,
            groups::create_group_point
        ))
        .routes(routes!(list_api_tokens, create_api_token))
        .routes(routes!(revoke_api_token))
        .routes(routes!(get_audit))
        .routes(routes!(plans::list_plans))
        .routes(routes!(plans::failover_plan))
        .routes(routes!(plans::test_failover_plan))
        .routes(routes!(plans::cleanup_plan))
        .routes(routes!(plans::commit_plan))
        .routes(routes!(plans::resume_plan))
        .routes(routes!(plans::reprotect_plan))
        .routes(routes!(plans::failback_plan))
        .routes(routes!(plans::reprotect_group))
        .routes(routes!(plans::failback_group))
        .routes(routes!(plans::reprotect_machine))
        .routes(routes!(plans::failback_machine))
        .routes(routes!(platforms::list_platforms))
        .routes(routes!(platforms::platform_machines))
        .routes(routes!(platforms::refresh_platform))
        .routes(routes!(platforms::list_secrets))
        .routes(routes!(platforms::put_secret, platforms::delete_secret))
        .split_for_parts();
    let openapi = doc
        .to_pretty_json()
        .context("rendering the API's OpenAPI document")?;
    let access = api.auth.clone();
    let forwarding = match (&api.deployment, &api.recovery) {
        (Some(cs), None) => Some(cs.clone()),
        _ => None,
    };
    // The web console: plain routes, not API, so not in the document.
    let router = router
        .merge(console::routes())
        .fallback(no_such_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(Served {
            api,
            openapi: Bytes::from(openapi),
        });
    // Layers run outside in: authorization first, then forwarding.
    let router = match forwarding {
        Some(cs) => router.layer(axum::middleware::from_fn_with_state(
            cs,
            deployment::forward_items,
        )),
        None => router,
    };
    Ok(match access {
        Some(a) => router.layer(axum::middleware::from_fn_with_state(a, auth::authorize)),
        None => router,
    })
}

/// The routes without tokens, for the calls a configuration server forwards to this gateway.
pub fn local_routes(api: Api) -> Result<deployment::LocalRoutes> {
    router(Api { auth: None, ..api }).map(deployment::LocalRoutes)
}

/// What the handlers share.
#[derive(Clone)]
struct Served {
    api: Api,
    /// `/v1/openapi.json`, rendered once.
    openapi: Bytes,
}

// ---- Answers ----

/// An answer other than success: `{"error": MESSAGE}` with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

/// The body of every error answer.
#[derive(Serialize, ToSchema)]
struct ErrorBody {
    /// What happened and what to do.
    error: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
        };
        json_response(self.status, serde_json::to_vec(&body))
    }
}

/// An unexpected failure (a store that cannot be read): 500 with the whole chain.
impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        ApiError::internal(format!("{e:#}"))
    }
}

impl From<RecoveryError> for ApiError {
    fn from(e: RecoveryError) -> ApiError {
        let status = match e.kind {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.message)
    }
}

/// A JSON answer, indented (the status and the recovery answers).
struct Pretty<T>(T);

/// A JSON answer on one line (the enrollment answers).
struct Compact<T>(T);

impl<T: Serialize> IntoResponse for Pretty<T> {
    fn into_response(self) -> Response {
        json_response(StatusCode::OK, serde_json::to_vec_pretty(&self.0))
    }
}

impl<T: Serialize> IntoResponse for Compact<T> {
    fn into_response(self) -> Response {
        json_response(StatusCode::OK, serde_json::to_vec(&self.0))
    }
}

/// `body` as `application/json` (with a length: clients read to the end of the connection and
/// do not undo chunking), or a 500 naming why it could not be written.
fn json_response(status: StatusCode, body: serde_json::Result<Vec<u8>>) -> Response {
    match body {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => {
            ApiError::internal(format!("cannot write the answer as JSON: {e}")).into_response()
        }
    }
}

// ---- Extractors: each refusal is an `ApiError` ----

/// The master target, or 404 at a gateway without the role. Listed first among a handler's
/// arguments, so such a gateway says so whatever else is wrong with the request.
struct Target(Arc<MasterTarget>);

impl FromRequestParts<Served> for Target {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, s: &Served) -> Result<Self, ApiError> {
        s.api
            .recovery
            .clone()
            .map(Target)
            .ok_or_else(not_master_target)
    }
}

fn not_master_target() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "this gateway is not a master target: items, points and failover live at the \
         secondary site's gateway",
    )
}

/// The site CA, or 404 at a gateway without one. Listed first among a handler's arguments.
struct Authority(Arc<Mutex<SiteCa>>);

impl FromRequestParts<Served> for Authority {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, s: &Served) -> Result<Self, ApiError> {
        s.api.ca.clone().map(Authority).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "this gateway has no site CA; run `haven-gateway init` for its data folder",
            )
        })
    }
}

fn lock(ca: &Mutex<SiteCa>) -> std::sync::MutexGuard<'_, SiteCa> {
    ca.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`Path`] (percent-decoded segments) refusing with an [`ApiError`].
struct PathParams<T>(T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(PathParams(v)),
            Err(e) => Err(ApiError::new(e.status(), e.body_text())),
        }
    }
}

/// [`Query`] refusing with an [`ApiError`].
struct QueryParams<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(QueryParams(v)),
            Err(e) => Err(ApiError::new(e.status(), e.body_text())),
        }
    }
}

// ---- Gateway ----

#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "gateway",
    responses(
        (status = OK, description = "The roles this gateway runs and their state", body = GatewayStatus),
        (status = INTERNAL_SERVER_ERROR, description = "The status could not be written", body = ErrorBody),
    )
)]
async fn status(State(s): State<Served>) -> Pretty<GatewayStatus> {
    Pretty((s.api.status)())
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "gateway",
    responses(
        (
            status = OK,
            description = "Prometheus text: replication lag and RPO in seconds, lag, cache and \
                           journal in bytes, bytes received, stored and applied",
            body = String,
            content_type = prometheus_text::CONTENT_TYPE,
        ),
    )
)]
async fn get_metrics(State(s): State<Served>) -> impl IntoResponse {
    let events = s
        .api
        .deployment
        .as_ref()
        .map(|cs| cs.event_counts())
        .unwrap_or_default();
    let histograms = s.api.recovery.as_ref().map(|mt| mt.histograms());
    (
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        render_metrics(StatusMetrics((s.api.status)(), events, histograms)),
    )
}

#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "gateway",
    responses(
        (status = OK, description = "This API as an OpenAPI 3.1 document", body = Object, content_type = "application/json"),
    )
)]
async fn openapi_json(State(s): State<Served>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], s.openapi)
}

// ---- Enrollment ----

/// The query of `POST /v1/tokens`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct TokenParams {
    /// How long the token may be used, in whole seconds from 1 to 2592000 (30 days); 3600
    /// when absent.
    #[param(value_type = Option<u64>, minimum = 1, maximum = 2592000)]
    ttl: Option<String>,
    /// Any other parameter, refused by name.
    #[serde(flatten)]
    #[param(ignore)]
    other: std::collections::BTreeMap<String, String>,
}

/// The longest a token may be valid, in seconds.
const MAX_TOKEN_TTL: u64 = 30 * 24 * 3600;

/// A new one-time enrollment token.
#[derive(Serialize, Deserialize, ToSchema)]
struct TokenAnswer {
    /// The token, to give to `haven-agent enroll` (or `haven-gateway enroll`).
    token: String,
    /// How long it may be used, in seconds.
    ttl_seconds: u64,
}

#[utoipa::path(
    post,
    path = "/v1/tokens",
    tag = "enrollment",
    params(TokenParams),
    responses(
        (status = OK, description = "A one-time enrollment token", body = TokenAnswer),
        (status = BAD_REQUEST, description = "A bad `ttl`, or a query parameter other than `ttl`", body = ErrorBody),
        (status = NOT_FOUND, description = "This gateway has no site CA", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The CA could not record the token", body = ErrorBody),
    )
)]
async fn create_token(
    Authority(ca): Authority,
    QueryParams(q): QueryParams<TokenParams>,
) -> Result<Compact<TokenAnswer>, ApiError> {
    if let Some((key, value)) = q.other.iter().next() {
        return Err(ApiError::bad_request(format!(
            "unknown query parameter `{key}={value}`; only ttl=SECONDS is known"
        )));
    }
    let ttl = match q.ttl.as_deref() {
        None => 3600,
        Some(v) => match v.parse::<u64>() {
            Ok(v) if (1..=MAX_TOKEN_TTL).contains(&v) => v,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "ttl={v}: give whole seconds from 1 to {MAX_TOKEN_TTL} (30 days)"
                )));
            }
        },
    };
    let token = lock(&ca)
        .create_token(Duration::from_secs(ttl))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Compact(TokenAnswer {
        token: token.to_string(),
        ttl_seconds: ttl,
    }))
}

/// A certificate this site's CA issued to an agent (or a process server).
#[derive(Serialize, Deserialize, ToSchema)]
struct AgentCert {
    /// The agent's id, as its certificate carries it.
    agent_id: String,
    /// The machine it was enrolled for.
    machine_name: String,
    /// The certificate's serial number, lowercase hex.
    serial: String,
    /// When it was issued, Unix seconds.
    issued_at: u64,
    /// When it expires, Unix seconds.
    not_after: u64,
    /// Whether it is revoked.
    revoked: bool,
    /// At a configuration server, for an agent that asked where to replicate: the process
    /// server it was assigned, how many times it was moved, and whether it said it was
    /// connected there when it last asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    placement: Option<haven_engine::placement::AgentRecord>,
    /// At a configuration server: the certificate is the one a joined gateway enrolled with.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    gateway: bool,
}

#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "enrollment",
    responses(
        (status = OK, description = "Every certificate this site's CA issued to agents", body = Vec<AgentCert>),
        (status = NOT_FOUND, description = "This gateway has no site CA", body = ErrorBody),
    )
)]
async fn list_agents(State(s): State<Served>, Authority(ca): Authority) -> Compact<Vec<AgentCert>> {
    let placed: std::collections::HashMap<String, haven_engine::placement::AgentRecord> = s
        .api
        .deployment
        .as_ref()
        .map(|cs| cs.agents().into_iter().map(|a| (a.id.clone(), a)).collect())
        .unwrap_or_default();
    let gateways: std::collections::HashSet<String> = match s.api.deployment.clone() {
        Some(cs) => blocking(move || cs.gateways())
            .await
            .map(|g| g.into_iter().map(|g| g.record.id).collect())
            .unwrap_or_default(),
        None => Default::default(),
    };
    let ca = lock(&ca);
    let agents = ca
        .issued()
        .iter()
        .filter(|(_, r)| r.kind == "agent")
        .map(|(serial, r)| AgentCert {
            agent_id: r.subject.clone(),
            machine_name: r.names.clone(),
            serial: serial.clone(),
            issued_at: r.issued_at,
            not_after: r.not_after,
            revoked: ca.revoked().iter().any(|x| &x.serial == serial),
            placement: placed.get(&r.subject).cloned(),
            gateway: gateways.contains(&r.subject),
        })
        .collect();
    Compact(agents)
}

/// The site CA's certificate, which a client pins at `haven login`.
#[derive(Serialize, Deserialize, ToSchema)]
struct SiteCaView {
    /// The site's name.
    site: String,
    /// The CA certificate, PEM.
    ca_cert_pem: String,
    /// SHA-256 of the CA certificate (DER), lowercase hex, as `haven-gateway init` printed it.
    fingerprint: String,
}

/// Public, like the certificate chain every TLS handshake shows: a client compares its
/// fingerprint with the one it was given before trusting it.
#[utoipa::path(
    get,
    path = "/v1/ca",
    tag = "gateway",
    security(()),
    responses(
        (status = OK, description = "The site CA's certificate", body = SiteCaView),
        (status = NOT_FOUND, description = "This gateway has no site CA", body = ErrorBody),
    )
)]
async fn site_ca(Authority(ca): Authority) -> Compact<SiteCaView> {
    let ca = lock(&ca);
    Compact(SiteCaView {
        site: ca.site_name().to_string(),
        ca_cert_pem: ca.ca_cert_pem().to_string(),
        fingerprint: ca.ca_fingerprint(),
    })
}

#[utoipa::path(
    get,
    path = "/v1/whoami",
    tag = "access",
    responses(
        (status = OK, description = "The token this call carried", body = auth::Caller),
        (status = NOT_FOUND, description = "This gateway checks no tokens", body = ErrorBody),
    )
)]
async fn whoami(
    caller: Option<axum::Extension<auth::Caller>>,
) -> Result<Compact<auth::Caller>, ApiError> {
    caller
        .map(|axum::Extension(c)| Compact(c))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "this gateway checks no API tokens"))
}

#[utoipa::path(
    get,
    path = "/v1/gateways",
    tag = "deployment",
    responses(
        (status = OK, description = "Every gateway joined to this configuration server, with its health and last status", body = Vec<GatewayView>),
        (status = NOT_FOUND, description = "This gateway is no configuration server", body = ErrorBody),
    )
)]
async fn list_gateways(Deployment(cs): Deployment) -> Result<Pretty<Vec<GatewayView>>, ApiError> {
    Ok(Pretty(blocking(move || cs.gateways()).await?))
}

/// The configuration-server role, or 404 at a gateway without it.
struct Deployment(Arc<ConfigServer>);

impl FromRequestParts<Served> for Deployment {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, s: &Served) -> Result<Self, ApiError> {
        s.api.deployment.clone().map(Deployment).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "this gateway is not a configuration server ([config_server] in its \
                 configuration)",
            )
        })
    }
}

/// What a revocation revoked.
#[derive(Serialize, Deserialize, ToSchema)]
struct Revocation {
    /// The agent.
    agent_id: String,
    /// The serial numbers of its certificates, now in the CRL.
    revoked_serials: Vec<String>,
}

#[utoipa::path(
    post,
    path = "/v1/agents/{id}/revoke",
    tag = "enrollment",
    params(("id" = String, Path, description = "The agent's id, as `GET /v1/agents` lists it")),
    responses(
        (status = OK, description = "Every certificate of the agent is revoked, and its live connections are closed", body = Revocation),
        (status = NOT_FOUND, description = "No such agent was enrolled here, or this gateway has no site CA", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The CA could not record the revocation", body = ErrorBody),
    )
)]
async fn revoke_agent(
    State(s): State<Served>,
    Authority(ca): Authority,
    PathParams(agent_id): PathParams<String>,
) -> Result<Compact<Revocation>, ApiError> {
    let (serials, crl) = {
        let mut ca = lock(&ca);
        let serials: Vec<String> = ca
            .issued()
            .iter()
            .filter(|(_, r)| r.kind == "agent" && r.subject == agent_id)
            .map(|(s, _)| s.clone())
            .collect();
        if serials.is_empty() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no agent {agent_id} was enrolled here; see GET /v1/agents"),
            ));
        }
        for serial in &serials {
            ca.revoke(serial)
                .map_err(|e| ApiError::internal(e.to_string()))?;
        }
        let crl = ca
            .crl_pem()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        (serials, crl)
    };
    if let Some(f) = &s.api.on_revoke {
        f(vec![crl], &agent_id);
    }
    tracing::info!(agent = %agent_id, ?serials, "agent revoked");
    Ok(Compact(Revocation {
        agent_id,
        revoked_serials: serials,
    }))
}

// ---- Recovery, at a master target ----

/// The item a `/v1/items/ITEM…` path names.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct ItemPath {
    /// A machine name, an agent id (or a unique prefix of 6+ hex digits), or
    /// `MACHINE%2FDISK`: one path segment, percent-encoded.
    item: String,
}

/// The query of `POST /v1/items/ITEM/points`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PointParams {
    /// `crash` (the default) or `app` (the workload quiesced by the agent's hooks, and through
    /// a configuration server by the machine's platform too).
    #[param(value_type = Option<PointKind>, inline)]
    kind: Option<String>,
    /// The machine's platform has quiesced it for this point (a configuration server sets it
    /// around its adapter's `quiesce`): an `app` point needs no hooks of the agent's own
    /// (`quiesced` alone is `true`; the default is `false`).
    #[param(value_type = Option<bool>)]
    quiesced: Option<String>,
}

/// The query of `POST /v1/items/ITEM/test-failover`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct TestFailoverParams {
    /// A point id, or `latest` (the default).
    point: Option<String>,
    /// Accept writes, into a scratch overlay discarded at the end (`writable` alone is
    /// `true`; the default is `false`).
    #[param(value_type = Option<bool>)]
    writable: Option<String>,
    /// Also present each disk as files a platform can use (a VMDK descriptor and its flat
    /// extent, or a raw file) below the writer's storage root (`files` alone is `true`; the
    /// default is `false`).
    #[param(value_type = Option<bool>)]
    files: Option<String>,
}

/// The query of `POST /v1/items/ITEM/failover`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct FailoverParams {
    /// A point id, or `latest` (the default). Ignored when `planned`.
    point: Option<String>,
    /// Stop the source, take a final point and fail over to it (`planned` alone is `true`;
    /// the default is `false`).
    #[param(value_type = Option<bool>)]
    planned: Option<String>,
    /// Write the point into the replica itself instead of a new image (failback onto the disk
    /// the machine left: the seed of a reprotect); the points before it are dropped
    /// (`in_place` alone is `true`; the default is `false`).
    #[param(value_type = Option<bool>)]
    in_place: Option<String>,
}

/// `point=ID|latest`, `latest` when absent.
fn point(value: Option<&str>) -> Result<PointSel, ApiError> {
    Ok(value.unwrap_or("latest").parse()?)
}

/// `KEY=true|false`, or `KEY` alone for `true`; `false` when absent.
fn flag(key: &str, value: Option<&str>) -> Result<bool, ApiError> {
    match value {
        None | Some("false") => Ok(false),
        Some("true" | "") => Ok(true),
        Some(v) => Err(ApiError::bad_request(format!(
            "{key}={v:?}: use true or false"
        ))),
    }
}

/// Runs a call that does blocking work (plugins, files, redb) on the blocking pool.
async fn blocking<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
    call: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(call).await {
        Ok(answer) => answer.map_err(Into::into),
        Err(e) => Err(ApiError::internal(format!(
            "the request's task failed: {e}"
        ))),
    }
}

#[utoipa::path(
    get,
    path = "/v1/items",
    tag = "recovery",
    responses(
        (status = OK, description = "The protected items, with their failover state", body = Vec<ItemInfo>),
        (status = NOT_FOUND, description = "This gateway is not a master target", body = ErrorBody),
    )
)]
async fn list_items(Target(mt): Target) -> Pretty<Vec<ItemInfo>> {
    Pretty(mt.items())
}

#[utoipa::path(
    get,
    path = "/v1/items/{item}",
    tag = "recovery",
    params(ItemPath),
    responses(
        (status = OK, description = "The item, with its state history", body = ItemInfo),
        (status = BAD_REQUEST, description = "The prefix matches several items", body = ErrorBody),
        (status = NOT_FOUND, description = "No such item, or this gateway is not a master target", body = ErrorBody),
    )
)]
async fn get_item(
    Target(mt): Target,
    PathParams(p): PathParams<ItemPath>,
) -> Result<Pretty<ItemInfo>, ApiError> {
    Ok(Pretty(mt.item(&p.item)?))
}

#[utoipa::path(
    get,
    path = "/v1/items/{item}/points",
    tag = "recovery",
    params(ItemPath),
    responses(
        (status = OK, description = "The item's recovery points, oldest first", body = Vec<PointInfo>),
        (status = BAD_REQUEST, description = "The prefix matches several items", body = ErrorBody),
        (status = NOT_FOUND, description = "No such item, or this gateway is not a master target", body = ErrorBody),
    )
)]
async fn list_points(
    Target(mt): Target,
    PathParams(p): PathParams<ItemPath>,
) -> Result<Pretty<Vec<PointInfo>>, ApiError> {
    Ok(Pretty(mt.points(&p.item)?))
}

#[utoipa::path(
    post,
    path = "/v1/items/{item}/points",
    tag = "recovery",
    params(ItemPath, PointParams),
    responses(
        (status = OK, description = "The point, once its tag is durable here", body = PointRecord),
        (status = BAD_REQUEST, description = "A bad `kind`, or the prefix matches several items", body = ErrorBody),
        (status = NOT_FOUND, description = "No such item, or this gateway is not a master target", body = ErrorBody),
        (status = CONFLICT, description = "The item is failed over: no points are taken", body = ErrorBody),
        (status = SERVICE_UNAVAILABLE, description = "The source agent cannot be reached, or its point did not arrive", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The point could not be recorded", body = ErrorBody),
        (status = BAD_GATEWAY, description = "Through a configuration server, an `app` point of a machine on a platform: the platform could not quiesce it (no point is taken)", body = ErrorBody),
    )
)]
async fn create_point(
    Target(mt): Target,
    PathParams(p): PathParams<ItemPath>,
    QueryParams(q): QueryParams<PointParams>,
) -> Result<Pretty<PointRecord>, ApiError> {
    let app = match q.kind.as_deref().unwrap_or("crash") {
        "crash" => false,
        "app" => true,
        other => {
            return Err(ApiError::bad_request(format!(
                "kind {other:?}: use crash or app"
            )));
        }
    };
    let quiesced = flag("quiesced", q.quiesced.as_deref())?;
    Ok(Pretty(mt.create_point(&p.item, app, quiesced).await?))
}

#[utoipa::path(
    post,
    path = "/v1/items/{item}/test-failover",
    tag = "recovery",
    params(ItemPath, TestFailoverParams),
    responses(
        (status = OK, description = "The point is exported over NBD", body = TestFailoverInfo),
        (status = BAD_REQUEST, description = "A bad `point` or `writable`, or the prefix matches several items", body = ErrorBody),
        (status = NOT_FOUND, description = "No such item or point, or this gateway is not a master target", body = ErrorBody),
        (status = CONFLICT, description = "Not possible in the item's state (a test failover or a failover runs)", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The export could not be started", body = ErrorBody),
    )
)]
async fn start_test_failover(
    Target(mt): Target,
    PathParams(p): PathParams<ItemPath>,
    QueryParams(q): QueryParams<TestFailoverParams>,
) -> Result<Pretty<TestFailoverInfo>, ApiError> {
    let sel = point(q.point.as_deref())?;
    let writable = flag("writable", q.writable.as_deref())?;
    let files = flag("files", q.files.as_deref())?;
    // Plugin calls, files and redb commits: off the async workers.
    Ok(Pretty(
        blocking(move || mt.test_failover(&p.item, sel, writable, files)).await?,
    ))
}

#[utoipa::path(
    delete,
    path = "/v1/items/{item}/test-failover",
    tag = "recovery",
    params(ItemPath),
    responses(
        (status = OK, description = "The test failover that ended; its writes are discarded", body = TestFailoverInfo),
        (status = BAD_REQUEST, description = "The prefix matches several items", body = ErrorBody),
        (status = NOT_FOUND, description = "No such item, or this gateway is not a master target", body = ErrorBody),
        (status = CONFLICT, description = "The item has no test failover to clean up", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The export could not be removed", body = ErrorBody),
        (status = BAD_GATEWAY, description = "Through a configuration server: the machine the test failover defined could not be deleted at its platform (the test failover is kept)", body = ErrorBody),
    )
)]
async fn end_test_failover(
    Target(mt): Target,
    PathParams(p): PathParams<ItemPath>,
) -> Result<Pretty<TestFailoverInfo>, ApiError> {
    // It also waits for the export's connections to end.
    Ok(Pretty(blocking(move || mt.cleanup_test(&p.item)).await?))
}

#[utoipa::path(
    post,
    path = "/v1/items/{item}/failover",
    tag = "recovery",
    params(ItemPath, FailoverParams),
    responses(
        (status = OK, description = "Materialising the point started", body = ItemRecord),
        (status = BAD_REQUEST, description = "A bad `point` or `planned`, or the prefix matches several items", body = ErrorBody),
        (status = NOT_FOUND, description = "No such item or point, or this gateway is not a master target", body = ErrorBody),
        (status = CONFLICT, description = "Not possible in the item's state", body = ErrorBody),
        (status = SERVICE_UNAVAILABLE, description = "Planned: the source cannot be reached to stop it", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The failover could not be started", body = ErrorBody),
    )
)]
async fn fail_over(
    Target(mt): Target,
    PathParams(p): PathParams<ItemPath>,
    QueryParams(q): QueryParams<FailoverParams>,
) -> Result<Pretty<ItemRecord>, ApiError> {
    let sel = point(q.point.as_deref())?;
    let planned = flag("planned", q.planned.as_deref())?;
    let in_place = flag("in_place", q.in_place.as_deref())?;
    Ok(Pretty(mt.failover(&p.item, sel, planned, in_place).await?))
}

#[utoipa::path(
    post,
    path = "/v1/items/{item}/commit",
    tag = "recovery",
    params(ItemPath),
    responses(
        (status = OK, description = "The failover is final; the other points are gone", body = ItemRecord),
        (status = BAD_REQUEST, description = "The prefix matches several items", body = ErrorBody),
        (status = NOT_FOUND, description = "No such item, or this gateway is not a master target", body = ErrorBody),
        (status = CONFLICT, description = "The item is not failed over", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The commit could not be recorded", body = ErrorBody),
    )
)]
async fn commit(
    Target(mt): Target,
    PathParams(p): PathParams<ItemPath>,
) -> Result<Pretty<ItemRecord>, ApiError> {
    Ok(Pretty(blocking(move || mt.commit(&p.item)).await?))
}

/// The query of `POST /v1/items/ITEM/reprotect`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ReprotectParams {
    /// Where the machine replicates to now (a gateway, a site: shown in the history).
    to: String,
}

#[utoipa::path(
    post,
    path = "/v1/items/{item}/reprotect",
    tag = "recovery",
    params(ItemPath, ReprotectParams),
    responses(
        (status = OK, description = "The item is reprotected: the machine replicates the other way", body = ItemRecord),
        (status = BAD_REQUEST, description = "No `to`, or the prefix matches several items", body = ErrorBody),
        (status = NOT_FOUND, description = "No such item, or this gateway is not a master target", body = ErrorBody),
        (status = CONFLICT, description = "The item is not failed over", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The reprotect could not be recorded", body = ErrorBody),
    )
)]
async fn reprotect(
    Target(mt): Target,
    PathParams(p): PathParams<ItemPath>,
    QueryParams(q): QueryParams<ReprotectParams>,
) -> Result<Pretty<ItemRecord>, ApiError> {
    if q.to.trim().is_empty() {
        return Err(ApiError::bad_request(
            "to=: name where the machine replicates to now",
        ));
    }
    Ok(Pretty(
        blocking(move || mt.reprotect(&p.item, &q.to)).await?,
    ))
}

#[utoipa::path(
    get,
    path = "/v1/seeds",
    tag = "recovery",
    params(SeedListParams),
    responses(
        (status = OK, description = "Seeds whose streams have not arrived yet", body = Vec<SeedRecord>),
        (status = BAD_REQUEST, description = "A `gateway` at a master target, or none at a configuration server", body = ErrorBody),
        (status = NOT_FOUND, description = "This gateway is not a master target", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The state could not be read", body = ErrorBody),
    )
)]
async fn list_seeds(
    Target(mt): Target,
    QueryParams(q): QueryParams<SeedListParams>,
) -> Result<Pretty<Vec<SeedRecord>>, ApiError> {
    no_gateway_here(q.gateway.as_deref())?;
    Ok(Pretty(blocking(move || mt.seeds()).await?))
}

/// `gateway=` at a master target: it is for a configuration server, which forwards the call
/// without it; here it would record (or list) the seeds of this gateway, maybe not the one
/// meant.
fn no_gateway_here(gateway: Option<&str>) -> Result<(), ApiError> {
    match gateway {
        Some(g) => Err(ApiError::bad_request(format!(
            "gateway={g:?}: this gateway is a master target and keeps its own seeds; name a \
             gateway only at a configuration server, or call that gateway's API directly"
        ))),
        None => Ok(()),
    }
}

/// The query of `POST /v1/seeds`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SeedParams {
    /// The agent that will protect the machine (32 hex digits).
    agent_id: String,
    /// Its disk, from 1.
    #[param(value_type = u32)]
    disk: String,
    /// The existing disk, relative to the writer's storage root.
    path: String,
    /// The machine's name.
    machine_name: String,
    /// Where the machine runs now.
    from: Option<String>,
    /// At a configuration server: the master target (a gateway's name) the seed is for (read
    /// there, by the forwarding layer, which passes the call on without it).
    gateway: Option<String>,
}

/// The query of `GET /v1/seeds`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SeedListParams {
    /// At a configuration server: the master target (a gateway's name) whose seeds to list.
    gateway: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/seeds",
    tag = "recovery",
    params(SeedParams),
    responses(
        (status = OK, description = "The seed is recorded: the agent's stream will replicate onto the disk", body = SeedRecord),
        (status = BAD_REQUEST, description = "A bad agent id, disk or path; a `gateway` at a master target, or none at a configuration server", body = ErrorBody),
        (status = NOT_FOUND, description = "No such disk below the storage root, or this gateway is not a master target", body = ErrorBody),
        (status = CONFLICT, description = "The agent's disk replicates here already", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The seed could not be recorded", body = ErrorBody),
    )
)]
async fn add_seed(
    Target(mt): Target,
    QueryParams(q): QueryParams<SeedParams>,
) -> Result<Pretty<SeedRecord>, ApiError> {
    no_gateway_here(q.gateway.as_deref())?;
    let disk = q.disk.parse::<u32>().map_err(|_| {
        ApiError::bad_request(format!("disk={:?}: give the disk's number, from 1", q.disk))
    })?;
    let spec = SeedSpec {
        agent_id: q.agent_id,
        disk,
        path: q.path,
        machine_name: q.machine_name,
        from: q.from.unwrap_or_default(),
    };
    Ok(Pretty(blocking(move || mt.add_seed(spec)).await?))
}

// ---- Paths and methods no route takes ----

/// A path no route has.
async fn no_such_endpoint(State(s): State<Served>, method: Method, uri: Uri) -> ApiError {
    match items_rest(uri.path()) {
        Some(rest) => no_such_item_endpoint(&s.api, &method, rest),
        None => endpoint_not_found(uri.path()),
    }
}

/// A method the path's route does not take: 405, but a 404 "no such endpoint" under
/// `/v1/items` and at `/v1/agents/ID/revoke`, as these paths have always answered.
async fn method_not_allowed(State(s): State<Served>, method: Method, uri: Uri) -> ApiError {
    let path = uri.path();
    if let Some(rest) = items_rest(path) {
        return no_such_item_endpoint(&s.api, &method, rest);
    }
    if path.starts_with("/v1/agents/") {
        return endpoint_not_found(path);
    }
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

/// The part of a `/v1/items…` path after `/v1/items/`.
fn items_rest(path: &str) -> Option<&str> {
    if path == "/v1/items" {
        return Some("");
    }
    path.strip_prefix("/v1/items/")
}

fn no_such_item_endpoint(api: &Api, method: &Method, rest: &str) -> ApiError {
    if api.recovery.is_none() {
        return not_master_target();
    }
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint {method} /v1/items/{rest}; see the API table in the README"),
    )
}

fn endpoint_not_found(path: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no such endpoint {path}; see /v1/status, /v1/tokens, /v1/agents, /metrics, \
             /v1/openapi.json"
        ),
    )
}

// ---- Metrics ----

/// Prometheus text exposition (format 0.0.4) of `status`. Units are in the metric names.
pub fn metrics(status: &GatewayStatus) -> String {
    render_metrics(StatusMetrics(status.clone(), Default::default(), None))
}

fn render_metrics(collector: StatusMetrics) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    if let Err(e) = prometheus_text::encode(&mut out, &registry) {
        // Writing to a String does not fail; an encoder refusing a sample would land here.
        tracing::error!(error = %e, "cannot write the metrics");
    }
    out
}

/// A disk's labels on every sample.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabels {
    agent: String,
    machine: String,
    disk: u32,
}

impl DiskLabels {
    fn new(agent: &str, machine: &str, disk: u32) -> DiskLabels {
        DiskLabels {
            agent: agent.to_string(),
            machine: machine.to_string(),
            disk,
        }
    }
}

/// One status snapshot as constant metrics, read when scraped: the samples of each metric in
/// the status's order of disks and replicas.
#[derive(Debug)]
struct StatusMetrics(
    GatewayStatus,
    /// At a configuration server: events raised since it started, by kind and severity.
    std::collections::BTreeMap<(String, haven_engine::events::Severity), u64>,
    /// At a master target: apply latency and RPO over time.
    Option<Arc<haven_engine::metrics::Histograms>>,
);

/// An event count's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    kind: String,
    severity: String,
}

impl Collector for StatusMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let e = &mut encoder;
        if let Some(ps) = &self.0.process_server {
            let disks = || {
                ps.disks
                    .iter()
                    .map(|d| (DiskLabels::new(&d.agent_id, &d.machine_name, d.disk), d))
            };
            family(
                e,
                "haven_cache",
                Unit::Bytes,
                "Bytes the process server's cache holds for a disk.",
                disks().map(|(l, d)| (l, ConstGauge::new(d.cache_bytes))),
            )?;
            family(
                e,
                "haven_received",
                Unit::Bytes,
                "Bytes of disk extent received from agents.",
                disks().map(|(l, d)| (l, ConstCounter::new(d.received_bytes_total))),
            )?;
            family(
                e,
                "haven_cache_stored",
                Unit::Bytes,
                "Bytes stored in the cache after compression.",
                disks().map(|(l, d)| (l, ConstCounter::new(d.stored_bytes_total))),
            )?;
        }
        if let Some(mt) = &self.0.master_target {
            let replicas = || {
                mt.replicas
                    .iter()
                    .map(|r| (DiskLabels::new(&r.agent_id, &r.machine_name, r.disk), r))
            };
            family(
                e,
                "haven_replication_lag",
                Unit::Seconds,
                "Age of the oldest journaled record in no recovery point yet (without points: \
                 not yet applied to the replica), counted from its arrival at the master target.",
                replicas().map(|(l, r)| (l, ConstGauge::new(r.lag_seconds))),
            )?;
            family(
                e,
                "haven_rpo",
                Unit::Seconds,
                "Recovery point objective achieved now: how far back a failover now would go \
                 (absent before the first point and once failed over).",
                replicas().filter_map(|(l, r)| Some((l, ConstGauge::new(r.rpo_seconds?)))),
            )?;
            family(
                e,
                "haven_replication_lag",
                Unit::Bytes,
                "Bytes of extent journaled and in no recovery point yet (without points: not \
                 yet applied to the replica).",
                replicas().map(|(l, r)| (l, ConstGauge::new(r.lag_bytes))),
            )?;
            family(
                e,
                "haven_applied",
                Unit::Bytes,
                "Bytes of extent applied to the replica.",
                replicas().map(|(l, r)| (l, ConstCounter::new(r.applied_bytes_total))),
            )?;
            family(
                e,
                "haven_journal",
                Unit::Bytes,
                "Bytes the master target's journal holds for a disk.",
                replicas().map(|(l, r)| (l, ConstGauge::new(r.journal_bytes))),
            )?;
        }
        if let Some(h) = &self.2 {
            use prometheus_client::metrics::histogram::Histogram;
            let metric = e.encode_descriptor(
                "haven_apply_latency",
                "Time from a record's arrival at the master target (journaled) to its \
                 application to the replica.",
                Some(&Unit::Seconds),
                Histogram::TYPE,
            )?;
            h.apply_latency.encode(metric)?;
            let metric = e.encode_descriptor(
                "haven_rpo_sampled",
                "Every replica's recovery point objective, sampled once a second.",
                Some(&Unit::Seconds),
                Histogram::TYPE,
            )?;
            h.rpo.encode(metric)?;
        }
        if self.0.config_server.is_some() {
            let mut metric = e.encode_descriptor(
                "haven_events",
                "Events raised by the configuration server since it started, by kind and \
                 severity.",
                None,
                ConstCounter::<u64>::TYPE,
            )?;
            for ((kind, severity), n) in &self.1 {
                let labels = EventLabels {
                    kind: kind.clone(),
                    severity: severity.name().to_string(),
                };
                ConstCounter::new(*n).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// One metric: `name` with `unit` appended (and `_total` for a counter), its help and type,
/// then a sample per disk.
fn family<M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    unit: Unit,
    help: &str,
    samples: impl Iterator<Item = (DiskLabels, M)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, Some(&unit), M::TYPE)?;
    for (labels, sample) in samples {
        sample.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

// ---- Access: API tokens and the audit log ----

/// The API's tokens and audit log, or 404 at a gateway serving without them.
struct Access(Arc<auth::Auth>);

impl FromRequestParts<Served> for Access {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, s: &Served) -> Result<Self, ApiError> {
        s.api.auth.clone().map(Access).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "this API serves without tokens (a test setup): nothing to manage",
            )
        })
    }
}

#[utoipa::path(
    get,
    path = "/v1/api-tokens",
    tag = "access",
    responses(
        (status = OK, description = "Every API token of this gateway, revoked ones too", body = Vec<auth::TokenView>),
        (status = NOT_FOUND, description = "The API serves without tokens", body = ErrorBody),
    )
)]
async fn list_api_tokens(Access(a): Access) -> Pretty<Vec<auth::TokenView>> {
    Pretty(
        a.tokens()
            .list()
            .iter()
            .map(auth::TokenView::from)
            .collect(),
    )
}

/// Query of `POST /v1/api-tokens`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct NewApiToken {
    /// What the token is for: 1 to 64 letters, digits, `-`, `_`, `.` or `@`.
    name: String,
    /// `admin`, `operator` or `viewer`.
    role: String,
}

/// A new API token: shown in this answer only.
#[derive(Serialize, ToSchema)]
struct NewApiTokenAnswer {
    /// `hvt_<id>_<secret>`, for `Authorization: Bearer` (the CLI's `HAVEN_TOKEN`).
    token: String,
    info: auth::TokenView,
}

#[utoipa::path(
    post,
    path = "/v1/api-tokens",
    tag = "access",
    params(NewApiToken),
    responses(
        (status = OK, description = "The new token, shown only now", body = NewApiTokenAnswer),
        (status = BAD_REQUEST, description = "A bad name or role", body = ErrorBody),
        (status = NOT_FOUND, description = "The API serves without tokens", body = ErrorBody),
    )
)]
async fn create_api_token(
    Access(a): Access,
    QueryParams(q): QueryParams<NewApiToken>,
) -> Result<Compact<NewApiTokenAnswer>, ApiError> {
    let role: haven_store::tokens::Role = q.role.parse().map_err(ApiError::bad_request)?;
    let name = q.name;
    let (token, info) =
        tokio::task::spawn_blocking(move || a.tokens().create(&name, role, haven_engine::now_ms()))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Compact(NewApiTokenAnswer {
        token,
        info: auth::TokenView::from(&info),
    }))
}

#[utoipa::path(
    delete,
    path = "/v1/api-tokens/{id}",
    tag = "access",
    params(("id" = String, Path, description = "The token's id: 16 hex digits")),
    responses(
        (status = OK, description = "The token, revoked", body = auth::TokenView),
        (status = NOT_FOUND, description = "No such token, or the API serves without tokens", body = ErrorBody),
    )
)]
async fn revoke_api_token(
    Access(a): Access,
    PathParams(id): PathParams<String>,
) -> Result<Compact<auth::TokenView>, ApiError> {
    let revoked =
        tokio::task::spawn_blocking(move || a.tokens().revoke(&id, haven_engine::now_ms()))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, e.to_string()))?;
    Ok(Compact(auth::TokenView::from(&revoked)))
}

/// Query of `GET /v1/audit`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditParams {
    /// How many of the newest entries (default 100, at most 10000).
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "access",
    params(AuditParams),
    responses(
        (status = OK, description = "The newest changes made through the API, oldest first", body = Vec<auth::AuditEntry>),
        (status = BAD_REQUEST, description = "A bad limit", body = ErrorBody),
        (status = NOT_FOUND, description = "The API serves without tokens", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The audit log could not be read", body = ErrorBody),
    )
)]
async fn get_audit(
    Access(a): Access,
    QueryParams(q): QueryParams<AuditParams>,
) -> Result<Pretty<Vec<auth::AuditEntry>>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=auth::AUDIT_MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit={limit}: give 1 to {}",
            auth::AUDIT_MAX_LIMIT
        )));
    }
    tokio::task::spawn_blocking(move || a.audit(limit))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map(Pretty)
        .map_err(|e| ApiError::internal(format!("{e:#}")))
}
