//! Commands that talk to a gateway's HTTP API: `haven status`, `haven token create`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use haven_engine::status::GatewayStatus;
use ureq::Timeout;
use ureq::tls::{Certificate, RootCerts, TlsConfig};

use crate::login::Logins;
use ureq::http::header::AUTHORIZATION;
use ureq::http::uri::Authority;
use ureq::http::{HeaderValue, Method, Request};

/// The server address when neither `--server`, `$HAVEN_SERVER` nor a login gives one.
pub const DEFAULT_API: &str = "http://127.0.0.1:9480";

/// Longest the CLI waits for a gateway to accept the connection: a site that is down (its
/// host gone, not refusing) would otherwise hold every command for the system's ~2 minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Creates a token and prints it (only now): with `--role`, an API token with that role
    /// (admin only); without, a one-time enrollment token (for an agent or a gateway
    /// enrolling there; admin only).
    Create {
        /// The API of the gateway: for an enrollment token, the one that will enroll the
        /// newcomer (the configuration server, or a master target for a process server).
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
        /// How long an enrollment token stays valid, in seconds.
        #[arg(long, default_value_t = 3600, conflicts_with = "role")]
        ttl: u64,
        /// An API token with this role: admin, operator (points, test failover, failover) or
        /// viewer (read only).
        #[arg(long, requires = "name")]
        role: Option<String>,
        /// What the API token is for (letters, digits, - _ . @).
        #[arg(long, requires = "role")]
        name: Option<String>,
    },
    /// Lists a gateway's API tokens (never their secrets). Enrollment tokens are used once and
    /// expire; they are not listed.
    List {
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
    /// Revokes an API token: it lets nobody in from now on.
    Revoke {
        /// The token's id (16 hex digits, from `haven token list`).
        id: String,
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Lists the agents (and process servers) enrolled at a gateway's site CA.
    List {
        /// The API of the gateway that enrolled them: the process server's for agents, the
        /// master target's for process servers.
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
    /// Revokes an agent's certificates and cuts its live connections; it must enroll again
    /// with a new token to replicate.
    Revoke {
        /// The agent id (32 hex digits, from `haven agent list`).
        agent_id: String,
        /// The API of the gateway that enrolled it: the process server's for an agent, the
        /// master target's for a process server.
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
}

pub fn agent(client: &Client, command: AgentCommand) -> Result<()> {
    match command {
        AgentCommand::List { api } => {
            let body = client.request(&api, Method::GET, "/v1/agents")?;
            let agents: Vec<serde_json::Value> = serde_json::from_str(&body)?;
            println!(
                "{:<34} {:<20} {:<8} {:<8} {:<16} MOVES",
                "AGENT", "MACHINE", "KIND", "STATE", "PROCESS SERVER"
            );
            for a in agents {
                let placement = &a["placement"];
                println!(
                    "{:<34} {:<20} {:<8} {:<8} {:<16} {}",
                    a["agent_id"].as_str().unwrap_or("?"),
                    a["machine_name"].as_str().unwrap_or("?"),
                    if a["gateway"].as_bool().unwrap_or(false) {
                        "gateway"
                    } else {
                        "agent"
                    },
                    if a["revoked"].as_bool().unwrap_or(false) {
                        "revoked"
                    } else {
                        "enrolled"
                    },
                    placement["process_server"].as_str().unwrap_or("-"),
                    placement["moves"]
                        .as_u64()
                        .map_or("-".into(), |m| m.to_string()),
                );
            }
            Ok(())
        }
        AgentCommand::Revoke { agent_id, api } => {
            let path = format!("/v1/agents/{agent_id}/revoke");
            client.request(&api, Method::POST, &path)?;
            println!("agent {agent_id} revoked");
            Ok(())
        }
    }
}

/// How the CLI talks to gateways' APIs: HTTP/1.1 with [`ureq`], over HTTPS to a server whose
/// site CA was pinned at `haven login`, one connection per request, and the bearer token every
/// request carries (`--token`, else the login's).
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    token: Option<String>,
    logins: Logins,
    /// Accept any server certificate: only to fetch the public CA certificate at login, which
    /// is then checked against the fingerprint the operator gave.
    unverified: bool,
}

/// Says whether there is a token, never the token.
impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("logins", &self.logins.servers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client whose requests carry `Authorization: Bearer TOKEN` when `token` is given and
    /// not empty, else the token of the server's login; HTTPS servers are trusted through the
    /// CA pinned in their login.
    pub fn with_logins(token: Option<String>, logins: Logins) -> Self {
        let agent = ureq::Agent::config_builder()
            // A 4xx/5xx answer is read like any other: its body says why.
            .http_status_as_error(false)
            // The gateway's answer as it is: a redirect is not followed, and `http_proxy` from
            // the environment is not for a site's own API.
            .max_redirects(0)
            .proxy(None)
            // One connection per request, as before: a POST never goes out on an idle
            // connection the gateway is closing.
            .max_idle_connections(0)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .user_agent(concat!("haven/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Self {
            agent,
            token: token.filter(|t| !t.is_empty()),
            logins,
            unverified: false,
        }
    }

    /// A client without logins.
    #[cfg(test)]
    pub fn new(token: Option<String>) -> Self {
        Self::with_logins(token, Logins::default())
    }

    /// A client that trusts any server and sends no token: for `/v1/ca` at login only.
    pub fn unverified() -> Self {
        Self {
            unverified: true,
            ..Self::with_logins(None, Logins::default())
        }
    }

    /// One exchange with a gateway's API (`api` is `http[s]://HOST:PORT`, `path` starts with
    /// `/` and may hold a query; requests carry no body); returns the body of a 2xx answer.
    pub fn request(&self, api: &str, method: Method, path: &str) -> Result<String> {
        self.request_with(api, method, path, Duration::from_secs(10))
    }

    /// [`Client::request`], giving up once the whole exchange, connecting included, has taken
    /// `timeout` (connecting alone gives up after [`CONNECT_TIMEOUT`]).
    pub fn request_with(
        &self,
        api: &str,
        method: Method,
        path: &str,
        timeout: Duration,
    ) -> Result<String> {
        self.exchange(api, method, path, None, timeout)
    }

    /// One exchange sending `body` (with its content type), giving up after `timeout`.
    pub fn send(
        &self,
        api: &str,
        method: Method,
        path: &str,
        body: (&[u8], &str),
        timeout: Duration,
    ) -> Result<String> {
        self.exchange(api, method, path, Some(body), timeout)
    }

    fn exchange(
        &self,
        api: &str,
        method: Method,
        path: &str,
        body: Option<(&[u8], &str)>,
        timeout: Duration,
    ) -> Result<String> {
        let (scheme, authority) = split_server(api)?;
        let server = format!("{scheme}://{authority}");
        let login = self.logins.get(&server);
        let tls =
            match (scheme, self.unverified) {
                ("https", true) => Some(TlsConfig::builder().disable_verification(true).build()),
                ("https", false) => {
                    let ca = login.and_then(|l| l.ca_cert_pem.as_deref()).with_context(|| {
                    format!(
                        "{server} speaks HTTPS and its site CA is not pinned here: run `haven \
                         login --server {server} --ca-fingerprint SHA256` first (the \
                         fingerprint is printed by `haven-gateway init`)"
                    )
                })?;
                    let ca = Certificate::from_pem(ca.as_bytes()).with_context(|| {
                        format!("the CA pinned for {server} is damaged; run `haven login` again")
                    })?;
                    Some(
                        TlsConfig::builder()
                            .root_certs(RootCerts::new_with_certs(&[ca]))
                            .build(),
                    )
                }
                _ => None,
            };
        tracing::debug!(%method, url = %format_args!("{server}{path}"), "gateway API request");
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{server}{path}"));
        let token = match self.unverified {
            true => None,
            false => self
                .token
                .as_deref()
                .or_else(|| login.map(|l| l.token.as_str())),
        };
        if let Some(token) = token {
            let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
                anyhow!(
                    "the API token (--token or $HAVEN_TOKEN) holds characters an HTTP header \
                     cannot carry"
                )
            })?;
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        if let Some((_, content_type)) = body {
            request = request.header(ureq::http::header::CONTENT_TYPE, content_type);
        }
        let request = request
            // Without a body, says so (`Content-Length: 0`) rather than as an empty chunked one.
            .body(body.map_or(&[][..], |(b, _)| b))
            .with_context(|| format!("{api}{path}: not a valid request"))?;
        let mut config = self
            .agent
            .configure_request(request)
            .timeout_global(Some(timeout));
        if let Some(tls) = tls {
            config = config.tls_config(tls);
        }
        let mut answer = self
            .agent
            .run(config.build())
            .map_err(|e| failure(e, api, path, timeout))?;
        let body = answer
            .body_mut()
            .with_config()
            // No bound, as before: a big site's status is large.
            .limit(u64::MAX)
            .lossy_utf8(true)
            .read_to_string()
            .map_err(|e| failure(e, api, path, timeout))?;
        let status = answer.status();
        if !status.is_success() {
            // `{"error": …}`, with `problems` (one per line) when the answer lists them.
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    let mut m = v["error"].as_str()?.to_owned();
                    for p in v["problems"].as_array().into_iter().flatten() {
                        m.push_str("\n  ");
                        m.push_str(p.as_str().unwrap_or_default());
                    }
                    Some(m)
                })
                .unwrap_or(body);
            bail!("{api}{path}: HTTP {}: {message}", status.as_u16());
        }
        Ok(body)
    }
}

/// The server commands use when none is named: the last `haven login`'s, else
/// [`DEFAULT_API`].
pub fn default_server() -> String {
    Logins::load()
        .ok()
        .and_then(|l| l.default)
        .unwrap_or_else(|| DEFAULT_API.to_string())
}

/// The scheme and `HOST:PORT` of a server address given as `http[s]://HOST:PORT` (a trailing
/// `/` is allowed).
pub fn split_server(server: &str) -> Result<(&'static str, Authority)> {
    let (scheme, rest) = if let Some(rest) = server.strip_prefix("https://") {
        ("https", rest)
    } else if let Some(rest) = server.strip_prefix("http://") {
        ("http", rest)
    } else {
        ("", server)
    };
    Some(rest.trim_end_matches('/'))
        .filter(|_| !scheme.is_empty())
        .and_then(|a| a.parse::<Authority>().ok())
        .filter(|a| a.port_u16().is_some() && !a.as_str().contains('@'))
        .map(|a| (scheme, a))
        .with_context(|| {
            format!("server address `{server}`: give it as https://HOST:PORT or http://HOST:PORT")
        })
}

/// What went wrong in an exchange with `{api}{path}`, said for the operator: the gateway could
/// not be reached, did not answer within `timeout`, or broke off its answer.
fn failure(e: ureq::Error, api: &str, path: &str, timeout: Duration) -> anyhow::Error {
    use std::io::ErrorKind;
    let unreachable =
        || format!("cannot reach the gateway API at {api}; is `haven-gateway run` running there?");
    match e {
        ureq::Error::Timeout(Timeout::Resolve | Timeout::Connect) => {
            anyhow!("no connection within {CONNECT_TIMEOUT:?}").context(unreachable())
        }
        ureq::Error::Timeout(_) => anyhow!("{api}{path}: no answer within {timeout:?}"),
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => {
            anyhow::Error::new(e).context(unreachable())
        }
        ureq::Error::Io(io)
            if matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::NetworkDown
                    | ErrorKind::AddrNotAvailable
            ) =>
        {
            anyhow::Error::new(io).context(unreachable())
        }
        ureq::Error::Io(io) => {
            anyhow::Error::new(io).context(format!("reading the answer of {api}{path}"))
        }
        e => anyhow::Error::new(e).context(format!("reading the answer of {api}{path}")),
    }
}

/// Fetches a gateway's status.
pub fn fetch_status(client: &Client, api: &str) -> Result<GatewayStatus> {
    let body = client.request(api, Method::GET, "/v1/status")?;
    serde_json::from_str(&body).with_context(|| format!("{api}/v1/status: unexpected answer"))
}

pub fn token(client: &Client, command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create {
            api,
            role: Some(role),
            name: Some(name),
            ..
        } => api_token(client, ApiTokenCommand::Create { name, role, api }),
        TokenCommand::Create { api, ttl, .. } => {
            let body = client.request(&api, Method::POST, &format!("/v1/tokens?ttl={ttl}"))?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            println!("{}", v["token"].as_str().context("no token in the answer")?);
            Ok(())
        }
        TokenCommand::List { api } => api_token(client, ApiTokenCommand::List { api }),
        TokenCommand::Revoke { id, api } => api_token(client, ApiTokenCommand::Revoke { id, api }),
    }
}

#[derive(Debug, Subcommand)]
pub enum ApiTokenCommand {
    /// Creates an API token at a gateway and prints it (only now). Needs an admin token.
    Create {
        /// What the token is for (letters, digits, - _ . @).
        #[arg(long)]
        name: String,
        /// admin, operator (points, test failover, failover) or viewer (read only).
        #[arg(long, default_value = "viewer")]
        role: String,
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
    /// Lists a gateway's API tokens (never their secrets).
    List {
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
    /// Revokes an API token: it lets nobody in from now on.
    Revoke {
        /// The token's id (16 hex digits, from `haven api-token list`).
        id: String,
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
    },
}

pub fn api_token(client: &Client, command: ApiTokenCommand) -> Result<()> {
    match command {
        ApiTokenCommand::Create { name, role, api } => {
            let path = format!(
                "/v1/api-tokens?name={}&role={}",
                crate::recovery::seg(&name),
                crate::recovery::seg(&role)
            );
            let body = client.request(&api, Method::POST, &path)?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            eprintln!(
                "API token {} ({name}, role {role}) created; it is shown only now:",
                v["info"]["id"].as_str().unwrap_or("?")
            );
            println!("{}", v["token"].as_str().context("no token in the answer")?);
        }
        ApiTokenCommand::List { api } => {
            let body = client.request(&api, Method::GET, "/v1/api-tokens")?;
            let tokens: Vec<serde_json::Value> = serde_json::from_str(&body)?;
            println!("{:<18} {:<24} {:<9} STATE", "ID", "NAME", "ROLE");
            for t in tokens {
                println!(
                    "{:<18} {:<24} {:<9} {}",
                    t["id"].as_str().unwrap_or("?"),
                    t["name"].as_str().unwrap_or("?"),
                    t["role"].as_str().unwrap_or("?"),
                    if t["revoked_ms"].is_null() {
                        "active"
                    } else {
                        "revoked"
                    }
                );
            }
        }
        ApiTokenCommand::Revoke { id, api } => {
            let path = format!("/v1/api-tokens/{}", crate::recovery::seg(&id));
            client.request(&api, Method::DELETE, &path)?;
            println!("API token {id} revoked");
        }
    }
    Ok(())
}

/// `haven events`: the deployment's events at its configuration server, oldest first; with
/// `follow`, new ones as they come (asked every second) until interrupted.
pub fn events(client: &Client, api: &str, since: u64, limit: usize, follow: bool) -> Result<()> {
    println!(
        "{:>6} {:<20} {:<8} {:<26} {:<12} TEXT",
        "SEQ", "TIME (UTC)", "SEVERITY", "KIND", "ITEM"
    );
    let mut since = since;
    loop {
        let body = client.request(
            api,
            Method::GET,
            &format!("/v1/events?since={since}&limit={}", limit.clamp(1, 1000)),
        )?;
        let events: Vec<serde_json::Value> = serde_json::from_str(&body)
            .with_context(|| format!("{api}/v1/events: unexpected answer"))?;
        for e in &events {
            println!(
                "{:>6} {:<20} {:<8} {:<26} {:<12} {}",
                e["seq"].as_u64().unwrap_or(0),
                crate::recovery::time(e["time_ms"].as_u64().unwrap_or(0)),
                e["severity"].as_str().unwrap_or("?"),
                e["kind"].as_str().unwrap_or("?"),
                e["item"].as_str().or(e["gateway"].as_str()).unwrap_or("-"),
                e["text"].as_str().unwrap_or("")
            );
            since = since.max(e["seq"].as_u64().unwrap_or(0));
        }
        if !follow {
            return Ok(());
        }
        std::io::Write::flush(&mut std::io::stdout())?;
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// The newest jobs, newest first.
    List {
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print the JSON the API answered.
        #[arg(long)]
        json: bool,
    },
    /// One job with each step's state, times and output.
    Show {
        /// The job's id (from `haven job list`).
        id: u64,
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = default_server())]
        api: String,
        /// Print the JSON the API answered.
        #[arg(long)]
        json: bool,
    },
}

/// `text` cut to `most` characters (an ellipsis says so).
fn short(text: &str, most: usize) -> String {
    match text.char_indices().nth(most) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

pub fn job(client: &Client, command: JobCommand) -> Result<()> {
    let time = |v: &serde_json::Value| {
        v.as_u64()
            .map_or_else(|| "-".to_string(), crate::recovery::time)
    };
    match command {
        JobCommand::List { api, limit, json } => {
            let body = client.request(&api, Method::GET, &format!("/v1/jobs?limit={limit}"))?;
            if json {
                println!("{body}");
                return Ok(());
            }
            let jobs: Vec<serde_json::Value> = serde_json::from_str(&body)?;
            println!(
                "{:>6} {:<20} {:<22} {:<16} {:<10} OUTCOME",
                "JOB", "STARTED (UTC)", "KIND", "ITEM", "STATE"
            );
            for j in &jobs {
                let outcome = j["steps"]
                    .as_array()
                    .and_then(|s| s.last())
                    .and_then(|s| s["output"].as_str())
                    .unwrap_or("");
                println!(
                    "{:>6} {:<20} {:<22} {:<16} {:<10} {}",
                    j["id"].as_u64().unwrap_or(0),
                    time(&j["started_ms"]),
                    j["kind"].as_str().unwrap_or("?"),
                    j["item"].as_str().unwrap_or("-"),
                    j["state"].as_str().unwrap_or("?"),
                    short(outcome.lines().next().unwrap_or(""), 72)
                );
            }
        }
        JobCommand::Show { id, api, json } => {
            let body = client.request(&api, Method::GET, &format!("/v1/jobs/{id}"))?;
            if json {
                println!("{body}");
                return Ok(());
            }
            let j: serde_json::Value = serde_json::from_str(&body)?;
            println!(
                "job {} ({}{}): {}, started {} by {}, ended {}",
                j["id"].as_u64().unwrap_or(0),
                j["kind"].as_str().unwrap_or("?"),
                j["item"]
                    .as_str()
                    .map_or(String::new(), |i| format!(" of {i}")),
                j["state"].as_str().unwrap_or("?"),
                time(&j["started_ms"]),
                j["caller"]
                    .as_str()
                    .filter(|c| !c.is_empty())
                    .unwrap_or("-"),
                time(&j["ended_ms"])
            );
            for (i, s) in j["steps"].as_array().into_iter().flatten().enumerate() {
                println!(
                    "  {}. {} — {} ({} → {})",
                    i + 1,
                    s["name"].as_str().unwrap_or("?"),
                    s["state"].as_str().unwrap_or("?"),
                    time(&s["started_ms"]),
                    time(&s["ended_ms"])
                );
                for line in s["output"].as_str().unwrap_or("").lines() {
                    println!("     {line}");
                }
            }
        }
    }
    Ok(())
}

/// `haven audit`: the gateway's audit log of changes, newest last.
pub fn audit(client: &Client, api: &str, limit: usize) -> Result<()> {
    let body = client.request(api, Method::GET, &format!("/v1/audit?limit={limit}"))?;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&body)?;
    println!(
        "{:<20} {:<20} {:<9} {:<7} {:<5} PATH",
        "TIME (UTC)", "TOKEN", "ROLE", "METHOD", "CODE"
    );
    for e in entries {
        println!(
            "{:<20} {:<20} {:<9} {:<7} {:<5} {}",
            crate::recovery::time(e["time_ms"].as_u64().unwrap_or(0)),
            e["token_name"].as_str().unwrap_or("-"),
            e["role"].as_str().unwrap_or("-"),
            e["method"].as_str().unwrap_or("?"),
            e["status"].as_u64().unwrap_or(0),
            e["path"].as_str().unwrap_or("?")
        );
    }
    Ok(())
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
pub fn status(client: &Client, apis: &[String], json: bool) -> Result<ExitCode> {
    let all: Vec<(&String, Result<GatewayStatus>)> = std::thread::scope(|scope| {
        let asking: Vec<_> = apis
            .iter()
            .map(|api| (api, scope.spawn(|| fetch_status(client, api))))
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
            "  process server on {}: master target {} {}, cache {} of {}; churn {}/s, upload \
             {}/s, RPO achievable {}",
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
            human_bytes(ps.cache_max_bytes as f64),
            human_bytes(ps.churn_bytes_per_second),
            human_bytes(ps.upload_bytes_per_second),
            ps.achievable_rpo_seconds
                .map_or("none (the link does not keep up)".to_string(), |s| format!(
                    "{s:.1} s"
                ))
        );
        if let Some(drain) = &ps.drain {
            let agents: Vec<String> = drain
                .agents
                .iter()
                .map(|a| format!("{} ({})", a.machine_name, a.agent_id))
                .collect();
            println!(
                "  drains cache account {}: {}",
                drain.account,
                match agents.is_empty() {
                    true => "no agent now".to_string(),
                    false => agents.join(", "),
                }
            );
        }
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
            if r.seeding {
                let progress = r.reprotect.as_ref().map_or(String::new(), |p| {
                    format!(
                        ": compared {} of {}, sent {}{}",
                        human_bytes(p.compared_bytes as f64),
                        human_bytes(r.size as f64),
                        human_bytes(p.sent_bytes as f64),
                        p.eta_seconds
                            .map_or(String::new(), |s| format!(", about {s:.0} s left"))
                    )
                });
                println!(
                    "    reprotect onto {}{progress}; not written before the first point after \
                     the comparison",
                    r.path
                );
            }
            if let Some(e) = &r.error {
                println!("    error: {e}");
            }
        }
    }
    if let Some(gateways) = &s.config_server {
        println!(
            "  configuration server: {} gateway(s) joined",
            gateways.len()
        );
        for g in gateways {
            let r = &g.record;
            let health = g.health.as_ref().map_or(String::new(), |h| {
                format!(
                    ", CPU {:.0} %, memory {}, free {} of {}",
                    h.cpu_percent,
                    human_bytes(h.memory_bytes as f64),
                    human_bytes(h.free_bytes as f64),
                    human_bytes(h.total_bytes as f64)
                )
            });
            println!(
                "  gateway {} (site {}, {}): {}{health}",
                r.name,
                r.site,
                if r.roles.is_empty() {
                    "no role".to_string()
                } else {
                    r.roles.join(", ")
                },
                if g.connected {
                    "connected".to_string()
                } else {
                    format!("gone since {}", crate::recovery::time(r.last_seen_ms))
                },
            );
            let status = g
                .status
                .clone()
                .and_then(|v| serde_json::from_value::<GatewayStatus>(v).ok());
            if let (true, Some(status)) = (g.connected, status) {
                print_status(&format!("{api} → {}", r.name), &status);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::mpsc;
    use std::time::Instant;

    use super::*;

    /// The head of the request on `conn` (request line and headers), without the blank line.
    fn read_head(conn: &TcpStream) -> String {
        let mut head = String::new();
        let mut reader = BufReader::new(conn);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                return head;
            }
            head.push_str(&line);
        }
    }

    /// An API on loopback that takes one request, hands its head over, then answers `code`
    /// with `body` and closes; returns its URL and where the head arrives.
    fn one_answer(code: u16, body: &'static str) -> (String, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        let (head_tx, head_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // The test may not look at it.
            let _ = head_tx.send(read_head(&conn));
            write!(
                conn,
                "HTTP/1.1 {code} Whatever\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        });
        (api, head_rx)
    }

    #[test]
    fn a_2xx_answer_gives_its_body() {
        let (api, _) = one_answer(201, r#"{"token":"abc"}"#);
        let body = Client::new(None)
            .request(&api, Method::POST, "/v1/tokens?ttl=60")
            .unwrap();
        assert_eq!(body, r#"{"token":"abc"}"#);
    }

    #[test]
    fn an_error_answer_says_the_error_field_else_the_body() {
        let (api, _) = one_answer(409, r#"{"error":"busy"}"#);
        let e = Client::new(None)
            .request(&api, Method::POST, "/v1/x")
            .unwrap_err();
        assert_eq!(format!("{e:#}"), format!("{api}/v1/x: HTTP 409: busy"));

        let (api, _) = one_answer(500, "out of disk");
        let e = Client::new(None)
            .request(&api, Method::GET, "/v1/x")
            .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!("{api}/v1/x: HTTP 500: out of disk")
        );
    }

    #[test]
    fn requests_carry_no_body_and_the_token_when_one_is_given() {
        let heads = [None, Some(""), Some("s3cret")].map(|token| {
            let (api, head) = one_answer(200, "{}");
            Client::new(token.map(str::to_owned))
                .request(&api, Method::DELETE, "/v1/items/web01/test-failover")
                .unwrap();
            head.recv().unwrap().to_ascii_lowercase()
        });
        for head in &heads {
            assert!(
                head.starts_with("delete /v1/items/web01/test-failover http/1.1\r\n"),
                "{head}"
            );
            assert!(head.contains("\r\ncontent-length: 0\r\n"), "{head}");
            assert!(!head.contains("transfer-encoding"), "{head}");
        }
        assert!(!heads[0].contains("authorization"), "{}", heads[0]);
        assert!(!heads[1].contains("authorization"), "{}", heads[1]);
        assert!(
            heads[2].contains("\r\nauthorization: bearer s3cret\r\n"),
            "{}",
            heads[2]
        );
    }

    #[test]
    fn only_scheme_host_port_is_a_server_address() {
        for api in [
            "127.0.0.1:9480",
            "ftp://127.0.0.1:9480",
            "http://127.0.0.1",
            "https://user@127.0.0.1:9480",
            "http://127.0.0.1:9480/prefix",
        ] {
            let e = Client::new(None)
                .request(api, Method::GET, "/v1/status")
                .unwrap_err();
            assert_eq!(
                format!("{e:#}"),
                format!("server address `{api}`: give it as https://HOST:PORT or http://HOST:PORT")
            );
        }
    }

    #[test]
    fn nothing_goes_to_an_https_server_without_a_pinned_ca() {
        let e = Client::new(Some("s3cret".into()))
            .request("https://127.0.0.1:9/", Method::GET, "/v1/status")
            .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "https://127.0.0.1:9 speaks HTTPS and its site CA is not pinned here: run `haven \
             login --server https://127.0.0.1:9 --ca-fingerprint SHA256` first (the \
             fingerprint is printed by `haven-gateway init`)"
        );
    }

    #[test]
    fn a_login_gives_its_token_unless_one_is_given() {
        let heads = [None, Some("given")].map(|token| {
            let (api, head) = one_answer(200, "{}");
            let mut logins = Logins::default();
            logins.servers.insert(
                api.clone(),
                crate::login::Login {
                    token: "from-login".into(),
                    ca_cert_pem: None,
                    ca_fingerprint: None,
                },
            );
            Client::with_logins(token.map(str::to_owned), logins)
                .request(&format!("{api}/"), Method::GET, "/v1/status")
                .unwrap();
            head.recv().unwrap().to_ascii_lowercase()
        });
        assert!(
            heads[0].contains("\r\nauthorization: bearer from-login\r\n"),
            "{}",
            heads[0]
        );
        assert!(
            heads[1].contains("\r\nauthorization: bearer given\r\n"),
            "{}",
            heads[1]
        );
    }

    #[test]
    fn a_port_nothing_listens_on_cannot_be_reached() {
        let api = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let e = Client::new(None)
            .request(&api, Method::GET, "/v1/status")
            .unwrap_err();
        assert!(
            format!("{e:#}").starts_with(&format!(
                "cannot reach the gateway API at {api}; is `haven-gateway run` running there?: "
            )),
            "{e:#}"
        );
    }

    #[test]
    fn a_gateway_that_never_answers_hits_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        // Takes the request and holds the connection open, unanswered, until the test ends.
        let (done_tx, done_rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            read_head(&conn);
            let _ = done_rx.recv();
        });
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let e = Client::new(None)
            .request_with(&api, Method::POST, "/v1/items/web01/failover", timeout)
            .unwrap_err();
        let waited = started.elapsed();
        assert_eq!(
            format!("{e:#}"),
            format!("{api}/v1/items/web01/failover: no answer within 300ms")
        );
        assert!(
            waited >= timeout && waited < CONNECT_TIMEOUT,
            "gave up after {waited:?}"
        );
        drop(done_tx);
    }
}
