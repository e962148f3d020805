//! End to end: recovery points, retention, test failover and failover, with real processes on
//! loopback, an NBD client that knows when each write was acknowledged, and qemu-img as the
//! judge.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use haven_e2e::nbd::NbdClient;
use haven_e2e::{Cluster, ClusterOptions, images_equal, mixed_disk, now_ms, poll, qemu_io};
use haven_engine::recovery::{ItemInfo, ItemState, PointInfo};
use haven_net::stream::DiskState;

const BLOCK: u64 = 4096;
const DEFAULT_RETENTION: &str = "window = \"72h\"";

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn logs(c: &Cluster) -> String {
    format!(
        "agent log:\n{}\nps log:\n{}\nmt log:\n{}",
        log_tail(&c.agent.data_dir.join("agent.log")),
        log_tail(&c.ps.data_dir.join("gateway.log")),
        log_tail(&c.mt.data_dir.join("gateway.log")),
    )
}

fn zero_disk(path: &Path, size: u64) -> Result<()> {
    std::fs::File::create(path)?.set_len(size)?;
    Ok(())
}

fn start(root: &Path, disk: &Path, retention: Option<&str>, agent: &[&str]) -> Result<Cluster> {
    Cluster::start(
        root,
        disk,
        ClusterOptions {
            retention: retention.map(str::to_string),
            agent_args: agent.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    )
}

/// Waits until the agent says protected and the master target holds at least `n` points.
fn wait_points(c: &Cluster, n: usize, timeout: Duration) -> Result<Vec<PointInfo>> {
    poll(timeout, Duration::from_millis(100), || {
        // The master target learns the machine's name from the agent's first report.
        if protected(c)
            && let Ok(points) = list(c)
            && points.len() >= n
        {
            return Ok(Ok(points));
        }
        Ok(Err(format!("fewer than {n} points after {timeout:?}")))
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(c)))
}

/// Whether the agent reports every disk protected.
fn protected(c: &Cluster) -> bool {
    c.agent
        .report()
        .is_some_and(|r| r.disks.iter().all(|d| d.state == DiskState::Protected))
}

/// The item, once `ready` says it is as wanted (`why` not), polled every 100 ms for at most
/// `timeout`; the error ends with the gateways' logs.
fn wait_item(
    c: &Cluster,
    timeout: Duration,
    why: &str,
    ready: impl Fn(&ItemInfo) -> bool,
) -> Result<ItemInfo> {
    poll(timeout, Duration::from_millis(100), || {
        Ok(item(c)
            .ok()
            .filter(|i| ready(i))
            .ok_or_else(|| why.to_string()))
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(c)))
}

fn list(c: &Cluster) -> Result<Vec<PointInfo>> {
    let out = c.mt.haven(&["point", "list", "web01", "--json"])?;
    Ok(serde_json::from_str(&out)?)
}

fn item(c: &Cluster) -> Result<ItemInfo> {
    let out = c.mt.haven(&["failover", "show", "web01", "--json"])?;
    Ok(serde_json::from_str(&out)?)
}

/// Runs `haven ARGS --api MT`, which must fail; returns its stderr.
fn haven_fails(c: &Cluster, args: &[&str]) -> String {
    let err = c.mt.haven(args).expect_err("the command should fail");
    format!("{err:#}")
}

/// Bytes allocated on disk by the files under `dir`.
fn allocated_under(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            allocated_under(&entry.path())?
        } else {
            meta.blocks() * 512
        };
    }
    Ok(total)
}

fn create_point(c: &Cluster) -> Result<u64> {
    Ok(c.mt.haven(&["point", "create", "web01"])?.trim().parse()?)
}

/// `host:port` and export name of an `nbd://host:port/export` URI.
fn nbd_target(uri: &str) -> Result<(String, String)> {
    let rest = uri.strip_prefix("nbd://").context("not an nbd:// URI")?;
    let (addr, export) = rest.split_once('/').context("no export in the URI")?;
    Ok((addr.to_string(), export.to_string()))
}

/// The writer's storage root (replicas and failover images live below it).
fn storage_root(c: &Cluster) -> Result<PathBuf> {
    let replica = c.replica()?;
    Ok(replica
        .parent()
        .and_then(Path::parent)
        .context("replica path")?
        .to_path_buf())
}

/// Copies an NBD export to a raw file with qemu-img.
fn export_to_file(uri: &str, out: &Path) -> Result<()> {
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(out)
        .status()?;
    if !st.success() {
        bail!("qemu-img convert {uri} failed");
    }
    Ok(())
}

/// The numbered-write workload: write k (1-based) puts k (u64, little-endian, repeated) into
/// block `block_of(k)`, one at a time, each acknowledged before the next starts.
struct Numbered {
    blocks: u64,
    /// `(start_ms, ack_ms)` of write k at index k-1.
    times: Vec<(u64, u64)>,
}

impl Numbered {
    fn block_of(&self, k: u64) -> u64 {
        k.wrapping_mul(2_654_435_761) % self.blocks
    }

    fn run(&mut self, client: &mut NbdClient, writes: u64) -> Result<()> {
        let mut data = vec![0u8; BLOCK as usize];
        for k in 1..=writes {
            for w in data.chunks_mut(8) {
                w.copy_from_slice(&k.to_le_bytes());
            }
            let start = now_ms();
            client.write(self.block_of(k) * BLOCK, &data)?;
            self.times.push((start, now_ms()));
            // Spread the writes over several points.
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Which prefix of the writes `image` (the first `blocks` blocks, read by `read`) holds:
    /// every write up to some k and none after. Errors when it is not a prefix at all.
    fn prefix_of(&self, image: &[u8]) -> Result<u64> {
        let value = |b: u64| -> Result<u64> {
            let block = &image[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
            let v = u64::from_le_bytes(block[..8].try_into()?);
            if block.chunks(8).any(|w| w != v.to_le_bytes()) {
                bail!("block {b} is torn: it does not hold one write's number throughout");
            }
            Ok(v)
        };
        let values: Vec<u64> = (0..self.blocks).map(value).collect::<Result<_>>()?;
        let k = values.iter().copied().max().unwrap_or(0);
        // The state after exactly writes 1..=k.
        let mut want = vec![0u64; self.blocks as usize];
        for j in 1..=k {
            want[self.block_of(j) as usize] = j;
        }
        for (b, (got, want)) in values.iter().zip(&want).enumerate() {
            if got != want {
                bail!(
                    "not a prefix: block {b} holds write {got}, but after writes 1..={k} it holds \
                     write {want}"
                );
            }
        }
        Ok(k)
    }

    /// Checks that prefix `k` is what a tag taken at `tag_ms` must hold: every write
    /// acknowledged before the tag, none started after it (1 ms of clock granularity).
    fn check_tag(&self, k: u64, tag_ms: u64) -> Result<()> {
        if k > 0 {
            let (start, _) = self.times[(k - 1) as usize];
            if start > tag_ms + 1 {
                bail!("the point at {tag_ms} holds write {k}, which started at {start}");
            }
        }
        if let Some(&(_, ack)) = self.times.get(k as usize)
            && ack + 1 < tag_ms
        {
            bail!(
                "the point at {tag_ms} lacks write {}, acknowledged at {ack}",
                k + 1
            );
        }
        Ok(())
    }
}

#[test]
fn points_hold_exact_prefixes_of_the_write_sequence() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    zero_disk(&disk, 8 << 20)?;
    let c = start(
        tmp.path(),
        &disk,
        Some(DEFAULT_RETENTION),
        &["--point-interval", "1s"],
    )?;
    wait_points(&c, 1, Duration::from_secs(120))?;

    let mut work = Numbered {
        blocks: 512,
        times: Vec::new(),
    };
    let mut client = NbdClient::connect(&format!("127.0.0.1:{}", c.agent.nbd_port), "disk")?;
    work.run(&mut client, 6000)?;
    let last = create_point(&c)?;
    let points: Vec<PointInfo> = list(&c)?
        .into_iter()
        .filter(|p| p.record.source_time_ms + 2 >= work.times[0].0)
        .collect();
    assert!(
        points.len() >= 3,
        "points taken during the workload: {points:?}\n{}",
        logs(&c)
    );
    // The on-demand point is listed (an interval point may have followed it already).
    assert!(
        points.iter().any(|p| p.record.point == last),
        "point {last} is not listed: {points:?}"
    );

    let region = work.blocks * BLOCK;
    // Random points (seeded by the first point's id), and the last, through test failover.
    let mut picks: Vec<&PointInfo> = vec![points.last().unwrap()];
    let seed = points[0].record.point;
    for i in 0..3u64 {
        picks.push(&points[((seed / 7 + i * 5) % points.len() as u64) as usize]);
    }
    let mut prefixes = Vec::new();
    for p in &picks {
        let uri = c.mt.haven(&[
            "failover",
            "test",
            "web01",
            "--point",
            &p.record.point.to_string(),
        ])?;
        let (addr, export) = nbd_target(uri.trim())?;
        let mut view = NbdClient::connect(&addr, &export)?;
        let image = view.read(0, region as u32)?;
        view.disconnect()?;
        let k = work
            .prefix_of(&image)
            .with_context(|| format!("test failover of point {}", p.record.point))?;
        work.check_tag(k, p.record.source_time_ms)
            .with_context(|| format!("test failover of point {}", p.record.point))?;
        prefixes.push((p.record.point, k));
        c.mt.haven(&["failover", "cleanup", "web01"])?;
    }
    // The last point was taken after the workload: it holds all of it.
    assert_eq!(prefixes[0].1, 6000, "{prefixes:?}");

    // The materialised image of a random point holds the same prefix as its overlay.
    let (point, k) = prefixes[1];
    let image =
        c.mt.haven(&["failover", "web01", "--point", &point.to_string()])?;
    let path = storage_root(&c)?.join(image.trim());
    let bytes = std::fs::read(&path)?;
    assert_eq!(bytes.len() as u64, 8 << 20);
    assert_eq!(work.prefix_of(&bytes[..region as usize])?, k);
    assert!(bytes[region as usize..].iter().all(|&b| b == 0));
    Ok(())
}

#[test]
fn on_demand_points_equal_copies_and_test_failover_leaves_no_trace() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    let size = 32u64 << 20;
    mixed_disk(&disk, size, 7)?;
    let c = start(
        tmp.path(),
        &disk,
        Some(DEFAULT_RETENTION),
        &["--point-interval", "2s"],
    )?;
    wait_points(&c, 1, Duration::from_secs(120))?;

    // Errors that say what to do.
    let e = haven_fails(&c, &["point", "list", "nosuch"]);
    assert!(e.contains("no protected item \"nosuch\""), "{e}");
    let e = haven_fails(&c, &["failover", "test", "web01", "--point", "12345"]);
    assert!(
        e.contains("no point 12345: it is outside the retention window or was never taken"),
        "{e}"
    );
    let e = haven_fails(&c, &["failover", "cleanup", "web01"]);
    assert!(
        e.contains("item web01 has no test failover to clean up"),
        "{e}"
    );
    let e = haven_fails(&c, &["failover", "commit", "web01"]);
    assert!(
        e.contains("only a failed-over item can be committed"),
        "{e}"
    );
    let e = haven_fails(&c, &["point", "create", "web01", "--app"]);
    assert!(
        e.contains("no quiesce hooks are configured on this agent"),
        "{e}"
    );

    let mut copies = Vec::new();
    for i in 0..3u64 {
        let cmds: Vec<String> = (0..20)
            .map(|j| {
                format!(
                    "write -P {} {} {}",
                    (i * 20 + j) % 250 + 1,
                    ((i * 977 + j * 131) % 8000) * 4096,
                    4096 * (1 + j % 16)
                )
            })
            .collect();
        qemu_io(&c.agent.nbd, &cmds)?;
        let copy = tmp.path().join(format!("copy{i}.raw"));
        std::fs::copy(&disk, &copy)?;
        let id = create_point(&c)?;
        copies.push((id, copy));
    }

    // A read-only test failover of the first point equals its copy ...
    let (id0, copy0) = &copies[0];
    let uri =
        c.mt.haven(&["failover", "test", "web01", "--point", &id0.to_string()])?;
    let uri = uri.trim().to_string();
    let got = tmp.path().join("got.raw");
    export_to_file(&uri, &got)?;
    assert!(
        images_equal(copy0, &got)?,
        "point {id0} differs from its copy"
    );
    // ... refuses writes ...
    assert!(qemu_io(&uri, &["write -P 9 0 4096".into()]).is_err());
    // ... and stays equal while replication goes on: new writes, a new point that equals its
    // own copy.
    qemu_io(&c.agent.nbd, &["write -P 77 1M 2M".into()])?;
    let copy3 = tmp.path().join("copy3.raw");
    std::fs::copy(&disk, &copy3)?;
    let id3 = create_point(&c)?;
    std::fs::remove_file(&got)?;
    export_to_file(&uri, &got)?;
    assert!(
        images_equal(copy0, &got)?,
        "the test failover changed under replication"
    );
    let e = haven_fails(
        &c,
        &["failover", "test", "web01", "--point", &id3.to_string()],
    );
    assert!(
        e.contains("a test failover of item web01 is running"),
        "{e}"
    );
    let points_before = list(&c)?;
    c.mt.haven(&["failover", "cleanup", "web01"])?;

    // Cleanup leaves no trace: the export is gone, no scratch, the points are as they were.
    let (addr, export) = nbd_target(&uri)?;
    assert!(NbdClient::connect(&addr, &export).is_err());
    let test_dir = c.mt.data_dir.join("mt").join("test-failover");
    let leftovers: Vec<_> = std::fs::read_dir(&test_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let status = c.mt.status()?;
    let replica = &status.master_target.as_ref().context("mt")?.replicas[0];
    assert_eq!(replica.test_failover, None);
    let ids = |ps: &[PointInfo]| ps.iter().map(|p| p.record.point).collect::<Vec<_>>();
    let after = list(&c)?;
    assert!(
        ids(&points_before).iter().all(|p| ids(&after).contains(p)),
        "cleanup dropped points"
    );

    // Every on-demand point equals the copy taken at its moment; a writable one takes writes
    // into scratch, which cleanup discards.
    copies.push((id3, copy3));
    for (i, (id, copy)) in copies.iter().enumerate() {
        let writable = i == 1;
        let mut args = vec!["failover", "test", "web01", "--point"];
        let id_s = id.to_string();
        args.push(&id_s);
        if writable {
            args.push("--writable");
        }
        let uri = c.mt.haven(&args)?.trim().to_string();
        let got = tmp.path().join(format!("got{i}.raw"));
        export_to_file(&uri, &got)?;
        assert!(
            images_equal(copy, &got)?,
            "point {id} differs from its copy"
        );
        if writable {
            qemu_io(
                &uri,
                &[
                    "write -P 200 5M 1M".into(),
                    "read -P 200 5M 1M".into(),
                    "write -z 0 64k".into(),
                    "read -P 0 0 64k".into(),
                    "discard 5632k 512k".into(),
                    "read -P 200 5M 512k".into(),
                    "read -P 0 5632k 512k".into(),
                    "write -z 8M 24M".into(),
                    "read -P 0 8M 24M".into(),
                ],
            )?;
            // Zeroes and trims are kept as extents, not written: the scratch holds only the
            // half of the 1 MiB write that was not trimmed.
            let allocated = allocated_under(&test_dir)?;
            assert!(
                allocated <= 1 << 20,
                "the scratch holds {allocated} bytes after a 1 MiB write"
            );
        }
        c.mt.haven(&["failover", "cleanup", "web01"])?;
    }
    // The writes to the writable test failover are gone.
    let uri = c.mt.haven(&[
        "failover",
        "test",
        "web01",
        "--point",
        &copies[1].0.to_string(),
    ])?;
    let got = tmp.path().join("again.raw");
    export_to_file(uri.trim(), &got)?;
    assert!(images_equal(&copies[1].1, &got)?);
    c.mt.haven(&["failover", "cleanup", "web01"])?;

    // Replication went on throughout: the source's latest state arrives as a new point.
    let copy4 = tmp.path().join("copy4.raw");
    qemu_io(&c.agent.nbd, &["write -P 99 20M 1M".into()])?;
    std::fs::copy(&disk, &copy4)?;
    let id4 = create_point(&c)?;
    let uri =
        c.mt.haven(&["failover", "test", "web01", "--point", &id4.to_string()])?;
    let got = tmp.path().join("latest.raw");
    export_to_file(uri.trim(), &got)?;
    assert!(images_equal(&copy4, &got)?);
    c.mt.haven(&["failover", "cleanup", "web01"])?;
    let history = item(&c)?.item.history;
    assert!(
        history
            .iter()
            .filter(|t| t.cause.contains("cleaned up"))
            .count()
            >= 5,
        "{history:?}"
    );
    Ok(())
}

#[test]
fn planned_failover_loses_no_acknowledged_write() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    zero_disk(&disk, 16 << 20)?;
    let c = start(tmp.path(), &disk, Some(DEFAULT_RETENTION), &[])?;
    wait_points(&c, 1, Duration::from_secs(120))?;

    // A writer keeps writing through the planned failover; every write it got acknowledged
    // must be in the failover image.
    let port = c.agent.nbd_port;
    let writer = std::thread::spawn(move || -> Result<u64> {
        let mut work = Numbered {
            blocks: 1024,
            times: Vec::new(),
        };
        let mut client = NbdClient::connect(&format!("127.0.0.1:{port}"), "disk")?;
        let mut data = vec![0u8; BLOCK as usize];
        let mut acked = 0;
        for k in 1..=1_000_000u64 {
            for w in data.chunks_mut(8) {
                w.copy_from_slice(&k.to_le_bytes());
            }
            if client.write(work.block_of(k) * BLOCK, &data).is_err() {
                break;
            }
            work.times.push((0, 0));
            acked = k;
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(acked)
    });
    std::thread::sleep(Duration::from_secs(2));
    let image = c.mt.haven(&["failover", "web01", "--planned"])?;
    let acked = writer.join().expect("writer thread")?;
    assert!(acked > 100, "only {acked} writes before the failover");
    let path = storage_root(&c)?.join(image.trim());
    // The source disk holds exactly the acknowledged writes (later ones were refused), and the
    // image equals it.
    assert!(
        images_equal(&disk, &path)?,
        "the failover image differs from the stopped source\n{}",
        logs(&c)
    );
    let numbered = Numbered {
        blocks: 1024,
        times: Vec::new(),
    };
    let bytes = std::fs::read(&path)?;
    // A write applied just before the stop whose reply the closing connection cut was not
    // acknowledged, but it is on the source and in the image alike.
    let k = numbered.prefix_of(&bytes[..(1024 * BLOCK) as usize])?;
    assert!(
        k == acked || k == acked + 1,
        "image holds writes 1..={k}, {acked} acknowledged"
    );

    // The source takes no more writes, and its agent says so.
    assert!(qemu_io(&c.agent.nbd, &["write -P 1 0 4096".into()]).is_err());
    let report = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        Ok(match c.agent.report() {
            Some(r) if r.disks[0].state == DiskState::FailedOver => Ok(r),
            r => Err(format!(
                "the stopped agent does not report failed-over: {r:?}"
            )),
        })
    })?;
    let why = report.disks[0].message.clone().unwrap_or_default();
    assert!(why.contains("failed over (planned)"), "{why}");
    let info = item(&c)?;
    assert_eq!(info.item.state, ItemState::FailedOver);
    assert!(info.item.planned);
    let states: Vec<_> = info.item.history.iter().map(|t| (t.from, t.to)).collect();
    assert_eq!(
        states,
        vec![
            (ItemState::Protected, ItemState::FailingOver),
            (ItemState::FailingOver, ItemState::FailedOver)
        ]
    );
    let e = haven_fails(&c, &["failover", "web01", "--point", "latest"]);
    assert!(e.contains("item web01 is failed-over"), "{e}");
    c.mt.haven(&["failover", "commit", "web01"])?;
    let info = item(&c)?;
    assert_eq!(info.item.state, ItemState::Committed);
    assert_eq!(info.points, 1);
    Ok(())
}

#[test]
fn a_master_target_killed_while_materialising_finishes_after_restart() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, 64 << 20, 3)?;
    let c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            retention: Some(DEFAULT_RETENTION.into()),
            mt_env: vec![("HAVEN_FAILPOINTS".into(), "failover.mid-copy=exit".into())],
            ..Default::default()
        },
    )?;
    let mut c = c;
    wait_points(&c, 1, Duration::from_secs(120))?;
    qemu_io(&c.agent.nbd, &["write -P 5 3M 5M".into()])?;
    let copy = tmp.path().join("copy.raw");
    std::fs::copy(&disk, &copy)?;
    let id = create_point(&c)?;
    qemu_io(&c.agent.nbd, &["write -P 6 3M 5M".into()])?;
    let root = storage_root(&c)?;
    let out =
        c.mt.haven(&["failover", "web01", "--point", &id.to_string(), "--no-wait"])?;
    assert_eq!(out.trim(), "failing-over");
    let status = c.mt.proc.wait_exit(Duration::from_secs(60))?;
    assert!(!status.success(), "the failpoint should have stopped it");
    // Half an image was written when it stopped: nothing is under an image's name yet.
    let visible: Vec<_> = std::fs::read_dir(root.join("failover"))?
        .flatten()
        .flat_map(|agent| {
            std::fs::read_dir(agent.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(
        visible.is_empty(),
        "an incomplete image is visible: {visible:?}"
    );
    c.mt.env.clear();
    c.mt.restart()?;
    let info = wait_item(&c, Duration::from_secs(120), "still failing over", |i| {
        i.item.state != ItemState::FailingOver
    })?;
    assert_eq!(
        info.item.state,
        ItemState::FailedOver,
        "{:?}",
        info.item.history
    );
    assert!(
        info.item
            .history
            .iter()
            .any(|t| t.cause.contains("after a restart")),
        "{:?}",
        info.item.history
    );
    let path = PathBuf::from(info.item.image.context("no image")?);
    assert!(path.is_absolute(), "{path:?} is not the image's full path");
    assert!(
        images_equal(&copy, &path)?,
        "the resumed image differs from the point's copy"
    );
    // The interrupted run left no second image behind.
    let images: Vec<_> = std::fs::read_dir(path.parent().context("dir")?)?
        .flatten()
        .collect();
    assert_eq!(images.len(), 1);
    Ok(())
}

#[test]
fn a_test_failover_is_served_again_after_a_master_target_restart() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, 16 << 20, 5)?;
    let mut c = start(tmp.path(), &disk, Some(DEFAULT_RETENTION), &[])?;
    wait_points(&c, 1, Duration::from_secs(120))?;
    qemu_io(&c.agent.nbd, &["write -P 31 1M 3M".into()])?;
    let copy = tmp.path().join("copy.raw");
    std::fs::copy(&disk, &copy)?;
    let id = create_point(&c)?;
    let uri = c.mt.haven(&[
        "failover",
        "test",
        "web01",
        "--point",
        &id.to_string(),
        "--writable",
        "--files",
    ])?;
    let uri = uri.trim().to_string();
    // The disk is a file too, below the writer's storage root.
    let image = wait_item(&c, Duration::from_secs(10), "no test failover", |i| {
        i.test_failover.is_some()
    })?
    .test_failover
    .and_then(|t| t.image)
    .context("the test failover presents no file")?;
    assert!(image.ends_with(&format!("/disk1-point{id}.raw")), "{image}");
    // The drill writes (qemu-io flushes as it closes), then the master target is killed.
    qemu_io(
        &uri,
        &[
            "write -P 201 2M 1M".into(),
            "write -z 6M 1M".into(),
            "discard 9M 64k".into(),
        ],
    )?;
    let mut want = std::fs::read(&copy)?;
    want[2 << 20..3 << 20].fill(201);
    want[6 << 20..7 << 20].fill(0);
    want[(9 << 20)..(9 << 20) + (64 << 10)].fill(0);
    let listed: Vec<u64> = list(&c)?.iter().map(|p| p.record.point).collect();
    c.mt.restart()?;

    // It comes back at the same address, with the drill's writes; the history says so.
    let info = wait_item(
        &c,
        Duration::from_secs(60),
        "no test failover after the restart",
        |i| i.test_failover.is_some(),
    )?;
    let test = info.test_failover.context("test failover")?;
    // The same address, unless another process took its port meanwhile (then the history
    // says where it went).
    if test.uri != uri {
        assert!(
            info.item
                .history
                .iter()
                .any(|t| t.cause.contains("at a new address")),
            "{} became {} silently",
            uri,
            test.uri
        );
    }
    let uri = test.uri.clone();
    // Every point listed before the kill is listed after it.
    let after: Vec<u64> = list(&c)?.iter().map(|p| p.record.point).collect();
    assert!(
        listed.iter().all(|p| after.contains(p)),
        "{listed:?} before, {after:?} after"
    );
    assert_eq!(test.point.point, id);
    assert!(
        info.item
            .history
            .iter()
            .any(|t| t.cause.contains("served again after a restart")),
        "{:?}",
        info.item.history
    );
    let got = tmp.path().join("got.raw");
    export_to_file(&uri, &got)?;
    assert!(
        std::fs::read(&got)? == want,
        "the test failover after the restart lost the drill's writes"
    );
    // Its file is presented again (the mount the killed process left is replaced).
    assert_eq!(test.image.as_deref(), Some(image.as_str()));
    assert!(
        std::fs::read(&image)? == want,
        "the test failover's file after the restart is not the drill's disk"
    );
    // It still takes writes, and replication went on beside it.
    qemu_io(
        &uri,
        &["write -P 202 12M 64k".into(), "read -P 202 12M 64k".into()],
    )?;
    qemu_io(&c.agent.nbd, &["write -P 32 13M 1M".into()])?;
    let later = tmp.path().join("later.raw");
    std::fs::copy(&disk, &later)?;
    // The process server reconnects after the restart in its own time.
    let id2 = poll(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || match create_point(&c) {
            Ok(id2) => Ok(Ok(id2)),
            Err(e) if format!("{e:#}").contains("not reachable") => Ok(Err(format!("{e:#}"))),
            Err(e) => Err(e),
        },
    )?;
    assert!(id2 > id);

    // While its file is open (a machine runs on it), the cleanup is refused and the test
    // failover goes on.
    let open = std::fs::File::open(&image)?;
    let refused =
        c.mt.haven(&["failover", "cleanup", "web01"])
            .expect_err("a cleanup under an open file");
    assert!(
        format!("{refused:#}").contains("HTTP 409")
            && format!("{refused:#}").contains("are in use"),
        "{refused:#}"
    );
    qemu_io(&uri, &["read -P 202 12M 64k".into()])?;
    drop(open);

    // Cleanup leaves nothing to serve after the next restart either, and no file.
    c.mt.haven(&["failover", "cleanup", "web01"])?;
    let files = std::path::Path::new(&image)
        .ancestors()
        .nth(3)
        .context("the test failover's folder")?
        .to_path_buf();
    assert!(files.ends_with("test-failover"), "{}", files.display());
    assert_eq!(
        files.read_dir()?.count(),
        0,
        "the cleanup left files below {}",
        files.display()
    );
    c.mt.restart()?;
    let info = wait_item(
        &c,
        Duration::from_secs(60),
        "no item after the restart",
        |_| true,
    )?;
    assert_eq!(info.test_failover, None);
    assert!(
        !c.mt
            .data_dir
            .join("mt")
            .join("test-failover")
            .read_dir()?
            .any(|_| true)
    );
    let uri2 =
        c.mt.haven(&["failover", "test", "web01", "--point", &id2.to_string()])?;
    let got2 = tmp.path().join("got2.raw");
    export_to_file(uri2.trim(), &got2)?;
    assert!(
        images_equal(&later, &got2)?,
        "point {id2} differs from its copy"
    );
    c.mt.haven(&["failover", "cleanup", "web01"])?;

    // One that cannot be served again (its scratch is gone) is kept, and the history says what
    // to do; cleanup still ends it.
    c.mt.haven(&[
        "failover",
        "test",
        "web01",
        "--point",
        &id2.to_string(),
        "--writable",
    ])?;
    c.mt.proc.kill();
    let test_dir = c.mt.data_dir.join("mt").join("test-failover");
    for entry in std::fs::read_dir(&test_dir)? {
        std::fs::remove_file(entry?.path().join("scratch.raw"))?;
    }
    c.mt.spawn()?;
    let info = item(&c)?;
    assert_eq!(info.test_failover, None);
    let last = &info.item.history.last().context("history")?.cause;
    assert!(
        last.contains("could not be served again after a restart")
            && last.contains("it is kept with its writes")
            && last.contains("`haven failover cleanup web01`"),
        "{last}"
    );
    c.mt.haven(&["failover", "cleanup", "web01"])?;
    assert!(!test_dir.read_dir()?.any(|_| true));
    let e = haven_fails(&c, &["failover", "cleanup", "web01"]);
    assert!(
        e.contains("item web01 has no test failover to clean up"),
        "{e}"
    );
    Ok(())
}

/// The master target's RPO for the one item, and its own lag measure.
/// Write `i` of a workload: 64 KiB of a pattern of its own at one of 100 places.
fn write_64k(c: &Cluster, i: u64) -> Result<()> {
    qemu_io(
        &c.agent.nbd,
        &[format!(
            "write -P {} {} 64k",
            i % 250 + 1,
            (i % 100) * 65536
        )],
    )
}

/// Writes every 250 ms for `how_long`, from write `from` on; returns the next write's number.
fn write_for(c: &Cluster, from: u64, how_long: Duration) -> Result<u64> {
    let started = Instant::now();
    let mut i = from;
    while started.elapsed() < how_long {
        write_64k(c, i)?;
        i += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(i)
}

fn rpo(c: &Cluster) -> Result<(Option<f64>, f64)> {
    let status = c.mt.status()?;
    let r = &status.master_target.as_ref().context("mt")?.replicas[0];
    Ok((r.rpo_seconds, r.lag_seconds))
}

#[test]
fn the_rpo_grows_while_the_process_server_is_down_and_recovers_after() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, 8 << 20, 9)?;
    let mut c = start(
        tmp.path(),
        &disk,
        Some(DEFAULT_RETENTION),
        &["--point-interval", "1s"],
    )?;
    wait_points(&c, 2, Duration::from_secs(120))?;
    let write = write_64k;
    // Replicating: the RPO is about the point interval.
    for i in 0..4 {
        write(&c, i)?;
        std::thread::sleep(Duration::from_millis(250));
    }
    let (before, _) = rpo(&c)?;
    let before = before.context("no RPO while protected with points")?;
    assert!(before < 5.0, "RPO {before} s while replicating");

    // The process server is gone while the source writes on: nothing new reaches the master
    // target, and its RPO counts the time since its newest point.
    c.ps.proc.kill();
    let mut i = write_for(&c, 4, Duration::from_secs(9))?;
    let (during, lag) = rpo(&c)?;
    let during = during.context("no RPO")?;
    // The newest point is from before the kill; the estimate of the source's clock may be
    // behind by a report's forwarding delay (about a second).
    assert!(
        during >= 6.5,
        "RPO {during} s after 9 s without a process server (lag measure {lag} s)"
    );
    // Prometheus sees it too.
    let metrics = haven_e2e::http_get(&format!("{}/metrics", c.mt.api), &c.mt.admin_token)?;
    let exported: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("haven_rpo_seconds{"))
        .and_then(|l| l.rsplit_once(' '))
        .context("no haven_rpo_seconds sample")?
        .1
        .parse()?;
    assert!(exported >= during, "{metrics}");
    // And its distribution over time: sampled every second, some samples above 5 s now; and
    // the records applied, each with its latency.
    let sample = |name: &str| -> Result<f64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("no {name} in {metrics}"))
    };
    let samples = sample("haven_rpo_sampled_seconds_count ")?;
    let within_5s = sample("haven_rpo_sampled_seconds_bucket{le=\"5\"} ")?;
    assert!(samples > within_5s, "no RPO sample above 5 s: {metrics}");
    assert!(
        sample("haven_apply_latency_seconds_count ")? > 0.0,
        "{metrics}"
    );

    // Back: the log drains, new points arrive, and the RPO falls again.
    c.ps.spawn()?;
    let recovered = |c: &Cluster, i: &mut u64, write_on: bool| -> Result<()> {
        poll(Duration::from_secs(90), Duration::from_millis(250), || {
            if write_on {
                write(c, *i)?;
                *i += 1;
            }
            Ok(match rpo(c)? {
                (Some(now), _) if now < 5.0 => Ok(()),
                (now, _) => Err(format!("the RPO did not recover: {now:?}")),
            })
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(c)))
    };
    recovered(&c, &mut i, true)?;

    // The agent is silent (stopped) while its process server runs on: the process server's
    // copy of its last report says nothing new, and the RPO grows again. It stops idle, every
    // write in a point, so the master target holds nothing uncovered that would age.
    std::thread::sleep(Duration::from_secs(3));
    let pid = c.agent.proc.pid().context("agent pid")?.to_string();
    let signal = |sig: &str| Command::new("kill").args([sig, &pid]).status();
    signal("-STOP")?;
    std::thread::sleep(Duration::from_secs(9));
    let silent = rpo(&c);
    signal("-CONT")?;
    let (silent, lag) = silent?;
    let silent = silent.context("no RPO")?;
    assert!(
        silent >= 6.0,
        "RPO {silent} s after 9 s without news of the source (lag measure {lag} s)"
    );
    recovered(&c, &mut i, false)?;
    Ok(())
}

#[test]
fn without_points_the_rpo_counts_the_writes_the_master_target_lacks() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    zero_disk(&disk, 8 << 20)?;
    // No points kept: a failover takes whatever the master target holds.
    let mut c = start(tmp.path(), &disk, None, &[])?;
    c.wait_caught_up(now_ms(), Duration::from_secs(120), |_, _| {})?;
    let write = write_64k;
    write(&c, 0)?;
    c.wait_caught_up(now_ms(), Duration::from_secs(60), |_, _| {})?;
    let (idle, _) = rpo(&c)?;
    let idle = idle.context("no RPO while protected")?;
    assert!(idle < 2.0, "RPO {idle} s with everything held");

    // The master target stops taking records (its process server still forwards the agent's
    // reports) while the source writes on: its own measure sees nothing, the RPO sees the
    // writes it lacks.
    c.mt.env
        .push(("HAVEN_FAILPOINTS".into(), "ingest=pause".into()));
    c.mt.restart()?;
    write_for(&c, 1, Duration::from_secs(8))?;
    let (behind, lag) = rpo(&c)?;
    let behind = behind.context("no RPO")?;
    assert_eq!(lag, 0.0, "the master target holds nothing new to measure");
    assert!(
        behind >= 6.0,
        "RPO {behind} s after 8 s of writes the master target does not hold"
    );

    // It takes records again: the RPO falls.
    c.mt.env.clear();
    c.mt.restart()?;
    poll(Duration::from_secs(60), Duration::from_millis(250), || {
        Ok(match rpo(&c)? {
            (Some(r), _) if r < 2.0 => Ok(()),
            (r, _) => Err(format!("the RPO did not fall: {r:?}")),
        })
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&c)))?;
    Ok(())
}

#[test]
fn retention_keeps_what_the_policy_says_as_time_passes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    zero_disk(&disk, 8 << 20)?;
    let clock = tmp.path().join("clock-offset");
    std::fs::write(&clock, "0")?;
    let mut c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            retention: Some(
                "window = \"4h\"\ntiers = [{ for_last = \"1h\", every = \"0s\" }, \
                 { for_last = \"4h\", every = \"1h\" }]"
                    .into(),
            ),
            agent_args: vec!["--point-interval".into(), "1s".into()],
            mt_env: vec![(
                "HAVEN_CLOCK_OFFSET_FILE".into(),
                clock.to_string_lossy().into_owned(),
            )],
            ..Default::default()
        },
    )?;
    wait_points(&c, 1, Duration::from_secs(120))?;
    for i in 0..6u64 {
        qemu_io(&c.agent.nbd, &[format!("write -P {} {}M 1M", i + 1, i)])?;
        std::thread::sleep(Duration::from_millis(700));
    }
    // No new points from here on.
    c.agent.proc.kill();
    std::thread::sleep(Duration::from_millis(1500));
    let all = list(&c)?;
    assert!(all.len() >= 5, "{all:?}");

    // Two hours later every point is in the hourly tier: the newest of each hour is kept.
    std::fs::write(&clock, (2 * 3600 * 1000).to_string())?;
    let hour = |p: &PointInfo| p.record.source_time_ms / 3_600_000;
    let mut want: Vec<u64> = Vec::new();
    for p in &all {
        if !all
            .iter()
            .any(|q| hour(q) == hour(p) && q.record.source_time_ms > p.record.source_time_ms)
        {
            want.push(p.record.point);
        }
    }
    poll(Duration::from_secs(10), Duration::from_millis(200), || {
        let got: Vec<u64> = list(&c)?.iter().map(|p| p.record.point).collect();
        Ok(if got == want {
            Ok(())
        } else {
            Err(format!("kept {got:?}, want {want:?}"))
        })
    })?;

    // Five hours later they are all outside the window: only the newest is kept (a source
    // away longer than the window stays recoverable), and the base replica advances to it.
    std::fs::write(&clock, (5 * 3600 * 1000).to_string())?;
    let newest = all.last().context("points")?.record;
    poll(Duration::from_secs(10), Duration::from_millis(200), || {
        let status = c.mt.status()?;
        let r = &status.master_target.as_ref().context("mt")?.replicas[0];
        Ok(if r.points == 1 && r.applied_seq == newest.seq {
            Ok(())
        } else {
            Err(format!(
                "points {} applied {} newest point's seq {}",
                r.points, r.applied_seq, newest.seq
            ))
        })
    })?;
    let kept: Vec<u64> = list(&c)?.iter().map(|p| p.record.point).collect();
    assert_eq!(kept, vec![newest.point]);
    Ok(())
}

#[test]
fn without_retention_failover_says_there_is_no_point() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    zero_disk(&disk, 4 << 20)?;
    let c = start(tmp.path(), &disk, None, &[])?;
    // Protected, and the master target knows the machine's name (from a forwarded report).
    poll(Duration::from_secs(60), Duration::from_millis(100), || {
        Ok((protected(&c) && item(&c).is_ok())
            .then_some(())
            .ok_or("not protected under its name".to_string()))
    })?;
    let e = haven_fails(&c, &["failover", "web01"]);
    assert!(
        e.contains(
            "item web01 has no recovery point: this master target keeps none (retention window 0s)"
        ),
        "{e}"
    );
    Ok(())
}

#[test]
fn app_consistent_points_run_the_hooks_around_the_tag() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    zero_disk(&disk, 4 << 20)?;
    let trace = tmp.path().join("hooks.log");
    let script = |name: &str| -> Result<PathBuf> {
        let path = tmp.path().join(name);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"$HAVEN_HOOK ${{HAVEN_POINT_RESULT:-}}\" >> {}\n",
                trace.display()
            ),
        )?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(path)
    };
    let (pre, post) = (script("pre.sh")?, script("post.sh")?);
    let c = start(
        tmp.path(),
        &disk,
        Some(DEFAULT_RETENTION),
        &[
            "--pre-script",
            &pre.to_string_lossy(),
            "--post-script",
            &post.to_string_lossy(),
        ],
    )?;
    wait_points(&c, 1, Duration::from_secs(120))?;
    let before = std::fs::read_to_string(&trace).unwrap_or_default();
    assert_eq!(before, "", "no app point was asked for yet");
    qemu_io(&c.agent.nbd, &["write -P 3 0 1M".into()])?;
    let copy = tmp.path().join("copy.raw");
    std::fs::copy(&disk, &copy)?;
    let out = c.mt.haven(&["point", "create", "web01", "--app"])?;
    let id: u64 = out.trim().parse()?;
    assert_eq!(std::fs::read_to_string(&trace)?, "pre \npost ok\n");
    let p = list(&c)?
        .into_iter()
        .find(|p| p.record.point == id)
        .context("the app point is listed")?;
    assert_eq!(p.record.kind, haven_engine::recovery::PointKind::App);
    let uri =
        c.mt.haven(&["failover", "test", "web01", "--point", &id.to_string()])?;
    let got = tmp.path().join("got.raw");
    export_to_file(uri.trim(), &got)?;
    assert!(images_equal(&copy, &got)?);
    c.mt.haven(&["failover", "cleanup", "web01"])?;
    Ok(())
}

#[test]
fn failover_during_the_initial_sync_says_to_wait() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    // Random data that cannot all be in flight: the master target reads nothing, so the
    // process server's cache fills and the agent's initial sync stalls.
    mixed_disk(&disk, 512 << 20, 11)?;
    let c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            retention: Some(DEFAULT_RETENTION.into()),
            ps_config: "cache_max_bytes = 67108864".into(),
            mt_env: vec![("HAVEN_FAILPOINTS".into(), "ingest=pause".into())],
            ..Default::default()
        },
    )?;
    // Wait until the master target has heard the agent's report (the item has a name).
    let e = poll(Duration::from_secs(60), Duration::from_millis(200), || {
        let e = haven_fails(&c, &["failover", "web01", "--point", "latest"]);
        Ok(if e.contains("no protected item") {
            Err(e)
        } else {
            Ok(e)
        })
    })?;
    assert!(
        e.contains("item web01 is in its initial sync (")
            && e.contains("% done) and has no recovery point yet: wait until `haven status` shows it protected"),
        "{e}"
    );
    let e = haven_fails(&c, &["failover", "test", "web01"]);
    assert!(e.contains("is in its initial sync"), "{e}");
    Ok(())
}
