//! `haven-gateway validate` against real plugins.

use std::path::{Path, PathBuf};
use std::process::Command;

fn plugin(file: &str) -> PathBuf {
    let dir = std::env::var_os("HAVEN_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip2/release")
        });
    dir.join(file)
}

fn validate(config: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config.replace("DATA", dir.path().to_str().unwrap())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_haven-gateway"))
        .args(["validate", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_good_config_reports_each_plugin_and_its_grants() {
    let raw = plugin("haven_raw.wasm");
    let config = format!(
        r#"
data_dir = "DATA"

[[plugin]]
kind = "target-writer"
name = "replicas"
path = "{}"
grants = {{ storage_root = "DATA", memory_mib = 128 }}
"#,
        raw.display()
    );
    let (code, stdout, stderr) = validate(&config);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.starts_with("plugin[0] `replicas`: ok — raw 0.1.0 (storage "),
        "{stdout}"
    );
    assert!(stdout.contains("; 128 MiB; 30000 ms per call)"), "{stdout}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let config = format!(
        r#"
data_dir = "DATA"

[[plugin]]
kind = "target-writer"
name = "no-root"
path = "{raw}"
grants = {{ storage_root = "DATA/missing" }}

[[plugin]]
kind = "target-writer"
name = "sneaky"
path = "{ungranted}"

[[plugin]]
kind = "target-writer"
name = "ghost"
path = "DATA/ghost.wasm"

[[plugin]]
kind = "adapter"
name = "wrong-world"
path = "{raw}"
grants = {{ storage_root = "DATA" }}
"#,
        raw = plugin("haven_raw.wasm").display(),
        ungranted = plugin("test_ungranted.wasm").display(),
    );
    let (code, _, stderr) = validate(&config);
    assert_eq!(code, Some(78), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 5, "{stderr}");
    assert!(
        lines[0].contains("plugin[0] `no-root`: grants.storage_root")
            && lines[0].contains("is not a folder")
    );
    assert!(
        lines[1].contains("plugin[1] `sneaky`: plugin `sneaky` imports `wasi:"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("plugin[2] `ghost`: plugin `ghost`: cannot read component"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].contains(
            "plugin[3] `wrong-world`: plugin `wrong-world` does not implement the `adapter` world"
        ),
        "{}",
        lines[3]
    );
    assert!(lines[4].ends_with(": 4 error(s)"), "{}", lines[4]);
}

#[test]
fn unknown_fields_are_refused_with_their_place() {
    let (code, _, stderr) = validate("data_dir = \"DATA\"\nplugins = []\n");
    assert_eq!(code, Some(78));
    assert!(stderr.contains("unknown field `plugins`"), "{stderr}");
}

#[test]
fn the_example_config_validates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(env!("CARGO_BIN_EXE_haven-gateway"))
        .current_dir(&root)
        .args(["validate", "--config", "examples/gateway.toml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("`replicas-raw`: ok — raw 0.1.0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("`replicas-vmdk`: ok — vmdk 0.1.0"),
        "{stdout}"
    );
}

/// The site examples validate once their installation paths point at this build.
#[test]
fn the_site_examples_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let plugins = plugin("haven_raw.wasm");
    let plugin_dir = plugins.parent().unwrap().to_str().unwrap().to_string();
    for (file, expect) in [
        (
            "primary-site.toml",
            "process_server: listen 0.0.0.0:9443, forwards to 192.0.2.20:9444",
        ),
        (
            "secondary-site.toml",
            "master_target: listen 0.0.0.0:9444, writer replicas-raw",
        ),
    ] {
        let text = std::fs::read_to_string(root.join("examples").join(file)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("replicas")).unwrap();
        let text = text
            .replace("/usr/lib/haven/plugins", &plugin_dir)
            .replace("/var/lib/haven-gateway", dir.path().to_str().unwrap());
        let (code, stdout, stderr) = validate(&text);
        assert_eq!(code, Some(0), "{file}: {stderr}");
        assert!(stdout.contains(expect), "{file}: {stdout}");
    }
}

#[test]
fn role_mistakes_are_reported_together() {
    let (code, _, stderr) = validate(
        "data_dir = \"DATA\"\n\n[process_server]\nupstream = \"127.0.0.1:9444\"\n\
         cache_max_bytes = 1048576\n\n[master_target]\nwriter = \"nope\"\n",
    );
    assert_eq!(code, Some(78));
    assert!(
        stderr.contains("process_server.cache_max_bytes 1048576: at least 67108864"),
        "{stderr}"
    );
    assert!(
        stderr.contains("master_target.writer `nope` names no [[plugin]]"),
        "{stderr}"
    );
    assert!(stderr.contains("2 error(s)"), "{stderr}");
}
