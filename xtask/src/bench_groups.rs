//! `cargo xtask bench groups`: what a group point costs the workload. Three machines (one
//! agent each, release binaries) in one consistency group replicate through one process server
//! to one master target; on every member a writer does 4 KiB writes at random offsets, one at
//! a time, paced at [`RATE`] a second, timing each. First without group points, then with one every
//! [`POINT_EVERY`] (`haven group point`, hold deadline 500 ms): the write latencies of both
//! runs (p50, p99, max), their ratio, and how long the group points held the writes.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use haven_e2e::nbd::NbdClient;
use haven_e2e::{Agent, Cluster, ClusterOptions, Rng, mixed_disk};

use crate::bench_points::{Out, dur, percentile, target_dir};

const MEMBERS: [&str; 3] = ["app1", "app2", "app3"];
/// How long each run writes.
const RUN: Duration = Duration::from_secs(15);
/// Time between group points in the second run.
const POINT_EVERY: Duration = Duration::from_millis(500);
const DISK: u64 = 256 << 20;
/// Writes per second per machine (12 MiB/s of 4 KiB writes in all).
const RATE: u64 = 1000;

/// Runs the writers on `ports` for [`RUN`]; every write's latency, in seconds, sorted.
fn writers(ports: &[u16]) -> Result<Vec<f64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (n, port) in ports.iter().enumerate() {
        let (stop, port) = (Arc::clone(&stop), *port);
        threads.push(std::thread::spawn(move || -> Result<Vec<f64>> {
            let mut client = NbdClient::connect(&format!("127.0.0.1:{port}"), "disk")?;
            let mut rng = Rng(0x9e37 + n as u64);
            let mut out = Vec::new();
            let block = vec![0x5au8; 4096];
            let begun = Instant::now();
            while !stop.load(Ordering::Acquire) {
                let offset = rng.below(DISK / 4096) * 4096;
                let started = Instant::now();
                client.write(offset, &block)?;
                out.push(started.elapsed().as_secs_f64());
                // Paced, so that replication keeps up (the change log never fills).
                let due = begun + Duration::from_secs_f64(out.len() as f64 / RATE as f64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            Ok(out)
        }));
    }
    std::thread::sleep(RUN);
    stop.store(true, Ordering::Release);
    let mut all = Vec::new();
    for t in threads {
        all.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))??,
        );
    }
    all.sort_by(f64::total_cmp);
    Ok(all)
}

/// What the group points of a run did: how long each took, how long each held the writes
/// (seconds, sorted), how many failed, and why the last one did.
type Pointed = (Vec<f64>, Vec<f64>, usize, Option<String>);

/// Seconds as milliseconds, two decimals.
fn ms(s: f64) -> String {
    format!("{:.2}ms", s * 1000.0)
}

fn three(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let d = ms;
    format!(
        "{}/{}/{}",
        d(percentile(v, 0.5)),
        d(percentile(v, 0.99)),
        d(percentile(v, 1.0))
    )
}

pub fn run(root: &Path) -> Result<()> {
    let target = target_dir(root);
    let bins = target.join("release");
    let dir = target.join("bench-groups");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let disks: Vec<_> = MEMBERS
        .iter()
        .map(|m| dir.join(format!("{m}.raw")))
        .collect();
    for (n, d) in disks.iter().enumerate() {
        mixed_disk(d, DISK, 60 + n as u64)?;
    }
    let c = Cluster::start(
        &dir,
        &disks[0],
        ClusterOptions {
            config_server: true,
            machine: Some(MEMBERS[0].into()),
            retention: Some("window = \"1h\"".into()),
            bin_dir: Some(bins.clone()),
            ..ClusterOptions::default()
        },
    )?;
    let cs = c.cs.as_ref().context("no configuration server")?;
    let mut others = Vec::new();
    for (m, disk) in MEMBERS.iter().zip(&disks).skip(1) {
        others.push(Agent::enroll_and_start(
            &bins,
            &c.ps,
            &dir.join(format!("agent-{m}")),
            disk,
            m,
            Vec::new(),
        )?);
    }
    // The machines' own points (every 5 s) run in both runs alike.
    let mut pipeline = format!(
        "{}[[policy]]\nname = \"own\"\nkind = \"replication\"\n\
         crash_consistent_interval = \"5s\"\napp_consistent_interval = \"off\"\n\n\
         [[group]]\nname = \"app\"\nmachines = [\"app1\", \"app2\", \"app3\"]\n",
        c.pipeline_head("bench-groups")?
    );
    for m in MEMBERS {
        pipeline.push_str(&format!(
            "\n[[machine]]\nname = \"{m}\"\nsite = \"primary\"\npolicy = \"own\"\n\
             process_server = \"ps1\"\nmaster_target = \"mt1\"\nwriter = \"raw\"\n"
        ));
    }
    let file = dir.join("bench-groups.toml");
    std::fs::write(&file, pipeline)?;
    cs.haven(&["apply", file.to_str().context("path")?])?;
    eprintln!(
        "waiting for the initial sync of {} machines …",
        MEMBERS.len()
    );
    for m in MEMBERS {
        haven_e2e::wait_for_point(cs, m)?;
    }
    let ports: Vec<u16> = std::iter::once(c.agent.nbd_port)
        .chain(others.iter().map(|a| a.nbd_port))
        .collect();

    eprintln!("1/2 writes without group points …");
    let without = writers(&ports)?;
    eprintln!("2/2 writes with a group point every {POINT_EVERY:?} …");
    let stop = Arc::new(AtomicBool::new(false));
    let pointer = {
        let stop = Arc::clone(&stop);
        let mut cmd = cs.haven_command();
        cmd.args(["group", "point", "app", "--api", &cs.api]);
        std::thread::spawn(move || -> Result<Pointed> {
            let (mut took, mut held, mut failed, mut why) = (Vec::new(), Vec::new(), 0, None);
            while !stop.load(Ordering::Acquire) {
                let started = Instant::now();
                let out = cmd.output()?;
                if out.status.success() {
                    took.push(started.elapsed().as_secs_f64());
                    // "… writes held at most N ms" on standard error.
                    let text = String::from_utf8_lossy(&out.stderr);
                    if let Some(ms) = text
                        .split("held at most ")
                        .nth(1)
                        .and_then(|t| t.split_whitespace().next())
                        .and_then(|n| n.parse::<f64>().ok())
                    {
                        held.push(ms / 1000.0);
                    }
                } else {
                    failed += 1;
                    why = Some(String::from_utf8_lossy(&out.stderr).trim().to_string());
                }
                std::thread::sleep(POINT_EVERY.saturating_sub(started.elapsed()));
            }
            took.sort_by(f64::total_cmp);
            held.sort_by(f64::total_cmp);
            Ok((took, held, failed, why))
        })
    };
    let with = writers(&ports)?;
    stop.store(true, Ordering::Release);
    let (took, held, failed, why) = pointer
        .join()
        .map_err(|_| anyhow::anyhow!("the point thread panicked"))??;

    let mut out = Out(String::new());
    out.line(format!(
        "Group points: {} machines, one agent each, 4 KiB writes at random offsets one at a time \
         per machine ({} a second each), {}s per run",
        MEMBERS.len(),
        RATE,
        RUN.as_secs()
    ));
    out.line(format!(
        "{:<28} {:>8}  {:>26}",
        "run", "writes", "write latency p50/p99/max"
    ));
    out.line(format!(
        "{:<28} {:>8}  {:>26}",
        "without group points",
        without.len(),
        three(&without)
    ));
    out.line(format!(
        "{:<28} {:>8}  {:>26}",
        format!("group point every {}", dur(POINT_EVERY)),
        with.len(),
        three(&with)
    ));
    out.line(format!(
        "added write latency: p99 {} → {} (x{:.2}); {} group points, {} failed",
        ms(percentile(&without, 0.99)),
        ms(percentile(&with, 0.99)),
        percentile(&with, 0.99) / percentile(&without, 0.99),
        took.len(),
        failed,
    ));
    out.line(format!(
        "hold window p50/p99/max {} (first hold asked to last release answered: the longest \
         any write waited); whole group point p50/p99/max {} (the CLI's call until every \
         member's tags are at the master target)",
        three(&held),
        three(&took)
    ));
    if let Some(why) = why {
        out.line(format!("the last failed group point: {why}"));
    }
    std::fs::write(dir.join("results.txt"), &out.0)?;
    drop(others);
    drop(c);
    Ok(())
}
