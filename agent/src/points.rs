//! Recovery points on the source: tags in the change log, on a policy interval and on request,
//! and the planned-failover stop.
//!
//! A point is a tag record appended to every disk's change log while the writes of all the
//! disks are held at once ([`Splitter::tag_all`](crate::splitter::Splitter::tag_all)), so on every
//! disk it sits after every write acknowledged (on any disk) before it and before every write
//! that starts after it: the machine's disks at the point are one instant of the machine. It
//! ships like any other record and the master target indexes it; a point of the machine is one
//! whose tag every disk carries. A point is only taken when it is crash-consistent at the
//! replica, on every disk:
//!
//! - the disk is `protected` (during the initial sync or a resync the replica is still being
//!   filled by copy records, which carry the disk's content at the time they ship, so the
//!   replica at a tag would not be the disk at the tag);
//! - every copy record in the log has been acknowledged (the last ones of a finished sync
//!   may still be in flight);
//! - the log did not overflow (writes since then are not in it).
//!
//! Ids are `max(previous + 1, now in ms)`: increasing, unique for the machine, and readable as
//! a time.
//!
//! # Planned failover
//!
//! [`Command::Stop`]: the tag is appended with the splitter closed in the same locked step (no
//! write is accepted after it: a client gets `ESHUTDOWN`, never an acknowledgement that would
//! be lost), the NBD front end is closed, and `DATA/failed-over` is written so that a restarted
//! agent does not serve the old primary again. The shipper keeps running until the tag is
//! acknowledged, so the master target receives everything.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use haven_net::control::{Command, PointTaken, Reply, Request};
use haven_net::quinn;

pub use crate::disk::failed_over;
use crate::disk::{FAILED_OVER, Machine, Shared};
use crate::log::TagInfo;
use crate::quiesce::Hooks;
use crate::splitter::Splitter;
use crate::state::Phase;

/// File in the data folder that says the disk was failed over (planned): the agent refuses to
/// serve it again until an operator removes it.
/// Shortest interval between crash-consistent points (a point is one small record in the
/// stream and one small redb write at the master target).
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);
/// Shortest interval between application-consistent points (each one freezes file systems).
pub const MIN_APP_INTERVAL: Duration = Duration::from_secs(1);

/// How often points are taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointPolicy {
    /// Crash-consistent points, at least [`MIN_INTERVAL`] apart.
    pub interval: Duration,
    /// Application-consistent points (with the hooks), if any.
    pub app_interval: Option<Duration>,
}

/// Command-line options of `haven-agent protect` for recovery points.
#[derive(Clone, Debug, clap::Args)]
pub struct PointsArgs {
    /// Time between crash-consistent recovery points: `5s`, `1s`, `500ms`, `2m` (at least
    /// 250ms). The recovery point objective is about this interval plus the transit time.
    #[arg(long, default_value = "5s")]
    pub point_interval: String,
    /// Time between application-consistent points (the hooks run around them); none unless
    /// given. Needs --freeze and/or --pre-script/--post-script.
    #[arg(long)]
    pub app_point_interval: Option<String>,
    /// A mount point frozen (fsfreeze) during an application-consistent point; repeat for
    /// several.
    #[arg(long = "freeze")]
    pub freeze: Vec<PathBuf>,
    /// Program run before an application-consistent point (HAVEN_HOOK=pre).
    #[arg(long)]
    pub pre_script: Option<PathBuf>,
    /// Program run after it, also on failure (HAVEN_HOOK=post, HAVEN_POINT_RESULT=ok|failed).
    #[arg(long)]
    pub post_script: Option<PathBuf>,
    /// Longest one hook step may take (a script, one fsfreeze).
    #[arg(long, default_value = "30s")]
    pub hook_timeout: String,
}

/// `5s`, `500ms`, `2m`, `1h` as a duration.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: give a whole number and a unit, e.g. 5s or 500ms"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use ms, s, m or h)")),
    };
    Ok(Duration::from_millis(n.saturating_mul(ms)))
}

impl PointsArgs {
    /// The policy and the hooks, checked.
    pub fn resolve(&self) -> anyhow::Result<(PointPolicy, Option<Hooks>)> {
        let interval = parse_interval(&self.point_interval)
            .map_err(|e| anyhow::anyhow!("--point-interval {e}"))?;
        if interval < MIN_INTERVAL {
            anyhow::bail!(
                "--point-interval {}: give at least {}ms",
                self.point_interval,
                MIN_INTERVAL.as_millis()
            );
        }
        let app_interval = self
            .app_point_interval
            .as_deref()
            .map(|s| {
                parse_interval(s)
                    .map_err(|e| anyhow::anyhow!("--app-point-interval {e}"))
                    .and_then(|d| {
                        if d < MIN_APP_INTERVAL {
                            anyhow::bail!(
                                "--app-point-interval {s}: give at least {}s",
                                MIN_APP_INTERVAL.as_secs()
                            );
                        }
                        Ok(d)
                    })
            })
            .transpose()?;
        let hooks =
            if self.freeze.is_empty() && self.pre_script.is_none() && self.post_script.is_none() {
                None
            } else {
                let hooks = Hooks {
                    freeze: self.freeze.clone(),
                    pre: self.pre_script.clone(),
                    post: self.post_script.clone(),
                    timeout: parse_interval(&self.hook_timeout)
                        .map_err(|e| anyhow::anyhow!("--hook-timeout {e}"))?,
                };
                hooks
                    .validate()
                    .map_err(|e| anyhow::anyhow!("application-consistent hooks: {e}"))?;
                Some(hooks)
            };
        if app_interval.is_some() && hooks.is_none() {
            anyhow::bail!(
                "--app-point-interval needs hooks: give --freeze MOUNT and/or --pre-script / \
                 --post-script"
            );
        }
        Ok((
            PointPolicy {
                interval,
                app_interval,
            },
            hooks,
        ))
    }
}

/// What the agent keeps for its points.
#[derive(Default)]
pub struct Points {
    last_point: AtomicU64,
    /// Held while a point is taken (hooks included).
    taking: Mutex<()>,
    hooks: Mutex<Option<Hooks>>,
    close_front_end: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// The policy the configuration server sent, which replaces the command line's until the
    /// agent restarts (the process server sends it again on every connection).
    assigned: Mutex<Option<PointPolicy>>,
    /// A group point's hold in progress (see [`hold`]).
    held: Mutex<Option<GroupHold>>,
    /// The last hold's number.
    holds: AtomicU64,
}

/// A group point's hold: its thread holds the machine's writes until told to tag (with the
/// point's id) or to let go (`None`), or until its deadline.
struct GroupHold {
    hold: u64,
    tell: mpsc::Sender<Option<u64>>,
    outcome: mpsc::Receiver<Result<Vec<PointTaken>, String>>,
}

impl std::fmt::Debug for Points {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Points")
            .field("last_point", &self.last_point)
            .finish_non_exhaustive()
    }
}

impl Points {
    /// The quiesce hooks of application-consistent points.
    pub fn set_hooks(&self, hooks: Option<Hooks>) {
        *self.hooks.lock().unwrap_or_else(|e| e.into_inner()) = hooks;
    }

    /// What closes the front end for a planned failover.
    pub fn set_close_front_end(&self, f: impl Fn() + Send + Sync + 'static) {
        *self
            .close_front_end
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Takes points on `interval_ms` (and `app_interval_ms`) from now on; refused below the
    /// minimums. Returns what is done, for the process server's log.
    pub fn assign(&self, interval_ms: u64, app_interval_ms: Option<u64>) -> Result<String, String> {
        let interval = Duration::from_millis(interval_ms);
        if interval < MIN_INTERVAL {
            return Err(format!(
                "a crash-consistent interval of {interval_ms} ms is below the agent's minimum \
                 of {} ms",
                MIN_INTERVAL.as_millis()
            ));
        }
        let app = app_interval_ms.map(Duration::from_millis);
        if let Some(a) = app
            && a < MIN_APP_INTERVAL
        {
            return Err(format!(
                "an application-consistent interval of {} ms is below the agent's minimum of \
                 {} s",
                a.as_millis(),
                MIN_APP_INTERVAL.as_secs()
            ));
        }
        let hooks = self
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        let policy = PointPolicy {
            interval,
            // Without hooks there is nothing to quiesce: crash-consistent points only.
            app_interval: app.filter(|_| hooks),
        };
        let mut assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
        if assigned.as_ref() != Some(&policy) {
            tracing::info!(interval_ms, app_interval_ms = ?policy.app_interval.map(|d| d.as_millis()),
                "recovery point policy assigned by the configuration server");
        }
        *assigned = Some(policy);
        Ok(match (app, hooks) {
            (Some(_), false) => format!(
                "points every {interval_ms} ms; no application-consistent points: this agent \
                 has no quiesce hooks (--freeze, --pre-script, --post-script)"
            ),
            _ => format!("points every {interval_ms} ms"),
        })
    }

    /// Back to the agent's own intervals. Returns what is done, for the process server's log.
    pub fn clear_assigned(&self) -> String {
        let was = self
            .assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if was.is_some() {
            tracing::info!(
                "the configuration server no longer assigns a point policy: points on this agent's own intervals again"
            );
        }
        "points on the agent's own intervals".into()
    }

    /// The policy assigned by the configuration server, if any.
    pub fn assigned(&self) -> Option<PointPolicy> {
        self.assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn next_id(&self, now_ms: u64) -> u64 {
        let mut id = 0;
        let _ = self
            .last_point
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                id = (last + 1).max(now_ms);
                Some(id)
            });
        id
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a point cannot be taken now on some disk of `machine`, if it cannot.
pub fn not_ready(machine: &Machine) -> Option<String> {
    let several = machine.disks.len() > 1;
    machine.disks.iter().find_map(|d| {
        disk_not_ready(d).map(|why| {
            if several {
                format!("disk {}: {why}", d.disk)
            } else {
                why
            }
        })
    })
}

/// Why a point cannot be taken now on this disk, if it cannot.
fn disk_not_ready(shared: &Shared) -> Option<String> {
    let rec = shared.record();
    match rec.state {
        Phase::Protected => {}
        Phase::InitialSync => {
            return Some(format!(
                "the disk is in its initial sync ({}% done): points are taken once it is \
                 protected; wait for `haven status` to show it protected",
                shared.sync_percent()
            ));
        }
        Phase::Resyncing => {
            return Some(
                "the disk is resyncing (its change log was lost or overflowed): points are taken \
                 again once it is protected"
                    .into(),
            );
        }
    }
    if shared.splitter.overflow().is_some() {
        return Some("the change log overflowed: the disk resyncs before the next point".into());
    }
    let last_copy = shared.splitter.last_copy_seq();
    if last_copy > 0 && shared.wire_seq(last_copy) > shared.acked_seq() {
        return Some(
            "the last blocks of the sync are still being shipped: try again in a few seconds"
                .into(),
        );
    }
    None
}

/// Takes a point of the machine: checks it would be consistent, runs the hooks for `app`,
/// appends the tag to every disk's log at one instant. With `close`, the front ends are closed
/// for good (planned failover, see the module docs). With `quiesced` (the machine's platform
/// quiesced it), an `app` point needs no hooks. Returns the tag of each disk.
pub fn take(
    machine: &Machine,
    points: &Points,
    app: bool,
    close: bool,
    quiesced: bool,
) -> Result<Vec<PointTaken>, String> {
    let data_dir = machine.data_dir();
    // One point at a time: two sets of hooks must not interleave.
    let _one = points.taking.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = not_ready(machine) {
        return Err(why);
    }
    if close {
        // Before the tag: from here on a restarted agent never serves the disk again.
        mark_failed_over(data_dir).map_err(|e| format!("{e:#}"))?;
    }
    let tag = || {
        // Checked again: the hooks may have taken a while, and a resync may have started.
        if let Some(why) = not_ready(machine) {
            anyhow::bail!("{why}");
        }
        let time_ms = now_ms();
        let info = TagInfo {
            point: points.next_id(time_ms),
            time_ms,
            app,
        };
        let splitters: Vec<&Splitter> = machine.disks.iter().map(|d| &*d.splitter).collect();
        let seqs =
            Splitter::tag_all(&splitters, info, close).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok((seqs, info))
    };
    let tagged = if app {
        match points
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            None if quiesced => tag().map_err(|e| format!("{e:#}")),
            None => Err(
                "no quiesce hooks are configured on this agent (--freeze, --pre-script, \
                 --post-script): take a crash-consistent point, or start the agent with hooks"
                    .to_string(),
            ),
            Some(hooks) => crate::quiesce::run(&hooks, tag).map_err(|e| e.to_string()),
        }
    } else {
        tag().map_err(|e| format!("{e:#}"))
    };
    let (seqs, info) = match tagged {
        Ok(t) => t,
        Err(e) => {
            if close {
                let _ = std::fs::remove_file(data_dir.join(FAILED_OVER));
            }
            return Err(e);
        }
    };
    if close {
        if let Some(f) = points
            .close_front_end
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            f();
        }
        tracing::warn!(
            point = info.point,
            "planned failover: the front end is closed and no write is accepted any more"
        );
    }
    tracing::info!(point = info.point, seqs = ?seqs, app, "recovery point taken");
    Ok(machine
        .disks
        .iter()
        .zip(seqs)
        .map(|(d, seq)| PointTaken {
            point: info.point,
            disk: d.disk,
            seq: d.wire_seq(seq),
            source_time_ms: info.time_ms,
            app,
        })
        .collect())
}

fn mark_failed_over(data_dir: &Path) -> anyhow::Result<()> {
    let body = "failed over (planned): the replica at the secondary site is the primary now; \
                remove this file to protect this disk again (its replica will be resynced)\n";
    Ok(haven_fsutil::write_atomic(
        &data_dir.join(FAILED_OVER),
        body.as_bytes(),
        0o644,
    )?)
}

/// Longest a group point holds the machine's writes, whatever the coordinator asks.
pub const MAX_HOLD: Duration = Duration::from_secs(5);

/// First half of a group point ([`Command::Hold`]): holds every write of the machine (all its
/// splitters' locks, and no point of its own meanwhile) on a thread of its own, until
/// [`release`] or until `hold_ms` (at most [`MAX_HOLD`]) have passed — then the writes go on
/// and no point is taken, so a coordinator that is gone never stalls the machine longer than
/// that. Returns the hold's number and the newest point id used, once the writes are held.
pub fn hold(
    machine: Arc<Machine>,
    points: Arc<Points>,
    hold_ms: u64,
) -> Result<(u64, u64), String> {
    let limit = Duration::from_millis(hold_ms).min(MAX_HOLD);
    let asked = Instant::now();
    let (tell, told) = mpsc::channel::<Option<u64>>();
    let (done, outcome) = mpsc::channel();
    let number = points.holds.fetch_add(1, Ordering::AcqRel) + 1;
    {
        let mut slot = points.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = slot.as_ref() {
            return Err(format!(
                "group point hold {} is in progress on this machine: one at a time",
                h.hold
            ));
        }
        *slot = Some(GroupHold {
            hold: number,
            tell,
            outcome,
        });
    }
    let (held_tx, held_rx) = mpsc::channel::<Result<u64, String>>();
    let pts = Arc::clone(&points);
    let spawned = std::thread::Builder::new()
        .name(format!("hold-{number}"))
        .spawn(move || {
            let points = pts;
            let result = (|| {
                let _one = points.taking.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(why) = not_ready(&machine) {
                    let _ = held_tx.send(Err(why));
                    return Err("not ready".to_string());
                }
                let splitters: Vec<&Splitter> =
                    machine.disks.iter().map(|d| &*d.splitter).collect();
                let held = match Splitter::hold_all(&splitters, false) {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = held_tx.send(Err(e.to_string()));
                        return Err(e.to_string());
                    }
                };
                // The deadline counts from when the writes wait, not from the request.
                let deadline = Instant::now() + limit;
                let waited = asked.elapsed();
                if waited > limit / 4 {
                    tracing::info!(
                        waited_ms = waited.as_millis() as u64,
                        "a group point's hold waited for the writes in progress"
                    );
                }
                let last = points.last_point.load(Ordering::Acquire);
                let _ = held_tx.send(Ok(last));
                match told.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(Some(id)) if id > last => {
                        let time_ms = now_ms();
                        let info = TagInfo {
                            point: id,
                            time_ms,
                            app: false,
                        };
                        let seqs = held.tag(info, false).map_err(|e| e.to_string())?;
                        points.last_point.fetch_max(id, Ordering::AcqRel);
                        tracing::info!(point = id, seqs = ?seqs, "group recovery point taken");
                        Ok(machine
                            .disks
                            .iter()
                            .zip(seqs)
                            .map(|(d, seq)| PointTaken {
                                point: id,
                                disk: d.disk,
                                seq: d.wire_seq(seq),
                                source_time_ms: time_ms,
                                app: false,
                            })
                            .collect())
                    }
                    Ok(Some(id)) => Err(format!(
                        "group point {id} is not above this machine's last point {last}: no point"
                    )),
                    Ok(None) => Err("released without a point".to_string()),
                    Err(_) => {
                        tracing::warn!(
                            hold_ms = limit.as_millis() as u64,
                            waited_ms = waited.as_millis() as u64,
                            "a group point's hold reached its deadline: the writes go on, no point"
                        );
                        Err(format!(
                            "the hold ended at its deadline ({} ms) before the coordinator said \
                             to tag: no point",
                            limit.as_millis()
                        ))
                    }
                }
            })();
            let _ = done.send(result);
            let mut slot = points.held.lock().unwrap_or_else(|e| e.into_inner());
            if slot.as_ref().is_some_and(|h| h.hold == number) {
                *slot = None;
            }
        });
    if let Err(e) = spawned {
        *points.held.lock().unwrap_or_else(|e| e.into_inner()) = None;
        return Err(format!("cannot start the hold: {e}"));
    }
    match held_rx.recv_timeout(limit) {
        Ok(Ok(last)) => Ok((number, last)),
        Ok(Err(why)) => Err(why),
        Err(_) => Err(format!(
            "the machine's writes could not be held within {} ms",
            limit.as_millis()
        )),
    }
}

/// Second half of a group point ([`Command::Release`]): tags every disk with `point` (when
/// given) and lets the writes go. Refused when hold `number` is not in progress any more (it
/// reached its deadline).
pub fn release(
    points: &Points,
    number: u64,
    point: Option<u64>,
) -> Result<Vec<PointTaken>, String> {
    tracing::debug!(hold = number, ?point, "group point release");
    let hold = {
        let mut slot = points.held.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(h) if h.hold == number => slot.take(),
            _ => None,
        }
    };
    let Some(hold) = hold else {
        return Err(format!(
            "no group point hold {number} in progress: it ended at its deadline, or was \
             released"
        ));
    };
    // The thread may have reached its deadline meanwhile: its outcome says so.
    let _ = hold.tell.send(point);
    hold.outcome
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| "the hold's thread did not answer".to_string())?
}

/// Takes points on the policy's intervals until the agent stops. A point that is not ready
/// (initial sync, resync) is skipped quietly; other failures are logged.
pub fn run_interval(machine: Arc<Machine>, points: Arc<Points>, own: PointPolicy) {
    let mut policy = own.clone();
    let mut next = Instant::now() + policy.interval;
    let mut next_app = policy.app_interval.map(|d| Instant::now() + d);
    let mut was_ready = true;
    while !machine.is_stopping() {
        let now = Instant::now();
        // A policy from the configuration server takes effect at once: the next point is due
        // no later than one new interval from now.
        let current = points.assigned().unwrap_or_else(|| own.clone());
        if current != policy {
            policy = current;
            next = next.min(now + policy.interval);
            next_app = match (policy.app_interval, next_app) {
                (Some(d), Some(t)) => Some(t.min(now + d)),
                (Some(d), None) => Some(now + d),
                (None, _) => None,
            };
        }
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(200)));
            continue;
        }
        next = now + policy.interval;
        let app = next_app.is_some_and(|t| now >= t);
        if app {
            next_app = policy.app_interval.map(|d| now + d);
        }
        if let Some(why) = not_ready(&machine) {
            if was_ready {
                tracing::info!(reason = %why, "recovery points paused");
            }
            was_ready = false;
            continue;
        }
        was_ready = true;
        if let Err(e) = take(&machine, &points, app, false, false) {
            tracing::warn!(error = %e, app, "taking a recovery point failed");
        }
    }
}

/// The shipper's `on_connection` hook: each new connection to the process server gets a task
/// answering the master target's requests on it ([`serve_control`]).
pub fn control_hook(
    machine: &Arc<Machine>,
    points: &Arc<Points>,
) -> Arc<dyn Fn(quinn::Connection) + Send + Sync> {
    let (machine, points) = (Arc::clone(machine), Arc::clone(points));
    Arc::new(move |conn| {
        tokio::spawn(serve_control(
            Arc::clone(&machine),
            Arc::clone(&points),
            conn,
        ));
    })
}

/// Answers the master target's requests on `conn` (one disk's connection; each request is for
/// the whole machine) until it closes.
pub async fn serve_control(machine: Arc<Machine>, points: Arc<Points>, conn: quinn::Connection) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let machine = Arc::clone(&machine);
        let points = Arc::clone(&points);
        tokio::spawn(async move {
            let reply = match haven_net::control::read_message::<Request>(&mut recv).await {
                Ok(req) => handle(machine, points, req).await,
                Err(e) => Reply::Failed(format!("bad request: {e}")),
            };
            answer(&mut send, &reply).await;
        });
    }
}

/// Runs one of the master target's requests (whichever way it came).
pub async fn handle(machine: Arc<Machine>, points: Arc<Points>, req: Request) -> Reply {
    let (app, close, quiesced) = match req.command {
        Command::Point { app, quiesced } => (app, false, quiesced),
        Command::Stop => (false, true, false),
        Command::Policy {
            interval_ms,
            app_interval_ms,
        } => {
            return match points.assign(interval_ms, app_interval_ms) {
                Ok(done) => Reply::Done(done),
                Err(why) => Reply::Failed(why),
            };
        }
        Command::ClearPolicy => return Reply::Done(points.clear_assigned()),
        Command::Hold { hold_ms } => {
            return match tokio::task::spawn_blocking(move || hold(machine, points, hold_ms)).await {
                Ok(Ok((hold, last_point))) => Reply::Held { hold, last_point },
                Ok(Err(why)) => Reply::Failed(why),
                Err(_) => Reply::Failed("the agent's hold task failed".into()),
            };
        }
        Command::Release { hold, point } => {
            return match tokio::task::spawn_blocking(move || release(&points, hold, point)).await {
                Ok(Ok(taken)) if point.is_some() => Reply::Taken(taken),
                Ok(Ok(_)) => Reply::Done("released".into()),
                Ok(Err(why)) if point.is_none() => Reply::Done(why),
                Ok(Err(why)) => Reply::Failed(why),
                Err(_) => Reply::Failed("the agent's release task failed".into()),
            };
        }
    };
    match tokio::task::spawn_blocking(move || take(&machine, &points, app, close, quiesced)).await {
        Ok(Ok(p)) => Reply::Taken(p),
        Ok(Err(why)) => Reply::Failed(why),
        Err(_) => Reply::Failed("the agent's point task failed".into()),
    }
}

async fn answer(send: &mut quinn::SendStream, reply: &Reply) {
    if let Err(e) = haven_net::control::write_message(send, reply).await {
        tracing::warn!(error = %e, "answering a control request");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(interval: &str, app: Option<&str>) -> PointsArgs {
        PointsArgs {
            point_interval: interval.into(),
            app_point_interval: app.map(str::to_string),
            freeze: Vec::new(),
            pre_script: Some(PathBuf::from("/bin/true")),
            post_script: None,
            hook_timeout: "30s".into(),
        }
    }

    #[test]
    fn intervals_are_checked_against_their_minimums() {
        let (policy, _) = args("250ms", Some("1s")).resolve().expect("valid");
        assert_eq!(policy.interval, Duration::from_millis(250));
        assert_eq!(policy.app_interval, Some(Duration::from_secs(1)));
        let e = args("100ms", None).resolve().expect_err("too short");
        assert_eq!(e.to_string(), "--point-interval 100ms: give at least 250ms");
        let e = args("1s", Some("500ms")).resolve().expect_err("too short");
        assert_eq!(
            e.to_string(),
            "--app-point-interval 500ms: give at least 1s"
        );
        let e = args("5 s", None).resolve().expect_err("bad unit");
        assert!(e.to_string().starts_with("--point-interval \"5 s\""), "{e}");
    }
}
