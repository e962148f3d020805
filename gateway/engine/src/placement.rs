//! Which process server serves each agent enrolled with the configuration server.
//!
//! The choice is a pure function of what the configuration server knows ([`place`]): the
//! machine's pinned process server, else the one the agent has while the agent says it is
//! connected there, or that process server reports, or it is gone for less than the policy's
//! grace (a process server cut off from the configuration server only keeps its agents), else the least loaded connected process server of the
//! agent's site (fewest agents, then fewest cached bytes, then name). A move happens only by
//! this choice; the process servers and the master target then make it safe (`TAKEOVER`,
//! `MOVED`, see `process_server.rs`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the configuration server keeps of an agent it enrolled (`agent/<id>` in its redb).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentRecord {
    /// Its id at the configuration server's CA.
    pub id: String,
    /// Its machine's name (from its certificate).
    pub machine_name: String,
    /// Its site, once known.
    pub site: Option<String>,
    /// The process server it replicates to.
    pub process_server: Option<String>,
    /// When it was assigned there, ms since the Unix epoch.
    pub assigned_ms: u64,
    /// How many times it was moved from a process server that was gone.
    pub moves: u32,
    /// When it last asked, ms since the Unix epoch.
    pub last_seen_ms: u64,
    /// Whether it said it was connected to its process server then.
    pub connected: bool,
}

/// A process server as the choice sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub site: String,
    /// Reporting now.
    pub connected: bool,
    /// How long it has not reported (zero while connected).
    pub gone_for: Duration,
    /// Agents assigned to it now.
    pub agents: usize,
    /// Bytes its caches hold.
    pub cache_bytes: u64,
}

/// The outcome of [`place`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Stay where it is.
    Stay(String),
    /// Go to this process server (a first assignment, a pin, or a move).
    Go {
        to: String,
        /// The process server it leaves, gone for longer than the grace.
        from: Option<String>,
    },
    /// Nowhere now, and why.
    Nowhere(String),
}

/// Where an agent of `site` replicates, given the process server it has (`current`) and
/// whether it says it is connected there, the machine's pin and the grace of its policy.
pub fn place(
    site: Option<&str>,
    current: Option<&str>,
    connected: bool,
    pinned: Option<&str>,
    grace: Duration,
    candidates: &[Candidate],
) -> Placement {
    if let Some(pin) = pinned {
        return match current {
            Some(c) if c == pin => Placement::Stay(pin.to_string()),
            _ => Placement::Go {
                to: pin.to_string(),
                from: current.map(str::to_string),
            },
        };
    }
    let sites: std::collections::BTreeSet<&str> =
        candidates.iter().map(|c| c.site.as_str()).collect();
    let site = match site {
        Some(s) => s,
        // A deployment with one site needs no site named.
        None if sites.len() == 1 => sites.first().copied().unwrap_or_default(),
        None => {
            return Placement::Nowhere(
                "the agent's site is not known: name it in the pipeline (machine.site) or \
                 enroll the agent with --site"
                    .into(),
            );
        }
    };
    if let Some(cur) = current
        && let Some(c) = candidates.iter().find(|c| c.name == cur && c.site == site)
        && (connected || c.connected || c.gone_for < grace)
    {
        return Placement::Stay(cur.to_string());
    }
    let best = candidates
        .iter()
        .filter(|c| c.connected && c.site == site)
        .min_by(|a, b| (a.agents, a.cache_bytes, &a.name).cmp(&(b.agents, b.cache_bytes, &b.name)));
    match best {
        Some(b) => Placement::Go {
            to: b.name.clone(),
            from: current.map(str::to_string),
        },
        None => Placement::Nowhere(format!(
            "no process server of site `{site}` is connected to the configuration server"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ps(name: &str, site: &str, connected: bool, gone_s: u64, agents: usize) -> Candidate {
        Candidate {
            name: name.into(),
            site: site.into(),
            connected,
            gone_for: Duration::from_secs(gone_s),
            agents,
            cache_bytes: 0,
        }
    }

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn a_new_agent_goes_to_the_least_loaded_connected_process_server_of_its_site() {
        let c = [
            ps("a", "primary", true, 0, 3),
            ps("b", "primary", true, 0, 1),
            ps("c", "primary", false, 100, 0),
            ps("d", "other", true, 0, 0),
        ];
        assert_eq!(
            place(Some("primary"), None, false, None, GRACE, &c),
            Placement::Go {
                to: "b".into(),
                from: None
            }
        );
    }

    #[test]
    fn an_agent_stays_while_its_process_server_is_gone_for_less_than_the_grace() {
        let c = [ps("a", "s", false, 29, 1), ps("b", "s", true, 0, 0)];
        assert_eq!(
            place(Some("s"), Some("a"), false, None, GRACE, &c),
            Placement::Stay("a".into())
        );
        let c = [ps("a", "s", false, 30, 1), ps("b", "s", true, 0, 0)];
        assert_eq!(
            place(Some("s"), Some("a"), false, None, GRACE, &c),
            Placement::Go {
                to: "b".into(),
                from: Some("a".into())
            }
        );
        // Cut off from the configuration server only: the agent still replicates there.
        assert_eq!(
            place(Some("s"), Some("a"), true, None, GRACE, &c),
            Placement::Stay("a".into())
        );
    }

    #[test]
    fn a_pin_wins_and_an_unknown_site_is_named() {
        let c = [ps("a", "s", true, 0, 0), ps("b", "t", true, 0, 0)];
        assert_eq!(
            place(None, Some("a"), false, Some("b"), GRACE, &c),
            Placement::Go {
                to: "b".into(),
                from: Some("a".into())
            }
        );
        assert!(matches!(
            place(None, None, false, None, GRACE, &c),
            Placement::Nowhere(why) if why.contains("--site")
        ));
        // One site: no need to name it.
        let c = [ps("a", "s", true, 0, 0)];
        assert_eq!(
            place(None, None, false, None, GRACE, &c),
            Placement::Go {
                to: "a".into(),
                from: None
            }
        );
        assert!(matches!(
            place(Some("s"), None, false, None, GRACE, &[ps("a", "s", false, 1, 0)]),
            Placement::Nowhere(why) if why.contains("`s`")
        ));
    }
}
