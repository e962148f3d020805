//! The configuration-server role: the one place a deployment is run from.
//!
//! Gateways join it (`haven-gateway enroll --config-server`, then `[join]` in their
//! configuration) and keep one QUIC connection to it, on which they report every second (status
//! and host health) and get their [`Assignment`] back (the policies of the machines they
//! serve); it forwards operators' API calls to them on the same connection
//! ([`ConfigServer::forward`]). What it knows of each gateway is kept in redb
//! (`<data_dir>/cs/state.redb`, `gateway/<name>`); the live status only in memory.
//!
//! Agents enrolled with its CA connect the same way and ask which process server to replicate
//! to; the answer ([`crate::placement`]) is kept per agent (`agent/<id>`), and a move from a
//! process server gone past the machine's grace raises `agent.moved`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use haven_net::SiteCa;
use haven_net::endpoint::{AgentConnection, ServerTls};
use haven_net::join::{
    self, AgentAnswer, AgentAsk, ApiAnswer, ApiRequest, AssignedProcessServer, Assignment, Health,
    ProcessServerContact, Report, Request,
};
use haven_store::StateDb;
use serde::{Deserialize, Serialize};

use crate::events::{Event, Events, FULL_PERCENT, LOW_SPACE_PERCENT, Raise, Severity, Webhook};
use crate::ingest::lock;
use crate::jobs::{Job, JobState};
use crate::now_ms;
use crate::placement::{AgentRecord, Candidate, Placement, place};
use crate::status::GatewayStatus;

/// A gateway that has not reported for this long is shown as gone.
pub const GONE_AFTER: Duration = Duration::from_secs(5);
/// Longest a forwarded call may take at the gateway (a failover materialises a disk).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(600);

/// The role's configuration.
#[derive(Clone, Debug)]
pub struct ConfigServerConfig {
    /// UDP address gateways connect (and enroll) to.
    pub listen: SocketAddr,
    /// Its state folder (`<data_dir>/cs`).
    pub data_dir: PathBuf,
}

/// What the configuration server keeps of a gateway.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewayRecord {
    /// The name it enrolled with.
    pub name: String,
    /// Its site.
    pub site: String,
    /// `process-server`, `master-target`.
    pub roles: Vec<String>,
    /// Its id at this server's CA.
    pub id: String,
    /// First and last report, ms since the Unix epoch.
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// How agents reach it, when it is a process server.
    #[serde(default)]
    pub contact: Option<ProcessServerContact>,
}

/// The deployment's pipeline as applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StoredPipeline {
    /// The assignment revision it made.
    pub revision: u64,
    /// When it was applied, ms since the Unix epoch.
    pub applied_ms: u64,
    /// The pipeline (`haven_pipeline::Pipeline`, as JSON).
    #[schema(value_type = Object)]
    pub pipeline: serde_json::Value,
}

/// A gateway as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GatewayView {
    #[serde(flatten)]
    pub record: GatewayRecord,
    /// Connected and reporting (last report less than 5 s ago).
    pub connected: bool,
    /// Host health of its last report.
    pub health: Option<Health>,
    /// The assignment revision it runs.
    pub assignment_revision: u64,
    /// Its status as of its last report (`GatewayStatus`, as its own API serves it).
    #[schema(value_type = Object)]
    pub status: Option<serde_json::Value>,
}

/// A gateway connected now.
struct Live {
    /// Its certificate's id.
    id: String,
    connection: haven_net::quinn::Connection,
    report: Option<Report>,
    reported_at: Option<std::time::Instant>,
}

/// The configuration server.
pub struct ConfigServer {
    config: ConfigServerConfig,
    state: StateDb,
    live: Mutex<BTreeMap<String, Live>>,
    assignment: Mutex<Assignment>,
    listener: crate::Listener,
    events: Events,
    applying: Mutex<()>,
    /// When each gateway last reported (kept after it leaves, to tell it is gone).
    last_report: Mutex<BTreeMap<String, std::time::Instant>>,
    /// The agents it enrolled, by id, as kept in redb (`agent/<id>`).
    agents: Mutex<BTreeMap<String, AgentRecord>>,
    /// Its CA's revocation list, handed to process servers with their assignment.
    crl_pem: Mutex<Option<String>>,
    /// Each master target's plugin traps at its last report.
    traps_seen: Mutex<BTreeMap<String, u64>>,
    jobs: crate::jobs::Jobs,
    /// The pipeline's adapters, run here.
    platforms: crate::platforms::Platforms,
    /// Wakes the inventory loop (after an apply or a secret change).
    inventory_due: tokio::sync::Notify,
    /// Seals the secrets `secret:NAME` settings refer to (`<data_dir>/secrets.key`).
    secrets_key: haven_store::Key,
    /// Tasks waiting for an operator (a plan at a manual step), by key.
    waiters: Mutex<BTreeMap<String, Arc<Waiter>>>,
}

/// A task that may wait for an operator.
#[derive(Default)]
pub struct Waiter {
    notify: tokio::sync::Notify,
    waiting: std::sync::atomic::AtomicBool,
}

impl Waiter {
    /// Waits until [`ConfigServer::resume`] is called for it.
    pub async fn wait(&self) {
        use std::sync::atomic::Ordering;
        self.waiting.store(true, Ordering::Release);
        self.notify.notified().await;
    }
}

impl std::fmt::Debug for ConfigServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigServer")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

/// Why a forwarded call failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no gateway named `{0}` has joined this configuration server")]
    Unknown(String),
    #[error("gateway `{0}` is not connected; it has not reported for {1:?}")]
    Gone(String, Duration),
    #[error("gateway `{0}`: {1}")]
    Failed(String, String),
}

impl ConfigServer {
    /// Opens the role's state.
    pub fn open(config: ConfigServerConfig) -> Result<Arc<ConfigServer>> {
        haven_fsutil::create_dir_all(&config.data_dir)?;
        let state = StateDb::open(&config.data_dir.join("state.redb"))?;
        let assignment = state
            .get_json::<Assignment>("assignment")?
            .unwrap_or_default();
        let events = Events::open(&state)?;
        let jobs = crate::jobs::Jobs::open(&state)?;
        let agents = state
            .json_with_prefix::<AgentRecord>("agent/")?
            .into_iter()
            .map(|(_, a)| (a.id.clone(), a))
            .collect();
        // Every gateway known gets GONE_AFTER from this start to report, or is unreachable.
        let known: BTreeMap<String, std::time::Instant> = state
            .json_with_prefix::<GatewayRecord>("gateway/")?
            .into_iter()
            .map(|(_, g)| (g.name, std::time::Instant::now()))
            .collect();
        let secrets_key = haven_store::Key::load_or_create(&config.data_dir.join("secrets.key"))?;
        let cs = Arc::new(ConfigServer {
            platforms: crate::platforms::Platforms::new()?,
            inventory_due: tokio::sync::Notify::new(),
            secrets_key,
            waiters: Mutex::new(BTreeMap::new()),
            agents: Mutex::new(agents),
            crl_pem: Mutex::new(None),
            traps_seen: Mutex::new(BTreeMap::new()),
            jobs,
            config,
            events,
            applying: Mutex::new(()),
            last_report: Mutex::new(known),
            state,
            live: Mutex::new(BTreeMap::new()),
            assignment: Mutex::new(assignment),
            listener: crate::Listener::default(),
        });
        cs.sync_platforms();
        Ok(cs)
    }

    /// Serves gateways (and their enrollment, with `ca`) until the listener fails.
    pub async fn serve(
        self: Arc<Self>,
        tls: ServerTls,
        ca: Option<Arc<Mutex<SiteCa>>>,
    ) -> Result<()> {
        let server = self
            .listener
            .bind(self.config.listen, tls, ca)
            .with_context(|| format!("configuration server on {}", self.config.listen))?;
        tracing::info!(addr = %server.local_addr()?, "configuration server listening");
        tokio::spawn(watch_gone(Arc::downgrade(&self)));
        tokio::spawn(take_inventories(Arc::downgrade(&self)));
        while let Some(conn) = server.accept().await {
            let cs = self.clone();
            tokio::spawn(async move { cs.gateway(conn).await });
        }
        anyhow::bail!("the configuration server's listener stopped accepting gateways")
    }

    /// Its QUIC listener (for CRL updates and cutting revoked gateways off).
    pub fn listener(&self) -> &crate::Listener {
        &self.listener
    }

    /// One connection, a gateway's or an agent's: its reports or questions, until it closes.
    async fn gateway(self: Arc<Self>, conn: AgentConnection) {
        let name = conn.peer.machine_name.clone();
        let id = conn.peer.agent_id.clone();
        // Registered as a gateway at its first report.
        let mut ticket = None;
        loop {
            let (mut send, mut recv) = match conn.connection.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    if ticket.is_some() {
                        tracing::info!(gateway = %name, error = %e, "gateway left");
                    }
                    break;
                }
            };
            let report = match join::read::<Request>(&mut recv).await {
                Ok(Request::Report(r)) => r,
                Ok(Request::Agent(ask)) => {
                    let cs = self.clone();
                    let (agent, machine) = (id.clone(), name.clone());
                    let answer = tokio::task::spawn_blocking(move || {
                        cs.agent_asked(&agent, &machine, ask)
                    })
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|a| a)
                    .unwrap_or_else(|e| {
                        tracing::error!(agent = %conn.peer.agent_id, error = %format!("{e:#}"),
                                "placing an agent");
                        AgentAnswer {
                            process_server: None,
                            message: Some(format!("the configuration server failed: {e:#}")),
                        }
                    });
                    if let Err(e) = join::write(&mut send, &answer).await {
                        tracing::debug!(agent = %name, error = %e, "answering an agent");
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(peer = %name, error = %e, "a bad request");
                    continue;
                }
            };
            if ticket.is_none() {
                match self.register(&conn, &name, &id) {
                    Some(t) => ticket = Some(t),
                    None => return,
                }
            }
            if report.name != name {
                tracing::warn!(gateway = %name, reported = %report.name,
                    "a report under another name than the certificate's; ignored");
                continue;
            }
            let cs = self.clone();
            let id = id.clone();
            let answer = tokio::task::spawn_blocking(move || cs.heard(&id, report)).await;
            let answer = match answer {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    tracing::error!(gateway = %name, error = %format!("{e:#}"), "recording a report");
                    continue;
                }
                Err(e) => {
                    tracing::error!(gateway = %name, error = %e, "recording a report");
                    continue;
                }
            };
            if let Err(e) = join::write(&mut send, &answer).await {
                tracing::debug!(gateway = %name, error = %e, "answering a report");
            }
        }
        let Some(ticket) = ticket else { return };
        self.listener.remove(ticket);
        let mut live = lock(&self.live);
        if live
            .get(&name)
            .is_some_and(|l| l.connection.stable_id() == conn.connection.stable_id())
        {
            live.remove(&name);
        }
    }

    /// Registers a connection as the gateway `name` at its first report; `None` when the
    /// name belongs to another gateway connected now (the connection is closed).
    fn register(&self, conn: &AgentConnection, name: &str, id: &str) -> Option<usize> {
        // A name is one gateway: another certificate under the name of a gateway connected
        // now is refused (the one connected keeps it). A gateway enrolled again (a new
        // certificate) takes its name over once the old one is gone.
        let taken = lock(&self.live)
            .get(name)
            .filter(|l| l.connection.close_reason().is_none())
            .map(|l| l.id.clone());
        if let Some(other) = taken.filter(|other| other != id) {
            tracing::warn!(gateway = %name, id = %id, holder = %other,
                "a gateway joined under a name another gateway holds; refused");
            conn.connection.close(
                haven_net::endpoint::CLOSE_BAD_IDENTITY.into(),
                format!(
                    "the name `{name}` belongs to another gateway (id {other}) at this \
                     configuration server: enroll this one under a name of its own"
                )
                .as_bytes(),
            );
            return None;
        }
        tracing::info!(gateway = %name, "gateway joined");
        let ticket = self.listener.add(id, &conn.connection);
        lock(&self.live).insert(
            name.to_string(),
            Live {
                id: id.to_string(),
                connection: conn.connection.clone(),
                report: None,
                reported_at: None,
            },
        );
        Some(ticket)
    }

    /// An agent asks where to replicate: places it (see [`crate::placement`]) and records
    /// where.
    fn agent_asked(&self, id: &str, machine: &str, ask: AgentAsk) -> Result<AgentAnswer> {
        let now = now_ms();
        let policy = lock(&self.assignment).machines.get(machine).cloned();
        let gateways: Vec<(String, GatewayRecord)> = self.state.json_with_prefix("gateway/")?;
        let mut agents = lock(&self.agents);
        let known = agents.get(id).cloned();
        let mut load: BTreeMap<&str, usize> = BTreeMap::new();
        for a in agents.values().filter(|a| a.id != id) {
            if let Some(ps) = &a.process_server {
                *load.entry(ps.as_str()).or_default() += 1;
            }
        }
        let (live, last) = (lock(&self.live), lock(&self.last_report));
        let candidates: Vec<Candidate> = gateways
            .iter()
            .filter(|(_, g)| g.contact.is_some() && g.roles.iter().any(|r| r == "process-server"))
            .map(|(_, g)| {
                let l = live.get(&g.name);
                let connected = l
                    .and_then(|l| l.reported_at)
                    .is_some_and(|t| t.elapsed() < GONE_AFTER);
                let gone_for = match last.get(&g.name) {
                    Some(t) => t.elapsed(),
                    None => Duration::from_millis(now.saturating_sub(g.last_seen_ms)),
                };
                let cache_bytes = l
                    .and_then(|l| l.report.as_ref())
                    .and_then(|r| r.status["process_server"]["cache_bytes"].as_u64())
                    .unwrap_or(0);
                Candidate {
                    name: g.name.clone(),
                    site: g.site.clone(),
                    connected,
                    gone_for: if connected { Duration::ZERO } else { gone_for },
                    agents: load.get(g.name.as_str()).copied().unwrap_or(0),
                    cache_bytes,
                }
            })
            .collect();
        drop((live, last));
        // An agent that says it runs at another site than the machine's pipeline entry is the
        // agent of its replica there (a reprotect): placed at its own site, its entry's
        // process server not pinned.
        let away = ask.site.is_some()
            && policy
                .as_ref()
                .is_some_and(|p| p.site.is_some() && p.site != ask.site);
        let site = policy
            .as_ref()
            .and_then(|p| p.site.clone())
            .filter(|_| !away)
            .or(ask.site.clone())
            .or_else(|| known.as_ref().and_then(|k| k.site.clone()));
        let current = known.as_ref().and_then(|k| k.process_server.clone());
        let grace = Duration::from_millis(
            policy
                .as_ref()
                .map_or(join::DEFAULT_PROCESS_SERVER_GRACE.as_millis() as u64, |p| {
                    p.process_server_grace_ms
                }),
        );
        let pinned = policy
            .as_ref()
            .and_then(|p| p.process_server.clone())
            .filter(|_| !away);
        let placement = place(
            site.as_deref(),
            current.as_deref(),
            ask.connected && ask.process_server == current,
            pinned.as_deref(),
            grace,
            &candidates,
        );
        let mut record = known.clone().unwrap_or(AgentRecord {
            id: id.to_string(),
            machine_name: machine.to_string(),
            site: None,
            process_server: None,
            assigned_ms: now,
            moves: 0,
            last_seen_ms: now,
            connected: false,
        });
        record.machine_name = machine.to_string();
        record.site.clone_from(&site);
        record.connected = ask.connected && ask.process_server == current && current.is_some();
        let (to, message) = match placement {
            Placement::Stay(to) => (Some(to), None),
            Placement::Go { to, from } => {
                record.assigned_ms = now;
                if let Some(from) = &from {
                    record.moves += 1;
                    let gone = candidates
                        .iter()
                        .find(|c| c.name == *from)
                        .map_or(Duration::ZERO, |c| c.gone_for);
                    let text = format!(
                        "the agent of {machine} moved from process server {from} (gone for {} \
                         s, its policy's grace is {} s) to {to}; it sends there what the lost \
                         one had not forwarded",
                        gone.as_secs(),
                        grace.as_secs()
                    );
                    tracing::warn!(agent = %id, "{text}");
                    if let Err(e) = self.events.raise(
                        &self.state,
                        Raise {
                            severity: Severity::Warning,
                            kind: "agent.moved",
                            gateway: Some(to.clone()),
                            item: Some(machine.to_string()),
                            text,
                        },
                    ) {
                        tracing::error!(error = %format!("{e:#}"), "recording an event");
                    }
                } else {
                    tracing::info!(agent = %id, machine = %machine, process_server = %to,
                        "agent assigned");
                }
                (Some(to), None)
            }
            Placement::Nowhere(why) => (current.clone(), Some(why)),
        };
        record.process_server.clone_from(&to);
        // Written when something but the time changed, and at most every 10 s otherwise.
        let changed = known.as_ref().is_none_or(|k| {
            let mut k = k.clone();
            k.last_seen_ms = record.last_seen_ms;
            k != record || now.saturating_sub(record.last_seen_ms) >= 10_000
        });
        if changed {
            record.last_seen_ms = now;
            self.state.put_json(&format!("agent/{id}"), &record)?;
        }
        agents.insert(id.to_string(), record);
        let process_server = to.and_then(|name| {
            let g = gateways.iter().find(|(_, g)| g.name == name)?;
            Some(AssignedProcessServer {
                contact: g.1.contact.clone()?,
                name,
            })
        });
        Ok(AgentAnswer {
            message: message.or_else(|| {
                process_server.is_none().then(|| {
                    "the assigned process server has never reported how to reach it".into()
                })
            }),
            process_server,
        })
    }

    /// Starts a job (see [`crate::jobs`]) with its first step running.
    pub fn start_job(&self, new: crate::jobs::NewJob<'_>) -> Result<Job> {
        self.jobs.start(&self.state, new)
    }

    /// Claims `key` (e.g. `plan/NAME`) for a task that may wait for an operator; `None` when
    /// another task holds it.
    pub fn claim_waiter(&self, key: &str) -> Option<Arc<Waiter>> {
        let mut waiters = lock(&self.waiters);
        if waiters.contains_key(key) {
            return None;
        }
        let w = Arc::new(Waiter::default());
        waiters.insert(key.to_string(), w.clone());
        Some(w)
    }

    /// Wakes the task waiting on `key`; false when no task waits there now.
    pub fn resume(&self, key: &str) -> bool {
        match lock(&self.waiters).get(key) {
            // One resume per wait: a second one (a double click, a retry) finds it taken and
            // leaves no permit behind for the next manual step.
            Some(w)
                if w.waiting
                    .compare_exchange(
                        true,
                        false,
                        std::sync::atomic::Ordering::AcqRel,
                        std::sync::atomic::Ordering::Acquire,
                    )
                    .is_ok() =>
            {
                w.notify.notify_one();
                true
            }
            _ => false,
        }
    }

    /// Releases `key` (its task ended).
    pub fn drop_waiter(&self, key: &str) {
        lock(&self.waiters).remove(key);
    }

    /// The recovery-plan runs a restart interrupted, to resume (once).
    pub fn take_interrupted_plans(&self) -> Vec<Job> {
        self.jobs.take_interrupted_plans()
    }

    /// Starts the next step of a running `job`.
    pub fn begin_job_step(&self, job: Job, name: &str) -> Result<Job> {
        self.jobs.begin_step(&self.state, job, name)
    }

    /// A value kept for the deployment (`replica/<machine>`: the replica machine an adapter
    /// defined), JSON.
    pub fn record<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        Ok(self.state.get_json(key)?)
    }

    /// Keeps a value for the deployment (see [`ConfigServer::record`]); `None` removes it.
    pub fn set_record<T: Serialize>(&self, key: &str, value: Option<&T>) -> Result<()> {
        match value {
            Some(v) => self.state.put_json(key, v)?,
            None => self.state.remove_json(key)?,
        }
        Ok(())
    }

    /// Ends `job`'s running step (and the job, when `last` or failed); a failed job is an
    /// event (`job.failed`).
    pub fn end_job_step(&self, job: Job, ok: bool, output: String, last: bool) -> Result<Job> {
        self.end_job_step_with(job, ok, output, (last || !ok).then_some(ok))
    }

    /// Ends `job`'s running step (`ok` or failed); the job ends with it when `end` says how
    /// (`Some(true)`: succeeded, also after a failed step a plan tolerates), else it keeps
    /// running.
    pub fn end_job_step_with(
        &self,
        job: Job,
        ok: bool,
        output: String,
        end: Option<bool>,
    ) -> Result<Job> {
        let job = self.jobs.end_step_with(&self.state, job, ok, output, end)?;
        if job.state == JobState::Failed {
            self.events.raise(
                &self.state,
                Raise {
                    severity: Severity::Error,
                    kind: "job.failed",
                    gateway: job.gateway.clone(),
                    item: job.item.clone(),
                    text: format!(
                        "job {} ({}{}) failed: {}; `haven job show {}` has its steps",
                        job.id,
                        job.kind,
                        job.item
                            .as_deref()
                            .map_or(String::new(), |i| format!(" of {i}")),
                        job.outcome(),
                        job.id
                    ),
                },
            )?;
        }
        Ok(job)
    }

    /// Jobs, newest first.
    pub fn jobs(&self, limit: usize) -> Result<Vec<Job>> {
        self.jobs.list(&self.state, limit)
    }

    /// Job `id`, if kept.
    pub fn job(&self, id: u64) -> Result<Option<Job>> {
        self.jobs.get(&self.state, id)
    }

    /// The agents this server enrolled and where each replicates.
    pub fn agents(&self) -> Vec<AgentRecord> {
        lock(&self.agents).values().cloned().collect()
    }

    /// This server CA's revocation list, sent to process servers with every assignment.
    pub fn set_crl(&self, crl_pem: String) {
        *lock(&self.crl_pem) = Some(crl_pem);
    }

    /// Records a report; returns the gateway's assignment.
    fn heard(&self, id: &str, report: Report) -> Result<Assignment> {
        let now = now_ms();
        let key = format!("gateway/{}", report.name);
        let known: Option<GatewayRecord> = self.state.get_json(&key)?;
        let record = GatewayRecord {
            name: report.name.clone(),
            site: report.site.clone(),
            roles: report.roles.clone(),
            id: id.to_string(),
            first_seen_ms: known.as_ref().map_or(now, |k| k.first_seen_ms),
            last_seen_ms: now,
            contact: report.process_server.clone(),
        };
        // Written when something but the time changed, and at most every 10 s otherwise.
        let stale = known.as_ref().is_none_or(|k| {
            k.site != record.site
                || k.roles != record.roles
                || k.id != record.id
                || k.contact != record.contact
                || now.saturating_sub(k.last_seen_ms) >= 10_000
        });
        if stale {
            self.state.put_json(&key, &record)?;
        }
        lock(&self.last_report).insert(report.name.clone(), std::time::Instant::now());
        let mut assignment = lock(&self.assignment).clone();
        assignment.crl_pem = lock(&self.crl_pem).clone();
        if let Err(e) = self.evaluate(&report, &assignment) {
            tracing::error!(gateway = %report.name, error = %format!("{e:#}"), "recording events");
        }
        if let Some(l) = lock(&self.live).get_mut(&report.name) {
            l.report = Some(report);
            l.reported_at = Some(std::time::Instant::now());
        }
        Ok(assignment)
    }

    /// Raises and clears the events a report shows.
    fn evaluate(&self, report: &Report, assignment: &Assignment) -> Result<()> {
        let gw = report.name.as_str();
        let state = &self.state;
        let ev = &self.events;
        let raise = |severity, kind, item: Option<&str>, text: String| Raise {
            severity,
            kind,
            gateway: Some(gw.to_string()),
            item: item.map(str::to_string),
            text,
        };
        ev.condition(
            state,
            "gateway.unreachable",
            gw,
            false,
            || unreachable!("only cleared here"),
            || {
                raise(
                    Severity::Info,
                    "gateway.reachable",
                    None,
                    format!("gateway {gw} reports again"),
                )
            },
        )?;
        let h = &report.health;
        if h.total_bytes > 0 {
            let low =
                h.free_bytes.saturating_mul(100) < h.total_bytes.saturating_mul(LOW_SPACE_PERCENT);
            let percent = h.free_bytes.saturating_mul(100) / h.total_bytes;
            ev.condition(
                state,
                "space.low",
                gw,
                low,
                || raise(Severity::Warning, "space.low", None, format!(
                    "gateway {gw}: {percent} % free on its data folder's filesystem ({} of {} \
                     bytes); free space or grow it: caches and journals stop taking data when \
                     full", h.free_bytes, h.total_bytes)),
                || raise(Severity::Info, "space.recovered", None, format!(
                    "gateway {gw}: {percent} % free on its data folder's filesystem again")),
            )?;
        }
        let Ok(status) = serde_json::from_value::<GatewayStatus>(report.status.clone()) else {
            return Ok(());
        };
        if let Some(ps) = &status.process_server {
            let full = ps.cache_max_bytes > 0
                && ps.cache_bytes.saturating_mul(100)
                    > ps.cache_max_bytes.saturating_mul(FULL_PERCENT);
            ev.condition(
                state,
                "cache.full",
                gw,
                full,
                || raise(Severity::Warning, "cache.full", None, format!(
                    "process server {gw}: its cache holds {} of {} bytes (above {FULL_PERCENT} \
                     %): the master target or the link to it does not keep up; above the \
                     limit agents are slowed", ps.cache_bytes, ps.cache_max_bytes)),
                || raise(Severity::Info, "cache.recovered", None, format!(
                    "process server {gw}: its cache is below {FULL_PERCENT} % again")),
            )?;
            for d in &ps.disks {
                let item = d.machine_name.as_str();
                let subject = format!("{item}/{}", d.disk);
                ev.condition(
                    state,
                    "policy.refused",
                    &subject,
                    d.policy_refused.is_some(),
                    || {
                        raise(
                            Severity::Warning,
                            "policy.refused",
                            Some(item),
                            format!(
                                "{item}: {}; it takes points on its own intervals: fix the \
                                 policy in the pipeline and apply it again",
                                d.policy_refused.clone().unwrap_or_default()
                            ),
                        )
                    },
                    || {
                        raise(
                            Severity::Info,
                            "policy.accepted",
                            Some(item),
                            format!("{item}: the agent runs its machine's policy again"),
                        )
                    },
                )?;
                ev.condition(
                    state,
                    "agent.disconnected",
                    &subject,
                    !d.agent_connected && d.failed_over.is_none(),
                    || {
                        raise(
                            Severity::Warning,
                            "agent.disconnected",
                            Some(item),
                            format!(
                                "the agent of {item} (disk {}) is not connected to process server \
                         {gw}: its writes are not replicated; check the machine and its \
                         agent",
                                d.disk
                            ),
                        )
                    },
                    || {
                        raise(
                            Severity::Info,
                            "agent.connected",
                            Some(item),
                            format!(
                                "the agent of {item} (disk {}) is connected to process server {gw} \
                         again",
                                d.disk
                            ),
                        )
                    },
                )?;
            }
        }
        if let Some(mt) = &status.master_target {
            // A trap is an event each time the count grows (it restarts with the gateway).
            let seen = lock(&self.traps_seen).insert(gw.to_string(), mt.plugin_traps);
            if mt.plugin_traps > seen.unwrap_or(0) {
                ev.raise(
                    state,
                    raise(
                        Severity::Error,
                        "plugin.trapped",
                        None,
                        format!(
                            "master target {gw}: {} (trap {} since it started); the replica is \
                             retried in 5 s — check the plugin's limits (call_timeout_ms, \
                             memory_mib) and its log",
                            mt.last_plugin_trap
                                .as_deref()
                                .unwrap_or("the writer plugin trapped"),
                            mt.plugin_traps
                        ),
                    ),
                )?;
            }
            for r in &mt.replicas {
                let item = r.machine_name.as_str();
                let subject = format!("{item}/{}", r.disk);
                if let (Some(policy), Some(rpo)) = (assignment.machines.get(item), r.rpo_seconds) {
                    let threshold = policy.rpo_threshold_ms as f64 / 1000.0;
                    ev.condition(
                        state,
                        "rpo.exceeded",
                        &subject,
                        rpo > threshold,
                        || {
                            raise(
                                Severity::Warning,
                                "rpo.exceeded",
                                Some(item),
                                format!(
                                    "{item} (disk {}): RPO {rpo:.1} s is above its policy `{}`'s \
                             threshold of {threshold:.1} s",
                                    r.disk, policy.policy
                                ),
                            )
                        },
                        || {
                            raise(
                                Severity::Info,
                                "rpo.recovered",
                                Some(item),
                                format!(
                                    "{item} (disk {}): RPO {rpo:.1} s is within its policy `{}` \
                             again",
                                    r.disk, policy.policy
                                ),
                            )
                        },
                    )?;
                }
                let full = mt.journal_max_bytes > 0
                    && r.journal_bytes.saturating_mul(100)
                        > mt.journal_max_bytes.saturating_mul(FULL_PERCENT);
                ev.condition(
                    state,
                    "journal.full",
                    &subject,
                    full,
                    || raise(Severity::Warning, "journal.full", Some(item), format!(
                        "{item} (disk {}): its journal at {gw} holds {} of {} bytes (above \
                         {FULL_PERCENT} %): the oldest points are dropped early", r.disk,
                         r.journal_bytes, mt.journal_max_bytes)),
                    || raise(Severity::Info, "journal.recovered", Some(item), format!(
                        "{item} (disk {}): its journal at {gw} is below {FULL_PERCENT} % again",
                        r.disk)),
                )?;
                ev.condition(
                    state,
                    "replication.stalled",
                    &subject,
                    r.error.is_some(),
                    || {
                        raise(
                            Severity::Error,
                            "replication.stalled",
                            Some(item),
                            format!(
                                "{item} (disk {}) at {gw}: {}",
                                r.disk,
                                r.error.clone().unwrap_or_default()
                            ),
                        )
                    },
                    || {
                        raise(
                            Severity::Info,
                            "replication.resumed",
                            Some(item),
                            format!("{item} (disk {}) at {gw}: applying again", r.disk),
                        )
                    },
                )?;
            }
        }
        Ok(())
    }

    /// Gateways that stopped reporting: `gateway.unreachable`, once each.
    fn check_gone(&self) {
        let gone: Vec<String> = lock(&self.last_report)
            .iter()
            .filter(|(_, at)| at.elapsed() >= GONE_AFTER)
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let result = self.events.condition(
                &self.state,
                "gateway.unreachable",
                &name,
                true,
                || Raise {
                    severity: Severity::Error,
                    kind: "gateway.unreachable",
                    gateway: Some(name.clone()),
                    item: None,
                    text: format!(
                        "gateway {name} has not reported for {GONE_AFTER:?}: it, its host or \
                         the network to it is down; what it serves is not protected meanwhile"
                    ),
                },
                || unreachable!("only raised here"),
            );
            if let Err(e) = result {
                tracing::error!(gateway = %name, error = %format!("{e:#}"), "recording an event");
            }
        }
    }

    /// Records an event (an operator's action, done through this server).
    pub fn raise(&self, r: Raise) -> Result<Event> {
        self.events.raise(&self.state, r)
    }

    /// Events after `since`, oldest first, at most `limit`.
    pub fn events(&self, since: u64, limit: usize) -> Result<Vec<Event>> {
        self.events.list(&self.state, since, limit)
    }

    /// Events raised since this server started, by kind and severity.
    pub fn event_counts(&self) -> BTreeMap<(String, Severity), u64> {
        self.events.counts()
    }

    /// Every gateway that ever joined, with what it last reported.
    pub fn gateways(&self) -> Result<Vec<GatewayView>> {
        let records: Vec<(String, GatewayRecord)> = self.state.json_with_prefix("gateway/")?;
        let live = lock(&self.live);
        Ok(records
            .into_iter()
            .map(|(_, record)| {
                let l = live.get(&record.name);
                let report = l.and_then(|l| l.report.as_ref());
                let connected = l
                    .and_then(|l| l.reported_at)
                    .is_some_and(|t| t.elapsed() < GONE_AFTER);
                GatewayView {
                    connected,
                    health: report.map(|r| r.health.clone()),
                    assignment_revision: report.map_or(0, |r| r.assignment_revision),
                    status: report.map(|r| r.status.clone()),
                    record,
                }
            })
            .collect())
    }

    /// The gateway whose last status lists `item` as a replica (a machine name or an agent
    /// id), if any.
    ///
    /// A machine that was reprotected has items at both sites: the one that replicates now
    /// (not `reprotected`) is the one its name means.
    pub fn master_target_of(&self, item: &str) -> Option<String> {
        let live = lock(&self.live);
        // Whether the gateway holds the item, and whether as a reprotected one only.
        let holds = |l: &Live| -> Option<bool> {
            let r = l.report.as_ref()?;
            let replicas = r.status["master_target"]["replicas"].as_array()?;
            let mut found = None;
            for x in replicas {
                let agent = x["agent_id"].as_str().unwrap_or_default();
                let named = x["machine_name"].as_str() == Some(item)
                    || agent == item
                    // A unique prefix of 6+ hex digits, as a master target takes.
                    || (item.len() >= 6
                        && item.bytes().all(|b| b.is_ascii_hexdigit())
                        && agent.starts_with(item));
                if named {
                    let current = x["item_state"].as_str() != Some("reprotected");
                    found = Some(found.unwrap_or(false) || current);
                }
            }
            found
        };
        let mut fallback = None;
        for (name, l) in live.iter() {
            match holds(l) {
                Some(true) => return Some(name.clone()),
                Some(false) => fallback = fallback.or(Some(name.clone())),
                None => {}
            }
        }
        fallback
    }

    /// The names of the connected gateways with `role`.
    pub fn with_role(&self, role: &str) -> Vec<String> {
        lock(&self.live)
            .iter()
            .filter(|(_, l)| {
                l.report
                    .as_ref()
                    .is_some_and(|r| r.roles.iter().any(|x| x == role))
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Runs an operator's call at gateway `name` and returns its answer.
    pub async fn forward(
        &self,
        name: &str,
        request: ApiRequest,
    ) -> Result<ApiAnswer, ForwardError> {
        let connection = lock(&self.live).get(name).map(|l| l.connection.clone());
        let Some(connection) = connection else {
            // Read without the lock held: redb may wait for a commit.
            let known = self
                .state
                .get_json::<GatewayRecord>(&format!("gateway/{name}"))
                .ok()
                .flatten()
                .is_some();
            return Err(if known {
                ForwardError::Gone(name.to_string(), GONE_AFTER)
            } else {
                ForwardError::Unknown(name.to_string())
            });
        };
        join::exchange(&connection, &request, FORWARD_TIMEOUT)
            .await
            .map_err(|e| ForwardError::Failed(name.to_string(), e.to_string()))
    }

    /// The assignment gateways get now.
    pub fn assignment(&self) -> Assignment {
        lock(&self.assignment).clone()
    }

    /// Stores the deployment's pipeline (its JSON form) and the assignment made from it, in one
    /// transaction, before any gateway sees the assignment; returns it with its new revision.
    ///
    /// `adapters` are the pipeline's adapter plugins, their settings as written (`secret:NAME`
    /// unresolved); they are loaded here and their inventory taken at once.
    pub fn commit(
        &self,
        pipeline: serde_json::Value,
        mut next: Assignment,
        webhooks: Vec<Webhook>,
        adapters: Vec<haven_host::PluginSpec>,
    ) -> Result<Assignment> {
        let mut current = lock(&self.assignment);
        next.revision = current.revision + 1;
        let stored = StoredPipeline {
            revision: next.revision,
            applied_ms: now_ms(),
            pipeline,
        };
        self.state.update_json(
            &[
                ("pipeline".to_string(), serde_json::to_value(&stored)?),
                ("assignment".to_string(), serde_json::to_value(&next)?),
                ("webhooks".to_string(), serde_json::to_value(&webhooks)?),
                ("adapters".to_string(), serde_json::to_value(&adapters)?),
            ],
            &[],
        )?;
        *current = next.clone();
        drop(current);
        self.events.set_webhooks(webhooks);
        self.sync_platforms();
        Ok(next)
    }

    /// Loads the adapters of the applied pipeline with their secrets resolved, and has their
    /// inventory taken.
    pub fn sync_platforms(&self) {
        let adapters: Vec<haven_host::PluginSpec> = match self.state.get_json("adapters") {
            Ok(a) => a.unwrap_or_default(),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reading the pipeline's adapters");
                return;
            }
        };
        let mut specs = Vec::new();
        let mut unresolved = BTreeMap::new();
        for mut spec in adapters {
            match self.resolve_secrets(&spec.settings) {
                Ok(settings) => {
                    spec.settings = settings;
                    specs.push(spec);
                }
                Err(e) => {
                    unresolved.insert(spec.name.clone(), e);
                }
            }
        }
        self.platforms.sync(specs);
        self.platforms.unresolved(unresolved);
        self.inventory_due.notify_one();
    }

    /// `settings` with each `secret:NAME` value replaced by the secret's value.
    fn resolve_secrets(
        &self,
        settings: &BTreeMap<String, String>,
    ) -> std::result::Result<BTreeMap<String, String>, String> {
        let secrets = haven_store::Secrets::new(&self.state, &self.secrets_key);
        settings
            .iter()
            .map(|(k, v)| match v.strip_prefix("secret:") {
                Some(name) => match secrets.get(name) {
                    Ok(Some(value)) => Ok((k.clone(), value)),
                    Ok(None) => Err(format!(
                        "setting `{k}` refers to secret `{name}`, which this configuration \
                         server does not hold; store it with `haven secret set {name}`"
                    )),
                    Err(e) => Err(format!("setting `{k}`: {e}")),
                },
                None => Ok((k.clone(), v.clone())),
            })
            .collect()
    }

    /// The secrets held (names and times, never values).
    pub fn secrets(&self) -> Result<Vec<haven_store::SecretInfo>> {
        Ok(haven_store::Secrets::new(&self.state, &self.secrets_key).list()?)
    }

    /// Sets a secret; adapters whose settings refer to it are loaded again.
    pub fn set_secret(&self, name: &str, value: &str) -> Result<haven_store::SecretInfo> {
        let info =
            haven_store::Secrets::new(&self.state, &self.secrets_key).set(name, value, now_ms())?;
        self.sync_platforms();
        Ok(info)
    }

    /// Deletes a secret; false when there was none.
    pub fn remove_secret(&self, name: &str) -> Result<bool> {
        let removed = haven_store::Secrets::new(&self.state, &self.secrets_key).remove(name)?;
        if removed {
            self.sync_platforms();
        }
        Ok(removed)
    }

    /// The pipeline's adapters and what they reported last.
    pub fn platforms(&self) -> Result<Vec<crate::platforms::PlatformView>> {
        self.platforms.views(&self.state)
    }

    /// The machines adapter `name` reported last; `None` when there is no such adapter.
    pub fn platform_machines(
        &self,
        name: &str,
    ) -> Result<Option<Vec<haven_host::platform::Machine>>> {
        self.platforms.machines(&self.state, name)
    }

    /// Checks adapter `name` and takes its inventory now; the error text when it failed.
    pub async fn refresh_platform(&self, name: &str) -> Option<String> {
        self.take_inventory(name, true).await
    }

    /// Takes adapter `name`'s inventory (checking it first when `check`), raising or clearing
    /// its `platform.unreachable` condition.
    async fn take_inventory(&self, name: &str, check: bool) -> Option<String> {
        let error = self.platforms.inventory(&self.state, name, check).await;
        self.platform_condition(name, error.as_deref());
        error
    }

    /// Runs a call of adapter `name` (retried as [`crate::platforms`] says).
    pub async fn adapter_call<T: Send + 'static>(
        &self,
        name: &str,
        f: impl Fn(&mut haven_host::AdapterPlugin) -> std::result::Result<T, haven_host::PluginError>
        + Send
        + 'static,
    ) -> Result<T> {
        self.platforms.call(name, f).await
    }

    /// Raises `platform.unreachable` when an adapter's inventory fails, and
    /// `platform.reachable` when it works again.
    fn platform_condition(&self, name: &str, error: Option<&str>) {
        let raise = |severity, kind, text: String| Raise {
            severity,
            kind,
            gateway: None,
            item: None,
            text,
        };
        let result = self.events.condition(
            &self.state,
            "platform.unreachable",
            name,
            error.is_some(),
            || {
                raise(
                    Severity::Warning,
                    "platform.unreachable",
                    format!(
                        "adapter {name}: {}; its machine list is kept as it was",
                        error.unwrap_or_default()
                    ),
                )
            },
            || {
                raise(
                    Severity::Info,
                    "platform.reachable",
                    format!("adapter {name} answers again"),
                )
            },
        );
        if let Err(e) = result {
            tracing::error!(error = %format!("{e:#}"), "recording a platform event");
        }
    }

    /// Held by whoever reads the pipeline, plans against it and commits: two applies never
    /// plan against the same pipeline.
    pub fn pipeline_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.applying)
    }

    /// The pipeline applied last, if any.
    pub fn pipeline(&self) -> Result<Option<StoredPipeline>> {
        Ok(self.state.get_json("pipeline")?)
    }
}

/// Takes every adapter's inventory every [`crate::platforms::INVENTORY_INTERVAL`], and at once
/// when an apply or a secret changes them.
async fn take_inventories(cs: std::sync::Weak<ConfigServer>) {
    loop {
        {
            let Some(cs) = cs.upgrade() else { return };
            for name in cs.platforms.names() {
                cs.take_inventory(&name, false).await;
            }
        }
        let Some(strong) = cs.upgrade() else { return };
        let due = async { strong.inventory_due.notified().await };
        let _ = tokio::time::timeout(crate::platforms::INVENTORY_INTERVAL, due).await;
    }
}

/// Every second, raises `gateway.unreachable` for the gateways that stopped reporting.
async fn watch_gone(cs: std::sync::Weak<ConfigServer>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(cs) = cs.upgrade() else { return };
        let _ = tokio::task::spawn_blocking(move || cs.check_gone()).await;
    }
}
