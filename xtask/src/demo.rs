//! `cargo xtask demo`: a disk protected across two sites on loopback — agent, process server,
//! master target, run from a configuration server — with a workload running through the
//! agent's NBD front end and a recovery point every second (the quickstart pipeline's policy,
//! applied at the configuration server); then a point taken on demand is presented over NBD at once (test
//! failover) and checked against the source, a planned failover stops the source and
//! materialises its final point, and the failover image is converted into every target format.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Result, bail};

/// Sample disk size.
const SIZE: u64 = 256 << 20;

/// Destinations: label, `-O`, `-o`, file name, qemu-img's format name.
const TARGETS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "VMware datastore",
        "vmdk",
        "subformat=monolithicSparse",
        "web01.vmdk",
        "vmdk",
    ),
    (
        "VMware export (OVF)",
        "vmdk",
        "subformat=streamOptimized",
        "web01-stream.vmdk",
        "vmdk",
    ),
    ("Hyper-V", "vhdx", "", "web01.vhdx", "vhdx"),
    (
        "Azure page blob",
        "vhd",
        "subformat=fixed",
        "web01.vhd",
        "vpc",
    ),
    ("KVM", "qcow2", "", "web01.qcow2", "qcow2"),
];

pub fn run(root: &Path) -> Result<()> {
    let haven = root.join("target/debug/haven");
    let dir = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    let source = dir.join("web01.raw");
    sample_disk(&source)?;
    println!(
        "== Haven demo: protect a {} MiB disk ({} MiB of data) across two sites on loopback\n",
        SIZE >> 20,
        allocated(&source)? >> 20
    );
    let replica = replicate(&dir.join("sites"), &source)?;

    println!(
        "\n== the failover image, converted into every target format through its sandboxed plugin\n"
    );
    let status = Command::new(&haven).args(["plugin", "list"]).status()?;
    if !status.success() {
        bail!("haven plugin list failed");
    }
    println!();
    let source = replica;

    println!(
        "{:<22} {:<42} {:>9} {:>10} {:>9}",
        "target", "image", "seconds", "on disk", "check"
    );
    for (label, format, options, name, qemu) in TARGETS {
        let image = dir.join(name);
        let mut convert = Command::new(&haven);
        convert.args(["image", "convert", "-O", format]);
        if !options.is_empty() {
            convert.args(["-o", options]);
        }
        let started = Instant::now();
        let status = convert.arg(&source).arg(&image).status()?;
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            bail!("converting to {format} failed");
        }
        // Haven's own compare, through the plugin that wrote the image…
        let ours = Command::new(&haven)
            .args(["image", "compare", "-f", "raw", "-F", format])
            .arg(&source)
            .arg(&image)
            .output()?;
        // …and qemu-img's, independently.
        let theirs = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", qemu])
            .arg(&source)
            .arg(&image)
            .status()?;
        let check = if ours.status.success() && theirs.success() {
            "identical"
        } else {
            "DIFFERS"
        };
        println!(
            "{label:<22} {:<42} {seconds:>9.2} {:>7} MiB {check:>9}",
            format!(
                "{name} ({format}{})",
                if options.is_empty() {
                    String::new()
                } else {
                    format!(", {}", options.trim_start_matches("subformat="))
                }
            ),
            allocated(&image)? >> 20
        );
        if check != "identical" {
            bail!("{name} does not match the source");
        }
    }
    println!(
        "\nevery image equals the source byte for byte (haven image compare and qemu-img compare);"
    );
    println!(
        "the Azure VHD is exactly {} MiB + its 512-byte footer; the images are in {}",
        SIZE >> 20,
        dir.display()
    );
    Ok(())
}

/// Runs the two sites and a workload; returns the caught-up replica's path.
fn replicate(root: &Path, disk: &Path) -> Result<std::path::PathBuf> {
    use haven_e2e::{Cluster, ClusterOptions, images_equal, now_ms, qemu_io};
    std::fs::create_dir_all(root)?;
    let started = Instant::now();
    let cluster = Cluster::start(
        root,
        disk,
        ClusterOptions {
            retention: Some("window = \"72h\"".into()),
            config_server: true,
            agent_via_config_server: true,
            ..Default::default()
        },
    )?;
    let cs = cluster
        .cs
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no configuration server"))?;
    println!(
        "configuration server {} (QUIC :{}): both gateways joined it",
        cs.api, cs.port
    );
    println!(
        "master target  {} (QUIC :{}), state in {}",
        cluster.mt.api,
        cluster.mt.port,
        cluster.mt.data_dir.display()
    );
    println!(
        "process server {} (QUIC :{}), enrolled with the master target by token",
        cluster.ps.api, cluster.ps.port
    );
    println!(
        "agent          web01, enrolled with the configuration server by token, placed on \
         the process server it names, serving {}\n",
        cluster.agent.nbd
    );

    // The deployment as code: web01's policy (a point every second) from the quickstart
    // pipeline, applied at the configuration server.
    let pipeline = root.join("quickstart.toml");
    std::fs::write(&pipeline, cluster.quickstart_pipeline()?)?;
    let applied = cs.haven(&["apply", &pipeline.display().to_string()])?;
    println!("$ haven apply examples/pipelines/quickstart.toml");
    for l in applied.lines() {
        println!("  {l}");
    }
    println!();

    // A workload writes through NBD while the initial pass runs: patterns, zeroes, trims.
    let nbd = cluster.agent.nbd.clone();
    let workload = std::thread::spawn(move || -> Result<u64> {
        let mut written = 0;
        for round in 0..8u64 {
            let mut cmds = Vec::new();
            for i in 0..16u64 {
                let off = ((round * 16 + i) * 1_572_864 + round * 4096) % (SIZE - (1 << 20));
                cmds.push(format!(
                    "write -P {} {off} 256k",
                    1 + (round * 16 + i) % 250
                ));
                written += 256 << 10;
            }
            cmds.push(format!("write -z {} 1M", (round + 3) << 24));
            cmds.push(format!("discard {} 1M", (round + 11) << 23));
            cmds.push("flush".into());
            qemu_io(&nbd, &cmds)?;
        }
        Ok(written)
    });
    let written = loop {
        if workload.is_finished() {
            break workload
                .join()
                .map_err(|_| anyhow::anyhow!("workload panicked"))??;
        }
        progress(&cluster)?;
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    println!(
        "workload done: {} MiB written through NBD while replicating",
        written >> 20
    );
    let since = now_ms();
    let deadline = Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let report = cluster.agent.report();
        let mt = cluster.mt.status()?;
        print_progress(report.as_ref(), &mt);
        let shipped = report
            .as_ref()
            .and_then(|r| r.disks.first())
            .is_some_and(|d| {
                report.as_ref().is_some_and(|r| r.time_ms > since)
                    && d.state == haven_net::stream::DiskState::Protected
                    && d.acked_seq == d.last_seq
            });
        if shipped {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agent did not ship everything in time");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    println!();
    // From here on the operator talks to the configuration server alone.
    let point = cs.haven(&["point", "create", "web01"])?;
    let point = point.trim();
    println!("\n$ haven point create web01   -> point {point}");
    let points = cs.haven(&["point", "list", "web01"])?;
    let lines: Vec<&str> = points.lines().collect();
    println!("$ haven point list web01   ({} points)", lines.len() - 1);
    for l in lines
        .iter()
        .take(1)
        .chain(lines.iter().skip(1).rev().take(3).rev())
    {
        println!("  {l}");
    }
    let asked = Instant::now();
    let uri = cs.haven(&["failover", "test", "web01", "--point", point])?;
    let uri = uri.trim().to_string();
    println!(
        "$ haven failover test web01 --point {point}   -> {uri} in {:.2} s (CLI round trip)",
        asked.elapsed().as_secs_f64()
    );
    let same = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(disk)
        .arg(&uri)
        .status()?;
    if !same.success() {
        bail!("the test failover at point {point} differs from the source");
    }
    println!("  qemu-img compare source {uri}: identical (replication goes on meanwhile)");
    cs.haven(&["failover", "cleanup", "web01"])?;
    println!("$ haven failover cleanup web01");

    let asked = Instant::now();
    let image = cs.haven(&["failover", "web01", "--planned"])?;
    let replica = cluster
        .replica()?
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join(image.trim()))
        .ok_or_else(|| anyhow::anyhow!("no storage root"))?;
    println!(
        "$ haven failover web01 --planned   -> {} in {:.1} s: the source stopped taking writes, \
         its last point was materialised",
        image.trim(),
        asked.elapsed().as_secs_f64()
    );
    if !images_equal(disk, &replica)? {
        bail!(
            "the failover image {} differs from the source",
            replica.display()
        );
    }
    let show = cs.haven(&["failover", "show", "web01"])?;
    println!("$ haven failover show web01");
    for l in show.lines() {
        println!("  {l}");
    }
    let ps = cluster.ps.status()?.process_server.unwrap_or_default();
    let d = ps.disks.first();
    println!("\n== summary");
    println!(
        "failed over after {:.1} s; qemu-img compare: the failover image equals the source byte \
         for byte",
        started.elapsed().as_secs_f64()
    );
    if let Some(d) = d {
        println!(
            "process server cache: {} MiB received, {} MiB stored after zstd + AES-256-GCM",
            d.received_bytes_total >> 20,
            d.stored_bytes_total >> 20
        );
    }
    println!("failover image: {}", replica.display());
    println!("\n$ haven status   (the configuration server: every gateway it runs)");
    let status = cs
        .haven_command()
        .args(["status", "--server", &cs.api])
        .output()?;
    print!("{}", String::from_utf8_lossy(&status.stdout));
    Ok(replica)
}

fn progress(cluster: &haven_e2e::Cluster) -> Result<()> {
    let report = cluster.agent.report();
    let mt = cluster.mt.status()?;
    print_progress(report.as_ref(), &mt);
    Ok(())
}

fn print_progress(
    report: Option<&haven_net::stream::Report>,
    mt: &haven_engine::status::GatewayStatus,
) {
    let Some(d) = report.and_then(|r| r.disks.first()) else {
        return;
    };
    let (lag, rate) = mt
        .master_target
        .as_ref()
        .and_then(|m| m.replicas.first())
        .map_or((0, 0.0), |r| (r.lag_bytes, r.apply_bytes_per_second));
    print!(
        "\r{:<13} sync {:>5.1}%  applying {:>7.1} MiB/s  lag {:>6} KiB  log {:>6} KiB   ",
        d.state.name(),
        100.0 * d.sync_done_bytes as f64 / d.size.max(1) as f64,
        rate / 1048576.0,
        lag >> 10,
        d.log_bytes >> 10
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

/// Bytes a file occupies on disk.
fn allocated(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// A sparse raw disk with a boot sector, text-like data, random data and holes.
fn sample_disk(path: &Path) -> Result<()> {
    let file = std::fs::File::create(path)?;
    file.set_len(SIZE)?;
    let mut boot = vec![0u8; 512];
    boot[510] = 0x55;
    boot[511] = 0xaa;
    file.write_all_at(&boot, 0)?;
    let text: Vec<u8> =
        b"Haven keeps the disks of protected machines replicated to a second site. "
            .iter()
            .copied()
            .cycle()
            .take(24 << 20)
            .collect();
    file.write_all_at(&text, 1 << 20)?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let random: Vec<u8> = (0..(8 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    file.write_all_at(&random, 100 << 20)?;
    file.write_all_at(&text[..4 << 20], SIZE - (4 << 20))?;
    file.sync_all()?;
    Ok(())
}
