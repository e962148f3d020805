//! Deterministic simulation: a Sender and a Receiver joined by an in-memory link that is cut,
//! stalled and reconnected, with both ends restarting, on virtual time and seeded schedules.
//!
//! Replay a failing run with `HAVEN_WIRE_SIM_SEED=<seed> cargo test -p haven-wire --test sim`;
//! explore more with `HAVEN_WIRE_SIM_SEEDS=<count>`.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use haven_wire::*;

/// SplitMix64: tiny, seedable, the same on every platform and forever.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    /// True once in `n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }
}

const DISKS: [DiskId; 2] = [1, 2];
const WINDOW: u64 = 16 * 1024;
const RECORDS: usize = 400;
const MAX_STEPS: u64 = 200_000;

#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    steps: u64,
    cuts: u32,
    stalls: u32,
    connections: u32,
    sender_restarts: u32,
    receiver_restarts: u32,
    dead: u32,
    bytes_sent: u64,
    max_in_flight: u64,
}

struct Sim {
    rng: Rng,
    t0: Instant,
    ms: u64,
    sender: Sender,
    receiver: Receiver,
    // The link.
    up: bool,
    stalled_until: u64,
    reconnect_at: Option<u64>,
    to_receiver: VecDeque<u8>,
    to_sender: VecDeque<u8>,
    sender_decoder: Decoder,
    receiver_decoder: Decoder,
    // The source's log: every record generated, and how far each disk was released.
    generated: BTreeMap<DiskId, Vec<Record>>,
    released: BTreeMap<DiskId, Seq>,
    // The destination: records persisted, records received and not yet durable, and when
    // the owner will have made them durable.
    persisted: BTreeMap<DiskId, Vec<Record>>,
    volatile: BTreeMap<DiskId, Vec<Record>>,
    durable_at: VecDeque<(DiskId, Seq, u64)>,
    stats: Stats,
}

fn sender_config() -> SenderConfig {
    SenderConfig {
        window_bytes: WINDOW,
        keepalive_interval: Duration::from_millis(500),
        keepalive_timeout: Duration::from_millis(1500),
        ..SenderConfig::new(Role::Agent, [1; 16])
    }
}

fn receiver_config() -> ReceiverConfig {
    ReceiverConfig {
        idle_timeout: Duration::from_millis(2500),
    }
}

fn info(id: DiskId) -> DiskInfo {
    DiskInfo {
        id,
        size: 1 << 40,
        block_size: 512,
    }
}

impl Sim {
    fn new(seed: u64) -> Self {
        let sender = Sender::new(sender_config(), DISKS.map(|d| (info(d), 1))).unwrap();
        let by_disk = |_| {
            DISKS
                .iter()
                .map(|&d| (d, Vec::new()))
                .collect::<BTreeMap<_, _>>()
        };
        Self {
            rng: Rng(seed),
            t0: Instant::now(),
            ms: 0,
            sender,
            receiver: Receiver::new(receiver_config(), []),
            up: false,
            stalled_until: 0,
            reconnect_at: Some(0),
            to_receiver: VecDeque::new(),
            to_sender: VecDeque::new(),
            sender_decoder: Decoder::new(),
            receiver_decoder: Decoder::new(),
            generated: by_disk(()),
            released: DISKS.iter().map(|&d| (d, 0)).collect(),
            persisted: by_disk(()),
            volatile: by_disk(()),
            durable_at: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.ms)
    }

    fn generated_total(&self) -> usize {
        self.generated.values().map(Vec::len).sum()
    }

    fn make_record(&mut self, disk: DiskId) -> Record {
        let seq = self.generated[&disk].len() as Seq + 1;
        let offset = self.rng.range(0, 1 << 20) * 512;
        let kind = self.rng.range(0, 99);
        let bytes = |rng: &mut Rng, n: u64| {
            let n = rng.range(1, n);
            Bytes::from((0..n).map(|_| rng.next() as u8).collect::<Vec<u8>>())
        };
        let data = match kind {
            0..=69 => Payload::Data(bytes(&mut self.rng, 4000)),
            70..=79 => Payload::Compressed {
                raw_len: self.rng.range(1, 1 << 20) as u32,
                bytes: bytes(&mut self.rng, 2000),
            },
            80..=87 => Payload::Zero {
                len: self.rng.range(1, 1 << 30),
            },
            88..=94 => Payload::Trim {
                len: self.rng.range(1, 1 << 30),
            },
            _ => {
                return Record::Tag(Tag {
                    disk,
                    seq,
                    point: self.rng.next(),
                    kind: if self.rng.one_in(2) {
                        TagKind::App
                    } else {
                        TagKind::Crash
                    },
                    source_time_ms: self.ms,
                });
            }
        };
        Record::Write(Write {
            disk,
            seq,
            offset,
            data,
        })
    }

    fn cut(&mut self) {
        if !self.up {
            return;
        }
        self.up = false;
        self.stats.cuts += 1;
        self.to_receiver.clear();
        self.to_sender.clear();
        self.sender.connection_lost();
        self.receiver.connection_lost();
        // Often at once, while the receiving owner still has records to make durable.
        let delay = if self.rng.one_in(2) {
            self.rng.range(1, 50)
        } else {
            self.rng.range(10, 2000)
        };
        self.reconnect_at = Some(self.ms + delay);
    }

    fn reconnect(&mut self) {
        self.up = true;
        self.stalled_until = 0;
        self.reconnect_at = None;
        self.stats.connections += 1;
        self.sender_decoder = Decoder::new();
        self.receiver_decoder = Decoder::new();
        let now = self.now();
        self.receiver.connect(now);
        self.sender.connect(now);
    }

    /// The agent restarts: a new Sender over what its log still holds.
    fn restart_sender(&mut self) {
        self.cut();
        self.stats.sender_restarts += 1;
        let released = self.released.clone();
        self.sender =
            Sender::new(sender_config(), DISKS.map(|d| (info(d), released[&d] + 1))).unwrap();
        for d in DISKS {
            for r in &self.generated[&d][released[&d] as usize..] {
                self.sender.push(r.clone()).unwrap();
            }
        }
    }

    /// The gateway restarts: what was not durable is gone; a new Receiver from its store.
    fn restart_receiver(&mut self) {
        self.cut();
        self.stats.receiver_restarts += 1;
        for v in self.volatile.values_mut() {
            v.clear();
        }
        self.durable_at.clear();
        let durable: Vec<_> = self
            .persisted
            .iter()
            .map(|(&d, v)| (d, v.len() as Seq))
            .collect();
        self.receiver = Receiver::new(receiver_config(), durable);
    }

    fn transmit(&mut self) {
        let now = self.now();
        let mut buf = Vec::new();
        while let Some(f) = self.sender.poll_transmit(now) {
            assert!(
                self.sender.in_flight_bytes() <= WINDOW,
                "in flight {} > window {WINDOW}",
                self.sender.in_flight_bytes()
            );
            f.encode(&mut buf).unwrap();
        }
        self.stats.max_in_flight = self.stats.max_in_flight.max(self.sender.in_flight_bytes());
        self.stats.bytes_sent += buf.len() as u64;
        if self.up {
            self.to_receiver.extend(&buf);
        }
        buf.clear();
        while let Some(f) = self.receiver.poll_transmit(now) {
            f.encode(&mut buf).unwrap();
        }
        if self.up {
            self.to_sender.extend(&buf);
        }
    }

    fn deliver(&mut self) {
        if !self.up || self.ms < self.stalled_until {
            return;
        }
        let now = self.now();
        let n = (self.rng.range(0, 20_000) as usize).min(self.to_receiver.len());
        let chunk: Vec<u8> = self.to_receiver.drain(..n).collect();
        self.receiver_decoder.push(&chunk);
        while let Some(f) = self
            .receiver_decoder
            .next()
            .expect("the link does not damage bytes")
        {
            self.receiver.handle(now, f);
        }
        let n = (self.rng.range(0, 20_000) as usize).min(self.to_sender.len());
        let chunk: Vec<u8> = self.to_sender.drain(..n).collect();
        self.sender_decoder.push(&chunk);
        while let Some(f) = self
            .sender_decoder
            .next()
            .expect("the link does not damage bytes")
        {
            self.sender.handle(now, f);
        }
    }

    fn sender_events(&mut self) {
        while let Some(e) = self.sender.poll_event() {
            match e {
                SenderEvent::Connected | SenderEvent::Hashes(_) => {}
                SenderEvent::Released { disk, up_to } => {
                    let durable = self.persisted[&disk].len() as Seq;
                    assert!(
                        up_to <= durable,
                        "disk {disk}: released {up_to}, durable {durable}"
                    );
                    assert!(up_to > self.released[&disk], "release goes forward");
                    self.released.insert(disk, up_to);
                }
                SenderEvent::ConnectionDead => {
                    self.stats.dead += 1;
                    self.cut();
                }
                SenderEvent::PeerError(e) => panic!("peer error {e:?}"),
                SenderEvent::ProtocolError(v) => panic!("protocol error: {v}"),
            }
        }
    }

    fn receiver_events(&mut self) {
        while let Some(e) = self.receiver.poll_event() {
            match e {
                ReceiverEvent::Hello(_) | ReceiverEvent::HashRequest(_) => {}
                ReceiverEvent::Record(r) => {
                    let d = r.disk();
                    let have = (self.persisted[&d].len() + self.volatile[&d].len()) as Seq;
                    assert_eq!(r.seq(), have + 1, "disk {d}: in order, exactly once");
                    assert_eq!(&r, &self.generated[&d][have as usize], "the record sent");
                    self.volatile.get_mut(&d).unwrap().push(r.clone());
                    // The owner persists in order; each record later than the one before.
                    let last = self.durable_at.back().map_or(0, |x| x.2);
                    let slow = if self.rng.one_in(50) { 3000 } else { 300 };
                    let at = last.max(self.ms) + self.rng.range(0, slow);
                    self.durable_at.push_back((d, r.seq(), at));
                }
                ReceiverEvent::ConnectionDead => {
                    self.stats.dead += 1;
                    self.cut();
                }
                ReceiverEvent::PeerError(e) => panic!("peer error {e:?}"),
                ReceiverEvent::ProtocolError(v) => panic!("protocol error: {v}"),
            }
        }
    }

    fn persist(&mut self) {
        while self.durable_at.front().is_some_and(|x| x.2 <= self.ms) {
            let Some((d, seq, _)) = self.durable_at.pop_front() else {
                break;
            };
            let v = self.volatile.get_mut(&d).unwrap();
            let n = v.iter().take_while(|r| r.seq() <= seq).count();
            self.persisted.get_mut(&d).unwrap().extend(v.drain(..n));
            self.receiver.mark_durable(d, seq).unwrap();
        }
    }

    fn done(&self) -> bool {
        self.generated_total() == RECORDS
            && DISKS.iter().all(|d| {
                let n = self.generated[d].len() as Seq;
                self.released[d] == n && self.persisted[d].len() as Seq == n
            })
    }

    fn step(&mut self, faults: bool) {
        self.stats.steps += 1;
        self.ms += self.rng.range(1, 10);
        let now = self.now();
        // The source writes.
        if self.generated_total() < RECORDS && self.rng.one_in(2) {
            let d = DISKS[self.rng.range(0, DISKS.len() as u64 - 1) as usize];
            let r = self.make_record(d);
            self.generated.get_mut(&d).unwrap().push(r.clone());
            self.sender.push(r).unwrap();
        }
        // Faults.
        if faults {
            if self.up && self.rng.one_in(300) {
                self.cut();
            }
            if self.up && self.ms >= self.stalled_until && self.rng.one_in(400) {
                self.stats.stalls += 1;
                self.stalled_until = self.ms + self.rng.range(100, 4000);
            }
            if self.rng.one_in(1500) {
                self.restart_sender();
            }
            if self.rng.one_in(1500) {
                self.restart_receiver();
            }
        }
        if !self.up && self.reconnect_at.is_some_and(|t| t <= self.ms) {
            self.reconnect();
        }
        // Timers, then the usual exchange.
        if self.sender.poll_timeout().is_some_and(|t| t <= now) {
            self.sender.handle_timeout(now);
        }
        if self.receiver.poll_timeout().is_some_and(|t| t <= now) {
            self.receiver.handle_timeout(now);
        }
        self.sender_events();
        self.receiver_events();
        self.transmit();
        self.deliver();
        self.receiver_events();
        self.persist();
        self.sender_events();
        self.transmit();
    }
}

fn run(seed: u64) -> Stats {
    println!("haven-wire sim seed {seed} (replay: HAVEN_WIRE_SIM_SEED={seed})");
    let mut sim = Sim::new(seed);
    // Faults while the source writes and for a while after, then calm so the stream drains.
    let mut calm_after = None;
    while !sim.done() {
        assert!(
            sim.stats.steps < MAX_STEPS,
            "seed {seed}: no progress after {MAX_STEPS} steps"
        );
        if calm_after.is_none() && sim.generated_total() == RECORDS {
            calm_after = Some(sim.stats.steps + 2000);
        }
        let faults = calm_after.is_none_or(|c| sim.stats.steps < c);
        sim.step(faults);
    }
    for d in DISKS {
        assert_eq!(
            sim.persisted[&d], sim.generated[&d],
            "seed {seed}: disk {d} replica"
        );
        assert_eq!(
            sim.receiver.durable(d),
            Some(sim.generated[&d].len() as Seq)
        );
    }
    assert_eq!(
        sim.sender.unreleased(),
        0,
        "seed {seed}: everything released"
    );
    sim.stats
}

#[test]
fn random_schedules() {
    if let Some(seed) = std::env::var("HAVEN_WIRE_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        println!("{:?}", run(seed));
        return;
    }
    let count = std::env::var("HAVEN_WIRE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let mut total = Stats::default();
    for seed in 0..count {
        let s = run(0x5EED_0000 + seed);
        total.cuts += s.cuts;
        total.stalls += s.stalls;
        total.dead += s.dead;
        total.sender_restarts += s.sender_restarts;
        total.receiver_restarts += s.receiver_restarts;
        total.max_in_flight = total.max_in_flight.max(s.max_in_flight);
    }
    // The schedules do exercise every fault.
    println!("{total:?}");
    assert!(total.cuts > 0 && total.dead > 0 && total.stalls > 0);
    assert!(total.sender_restarts > 0 && total.receiver_restarts > 0);
    // Backpressure was reached: the window was nearly full at times.
    assert!(total.max_in_flight > WINDOW - 4100, "{total:?}");
}

#[test]
fn pinned_seed_replays_a_known_schedule() {
    // A schedule with every kind of fault: cuts, stalls, a dead peer, both ends restarting.
    let stats = run(0xC0FF_0003);
    println!("{stats:?}");
    let expected = Stats {
        steps: 14309,
        cuts: 9,
        stalls: 7,
        connections: 10,
        sender_restarts: 4,
        receiver_restarts: 1,
        dead: 1,
        bytes_sent: 687620,
        max_in_flight: 16384,
    };
    assert_eq!(
        stats, expected,
        "the pinned schedule no longer replays the same way"
    );
}
