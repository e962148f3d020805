//! Which recovery points the master target keeps: a retention policy and the pure function
//! [`keep`] that applies it.
//!
//! No clock is read and nothing is stored here: `now_ms` is a parameter and the answer is a set
//! of ids, so the policy is tested with simulated time.
//!
//! A policy is a window and tiers, youngest first (the default, as TOML):
//!
//! ```toml
//! window = "72h"
//! tiers = [
//!     { for_last = "2h", every = "0s" },  # the last 2 h: every point
//!     { for_last = "24h", every = "1h" }, # 2 h to 24 h: one per hour
//!     { for_last = "72h", every = "4h" }, # 24 h to 72 h: one per 4 h
//! ]
//! prefer_app_consistent = true
//! ```
//!
//! The rules, for a point's age `now_ms - time_ms`:
//!
//! - a point whose time is after `now_ms` (clock skew between the sites) has age 0;
//! - a point whose age is `window` or more is dropped;
//! - a point's tier is the first tier whose `for_last` is greater than its age (ages in
//!   `[previous for_last, for_last)`); a point older than the last tier but within the window
//!   belongs to the last tier (one per bucket of its `every`); with no tiers at all, every point
//!   within the window is kept;
//! - in a tier with `every = 0` every point is kept. Otherwise time is cut into buckets of
//!   length `every` aligned to the Unix epoch (`bucket = time_ms / every_ms`) and the point is
//!   kept if it is the bucket's choice: the newest app-consistent point of the bucket when
//!   `prefer_app_consistent` and the bucket has one, else the newest group point of the bucket
//!   when it has one (a point every machine of a group holds: the members, under one policy,
//!   keep the same one), else the newest point of the bucket (equal times: the higher id). The choice is made among *all* the bucket's points, whatever their
//!   own tier: where a bucket straddles a tier boundary, the part in the older tier keeps
//!   nothing when the choice lies in the younger part, so a bucket never has two
//!   representatives;
//! - the newest point (latest time, then highest id) is always kept if it is within the window
//!   (a point outside the window is never kept, not even the newest);
//! - the answer depends only on the policy, the set of points and `now_ms`, not on their order.
//!
//! Stability. Buckets are aligned to the epoch, not to `now`, so as time passes a bucket's
//! choice stays the same: once its bucket has ended (points arrive in time order, so no later
//! point falls into it), a kept point stays kept until it moves into a coarser tier, where it
//! competes in a larger bucket, or out of the window. A dropped point is never kept again.
//! [`RetentionPolicy::validate`] requires what makes this hold: each tier's `every` is a whole
//! multiple of the finer tiers' (buckets nest) and no longer than the tier's span (a bucket
//! never spans a whole tier). Then feeding [`keep`] only the points it kept last time plus the
//! new ones, as the master target does since dropped points are gone, gives exactly what
//! [`keep`] over the whole history would.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long recovery points are kept and how they are thinned out with age.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Points this old or older are dropped (default `"72h"`).
    #[serde(default = "default_window", with = "duration_str")]
    pub window: Duration,
    /// Tiers, youngest first: points younger than a tier's `for_last` (and not younger than the
    /// previous tier's) are kept at most one per `every`. Default: every point for 2 h, one per
    /// hour to 24 h, one per 4 h to 72 h.
    #[serde(default = "default_tiers")]
    pub tiers: Vec<Tier>,
    /// Whether a bucket keeps its newest app-consistent point rather than its newest point
    /// (default true).
    #[serde(default = "default_prefer_app_consistent")]
    pub prefer_app_consistent: bool,
}

/// One tier of a [`RetentionPolicy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// The tier holds points younger than this (and not younger than the previous tier's).
    #[serde(with = "duration_str")]
    pub for_last: Duration,
    /// At most one point is kept per bucket of this length; `"0s"` (the default) keeps all.
    #[serde(default, with = "duration_str")]
    pub every: Duration,
}

/// A recovery point as retention sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointAge {
    /// The recovery point's id.
    pub id: u64,
    /// When the point was taken, on the source side, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Whether the point is application-consistent (else crash-consistent).
    pub app: bool,
    /// Whether it is a group point (one every machine of its group holds).
    pub group: bool,
}

fn default_window() -> Duration {
    Duration::from_secs(72 * 3600)
}

fn default_tiers() -> Vec<Tier> {
    let h = |n: u64| Duration::from_secs(n * 3600);
    vec![
        Tier {
            for_last: h(2),
            every: Duration::ZERO,
        },
        Tier {
            for_last: h(24),
            every: h(1),
        },
        Tier {
            for_last: h(72),
            every: h(4),
        },
    ]
}

fn default_prefer_app_consistent() -> bool {
    true
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            window: default_window(),
            tiers: default_tiers(),
            prefer_app_consistent: default_prefer_app_consistent(),
        }
    }
}

impl RetentionPolicy {
    /// Checks the policy; every problem is reported, one per line, each naming its field. A
    /// window of 0 is valid: it keeps no point (the master target's replica then follows the
    /// stream).
    pub fn validate(&self) -> Result<(), String> {
        let f = format_duration;
        let mut errors = Vec::new();
        if self.window.is_zero() {
            // No points are kept at all; the tiers do not matter.
            return Ok(());
        }
        // The latest tier with a non-zero `every`: later tiers must be whole multiples of it.
        let mut finer: Option<(usize, Duration)> = None;
        for (i, tier) in self.tiers.iter().enumerate() {
            let previous = if i == 0 {
                Duration::ZERO
            } else {
                self.tiers[i - 1].for_last
            };
            if i == 0 && tier.for_last.is_zero() {
                errors.push("tiers[0].for_last must be greater than 0".to_string());
            } else if tier.for_last <= previous {
                errors.push(format!(
                    "tiers[{i}].for_last ({}) must be greater than tiers[{}].for_last ({}): \
                     list tiers youngest first, in increasing for_last",
                    f(tier.for_last),
                    i - 1,
                    f(previous)
                ));
            }
            if tier.every >= tier.for_last && !tier.for_last.is_zero() {
                errors.push(format!(
                    "tiers[{i}].every ({}) must be less than tiers[{i}].for_last ({})",
                    f(tier.every),
                    f(tier.for_last)
                ));
            } else if i > 0 && tier.for_last > previous && tier.every > tier.for_last - previous {
                errors.push(format!(
                    "tiers[{i}].every ({}) must be at most the tier's span, from tiers[{}].for_last \
                     to tiers[{i}].for_last ({}), so that no bucket spans the whole tier",
                    f(tier.every),
                    i - 1,
                    f(tier.for_last - previous)
                ));
            }
            match finer {
                Some((j, e)) if tier.every.is_zero() => errors.push(format!(
                    "tiers[{i}].every is 0 (keep every point) but tiers[{j}].every is {}: \
                     tiers must thin points out with age, never keep more",
                    f(e)
                )),
                Some((j, e)) if !tier.every.as_nanos().is_multiple_of(e.as_nanos()) => {
                    errors.push(format!(
                        "tiers[{i}].every ({}) must be a whole multiple of tiers[{j}].every ({}) \
                         so that each bucket lies within one bucket of the older tier",
                        f(tier.every),
                        f(e)
                    ))
                }
                _ => {}
            }
            if !tier.every.is_zero() {
                finer = Some((i, tier.every));
            }
        }
        if let Some(last) = self.tiers.last()
            && !self.window.is_zero()
            && self.window < last.for_last
        {
            errors.push(format!(
                "window ({}) must be at least the last tier's for_last, tiers[{}].for_last ({})",
                f(self.window),
                self.tiers.len() - 1,
                f(last.for_last)
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The ids of the points to keep, given all points (in any order) and `now_ms`; see the module
/// documentation for the rules. Durations count in whole milliseconds.
pub fn keep(policy: &RetentionPolicy, points: &[PointAge], now_ms: u64) -> BTreeSet<u64> {
    let window_ms = millis(policy.window);
    let in_window = |p: &PointAge| now_ms.saturating_sub(p.time_ms) < window_ms;
    // The order of preference within a bucket: the greatest is kept.
    let rank = |p: &PointAge| {
        (
            policy.prefer_app_consistent && p.app,
            p.group,
            p.time_ms,
            p.id,
        )
    };
    let every_ms: Vec<u64> = policy.tiers.iter().map(|t| millis(t.every)).collect();
    let for_last_ms: Vec<u64> = policy.tiers.iter().map(|t| millis(t.for_last)).collect();

    // Each thinned tier's choice per bucket, among all the bucket's points.
    let choices: Vec<HashMap<u64, (bool, bool, u64, u64)>> = every_ms
        .iter()
        .map(|&every| {
            let mut choice = HashMap::new();
            for p in points {
                // `every` = 0: no buckets, every point is kept.
                let Some(bucket) = p.time_ms.checked_div(every) else {
                    break;
                };
                let r = rank(p);
                choice
                    .entry(bucket)
                    .and_modify(|c: &mut (bool, bool, u64, u64)| *c = (*c).max(r))
                    .or_insert(r);
            }
            choice
        })
        .collect();

    let mut kept: BTreeSet<u64> = points
        .iter()
        .filter(|p| in_window(p))
        .filter(|p| {
            let age = now_ms.saturating_sub(p.time_ms);
            let Some(last) = policy.tiers.len().checked_sub(1) else {
                return true;
            };
            let tier = for_last_ms.iter().position(|&f| age < f).unwrap_or(last);
            let every = every_ms[tier];
            every == 0 || choices[tier].get(&(p.time_ms / every)) == Some(&rank(p))
        })
        .map(|p| p.id)
        .collect();
    if let Some(newest) = points.iter().max_by_key(|p| (p.time_ms, p.id))
        && in_window(newest)
    {
        kept.insert(newest.id);
    }
    kept
}

/// Units of a duration string, largest first, in nanoseconds.
const UNITS: [(&str, u128); 7] = [
    ("d", 86_400_000_000_000),
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Parses a duration written as a whole number and a unit: `"72h"`, `"30m"`, `"45s"`, `"2d"`,
/// `"500ms"` (also `us`, `ns`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    if s.is_empty() {
        return Err("empty duration: write a number and a unit, e.g. \"72h\"".to_string());
    }
    if number.is_empty() {
        return Err(format!(
            "duration \"{s}\": expected a whole number before the unit, e.g. \"72h\""
        ));
    }
    if unit.is_empty() {
        return Err(format!(
            "duration \"{s}\": missing unit; write e.g. \"{number}s\" (units: d, h, m, s, ms, us, ns)"
        ));
    }
    let Some(&(_, nanos)) = UNITS.iter().find(|(u, _)| *u == unit) else {
        return Err(format!(
            "duration \"{s}\": unknown unit \"{unit}\"; use d, h, m, s, ms, us or ns"
        ));
    };
    let total = number
        .parse::<u128>()
        .ok()
        .and_then(|n| n.checked_mul(nanos))
        .filter(|&n| n <= Duration::MAX.as_nanos())
        .ok_or_else(|| format!("duration \"{s}\" is too large"))?;
    let secs = (total / 1_000_000_000) as u64;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Writes a duration as [`parse_duration`] reads it, in the largest of h, m, s, ms, us and ns
/// that divides it (`"72h"`, `"90m"`, `"1500ms"`; zero is `"0s"`).
pub fn format_duration(d: Duration) -> String {
    let total = d.as_nanos();
    if total == 0 {
        return "0s".to_string();
    }
    let (unit, nanos) = UNITS[1..]
        .iter()
        .find(|(_, n)| total.is_multiple_of(*n))
        .copied()
        .unwrap_or(("ns", 1));
    format!("{}{unit}", total / nanos)
}

/// Serde for a [`Duration`] written as a string (`#[serde(with = "duration_str")]`).
pub mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the duration with [`super::format_duration`].
    pub fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_duration(*d))
    }

    /// Reads the duration with [`super::parse_duration`].
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(deserializer)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000;
    const M: u64 = 60 * S;
    const H: u64 = 60 * M;

    fn dur(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn tier(for_last: u64, every: u64) -> Tier {
        Tier {
            for_last: dur(for_last),
            every: dur(every),
        }
    }

    fn point(id: u64, time_ms: u64, app: bool) -> PointAge {
        PointAge {
            id,
            time_ms,
            app,
            group: false,
        }
    }

    fn ids(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    /// Points every 5 s for 80 h, crash-consistent, with the default policy: the kept set is
    /// computed here bucket by bucket, by arithmetic on the 5 s grid.
    #[test]
    fn a_simulated_span_keeps_the_default_tiers() {
        let step = 5 * S;
        // Not aligned to the hour, so buckets straddle the tier boundaries.
        let t0 = 1_700_000_000_000 + 1_234;
        let n = 80 * H / step;
        let points: Vec<PointAge> = (0..n).map(|i| point(i, t0 + i * step, false)).collect();
        let now = t0 + (n - 1) * step + 2_500;
        let kept = keep(&RetentionPolicy::default(), &points, now);

        let time = |i: u64| t0 + i * step;
        let age = |i: u64| now - time(i);
        // The newest point of the bucket [start, start + len), if the bucket has any.
        let newest_in = |start: u64, len: u64| -> Option<u64> {
            let end = start + len; // exclusive
            let last = (end - t0).div_ceil(step).checked_sub(1)?.min(n - 1);
            (time(last) >= start).then_some(last)
        };
        let mut expected = BTreeSet::new();
        // Every point of the last 2 h.
        expected.extend((0..n).filter(|&i| age(i) < 2 * H));
        // The newest of each hour bucket if it is 2 h to 24 h old; of each 4 h bucket if it is
        // 24 h to 72 h old. (A bucket straddling a boundary has its newest point on the younger
        // side, where it is kept, and nothing on the older side.)
        for (len, from, to) in [(H, 2 * H, 24 * H), (4 * H, 24 * H, 72 * H)] {
            for b in (now - 80 * H) / len..=now / len {
                if let Some(i) = newest_in(b * len, len)
                    && (from..to).contains(&age(i))
                {
                    expected.insert(i);
                }
            }
        }
        assert_eq!(kept, expected);

        // The same, as counts: 1440 points in the last 2 h, exactly one point (the newest) per
        // hour bucket from 2 h to 24 h and per 4 h bucket from 24 h to 72 h, nothing older.
        assert_eq!(kept.iter().filter(|&&i| age(i) < 2 * H).count(), 1440);
        assert!(kept.iter().all(|&i| age(i) < 72 * H));
        for (len, from, to) in [(H, 2 * H, 24 * H), (4 * H, 24 * H, 72 * H)] {
            // Buckets wholly within the tier.
            let first = (now - to) / len + 1;
            let last = (now - from) / len - 1;
            assert!(last - first + 2 >= (to - from) / len);
            for b in first..=last {
                let in_bucket: Vec<u64> = kept
                    .iter()
                    .copied()
                    .filter(|&i| time(i) / len == b)
                    .collect();
                assert_eq!(in_bucket, vec![newest_in(b * len, len).unwrap()]);
            }
        }
        assert_eq!(
            kept.len(),
            1440 + expected.iter().filter(|&&i| age(i) >= 2 * H).count()
        );
    }

    /// The tier a point of age `age` belongs to, by a linear scan (the test's own helper).
    fn tier_of(policy: &RetentionPolicy, age: u64) -> Option<usize> {
        if age >= millis(policy.window) {
            return None;
        }
        let mut i = 0;
        while i + 1 < policy.tiers.len() && age >= millis(policy.tiers[i].for_last) {
            i += 1;
        }
        Some(i)
    }

    /// Advances simulated time 5 s at a time, one new point per step, feeding `keep` only what it
    /// kept the step before plus the new point, as the master target does, and compares each
    /// step with `keep` over the whole history.
    fn run_incrementally(policy: &RetentionPolicy, steps: u64, app_every: u64) {
        policy.validate().unwrap();
        let step = 5 * S;
        let t0 = 1_700_000_000_000 + 777;
        let mut history: Vec<PointAge> = Vec::new();
        let mut live: Vec<PointAge> = Vec::new();
        let mut dropped: BTreeSet<u64> = BTreeSet::new();
        let mut previous: BTreeSet<u64> = BTreeSet::new();
        let mut seed: u64 = 0x5eed;
        for s in 0..steps {
            let now = t0 + s * step;
            // A deterministic pseudo-random mix of app- and crash-consistent points.
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let app = app_every > 0 && (seed >> 33).is_multiple_of(app_every);
            let new = point(s, now, app);
            history.push(new);
            live.push(new);

            let kept = keep(policy, &live, now);
            let full = keep(policy, &history, now);
            // Exact equality: the policy is valid and points arrive in time order.
            assert_eq!(kept, full, "step {s}");
            assert!(kept.is_subset(&live.iter().map(|p| p.id).collect()));
            // A point once dropped is never kept again, even given the whole history.
            assert!(
                full.is_disjoint(&dropped),
                "step {s}: a dropped point came back"
            );

            // A kept point is dropped only when it moved to a coarser tier or out of the window,
            // when the new point fell into its (still open) bucket, or when it was kept only as
            // the newest point.
            for &id in previous.difference(&kept) {
                let p = history[id as usize];
                let before = tier_of(policy, now - step - p.time_ms);
                let after = tier_of(policy, now - p.time_ms);
                let moved = before != after;
                let every = before.map_or(0, |t| millis(policy.tiers[t].every));
                let open = every > 0 && new.time_ms / every == p.time_ms / every;
                let was_newest = id + 1 == s;
                assert!(
                    moved || open || was_newest,
                    "step {s}: point {id} dropped while staying in tier {before:?}"
                );
            }

            dropped.extend(live.iter().map(|p| p.id).filter(|id| !kept.contains(id)));
            live.retain(|p| kept.contains(&p.id));
            previous = kept;
        }
    }

    fn small_policy(prefer_app_consistent: bool) -> RetentionPolicy {
        RetentionPolicy {
            window: dur(30 * M),
            tiers: vec![tier(2 * M, 0), tier(10 * M, M), tier(25 * M, 5 * M)],
            prefer_app_consistent,
        }
    }

    #[test]
    fn feeding_back_what_was_kept_matches_the_whole_history() {
        // An hour of 5 s steps through a 30 min window scaled down from the default (with a
        // 25 min to 30 min tail): every point goes through each tier and out of the window.
        run_incrementally(&small_policy(true), 720, 4);
        run_incrementally(&small_policy(false), 720, 4);
        run_incrementally(&small_policy(true), 720, 0);
    }

    #[test]
    fn feeding_back_what_was_kept_matches_the_whole_history_with_the_default_policy() {
        // 80 h of points every 5 s; to keep the test quick, `keep` runs once a simulated minute
        // (on the 12 new points and what it kept the minute before) and is compared with the
        // whole history once an hour and at the end.
        let policy = RetentionPolicy::default();
        let step = 5 * S;
        let t0 = 1_700_000_000_000 + 777;
        let steps = 80 * H / step;
        let mut history: Vec<PointAge> = Vec::new();
        let mut live: Vec<PointAge> = Vec::new();
        let mut dropped: BTreeSet<u64> = BTreeSet::new();
        for s in 0..steps {
            let now = t0 + s * step;
            let new = point(s, now, s % 50 == 7);
            history.push(new);
            live.push(new);
            if !s.is_multiple_of(M / step) && s + 1 != steps {
                continue;
            }
            let kept = keep(&policy, &live, now);
            assert!(kept.is_disjoint(&dropped));
            dropped.extend(live.iter().map(|p| p.id).filter(|id| !kept.contains(id)));
            live.retain(|p| kept.contains(&p.id));
            if s.is_multiple_of(H / step) || s + 1 == steps {
                let full = keep(&policy, &history, now);
                assert_eq!(kept, full, "step {s}");
                assert!(full.is_disjoint(&dropped));
            }
        }
    }

    #[test]
    fn app_consistent_points_are_preferred() {
        let now = 100 * H + 30 * M;
        let b = 95 * H; // an hour bucket 4.5 h to 5.5 h old
        let points = [
            point(1, b + 10 * M, false),
            point(2, b + 20 * M, true),
            point(3, b + 30 * M, true),
            point(4, b + 50 * M, false),
            point(5, now - M, false),
            point(6, now - 2 * M, true),
        ];
        let policy = RetentionPolicy::default();
        assert_eq!(keep(&policy, &points, now), ids(&[3, 5, 6]));
        let newest_only = RetentionPolicy {
            prefer_app_consistent: false,
            ..policy
        };
        assert_eq!(keep(&newest_only, &points, now), ids(&[4, 5, 6]));

        // The newest point is kept even when its bucket keeps an app-consistent one.
        let thinned = RetentionPolicy {
            window: dur(H),
            tiers: vec![tier(H, 10 * M)],
            prefer_app_consistent: true,
        };
        let now = 10 * H + 9 * M;
        let points = [
            point(1, 10 * H + M, false),
            point(2, 10 * H + 2 * M, true),
            point(3, 10 * H + 8 * M, false),
        ];
        assert_eq!(keep(&thinned, &points, now), ids(&[2, 3]));
        // Outside the window not even the newest point is kept.
        assert_eq!(keep(&thinned, &points, 12 * H), ids(&[]));
    }

    #[test]
    fn group_points_are_preferred_to_a_machines_own() {
        let policy = RetentionPolicy {
            window: dur(10 * H),
            tiers: vec![tier(10 * H, H)],
            prefer_app_consistent: true,
        };
        let now = 5 * H;
        let own = |id, t| point(id, t, false);
        let group = |id, t| PointAge {
            group: true,
            ..point(id, t, false)
        };
        // An hour bucket: its group point stays, not the machine's newer own point; an
        // app-consistent point still comes first; the newest point of all stays too.
        let points = [group(1, H + M), own(2, H + 2 * M), own(3, 2 * H + M)];
        assert_eq!(keep(&policy, &points, now), ids(&[1, 3]));
        let points = [
            group(1, H + M),
            point(2, H + 2 * M, true),
            own(3, 2 * H + M),
        ];
        assert_eq!(keep(&policy, &points, now), ids(&[2, 3]));
    }

    #[test]
    fn future_points_have_age_zero() {
        let policy = RetentionPolicy {
            window: dur(H),
            tiers: vec![tier(H, 10 * M)],
            prefer_app_consistent: true,
        };
        let now = 10 * H;
        let points = [
            point(1, now - 5 * M, true),
            point(2, now - 4 * M, false),
            point(3, now + 3 * M, false),
            point(4, now + 2 * H, false),
            point(5, now - 61 * M, true),
        ];
        // 3 and 4 are in the youngest tier, each alone in its (future) bucket; 1 is the choice of
        // the bucket before now; 5 is out of the window.
        assert_eq!(keep(&policy, &points, now), ids(&[1, 3, 4]));

        let all_for_2h = RetentionPolicy::default();
        assert_eq!(
            keep(&all_for_2h, &[point(7, now + 100 * H, false)], now),
            ids(&[7])
        );
    }

    #[test]
    fn keep_ignores_the_order_of_points() {
        let points: Vec<PointAge> = (0..500)
            .map(|i| point(i, i * 7 * M + (i * 13 % 5) * S, i.is_multiple_of(3)))
            .collect();
        let now = 500 * 7 * M;
        let policy = RetentionPolicy::default();
        let forward = keep(&policy, &points, now);
        let mut reversed = points.clone();
        reversed.reverse();
        assert_eq!(keep(&policy, &reversed, now), forward);
    }

    #[test]
    fn no_tiers_keeps_everything_in_the_window() {
        let policy = RetentionPolicy {
            window: dur(H),
            tiers: vec![],
            prefer_app_consistent: true,
        };
        policy.validate().unwrap();
        let points = [
            point(1, 0, false),
            point(2, H, false),
            point(3, 2 * H, true),
        ];
        assert_eq!(keep(&policy, &points, 2 * H), ids(&[3]));
        assert_eq!(keep(&policy, &points, 2 * H - 1), ids(&[2, 3]));
    }

    #[test]
    fn validate_names_each_field() {
        assert_eq!(RetentionPolicy::default().validate(), Ok(()));

        let bad = |window: u64, tiers: Vec<Tier>| {
            RetentionPolicy {
                window: dur(window),
                tiers,
                prefer_app_consistent: true,
            }
            .validate()
            .unwrap_err()
        };
        // A window of 0 keeps nothing, whatever the tiers say.
        let none = RetentionPolicy {
            window: Duration::ZERO,
            tiers: vec![tier(24 * H, H), tier(2 * H, 0)],
            prefer_app_consistent: true,
        };
        assert_eq!(none.validate(), Ok(()));

        let e = bad(72 * H, vec![tier(24 * H, H), tier(2 * H, 0)]);
        assert!(
            e.contains("tiers[1].for_last (2h) must be greater than tiers[0].for_last (24h)"),
            "{e}"
        );

        let e = bad(72 * H, vec![tier(2 * H, 2 * H)]);
        assert!(
            e.contains("tiers[0].every (2h) must be less than tiers[0].for_last (2h)"),
            "{e}"
        );

        let e = bad(24 * H, vec![tier(2 * H, 0), tier(72 * H, 4 * H)]);
        assert!(
            e.contains(
                "window (24h) must be at least the last tier's for_last, tiers[1].for_last (72h)"
            ),
            "{e}"
        );

        let e = bad(72 * H, vec![tier(0, 0)]);
        assert!(
            e.contains("tiers[0].for_last must be greater than 0"),
            "{e}"
        );

        let e = bad(72 * H, vec![tier(24 * H, H), tier(72 * H, 90 * M)]);
        assert!(
            e.contains("tiers[1].every (90m) must be a whole multiple of tiers[0].every (1h)"),
            "{e}"
        );

        let e = bad(72 * H, vec![tier(24 * H, H), tier(72 * H, 0)]);
        assert!(
            e.contains("tiers[1].every is 0 (keep every point) but tiers[0].every is 1h"),
            "{e}"
        );

        let e = bad(72 * H, vec![tier(2 * H, 0), tier(3 * H, 2 * H)]);
        assert!(
            e.contains("tiers[1].every (2h) must be at most the tier's span"),
            "{e}"
        );

        // Every problem at once, one per line.
        let e = bad(H, vec![tier(24 * H, 24 * H), tier(2 * H, 0)]);
        assert_eq!(e.lines().count(), 4, "{e}");
    }

    #[test]
    fn durations_round_trip() {
        for (s, d) in [
            ("72h", dur(72 * H)),
            ("30m", dur(30 * M)),
            ("45s", dur(45 * S)),
            ("0s", Duration::ZERO),
            ("1500ms", dur(1_500)),
            ("90m", dur(90 * M)),
            ("7ns", Duration::from_nanos(7)),
            ("3us", Duration::from_micros(3)),
        ] {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
            assert_eq!(format_duration(d), s);
        }
        // Days are read, and written as hours.
        assert_eq!(parse_duration("2d"), Ok(dur(48 * H)));
        assert_eq!(format_duration(dur(48 * H)), "48h");
        assert_eq!(parse_duration(" 5s "), Ok(dur(5 * S)));
        let odd = Duration::new(3_600, 1);
        assert_eq!(parse_duration(&format_duration(odd)), Ok(odd));
    }

    #[test]
    fn bad_durations_are_refused() {
        let e = parse_duration("5x").unwrap_err();
        assert!(e.contains("unknown unit \"x\""), "{e}");
        assert!(parse_duration("").unwrap_err().contains("empty duration"));
        assert!(
            parse_duration("h")
                .unwrap_err()
                .contains("expected a whole number")
        );
        assert!(
            parse_duration("-5s")
                .unwrap_err()
                .contains("expected a whole number")
        );
        assert!(
            parse_duration("1.5h")
                .unwrap_err()
                .contains("unknown unit \".5h\"")
        );
        assert!(parse_duration("5").unwrap_err().contains("missing unit"));
        assert!(
            parse_duration("99999999999999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn the_policy_reads_and_writes_durations_as_strings() {
        let default = RetentionPolicy::default();
        let json = serde_json::to_string(&default).unwrap();
        assert_eq!(
            json,
            r#"{"window":"72h","tiers":[{"for_last":"2h","every":"0s"},{"for_last":"24h","every":"1h"},{"for_last":"72h","every":"4h"}],"prefer_app_consistent":true}"#
        );
        assert_eq!(
            serde_json::from_str::<RetentionPolicy>(&json).unwrap(),
            default
        );
        assert_eq!(
            serde_json::from_str::<RetentionPolicy>("{}").unwrap(),
            default
        );

        let p: RetentionPolicy =
            serde_json::from_str(r#"{"window":"3d","tiers":[{"for_last":"30m"}]}"#).unwrap();
        assert_eq!(p.window, dur(72 * H));
        assert_eq!(p.tiers, vec![tier(30 * M, 0)]);

        let e = serde_json::from_str::<RetentionPolicy>(r#"{"window":"5x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown unit \"x\""), "{e}");
        let e = serde_json::from_str::<RetentionPolicy>(r#"{"windows":"5h"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `windows`"), "{e}");
    }
}
