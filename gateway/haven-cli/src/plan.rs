//! `haven plan …`: run the pipeline's recovery plans at the configuration server and follow
//! their jobs.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use ureq::http::Method;

use crate::remote::{Client, default_server};

/// What every run takes.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The plan's name in the pipeline.
    plan: String,
    #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
    api: String,
    /// Start it and print its job's id, without following it.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// The applied pipeline's plans and their steps.
    List {
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
    /// Fails the plan's machines over, step by step, running its scripts and waiting at its
    /// manual steps; follows the job until it ends or waits.
    Failover {
        #[command(flatten)]
        run: RunArgs,
        /// Stop each source first, so nothing is lost.
        #[arg(long, conflicts_with = "point")]
        planned: bool,
        /// A point id for every machine, or `latest` (the default).
        #[arg(long)]
        point: Option<String>,
    },
    /// Starts a test failover of every machine of the plan (scripts and manual steps too).
    TestFailover {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Ends the plan's test failovers.
    Cleanup {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Makes the plan's failovers final.
    Commit {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Resumes a plan waiting at a manual step, and follows it again.
    Resume {
        #[command(flatten)]
        run: RunArgs,
    },
}

/// Longest `haven plan` follows a job before leaving it running.
const FOLLOW: Duration = Duration::from_secs(3600);
/// The name a manual step has while it waits (the configuration server's).
const WAITING: &str = "wait for an operator: ";

pub fn plan(client: &Client, command: PlanCommand) -> Result<()> {
    let (run, path) = match command {
        PlanCommand::List { api } => {
            let body = client.request(&api, Method::GET, "/v1/plans")?;
            let plans: Vec<serde_json::Value> = serde_json::from_str(&body)?;
            for p in &plans {
                println!("{}", p["name"].as_str().unwrap_or("?"));
                for (i, s) in p["steps"].as_array().into_iter().flatten().enumerate() {
                    println!("  {}. {}", i + 1, s.as_str().unwrap_or("?"));
                }
            }
            return Ok(());
        }
        PlanCommand::Failover {
            run,
            planned,
            point,
        } => {
            let query = match (planned, point) {
                (true, _) => "planned=true".to_string(),
                (false, Some(p)) => format!("point={p}"),
                (false, None) => "point=latest".to_string(),
            };
            let path = format!("/v1/plans/{}/failover?{query}", run.plan);
            (run, path)
        }
        PlanCommand::TestFailover { run } => {
            let path = format!("/v1/plans/{}/test-failover", run.plan);
            (run, path)
        }
        PlanCommand::Cleanup { run } => {
            let path = format!("/v1/plans/{}/cleanup", run.plan);
            (run, path)
        }
        PlanCommand::Commit { run } => {
            let path = format!("/v1/plans/{}/commit", run.plan);
            (run, path)
        }
        PlanCommand::Resume { run } => {
            client.request(
                &run.api,
                Method::POST,
                &format!("/v1/plans/{}/resume", run.plan),
            )?;
            println!("plan {} resumed", run.plan);
            if run.no_wait {
                return Ok(());
            }
            // Follow its newest job.
            let body = client.request(&run.api, Method::GET, "/v1/jobs?limit=100")?;
            let jobs: Vec<serde_json::Value> = serde_json::from_str(&body)?;
            let Some(job) = jobs.iter().find(|j| {
                j["item"].as_str() == Some(run.plan.as_str())
                    && j["kind"].as_str().is_some_and(|k| k.starts_with("plan-"))
            }) else {
                return Ok(());
            };
            let Some(id) = job["id"].as_u64() else {
                return Ok(());
            };
            // The plan takes the resume on its own task: until it has, the job may still
            // show the wait just resumed, which is not a new one.
            let resumed = job["steps"]
                .as_array()
                .map(|steps| steps.len())
                .filter(|n| *n > 0)
                .map(|n| n - 1);
            let label = format!("plan {}", run.plan);
            return follow(client, &run.api, &label, id, resumed);
        }
    };
    let body = client.request_with(&run.api, Method::POST, &path, Duration::from_secs(60))?;
    let job: serde_json::Value = serde_json::from_str(&body)?;
    let id = job["id"].as_u64().unwrap_or(0);
    println!("plan {} started: job {id}", run.plan);
    if run.no_wait {
        return Ok(());
    }
    follow(client, &run.api, &format!("plan {}", run.plan), id, None)
}

/// Prints the job's steps as they end, until it ends or waits for an operator (other than a
/// wait at step `resumed`, one an operator has just resumed).
pub(crate) fn follow(
    client: &Client,
    api: &str,
    plan: &str,
    id: u64,
    resumed: Option<usize>,
) -> Result<()> {
    let started = Instant::now();
    let mut shown = 0;
    loop {
        let body = client.request(api, Method::GET, &format!("/v1/jobs/{id}"))?;
        let job: serde_json::Value = serde_json::from_str(&body)?;
        let steps = job["steps"].as_array().cloned().unwrap_or_default();
        for s in steps.iter().skip(shown) {
            let state = s["state"].as_str().unwrap_or("?");
            if state == "running" {
                break;
            }
            let mark = if state == "succeeded" { "ok" } else { "FAILED" };
            let output = s["output"].as_str().unwrap_or("");
            let first = output.lines().next().unwrap_or("");
            println!(
                "  {mark:<6} {} — {first}",
                s["name"].as_str().unwrap_or("?")
            );
            shown += 1;
        }
        match job["state"].as_str() {
            Some("succeeded") => {
                println!("{plan}: done (job {id})");
                return Ok(());
            }
            Some("failed") => bail!(
                "{plan} stopped: {}; `haven job show {id}` has every step",
                steps
                    .last()
                    .and_then(|s| s["output"].as_str())
                    .unwrap_or("")
            ),
            _ => {}
        }
        if let Some(message) = steps
            .last()
            .filter(|s| s["state"] == "running" && Some(steps.len() - 1) != resumed)
            .and_then(|s| s["name"].as_str())
            .and_then(|n| n.strip_prefix(WAITING))
        {
            let name = plan.rsplit(' ').next().unwrap_or(plan);
            println!("{plan} waits for an operator: {message}\nThen: haven plan resume {name}");
            return Ok(());
        }
        if started.elapsed() > FOLLOW {
            println!("{plan} still runs; follow it with `haven job show {id}`");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
