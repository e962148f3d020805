//! The API over HTTPS: `haven login` pins the site CA by its fingerprint and keeps the token;
//! the CLI then talks to that gateway alone, and to nothing that presents another CA.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use haven_e2e::{Proc, admin_token_of, default_bin_dir, free_tcp_port, free_udp_port, run_ok};

/// The CA fingerprint in `haven-gateway init`'s output.
fn fingerprint_of(init_output: &str) -> Result<String> {
    init_output
        .lines()
        .find_map(|l| l.strip_prefix("CA fingerprint (SHA-256): "))
        .map(str::to_string)
        .with_context(|| format!("no CA fingerprint in init's output: {init_output}"))
}

fn init(bins: &Path, dir: &Path, site: &str) -> Result<String> {
    run_ok(
        Command::new(bins.join("haven-gateway"))
            .args(["init", "--data-dir"])
            .arg(dir)
            .args(["--site", site, "--name", "127.0.0.1"]),
    )
}

/// `haven ARGS` with logins in `config_dir` and nothing else from the environment.
fn haven(bins: &Path, config_dir: &Path, token: Option<&str>, args: &[&str]) -> Result<Output> {
    let mut c = Command::new(bins.join("haven"));
    c.args(args)
        .env("HAVEN_CONFIG_DIR", config_dir)
        .env_remove("HAVEN_SERVER")
        .env_remove("HAVEN_TOKEN");
    if let Some(t) = token {
        c.env("HAVEN_TOKEN", t);
    }
    Ok(c.output()?)
}

/// Asserts that `out` failed and said `needle` (`haven status` says why a gateway did not
/// answer on stdout, other commands on stderr).
fn fails_saying(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded, expected `{needle}`");
    assert!(
        stderr.contains(needle),
        "expected `{needle}` in the error: {stderr}"
    );
}

#[test]
fn the_cli_logs_in_over_https_pinning_the_site_ca() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let bins = default_bin_dir();
    let dir = tmp.path().join("mt");
    let out = init(&bins, &dir, "secondary")?;
    let (token, fingerprint) = (admin_token_of(&out)?, fingerprint_of(&out)?);
    // Another site's CA: what an impostor would present.
    let other_dir = tmp.path().join("other");
    let other_fingerprint = fingerprint_of(&init(&bins, &other_dir, "elsewhere")?)?;

    let port = free_tcp_port();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {dir:?}\n[master_target]\nlisten = \"127.0.0.1:{}\"\n\
             [api]\nlisten = \"127.0.0.1:{port}\"\ntls = true\n",
            free_udp_port()
        ),
    )?;
    let ready = dir.join("ready");
    let mut gateway = Proc::spawn(
        Command::new(bins.join("haven-gateway"))
            .args(["run", "--config"])
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready),
        &dir.join("gateway.log"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        gateway.check_alive("the gateway")?;
        if Instant::now() > deadline {
            bail!("the gateway did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let server = format!("https://127.0.0.1:{port}");
    assert_eq!(std::fs::read_to_string(&ready)?.trim(), server);

    let cli = tmp.path().join("cli");
    let logins = cli.join("logins.json");
    // Nothing is sent to an HTTPS server whose CA is not pinned, the token included.
    fails_saying(
        &haven(&bins, &cli, Some(&token), &["status", "--server", &server])?,
        &format!("its site CA is not pinned here: run `haven login --server {server}"),
    );
    fails_saying(
        &haven(&bins, &cli, Some(&token), &["login", "--server", &server])?,
        "give the site CA's fingerprint with --ca-fingerprint",
    );
    // The gateway presents its own CA, not the one named: no login.
    fails_saying(
        &haven(
            &bins,
            &cli,
            Some(&token),
            &[
                "login",
                "--server",
                &server,
                "--ca-fingerprint",
                &other_fingerprint,
            ],
        )?,
        &format!(
            "{server} presents a site CA with fingerprint {fingerprint}, not {other_fingerprint}"
        ),
    );
    assert!(!logins.exists());
    // The right CA and a token the gateway does not know: no login either.
    let unknown = format!("hvt_0123456789abcdef_{}", "0".repeat(64));
    fails_saying(
        &haven(
            &bins,
            &cli,
            Some(&unknown),
            &[
                "login",
                "--server",
                &server,
                "--ca-fingerprint",
                &fingerprint,
            ],
        )?,
        "/v1/whoami: HTTP 401",
    );
    assert!(!logins.exists());

    // Pasted as some tools print it: upper case with colons.
    let pasted = fingerprint
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":");
    let out = haven(
        &bins,
        &cli,
        Some(&token),
        &["login", "--server", &server, "--ca-fingerprint", &pasted],
    )?;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!(
            "logged in to {server} with token `first-admin` (role admin)"
        )),
        "{out:?}"
    );
    assert_eq!(
        std::fs::metadata(&logins)?.permissions().mode() & 0o777,
        0o600
    );

    // Neither a server nor a token is given from now on.
    let out = haven(&bins, &cli, None, &["status", "--json"])?;
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v[0]["api"], server.as_str());
    assert_eq!(v[0]["status"]["site"], "secondary");

    // API tokens with roles, by `haven token`: a viewer reads and may not mint enrollment
    // tokens; revoked, it lets nobody in.
    let out = haven(
        &bins,
        &cli,
        None,
        &["token", "create", "--role", "viewer", "--name", "dashboard"],
    )?;
    assert!(out.status.success(), "{out:?}");
    let viewer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(viewer.starts_with("hvt_"), "{viewer}");
    let out = haven(&bins, &cli, None, &["token", "list"])?;
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = list
        .lines()
        .find(|l| l.contains("dashboard"))
        .with_context(|| format!("no token `dashboard` listed: {list}"))?;
    assert!(line.contains("viewer"), "{line}");
    let id = line.split_whitespace().next().context("an id")?.to_string();
    let as_viewer = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--server", server.as_str()]);
        haven(&bins, &cli, Some(&viewer), &all)
    };
    assert!(as_viewer(&["status"])?.status.success());
    fails_saying(&as_viewer(&["token", "create"])?, "403");
    let out = haven(&bins, &cli, None, &["token", "revoke", &id])?;
    assert!(out.status.success(), "{out:?}");
    fails_saying(&as_viewer(&["status"])?, "401");

    // A login whose pinned CA is another one trusts nothing the gateway says.
    let mut saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&logins)?)?;
    saved["servers"][&server]["ca_cert_pem"] =
        std::fs::read_to_string(other_dir.join("ca/ca.crt.pem"))?.into();
    std::fs::write(&logins, serde_json::to_vec(&saved)?)?;
    fails_saying(&haven(&bins, &cli, None, &["status"])?, "UnknownIssuer");

    let out = haven(&bins, &cli, None, &["logout"])?;
    assert!(out.status.success(), "{out:?}");
    fails_saying(
        &haven(&bins, &cli, None, &["logout"])?,
        "not logged in anywhere",
    );
    gateway.check_alive("the gateway")?;
    Ok(())
}

#[test]
fn plain_http_is_refused_off_loopback() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let bins = default_bin_dir();
    let config = tmp.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[master_target]\n[api]\nlisten = \"0.0.0.0:9480\"\ntls = false\n",
            tmp.path()
        ),
    )?;
    let out = Command::new(bins.join("haven-gateway"))
        .args(["validate", "--config"])
        .arg(&config)
        .output()?;
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "error: api.tls = false with api.listen = 0.0.0.0:9480: plain HTTP is served on \
             loopback only; remove api.tls (HTTPS is then on) or listen on a loopback address"
        ),
        "{stderr}"
    );
    Ok(())
}
