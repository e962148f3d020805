//! Multi-machine consistency groups: group points and their list.
//!
//! - `POST /v1/group-points?members=A,B,C&hold_ms=N` at a master target: one group point of
//!   machines it holds the replicas of ([`MasterTarget::group_point`]): every member holds its
//!   writes, then all tag one id and let go; a member that does not hold within `hold_ms`
//!   makes the point fail, never stalls the others longer.
//! - `POST /v1/groups/{name}/points` at the configuration server: a group point of the
//!   pipeline's group `name`, through the master target holding its members (all at one).
//! - `GET /v1/groups/{name}/points` at the configuration server: the group's points, the ids
//!   every disk of every member holds (each kept by the members' retention, which keeps the
//!   same ids on all of them: it goes by the points' source times).
//!
//! A group fails over to one group point: a plan's failover step naming the group fails each
//! member over to the group's latest point (or the one asked), see [`crate::plans`].
//!
//! [`MasterTarget::group_point`]: haven_engine::master_target::MasterTarget

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::Response;
use haven_engine::config_server::ConfigServer;
use haven_engine::recovery::{GroupPointInfo, MAX_HOLD};
use haven_net::join::ApiRequest;
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

use crate::{ApiError, Deployment, ErrorBody, Pretty, QueryParams, Target};

/// How long members' writes are held for a group point when the call does not say.
pub const DEFAULT_HOLD: Duration = Duration::from_millis(500);

/// The query of `POST /v1/group-points`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct GroupPointParams {
    /// The members, comma-separated: machine names or agent ids.
    members: String,
    /// Longest the members' writes are held, ms (default 500, at most 5000).
    hold_ms: Option<u64>,
}

/// The query of `POST /v1/groups/{name}/points`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct HoldParams {
    /// Longest the members' writes are held, ms (default 500, at most 5000; at least 4000
    /// when a member ships through a cache account).
    hold_ms: Option<u64>,
}

/// A group point as the configuration server lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupPoint {
    /// The point's id, the same on every member.
    pub point: u64,
    /// When the members tagged it, ms since the Unix epoch (the first member's clock).
    pub source_time_ms: u64,
}

fn hold_of(ms: Option<u64>) -> Result<Duration, ApiError> {
    let hold = ms.map_or(DEFAULT_HOLD, Duration::from_millis);
    if hold.is_zero() || hold > MAX_HOLD {
        return Err(ApiError::bad_request(format!(
            "hold_ms {}: give 1 to {}",
            hold.as_millis(),
            MAX_HOLD.as_millis()
        )));
    }
    Ok(hold)
}

/// Takes a group point of machines this master target holds.
#[utoipa::path(
    post,
    path = "/v1/group-points",
    tag = "recovery",
    params(GroupPointParams),
    responses(
        (status = OK, description = "The group point, once every member's tags are durable here", body = GroupPointInfo),
        (status = BAD_REQUEST, description = "No members, too many, a bad hold, or a name matching several machines", body = ErrorBody),
        (status = NOT_FOUND, description = "A member is not held here, or this gateway is not a master target", body = ErrorBody),
        (status = CONFLICT, description = "A member is failed over", body = ErrorBody),
        (status = SERVICE_UNAVAILABLE, description = "A member did not hold its writes in time, or cannot be reached: no point", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The point could not be recorded", body = ErrorBody),
    )
)]
pub(crate) async fn take_group_point(
    Target(mt): Target,
    QueryParams(q): QueryParams<GroupPointParams>,
) -> Result<Pretty<GroupPointInfo>, ApiError> {
    let members: Vec<String> = q
        .members
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect();
    let hold = hold_of(q.hold_ms)?;
    Ok(Pretty(mt.group_point(&members, hold).await?))
}

/// The members of group `name` of the applied pipeline and the master target holding them.
/// The least hold of a group point when a member ships through a cache account: its requests
/// and replies travel through the account, each looked for every quarter second.
pub const ACCOUNT_HOLD: Duration = Duration::from_secs(4);

/// The members of group `name`, the master target holding them, and the least hold their
/// points need ([`ACCOUNT_HOLD`] when one ships through a cache account, else none).
fn members(cs: &ConfigServer, name: &str) -> Result<(Vec<String>, String, Duration), ApiError> {
    let p = crate::machines::pipeline(cs).map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let (members, gateway) = members_in(&p, cs, name)?;
    Ok((members, gateway, least_hold(&p, name)))
}

/// [`ACCOUNT_HOLD`] when a member of group `name` ships through a cache account.
fn least_hold(p: &haven_pipeline::model::Pipeline, name: &str) -> Duration {
    let through_account = p.group(name).is_some_and(|g| {
        g.machines
            .iter()
            .any(|m| p.machine(m).is_some_and(|m| m.cache_account.is_some()))
    });
    match through_account {
        true => ACCOUNT_HOLD,
        false => Duration::ZERO,
    }
}

/// The members of group `name` of pipeline `p` and the master target holding them.
fn members_in(
    p: &haven_pipeline::model::Pipeline,
    cs: &ConfigServer,
    name: &str,
) -> Result<(Vec<String>, String), ApiError> {
    let group = p.group(name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no group `{name}` in the applied pipeline; `haven export` shows it"),
        )
    })?;
    let mut targets = BTreeMap::new();
    for m in &group.machines {
        let gateway = cs.master_target_of(m).ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "group {name}: no master target reports machine {m} yet (is it protected? \
                     `haven status`)"
                ),
            )
        })?;
        targets
            .entry(gateway)
            .or_insert_with(Vec::new)
            .push(m.clone());
    }
    if targets.len() > 1 {
        let split: Vec<String> = targets
            .iter()
            .map(|(g, ms)| format!("{g}: {}", ms.join(", ")))
            .collect();
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "group {name}: its machines replicate to {} master targets ({}); a group's \
                 points are taken at one — give its machines the same `master_target`",
                targets.len(),
                split.join("; ")
            ),
        ));
    }
    let gateway = targets.into_keys().next().unwrap_or_default();
    Ok((group.machines.clone(), gateway))
}

/// Takes a point of the group now: every member's writes held, then one tag on all.
#[utoipa::path(
    post,
    path = "/v1/groups/{name}/points",
    tag = "deployment",
    params(("name" = String, Path, description = "The group's name in the pipeline"), HoldParams),
    responses(
        (status = OK, description = "The group point", body = GroupPointInfo),
        (status = BAD_REQUEST, description = "A bad `hold_ms`, or a member name matching several machines", body = ErrorBody),
        (status = NOT_FOUND, description = "No such group, or this gateway is no configuration server", body = ErrorBody),
        (status = CONFLICT, description = "The group's machines replicate to several master targets, or one is failed over", body = ErrorBody),
        (status = SERVICE_UNAVAILABLE, description = "A member did not hold in time or cannot be reached: no point", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The pipeline could not be read, or the point not recorded", body = ErrorBody),
        (status = BAD_GATEWAY, description = "The master target holding the group could not be reached", body = ErrorBody),
    )
)]
pub(crate) async fn create_group_point(
    Deployment(cs): Deployment,
    Path(name): Path<String>,
    QueryParams(q): QueryParams<HoldParams>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
) -> Result<Response, ApiError> {
    let hold = hold_of(q.hold_ms)?;
    let (members, gateway, least) = {
        let (cs, name) = (cs.clone(), name.clone());
        crate::blocking(move || members(&cs, &name)).await?
    };
    let hold = hold.max(least);
    let members: Vec<String> = members
        .iter()
        .map(|m| {
            percent_encoding::utf8_percent_encode(m, percent_encoding::NON_ALPHANUMERIC).to_string()
        })
        .collect();
    let request = ApiRequest {
        method: "POST".into(),
        path: format!(
            "/v1/group-points?members={}&hold_ms={}",
            members.join(","),
            hold.as_millis()
        ),
        caller: caller.map_or_else(String::new, |c| c.label()),
    };
    let answer = cs
        .forward(&gateway, request)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
    Ok(crate::deployment::answer_response(answer))
}

/// The group's points: those every disk of every member holds, oldest first.
#[utoipa::path(
    get,
    path = "/v1/groups/{name}/points",
    tag = "deployment",
    params(("name" = String, Path, description = "The group's name in the pipeline")),
    responses(
        (status = OK, description = "The group's points", body = Vec<GroupPoint>),
        (status = NOT_FOUND, description = "No such group, or this gateway is no configuration server", body = ErrorBody),
        (status = CONFLICT, description = "The group's machines replicate to several master targets", body = ErrorBody),
        (status = SERVICE_UNAVAILABLE, description = "A member is not reported by any master target yet", body = ErrorBody),
        (status = INTERNAL_SERVER_ERROR, description = "The pipeline could not be read", body = ErrorBody),
        (status = BAD_GATEWAY, description = "The master target holding the group could not be reached", body = ErrorBody),
    )
)]
pub(crate) async fn list_group_points(
    Deployment(cs): Deployment,
    Path(name): Path<String>,
) -> Result<Pretty<Vec<GroupPoint>>, ApiError> {
    let (members, gateway, _) = {
        let (cs, name) = (cs.clone(), name.clone());
        crate::blocking(move || members(&cs, &name)).await?
    };
    common_points(&cs, &gateway, &members)
        .await
        .map(Pretty)
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("group {name}: {e:#}")))
}

/// The points every member holds (each member's own list is already the points all its
/// disks hold), oldest first.
pub(crate) async fn common_points(
    cs: &Arc<ConfigServer>,
    gateway: &str,
    members: &[String],
) -> Result<Vec<GroupPoint>> {
    let mut common: Option<BTreeMap<u64, u64>> = None;
    for m in members {
        let path = format!(
            "/v1/items/{}/points",
            percent_encoding::utf8_percent_encode(m, percent_encoding::NON_ALPHANUMERIC)
        );
        let answer = cs
            .forward(
                gateway,
                ApiRequest {
                    method: "GET".into(),
                    path,
                    caller: String::new(),
                },
            )
            .await?;
        if answer.status != 200 {
            bail!("machine {m}: {}", answer.body.trim());
        }
        let list: Vec<serde_json::Value> = serde_json::from_str(&answer.body)
            .with_context(|| format!("machine {m}: not a point list"))?;
        let points: BTreeMap<u64, u64> = list
            .iter()
            .filter_map(|p| Some((p["point"].as_u64()?, p["source_time_ms"].as_u64()?)))
            .collect();
        common = Some(match common {
            None => points,
            Some(c) => c
                .into_iter()
                .filter(|(id, _)| points.contains_key(id))
                .collect(),
        });
    }
    Ok(common
        .unwrap_or_default()
        .into_iter()
        .map(|(point, source_time_ms)| GroupPoint {
            point,
            source_time_ms,
        })
        .collect())
}

/// The latest point of the group whose members are `members`, at `gateway`.
pub(crate) async fn latest(
    cs: &Arc<ConfigServer>,
    gateway: &str,
    group: &str,
    members: &[String],
) -> Result<u64> {
    let points = common_points(cs, gateway, members).await?;
    match points.last() {
        Some(p) => Ok(p.point),
        None => bail!(
            "group {group} has no point all its machines hold yet: take one with `haven group \
             point {group}` (the group's policy takes them on its interval)"
        ),
    }
}

/// How often the pipeline is read again for the groups' intervals.
const PIPELINE_EVERY: Duration = Duration::from_secs(2);

/// Takes each group's points on the crash-consistent interval of its `policy` (a group without
/// one takes points only when asked: `haven group point`), until the configuration server is
/// gone. A failed point is logged and raised as `group-point.failed` once until one succeeds
/// again.
pub(crate) async fn take_on_interval(cs: std::sync::Weak<ConfigServer>) {
    use std::collections::{HashMap, HashSet};
    use std::time::Instant;
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut intervals: Vec<(String, Duration)> = Vec::new();
    let mut pipeline = Arc::new(haven_pipeline::model::Pipeline::new(""));
    let mut read_at: Option<Instant> = None;
    let failing = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let running = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(strong) = cs.upgrade() else { return };
        if read_at.is_none_or(|t| t.elapsed() >= PIPELINE_EVERY) {
            read_at = Some(Instant::now());
            let c = strong.clone();
            if let Ok(Ok(p)) =
                tokio::task::spawn_blocking(move || crate::machines::pipeline(&c)).await
            {
                pipeline = Arc::new(p);
                let p = &pipeline;
                intervals = p
                    .groups
                    .iter()
                    .filter_map(|g| {
                        let policy = g.policy.as_deref().and_then(|n| p.policy(n))?;
                        match policy {
                            haven_pipeline::model::Policy::Replication(r) => {
                                Some((g.name.clone(), r.crash_consistent_interval))
                            }
                            haven_pipeline::model::Policy::Failback(_) => None,
                        }
                    })
                    .collect();
                due.retain(|g, _| intervals.iter().any(|(n, _)| n == g));
            }
        }
        let now = Instant::now();
        for (group, interval) in &intervals {
            let next = *due.entry(group.clone()).or_insert(now + *interval);
            if now < next
                || !running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(group.clone())
            {
                continue;
            }
            due.insert(group.clone(), now + *interval);
            let (cs, group, p) = (strong.clone(), group.clone(), pipeline.clone());
            let (failing, running) = (failing.clone(), running.clone());
            tokio::spawn(async move {
                let taken = take_for(&cs, &p, &group).await;
                running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&group);
                let first_failure = match &taken {
                    Ok(()) => {
                        failing
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&group);
                        false
                    }
                    Err(_) => failing
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(group.clone()),
                };
                if let Err(e) = taken {
                    if !first_failure {
                        tracing::debug!(group = %group, error = %format!("{e:#}"), "no group point");
                        return;
                    }
                    tracing::warn!(group = %group, error = %format!("{e:#}"), "no group point");
                    {
                        let raised = cs.raise(haven_engine::events::Raise {
                            severity: haven_engine::events::Severity::Warning,
                            kind: "group-point.failed",
                            gateway: None,
                            item: Some(group.clone()),
                            text: format!("group {group}: no group point: {e:#}"),
                        });
                        if let Err(e) = raised {
                            tracing::warn!(error = %e, "raising an event");
                        }
                    }
                }
            });
        }
    }
}

/// One group point of `group` of pipeline `p` (the one the loop read last), on its interval.
async fn take_for(
    cs: &Arc<ConfigServer>,
    p: &haven_pipeline::model::Pipeline,
    group: &str,
) -> Result<()> {
    let (members, gateway) =
        members_in(p, cs, group).map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let members: Vec<String> = members
        .iter()
        .map(|m| {
            percent_encoding::utf8_percent_encode(m, percent_encoding::NON_ALPHANUMERIC).to_string()
        })
        .collect();
    let answer = cs
        .forward(
            &gateway,
            ApiRequest {
                method: "POST".into(),
                path: format!(
                    "/v1/group-points?members={}&hold_ms={}",
                    members.join(","),
                    DEFAULT_HOLD.max(least_hold(p, group)).as_millis()
                ),
                caller: "the group's policy".into(),
            },
        )
        .await?;
    if answer.status != 200 {
        bail!(
            "HTTP {}: {}",
            answer.status,
            crate::deployment::error_text(&answer.body)
        );
    }
    Ok(())
}
