//! Carrying Haven's protocols over QUIC streams of a `haven/1` connection.
//!
//! One `haven/1` connection carries:
//!
//! - **replication streams**: bidirectional streams opened by the sending side (the agent, or a
//!   process server forwarding to a master target), each carrying one [`haven_wire`] frame
//!   stream (`Hello` first). A process server opens one per source agent it forwards.
//! - **reports**: unidirectional streams opened by the sending side, each carrying exactly one
//!   JSON [`Report`] of at most [`MAX_REPORT_LEN`] bytes, then finished.
//! - **control requests**: bidirectional streams opened *against* the replication direction
//!   (master target to process server, process server to agent), see [`crate::control`].
//!
//! [`FrameReader`] and [`write_frames`] are the only glue between QUIC's bytes and the sans-IO
//! state machines; everything about order, acknowledgement and resume lives in `haven-wire`.

use haven_wire::{Decoder, Frame, WireError};
use serde::{Deserialize, Serialize};

/// Largest report body, in bytes.
pub const MAX_REPORT_LEN: usize = 64 * 1024;
/// Most bytes read from a stream in one call.
const READ_CHUNK: usize = 1 << 20;

/// Errors while carrying frames.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("replication stream: cannot decode frame: {0}")]
    Decode(#[from] WireError),
    #[error("replication stream: read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("replication stream: write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("report stream: {0}")]
    Report(String),
}

/// Reads whole frames from a QUIC receive stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: Decoder,
    finished: bool,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            decoder: Decoder::new(),
            finished: false,
        }
    }

    /// The next frame; `Ok(None)` when the peer finished the stream cleanly. A decode error
    /// is final (the connection should be closed after sending an `Error` frame).
    pub async fn next(&mut self) -> Result<Option<Frame>, StreamError> {
        loop {
            if let Some(frame) = self.decoder.next()? {
                return Ok(Some(frame));
            }
            if self.finished {
                return Ok(None);
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => self.finished = true,
            }
        }
    }

    /// A frame already decoded from received bytes, without waiting.
    pub fn try_next(&mut self) -> Result<Option<Frame>, StreamError> {
        Ok(self.decoder.next()?)
    }
}

/// Encodes `frames` and writes them in order. Headers and small frames are gathered into
/// shared buffers; a `Write`'s data is handed to QUIC as it is, never copied.
pub async fn write_frames(
    send: &mut quinn::SendStream,
    frames: impl IntoIterator<Item = Frame>,
) -> Result<(), StreamError> {
    let mut chunks: Vec<bytes::Bytes> = Vec::new();
    let mut head = Vec::new();
    let mut queued = 0;
    for frame in frames {
        if let Some((data, trailer)) = frame.encode_split(&mut head)? {
            queued += data.len();
            chunks.push(std::mem::take(&mut head).into());
            chunks.push(data);
            head.extend_from_slice(&trailer);
        }
        if queued + head.len() >= READ_CHUNK {
            if !head.is_empty() {
                chunks.push(std::mem::take(&mut head).into());
            }
            send.write_all_chunks(&mut chunks).await?;
            chunks.clear();
            queued = 0;
        }
    }
    if !head.is_empty() {
        chunks.push(head.into());
    }
    if !chunks.is_empty() {
        send.write_all_chunks(&mut chunks).await?;
    }
    Ok(())
}

/// The state of a protected disk as its agent sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    /// The first full pass over the disk is running.
    InitialSync,
    /// Every change is in the change log and shipped from it.
    Protected,
    /// The change log was lost or damaged: blocks are compared by hash with the replica and
    /// only differences are sent.
    Resyncing,
    /// Replication stopped; `message` says why and what to do.
    Error,
    /// The disk was failed over to the secondary site: replication of it is stopped for good
    /// (writes here are no longer protected); `message` says what to do.
    FailedOver,
}

impl DiskState {
    /// Lower-case name, as the CLI prints it.
    pub fn name(self) -> &'static str {
        match self {
            DiskState::InitialSync => "initial-sync",
            DiskState::Protected => "protected",
            DiskState::Resyncing => "resyncing",
            DiskState::Error => "error",
            DiskState::FailedOver => "failed-over",
        }
    }
}

/// One protected disk in a [`Report`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskReport {
    /// The disk's id in the replication stream.
    pub disk: u32,
    /// Size in bytes.
    pub size: u64,
    /// Replication state.
    pub state: DiskState,
    /// Bytes of the disk covered so far by the initial pass or the resync (= size when done).
    pub sync_done_bytes: u64,
    /// Bytes resyncs found different and sent since the agent started (every pass counted:
    /// a pass redone after a lost connection adds what it finds).
    pub resync_sent_bytes: u64,
    /// Bytes of the disk resyncs compared with the replica since the agent started: the whole
    /// disk per pass, or only what lost records wrote (see the agent's `trail.rs`).
    #[serde(default)]
    pub resync_compared_bytes: u64,
    /// Bytes the change log holds (not yet acknowledged downstream).
    pub log_bytes: u64,
    /// The change log's limit.
    pub log_max_bytes: u64,
    /// Total bytes written by the workload since the agent started.
    pub written_bytes_total: u64,
    /// Total bytes of records acknowledged by the process server since the agent started.
    pub shipped_bytes_total: u64,
    /// Last record written to the change log (stream seq).
    pub last_seq: u64,
    /// Last record acknowledged durable downstream (stream seq).
    pub acked_seq: u64,
    /// Why the disk is in the error state, and what to do.
    #[serde(default)]
    pub message: Option<String>,
    /// When the change log reached which seq, oldest first ([`WriteMarks`]): a receiver that
    /// holds up to some seq tells from them how old the oldest write it lacks is.
    #[serde(default)]
    pub written: Vec<WriteMark>,
}

/// At `ms` (the agent's clock, ms since the Unix epoch) the change log's last seq was `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WriteMark {
    pub ms: u64,
    pub seq: u64,
}

/// Most recent marks kept at full resolution ([`WriteMarks::FINE_EVERY`] apart: 16 s).
const FINE_MARKS: usize = 64;
/// Older marks kept, at least [`WriteMarks::COARSE_EVERY`] apart (about 8 minutes).
const COARSE_MARKS: usize = 64;

/// The agent's marks of when its writes happened, sampled every [`WriteMarks::FINE_EVERY`]:
/// the last 16 s at that resolution, then one per [`WriteMarks::COARSE_EVERY`] for about 8
/// minutes. A sample whose seq equals the newest mark's moves that mark to the sample's time
/// ("still at this seq then"), so an idle disk keeps one fresh mark.
#[derive(Clone, Debug, Default)]
pub struct WriteMarks {
    fine: std::collections::VecDeque<WriteMark>,
    coarse: std::collections::VecDeque<WriteMark>,
}

/// How far back a receiver holds every write of a source, from the source's marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeldUpTo {
    /// Every write the source made until this time (its clock, ms) is held; later ones may
    /// not be.
    At(u64),
    /// Writes older than every mark are missing: some write before this time is not held.
    Before(u64),
}

impl WriteMarks {
    /// How often the agent samples its last seq.
    pub const FINE_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
    /// Spacing of the older marks.
    pub const COARSE_EVERY: std::time::Duration = std::time::Duration::from_secs(8);

    /// Records that at `ms` the last seq is `seq`.
    pub fn sample(&mut self, ms: u64, seq: u64) {
        if let Some(last) = self.fine.back_mut()
            && last.seq == seq
        {
            last.ms = last.ms.max(ms);
            return;
        }
        self.fine.push_back(WriteMark { ms, seq });
        if self.fine.len() > FINE_MARKS
            && let Some(old) = self.fine.pop_front()
        {
            let spaced = self
                .coarse
                .back()
                .is_none_or(|c| old.ms >= c.ms + Self::COARSE_EVERY.as_millis() as u64);
            if spaced {
                self.coarse.push_back(old);
                if self.coarse.len() > COARSE_MARKS {
                    self.coarse.pop_front();
                }
            }
        }
    }

    /// Every mark, oldest first.
    pub fn marks(&self) -> Vec<WriteMark> {
        self.coarse.iter().chain(&self.fine).copied().collect()
    }
}

/// Up to when a receiver holding every record up to `held` holds the source's writes, given
/// the source's `marks` (oldest first) and its report: `last_seq` at `report_ms`. `None` when
/// it holds everything the report knows of.
pub fn held_up_to(
    marks: &[WriteMark],
    last_seq: u64,
    report_ms: u64,
    held: u64,
) -> Option<HeldUpTo> {
    if last_seq <= held {
        return None;
    }
    // The newest mark still within what is held: until then every write is held.
    match marks.iter().rev().find(|m| m.seq <= held) {
        Some(m) => Some(HeldUpTo::At(m.ms)),
        None => Some(HeldUpTo::Before(marks.first().map_or(report_ms, |m| m.ms))),
    }
}

/// What an agent reports about itself, about once a second.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The agent's id (as in its certificate); filled in by the receiving side from the
    /// verified certificate when it forwards the report, never trusted from the agent.
    #[serde(default)]
    pub agent_id: String,
    /// The machine's name.
    pub machine_name: String,
    /// Milliseconds since the Unix epoch when the agent made the report.
    pub time_ms: u64,
    /// Protected disks.
    pub disks: Vec<DiskReport>,
}

/// Sends one report on a new unidirectional stream.
pub async fn send_report(conn: &quinn::Connection, report: &Report) -> Result<(), StreamError> {
    let body = serde_json::to_vec(report).map_err(|e| StreamError::Report(e.to_string()))?;
    if body.len() > MAX_REPORT_LEN {
        return Err(StreamError::Report(format!(
            "report of {} bytes exceeds the limit of {MAX_REPORT_LEN}",
            body.len()
        )));
    }
    let mut send = conn
        .open_uni()
        .await
        .map_err(|e| StreamError::Report(e.to_string()))?;
    // Ahead of the replication streams on the same connection.
    let _ = send.set_priority(crate::control::CONTROL_PRIORITY);
    send.write_all(&body).await?;
    send.finish()
        .map_err(|e| StreamError::Report(e.to_string()))?;
    Ok(())
}

/// Reads one report from an accepted unidirectional stream.
pub async fn read_report(mut recv: quinn::RecvStream) -> Result<Report, StreamError> {
    let body = recv
        .read_to_end(MAX_REPORT_LEN)
        .await
        .map_err(|e| StreamError::Report(e.to_string()))?;
    serde_json::from_slice(&body).map_err(|e| StreamError::Report(format!("bad report: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_keep_16_seconds_fine_then_8_second_steps_and_move_while_idle() {
        let mut m = WriteMarks::default();
        // Idle at seq 5 for a second: one mark, moved to the latest sample.
        for i in 0..4 {
            m.sample(1_000 + i * 250, 5);
        }
        assert_eq!(m.marks(), vec![WriteMark { ms: 1_750, seq: 5 }]);
        // Writing: a mark per sample; after 16 s the older ones thin out to 8 s steps.
        for i in 0..400u64 {
            m.sample(2_000 + i * 250, 6 + i);
        }
        let marks = m.marks();
        // 337 marks left the fine ones: the first, then one per 8 s of the 84 s they span.
        assert_eq!(marks.len(), FINE_MARKS + 11);
        let fine = &marks[marks.len() - FINE_MARKS..];
        assert!(fine.windows(2).all(|w| w[1].ms - w[0].ms == 250));
        let coarse = &marks[..marks.len() - FINE_MARKS];
        assert!(coarse.windows(2).all(|w| w[1].ms - w[0].ms >= 8_000));
        assert!(marks.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    #[test]
    fn held_up_to_is_the_newest_mark_within_what_is_held() {
        let marks = [
            WriteMark { ms: 1_000, seq: 10 },
            WriteMark { ms: 2_000, seq: 20 },
            WriteMark { ms: 3_000, seq: 30 },
        ];
        assert_eq!(held_up_to(&marks, 35, 3_500, 35), None);
        assert_eq!(held_up_to(&marks, 35, 3_500, 30), Some(HeldUpTo::At(3_000)));
        assert_eq!(held_up_to(&marks, 35, 3_500, 25), Some(HeldUpTo::At(2_000)));
        assert_eq!(
            held_up_to(&marks, 35, 3_500, 9),
            Some(HeldUpTo::Before(1_000))
        );
        assert_eq!(held_up_to(&[], 35, 3_500, 9), Some(HeldUpTo::Before(3_500)));
    }
}
