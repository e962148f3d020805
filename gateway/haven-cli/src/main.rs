//! `haven`, the operator's command-line tool.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod group;
mod image;
mod login;
mod pipeline;
mod plan;
mod platform;
mod plugins;
mod recovery;
mod remote;

/// Haven: site recovery for machine disks.
#[derive(Debug, Parser)]
#[command(name = "haven", version, about)]
struct Cli {
    /// Folder holding the plugin components (`haven_raw.wasm`, `haven_vmdk.wasm`, …).
    /// Default: $HAVEN_PLUGIN_DIR, else the plugins next to this program.
    #[arg(long, global = true, value_name = "DIR")]
    plugin_dir: Option<PathBuf>,
    /// A bearer token for the gateway API: every request carries `Authorization: Bearer
    /// TOKEN`. Prefer $HAVEN_TOKEN to the flag, which other users see in the process list.
    #[arg(
        long,
        global = true,
        env = "HAVEN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Disk images: info, create, convert, compare, map (qemu-img's conventions).
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Plugins: list the ones installed, inspect a component.
    #[command(subcommand)]
    Plugin(plugins::PluginCommand),
    /// Every protected disk the gateways know: state, sync progress, lag, throughput.
    ///
    /// A gateway that does not answer is shown as `unreachable: API: why`, the others as
    /// usual. Exit status: 0 when every gateway answered, 1 when some did not, 2 when none
    /// did (or on another error).
    Status {
        /// A gateway's API, a process server's or a master target's (repeat, or separate with
        /// commas, for several).
        #[arg(
            long = "server",
            visible_alias = "api",
            env = "HAVEN_SERVER",
            value_delimiter = ',',
            default_values_t = [remote::default_server()]
        )]
        api: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Checks a pipeline file (the deployment as code) without applying it: every problem at
    /// once, each with FILE:LINE:COLUMN, the field and what to do. Exit status 78 when there
    /// are problems.
    Validate {
        /// The pipeline (TOML).
        file: PathBuf,
    },
    /// Applies a pipeline at the configuration server: prints the plan (+ add, ~ change,
    /// - remove) and applies the whole file, or nothing.
    Apply {
        /// The pipeline (TOML).
        file: PathBuf,
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
        /// Apply changes that destroy a protected machine's journal, points or replica
        /// (removing a machine, moving it to another master target, …).
        #[arg(long)]
        allow_destroy: bool,
        /// The configuration server's API.
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = remote::default_server())]
        api: String,
    },
    /// Prints the pipeline the deployment runs, as a file `haven apply` accepts unchanged.
    Export {
        /// The configuration server's API.
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = remote::default_server())]
        api: String,
    },
    /// Logs in to a gateway's API: pins its site CA (HTTPS) and keeps the token, so the
    /// commands that follow need neither `--token` nor `--server`.
    Login {
        /// The API, `https://HOST:PORT` (or `http://` on loopback).
        #[arg(long, env = "HAVEN_SERVER")]
        server: String,
        /// SHA-256 of the site CA's certificate, as `haven-gateway init` printed it; the
        /// server must present that CA.
        #[arg(long, value_name = "SHA256")]
        ca_fingerprint: Option<String>,
    },
    /// Forgets a login (default: the current server's).
    Logout {
        #[arg(long)]
        server: Option<String>,
    },
    /// Tokens: API tokens with roles (`create --role R --name N`, `list`, `revoke`) and
    /// one-time enrollment tokens (`create`).
    #[command(subcommand)]
    Token(remote::TokenCommand),
    /// Enrolled agents: list, revoke.
    #[command(subcommand)]
    Agent(remote::AgentCommand),
    /// API tokens of a gateway: create, list, revoke (needs an admin token); the same as
    /// `haven token` with `--role`.
    #[command(subcommand)]
    ApiToken(remote::ApiTokenCommand),
    /// The gateway's audit log: every change made through its API, who and when (admin).
    Audit {
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = remote::default_server())]
        api: String,
        /// How many of the newest entries.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// The deployment's events at its configuration server: RPO above a policy's threshold,
    /// agents and gateways gone and back, full caches and journals, low free space, stalled
    /// replication, failovers.
    Events {
        #[arg(long = "server", visible_alias = "api", env = "HAVEN_SERVER", default_value_t = remote::default_server())]
        api: String,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// At most this many at a time.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Keep printing new events as they come, until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Jobs at the configuration server: every change to an item run through it, with its
    /// steps and outcome (`list`, `show ID`).
    #[command(subcommand)]
    Job(remote::JobCommand),
    /// The pipeline's adapters at the configuration server and the machines they see (`list`,
    /// `machines NAME`, `refresh NAME`).
    #[command(subcommand)]
    Platform(platform::PlatformCommand),
    /// Recovery plans of the pipeline, run at the configuration server (`list`, `failover`,
    /// `test-failover`, `cleanup`, `commit`, `resume PLAN`).
    #[command(subcommand)]
    Plan(plan::PlanCommand),
    /// Multi-machine consistency groups of the pipeline (`point GROUP`: a group point now,
    /// `points GROUP`: its points).
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Secrets the pipeline's `secret:NAME` settings refer to (`set NAME`, `list`, `delete
    /// NAME`; admin). Values are read from standard input and never shown.
    #[command(subcommand)]
    Secret(platform::SecretCommand),
    /// Recovery points of a protected item: list, create.
    #[command(subcommand)]
    Point(recovery::PointCommand),
    /// Failover: `haven failover ITEM --point P|latest` (or `--planned`), and `test`,
    /// `cleanup`, `commit`, `show`.
    Failover(recovery::FailoverArgs),
    /// Reverses the replication of a failed-over machine, group or plan: the disks it runs on
    /// now replicate to the disks it left, sending only what differs.
    Reprotect(recovery::ReprotectArgs),
    /// Fails a reprotected machine, group or plan back in place, as its failback policy says
    /// (the replica shut down first; reprotected again afterwards).
    Failback(recovery::FailbackArgs),
}

fn main() -> ExitCode {
    quiet_on_closed_pipe();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HAVEN_LOG")
                .unwrap_or_else(|_| "warn".into())
                // ureq-proto logs only at debug (its state changes) and trace (each request
                // as sent, `Authorization` and its token included): never.
                .add_directive("ureq_proto=info".parse().expect("a filter directive")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    let cli = Cli::parse();
    let plugins = plugins::Plugins::new(cli.plugin_dir);
    let logins = match login::Logins::load() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("haven: {e:#}");
            return ExitCode::from(2);
        }
    };
    let token = cli.token;
    let client = remote::Client::with_logins(token.clone(), logins);
    let result = match cli.command {
        Command::Login {
            server,
            ca_fingerprint,
        } => match token.as_deref() {
            Some(t) if !t.is_empty() => login::login(&server, t, ca_fingerprint.as_deref()),
            _ => Err(anyhow::anyhow!(
                "give the API token to log in with in $HAVEN_TOKEN (or --token): the first \
                 admin token from `haven-gateway init`, or one from `haven api-token create`"
            )),
        }
        .map(|()| ExitCode::SUCCESS),
        Command::Validate { file } => pipeline::validate(&file),
        Command::Events {
            api,
            since,
            limit,
            follow,
        } => remote::events(&client, &api, since, limit, follow).map(|()| ExitCode::SUCCESS),
        Command::Apply {
            file,
            dry_run,
            allow_destroy,
            api,
        } => pipeline::apply(&client, &api, &file, dry_run, allow_destroy),
        Command::Export { api } => pipeline::export(&client, &api).map(|()| ExitCode::SUCCESS),
        Command::Logout { server } => login::logout(server.as_deref()).map(|()| ExitCode::SUCCESS),
        Command::Image(c) => image::run(&plugins, c),
        Command::Plugin(c) => plugins::run(&plugins, c).map(|()| ExitCode::SUCCESS),
        Command::Status { api, json } => remote::status(&client, &api, json),
        Command::Token(c) => remote::token(&client, c).map(|()| ExitCode::SUCCESS),
        Command::Agent(c) => remote::agent(&client, c).map(|()| ExitCode::SUCCESS),
        Command::ApiToken(c) => remote::api_token(&client, c).map(|()| ExitCode::SUCCESS),
        Command::Audit { api, limit } => {
            remote::audit(&client, &api, limit).map(|()| ExitCode::SUCCESS)
        }
        Command::Job(c) => remote::job(&client, c).map(|()| ExitCode::SUCCESS),
        Command::Platform(c) => platform::platform(&client, c).map(|()| ExitCode::SUCCESS),
        Command::Plan(c) => plan::plan(&client, c).map(|()| ExitCode::SUCCESS),
        Command::Group(c) => group::group(&client, c).map(|()| ExitCode::SUCCESS),
        Command::Secret(c) => platform::secret(&client, c).map(|()| ExitCode::SUCCESS),
        Command::Point(c) => recovery::point(&client, c).map(|()| ExitCode::SUCCESS),
        Command::Failover(a) => recovery::failover(&client, a).map(|()| ExitCode::SUCCESS),
        Command::Reprotect(a) => recovery::reprotect(&client, a).map(|()| ExitCode::SUCCESS),
        Command::Failback(a) => recovery::failback(&client, a).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("haven: {e:#}");
            // qemu-img's convention: 1 is "images differ" for compare, 2 an error.
            ExitCode::from(2)
        }
    }
}

/// Makes output to a closed pipe (`haven point list web01 | head -1`) end the program quietly
/// with status 141, as SIGPIPE ends Unix tools (a shell reports 128 + 13), for every command.
///
/// Rust ignores SIGPIPE, so a write to a pipe whose reader is gone fails with `BrokenPipe`,
/// and `println!` panics on it ("failed printing to stdout: Broken pipe"). This hook catches
/// that one panic, from any `println!`/`eprintln!` of the program, before it prints anything;
/// another failure to print (a full disk) gets a one-line error and status 2 instead of a
/// backtrace. std's message is not a stable API: the test `closed_stdout_ends_quietly`
/// (tests/operator.rs) fails if it changes.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let Some(message) = info
            .payload_as_str()
            .filter(|m| m.starts_with("failed printing to std"))
        else {
            return default(info);
        };
        if message.to_ascii_lowercase().contains("broken pipe") {
            std::process::exit(141);
        }
        let _ = writeln!(std::io::stderr(), "haven: {message}");
        std::process::exit(2);
    }));
}
