//! Named failpoints, for crash and fault tests of real processes (the agent and the gateways).
//!
//! `HAVEN_FAILPOINTS="name=action,name=action"` in a process's environment arms them; without
//! it every failpoint is one lookup in an empty map behind an already-initialised `OnceLock`.
//! Actions:
//!
//! - `exit`: the process ends at once with status 137, as if SIGKILLed at exactly that point
//!   (no destructor, no flush beyond what the code already made durable);
//! - `pause`: [`paused`] answers true (the caller skips its work while paused).
//!
//! The points of this crate:
//!
//! | name | where |
//! |------|-------|
//! | `fsutil.before-rename` | [`write_atomic`](crate::write_atomic) (and `write_new`): the temporary file written and synced, not yet renamed (or linked) into place |
//!
//! Each crate that adds points lists them where it uses them (the engine's in
//! `haven_engine::failpoint`).

use std::collections::HashMap;
use std::sync::OnceLock;

/// The environment variable that arms failpoints.
pub const ENV: &str = "HAVEN_FAILPOINTS";

/// Exit status of a process ended by a failpoint (the status of a SIGKILLed one).
pub const EXIT_STATUS: i32 = 137;

fn armed() -> &'static HashMap<String, String> {
    static ARMED: OnceLock<HashMap<String, String>> = OnceLock::new();
    ARMED.get_or_init(|| parse(&std::env::var(ENV).unwrap_or_default()))
}

fn parse(spec: &str) -> HashMap<String, String> {
    spec.split(',')
        .filter_map(|p| p.split_once('='))
        .map(|(n, a)| (n.trim().to_string(), a.trim().to_string()))
        .collect()
}

/// Ends the process here when `name` is armed with `exit`.
pub fn hit(name: &str) {
    if armed().get(name).is_some_and(|a| a == "exit") {
        eprintln!("failpoint {name}: exiting with status {EXIT_STATUS}");
        std::process::exit(EXIT_STATUS);
    }
}

/// Whether `name` is armed with `pause`.
pub fn paused(name: &str) -> bool {
    armed().get(name).is_some_and(|a| a == "pause")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_names_points_and_actions() {
        let p = parse(" apply = pause ,fsutil.before-rename=exit,,nonsense");
        assert_eq!(p.get("apply").map(String::as_str), Some("pause"));
        assert_eq!(
            p.get("fsutil.before-rename").map(String::as_str),
            Some("exit")
        );
        assert_eq!(p.len(), 2);
        assert!(parse("").is_empty());
    }
}
