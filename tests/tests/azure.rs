//! Replicas in Azure page blobs, against Azurite: the page-blob writer (a `haven:plugin@0.2.0`
//! target writer that reaches only its granted storage endpoint) keeps a replica as a fixed
//! VHD page blob, which an independent client (Python's `azure-storage-blob`) downloads and
//! `qemu-img compare` finds equal to the source.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use haven_e2e::azurite::{self, Azurite};
use haven_e2e::{Cluster, ClusterOptions, default_bin_dir, images_equal_as, mixed_disk, qemu_io};
use haven_host::{Access, Grants, Host, HostConfig, PluginSpec};

const MIB: u64 = 1 << 20;

fn plugin() -> PathBuf {
    default_bin_dir().join("../wasm32-wasip2/release/haven_azure_blob.wasm")
}

fn settings(a: &Azurite, container: &str) -> std::collections::BTreeMap<String, String> {
    [
        ("endpoint", a.endpoint()),
        ("container", container.to_string()),
        ("key", azurite::KEY.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn spec(a: &Azurite, hosts: Vec<String>) -> PluginSpec {
    PluginSpec {
        name: "azure".into(),
        path: plugin(),
        grants: Grants {
            http_hosts: hosts,
            ..Grants::default()
        },
        settings: settings(a, "disks"),
    }
}

#[test]
fn a_page_blob_disk_is_a_fixed_vhd_an_independent_client_reads() -> Result<()> {
    let a = Azurite::start()?;
    let tmp = tempfile::tempdir()?;
    let host = Host::new(HostConfig::default())?;
    let mut w = host.load_writer(&spec(&a, vec![a.host()]))?;
    // Azure stores whole MiB only.
    let e = w.create("odd.vhd", 3 * MIB + 512, 512, &[]).unwrap_err();
    assert!(e.to_string().contains("whole number of MiB"), "{e}");

    let size = 6 * MIB;
    let disk = w.create("vm1/disk1.vhd", size, 512, &[])?;
    let source = tmp.path().join("source.raw");
    std::fs::write(&source, vec![0u8; size as usize])?;
    // Writes below, across and at the end of the 4 MiB a Put Page takes; a zeroed range.
    let mut expected = vec![0u8; size as usize];
    for (offset, len, byte) in [
        (0u64, 4096usize, 1u8),
        (3 * MIB, 2 * MIB as usize, 2),
        (size - 512, 512, 3),
        (MIB, 8192, 4),
    ] {
        let mut data = vec![byte; len];
        w.write(&disk, offset, &mut data)?;
        expected[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    w.write_zeroes(&disk, MIB, 4096, true)?;
    expected[MIB as usize..MIB as usize + 4096].fill(0);
    std::fs::write(&source, &expected)?;
    let mut back = vec![0u8; 8192];
    w.read(&disk, 3 * MIB - 4096, &mut back)?;
    assert_eq!(
        back,
        expected[3 * MIB as usize - 4096..3 * MIB as usize + 4096]
    );
    // The map: data where pages were written, zero elsewhere (cleared pages too).
    let map = w.map(&disk, 0, 2 * MIB)?;
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.state == haven_image::ExtentState::Data)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(data, vec![(0, 4096), (MIB + 4096, 4096)], "{map:?}");
    w.flush(&disk)?;
    w.close(disk)?;

    // Reopened: its size comes from the footer.
    let disk = w.open("vm1/disk1.vhd", Access::ReadOnly, &[])?;
    assert_eq!(w.info(&disk)?.size, size);
    w.close(disk)?;

    // An independent client sees a page blob of the data and the footer, which qemu-img
    // reads as a fixed VHD equal to what was written.
    let downloaded = tmp.path().join("downloaded.vhd");
    let (kind, length) = a.download("disks", "vm1/disk1.vhd", &downloaded)?;
    assert_eq!((kind.as_str(), length), ("BlobType.PAGEBLOB", size + 512));
    assert!(images_equal_as(&source, "raw", &downloaded, "vpc")?);
    Ok(())
}

#[test]
fn a_sas_token_is_enough() -> Result<()> {
    let a = Azurite::start()?;
    // The operator's container and a SAS for it, made with the independent client.
    let sas = a.python(&format!(
        "from datetime import datetime, timedelta, timezone\n\
         from azure.storage.blob import generate_container_sas, ContainerSasPermissions\n\
         client.create_container('sas')\n\
         print(generate_container_sas({:?}, 'sas', account_key={:?}, \
         permission=ContainerSasPermissions(read=True, write=True, create=True), \
         expiry=datetime.now(timezone.utc) + timedelta(hours=1)))",
        azurite::ACCOUNT,
        azurite::KEY
    ))?;
    let host = Host::new(HostConfig::default())?;
    let mut spec = spec(&a, vec![a.host()]);
    spec.settings.remove("key");
    spec.settings.insert("container".into(), "sas".into());
    spec.settings.insert("sas".into(), sas.trim().to_string());
    let mut w = host.load_writer(&spec)?;
    let disk = w.create("d.vhd", MIB, 512, &[])?;
    let mut data = vec![7u8; 4096];
    w.write(&disk, 8192, &mut data)?;
    let mut back = vec![0u8; 4096];
    w.read(&disk, 8192, &mut back)?;
    assert_eq!(back, data);
    w.close(disk)?;
    Ok(())
}

#[test]
fn the_writer_reaches_only_its_granted_endpoint() -> Result<()> {
    let a = Azurite::start()?;
    let host = Host::new(HostConfig::default())?;
    // Granted another port of the same host: the request is refused by the host.
    let mut w = host.load_writer(&spec(&a, vec!["127.0.0.1:1".into()]))?;
    let e = w.create("d.vhd", MIB, 512, &[]).unwrap_err().to_string();
    assert!(e.contains("denied") || e.contains("refused"), "{e}");
    // No HTTP grant at all: refused at load.
    let e = host
        .load_writer(&spec(&a, Vec::new()))
        .err()
        .context("loaded")?;
    assert!(e.to_string().contains("http_hosts"), "{e}");
    // A wrong key: the service refuses, and the error says what to check.
    let mut bad = spec(&a, vec![a.host()]);
    bad.settings
        .insert("key".into(), "d3Jvbmcga2V5IGZvciB0aGlzIGFjY291bnQ=".into());
    let mut w = host.load_writer(&bad)?;
    let e = w.create("d.vhd", MIB, 512, &[]).unwrap_err().to_string();
    assert!(e.contains("`key` or `sas`"), "{e}");
    Ok(())
}

/// The `[master_target]` lines and `[[plugin]]` of a master target writing into Azurite.
fn azure_writer(a: &Azurite) -> String {
    format!(
        "writer = \"azure\"\n\n[[plugin]]\nkind = \"target-writer\"\nname = \"azure\"\n\
         path = {:?}\ngrants = {{ http_hosts = [{:?}] }}\n\
         settings = {{ endpoint = {:?}, container = \"replicas\", key = {:?} }}\n",
        plugin(),
        a.host(),
        a.endpoint(),
        azurite::KEY
    )
}

#[test]
fn a_master_target_replicates_into_a_page_blob() -> Result<()> {
    let a = Azurite::start()?;
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("source.raw");
    mixed_disk(&disk, 16 * MIB, 7)?;
    let mut c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            mt_config: azure_writer(&a),
            ..ClusterOptions::default()
        },
    )?;
    let commands: Vec<String> = (0..24u64)
        .map(|i| format!("write -P {} {} 64k", 0x30 + i, (i * 37 % 256) * 65536))
        .collect();
    qemu_io(&c.agent.nbd, &commands)?;
    c.wait_caught_up(haven_engine::now_ms(), Duration::from_secs(120), |_, _| {})?;
    let status = c.mt.status()?;
    let replica = status
        .master_target
        .as_ref()
        .and_then(|m| m.replicas.first())
        .context("no replica")?;
    let downloaded = tmp.path().join("replica.vhd");
    let (kind, length) = a.download("replicas", &replica.path, &downloaded)?;
    assert_eq!(
        (kind.as_str(), length),
        ("BlobType.PAGEBLOB", 16 * MIB + 512)
    );
    assert!(
        images_equal_as(&disk, "raw", &downloaded, "vpc")?,
        "the page blob differs from the source"
    );
    Ok(())
}

#[test]
fn a_failover_materialises_its_point_into_a_page_blob() -> Result<()> {
    let a = Azurite::start()?;
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("source.raw");
    mixed_disk(&disk, 8 * MIB, 11)?;
    let c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            mt_config: azure_writer(&a),
            retention: Some("window = \"1h\"".into()),
            agent_args: vec!["--point-interval".into(), "1s".into()],
            ..ClusterOptions::default()
        },
    )?;
    let commands: Vec<String> = (0..16u64)
        .map(|i| format!("write -P {} {} 64k", 0x50 + i, (i * 11 % 128) * 65536))
        .collect();
    qemu_io(&c.agent.nbd, &commands)?;
    haven_e2e::wait_for_point(&c.mt, "web01")?;
    // Planned: the source stops at its final point, which the image holds.
    let image = c.mt.haven(&["failover", "web01", "--planned"])?;
    let image = image.trim();
    assert!(image.starts_with("failover/"), "{image}");
    let downloaded = tmp.path().join("image.vhd");
    let (kind, length) = a.download("replicas", image, &downloaded)?;
    assert_eq!(
        (kind.as_str(), length),
        ("BlobType.PAGEBLOB", 8 * MIB + 512)
    );
    assert!(
        images_equal_as(&disk, "raw", &downloaded, "vpc")?,
        "the failover image differs from the source at its final point"
    );
    Ok(())
}
