//! Many agents in one process, for `cargo xtask bench scale` at an N where one agent process
//! per disk does not fit on the machine.
//!
//! Each simulated agent is the agent's own code over its own enrolled data folder: the change
//! log, the write splitter over a sparse disk file, the shipper on a QUIC connection of its own
//! to the real process server, the reports, the initial sync and points on an interval. What
//! it lacks is the NBD front end: the workload writes into the splitter directly. The agents
//! share one tokio runtime, two initial-sync threads and one points thread.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use haven_agent::identity::Identity;
use haven_agent::log::{ChangeLog, Durability, Limits};
use haven_agent::points::{self, Points};
use haven_agent::replicate::{self, Machine, Shared, ShipConfig};
use haven_agent::splitter::{OnFull, Splitter};
use haven_agent::state::DiskRecord;
use haven_net::stream::Report;
use tokio::sync::watch;

/// The sender's window of each simulated agent (the agent's default is larger; a thousand of
/// them share this process).
const WINDOW_BYTES: u64 = 4 << 20;
/// Initial syncs that run at once.
const SYNC_THREADS: usize = 2;

struct Sim {
    data_dir: PathBuf,
    shared: Arc<Shared>,
    machine: Arc<Machine>,
    points: Arc<Points>,
}

/// The running simulated agents; stopped when dropped.
pub struct SimAgents {
    rt: Option<tokio::runtime::Runtime>,
    sims: Vec<Sim>,
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    slowest_round_ms: Arc<AtomicU64>,
}

impl SimAgents {
    /// Starts one agent per `(enrolled data folder, disk file)`, each new to protection (its
    /// initial sync runs), taking a crash-consistent point every `point_interval`.
    pub fn start(disks: Vec<(PathBuf, PathBuf)>, point_interval: Duration) -> Result<SimAgents> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(64)
            .thread_name("sim-agents")
            .enable_all()
            .build()?;
        let (stop, stop_rx) = watch::channel(false);
        let mut sims = Vec::new();
        for (data_dir, disk) in disks {
            let identity = Identity::load(&data_dir)?;
            let size = std::fs::metadata(&disk)
                .with_context(|| format!("disk {}", disk.display()))?
                .len();
            let record = DiskRecord::new(size);
            record.store(&data_dir.join("disk.state"))?;
            let limits = Limits::default();
            let mut log = ChangeLog::open(data_dir.join("log"), limits)?;
            log.set_durability(Durability::Process);
            let splitter = Arc::new(Splitter::open(&disk, log, OnFull::Overflow)?);
            let shared = Arc::new(Shared::new(
                1,
                splitter,
                &data_dir,
                record,
                limits.max_bytes,
            ));
            shared.update(|_| {})?;
            let machine = Arc::new(Machine::new(
                vec![Arc::clone(&shared)],
                &data_dir,
                identity.info.machine_name.clone(),
                identity.info.agent_id.clone(),
            ));
            let points = Arc::new(Points::default());
            let cfg = ShipConfig::enrolled(
                identity,
                WINDOW_BYTES,
                Some(points::control_hook(&machine, &points)),
            );
            rt.spawn(replicate::ship(Arc::clone(&shared), cfg, stop_rx.clone()));
            rt.spawn(replicate::report_loop(
                Arc::clone(&machine),
                stop_rx.clone(),
            ));
            sims.push(Sim {
                data_dir,
                shared,
                machine,
                points,
            });
        }
        let mut threads = Vec::new();
        let queue: Arc<Mutex<VecDeque<Arc<Shared>>>> = Arc::new(Mutex::new(
            sims.iter().map(|s| Arc::clone(&s.shared)).collect(),
        ));
        for _ in 0..SYNC_THREADS {
            let queue = Arc::clone(&queue);
            threads.push(std::thread::spawn(move || {
                loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                    let Some(shared) = next else { return };
                    if shared.is_stopping() {
                        return;
                    }
                    if let Err(e) = replicate::initial_sync(&shared, WINDOW_BYTES) {
                        eprintln!("simulated agent: initial sync stopped: {e:#}");
                    }
                }
            }));
        }
        let tagged: Vec<_> = sims
            .iter()
            .map(|s| (Arc::clone(&s.machine), Arc::clone(&s.points)))
            .collect();
        let mut stopped = stop.subscribe();
        let slowest_round_ms = Arc::new(AtomicU64::new(0));
        let slowest = Arc::clone(&slowest_round_ms);
        threads.push(std::thread::spawn(move || {
            let mut next = Instant::now() + point_interval;
            while !*stopped.borrow_and_update() {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep((next - now).min(Duration::from_millis(100)));
                    continue;
                }
                next = now + point_interval;
                for (machine, points) in &tagged {
                    if points::not_ready(machine).is_none() {
                        let _ = points::take(machine, points, false, false, false);
                    }
                }
                slowest.fetch_max(now.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }));
        Ok(SimAgents {
            rt: Some(rt),
            sims,
            stop,
            threads,
            slowest_round_ms,
        })
    }

    /// How many agents run.
    pub fn len(&self) -> usize {
        self.sims.len()
    }

    /// The longest one round of points over all agents took (it should stay well below the
    /// interval, or the points themselves lag).
    pub fn slowest_points_round(&self) -> Duration {
        Duration::from_millis(self.slowest_round_ms.load(Ordering::Relaxed))
    }

    /// Agent `i`'s latest report (as its `status.json` says).
    pub fn report(&self, i: usize) -> Option<Report> {
        let text = std::fs::read_to_string(self.sims[i].data_dir.join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// A write of the protected machine on agent `i`'s disk, through its splitter.
    pub fn write(&self, i: usize, offset: u64, data: &[u8]) -> Result<()> {
        self.sims[i]
            .shared
            .splitter
            .write(offset, data, false)
            .map_err(|e| anyhow::anyhow!("simulated agent {i}: write at {offset}: {e}"))
    }
}

impl Drop for SimAgents {
    fn drop(&mut self) {
        for s in &self.sims {
            s.shared.stop();
        }
        let _ = self.stop.send(true);
        for s in &self.sims {
            let _ = s.shared.splitter.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
