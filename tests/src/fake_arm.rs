//! A FAKE Azure Resource Manager (`tests/fake_arm.py`: ARM cannot run here), started with the
//! resources a test seeds and killed when dropped. It enforces the real API's token,
//! api-versions and required fields for the resources the Azure adapter uses, and records every
//! request so a test can assert them field by field.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// A running fake ARM (and token endpoint).
#[derive(Debug)]
pub struct FakeArm {
    child: Child,
    port: u16,
}

impl FakeArm {
    /// Starts the fake with `state` (subscription, credentials, VM sizes, seeded resources by
    /// id), written to `dir`.
    pub fn start(dir: &Path, state: &serde_json::Value) -> Result<FakeArm> {
        let file = dir.join("fake-arm-state.json");
        std::fs::write(&file, serde_json::to_vec_pretty(state)?)?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fake_arm.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot run python3 tests/fake_arm.py")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(port) = line.trim().strip_prefix("FAKE_ARM_PORT=") else {
            let _ = child.kill();
            bail!("the fake ARM did not start: {line:?}");
        };
        let port = port.parse()?;
        Ok(FakeArm { child, port })
    }

    /// `127.0.0.1:PORT`, the host the adapter must be granted.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`: its ARM and its token endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn get(&self, path: &str) -> Result<serde_json::Value> {
        let out = Command::new("python3")
            .args([
                "-c",
                "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())",
            ])
            .arg(format!("{}{path}", self.endpoint()))
            .output()?;
        if !out.status.success() {
            bail!("{path}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Every ARM request so far (not the token's): method, path, query and body.
    pub fn requests(&self) -> Result<Vec<serde_json::Value>> {
        Ok(serde_json::from_value(self.get("/_fake/requests")?)?)
    }

    /// The resources it holds, by lower-case id.
    pub fn resources(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        Ok(serde_json::from_value(
            self.get("/_fake/state")?["resources"].clone(),
        )?)
    }
}

impl Drop for FakeArm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
