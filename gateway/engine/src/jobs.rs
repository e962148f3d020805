//! Jobs: what the configuration server does for an operator that changes something — a test
//! failover, its cleanup, a failover, a commit, a point — each with its steps, their times,
//! their outcome and what they said.
//!
//! Jobs are kept in the configuration server's redb (`job/<id>`, the newest [`KEEP`]), written
//! when a job starts and when each step ends, so `haven job show` tells what happened after
//! any restart. A job still running when the configuration server stopped cannot be continued
//! (the gateway that ran its step answered a connection that is gone): it is marked failed as
//! interrupted when the server starts, with what to check — except a recovery plan's run
//! (kind `plan-…`, and a group's or a machine's reprotect or failback, run as plans:
//! `group-…`, `machine-…`): its interrupted step is marked so, the job stays running, and the
//! API resumes it at that step ([`Jobs::take_interrupted_plans`]).

use std::sync::Mutex;

use anyhow::Result;
use haven_store::StateDb;
use serde::{Deserialize, Serialize};

use crate::ingest::lock;
use crate::now_ms;

/// Jobs kept.
pub const KEEP: u64 = 10_000;

/// Where a job or a step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
}

/// One step of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// What the step does, e.g. `POST /v1/items/web01/failover at mt1`.
    pub name: String,
    pub state: JobState,
    /// When it started and ended, ms since the Unix epoch.
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    /// What it answered: the result, or why it failed.
    pub output: String,
}

/// A job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Grows with every job.
    pub id: u64,
    /// `test-failover`, `test-failover-cleanup`, `failover`, `commit`, `point`, `reprotect`.
    pub kind: String,
    /// The item it acts on.
    pub item: Option<String>,
    /// The gateway that ran it.
    pub gateway: Option<String>,
    /// Who asked (the API token's name and id).
    pub caller: String,
    pub state: JobState,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    pub steps: Vec<Step>,
}

impl Job {
    /// The output of its last step.
    pub fn outcome(&self) -> &str {
        self.steps.last().map_or("", |s| s.output.as_str())
    }
}

/// What a new job is: its kind, what it acts on, who asked, and its first step.
#[derive(Clone, Copy, Debug)]
pub struct NewJob<'a> {
    pub kind: &'a str,
    pub item: Option<&'a str>,
    pub gateway: Option<&'a str>,
    pub caller: &'a str,
    pub step: &'a str,
}

/// The configuration server's jobs.
#[derive(Debug)]
pub struct Jobs {
    next: Mutex<u64>,
    /// Plan runs that were running at the start, to resume.
    interrupted_plans: Mutex<Vec<Job>>,
}

/// The output of a step a restart interrupted.
fn interrupted(output: &str, then: &str) -> String {
    format!(
        "interrupted: the configuration server stopped during this step; {then}{}",
        if output.is_empty() {
            String::new()
        } else {
            format!(" ({output})")
        }
    )
}

fn key(id: u64) -> String {
    format!("job/{id:020}")
}

impl Jobs {
    /// Continues the jobs kept in `state`; a job that was running is marked interrupted, and a
    /// plan's run kept for [`Jobs::take_interrupted_plans`].
    pub fn open(state: &StateDb) -> Result<Jobs> {
        let kept: Vec<(String, Job)> = state.json_with_prefix("job/")?;
        let last = kept.last().map_or(0, |(_, j)| j.id);
        let now = now_ms();
        let mut plans = Vec::new();
        for (k, mut job) in kept {
            if job.state != JobState::Running {
                continue;
            }
            let plan = ["plan-", "group-", "machine-"]
                .iter()
                .any(|p| job.kind.starts_with(p));
            let step = job.steps.iter().rposition(|s| s.state == JobState::Running);
            if let Some(s) = step.and_then(|i| job.steps.get_mut(i)) {
                s.state = JobState::Failed;
                s.ended_ms = Some(now);
                s.output = if plan {
                    interrupted(&s.output, "the plan goes on from here")
                } else {
                    interrupted(
                        &s.output,
                        "its gateway may have finished it — check the item's state (`haven \
                         status`) before running it again",
                    )
                };
            }
            if plan {
                state.put_json(&k, &job)?;
                plans.push(job);
                continue;
            }
            job.state = JobState::Failed;
            job.ended_ms = Some(now);
            state.put_json(&k, &job)?;
        }
        Ok(Jobs {
            next: Mutex::new(last + 1),
            interrupted_plans: Mutex::new(plans),
        })
    }

    /// The plan runs a restart interrupted (running, their interrupted step failed), once.
    pub fn take_interrupted_plans(&self) -> Vec<Job> {
        std::mem::take(&mut *lock(&self.interrupted_plans))
    }

    /// Starts a job with its first step running.
    pub fn start(&self, state: &StateDb, new: NewJob<'_>) -> Result<Job> {
        let mut next = lock(&self.next);
        let now = now_ms();
        let job = Job {
            id: *next,
            kind: new.kind.to_string(),
            item: new.item.map(str::to_string),
            gateway: new.gateway.map(str::to_string),
            caller: new.caller.to_string(),
            state: JobState::Running,
            started_ms: now,
            ended_ms: None,
            steps: vec![Step {
                name: new.step.to_string(),
                state: JobState::Running,
                started_ms: now,
                ended_ms: None,
                output: String::new(),
            }],
        };
        let removes = match job.id.checked_sub(KEEP) {
            Some(old) if old > 0 => vec![key(old)],
            _ => Vec::new(),
        };
        state.update_json(&[(key(job.id), &job)], &removes)?;
        *next += 1;
        Ok(job)
    }

    /// Ends the running step of `job` with `ok` and `output`; the job ends with it when `last`,
    /// or when the step failed.
    pub fn end_step(
        &self,
        state: &StateDb,
        job: Job,
        ok: bool,
        output: String,
        last: bool,
    ) -> Result<Job> {
        let end = (last || !ok).then_some(ok);
        self.end_step_with(state, job, ok, output, end)
    }

    /// Ends the running step of `job` (`ok` or failed); the job ends with it when `end` says
    /// how (`Some(true)`: succeeded, also after a failed step a plan tolerates), else it keeps
    /// running.
    pub fn end_step_with(
        &self,
        state: &StateDb,
        mut job: Job,
        ok: bool,
        output: String,
        end: Option<bool>,
    ) -> Result<Job> {
        let now = now_ms();
        let outcome = if ok {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        if let Some(s) = job.steps.iter_mut().rfind(|s| s.state == JobState::Running) {
            s.state = outcome;
            s.ended_ms = Some(now);
            s.output = output;
        }
        if let Some(job_ok) = end {
            job.state = match job_ok {
                true => JobState::Succeeded,
                false => JobState::Failed,
            };
            job.ended_ms = Some(now);
        }
        state.put_json(&key(job.id), &job)?;
        Ok(job)
    }

    /// Starts the next step of a running `job`.
    pub fn begin_step(&self, state: &StateDb, mut job: Job, name: &str) -> Result<Job> {
        job.steps.push(Step {
            name: name.to_string(),
            state: JobState::Running,
            started_ms: now_ms(),
            ended_ms: None,
            output: String::new(),
        });
        state.put_json(&key(job.id), &job)?;
        Ok(job)
    }

    /// Jobs newest first, at most `limit`.
    pub fn list(&self, state: &StateDb, limit: usize) -> Result<Vec<Job>> {
        let mut jobs: Vec<Job> = state
            .json_with_prefix::<Job>("job/")?
            .into_iter()
            .map(|(_, j)| j)
            .collect();
        jobs.reverse();
        jobs.truncate(limit);
        Ok(jobs)
    }

    /// The job `id`, if kept.
    pub fn get(&self, state: &StateDb, id: u64) -> Result<Option<Job>> {
        Ok(state.get_json(&key(id))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_running_at_a_restart_is_failed_as_interrupted() {
        let dir = tempfile::tempdir().expect("a folder");
        let path = dir.path().join("state.redb");
        {
            let state = StateDb::open(&path).expect("state");
            let jobs = Jobs::open(&state).expect("jobs");
            let new = |kind, step| NewJob {
                kind,
                item: Some("web01"),
                gateway: Some("mt1"),
                caller: "ops (1)",
                step,
            };
            let done = jobs
                .start(&state, new("point", "take a point"))
                .expect("a job");
            let done = jobs
                .end_step(&state, done, true, "point 7".into(), true)
                .expect("ended");
            assert_eq!(done.state, JobState::Succeeded);
            jobs.start(&state, new("failover", "fail over"))
                .expect("a job");
        }
        let state = StateDb::open(&path).expect("state");
        let jobs = Jobs::open(&state).expect("jobs");
        let list = jobs.list(&state, 10).expect("jobs");
        assert_eq!(list.iter().map(|j| j.id).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(list[0].state, JobState::Failed);
        assert!(
            list[0].outcome().starts_with("interrupted"),
            "{:?}",
            list[0]
        );
        assert_eq!(list[1].outcome(), "point 7");
        let next = jobs
            .start(
                &state,
                NewJob {
                    kind: "commit",
                    item: None,
                    gateway: None,
                    caller: "",
                    step: "commit",
                },
            )
            .expect("a job");
        assert_eq!(next.id, 3);
        assert_eq!(
            jobs.get(&state, 1).expect("read").map(|j| j.state),
            Some(JobState::Succeeded)
        );
    }
}
