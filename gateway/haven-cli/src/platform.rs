//! `haven platform …` (the pipeline's adapters and their machines) and `haven secret …` (what
//! their `secret:NAME` settings refer to), at the configuration server.

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use ureq::http::Method;

use crate::remote::{Client, default_server};

#[derive(Debug, Subcommand)]
pub enum PlatformCommand {
    /// The pipeline's adapters: their contract, what they checked, their machines, failures.
    List {
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
        /// Print the JSON the API answered.
        #[arg(long)]
        json: bool,
    },
    /// The machines an adapter saw at its last inventory.
    Machines {
        /// The adapter's name in the pipeline.
        name: String,
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
        /// Print the JSON the API answered.
        #[arg(long)]
        json: bool,
    },
    /// Checks an adapter and takes its inventory now.
    Refresh {
        /// The adapter's name in the pipeline.
        name: String,
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Stores a secret, its value read from standard input (or `--from-file`), never from the
    /// command line. Adapters whose settings say `secret:NAME` are loaded again.
    Set {
        /// The secret's name.
        name: String,
        /// Read the value from this file instead of standard input.
        #[arg(long)]
        from_file: Option<std::path::PathBuf>,
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
    /// The secrets held, by name (values are never shown).
    List {
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
    /// Deletes a secret.
    Delete {
        name: String,
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
}

fn time(v: &serde_json::Value) -> String {
    v.as_u64()
        .map_or_else(|| "-".to_string(), crate::recovery::time)
}

pub fn platform(client: &Client, command: PlatformCommand) -> Result<()> {
    match command {
        PlatformCommand::List { api, json } => {
            let body = client.request(&api, Method::GET, "/v1/platforms")?;
            if json {
                println!("{body}");
                return Ok(());
            }
            let list: Vec<serde_json::Value> = serde_json::from_str(&body)?;
            println!(
                "{:<16} {:<8} {:>8} {:<20} STATE",
                "ADAPTER", "CONTRACT", "MACHINES", "INVENTORY (UTC)"
            );
            for p in &list {
                let state = match p["error"].as_str() {
                    Some(e) => format!("failing: {e}"),
                    None => p["about"].as_str().unwrap_or("ok").to_string(),
                };
                println!(
                    "{:<16} {:<8} {:>8} {:<20} {}",
                    p["name"].as_str().unwrap_or("?"),
                    p["contract"]
                        .as_str()
                        .filter(|c| !c.is_empty())
                        .unwrap_or("-"),
                    p["machines"].as_u64().unwrap_or(0),
                    time(&p["inventory_ms"]),
                    state
                );
            }
        }
        PlatformCommand::Machines { name, api, json } => {
            let body = client.request(
                &api,
                Method::GET,
                &format!("/v1/platforms/{}/machines", name),
            )?;
            if json {
                println!("{body}");
                return Ok(());
            }
            let list: Vec<serde_json::Value> = serde_json::from_str(&body)?;
            println!(
                "{:<12} {:<24} {:<9} {:>4} {:>8} {:>5} NETWORKS",
                "ID", "NAME", "POWER", "CPUS", "MEMORY", "DISKS"
            );
            for m in &list {
                let disks = m["disks"].as_array().map_or(0, Vec::len);
                let networks: Vec<&str> = m["nics"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n["network"].as_str())
                    .collect();
                println!(
                    "{:<12} {:<24} {:<9} {:>4} {:>6}Mi {:>5} {}",
                    m["id"].as_str().unwrap_or("?"),
                    m["name"].as_str().unwrap_or("?"),
                    m["power"].as_str().unwrap_or("?"),
                    m["cpus"].as_u64().unwrap_or(0),
                    m["memory_mib"].as_u64().unwrap_or(0),
                    disks,
                    networks.join(", ")
                );
            }
        }
        PlatformCommand::Refresh { name, api } => {
            let body = client.request_with(
                &api,
                Method::POST,
                &format!("/v1/platforms/{}/refresh", name),
                Duration::from_secs(300),
            )?;
            let p: serde_json::Value = serde_json::from_str(&body)?;
            println!(
                "{}: {} machine(s); {}",
                p["name"].as_str().unwrap_or("?"),
                p["machines"].as_u64().unwrap_or(0),
                p["about"].as_str().unwrap_or("checked")
            );
        }
    }
    Ok(())
}

pub fn secret(client: &Client, command: SecretCommand) -> Result<()> {
    match command {
        SecretCommand::Set {
            name,
            from_file,
            api,
        } => {
            let value = match from_file {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading the secret from {}", path.display()))?,
                None => {
                    let mut v = String::new();
                    std::io::stdin()
                        .read_to_string(&mut v)
                        .context("reading the secret from standard input")?;
                    v
                }
            };
            client.send(
                &api,
                Method::PUT,
                &format!("/v1/secrets/{}", name),
                (value.as_bytes(), "text/plain"),
                Duration::from_secs(30),
            )?;
            println!("Secret `{name}` stored.");
        }
        SecretCommand::List { api } => {
            let body = client.request(&api, Method::GET, "/v1/secrets")?;
            let list: Vec<serde_json::Value> = serde_json::from_str(&body)?;
            println!("{:<32} {:<20} UPDATED (UTC)", "SECRET", "CREATED (UTC)");
            for s in &list {
                println!(
                    "{:<32} {:<20} {}",
                    s["name"].as_str().unwrap_or("?"),
                    time(&s["created_ms"]),
                    time(&s["updated_ms"])
                );
            }
        }
        SecretCommand::Delete { name, api } => {
            client.request(&api, Method::DELETE, &format!("/v1/secrets/{}", name))?;
            println!("Secret `{name}` deleted.");
        }
    }
    Ok(())
}
