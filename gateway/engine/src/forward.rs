//! One replication stream to the master target, run by a [`Forwarder`], whatever stands for
//! the cache: the process server's own journal (`process_server.rs`) or a cache storage
//! account (`drain.rs`). The machine decides; [`drive`] runs what it asks against a [`Cache`]
//! and carries the frames both ways until the stream ends.

use std::time::Instant;

use anyhow::{Result, bail};
use haven_net::quinn;
use haven_net::stream::{FrameReader, write_frames};
use haven_replication::forwarder::{
    Forwarder, ForwarderAction, ForwarderConfig, ForwarderEnd, LaneStart,
};
use haven_wire::{DiskId, Hashes, PeerId, Record, Role, SenderConfig, Seq};

use crate::ingest::Refused;

/// Bytes a forwarder reads ahead of what the master target acknowledged, beyond the window.
const READ_AHEAD: u64 = 8 << 20;

/// A forwarder of `peer`'s disks for one connection, `window` bytes unacknowledged at most.
pub(crate) fn forwarder(peer: PeerId, window: u64, starts: Vec<LaneStart>) -> Result<Forwarder> {
    let mut config = SenderConfig::new(Role::ProcessServer, peer);
    config.window_bytes = window;
    // QUIC finds a master target that is gone; a busy one answers late, and is waited for.
    config.keepalive_timeout = haven_net::endpoint::STREAM_WATCHDOG;
    let mut fwd = Forwarder::new(
        ForwarderConfig {
            sender: config,
            read_ahead: window + READ_AHEAD,
        },
        starts,
    )?;
    fwd.connect(Instant::now());
    Ok(fwd)
}

/// What a forwarder forwards from.
pub(crate) trait Cache {
    /// Something of the cache's own the forwarder must hear of (records made durable, a
    /// digest request).
    type Event;

    /// Waits for the next event. Cancel-safe: it loses nothing when dropped unfinished.
    async fn next_event(&mut self) -> Self::Event;

    /// Tells the forwarder how far each disk is durable, and what `event` brings.
    async fn update(&mut self, fwd: &mut Forwarder, event: Option<Self::Event>) -> Result<()>;

    /// Records of `disk` from `from` to at most `to`, about `budget` bytes.
    async fn read(
        &mut self,
        disk: DiskId,
        from: Seq,
        to: Seq,
        budget: u64,
    ) -> Result<Vec<Record>, String>;

    /// The master target holds `disk` up to `up_to`: free the cache up to there.
    async fn release(&mut self, disk: DiskId, up_to: Seq) -> Result<()>;

    /// The digests of request `job`, or why there are none.
    async fn answer(&mut self, job: u64, result: Result<Hashes, String>) -> Result<()>;

    /// The master target refused a disk (resume gap: the agent must resync it).
    fn disk_error(&mut self, disk: DiskId, message: String);

    /// The master target welcomed the stream.
    fn connected(&mut self);
}

/// Runs `fwd` (connected) over the stream `send`/`reader` until the stream ends: `Ok` never, an
/// error saying why ([`Refused`] for `FAILED_OVER` and `MOVED`).
pub(crate) async fn drive<C: Cache>(
    fwd: &mut Forwarder,
    send: &mut quinn::SendStream,
    reader: &mut FrameReader,
    cache: &mut C,
) -> Result<()> {
    cache.update(fwd, None).await?;
    loop {
        while let Some(action) = fwd.poll_action() {
            match action {
                ForwarderAction::Read {
                    disk,
                    from,
                    to,
                    budget,
                } => match cache.read(disk, from, to, budget).await {
                    Ok(records) => fwd.records(disk, records),
                    Err(e) => fwd.read_failed(disk, e),
                },
                ForwarderAction::Release { disk, up_to } => cache.release(disk, up_to).await?,
                ForwarderAction::Answer { job, result } => cache.answer(job, result).await?,
                ForwarderAction::DiskError { disk, message } => cache.disk_error(disk, message),
                ForwarderAction::Connected => cache.connected(),
            }
        }
        let now = Instant::now();
        let frames: Vec<_> = std::iter::from_fn(|| fwd.poll_transmit(now)).collect();
        if !frames.is_empty() {
            write_frames(send, frames).await?;
        }
        match fwd.poll_end() {
            None => {}
            Some(ForwarderEnd::FailedOver(message)) => return Err(Refused::failed_over(message)),
            Some(ForwarderEnd::Moved(message)) => return Err(Refused::moved(message)),
            Some(ForwarderEnd::Lost(why) | ForwarderEnd::StateLost(why)) => {
                let _ = send.finish();
                bail!("{why}");
            }
        }
        let deadline = fwd.poll_timeout().map(tokio::time::Instant::from_std);
        let event = tokio::select! {
            frame = reader.next() => {
                match frame? {
                    Some(f) => {
                        let now = Instant::now();
                        fwd.handle_frame(now, f);
                        while let Ok(Some(f)) = reader.try_next() {
                            fwd.handle_frame(now, f);
                        }
                    }
                    None => bail!("the master target finished the stream"),
                }
                None
            }
            event = cache.next_event() => Some(event),
            () = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => {
                fwd.handle_timeout(Instant::now());
                None
            }
        };
        cache.update(fwd, event).await?;
    }
}
