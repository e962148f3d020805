//! `haven-gateway`: one binary for the process server, master target and configuration server
//! roles.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use haven_engine::Identity;
use haven_engine::config_server::{ConfigServer, ConfigServerConfig};
use haven_engine::master_target::{MasterTarget, MasterTargetConfig};
use haven_engine::process_server::{ProcessServer, ProcessServerConfig, Upstream};
use haven_engine::status::GatewayStatus;
use haven_host::{Grants, Host, HostConfig, PluginSpec};
use haven_net::SiteCa;
use haven_net::endpoint::ServerTls;
use haven_store::journal::JournalOptions;
use haven_store::tokens::{ApiTokens, Role};

mod config;
mod joined;

use config::GatewayConfig;

/// The Haven gateway.
#[derive(Debug, Parser)]
#[command(name = "haven-gateway", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates the site CA and this gateway's TLS certificate in a data folder.
    Init {
        /// The gateway's data folder.
        #[arg(long)]
        data_dir: PathBuf,
        /// The site's name (in the CA certificate).
        #[arg(long)]
        site: String,
        /// Names agents and gateways reach this gateway by (DNS names or IP addresses).
        /// Default: 127.0.0.1, localhost and the host name.
        #[arg(long = "name")]
        names: Vec<String>,
        /// The first admin API token: one another gateway of the deployment printed, so one
        /// token reaches both. Default: a new one, printed once.
        #[arg(long, env = "HAVEN_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
    },
    /// Manages this gateway's API tokens offline (the gateway may run): `create` prints a new
    /// token once, e.g. when every admin token is lost. Online, `haven api-token` does the
    /// same.
    ApiToken {
        #[command(subcommand)]
        command: ApiTokenCommand,
    },
    /// Enrolls this gateway with the next hop (a process server with its master target:
    /// `--upstream`, identity in `<data-dir>/upstream/`) or with the deployment's
    /// configuration server (`--config-server`, identity in `<data-dir>/join/`), using a
    /// one-time token from there.
    #[command(group = clap::ArgGroup::new("with").required(true).args(["upstream", "config_server"]))]
    Enroll {
        #[arg(long)]
        data_dir: PathBuf,
        /// The master target's address, HOST:PORT.
        #[arg(long)]
        upstream: Option<SocketAddr>,
        /// The configuration server's address, HOST:PORT.
        #[arg(long)]
        config_server: Option<SocketAddr>,
        /// The name in that server's certificate (default: the address's IP).
        #[arg(long)]
        server_name: Option<String>,
        /// The token (`haven token create` at that server's API).
        #[arg(long)]
        token: String,
        /// This gateway's name, as that server will show it.
        #[arg(long, default_value = "process-server")]
        name: String,
    },
    /// Issues certificates from this site's CA for NBD over TLS, into a folder laid out as
    /// qemu (`tls-creds-x509,dir=`) and libnbd (`tls-certificates=`) read it: `ca-cert.pem`,
    /// and `client-cert.pem` + `client-key.pem` for a client, `server-cert.pem` +
    /// `server-key.pem` for an agent's export (`haven-agent protect --tls-dir`).
    NbdCert {
        /// The gateway's data folder (holding the site CA).
        #[arg(long)]
        data_dir: PathBuf,
        /// The folder to write (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Issue a client certificate with this name.
        #[arg(long, required_unless_present = "server")]
        client: Option<String>,
        /// Issue a server certificate for these names (IP addresses or DNS names clients
        /// reach the export by); repeat for several.
        #[arg(long)]
        server: Vec<String>,
    },
    /// Prints the SHA-256 fingerprint of this site's CA certificate, which `haven login`
    /// and enrolling agents pin.
    CaFingerprint {
        /// The gateway's data folder (holding the site CA).
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Runs the roles of a configuration until SIGINT or SIGTERM.
    Run {
        /// The gateway configuration (TOML).
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// A file created once the gateway serves (its API answers), holding the API's URL;
        /// removed when it stops. A script that started the gateway in the background waits
        /// for it.
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
    },
    /// Checks a gateway configuration without starting anything: every plugin loads, implements
    /// its world, imports only what its grants cover, and its storage root exists. Reports every
    /// problem at once.
    Validate {
        /// The gateway configuration (TOML).
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ApiTokenCommand {
    /// Creates a token and prints it (only now).
    Create {
        #[arg(long)]
        data_dir: PathBuf,
        /// What the token is for (letters, digits, - _ . @).
        #[arg(long)]
        name: String,
        /// admin, operator or viewer.
        #[arg(long, default_value = "viewer")]
        role: Role,
    },
    /// Lists the tokens (never their secrets).
    List {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Revokes a token: it lets nobody in from now on.
    Revoke {
        #[arg(long)]
        data_dir: PathBuf,
        /// The token's id (16 hex digits, from `list`).
        id: String,
    },
}

/// The file of a gateway's API tokens.
fn api_tokens_path(data_dir: &Path) -> PathBuf {
    data_dir.join("api-tokens.json")
}

/// Exit code for a configuration that does not validate.
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HAVEN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Validate { config } => {
            return match config::validate(&config) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    for e in &errors {
                        eprintln!("error: {e}");
                    }
                    eprintln!("{}: {} error(s)", config.display(), errors.len());
                    ExitCode::from(EXIT_CONFIG)
                }
            };
        }
        Command::Init {
            data_dir,
            site,
            names,
            admin_token,
        } => init(&data_dir, &site, names, admin_token.as_deref()),
        Command::ApiToken { command } => api_token(command),
        Command::CaFingerprint { data_dir } => SiteCa::open(data_dir.join("ca"))
            .with_context(|| {
                format!(
                    "no site CA in {}; run this where `haven-gateway init` made it",
                    data_dir.display()
                )
            })
            .map(|ca| println!("{}", ca.ca_fingerprint())),
        Command::NbdCert {
            data_dir,
            out,
            client,
            server,
        } => nbd_cert(&data_dir, &out, client.as_deref(), &server),
        Command::Enroll {
            data_dir,
            upstream,
            config_server,
            server_name,
            token,
            name,
        } => {
            let (addr, folder) = match (upstream, config_server) {
                (Some(a), _) => (a, "upstream"),
                (None, Some(a)) => (a, "join"),
                (None, None) => unreachable!("clap requires one of them"),
            };
            runtime().and_then(|rt| {
                rt.block_on(enroll(&data_dir, folder, addr, server_name, &token, &name))
            })
        }
        Command::Run { config, ready_file } => match GatewayConfig::load(&config) {
            Ok(c) => runtime().and_then(|rt| rt.block_on(run(c, ready_file.as_deref()))),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("haven-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Most threads of the runtime's blocking pool (journal appends and syncs, redb commits,
/// plugin calls from the API). Every replication stream runs its disk work there, so tokio's
/// default of 512 let a gateway with many disks grow a thread per busy stream; bounded, busy
/// streams take turns for the pool (their work never waits on async progress, so a full pool
/// only queues it).
const MAX_BLOCKING_THREADS: usize = 16;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .context("cannot start the async runtime")
}

/// Writes `text` to `path` atomically (`haven_fsutil::write_atomic`), its folder created
/// first; `private` files get mode 0600, others 0644.
fn write_atomic(path: &Path, text: &str, private: bool) -> Result<()> {
    let dir = path.parent().context("a file without a folder")?;
    haven_fsutil::create_dir_all(dir)?;
    let mode = if private { 0o600 } else { 0o644 };
    haven_fsutil::write_atomic(path, text.as_bytes(), mode)?;
    Ok(())
}

fn api_token(command: ApiTokenCommand) -> Result<()> {
    match command {
        ApiTokenCommand::Create {
            data_dir,
            name,
            role,
        } => {
            let tokens = ApiTokens::open(&api_tokens_path(&data_dir))?;
            let (token, info) = tokens.create(&name, role, haven_engine::now_ms())?;
            eprintln!(
                "API token {} ({}, role {}) created; it is shown only now:",
                info.id, info.name, info.role
            );
            println!("{token}");
        }
        ApiTokenCommand::List { data_dir } => {
            let tokens = ApiTokens::open(&api_tokens_path(&data_dir))?;
            println!("{:<18} {:<24} {:<9} STATE", "ID", "NAME", "ROLE");
            for t in tokens.list() {
                let state = if t.revoked_ms.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!("{:<18} {:<24} {:<9} {state}", t.id, t.name, t.role.as_str());
            }
        }
        ApiTokenCommand::Revoke { data_dir, id } => {
            let tokens = ApiTokens::open(&api_tokens_path(&data_dir))?;
            tokens.revoke(&id, haven_engine::now_ms())?;
            println!("API token {id} revoked (a running gateway reads it at its next start)");
        }
    }
    Ok(())
}

fn init(
    data_dir: &Path,
    site: &str,
    mut names: Vec<String>,
    admin_token: Option<&str>,
) -> Result<()> {
    if data_dir.join("ca").exists() {
        bail!(
            "{} already holds a site CA; use another folder, or remove {} to start over \
             (every enrolled agent must then enroll again)",
            data_dir.display(),
            data_dir.join("ca").display()
        );
    }
    if names.is_empty() {
        names = vec!["127.0.0.1".into(), "localhost".into()];
        if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
            let h = h.trim();
            if !h.is_empty() && h != "localhost" {
                names.push(h.to_string());
            }
        }
    }
    let mut ca = SiteCa::init(data_dir.join("ca"), site)?;
    let (cert, key) = ca.issue_server_cert(&names)?;
    write_atomic(&data_dir.join("tls/cert.pem"), &cert, false)?;
    write_atomic(&data_dir.join("tls/key.pem"), &key, true)?;
    let tokens = ApiTokens::open(&api_tokens_path(data_dir))?;
    let now = haven_engine::now_ms();
    let printed = match admin_token {
        Some(token) => {
            tokens.add(token, "first-admin", Role::Admin, now)?;
            None
        }
        None => Some(tokens.create("first-admin", Role::Admin, now)?.0),
    };
    println!("site `{site}` initialised in {}", data_dir.display());
    println!("CA fingerprint (SHA-256): {}", ca.ca_fingerprint());
    println!("server names: {}", names.join(", "));
    match printed {
        Some(token) => {
            println!("admin API token (shown only now; keep it, e.g. in HAVEN_TOKEN): {token}")
        }
        None => println!("admin API token: the one given"),
    }
    Ok(())
}

fn nbd_cert(data_dir: &Path, out: &Path, client: Option<&str>, server: &[String]) -> Result<()> {
    let ca_dir = data_dir.join("ca");
    let mut ca = SiteCa::open(&ca_dir).with_context(|| {
        format!(
            "opening the site CA in {}; run this where `haven-gateway init` made it",
            ca_dir.display()
        )
    })?;
    write_atomic(&out.join("ca-cert.pem"), ca.ca_cert_pem(), false)?;
    if let Some(name) = client {
        let (cert, key) = ca.issue_nbd_client_cert(name)?;
        write_atomic(&out.join("client-cert.pem"), &cert, false)?;
        write_atomic(&out.join("client-key.pem"), &key, true)?;
        println!("NBD client certificate `{name}` in {}", out.display());
    }
    if !server.is_empty() {
        let (cert, key) = ca.issue_server_cert(server)?;
        write_atomic(&out.join("server-cert.pem"), &cert, false)?;
        write_atomic(&out.join("server-key.pem"), &key, true)?;
        println!(
            "NBD server certificate for {} in {}",
            server.join(", "),
            out.display()
        );
    }
    Ok(())
}

async fn enroll(
    data_dir: &Path,
    folder: &str,
    addr: SocketAddr,
    server_name: Option<String>,
    token: &str,
    name: &str,
) -> Result<()> {
    let dir = data_dir.join(folder);
    if dir.join("cert.pem").exists() {
        bail!(
            "{} already holds an identity there; remove the folder to enroll again",
            dir.display()
        );
    }
    let server_name = server_name.unwrap_or_else(|| addr.ip().to_string());
    let id = haven_net::endpoint::enroll(addr, &server_name, token, name).await?;
    write_atomic(&dir.join("ca.pem"), &id.ca_pem, false)?;
    write_atomic(&dir.join("key.pem"), &id.key_pem, true)?;
    write_atomic(&dir.join("cert.pem"), &id.cert_pem, false)?;
    write_atomic(&dir.join("name"), &format!("{name}\n"), false)?;
    println!(
        "enrolled with {addr} as `{name}` (id {}); identity in {}",
        id.agent_id,
        dir.display()
    );
    Ok(())
}

/// This gateway's identity at its configuration server.
fn join_identity(data_dir: &Path) -> Result<Identity> {
    Identity::load(&data_dir.join("join")).context(
        "this gateway has not enrolled with its configuration server: run \
         `haven-gateway enroll --config-server HOST:PORT --token T --name NAME`",
    )
}

/// The server TLS material of `data_dir` (from `init`).
fn server_tls(data_dir: &Path, ca: &SiteCa) -> Result<ServerTls> {
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).with_context(|| {
            format!(
                "cannot read {}; run `haven-gateway init --data-dir {}` first",
                p.display(),
                data_dir.display()
            )
        })
    };
    Ok(ServerTls {
        cert_pem: read(data_dir.join("tls/cert.pem"))?,
        key_pem: read(data_dir.join("tls/key.pem"))?,
        ca_pem: ca.ca_cert_pem().to_string(),
        crl_pems: vec![ca.crl_pem()?],
        client_ca_pems: Vec::new(),
    })
}

/// TLS for the test-failover exports: this gateway's certificate, clients' certificates from
/// the site CA (and not revoked).
fn nbd_tls(tls: &ServerTls) -> Result<haven_nbd::Tls> {
    let config =
        haven_net::tls::nbd_server_config(&tls.cert_pem, &tls.key_pem, &tls.ca_pem, &tls.crl_pems)
            .context("the TLS configuration of the NBD exports")?;
    Ok(haven_nbd::Tls::new(Arc::new(config)))
}

/// The writer that writes replicas: a configured plugin, or the installed raw writer with its
/// storage root at `<data_dir>/replicas`.
fn writer_spec(config: &GatewayConfig, name: Option<&str>) -> Result<PluginSpec> {
    if let Some(name) = name {
        let p = config
            .plugin(name)
            .with_context(|| format!("master_target.writer `{name}` names no [[plugin]]"))?;
        return Ok(p.spec.clone());
    }
    let dir = haven_host::default_plugin_dir().context(
        "no plugin folder found: set HAVEN_PLUGIN_DIR or install the plugins beside the program",
    )?;
    let root = config.data_dir.join("replicas");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    Ok(PluginSpec {
        name: "raw".into(),
        path: dir.join("haven_raw.wasm"),
        grants: Grants {
            storage_root: Some(root),
            call_timeout_ms: 60_000,
            ..Grants::default()
        },
        settings: Default::default(),
    })
}

/// Raises the soft limit of open files to the hard limit: each replica and each cached disk
/// holds a few files, and distributions start services with a soft limit (often 1024, sometimes
/// less) far below the hard one. Returns the soft limit before and after.
fn raise_open_file_limit() -> (Option<u64>, Option<u64>) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, soft = ?before, hard = ?limit.maximum,
                "cannot raise the open-file limit");
        }
    }
    (before, getrlimit(Resource::Nofile).current)
}

async fn run(config: GatewayConfig, ready_file: Option<&Path>) -> Result<()> {
    let (before, after) = raise_open_file_limit();
    if before != after {
        tracing::info!(before = ?before, now = ?after, "raised the open-file limit to the hard limit");
    }
    let data_dir = config.data_dir.clone();
    let ca = SiteCa::open(data_dir.join("ca")).with_context(|| {
        format!(
            "no site CA in {}; run `haven-gateway init --data-dir {} --site NAME` first",
            data_dir.display(),
            data_dir.display()
        )
    })?;
    let tls = server_tls(&data_dir, &ca)?;
    let site = ca.site_name().to_string();
    let ca = Arc::new(Mutex::new(ca));

    // A joined gateway runs its last assignment from the start.
    let kept = match &config.join {
        Some(_) => joined::kept_assignment(&data_dir)?,
        None => None,
    };
    let mut ps = None;
    if let Some(section) = &config.process_server {
        let identity = Identity::load(&data_dir.join("upstream"))?;
        let server = ProcessServer::open(ProcessServerConfig {
            listen: section.listen,
            data_dir: data_dir.join("ps"),
            cache: JournalOptions {
                max_bytes: section.cache_max_bytes,
                ..JournalOptions::default()
            },
            cache_total_max_bytes: section.cache_total_max_bytes,
            upstream: Upstream {
                addr: section.upstream,
                server_name: section
                    .upstream_server_name
                    .clone()
                    .unwrap_or_else(|| section.upstream.ip().to_string()),
                identity,
            },
            window_bytes: section.window_bytes,
            // A configuration server may move agents here from another process server.
            confirm_owner: config.join.is_some(),
            drain: section
                .drain
                .as_ref()
                .map(|d| d.open().map(Arc::new))
                .transpose()
                .map_err(|e| anyhow::anyhow!(e))?,
        })?;
        if let Some(a) = &kept {
            server.set_policies(a.machines.clone());
            // The configuration server's CRL as last heard: its agents are served from the
            // start (a CA with no CRL at all would leave their status unknown, and refused).
            server.listener().set_config_server_crl(a.crl_pem.clone())?;
        }
        let s = server.clone();
        let (mut tls, ca) = (tls.clone(), ca.clone());
        if config.join.is_some() {
            // Agents the configuration server enrolled (its CA) are served here too.
            tls.client_ca_pems.push(join_identity(&data_dir)?.ca_pem);
        }
        tokio::spawn(async move {
            if let Err(e) = s.serve(tls, Some(ca)).await {
                tracing::error!(error = %format!("{e:#}"), "process server stopped");
                std::process::exit(1);
            }
        });
        ps = Some(server);
    }

    let mut mt = None;
    if let Some(section) = &config.master_target {
        let host = Arc::new(Host::new(HostConfig {
            cache_dir: Some(data_dir.join("cache/plugins")),
        })?);
        let writer = writer_spec(&config, section.writer.as_deref())?;
        let target = MasterTarget::open(
            MasterTargetConfig {
                listen: section.listen,
                data_dir: data_dir.join("mt"),
                writer,
                writer_options: section
                    .writer_options
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                journal: JournalOptions {
                    max_bytes: section.journal_max_bytes,
                    // What arrives uncompressed did not compress at the process server.
                    compress: false,
                    ..JournalOptions::default()
                },
                retention: section.retention.clone(),
                nbd_host: section.nbd_host,
                nbd_tls: match section.nbd_tls().map_err(anyhow::Error::msg)? {
                    true => Some(nbd_tls(&tls)?),
                    false => None,
                },
                retention_by_machine: kept.as_ref().map(joined::retention_of).unwrap_or_default(),
            },
            host,
        )?;
        let t = target.clone();
        let (tls, ca) = (tls.clone(), ca.clone());
        tokio::spawn(async move {
            if let Err(e) = t.serve(tls, Some(ca)).await {
                tracing::error!(error = %format!("{e:#}"), "master target stopped");
                std::process::exit(1);
            }
        });
        mt = Some(target);
    }
    let mut cs = None;
    if let Some(section) = &config.config_server {
        let server = ConfigServer::open(ConfigServerConfig {
            listen: section.listen,
            data_dir: data_dir.join("cs"),
        })?;
        server.set_crl(ca.lock().unwrap_or_else(|e| e.into_inner()).crl_pem()?);
        let s = server.clone();
        let (tls, ca) = (tls.clone(), ca.clone());
        tokio::spawn(async move {
            if let Err(e) = s.serve(tls, Some(ca)).await {
                tracing::error!(error = %format!("{e:#}"), "configuration server stopped");
                std::process::exit(1);
            }
        });
        cs = Some(server);
    }
    if ps.is_none() && mt.is_none() && cs.is_none() {
        bail!(
            "the configuration enables no role: add [process_server], [master_target] and/or \
             [config_server]"
        );
    }

    let status: haven_api::StatusFn = {
        let (ps, mt, cs, site) = (ps.clone(), mt.clone(), cs.clone(), site.clone());
        Arc::new(move || GatewayStatus {
            site: site.clone(),
            process_server: ps.as_ref().map(|p| p.status()),
            master_target: mt.as_ref().map(|m| m.status()),
            config_server: cs.as_ref().map(|c| {
                c.gateways().unwrap_or_else(|e| {
                    tracing::error!(error = %format!("{e:#}"), "reading the joined gateways");
                    Vec::new()
                })
            }),
        })
    };
    let on_revoke: haven_api::RevokeFn = {
        let (ps, mt, cs) = (ps.clone(), mt.clone(), cs.clone());
        Arc::new(move |crls: Vec<String>, agent_id: &str| {
            let listeners = ps
                .iter()
                .map(|p| p.listener())
                .chain(mt.iter().map(|m| m.listener()))
                .chain(cs.iter().map(|c| c.listener()));
            for listener in listeners {
                if let Err(e) = listener.set_crls(crls.clone()) {
                    tracing::error!(error = %format!("{e:#}"), "cannot load the new CRL");
                }
                listener.disconnect(agent_id);
            }
            // Process servers get the configuration server's new CRL with their next
            // assignment (within a second).
            if let (Some(cs), Some(crl)) = (&cs, crls.first()) {
                cs.set_crl(crl.clone());
            }
        })
    };
    let tokens = Arc::new(ApiTokens::open(&api_tokens_path(&data_dir))?);
    if !tokens.any_active() {
        tracing::warn!(
            "no API token is active: every API call will be refused; create one with \
             `haven-gateway api-token create --data-dir {} --name NAME --role admin`",
            data_dir.display()
        );
    }
    let api_tls = match config.api.tls().map_err(anyhow::Error::msg)? {
        true => Some(Arc::new(
            haven_net::tls::api_server_config(&tls.cert_pem, &tls.key_pem, &tls.ca_pem)
                .context("the TLS configuration of the API")?,
        )),
        false => None,
    };
    let scheme = if api_tls.is_some() { "https" } else { "http" };
    let api = haven_api::Api {
        status,
        ca: Some(ca),
        on_revoke: Some(on_revoke),
        recovery: mt.clone(),
        auth: Some(Arc::new(haven_api::auth::Auth::new(
            tokens,
            &data_dir.join("audit.jsonl"),
        ))),
        deployment: cs.clone(),
    };
    if let Some(section) = &config.join {
        let contact = match &config.process_server {
            Some(section) => {
                let address = section.advertised().map_err(anyhow::Error::msg)?;
                let host = address
                    .rsplit_once(':')
                    .map_or(address.as_str(), |(h, _)| h);
                Some(haven_net::join::ProcessServerContact {
                    server_name: host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                    address,
                    ca_pem: tls.ca_pem.clone(),
                })
            }
            None => None,
        };
        let handler = joined::Joined::new(
            &data_dir,
            &site,
            api.clone(),
            ps.clone(),
            mt.clone(),
            contact,
        )?;
        let join = haven_engine::join::JoinConfig {
            server: section.server,
            server_name: section
                .server_name
                .clone()
                .unwrap_or_else(|| section.server.ip().to_string()),
            identity: join_identity(&data_dir)?,
        };
        tokio::spawn(haven_engine::join::run(join, Arc::new(handler)));
    }
    let (api_addr, _api) = haven_api::serve(config.api.listen, api, api_tls).await?;
    tracing::info!(site = %site, api = %api_addr, "gateway running");
    if let Some(ready) = ready_file {
        write_atomic(ready, &format!("{scheme}://{api_addr}\n"), false)
            .with_context(|| format!("writing the ready file {}", ready.display()))?;
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    if let Some(ready) = ready_file {
        let _ = std::fs::remove_file(ready);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let hard = getrlimit(Resource::Nofile).maximum;
        // Started with a low soft limit, as a service manager may do.
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(64),
                maximum: hard,
            },
        )
        .expect("lowering the soft limit");
        let (before, after) = super::raise_open_file_limit();
        assert_eq!(before, Some(64));
        assert_eq!(after, hard);
        assert_eq!(getrlimit(Resource::Nofile).current, hard);
    }
}
