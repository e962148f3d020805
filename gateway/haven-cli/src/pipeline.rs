//! `haven validate`, `haven apply`, `haven export`: the deployment as one pipeline file.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use ureq::http::Method;

use crate::remote::Client;

/// Exit status of a file with problems (sysexits' EX_CONFIG), as `haven-gateway validate`.
pub const EXIT_INVALID: u8 = 78;

/// Reads and checks `file`; prints every problem (exit 78) or a summary.
pub fn validate(file: &Path) -> Result<ExitCode> {
    match haven_pipeline::load(file) {
        Ok(p) => {
            println!(
                "{}: deployment `{}` is valid: {} site(s), {} gateway(s), {} plugin(s), {} \
                 policy(ies), {} machine(s), {} group(s), {} plan(s)",
                file.display(),
                p.deployment.name,
                p.sites.len(),
                p.gateways.len(),
                p.plugins.len(),
                p.policies.len(),
                p.machines.len(),
                p.groups.len(),
                p.plans.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(diagnostics) => {
            eprintln!("{diagnostics}");
            eprintln!(
                "{}: {} problem(s); nothing is applied until every one is fixed",
                file.display(),
                diagnostics.len()
            );
            Ok(ExitCode::from(EXIT_INVALID))
        }
    }
}

/// Checks `file` here, then applies it at the configuration server (or, with `dry_run`, shows
/// what would change).
pub fn apply(
    client: &Client,
    server: &str,
    file: &Path,
    dry_run: bool,
    allow_destroy: bool,
) -> Result<ExitCode> {
    if let Err(diagnostics) = haven_pipeline::load(file) {
        eprintln!("{diagnostics}");
        eprintln!(
            "{}: {} problem(s); nothing was applied",
            file.display(),
            diagnostics.len()
        );
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let name = file.file_name().map_or_else(
        || "pipeline.toml".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let path = format!(
        "/v1/pipeline?dry_run={dry_run}&allow_destroy={allow_destroy}&file={}",
        crate::recovery::seg(&name)
    );
    let answer = client.send(
        server,
        Method::POST,
        &path,
        (&text, "application/toml"),
        Duration::from_secs(60),
    )?;
    let v: serde_json::Value = serde_json::from_str(&answer)
        .with_context(|| format!("{server}/v1/pipeline: unexpected answer"))?;
    print!("{}", v["plan"].as_str().unwrap_or_default());
    if !v["plan"].as_str().unwrap_or_default().ends_with('\n') {
        println!();
    }
    match (dry_run, v["applied"].as_bool().unwrap_or(false)) {
        (true, _) => println!("Dry run: nothing was applied."),
        (false, true) => println!(
            "Applied: revision {}; gateways take it within seconds.",
            v["revision"]
        ),
        (false, false) => println!(
            "Nothing to apply: the deployment already runs this file (revision {}).",
            v["revision"]
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the pipeline the deployment runs, as a file `haven apply` accepts unchanged.
pub fn export(client: &Client, server: &str) -> Result<()> {
    let answer = client.request(server, Method::GET, "/v1/pipeline")?;
    let v: serde_json::Value = serde_json::from_str(&answer)
        .with_context(|| format!("{server}/v1/pipeline: unexpected answer"))?;
    print!("{}", v["toml"].as_str().context("no file in the answer")?);
    Ok(())
}
