//! Recovery plans, run by the configuration server: `POST /v1/plans/{name}/failover` (and
//! `test-failover`, `cleanup`, `commit`) starts a job that takes the plan's steps in order.
//!
//! - A failover step acts on its machines (its groups' members included) one after the other
//!   through the master target holding each; a group's members (unplanned, or in a test
//!   failover) all go to one group point, its latest unless a point is asked, found once in a
//!   step of its own before them ([`crate::groups`]): a failover waits until the image is whole and
//!   goes on with the machine's platform steps ([`crate::machines`]); a test failover starts
//!   one (writable); a cleanup ends it; a commit makes the failover final.
//! - A script step (failover and test failover only) runs `sh -c RUN` at the configuration
//!   server with `HAVEN_PLAN` and `HAVEN_ACTION` set, under its timeout; its output (the last
//!   4 KiB) is the step's output; a non-zero exit fails it.
//! - A manual step (failover and test failover only) waits until `POST
//!   /v1/plans/{name}/resume` (`haven plan resume`); its step is named `wait for an operator:
//!   MESSAGE` while it waits.
//!
//! - A reprotect (`POST /v1/plans/{name}/reprotect`) reprotects each machine of the failover
//!   steps, and a failback (`…/failback`) fails each back in place with its failback policy
//!   (then reprotects it, as the policy says); scripts and manual steps do not run in either
//!   ([`crate::reprotect`]).
//!
//! A group (`POST /v1/groups/{name}/reprotect`, `…/failback`) and a machine (`POST
//! /v1/machines/{name}/reprotect`, `…/failback`) run the same way, as a plan of one failover
//! step naming them.
//!
//! A failing step stops the plan with its reason, unless the step says `continue_on_error`.
//! One run per plan (group, machine) at a time. Events: `plan.started`, `plan.waiting`,
//! `plan.completed`, `plan.failed`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use axum::extract::Path;
use axum::http::StatusCode;
use haven_engine::config_server::ConfigServer;
use haven_engine::events::{Raise, Severity};
use haven_engine::jobs::{Job, JobState, NewJob};
use haven_pipeline::model::{Pipeline, Step};
use serde::{Deserialize, Serialize};

use crate::machines::{Ends, StepEnd, pipeline, run_step};
use crate::{ApiError, Deployment, ErrorBody, Pretty, QueryParams, blocking};

/// Most bytes of a script's output kept in its step (its last ones).
const SCRIPT_OUTPUT: usize = 4096;
/// The prefix of a manual step's name while it waits.
pub const WAITING: &str = "wait for an operator: ";

/// How far a plan's run got, kept as `planrun/<job id>` while it runs: a run a restart of the
/// configuration server interrupted goes on from the unit it was in (`resume_interrupted`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Progress {
    plan: String,
    /// What `plan` names: a plan, a group or a machine.
    #[serde(default)]
    subject: Subject,
    action: String,
    query: String,
    /// Units of work done (machines, group points, scripts, manual steps), in order.
    done: usize,
    /// The group points found so far, by group.
    group_points: std::collections::BTreeMap<String, u64>,
    /// The next unit is the one a restart interrupted (it checks what was done already).
    resumed: bool,
}

fn progress_key(job: u64) -> String {
    format!("planrun/{job:020}")
}

/// What a run takes its machines from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Subject {
    /// A plan of the pipeline.
    #[default]
    Plan,
    /// A group of the pipeline: one failover step naming it.
    Group,
    /// One machine: one failover step naming it.
    Machine,
}

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::Plan => "plan",
            Subject::Group => "group",
            Subject::Machine => "machine",
        }
    }

    /// The steps a run of `name` takes; `None` when the pipeline has no such plan or group.
    fn steps(self, p: &Pipeline, name: &str) -> Option<Vec<Step>> {
        let one = |machines: Vec<String>, groups: Vec<String>| {
            vec![Step::Failover(haven_pipeline::model::FailoverStep {
                machines,
                groups,
                continue_on_error: false,
            })]
        };
        match self {
            Subject::Plan => p.plan(name).map(|plan| plan.steps.clone()),
            Subject::Group => p.group(name).map(|_| one(Vec::new(), vec![name.into()])),
            Subject::Machine => Some(one(vec![name.into()], Vec::new())),
        }
    }
}

/// What a plan run does to each machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Failover,
    TestFailover,
    Cleanup,
    Commit,
    Reprotect,
    Failback,
}

impl Action {
    fn parse(name: &str) -> Option<Action> {
        [
            Action::Failover,
            Action::TestFailover,
            Action::Cleanup,
            Action::Commit,
            Action::Reprotect,
            Action::Failback,
        ]
        .into_iter()
        .find(|a| a.name() == name)
    }

    fn name(self) -> &'static str {
        match self {
            Action::Failover => "failover",
            Action::TestFailover => "test-failover",
            Action::Cleanup => "cleanup",
            Action::Commit => "commit",
            Action::Reprotect => "reprotect",
            Action::Failback => "failback",
        }
    }

    /// Scripts and manual steps run in a failover and a test failover.
    fn runs_scripts(self) -> bool {
        matches!(self, Action::Failover | Action::TestFailover)
    }
}

/// A plan as `GET /v1/plans` lists it.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub(crate) struct PlanView {
    name: String,
    /// Each step, in order: its kind and what it does.
    steps: Vec<String>,
}

/// The applied pipeline's recovery plans.
#[utoipa::path(
    get,
    path = "/v1/plans",
    tag = "deployment",
    responses(
        (status = OK, description = "The plans of the applied pipeline", body = Vec<PlanView>),
        (status = NOT_FOUND, description = "This gateway is no configuration server", body = ErrorBody),
    )
)]
pub(crate) async fn list_plans(
    Deployment(cs): Deployment,
) -> Result<Pretty<Vec<PlanView>>, ApiError> {
    let p = blocking(move || pipeline(&cs)).await?;
    Ok(Pretty(
        p.plans
            .iter()
            .map(|plan| PlanView {
                name: plan.name.clone(),
                steps: plan.steps.iter().map(describe).collect(),
            })
            .collect(),
    ))
}

fn describe(step: &Step) -> String {
    match step {
        Step::Failover(f) => {
            let mut what: Vec<String> = f.machines.clone();
            what.extend(f.groups.iter().map(|g| format!("group {g}")));
            format!("failover: {}", what.join(", "))
        }
        Step::Script(s) => format!("script: {}", s.run),
        Step::Manual(m) => format!("manual: {}", m.message),
    }
}

/// `planned`, `point` of a plan's failover.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PlanFailoverParams {
    /// Stop each source, take a final point and fail over to it (`planned` alone is `true`).
    #[param(value_type = Option<bool>)]
    planned: Option<String>,
    /// A point id for every machine, or `latest` (the default). Ignored when `planned`.
    point: Option<String>,
}

fn no_plan(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no plan `{name}` in the applied pipeline; `haven plan list` shows them"),
    )
}

/// The waiter key of a run of `name`: one run of each at a time.
fn run_key(subject: Subject, name: &str) -> String {
    format!("{}/{name}", subject.name())
}

/// Starts a run of `action` over `subject` `name`; answers its job.
pub(crate) async fn start(
    cs: Arc<ConfigServer>,
    subject: Subject,
    name: String,
    action: Action,
    query: String,
    caller: String,
) -> Result<Pretty<Job>, ApiError> {
    let (plan_steps, p) = {
        let (cs, name) = (cs.clone(), name.clone());
        blocking(move || -> Result<Option<(Vec<Step>, Pipeline)>> {
            let p = pipeline(&cs)?;
            Ok(subject.steps(&p, &name).map(|steps| (steps, p.clone())))
        })
        .await?
    }
    .ok_or_else(|| match subject {
        Subject::Group => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no group `{name}` in the applied pipeline; `haven export` shows it"),
        ),
        _ => no_plan(&name),
    })?;
    if subject == Subject::Machine && cs.master_target_of(&name).is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no master target joined to this configuration server holds `{name}` (a \
                 machine name or agent id); `haven status` lists the items"
            ),
        ));
    }
    let key = run_key(subject, &name);
    let Some(waiter) = cs.claim_waiter(&key) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{} `{name}` is running; follow it with `haven job list`, resume it with \
                 `haven plan resume {name}` when it waits",
                subject.name()
            ),
        ));
    };
    let job = {
        let (cs, name) = (cs.clone(), name.clone());
        let kind = match (subject, action) {
            (Subject::Plan, Action::Failover) => "plan-failover",
            (Subject::Plan, Action::TestFailover) => "plan-test-failover",
            (Subject::Plan, Action::Cleanup) => "plan-cleanup",
            (Subject::Plan, Action::Commit) => "plan-commit",
            (Subject::Plan, Action::Reprotect) => "plan-reprotect",
            (Subject::Plan, Action::Failback) => "plan-failback",
            (Subject::Group, Action::Reprotect) => "group-reprotect",
            (Subject::Group, Action::Failback) => "group-failback",
            (Subject::Machine, Action::Reprotect) => "machine-reprotect",
            (Subject::Machine, Action::Failback) => "machine-failback",
            (_, _) => "item-change",
        };
        blocking(move || {
            cs.start_job(NewJob {
                kind,
                item: Some(&name),
                gateway: None,
                caller: &caller,
                step: &format!("start {} {name} ({})", subject.name(), action.name()),
            })
        })
        .await
    };
    let job = match job {
        Ok(job) => job,
        Err(e) => {
            cs.drop_waiter(&key);
            return Err(e);
        }
    };
    let first = {
        let cs = cs.clone();
        let steps = plan_steps.len();
        blocking(move || cs.end_job_step(job, true, format!("{steps} step(s)"), false)).await
    };
    let first = match first {
        Ok(job) => job,
        Err(e) => {
            cs.drop_waiter(&key);
            return Err(e);
        }
    };
    let _ = cs.raise(Raise {
        severity: Severity::Info,
        kind: "plan.started",
        gateway: None,
        item: Some(name.clone()),
        text: format!("{} {name} ({}) started", subject.name(), action.name()),
    });
    let answer = first.clone();
    let progress = Progress {
        plan: name.clone(),
        subject,
        action: action.name().to_string(),
        query,
        ..Progress::default()
    };
    spawn_run(cs, first, p, plan_steps, action, waiter, progress);
    Ok(Pretty(answer))
}

/// Runs plan `progress.plan` as `job` in a task of its own, from the unit `progress` says, and
/// raises how it ended.
fn spawn_run(
    cs: Arc<ConfigServer>,
    job: Job,
    p: Pipeline,
    plan_steps: Vec<Step>,
    action: Action,
    waiter: Arc<haven_engine::config_server::Waiter>,
    progress: Progress,
) {
    tokio::spawn(async move {
        let (id, name) = (job.id, progress.plan.clone());
        let subject = progress.subject.name();
        let key = run_key(progress.subject, &name);
        let outcome = run(&cs, job, &p, &plan_steps, action, &waiter, progress).await;
        if let Err(e) = &outcome {
            crate::machines::fail_job(&cs, id, e).await;
        }
        {
            let cs = cs.clone();
            let _ = tokio::task::spawn_blocking(move || {
                cs.set_record::<Progress>(&progress_key(id), None)
            })
            .await;
        }
        cs.drop_waiter(&key);
        let (severity, kind, text) = match outcome {
            Ok(job) if job.state == JobState::Succeeded => (
                Severity::Info,
                "plan.completed",
                format!(
                    "{subject} {name} ({}) completed; job {}",
                    action.name(),
                    job.id
                ),
            ),
            Ok(job) => (
                Severity::Error,
                "plan.failed",
                format!(
                    "{subject} {name} ({}) stopped: {}; `haven job show {}` has its steps",
                    action.name(),
                    job.outcome(),
                    job.id
                ),
            ),
            Err(e) => (
                Severity::Error,
                "plan.failed",
                format!("{subject} {name} ({}) stopped: {e:#}", action.name()),
            ),
        };
        let _ = cs.raise(Raise {
            severity,
            kind,
            gateway: None,
            item: Some(name.clone()),
            text,
        });
    });
}

/// Resumes the plan runs a restart of the configuration server interrupted, each at the unit
/// of work it was in (that unit checks first what its master target did already: a failover
/// or test failover started is not asked again). A run whose progress or plan is gone ends
/// failed, saying why.
pub(crate) async fn resume_interrupted(cs: Arc<ConfigServer>) {
    for job in cs.take_interrupted_plans() {
        let id = job.id;
        let resumed = resume_one(&cs, job).await;
        if let Err(e) = resumed {
            crate::machines::fail_job(&cs, id, &e.context("cannot resume the plan's run")).await;
        }
    }
}

async fn resume_one(cs: &Arc<ConfigServer>, job: Job) -> Result<()> {
    let progress: Option<Progress> = {
        let (cs, id) = (cs.clone(), job.id);
        tokio::task::spawn_blocking(move || cs.record(&progress_key(id))).await??
    };
    let mut progress = progress.context("its progress was not kept")?;
    let action = Action::parse(&progress.action)
        .with_context(|| format!("unknown action `{}`", progress.action))?;
    let p = {
        let cs = cs.clone();
        tokio::task::spawn_blocking(move || pipeline(&cs)).await??
    };
    let subject = progress.subject;
    let steps = subject.steps(&p, &progress.plan).with_context(|| {
        format!(
            "{} `{}` is no longer in the applied pipeline",
            subject.name(),
            progress.plan
        )
    })?;
    let waiter = cs
        .claim_waiter(&run_key(subject, &progress.plan))
        .with_context(|| format!("{} `{}` runs already", subject.name(), progress.plan))?;
    tracing::warn!(job = job.id, plan = %progress.plan, unit = progress.done + 1,
        "resuming a plan's run a restart interrupted");
    let _ = cs.raise(Raise {
        severity: Severity::Warning,
        kind: "plan.resumed",
        gateway: None,
        item: Some(progress.plan.clone()),
        text: format!(
            "plan {} ({}) resumed after a restart of the configuration server; job {}",
            progress.plan, progress.action, job.id
        ),
    });
    progress.resumed = true;
    spawn_run(cs.clone(), job, p, steps, action, waiter, progress);
    Ok(())
}

/// Whether a step is the job's last: when it succeeds (a failover's call at the master target
/// is followed by the machine's own steps), and when it fails (nothing follows then).
#[derive(Clone, Copy)]
struct Last {
    if_ok: bool,
    if_failed: bool,
}

impl Last {
    fn both(last: bool) -> Last {
        Last {
            if_ok: last,
            if_failed: last,
        }
    }
}

/// Begins a step, runs it, ends it (the job too when it is the last or it failed and the plan
/// stops there). Also whether the plan goes on.
async fn step(
    cs: &Arc<ConfigServer>,
    job: Job,
    name: String,
    last: Last,
    continue_on_error: bool,
    run: impl Future<Output = Result<String>>,
) -> Result<(Job, bool)> {
    let end = StepEnd {
        if_ok: last.if_ok.then_some(true),
        // Tolerated: the plan goes on, or ends here as done.
        if_failed: match continue_on_error {
            false => Some(false),
            true => last.if_failed.then_some(true),
        },
    };
    let run = async {
        match run.await {
            Ok(output) => Ok(((), output)),
            Err(e) if continue_on_error => {
                Err(anyhow!("{e:#} (the plan goes on: continue_on_error)"))
            }
            Err(e) => Err(e),
        }
    };
    let (job, done) = run_step(cs, job, name, end, run).await?;
    Ok((job, done.is_some() || continue_on_error))
}

async fn run(
    cs: &Arc<ConfigServer>,
    mut job: Job,
    p: &Pipeline,
    steps: &[Step],
    action: Action,
    waiter: &haven_engine::config_server::Waiter,
    mut progress: Progress,
) -> Result<Job> {
    let name = progress.plan.clone();
    let name = name.as_str();
    let query = progress.query.clone();
    let query = query.as_str();
    let planned = query
        .split('&')
        .any(|kv| kv == "planned" || kv == "planned=true");
    // Every unit of work, in order, so the last one ends the job.
    enum Work<'a> {
        /// A machine, with its group (whose point it fails over to) if any, and what is done
        /// to it.
        Machine(String, bool, Option<String>, Action),
        /// Finding the group's latest point, before its members.
        GroupPoint(String, Vec<String>, bool),
        Script(&'a haven_pipeline::model::ScriptStep),
        Manual(&'a str),
    }
    // A group fails over to one group point: its latest (unless a point was asked), found
    // once, before its first member.
    let to_group_point = match action {
        Action::Failover => !planned && query == "point=latest",
        Action::TestFailover => true,
        Action::Cleanup | Action::Commit | Action::Reprotect | Action::Failback => false,
    };
    // A failback is followed by a reprotect the other way when the machine's policy says so.
    let units = |m: &String, coe: bool, group: Option<String>| {
        let mut units = vec![Work::Machine(m.clone(), coe, group, action)];
        if action == Action::Failback
            && crate::reprotect::failback_policy(p, m).reprotect_after_failback
        {
            units.push(Work::Machine(m.clone(), coe, None, Action::Reprotect));
        }
        units
    };
    let mut work = Vec::new();
    for s in steps {
        match s {
            Step::Failover(f) => {
                for m in &f.machines {
                    work.extend(units(m, f.continue_on_error, None));
                }
                for g in &f.groups {
                    let group = p.group(g).with_context(|| format!("no group {g}"))?;
                    if to_group_point {
                        work.push(Work::GroupPoint(
                            g.clone(),
                            group.machines.clone(),
                            f.continue_on_error,
                        ));
                    }
                    for m in &group.machines {
                        work.extend(units(
                            m,
                            f.continue_on_error,
                            to_group_point.then(|| g.clone()),
                        ));
                    }
                }
            }
            Step::Script(s) if action.runs_scripts() => work.push(Work::Script(s)),
            Step::Manual(m) if action.runs_scripts() => work.push(Work::Manual(&m.message)),
            _ => {}
        }
    }
    if work.is_empty() {
        return blocking_end(cs, job, "nothing to do for this action").await;
    }
    let count = work.len();
    keep(cs, job.id, &progress).await?;
    for (i, w) in work.into_iter().enumerate() {
        if i < progress.done {
            continue;
        }
        let last = i + 1 == count;
        let resumed = std::mem::take(&mut progress.resumed);
        let (next, go_on) = match w {
            Work::Machine(machine, continue_on_error, group, action) => {
                let point = group.and_then(|g| progress.group_points.get(&g).copied());
                // A failback is planned when its policy shuts the replica down.
                let planned = match action {
                    Action::Failback => {
                        crate::reprotect::failback_policy(p, &machine).shutdown_replica
                    }
                    _ => planned,
                };
                machine_step(
                    cs,
                    job,
                    &machine,
                    action,
                    MachineCall {
                        query,
                        point,
                        planned,
                        resumed,
                    },
                    last,
                    continue_on_error,
                )
                .await?
            }
            Work::GroupPoint(group, members, continue_on_error) => {
                let found = std::sync::Mutex::new(None);
                let run = async {
                    let gateway = cs
                        .master_target_of(&members[0])
                        .with_context(|| format!("no master target holds {}", members[0]))?;
                    let id = crate::groups::latest(cs, &gateway, &group, &members).await?;
                    *found.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
                    Ok(format!("group point {id}"))
                };
                let what = format!("latest point of group {group}");
                let r = step(cs, job, what, Last::both(last), continue_on_error, run).await?;
                if let Some(id) = found.into_inner().unwrap_or_else(|e| e.into_inner()) {
                    progress.group_points.insert(group, id);
                }
                r
            }
            Work::Script(s) => {
                let run = script(&s.run, s.timeout, name, action);
                let what = format!("script: {}", s.run);
                step(cs, job, what, Last::both(last), s.continue_on_error, run).await?
            }
            Work::Manual(message) => {
                let _ = cs.raise(Raise {
                    severity: Severity::Warning,
                    kind: "plan.waiting",
                    gateway: None,
                    item: Some(name.to_string()),
                    text: format!(
                        "plan {name} waits for an operator: {message}; then `haven plan resume \
                         {name}`"
                    ),
                });
                let what = format!("{WAITING}{message}");
                let wait = async {
                    waiter.wait().await;
                    Ok("resumed".to_string())
                };
                step(cs, job, what, Last::both(last), false, wait).await?
            }
        };
        job = next;
        progress.done = i + 1;
        keep(cs, job.id, &progress).await?;
        if !go_on {
            break;
        }
    }
    Ok(job)
}

/// Keeps how far the run got (`planrun/<job id>`).
async fn keep(cs: &Arc<ConfigServer>, job: u64, progress: &Progress) -> Result<()> {
    let (cs, progress) = (cs.clone(), progress.clone());
    tokio::task::spawn_blocking(move || cs.set_record(&progress_key(job), Some(&progress))).await?
}

async fn blocking_end(cs: &Arc<ConfigServer>, job: Job, output: &str) -> Result<Job> {
    let (cs, output) = (cs.clone(), output.to_string());
    tokio::task::spawn_blocking(move || cs.end_job_step(job, true, output, true)).await?
}

/// What a machine's call asks: the plan's query, or its group's point; `resumed` when a
/// restart interrupted it (what its master target did already is not asked again).
struct MachineCall<'a> {
    query: &'a str,
    point: Option<u64>,
    planned: bool,
    resumed: bool,
}

/// One machine of a failover step: the call at its master target, then (for a failover) the
/// image and the machine's platform steps.
async fn machine_step(
    cs: &Arc<ConfigServer>,
    job: Job,
    machine: &str,
    action: Action,
    call: MachineCall<'_>,
    last: bool,
    continue_on_error: bool,
) -> Result<(Job, bool)> {
    let MachineCall {
        query,
        point,
        planned,
        resumed,
    } = call;
    // A reprotect or a failback acts where the machine replicates to now, asked afresh.
    let gateway = match action {
        Action::Reprotect | Action::Failback => match crate::reprotect::holder(cs, machine).await {
            Ok(holder) => holder.or_else(|| cs.master_target_of(machine)),
            Err(e) => {
                tracing::warn!(machine, error = %format!("{e:#}"), "finding the master target");
                cs.master_target_of(machine)
            }
        },
        _ => cs.master_target_of(machine),
    };
    let (method, path) = match (action, point) {
        (Action::Failover, Some(id)) => {
            ("POST", format!("/v1/items/{machine}/failover?point={id}"))
        }
        (Action::Failover, None) => ("POST", format!("/v1/items/{machine}/failover?{query}")),
        (Action::TestFailover, Some(id)) => (
            "POST",
            format!("/v1/items/{machine}/test-failover?writable=true&point={id}"),
        ),
        (Action::TestFailover, None) => (
            "POST",
            format!("/v1/items/{machine}/test-failover?writable=true"),
        ),
        (Action::Cleanup, _) => ("DELETE", format!("/v1/items/{machine}/test-failover")),
        (Action::Commit, _) => ("POST", format!("/v1/items/{machine}/commit")),
        (Action::Failback, _) => (
            "POST",
            match planned {
                true => format!("/v1/items/{machine}/failover?in_place=true&planned=true"),
                false => format!("/v1/items/{machine}/failover?in_place=true&point=latest"),
            },
        ),
        (Action::Reprotect, _) => ("POST", String::new()),
    };
    let name = format!(
        "{} {machine} at {}",
        action.name(),
        gateway.as_deref().unwrap_or("?")
    );
    let failover = matches!(action, Action::Failover | Action::Failback);
    // A test failover a target platform runs: the disks as files too, and the test replica
    // deleted before its cleanup.
    let test_replica = matches!(action, Action::TestFailover | Action::Cleanup)
        && crate::machines::Platforms::of(cs, machine).target.is_some();
    let path = match (test_replica, action) {
        (true, Action::TestFailover) => crate::machines::with_files(&path),
        _ => path,
    };
    let call = {
        let (cs, gateway) = (cs.clone(), gateway.clone());
        let (machine, path) = (machine.to_string(), path.clone());
        async move {
            let gateway = gateway.with_context(|| {
                format!("no master target joined to this configuration server holds {machine}")
            })?;
            if action == Action::Reprotect {
                return crate::reprotect::reprotect_machine(&cs, &gateway, &machine, resumed).await;
            }
            if resumed && let Some(done) = done_already(&cs, &gateway, &machine, action).await? {
                return Ok(done);
            }
            if action == Action::Failback && planned {
                // A point first, while the replica still runs: a reprotect's seed is written
                // up to it, so the final point waits only for the writes made since.
                let path = format!("/v1/items/{machine}/points");
                crate::reprotect::call(&cs, &gateway, "POST", path)
                    .await
                    .context("the point before the failback")?;
            }
            let deleted = match (test_replica, action) {
                (true, Action::Cleanup) => crate::machines::delete_test_replica(&cs, &machine)
                    .await?
                    .map(|d| format!("{d}; ")),
                _ => None,
            };
            let body = crate::reprotect::call(&cs, &gateway, method, path).await?;
            Ok(format!(
                "{}{}",
                deleted.unwrap_or_default(),
                crate::deployment::summary(&body)
            ))
        }
    };
    let platform = failover || (test_replica && action == Action::TestFailover);
    let ends_job = Last {
        if_ok: last && !platform,
        if_failed: last,
    };
    let (job, ok) = step(cs, job, name, ends_job, continue_on_error, call).await?;
    let Some(gateway) = gateway.filter(|_| {
        platform
            && job
                .steps
                .last()
                .is_some_and(|s| s.state == JobState::Succeeded)
    }) else {
        return Ok((job, ok));
    };
    let ends = Ends {
        at_last: last,
        on_failure: !continue_on_error,
    };
    let mode = match action {
        Action::TestFailover => crate::machines::Mode::Test,
        Action::Failback => crate::machines::Mode::Failback { planned },
        _ => crate::machines::Mode::Failover { planned },
    };
    let (job, all) = crate::machines::steps(cs, job, &gateway, machine, mode, ends).await?;
    Ok((job, all || continue_on_error))
}

/// Runs a script step's command in a process group of its own; its output (the last
/// [`SCRIPT_OUTPUT`] bytes, read as it comes, never more in memory), or why it failed. At the
/// timeout the whole group is killed: nothing the script started acts after its step.
async fn script(run: &str, timeout: Duration, plan: &str, action: Action) -> Result<String> {
    use tokio::io::AsyncReadExt;
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", run])
        .env("HAVEN_PLAN", plan)
        .env("HAVEN_ACTION", action.name())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run `sh -c {run}`"))?;
    let group = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32));
    let tail = Arc::new(std::sync::Mutex::new(
        std::collections::VecDeque::<u8>::new(),
    ));
    let mut readers = Vec::new();
    let pipes: [Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>; 2] = [
        child.stdout.take().map(|p| Box::new(p) as _),
        child.stderr.take().map(|p| Box::new(p) as _),
    ];
    for mut pipe in pipes.into_iter().flatten() {
        let tail = tail.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf).await {
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                t.extend(&buf[..n]);
                let excess = t.len().saturating_sub(SCRIPT_OUTPUT);
                t.drain(..excess);
            }
        }));
    }
    let status = tokio::time::timeout(timeout, child.wait()).await;
    if status.is_err()
        && let Some(group) = group
    {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    for r in readers {
        // Output a killed group's survivors still hold open is not waited for.
        let _ = tokio::time::timeout(Duration::from_secs(1), r).await;
    }
    let text = {
        let t = tail.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&t.iter().copied().collect::<Vec<u8>>())
            .trim()
            .to_string()
    };
    let status = match status {
        Ok(status) => status.with_context(|| format!("waiting for `sh -c {run}`"))?,
        Err(_) => bail!("did not finish within {timeout:?}; it was stopped: {text}"),
    };
    match status.code() {
        Some(0) => Ok(text),
        Some(code) => bail!("exited with status {code}: {text}"),
        None => bail!("was killed by a signal: {text}"),
    }
}

macro_rules! plan_route {
    ($fn:ident, $path:literal, $action:expr, $what:literal) => {
        run_route!(
            $fn,
            $path,
            Subject::Plan,
            $action,
            $what,
            "The plan's name in the pipeline"
        );
    };
}

macro_rules! run_route {
    ($fn:ident, $path:literal, $subject:expr, $action:expr, $what:literal, $name:literal) => {
        #[doc = $what]
        #[utoipa::path(
            post,
            path = $path,
            tag = "deployment",
            params(("name" = String, Path, description = $name)),
            responses(
                (status = OK, description = "The run's job, started", body = Job),
                (status = NOT_FOUND, description = "No such plan, group or machine, or this gateway is no configuration server", body = ErrorBody),
                (status = CONFLICT, description = "It is running already", body = ErrorBody),
            )
        )]
        pub(crate) async fn $fn(
            Deployment(cs): Deployment,
            Path(name): Path<String>,
            caller: Option<axum::Extension<crate::auth::Caller>>,
        ) -> Result<Pretty<Job>, ApiError> {
            let caller = caller.map_or_else(String::new, |c| c.label());
            start(cs, $subject, name, $action, String::new(), caller).await
        }
    };
}

plan_route!(
    reprotect_plan,
    "/v1/plans/{name}/reprotect",
    Action::Reprotect,
    "Reprotects every failed-over machine of the plan: each replicates back to the site it left."
);
plan_route!(
    failback_plan,
    "/v1/plans/{name}/failback",
    Action::Failback,
    "Fails every machine of the plan back in place, as its failback policy says."
);
run_route!(
    reprotect_group,
    "/v1/groups/{name}/reprotect",
    Subject::Group,
    Action::Reprotect,
    "Reprotects every member of the group.",
    "The group's name in the pipeline"
);
run_route!(
    failback_group,
    "/v1/groups/{name}/failback",
    Subject::Group,
    Action::Failback,
    "Fails every member of the group back in place, as its failback policy says.",
    "The group's name in the pipeline"
);
run_route!(
    reprotect_machine,
    "/v1/machines/{name}/reprotect",
    Subject::Machine,
    Action::Reprotect,
    "Reprotects a failed-over machine: it replicates back to the site it left, onto the disks it left there.",
    "The machine's name (or agent id)"
);
run_route!(
    failback_machine,
    "/v1/machines/{name}/failback",
    Subject::Machine,
    Action::Failback,
    "Fails a reprotected machine back in place, as its failback policy says.",
    "The machine's name (or agent id)"
);

plan_route!(
    test_failover_plan,
    "/v1/plans/{name}/test-failover",
    Action::TestFailover,
    "Starts a test failover of every machine of the plan, step by step."
);
plan_route!(
    cleanup_plan,
    "/v1/plans/{name}/cleanup",
    Action::Cleanup,
    "Ends the test failover of every machine of the plan."
);
plan_route!(
    commit_plan,
    "/v1/plans/{name}/commit",
    Action::Commit,
    "Makes the failover of every machine of the plan final."
);

/// Fails the plan's machines over, step by step, with its scripts and manual steps.
#[utoipa::path(
    post,
    path = "/v1/plans/{name}/failover",
    tag = "deployment",
    params(("name" = String, Path, description = "The plan's name in the pipeline"), PlanFailoverParams),
    responses(
        (status = OK, description = "The plan's job, started", body = Job),
        (status = BAD_REQUEST, description = "A bad `planned` or `point`", body = ErrorBody),
        (status = NOT_FOUND, description = "No such plan, or this gateway is no configuration server", body = ErrorBody),
        (status = CONFLICT, description = "The plan is running", body = ErrorBody),
    )
)]
pub(crate) async fn failover_plan(
    Deployment(cs): Deployment,
    Path(name): Path<String>,
    QueryParams(q): QueryParams<PlanFailoverParams>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
) -> Result<Pretty<Job>, ApiError> {
    let planned = crate::flag("planned", q.planned.as_deref())?;
    let query = match (planned, q.point.as_deref()) {
        (true, _) => "planned=true".to_string(),
        (false, Some(p)) => {
            let _: haven_engine::recovery::PointSel = p
                .parse()
                .map_err(|e| ApiError::bad_request(format!("point `{p}`: {e}")))?;
            format!("point={p}")
        }
        (false, None) => "point=latest".to_string(),
    };
    let caller = caller.map_or_else(String::new, |c| c.label());
    start(cs, Subject::Plan, name, Action::Failover, query, caller).await
}

/// Resumes a plan waiting at a manual step.
#[utoipa::path(
    post,
    path = "/v1/plans/{name}/resume",
    tag = "deployment",
    params(("name" = String, Path, description = "The plan's name in the pipeline")),
    responses(
        (status = OK, description = "Resumed", body = Resumed),
        (status = NOT_FOUND, description = "The plan does not wait at a manual step, or this gateway is no configuration server", body = ErrorBody),
    )
)]
pub(crate) async fn resume_plan(
    Deployment(cs): Deployment,
    Path(name): Path<String>,
) -> Result<Pretty<Resumed>, ApiError> {
    if cs.resume(&run_key(Subject::Plan, &name)) {
        Ok(Pretty(Resumed { resumed: name }))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "plan `{name}` does not wait at a manual step; `haven job list` shows its runs"
            ),
        ))
    }
}

/// A plan that went on past its manual step.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub(crate) struct Resumed {
    /// The plan.
    resumed: String,
}

/// After a restart interrupted `machine`'s call: whether its master target has done `action`
/// already (on every disk), and what it found.
async fn done_already(
    cs: &Arc<ConfigServer>,
    gateway: &str,
    machine: &str,
    action: Action,
) -> Result<Option<String>> {
    use haven_engine::recovery::ItemState;
    let disks = crate::machines::items_of(cs, gateway, machine).await?;
    if disks.is_empty() {
        return Ok(None);
    }
    let done = match action {
        Action::Failover | Action::Failback => disks.iter().all(|i| {
            matches!(
                i.item.state,
                ItemState::FailingOver | ItemState::FailedOver | ItemState::Committed
            )
        }),
        Action::TestFailover => disks.iter().all(|i| i.test_failover.is_some()),
        Action::Cleanup => disks.iter().all(|i| i.test_failover.is_none()),
        Action::Commit => disks.iter().all(|i| i.item.state == ItemState::Committed),
        Action::Reprotect => disks.iter().all(|i| i.item.state == ItemState::Reprotected),
    };
    Ok(done.then(|| {
        format!(
            "done before the configuration server restarted ({machine}: {})",
            disks
                .iter()
                .map(|i| i.item.state.name())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }))
}
