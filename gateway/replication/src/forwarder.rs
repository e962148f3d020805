//! The process server's forwarder: which cached records go to the master target next, when
//! the cache is freed, when a resync's digest request may go on, and what a master target that
//! holds more than this cache, or lost what it freed, means.
//!
//! A [`Forwarder`] owns one [`Sender`] for one agent's disks (its lanes) and lives for one
//! connection to the master target. The driver tells it how far each disk's cache is durable
//! ([`Forwarder::durable`]), reads records when asked ([`ForwarderAction::Read`]), frees the
//! cache when told ([`ForwarderAction::Release`]) and relays digest requests and answers.
//!
//! # Rules
//!
//! - Only records durable in the cache are pushed; at most `read_ahead` bytes of them are
//!   pushed and unreleased per disk.
//! - The cache is freed only up to what the master target acknowledged.
//! - At the `Welcome`, a master target that holds more of a disk than this cache ever did means
//!   the process server's state was lost: forwarding stops with [`ForwarderEnd::StateLost`]
//!   instead of skipping records. A master target that resumes below what was freed here
//!   (`ResumeGap`) marks the disk: the agent must resync it.
//! - A digest request goes on only once the master target holds everything cached for the disk
//!   (so the digests describe what the agent pushed before asking).
//! - A refusal as failed over ends forwarding for good ([`ForwarderEnd::FailedOver`]); one as
//!   moved ([`ForwarderEnd::Moved`]: another process server took the agent over) too, and the
//!   cache is stale.

use std::collections::VecDeque;
use std::time::Instant;

use haven_wire::frame::error_code;
use haven_wire::{
    DiskId, DiskInfo, Frame, HashRequest, Hashes, Record, Sender, SenderConfig, SenderEvent, Seq,
    StreamError, Violation,
};

/// How a [`Forwarder`] behaves.
#[derive(Clone, Debug)]
pub struct ForwarderConfig {
    /// The sender's configuration (role process server, window, keepalive).
    pub sender: SenderConfig,
    /// Pushed, unreleased bytes allowed per disk (at least the window).
    pub read_ahead: u64,
}

/// Where one disk's forwarding starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneStart {
    /// The disk.
    pub info: DiskInfo,
    /// The first seq to push: the oldest the cache holds, and above what was released.
    pub next: Seq,
    /// The cache is durable up to this seq.
    pub durable: Seq,
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwarderAction {
    /// Read cached records of `disk` from `from` to at most `to`, about `budget` bytes; answer
    /// [`Forwarder::records`] or [`Forwarder::read_failed`].
    Read {
        /// The disk.
        disk: DiskId,
        /// The first seq.
        from: Seq,
        /// The last seq that may be read (durable).
        to: Seq,
        /// Bytes of records wanted (at least one record is returned if any is there).
        budget: u64,
    },
    /// The master target holds `disk` durably up to `up_to`: free the cache and record it.
    Release {
        /// The disk.
        disk: DiskId,
        /// The last seq to free.
        up_to: Seq,
    },
    /// The answer to digest request `job`.
    Answer {
        /// The job given to [`Forwarder::request_hashes`].
        job: u64,
        /// The digests, or why there are none.
        result: Result<Hashes, String>,
    },
    /// Show this on the disk: forwarding it needs the operator or a resync.
    DiskError {
        /// The disk.
        disk: DiskId,
        /// What happened and what to do.
        message: String,
    },
    /// The master target welcomed this forwarder: records flow.
    Connected,
}

/// Why forwarding on this connection is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwarderEnd {
    /// The connection ended: reconnect after a backoff.
    Lost(String),
    /// The master target holds more than this cache ever did: the process server's state was
    /// lost. Reconnecting does not help.
    StateLost(String),
    /// The master target refused the agent as failed over: forwarding stops for good.
    FailedOver(String),
    /// The master target takes the agent's streams from another process server now: what this
    /// one caches for it is stale, never to be forwarded.
    Moved(String),
}

#[derive(Debug)]
struct Lane {
    info: DiskInfo,
    next: Seq,
    durable: Seq,
    /// Pushed, unreleased: seq and cost.
    pushed: VecDeque<(Seq, u64)>,
    in_use: u64,
    reading: bool,
    /// A read came back empty at this durable seq: do not ask again until it grows.
    empty_at: Option<Seq>,
}

/// One agent's forwarding on one connection. See the [module documentation](self).
#[derive(Debug)]
pub struct Forwarder {
    sender: Sender,
    read_ahead: u64,
    lanes: Vec<Lane>,
    /// Digest requests waiting for their disk to drain, and those sent.
    waiting: VecDeque<(u64, HashRequest)>,
    asked: VecDeque<(u64, HashRequest)>,
    actions: VecDeque<ForwarderAction>,
    end: Option<ForwarderEnd>,
}

impl Forwarder {
    /// A forwarder for these disks. Fails if the sender cannot announce them.
    pub fn new(
        config: ForwarderConfig,
        lanes: impl IntoIterator<Item = LaneStart>,
    ) -> Result<Self, StreamError> {
        let lanes: Vec<Lane> = lanes
            .into_iter()
            .map(|l| Lane {
                info: l.info,
                next: l.next,
                durable: l.durable,
                pushed: VecDeque::new(),
                in_use: 0,
                reading: false,
                empty_at: None,
            })
            .collect();
        let sender = Sender::new(config.sender, lanes.iter().map(|l| (l.info, l.next)))?;
        Ok(Self {
            sender,
            read_ahead: config.read_ahead,
            lanes,
            waiting: VecDeque::new(),
            asked: VecDeque::new(),
            actions: VecDeque::new(),
            end: None,
        })
    }

    /// The connection is up.
    pub fn connect(&mut self, now: Instant) {
        self.sender.connect(now);
    }

    /// The cache of `disk` is durable up to `seq`.
    pub fn durable(&mut self, disk: DiskId, seq: Seq) {
        if let Some(l) = self.lane(disk) {
            l.durable = l.durable.max(seq);
        }
    }

    /// The answer to [`ForwarderAction::Read`]: records in seq order from the `from` asked.
    pub fn records(&mut self, disk: DiskId, records: Vec<Record>) {
        let Some(i) = self.lanes.iter().position(|l| l.info.id == disk) else {
            return;
        };
        let lane = &mut self.lanes[i];
        lane.reading = false;
        if records.is_empty() {
            lane.empty_at = Some(lane.durable);
            return;
        }
        for record in records {
            let (seq, cost) = (record.seq(), record.wire_len());
            if seq != lane.next || seq > lane.durable {
                // Not what was asked: the driver's bug; never push it.
                let why = format!(
                    "disk {disk}: read seq {seq}, expected {} (durable {})",
                    lane.next, lane.durable
                );
                return self.finish(ForwarderEnd::Lost(why));
            }
            if let Err(e) = self.sender.push(record) {
                return self.finish(ForwarderEnd::Lost(format!("disk {disk}: {e}")));
            }
            lane.pushed.push_back((seq, cost));
            lane.in_use += cost;
            lane.next = seq + 1;
        }
    }

    /// [`ForwarderAction::Read`] failed: a damaged or tampered record stops this disk, and is
    /// never forwarded.
    pub fn read_failed(&mut self, disk: DiskId, message: String) {
        if let Some(l) = self.lane(disk) {
            l.reading = false;
        }
        self.actions.push_back(ForwarderAction::DiskError {
            disk,
            message: message.clone(),
        });
        self.finish(ForwarderEnd::Lost(message));
    }

    /// The agent asks for the replica's digests (resync); answered by
    /// [`ForwarderAction::Answer`] with `job`.
    pub fn request_hashes(&mut self, job: u64, request: HashRequest) {
        self.waiting.push_back((job, request));
    }

    /// A frame from the master target.
    pub fn handle_frame(&mut self, now: Instant, frame: Frame) {
        self.sender.handle(now, frame);
        self.process_events();
    }

    /// Timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.sender.handle_timeout(now);
        self.process_events();
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<ForwarderAction> {
        if let Some(a) = self.actions.pop_front() {
            return Some(a);
        }
        if self.end.is_some() {
            return None;
        }
        for lane in &mut self.lanes {
            if !lane.reading
                && lane.next <= lane.durable
                && lane.in_use < self.read_ahead
                && lane.empty_at != Some(lane.durable)
            {
                lane.reading = true;
                return Some(ForwarderAction::Read {
                    disk: lane.info.id,
                    from: lane.next,
                    to: lane.durable,
                    budget: self.read_ahead - lane.in_use,
                });
            }
        }
        // A digest request goes on once the master target holds everything cached.
        while self.sender.is_streaming() {
            let Some(&(job, request)) = self.waiting.front() else {
                break;
            };
            let drained = self
                .lanes
                .iter()
                .find(|l| l.info.id == request.disk)
                .is_none_or(|l| {
                    self.sender
                        .released(l.info.id)
                        .is_some_and(|r| r >= l.durable)
                });
            if !drained {
                break;
            }
            self.waiting.pop_front();
            match self.sender.request_hashes(request) {
                Ok(()) => self.asked.push_back((job, request)),
                Err(e) => {
                    return Some(ForwarderAction::Answer {
                        job,
                        result: Err(e.to_string()),
                    });
                }
            }
        }
        None
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Frame> {
        self.sender.poll_transmit(now)
    }

    /// When [`Forwarder::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sender.poll_timeout()
    }

    /// Whether forwarding on this connection is over, once every action was taken (then call
    /// [`Forwarder::connection_lost`], which answers the digest requests still open).
    pub fn poll_end(&mut self) -> Option<ForwarderEnd> {
        if !self.actions.is_empty() || self.end.is_none() {
            return None;
        }
        self.end.take()
    }

    /// Ends forwarding on this connection (the transport failed): unanswered digest requests
    /// are answered with an error.
    pub fn connection_lost(&mut self, why: &str) -> Vec<ForwarderAction> {
        self.sender.connection_lost();
        self.waiting
            .drain(..)
            .chain(self.asked.drain(..))
            .map(|(job, _)| ForwarderAction::Answer {
                job,
                result: Err(format!("the connection to the master target ended: {why}")),
            })
            .collect()
    }

    fn lane(&mut self, disk: DiskId) -> Option<&mut Lane> {
        self.lanes.iter_mut().find(|l| l.info.id == disk)
    }

    fn finish(&mut self, end: ForwarderEnd) {
        if self.end.is_none() {
            self.end = Some(end);
        }
    }

    fn process_events(&mut self) {
        while let Some(ev) = self.sender.poll_event() {
            match ev {
                SenderEvent::Connected => {
                    // The master target may not hold more than this cache ever did: that
                    // means the process server's state was lost, and forwarding would silently
                    // skip records (the protocol releases what the receiver already has).
                    for lane in &self.lanes {
                        let theirs = self.sender.released(lane.info.id).unwrap_or(0);
                        if theirs > lane.durable {
                            let message = format!(
                                "the master target holds records up to {theirs}, this cache \
                                 only up to {}: the process server's state was lost; remove \
                                 the disk's cache and state to resynchronise",
                                lane.durable
                            );
                            self.actions.push_back(ForwarderAction::DiskError {
                                disk: lane.info.id,
                                message: message.clone(),
                            });
                            if self.end.is_none() {
                                self.end = Some(ForwarderEnd::StateLost(message));
                            }
                        }
                    }
                    if self.end.is_none() {
                        self.actions.push_back(ForwarderAction::Connected);
                    }
                }
                SenderEvent::Released { disk, up_to } => {
                    if let Some(lane) = self.lane(disk) {
                        while let Some(&(seq, cost)) = lane.pushed.front() {
                            if seq > up_to {
                                break;
                            }
                            lane.pushed.pop_front();
                            lane.in_use -= cost;
                        }
                    }
                    self.actions
                        .push_back(ForwarderAction::Release { disk, up_to });
                }
                SenderEvent::Hashes(h) => {
                    if let Some(i) = self
                        .asked
                        .iter()
                        .position(|(_, q)| q.disk == h.disk && q.offset == h.offset)
                        && let Some((job, _)) = self.asked.remove(i)
                    {
                        self.actions
                            .push_back(ForwarderAction::Answer { job, result: Ok(h) });
                    }
                }
                SenderEvent::PeerError(e) if e.code == error_code::FAILED_OVER => {
                    self.finish(ForwarderEnd::FailedOver(e.message));
                }
                SenderEvent::PeerError(e) if e.code == error_code::MOVED => {
                    self.finish(ForwarderEnd::Moved(e.message));
                }
                SenderEvent::PeerError(e) => self.finish(ForwarderEnd::Lost(format!(
                    "the master target closed the stream: {} (code {})",
                    e.message, e.code
                ))),
                SenderEvent::ProtocolError(v) => {
                    if let Violation::ResumeGap { disk, .. } = v {
                        self.actions.push_back(ForwarderAction::DiskError {
                            disk,
                            message: format!(
                                "the master target lost records this cache already freed \
                                 ({v}); the agent's disk needs a resync"
                            ),
                        });
                    }
                    self.finish(ForwarderEnd::Lost(format!(
                        "protocol error with the master target: {v}"
                    )));
                }
                SenderEvent::ConnectionDead => {
                    self.finish(ForwarderEnd::Lost(
                        "the master target stopped answering".into(),
                    ));
                }
            }
        }
        if self.sender.is_closed() {
            self.finish(ForwarderEnd::Lost(
                "the master target closed the stream".into(),
            ));
        }
    }
}
