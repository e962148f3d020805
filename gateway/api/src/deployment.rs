//! The configuration server's part of the API: the gateways joined to it, and the calls it
//! forwards to them over their connections (a master target's items, points and failover are
//! reached through the configuration server alone).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use haven_engine::config_server::{ConfigServer, ForwardError};
use haven_engine::events::{Event, Raise, Severity, Webhook};
use haven_engine::jobs::Job;
use haven_net::join::{ApiAnswer, ApiRequest, Assignment, MAX_MESSAGE, MachinePolicy};
use tower::ServiceExt;

use crate::auth::Caller;
use crate::{ApiError, ErrorBody};

/// Forwards `/v1/items…` to the master target holding the item (`GET /v1/items`: to every
/// master target, the lists joined). Runs after authorization: the caller's role was checked
/// here, and the gateway trusts its configuration server.
pub(crate) async fn forward_items(
    axum::extract::State(cs): axum::extract::State<Arc<ConfigServer>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    if path == "/v1/seeds" {
        return forward_seeds(&cs, req).await;
    }
    let rest = match crate::items_rest(&path) {
        Some(rest) => rest.to_string(),
        None => return next.run(req).await,
    };
    let method = req.method().clone();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_string());
    let caller = req
        .extensions()
        .get::<Caller>()
        .map_or_else(String::new, Caller::label);
    let request = ApiRequest {
        method: method.to_string(),
        path: target,
        caller,
    };
    if rest.is_empty() {
        if method != Method::GET {
            return next.run(req).await;
        }
        return every_item(&cs, request).await.into_response();
    }
    // One path segment: a machine name, an agent id (or a prefix), or `MACHINE%2FDISK`.
    let item = percent_encoding::percent_decode_str(rest.split('/').next().unwrap_or_default())
        .decode_utf8_lossy()
        .into_owned();
    let action = rest.split('/').nth(1).unwrap_or_default().to_string();
    let machine = item.split('/').next().unwrap_or_default();
    match cs.master_target_of(machine) {
        // A change: run as a job, kept with its outcome.
        Some(gateway) if method != Method::GET && method != Method::HEAD => {
            let change = ItemChange {
                gateway,
                item,
                action,
                method,
                request,
            };
            // Run to its end even when the caller goes away: a quiesced machine is thawed, a
            // job is ended.
            let cs = cs.clone();
            match tokio::spawn(async move { item_change(&cs, change).await }).await {
                Ok(response) => response,
                Err(e) => ApiError::internal(format!("the change stopped: {e}")).into_response(),
            }
        }
        Some(gateway) => match cs.forward(&gateway, request.clone()).await {
            Ok(answer) => answer_response(answer),
            Err(e) => forward_error(e).into_response(),
        },
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no master target joined to this configuration server holds item `{item}` \
                 (a machine name or agent id); `haven status` lists the items"
            ),
        )
        .into_response(),
    }
}

/// `/v1/seeds?gateway=NAME…` at a configuration server: to master target `NAME` (a reprotect
/// records there the disk a machine left), without the `gateway` parameter.
async fn forward_seeds(cs: &ConfigServer, req: Request) -> Response {
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/v1/seeds".to_string(), |p| p.as_str().to_string());
    let gateway = req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "gateway")
            .map(|(_, v)| {
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned()
            })
    });
    let Some(gateway) = gateway.filter(|g| !g.is_empty()) else {
        return ApiError::bad_request(
            "at a configuration server, name the master target the seed is for: gateway=NAME \
             (`haven status` lists the gateways)",
        )
        .into_response();
    };
    let request = ApiRequest {
        method: req.method().to_string(),
        path: crate::machines::without_param(&target, "gateway"),
        caller: req
            .extensions()
            .get::<Caller>()
            .map_or_else(String::new, Caller::label),
    };
    match cs.forward(&gateway, request).await {
        Ok(answer) => answer_response(answer),
        Err(e) => forward_error(e).into_response(),
    }
}

/// A change to an item (`POST`, `DELETE` below `/v1/items/ITEM`), for the master target
/// holding it.
pub(crate) struct ItemChange {
    pub gateway: String,
    /// The item as named (a machine, `MACHINE/DISK`, an agent id).
    pub item: String,
    /// What follows the item in the path (`points`, `test-failover`, …).
    pub action: String,
    pub method: Method,
    pub request: ApiRequest,
}

/// Runs a change to an item as a job: the platform's steps before it (a test replica deleted,
/// the machine quiesced), the master target's, then the platform's after it (thawed, the
/// replica defined); the answer is the master target's, with the job's id.
pub(crate) async fn item_change(cs: &Arc<ConfigServer>, change: ItemChange) -> Response {
    let ItemChange {
        gateway,
        item,
        action,
        method,
        mut request,
    } = change;
    let machine = item.split('/').next().unwrap_or_default();
    let platforms = crate::machines::Platforms::of(cs, machine);
    // A test failover of a whole machine that a platform runs: its disks as files too.
    let test_replica = action == "test-failover" && item == machine && platforms.target.is_some();
    if test_replica && method == Method::POST {
        request.path = crate::machines::with_files(&request.path);
    }
    // Only this server says that a platform quiesced the machine.
    if action == "points" {
        request.path = crate::machines::without_param(&request.path, "quiesced");
    }
    // A test failover's cleanup deletes the machine it defined first (whatever the pipeline
    // says now): that machine uses the disks. One disk alone is not cleaned up under it.
    let recorded = if action == "test-failover" && method == Method::DELETE {
        let (cs, machine) = (cs.clone(), machine.to_string());
        match crate::blocking(move || crate::machines::test_replica_recorded(&cs, &machine)).await {
            Ok(recorded) => recorded,
            Err(e) => return e.into_response(),
        }
    } else {
        false
    };
    if recorded && item != machine {
        return ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "the test failover of {machine} defined a machine at its platform, on every \
                 disk: clean the whole machine up (`haven failover cleanup {machine}`)"
            ),
        )
        .into_response();
    }
    let kind = job_kind(&method, &action);
    let step = format!("{method} {} at {gateway}", request.path);
    // An application-consistent point of a machine on a platform: quiesced there.
    let quiesce_at = platforms.source.as_deref().filter(|_| {
        method == Method::POST
            && action == "points"
            && item == machine
            && request
                .path
                .split_once('?')
                .is_some_and(|(_, q)| q.split('&').any(|kv| kv == "kind=app"))
    });
    let first = match (recorded, quiesce_at) {
        (true, _) => format!("delete the test replica of {machine}"),
        (_, Some(_)) => format!("quiesce {machine} at its platform"),
        _ => step.clone(),
    };
    let job = {
        let (cs, item, gateway, caller) = (
            cs.clone(),
            item.clone(),
            gateway.clone(),
            request.caller.clone(),
        );
        crate::blocking(move || {
            cs.start_job(haven_engine::jobs::NewJob {
                kind,
                item: Some(&item),
                gateway: Some(&gateway),
                caller: &caller,
                step: &first,
            })
        })
        .await
    };
    let mut job = match job {
        Ok(job) => job,
        Err(e) => return e.into_response(),
    };
    if recorded {
        let deleted = crate::machines::delete_test_replica(cs, machine)
            .await
            .map(|d| d.unwrap_or_else(|| "none was defined".to_string()));
        job = match first_step(cs, job, &deleted, &step, |why| why).await {
            Ok(job) => job,
            Err(refused) => return refused,
        };
    }
    let mut quiesced = None;
    // One quiesced point of a machine at a time: another's thaw must not end this one's
    // quiesce before its point.
    let _one = match quiesce_at {
        Some(_) => Some(crate::machines::quiesce_lock(machine).lock_owned().await),
        None => None,
    };
    if let Some(platform) = quiesce_at {
        let (q, outcome) = crate::machines::quiesce(cs, platform, machine).await;
        // The agent needs no hooks of its own when the platform quiesced the machine.
        if let Ok((true, _)) = &outcome {
            request.path.push_str("&quiesced=true");
        }
        let outcome = outcome.map(|(_, done)| done);
        if outcome.is_err()
            && let Err(e) = crate::machines::thaw(cs, q.clone()).await
        {
            tracing::warn!(machine, error = %format!("{e:#}"), "thawing after a failed quiesce");
        }
        let why = |why| format!("no application-consistent point of {machine}: {why}");
        job = match first_step(cs, job, &outcome, &step, why).await {
            Ok(job) => job,
            Err(refused) => return refused,
        };
        quiesced = Some(q);
    }
    let id = job.id;
    let forwarded = cs.forward(&gateway, request.clone()).await;
    // The platform thaws the machine as soon as the point is taken (or refused).
    let thawed = match quiesced {
        Some(q) => Some(crate::machines::thaw(cs, q).await),
        None => None,
    };
    let (ok, output, response) = match forwarded {
        Ok(answer) => {
            record_action(cs, &gateway, &item, &method, &action, &request, &answer).await;
            let ok = (200..300).contains(&answer.status);
            let mut output = match ok {
                true => summary(&answer.body),
                false => format!("HTTP {}: {}", answer.status, error_text(&answer.body)),
            };
            match &thawed {
                Some(Ok(done)) if !done.is_empty() => output.push_str(&format!("; {done}")),
                Some(Err(e)) => output.push_str(&format!("; thawing failed: {e:#}")),
                _ => {}
            }
            (ok, output, answer_response(answer))
        }
        Err(e) => {
            let output = e.to_string();
            (false, output, forward_error(e).into_response())
        }
    };
    // A failover of a machine on a platform goes on with the platform's steps; so
    // does a test failover of one that a target platform runs.
    let platform_steps = ok
        && method == Method::POST
        && ((action == "failover" && (platforms.source.is_some() || platforms.target.is_some()))
            || (action == "test-failover" && test_replica));
    let query_has = |flag: &str| {
        request.path.split_once('?').is_some_and(|(_, q)| {
            q.split('&')
                .any(|kv| kv == flag || kv == format!("{flag}=true"))
        })
    };
    let planned = query_has("planned");
    let mode = match action.as_str() {
        "test-failover" => crate::machines::Mode::Test,
        // A failback in place: the replica off, the source machine on.
        _ if query_has("in_place") => crate::machines::Mode::Failback { planned },
        _ => crate::machines::Mode::Failover { planned },
    };
    let ended = {
        let cs = cs.clone();
        crate::blocking(move || cs.end_job_step(job, ok, output, !platform_steps)).await
    };
    match ended {
        Ok(job) if platform_steps => {
            tokio::spawn(crate::machines::run(
                cs.clone(),
                job,
                gateway.clone(),
                item.clone(),
                mode,
            ));
        }
        Ok(_) => {}
        Err(e) => tracing::error!(job = id, error = ?e, "recording a job's outcome"),
    }
    let mut response = response;
    if let Ok(v) = header::HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert("x-haven-job", v);
    }
    response
}

/// Ends the first step of `job` (a platform's, before the master target's) with `outcome`
/// and begins step `next`; when it failed, the job ends and the answer is a 502 saying
/// `why(error)`.
async fn first_step(
    cs: &Arc<ConfigServer>,
    job: haven_engine::jobs::Job,
    outcome: &anyhow::Result<String>,
    next: &str,
    why: impl FnOnce(String) -> String,
) -> Result<haven_engine::jobs::Job, Response> {
    let (ok, output) = match outcome {
        Ok(done) => (true, done.clone()),
        Err(e) => (false, format!("{e:#}")),
    };
    let ended = {
        let (cs, next, output) = (cs.clone(), next.to_string(), output.clone());
        crate::blocking(move || -> anyhow::Result<Option<haven_engine::jobs::Job>> {
            let job = cs.end_job_step(job, ok, output, false)?;
            match ok {
                true => Ok(Some(cs.begin_job_step(job, &next)?)),
                false => Ok(None),
            }
        })
        .await
    };
    match ended {
        Ok(Some(job)) => Ok(job),
        Ok(None) => Err(ApiError::new(StatusCode::BAD_GATEWAY, why(output)).into_response()),
        Err(e) => Err(e.into_response()),
    }
}

/// The kind of job a change to an item is.
fn job_kind(method: &Method, action: &str) -> &'static str {
    match (method.as_str(), action) {
        ("POST", "points") => "point",
        ("POST", "test-failover") => "test-failover",
        ("DELETE", "test-failover") => "test-failover-cleanup",
        ("POST", "failover") => "failover",
        ("POST", "commit") => "commit",
        ("POST", "reprotect") => "reprotect",
        _ => "item-change",
    }
}

/// What an answer's body says, on one line short enough for a job's step (JSON compacted).
pub(crate) fn summary(body: &str) -> String {
    const MOST: usize = 2000;
    let compact = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string(&v).ok());
    let body = compact.as_deref().unwrap_or(body).trim();
    match body.char_indices().nth(MOST) {
        Some((at, _)) => format!("{}…", &body[..at]),
        None => body.to_string(),
    }
}

/// The `error` of an API error body, or the body.
pub(crate) fn error_text(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| summary(body))
}

/// Raises the event of a failover-family action an operator did through this server.
async fn record_action(
    cs: &Arc<ConfigServer>,
    gateway: &str,
    item: &str,
    method: &Method,
    action: &str,
    request: &ApiRequest,
    answer: &ApiAnswer,
) {
    let ok = (200..300).contains(&answer.status);
    let by = if request.caller.is_empty() {
        String::new()
    } else {
        format!(" by {}", request.caller)
    };
    let (severity, kind, text) = match (method.as_str(), action, ok) {
        ("POST", "test-failover", true) => (
            Severity::Info,
            "test-failover.started",
            format!("test failover of {item} started{by}"),
        ),
        ("DELETE", "test-failover", true) => (
            Severity::Info,
            "test-failover.cleaned-up",
            format!("test failover of {item} cleaned up{by}"),
        ),
        ("POST", "failover", true) => (
            Severity::Warning,
            "failover.started",
            format!("failover of {item} started{by}"),
        ),
        ("POST", "failover", false) => (
            Severity::Error,
            "failover.failed",
            format!(
                "failover of {item}{by} refused or failed: HTTP {}: {}",
                answer.status,
                error_text(&answer.body)
            ),
        ),
        ("POST", "commit", true) => (
            Severity::Info,
            "failover.committed",
            format!("failover of {item} committed{by}"),
        ),
        ("POST", "reprotect", true) => (
            Severity::Info,
            "reprotect.started",
            format!("{item} reprotected{by}: it replicates back to the site it left"),
        ),
        _ => return,
    };
    let raise = Raise {
        severity,
        kind,
        gateway: Some(gateway.to_string()),
        item: Some(item.to_string()),
        text,
    };
    let cs = cs.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || cs.raise(raise)).await {
        tracing::error!(error = %format!("{e:#}"), "recording an event");
    }
}

/// The query of `GET /v1/events`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventParams {
    /// Only events after this sequence number, oldest first; without it, the newest `limit`.
    #[param(value_type = Option<u64>)]
    since: Option<String>,
    /// At most this many (default and maximum 1000).
    #[param(value_type = Option<u64>)]
    limit: Option<String>,
}

/// The deployment's events, oldest first: RPO above a policy's threshold, agents and gateways
/// gone and back, caches and journals above 80 %, low free space, stalled replication,
/// failover-family actions.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "deployment",
    params(EventParams),
    responses(
        (status = OK, description = "Events after `since`", body = Vec<Event>),
        (status = BAD_REQUEST, description = "A bad `since` or `limit`", body = ErrorBody),
        (status = NOT_FOUND, description = "This gateway is no configuration server", body = ErrorBody),
    )
)]
pub(crate) async fn list_events(
    crate::Deployment(cs): crate::Deployment,
    crate::QueryParams(q): crate::QueryParams<EventParams>,
) -> Result<crate::Pretty<Vec<Event>>, ApiError> {
    let since = query_number("since", q.since.as_deref(), 0)?;
    let limit = query_number("limit", q.limit.as_deref(), 1000)?.clamp(1, 1000) as usize;
    Ok(crate::Pretty(
        crate::blocking(move || cs.events(since, limit)).await?,
    ))
}

/// A whole number from the query (`name=value`), or `default` without one.
fn query_number(name: &str, value: Option<&str>, default: u64) -> Result<u64, ApiError> {
    match value {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("{name}={v}: give a whole number"))),
    }
}

/// The query of `GET /v1/jobs`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct JobParams {
    /// At most this many, newest first (default 100, at most 1000).
    #[param(value_type = Option<u64>)]
    limit: Option<String>,
}

/// The jobs run through this configuration server, newest first: each change to an item (a
/// point, a test failover and its cleanup, a failover, a commit) with its steps and outcome.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "deployment",
    params(JobParams),
    responses(
        (status = OK, description = "The newest jobs", body = Vec<Job>),
        (status = BAD_REQUEST, description = "A bad `limit`", body = ErrorBody),
        (status = NOT_FOUND, description = "This gateway is no configuration server", body = ErrorBody),
    )
)]
pub(crate) async fn list_jobs(
    crate::Deployment(cs): crate::Deployment,
    crate::QueryParams(q): crate::QueryParams<JobParams>,
) -> Result<crate::Pretty<Vec<Job>>, ApiError> {
    let limit = query_number("limit", q.limit.as_deref(), 100)?.clamp(1, 1000) as usize;
    Ok(crate::Pretty(
        crate::blocking(move || cs.jobs(limit)).await?,
    ))
}

/// One job with its steps.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "deployment",
    params(("id" = u64, Path, description = "The job's id, as `GET /v1/jobs` lists it")),
    responses(
        (status = OK, description = "The job", body = Job),
        (status = BAD_REQUEST, description = "An id that is no number", body = ErrorBody),
        (status = NOT_FOUND, description = "No such job, or this gateway is no configuration server", body = ErrorBody),
    )
)]
pub(crate) async fn get_job(
    crate::Deployment(cs): crate::Deployment,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<crate::Pretty<Job>, ApiError> {
    let number = id
        .parse::<u64>()
        .map_err(|_| ApiError::bad_request(format!("job `{id}`: a job id is a whole number")))?;
    match crate::blocking(move || cs.job(number)).await? {
        Some(job) => Ok(crate::Pretty(job)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no job {number} is kept here; `haven job list` shows the newest"),
        )),
    }
}

/// `GET /v1/items` at every master target, joined into one list.
async fn every_item(cs: &ConfigServer, request: ApiRequest) -> Result<Response, ApiError> {
    let mut all = Vec::new();
    for gateway in cs.with_role("master-target") {
        let answer = cs
            .forward(&gateway, request.clone())
            .await
            .map_err(forward_error)?;
        if answer.status != 200 {
            return Ok(answer_response(answer));
        }
        let items: Vec<serde_json::Value> = serde_json::from_str(&answer.body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("gateway `{gateway}` answered GET /v1/items with no list: {e}"),
            )
        })?;
        all.extend(items);
    }
    let body = serde_json::to_vec_pretty(&all)
        .map_err(|e| ApiError::internal(format!("cannot write the answer as JSON: {e}")))?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

fn forward_error(e: ForwardError) -> ApiError {
    let status = match e {
        ForwardError::Unknown(_) => StatusCode::NOT_FOUND,
        ForwardError::Gone(..) => StatusCode::SERVICE_UNAVAILABLE,
        ForwardError::Failed(..) => StatusCode::BAD_GATEWAY,
    };
    ApiError::new(status, e.to_string())
}

pub(crate) fn answer_response(answer: ApiAnswer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    (
        status,
        [(header::CONTENT_TYPE, answer.content_type)],
        answer.body,
    )
        .into_response()
}

/// This gateway's own routes without tokens, for the calls its configuration server forwards
/// (the configuration server checked the caller's token and role).
#[derive(Clone)]
pub struct LocalRoutes(pub(crate) axum::Router);

impl LocalRoutes {
    /// Runs one forwarded call.
    pub fn call(
        &self,
        request: ApiRequest,
    ) -> impl std::future::Future<Output = ApiAnswer> + Send + 'static {
        call_local(self.0.clone(), request)
    }
}

async fn call_local(router: axum::Router, request: ApiRequest) -> ApiAnswer {
    let failed = |status: StatusCode, message: String| ApiAnswer {
        status: status.as_u16(),
        content_type: "application/json".into(),
        body: serde_json::json!({ "error": message }).to_string(),
    };
    // The configuration server forwards item calls and group points only: nothing else runs
    // without a token.
    let path = request.path.split('?').next().unwrap_or_default();
    if crate::items_rest(path).is_none() && path != "/v1/group-points" && path != "/v1/seeds" {
        return failed(
            StatusCode::FORBIDDEN,
            format!(
                "{}: only /v1/items, /v1/seeds and /v1/group-points calls are taken from the \
                 configuration server",
                request.path
            ),
        );
    }
    let Ok(method) = Method::from_bytes(request.method.as_bytes()) else {
        return failed(
            StatusCode::BAD_REQUEST,
            format!("method {}", request.method),
        );
    };
    let req = match axum::http::Request::builder()
        .method(method)
        .uri(&request.path)
        .body(Body::empty())
    {
        Ok(r) => r,
        Err(e) => return failed(StatusCode::BAD_REQUEST, format!("{}: {e}", request.path)),
    };
    let Ok(response) = router.oneshot(req).await;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    match axum::body::to_bytes(response.into_body(), MAX_MESSAGE).await {
        Ok(body) => ApiAnswer {
            status,
            content_type,
            body: String::from_utf8_lossy(&body).into_owned(),
        },
        Err(e) => failed(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the answer is too large to forward: {e}"),
        ),
    }
}

// ---- The deployment's pipeline ----

/// The query of `POST /v1/pipeline`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ApplyParams {
    /// Only compute the plan: nothing changes.
    #[param(value_type = Option<bool>)]
    dry_run: Option<String>,
    /// Apply even changes that destroy a protected machine's journal or replica.
    #[param(value_type = Option<bool>)]
    allow_destroy: Option<String>,
    /// The file's name, for the positions in errors (default `pipeline.toml`).
    file: Option<String>,
}

/// What `POST /v1/pipeline` did, or would do.
#[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub(crate) struct ApplyAnswer {
    /// Whether it was applied (false for a dry run or no change).
    applied: bool,
    /// The assignment revision gateways get now.
    revision: u64,
    /// The plan, one change per line (`+` add, `~` change, `-` remove), then a summary.
    plan: String,
    /// Changes by action.
    add: usize,
    change: usize,
    remove: usize,
}

/// The problems of a pipeline that was not applied.
#[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub(crate) struct PipelineProblems {
    /// What happened and what to do.
    error: String,
    /// Each problem: `FILE:LINE:COL: PATH: MESSAGE; HINT`, or a change that was refused.
    problems: Vec<String>,
}

fn problems(status: StatusCode, error: String, problems: Vec<String>) -> Response {
    crate::json_response(
        status,
        serde_json::to_vec_pretty(&PipelineProblems { error, problems }),
    )
}

/// Applies a pipeline: the whole file or nothing. Its plan against the pipeline applied last
/// is returned; changes that destroy a protected machine's journal or replica are refused
/// unless `allow_destroy`.
#[utoipa::path(
    post,
    path = "/v1/pipeline",
    tag = "deployment",
    params(ApplyParams),
    request_body(content = String, content_type = "text/plain", description = "The pipeline file (TOML; sent as text/plain or application/toml)"),
    responses(
        (status = OK, description = "Applied (or, with dry_run, what would change)", body = ApplyAnswer),
        (status = BAD_REQUEST, description = "A bad query parameter", body = ErrorBody),
        (status = NOT_FOUND, description = "This gateway is no configuration server", body = ErrorBody),
        (status = CONFLICT, description = "Destructive changes refused without allow_destroy", body = PipelineProblems),
        (status = UNPROCESSABLE_ENTITY, description = "The file has problems; nothing was applied", body = PipelineProblems),
    )
)]
pub(crate) async fn apply_pipeline(
    crate::Deployment(cs): crate::Deployment,
    crate::QueryParams(q): crate::QueryParams<ApplyParams>,
    body: String,
) -> Result<Response, ApiError> {
    let dry_run = crate::flag("dry_run", q.dry_run.as_deref())?;
    let allow_destroy = crate::flag("allow_destroy", q.allow_destroy.as_deref())?;
    let file = q.file.unwrap_or_else(|| "pipeline.toml".to_string());
    let run = move || -> anyhow::Result<Response> {
        let desired = match haven_pipeline::parse(&body, &file) {
            Ok(p) => p,
            Err(diagnostics) => {
                let list: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
                return Ok(problems(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("{file}: {} problem(s); nothing was applied", list.len()),
                    list,
                ));
            }
        };
        // Plan and commit against the same pipeline: one apply at a time.
        let _applying = cs.pipeline_lock();
        let stored = cs.pipeline()?;
        let current = match &stored {
            Some(s) => serde_json::from_value(s.pipeline.clone())?,
            None => haven_pipeline::model::Pipeline::new(desired.deployment.name.clone()),
        };
        let plan = haven_pipeline::diff(&current, &desired);
        let (add, change, remove) = plan.counts();
        let destroys: Vec<String> = plan.destructive().iter().map(|c| c.to_string()).collect();
        if !destroys.is_empty() && !allow_destroy {
            return Ok(problems(
                StatusCode::CONFLICT,
                format!(
                    "{} change(s) would destroy what protects a machine (its journal, points or \
                     replica); nothing was applied. Check them, then apply again with \
                     --allow-destroy (allow_destroy=true)",
                    destroys.len()
                ),
                destroys,
            ));
        }
        let revision = stored.as_ref().map_or(0, |s| s.revision);
        let answer = |applied, revision| ApplyAnswer {
            applied,
            revision,
            plan: plan.to_string(),
            add,
            change,
            remove,
        };
        if dry_run || (plan.is_empty() && stored.is_some()) {
            return Ok(crate::Pretty(answer(false, revision)).into_response());
        }
        let assignment = assignment_of(&desired);
        let committed = cs.commit(
            serde_json::to_value(&desired)?,
            assignment,
            webhooks_of(&desired),
            adapters_of(&desired),
        )?;
        tracing::info!(
            revision = committed.revision,
            add,
            change,
            remove,
            "pipeline applied"
        );
        Ok(crate::Pretty(answer(true, committed.revision)).into_response())
    };
    crate::blocking(run).await
}

/// The pipeline applied last, as JSON and as the file `haven export` prints.
#[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub(crate) struct PipelineView {
    revision: u64,
    applied_ms: u64,
    /// The pipeline's model.
    #[schema(value_type = Object)]
    pipeline: serde_json::Value,
    /// The pipeline as a file that `POST /v1/pipeline` accepts unchanged.
    toml: String,
}

#[utoipa::path(
    get,
    path = "/v1/pipeline",
    tag = "deployment",
    responses(
        (status = OK, description = "The pipeline applied last", body = PipelineView),
        (status = NOT_FOUND, description = "No pipeline was applied, or this gateway is no configuration server", body = ErrorBody),
    )
)]
pub(crate) async fn get_pipeline(
    crate::Deployment(cs): crate::Deployment,
) -> Result<crate::Pretty<PipelineView>, ApiError> {
    let run = move || -> anyhow::Result<Option<PipelineView>> {
        let Some(stored) = cs.pipeline()? else {
            return Ok(None);
        };
        let model: haven_pipeline::model::Pipeline =
            serde_json::from_value(stored.pipeline.clone())?;
        Ok(Some(PipelineView {
            revision: stored.revision,
            applied_ms: stored.applied_ms,
            toml: haven_pipeline::to_toml(&model),
            pipeline: stored.pipeline,
        }))
    };
    match crate::blocking(run).await? {
        Some(v) => Ok(crate::Pretty(v)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no pipeline was applied to this deployment yet: `haven apply FILE`",
        )),
    }
}

/// Where the configuration server posts events: the pipeline's webhooks.
pub fn webhooks_of(p: &haven_pipeline::model::Pipeline) -> Vec<Webhook> {
    p.webhooks
        .iter()
        .map(|w| Webhook {
            name: w.name.clone(),
            url: w.url.clone(),
            events: w.events.clone(),
            min_severity: w.min_severity,
        })
        .collect()
}

/// The pipeline's adapter plugins, which the configuration server runs (settings as written:
/// `secret:NAME` is resolved when they are loaded).
pub fn adapters_of(p: &haven_pipeline::model::Pipeline) -> Vec<haven_host::PluginSpec> {
    p.plugins
        .iter()
        .filter(|plugin| plugin.kind == haven_pipeline::model::PluginKind::Adapter)
        .map(|plugin| haven_host::PluginSpec {
            name: plugin.name.clone(),
            path: plugin.path.clone(),
            grants: haven_host::Grants {
                storage_root: plugin.grants.storage_root.clone(),
                storage_read_only: plugin.grants.storage_read_only,
                // Adapters write no disks.
                devices: Vec::new(),
                http_hosts: plugin.grants.http_hosts.clone(),
                memory_mib: plugin.grants.memory_mib,
                call_timeout_ms: plugin.grants.call_timeout_ms,
            },
            settings: plugin.settings.clone(),
        })
        .collect()
}

/// What each gateway enforces of a pipeline: every machine's replication policy (its group's,
/// when the group names one).
pub fn assignment_of(p: &haven_pipeline::model::Pipeline) -> Assignment {
    let machines = p
        .machines
        .iter()
        .filter_map(|m| {
            let r = p.replication_policy_of(&m.name)?;
            Some((
                m.name.clone(),
                MachinePolicy {
                    policy: r.name.clone(),
                    crash_consistent_interval_ms: r.crash_consistent_interval.as_millis() as u64,
                    // A machine on a platform has its app points taken by the configuration
                    // server, quiesced there (`machines::app_points_on_interval`).
                    app_consistent_interval_ms: r
                        .app_consistent_interval
                        .filter(|_| m.platform.is_none())
                        .map(|d| d.as_millis() as u64),
                    retention: serde_json::to_value(&r.retention).unwrap_or_default(),
                    rpo_threshold_ms: r.rpo_threshold.as_millis() as u64,
                    site: Some(m.site.clone()),
                    process_server: m.process_server.clone(),
                    process_server_grace_ms: r.process_server_grace.as_millis() as u64,
                },
            ))
        })
        .collect();
    Assignment {
        revision: 0,
        machines,
        crl_pem: None,
    }
}
