//! End to end: Haven's NBD exports as standard clients see them — libnbd's `nbdinfo`,
//! `nbdcopy` and Python binding, and `qemu-img` — against the agent's export and a test
//! failover's, with real processes on loopback.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use haven_e2e::nbd::NbdClient;
use haven_e2e::{Cluster, ClusterOptions, images_equal, now_ms, poll, run_ok};
use haven_engine::recovery::PointInfo;
use haven_net::stream::DiskState;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Debian's Python, which has libnbd's binding (`python3-libnbd`); a `python3` earlier in
/// `PATH` may not.
const PYTHON: &str = "/usr/bin/python3";

/// Runs a client tool; when it is missing, the error names the Debian package that has it.
fn tool(program: &str, args: &[&str]) -> Result<String> {
    let package = match program {
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        PYTHON => "python3-libnbd",
        _ => "qemu-utils",
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    match run_ok(&mut cmd) {
        Err(e) if which(program).is_none() => {
            bail!("{program} is missing (install the Debian package {package}): {e:#}")
        }
        other => other,
    }
}

fn which(program: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One extent of `nbdinfo --map --json`: start, length, type (the context's flags).
type Extent = (u64, u64, u32);

/// The map of `uri` in `context` (`base:allocation` when `None`), through `nbdinfo`.
fn map(uri: &str, context: Option<&str>) -> Result<Vec<Extent>> {
    let flag = context.map_or_else(|| "--map".to_string(), |c| format!("--map={c}"));
    let out = tool("nbdinfo", &[&flag, "--json", uri])?;
    let v: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    v.as_array()
        .context("nbdinfo --map --json printed no array")?
        .iter()
        .map(|e| {
            Ok((
                e["offset"].as_u64().context("offset")?,
                e["length"].as_u64().context("length")?,
                e["type"].as_u64().context("type")? as u32,
            ))
        })
        .collect()
}

/// The ranges `start..end` of `map` whose type has none of `mask`'s bits, merged where they
/// touch.
fn ranges_without(map: &[Extent], mask: u32) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(start, len, flags) in map {
        if flags & mask != 0 {
            continue;
        }
        match out.last_mut() {
            Some((_, end)) if *end == start => *end += len,
            _ => out.push((start, start + len)),
        }
    }
    out
}

/// The ranges with `bit` set, merged.
fn ranges_with(map: &[Extent], bit: u32) -> Vec<(u64, u64)> {
    let flipped: Vec<Extent> = map.iter().map(|&(s, l, f)| (s, l, f ^ bit)).collect();
    ranges_without(&flipped, bit)
}

/// `haven-gateway nbd-cert` from the site CA in `data_dir`, into `out`.
fn nbd_cert(data_dir: &Path, out: &Path, what: &[&str]) -> Result<()> {
    run_ok(
        Command::new(haven_e2e::default_bin_dir().join("haven-gateway"))
            .args(["nbd-cert", "--data-dir"])
            .arg(data_dir)
            .arg("--out")
            .arg(out)
            .args(what),
    )?;
    Ok(())
}

/// `MIB` bytes of a pattern unique to `seed`.
fn pattern(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..MIB / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// Writes `count` MiB of patterns at `at` through the agent's export, flushed.
fn write_mib(c: &Cluster, at: u64, count: u64) -> Result<()> {
    let mut client = NbdClient::connect(&format!("127.0.0.1:{}", c.agent.nbd_port), "disk")?;
    for i in 0..count {
        client.write(at + i * MIB, &pattern(at / MIB + i))?;
    }
    client.flush()?;
    client.disconnect()
}

fn wait_protected(c: &mut Cluster) -> Result<()> {
    poll(Duration::from_secs(300), Duration::from_millis(100), || {
        c.agent.proc.check_alive("haven-agent")?;
        let done = c.agent.report().is_some_and(|r| {
            r.disks
                .iter()
                .all(|d| d.state == DiskState::Protected && d.acked_seq == d.last_seq)
        });
        // The process server acknowledged it all; the master target must hold the item too
        // before points are asked of it.
        let done = done
            && c.mt.status().is_ok_and(|s| {
                s.master_target
                    .is_some_and(|m| m.replicas.iter().any(|r| r.machine_name == "web01"))
            });
        Ok(if done {
            Ok(())
        } else {
            Err("not protected".to_string())
        })
    })
}

fn sparse_disk(path: &Path, size: u64) -> Result<()> {
    File::create(path)?.set_len(size)?;
    Ok(())
}

#[test]
fn the_agents_export_maps_its_holes_and_four_connections_share_one_flush() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("source.raw");
    sparse_disk(&disk, 64 * MIB)?;
    let mut c = Cluster::start(&dir.path().join("sites"), &disk, ClusterOptions::default())?;
    wait_protected(&mut c)?;
    write_mib(&c, 8 * MIB, 2)?;
    write_mib(&c, 40 * MIB, 1)?;

    let info: serde_json::Value =
        serde_json::from_str(&tool("nbdinfo", &["--json", &c.agent.nbd])?)?;
    assert_eq!(info["structured"], true, "{info}");
    let export = &info["exports"][0];
    assert_eq!(export["can_multi_conn"], true, "{export}");
    assert_eq!(export["can_fast_zero"], true, "{export}");
    assert!(
        export["contexts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "base:allocation")),
        "{export}"
    );
    // What was written is data; the rest of the sparse backing file is holes.
    let m = map(&c.agent.nbd, None)?;
    assert_eq!(
        ranges_without(&m, 1),
        [(8 * MIB, 10 * MIB), (40 * MIB, 41 * MIB)],
        "{m:?}"
    );

    // Four connections write, one flushes, the agent is killed at once: all four writes
    // survive, on the disk and at the master target.
    let pid = c.agent.proc.pid().context("the agent runs")?;
    let script = r#"
import nbd, os, signal, sys
uri, pid = sys.argv[1], int(sys.argv[2])
handles = []
for i in range(4):
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
assert all(h.can_multi_conn() for h in handles)
for i, h in enumerate(handles):
    h.pwrite(bytes([0x41 + i]) * (1 << 20), (16 + i) << 20)
handles[0].flush()
os.kill(pid, signal.SIGKILL)
print("killed after the flush")
"#;
    let out = tool(PYTHON, &["-c", script, &c.agent.nbd, &pid.to_string()])?;
    assert!(out.contains("killed after the flush"), "{out}");
    let since = now_ms();
    c.agent.restart()?;
    let mut client = NbdClient::connect(&format!("127.0.0.1:{}", c.agent.nbd_port), "disk")?;
    for i in 0..4u64 {
        let got = client.read((16 + i) * MIB, MIB as u32)?;
        assert!(
            got.iter().all(|&b| b == 0x41 + i as u8),
            "connection {i}'s write is lost"
        );
    }
    client.disconnect()?;
    c.wait_caught_up(since, Duration::from_secs(120), |_, _| {})?;
    assert!(images_equal(&c.replica()?, &disk)?, "the replica differs");
    Ok(())
}

fn points(c: &Cluster) -> Result<Vec<PointInfo>> {
    Ok(serde_json::from_str(
        &c.mt.haven(&["point", "list", "web01", "--json"])?,
    )?)
}

fn create_point(c: &Cluster) -> Result<u64> {
    Ok(c.mt.haven(&["point", "create", "web01"])?.trim().parse()?)
}

/// Bytes the process has read so far (`rchar` of /proc/PID/io).
fn bytes_read(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .context("no rchar in /proc/PID/io")?
        .trim()
        .parse()
        .context("rchar")
}

#[test]
fn a_test_failover_export_maps_copies_sparsely_and_lists_changes_between_points() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("source.raw");
    let size = 16 * GIB;
    sparse_disk(&disk, size)?;
    let mut c = Cluster::start(
        &dir.path().join("sites"),
        &disk,
        ClusterOptions {
            retention: Some("window = \"72h\"".into()),
            ..ClusterOptions::default()
        },
    )?;
    wait_protected(&mut c)?;
    // 64 MiB of data before the first point, 8 MiB more (some over it) before the second.
    let before = [(GIB, 24), (5 * GIB + 3 * MIB, 32), (15 * GIB, 8)];
    let after = [(GIB + 4 * MIB, 4), (9 * GIB, 4)];
    for (at, n) in before {
        write_mib(&c, at, n)?;
    }
    let first = create_point(&c)?;
    for (at, n) in after {
        write_mib(&c, at, n)?;
    }
    let second = create_point(&c)?;
    assert!(points(&c)?.iter().any(|p| p.record.point == first));

    let uri =
        c.mt.haven(&["failover", "test", "web01", "--point", &second.to_string()])?;
    let uri = uri.trim();

    // Allocation: data exactly where the workload wrote.
    let mut written: Vec<(u64, u64)> = before
        .iter()
        .chain(&after)
        .map(|&(at, n)| (at, at + n * MIB))
        .collect();
    written.sort();
    let merged = written
        .iter()
        .fold(Vec::<(u64, u64)>::new(), |mut v, &(s, e)| {
            match v.last_mut() {
                Some((_, end)) if *end >= s => *end = (*end).max(e),
                _ => v.push((s, e)),
            }
            v
        });
    let m = map(uri, None)?;
    assert_eq!(ranges_without(&m, 1), merged, "base:allocation {m:?}");
    let qmap: serde_json::Value = serde_json::from_str(&tool(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", uri],
    )?)?;
    let qdata: Vec<(u64, u64)> = qmap
        .as_array()
        .context("qemu-img map printed no array")?
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| {
            let s = e["start"].as_u64().unwrap_or(0);
            (s, s + e["length"].as_u64().unwrap_or(0))
        })
        .collect();
    assert_eq!(qdata, merged, "qemu-img map");

    // Changes between the points: exactly the second batch.
    let context = format!("haven:changed-since:{first}");
    let changed = map(uri, Some(&context))?;
    let want: Vec<(u64, u64)> = after.iter().map(|&(at, n)| (at, at + n * MIB)).collect();
    assert_eq!(ranges_with(&changed, 1), want, "{context} {changed:?}");

    // Copies out read the data only and equal the source.
    let mt_pid = c.mt.proc.pid().context("the master target runs")?;
    let copy = dir.path().join("copy.raw");
    let read_before = bytes_read(mt_pid)?;
    tool("nbdcopy", &[uri, copy.to_str().context("path")?])?;
    let read = bytes_read(mt_pid)? - read_before;
    assert!(
        read < GIB,
        "nbdcopy of a 16 GiB point holding 72 MiB made the master target read {read} bytes"
    );
    assert!(images_equal(&copy, &disk)?, "nbdcopy's copy differs");
    std::fs::remove_file(&copy)?;
    let qcow = dir.path().join("copy.qcow2");
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            uri,
            qcow.to_str().context("path")?,
        ],
    )?;
    let out = tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            qcow.to_str().context("path")?,
            disk.to_str().context("path")?,
        ],
    )?;
    assert!(out.contains("identical"), "{out}");
    let allocated = std::fs::metadata(&qcow).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    })?;
    assert!(
        allocated < 256 * MIB,
        "the qcow2 copy of 72 MiB of data allocates {allocated} bytes: holes were not kept"
    );
    c.mt.haven(&["failover", "cleanup", "web01"])?;
    Ok(())
}

#[test]
fn a_tls_export_serves_site_clients_and_refuses_others() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("source.raw");
    sparse_disk(&disk, 64 * MIB)?;
    let mut c = Cluster::start(
        &dir.path().join("sites"),
        &disk,
        ClusterOptions {
            retention: Some("window = \"72h\"".into()),
            mt_config: "nbd_tls = true".into(),
            ..ClusterOptions::default()
        },
    )?;
    wait_protected(&mut c)?;
    write_mib(&c, 4 * MIB, 1)?;
    create_point(&c)?;
    let uri =
        c.mt.haven(&["failover", "test", "web01", "--point", "latest"])?;
    let uri = uri.trim().to_string();
    assert!(uri.starts_with("nbds://"), "{uri}");

    let bins = haven_e2e::default_bin_dir();
    let certs = dir.path().join("client");
    nbd_cert(&c.mt.data_dir, &certs, &["--client", "backup-host"])?;
    let with_certs = format!("{uri}?tls-certificates={}", certs.display());
    let m = map(&with_certs, None)?;
    assert_eq!(ranges_without(&m, 1), [(4 * MIB, 5 * MIB)], "{m:?}");

    // qemu with the same credentials reads what was written.
    let copy = dir.path().join("copy.raw");
    let (host_port, export) = uri
        .trim_start_matches("nbds://")
        .split_once('/')
        .context("export in the URI")?;
    let (host, port) = host_port.rsplit_once(':').context("port in the URI")?;
    tool(
        "qemu-img",
        &[
            "convert",
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                certs.display()
            ),
            "--image-opts",
            &format!("driver=nbd,host={host},port={port},export={export},tls-creds=tls0"),
            "-O",
            "raw",
            copy.to_str().context("path")?,
        ],
    )?;
    let mut want = vec![0u8; 64 * MIB as usize];
    want[4 * MIB as usize..5 * MIB as usize].copy_from_slice(&pattern(4));
    let got = std::fs::read(&copy)?;
    assert!(got == want, "qemu's copy over TLS differs");

    // Without TLS, and with a certificate from another site's CA: refused.
    let plain = format!("nbd://{host_port}/{export}");
    let err = tool("nbdinfo", &[&plain]).expect_err("a plain client must be refused");
    assert!(format!("{err:#}").contains("TLS"), "{err:#}");
    let other = dir.path().join("other-site");
    run_ok(
        Command::new(bins.join("haven-gateway"))
            .args(["init", "--site", "other", "--data-dir"])
            .arg(&other),
    )?;
    let other_certs = dir.path().join("other-client");
    nbd_cert(&other, &other_certs, &["--client", "intruder"])?;
    // The other site's CA does not know this gateway either: trust ours, show theirs.
    std::fs::copy(certs.join("ca-cert.pem"), other_certs.join("ca-cert.pem"))?;
    let foreign = format!("{uri}?tls-certificates={}", other_certs.display());
    tool("nbdinfo", &[&foreign]).expect_err("a client of another CA must be refused");
    c.mt.haven(&["failover", "cleanup", "web01"])?;
    Ok(())
}

#[test]
fn the_agent_serves_plain_nbd_on_loopback_only_and_tls_with_site_certificates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("d.raw");
    sparse_disk(&disk, 16 * MIB)?;
    let out = Command::new(haven_e2e::default_bin_dir().join("haven-agent"))
        .args(["serve", "--disk"])
        .arg(&disk)
        .arg("--log-dir")
        .arg(dir.path().join("log"))
        .args(["--listen", "0.0.0.0:0"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("0.0.0.0:0") && err.contains("--tls-dir"),
        "the refusal should name the address and the way out: {err}"
    );
    // Nothing was written to the disk.
    let mut buf = vec![0u8; 4096];
    File::open(&disk)?.read_exact_at(&mut buf, 0)?;
    assert!(buf.iter().all(|&b| b == 0));

    // With certificates from the site CA it serves TLS, to the site's clients only.
    let bins = haven_e2e::default_bin_dir();
    let site = dir.path().join("site");
    run_ok(
        Command::new(bins.join("haven-gateway"))
            .args(["init", "--site", "primary", "--data-dir"])
            .arg(&site),
    )?;
    let certs = dir.path().join("certs");
    nbd_cert(
        &site,
        &certs,
        &["--server", "127.0.0.1", "--client", "hypervisor"],
    )?;
    let port = haven_e2e::free_tcp_port();
    let ready = dir.path().join("ready");
    let mut agent = Command::new(bins.join("haven-agent"))
        .args(["serve", "--disk"])
        .arg(&disk)
        .arg("--log-dir")
        .arg(dir.path().join("log"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--tls-dir"])
        .arg(&certs)
        .arg("--ready-file")
        .arg(&ready)
        .spawn()?;
    let served = poll(Duration::from_secs(30), Duration::from_millis(50), || {
        Ok(std::fs::read_to_string(&ready).map_err(|_| "the agent is not ready".to_string()))
    });
    let result = (|| -> Result<()> {
        let uri = served?.trim().to_string();
        assert_eq!(uri, format!("nbds://127.0.0.1:{port}/disk"));
        let with_certs = format!("{uri}?tls-certificates={}", certs.display());
        let script = r#"
import nbd, sys
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
h.pwrite(b"\x5a" * 4096, 8192)
h.flush()
assert h.pread(4096, 8192) == b"\x5a" * 4096
print("ok")
"#;
        let out = tool(PYTHON, &["-c", script, &with_certs])?;
        assert_eq!(out.trim(), "ok");
        let plain = format!("nbd://127.0.0.1:{port}/disk");
        tool("nbdinfo", &[&plain]).expect_err("a plain client must be refused");
        let mut buf = vec![0u8; 4096];
        File::open(&disk)?.read_exact_at(&mut buf, 8192)?;
        assert!(
            buf.iter().all(|&b| b == 0x5a),
            "the write over TLS is not on the disk"
        );
        Ok(())
    })();
    let _ = agent.kill();
    let _ = agent.wait();
    result
}
