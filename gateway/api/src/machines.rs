//! The platform steps of a failover run through the configuration server: for a machine whose
//! pipeline entry names a source `platform` and/or a `target_platform`, once the master target
//! has materialised the point the job goes on with
//!
//! 1. `power off` of the source machine at its platform (planned failover only, after the
//!    agent's final point: nothing written later exists);
//! 2. `define replica` at the target platform: the source's CPUs, memory and network adapters
//!    (each network mapped by the pipeline's `[[network_mapping]]` of the two sites; `cpus`,
//!    `memory_mib`, `nicN_address` from the machine's `target` settings win), its disks the
//!    failover images of every disk (disk N of the agent as the source's N-th disk), each
//!    addressed as `[DATASTORE] FOLDER/IMAGE` (`datastore`, `datastore_folder`) — so the
//!    master target's writer keeps replicas in that folder of the datastore;
//! 3. `power on` of the replica (unless `power_on = "false"`).
//!
//! The replica machine is kept (`replica/<machine>`), for the cleanup and the history. Each
//! step is a step of the failover's job; a failing step ends the job with its reason.
//!
//! A test failover of such a machine (the whole machine) asks the master target to present
//! each disk, writable, as files as well (`files=true`: a VMDK descriptor and its flat extent on the
//! writable overlay, in `test-failover/<agent>/disk<N>/` below the writer's storage root, which
//! is the datastore folder), then defines `<name>-test` on them, its adapters on each
//! mapping's `test_network`, and powers it on; kept as `test-replica/<machine>`. Its cleanup
//! deletes that machine at the platform first (its disks stay: they are the master target's),
//! and only then asks the master target to end the test failover: a machine that cannot be
//! deleted keeps its disks, and the cleanup can be run again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use haven_engine::config_server::ConfigServer;
use haven_engine::jobs::{Job, JobState};
use haven_engine::recovery::ItemInfo;
use haven_host::platform::{
    Machine, PowerOffMode, ReplicaDisk, ReplicaMachine, ReplicaNic, ReplicaSpec,
};
use haven_net::join::ApiRequest;
use haven_pipeline::model::Pipeline;
use serde::{Deserialize, Serialize};

/// Longest the job waits for the master target to finish materialising the point.
const MATERIALISE_TIMEOUT: Duration = Duration::from_secs(3600);

/// A replica machine an adapter defined, as kept per protected machine.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReplicaRecord {
    /// The adapter that defined it.
    pub platform: String,
    /// What the adapter returned.
    pub machine: ReplicaMachine,
    /// What it was asked to define.
    pub spec: ReplicaSpec,
    /// When, ms since the Unix epoch.
    pub defined_ms: u64,
}

/// `[machine.target]` settings Haven itself uses; every other one (and `datastore`) is an
/// option of the replica for the target adapter, `_` written `-` (`resource_pool` →
/// `resource-pool`), which refuses the ones it does not know.
fn haven_setting(key: &str) -> bool {
    matches!(
        key,
        "name" | "cpus" | "memory_mib" | "datastore_folder" | "power_on"
    ) || key
        .strip_prefix("nic")
        .and_then(|k| k.strip_suffix("_address"))
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// The platforms the applied pipeline names for a machine.
#[derive(Clone, Debug, Default)]
pub(crate) struct Platforms {
    /// Where it runs (`platform`): powered off at a planned failover, quiescing its app points.
    pub source: Option<String>,
    /// Where its replica runs (`target_platform`): defined at failover, and at test failover.
    pub target: Option<String>,
}

impl Platforms {
    /// Machine `name`'s, per the applied pipeline (none for a machine it does not list).
    pub(crate) fn of(cs: &ConfigServer, name: &str) -> Platforms {
        pipeline(cs)
            .ok()
            .and_then(|p| {
                p.machine(name).map(|m| Platforms {
                    source: m.platform.clone(),
                    target: m.target_platform.clone(),
                })
            })
            .unwrap_or_default()
    }
}

/// `path` (a test-failover call) asking for the disks as files too, and writable: a machine
/// runs on them.
pub(crate) fn with_files(path: &str) -> String {
    let path = without_param(&without_param(path, "writable"), "files");
    let joiner = if path.contains('?') { '&' } else { '?' };
    format!("{path}{joiner}writable=true&files=true")
}

/// `path` without the query parameter `name` (`name=…` or `name` alone).
pub(crate) fn without_param(path: &str, name: &str) -> String {
    let Some((path, query)) = path.split_once('?') else {
        return path.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| !kv.is_empty() && kv.split('=').next() != Some(name))
        .collect();
    match kept.is_empty() {
        true => path.to_string(),
        false => format!("{path}?{}", kept.join("&")),
    }
}

/// Whether a test failover of `machine` defined a machine at a platform that is not deleted.
pub(crate) fn test_replica_recorded(cs: &ConfigServer, machine: &str) -> Result<bool> {
    Ok(cs
        .record::<ReplicaRecord>(&replica_key(machine, Mode::Test))?
        .is_some())
}

/// The lock that keeps a machine's quiesced points one at a time.
pub(crate) fn quiesce_lock(machine: &str) -> Arc<tokio::sync::Mutex<()>> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // Machines that left the pipeline: their locks go once nobody holds them.
    locks.retain(|_, l| Arc::strong_count(l) > 1);
    locks.entry(machine.to_string()).or_default().clone()
}

/// The record key of the replica a failover (or a test failover) of `machine` defined.
fn replica_key(machine: &str, mode: Mode) -> String {
    match mode {
        Mode::Test => format!("test-replica/{machine}"),
        Mode::Failover { .. } | Mode::Failback { .. } => format!("replica/{machine}"),
    }
}

/// Deletes the machine a test failover of `machine` defined, at its platform, and forgets it;
/// what was deleted (`None`: none was recorded).
pub(crate) async fn delete_test_replica(
    cs: &Arc<ConfigServer>,
    machine: &str,
) -> Result<Option<String>> {
    let key = replica_key(machine, Mode::Test);
    let record: Option<ReplicaRecord> = {
        let (cs, key) = (cs.clone(), key.clone());
        tokio::task::spawn_blocking(move || cs.record(&key)).await??
    };
    let Some(record) = record else {
        return Ok(None);
    };
    let id = record.machine.id.clone();
    cs.adapter_call(&record.platform, move |a| a.delete_machine(&id))
        .await
        .with_context(|| {
            format!(
                "deleting test replica {} ({}) at {}; its disks stay until it is deleted: run \
                 the cleanup again",
                record.spec.name, record.machine.id, record.platform
            )
        })?;
    {
        let cs = cs.clone();
        tokio::task::spawn_blocking(move || cs.set_record::<ReplicaRecord>(&key, None)).await??;
    }
    Ok(Some(format!(
        "deleted {} ({}) at {}",
        record.spec.name, record.machine.id, record.platform
    )))
}

/// Which platform steps run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// After a failover (the source powered off first when `planned`).
    Failover { planned: bool },
    /// After a test failover: a `-test` machine on the test networks.
    Test,
    /// After a failback in place: the replica machine powered off first when `planned` (the
    /// failback policy's `shutdown_replica`), then the source machine powered on.
    Failback { planned: bool },
}

/// The applied pipeline; an empty one when none was applied.
pub(crate) fn pipeline(cs: &ConfigServer) -> Result<Pipeline> {
    match cs.pipeline()? {
        Some(stored) => Ok(serde_json::from_value(stored.pipeline)?),
        None => Ok(Pipeline::new("")),
    }
}

/// Runs the platform steps of `job` (its master-target step done), ending the job.
pub(crate) async fn run(
    cs: Arc<ConfigServer>,
    job: Job,
    gateway: String,
    item: String,
    mode: Mode,
) {
    let id = job.id;
    let ends = Ends {
        at_last: true,
        on_failure: true,
    };
    if let Err(e) = steps(&cs, job, &gateway, &item, mode, ends).await {
        fail_job(&cs, id, &e).await;
    }
}

/// Ends job `id` as failed with `e` when an error outside its steps left it running.
pub(crate) async fn fail_job(cs: &Arc<ConfigServer>, id: u64, e: &anyhow::Error) {
    tracing::error!(job = id, error = %format!("{e:#}"), "a job stopped on an error");
    let (cs, output) = (cs.clone(), format!("{e:#}"));
    let ended = tokio::task::spawn_blocking(move || -> Result<()> {
        if let Some(job) = cs.job(id)?
            && job.state == JobState::Running
        {
            cs.end_job_step_with(job, false, output, Some(false))?;
        }
        Ok(())
    })
    .await;
    if let Ok(Err(e)) | Err(e) = ended.map_err(anyhow::Error::from) {
        tracing::error!(job = id, error = %format!("{e:#}"), "cannot record a job's failure");
    }
}

/// When the steps end their job.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ends {
    /// The last step ends the job (a failover of its own); else it keeps running (a plan's).
    pub at_last: bool,
    /// A failed step ends the job (else the plan goes on regardless).
    pub on_failure: bool,
}

/// How a step ends its job: when it succeeds and when it fails, `None` for "the job goes on",
/// `Some(ok)` for "it ends, succeeded or failed".
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepEnd {
    pub if_ok: Option<bool>,
    pub if_failed: Option<bool>,
}

/// One step of a job: begun, run, ended with its outcome as `end` says. The value is `None`
/// when it failed.
pub(crate) async fn run_step<T>(
    cs: &Arc<ConfigServer>,
    job: Job,
    name: String,
    end: StepEnd,
    run: impl Future<Output = Result<(T, String)>>,
) -> Result<(Job, Option<T>)> {
    let job = {
        let cs = cs.clone();
        tokio::task::spawn_blocking(move || cs.begin_job_step(job, &name)).await??
    };
    let (ok, output, value) = match run.await {
        Ok((value, output)) => (true, output, Some(value)),
        Err(e) => (false, format!("{e:#}"), None),
    };
    let end = if ok { end.if_ok } else { end.if_failed };
    let cs = cs.clone();
    let job =
        tokio::task::spawn_blocking(move || cs.end_job_step_with(job, ok, output, end)).await??;
    Ok((job, value))
}

/// A platform step: the last of the machine's steps ends the job when `ends.at_last`; a failed
/// one skips the machine's later steps, so it ends the job unless the plan tolerates it (then
/// the job ends, as done, only when no work follows).
async fn step<T>(
    cs: &Arc<ConfigServer>,
    job: Job,
    name: String,
    last: bool,
    ends: Ends,
    run: impl Future<Output = Result<(T, String)>>,
) -> Result<(Job, Option<T>)> {
    let end = StepEnd {
        if_ok: (last && ends.at_last).then_some(true),
        if_failed: match ends.on_failure {
            true => Some(false),
            false => ends.at_last.then_some(true),
        },
    };
    run_step(cs, job, name, end, run).await
}

/// The platform steps of a failover (or test failover) of `item`, after its master-target
/// step; the job and whether every step succeeded.
pub(crate) async fn steps(
    cs: &Arc<ConfigServer>,
    job: Job,
    gateway: &str,
    item: &str,
    mode: Mode,
    ends: Ends,
) -> Result<(Job, bool)> {
    if let Mode::Failback { planned } = mode {
        return failback_steps(cs, job, gateway, item, planned, ends).await;
    }
    let machine_name = item.split('/').next().unwrap_or(item).to_string();
    let p = pipeline(cs)?;
    let m = p.machine(&machine_name).cloned();
    let test = mode == Mode::Test;
    let planned = mode == Mode::Failover { planned: true };
    let power_off = planned && m.as_ref().is_some_and(|m| m.platform.is_some());
    let define = m.as_ref().is_some_and(|m| m.target_platform.is_some());

    // The master target's images.
    let last = !power_off && !define;
    let (job, images) = match test {
        false => {
            let name = format!("wait for the image at {gateway}");
            step(cs, job, name, last, ends, wait_for_image(cs, gateway, item)).await?
        }
        true => {
            let name = format!("disks as files at {gateway}");
            step(cs, job, name, last, ends, test_images(cs, gateway, item)).await?
        }
    };
    let (Some(images), Some(m)) = (images, m) else {
        return Ok((
            job.clone(),
            job.steps
                .last()
                .is_some_and(|s| s.state != JobState::Failed),
        ));
    };

    let found = match &m.platform {
        Some(platform) => source_machine(cs, platform, &m.name).await,
        None => Ok(None),
    };
    let (source, ambiguous) = match found {
        Ok(source) => (source, None),
        Err(e) => (None, Some(e)),
    };
    let mut job = job;
    if let (true, Some(platform)) = (power_off, &m.platform) {
        let name = format!("power off {} at {platform}", m.name);
        let run = {
            let (cs, platform) = (cs.clone(), platform.clone());
            let (vm, missing) = (source.clone(), m.name.clone());
            let ambiguous = ambiguous.as_ref().map(|e| format!("{e:#}"));
            async move {
                if let Some(e) = ambiguous {
                    bail!("{e}");
                }
                let vm = vm.with_context(|| {
                    format!(
                        "platform {platform} has no machine named `{missing}` in its \
                         inventory; `haven platform machines {platform}` lists what it sees"
                    )
                })?;
                let id = vm.id.clone();
                cs.adapter_call(&platform, move |a| a.power_off(&id, PowerOffMode::Graceful))
                    .await?;
                Ok(((), format!("{} ({}) stopped", vm.name, vm.id)))
            }
        };
        let (next, done) = step(cs, job, name, !define, ends, run).await?;
        job = next;
        if done.is_none() {
            return Ok((job, false));
        }
    }

    let Some(target_platform) = m.target_platform.clone() else {
        return Ok((job, true));
    };
    let power_on = m.target.get("power_on").map(String::as_str) != Some("false");
    let spec = match ambiguous {
        Some(e) => Err(e),
        None => replica_spec(&p, &m, source.as_ref(), &images, test),
    };
    let name = format!(
        "define {} {} at {target_platform}",
        if test { "test replica" } else { "replica" },
        spec.as_ref().map_or(m.name.as_str(), |s| s.name.as_str())
    );
    let (job, defined) = step(cs, job, name, !power_on, ends, {
        let (cs, platform) = (cs.clone(), target_platform.clone());
        let machine = m.name.clone();
        async move {
            let spec = spec?;
            // The replica an earlier failover defined (kept, powered off, by a failback) goes
            // first: the new one takes its name. Only the machine is deleted; its disks are
            // the master target's.
            let earlier = match mode {
                Mode::Failover { .. } => forget_earlier_replica(&cs, &machine).await?,
                _ => None,
            };
            let wit = spec.clone();
            let replica = cs
                .adapter_call(&platform, move |a| a.define_replica(&wit))
                .await?;
            let record = ReplicaRecord {
                platform: platform.clone(),
                machine: replica.clone(),
                spec,
                defined_ms: haven_engine::now_ms(),
            };
            let key = replica_key(&machine, mode);
            tokio::task::spawn_blocking(move || cs.set_record(&key, Some(&record))).await??;
            let output = format!(
                "{}defined {}: {}",
                earlier.map_or(String::new(), |e| format!("{e}; ")),
                replica.id,
                replica.definition
            );
            Ok((replica, output))
        }
    })
    .await?;
    let Some(replica) = defined else {
        return Ok((job, false));
    };
    if !power_on {
        return Ok((job, true));
    }
    let name = format!("power on {} at {target_platform}", replica.id);
    let (job, on) = step(cs, job, name, true, ends, {
        let (cs, platform, id) = (cs.clone(), target_platform.clone(), replica.id.clone());
        async move {
            cs.adapter_call(&platform, move |a| a.power_on(&id)).await?;
            Ok(((), "running".to_string()))
        }
    })
    .await?;
    Ok((job, on.is_some()))
}

/// Deletes, at its platform, the replica machine an earlier failover of `machine` defined, if
/// the platform still has it; what was deleted.
async fn forget_earlier_replica(cs: &Arc<ConfigServer>, machine: &str) -> Result<Option<String>> {
    let record: Option<ReplicaRecord> = {
        let (cs, key) = (
            cs.clone(),
            replica_key(machine, Mode::Failover { planned: false }),
        );
        tokio::task::spawn_blocking(move || cs.record(&key)).await??
    };
    let Some(record) = record else {
        return Ok(None);
    };
    if let Some(e) = cs.refresh_platform(&record.platform).await {
        tracing::warn!(platform = %record.platform, error = %e, "no fresh inventory");
    }
    let present = {
        let (cs, platform) = (cs.clone(), record.platform.clone());
        tokio::task::spawn_blocking(move || cs.platform_machines(&platform))
            .await??
            .unwrap_or_default()
            .iter()
            .any(|m| m.id == record.machine.id)
    };
    if !present {
        return Ok(None);
    }
    let id = record.machine.id.clone();
    cs.adapter_call(&record.platform, move |a| a.delete_machine(&id))
        .await
        .with_context(|| {
            format!(
                "deleting the replica {} an earlier failover defined at {}, whose name the new \
                 one takes",
                record.machine.id, record.platform
            )
        })?;
    Ok(Some(format!(
        "deleted the earlier replica {} at {}",
        record.machine.id, record.platform
    )))
}

/// The platform steps of a failback in place of `item` at `gateway`: the image (the disk
/// itself) whole, then the replica machine a failover defined powered off at its platform
/// when `planned` (the agent's final point is in: nothing written later exists), then the
/// source machine powered on at its platform.
async fn failback_steps(
    cs: &Arc<ConfigServer>,
    job: Job,
    gateway: &str,
    item: &str,
    planned: bool,
    ends: Ends,
) -> Result<(Job, bool)> {
    let machine_name = item.split('/').next().unwrap_or(item).to_string();
    let p = pipeline(cs)?;
    let source = p.machine(&machine_name).and_then(|m| m.platform.clone());
    let replica: Option<ReplicaRecord> = match planned {
        true => {
            let (cs, key) = (
                cs.clone(),
                replica_key(&machine_name, Mode::Failover { planned }),
            );
            tokio::task::spawn_blocking(move || cs.record(&key)).await??
        }
        false => None,
    };
    let name = format!("wait for the disks at {gateway}");
    let last = replica.is_none() && source.is_none();
    let (mut job, images) =
        step(cs, job, name, last, ends, wait_for_image(cs, gateway, item)).await?;
    if images.is_none() {
        return Ok((job, false));
    }
    if let Some(r) = replica {
        let name = format!("power off replica {} at {}", r.machine.id, r.platform);
        let run = {
            let (cs, platform, id) = (cs.clone(), r.platform.clone(), r.machine.id.clone());
            async move {
                cs.adapter_call(&platform, move |a| a.power_off(&id, PowerOffMode::Graceful))
                    .await?;
                Ok(((), "stopped".to_string()))
            }
        };
        let (next, done) = step(cs, job, name, source.is_none(), ends, run).await?;
        job = next;
        if done.is_none() {
            return Ok((job, false));
        }
    }
    let Some(platform) = source else {
        return Ok((job, true));
    };
    let name = format!("power on {machine_name} at {platform}");
    let run = {
        let (cs, platform) = (cs.clone(), platform.clone());
        let name = machine_name.clone();
        async move {
            // As it is now: it may have run all along (an unplanned failover leaves it).
            if let Some(e) = cs.refresh_platform(&platform).await {
                tracing::warn!(%platform, error = %e, "no fresh inventory before a power-on");
            }
            let vm = source_machine(&cs, &platform, &name)
                .await?
                .with_context(|| {
                    format!(
                        "platform {platform} has no machine named `{name}` in its inventory; \
                         `haven platform machines {platform}` lists what it sees"
                    )
                })?;
            if vm.power == haven_host::platform::PowerState::Running {
                return Ok(((), format!("{} ({}) was running already", vm.name, vm.id)));
            }
            let id = vm.id.clone();
            cs.adapter_call(&platform, move |a| a.power_on(&id)).await?;
            Ok(((), format!("{} ({}) running", vm.name, vm.id)))
        }
    };
    let (job, on) = step(cs, job, name, true, ends, run).await?;
    Ok((job, on.is_some()))
}

/// The source machine `name`, as its platform's inventory saw it last: the one machine of that
/// name (`None`: none). A platform may hold several, in other folders or datacenters; none of
/// them is guessed: that is an error.
async fn source_machine(
    cs: &Arc<ConfigServer>,
    platform: &str,
    name: &str,
) -> Result<Option<Machine>> {
    let named: Vec<Machine> = {
        let (cs, platform) = (cs.clone(), platform.to_string());
        tokio::task::spawn_blocking(move || cs.platform_machines(&platform))
            .await??
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    };
    if named.len() > 1 {
        let ids: Vec<&str> = named.iter().map(|s| s.id.as_str()).collect();
        bail!(
            "platform {platform} has {} machines named `{name}` ({}); give the machine a name of \
             its own there, or limit the adapter to one datacenter (its `datacenter` setting)",
            named.len(),
            ids.join(", ")
        );
    }
    Ok(named.into_iter().next())
}

/// Longest a platform may take to quiesce a machine for an application-consistent point.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(60);

/// A machine its platform was asked to quiesce, to thaw afterwards.
#[derive(Clone, Debug)]
pub(crate) struct Quiesced {
    platform: String,
    id: String,
}

/// Asks `platform` to quiesce machine `name` (e.g. VSS through guest tools) for an
/// application-consistent point; what to thaw afterwards, whether it quiesced, and what
/// happened. A platform that offers no quiesce (`unsupported`) is no failure: the agent's
/// hooks quiesce the workload as they do without a platform. Any other error is one: the point would not be what it says.
/// [`thaw`] follows in every case, an error included.
pub(crate) async fn quiesce(
    cs: &Arc<ConfigServer>,
    platform: &str,
    name: &str,
) -> (Quiesced, Result<(bool, String)>) {
    let source = source_machine(cs, platform, name).await;
    let id = match &source {
        Ok(Some(m)) => m.id.clone(),
        _ => String::new(),
    };
    let q = Quiesced {
        platform: platform.to_string(),
        id: id.clone(),
    };
    let outcome = async {
        let vm = source?.with_context(|| {
            format!(
                "platform {platform} has no machine named `{name}` in its inventory; `haven \
                 platform machines {platform}` lists what it sees"
            )
        })?;
        let supported = cs
            .adapter_call(platform, move |a| match a.quiesce(&id, QUIESCE_TIMEOUT) {
                Ok(()) => Ok(true),
                Err(haven_host::PluginError::Failed { error, .. })
                    if error.kind == haven_image::ErrorKind::Unsupported =>
                {
                    Ok(false)
                }
                Err(e) => Err(e),
            })
            .await?;
        Ok(match supported {
            true => (
                true,
                format!("{} ({}) quiesced by {platform}", vm.name, vm.id),
            ),
            false => (
                false,
                format!(
                    "{platform} offers no quiesce of {} ({}); the agent's hooks alone quiesce the \
                 workload",
                    vm.name, vm.id
                ),
            ),
        })
    }
    .await;
    (q, outcome)
}

/// Ends a [`quiesce`] (nothing when the machine was never found).
pub(crate) async fn thaw(cs: &Arc<ConfigServer>, q: Quiesced) -> Result<String> {
    if q.id.is_empty() {
        return Ok(String::new());
    }
    let id = q.id.clone();
    cs.adapter_call(&q.platform, move |a| a.thaw(&id)).await?;
    Ok(format!("thawed by {}", q.platform))
}

/// How often the configuration server looks for application-consistent points that are due.
const APP_POINTS_EVERY: Duration = Duration::from_secs(5);

/// Takes the application-consistent points of the machines that have a `platform`, on their
/// replication policy's `app_consistent_interval`: a point is due when the machine's newest
/// `app` point at its master target is that old, or when it has none (once it has any point:
/// protected). Each is taken as `POST /v1/items/MACHINE/points?kind=app` through this server
/// (a job, by `policy`), so the platform quiesces the machine around it; the agents of those
/// machines are not given the interval (`assignment_of`), so no point is taken twice. Only a
/// `protected` machine is asked, and at most once per interval by this server's clock too (a
/// source clock behind, or retention dropping app points, cannot make every look take one).
/// A machine whose app points fail raises `app-point.failed` once, until one is taken again,
/// and is tried again an interval later.
pub(crate) async fn app_points_on_interval(cs: std::sync::Weak<ConfigServer>) {
    use std::collections::{HashMap, HashSet};
    // Machines whose last app point failed (`app-point.failed` raised).
    let failing = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    // Machine → when this server last asked for one.
    let asked = Arc::new(std::sync::Mutex::new(HashMap::<String, Instant>::new()));
    let running = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let mut tick = tokio::time::interval(APP_POINTS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cs) = cs.upgrade() else { return };
        let read = {
            let cs = cs.clone();
            tokio::task::spawn_blocking(move || pipeline(&cs)).await
        };
        let Ok(Ok(p)) = read else { continue };
        for (machine, interval) in platform_app_intervals(&p) {
            let asked_lately = asked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&machine)
                .is_some_and(|at| at.elapsed() < interval);
            if asked_lately
                || !running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(machine.clone())
            {
                continue;
            }
            let (cs, failing, running) = (cs.clone(), failing.clone(), running.clone());
            let asked = asked.clone();
            tokio::spawn(async move {
                let taken = app_point_if_due(&cs, &machine, interval).await;
                if !matches!(taken, Ok(false)) {
                    asked
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(machine.clone(), Instant::now());
                }
                running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&machine);
                let first_failure = {
                    let mut failing = failing.lock().unwrap_or_else(|e| e.into_inner());
                    match &taken {
                        Ok(_) => {
                            failing.remove(&machine);
                            false
                        }
                        Err(_) => failing.insert(machine.clone()),
                    }
                };
                let Err(e) = taken else { return };
                tracing::warn!(machine, error = %format!("{e:#}"), "no application-consistent point");
                if first_failure {
                    let raised = cs.raise(haven_engine::events::Raise {
                        severity: haven_engine::events::Severity::Warning,
                        kind: "app-point.failed",
                        gateway: None,
                        item: Some(machine.clone()),
                        text: format!(
                            "{machine}: no application-consistent point on its policy's \
                             interval: {e:#}"
                        ),
                    });
                    if let Err(e) = raised {
                        tracing::warn!(error = %e, "raising an event");
                    }
                }
            });
        }
    }
}

/// The machines whose app points this server takes (a `platform`, an app interval), with it.
pub(crate) fn platform_app_intervals(p: &Pipeline) -> Vec<(String, Duration)> {
    p.machines
        .iter()
        .filter(|m| m.platform.is_some())
        .filter_map(|m| {
            let interval = p.replication_policy_of(&m.name)?.app_consistent_interval?;
            Some((m.name.clone(), interval))
        })
        .collect()
}

/// Takes an app point of `machine` when one is due; whether it did.
async fn app_point_if_due(
    cs: &Arc<ConfigServer>,
    machine: &str,
    interval: Duration,
) -> Result<bool> {
    let Some(gateway) = cs.master_target_of(machine) else {
        return Ok(false);
    };
    let answer = cs
        .forward(
            &gateway,
            ApiRequest {
                method: "GET".into(),
                path: format!("/v1/items/{machine}/points"),
                caller: String::new(),
            },
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if answer.status != 200 {
        // Not protected yet (no item at its master target).
        return Ok(false);
    }
    let points: Vec<serde_json::Value> = serde_json::from_str(&answer.body)?;
    if points.is_empty() {
        return Ok(false);
    }
    let newest_app = points
        .iter()
        .filter(|p| p["kind"] == "app")
        .filter_map(|p| p["source_time_ms"].as_u64())
        .max();
    let due = newest_app
        .is_none_or(|t| haven_engine::now_ms() >= t.saturating_add(interval.as_millis() as u64));
    if !due {
        return Ok(false);
    }
    // Not after a failover (nor while one runs): only a protected machine takes points.
    let protected = items_of(cs, &gateway, machine).await.is_ok_and(|disks| {
        !disks.is_empty()
            && disks
                .iter()
                .all(|d| d.item.state == haven_engine::recovery::ItemState::Protected)
    });
    if !protected {
        return Ok(false);
    }
    let change = crate::deployment::ItemChange {
        gateway,
        item: machine.to_string(),
        action: "points".into(),
        method: axum::http::Method::POST,
        request: ApiRequest {
            method: "POST".into(),
            path: format!("/v1/items/{machine}/points?kind=app"),
            caller: "policy".into(),
        },
    };
    let response = crate::deployment::item_change(cs, change).await;
    if response.status().is_success() {
        return Ok(true);
    }
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 64 << 10)
        .await
        .unwrap_or_default();
    bail!(
        "HTTP {}: {}",
        status.as_u16(),
        crate::deployment::error_text(&String::from_utf8_lossy(&body))
    )
}

/// One disk's failover image at the master target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DiskImage {
    /// The disk's id (1, 2, …).
    pub disk: u32,
    /// The image's full path at the master target.
    pub image: String,
    /// Its size in bytes.
    pub size: u64,
}

/// The items `item` names at master target `gateway` (every disk of a machine, or the one
/// disk of `MACHINE/DISK`), in disk order: as the master target reads the name, the ones
/// that replicate now when a reprotect left older ones there.
pub(crate) async fn items_of(
    cs: &Arc<ConfigServer>,
    gateway: &str,
    item: &str,
) -> Result<Vec<ItemInfo>> {
    let mut ours = all_items_of(cs, gateway, item).await?;
    haven_engine::recovery::current(&mut ours, |i| i.item.state);
    Ok(ours)
}

/// Every item `item` names at master target `gateway`, reprotected ones too, in disk order.
pub(crate) async fn all_items_of(
    cs: &Arc<ConfigServer>,
    gateway: &str,
    item: &str,
) -> Result<Vec<ItemInfo>> {
    let answer = cs
        .forward(
            gateway,
            ApiRequest {
                method: "GET".into(),
                path: "/v1/items".into(),
                caller: String::new(),
            },
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if answer.status != 200 {
        bail!(
            "HTTP {}: {}",
            answer.status,
            crate::deployment::error_text(&answer.body)
        );
    }
    let all: Vec<ItemInfo> = serde_json::from_str(&answer.body)
        .with_context(|| format!("{gateway} answered GET /v1/items with no item list"))?;
    let mut ours: Vec<ItemInfo> = all.into_iter().filter(|i| i.named(item)).collect();
    ours.sort_by_key(|i| (i.agent_id.clone(), i.disk));
    Ok(ours)
}

/// Waits until the master target has every disk of the item failed over (one disk for
/// `NAME/DISK`, every disk of the machine otherwise); their images, in disk order.
async fn wait_for_image(
    cs: &Arc<ConfigServer>,
    gateway: &str,
    item: &str,
) -> Result<(Vec<DiskImage>, String)> {
    use haven_engine::recovery::ItemState;
    let started = Instant::now();
    loop {
        // A master target restarting meanwhile resumes the failover: asked again.
        if let Ok(ours) = items_of(cs, gateway, item).await {
            if let Some(i) = ours
                .iter()
                .find(|i| i.item.state == ItemState::FailoverFailed)
            {
                bail!(
                    "the master target could not materialise the point of disk {}; `haven \
                     failover show {}/{}` has its history",
                    i.disk,
                    i.machine_name,
                    i.disk
                );
            }
            let done = |s: ItemState| matches!(s, ItemState::FailedOver | ItemState::Committed);
            if !ours.is_empty() && ours.iter().all(|i| done(i.item.state)) {
                let mut images = Vec::new();
                for i in ours {
                    images.push(DiskImage {
                        disk: i.disk,
                        image: i.item.image.context("the master target reports no image")?,
                        size: i.size,
                    });
                }
                let output = images
                    .iter()
                    .map(|i| format!("disk {}: image {} ({} bytes)", i.disk, i.image, i.size))
                    .collect::<Vec<_>>()
                    .join("\n");
                return Ok((images, output));
            }
        }
        if started.elapsed() > MATERIALISE_TIMEOUT {
            bail!(
                "the master target did not finish materialising the point within {:?}",
                MATERIALISE_TIMEOUT
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The test failover's disks of `item` at master target `gateway`, presented as files, in disk
/// order.
async fn test_images(
    cs: &Arc<ConfigServer>,
    gateway: &str,
    item: &str,
) -> Result<(Vec<DiskImage>, String)> {
    let ours = items_of(cs, gateway, item).await?;
    if ours.is_empty() {
        bail!("{gateway} holds no item `{item}`");
    }
    let mut images = Vec::new();
    for i in ours {
        let image = i.test_failover.and_then(|t| t.image).with_context(|| {
            format!(
                "{gateway} presents no file of disk {} of {item}: its test failover is not \
                     running, or was started without files",
                i.disk
            )
        })?;
        images.push(DiskImage {
            disk: i.disk,
            image,
            size: i.size,
        });
    }
    let output = images
        .iter()
        .map(|i| format!("disk {}: {} ({} bytes)", i.disk, i.image, i.size))
        .collect::<Vec<_>>()
        .join("\n");
    Ok((images, output))
}

/// What to ask the target platform to define for machine `m`: its replica, or with `test` its
/// test replica (`<name>-test`, on the mappings' test networks).
pub(crate) fn replica_spec(
    p: &Pipeline,
    m: &haven_pipeline::model::Machine,
    source: Option<&Machine>,
    images: &[DiskImage],
    test: bool,
) -> Result<ReplicaSpec> {
    let number = |key: &str| -> Result<Option<u64>> {
        m.target
            .get(key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    anyhow!(
                        "machine {}: target setting `{key}` is `{v}`, not a whole number",
                        m.name
                    )
                })
            })
            .transpose()
    };
    let cpus = number("cpus")?
        .or(source.map(|s| u64::from(s.cpus)))
        .unwrap_or(1)
        .clamp(1, 768) as u32;
    let memory_mib = number("memory_mib")?
        .or(source.map(|s| s.memory_mib))
        .unwrap_or(1024);
    // A datastore whose folder the master target's writer keeps replicas in (VMware); without
    // one, a disk is named as the writer keeps it (a page blob's name in its container).
    let datastore = m.target.get("datastore");
    let target_site = p
        .gateway(&m.master_target)
        .map(|g| g.site.clone())
        .unwrap_or_default();
    let mut nics = Vec::new();
    for (i, nic) in source
        .map(|s| s.nics.as_slice())
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        let mapping = p
            .network_mappings
            .iter()
            .find(|n| {
                n.source_site == m.site
                    && n.target_site == target_site
                    && n.source_network == nic.network
            })
            .with_context(|| {
                format!(
                    "machine {}: no [[network_mapping]] from site {} to site {target_site} maps \
                     network `{}` (its adapter {}); add one",
                    m.name, m.site, nic.network, i
                )
            })?;
        nics.push(ReplicaNic {
            source_nic: nic.id.clone(),
            network: match test {
                true => mapping.test_network.clone(),
                false => mapping.target_network.clone(),
            },
            static_address: m.target.get(&format!("nic{i}_address")).cloned(),
        });
    }
    // A machine whose adapters are not known (a physical server) gets one, on the network
    // its site's one mapping to the target site names.
    if source.is_none_or(|s| s.nics.is_empty()) {
        let mut mappings = p
            .network_mappings
            .iter()
            .filter(|n| n.source_site == m.site && n.target_site == target_site);
        if let (Some(mapping), None) = (mappings.next(), mappings.next()) {
            nics.push(ReplicaNic {
                source_nic: String::new(),
                network: match test {
                    true => mapping.test_network.clone(),
                    false => mapping.target_network.clone(),
                },
                static_address: m.target.get("nic0_address").cloned(),
            });
        }
    }
    let folder = m
        .target
        .get("datastore_folder")
        .map(|f| f.trim_matches('/'))
        .filter(|f| !f.is_empty());
    let disks = images
        .iter()
        .map(|i| {
            let writer = i.image.rsplit('.').next().unwrap_or("raw").to_string();
            // The master target names the image by its full path; below the writer's storage
            // root it is `failover/<agent>/disk<N>-point<P>.<writer>` (a test failover's:
            // `test-failover/<agent>/disk<N>/…`), which is what the platform sees below the
            // datastore folder that root is.
            let image = match (
                i.image.rfind("/test-failover/"),
                i.image.rfind("/failover/"),
            ) {
                (Some(at), _) | (None, Some(at)) => &i.image[at + 1..],
                (None, None) => i.image.trim_start_matches('/'),
            };
            ReplicaDisk {
                // The source's disks in their order: disk N of the agent is the machine's
                // N-th disk (`--disk` in the platform's order).
                source_disk: source
                    .and_then(|s| s.disks.get(i.disk as usize - 1))
                    .map(|d| d.id.clone())
                    .unwrap_or_default(),
                location: match (datastore, folder) {
                    (Some(ds), Some(folder)) => format!("[{ds}] {folder}/{image}"),
                    (Some(ds), None) => format!("[{ds}] {image}"),
                    (None, _) => image.to_string(),
                },
                format: writer,
                size: i.size,
            }
        })
        .collect();
    let options = m
        .target
        .iter()
        .filter(|(k, _)| !haven_setting(k))
        .map(|(k, v)| (k.replace('_', "-"), v.clone()))
        .collect();
    let name = m.target.get("name").unwrap_or(&m.name);
    Ok(ReplicaSpec {
        name: match test {
            true => format!("{name}-test"),
            false => name.clone(),
        },
        source_machine: source.map(|s| s.id.clone()).unwrap_or_default(),
        cpus,
        memory_mib,
        disks,
        nics,
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::with_files;

    #[test]
    fn a_platform_test_failover_asks_for_writable_files() {
        assert_eq!(
            with_files("/v1/items/web01/test-failover?point=7&writable=false"),
            "/v1/items/web01/test-failover?point=7&writable=true&files=true"
        );
        assert_eq!(
            with_files("/v1/items/web01/test-failover"),
            "/v1/items/web01/test-failover?writable=true&files=true"
        );
        assert_eq!(
            with_files("/v1/items/web01/test-failover?files&writable"),
            "/v1/items/web01/test-failover?writable=true&files=true"
        );
    }

    #[test]
    fn a_parameter_is_taken_out_of_a_path() {
        use super::without_param;
        assert_eq!(
            without_param("/v1/items/a/points?kind=app&quiesced=true", "quiesced"),
            "/v1/items/a/points?kind=app"
        );
        assert_eq!(
            without_param("/v1/items/a/points?quiesced&kind=app", "quiesced"),
            "/v1/items/a/points?kind=app"
        );
        assert_eq!(
            without_param("/v1/items/a/points?quiesced=1", "quiesced"),
            "/v1/items/a/points"
        );
        assert_eq!(
            without_param("/v1/items/a/points", "quiesced"),
            "/v1/items/a/points"
        );
    }
}
