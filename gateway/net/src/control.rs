//! Control requests: the master target asks a source agent to act, through the process server.
//!
//! A request travels against the replication direction, on the connections that already exist
//! (nothing connects to an agent):
//!
//! ```text
//! master target ──bi stream on the forwarder's connection──▶ process server
//!               ──bi stream on the agent's connection──────▶ agent ──reply──▶ (same way back)
//! ```
//!
//! Each request is one bidirectional stream opened by the asking side: one JSON [`Request`]
//! of at most [`MAX_CONTROL_LEN`] bytes, then finished; the answer is one JSON [`Reply`], then
//! finished. The process server relays the bytes unchanged after checking that the named agent
//! is the one the stream's connection forwards for.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest request or reply body, in bytes.
pub const MAX_CONTROL_LEN: usize = 64 * 1024;

/// What an agent is asked to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    /// Take a recovery point now: a tag in each disk's stream, after every write acknowledged
    /// so far. With `app`, the quiesce hooks run around it.
    Point {
        /// Application-consistent (hooks) rather than crash-consistent.
        app: bool,
        /// The machine's platform quiesced it for this point (its adapter's `quiesce`, called
        /// by the configuration server around the request): an `app` point needs no hooks of
        /// the agent's own then (those configured still run).
        /// Sent only when true: an agent of an earlier version, which refuses unknown fields,
        /// still takes every other point.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quiesced: bool,
    },
    /// Planned failover: flush, close the front end (no write is accepted from then on), and
    /// take a final point.
    Stop,
    /// Take points on these intervals from now on (the machine's replication policy, from the
    /// configuration server), instead of the agent's own.
    Policy {
        /// Crash-consistent points, milliseconds apart.
        interval_ms: u64,
        /// Application-consistent points, milliseconds apart; none when absent.
        app_interval_ms: Option<u64>,
    },
    /// The machine has no policy from the configuration server any more (it left the
    /// pipeline): points on the agent's own intervals again.
    ClearPolicy,
    /// First half of a group point (machines whose points are consistent across all of
    /// them): hold every write of the machine — none is acknowledged from the answer
    /// ([`Reply::Held`]) until [`Command::Release`], or until `hold_ms` have passed, when the
    /// agent lets the writes go on its own and no point is taken.
    Hold {
        /// Longest the writes are held, milliseconds (the agent caps it).
        hold_ms: u64,
    },
    /// Second half of a group point: tag every disk with `point` (when given) and let the
    /// writes go; without `point` the writes go and no point is taken.
    Release {
        /// The hold, as [`Reply::Held`] named it.
        hold: u64,
        /// The group point's id (above every point the members took before).
        point: Option<u64>,
    },
}

/// A request for one agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The agent (32 hex digits of its id).
    pub agent_id: String,
    /// What to do.
    pub command: Command,
}

/// A point the agent tagged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointTaken {
    /// The point's id.
    pub point: u64,
    /// The disk whose stream carries the tag.
    pub disk: u32,
    /// The tag's sequence number in the disk's stream.
    pub seq: u64,
    /// When it was taken on the source, milliseconds since the Unix epoch.
    pub source_time_ms: u64,
    /// Application-consistent.
    pub app: bool,
}

/// The answer: the point taken, or why not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Reply {
    /// Done; the points taken (one per disk).
    Taken(Vec<PointTaken>),
    /// Refused or failed: what happened and what to do.
    Failed(String),
    /// Done (a request that takes no point), and what was done.
    Done(String),
    /// The machine's writes are held ([`Command::Hold`]).
    Held {
        /// The hold, for [`Command::Release`].
        hold: u64,
        /// The newest point id the agent used: a group point's id must be above it.
        last_point: u64,
    },
}

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control stream: {0}")]
    Stream(String),
    #[error("control stream: no reply within {0:?}")]
    Timeout(Duration),
    #[error("control stream: bad message: {0}")]
    Bad(String),
}

fn stream_err(e: impl std::fmt::Display) -> ControlError {
    ControlError::Stream(e.to_string())
}

/// Reads one JSON message (the whole stream, bounded).
pub async fn read_message<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, ControlError> {
    read_json(recv, MAX_CONTROL_LEN).await
}

/// Priority of control and report streams: QUIC sends their bytes before any replication
/// stream's (priority 0) on the same connection, so they never queue behind bulk data.
pub const CONTROL_PRIORITY: i32 = 8;

/// Writes one JSON message (ahead of bulk data, [`CONTROL_PRIORITY`]) and finishes the stream.
pub async fn write_message<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
) -> Result<(), ControlError> {
    write_json(send, message, MAX_CONTROL_LEN).await
}

/// Reads one JSON message of at most `max` bytes: the whole stream.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<T, ControlError> {
    let body = recv.read_to_end(max).await.map_err(stream_err)?;
    serde_json::from_slice(&body).map_err(|e| ControlError::Bad(e.to_string()))
}

/// Writes one JSON message of at most `max` bytes (ahead of bulk data,
/// [`CONTROL_PRIORITY`]) and finishes the stream.
pub async fn write_json<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
    max: usize,
) -> Result<(), ControlError> {
    // Fails only on a stream already closed, which the write below reports.
    let _ = send.set_priority(CONTROL_PRIORITY);
    let body = serde_json::to_vec(message).map_err(|e| ControlError::Bad(e.to_string()))?;
    if body.len() > max {
        return Err(ControlError::Bad(format!(
            "message of {} bytes exceeds the limit of {max}",
            body.len()
        )));
    }
    send.write_all(&body).await.map_err(stream_err)?;
    send.finish().map_err(stream_err)?;
    Ok(())
}

/// Sends `request` on a new stream of `conn` and waits at most `timeout` for the reply.
pub async fn call(
    conn: &quinn::Connection,
    request: &Request,
    timeout: Duration,
) -> Result<Reply, ControlError> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(stream_err)?;
        write_message(&mut send, request).await?;
        read_message::<Reply>(&mut recv).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ControlError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::Command;

    #[test]
    fn a_point_reads_as_agents_of_either_version_expect() {
        // What an earlier master target sends, and an earlier agent accepts.
        let old = r#"{"command":"point","app":true}"#;
        let point: Command = serde_json::from_str(old).unwrap();
        assert_eq!(
            point,
            Command::Point {
                app: true,
                quiesced: false
            }
        );
        assert_eq!(serde_json::to_string(&point).unwrap(), old);
        let quiesced = Command::Point {
            app: true,
            quiesced: true,
        };
        assert_eq!(
            serde_json::to_string(&quiesced).unwrap(),
            r#"{"command":"point","app":true,"quiesced":true}"#
        );
    }
}
