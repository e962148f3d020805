//! Named failpoints in the durable paths, for crash and fault tests of real processes.
//!
//! The mechanism is [`haven_fsutil::failpoint`], shared with the agent:
//! `HAVEN_FAILPOINTS="name=action,name=action"` in a gateway's environment arms them; without
//! it every failpoint is one lookup in an empty map. Actions:
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
//! | `fsutil.before-rename` | any atomic file write (journal segment, CA state, scratch map, ready file, …): the temporary file synced, not yet renamed into place |

pub use haven_fsutil::failpoint::{hit, paused};
