//! Shipping to a cache storage account instead of a process server (Azure → Azure): the
//! agent needs only outbound HTTPS, and any gateway of the target region drains the account
//! (`haven_cache_account` describes the layout and the rules).
//!
//! [`CacheLink`] stands where the connection to a process server stands: the shipper talks to
//! it in frames, exactly as to a process server, and it plays the process server's part with
//! [`haven_wire::Receiver`], the same machine the gateway's ingest runs. Its `Welcome` resumes
//! after the highest seq the account holds; the records of each batch the shipper sends go up
//! as one sealed segment, and only once that put is answered (durable in the account) does the
//! receiver acknowledge them, so the shipper frees its log only of what the account keeps. A
//! resync's digest request goes up as a blob, after every record before it; the answer a
//! draining gateway leaves is fetched by a task of its own and handed to the shipper as the
//! process server's `Hashes` would be. A failed put ends the link: the shipper reconnects, and
//! the new link resumes from what the account holds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use haven_cache_account::CacheAccount;
use haven_wire::{DiskId, Frame, Hashes, PeerId, Receiver, ReceiverConfig, ReceiverEvent, Record};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// `haven-agent protect`'s options of a cache account.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CacheArgs {
    /// Ship to a cache storage account instead of a process server (Azure → Azure: the
    /// machine needs only outbound HTTPS): the container's URL
    /// (https://ACCOUNT.blob.core.windows.net/CONTAINER), with a SAS token as its query or
    /// the account's key in --cache-account-key-file.
    #[arg(long, conflicts_with = "server", requires = "cache_key")]
    pub cache_account: Option<String>,
    /// File holding the storage account's key (base64), when the URL carries no SAS token.
    #[arg(long, requires = "cache_account")]
    pub cache_account_key_file: Option<std::path::PathBuf>,
    /// The deployment's cache key, which seals every record in the account: a file of 64
    /// hexadecimal digits (openssl rand -hex 32), mode 600, the same at the draining gateways.
    #[arg(long, requires = "cache_account")]
    pub cache_key: Option<std::path::PathBuf>,
}

impl CacheArgs {
    /// The account, when one is given.
    pub fn open(&self) -> anyhow::Result<Option<Arc<CacheAccount>>> {
        use anyhow::Context as _;
        let (Some(url), Some(key)) = (&self.cache_account, &self.cache_key) else {
            return Ok(None);
        };
        let account_key = match &self.cache_account_key_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading --cache-account-key-file {}", p.display()))?,
            ),
            None => None,
        };
        let account = haven_cache_account::Account::from_container_url(
            url,
            account_key.as_deref().map(str::trim),
        )
        .map_err(|e| anyhow::anyhow!("--cache-account: {e}"))?;
        let key = haven_cache_account::CacheKey::load(key)?;
        Ok(Some(Arc::new(CacheAccount::new(account, key))))
    }
}

/// How often the agent's report is put in the account.
const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Puts the machine's report into the account every [`REPORT_EVERY`] until `stop`: the
/// draining gateway passes it on to the master target, as a process server passes on the
/// reports agents send it.
pub async fn report_loop(
    machine: Arc<crate::disk::Machine>,
    account: Arc<CacheAccount>,
    peer: PeerId,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let (m, a) = (Arc::clone(&machine), Arc::clone(&account));
        let put = blocking(move || {
            let json = serde_json::to_vec(&m.report()).expect("a report serialises");
            a.put_report(&peer, &json)
        });
        if let Err(e) = put.await {
            tracing::debug!(error = %e, "putting the report into the cache account");
        }
    }
}

/// How often the master target's requests are looked for.
const CONTROL_POLL: Duration = Duration::from_millis(250);

/// Runs the master target's requests (points, planned failover, policies) that a draining
/// gateway leaves in the account, and puts the replies there: what a process server's
/// connection carries otherwise. Until `stop`.
pub async fn control_loop(
    machine: Arc<crate::disk::Machine>,
    points: Arc<crate::points::Points>,
    account: Arc<CacheAccount>,
    peer: PeerId,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CONTROL_POLL) => {}
            _ = stop.changed() => return,
        }
        let a = Arc::clone(&account);
        let requests = match blocking(move || a.control_requests(&peer)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "looking for requests in the cache account");
                continue;
            }
        };
        for (id, json) in requests {
            let reply = match serde_json::from_slice::<haven_net::control::Request>(&json) {
                Ok(req) => {
                    crate::points::handle(Arc::clone(&machine), Arc::clone(&points), req).await
                }
                Err(e) => haven_net::control::Reply::Failed(format!("bad request: {e}")),
            };
            let json = serde_json::to_vec(&reply).expect("a reply serialises");
            let a = Arc::clone(&account);
            if let Err(e) = blocking(move || a.put_reply(&peer, &id, &json)).await {
                tracing::warn!(error = %e, "answering a request through the cache account");
            }
        }
    }
}

/// How often a streaming link asks whether the machine failed over.
const FAILED_OVER_CHECK: Duration = Duration::from_secs(5);

/// The refusal a process server hands an agent whose machine failed over.
fn refusal(message: String) -> (Frame, bool) {
    let error = haven_wire::ErrorFrame::new(haven_wire::frame::error_code::FAILED_OVER, message);
    (Frame::Error(error), false)
}

/// How often an answer to a digest request is looked for.
const ANSWER_POLL: Duration = Duration::from_millis(200);

/// The shipper's stream to a cache account.
pub struct CacheLink {
    account: Arc<CacheAccount>,
    peer: PeerId,
    disk: DiskId,
    receiver: Receiver,
    /// Answers to digest requests, from the task that polls for them.
    answers: mpsc::UnboundedReceiver<Result<Hashes, String>>,
    answers_tx: mpsc::UnboundedSender<Result<Hashes, String>>,
    polling: Option<JoinHandle<()>>,
    /// The machine failed over (a draining gateway said so): the refusal to hand the shipper,
    /// and whether it was handed.
    failed_over: Option<(Frame, bool)>,
    /// When the account was last asked whether the machine failed over.
    checked: Instant,
}

impl Drop for CacheLink {
    fn drop(&mut self) {
        if let Some(p) = self.polling.take() {
            p.abort();
        }
    }
}

/// Runs blocking account calls off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, haven_cache_account::CacheError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("a cache-account call failed: {e}")),
    }
}

impl CacheLink {
    /// Opens the link: finds where the disk's stream resumes in the account.
    pub async fn open(
        account: Arc<CacheAccount>,
        peer: PeerId,
        disk: DiskId,
    ) -> Result<CacheLink, String> {
        let a = Arc::clone(&account);
        let frontier = blocking(move || a.frontier(&peer, disk)).await?;
        let a = Arc::clone(&account);
        let failed_over = blocking(move || a.failed_over(&peer)).await?;
        let mut receiver = Receiver::new(
            ReceiverConfig {
                // Nothing is received when the shipper is idle and the link is local: it is
                // never dead for silence.
                idle_timeout: Duration::from_secs(3600),
            },
            [(disk, frontier)],
        );
        receiver.connect(Instant::now());
        let (answers_tx, answers) = mpsc::unbounded_channel();
        Ok(CacheLink {
            account,
            peer,
            disk,
            receiver,
            answers,
            answers_tx,
            polling: None,
            failed_over: failed_over.map(refusal),
            checked: Instant::now(),
        })
    }

    /// The shipper's frames: records go up as one segment, then are acknowledged.
    pub async fn send(&mut self, frames: Vec<Frame>) -> Result<(), String> {
        let now = Instant::now();
        if self.failed_over.is_none() && now.duration_since(self.checked) >= FAILED_OVER_CHECK {
            self.checked = now;
            let (a, peer) = (Arc::clone(&self.account), self.peer);
            self.failed_over = blocking(move || a.failed_over(&peer)).await?.map(refusal);
        }
        if self.failed_over.is_some() {
            // Nothing more goes up: the replica is the production copy now.
            return Ok(());
        }
        let mut records: Vec<Record> = Vec::new();
        for f in frames {
            self.receiver.handle(now, f);
            while let Some(event) = self.receiver.poll_event() {
                match event {
                    ReceiverEvent::Hello(hello) => {
                        let (a, h) = (Arc::clone(&self.account), hello.clone());
                        blocking(move || a.announce(&h)).await?;
                    }
                    ReceiverEvent::Record(r) => records.push(r),
                    ReceiverEvent::HashRequest(request) => {
                        // Every record before the request is in the account first.
                        self.put(std::mem::take(&mut records)).await?;
                        let (a, peer) = (Arc::clone(&self.account), self.peer);
                        blocking(move || a.put_request(&peer, &request)).await?;
                        self.poll_answer(request.offset);
                    }
                    ReceiverEvent::PeerError(e) => return Err(e.message),
                    ReceiverEvent::ProtocolError(v) => return Err(v.to_string()),
                    ReceiverEvent::ConnectionDead => return Err("the link went idle".into()),
                }
            }
        }
        self.put(records).await
    }

    async fn put(&mut self, records: Vec<Record>) -> Result<(), String> {
        let Some(last) = records.last().map(Record::seq) else {
            return Ok(());
        };
        let (a, peer) = (Arc::clone(&self.account), self.peer);
        blocking(move || a.put_segment(&peer, &records)).await?;
        self.receiver
            .mark_durable(self.disk, last)
            .map_err(|e| e.to_string())
    }

    fn poll_answer(&mut self, offset: u64) {
        if let Some(p) = self.polling.take() {
            p.abort();
        }
        let (a, peer, disk, tx) = (
            Arc::clone(&self.account),
            self.peer,
            self.disk,
            self.answers_tx.clone(),
        );
        self.polling = Some(tokio::spawn(async move {
            loop {
                let a = Arc::clone(&a);
                match blocking(move || a.take_answer(&peer, disk, offset)).await {
                    Ok(Some(answer)) => {
                        let _ = tx.send(answer);
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "looking for the digests of a resync"),
                }
                tokio::time::sleep(ANSWER_POLL).await;
            }
        }));
    }

    /// The next frame for the shipper (`Welcome`, `Ack`, `Pong`, `Hashes`); cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Frame>, String> {
        loop {
            if let Some(f) = self.try_next()? {
                return Ok(Some(f));
            }
            match self.answers.recv().await {
                Some(Ok(hashes)) => self
                    .receiver
                    .send_hashes(hashes)
                    .map_err(|e| e.to_string())?,
                Some(Err(why)) => return Err(format!("the resync's digests: {why}")),
                None => return Ok(None),
            }
        }
    }

    /// A frame for the shipper if one is ready.
    pub fn try_next(&mut self) -> Result<Option<Frame>, String> {
        if let Some((frame, handed)) = &mut self.failed_over {
            if *handed {
                return Ok(None);
            }
            *handed = true;
            return Ok(Some(frame.clone()));
        }
        Ok(self.receiver.poll_transmit(Instant::now()))
    }
}
