//! Commands that talk to a gateway's HTTP API: `haven status`, `haven token create`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use haven_engine::status::GatewayStatus;

/// The API address when neither `--api` nor `$HAVEN_API` gives one.
pub const DEFAULT_API: &str = "http://127.0.0.1:9480";

/// Longest the CLI waits for a gateway to accept the connection: a site that is down (its
/// host gone, not refusing) would otherwise hold every command for the system's ~2 minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Creates a one-time enrollment token at a gateway (for an agent, or for a process
    /// server enrolling with a master target).
    Create {
        /// The API of the gateway that will enroll the newcomer: the process server's for an
        /// agent, the master target's for a process server.
        #[arg(long, env = "HAVEN_API", default_value = DEFAULT_API)]
        api: String,
        /// How long the token stays valid, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Lists the agents (and process servers) enrolled at a gateway's site CA.
    List {
        /// The API of the gateway that enrolled them: the process server's for agents, the
        /// master target's for process servers.
        #[arg(long, env = "HAVEN_API", default_value = DEFAULT_API)]
        api: String,
    },
    /// Revokes an agent's certificates and cuts its live connections; it must enroll again
    /// with a new token to replicate.
    Revoke {
        /// The agent id (32 hex digits, from `haven agent list`).
        agent_id: String,
        /// The API of the gateway that enrolled it: the process server's for an agent, the
        /// master target's for a process server.
        #[arg(long, env = "HAVEN_API", default_value = DEFAULT_API)]
        api: String,
    },
}

pub fn agent(command: AgentCommand) -> Result<()> {
    match command {
        AgentCommand::List { api } => {
            let body = request(&api, "GET", "/v1/agents")?;
            let agents: Vec<serde_json::Value> = serde_json::from_str(&body)?;
            println!("{:<34} {:<20} {:<8}", "AGENT", "MACHINE", "STATE");
            for a in agents {
                println!(
                    "{:<34} {:<20} {:<8}",
                    a["agent_id"].as_str().unwrap_or("?"),
                    a["machine_name"].as_str().unwrap_or("?"),
                    if a["revoked"].as_bool().unwrap_or(false) {
                        "revoked"
                    } else {
                        "enrolled"
                    }
                );
            }
            Ok(())
        }
        AgentCommand::Revoke { agent_id, api } => {
            let path = format!("/v1/agents/{agent_id}/revoke");
            request(&api, "POST", &path)?;
            println!("agent {agent_id} revoked");
            Ok(())
        }
    }
}

/// One HTTP/1.1 exchange with a gateway's API; returns the body of a 2xx answer.
fn request(api: &str, method: &str, path: &str) -> Result<String> {
    request_with(api, method, path, Duration::from_secs(10))
}

/// [`request`], waiting at most `timeout` for the answer.
pub fn request_with(api: &str, method: &str, path: &str, timeout: Duration) -> Result<String> {
    let authority = api
        .strip_prefix("http://")
        .with_context(|| format!("API address `{api}`: give it as http://HOST:PORT"))?
        .trim_end_matches('/');
    tracing::debug!(%method, url = %format_args!("{api}{path}"), "gateway API request");
    let mut tcp = connect(authority).with_context(|| {
        format!("cannot reach the gateway API at {api}; is `haven-gateway run` running there?")
    })?;
    tcp.set_read_timeout(Some(timeout))?;
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw)
        .with_context(|| format!("reading the answer of {api}{path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{api}{path}: not an HTTP answer"))?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{api}{path}: no status code"))?;
    if !(200..300).contains(&code) {
        let message = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| body.to_string());
        bail!("{api}{path}: HTTP {code}: {message}");
    }
    Ok(body.to_string())
}

/// Connects to `authority` (HOST:PORT), trying each of its addresses for at most
/// [`CONNECT_TIMEOUT`].
fn connect(authority: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in authority.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{authority}: no address"))))
}

/// Fetches a gateway's status.
pub fn fetch_status(api: &str) -> Result<GatewayStatus> {
    let body = request(api, "GET", "/v1/status")?;
    serde_json::from_str(&body).with_context(|| format!("{api}/v1/status: unexpected answer"))
}

pub fn token(command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create { api, ttl } => {
            let body = request(&api, "POST", &format!("/v1/tokens?ttl={ttl}"))?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            println!("{}", v["token"].as_str().context("no token in the answer")?);
            Ok(())
        }
    }
}

pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `haven status`: every protected disk seen by the given gateways, asked all at once. A
/// gateway that does not answer is shown as unreachable, with why, and the others as usual;
/// the exit status is 0 when all answered, 1 when some did not, 2 when none did.
pub fn status(apis: &[String], json: bool) -> Result<ExitCode> {
    let all: Vec<(&String, Result<GatewayStatus>)> = std::thread::scope(|scope| {
        let asking: Vec<_> = apis
            .iter()
            .map(|api| (api, scope.spawn(|| fetch_status(api))))
            .collect();
        asking
            .into_iter()
            .map(|(api, t)| {
                let answer = t
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("asking {api} failed")));
                (api, answer)
            })
            .collect()
    });
    let silent: Vec<&str> = all
        .iter()
        .filter(|(_, s)| s.is_err())
        .map(|(api, _)| api.as_str())
        .collect();
    if json {
        // One entry per `--api`, in order: `status` when it answered, `error` when not.
        let v: Vec<_> = all
            .iter()
            .map(|(api, s)| match s {
                Ok(s) => serde_json::json!({ "api": api, "status": s }),
                Err(e) => serde_json::json!({ "api": api, "error": format!("{e:#}") }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (api, s) in &all {
            match s {
                Ok(s) => print_status(api, s),
                Err(e) => println!("unreachable: {api}: {e:#}"),
            }
        }
    }
    if silent.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "haven: no answer from {} of {} gateways: {}",
        silent.len(),
        all.len(),
        silent.join(", ")
    );
    let none_answered = silent.len() == all.len();
    Ok(ExitCode::from(if none_answered { 2 } else { 1 }))
}

/// One gateway's part of `haven status`'s table.
fn print_status(api: &str, s: &GatewayStatus) {
    println!("gateway {api} (site {})", s.site);
    if let Some(ps) = &s.process_server {
        println!(
            "  process server on {}: master target {} {}, cache {} of {}",
            ps.listen,
            ps.upstream,
            if ps.upstream_connected {
                "connected"
            } else if !ps.disks.is_empty() && ps.disks.iter().all(|d| d.failed_over.is_some()) {
                "not used (every item failed over)"
            } else {
                "NOT connected"
            },
            human_bytes(ps.cache_bytes as f64),
            human_bytes(ps.cache_max_bytes as f64)
        );
        println!(
            "  {:<16} {:>4} {:<13} {:>7} {:>12} {:>12} {:>10}",
            "MACHINE", "DISK", "STATE", "SYNC", "RECEIVING", "CACHE", "AGENT"
        );
        for d in &ps.disks {
            let agent = d
                .report
                .as_ref()
                .and_then(|r| r.disks.iter().find(|x| x.disk == d.disk));
            let state = d.state();
            let sync = agent.map_or("-".to_string(), |a| {
                format!(
                    "{:.0}%",
                    100.0 * a.sync_done_bytes as f64 / a.size.max(1) as f64
                )
            });
            println!(
                "  {:<16} {:>4} {:<13} {:>7} {:>10}/s {:>12} {:>10}",
                d.machine_name,
                d.disk,
                state,
                sync,
                human_bytes(d.receive_bytes_per_second),
                human_bytes(d.cache_bytes as f64),
                if d.agent_connected {
                    "connected"
                } else {
                    "away"
                }
            );
            if let Some(why) = &d.failed_over {
                println!("    failed over: {why}");
            } else if let Some(e) = &d.error {
                println!("    error: {e}");
            }
        }
    }
    if let Some(mt) = &s.master_target {
        println!("  master target on {} (writer {}):", mt.listen, mt.writer);
        println!(
            "  {:<16} {:>4} {:<13} {:>7} {:>10} {:>9} {:>12} {:>10} {:>7} {:<13}",
            "MACHINE",
            "DISK",
            "STATE",
            "SYNC",
            "LAG",
            "RPO(s)",
            "APPLYING",
            "SIZE",
            "POINTS",
            "ITEM"
        );
        for r in &mt.replicas {
            let agent = r
                .report
                .as_ref()
                .and_then(|rep| rep.disks.iter().find(|x| x.disk == r.disk));
            let sync = agent.map_or("-".to_string(), |a| {
                format!(
                    "{:.0}%",
                    100.0 * a.sync_done_bytes as f64 / a.size.max(1) as f64
                )
            });
            let rpo = r.rpo_seconds.map_or("-".to_string(), |x| format!("{x:.1}"));
            println!(
                "  {:<16} {:>4} {:<13} {:>7} {:>10} {:>9} {:>10}/s {:>10} {:>7} {:<13}",
                r.machine_name,
                r.disk,
                r.state(),
                sync,
                human_bytes(r.lag_bytes as f64),
                rpo,
                human_bytes(r.apply_bytes_per_second),
                human_bytes(r.size as f64),
                r.points,
                r.item_state
            );
            if let Some(uri) = &r.test_failover {
                println!("    test failover: {uri}");
            }
            if let Some(e) = &r.error {
                println!("    error: {e}");
            }
        }
    }
}
