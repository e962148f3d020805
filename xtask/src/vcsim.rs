//! Builds `target/vcsim/vcsim`, VMware's vCenter simulator, for the VMware adapter's tests.
//!
//! Debian ships govmomi's simulator as a Go library (golang-github-vmware-govmomi-dev, govmomi
//! 0.24.2) but no `vcsim` program, so `tests/vcsim/main.go` (a small `main` around
//! `simulator.VPX()`) is built here, offline: GOPATH mode over `/usr/share/gocode`, no module
//! proxy. The binary is rebuilt when `main.go` is newer.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

/// Where Debian's package puts the simulator's source.
const SIMULATOR_SRC: &str = "/usr/share/gocode/src/github.com/vmware/govmomi/simulator";
const GOVMOMI_PACKAGE: &str = "golang-github-vmware-govmomi-dev";

/// Installs Go and govmomi when missing, builds the simulator when needed, and returns the
/// path of the binary.
pub fn ensure(root: &Path) -> Result<PathBuf> {
    crate::ensure_programs(&[("go", "golang-go")])?;
    if !Path::new(SIMULATOR_SRC).is_dir() {
        crate::apt_install(&[GOVMOMI_PACKAGE])?;
        anyhow::ensure!(
            Path::new(SIMULATOR_SRC).is_dir(),
            "{GOVMOMI_PACKAGE} is installed but {SIMULATOR_SRC} does not exist"
        );
    }

    let source_dir = root.join("tests/vcsim");
    let source = source_dir.join("main.go");
    let out_dir = root.join("target/vcsim");
    let binary = out_dir.join("vcsim");
    if is_newer(&binary, &source)? {
        return Ok(binary);
    }
    std::fs::create_dir_all(out_dir.join("gopath"))
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    // Built beside the binary, then renamed: a test never runs a half-written one.
    let partial = out_dir.join("vcsim.partial");
    crate::run(
        Command::new("go")
            .current_dir(&source_dir)
            .args(["build", "-o"])
            .arg(&partial)
            .arg(".")
            .env("GO111MODULE", "off")
            .env(
                "GOPATH",
                format!("{}:/usr/share/gocode", out_dir.join("gopath").display()),
            )
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("GOCACHE", out_dir.join("gocache")),
    )?;
    std::fs::rename(&partial, &binary).with_context(|| {
        format!(
            "cannot rename {} to {}",
            partial.display(),
            binary.display()
        )
    })?;
    Ok(binary)
}

/// True when `target` exists and was modified after `source`.
fn is_newer(target: &Path, source: &Path) -> Result<bool> {
    let Ok(built) = std::fs::metadata(target).and_then(|m| m.modified()) else {
        return Ok(false);
    };
    let written = std::fs::metadata(source)
        .and_then(|m| m.modified())
        .with_context(|| format!("cannot read {}", source.display()))?;
    Ok(built > written)
}
