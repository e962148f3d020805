//! The item's failover state machine: a pure [`transition`] function, and [`record`], the one
//! place a transition is recorded.
//!
//! ```text
//! protected ──failover──▶ failing-over ──image complete──▶ failed-over ──commit──▶ committed
//!                              │  ▲ (restart: materialisation starts again)
//!                              ▼  │ failover (retry)
//!                        failover-failed
//!
//! failed-over / committed ──reprotect──▶ reprotected
//! ```
//!
//! [`transition`] takes the item's state and an [`ItemEvent`] and returns the state after it,
//! or [`Refused`] (what the event needs, in the words the operator reads). It does no I/O and
//! reads no clock. Invariants it keeps:
//!
//! - a failover (planned or not) starts only from `protected` or `failover-failed`, and only
//!   materialising moves an item out of `failing-over`;
//! - `committed` is final but for a reprotect: only test-failover events (which change no
//!   state) and `reprotect` happen after it; `reprotected` is final;
//! - a test failover starts only on a protected item; the other test-failover events (served
//!   again or not after a restart, cleaned up) are history only, in any state: a test failover
//!   recorded before a failover is still served again or cleaned up after it.
//!
//! [`ItemRecord::after`] adds the transition to the record's history, also without I/O;
//! [`record`] is the I/O around it: it serialises recordings of one item, writes the new record
//! to redb and only then shows it in memory.

use haven_store::state::StateDb;
use serde::{Deserialize, Serialize};

use super::{ErrorKind, RecoveryError, err, internal, item_key};
use crate::ingest::lock;
use crate::master_target::Replica;
use crate::now_ms;

/// Where an item is in the failover state machine (module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ItemState {
    /// Replicating.
    #[default]
    Protected,
    /// A point is being materialised; replication is stopped.
    FailingOver,
    /// The image of the point is complete.
    FailedOver,
    /// The failover is final; the other points are gone.
    Committed,
    /// Materialising failed; `haven failover` may be retried.
    FailoverFailed,
    /// The machine replicates the other way now (`haven reprotect`): its failover image is the
    /// source of another item, at the other site.
    Reprotected,
}

impl ItemState {
    /// Every state, in the order of the module docs' diagram.
    pub const ALL: [ItemState; 6] = [
        ItemState::Protected,
        ItemState::FailingOver,
        ItemState::FailedOver,
        ItemState::Committed,
        ItemState::FailoverFailed,
        ItemState::Reprotected,
    ];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            ItemState::Protected => "protected",
            ItemState::FailingOver => "failing-over",
            ItemState::FailedOver => "failed-over",
            ItemState::Committed => "committed",
            ItemState::FailoverFailed => "failover-failed",
            ItemState::Reprotected => "reprotected",
        }
    }
}

/// What can happen to an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemEvent {
    /// `haven failover test` started presenting a point.
    TestFailoverStarted,
    /// A test failover a previous run recorded is served again after a restart.
    TestFailoverRestored,
    /// A test failover a previous run recorded could not be served again after a restart (it
    /// was cleaned up, or is kept with its writes).
    TestFailoverNotRestored,
    /// `haven failover cleanup` ended the test failover.
    TestFailoverCleanedUp,
    /// `haven failover`: an unplanned failover to a point the operator chose.
    FailoverStarted,
    /// `haven failover --planned`: the source stopped at its final point, the failover to it.
    PlannedFailover,
    /// A failover a stop cut short materialises its point again (at start).
    FailoverResumed,
    /// The point's image is complete.
    Materialised,
    /// Materialising the point failed.
    MaterialiseFailed,
    /// `haven failover commit`: the failover is final.
    Committed,
    /// `haven reprotect`: the failed-over machine replicates back to the other site.
    Reprotected,
    /// The item's stream replicates onto a seed (the disk the machine left): history only.
    Seeded,
}

impl ItemEvent {
    /// Every event.
    pub const ALL: [ItemEvent; 12] = [
        ItemEvent::TestFailoverStarted,
        ItemEvent::TestFailoverRestored,
        ItemEvent::TestFailoverNotRestored,
        ItemEvent::TestFailoverCleanedUp,
        ItemEvent::FailoverStarted,
        ItemEvent::PlannedFailover,
        ItemEvent::FailoverResumed,
        ItemEvent::Materialised,
        ItemEvent::MaterialiseFailed,
        ItemEvent::Committed,
        ItemEvent::Reprotected,
        ItemEvent::Seeded,
    ];
}

/// Why an event is refused: the item's state, and what the event needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The item's state.
    pub state: ItemState,
    /// What the event needs, as the operator reads it.
    pub why: &'static str,
}

impl Refused {
    /// The refusal as a request's error (a conflict), naming the item as the request did.
    pub fn into_error(self, item: &str) -> RecoveryError {
        err(
            ErrorKind::Conflict,
            format!("item {item} is {}: {}", self.state.name(), self.why),
        )
    }
}

/// The state `event` takes an item in `state` to, or why it is refused (module docs).
pub fn transition(state: ItemState, event: ItemEvent) -> Result<ItemState, Refused> {
    use ItemEvent as E;
    use ItemState as S;
    let refuse = |why| Err(Refused { state, why });
    match (event, state) {
        (E::TestFailoverStarted, S::Protected) => Ok(state),
        (E::TestFailoverStarted, _) => refuse("a test failover needs a protected item"),
        (
            E::TestFailoverRestored
            | E::TestFailoverNotRestored
            | E::TestFailoverCleanedUp
            | E::Seeded,
            _,
        ) => Ok(state),
        (E::FailoverStarted | E::PlannedFailover, S::Protected | S::FailoverFailed) => {
            Ok(S::FailingOver)
        }
        (E::FailoverStarted | E::PlannedFailover, _) => {
            refuse("it can fail over only when protected (or after a failed failover)")
        }
        (E::FailoverResumed, S::FailingOver) => Ok(S::FailingOver),
        (E::FailoverResumed, _) => refuse("only a failover a restart cut short is resumed"),
        (E::Materialised, S::FailingOver) => Ok(S::FailedOver),
        (E::MaterialiseFailed, S::FailingOver) => Ok(S::FailoverFailed),
        (E::Materialised | E::MaterialiseFailed, _) => {
            refuse("only a failing-over item's image is being made")
        }
        (E::Committed, S::FailedOver) => Ok(S::Committed),
        (E::Committed, _) => refuse("only a failed-over item can be committed"),
        (E::Reprotected, S::FailedOver | S::Committed) => Ok(S::Reprotected),
        (E::Reprotected, _) => refuse("only a failed-over item can be reprotected"),
    }
}

/// One recorded transition or event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Transition {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// State before.
    pub from: ItemState,
    /// State after (equal to `from` for an event such as a test failover).
    pub to: ItemState,
    /// Why.
    pub cause: String,
}

/// What the master target keeps about an item's failover.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ItemRecord {
    /// Current state.
    pub state: ItemState,
    /// The point failed over to.
    #[serde(default)]
    pub point: Option<super::PointRecord>,
    /// The failover image, below the writer's storage root.
    #[serde(default)]
    pub image: Option<String>,
    /// Whether the failover was planned.
    #[serde(default)]
    pub planned: bool,
    /// The failover wrote the point into the replica itself (a failback onto the disk the
    /// machine left), not into a new image.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_place: bool,
    /// Reprotected: where the machine replicates to now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprotected_to: Option<String>,
    /// Every transition, oldest first.
    #[serde(default)]
    pub history: Vec<Transition>,
}

impl ItemRecord {
    /// The record after `event` at `at_ms` for `cause`: the new state, the transition at the end
    /// of the history; the rest as it was. No I/O.
    pub fn after(
        &self,
        event: ItemEvent,
        at_ms: u64,
        cause: String,
    ) -> Result<ItemRecord, Refused> {
        let to = transition(self.state, event)?;
        let mut next = self.clone();
        next.history.push(Transition {
            at_ms,
            from: self.state,
            to,
            cause,
        });
        next.state = to;
        Ok(next)
    }
}

/// Records `event` on `r`'s item (named `item` in a refusal): [`ItemRecord::after`] decides,
/// `f` fills in what the event brings (the point, the image), redb keeps the new record and only
/// then is it shown in memory.
///
/// Recordings of one item are serialised by `ReplicaRecovery::recording`, so each starts from
/// the one before; the replica's state lock is taken only to read and to publish, never across
/// the write. The caller must not hold it.
pub(crate) fn record(
    db: &StateDb,
    r: &Replica,
    item: &str,
    event: ItemEvent,
    cause: impl Into<String>,
    f: impl FnOnce(&mut ItemRecord),
) -> Result<ItemRecord, RecoveryError> {
    let _recording = lock(&r.recovery.recording);
    let current = lock(&r.recovery.state).item.clone();
    let cause = cause.into();
    let mut next = current
        .after(event, now_ms(), cause.clone())
        .map_err(|e| e.into_error(item))?;
    tracing::info!(
        item = %r.stream.key,
        from = current.state.name(),
        to = next.state.name(),
        %cause,
        "item transition"
    );
    f(&mut next);
    db.put_json(&item_key(r.stream.key), &next)
        .map_err(internal)?;
    lock(&r.recovery.state).item = next.clone();
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ItemEvent as E;
    use ItemState as S;

    /// Every allowed move, `(event, from, to)`; everything else is refused.
    const ALLOWED: &[(ItemEvent, ItemState, ItemState)] = &[
        (E::TestFailoverStarted, S::Protected, S::Protected),
        (E::FailoverStarted, S::Protected, S::FailingOver),
        (E::FailoverStarted, S::FailoverFailed, S::FailingOver),
        (E::PlannedFailover, S::Protected, S::FailingOver),
        (E::PlannedFailover, S::FailoverFailed, S::FailingOver),
        (E::FailoverResumed, S::FailingOver, S::FailingOver),
        (E::Materialised, S::FailingOver, S::FailedOver),
        (E::MaterialiseFailed, S::FailingOver, S::FailoverFailed),
        (E::Committed, S::FailedOver, S::Committed),
        (E::Reprotected, S::FailedOver, S::Reprotected),
        (E::Reprotected, S::Committed, S::Reprotected),
    ];

    /// Events that are history only: allowed in every state, which they leave as it is.
    const HISTORY_ONLY: [ItemEvent; 4] = [
        E::TestFailoverRestored,
        E::TestFailoverNotRestored,
        E::TestFailoverCleanedUp,
        E::Seeded,
    ];

    /// The refusal every other move gives, as the request's error for item `web01`: the
    /// messages requests gave before the machine was a function (the resume and materialise
    /// refusals are new: no caller fires those events outside `failing-over`).
    fn refusal(event: ItemEvent, state: ItemState) -> RecoveryError {
        let why = match event {
            E::TestFailoverStarted => "a test failover needs a protected item",
            E::FailoverStarted | E::PlannedFailover => {
                "it can fail over only when protected (or after a failed failover)"
            }
            E::FailoverResumed => "only a failover a restart cut short is resumed",
            E::Materialised | E::MaterialiseFailed => {
                "only a failing-over item's image is being made"
            }
            E::Committed => "only a failed-over item can be committed",
            E::Reprotected => "only a failed-over item can be reprotected",
            E::TestFailoverRestored
            | E::TestFailoverNotRestored
            | E::TestFailoverCleanedUp
            | E::Seeded => {
                unreachable!("{event:?} is never refused")
            }
        };
        RecoveryError {
            kind: ErrorKind::Conflict,
            message: format!("item web01 is {}: {why}", state.name()),
        }
    }

    #[test]
    fn every_event_in_every_state() {
        for event in ItemEvent::ALL {
            for state in ItemState::ALL {
                let got = transition(state, event);
                let allowed = ALLOWED
                    .iter()
                    .find(|(e, from, _)| *e == event && *from == state)
                    .map(|(_, _, to)| *to)
                    .or(HISTORY_ONLY.contains(&event).then_some(state));
                match allowed {
                    Some(to) => assert_eq!(got, Ok(to), "{event:?} in {state:?}"),
                    None => {
                        let refused = got.expect_err(&format!("{event:?} in {state:?}"));
                        assert_eq!(refused.state, state);
                        assert_eq!(
                            refused.into_error("web01"),
                            refusal(event, state),
                            "{event:?} in {state:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn refusals_read_as_before() {
        let e = |event, state| transition(state, event).unwrap_err().into_error("web01");
        assert_eq!(
            e(E::Committed, S::Protected).message,
            "item web01 is protected: only a failed-over item can be committed"
        );
        assert_eq!(
            e(E::FailoverStarted, S::FailedOver).message,
            "item web01 is failed-over: it can fail over only when protected (or after a failed \
             failover)"
        );
        assert_eq!(
            e(E::PlannedFailover, S::Committed).message,
            "item web01 is committed: it can fail over only when protected (or after a failed \
             failover)"
        );
        assert_eq!(
            e(E::TestFailoverStarted, S::FailingOver).message,
            "item web01 is failing-over: a test failover needs a protected item"
        );
        assert_eq!(e(E::Committed, S::Committed).kind, ErrorKind::Conflict);
    }

    #[test]
    fn committed_is_final_but_for_a_reprotect() {
        for event in ItemEvent::ALL {
            if let Ok(to) = transition(S::Committed, event) {
                if event == E::Reprotected {
                    assert_eq!(to, S::Reprotected);
                    continue;
                }
                assert_eq!(to, S::Committed, "{event:?}");
                assert!(HISTORY_ONLY.contains(&event), "{event:?}");
            }
        }
    }

    #[test]
    fn the_whole_path_and_a_retry() {
        let mut state = S::Protected;
        for event in [
            E::TestFailoverStarted,
            E::TestFailoverCleanedUp,
            E::FailoverStarted,
            E::MaterialiseFailed,
            E::PlannedFailover,
            E::FailoverResumed,
            E::Materialised,
            E::Committed,
            E::TestFailoverNotRestored,
        ] {
            state = transition(state, event).unwrap_or_else(|r| panic!("{event:?}: {r:?}"));
        }
        assert_eq!(state, S::Committed);
    }

    #[test]
    fn after_appends_the_transition_and_keeps_the_rest() {
        let item = ItemRecord {
            image: Some("failover/x/disk0-point1.raw".into()),
            planned: true,
            ..ItemRecord::default()
        };
        let next = item
            .after(
                E::FailoverStarted,
                42,
                "failover to point 7 requested".into(),
            )
            .unwrap();
        assert_eq!(next.state, S::FailingOver);
        assert_eq!(
            next.history,
            vec![Transition {
                at_ms: 42,
                from: S::Protected,
                to: S::FailingOver,
                cause: "failover to point 7 requested".into(),
            }]
        );
        assert_eq!((next.image, next.planned), (item.image.clone(), true));
        // A test failover event is history only.
        let again = item
            .after(E::TestFailoverStarted, 43, "test".into())
            .unwrap();
        assert_eq!(again.state, S::Protected);
        assert_eq!(again.history.len(), 1);
        // A refused event changes nothing.
        assert_eq!(
            item.after(E::Committed, 44, "commit".into()),
            Err(Refused {
                state: S::Protected,
                why: "only a failed-over item can be committed"
            })
        );
    }
}
