//! `haven group …`: multi-machine consistency groups of the pipeline, at the configuration
//! server: their points, and a point taken now.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use ureq::http::Method;

use crate::recovery::{seg, time};
use crate::remote::{Client, default_server};

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Takes a group point now: every member's writes are held (at most --hold-ms), then all
    /// tag one point; prints its id.
    Point {
        /// The group's name in the pipeline.
        group: String,
        /// Longest the members' writes are held, ms; a member that does not hold in time makes
        /// the point fail (at least 4000 when a member ships through a cache account).
        #[arg(long, default_value_t = 500)]
        hold_ms: u64,
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
    /// The group's points (those every disk of every member holds), oldest first.
    Points {
        /// The group's name in the pipeline.
        group: String,
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn group(client: &Client, command: GroupCommand) -> Result<()> {
    match command {
        GroupCommand::Point {
            group,
            hold_ms,
            api,
        } => {
            let path = format!("/v1/groups/{}/points?hold_ms={hold_ms}", seg(&group));
            let body = client.request_with(&api, Method::POST, &path, Duration::from_secs(120))?;
            let point: serde_json::Value = serde_json::from_str(&body)?;
            println!("{}", point["point"]);
            eprintln!(
                "group {group}: point {} on {} machines, writes held at most {} ms",
                point["point"],
                point["members"].as_array().map_or(0, Vec::len),
                point["held_ms"]
            );
            Ok(())
        }
        GroupCommand::Points { group, api, json } => {
            let path = format!("/v1/groups/{}/points", seg(&group));
            let body = client.request(&api, Method::GET, &path)?;
            if json {
                println!("{body}");
                return Ok(());
            }
            let points: Vec<serde_json::Value> = serde_json::from_str(&body)?;
            println!("{:>15}  TAKEN", "POINT");
            for p in &points {
                println!(
                    "{:>15}  {}",
                    p["point"],
                    time(p["source_time_ms"].as_u64().unwrap_or(0))
                );
            }
            Ok(())
        }
    }
}
