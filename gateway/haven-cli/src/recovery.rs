//! `haven point …` and `haven failover …`: recovery points and failover, through the master
//! target's API (`/v1/items`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use haven_engine::recovery::{ItemInfo, ItemRecord, PointInfo, PointRecord, TestFailoverInfo};
use ureq::http::Method;

use crate::remote::{Client, default_server};

/// Longest the CLI waits for a point the agent takes, or a planned failover's stop.
const AGENT_WAIT: Duration = Duration::from_secs(300);

#[derive(Debug, Subcommand)]
pub enum PointCommand {
    /// Lists an item's recovery points, oldest first.
    List {
        /// The item: machine name, agent id, or MACHINE/DISK.
        item: String,
        /// The master target's API (where the replica and its points are; not the process
        /// server's).
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Takes a recovery point now; prints its id once the master target holds it.
    Create {
        /// The item: machine name, agent id, or MACHINE/DISK.
        item: String,
        /// Application-consistent: the agent runs its quiesce hooks around the tag.
        #[arg(long)]
        app: bool,
        /// The master target's API (where the replica and its points are; not the process
        /// server's).
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
}

/// `haven failover ITEM --point P|latest` (or `--planned`), or one of the subcommands.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct FailoverArgs {
    #[command(subcommand)]
    command: Option<FailoverCommand>,
    /// The item to fail over: machine name, agent id, or MACHINE/DISK.
    item: Option<String>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The point: an id from `haven point list`, or `latest`.
    #[arg(long, default_value = "latest", conflicts_with = "planned")]
    point: String,
    /// Planned failover: the source stops taking writes, everything drains, a final point is
    /// taken and the item fails over to it (nothing is lost).
    #[arg(long)]
    planned: bool,
    /// Write the point into the replica itself instead of a new image: a failback onto the
    /// disk the machine left (the reprotect's seed), which holds the point afterwards.
    #[arg(long)]
    in_place: bool,
    /// Return once materialising has started instead of waiting for the image.
    #[arg(long)]
    no_wait: bool,
    /// The master target's API (where the replica and its points are; not the process
    /// server's).
    #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
    api: String,
}

#[derive(Debug, Subcommand)]
enum FailoverCommand {
    /// Presents a point as a disk over NBD at once, while replication goes on; prints the URI.
    Test {
        /// The item.
        item: String,
        /// The point: an id from `haven point list`, or `latest`.
        #[arg(long, default_value = "latest")]
        point: String,
        /// Accept writes (kept in a scratch overlay, discarded by cleanup).
        #[arg(long)]
        writable: bool,
        /// Also present each disk as a file below the master target's writer storage root
        /// (a VMDK descriptor and its flat extent, or a raw file), for a hypervisor or a tool
        /// that needs a file. A machine whose pipeline names a target platform gets them, and
        /// a `-test` machine on them, without asking.
        #[arg(long)]
        files: bool,
        /// The master target's API (where the replica and its points are; not the process
        /// server's).
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
    /// Ends a test failover and discards what was written to it.
    Cleanup {
        /// The item.
        item: String,
        /// The master target's API (where the replica and its points are; not the process
        /// server's).
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
    /// Makes a failover final: the item's other points are discarded.
    Commit {
        /// The item.
        item: String,
        /// The master target's API (where the replica and its points are; not the process
        /// server's).
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
    /// Shows an item's failover state and its history.
    Show {
        /// The item.
        item: String,
        /// The master target's API (where the replica and its points are; not the process
        /// server's).
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The item as a path segment.
pub(crate) fn seg(item: &str) -> String {
    let mut out = String::new();
    for b in item.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn call<T: serde::de::DeserializeOwned>(
    client: &Client,
    api: &str,
    method: Method,
    path: &str,
    timeout: Duration,
) -> Result<T> {
    let body = client.request_with(api, method, path, timeout)?;
    serde_json::from_str(&body).with_context(|| format!("{api}{path}: unexpected answer"))
}

pub(crate) fn time(ms: u64) -> String {
    let secs = ms / 1000;
    let (d, s) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = d as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

pub fn point(client: &Client, command: PointCommand) -> Result<()> {
    match command {
        PointCommand::List { item, api, json } => {
            let path = format!("/v1/items/{}/points", seg(&item));
            let points: Vec<PointInfo> =
                call(client, &api, Method::GET, &path, Duration::from_secs(10))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&points)?);
                return Ok(());
            }
            println!(
                "{:<16} {:>10} {:<26} {:<6} {:<10}",
                "POINT", "SEQ", "SOURCE TIME", "KIND", "STATE"
            );
            for p in &points {
                println!(
                    "{:<16} {:>10} {:<26} {:<6} {:<10}",
                    p.record.point,
                    p.record.seq,
                    time(p.record.source_time_ms),
                    kind(&p.record),
                    p.state
                );
            }
            if points.is_empty() {
                println!("(no points)");
            }
            Ok(())
        }
        PointCommand::Create { item, app, api } => {
            let kind = if app { "app" } else { "crash" };
            let path = format!("/v1/items/{}/points?kind={kind}", seg(&item));
            let p: PointRecord = call(client, &api, Method::POST, &path, AGENT_WAIT)?;
            println!("{}", p.point);
            eprintln!(
                "point {} ({kind}, taken {}, seq {}) is at the master target",
                p.point,
                time(p.source_time_ms),
                p.seq
            );
            Ok(())
        }
    }
}

fn kind(p: &PointRecord) -> &'static str {
    match p.kind {
        haven_engine::recovery::PointKind::Crash => "crash",
        haven_engine::recovery::PointKind::App => "app",
    }
}

pub fn failover(client: &Client, args: FailoverArgs) -> Result<()> {
    match args.command {
        Some(FailoverCommand::Test {
            item,
            point,
            writable,
            files,
            api,
        }) => {
            let path = format!(
                "/v1/items/{}/test-failover?point={}&writable={writable}&files={files}",
                seg(&item),
                seg(&point)
            );
            let t: TestFailoverInfo =
                call(client, &api, Method::POST, &path, Duration::from_secs(30))?;
            // A machine of several disks has an export per disk, in disk order.
            let disks = item_disks(client, &api, &item)?;
            if disks.len() > 1 {
                for d in &disks {
                    if let Some(t) = &d.test_failover {
                        println!("{}", t.uri);
                    }
                }
            } else {
                println!("{}", t.uri);
            }
            // Disks as files (a machine a target platform runs gets them, and the configuration
            // server defines `<name>-test` on them: `haven job list` follows it).
            for d in &disks {
                if let Some(image) = d.test_failover.as_ref().and_then(|t| t.image.as_ref()) {
                    eprintln!("disk {} as a file: {image}", d.disk);
                }
            }
            eprintln!(
                "test failover of {item} at point {} (taken {}), {}; replication goes on. End it \
                 with `haven failover cleanup {item}`",
                t.point.point,
                time(t.point.source_time_ms),
                if t.writable {
                    "writable (writes go to a scratch overlay)"
                } else {
                    "read-only"
                }
            );
            Ok(())
        }
        Some(FailoverCommand::Cleanup { item, api }) => {
            let path = format!("/v1/items/{}/test-failover", seg(&item));
            let t: TestFailoverInfo =
                call(client, &api, Method::DELETE, &path, Duration::from_secs(30))?;
            println!(
                "test failover of {item} at point {} cleaned up",
                t.point.point
            );
            Ok(())
        }
        Some(FailoverCommand::Commit { item, api }) => {
            let path = format!("/v1/items/{}/commit", seg(&item));
            let r: ItemRecord = call(client, &api, Method::POST, &path, Duration::from_secs(30))?;
            println!("{item}: {}", r.state.name());
            Ok(())
        }
        Some(FailoverCommand::Show { item, api, json }) => {
            let path = format!("/v1/items/{}", seg(&item));
            let i: ItemInfo = call(client, &api, Method::GET, &path, Duration::from_secs(10))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                show(&i);
            }
            Ok(())
        }
        None => {
            let Some(item) = args.item else {
                bail!(
                    "name the item to fail over (`haven failover ITEM --point P|latest`), or use \
                     `haven failover test|cleanup|commit|show`"
                );
            };
            let run = args.run;
            let mut path = if run.planned {
                format!("/v1/items/{}/failover?planned=true", seg(&item))
            } else {
                format!(
                    "/v1/items/{}/failover?point={}",
                    seg(&item),
                    seg(&run.point)
                )
            };
            if run.in_place {
                path.push_str("&in_place=true");
            }
            let r: ItemRecord = call(client, &run.api, Method::POST, &path, AGENT_WAIT)?;
            let point = r.point.map_or(0, |p| p.point);
            eprintln!("{item}: failing over to point {point}");
            if run.no_wait {
                println!("{}", r.state.name());
                return Ok(());
            }
            let started = Instant::now();
            let mut failing_since: Option<Instant> = None;
            loop {
                std::thread::sleep(Duration::from_millis(100));
                // A gateway restarting meanwhile resumes the failover: keep asking a while.
                let disks = match item_disks(client, &run.api, &item) {
                    Ok(d) if !d.is_empty() => {
                        failing_since = None;
                        d
                    }
                    Ok(_) => bail!("{item}: no such item any more"),
                    Err(e) if failing_since.is_some_and(|t| t.elapsed() > AGENT_WAIT) => {
                        return Err(e.context(format!(
                            "{item}: the failover was started; follow it with `haven failover \
                             show {item}`"
                        )));
                    }
                    Err(_) => {
                        failing_since.get_or_insert_with(Instant::now);
                        continue;
                    }
                };
                use haven_engine::recovery::ItemState;
                if let Some(i) = disks
                    .iter()
                    .find(|i| i.item.state == ItemState::FailoverFailed)
                {
                    let cause = i
                        .item
                        .history
                        .last()
                        .map(|t| t.cause.clone())
                        .unwrap_or_default();
                    bail!("{item}: failover of disk {} failed: {cause}", i.disk);
                }
                if disks.iter().all(|i| i.item.state == ItemState::FailedOver) {
                    // One image per disk, in disk order.
                    for i in &disks {
                        println!("{}", i.item.image.clone().unwrap_or_default());
                    }
                    eprintln!(
                        "{item}: failed over to point {point} in {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
            }
        }
    }
}

/// The items `item` names (every disk of a machine, or the one disk of `MACHINE/DISK`), in
/// disk order, as the master target lists them.
fn item_disks(client: &Client, api: &str, item: &str) -> Result<Vec<ItemInfo>> {
    let all: Vec<ItemInfo> = call(
        client,
        api,
        Method::GET,
        "/v1/items",
        Duration::from_secs(10),
    )?;
    let mut ours: Vec<ItemInfo> = all.into_iter().filter(|i| i.named(item)).collect();
    // As the master target reads the name.
    haven_engine::recovery::current(&mut ours, |i| i.item.state);
    ours.sort_by_key(|i| (i.agent_id.clone(), i.disk));
    Ok(ours)
}

/// `haven reprotect ITEM|GROUP|PLAN`: failed-over machines replicate back to the site they
/// left.
///
/// Through a configuration server, a name alone is enough: it finds where each machine goes,
/// the agent enrolled for it where it runs, and the disks it left there, and runs the
/// reprotect as a job. `--agent`, `--to` and `--target` name them instead, for one machine.
#[derive(Debug, Args)]
pub struct ReprotectArgs {
    /// A failed-over machine (name or agent id), or, through a configuration server, a group
    /// or a plan of its pipeline.
    item: String,
    /// The agent that protects the machine where it runs now, enrolled with a process server
    /// of this site (the id `haven-agent enroll` printed).
    #[arg(long, requires_all = ["to", "targets"])]
    agent: Option<String>,
    /// The master target at the site the machine left, which keeps the replica now: its API
    /// (`https://…`), or, through a configuration server, its gateway name.
    #[arg(long, requires_all = ["agent", "targets"])]
    to: Option<String>,
    /// The disk the machine left there, below that master target's writer storage root: the
    /// replica starts from it and only differences are sent. Once per disk, in disk order.
    #[arg(long = "target", requires_all = ["agent", "to"])]
    targets: Vec<String>,
    /// The master target where the machine failed over (its API), or the configuration
    /// server.
    #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
    api: String,
    /// Start the job and print its id, without following it (configuration server).
    #[arg(long)]
    no_wait: bool,
}

/// `haven failback ITEM|GROUP|PLAN`: reprotected machines fail back in place, as their
/// failback policies say (through a configuration server).
#[derive(Debug, Args)]
pub struct FailbackArgs {
    /// A reprotected machine (name or agent id), a group or a plan of the pipeline.
    item: String,
    /// The configuration server.
    #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
    api: String,
    /// Start the job and print its id, without following it.
    #[arg(long)]
    no_wait: bool,
}

pub fn failback(client: &Client, args: FailbackArgs) -> Result<()> {
    run_at_server(client, &args.api, &args.item, "failback", args.no_wait)
}

/// Runs `action` (`reprotect`, `failback`) of the plan, group or machine `name` at the
/// configuration server `api`, and follows its job.
fn run_at_server(
    client: &Client,
    api: &str,
    name: &str,
    action: &str,
    no_wait: bool,
) -> Result<()> {
    let plans: Vec<serde_json::Value> = call(
        client,
        api,
        Method::GET,
        "/v1/plans",
        Duration::from_secs(10),
    )
    .with_context(|| {
        format!("{api} is no configuration server: `haven {action} {name}` needs one")
    })?;
    let is_plan = plans.iter().any(|p| p["name"].as_str() == Some(name));
    // No pipeline applied: no groups.
    let pipeline: Option<serde_json::Value> = call(
        client,
        api,
        Method::GET,
        "/v1/pipeline",
        Duration::from_secs(10),
    )
    .ok();
    let is_group = pipeline.as_ref().is_some_and(|p| {
        p["pipeline"]["group"]
            .as_array()
            .is_some_and(|gs| gs.iter().any(|g| g["name"].as_str() == Some(name)))
    });
    let (what, path) = match (is_plan, is_group) {
        (true, true) => {
            bail!("{name} names a plan and a group of the pipeline: rename one of them")
        }
        (true, false) => ("plan", format!("/v1/plans/{}/{action}", seg(name))),
        (false, true) => ("group", format!("/v1/groups/{}/{action}", seg(name))),
        (false, false) => ("machine", format!("/v1/machines/{}/{action}", seg(name))),
    };
    let job: serde_json::Value = call(client, api, Method::POST, &path, Duration::from_secs(60))?;
    let id = job["id"].as_u64().unwrap_or(0);
    let label = format!("{action} of {what} {name}");
    eprintln!("{label} started: job {id}");
    if no_wait {
        return Ok(());
    }
    crate::plan::follow(client, api, &label, id, None)
}

pub fn reprotect(client: &Client, args: ReprotectArgs) -> Result<()> {
    use haven_engine::recovery::{ItemState, SeedRecord};
    let (Some(agent), Some(to)) = (&args.agent, &args.to) else {
        return run_at_server(client, &args.api, &args.item, "reprotect", args.no_wait);
    };
    let item = &args.item;
    let disks = item_disks(client, &args.api, item)?;
    if disks.is_empty() {
        bail!("{item}: no such item at {}", args.api);
    }
    if let Some(i) = disks
        .iter()
        .find(|i| !matches!(i.item.state, ItemState::FailedOver | ItemState::Committed))
    {
        bail!(
            "{item} disk {} is {}: only a failed-over machine is reprotected (`haven failover \
                 {item}` first)",
            i.disk,
            i.item.state.name()
        );
    }
    if args.targets.len() != disks.len() {
        bail!(
            "{item} has {} disks but {} --target were given: name the disk it left at the other \
                 site for each, in disk order",
            disks.len(),
            args.targets.len()
        );
    }
    // An API address, or a gateway the configuration server (`--server`) reaches.
    let direct = to.starts_with("http://") || to.starts_with("https://");
    let (seed_api, via) = match direct {
        true => (to.as_str(), String::new()),
        false => (args.api.as_str(), format!("&gateway={}", seg(to))),
    };
    // The seeds first: a refusal there leaves this side as it was.
    for (i, target) in disks.iter().zip(&args.targets) {
        let path = format!(
            "/v1/seeds?agent_id={}&disk={}&path={}&machine_name={}&from={}{via}",
            seg(agent),
            i.disk,
            seg(target),
            seg(&i.machine_name),
            seg(&args.api)
        );
        let s: SeedRecord = call(
            client,
            seed_api,
            Method::POST,
            &path,
            Duration::from_secs(30),
        )?;
        eprintln!(
            "{item} disk {}: {} replicates onto {} at {to}",
            i.disk, s.spec.agent_id, s.spec.path
        );
    }
    // By the name given: the job and event of a configuration server carry it.
    let path = format!("/v1/items/{}/reprotect?to={}", seg(item), seg(to));
    let _: ItemRecord = call(
        client,
        &args.api,
        Method::POST,
        &path,
        Duration::from_secs(30),
    )?;
    for i in &disks {
        println!("{}", i.item.image.clone().unwrap_or_default());
    }
    eprintln!(
        "{item}: reprotected. Start the agent on the disks above (in this order) with \
             `haven-agent protect --seeded --disk IMAGE …`: it compares them with the disks at {to} \
             and sends only what differs; they stay as they are until the first point after that."
    );
    Ok(())
}

fn show(i: &ItemInfo) {
    println!(
        "{} disk {} ({}): {}",
        i.machine_name,
        i.disk,
        i.agent_id,
        i.item.state.name()
    );
    if let Some(p) = &i.item.point {
        println!("  point: {} (taken {})", p.point, time(p.source_time_ms));
    }
    if let Some(img) = &i.item.image {
        println!("  image: {img}");
    }
    if let Some(to) = &i.item.reprotected_to {
        println!("  replicates to: {to}");
    }
    if let Some(t) = &i.test_failover {
        println!("  test failover: {} (point {})", t.uri, t.point.point);
    }
    println!("  points held: {}", i.points);
    for t in &i.item.history {
        println!(
            "  {}  {} -> {}: {}",
            time(t.at_ms),
            t.from.name(),
            t.to.name(),
            t.cause
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_utc() {
        assert_eq!(time(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(time(1_795_866_245_123), "2026-11-28 11:44:05.123Z");
    }

    #[test]
    fn items_are_escaped_as_one_segment() {
        assert_eq!(seg("web01/2"), "web01%2F2");
        assert_eq!(seg("a b"), "a%20b");
    }
}
