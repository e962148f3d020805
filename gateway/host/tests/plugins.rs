//! The plugin host against real components (built by `cargo xtask build`, see `plugin()`),
//! real files and qemu-img as the reference.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use haven_host::{
    Access, CacheOutcome, Grants, Host, HostConfig, LoadError, PluginError, PluginSpec, TrapKind,
};
use haven_image::{ErrorKind, ExtentState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The component built for `crate_name` by `cargo xtask build`.
fn plugin(crate_name: &str) -> PathBuf {
    let dir = std::env::var_os("HAVEN_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip2/release")
        });
    let path = dir.join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(
        path.exists(),
        "{} is missing: build the plugins with `cargo xtask build`",
        path.display()
    );
    path
}

fn spec(name: &str, crate_name: &str, grants: Grants) -> PluginSpec {
    PluginSpec {
        name: name.into(),
        path: plugin(crate_name),
        grants,
        settings: Default::default(),
    }
}

fn storage(root: &Path) -> Grants {
    Grants {
        storage_root: Some(root.to_owned()),
        ..Grants::default()
    }
}

fn host() -> Host {
    Host::new(HostConfig::default()).expect("host")
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One operation of the raw writer test, applied both through Haven and through qemu-io.
enum Op {
    Write { offset: u64, len: u64, pattern: u8 },
    Zero { offset: u64, len: u64 },
}

#[test]
fn raw_writer_matches_qemu_io() {
    const SIZE: u64 = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(0x4a7e);
    let mut ops = Vec::new();
    for i in 0..200 {
        // Sector-aligned offsets and lengths, most of them not aligned to 4 KiB or to anything
        // larger; a few large writes; one op in four zeroes a range.
        let sectors = if i % 17 == 0 {
            rng.random_range(1..4096)
        } else {
            rng.random_range(1..64)
        };
        let len = sectors * 512;
        let offset = rng.random_range(0..(SIZE - len) / 512) * 512;
        if i % 4 == 3 {
            ops.push(Op::Zero { offset, len });
        } else {
            ops.push(Op::Write {
                offset,
                len,
                pattern: rng.random_range(1..=255),
            });
        }
    }

    // The reference: qemu-io on a raw file.
    let reference = dir.path().join("reference.img");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&reference)
        .arg(SIZE.to_string()));
    let mut qemu_io = Command::new("qemu-io");
    qemu_io.args(["-f", "raw"]);
    for op in &ops {
        let c = match op {
            Op::Write {
                offset,
                len,
                pattern,
            } => format!("write -P {pattern} {offset} {len}"),
            Op::Zero { offset, len } => format!("write -z {offset} {len}"),
        };
        qemu_io.args(["-c", &c]);
    }
    run(qemu_io.arg(&reference));

    // Haven: the raw plugin through the host, data lent by buffer handle.
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let host = host();
    let mut raw = host
        .load_writer(&spec("raw", "haven-raw", storage(&root)))
        .unwrap();
    let info = raw.describe().unwrap();
    assert_eq!(info.name, "raw");
    let disk = raw.create("haven.img", SIZE, 512, &[]).unwrap();
    for op in &ops {
        match *op {
            Op::Write {
                offset,
                len,
                pattern,
            } => {
                let mut data = vec![pattern; len as usize];
                raw.write(&disk, offset, &mut data).unwrap();
                assert_eq!(data.len(), len as usize, "the host gets its buffer back");
            }
            Op::Zero { offset, len } => raw.write_zeroes(&disk, offset, len, true).unwrap(),
        }
    }
    raw.flush(&disk).unwrap();

    // Reads through the plugin return what was written.
    let mut expected = vec![0u8; SIZE as usize];
    for op in &ops {
        match *op {
            Op::Write {
                offset,
                len,
                pattern,
            } => expected[offset as usize..(offset + len) as usize].fill(pattern),
            Op::Zero { offset, len } => expected[offset as usize..(offset + len) as usize].fill(0),
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    raw.read(&disk, 5 << 20, &mut buf).unwrap();
    assert_eq!(buf, expected[5 << 20..6 << 20]);

    // The map's zero entries read as zeros, and most of the disk was never written: a hole.
    let map = raw.map(&disk, 0, SIZE).unwrap();
    assert_eq!(map.first().unwrap().offset, 0);
    assert_eq!(map.iter().map(|e| e.length).sum::<u64>(), SIZE);
    let zero_bytes: u64 = map
        .iter()
        .filter(|e| e.state == ExtentState::Zero)
        .map(|e| e.length)
        .sum();
    assert!(
        zero_bytes > SIZE / 2,
        "unwritten ranges stay holes ({zero_bytes} zero bytes)"
    );
    for e in map.iter().filter(|e| e.state == ExtentState::Zero) {
        let range = &expected[e.offset as usize..(e.offset + e.length) as usize];
        assert!(
            range.iter().all(|&b| b == 0),
            "zero extent {e:?} holds data"
        );
    }
    let info = raw.info(&disk).unwrap();
    assert_eq!((info.format.as_str(), info.size), ("raw", SIZE));
    raw.close(disk).unwrap();

    let haven = root.join("haven.img");
    assert_eq!(std::fs::metadata(&haven).unwrap().len(), SIZE);
    assert_eq!(std::fs::read(&haven).unwrap(), expected);
    let status = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&reference)
        .arg(&haven)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "qemu-img compare finds the images different"
    );

    // Reopen read-only: writes are refused, reads work.
    let disk = raw.open("haven.img", Access::ReadOnly, &[]).unwrap();
    let mut data = vec![1u8; 512];
    let err = raw.write(&disk, 0, &mut data).unwrap_err();
    assert_eq!(
        err.plugin_error().unwrap().kind,
        ErrorKind::InvalidArgument,
        "{err}"
    );
    // Out-of-range and unaligned requests are refused, not attempted.
    let mut data = vec![0u8; 512];
    let err = raw.read(&disk, SIZE, &mut data).unwrap_err();
    assert!(err.to_string().contains("outside the disk"), "{err}");
    let mut data = vec![0u8; 100];
    let err = raw.read(&disk, 0, &mut data).unwrap_err();
    assert!(err.to_string().contains("not aligned"), "{err}");
    raw.close(disk).unwrap();
}

/// A good plugin, on the same host, after a hostile one: it must still work.
fn good_plugin_still_works(host: &Host, root: &Path) {
    let mut raw = host
        .load_writer(&spec("raw", "haven-raw", storage(root)))
        .unwrap();
    let name = format!("after-{}.img", rand::random::<u32>());
    let disk = raw.create(&name, 1 << 20, 512, &[]).unwrap();
    let mut data = vec![0x5a; 4096];
    raw.write(&disk, 8192, &mut data).unwrap();
    let mut back = vec![0; 4096];
    raw.read(&disk, 8192, &mut back).unwrap();
    assert_eq!(back, data);
    raw.close(disk).unwrap();
}

#[test]
fn infinite_loop_is_stopped_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let host = host();
    let timeout = Duration::from_millis(500);
    let grants = Grants {
        call_timeout_ms: timeout.as_millis() as u64,
        ..Grants::default()
    };
    let mut spin = host
        .load_writer(&spec("spin", "test-spin", grants))
        .unwrap();
    for _ in 0..2 {
        let started = Instant::now();
        let err = spin.create("x.img", 1 << 20, 512, &[]).unwrap_err();
        let elapsed = started.elapsed();
        assert_eq!(
            err,
            PluginError::Trapped {
                plugin: "spin".into(),
                call: "disk.create",
                kind: TrapKind::Timeout(timeout)
            }
        );
        assert!(
            err.to_string().contains("ran past its 500 ms deadline"),
            "{err}"
        );
        assert!(elapsed >= timeout, "stopped early: {elapsed:?}");
        assert!(
            elapsed < timeout + Duration::from_millis(100),
            "stopped {elapsed:?} after the call began"
        );
    }
    // The instance was replaced: the plugin still answers calls that do not loop.
    assert_eq!(spin.describe().unwrap().name, "test-spin");
    assert_eq!(spin.restarts(), 2);
    good_plugin_still_works(&host, dir.path());
}

#[test]
fn memory_bomb_is_contained() {
    let dir = tempfile::tempdir().unwrap();
    let host = host();
    let grants = Grants {
        memory_mib: 64,
        ..Grants::default()
    };
    let mut bomb = host
        .load_writer(&spec("bomb", "test-membomb", grants))
        .unwrap();
    let err = bomb.create("x.img", 1 << 20, 512, &[]).unwrap_err();
    assert_eq!(
        err,
        PluginError::Trapped {
            plugin: "bomb".into(),
            call: "disk.create",
            kind: TrapKind::OutOfMemory(64 << 20)
        }
    );
    assert!(
        err.to_string().contains("ran out of memory (limit 64 MiB)"),
        "{err}"
    );
    assert_eq!(bomb.describe().unwrap().name, "test-membomb");
    good_plugin_still_works(&host, dir.path());
}

#[test]
fn storage_paths_cannot_leave_the_granted_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"secret").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("sub/escape-dir")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("escape-file")).unwrap();
    std::os::unix::fs::symlink("../../outside", root.join("sub/relative-escape")).unwrap();

    let host = host();
    let mut traverse = host
        .load_writer(&spec("traverse", "test-traverse", storage(&root)))
        .unwrap();
    let attempts = [
        ("../outside/new", "`..` would leave the granted root"),
        ("sub/../../outside/new", "`..` would leave the granted root"),
        ("/etc/passwd", "absolute paths are not allowed"),
        ("sub/escape-dir/new", "leads outside the granted root"),
        ("escape-file", "leads outside the granted root"),
        ("sub/relative-escape/new", "leads outside the granted root"),
    ];
    for (path, why) in attempts {
        let err = traverse.create(path, 1 << 20, 512, &[]).unwrap_err();
        let error = err
            .plugin_error()
            .unwrap_or_else(|| panic!("{path}: {err}"));
        assert_eq!(error.kind, ErrorKind::Denied, "{path}: {err}");
        let grant = format!("storage grant (root {})", root.display());
        assert!(error.message.contains(&grant), "{path}: {err}");
        assert!(error.message.contains(why), "{path}: {err}");
    }
    // Nothing was created or changed outside the root.
    let names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["secret"]);
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"secret");
    // Inside the root the same plugin may open files (it then reports that it could).
    let err = traverse
        .create("sub/inside", 1 << 20, 512, &[])
        .unwrap_err();
    assert!(
        err.to_string().contains("the host let me open sub/inside"),
        "{err}"
    );
    assert!(root.join("sub/inside").exists());

    // A plugin without a storage grant may not even import storage.
    let err = host
        .load_writer(&spec("traverse", "test-traverse", Grants::default()))
        .err()
        .unwrap();
    assert!(
        matches!(&err, LoadError::Refused { plugin, import, .. } if plugin == "traverse" && import == "haven:plugin/storage@0.1.0"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("has no storage grant; give it `storage_root`"),
        "{err}"
    );
}

#[test]
fn ungranted_imports_are_refused_at_load() {
    let host = host();
    let err = host
        .load_writer(&spec("ungranted", "test-ungranted", Grants::default()))
        .err()
        .unwrap();
    let LoadError::Refused {
        plugin,
        import,
        why,
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(plugin, "ungranted");
    assert!(
        import.starts_with("wasi:filesystem/") || import.starts_with("wasi:sockets/"),
        "{err}"
    );
    assert!(why.starts_with("Haven never grants wasi:"), "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "plugin `ungranted` imports `{import}`, which is refused"
        )),
        "{text}"
    );
}

/// A one-shot HTTP server on loopback: answers 200 to each request, counts connections.
fn http_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    (port, hits)
}

#[test]
fn http_goes_only_to_granted_hosts() {
    use std::sync::atomic::Ordering;
    let (granted, granted_hits) = http_server();
    let (other, other_hits) = http_server();
    let host = host();
    let grants = Grants {
        http_hosts: vec![format!("127.0.0.1:{granted}")],
        ..Grants::default()
    };
    let mut probe = host
        .load_adapter(&spec("probe", "test-http-probe", grants))
        .unwrap();

    probe
        .quiesce(
            &format!("http://127.0.0.1:{granted}/ping"),
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(granted_hits.load(Ordering::SeqCst), 1);

    let err = probe
        .quiesce(
            &format!("http://127.0.0.1:{other}/ping"),
            Duration::from_secs(5),
        )
        .unwrap_err();
    let PluginError::Failed { denials, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(
        denials,
        &[format!(
            "plugin `probe`: HTTP request to 127.0.0.1:{other} denied: not in its grant http_hosts = [\"127.0.0.1:{granted}\"]"
        )]
    );
    assert!(err.to_string().contains("HttpRequestDenied"), "{err}");
    assert_eq!(
        other_hits.load(Ordering::SeqCst),
        0,
        "the refused host was contacted"
    );

    // Without any HTTP grant the adapter is refused at load.
    let err = host
        .load_adapter(&spec("probe", "test-http-probe", Grants::default()))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("has no HTTP grant; list the hosts it may reach in `http_hosts`"),
        "{err}"
    );
}

fn unruly(mode: &str, call_timeout_ms: u64) -> PluginSpec {
    let mut spec = spec(
        "unruly",
        "test-unruly-adapter",
        Grants {
            call_timeout_ms,
            ..Grants::default()
        },
    );
    spec.settings.insert("mode".into(), mode.into());
    spec.settings.insert("region".into(), "west".into());
    spec
}

#[test]
fn adapters_of_both_contracts_load_and_0_2_0_gets_its_settings() {
    let host = host();
    // A 0.1.0 adapter (built against the frozen folder directly) still loads after 0.2.0.
    let grants = Grants {
        http_hosts: vec!["127.0.0.1".into()],
        ..Grants::default()
    };
    let mut old = host
        .load_adapter(&spec("probe", "test-http-probe", grants))
        .unwrap();
    assert_eq!(old.contract(), "0.1.0");
    let err = old.power_on("vm-1").unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugin `probe` call `platform.power-on` failed: powering on: the adapter is built \
         against haven:plugin@0.1.0; rebuild it against 0.2.0"
    );

    let mut adapter = host.load_adapter(&unruly("ok", 5_000)).unwrap();
    assert_eq!(adapter.contract(), "0.2.0");
    assert_eq!(adapter.describe().unwrap().name, "unruly");
    assert_eq!(
        adapter.check().unwrap(),
        "unruly adapter; settings: mode=ok region=west"
    );
    let machines = adapter.inventory().unwrap();
    assert_eq!(machines.len(), 1);
    let m = &machines[0];
    assert_eq!(
        (m.id.as_str(), m.cpus, m.memory_mib, m.power),
        ("vm-1", 2, 2048, haven_host::platform::PowerState::Running)
    );
    assert_eq!(m.disks[0].location, "[ds1] unruly-1/disk-0.vmdk");
    assert_eq!(m.nics[0].mac, "00:50:56:00:00:01");
    let replica = adapter
        .define_replica(&haven_host::platform::ReplicaSpec {
            name: "r1".into(),
            source_machine: "vm-1".into(),
            cpus: 1,
            memory_mib: 512,
            disks: vec![],
            nics: vec![],
            options: vec![],
        })
        .unwrap();
    assert_eq!(replica.id, "replica-r1");
    adapter.delete_machine(&replica.id).unwrap();

    // A setting the adapter needs is missing: its own error names it.
    let mut spec = unruly("ok", 5_000);
    spec.settings.remove("mode");
    let err = host.load_adapter(&spec).unwrap().check().unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugin `unruly` call `platform.check` failed: setting `mode` is required; add it to \
         the adapter's `settings`"
    );
}

#[test]
fn an_adapter_that_traps_or_loops_is_stopped_and_restarted() {
    let host = host();
    let mut trapping = host.load_adapter(&unruly("trap", 5_000)).unwrap();
    let err = trapping.inventory().unwrap_err();
    let PluginError::Trapped { kind, call, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(*call, "platform.inventory");
    assert!(matches!(kind, TrapKind::Crash(_)), "{kind:?}");
    assert_eq!(trapping.restarts(), 1);
    // The next call runs in a fresh instance (and traps again, as told).
    assert!(matches!(
        trapping.power_off("vm-1", haven_host::platform::PowerOffMode::Hard),
        Err(PluginError::Trapped { .. })
    ));
    assert_eq!(trapping.restarts(), 2);

    // The one-line trap text: the trap, the plugin's function, its panic message.
    assert_eq!(
        err.to_string(),
        format!(
            "plugin `unruly` call `platform.inventory` trapped: wasm trap: wasm `unreachable` \
             instruction executed (in test_unruly_adapter::misbehave): panicked at \
             test-plugins/unruly-adapter/src/lib.rs:{}: unruly adapter: told to trap; the \
             instance was restarted",
            err.to_string()
                .split("src/lib.rs:")
                .nth(1)
                .and_then(|rest| rest.split(": ").next())
                .unwrap_or_default()
        )
    );

    // A plugin that writes a lot to stderr is not stopped for it.
    let mut chatty = host.load_adapter(&unruly("chatty", 5_000)).unwrap();
    for _ in 0..3 {
        assert_eq!(chatty.inventory().unwrap().len(), 1);
    }
    assert_eq!(chatty.restarts(), 0);

    let mut looping = host.load_adapter(&unruly("loop", 300)).unwrap();
    let started = Instant::now();
    let err = looping.inventory().unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugin `unruly` call `platform.inventory` ran past its 300 ms deadline and was \
         stopped; the instance was restarted"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn precompiled_artefacts_survive_a_restart_and_damage() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = HostConfig {
        cache_dir: Some(cache.clone()),
    };
    let spec = spec("raw", "haven-raw", storage(dir.path()));
    {
        let host = Host::new(config.clone()).unwrap();
        let raw = host.load_writer(&spec).unwrap();
        assert_eq!(raw.cache_outcome(), CacheOutcome::Compiled);
    }
    // A new host (a gateway restart) loads the artefact instead of compiling.
    let host = Host::new(config.clone()).unwrap();
    let mut raw = host.load_writer(&spec).unwrap();
    assert_eq!(raw.cache_outcome(), CacheOutcome::Hit);
    assert_eq!(raw.describe().unwrap().name, "raw");

    // A damaged artefact is detected by its checksum and rebuilt, never loaded.
    let artefact = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&artefact).unwrap();
    let last = bytes.len() - 100;
    bytes[last] ^= 0xff;
    std::fs::write(&artefact, bytes).unwrap();
    let host = Host::new(config).unwrap();
    let mut raw = host.load_writer(&spec).unwrap();
    assert_eq!(raw.cache_outcome(), CacheOutcome::Compiled);
    assert_eq!(raw.describe().unwrap().name, "raw");
}

/// The files in the cache folder, sorted.
fn cache_files(cache: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Loads `spec` through each of `hosts` from `per_host` threads at once; the outcomes, by host.
fn load_at_once(hosts: &[&Host], per_host: usize, spec: &PluginSpec) -> Vec<Vec<CacheOutcome>> {
    let barrier = &std::sync::Barrier::new(hosts.len() * per_host);
    std::thread::scope(|s| {
        let loads: Vec<Vec<_>> = hosts
            .iter()
            .map(|&host| {
                (0..per_host)
                    .map(|_| {
                        s.spawn(move || {
                            barrier.wait();
                            let mut raw = host.load_writer(spec).map_err(|e| e.to_string())?;
                            assert_eq!(raw.describe().unwrap().name, "raw");
                            Ok::<_, String>(raw.cache_outcome())
                        })
                    })
                    .collect()
            })
            .collect();
        loads
            .into_iter()
            .map(|host| {
                host.into_iter()
                    .map(|load| load.join().unwrap().unwrap_or_else(|e| panic!("{e}")))
                    .collect()
            })
            .collect()
    })
}

#[test]
fn concurrent_loads_through_one_host_compile_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = HostConfig {
        cache_dir: Some(cache.clone()),
    };
    let spec = spec("raw", "haven-raw", storage(dir.path()));
    let host = Host::new(config.clone()).unwrap();
    let outcomes = load_at_once(&[&host], 16, &spec).remove(0);
    let compiled = outcomes
        .iter()
        .filter(|&&o| o == CacheOutcome::Compiled)
        .count();
    assert_eq!(compiled, 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|&o| matches!(o, CacheOutcome::Compiled | CacheOutcome::Shared)),
        "{outcomes:?}"
    );
    let files = cache_files(&cache);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with(".cwasm"), "{files:?}");
    // Later loads through the same host share the component; a new host reads the artefact.
    let raw = host.load_writer(&spec).unwrap();
    assert_eq!(raw.cache_outcome(), CacheOutcome::Shared);
    let raw = Host::new(config).unwrap().load_writer(&spec).unwrap();
    assert_eq!(raw.cache_outcome(), CacheOutcome::Hit);
}

#[test]
fn hosts_sharing_a_cache_folder_store_concurrently() {
    // Two hosts stand for two gateway processes: each compiles (or, if the other stored it
    // first, reads) the component once, and every store succeeds.
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = HostConfig {
        cache_dir: Some(cache.clone()),
    };
    let spec = spec("raw", "haven-raw", storage(dir.path()));
    let (a, b) = (
        Host::new(config.clone()).unwrap(),
        Host::new(config.clone()).unwrap(),
    );
    for outcomes in load_at_once(&[&a, &b], 4, &spec) {
        let own = outcomes
            .iter()
            .filter(|&&o| o != CacheOutcome::Shared)
            .count();
        assert_eq!(own, 1, "{outcomes:?}");
    }
    let files = cache_files(&cache);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with(".cwasm"), "{files:?}");
    let mut raw = Host::new(config).unwrap().load_writer(&spec).unwrap();
    assert_eq!(raw.cache_outcome(), CacheOutcome::Hit);
    assert_eq!(raw.describe().unwrap().name, "raw");
}

#[test]
fn a_cache_folder_that_cannot_be_written_does_not_fail_the_load() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the folder's parent should be: the folder cannot be made, even by root.
    let blocker = dir.path().join("not-a-folder");
    std::fs::write(&blocker, b"").unwrap();
    let host = Host::new(HostConfig {
        cache_dir: Some(blocker.join("cache")),
    })
    .unwrap();
    let spec = spec("raw", "haven-raw", storage(dir.path()));
    let mut raw = host.load_writer(&spec).unwrap();
    assert_eq!(raw.cache_outcome(), CacheOutcome::Compiled);
    assert_eq!(raw.describe().unwrap().name, "raw");
    assert_eq!(
        host.load_writer(&spec).unwrap().cache_outcome(),
        CacheOutcome::Shared
    );
}

#[test]
fn third_party_plugin_built_out_of_tree_loads_and_works() {
    let host = host();
    let mut null = host
        .load_writer(&spec("null", "null-writer", Grants::default()))
        .unwrap();
    assert_eq!(null.describe().unwrap().name, "null");
    let disk = null.create("ignored", 1 << 20, 512, &[]).unwrap();
    let mut data = vec![1u8; 8192];
    null.write(&disk, 4096, &mut data).unwrap();
    null.write_zeroes(&disk, 8192, 512, true).unwrap();
    let map = null.map(&disk, 0, 1 << 20).unwrap();
    let states: Vec<_> = map.iter().map(|e| (e.offset, e.length, e.state)).collect();
    assert_eq!(
        states,
        [
            (0, 4096, ExtentState::Zero),
            (4096, 4096, ExtentState::Data),
            (8192, 512, ExtentState::Zero),
            (8704, 3584, ExtentState::Data),
            (12288, (1 << 20) - 12288, ExtentState::Zero),
        ]
    );
    null.close(disk).unwrap();
}

#[test]
fn read_only_grants_refuse_every_change() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep"), b"keep").unwrap();
    let host = host();
    let grants = Grants {
        storage_read_only: true,
        ..storage(dir.path())
    };
    let mut traverse = host
        .load_writer(&spec("ro", "test-traverse", grants))
        .unwrap();
    for path in ["rm:keep", "new-file", "keep"] {
        let err = traverse.create(path, 1 << 20, 512, &[]).unwrap_err();
        let error = err
            .plugin_error()
            .unwrap_or_else(|| panic!("{path}: {err}"));
        assert_eq!(error.kind, ErrorKind::Denied, "{path}: {err}");
        assert!(
            error.message.contains("the grant is read-only"),
            "{path}: {err}"
        );
    }
    assert_eq!(std::fs::read(dir.path().join("keep")).unwrap(), b"keep");
    assert!(!dir.path().join("new-file").exists());

    // With a writable grant the same removal goes through (the test plugin then reports it).
    let mut traverse = host
        .load_writer(&spec("rw", "test-traverse", storage(dir.path())))
        .unwrap();
    let err = traverse.create("rm:keep", 1 << 20, 512, &[]).unwrap_err();
    assert!(
        err.to_string().contains("the host let me remove keep"),
        "{err}"
    );
    assert!(!dir.path().join("keep").exists());
}

#[test]
fn a_fifo_in_the_root_cannot_block_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("extent.fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let host = host();
    let mut traverse = host
        .load_writer(&spec("fifo", "test-traverse", storage(dir.path())))
        .unwrap();
    // Opened for writing with no reader, a FIFO would block forever; the host returns at once.
    let started = Instant::now();
    let err = traverse
        .create("extent.fifo", 1 << 20, 512, &[])
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "blocked for {:?}",
        started.elapsed()
    );
    assert!(err.plugin_error().is_some(), "{err}");
    // And the raw writer refuses to take it for a disk.
    let mut raw = host
        .load_writer(&spec("raw", "haven-raw", storage(dir.path())))
        .unwrap();
    let err = raw.open("extent.fifo", Access::ReadOnly, &[]).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}
