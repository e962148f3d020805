//! `cargo xtask bench plugins`: write throughput through the raw plugin (data lent by buffer
//! handle) against the same writes done natively by the host, in one run.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use haven_host::{Grants, Host, HostConfig, PluginSpec};

/// Bytes written per case.
const TOTAL: u64 = 2 << 30;
/// Disk size: writes wrap around it, so the page cache holds it and neither side waits on the
/// device (the benchmark measures the path, not the disk).
const DISK: u64 = 256 << 20;
const ROUNDS: usize = 3;

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let plugin_dir = std::env::var_os("HAVEN_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip2/release")
        });
    let host = Host::new(HostConfig::default())?;
    let spec = PluginSpec {
        name: "raw".into(),
        path: plugin_dir.join("haven_raw.wasm"),
        grants: Grants {
            storage_root: Some(dir.path().to_owned()),
            ..Grants::default()
        },
        settings: Default::default(),
    };
    let mut raw = host.load_writer(&spec)?;

    println!(
        "write throughput, {} GiB per case, best of {ROUNDS}",
        TOTAL >> 30
    );
    println!(
        "{:<10} {:>12} {:>12} {:>8}",
        "block", "native GB/s", "plugin GB/s", "ratio"
    );
    for block in [1u64 << 20, 64 << 10] {
        let mut native_best = Duration::MAX;
        let mut plugin_best = Duration::MAX;
        for round in 0..ROUNDS {
            // Native: pwrite into a file, as the host would without a plugin.
            let path = dir.path().join(format!("native-{block}-{round}.img"));
            let file = std::fs::File::create_new(&path)?;
            file.set_len(DISK)?;
            let data = vec![0xa5u8; block as usize];
            let started = Instant::now();
            let mut offset = 0;
            for _ in 0..TOTAL / block {
                file.write_all_at(&data, offset)?;
                offset = (offset + block) % DISK;
            }
            file.sync_all()?;
            native_best = native_best.min(started.elapsed());
            drop(file);
            std::fs::remove_file(&path)?;

            // Plugin: the same writes through the raw writer, data lent by handle.
            let name = format!("plugin-{block}-{round}.img");
            let disk = raw.create(&name, DISK, 512, &[])?;
            let mut data = vec![0xa5u8; block as usize];
            let started = Instant::now();
            let mut offset = 0;
            for _ in 0..TOTAL / block {
                raw.write(&disk, offset, &mut data)?;
                offset = (offset + block) % DISK;
            }
            raw.flush(&disk)?;
            plugin_best = plugin_best.min(started.elapsed());
            raw.close(disk)?;
            std::fs::remove_file(dir.path().join(&name))?;
        }
        let gbps = |d: Duration| TOTAL as f64 / d.as_secs_f64() / 1e9;
        let label = if block >= 1 << 20 {
            format!("{} MiB", block >> 20)
        } else {
            format!("{} KiB", block >> 10)
        };
        println!(
            "{label:<10} {:>12.2} {:>12.2} {:>7.0}%",
            gbps(native_best),
            gbps(plugin_best),
            100.0 * native_best.as_secs_f64() / plugin_best.as_secs_f64()
        );
    }
    println!("goal: plugin >= 90% of native");
    Ok(())
}
