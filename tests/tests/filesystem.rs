//! A real filesystem on the protected disk: the agent serves the disk as a file (`--fuse`), a
//! loop device over that file carries ext4, made, mounted, written and unmounted through the
//! agent. A point taken afterwards, presented by a test failover, is the disk byte for byte;
//! `e2fsck -fn` finds its filesystem clean, and its files are the ones written.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use haven_e2e::{Cluster, ClusterOptions, images_equal, run_ok};

/// A loop device, detached (and its mount unmounted) when dropped, whatever the test did.
struct Loop {
    device: String,
    mounted: Option<PathBuf>,
}

impl Loop {
    fn attach(file: &Path, read_only: bool) -> Result<Loop> {
        let mut cmd = Command::new("losetup");
        if read_only {
            cmd.arg("--read-only");
        }
        let device = run_ok(cmd.args(["-f", "--show"]).arg(file))?
            .trim()
            .to_string();
        Ok(Loop {
            device,
            mounted: None,
        })
    }

    fn mount(&mut self, at: &Path, options: &str) -> Result<()> {
        std::fs::create_dir_all(at)?;
        run_ok(
            Command::new("mount")
                .args(["-o", options, &self.device])
                .arg(at),
        )?;
        self.mounted = Some(at.to_path_buf());
        Ok(())
    }

    fn unmount(&mut self) -> Result<()> {
        if let Some(at) = self.mounted.take() {
            run_ok(Command::new("umount").arg(&at))?;
        }
        Ok(())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = self.unmount();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// The content of test file `n`: its own bytes, some of them incompressible.
fn content(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ n as u64;
    (0..(64 << 10) * (1 + n % 5))
        .map(|i| {
            if i % 2 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            } else {
                (n % 251) as u8
            }
        })
        .collect()
}

const FILES: usize = 24;

#[test]
fn an_ext4_filesystem_on_the_agents_disk_file_is_in_its_points() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    let folder = tmp.path().join("disk-file");
    let c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            agent_args: vec!["--fuse".into(), folder.display().to_string()],
            retention: Some("window = \"1h\"".into()),
            ..ClusterOptions::default()
        },
    )?;
    haven_e2e::wait_for_point(&c.mt, "web01")?;
    let file = folder.join("disk");
    assert_eq!(std::fs::metadata(&file)?.len(), 64 << 20);

    // ext4 made, mounted, written and unmounted, all through the agent's file.
    let mut dev = Loop::attach(&file, false)?;
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &dev.device]))?;
    let mnt = tmp.path().join("mnt");
    dev.mount(&mnt, "rw")?;
    std::fs::create_dir(mnt.join("data"))?;
    for n in 0..FILES {
        let path = mnt.join("data").join(format!("file-{n}"));
        std::fs::write(&path, content(n))?;
    }
    // Some rewritten in place, one removed.
    for n in (0..FILES).step_by(5) {
        std::fs::write(mnt.join("data").join(format!("file-{n}")), content(n + 100))?;
    }
    std::fs::remove_file(mnt.join("data/file-1"))?;
    run_ok(Command::new("sync").arg("-f").arg(mnt.join("data")))?;
    dev.unmount()?;
    drop(dev);

    // A point now is the disk, byte for byte, with a clean filesystem holding the files.
    let out = c.mt.haven(&["point", "create", "web01"])?;
    let id = out
        .split_whitespace()
        .find_map(|w| w.parse::<u64>().ok())
        .with_context(|| format!("no point id in {out:?}"))?;
    let uri =
        c.mt.haven(&["failover", "test", "web01", "--point", &id.to_string()])?;
    let copy = tmp.path().join("point.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri.trim()])
        .arg(&copy)
        .status()?;
    if !st.success() {
        bail!("qemu-img convert {uri} failed");
    }
    c.mt.haven(&["failover", "cleanup", "web01"])?;
    assert!(
        images_equal(&disk, &copy)?,
        "point {id} differs from the disk"
    );
    let fsck = Command::new("e2fsck").arg("-fn").arg(&copy).output()?;
    assert!(
        fsck.status.success(),
        "e2fsck -fn of the point: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let mut point = Loop::attach(&copy, true)?;
    let seen = tmp.path().join("seen");
    point.mount(&seen, "ro")?;
    for n in 0..FILES {
        let path = seen.join("data").join(format!("file-{n}"));
        let want = match n {
            1 => None,
            n if n % 5 == 0 => Some(content(n + 100)),
            n => Some(content(n)),
        };
        match want {
            None => assert!(!path.exists(), "file-1 was removed"),
            Some(want) => assert!(std::fs::read(&path)? == want, "file-{n} differs"),
        }
    }
    point.unmount()?;
    Ok(())
}
