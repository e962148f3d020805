//! Reprotect and failback, end to end with real processes: a machine protected from the
//! primary site fails over to the secondary (planned), runs there, is reprotected onto the disk
//! it left (only the blocks that differ are sent, and that disk stays as it was until the
//! first point after the comparison), fails back in place (planned: nothing lost), and is
//! reprotected to the secondary site again. A physical server's disk (a block device with
//! ext4) is failed back in place the same way.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use haven_e2e::{
    Agent, Cluster, ClusterOptions, ReverseWriter, Rng, default_bin_dir, images_equal, poll,
    qemu_io, run_ok, wait_for_point,
};

const SIZE: u64 = 64 << 20;
const CHUNK: u64 = 64 << 10;
const BLOCK: u64 = 4096;

/// A disk with `percent` of its 64 KiB chunks holding random data, the rest zero.
fn populated_disk(path: &Path, percent: u64, seed: u64) -> Result<()> {
    let f = fs::File::create(path)?;
    f.set_len(SIZE)?;
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; CHUNK as usize];
    for chunk in 0..SIZE / CHUNK {
        if rng.below(100) < percent {
            for b in buf.chunks_mut(8) {
                b.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            f.write_all_at(&buf, chunk * CHUNK)?;
        }
    }
    f.sync_all()?;
    Ok(())
}

/// Overwrites `count` distinct 4 KiB blocks of `path` with random data, as a machine running
/// without an agent would; returns the bytes changed.
fn scatter(path: &Path, count: u64, seed: u64) -> Result<u64> {
    let f = fs::OpenOptions::new().write(true).open(path)?;
    let mut rng = Rng(seed);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < count {
        picked.insert(rng.below(SIZE / BLOCK));
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for block in &picked {
        for b in buf.chunks_mut(8) {
            b.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        f.write_all_at(&buf, block * BLOCK)?;
    }
    f.sync_all()?;
    Ok(count * BLOCK)
}

/// A workload through an agent's export: `n` writes of 64 KiB, acknowledged.
fn workload(agent: &Agent, n: u64, pattern: u8) -> Result<()> {
    let commands: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "write -P {} {} 64k",
                pattern.wrapping_add(i as u8),
                (i * 7 + 3) % (SIZE / CHUNK) * CHUNK
            )
        })
        .collect();
    qemu_io(&agent.nbd, &commands)
}

/// Waits until `a` and `b` compare equal (`qemu-img compare`).
fn wait_equal(a: &Path, b: &Path) -> Result<()> {
    poll(Duration::from_secs(60), Duration::from_millis(200), || {
        Ok(match images_equal(a, b)? {
            true => Ok(()),
            false => Err(format!("{} and {} differ", a.display(), b.display())),
        })
    })
    .with_context(|| format!("{} and {} never compared equal", a.display(), b.display()))
}

/// Takes a point of web01 at `gateway` (retried while its source is not reachable yet, as
/// after a restart).
fn point_now(gateway: &haven_e2e::Gateway) -> Result<()> {
    poll(Duration::from_secs(60), Duration::from_millis(250), || {
        Ok(gateway
            .haven(&["point", "create", "web01"])
            .map(drop)
            .map_err(|e| format!("{e:#}")))
    })
}

/// Protects `disk` (its agent taking a point a second, the master target keeping them, joined
/// to a configuration server when `config_server`), writes `writes` blocks of 64 KiB through
/// the agent, and fails over, planned: the image, checked equal to the disk, and the cluster
/// with its agent stopped.
fn protect_and_fail_over(
    tmp: &Path,
    disk: &Path,
    config_server: bool,
    writes: u64,
) -> Result<(Cluster, PathBuf)> {
    let mut cluster = Cluster::start(
        tmp,
        disk,
        ClusterOptions {
            retention: Some("window = \"1h\"".into()),
            agent_args: vec!["--point-interval".into(), "1s".into()],
            config_server,
            ..ClusterOptions::default()
        },
    )?;
    if writes > 0 {
        workload(&cluster.agent, writes, 0x11)?;
    }
    wait_for_point(&cluster.mt, "web01")?;
    let out = cluster.mt.haven(&["failover", "web01", "--planned"])?;
    let image = PathBuf::from(out.trim());
    cluster.agent.proc.kill();
    assert!(
        images_equal(disk, &image)?,
        "a planned failover's image equals the source"
    );
    Ok((cluster, image))
}

/// Fails web01 back at `gateway`, planned and in place: the image must be `disk`.
fn fail_back(gateway: &haven_e2e::Gateway, disk: &Path) -> Result<()> {
    let out = gateway.haven(&["failover", "web01", "--planned", "--in-place"])?;
    assert_eq!(out.trim(), disk.display().to_string());
    Ok(())
}

struct Trip {
    cluster: Cluster,
    disk_a: PathBuf,
    image_b: PathBuf,
    /// Bytes changed on either side since the failover.
    changed: u64,
}

/// Protects `disk_a` (populated `percent` %), fails it over planned to the secondary site, and
/// changes blocks on both sides as a machine running there and a source that had writes the
/// failover left behind would.
fn failed_over(tmp: &Path, percent: u64) -> Result<Trip> {
    failed_over_with(tmp, percent, false)
}

/// [`failed_over`], the gateways joined to a configuration server when `config_server`.
fn failed_over_with(tmp: &Path, percent: u64, config_server: bool) -> Result<Trip> {
    let site_a = tmp.join("site-a");
    fs::create_dir_all(&site_a)?;
    let disk_a = site_a.join("web01.raw");
    populated_disk(&disk_a, percent, 11)?;
    let (cluster, image_b) = protect_and_fail_over(tmp, &disk_a, config_server, 32)?;
    let changed = scatter(&image_b, 64, 5)? + scatter(&disk_a, 16, 6)?;
    Ok(Trip {
        cluster,
        disk_a,
        image_b,
        changed,
    })
}

/// Reprotects the failed-over machine onto the disk it left: the reverse gateways, an agent on
/// the image, `haven reprotect`.
fn reprotect(trip: &Trip, tmp: &Path) -> Result<(haven_e2e::Reverse, Agent)> {
    let rev = trip
        .cluster
        .reverse(trip.disk_a.parent().context("site")?)?;
    let agent = reprotect_with(
        &trip.cluster.mt,
        &rev,
        &rev.mt.api,
        "web01.raw",
        &trip.image_b,
        &tmp.join("agent-b"),
        true,
    )?;
    Ok((rev, agent))
}

/// Reprotects web01, failed over at `from`'s master target (or through `from`, a
/// configuration server), onto `target` at `rev`'s master target (`to`: its API or gateway
/// name): an agent enrolled with `rev`'s process server in `dir`, `haven reprotect`, then the
/// agent started on `image`, `--seeded` when `seeded`. `haven reprotect` must print `image`.
fn reprotect_with(
    from: &haven_e2e::Gateway,
    rev: &haven_e2e::Reverse,
    to: &str,
    target: &str,
    image: &Path,
    dir: &Path,
    seeded: bool,
) -> Result<Agent> {
    let bins = default_bin_dir();
    let (server, id) = Agent::enroll_id(&bins, &rev.ps, dir, "web01")?;
    let out = from.haven(&[
        "reprotect",
        "web01",
        "--agent",
        &id,
        "--to",
        to,
        "--target",
        target,
    ])?;
    assert_eq!(out.trim(), image.display().to_string());
    let mut args: Vec<String> = vec!["--point-interval".into()];
    match seeded {
        true => args.extend(["1h".into(), "--seeded".into()]),
        false => args.push("1s".into()),
    }
    Agent::start_disks(&bins, Some(server), dir, image, &[], args)
}

#[test]
fn reprotect_sends_only_what_changed_on_a_sparse_disk() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let trip = failed_over(tmp.path(), 5)?;
    let before = fs::read(&trip.disk_a)?;
    let (rev, mut agent) = reprotect(&trip, tmp.path())?;
    let sent = agent.wait_protected()?;
    eprintln!(
        "5 % populated: {} bytes changed, {sent} sent by the comparison",
        trip.changed
    );
    assert!(
        sent >= trip.changed && sent <= 2 * trip.changed,
        "sent {sent} for {} changed",
        trip.changed
    );
    // Every difference is at the primary site, in its journal: the old disk is untouched.
    assert!(fs::read(&trip.disk_a)? == before, "the old source changed");
    point_now(&rev.mt)?;
    wait_equal(&trip.disk_a, &trip.image_b)?;
    Ok(())
}

#[test]
fn a_round_trip_fails_back_in_place_and_reprotects_again() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let trip = failed_over(tmp.path(), 90)?;
    let before = fs::read(&trip.disk_a)?;
    let (mut rev, mut agent) = reprotect(&trip, tmp.path())?;
    // Killed while comparing: each resumes, and the old disk is still the disk it was.
    agent.restart()?;
    rev.mt.restart()?;
    rev.ps.restart()?;
    // Production goes on at the secondary site while the comparison runs.
    let nbd = agent.nbd.clone();
    let writes = std::thread::spawn(move || {
        let commands: Vec<String> = (0..48u64)
            .map(|i| format!("write -P {} {} 4k", 0x20 + i, (i * 977 % 16384) * BLOCK))
            .collect();
        qemu_io(&nbd, &commands)
    });
    writes.join().expect("the workload thread")?;
    let sent = agent.wait_protected()?;
    eprintln!(
        "90 % populated: {} bytes changed, {sent} sent by the comparison",
        trip.changed
    );
    assert!(sent <= 2 * trip.changed, "sent {sent} for {}", trip.changed);
    rev.mt.restart()?;
    assert!(fs::read(&trip.disk_a)? == before, "the old source changed");

    // Production at the secondary site, through the agent, then a point: the old disk becomes
    // the image at that point.
    workload(&agent, 24, 0x40)?;
    point_now(&rev.mt)?;
    wait_equal(&trip.disk_a, &trip.image_b)?;
    let shown = rev.mt.haven(&["failover", "show", "web01"])?;
    assert!(shown.contains("web01 disk 1"), "{shown}");
    assert!(shown.contains("reprotected from"), "{shown}");

    // Failback: planned, in place. More writes first; none is lost.
    workload(&agent, 16, 0x70)?;
    fail_back(&rev.mt, &trip.disk_a)?;
    assert!(
        images_equal(&trip.disk_a, &trip.image_b)?,
        "the failback lost writes"
    );
    agent.proc.kill();

    // Reprotect to the secondary site again: the failover image is the replica, and nothing
    // differs.
    let bins = default_bin_dir();
    let dir = tmp.path().join("agent-a2");
    let (server, id) = Agent::enroll_id(&bins, &trip.cluster.ps, &dir, "web01")?;
    let root = trip.cluster.mt.data_dir.join("replicas");
    let rel = trip.image_b.strip_prefix(&root)?.display().to_string();
    let out = rev.mt.haven(&[
        "reprotect",
        "web01",
        "--agent",
        &id,
        "--to",
        &trip.cluster.mt.api,
        "--target",
        &rel,
    ])?;
    assert_eq!(out.trim(), trip.disk_a.display().to_string());
    let mut back = Agent::start_disks(
        &bins,
        Some(server),
        &dir,
        &trip.disk_a,
        &[],
        vec!["--seeded".into(), "--point-interval".into(), "1h".into()],
    )?;
    let sent = back.wait_protected()?;
    assert_eq!(sent, 0, "the disks were equal");
    workload(&back, 8, 0x90)?;
    point_now(&trip.cluster.mt)?;
    wait_equal(&trip.image_b, &trip.disk_a)?;

    // Each side keeps the history: the secondary's first item is reprotected.
    let items: Vec<serde_json::Value> = serde_json::from_str(&haven_e2e::http_get(
        &format!("{}/v1/items", trip.cluster.mt.api),
        &trip.cluster.mt.admin_token,
    )?)?;
    let states: Vec<&str> = items
        .iter()
        .filter_map(|i| i["item"]["state"].as_str())
        .collect();
    if !(states.contains(&"reprotected") && states.contains(&"protected")) {
        bail!("items at the secondary site: {states:?}");
    }
    Ok(())
}

/// A loop device over a file, detached when dropped.
struct Loop {
    device: String,
}

impl Loop {
    fn attach(file: &Path) -> Result<Loop> {
        let device = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(file))?
            .trim()
            .to_string();
        Ok(Loop { device })
    }

    /// Mounts it at `at`, runs `f` on the mounted folder, unmounts.
    fn with_mounted<T>(
        &self,
        at: &Path,
        options: &str,
        f: impl FnOnce(&Path) -> Result<T>,
    ) -> Result<T> {
        fs::create_dir_all(at)?;
        run_ok(
            Command::new("mount")
                .args(["-o", options, &self.device])
                .arg(at),
        )?;
        let out = f(at);
        run_ok(Command::new("umount").arg(at))?;
        out
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// File `n`'s content, version `v`: some of it incompressible.
fn content(n: u64, v: u64) -> Vec<u8> {
    let mut rng = Rng(n * 1000 + v + 1);
    (0..(32 << 10) * (1 + n % 4))
        .map(|i| match i % 2 {
            0 => rng.next_u64() as u8,
            _ => (n + v) as u8,
        })
        .collect()
}

#[test]
fn fails_back_to_a_physical_disk_holding_ext4() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let tmp = tmp.path();
    // The physical server's disk: a block device with ext4 and files.
    let backing = tmp.join("server-disk.img");
    fs::File::create(&backing)?.set_len(SIZE)?;
    let disk = Loop::attach(&backing)?;
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &disk.device]))?;
    let mut files: BTreeMap<String, Vec<u8>> = (0..12)
        .map(|n| (format!("file-{n}"), content(n, 0)))
        .collect();
    disk.with_mounted(&tmp.join("mnt-a"), "rw", |mnt| {
        for (name, data) in &files {
            fs::write(mnt.join(name), data)?;
        }
        Ok(())
    })?;

    let (cluster, image) = protect_and_fail_over(tmp, Path::new(&disk.device), false, 0)?;

    // The machine runs at the secondary site: files rewritten, added and removed there.
    {
        let at_b = Loop::attach(&image)?;
        at_b.with_mounted(&tmp.join("mnt-b"), "rw", |mnt| {
            for n in (0..12).step_by(3) {
                let data = content(n, 1);
                fs::write(mnt.join(format!("file-{n}")), &data)?;
                files.insert(format!("file-{n}"), data);
            }
            for n in 12..16 {
                let data = content(n, 1);
                fs::write(mnt.join(format!("file-{n}")), &data)?;
                files.insert(format!("file-{n}"), data);
            }
            fs::remove_file(mnt.join("file-1"))?;
            files.remove("file-1");
            Ok(())
        })?;
    }

    // The server is back: its disk is the seed, granted to the primary site's writer.
    let root = tmp.join("site-a");
    fs::create_dir_all(&root)?;
    let rev = cluster.reverse_with(ReverseWriter {
        devices: vec![PathBuf::from(&disk.device)],
        ..ReverseWriter::raw(&root)
    })?;
    let mut agent = reprotect_with(
        &cluster.mt,
        &rev,
        &rev.mt.api,
        &disk.device,
        &image,
        &tmp.join("agent-b"),
        true,
    )?;
    agent.wait_protected()?;
    point_now(&rev.mt)?;
    fail_back(&rev.mt, Path::new(&disk.device))?;
    agent.proc.kill();
    assert!(images_equal(Path::new(&disk.device), &image)?);

    // The server's own disk holds a clean filesystem with the files as they were last.
    run_ok(Command::new("e2fsck").args(["-fn", &disk.device]))?;
    disk.with_mounted(&tmp.join("mnt-a"), "ro", |mnt| {
        let mut found = BTreeMap::new();
        for entry in fs::read_dir(mnt)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name != "lost+found" {
                found.insert(name, fs::read(entry.path())?);
            }
        }
        if found != files {
            bail!(
                "files after failback: {:?}, expected {:?}",
                found.keys().collect::<Vec<_>>(),
                files.keys().collect::<Vec<_>>()
            );
        }
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_vmdk_disk_fails_back_in_its_format_after_a_raw_failover() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let tmp = tmp.path();
    // A VMware VM's disk: a monolithicFlat VMDK, whose flat extent the VM's agent protects.
    let site_a = tmp.join("datastore-a");
    fs::create_dir_all(&site_a)?;
    let raw = tmp.join("source.raw");
    populated_disk(&raw, 50, 23)?;
    let vmdk = site_a.join("web01.vmdk");
    run_ok(
        Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=monolithicFlat",
            ])
            .arg(&raw)
            .arg(&vmdk),
    )?;
    let flat = site_a.join("web01-flat.vmdk");
    // Failed over to a raw replica (a KVM host's disk), which then runs and changes.
    let (cluster, image) = protect_and_fail_over(tmp, &flat, false, 16)?;
    scatter(&image, 48, 9)?;

    // Back to VMware: the VMDK writer at the primary site opens the VM's own descriptor.
    let rev = cluster.reverse_with(ReverseWriter {
        format: "vmdk".into(),
        ..ReverseWriter::raw(&site_a)
    })?;
    let mut agent = reprotect_with(
        &cluster.mt,
        &rev,
        &rev.mt.api,
        "web01.vmdk",
        &image,
        &tmp.join("agent-b"),
        true,
    )?;
    agent.wait_protected()?;
    point_now(&rev.mt)?;
    workload(&agent, 8, 0x55)?;
    fail_back(&rev.mt, &vmdk)?;
    agent.proc.kill();
    // Still the VM's VMDK, valid, holding what the raw replica held last.
    run_ok(
        Command::new("qemu-img")
            .args(["check", "-f", "vmdk"])
            .arg(&vmdk),
    )?;
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "vmdk", "-F", "raw"])
            .arg(&vmdk)
            .arg(&image),
    )?;
    Ok(())
}

#[test]
fn an_agent_that_copies_instead_of_comparing_never_writes_the_seed() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let trip = failed_over(tmp.path(), 30)?;
    let before = fs::read(&trip.disk_a)?;
    let rev = trip
        .cluster
        .reverse(trip.disk_a.parent().context("site")?)?;
    // Started without --seeded: it copies, and its copy skips the zero blocks the old disk may
    // hold data in. Its first point must not release the seed.
    let mut agent = reprotect_with(
        &trip.cluster.mt,
        &rev,
        &rev.mt.api,
        "web01.raw",
        &trip.image_b,
        &tmp.path().join("agent-b"),
        false,
    )?;
    let error = poll(Duration::from_secs(60), Duration::from_millis(200), || {
        agent.proc.check_alive("haven-agent")?;
        let mt = rev.mt.status()?.master_target.unwrap_or_default();
        Ok(mt
            .replicas
            .first()
            .and_then(|r| r.error.clone())
            .filter(|e| e.contains("--seeded"))
            .ok_or_else(|| format!("no error yet: {:?}", mt.replicas.first())))
    })?;
    eprintln!("{error}");
    std::thread::sleep(Duration::from_secs(2));
    let status = rev.mt.status()?.master_target.unwrap_or_default();
    assert!(status.replicas.first().is_some_and(|r| r.seeding));
    assert!(fs::read(&trip.disk_a)? == before, "the seed was written");
    Ok(())
}

#[test]
fn through_the_configuration_server_the_name_follows_the_direction() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let trip = failed_over_with(tmp.path(), 20, true)?;
    let cs = trip.cluster.cs.as_ref().context("configuration server")?;
    let rev = trip
        .cluster
        .reverse(trip.disk_a.parent().context("site")?)?;
    // The primary site's master target has joined.
    cs.wait_joined("mt-a")?;
    // A gateway named at a master target is refused: only a configuration server forwards.
    let refused = haven_e2e::http_get(
        &format!("{}/v1/seeds?gateway=mt-a", rev.mt.api),
        &rev.mt.admin_token,
    )
    .expect_err("gateway= at a master target");
    assert!(
        format!("{refused:#}").contains("keeps its own seeds"),
        "{refused:#}"
    );
    let mut agent = reprotect_with(
        cs,
        &rev,
        "mt-a",
        "web01.raw",
        &trip.image_b,
        &tmp.path().join("agent-b"),
        true,
    )?;
    agent.wait_protected()?;
    // `web01` means the item that replicates now: at the primary site.
    point_now(cs)?;
    wait_equal(&trip.disk_a, &trip.image_b)?;
    workload(&agent, 8, 0x66)?;
    fail_back(cs, &trip.disk_a)?;
    assert!(images_equal(&trip.disk_a, &trip.image_b)?);
    let shown = cs.haven(&["failover", "show", "web01"])?;
    assert!(
        shown.contains("failed-over") && shown.contains("reprotected from"),
        "{shown}"
    );
    // Each change ran as a job of the configuration server.
    let jobs = cs.jobs()?;
    let reprotect = jobs
        .iter()
        .find(|j| j["kind"] == "reprotect")
        .with_context(|| format!("no reprotect job: {jobs:?}"))?;
    assert_eq!(reprotect["item"], "web01", "{reprotect}");
    Ok(())
}

/// The pipeline of the named round trip: web01 at the primary site (its disk `disk`), in group
/// `web`, in plan `back`, with a failback policy that shuts the replica down and reprotects.
fn named_pipeline(cluster: &Cluster, disk: &Path) -> Result<String> {
    Ok(format!(
        r#"{head}[[policy]]
name = "fast"
kind = "replication"
crash_consistent_interval = "1m"
app_consistent_interval = "off"

[[policy]]
name = "home"
kind = "failback"
shutdown_replica = true
reprotect_after_failback = true

[[machine]]
name = "web01"
site = "primary"
policy = "fast"
failback_policy = "home"
process_server = "ps1"
master_target = "mt1"
writer = "raw"
disks = [{disk:?}]

[[group]]
name = "web"
machines = ["web01"]

[[plan]]
name = "back"

[[plan.step]]
kind = "failover"
groups = ["web"]
"#,
        head = cluster.pipeline_head("named")?,
        disk = disk.display().to_string(),
    ))
}

/// The newest job of `kind` at the configuration server, which must have succeeded.
fn succeeded(cs: &haven_e2e::Gateway, kind: &str) -> Result<serde_json::Value> {
    let jobs = cs.jobs()?;
    let job = jobs
        .into_iter()
        .find(|j| j["kind"] == kind)
        .with_context(|| format!("no {kind} job"))?;
    if job["state"] != "succeeded" {
        bail!("the {kind} job did not succeed: {job:#}");
    }
    Ok(job)
}

#[test]
fn by_names_alone_a_group_reprotects_and_a_plan_fails_back_with_its_policy() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let trip = failed_over_with(tmp.path(), 20, true)?;
    let cs = trip.cluster.cs.as_ref().context("configuration server")?;
    let file = tmp.path().join("named.toml");
    fs::write(&file, named_pipeline(&trip.cluster, &trip.disk_a)?)?;
    cs.haven(&["apply", file.to_str().context("path")?])?;
    let _rev = trip
        .cluster
        .reverse(trip.disk_a.parent().context("site")?)?;
    cs.wait_joined("mt-a")?;
    let bins = default_bin_dir();

    // Without an agent of the replica machine, the reprotect says what to enroll.
    let refused = cs
        .haven(&["reprotect", "web"])
        .expect_err("no agent at the secondary site");
    assert!(
        format!("{refused:#}").contains("no agent of web01 at site secondary"),
        "{refused:#}"
    );
    // The replica machine's agent enrolls at its site; the group reprotects by name: the
    // server finds the agent, the master target of the primary site and the disk web01 left.
    let dir_b = tmp.path().join("agent-b");
    Agent::enroll_with_config_server(&bins, cs, "secondary", &dir_b, "web01")?;
    let out = cs.haven(&["reprotect", "web"])?;
    eprintln!("{out}");
    assert!(out.contains("replicates to mt-a now"), "{out}");
    succeeded(cs, "group-reprotect")?;
    let mut agent = Agent::start_disks(
        &bins,
        None,
        &dir_b,
        &trip.image_b,
        &[],
        vec!["--seeded".into(), "--point-interval".into(), "1h".into()],
    )?;
    let sent = agent.wait_protected()?;
    assert!(sent <= 2 * trip.changed, "sent {sent} for {}", trip.changed);
    point_now(cs)?;
    wait_equal(&trip.disk_a, &trip.image_b)?;

    // The agent that protects the primary site again enrolls there; the plan fails back with
    // web01's policy: planned in place (nothing lost), then reprotected to the secondary site.
    let dir_a = tmp.path().join("agent-a2");
    Agent::enroll_with_config_server(&bins, cs, "primary", &dir_a, "web01")?;
    workload(&agent, 16, 0x70)?;
    let out = cs.haven(&["failback", "back"])?;
    eprintln!("{out}");
    assert!(out.contains("done"), "{out}");
    let job = succeeded(cs, "plan-failback")?;
    let steps: Vec<&str> = job["steps"]
        .as_array()
        .context("steps")?
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(
        steps
            .iter()
            .any(|s| s.starts_with("failback web01 at mt-a"))
            && steps.iter().any(|s| s.starts_with("reprotect web01")),
        "{steps:?}"
    );
    assert!(
        images_equal(&trip.disk_a, &trip.image_b)?,
        "the failback lost writes"
    );
    agent.proc.kill();
    let mut back = Agent::start_disks(
        &bins,
        None,
        &dir_a,
        &trip.disk_a,
        &[],
        vec!["--seeded".into(), "--point-interval".into(), "1h".into()],
    )?;
    let sent = back.wait_protected()?;
    assert_eq!(sent, 0, "the disks were equal");
    workload(&back, 8, 0x90)?;
    point_now(cs)?;
    wait_equal(&trip.image_b, &trip.disk_a)?;
    Ok(())
}

#[test]
fn differences_larger_than_the_journal_stop_with_an_error_saying_so() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let site_a = tmp.path().join("site-a");
    fs::create_dir_all(&site_a)?;
    // A 128 MiB disk, half of it data.
    let disk_a = site_a.join("web01.raw");
    {
        let f = fs::File::create(&disk_a)?;
        f.set_len(2 * SIZE)?;
        let mut rng = Rng(41);
        let mut buf = vec![0u8; CHUNK as usize];
        for chunk in (0..2 * SIZE / CHUNK).step_by(2) {
            for b in buf.chunks_mut(8) {
                b.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            f.write_all_at(&buf, chunk * CHUNK)?;
        }
        f.sync_all()?;
    }
    let (cluster, image_b) = protect_and_fail_over(tmp.path(), &disk_a, false, 4)?;
    // Where it ran, the machine rewrote 96 MiB: more than the 64 MiB journal at the way back.
    {
        let f = fs::OpenOptions::new().write(true).open(&image_b)?;
        let mut rng = Rng(43);
        let mut buf = vec![0u8; CHUNK as usize];
        for chunk in 0..(96 << 20) / CHUNK {
            for b in buf.chunks_mut(8) {
                b.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            f.write_all_at(&buf, chunk * CHUNK)?;
        }
        f.sync_all()?;
    }
    let before = fs::read(&disk_a)?;
    let rev = cluster.reverse_with(ReverseWriter {
        mt_config: "journal_max_bytes = 67108864".into(),
        ..ReverseWriter::raw(&site_a)
    })?;
    let _agent = reprotect_with(
        &cluster.mt,
        &rev,
        &rev.mt.api,
        "web01.raw",
        &image_b,
        &tmp.path().join("agent-b"),
        true,
    )?;
    let error = poll(Duration::from_secs(120), Duration::from_millis(250), || {
        let status = rev.mt.status()?;
        let error = status
            .master_target
            .as_ref()
            .and_then(|m| m.replicas.first())
            .and_then(|r| r.error.clone());
        Ok(error
            .clone()
            .filter(|e| e.contains("filled the journal"))
            .ok_or_else(|| format!("no journal error yet: {error:?}")))
    })?;
    assert!(error.contains("raise journal_max_bytes"), "{error}");
    assert!(fs::read(&disk_a)? == before, "the old disk changed");
    Ok(())
}
