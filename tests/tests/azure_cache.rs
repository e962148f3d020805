//! Azure → Azure through a cache storage account (Azurite): the agent ships over HTTP(S)
//! only, to a container; two gateways of the target region drain it to the master target,
//! one at a time under a lease; SIGKILLs of the agent and of the draining gateway lose
//! nothing, and the account is emptied of what the master target holds.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;

use haven_e2e::azurite::{self, Azurite};
use haven_e2e::{
    Cluster, ClusterOptions, Gateway, Rng, images_equal, mixed_disk, now_ms, poll, qemu_io,
};

const DISK: u64 = 32 << 20;
const CONTAINER: &str = "haven-cache";

/// The agent's arguments and the gateways' `[process_server.drain]` for Azurite's account.
fn cache_config(dir: &Path, azurite: &Azurite) -> (Vec<String>, String) {
    use std::os::unix::fs::PermissionsExt as _;
    let cache_key = dir.join("cache.key");
    std::fs::write(&cache_key, format!("{}\n", "5c".repeat(32))).unwrap();
    std::fs::set_permissions(&cache_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let account_key = dir.join("account.key");
    std::fs::write(&account_key, azurite::KEY).unwrap();
    let url = format!("{}/{CONTAINER}", azurite.endpoint());
    let agent = vec![
        "--cache-account".into(),
        url.clone(),
        "--cache-account-key-file".into(),
        account_key.display().to_string(),
        "--cache-key".into(),
        cache_key.display().to_string(),
    ];
    let gateway = format!(
        "\n[process_server.drain]\ncontainer_url = {url:?}\naccount_key_file = {:?}\n\
         cache_key_file = {:?}\nlease_seconds = 15\n",
        account_key.display().to_string(),
        cache_key.display().to_string()
    );
    (agent, gateway)
}

fn drains(g: &Gateway) -> usize {
    std::fs::read_to_string(&g.proc.log)
        .unwrap_or_default()
        .matches("draining the agent's streams")
        .count()
}

/// The names of the segments the account holds.
fn segments(azurite: &Azurite) -> Vec<String> {
    let out = azurite
        .python(&format!(
            "for b in client.get_container_client({CONTAINER:?}).list_blobs(name_starts_with='streams/'):\n    \
             print(b.name)"
        ))
        .unwrap();
    out.lines()
        .filter(|l| l.contains("/seg/"))
        .map(str::to_string)
        .collect()
}

fn workload(rng: &mut Rng, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let len = 1 + rng.below(128 << 10);
            let off = rng.below(DISK - len);
            match rng.below(8) {
                0 => format!("write -z {} {}", off / 512 * 512, (len / 512 + 1) * 512),
                1 => "flush".to_string(),
                _ => format!("write -P {} {off} {len}", rng.below(255) + 1),
            }
        })
        .collect()
}

#[test]
fn an_azure_vm_replicates_through_a_cache_account_any_gateway_drains() {
    let dir = tempfile::tempdir().unwrap();
    let azurite = Azurite::start().unwrap();
    let (agent_args, drain) = cache_config(dir.path(), &azurite);
    let disk = dir.path().join("shop-sql.raw");
    mixed_disk(&disk, DISK, 11).unwrap();
    let mut c = Cluster::start(
        dir.path(),
        &disk,
        ClusterOptions {
            config_server: true,
            second_process_server: true,
            agent_via_config_server: true,
            machine: Some("shop-sql".into()),
            agent_args,
            ps_config: drain,
            ..ClusterOptions::default()
        },
    )
    .unwrap();
    // The initial copy goes through the account.
    c.agent.wait_protected().unwrap();
    c.wait_caught_up(now_ms(), Duration::from_secs(120), |_, _| {})
        .unwrap();
    assert!(images_equal(&c.agent.disk, &c.replica().unwrap()).unwrap());

    // One gateway drains the agent; the other waits for its lease. `c.ps` is the waiting one
    // from here on.
    let ps2 = c.ps2.take().unwrap();
    let mut holder = match (drains(&c.ps), drains(&ps2)) {
        (1, 0) => std::mem::replace(&mut c.ps, ps2),
        (0, 1) => ps2,
        counts => panic!("exactly one gateway drains the agent, not {counts:?}"),
    };

    // A workload through SIGKILLs of the agent and of the draining gateway.
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (stop, nbd) = (stop.clone(), c.agent.nbd.clone());
        let mut rng = Rng(0xcac4e);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = qemu_io(&nbd, &workload(&mut rng, 20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    c.agent.restart().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    holder.proc.kill();
    std::thread::sleep(Duration::from_millis(1500));
    c.agent.restart().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    let done = now_ms();

    // The other gateway takes the agent over once the lease lapses (15 s).
    poll(Duration::from_secs(60), Duration::from_millis(250), || {
        Ok(match drains(&c.ps) {
            0 => Err("the waiting gateway has not taken the agent over".to_string()),
            _ => Ok(()),
        })
    })
    .unwrap();
    // The killed gateway comes back; it does not take the agent back while the lease holds.
    holder.spawn().unwrap();
    let drained_before = drains(&holder);
    c.wait_caught_up(done, Duration::from_secs(180), |_, _| {})
        .unwrap();
    let replica = c.replica().unwrap();
    assert!(
        images_equal(&c.agent.disk, &replica).unwrap(),
        "the replica differs from the source after the kills"
    );
    // The agent's reports reach the master target through the account too.
    poll(Duration::from_secs(30), Duration::from_millis(250), || {
        let mt = c.mt.status()?.master_target.context("no master target")?;
        let r = mt.replicas.first().context("no replica")?;
        Ok(match (r.machine_name.as_str(), r.state()) {
            ("shop-sql", "protected") => Ok(()),
            other => Err(format!("the replica shows {other:?}")),
        })
    })
    .unwrap();
    // A point on request reaches the agent through the account, and its tag comes back
    // through it, drained by the gateway that took over. (This master target keeps no points,
    // window 0s, so that its replica follows the stream: it says the point arrived.)
    let e =
        c.mt.haven(&["point", "create", "shop-sql"])
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("the point arrived but retention dropped it at once"),
        "{e}"
    );
    // What the master target holds is freed from the account.
    poll(Duration::from_secs(30), Duration::from_millis(250), || {
        let left = segments(&azurite);
        Ok(match left.is_empty() {
            true => Ok(()),
            false => Err(format!("segments left in the account: {left:?}")),
        })
    })
    .unwrap();
    assert_eq!(
        drains(&holder),
        drained_before,
        "the restarted gateway took the agent back"
    );
}
