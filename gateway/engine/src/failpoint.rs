//! Named failpoints in the durable paths, for crash and fault tests of real processes.
//!
//! `HAVEN_FAILPOINTS="name=action,name=action"` in a gateway's environment arms them; without
//! it every failpoint is one relaxed load of an already-initialised `OnceLock`. Actions:
//!
//! - `exit`: the process ends at once with status 137, as if SIGKILLed at exactly that point
//!   (no destructor, no flush beyond what the code already made durable);
//! - `pause`: [`paused`] answers true (the caller skips its work while paused).
//!
//! | name | where |
//! |------|-------|
//! | `ingest.after-append` | records appended to a journal, not yet synced |
//! | `ingest.after-sync` | the journal synced, the receiver not yet told (no `Ack` sent) |
//! | `apply.after-write` | a batch written to the replica, not yet flushed or recorded |
//! | `apply.after-commit` | the applied seq recorded, the journal not yet released |
//! | `apply` (`pause`) | the master target journals but does not apply |
//! | `ingest` (`pause`) | a receiving gateway stops reading its replication streams |
//! | `failover.mid-copy` | half of a failover image written |

use std::collections::HashMap;
use std::sync::OnceLock;

fn armed() -> &'static HashMap<String, String> {
    static ARMED: OnceLock<HashMap<String, String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("HAVEN_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|p| p.split_once('='))
            .map(|(n, a)| (n.trim().to_string(), a.trim().to_string()))
            .collect()
    })
}

/// Ends the process here when `name` is armed with `exit`.
pub fn hit(name: &str) {
    if armed().get(name).is_some_and(|a| a == "exit") {
        tracing::warn!(failpoint = name, "failpoint: exiting");
        std::process::exit(137);
    }
}

/// Whether `name` is armed with `pause`.
pub fn paused(name: &str) -> bool {
    armed().get(name).is_some_and(|a| a == "pause")
}
