//! End to end: who may replicate. Real processes, real QUIC with mutual TLS.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use haven_e2e::{Cluster, ClusterOptions, default_bin_dir, free_tcp_port, mixed_disk, now_ms};

const CATCH_UP: Duration = Duration::from_secs(120);

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_revoked_agent_is_cut_off_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("web01.raw");
    mixed_disk(&disk, 16 << 20, 11).unwrap();
    let mut c = Cluster::start(dir.path(), &disk, ClusterOptions::default()).unwrap();
    c.wait_caught_up(now_ms(), CATCH_UP, |_, _| {}).unwrap();
    let ps = c.ps.status().unwrap().process_server.unwrap();
    let agent_id = ps.disks[0].agent_id.clone();

    let list = c.ps.haven(&["agent", "list"]).unwrap();
    assert!(
        list.contains(&agent_id) && list.contains("enrolled"),
        "{list}"
    );
    c.ps.haven(&["agent", "revoke", &agent_id]).unwrap();
    let list = c.ps.haven(&["agent", "list"]).unwrap();
    assert!(list.contains("revoked"), "{list}");

    // The live connection is cut and every reconnection refused; the agent says why.
    let message = wait_for("the agent to report the revocation", CATCH_UP, || {
        let r = c.agent.report()?;
        r.disks[0].message.clone().filter(|m| m.contains("revoked"))
    });
    assert!(message.contains("enroll again"), "{message}");
    let ps = c.ps.status().unwrap().process_server.unwrap();
    assert!(!ps.disks[0].agent_connected, "{ps:?}");
    // The workload still runs; nothing more reaches the process server.
    let before = ps.disks[0].durable_seq;
    haven_e2e::qemu_io(&c.agent.nbd, &["write -P 0x11 0 64k".to_string()]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let ps = c.ps.status().unwrap().process_server.unwrap();
    assert_eq!(ps.disks[0].durable_seq, before);
}

#[test]
fn an_agent_of_another_site_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("web01.raw");
    mixed_disk(&disk, 8 << 20, 12).unwrap();
    let c = Cluster::start(dir.path(), &disk, ClusterOptions::default()).unwrap();

    // This agent enrolls with the secondary site's CA, then tries the primary's process server.
    let stranger = dir.path().join("stranger");
    let bins = default_bin_dir();
    let token = c.mt.token().unwrap();
    let out = Command::new(bins.join("haven-agent"))
        .args(["enroll", "--data-dir"])
        .arg(&stranger)
        .args(["--server", &format!("127.0.0.1:{}", c.mt.port)])
        .args(["--token", &token, "--machine-name", "stranger"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other = dir.path().join("other.raw");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mut proc = Command::new(bins.join("haven-agent"))
        .args(["protect", "--data-dir"])
        .arg(&stranger)
        .arg("--disk")
        .arg(&other)
        .args(["--server", &format!("127.0.0.1:{}", c.ps.port)])
        .args(["--listen", &format!("127.0.0.1:{}", free_tcp_port())])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stranger.log")).unwrap())
        .spawn()
        .unwrap();
    let status = stranger.join("status.json");
    let log = dir.path().join("stranger.log");
    let what = format!("the refusal (agent log {})", log.display());
    let message = wait_for(&what, CATCH_UP, || {
        if let Ok(Some(s)) = proc.try_wait() {
            panic!("{s}: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        let text = std::fs::read_to_string(Path::new(&status)).ok()?;
        let r: haven_net::stream::Report = serde_json::from_str(&text).ok()?;
        r.disks[0].message.clone().filter(|m| m.contains("site CA"))
    });
    let _ = proc.kill();
    let _ = proc.wait();
    assert!(
        message.contains("certificate is not from the site CA this agent enrolled with"),
        "{message}"
    );
    // The process server knows only the enrolled agent's disk.
    let ps = c.ps.status().unwrap().process_server.unwrap();
    assert_eq!(ps.disks.len(), 1, "{ps:?}");
    assert_eq!(ps.disks[0].machine_name, "web01");
}
