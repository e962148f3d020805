//! Events and alerts of a deployment, at its configuration server.
//!
//! Conditions are evaluated on every gateway report (and every second for gateways that stop
//! reporting): each raises one event when it starts and one when it ends (`rpo.exceeded` then
//! `rpo.recovered`), never one per report. Events are kept in redb (`event/<seq>`, the newest
//! [`KEEP`]), counted by kind and severity for `/metrics`, and posted to the pipeline's
//! webhooks (JSON, a few attempts each, from a thread of their own).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Result;
use haven_store::StateDb;
use serde::{Deserialize, Serialize};

use crate::ingest::lock;
use crate::now_ms;

/// Events kept; older ones are removed as new ones come.
pub const KEEP: u64 = 10_000;
/// A process-server cache or a journal above this share of its limit raises an event.
pub const FULL_PERCENT: u64 = 80;
/// A data folder's filesystem with less free space than this share raises an event.
pub const LOW_SPACE_PERCENT: u64 = 10;
/// Events waiting for webhook delivery; beyond, new ones are not posted (and logged).
const WEBHOOK_QUEUE: usize = 1000;
/// Attempts per webhook delivery.
const WEBHOOK_ATTEMPTS: u32 = 3;

/// How severe an event is.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    /// Something happened as expected.
    Info,
    /// Something needs attention soon (an RPO above its threshold).
    Warning,
    /// Something failed (a failover, a plugin call).
    Error,
    /// Protection is lost or data is at risk (suspect points, a full journal).
    Critical,
}

impl Severity {
    /// Every severity, lowest first.
    pub const ALL: [Severity; 4] = [
        Severity::Info,
        Severity::Warning,
        Severity::Error,
        Severity::Critical,
    ];

    /// Its name, as events and pipelines write it.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Grows by one per event.
    pub seq: u64,
    /// When it was raised, ms since the Unix epoch.
    pub time_ms: u64,
    pub severity: Severity,
    /// What happened, e.g. `rpo.exceeded`, `agent.disconnected`, `gateway.unreachable`.
    pub kind: String,
    /// The gateway it concerns.
    #[serde(default)]
    pub gateway: Option<String>,
    /// The protected item (machine name) it concerns.
    #[serde(default)]
    pub item: Option<String>,
    /// What happened and what to do.
    pub text: String,
}

/// Where events are posted (a pipeline's `[[webhook]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    pub name: String,
    pub url: String,
    /// Kinds, `PREFIX.*`, or `*`.
    pub events: Vec<String>,
    pub min_severity: Severity,
}

impl Webhook {
    fn wants(&self, e: &Event) -> bool {
        e.severity >= self.min_severity
            && self.events.iter().any(|k| {
                k == "*"
                    || *k == e.kind
                    || k.strip_suffix(".*")
                        .is_some_and(|prefix| e.kind.starts_with(&format!("{prefix}.")))
            })
    }
}

/// An event about to be raised: severity, kind, gateway, item, text.
pub struct Raise {
    pub severity: Severity,
    pub kind: &'static str,
    pub gateway: Option<String>,
    pub item: Option<String>,
    pub text: String,
}

/// The deployment's events.
pub struct Events {
    next: Mutex<u64>,
    /// Conditions in force now, by (condition, subject), as kept in redb
    /// (`condition/<condition>/<subject>`, written with the event that raised it): a restart
    /// neither raises again what is in force nor forgets to clear it.
    active: Mutex<BTreeSet<(String, String)>>,
    counts: Mutex<BTreeMap<(String, Severity), u64>>,
    webhooks: Mutex<Vec<Webhook>>,
    deliveries: mpsc::SyncSender<(Webhook, Event)>,
}

impl Events {
    /// Continues the events kept in `state`.
    pub fn open(state: &StateDb) -> Result<Events> {
        let last = state
            .json_with_prefix::<Event>("event/")?
            .last()
            .map_or(0, |(_, e)| e.seq);
        let webhooks = state.get_json("webhooks")?.unwrap_or_default();
        let active = state
            .json_with_prefix::<(String, String)>("condition/")?
            .into_iter()
            .map(|(_, pair)| pair)
            .collect();
        let (tx, rx) = mpsc::sync_channel(WEBHOOK_QUEUE);
        std::thread::Builder::new()
            .name("webhooks".into())
            .spawn(move || deliver(rx))?;
        Ok(Events {
            next: Mutex::new(last + 1),
            active: Mutex::new(active),
            counts: Mutex::new(BTreeMap::new()),
            webhooks: Mutex::new(webhooks),
            deliveries: tx,
        })
    }

    /// The webhooks events are posted to from now on.
    pub fn set_webhooks(&self, webhooks: Vec<Webhook>) {
        *lock(&self.webhooks) = webhooks;
    }

    /// Raises `raise` when `on` and the condition `(condition, subject)` was not in force, and
    /// `clear` when not `on` and it was.
    pub fn condition(
        &self,
        state: &StateDb,
        condition: &str,
        subject: &str,
        on: bool,
        raise: impl FnOnce() -> Raise,
        clear: impl FnOnce() -> Raise,
    ) -> Result<()> {
        let pair = (condition.to_string(), subject.to_string());
        let changed = {
            let mut active = lock(&self.active);
            if on {
                active.insert(pair.clone())
            } else {
                active.remove(&pair)
            }
        };
        if !changed {
            return Ok(());
        }
        let stored = format!("condition/{condition}/{subject}");
        let result = match on {
            true => self.record(state, raise(), Some((stored, Some(&pair)))),
            false => self.record(state, clear(), Some((stored, None))),
        };
        if result.is_err() {
            // Not recorded: in force as before, so the next evaluation tries again.
            let mut active = lock(&self.active);
            if on {
                active.remove(&pair);
            } else {
                active.insert(pair);
            }
        }
        result.map(drop)
    }

    /// Records an event and posts it to the webhooks that want it.
    pub fn raise(&self, state: &StateDb, r: Raise) -> Result<Event> {
        self.record(state, r, None)
    }

    /// [`Events::raise`], and in the same transaction a condition put in force (`Some`) or
    /// ended (`None`).
    fn record(
        &self,
        state: &StateDb,
        r: Raise,
        condition: Option<(String, Option<&(String, String)>)>,
    ) -> Result<Event> {
        let event = {
            let mut next = lock(&self.next);
            let event = Event {
                seq: *next,
                time_ms: now_ms(),
                severity: r.severity,
                kind: r.kind.to_string(),
                gateway: r.gateway,
                item: r.item,
                text: r.text,
            };
            let mut removes = match event.seq.checked_sub(KEEP) {
                Some(old) if old > 0 => vec![key(old)],
                _ => Vec::new(),
            };
            let mut puts = vec![(key(event.seq), serde_json::to_value(&event)?)];
            match condition {
                Some((k, Some(pair))) => puts.push((k, serde_json::to_value(pair)?)),
                Some((k, None)) => removes.push(k),
                None => {}
            }
            state.update_json(&puts, &removes)?;
            *next += 1;
            event
        };
        tracing::info!(seq = event.seq, kind = %event.kind, severity = event.severity.name(),
            text = %event.text, "event");
        *lock(&self.counts)
            .entry((event.kind.clone(), event.severity))
            .or_default() += 1;
        for hook in lock(&self.webhooks).iter().filter(|h| h.wants(&event)) {
            if self
                .deliveries
                .try_send((hook.clone(), event.clone()))
                .is_err()
            {
                tracing::warn!(webhook = %hook.name, seq = event.seq,
                    "webhook queue full: event not posted");
            }
        }
        Ok(event)
    }

    /// Events after `since`, oldest first, at most `limit`; with `since` 0, the newest
    /// `limit` (oldest first).
    pub fn list(&self, state: &StateDb, since: u64, limit: usize) -> Result<Vec<Event>> {
        let events: Vec<Event> = state
            .json_with_prefix::<Event>("event/")?
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| e.seq > since)
            .collect();
        Ok(if since == 0 {
            let skip = events.len().saturating_sub(limit);
            events.into_iter().skip(skip).collect()
        } else {
            events.into_iter().take(limit).collect()
        })
    }

    /// Events raised since this server started, by kind and severity.
    pub fn counts(&self) -> BTreeMap<(String, Severity), u64> {
        lock(&self.counts).clone()
    }
}

fn key(seq: u64) -> String {
    format!("event/{seq:020}")
}

/// Posts each queued event to its webhook: a few attempts, 1 s then 2 s apart.
fn deliver(rx: mpsc::Receiver<(Webhook, Event)>) {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(true)
        // The configured URL and nothing else: a redirect is not followed.
        .max_redirects(0)
        .build()
        .new_agent();
    while let Ok((hook, event)) = rx.recv() {
        let body = match serde_json::to_vec(&event) {
            Ok(b) => b,
            Err(_) => continue,
        };
        for attempt in 1..=WEBHOOK_ATTEMPTS {
            let sent = agent
                .post(&hook.url)
                .header("Content-Type", "application/json")
                .header("User-Agent", concat!("haven/", env!("CARGO_PKG_VERSION")))
                .send(&body[..]);
            match sent {
                Ok(_) => break,
                Err(e) if attempt < WEBHOOK_ATTEMPTS => {
                    tracing::debug!(webhook = %hook.name, error = %e, attempt, "webhook: retrying");
                    std::thread::sleep(Duration::from_secs(u64::from(attempt)));
                }
                Err(e) => {
                    // The name, not the URL: webhook URLs often hold a secret.
                    tracing::warn!(webhook = %hook.name, seq = event.seq, error = %e,
                        "webhook: event not delivered")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raise(kind: &'static str) -> Raise {
        Raise {
            severity: Severity::Warning,
            kind,
            gateway: Some("ps1".into()),
            item: None,
            text: kind.into(),
        }
    }

    #[test]
    fn a_condition_in_force_survives_a_restart() {
        let dir = tempfile::tempdir().expect("a folder");
        let path = dir.path().join("state.redb");
        let kinds = |state: &StateDb, events: &Events| -> Vec<String> {
            let list = events.list(state, 0, 100).expect("events");
            list.into_iter().map(|e| e.kind).collect()
        };
        let cache_full = |state: &StateDb, events: &Events, on: bool| {
            events
                .condition(
                    state,
                    "cache.full",
                    "ps1",
                    on,
                    || raise("cache.full"),
                    || raise("cache.recovered"),
                )
                .expect("condition");
        };
        {
            let state = StateDb::open(&path).expect("state");
            let events = Events::open(&state).expect("events");
            cache_full(&state, &events, true);
            cache_full(&state, &events, true);
            assert_eq!(kinds(&state, &events), ["cache.full"]);
        }
        // Restarted: still in force (not raised again), and its end is recorded.
        let state = StateDb::open(&path).expect("state");
        let events = Events::open(&state).expect("events");
        cache_full(&state, &events, true);
        assert_eq!(kinds(&state, &events), ["cache.full"]);
        cache_full(&state, &events, false);
        assert_eq!(kinds(&state, &events), ["cache.full", "cache.recovered"]);
        drop(events);
        drop(state);
        let state = StateDb::open(&path).expect("state");
        let events = Events::open(&state).expect("events");
        assert!(lock(&events.active).is_empty());
    }
}
