//! The process server: the durable, compressed, encrypted cache between agents and the master
//! target.
//!
//! ```text
//! agent ──QUIC haven/1──▶ ingest (Receiver) ──▶ cache/<agent>/<disk>/ (zstd, AES-256-GCM)
//!         ◀── Ack = durable in the cache ──┘          │
//!                                                     ▼
//!                          forwarder (Sender) ──QUIC haven/1──▶ master target
//!                          frees the cache only up to what the master target acknowledged
//! ```
//!
//! The process server holds one QUIC connection to its master target, shared by everyone: one
//! forwarder task per source agent opens its own replication stream on it, whose `Hello` names
//! the agent (the master target keys replicas by it); the agents' reports go up on it, each on
//! a unidirectional stream of its own, and the master target's control requests come down on it
//! naming the agent. A forwarder forwards only records durable in the cache, at most a window of
//! them unacknowledged, already compressed (the cache's bytes travel as they are stored). QUIC
//! keeps the streams independent: one agent's records never wait behind another's, and the
//! connection's liveness (QUIC keepalives and idle timeout) does not depend on any of them.
//!
//! Backpressure: the cache of each disk has a size limit. When it is full the ingest loop stops
//! reading the agent's stream (see [`crate::ingest`]); QUIC flow control stops the agent's
//! sender, and the agent's change log absorbs the workload's writes. Nothing is dropped.
//!
//! Resync: a hash request from an agent is passed to the master target only once every record
//! the cache holds for that disk has been acknowledged by it, so the replica's digests describe
//! exactly the records the agent has sent.
//!
//! Moves: when agents may be moved between process servers (`confirm_owner`, a gateway joined
//! to a configuration server), an agent this process has not forwarded since it started is
//! served only once the master target confirmed that this process server still forwards it (a
//! `Hello` for the agent, answered by a `Welcome`); a process server that never forwarded it, or
//! whose cache the master target refused as `MOVED`, takes the agent over (`Hello` with
//! `TAKEOVER`) and starts its cache where the master target resumes. A forwarder refused as
//! `MOVED` drops the agent's cache, and halts its streams with the same refusal: what it held
//! is stale, and the agent asks its configuration server where to replicate. Records the lost
//! process server acknowledged and never forwarded are the agent's to send again: its `Welcome`
//! here resumes below what it released, and it resyncs what those records changed.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use haven_net::endpoint::{self, Refusal, ServerTls};
use haven_net::join::MachinePolicy;
use haven_net::stream::{FrameReader, Report, read_report, send_report, write_frames};
use haven_net::{SiteCa, quinn};
use haven_replication::forwarder::{Forwarder, ForwarderAction, LaneStart};
use haven_store::journal::{AppendInfo, Journal, JournalOptions};
use haven_store::key::Key;
use haven_store::state::{StateDb, StreamKey, StreamRecord};
use haven_wire::frame::error_code;
use haven_wire::{DiskId, HashRequest, Hashes, Hello, PeerId, Record, Role, Seq};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::ingest::{self, DiskStream, Refused, Sink, Via, lock};
use crate::status::{CachedDisk, DrainStatus, DrainedAgent, ProcessServerStatus};
use crate::{Backoff, Identity, now_ms, parse_peer, peer_hex};

/// Longest an agent may take to answer a control request (its quiesce hooks included).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the process server forwards to.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The master target's address.
    pub addr: SocketAddr,
    /// The name in the master target's certificate.
    pub server_name: String,
    /// This gateway's identity at the master target's site.
    pub identity: Identity,
}

/// How a process server runs.
#[derive(Clone, Debug)]
pub struct ProcessServerConfig {
    /// UDP address agents connect to (default port 9443).
    pub listen: SocketAddr,
    /// The gateway's state folder: `cache/`, `state.redb`, `cache.key`.
    pub data_dir: PathBuf,
    /// Limits of each disk's cache.
    pub cache: JournalOptions,
    /// Most bytes all the disks' caches hold together, shared fairly (see [`admit`]).
    pub cache_total_max_bytes: u64,
    /// The master target.
    pub upstream: Upstream,
    /// Bytes forwarded and not yet acknowledged, per agent.
    pub window_bytes: u64,
    /// Agents may be moved between process servers: confirm with the master target that this
    /// one forwards an agent before serving it (see the module documentation).
    pub confirm_owner: bool,
    /// A cache storage account to drain as well ([`crate::drain`]).
    pub drain: Option<Arc<haven_cache_account::CacheAccount>>,
}

/// Churn (bytes stored in the caches) and throughput (bytes sent to the master target) per
/// second, each over the last interval of at least [`Throughput::EVERY`] between samples.
#[derive(Debug, Default)]
struct Throughput {
    at: Option<Instant>,
    stored: u64,
    sent: Option<u64>,
    churn: f64,
    upload: f64,
}

impl Throughput {
    const EVERY: Duration = Duration::from_secs(1);

    /// Takes the totals now (`sent`: the upstream connection's bytes, `None` without one);
    /// returns (churn, upload) per second.
    fn sample(&mut self, now: Instant, stored: u64, sent: Option<u64>) -> (f64, f64) {
        match self.at {
            Some(at) if now.duration_since(at) < Self::EVERY => {}
            Some(at) => {
                let secs = now.duration_since(at).as_secs_f64();
                self.churn = stored.saturating_sub(self.stored) as f64 / secs;
                // A new connection counts from zero.
                self.upload = match (self.sent, sent) {
                    (Some(before), Some(now)) if now >= before => (now - before) as f64 / secs,
                    (_, Some(now)) => now as f64 / secs,
                    (_, None) => 0.0,
                };
                self.at = Some(now);
                self.stored = stored;
                self.sent = sent;
            }
            None => {
                self.at = Some(now);
                self.stored = stored;
                self.sent = sent;
            }
        }
        (self.churn, self.upload)
    }
}

/// The RPO the process server can hold at the current churn: the time what its caches hold
/// takes to drain at the current throughput, if the throughput keeps up with the churn.
fn achievable_rpo(cache_bytes: u64, churn: f64, upload: f64) -> Option<f64> {
    if cache_bytes == 0 {
        return Some(0.0);
    }
    (upload > 0.0 && upload >= churn).then(|| cache_bytes as f64 / upload)
}

/// Longest wait for the master target's answer when confirming or taking over an agent.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One source agent: its disks' caches and its forwarder.
struct AgentEntry {
    peer: PeerId,
    disks: Mutex<BTreeMap<DiskId, Arc<DiskStream>>>,
    /// Records became durable in one of the caches.
    wake: Notify,
    /// Hash requests for the current forwarder (a new channel with each forwarder).
    hash_tx: Mutex<mpsc::UnboundedSender<HashJob>>,
    report: Mutex<Option<Report>>,
    upstream_connected: AtomicBool,
    forwarder: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The master target failed the agent's disks over: nothing is forwarded or taken from the
    /// agent any more (until this gateway restarts and asks again).
    failed_over: Mutex<Option<String>>,
}

impl AgentEntry {
    /// Ends the agent's streams here with `refused`, which it is told.
    fn halt(&self, refused: &Refused) {
        for s in lock(&self.disks).values() {
            s.halt(refused.clone());
        }
    }
}

type HashJob = (HashRequest, oneshot::Sender<Result<Hashes, String>>);

/// A running process server.
pub struct ProcessServer {
    config: ProcessServerConfig,
    state: Arc<StateDb>,
    key: Key,
    agents: Mutex<HashMap<PeerId, Arc<AgentEntry>>>,
    listener: Arc<crate::Listener>,
    /// Agents whose cache could not be opened, and why: reported, not served.
    broken: Mutex<HashMap<PeerId, (String, String)>>,
    /// Agents' disks the master target confirmed this process server forwards (since it
    /// started). Per disk: each disk of an agent comes on its own stream, and a disk new here
    /// is taken over on its own.
    confirmed: Mutex<std::collections::HashSet<StreamKey>>,
    /// Per agent: its confirmation, takeover or drop runs alone.
    confirming: Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<()>>>>,
    /// Churn and throughput, sampled by `status`.
    throughput: Mutex<Throughput>,
    /// Agents that refused their machine's point policy, and why.
    policy_refusals: Mutex<HashMap<String, String>>,
    /// This server, for starting forwarders from `&self` (the ingest loop's `Sink`).
    me: std::sync::Weak<ProcessServer>,
    /// The one connection to the master target every forwarder shares.
    upstream: tokio::sync::Mutex<UpstreamLink>,
    /// The last reports of the agents drained from a cache account ([`crate::drain`]).
    drained: Mutex<HashMap<PeerId, Report>>,
    budget: CacheBudget,
    /// The point policies the configuration server assigned, by machine name; sent to each
    /// agent of the machine when it connects and when they change.
    policies: Mutex<BTreeMap<String, MachinePolicy>>,
    /// One policy send at a time per agent, each sending the policy current when it runs: the
    /// newest one always arrives last.
    policy_sends: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The caches' limit across all disks.
#[derive(Debug, Default)]
struct CacheBudget {
    /// Bytes the caches hold: summed every [`BUDGET_REFRESH`], admissions added in between.
    used: AtomicU64,
    /// Disks whose cache holds records, at the last sum.
    active: AtomicUsize,
    /// A record was refused since the last sum: blocked disks are woken at the next.
    refused: AtomicBool,
}

/// How often the caches' total is summed (and disks refused for the total woken).
const BUDGET_REFRESH: Duration = Duration::from_millis(250);

/// Whether a disk whose cache holds `own` bytes may take a record of `bytes`, when all caches
/// hold `used` of at most `max` and `active` disks hold records.
///
/// Below three quarters of `max`, any disk may (up to its own cache's limit). Above, only a
/// disk below its fair share of those three quarters (`0.75 max / active`), or one holding
/// nothing, and never beyond `max`: one disk's backlog or initial sync cannot take the room
/// the others need to keep their RPO, and the total stays within `max`.
fn admit(max: u64, used: u64, active: usize, own: u64, bytes: u64) -> bool {
    let soft = max / 4 * 3;
    let after = used.saturating_add(bytes);
    if after <= soft {
        return true;
    }
    let share = soft / active.max(1) as u64;
    after <= max && (own == 0 || own.saturating_add(bytes) <= share)
}

/// The connection to the master target, or why the last attempt failed.
#[derive(Default)]
struct UpstreamLink {
    conn: Option<quinn::Connection>,
    failed: Option<(Instant, String)>,
}

/// After a failed connection attempt, forwarders asking within this time get its error at
/// once (and back off) instead of queueing one attempt each.
const RECONNECT_HOLDOFF: Duration = Duration::from_secs(1);

impl std::fmt::Debug for ProcessServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessServer")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

impl ProcessServer {
    /// Opens the state; every cache that still holds records gets its forwarder back. Must be
    /// called inside a tokio runtime.
    pub fn open(config: ProcessServerConfig) -> Result<Arc<ProcessServer>> {
        if config.cache.max_bytes < 2 * u64::from(haven_wire::frame::MAX_DATA_LEN) {
            bail!(
                "cache_max_bytes {} is below the minimum of {} (two of the largest records)",
                config.cache.max_bytes,
                2 * u64::from(haven_wire::frame::MAX_DATA_LEN)
            );
        }
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let state = Arc::new(StateDb::open(&config.data_dir.join("state.redb"))?);
        let key = Key::load_or_create(&config.data_dir.join("cache.key"))?;
        let ps = Arc::new_cyclic(|me| ProcessServer {
            config,
            state,
            key,
            agents: Mutex::new(HashMap::new()),
            listener: Arc::new(crate::Listener::default()),
            broken: Mutex::new(HashMap::new()),
            confirmed: Mutex::new(std::collections::HashSet::new()),
            confirming: Mutex::new(HashMap::new()),
            throughput: Mutex::new(Throughput::default()),
            policy_refusals: Mutex::new(HashMap::new()),
            me: me.clone(),
            upstream: tokio::sync::Mutex::new(UpstreamLink::default()),
            drained: Mutex::new(HashMap::new()),
            budget: CacheBudget::default(),
            policies: Mutex::new(BTreeMap::new()),
            policy_sends: Mutex::new(HashMap::new()),
        });
        let mut by_peer: BTreeMap<PeerId, Vec<(StreamKey, StreamRecord)>> = BTreeMap::new();
        for (k, r) in ps.state.streams()? {
            by_peer.entry(k.peer).or_default().push((k, r));
        }
        for (peer, streams) in by_peer {
            let disks: Vec<_> = streams
                .iter()
                .map(|(k, r)| haven_wire::DiskInfo {
                    id: k.disk,
                    size: r.size,
                    block_size: r.block_size,
                })
                .collect();
            let machine = streams[0].1.machine_name.clone();
            // One damaged cache must not keep the other agents from being served.
            if let Err(e) = ps.agent_disks(peer, &disks, &machine) {
                tracing::error!(agent = %peer_hex(&peer), error = %format!("{e:#}"), "agent's cache not served");
                lock(&ps.broken).insert(peer, (machine, format!("{e:#}")));
            }
        }
        ps.refresh_budget();
        tokio::spawn(budget_loop(Arc::downgrade(&ps)));
        if let Some(account) = &ps.config.drain {
            tokio::spawn(crate::drain::run(Arc::clone(&ps), Arc::clone(account)));
        }
        Ok(ps)
    }

    /// Keeps the last report of an agent drained from a cache account (none: no longer
    /// drained here), sent up with the others.
    pub(crate) fn set_drained_report(&self, peer: PeerId, report: Option<Report>) {
        match report {
            Some(r) => lock(&self.drained).insert(peer, r),
            None => lock(&self.drained).remove(&peer),
        };
    }

    /// Bytes forwarded and not yet acknowledged, per agent.
    pub(crate) fn window_bytes(&self) -> u64 {
        self.config.window_bytes
    }

    /// Sums the caches for [`admit`]; wakes the disks a refusal blocked.
    fn refresh_budget(&self) {
        let disks: Vec<Arc<DiskStream>> = lock(&self.agents)
            .values()
            .flat_map(|a| lock(&a.disks).values().cloned().collect::<Vec<_>>())
            .collect();
        let (mut used, mut active) = (0, 0);
        for d in &disks {
            let st = d.journal().stats();
            used += st.bytes;
            active += usize::from(st.records > 0);
        }
        self.budget.used.store(used, Ordering::Relaxed);
        self.budget.active.store(active, Ordering::Relaxed);
        if self.budget.refused.swap(false, Ordering::Relaxed) {
            for d in &disks {
                d.freed.notify_one();
            }
        }
    }

    /// Serves agents until the endpoint closes. With `ca`, agents may enroll with a token.
    pub async fn serve(
        self: &Arc<Self>,
        tls: ServerTls,
        ca: Option<Arc<Mutex<SiteCa>>>,
    ) -> Result<()> {
        let server = self.listener.bind(self.config.listen, tls, ca)?;
        tracing::info!(addr = %server.local_addr()?, "process server listening");
        while let Some(conn) = server.accept().await {
            let Some(peer) = parse_peer(&conn.peer.agent_id) else {
                conn.connection
                    .close(endpoint::CLOSE_BAD_IDENTITY.into(), b"bad agent id");
                continue;
            };
            let ps = self.clone();
            tokio::spawn(async move {
                ps.connection(conn.connection, peer, conn.peer.machine_name)
                    .await;
            });
        }
        Ok(())
    }

    /// The role's endpoint: its address, CRLs and live connections.
    pub fn listener(&self) -> &crate::Listener {
        &self.listener
    }

    async fn connection(self: Arc<Self>, conn: quinn::Connection, peer: PeerId, machine: String) {
        let id = peer_hex(&peer);
        let ticket = self.listener.add(&id, &conn);
        if lock(&self.policies).contains_key(&machine) {
            tokio::spawn(
                self.clone()
                    .send_policy(conn.clone(), id.clone(), machine.clone()),
            );
        }
        self.serve_connection(&conn, peer, machine).await;
        self.listener.remove(ticket);
    }

    /// Takes the configuration server's point policies (by machine name) and sends each
    /// connected agent whose policy changed its new one.
    pub fn set_policies(&self, policies: BTreeMap<String, MachinePolicy>) {
        // Machines whose policy changed, came or went (an agent whose machine left the
        // pipeline goes back to its own intervals).
        let changed: Vec<String> = {
            let mut current = lock(&self.policies);
            let changed = policies
                .iter()
                .filter(|(m, p)| current.get(*m) != Some(p))
                .map(|(m, _)| m.clone())
                .chain(
                    current
                        .keys()
                        .filter(|m| !policies.contains_key(*m))
                        .cloned(),
                )
                .collect();
            *current = policies;
            changed
        };
        let Some(me) = self.me.upgrade() else { return };
        // Each agent this server holds disks of, by the machine name its streams carry.
        let agents: Vec<Arc<AgentEntry>> = lock(&self.agents).values().cloned().collect();
        let machines: Vec<(String, String)> = agents
            .iter()
            .filter_map(|a| {
                let machine = lock(&a.disks)
                    .values()
                    .next()
                    .map(|s| lock(&s.machine_name).clone())?;
                Some((peer_hex(&a.peer), machine))
            })
            .collect();
        for (agent, machine) in machines {
            if !changed.contains(&machine) {
                continue;
            }
            if let Some(conn) = self.listener.connection(&agent) {
                tokio::spawn(me.clone().send_policy(conn, agent, machine));
            }
        }
    }

    /// Sends an agent its machine's point policy as it is when the send runs (logged; the
    /// agent keeps its own on failure, and gets it again when it reconnects).
    async fn send_policy(
        self: Arc<Self>,
        conn: quinn::Connection,
        agent_id: String,
        machine: String,
    ) {
        use haven_net::control::{self, Command, Reply, Request};
        let one = lock(&self.policy_sends)
            .entry(agent_id.clone())
            .or_default()
            .clone();
        let _one = one.lock().await;
        let policy = lock(&self.policies).get(&machine).cloned();
        let command = match &policy {
            Some(p) => Command::Policy {
                interval_ms: p.crash_consistent_interval_ms,
                app_interval_ms: p.app_consistent_interval_ms,
            },
            None => Command::ClearPolicy,
        };
        let request = Request {
            agent_id: agent_id.clone(),
            command,
        };
        let name = policy.as_ref().map_or("(none)", |p| p.policy.as_str());
        let refused = match control::call(&conn, &request, CONTROL_TIMEOUT).await {
            Ok(Reply::Done(what)) => {
                tracing::info!(agent = %agent_id, policy = %name, %what, "point policy sent");
                None
            }
            Ok(Reply::Failed(why)) => {
                tracing::warn!(agent = %agent_id, policy = %name, %why, "point policy refused");
                Some(format!("the agent refused policy `{name}`: {why}"))
            }
            Ok(Reply::Taken(_) | Reply::Held { .. }) => None,
            Err(e) => {
                tracing::warn!(agent = %agent_id, error = %e, "sending the point policy");
                None
            }
        };
        // Shown in the status (the configuration server raises `policy.refused` from it).
        let mut refusals = lock(&self.policy_refusals);
        match refused {
            Some(why) => {
                refusals.insert(agent_id, why);
            }
            None => {
                refusals.remove(&agent_id);
            }
        }
    }

    async fn serve_connection(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        peer: PeerId,
        machine: String,
    ) {
        loop {
            tokio::select! {
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let ps = self.clone();
                        let machine = machine.clone();
                        tokio::spawn(async move {
                            if let Err(e) =
                                ingest::serve_stream(ps, Some(peer), Via { id: peer_hex(&peer), name: machine }, send, recv).await
                            {
                                tracing::warn!(agent = %peer_hex(&peer), error = %format!("{e:#}"), "agent stream ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::info!(agent = %peer_hex(&peer), reason = %e, "agent disconnected");
                        return;
                    }
                },
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => match read_report(recv).await {
                        Ok(mut report) => {
                            // The id is the certificate's, never what the agent wrote.
                            report.agent_id = peer_hex(&peer);
                            report.machine_name.clone_from(&machine);
                            if let Some(a) = lock(&self.agents).get(&peer) {
                                *lock(&a.report) = Some(report);
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "bad report"),
                    },
                    Err(e) => {
                        tracing::info!(agent = %peer_hex(&peer), reason = %e, "agent disconnected");
                        return;
                    }
                },
            }
        }
    }

    /// The agent's entry with caches for `disks`, its forwarder (re)started when the set of
    /// disks grew.
    fn agent_disks(
        self: &Arc<Self>,
        peer: PeerId,
        disks: &[haven_wire::DiskInfo],
        machine: &str,
    ) -> Result<Vec<Arc<DiskStream>>> {
        let entry = {
            let mut agents = lock(&self.agents);
            agents
                .entry(peer)
                .or_insert_with(|| {
                    let (hash_tx, _) = mpsc::unbounded_channel();
                    Arc::new(AgentEntry {
                        peer,
                        disks: Mutex::new(BTreeMap::new()),
                        wake: Notify::new(),
                        hash_tx: Mutex::new(hash_tx),
                        report: Mutex::new(None),
                        upstream_connected: AtomicBool::new(false),
                        forwarder: Mutex::new(None),
                        failed_over: Mutex::new(None),
                    })
                })
                .clone()
        };
        if let Some(why) = lock(&entry.failed_over).clone() {
            return Err(crate::ingest::Refused::failed_over(why));
        }
        let mut grew = false;
        let mut streams = Vec::new();
        {
            let mut known = lock(&entry.disks);
            for info in disks {
                let key = StreamKey {
                    peer,
                    disk: info.id,
                };
                if let Some(s) = known.get(&info.id) {
                    if s.info.size != info.size {
                        bail!(
                            "disk {key}: the agent announces {} bytes, but it was protected \
                             with {}; a resized disk must be protected again",
                            info.size,
                            s.info.size
                        );
                    }
                    *lock(&s.machine_name) = machine.to_string();
                    streams.push(s.clone());
                    continue;
                }
                let mut record = self.state.get_stream(key)?.unwrap_or(StreamRecord {
                    size: info.size,
                    block_size: info.block_size,
                    created_ms: now_ms(),
                    ..Default::default()
                });
                machine.clone_into(&mut record.machine_name);
                self.state.put_stream(key, &record)?;
                let dir = self
                    .config
                    .data_dir
                    .join("cache")
                    .join(peer_hex(&peer))
                    .join(info.id.to_string());
                let journal = Journal::open(&dir, &self.key, self.config.cache)?;
                let s = Arc::new(DiskStream::new(key, *info, machine.to_string(), journal));
                // A cache that lost records (removed after damage) still resumes after what
                // the master target acknowledged: the agent then resyncs from there.
                s.raise_durable(record.released_seq);
                known.insert(info.id, s.clone());
                streams.push(s);
                grew = true;
            }
        }
        if grew {
            let mut forwarder = lock(&entry.forwarder);
            if let Some(old) = forwarder.take() {
                old.abort();
            }
            let (hash_tx, hash_rx) = mpsc::unbounded_channel();
            *lock(&entry.hash_tx) = hash_tx;
            let ps = self.clone();
            let e = entry.clone();
            *forwarder = Some(tokio::spawn(async move { ps.forward(e, hash_rx).await }));
        }
        Ok(streams)
    }

    /// What the process server reports.
    pub fn status(&self) -> ProcessServerStatus {
        let now = Instant::now();
        let agents: Vec<Arc<AgentEntry>> = lock(&self.agents).values().cloned().collect();
        let mut disks = Vec::new();
        let mut connected = false;
        for a in &agents {
            connected |= a.upstream_connected.load(Ordering::Acquire);
            let report = lock(&a.report).clone();
            for s in lock(&a.disks).values() {
                let stats = s.journal().stats();
                let rate = lock(&s.received);
                disks.push(CachedDisk {
                    agent_id: peer_hex(&a.peer),
                    machine_name: lock(&s.machine_name).clone(),
                    disk: s.key.disk,
                    agent_connected: s.connected(),
                    durable_seq: s.durable(),
                    forwarded_seq: self
                        .state
                        .get_stream(s.key)
                        .ok()
                        .flatten()
                        .map_or(0, |r| r.released_seq),
                    cache_bytes: stats.bytes,
                    receive_bytes_per_second: rate.per_second(now),
                    received_bytes_total: rate.total(),
                    stored_bytes_total: s.stored_bytes_total.load(Ordering::Relaxed),
                    report: report.clone(),
                    error: s.error(),
                    failed_over: lock(&a.failed_over).clone(),
                    policy_refused: lock(&self.policy_refusals).get(&peer_hex(&a.peer)).cloned(),
                });
            }
        }
        for (peer, (machine, error)) in lock(&self.broken).iter() {
            disks.push(CachedDisk {
                agent_id: peer_hex(peer),
                machine_name: machine.clone(),
                disk: 0,
                agent_connected: false,
                durable_seq: 0,
                forwarded_seq: 0,
                cache_bytes: 0,
                receive_bytes_per_second: 0.0,
                received_bytes_total: 0,
                stored_bytes_total: 0,
                report: None,
                error: Some(format!("not served: {error}")),
                failed_over: None,
                policy_refused: None,
            });
        }
        disks.sort_by(|a, b| (&a.agent_id, a.disk).cmp(&(&b.agent_id, b.disk)));
        let cache_bytes: u64 = disks.iter().map(|d| d.cache_bytes).sum();
        let sent = self
            .upstream
            .try_lock()
            .ok()
            .and_then(|l| l.conn.as_ref().map(|c| c.stats().udp_tx.bytes));
        let (churn, upload) = lock(&self.throughput).sample(
            now,
            disks.iter().map(|d| d.stored_bytes_total).sum(),
            sent,
        );
        ProcessServerStatus {
            listen: self
                .listener
                .local_addr()
                .map_or_else(|| self.config.listen.to_string(), |a| a.to_string()),
            upstream: self.config.upstream.addr.to_string(),
            upstream_connected: connected,
            cache_bytes,
            cache_max_bytes: self.config.cache_total_max_bytes,
            churn_bytes_per_second: churn,
            upload_bytes_per_second: upload,
            achievable_rpo_seconds: achievable_rpo(cache_bytes, churn, upload),
            disks,
            drain: self.config.drain.as_ref().map(|account| {
                let mut agents: Vec<DrainedAgent> = lock(&self.drained)
                    .values()
                    .map(|r| DrainedAgent {
                        agent_id: r.agent_id.clone(),
                        machine_name: r.machine_name.clone(),
                        report_time_ms: r.time_ms,
                    })
                    .collect();
                agents.sort_by(|a, b| a.machine_name.cmp(&b.machine_name));
                DrainStatus {
                    account: account.describe(),
                    agents,
                }
            }),
        }
    }

    /// Forwards one agent's caches to the master target, reconnecting forever.
    async fn forward(
        self: Arc<Self>,
        entry: Arc<AgentEntry>,
        mut hash_rx: mpsc::UnboundedReceiver<HashJob>,
    ) {
        let mut backoff = Backoff::default();
        loop {
            let result = self.forward_once(&entry, &mut hash_rx, &mut backoff).await;
            entry.upstream_connected.store(false, Ordering::Release);
            // Refusals that end forwarding for good.
            let refused = result
                .as_ref()
                .err()
                .and_then(|e| e.downcast_ref::<Refused>())
                .filter(|r| matches!(r.code, error_code::FAILED_OVER | error_code::MOVED))
                .cloned();
            if let Some(refused) = refused {
                if refused.code == error_code::FAILED_OVER {
                    // The agent is told (its streams end with the same refusal) and nothing
                    // is retried.
                    tracing::warn!(
                        agent = %peer_hex(&entry.peer),
                        "the master target failed the agent over; forwarding stopped: {}",
                        refused.message
                    );
                    *lock(&entry.failed_over) = Some(refused.message.clone());
                    entry.halt(&refused);
                    return;
                }
                tracing::warn!(
                    agent = %peer_hex(&entry.peer),
                    "the agent moved to another process server; its cache here is dropped: {}",
                    refused.message
                );
                let _one = self.confirming_lock(entry.peer).lock_owned().await;
                // A takeover since (the agent came back here) made a new entry and cache,
                // which are not this forwarder's to drop.
                let current = lock(&self.agents)
                    .get(&entry.peer)
                    .is_some_and(|e| Arc::ptr_eq(e, &entry));
                if !current {
                    entry.halt(&refused);
                } else if let Err(e) =
                    tokio::task::block_in_place(|| self.drop_agent(&entry, &refused))
                {
                    tracing::error!(agent = %peer_hex(&entry.peer), error = %format!("{e:#}"),
                        "dropping a moved agent's cache");
                }
                return;
            }
            // Until the master target says again that this process server forwards the agent,
            // a reconnecting agent is confirmed first (it may have moved meanwhile).
            lock(&self.confirmed).retain(|k| k.peer != entry.peer);
            if let Err(e) = result {
                let refusal = e
                    .downcast_ref::<quinn::ConnectionError>()
                    .and_then(Refusal::of);
                tracing::info!(
                    agent = %peer_hex(&entry.peer),
                    upstream = %self.config.upstream.addr,
                    error = %format!("{e:#}"),
                    refusal = ?refusal,
                    "forwarding interrupted; reconnecting"
                );
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// The connection to the master target, opened when there is none (or it closed). Every
    /// forwarder opens its stream on it, the agents' reports go up on it once a second, and the
    /// master target's control requests for any agent come down on it.
    pub(crate) async fn upstream(&self) -> Result<quinn::Connection> {
        let mut link = self.upstream.lock().await;
        if let Some(conn) = link.conn.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(conn.clone());
        }
        if let Some((at, why)) = &link.failed
            && at.elapsed() < RECONNECT_HOLDOFF
        {
            bail!("{why}");
        }
        let up = &self.config.upstream;
        let connected = endpoint::connect(
            up.addr,
            &up.server_name,
            &up.identity.ca_pem,
            &up.identity.cert_pem,
            &up.identity.key_pem,
        )
        .await;
        let conn = match connected {
            Ok(conn) => conn,
            Err(e) => {
                link.failed = Some((Instant::now(), e.to_string()));
                return Err(e.into());
            }
        };
        tracing::info!(upstream = %up.addr, "connected to the master target");
        tokio::spawn(relay_control(self.me.clone(), conn.clone()));
        tokio::spawn(send_reports(self.me.clone(), conn.clone()));
        link.failed = None;
        link.conn = Some(conn.clone());
        Ok(conn)
    }

    async fn forward_once(
        &self,
        entry: &Arc<AgentEntry>,
        hash_rx: &mut mpsc::UnboundedReceiver<HashJob>,
        backoff: &mut Backoff,
    ) -> Result<()> {
        let conn = self.upstream().await?;
        let (mut send, recv) = conn.open_bi().await?;
        let mut reader = FrameReader::new(recv);
        let disks: Vec<Arc<DiskStream>> = lock(&entry.disks).values().cloned().collect();
        let mut lanes: BTreeMap<DiskId, Lane> = BTreeMap::new();
        let mut starts = Vec::new();
        for s in &disks {
            let st = s.journal().stats();
            let held = if st.records > 0 {
                st.first_seq
            } else {
                st.last_seq + 1
            };
            let released = self
                .state
                .get_stream(s.key)
                .ok()
                .flatten()
                .map_or(0, |r| r.released_seq);
            starts.push(LaneStart {
                info: s.info,
                next: held.max(released + 1),
                durable: s.durable(),
            });
            lanes.insert(
                s.info.id,
                Lane {
                    stream: s.clone(),
                    reader: None,
                    peeked: None,
                },
            );
        }
        let mut fwd = crate::forward::forwarder(entry.peer, self.config.window_bytes, starts)?;
        let mut cache = OwnCache {
            ps: self,
            entry,
            lanes,
            hash_rx,
            jobs: HashMap::new(),
            next_job: 0,
            backoff,
        };
        let result = crate::forward::drive(&mut fwd, &mut send, &mut reader, &mut cache).await;
        // Digest requests not answered on this connection fail; the agent asks again.
        let why = result
            .as_ref()
            .err()
            .map_or_else(|| "ended".to_string(), |e| format!("{e:#}"));
        for action in fwd.connection_lost(&why) {
            if let ForwarderAction::Answer { job, result } = action
                && let Some(tx) = cache.jobs.remove(&job)
            {
                let _ = tx.send(result);
            }
        }
        result
    }
}

/// The process server's own cache, as one agent's forwarder sees it.
struct OwnCache<'a> {
    ps: &'a ProcessServer,
    entry: &'a Arc<AgentEntry>,
    lanes: BTreeMap<DiskId, Lane>,
    hash_rx: &'a mut mpsc::UnboundedReceiver<HashJob>,
    /// Digest requests by job id, answered when the master target's digests come back.
    jobs: HashMap<u64, oneshot::Sender<Result<Hashes, String>>>,
    next_job: u64,
    backoff: &'a mut Backoff,
}

impl crate::forward::Cache for OwnCache<'_> {
    /// A digest request from the agent, or `None`: records were cached.
    type Event = Option<HashJob>;

    async fn next_event(&mut self) -> Self::Event {
        tokio::select! {
            () = self.entry.wake.notified() => None,
            Some(job) = self.hash_rx.recv() => Some(job),
        }
    }

    async fn update(&mut self, fwd: &mut Forwarder, event: Option<Self::Event>) -> Result<()> {
        for lane in self.lanes.values() {
            fwd.durable(lane.stream.info.id, lane.stream.durable());
        }
        if let Some(Some((request, tx))) = event {
            self.next_job += 1;
            self.jobs.insert(self.next_job, tx);
            fwd.request_hashes(self.next_job, request);
        }
        Ok(())
    }

    async fn read(
        &mut self,
        disk: DiskId,
        from: Seq,
        to: Seq,
        budget: u64,
    ) -> Result<Vec<Record>, String> {
        match self.lanes.get_mut(&disk) {
            // Reading back (file I/O, decryption) blocks: the worker's other tasks move to
            // another worker meanwhile.
            Some(lane) => tokio::task::block_in_place(|| lane.read(from, to, budget)),
            None => Ok(Vec::new()),
        }
    }

    async fn release(&mut self, disk: DiskId, up_to: Seq) -> Result<()> {
        if let Some(lane) = self.lanes.get(&disk) {
            // Segment removal and a redb commit.
            tokio::task::block_in_place(|| lane.released(&self.ps.state, up_to))?;
        }
        Ok(())
    }

    async fn answer(&mut self, job: u64, result: Result<Hashes, String>) -> Result<()> {
        if let Some(tx) = self.jobs.remove(&job) {
            let _ = tx.send(result);
        }
        Ok(())
    }

    fn disk_error(&mut self, disk: DiskId, message: String) {
        if let Some(lane) = self.lanes.get(&disk) {
            lane.stream.set_error(Some(message));
        }
    }

    fn connected(&mut self) {
        self.backoff.reset();
        lock(&self.ps.confirmed).extend(self.lanes.values().map(|l| l.stream.key));
        self.entry.upstream_connected.store(true, Ordering::Release);
        tracing::info!(agent = %peer_hex(&self.entry.peer), "forwarding to the master target");
    }
}

impl ProcessServer {
    /// Before serving an agent's streams: confirms with the master target that this process
    /// server forwards them, or takes them over (see the module documentation).
    async fn confirm_owner(&self, hello: &Hello, via: &Via) -> Result<()> {
        let keys: Vec<StreamKey> = hello
            .disks
            .iter()
            .map(|d| StreamKey {
                peer: hello.peer_id,
                disk: d.id,
            })
            .collect();
        let confirmed = |ps: &Self| {
            let set = lock(&ps.confirmed);
            keys.iter().all(|k| set.contains(k))
        };
        if confirmed(self) {
            return Ok(());
        }
        let _one = self.confirming_lock(hello.peer_id).lock_owned().await;
        if confirmed(self) {
            return Ok(());
        }
        let agent = peer_hex(&hello.peer_id);
        let mut known = false;
        for d in &hello.disks {
            let key = StreamKey {
                peer: hello.peer_id,
                disk: d.id,
            };
            known |= self.state.get_stream(key)?.is_some();
        }
        // Without moves, what this process server cached for an agent is its own; an agent
        // new here is taken over all the same (it may have been pointed here from another).
        if known && !self.config.confirm_owner {
            return Ok(());
        }
        let mut takeover = !known;
        loop {
            match self.probe(hello, takeover).await {
                Ok(resume) => {
                    if takeover {
                        for d in &hello.disks {
                            let next = resume
                                .iter()
                                .find(|r| r.disk == d.id)
                                .map_or(1, |r| r.next_seq);
                            // The cache starts where the master target resumes.
                            let record = StreamRecord {
                                size: d.size,
                                block_size: d.block_size,
                                created_ms: now_ms(),
                                released_seq: next.saturating_sub(1),
                                machine_name: via.name.clone(),
                                ..Default::default()
                            };
                            let key = StreamKey {
                                peer: hello.peer_id,
                                disk: d.id,
                            };
                            self.state.put_stream(key, &record)?;
                        }
                        tracing::info!(agent = %agent, machine = %via.name,
                            "took the agent over: its streams are forwarded from here");
                    }
                    lock(&self.confirmed).extend(keys.iter().copied());
                    return Ok(());
                }
                Err(e)
                    if !takeover
                        && e.downcast_ref::<Refused>()
                            .is_some_and(|r| r.code == error_code::MOVED) =>
                {
                    tracing::warn!(agent = %agent, "the agent was moved away from this process \
                        server and back: its stale cache is dropped, then it is taken over");
                    let entry = lock(&self.agents).get(&hello.peer_id).cloned();
                    let refused = e.downcast::<Refused>().expect("checked above");
                    tokio::task::block_in_place(|| match entry {
                        Some(entry) => {
                            if let Some(f) = lock(&entry.forwarder).take() {
                                f.abort();
                            }
                            self.drop_agent(&entry, &refused)
                        }
                        None => self.drop_caches(hello.peer_id),
                    })?;
                    takeover = true;
                }
                Err(e) => {
                    return Err(e.context(format!(
                        "confirming with the master target that this process server forwards \
                         agent {agent} (the agent tries again)"
                    )));
                }
            }
        }
    }

    /// The lock under which an agent's ownership is confirmed, taken over or dropped.
    fn confirming_lock(&self, peer: PeerId) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.confirming).entry(peer).or_default().clone()
    }

    /// One `Hello` for `hello`'s agent to the master target (taking the agent over with
    /// `takeover`): its resume points, or its refusal.
    pub(crate) async fn probe(
        &self,
        hello: &Hello,
        takeover: bool,
    ) -> Result<Vec<haven_wire::Resume>> {
        let conn = self.upstream().await?;
        let exchange = async {
            let (mut send, recv) = conn.open_bi().await?;
            let mut reader = FrameReader::new(recv);
            let hello = Hello {
                version: haven_wire::PROTOCOL_VERSION,
                role: Role::ProcessServer,
                peer_id: hello.peer_id,
                disks: hello.disks.clone(),
                takeover,
            };
            write_frames(&mut send, [haven_wire::Frame::Hello(hello)]).await?;
            let answer = reader.next().await?;
            let _ = send.finish();
            match answer {
                Some(haven_wire::Frame::Welcome(w)) => Ok(w.resume),
                Some(haven_wire::Frame::Error(e)) => Err(Refused {
                    code: e.code,
                    message: e.message,
                }
                .into()),
                Some(other) => bail!(
                    "the master target answered a Hello with {:?}",
                    other.frame_type()
                ),
                None => bail!("the master target closed the stream"),
            }
        };
        tokio::time::timeout(PROBE_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("the master target did not answer in {PROBE_TIMEOUT:?}"))?
    }

    /// The agent moved to another process server: its streams here end with `refused`, and
    /// its caches and their records go. Blocking (files and redb).
    fn drop_agent(&self, entry: &Arc<AgentEntry>, refused: &Refused) -> Result<()> {
        {
            let mut agents = lock(&self.agents);
            if agents
                .get(&entry.peer)
                .is_some_and(|e| Arc::ptr_eq(e, entry))
            {
                agents.remove(&entry.peer);
            }
        }
        entry.halt(refused);
        self.drop_caches(entry.peer)
    }

    fn drop_caches(&self, peer: PeerId) -> Result<()> {
        lock(&self.confirmed).retain(|k| k.peer != peer);
        for (key, _) in self.state.streams()? {
            if key.peer == peer {
                self.state.remove_stream(key)?;
            }
        }
        let dir = self.config.data_dir.join("cache").join(peer_hex(&peer));
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
        }
        self.refresh_budget();
        Ok(())
    }
}

/// One disk's reading side of forwarding: the records still in memory, else the journal.
struct Lane {
    stream: Arc<DiskStream>,
    reader: Option<haven_store::journal::JournalReader>,
    peeked: Option<Record>,
}

impl Lane {
    /// Records from `from` up to `to` (durable), about `budget` bytes. Blocking (journal
    /// read-back). A damaged or tampered record is an error, never returned.
    fn read(&mut self, from: Seq, to: Seq, budget: u64) -> Result<Vec<Record>, String> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut next = from;
        while next <= to && bytes < budget {
            let fresh = match self.peeked.take() {
                Some(r) if r.seq() == next => Some(r),
                _ => self.stream.take_fresh(next),
            };
            if fresh.is_some() {
                // The journal reader, if any, would return this record again.
                self.reader = None;
            }
            let record = match fresh {
                Some(r) => r,
                None => {
                    if self.reader.is_none() {
                        self.reader = Some(self.stream.journal().read_from(next));
                    }
                    match self.reader.as_mut().and_then(Iterator::next) {
                        Some(Ok(r)) => r,
                        Some(Err(e)) => {
                            self.reader = None;
                            return Err(format!(
                                "disk {}: cache record refused: {e}",
                                self.stream.key
                            ));
                        }
                        None => {
                            // The reader ends where the journal ended when it was made.
                            self.reader = None;
                            if self.stream.journal().stats().last_seq < next {
                                break;
                            }
                            continue;
                        }
                    }
                }
            };
            if record.seq() > to {
                self.peeked = Some(record);
                break;
            }
            if record.seq() < next {
                continue;
            }
            bytes += record.wire_len();
            next = record.seq() + 1;
            out.push(record);
        }
        Ok(out)
    }

    fn released(&self, state: &StateDb, up_to: Seq) -> Result<()> {
        self.stream.journal().release(up_to)?;
        state.update_stream(self.stream.key, move |r| {
            r.released_seq = r.released_seq.max(up_to)
        })?;
        self.stream.freed.notify_one();
        Ok(())
    }
}

impl Sink for ProcessServer {
    fn prepare(
        &self,
        hello: &Hello,
        via: &Via,
    ) -> impl std::future::Future<Output = Result<()>> + Send {
        self.confirm_owner(hello, via)
    }

    fn open_disks(&self, hello: &Hello, via: &Via) -> Result<Vec<Arc<DiskStream>>> {
        let machine_name = via.name.as_str();
        let result = self
            .me
            .upgrade()
            .context("the process server is shutting down")?
            .agent_disks(hello.peer_id, &hello.disks, machine_name);
        let mut broken = lock(&self.broken);
        match &result {
            Ok(_) => {
                broken.remove(&hello.peer_id);
            }
            Err(e) => {
                broken.insert(hello.peer_id, (machine_name.to_string(), format!("{e:#}")));
            }
        }
        result
    }

    fn on_durable(&self, stream: &DiskStream, _: Seq, _: &[(Record, AppendInfo)]) -> Result<()> {
        if let Some(a) = lock(&self.agents).get(&stream.key.peer) {
            a.wake.notify_one();
        }
        Ok(())
    }

    fn admit(&self, stream: &DiskStream, bytes: u64) -> bool {
        let b = &self.budget;
        let st = stream.journal().stats();
        // A cache that holds no record counts as empty (its open segment aside).
        let own = if st.records == 0 { 0 } else { st.bytes };
        let ok = admit(
            self.config.cache_total_max_bytes,
            b.used.load(Ordering::Relaxed),
            b.active.load(Ordering::Relaxed),
            own,
            bytes,
        );
        if ok {
            b.used.fetch_add(bytes, Ordering::Relaxed);
        } else {
            b.refused.store(true, Ordering::Relaxed);
        }
        ok
    }

    fn check_compressed(&self) -> bool {
        true
    }

    fn hashes(
        &self,
        stream: &Arc<DiskStream>,
        request: HashRequest,
    ) -> oneshot::Receiver<Result<Hashes, String>> {
        let (tx, rx) = oneshot::channel();
        match lock(&self.agents).get(&stream.key.peer) {
            Some(a) => {
                if let Err(mpsc::error::SendError((_, tx))) = lock(&a.hash_tx).send((request, tx)) {
                    let _ = tx.send(Err("the forwarder stopped".into()));
                }
            }
            None => {
                let _ = tx.send(Err(format!("no cache for disk {}", stream.key)));
            }
        }
        rx
    }
}

/// Sums the caches every [`BUDGET_REFRESH`] while the process server lives.
async fn budget_loop(ps: std::sync::Weak<ProcessServer>) {
    let mut tick = tokio::time::interval(BUDGET_REFRESH);
    loop {
        tick.tick().await;
        let Some(ps) = ps.upgrade() else { return };
        ps.refresh_budget();
    }
}

/// Sends the latest report of every agent to the master target once a second, until the
/// connection closes: on a task of its own, so reports never wait behind records held up by
/// the master target's flow control.
async fn send_reports(ps: std::sync::Weak<ProcessServer>, conn: quinn::Connection) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tick.tick() => {}
        }
        let Some(ps) = ps.upgrade() else { return };
        let mut reports: Vec<Report> = lock(&ps.agents)
            .values()
            .filter_map(|a| lock(&a.report).clone())
            .collect();
        reports.extend(lock(&ps.drained).values().cloned());
        drop(ps);
        for report in reports {
            if let Err(e) = send_report(&conn, &report).await {
                tracing::debug!(error = %e, "sending a report to the master target");
            }
        }
    }
}

/// Relays the master target's control requests (arriving on `upstream`, the connection every
/// forwarder shares) to the named agent's own connection, and the replies back.
async fn relay_control(ps: std::sync::Weak<ProcessServer>, upstream: quinn::Connection) {
    use haven_net::control::{self, Reply, Request};
    while let Ok((mut send, mut recv)) = upstream.accept_bi().await {
        let Some(ps) = ps.upgrade() else { return };
        tokio::spawn(async move {
            let listener = &ps.listener;
            let (agent_id, reply) = match control::read_message::<Request>(&mut recv).await {
                Err(e) => (
                    String::new(),
                    Reply::Failed(format!("process server: bad request: {e}")),
                ),
                Ok(req) => {
                    let drained = parse_peer(&req.agent_id)
                        .filter(|p| lock(&ps.drained).contains_key(p))
                        .zip(ps.config.drain.clone());
                    let reply = match listener.connection(&req.agent_id) {
                        // An agent drained from a cache account: its requests go there.
                        None if let Some((peer, account)) = drained => {
                            crate::drain::call(account, peer, &req, CONTROL_TIMEOUT).await
                        }
                        None => Reply::Failed(format!(
                            "process server: agent {} is not connected; start it (or check \
                             its status) and try again",
                            req.agent_id
                        )),
                        Some(conn) => control::call(&conn, &req, CONTROL_TIMEOUT)
                            .await
                            .unwrap_or_else(|e| {
                                Reply::Failed(format!("agent {}: {e}", req.agent_id))
                            }),
                    };
                    (req.agent_id, reply)
                }
            };
            if let Err(e) = control::write_message(&mut send, &reply).await {
                tracing::warn!(agent = %agent_id, error = %e, "relaying a control reply");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{Duration, Instant, Throughput, achievable_rpo, admit};

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_achievable_rpo_is_the_cache_drain_time_while_the_link_keeps_up() {
        assert_eq!(achievable_rpo(0, 5.0, 0.0), Some(0.0));
        assert_eq!(achievable_rpo(1000, 100.0, 500.0), Some(2.0));
        // The churn outruns the link: the caches grow, no RPO holds.
        assert_eq!(achievable_rpo(1000, 600.0, 500.0), None);
        assert_eq!(achievable_rpo(1000, 0.0, 0.0), None);
        let mut t = Throughput::default();
        let t0 = Instant::now();
        assert_eq!(t.sample(t0, 100, Some(10)), (0.0, 0.0));
        assert_eq!(
            t.sample(t0 + Duration::from_secs(2), 300, Some(1010)),
            (100.0, 500.0)
        );
        // Within a second of the last sample: the same figures.
        assert_eq!(
            t.sample(t0 + Duration::from_millis(2500), 900, Some(1)),
            (100.0, 500.0)
        );
        // A new connection counts from zero.
        assert_eq!(
            t.sample(t0 + Duration::from_secs(4), 300, Some(200)),
            (0.0, 100.0)
        );
    }

    #[test]
    fn below_three_quarters_every_disk_is_admitted() {
        assert!(admit(100 * MIB, 70 * MIB, 10, 70 * MIB, 4 * MIB));
        assert!(admit(100 * MIB, 0, 0, 0, 75 * MIB));
    }

    #[test]
    fn above_three_quarters_only_disks_below_their_share() {
        // 75 MiB shared by 3 disks: 25 MiB each. The one holding 70 MiB waits...
        assert!(!admit(100 * MIB, 80 * MIB, 3, 70 * MIB, MIB));
        // ...the ones below their share go on, up to the total...
        assert!(admit(100 * MIB, 80 * MIB, 3, 5 * MIB, MIB));
        assert!(!admit(100 * MIB, 80 * MIB, 3, 25 * MIB, MIB));
        assert!(!admit(100 * MIB, 99 * MIB, 3, 5 * MIB, 2 * MIB));
        // ...and a disk holding nothing always gets its first record in below the total.
        assert!(admit(100 * MIB, 90 * MIB, 1000, 0, 4 * MIB));
        assert!(!admit(100 * MIB, 98 * MIB, 1000, 0, 4 * MIB));
    }
}
