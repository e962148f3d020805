//! Draining a cache storage account (Azure → Azure): a process server of the target region
//! forwards to its master target the records agents left in the account, instead of records
//! agents sent it.
//!
//! ```text
//! agent ──HTTPS, sealed segments──▶ cache account ◀──lease, read, free── drain (this module)
//!                                                                         │ Forwarder, as a
//!                                                                         ▼ process server's
//!                                                                     master target
//! ```
//!
//! Every few seconds the drain looks for agents in the account and takes the lease of each it
//! does not drain yet (`haven_cache_account` has the layout and the lease rules); for each
//! leased agent it runs the same [`Forwarder`] as a process server's cache does, the account
//! standing for the cache: what the account holds is durable, reads download and open
//! segments, and a release records the freed seq under the lease before it deletes the
//! segments the master target acknowledged. The agent's `Hello` goes to the master target with
//! `TAKEOVER`: the lease says this gateway drains the agent now, so a gateway that drained it
//! before is refused as moved. A lease that cannot be renewed stops the drain of that agent at
//! once, before anything more is freed. A resync's digest requests are passed on once the
//! master target holds every segment put before them, and answered into the account.
//!
//! Nothing is kept here: a gateway killed mid-drain loses nothing, since what it had not
//! freed is still in the account and the next holder of the lease starts from `released`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use haven_cache_account::{CacheAccount, CacheError, Lease, Segments};
use haven_net::stream::{FrameReader, Report};
use haven_replication::forwarder::{Forwarder, LaneStart};
use haven_wire::{DiskId, Hashes, Hello, PeerId, Record, Role, Seq};

use crate::ingest::Refused;
use crate::process_server::ProcessServer;
use crate::{Backoff, peer_hex};

/// How often the account is searched for agents not drained yet.
const SCAN: Duration = Duration::from_secs(2);
/// How often a drained disk's new segments and digest requests are looked for.
const REFRESH: Duration = Duration::from_millis(250);
/// How often an agent's report is read from the account.
const REPORT_EVERY: Duration = Duration::from_secs(2);
/// Segments kept opened in memory per disk.
const KEEP_OPEN: usize = 8;

/// Runs `f` (blocking account calls) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .context("a cache-account call")??)
}

/// Drains `account` into `ps`'s master target until the process ends.
pub async fn run(ps: Arc<ProcessServer>, account: Arc<CacheAccount>) {
    let id = haven_cache_account::new_lease_id();
    tracing::info!(account = %account.describe(), lease = %id, "draining the cache account");
    let mut draining: HashMap<PeerId, tokio::task::JoinHandle<()>> = HashMap::new();
    // Agents whose streams do not open here (another cache key?), and why: never leased, so
    // a gateway configured right drains them; each logged once.
    let mut unreadable: HashMap<PeerId, String> = HashMap::new();
    // Agents whose streams opened here: not read again before each lease attempt (the key
    // does not change while the process runs).
    let mut readable: HashSet<PeerId> = HashSet::new();
    loop {
        draining.retain(|_, h| !h.is_finished());
        let a = Arc::clone(&account);
        match blocking(move || a.agents()).await {
            Err(e) => tracing::warn!(account = %account.describe(), error = %format!("{e:#}"),
                "listing the cache account"),
            Ok(agents) => {
                for peer in agents {
                    if draining.contains_key(&peer) {
                        continue;
                    }
                    let a = Arc::clone(&account);
                    let opened = match readable.contains(&peer) {
                        true => Ok(Vec::new()),
                        false => blocking(move || a.disks(&peer)).await,
                    };
                    match opened {
                        Err(e)
                            if e.downcast_ref::<CacheError>()
                                .is_none_or(|c| !matches!(c, CacheError::Corrupt { .. })) =>
                        {
                            tracing::warn!(agent = %peer_hex(&peer), error = %format!("{e:#}"),
                                "reading the agent's disks in the cache account");
                            continue;
                        }
                        Err(e) => {
                            let why = format!("{e:#}");
                            if unreadable.get(&peer) != Some(&why) {
                                tracing::error!(agent = %peer_hex(&peer), error = %why,
                                    "the agent's streams in the cache account do not open with \
                                     this gateway's cache key; not draining it (check \
                                     cache_key_file in [process_server.drain] against the \
                                     agents' --cache-key)");
                                unreadable.insert(peer, why);
                            }
                            continue;
                        }
                        Ok(_) => {
                            unreadable.remove(&peer);
                            readable.insert(peer);
                        }
                    }
                    let (a, id) = (Arc::clone(&account), id.clone());
                    match blocking(move || a.lease(&peer, &id)).await {
                        Ok(Some(lease)) => {
                            tracing::info!(agent = %peer_hex(&peer), "draining the agent's streams");
                            let task =
                                drain_agent(Arc::clone(&ps), Arc::clone(&account), peer, lease);
                            draining.insert(peer, tokio::spawn(task));
                        }
                        // Another gateway drains it.
                        Ok(None) => {}
                        Err(e) => tracing::warn!(agent = %peer_hex(&peer),
                            error = %format!("{e:#}"), "taking the lease of an agent's streams"),
                    }
                }
            }
        }
        tokio::time::sleep(SCAN).await;
    }
}

/// Drains one agent while the lease holds.
async fn drain_agent(
    ps: Arc<ProcessServer>,
    account: Arc<CacheAccount>,
    peer: PeerId,
    lease: Lease,
) {
    let lost = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(tokio::sync::Notify::new());
    // Renewed every quarter of its length: three renewals may fail before it lapses.
    let renew = Duration::from_secs(u64::from(account.lease_seconds()) / 4);
    let renewing = tokio::spawn({
        let (account, lease, lost, wake) = (
            Arc::clone(&account),
            lease.clone(),
            Arc::clone(&lost),
            Arc::clone(&wake),
        );
        async move {
            loop {
                tokio::time::sleep(renew).await;
                let (a, l) = (Arc::clone(&account), lease.clone());
                if let Err(e) = blocking(move || a.renew(&l)).await {
                    tracing::warn!(agent = %peer_hex(&peer), error = %format!("{e:#}"),
                        "the lease of the agent's streams is lost; draining it stops here");
                    lost.store(true, Ordering::Release);
                    wake.notify_one();
                    return;
                }
            }
        }
    });
    let mut backoff = Backoff::default();
    let mut drain = Drain {
        ps,
        account: Arc::clone(&account),
        peer,
        lease: lease.clone(),
        lost: Arc::clone(&lost),
        wake,
    };
    let reports = tokio::spawn(pass_reports(
        Arc::clone(&drain.ps),
        Arc::clone(&account),
        peer,
    ));
    while !lost.load(Ordering::Acquire) {
        match drain.once(&mut backoff).await {
            Ok(()) => {}
            Err(e) => {
                if let Some(r) = e.downcast_ref::<Refused>()
                    && r.code == haven_wire::frame::error_code::FAILED_OVER
                {
                    // The replica is production now: nothing more goes there. The lease is
                    // kept so no other gateway tries either, and the agent is told.
                    tracing::warn!(agent = %peer_hex(&peer), "the master target failed the \
                        agent over; its streams in the cache account are no longer drained: {}",
                        r.message);
                    let (a, message) = (Arc::clone(&account), r.message.clone());
                    if let Err(e) = blocking(move || a.put_failed_over(&peer, &message)).await {
                        tracing::warn!(agent = %peer_hex(&peer), error = %format!("{e:#}"),
                            "telling the agent through the cache account that it failed over");
                    }
                    reports.abort();
                    drain.ps.set_drained_report(peer, None);
                    let _ = renewing.await;
                    return;
                }
                tracing::info!(agent = %peer_hex(&peer), error = %format!("{e:#}"),
                    "draining interrupted; starting again");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    renewing.abort();
    reports.abort();
    drain.ps.set_drained_report(peer, None);
}

/// Passes the agent's report, as it left it in the account, to the master target with this
/// process server's own (every [`REPORT_EVERY`]). The id is the one its streams are kept
/// under; the report opened with the cache key, so it is the agent's.
async fn pass_reports(ps: Arc<ProcessServer>, account: Arc<CacheAccount>, peer: PeerId) {
    loop {
        let a = Arc::clone(&account);
        match blocking(move || a.report(&peer)).await {
            Ok(Some(json)) => match serde_json::from_slice::<Report>(&json) {
                Ok(mut report) => {
                    report.agent_id = peer_hex(&peer);
                    ps.set_drained_report(peer, Some(report));
                }
                Err(e) => tracing::warn!(agent = %peer_hex(&peer), error = %e,
                    "the agent's report in the cache account does not read"),
            },
            Ok(None) => {}
            Err(e) => tracing::debug!(agent = %peer_hex(&peer), error = %format!("{e:#}"),
                "reading the agent's report from the cache account"),
        }
        tokio::time::sleep(REPORT_EVERY).await;
    }
}

/// One disk's stream in the account.
struct Lane {
    segments: Segments,
    /// Segments downloaded and opened: first seq → records.
    open: BTreeMap<Seq, Vec<Record>>,
}

impl Lane {
    fn held(&self) -> Option<Seq> {
        self.segments.values().max().copied()
    }
}

struct Drain {
    ps: Arc<ProcessServer>,
    account: Arc<CacheAccount>,
    peer: PeerId,
    lease: Lease,
    lost: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
}

impl Drain {
    async fn segments(&self, disk: DiskId) -> Result<Segments> {
        let (a, peer) = (Arc::clone(&self.account), self.peer);
        blocking(move || a.segments(&peer, disk)).await
    }

    /// One connection to the master target.
    async fn once(&mut self, backoff: &mut Backoff) -> Result<()> {
        let (a, peer) = (Arc::clone(&self.account), self.peer);
        let hellos = blocking(move || a.disks(&peer)).await?;
        if hellos.is_empty() {
            bail!("the agent announced no disk yet");
        }
        let disks: Vec<_> = hellos.iter().flat_map(|h| h.disks.clone()).collect();
        let hello = Hello {
            version: haven_wire::PROTOCOL_VERSION,
            role: Role::ProcessServer,
            peer_id: self.peer,
            disks: disks.clone(),
            takeover: true,
        };
        // This gateway forwards the agent now (the lease says so).
        self.ps.probe(&hello, true).await?;
        let (a, peer) = (Arc::clone(&self.account), self.peer);
        let released = blocking(move || a.released(&peer)).await?;
        let mut lanes: BTreeMap<DiskId, Lane> = BTreeMap::new();
        let mut starts = Vec::new();
        for d in &disks {
            let segments = self.segments(d.id).await?;
            let freed = released.get(&d.id).copied().unwrap_or(0);
            let lane = Lane {
                segments,
                open: BTreeMap::new(),
            };
            starts.push(LaneStart {
                info: *d,
                next: freed + 1,
                durable: lane.held().unwrap_or(freed).max(freed),
            });
            lanes.insert(d.id, lane);
        }
        let mut fwd = crate::forward::forwarder(self.peer, self.ps.window_bytes(), starts)?;
        let conn = self.ps.upstream().await?;
        let (mut send, recv) = conn.open_bi().await?;
        let mut reader = FrameReader::new(recv);
        let mut refresh = tokio::time::interval(REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cache = AccountCache {
            drain: self,
            lanes,
            jobs: HashMap::new(),
            asked: HashSet::new(),
            next_job: 0,
            refresh,
            backoff,
        };
        let result = crate::forward::drive(&mut fwd, &mut send, &mut reader, &mut cache).await;
        // Requests not answered on this connection are asked again on the next.
        let why = result
            .as_ref()
            .err()
            .map_or_else(|| "ended".to_string(), |e| format!("{e:#}"));
        let _ = fwd.connection_lost(&why);
        result
    }
}

/// The account, as one leased agent's forwarder sees it.
struct AccountCache<'a> {
    drain: &'a Drain,
    lanes: BTreeMap<DiskId, Lane>,
    /// Digest requests passed on: job → (disk, offset).
    jobs: HashMap<u64, (DiskId, u64)>,
    asked: HashSet<(DiskId, u64)>,
    next_job: u64,
    refresh: tokio::time::Interval,
    backoff: &'a mut Backoff,
}

impl AccountCache<'_> {
    fn check_lease(&self) -> Result<()> {
        match self.drain.lost.load(Ordering::Acquire) {
            true => bail!("the lease was lost"),
            false => Ok(()),
        }
    }
}

impl crate::forward::Cache for AccountCache<'_> {
    /// Time to look at the account again (or the lease was lost).
    type Event = ();

    async fn next_event(&mut self) {
        tokio::select! {
            () = self.drain.wake.notified() => {}
            _ = self.refresh.tick() => {}
        }
    }

    async fn update(&mut self, fwd: &mut Forwarder, event: Option<()>) -> Result<()> {
        self.check_lease()?;
        if event.is_none() {
            return Ok(());
        }
        let (account, peer) = (&self.drain.account, self.drain.peer);
        for (&disk, lane) in self.lanes.iter_mut() {
            let a = Arc::clone(account);
            let requests = blocking(move || a.requests(&peer, disk)).await?;
            // Segments listed after the requests: every segment put before a request is among
            // them, so the digests describe those records.
            lane.segments = self.drain.segments(disk).await?;
            if let Some(held) = lane.held() {
                fwd.durable(disk, held);
            }
            for request in requests {
                if self.asked.insert((disk, request.offset)) {
                    self.next_job += 1;
                    self.jobs.insert(self.next_job, (disk, request.offset));
                    fwd.request_hashes(self.next_job, request);
                }
            }
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
        let Some(lane) = self.lanes.get_mut(&disk) else {
            return Ok(Vec::new());
        };
        let (account, peer) = (&self.drain.account, self.drain.peer);
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut at = from;
        while at <= to && (out.is_empty() || bytes < budget) {
            let Some((&first, &last)) = lane.segments.range(..=at).next_back() else {
                break;
            };
            if last < at {
                break;
            }
            if let std::collections::btree_map::Entry::Vacant(e) = lane.open.entry(first) {
                let a = Arc::clone(account);
                let records = blocking(move || a.read_segment(&peer, disk, first, last))
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                e.insert(records);
            }
            // Reads go forward: the oldest segments opened go first (never this one).
            while lane.open.len() > KEEP_OPEN
                && let Some(&old) = lane.open.keys().find(|k| **k != first)
            {
                lane.open.remove(&old);
            }
            for r in &lane.open[&first] {
                if r.seq() < at || r.seq() > to || (!out.is_empty() && bytes >= budget) {
                    continue;
                }
                bytes += r.wire_len();
                at = r.seq() + 1;
                out.push(r.clone());
            }
            if at <= last {
                break;
            }
        }
        if out.is_empty() {
            return Err(format!(
                "records {from}..={to} of disk {disk} are not in the cache account"
            ));
        }
        Ok(out)
    }

    async fn release(&mut self, disk: DiskId, up_to: Seq) -> Result<()> {
        self.check_lease()?;
        let Some(lane) = self.lanes.get_mut(&disk) else {
            return Ok(());
        };
        let (a, l, peer, segs) = (
            Arc::clone(&self.drain.account),
            self.drain.lease.clone(),
            self.drain.peer,
            lane.segments.clone(),
        );
        blocking(move || a.free(&l, &peer, disk, up_to, &segs)).await?;
        lane.segments.retain(|_, last| *last > up_to);
        lane.open.retain(|first, records| {
            *first > up_to || records.last().is_some_and(|r| r.seq() > up_to)
        });
        Ok(())
    }

    async fn answer(&mut self, job: u64, result: Result<Hashes, String>) -> Result<()> {
        if let Some((disk, offset)) = self.jobs.remove(&job) {
            let (a, peer) = (Arc::clone(&self.drain.account), self.drain.peer);
            blocking(move || a.answer(&peer, disk, offset, result)).await?;
            self.asked.remove(&(disk, offset));
        }
        Ok(())
    }

    fn disk_error(&mut self, disk: DiskId, message: String) {
        tracing::error!(agent = %peer_hex(&self.drain.peer), disk, "{message}");
    }

    fn connected(&mut self) {
        self.backoff.reset();
        tracing::info!(agent = %peer_hex(&self.drain.peer),
            "forwarding the cache account's records to the master target");
    }
}

/// Runs a request of the master target at an agent drained from `account`: left in the
/// account, answered there by the agent (which looks every quarter second).
pub(crate) async fn call(
    account: Arc<CacheAccount>,
    peer: PeerId,
    req: &haven_net::control::Request,
    timeout: Duration,
) -> haven_net::control::Reply {
    use haven_net::control::Reply;
    let id = format!(
        "{:016x}-{}",
        crate::now_ms(),
        &haven_cache_account::new_lease_id()[..8]
    );
    let json = serde_json::to_vec(req).expect("a request serialises");
    let (a, i) = (Arc::clone(&account), id.clone());
    if let Err(e) = blocking(move || a.put_request_for(&peer, &i, &json)).await {
        return Reply::Failed(format!(
            "process server: leaving the request for agent {} in the cache account: {e:#}",
            req.agent_id
        ));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (a, i) = (Arc::clone(&account), id.clone());
        match blocking(move || a.take_reply(&peer, &i)).await {
            Ok(Some(json)) => {
                return serde_json::from_slice(&json).unwrap_or_else(|e| {
                    Reply::Failed(format!(
                        "agent {}: a reply that does not read: {e}",
                        req.agent_id
                    ))
                });
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(agent = %req.agent_id, error = %format!("{e:#}"),
                "looking for a reply in the cache account"),
        }
        if tokio::time::Instant::now() > deadline {
            let (a, i) = (Arc::clone(&account), id.clone());
            let _ = blocking(move || a.withdraw_request(&peer, &i)).await;
            return Reply::Failed(format!(
                "agent {} did not answer through the cache account within {timeout:?}; check \
                 that it runs and reaches the account",
                req.agent_id
            ));
        }
    }
}
