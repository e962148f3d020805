//! The agent's shipper: which log records go out next, the mapping of log seqs onto stream
//! seqs, the resync hash pass, and when acknowledged records are freed from the log.
//!
//! A [`Shipper`] owns one [`Sender`] and lives as long as its mapping (`seq_base`) holds, across
//! connections. The driver feeds it the connection's frames and timers, a view of the change
//! log ([`Shipper::log`]) and the results of the actions it ran; it polls
//! [`Shipper::poll_action`] and runs each action in order, [`Shipper::poll_transmit`] for frames,
//! and [`Shipper::poll_end`] to learn that the connection (or the mapping) is over.
//!
//! # Rules
//!
//! - Records come from [`ShipperAction::Fill`]: the driver returns only records durable in the
//!   log and on the disk, as stream records mapped with the `base` it was given. At most the
//!   window plus `push_slack` bytes are pushed and unreleased.
//! - While the disk resyncs, nothing is pushed until the `Welcome` says where the downstream
//!   resumes. If the mapping is unknown (`remap`), it is set then: the log's first record maps
//!   onto the resume point ([`Change::Mapped`], and [`ShipperEnd::Rebase`] if the stream's
//!   first seq changes). Then the hash pass runs range by range: when every record pushed is
//!   acknowledged the range's digests are asked (pushes held meanwhile), the driver compares
//!   ([`ShipperAction::Compare`]) while pushes go on, the range's end is persisted
//!   ([`Change::Progress`]), and after the last range [`Change::Protected`].
//! - A downstream that resumes below what this side released (`RESUME_GAP`, or a `Welcome`
//!   asking for a freed seq) and an overflowed log start a resync ([`Change::Resync`]); a
//!   refusal as failed over ends replication for good ([`ShipperEnd::FailedOver`]), one as
//!   moved ends the connection ([`ShipperEnd::Moved`]: the agent asks where to go).
//! - A `Welcome` below what was released on a disk that was not resyncing names the log seqs
//!   the downstream lacks (`Change::Resync::lost`). On a protected disk, before them the
//!   replica equals the disk as it was; after them every change is still in the log. So the disk differs from what the
//!   replica will hold only where those records wrote: a driver that remembers their extents
//!   starts the pass on just those ([`Start::only`]); one that does not compares everything.
//! - Every [`ShipperAction::Persist`] must be durable before the driver runs the next action;
//!   if it fails, the driver drops the shipper and starts again from what is stored.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use haven_wire::frame::error_code;
use haven_wire::{
    DiskInfo, Frame, HashRequest, Hashes, PeerId, Record, Role, Sender, SenderConfig, SenderEvent,
    Seq, StreamError, Violation,
};

/// The default block of resync digests, 64 KiB.
pub const DEFAULT_RESYNC_BLOCK: u32 = 64 * 1024;

/// How a [`Shipper`] behaves.
#[derive(Clone, Debug)]
pub struct ShipperConfig {
    /// The sender's configuration (window, keepalive).
    pub sender: SenderConfig,
    /// The protected disk.
    pub disk: DiskInfo,
    /// Pushed, unreleased bytes allowed beyond the window.
    pub push_slack: u64,
    /// Block size of resync digests.
    pub resync_block: u32,
    /// Most bytes of one range of the hash pass.
    pub resync_range: u64,
    /// Acknowledged records are freed at most this often (unless the log is more than half
    /// full).
    pub release_every: Duration,
    /// Wait before reading the log again after a read failed.
    pub fill_retry: Duration,
}

impl ShipperConfig {
    /// The agent's defaults for `disk`: window 64 MiB, 8 MiB slack, 64 KiB digests in ranges
    /// of 4096, frees every 500 ms.
    pub fn new(peer_id: PeerId, disk: DiskInfo) -> Self {
        Self {
            sender: SenderConfig::new(Role::Agent, peer_id),
            disk,
            push_slack: 8 << 20,
            resync_block: DEFAULT_RESYNC_BLOCK,
            resync_range: 4096 * 64 * 1024,
            release_every: Duration::from_millis(500),
            fill_retry: Duration::from_secs(1),
        }
    }
}

/// A resync in progress, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resync {
    /// The mapping of log seqs onto stream seqs is not known yet.
    pub remap: bool,
    /// Every range below this offset was compared.
    pub sync_offset: u64,
}

/// What a [`Shipper`] starts from: the stored state and the log's first seq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    /// Stream seq = log seq + `seq_base`.
    pub seq_base: i64,
    /// Set while the disk resyncs.
    pub resync: Option<Resync>,
    /// While resyncing: the only ranges (offset, length; sorted, apart, aligned to the resync
    /// block) that may differ; `None`: the whole disk is compared.
    pub only: Option<Vec<(u64, u64)>>,
    /// The log's first seq (the oldest record it holds, or the next it will write).
    pub log_first: u64,
}

/// A change to the stored state, to make durable before anything else happens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The log's first record maps onto the downstream's resume point: `seq_base` is set, the
    /// mapping is known, the pass starts from 0.
    Mapped {
        /// The new base.
        seq_base: i64,
        /// Where the downstream resumes.
        resume_seq: Seq,
    },
    /// The disk resyncs from offset 0, with this base, or with the mapping to find (`None`).
    Resync {
        /// The base, if known.
        seq_base: Option<i64>,
        /// Why, for the operator.
        why: String,
        /// The log seqs (first, last) whose records the downstream lost, when the disk was not
        /// resyncing already. If the disk was protected (not in its initial pass, which the
        /// shipper does not see), it differs from the replica only where those records wrote,
        /// so a driver that remembers their extents compares just those (`Start::only`).
        lost: Option<(u64, u64)>,
    },
    /// The hash pass compared every range below `sync_offset`.
    Progress {
        /// Where the pass resumes.
        sync_offset: u64,
    },
    /// The hash pass is complete: the disk is protected.
    Protected,
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShipperAction {
    /// Make this change durable (before the next action).
    Persist(Change),
    /// Read records durable in the log and on the disk from log seq `from` (a bounded batch),
    /// mapped with `base`; answer [`Shipper::filled`] or [`Shipper::fill_failed`].
    Fill {
        /// The first log seq to read.
        from: u64,
        /// Stream seq = log seq + `base`.
        base: i64,
    },
    /// Free the log's records up to this log seq.
    Release {
        /// The last log seq to free.
        up_to: u64,
    },
    /// Compare the disk's blocks of `request` with `hashes` and log those that differ, make
    /// them durable; answer [`Shipper::compared`] or [`Shipper::compare_failed`].
    Compare {
        /// The range asked.
        request: HashRequest,
        /// The replica's digests.
        hashes: Hashes,
    },
    /// Empty the log (after [`Change::Resync`] for an overflow was made durable).
    ResetLog,
}

/// Why a connection (or the mapping) is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShipperEnd {
    /// The mapping changed: start a new shipper from the stored state.
    Rebase,
    /// The connection ended: reconnect after a backoff (reset when `welcomed`).
    Lost {
        /// Why, for the operator.
        why: String,
        /// The connection got as far as the `Welcome`.
        welcomed: bool,
    },
    /// The disk was failed over at the secondary site: replication stops for good.
    FailedOver(String),
    /// The process server no longer serves this agent (it was moved to another): ask where
    /// to replicate before connecting again.
    Moved(String),
}

/// The log as the driver last saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogView {
    /// The oldest record held (or the next to be written).
    pub first_seq: u64,
    /// The newest record written.
    pub last_seq: u64,
    /// Bytes the log uses.
    pub bytes_used: u64,
    /// Bytes it may use.
    pub max_bytes: u64,
}

#[derive(Debug)]
struct Pass {
    /// Every range below this was compared.
    done_to: u64,
    /// The range asked and not yet answered.
    asked: Option<HashRequest>,
    /// The range being compared.
    comparing: Option<HashRequest>,
}

/// The agent's shipping policy for one disk. See the [module documentation](self).
#[derive(Debug)]
pub struct Shipper {
    config: ShipperConfig,
    sender: Sender,
    base: i64,
    /// The log's first seq when the shipper started.
    first_log: u64,
    /// The next log seq to push.
    next_log: u64,
    /// Stream seq and cost of every pushed, unreleased record.
    costs: VecDeque<(Seq, u64)>,
    pushed_bytes: u64,
    filling: bool,
    fill_retry_at: Option<Instant>,
    release_to: u64,
    released_at: Option<Instant>,
    /// The highest log seq this shipper asked to free.
    freed_to: u64,
    resync: Option<Resync>,
    /// See [`Start::only`].
    only: Option<Vec<(u64, u64)>>,
    pass: Option<Pass>,
    log: LogView,
    acked: Seq,
    shipped: u64,
    resync_sent: u64,
    welcomed: bool,
    actions: VecDeque<ShipperAction>,
    end: Option<ShipperEnd>,
}

/// `seq + base`, never below 0.
pub fn seq_add(seq: u64, base: i64) -> u64 {
    (seq as i128 + base as i128).clamp(0, u64::MAX as i128) as u64
}

impl Shipper {
    /// A shipper from the stored state. Fails if the sender cannot announce the disk.
    pub fn new(config: ShipperConfig, start: Start) -> Result<Self, StreamError> {
        let mut log_first = start.log_first;
        let mut first = seq_add(log_first, start.seq_base);
        let mut base = start.seq_base;
        if start.resync.is_some_and(|r| !r.remap) && (log_first as i128 + base as i128) < 1 {
            // A resync after the downstream lost records this side had freed: the base maps
            // the first record kept then onto the downstream's resume point, and records still
            // in the log below it (their segment was not wholly freed) map below stream seq 1.
            // They are among the lost records the pass compares: start at the log seq that
            // maps to 1, so the stored mapping holds.
            log_first = (1 - base) as u64;
            first = 1;
        }
        if first == 0 || start.resync.is_some_and(|r| r.remap) {
            // The mapping is unknown (only while resyncing): probe from 1, so that any resume
            // point is accepted; the `Welcome` then sets the mapping.
            base = 1 - log_first as i64;
            first = 1;
        }
        let sender = Sender::new(config.sender.clone(), [(config.disk, first)])?;
        Ok(Self {
            config,
            sender,
            base,
            first_log: log_first,
            next_log: log_first,
            costs: VecDeque::new(),
            pushed_bytes: 0,
            filling: false,
            fill_retry_at: None,
            release_to: 0,
            released_at: None,
            freed_to: 0,
            resync: start.resync,
            only: start
                .only
                .filter(|_| start.resync.is_some_and(|r| !r.remap)),
            pass: None,
            log: LogView {
                first_seq: log_first,
                ..LogView::default()
            },
            acked: first - 1,
            shipped: 0,
            resync_sent: 0,
            welcomed: false,
            actions: VecDeque::new(),
            end: None,
        })
    }

    /// A new connection is up.
    pub fn connect(&mut self, now: Instant) {
        self.sender.connect(now);
        self.welcomed = false;
        self.pass = None;
        self.end = None;
    }

    /// The connection is gone (whatever ended it).
    pub fn connection_lost(&mut self) {
        self.sender.connection_lost();
        // A comparison still running is answered and ignored; the next connection's pass
        // resumes from what was persisted.
        self.pass = None;
    }

    /// What the log holds now.
    pub fn log(&mut self, view: LogView) {
        self.log = view;
    }

    /// A frame from the downstream.
    pub fn handle_frame(&mut self, now: Instant, frame: Frame) {
        self.sender.handle(now, frame);
        self.process_events();
    }

    /// Timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.sender.handle_timeout(now);
        self.process_events();
    }

    /// The answer to [`ShipperAction::Fill`] with `base`: (log seq, record) in log order.
    pub fn filled(&mut self, base: i64, records: Vec<(u64, Record)>) {
        self.filling = false;
        if base != self.base || (self.resync.is_some() && self.pass.is_none()) {
            // Read for another mapping, or before a pass started: the shipper is about to
            // change; read again later.
            return;
        }
        for (log_seq, record) in records {
            let (seq, cost) = (record.seq(), record.wire_len());
            if self.sender.push(record).is_err() {
                // Not the seq the sender expects: the mapping no longer holds.
                return self.finish(ShipperEnd::Rebase);
            }
            self.costs.push_back((seq, cost));
            self.pushed_bytes += cost;
            self.next_log = log_seq + 1;
        }
    }

    /// [`ShipperAction::Fill`] failed: try again after `fill_retry`.
    pub fn fill_failed(&mut self, now: Instant) {
        self.filling = false;
        self.fill_retry_at = Some(now + self.config.fill_retry);
    }

    /// [`ShipperAction::Compare`] of the range at `offset` is done: `bytes` were captured.
    pub fn compared(&mut self, offset: u64, bytes: u64) {
        let Some(p) = &mut self.pass else { return };
        let Some(request) = p.comparing.filter(|r| r.offset == offset) else {
            return;
        };
        p.comparing = None;
        p.done_to = request.offset + request.len;
        self.resync_sent += bytes;
        let done_to = p.done_to;
        if let Some(r) = &mut self.resync {
            r.sync_offset = done_to;
        }
        self.actions
            .push_back(ShipperAction::Persist(Change::Progress {
                sync_offset: done_to,
            }));
    }

    /// [`ShipperAction::Compare`] failed.
    pub fn compare_failed(&mut self, why: String) {
        self.finish(ShipperEnd::Lost {
            why: format!("resync: {why}"),
            welcomed: self.welcomed,
        });
    }

    /// The log overflowed: the disk resyncs on an emptied log.
    pub fn overflowed(&mut self, why: String) {
        self.actions
            .push_back(ShipperAction::Persist(Change::Resync {
                seq_base: None,
                why,
                lost: None,
            }));
        self.actions.push_back(ShipperAction::ResetLog);
        self.only = None;
        self.resync = Some(Resync {
            remap: true,
            sync_offset: 0,
        });
        self.pass = None;
        self.finish(ShipperEnd::Rebase);
    }

    /// The next thing to do.
    pub fn poll_action(&mut self, now: Instant) -> Option<ShipperAction> {
        if let Some(a) = self.actions.pop_front() {
            return Some(a);
        }
        if self.end.is_some() {
            return None;
        }
        // Read more records when pushing is allowed and the budget has room: resyncing, only
        // while the pass lets pushes go (the mapping is known once it runs).
        let next = self.pass.as_ref().and_then(|p| self.next_range(p.done_to));
        let hold = self.resync.is_some()
            && self
                .pass
                .as_ref()
                .is_none_or(|p| p.comparing.is_none() && next.is_some());
        if !hold
            && !self.filling
            && self.fill_retry_at.is_none_or(|t| now >= t)
            && self.pushed_bytes < self.config.sender.window_bytes + self.config.push_slack
            && self.log.last_seq >= self.next_log
        {
            self.filling = true;
            self.fill_retry_at = None;
            return Some(ShipperAction::Fill {
                from: self.next_log,
                base: self.base,
            });
        }
        // Free acknowledged records, not on every ack (freeing the whole log starts a new
        // segment), unless the log is filling up.
        if self.release_to >= self.first_log.max(1)
            && (self
                .released_at
                .is_none_or(|t| now.saturating_duration_since(t) >= self.config.release_every)
                || self.log.bytes_used > self.log.max_bytes / 2)
        {
            let up_to = self.release_to;
            self.release_to = 0;
            self.freed_to = self.freed_to.max(up_to);
            self.released_at = Some(now);
            return Some(ShipperAction::Release { up_to });
        }
        self.step_pass();
        self.actions.pop_front()
    }

    /// The next range to compare at or after `from`: (offset, length).
    fn next_range(&self, from: u64) -> Option<(u64, u64)> {
        let (size, most) = (self.config.disk.size, self.config.resync_range);
        match &self.only {
            None => (from < size).then(|| (from, (size - from).min(most))),
            Some(only) => only
                .iter()
                .map(|&(o, l)| (o.min(size), (o + l).min(size)))
                .find(|&(_, end)| end > from)
                .map(|(o, end)| {
                    let start = o.max(from);
                    (start, (end - start).min(most))
                }),
        }
    }

    fn step_pass(&mut self) {
        let Some(p) = &self.pass else { return };
        let next = self.next_range(p.done_to);
        let Some(p) = &mut self.pass else { return };
        if p.asked.is_none()
            && p.comparing.is_none()
            && let Some((offset, len)) = next
            && !self.filling
            && self.sender.unreleased() == 0
            && self.sender.is_streaming()
        {
            let req = HashRequest {
                disk: self.config.disk.id,
                offset,
                len,
                block_size: self.config.resync_block,
            };
            if let Err(e) = self.sender.request_hashes(req) {
                let why = format!("asking the replica's digests: {e}");
                return self.finish(ShipperEnd::Lost {
                    why,
                    welcomed: self.welcomed,
                });
            }
            p.asked = Some(req);
        }
        if next.is_none() && p.asked.is_none() && p.comparing.is_none() {
            self.pass = None;
            self.resync = None;
            self.only = None;
            self.actions
                .push_back(ShipperAction::Persist(Change::Protected));
        }
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Frame> {
        self.sender.poll_transmit(now)
    }

    /// When [`Shipper::handle_timeout`] (or [`Shipper::poll_action`]) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.sender.poll_timeout(), self.fill_retry_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether the connection (or the mapping) is over, once every action was taken.
    pub fn poll_end(&mut self) -> Option<ShipperEnd> {
        if !self.actions.is_empty() {
            return None;
        }
        self.end.take()
    }

    /// Ends the connection; a change of mapping outranks a lost connection (the shipper must
    /// be rebuilt from the stored state either way), and failing over outranks both.
    fn finish(&mut self, end: ShipperEnd) {
        let rank = |e: &ShipperEnd| match e {
            ShipperEnd::Lost { .. } | ShipperEnd::Moved(_) => 0,
            ShipperEnd::Rebase => 1,
            ShipperEnd::FailedOver(_) => 2,
        };
        if self.end.as_ref().is_none_or(|old| rank(&end) > rank(old)) {
            self.end = Some(end);
        }
    }

    fn process_events(&mut self) {
        while let Some(ev) = self.sender.poll_event() {
            match ev {
                SenderEvent::Connected => self.on_welcome(),
                SenderEvent::Released { up_to, .. } => {
                    while let Some(&(seq, cost)) = self.costs.front() {
                        if seq > up_to {
                            break;
                        }
                        self.costs.pop_front();
                        self.pushed_bytes -= cost;
                        self.shipped += cost;
                    }
                    self.acked = self.acked.max(up_to);
                    let log_seq = up_to as i128 - self.base as i128;
                    if log_seq >= 1 {
                        self.release_to = self.release_to.max(log_seq as u64);
                    }
                }
                SenderEvent::Hashes(h) => {
                    if let Some(p) = &mut self.pass
                        && let Some(request) = p.asked.filter(|r| r.offset == h.offset)
                    {
                        p.asked = None;
                        p.comparing = Some(request);
                        self.actions
                            .push_back(ShipperAction::Compare { request, hashes: h });
                    }
                }
                SenderEvent::PeerError(e) if e.code == error_code::RESUME_GAP => {
                    self.enter_resync(None, lost_records(&e.message), None);
                }
                SenderEvent::PeerError(e) if e.code == error_code::FAILED_OVER => {
                    self.finish(ShipperEnd::FailedOver(e.message));
                }
                SenderEvent::PeerError(e) if e.code == error_code::MOVED => {
                    self.finish(ShipperEnd::Moved(e.message));
                }
                SenderEvent::PeerError(e) => self.finish(ShipperEnd::Lost {
                    why: format!(
                        "the gateway ended the stream: {} (code {})",
                        e.message, e.code
                    ),
                    welcomed: self.welcomed,
                }),
                SenderEvent::ProtocolError(v @ Violation::ResumeGap { next_seq, .. }) => {
                    // The log's oldest record that stays: records freed (or being freed) are
                    // not shipped again; the pass finds what they changed.
                    let first = self.log.first_seq.max(self.freed_to + 1);
                    let base = next_seq as i64 - first as i64;
                    // In log seqs, the downstream lacks the records from its resume point up
                    // to the first one the log still holds.
                    let from = next_seq as i128 - self.base as i128;
                    let lost = (self.resync.is_none() && from >= 1 && (from as u64) < first)
                        .then(|| (from as u64, first - 1));
                    self.enter_resync(Some(base), lost_records(&v), lost);
                }
                SenderEvent::ProtocolError(v) => self.finish(ShipperEnd::Lost {
                    why: format!("protocol error: {v}"),
                    welcomed: self.welcomed,
                }),
                SenderEvent::ConnectionDead => self.finish(ShipperEnd::Lost {
                    why: "the gateway stopped answering".into(),
                    welcomed: self.welcomed,
                }),
            }
        }
        if self.sender.is_closed() {
            self.finish(ShipperEnd::Lost {
                why: "stream closed".into(),
                welcomed: self.welcomed,
            });
        }
    }

    fn on_welcome(&mut self) {
        self.welcomed = true;
        let released = self.sender.released(self.config.disk.id).unwrap_or(0);
        self.acked = released;
        let Some(mut r) = self.resync else { return };
        if r.remap {
            // The log's first record must map onto where the downstream resumes.
            let seq_base = released as i64 + 1 - self.first_log as i64;
            let rebase = released + 1 != seq_add(self.first_log, self.base);
            self.actions
                .push_back(ShipperAction::Persist(Change::Mapped {
                    seq_base,
                    resume_seq: released + 1,
                }));
            r = Resync {
                remap: false,
                sync_offset: 0,
            };
            self.resync = Some(r);
            self.only = None;
            if rebase {
                return self.finish(ShipperEnd::Rebase);
            }
        }
        self.pass = Some(Pass {
            done_to: r.sync_offset.min(self.config.disk.size),
            asked: None,
            comparing: None,
        });
    }

    fn enter_resync(&mut self, seq_base: Option<i64>, why: String, lost: Option<(u64, u64)>) {
        self.actions
            .push_back(ShipperAction::Persist(Change::Resync {
                seq_base,
                why,
                lost,
            }));
        self.only = None;
        self.resync = Some(Resync {
            remap: seq_base.is_none(),
            sync_offset: 0,
        });
        self.pass = None;
        self.finish(ShipperEnd::Rebase);
    }

    /// Every record up to this stream seq is acknowledged durable downstream.
    pub fn acked_seq(&self) -> Seq {
        self.acked
    }

    /// Bytes of records acknowledged downstream by this shipper.
    pub fn shipped_bytes(&self) -> u64 {
        self.shipped
    }

    /// Bytes captured by the hash pass.
    pub fn resync_sent_bytes(&self) -> u64 {
        self.resync_sent
    }

    /// While resyncing: the offset below which every range was compared.
    pub fn sync_done(&self) -> Option<u64> {
        let r = self.resync?;
        Some(self.pass.as_ref().map_or(r.sync_offset, |p| p.done_to))
    }

    /// The stream seq of the log's first record when the shipper started.
    pub fn first_seq(&self) -> Seq {
        seq_add(self.first_log, self.base)
    }

    /// Whether the `Welcome` was received on this connection and records flow.
    pub fn is_streaming(&self) -> bool {
        self.sender.is_streaming()
    }
}

fn lost_records(why: &dyn std::fmt::Display) -> String {
    format!("the replica lost records already released here ({why}): resyncing by hash compare")
}
