//! The HTTP API against its own OpenAPI document: the document an independent validator
//! accepts, covering every route, and an API fuzzer driven by it that finds no server error.
//! Both gateways of a running cluster (a process server, a master target with a protected
//! item) are checked, and the fuzzer also runs against the configuration server they joined,
//! with an admin token (so it reaches every route).

use std::process::Command;

use anyhow::{Context, Result, bail};
use haven_e2e::{Cluster, ClusterOptions, mixed_disk, run_ok};

/// Fetches the document at `api` and validates it with `openapi-spec-validator` (PyPI);
/// returns its paths.
fn validated_paths(api: &str) -> Result<Vec<String>> {
    let script = "import json, sys, urllib.request\n\
                  from openapi_spec_validator import validate\n\
                  doc = json.load(urllib.request.urlopen(sys.argv[1] + '/v1/openapi.json'))\n\
                  validate(doc)\n\
                  print(doc['openapi'])\n\
                  print('\\n'.join(sorted(doc['paths'])))\n";
    let out = run_ok(Command::new("python3").args(["-c", script, api]))?;
    let mut lines = out.lines();
    let version = lines.next().context("no output")?;
    if !version.starts_with("3.1.") {
        bail!("{api}: OpenAPI version {version}, expected 3.1.x");
    }
    Ok(lines.map(str::to_string).collect())
}

#[test]
fn the_openapi_document_is_valid_and_describes_every_route() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, 8 << 20, 1)?;
    let c = Cluster::start(tmp.path(), &disk, ClusterOptions::default())?;
    for api in [&c.ps.api, &c.mt.api] {
        let paths = validated_paths(api)?;
        for route in [
            "/v1/status",
            "/v1/tokens",
            "/v1/agents",
            "/v1/agents/{id}/revoke",
            "/metrics",
            "/v1/items",
            "/v1/items/{item}",
            "/v1/items/{item}/points",
            "/v1/items/{item}/test-failover",
            "/v1/items/{item}/failover",
            "/v1/items/{item}/commit",
            "/v1/openapi.json",
            "/v1/api-tokens",
            "/v1/api-tokens/{id}",
            "/v1/audit",
        ] {
            assert!(
                paths.iter().any(|p| p == route),
                "{api}: the OpenAPI document lacks {route}: {paths:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn an_api_fuzzer_driven_by_the_document_finds_no_server_error() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk.raw");
    mixed_disk(&disk, 8 << 20, 2)?;
    let c = Cluster::start(
        tmp.path(),
        &disk,
        ClusterOptions {
            config_server: true,
            ..ClusterOptions::default()
        },
    )?;
    let cs = c.cs.as_ref().context("no configuration server")?;
    // schemathesis (PyPI), started through its module so no console script is needed on PATH.
    let cli = "import sys\n\
               from schemathesis.cli import schemathesis\n\
               sys.argv[0] = 'st'\n\
               sys.exit(schemathesis())\n";
    for api in [&c.ps.api, &c.mt.api, &cs.api] {
        let out = Command::new("python3")
            .args(["-c", cli, "run", &format!("{api}/v1/openapi.json")])
            // Requests the document allows and ones it does not (bad types, values out of
            // range, missing parameters), all with the token: the coverage phase also sends
            // requests without one, and those are answered ever more slowly (as a guesser's
            // are), past the fuzzer's patience.
            .args(["--phases", "examples,fuzzing", "--mode", "all"])
            .args(["--checks", "not_a_server_error", "--max-examples", "12"])
            .args([
                "--header",
                &format!("Authorization: Bearer {}", c.mt.admin_token),
            ])
            .args(["--workers", "1", "--no-color"])
            // Not the revocation of API tokens: the fuzzer learns token ids from the list and
            // would revoke the one it runs with, and every later request would be refused
            // (and slowed down, as a guesser's). `tests/login.rs` covers revocation.
            .args(["--exclude-path-regex", r"^/v1/api-tokens/\{id\}$"])
            .output()
            .context("running schemathesis")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("{api}: schemathesis found failures:\n{text}");
        }
    }
    Ok(())
}
