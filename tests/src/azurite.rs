//! Azurite, the Azure Storage emulator (npm; `cargo xtask test` installs it below
//! `target/azurite`), started on a free loopback port with in-memory storage and killed when
//! dropped; and an independent client (Python's `azure-storage-blob`) that reads back what a
//! test wrote, without trusting Haven's own Blob code.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The emulator's well-known account and key (public: they are in Microsoft's documentation).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A running Azurite (Blob service only).
#[derive(Debug)]
pub struct Azurite {
    child: Child,
    port: u16,
}

/// The `azurite-blob` program `cargo xtask test` installs.
pub fn binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/azurite/node_modules/.bin/azurite-blob")
}

impl Azurite {
    /// Starts Azurite's Blob service on a free port and waits until it listens.
    pub fn start() -> Result<Azurite> {
        let bin = binary();
        if !bin.exists() {
            bail!(
                "Azurite is missing ({}): `cargo xtask test` installs it (npm install azurite)",
                bin.display()
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args([
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--skipApiVersionCheck",
                "--silent",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!("Azurite exited at start ({status})");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("Azurite did not listen on port {port} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Azurite { child, port })
    }

    /// `127.0.0.1:PORT`, the host a plugin must be granted.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The account's blob endpoint, path style.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};\
             BlobEndpoint={};",
            self.endpoint()
        )
    }

    /// Runs `script` with Python's `azure-storage-blob`, `client` bound to this account; its
    /// standard output.
    pub fn python(&self, script: &str) -> Result<String> {
        let program = format!(
            "from azure.storage.blob import BlobServiceClient\n\
             client = BlobServiceClient.from_connection_string({:?})\n{script}",
            self.connection_string()
        );
        let out = Command::new("python3")
            .args(["-c", &program])
            .output()
            .context("cannot run python3")?;
        if !out.status.success() {
            bail!(
                "python (azure-storage-blob) failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Downloads blob `blob` of `container` to `dest` with the independent client; its
    /// blob type and size as the service reports them.
    pub fn download(&self, container: &str, blob: &str, dest: &Path) -> Result<(String, u64)> {
        let out = self.python(&format!(
            "b = client.get_blob_client({container:?}, {blob:?})\n\
             p = b.get_blob_properties()\n\
             open({:?}, 'wb').write(b.download_blob().readall())\n\
             print(p.blob_type, p.size)",
            dest.display().to_string()
        ))?;
        let mut words = out.split_whitespace();
        let kind = words.next().context("no blob type")?.to_string();
        let size = words.next().context("no size")?.parse()?;
        Ok((kind, size))
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
