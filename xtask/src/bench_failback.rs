//! `cargo xtask bench failback`: a reprotect against rsync, in one run.
//!
//! The machine failed over and ran at the secondary site: its image there differs from the disk
//! it left at the primary site in 1 % of its 4 KiB blocks (scattered). A reprotect makes the old
//! disk equal to the image again:
//!
//! - Haven: an agent started `--seeded` on the image, a process server at the secondary site, a
//!   master target at the primary site whose seed is the old disk; timed from the agent's start
//!   until the master target has applied the first point after the comparison (the old disk is
//!   then equal to the image, which is checked with `qemu-img compare`). Bytes: the blocks the
//!   comparison sent (the agent's report), what the process server received and stored
//!   (compressed) for the master target, and the digests the master target answered (32 bytes
//!   per 4 KiB block).
//! - rsync: `rsync --inplace --no-whole-file --ignore-times --stats` of the image onto a copy
//!   of the old disk (`--ignore-times`: both have the same size and may share a modification
//!   second), then `sync`; its bytes sent and received as it counts them.
//!
//! The disk is 8 GiB (`HAVEN_BENCH_GIB` overrides), 1 MiB stripes never written / text-like /
//! random. Release builds.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use haven_e2e::{
    Agent, Reverse, ReverseWriter, admin_token_of, http_post, images_equal, mixed_disk, poll,
    run_ok,
};

const BLOCK: u64 = 4096;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

pub fn run(root: &Path) -> Result<()> {
    let size = crate::bench::disk_bytes(8);
    let dir = root.join("target/bench-failback");
    let _ = std::fs::remove_dir_all(&dir);
    let (site_a, site_b) = (dir.join("site-a"), dir.join("site-b"));
    std::fs::create_dir_all(&site_a)?;
    std::fs::create_dir_all(&site_b)?;
    let old = site_a.join("disk.raw");
    mixed_disk(&old, size, 42)?;
    let image = site_b.join("image.raw");
    let rsync_old = dir.join("rsync-old.raw");
    for copy in [&image, &rsync_old] {
        run_ok(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(&old)
                .arg(copy),
        )?;
    }
    // 1 % of the 4 KiB blocks, scattered, changed on the image.
    let blocks = size / BLOCK;
    let mut picked = std::collections::BTreeSet::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while (picked.len() as u64) < blocks / 100 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        picked.insert(x % blocks);
    }
    let f = std::fs::OpenOptions::new().write(true).open(&image)?;
    let mut buf = vec![0u8; BLOCK as usize];
    for b in &picked {
        for w in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&buf, b * BLOCK)?;
    }
    f.sync_all()?;
    drop(f);
    let changed = picked.len() as u64 * BLOCK;
    println!(
        "disk: {} GiB raw (1 MiB stripes: never written / text-like / random); {} blocks of 4 KiB \
         changed since the failover ({:.1} MiB)\n",
        size >> 30,
        picked.len(),
        mib(changed)
    );

    // --- rsync ------------------------------------------------------------------------------
    let started = Instant::now();
    let out = Command::new("rsync")
        .args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
        .arg(&image)
        .arg(&rsync_old)
        .output()
        .context("running rsync")?;
    if !out.status.success() {
        bail!("rsync failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    run_ok(&mut Command::new("sync"))?;
    let rsync_time = started.elapsed();
    let stats = String::from_utf8_lossy(&out.stdout).to_string();
    let stat = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| {
                v.split_whitespace()
                    .next()
                    .unwrap_or("0")
                    .replace(',', "")
                    .parse()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    let (rsync_sent, rsync_received) = (stat("Total bytes sent: "), stat("Total bytes received: "));

    // --- Haven ------------------------------------------------------------------------------
    let bins = root.join("target/release");
    let init = run_ok(
        Command::new(bins.join("haven-gateway"))
            .args(["init", "--data-dir"])
            .arg(dir.join("token-source"))
            .args(["--site", "bench", "--name", "127.0.0.1"]),
    )?;
    let admin = admin_token_of(&init)?;
    let gateways = Reverse::start(&bins, &dir, ReverseWriter::raw(&site_a), &admin, None)?;
    let agent_dir = dir.join("agent");
    let (server, id) = Agent::enroll_id(&bins, &gateways.ps, &agent_dir, "bench")?;
    http_post(
        &format!(
            "{}/v1/seeds?agent_id={id}&disk=1&path=disk.raw&machine_name=bench",
            gateways.mt.api
        ),
        &gateways.mt.admin_token,
    )?;
    let started = Instant::now();
    let mut agent = Agent::start_disks(
        &bins,
        Some(server),
        &agent_dir,
        &image,
        &[],
        vec!["--seeded".into(), "--point-interval".into(), "1s".into()],
    )?;
    poll(Duration::from_secs(3600), Duration::from_millis(50), || {
        agent.proc.check_alive("haven-agent")?;
        let mt = gateways.mt.status()?.master_target.unwrap_or_default();
        Ok(match mt.replicas.first() {
            Some(r) if !r.seeding && r.points > 0 => Ok(()),
            other => Err(format!("not applied yet: {other:?}")),
        })
    })?;
    let haven_time = started.elapsed();
    let report = agent.report().context("no report from the agent")?;
    let sent = report.disks.first().map_or(0, |d| d.resync_sent_bytes);
    let ps = gateways.ps.status()?.process_server.unwrap_or_default();
    let (received, stored) = ps
        .disks
        .first()
        .map_or((0, 0), |d| (d.received_bytes_total, d.stored_bytes_total));
    let digests = blocks * 32;
    agent.proc.kill();
    if !images_equal(&old, &image)? {
        bail!("the old disk differs from the image after the reprotect");
    }
    if !images_equal(&rsync_old, &image)? {
        bail!("rsync's copy differs from the image");
    }

    println!("{:<46} {:>12} {:>12}", "", "Haven", "rsync");
    println!(
        "{:<46} {:>11.2}s {:>11.2}s",
        "reprotect time (until durable)",
        haven_time.as_secs_f64(),
        rsync_time.as_secs_f64()
    );
    println!(
        "{:<46} {:>9.1}MiB {:>9.1}MiB",
        "data sent to the old disk's side",
        mib(received),
        mib(rsync_sent)
    );
    println!(
        "{:<46} {:>9.1}MiB {:>9.1}MiB",
        "checksums sent back",
        mib(digests),
        mib(rsync_received)
    );
    println!(
        "\nHaven: the comparison found {:.1} MiB different ({:.2}x the {:.1} MiB changed); the \
         process server stored {:.1} MiB (compressed) for the master target. Speed-up {:.2}x, \
         data {:.1}x less.",
        mib(sent),
        sent as f64 / changed as f64,
        mib(changed),
        mib(stored),
        rsync_time.as_secs_f64() / haven_time.as_secs_f64(),
        rsync_sent as f64 / received.max(1) as f64
    );
    Ok(())
}
