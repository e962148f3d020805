//! `cargo xtask`: everything that is more than one cargo command.
//!
//! - `cargo xtask build`  builds the plugins (wasm32-wasip2 components) and the native binaries.
//! - `cargo xtask test`   installs what the tests need, builds everything, checks formatting and
//!   lints, and runs every test of both workspaces.
//! - `cargo xtask demo`   builds and runs the demo.
//! - `cargo xtask bench [plugins|formats|replication|points|nbd|scale|groups|fs|failback]` runs
//!   benchmarks against their baselines.
//! - `cargo xtask fuzz FORMAT|wire [SECONDS]` runs a format parser's or the wire decoder's fuzz
//!   target (installs cargo-fuzz).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod bench;
mod bench_failback;
mod bench_fs;
mod bench_groups;
mod bench_nbd;
mod bench_points;
mod bench_replication;
mod bench_scale;
mod demo;
mod sim_agents;
mod vcsim;

/// Plugins that implement the `target-writer` world (built together: same SDK feature).
const WRITER_PLUGINS: &[&str] = &[
    "haven-raw",
    "haven-vmdk",
    "haven-vhdx",
    "haven-vhd",
    "haven-qcow2",
    "test-spin",
    "test-membomb",
    "test-traverse",
    "test-ungranted",
];
/// Plugins that implement the `adapter` world.
const ADAPTER_PLUGINS: &[&str] = &[
    "haven-vmware",
    "haven-azure",
    "test-http-probe",
    "test-unruly-adapter",
];
/// Target writers of `haven:plugin@0.2.0` that keep disks in cloud storage (built on their
/// own: a component carries one world's SDK feature, `cloud-writer`).
const CLOUD_PLUGINS: &[&str] = &["haven-azure-blob"];
/// Azurite, the Azure Storage emulator the page-blob writer is tested against (npm; the
/// newest release that runs on Node 20).
const AZURITE: &str = "azurite@3.35.0";
/// Crates of the plugins workspace that also build and test natively.
const NATIVE_PLUGIN_CRATES: &[&str] = &[
    "haven-image",
    "haven-vmware",
    "haven-vmdk",
    "haven-vhdx",
    "haven-vhd",
    "haven-qcow2",
    "haven-azure-blob",
    "haven-azure",
];
/// Debian packages the tests use.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("qemu-img", "qemu-utils"),
    ("qemu-io", "qemu-utils"),
    ("qemu-nbd", "qemu-utils"),
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    // nbdsh comes with libnbd's Python binding, which the tests use.
    ("nbdsh", "python3-libnbd"),
    ("chromium", "chromium"),
    ("chromedriver", "chromium-driver"),
    // A real filesystem on a loop device over the agent's disk file.
    ("losetup", "mount"),
    ("mkfs.ext4", "e2fsprogs"),
];

/// Python packages the tests use: (module imported, PyPI package). The API tests validate the
/// OpenAPI document with one and fuzz the API from it with the other.
const PYPI_PACKAGES: &[(&str, &str)] = &[
    ("openapi_spec_validator", "openapi-spec-validator"),
    ("schemathesis", "schemathesis"),
    ("selenium", "selenium"),
    // An independent Blob client: reads back what the page-blob writer wrote into Azurite.
    ("azure.storage.blob", "azure-storage-blob"),
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    match args.first().map(String::as_str) {
        Some("build") => build(rest.contains(&"--release")),
        Some("test") => test(),
        Some("lint") => lint(),
        Some("demo") => demo(),
        Some("bench") => bench(&rest),
        Some("fuzz") => fuzz(&rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <build [--release] | test | lint | demo | bench [plugins|formats|replication|points|nbd|scale|groups|fs|failback] | fuzz FORMAT [SECONDS]>"
            );
            std::process::exit(2);
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            describe(cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the wasm32-wasip2 target when it is missing.
fn ensure_wasm_target() -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == "wasm32-wasip2") {
        run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"]))?;
    }
    Ok(())
}

/// Installs the Debian and PyPI packages the tests need when they are missing.
fn ensure_test_tools() -> Result<()> {
    ensure_programs(DEBIAN_PACKAGES)?;
    ensure_python_packages(PYPI_PACKAGES)?;
    ensure_azurite()
}

/// Installs Azurite below `target/azurite` (npm, from its registry) when it is missing.
fn ensure_azurite() -> Result<()> {
    let dir = root().join("target/azurite");
    if dir.join("node_modules/.bin/azurite-blob").exists() {
        return Ok(());
    }
    if !have("npm") {
        apt_install(&["npm"])?;
    }
    std::fs::create_dir_all(&dir)?;
    run(Command::new("npm").current_dir(&dir).args([
        "install",
        "--no-audit",
        "--no-fund",
        "--silent",
        AZURITE,
    ]))
}

/// Installs, from PyPI into `python3`'s environment, each package whose module is missing.
fn ensure_python_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(module, _)| {
            !Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(&missing))
}

/// Installs, from Debian, the package of each program that is missing.
pub(crate) fn ensure_programs(programs: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = programs
        .iter()
        .filter(|(program, _)| !have(program))
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    apt_install(&missing)
}

/// Installs Debian packages (with sudo when not root); nothing when `packages` is empty.
pub(crate) fn apt_install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let sudo = if output(Command::new("id").arg("-u"))?.trim() == "0" {
        vec![]
    } else {
        vec!["sudo"]
    };
    let apt = |args: &[&str]| {
        let mut c = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            c.arg("apt-get");
        }
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(&mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(packages);
    run(&mut install)
}

/// Builds the plugins for wasm32-wasip2 (always release: they are what the gateway runs).
fn build_plugins() -> Result<()> {
    ensure_wasm_target()?;
    for group in [WRITER_PLUGINS, ADAPTER_PLUGINS, CLOUD_PLUGINS] {
        let mut c = cargo();
        c.current_dir(root().join("plugins")).args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
        ]);
        for p in group {
            c.args(["-p", p]);
        }
        run(&mut c)?;
    }
    // The third-party example builds out of tree, against the SDK only.
    run(cargo()
        .current_dir(root().join("examples/plugin-null-writer"))
        .env("CARGO_TARGET_DIR", root().join("target"))
        .args(["build", "--release", "--target", "wasm32-wasip2"]))
}

fn build(release: bool) -> Result<()> {
    build_plugins()?;
    // VMware's vCenter simulator, which the VMware adapter's tests run against.
    vcsim::ensure(&root())?;
    let mut c = cargo();
    c.args(["build", "--workspace", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo()
        .current_dir(root().join("plugins"))
        .args(["fmt", "--all", "--check"]))?;
    run(cargo()
        .current_dir(root().join("examples/plugin-null-writer"))
        .args(["fmt", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut c = cargo();
    c.current_dir(root().join("plugins"))
        .args(["clippy", "--all-targets"]);
    for p in NATIVE_PLUGIN_CRATES {
        c.args(["-p", p]);
    }
    run(c.args(["--", "-D", "warnings"]))?;
    // Plugins of each world separately: a component carries one world's SDK feature.
    for group in [WRITER_PLUGINS, ADAPTER_PLUGINS, CLOUD_PLUGINS] {
        let mut c = cargo();
        c.current_dir(root().join("plugins"))
            .args(["clippy", "--target", "wasm32-wasip2"]);
        for p in group {
            c.args(["-p", p]);
        }
        run(c.args(["--", "-D", "warnings"]))?;
    }
    Ok(())
}

fn test() -> Result<()> {
    ensure_test_tools()?;
    build(false)?;
    lint()?;
    run(cargo().args(["test", "--workspace"]))?;
    let mut c = cargo();
    c.current_dir(root().join("plugins")).arg("test");
    for p in NATIVE_PLUGIN_CRATES {
        c.args(["-p", p]);
    }
    run(&mut c)
}

fn demo() -> Result<()> {
    ensure_test_tools()?;
    build(false)?;
    demo::run(&root())
}

fn bench(args: &[&str]) -> Result<()> {
    let which = args.first().copied().unwrap_or("all");
    build_plugins()?;
    match which {
        "all" => {
            bench(&["plugins"])?;
            bench(&["formats"])?;
            bench(&["replication"])?;
            bench(&["points"])?;
            bench(&["nbd"])?;
            bench(&["scale"])?;
            bench(&["groups"])?;
            bench(&["failback"])
        }
        "plugins" => run(cargo().args([
            "run",
            "--release",
            "--quiet",
            "-p",
            "haven-host",
            "--example",
            "bench-plugins",
        ])),
        "formats" => {
            run(cargo().args(["build", "--release", "-p", "haven-cli"]))?;
            bench::formats(&root())
        }
        "replication" => {
            ensure_programs(&[("qemu-img", "qemu-utils"), ("rsync", "rsync")])?;
            run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
            bench_replication::run(&root())
        }
        "points" => {
            ensure_programs(&[("qemu-img", "qemu-utils")])?;
            run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
            bench_points::run(&root())
        }
        "nbd" => {
            ensure_programs(DEBIAN_PACKAGES)?;
            run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
            bench_nbd::run(&root())
        }
        "scale" => {
            run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
            bench_scale::run(&root())
        }
        "groups" => {
            run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
            bench_groups::run(&root())
        }
        "fs" => {
            ensure_programs(DEBIAN_PACKAGES)?;
            run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
            bench_fs::run(&root())
        }
        "failback" => {
            ensure_programs(&[("qemu-img", "qemu-utils"), ("rsync", "rsync")])?;
            run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
            bench_failback::run(&root())
        }
        other => {
            bail!(
                "unknown benchmark `{other}` (known: plugins, formats, replication, points, nbd, \
                 scale, groups, fs, failback)"
            )
        }
    }
}

fn fuzz(args: &[&str]) -> Result<()> {
    let Some(format) = args.first() else {
        bail!("usage: cargo xtask fuzz FORMAT|wire [SECONDS]")
    };
    let seconds = args.get(1).copied().unwrap_or("60");
    // The wire protocol's decoder, or a disk format's parser.
    let (dir, target) = match *format {
        "wire" => (root().join("gateway/wire/fuzz"), "decode"),
        f => (root().join("plugins").join(f).join("fuzz"), f),
    };
    if !dir.exists() {
        bail!("no fuzz target for `{format}` (expected {})", dir.display());
    }
    if !have("cargo-fuzz") {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let corpus = std::env::temp_dir().join(format!("haven-fuzz-{format}"));
    std::fs::create_dir_all(&corpus)?;
    // cargo-fuzz needs nightly features; the stable toolchain allows them with RUSTC_BOOTSTRAP.
    run(cargo()
        .current_dir(&dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "run", target])
        .arg(&corpus)
        .arg(dir.join("seeds"))
        .args(["--", &format!("-max_total_time={seconds}")]))
}
