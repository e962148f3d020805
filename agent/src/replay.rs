//! Applies a change log onto a raw image, in sequence order.
//!
//! Used by operators (`haven-agent log-replay`) and by tests, which replay a log onto a zeroed
//! image and compare it with the backing disk to prove the log is complete and ordered.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use anyhow::Context;

use crate::log::{ChangeLog, Kind, Limits};
use crate::splitter::zero_file_range;

/// What a replay did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Records applied.
    pub records: u64,
    /// First and last sequence numbers applied (0 when none).
    pub first_seq: u64,
    /// Last sequence number applied.
    pub last_seq: u64,
    /// Payload bytes written.
    pub bytes_written: u64,
    /// Copy records passed over: they stand for the protected disk's own content when they
    /// were shipped, which the log does not hold.
    pub copies_skipped: u64,
}

/// Applies every record held in the log at `log_dir` onto the image at `image`, then syncs the
/// image. The log is opened (and so recovered) like the agent does; it must not be in use.
pub fn replay(log_dir: &Path, image: &Path) -> anyhow::Result<ReplayStats> {
    let log = ChangeLog::open(
        log_dir,
        Limits {
            max_bytes: u64::MAX,
            segment_bytes: u64::MAX,
        },
    )?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("opening image {}", image.display()))?;
    let meta = file.metadata()?;
    let block_device = meta.file_type().is_block_device();
    let size = meta.len();
    let mut stats = ReplayStats::default();
    for rec in log.read_from(log.stats().first_seq)? {
        let rec = rec?;
        if !block_device && rec.offset + rec.len > size {
            anyhow::bail!(
                "record {} ({} at {}+{}) is past the end of image {} ({size} bytes)",
                rec.seq,
                rec.kind.name(),
                rec.offset,
                rec.len,
                image.display()
            );
        }
        match rec.kind {
            Kind::Write => {
                file.write_all_at(&rec.data, rec.offset)?;
                stats.bytes_written += rec.len;
            }
            Kind::Zero | Kind::Trim => {
                zero_file_range(&file, block_device, rec.offset, rec.len, true)?;
            }
            // The protected disk's own content at shipping time: not in the log.
            Kind::Copy => stats.copies_skipped += 1,
            // Recovery points change nothing on the disk.
            Kind::Tag => {}
        }
        if stats.records == 0 {
            stats.first_seq = rec.seq;
        }
        stats.records += 1;
        stats.last_seq = rec.seq;
    }
    file.sync_all()
        .with_context(|| format!("syncing image {}", image.display()))?;
    Ok(stats)
}
