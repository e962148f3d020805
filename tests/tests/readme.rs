//! The README's walkthrough, run as written: the shell block under "Two sites on one machine"
//! is taken from README.md line by line (folders moved below a temporary folder, ports made
//! free), run with bash, and then checked: the machine is protected under its name, a point
//! taken afterwards reads back equal to the source through a test failover.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use haven_e2e::{default_bin_dir, free_tcp_port, free_udp_port, poll};

/// The walkthrough's shell block, as it renders (the list item's indentation removed).
fn walkthrough(readme: &str) -> Result<String> {
    let from = readme
        .find("Two sites on one machine, run from a configuration server, step by step")
        .context("README has no walkthrough")?;
    let rest = &readme[from..];
    let open = rest.find("```sh\n").context("no shell block")? + "```sh\n".len();
    let close = rest[open..].find("```").context("unclosed shell block")? + open;
    Ok(rest[open..close]
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Kills the walkthrough's background processes (its process group) when dropped.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.0)])
            .status();
    }
}

/// `haven ARGS` with the walkthrough's logins (in `root/cli`).
fn haven(bins: &Path, root: &Path, token: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(bins.join("haven"))
        .args(args)
        .env("HAVEN_TOKEN", token)
        .env("HAVEN_CONFIG_DIR", root.join("cli"))
        .env_remove("HAVEN_SERVER")
        .output()?;
    if !out.status.success() {
        bail!(
            "haven {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_readme_walkthrough_works_as_written() -> Result<()> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
    let script = walkthrough(&readme)?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    // The walkthrough runs from the repository's folder: its pipeline is copied to the same
    // place below the temporary folder, with the same folders and ports moved.
    let quickstart = "examples/pipelines/quickstart.toml";
    let mut pipeline = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(quickstart),
    )?;
    let moved = |text: &str| {
        text.replace("/srv/", &format!("{}/srv/", root.display()))
            .replace("/var/lib/haven", &format!("{}/agent", root.display()))
    };
    let mut script = moved(&script);
    pipeline = moved(&pipeline);
    let cs_api = free_tcp_port();
    for (port, new) in [
        ("9445", free_udp_port()),
        ("9444", free_udp_port()),
        ("9443", free_udp_port()),
        ("9482", cs_api),
        ("9481", free_tcp_port()),
        ("9480", free_tcp_port()),
        ("10809", free_tcp_port()),
    ] {
        let (from, to) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{new}"));
        script = script.replace(&from, &to);
        pipeline = pipeline.replace(&from, &to);
    }
    std::fs::create_dir_all(root.join("srv"))?;
    std::fs::create_dir_all(root.join("examples/pipelines"))?;
    std::fs::write(root.join(quickstart), pipeline)?;
    let bins = default_bin_dir();
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    use std::os::unix::process::CommandExt;
    // Output to files: the programs it leaves in the background keep theirs open.
    let (out_path, err_path) = (root.join("walkthrough.out"), root.join("walkthrough.err"));
    let mut child = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("PATH", path)
        .env_remove("HAVEN_SERVER")
        .env_remove("HAVEN_TOKEN")
        // Logins of the walkthrough's own.
        .env("HAVEN_CONFIG_DIR", root.join("cli"))
        .current_dir(root)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()?;
    let _group = Group(child.id());
    let status = child.wait()?;
    let stdout = std::fs::read_to_string(&out_path)?;
    assert!(
        status.success(),
        "the walkthrough failed ({status}):\n{stdout}\n{}",
        std::fs::read_to_string(&err_path)?
    );
    // Its last commands printed both sites and the agent.
    assert!(stdout.contains("web01"), "{stdout}");

    // The item is found by the name the walkthrough gave it, through the configuration server
    // (HTTPS, its CA pinned by the walkthrough's `haven login`), with the admin token its
    // `init` printed.
    let mt = format!("https://127.0.0.1:{cs_api}");
    let token = haven_e2e::admin_token_of(&std::fs::read_to_string(root.join("srv/cs-init.txt"))?)?;
    let token = token.as_str();
    let point = poll(
        Duration::from_secs(120),
        Duration::from_millis(500),
        || match haven(
            &bins,
            root,
            token,
            &["point", "create", "web01", "--api", &mt],
        ) {
            Ok(id) => Ok(Ok(id.trim().to_string())),
            Err(e) => Ok(Err(format!("no point taken: {e:#}"))),
        },
    )?;
    let list = haven(
        &bins,
        root,
        token,
        &["point", "list", "web01", "--api", &mt],
    )?;
    assert!(list.contains(&point), "{list}");
    // The pipeline's policy is in force: a point every second (the agent's own is 5 s).
    poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let out = haven(
            &bins,
            root,
            token,
            &["point", "list", "web01", "--json", "--api", &mt],
        )?;
        let times = haven_e2e::point_times(&out)?;
        let fast = haven_e2e::close_pairs(&times, 1500);
        Ok(if fast >= 3 {
            Ok(())
        } else {
            Err(format!("no points a second apart: {times:?}"))
        })
    })?;
    // The point equals the source disk (nothing wrote after the walkthrough's write).
    let uri = haven(
        &bins,
        root,
        token,
        &["failover", "test", "web01", "--point", &point, "--api", &mt],
    )?;
    let disk = root.join("srv/web01.img");
    assert!(
        haven_e2e::images_equal(&disk, Path::new(uri.trim()))?,
        "the point at {uri} differs from the source"
    );
    haven(
        &bins,
        root,
        token,
        &["failover", "cleanup", "web01", "--api", &mt],
    )?;
    Ok(())
}
