//! `cargo xtask bench fs`: a file workload on ext4 through the agent's disk file (`--fuse`,
//! replicated to a master target) against the same workload on a loop device over a plain
//! file. The workload writes [`FILES`] files of [`FILE_MIB`] MiB, each synced, then reads them
//! back after dropping the page cache; the bench prints both runs' throughput and the ratio.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use haven_e2e::{Cluster, ClusterOptions, Rng, run_ok};

use crate::bench_points::{Out, mib_s, random_mib, target_dir};

const DISK: u64 = 1 << 30;
const FILES: usize = 64;
const FILE_MIB: usize = 4;

/// A loop device with ext4 mounted at `mnt`, undone when dropped.
struct Mounted {
    device: String,
    mnt: std::path::PathBuf,
}

impl Mounted {
    fn make(file: &Path, mnt: &Path) -> Result<Mounted> {
        let device = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(file))?
            .trim()
            .to_string();
        let m = Mounted {
            device,
            mnt: mnt.to_path_buf(),
        };
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &m.device]))?;
        std::fs::create_dir_all(mnt)?;
        run_ok(Command::new("mount").arg(&m.device).arg(mnt))?;
        Ok(m)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// The workload on `mnt`: (write, read) durations.
fn workload(mnt: &Path) -> Result<(Duration, Duration)> {
    use std::io::Write;
    let mut rng = Rng(0x51);
    let data: Vec<u8> = (0..FILE_MIB).flat_map(|_| random_mib(&mut rng)).collect();
    let started = Instant::now();
    for n in 0..FILES {
        let mut f = std::fs::File::create(mnt.join(format!("f{n}")))?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    let wrote = started.elapsed();
    run_ok(&mut Command::new("sync"))?;
    std::fs::write("/proc/sys/vm/drop_caches", "3")?;
    let started = Instant::now();
    for n in 0..FILES {
        let back = std::fs::read(mnt.join(format!("f{n}")))?;
        anyhow::ensure!(back == data, "file f{n} read back differs");
    }
    Ok((wrote, started.elapsed()))
}

pub fn run(root: &Path) -> Result<()> {
    let target = target_dir(root);
    let bins = target.join("release");
    let dir = target.join("bench-fs");
    haven_e2e::unmount_below(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let bytes = ((FILES * FILE_MIB) as u64) << 20;

    // Baseline: a loop device over a plain file.
    let plain = dir.join("plain.raw");
    std::fs::File::create(&plain)?.set_len(DISK)?;
    eprintln!("1/2 the workload on a loop device over a plain file …");
    let base = {
        let _m = Mounted::make(&plain, &dir.join("mnt-plain"))?;
        workload(&dir.join("mnt-plain"))?
    };

    // Haven: the same over the agent's disk file, replicated.
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)?.set_len(DISK)?;
    let folder = dir.join("disk-file");
    let c = Cluster::start(
        &dir,
        &disk,
        ClusterOptions {
            agent_args: vec!["--fuse".into(), folder.display().to_string()],
            bin_dir: Some(bins),
            ..ClusterOptions::default()
        },
    )?;
    eprintln!("waiting for the initial sync …");
    let mut c = c;
    c.wait_caught_up(haven_e2e::now_ms(), Duration::from_secs(300), |_, _| {})?;
    eprintln!("2/2 the workload on a loop device over the agent's disk file …");
    let haven = {
        let _m = Mounted::make(&folder.join("disk"), &dir.join("mnt-haven"))?;
        workload(&dir.join("mnt-haven"))?
    };
    drop(c);

    let mut out = Out(String::new());
    out.line(format!(
        "Filesystem workload: ext4 on a 1 GiB loop device, {FILES} files of {FILE_MIB} MiB \
         written and synced one by one, then read back with a cold page cache"
    ));
    out.line(format!(
        "{:<42} {:>12} {:>12}",
        "", "write MiB/s", "read MiB/s"
    ));
    let row = |name: &str, (w, r): (Duration, Duration)| {
        format!(
            "{name:<42} {:>12.1} {:>12.1}",
            mib_s(bytes, w),
            mib_s(bytes, r)
        )
    };
    out.line(row("loop device over a plain file (baseline)", base));
    out.line(row("loop device over the agent's file (Haven)", haven));
    out.line(format!(
        "{:<42} {:>12.2} {:>12.2}",
        "Haven / baseline",
        mib_s(bytes, haven.0) / mib_s(bytes, base.0),
        mib_s(bytes, haven.1) / mib_s(bytes, base.1)
    ));
    std::fs::write(dir.join("results.txt"), &out.0)?;
    Ok(())
}
