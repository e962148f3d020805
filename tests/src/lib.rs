//! A two-site cluster of real processes on loopback, for end-to-end tests and the demo.
//!
//! A [`Cluster`] runs a master target (secondary site), a process server (primary site) and an
//! agent protecting one raw disk, each a real process with its own data folder, enrolled
//! through the real token flow (`haven token create` → `haven-gateway enroll` /
//! `haven-agent enroll`). Every process can be killed with SIGKILL and restarted.
//!
//! Binaries come from [`ClusterOptions::bin_dir`], else `$HAVEN_BIN_DIR`, else `target/debug` of
//! this workspace (`cargo xtask build` makes them).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use haven_engine::status::GatewayStatus;
use haven_net::stream::{DiskState, Report};

pub mod azurite;
pub mod example;
pub mod fake_arm;
pub mod nbd;
pub mod vcsim;

/// Where the binaries are by default: `$HAVEN_BIN_DIR`, else `debug` in `$CARGO_TARGET_DIR`,
/// else this workspace's `target/debug`.
pub fn default_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HAVEN_BIN_DIR") {
        return dir.into();
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("debug")
}

/// A TCP port that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Runs `cmd`; its stdout, or an error with both outputs when it fails.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A small xorshift generator for workloads: the same seed gives the same sequence.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Calls `probe` every `every` until it returns `Ok(Ok(value))`. `Ok(Err(why))` means not
/// yet: once `timeout` has passed, the last `why` is the error. An `Err` from `probe` ends the
/// wait at once.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Result<Result<T, String>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match probe()? {
            Ok(value) => return Ok(value),
            Err(why) if Instant::now() >= deadline => bail!("{why}"),
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// `GET url` (`http://HOST:PORT/PATH`) with a bearer token, plainly over a socket (the answer
/// is read to the end of the connection); the body of a 200 answer.
pub fn http_get(url: &str, token: &str) -> Result<String> {
    http("GET", url, token)
}

/// `POST url` without a body (the API's calls take query parameters), as [`http_get`].
pub fn http_post(url: &str, token: &str) -> Result<String> {
    http("POST", url, token)
}

fn http(method: &str, url: &str, token: &str) -> Result<String> {
    use std::io::Read;
    let rest = url.strip_prefix("http://").context("not an http:// URL")?;
    let (host, path) = rest.split_once('/').context("no path")?;
    let mut conn = std::net::TcpStream::connect(host)?;
    write!(
        conn,
        "{method} /{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{method} {url}: {head}\n{body}");
    }
    Ok(body.to_string())
}

/// Detaches every mount below `dir`: the FUSE folders (test failover files, an agent's disk
/// file) a killed process leaves mounted, which would keep the folder from being removed.
pub fn unmount_below(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let dir = dir.to_string_lossy().trim_end_matches('/').to_string();
    for point in info.lines().filter_map(|l| l.split(' ').nth(4)) {
        if point
            .strip_prefix(dir.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
        {
            let _ = Command::new("umount").args(["-l", point]).status();
        }
    }
}

/// The names of a job's steps, in order (a job as `haven job list --json` prints it).
pub fn step_names(job: &serde_json::Value) -> Vec<String> {
    job["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect()
}

/// Every file below `dir` (none when it does not exist).
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| match e.file_type().is_ok_and(|t| t.is_dir()) {
            true => files_below(&e.path()),
            false => vec![e.path()],
        })
        .collect()
}

/// Waits (up to a minute) until `gateway` lists a recovery point of `item`; through a
/// configuration server, the item appears once its master target reports it.
pub fn wait_for_point(gateway: &Gateway, item: &str) -> Result<()> {
    poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let Ok(out) = gateway.haven(&["point", "list", item, "--json"]) else {
            return Ok(Err(format!("no item {item} yet")));
        };
        Ok(match point_times(&out)?.is_empty() {
            false => Ok(()),
            true => Err(format!("no point of {item} yet")),
        })
    })
}

/// The source times (ms, ascending) of the points `haven point list ITEM --json` printed.
pub fn point_times(json: &str) -> Result<Vec<u64>> {
    let points: Vec<serde_json::Value> =
        serde_json::from_str(json).with_context(|| format!("not a point list: {json}"))?;
    let mut times: Vec<u64> = points
        .iter()
        .filter_map(|p| p["source_time_ms"].as_u64())
        .collect();
    times.sort_unstable();
    Ok(times)
}

/// How many consecutive `times` are at most `gap_ms` apart.
pub fn close_pairs(times: &[u64], gap_ms: u64) -> usize {
    times.windows(2).filter(|w| w[1] - w[0] <= gap_ms).count()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A process, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    /// Its stderr, appended across restarts.
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: &Path) -> Result<Proc> {
        let mut f = fs::OpenOptions::new().create(true).append(true).open(log)?;
        writeln!(f, "---- start {} ----", now_ms())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        Ok(Proc {
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Peak resident memory in bytes (`VmHWM`), while it runs.
    pub fn peak_rss(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// CPU seconds (user + system) used so far, while it runs.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        // Fields after the command name (which is in parentheses): utime is the 14th field.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("the process is not running")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the process did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and wait up to 10 s (then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Fails with the log's tail when the process has exited.
    pub fn check_alive(&mut self, what: &str) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            bail!("{what} exited with {status}:\n{tail}");
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One gateway: its data folder, configuration and process.
#[derive(Debug)]
pub struct Gateway {
    bins: PathBuf,
    /// Extra environment of the process (e.g. `HAVEN_FAILPOINTS`), kept across restarts.
    pub env: Vec<(String, String)>,
    pub name: String,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    /// `http://127.0.0.1:PORT`
    pub api: String,
    /// An admin API token of this gateway (`HAVEN_TOKEN` of every `haven` call made here).
    pub admin_token: String,
    /// The QUIC port its role listens on.
    pub port: u16,
    pub proc: Proc,
}

impl Gateway {
    /// Initialises a gateway's folder. With `admin_token` (another gateway's), that token is
    /// this one's first admin token too; else the one `init` printed is returned.
    fn init(
        bins: &Path,
        root: &Path,
        name: &str,
        site: &str,
        admin_token: Option<&str>,
    ) -> Result<(PathBuf, u16, u16, String)> {
        let data_dir = root.join(name);
        let mut init = Command::new(bins.join("haven-gateway"));
        init.args(["init", "--data-dir"]).arg(&data_dir).args([
            "--site",
            site,
            "--name",
            "127.0.0.1",
        ]);
        if let Some(token) = admin_token {
            init.env("HAVEN_ADMIN_TOKEN", token);
        }
        let out = run_ok(&mut init)?;
        let token = match admin_token {
            Some(t) => t.to_string(),
            None => admin_token_of(&out)?,
        };
        Ok((data_dir, free_udp_port(), free_tcp_port(), token))
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        bins: &Path,
        name: &str,
        data_dir: PathBuf,
        config: String,
        port: u16,
        api_port: u16,
        admin_token: String,
        env: Vec<(String, String)>,
    ) -> Result<Gateway> {
        let path = data_dir.join("gateway.toml");
        fs::write(&path, config)?;
        let mut g = Gateway {
            env,
            bins: bins.to_owned(),
            name: name.into(),
            proc: Proc {
                child: None,
                log: data_dir.join("gateway.log"),
            },
            data_dir,
            config: path,
            api: format!("http://127.0.0.1:{api_port}"),
            admin_token,
            port,
        };
        g.spawn()?;
        Ok(g)
    }

    /// Starts the gateway with its configuration and environment (again, after `proc.kill()`),
    /// and waits until it answers.
    pub fn spawn(&mut self) -> Result<()> {
        self.proc = Proc::spawn(
            Command::new(self.bins.join("haven-gateway"))
                .args(["run", "--config"])
                .arg(&self.config)
                .env(
                    "HAVEN_LOG",
                    std::env::var("HAVEN_LOG").unwrap_or("info".into()),
                )
                .envs(self.env.iter().map(|(k, v)| (k, v))),
            &self.data_dir.join("gateway.log"),
        )?;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.proc.check_alive(&self.name)?;
            if self.status().is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not answer on {} in time", self.name, self.api);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills (SIGKILL) and starts the gateway again with the same configuration and
    /// environment.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.spawn()
    }

    /// `haven` with this gateway's admin token (and logins of its own, none: the user's
    /// are not used).
    pub fn haven_command(&self) -> Command {
        let mut c = Command::new(self.bins.join("haven"));
        c.env("HAVEN_TOKEN", &self.admin_token)
            .env("HAVEN_CONFIG_DIR", self.data_dir.join("cli"))
            .env_remove("HAVEN_SERVER");
        c
    }

    /// The gateway's status, through `haven status --json`.
    pub fn status(&self) -> Result<GatewayStatus> {
        let out = run_ok(
            self.haven_command()
                .args(["status", "--json", "--api", &self.api]),
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(serde_json::from_value(v[0]["status"].clone())?)
    }

    /// Runs `haven ARGS --api <this gateway>` and returns its output.
    pub fn haven(&self, args: &[&str]) -> Result<String> {
        run_ok(self.haven_command().args(args).args(["--api", &self.api]))
    }

    /// The newest job of `kind` at this configuration server, once it has ended.
    pub fn finished_job(&self, kind: &str) -> Result<serde_json::Value> {
        poll(Duration::from_secs(120), Duration::from_millis(500), || {
            let jobs = self.jobs()?;
            let job = jobs
                .into_iter()
                .find(|j| j["kind"] == kind)
                .with_context(|| format!("no {kind} job"))?;
            Ok(match job["state"].as_str() {
                Some("running") => Err(format!("still running: {job}")),
                _ => Ok(job),
            })
        })
    }

    /// Waits until this configuration server reaches gateway `name` (joined, answering).
    pub fn wait_joined(&self, name: &str) -> Result<()> {
        poll(Duration::from_secs(30), Duration::from_millis(200), || {
            Ok(http_get(
                &format!("{}/v1/seeds?gateway={name}", self.api),
                &self.admin_token,
            )
            .map(drop)
            .map_err(|e| format!("{e:#}")))
        })
    }

    /// The jobs this configuration server ran, newest first (`haven job list --json`).
    pub fn jobs(&self) -> Result<Vec<serde_json::Value>> {
        Ok(serde_json::from_str(
            &self.haven(&["job", "list", "--json"])?,
        )?)
    }

    /// Stores secret `name` with `value` at this configuration server (`haven secret set`).
    pub fn set_secret(&self, name: &str, value: &str) -> Result<()> {
        let file = self.data_dir.join(format!("secret-{name}"));
        std::fs::write(&file, value)?;
        let stored = self.haven(&[
            "secret",
            "set",
            name,
            "--from-file",
            file.to_str().context("path")?,
        ]);
        std::fs::remove_file(&file)?;
        stored.map(drop)
    }

    /// A one-time enrollment token, through `haven token create`.
    pub fn token(&self) -> Result<String> {
        Ok(run_ok(
            self.haven_command()
                .args(["token", "create", "--api", &self.api]),
        )?
        .trim()
        .to_string())
    }
}

/// The admin API token in `haven-gateway init`'s output.
pub fn admin_token_of(init_output: &str) -> Result<String> {
    init_output
        .split_whitespace()
        .find(|w| w.starts_with("hvt_"))
        .map(str::to_string)
        .with_context(|| format!("no admin API token in init's output: {init_output}"))
}

/// The agent protecting one disk.
#[derive(Debug)]
pub struct Agent {
    bins: PathBuf,
    pub data_dir: PathBuf,
    pub disk: PathBuf,
    /// `nbd://127.0.0.1:PORT/disk`
    pub nbd: String,
    pub nbd_port: u16,
    /// The machine's other disks (2, 3, …), each with its own export on a port of its own.
    pub more_disks: Vec<MoreDisk>,
    /// `--server`; none for an agent that asks its configuration server.
    server: Option<String>,
    extra: Vec<String>,
    pub proc: Proc,
}

/// A disk of a machine after its first, served by the same agent.
#[derive(Clone, Debug)]
pub struct MoreDisk {
    pub path: PathBuf,
    pub nbd_port: u16,
}

impl Agent {
    fn spawn(&mut self) -> Result<()> {
        self.proc = Proc::spawn(
            Command::new(self.bins.join("haven-agent"))
                .args(["protect", "--data-dir"])
                .arg(&self.data_dir)
                .arg("--disk")
                .arg(&self.disk)
                .args(self.server.iter().flat_map(|s| ["--server", s.as_str()]))
                .args(["--listen", &format!("127.0.0.1:{}", self.nbd_port)])
                .args(self.more_disks.iter().flat_map(|d| {
                    [
                        "--disk".into(),
                        d.path.display().to_string(),
                        "--listen".into(),
                        format!("127.0.0.1:{}", d.nbd_port),
                    ]
                }))
                .args(&self.extra)
                .env(
                    "HAVEN_LOG",
                    std::env::var("HAVEN_LOG").unwrap_or("info".into()),
                ),
            &self.data_dir.join("agent.log"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let last_port = self.more_disks.last().map_or(self.nbd_port, |d| d.nbd_port);
        while std::net::TcpStream::connect(("127.0.0.1", last_port)).is_err() {
            self.proc.check_alive("haven-agent")?;
            if Instant::now() > deadline {
                bail!("the agent's NBD server did not come up in time");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Enrolls an agent named `machine` with the process server `ps` in `data_dir` and starts
    /// it protecting `disk` (its NBD export on a free port), with `extra` arguments.
    pub fn enroll_and_start(
        bins: &Path,
        ps: &Gateway,
        data_dir: &Path,
        disk: &Path,
        machine: &str,
        extra: Vec<String>,
    ) -> Result<Agent> {
        let server = Some(Agent::enroll(bins, ps, data_dir, machine)?);
        Agent::start(bins, server, data_dir, disk, extra)
    }

    /// Enrolls an agent named `machine` of site `site` with the configuration server `cs` and
    /// starts it protecting `disk`: it asks `cs` where to replicate.
    pub fn enroll_with_config_server_and_start(
        bins: &Path,
        cs: &Gateway,
        site: &str,
        data_dir: &Path,
        disk: &Path,
        machine: &str,
        extra: Vec<String>,
    ) -> Result<Agent> {
        Agent::enroll_with_config_server(bins, cs, site, data_dir, machine)?;
        Agent::start(bins, None, data_dir, disk, extra)
    }

    /// Enrolls `data_dir` as machine `machine` of site `site` with the configuration server
    /// `cs` (with a new one-time token).
    pub fn enroll_with_config_server(
        bins: &Path,
        cs: &Gateway,
        site: &str,
        data_dir: &Path,
        machine: &str,
    ) -> Result<()> {
        run_ok(
            Command::new(bins.join("haven-agent"))
                .args(["enroll", "--data-dir"])
                .arg(data_dir)
                .args(["--config-server", &format!("127.0.0.1:{}", cs.port)])
                .args(["--site", site, "--token", &cs.token()?])
                .args(["--machine-name", machine]),
        )?;
        Ok(())
    }

    fn start(
        bins: &Path,
        server: Option<String>,
        data_dir: &Path,
        disk: &Path,
        extra: Vec<String>,
    ) -> Result<Agent> {
        Agent::start_disks(bins, server, data_dir, disk, &[], extra)
    }

    /// Starts an agent (enrolled in `data_dir` already) protecting `disk` and `more_disks`,
    /// each on an NBD export of its own; `server` is its process server, or none for one that
    /// asks its configuration server.
    pub fn start_disks(
        bins: &Path,
        server: Option<String>,
        data_dir: &Path,
        disk: &Path,
        more_disks: &[PathBuf],
        extra: Vec<String>,
    ) -> Result<Agent> {
        let nbd_port = free_tcp_port();
        let mut agent = Agent {
            bins: bins.to_owned(),
            data_dir: data_dir.to_owned(),
            disk: disk.to_owned(),
            nbd: format!("nbd://127.0.0.1:{nbd_port}/disk"),
            nbd_port,
            more_disks: Vec::new(),
            server,
            extra,
            proc: Proc {
                child: None,
                log: PathBuf::new(),
            },
        };
        agent.more_disks = more_disks
            .iter()
            .map(|path| MoreDisk {
                path: path.clone(),
                nbd_port: free_tcp_port(),
            })
            .collect();
        agent.spawn()?;
        Ok(agent)
    }

    /// Enrolls `data_dir` with the process server `ps` under the name `machine` (with a new
    /// one-time token); returns the server's address.
    pub fn enroll(bins: &Path, ps: &Gateway, data_dir: &Path, machine: &str) -> Result<String> {
        Ok(Agent::enroll_id(bins, ps, data_dir, machine)?.0)
    }

    /// [`Agent::enroll`], also returning the agent's id as `haven-agent enroll` printed it.
    pub fn enroll_id(
        bins: &Path,
        ps: &Gateway,
        data_dir: &Path,
        machine: &str,
    ) -> Result<(String, String)> {
        let server = format!("127.0.0.1:{}", ps.port);
        let out = run_ok(
            Command::new(bins.join("haven-agent"))
                .args(["enroll", "--data-dir"])
                .arg(data_dir)
                .args(["--server", &server, "--token", &ps.token()?])
                .args(["--machine-name", machine]),
        )?;
        let id = out
            .split_whitespace()
            .skip_while(|w| *w != "agent")
            .nth(1)
            .with_context(|| format!("no agent id in enroll's output: {out}"))?
            .to_string();
        Ok((server, id))
    }

    /// Kills (SIGKILL) and starts the agent again.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.spawn()
    }

    /// The agent's own last report (`<data-dir>/status.json`), if any.
    pub fn report(&self) -> Option<Report> {
        let text = fs::read_to_string(self.data_dir.join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits until its first disk is protected with everything acknowledged; the bytes its
    /// comparisons (a resync, a reprotect's) sent.
    pub fn wait_protected(&mut self) -> Result<u64> {
        poll(Duration::from_secs(120), Duration::from_millis(100), || {
            self.proc.check_alive("haven-agent")?;
            let report = self.report();
            Ok(report
                .as_ref()
                .and_then(|r| {
                    let d = r.disks.first()?;
                    (d.state == DiskState::Protected && d.acked_seq == d.last_seq)
                        .then_some(d.resync_sent_bytes)
                })
                .ok_or_else(|| format!("the agent is not protected and caught up: {report:?}")))
        })
    }
}

/// Master target, process server and agent on loopback.
#[derive(Debug)]
pub struct Cluster {
    pub root: PathBuf,
    /// The configuration server both gateways joined (with `ClusterOptions::config_server`).
    pub cs: Option<Gateway>,
    pub mt: Gateway,
    pub ps: Gateway,
    /// A second process server at the primary site (with
    /// `ClusterOptions::second_process_server`), joined as `ps2`.
    pub ps2: Option<Gateway>,
    pub agent: Agent,
}

/// Enrolls the gateway folder `dir` with the configuration server `cs` as `name`, and returns
/// the `[join]` section of its configuration; without `cs`, nothing.
fn join_section(bins: &Path, cs: Option<&Gateway>, dir: &Path, name: &str) -> Result<String> {
    let Some(cs) = cs else {
        return Ok(String::new());
    };
    run_ok(
        Command::new(bins.join("haven-gateway"))
            .args(["enroll", "--data-dir"])
            .arg(dir)
            .args(["--config-server", &format!("127.0.0.1:{}", cs.port)])
            .args(["--token", &cs.token()?, "--name", name]),
    )?;
    Ok(format!("\n[join]\nserver = \"127.0.0.1:{}\"\n", cs.port))
}

/// The writer of a [`Reverse`] master target.
#[derive(Clone, Debug)]
pub struct ReverseWriter {
    /// `raw`, `vmdk`, … (the plugin `haven_<format>.wasm`).
    pub format: String,
    /// Where the disks a machine left are.
    pub storage_root: PathBuf,
    /// Block devices it may write too (a physical server's disks).
    pub devices: Vec<PathBuf>,
    /// Extra lines of the master target's `[master_target]` section.
    pub mt_config: String,
}

impl ReverseWriter {
    /// The raw writer over `storage_root`.
    pub fn raw(storage_root: &Path) -> ReverseWriter {
        ReverseWriter {
            format: "raw".into(),
            storage_root: storage_root.to_owned(),
            devices: Vec::new(),
            mt_config: String::new(),
        }
    }
}

/// The gateways of the way back ([`Cluster::reverse`]).
#[derive(Debug)]
pub struct Reverse {
    /// The master target at the primary site.
    pub mt: Gateway,
    /// The process server at the secondary site, forwarding to `mt`.
    pub ps: Gateway,
}

impl Reverse {
    /// Starts, below `root`, a master target (site `primary`, admin token `admin`) with
    /// `writer`, and a process server (site `secondary`) forwarding to it; both joined to `cs`
    /// when given, as `mt-a` and `ps-b`.
    pub fn start(
        bins: &Path,
        root: &Path,
        writer: ReverseWriter,
        admin: &str,
        cs: Option<&Gateway>,
    ) -> Result<Reverse> {
        let join = |dir: &Path, name: &str| join_section(bins, cs, dir, name);
        let plugin = bins.join(format!(
            "../wasm32-wasip2/release/haven_{}.wasm",
            writer.format
        ));
        let storage_root = &writer.storage_root;
        let devices: Vec<String> = writer.devices.iter().map(|d| format!("{d:?}")).collect();
        let devices = devices.join(", ");
        let (dir, port, api, admin) = Gateway::init(bins, root, "mt-a", "primary", Some(admin))?;
        let joined = join(&dir, "mt-a")?;
        let mt = Gateway::start(
            bins,
            "master target at the primary site",
            dir.clone(),
            format!(
                "data_dir = {dir:?}\n{joined}\n[master_target]\nlisten = \"127.0.0.1:{port}\"\n\
                 writer = \"origin\"\n{}\n\n[master_target.retention]\nwindow = \"1h\"\n\n\
                 [[plugin]]\nkind = \"target-writer\"\nname = \"origin\"\npath = {plugin:?}\n\
                 grants = {{ storage_root = {storage_root:?}, devices = [{devices}] }}\n\n\
                 [api]\nlisten = \"127.0.0.1:{api}\"\n",
                writer.mt_config
            ),
            port,
            api,
            admin.clone(),
            Vec::new(),
        )?;
        let (dir, ps_port, api, admin) =
            Gateway::init(bins, root, "ps-b", "secondary", Some(&admin))?;
        run_ok(
            Command::new(bins.join("haven-gateway"))
                .args(["enroll", "--data-dir"])
                .arg(&dir)
                .args(["--upstream", &format!("127.0.0.1:{port}")])
                .args(["--token", &mt.token()?, "--name", "ps-b"]),
        )?;
        let joined = join(&dir, "ps-b")?;
        let ps = Gateway::start(
            bins,
            "process server at the secondary site",
            dir.clone(),
            format!(
                "data_dir = {dir:?}\n{joined}\n[process_server]\nlisten = \"127.0.0.1:{ps_port}\"\n\
                 upstream = \"127.0.0.1:{port}\"\n\n[api]\nlisten = \"127.0.0.1:{api}\"\n"
            ),
            ps_port,
            api,
            admin,
            Vec::new(),
        )?;
        Ok(Reverse { mt, ps })
    }
}

/// Options of a [`Cluster`].
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Extra `haven-agent protect` arguments.
    pub agent_args: Vec<String>,
    /// Extra lines for the process server's `[process_server]` section.
    pub ps_config: String,
    /// Extra lines for the master target's `[master_target]` section.
    pub mt_config: String,
    /// Extra environment of the master target and of the process server.
    pub mt_env: Vec<(String, String)>,
    pub ps_env: Vec<(String, String)>,
    /// Where the binaries are (default: [`default_bin_dir`]).
    pub bin_dir: Option<PathBuf>,
    /// Lines of the master target's `[master_target.retention]`; `None` keeps no points
    /// (`window = "0s"`: the replica file then follows the stream, which is what the
    /// replication tests compare).
    pub retention: Option<String>,
    /// Start a configuration server first, and join both gateways to it.
    pub config_server: bool,
    /// A second process server at the primary site (needs `config_server`).
    pub second_process_server: bool,
    /// Enroll the agent with the configuration server, which names its process server
    /// (needs `config_server`).
    pub agent_via_config_server: bool,
    /// The protected machine's name (default `web01`).
    pub machine: Option<String>,
    /// The machine's disks after the first (raw files), protected by the same agent.
    pub more_disks: Vec<PathBuf>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        unmount_below(&self.root);
    }
}

impl Cluster {
    /// Starts everything below `root` and protects `disk` (a raw file).
    pub fn start(root: &Path, disk: &Path, options: ClusterOptions) -> Result<Cluster> {
        let bins = options.bin_dir.clone().unwrap_or_else(default_bin_dir);
        let bins = bins.as_path();
        let mut admin = None;
        let cs = match options.config_server {
            true => {
                let (dir, port, api, token) =
                    Gateway::init(bins, root, "cs", "headquarters", None)?;
                admin = Some(token.clone());
                Some(Gateway::start(
                    bins,
                    "configuration server",
                    dir.clone(),
                    format!(
                        "data_dir = {dir:?}\n\n[config_server]\nlisten = \"127.0.0.1:{port}\"\n\n\
                         [api]\nlisten = \"127.0.0.1:{api}\"\n"
                    ),
                    port,
                    api,
                    token,
                    Vec::new(),
                )?)
            }
            false => None,
        };
        let join = |dir: &Path, name: &str| join_section(bins, cs.as_ref(), dir, name);
        let (mt_dir, mt_port, mt_api, admin) =
            Gateway::init(bins, root, "mt", "secondary", admin.as_deref())?;
        let mt_join = join(&mt_dir, "mt1")?;
        let mt = Gateway::start(
            bins,
            "master target",
            mt_dir.clone(),
            format!(
                "data_dir = {mt_dir:?}\n{mt_join}\n[master_target]\nlisten = \"127.0.0.1:{mt_port}\"\n{}\n\n\
                 [master_target.retention]\n{}\n\n[api]\nlisten = \"127.0.0.1:{mt_api}\"\n",
                options.mt_config,
                options
                    .retention
                    .clone()
                    .unwrap_or_else(|| "window = \"0s\"".into())
            ),
            mt_port,
            mt_api,
            admin.clone(),
            options.mt_env.clone(),
        )?;
        // One admin token for both gateways, as an operator of one deployment keeps it.
        let (ps_dir, ps_port, ps_api, admin) =
            Gateway::init(bins, root, "ps", "primary", Some(&admin))?;
        // A process server at the primary site, enrolled with the master target, joined as
        // `name`.
        let start_ps = |dir: PathBuf, port: u16, api: u16, admin: String, name: &str| {
            let ps_join = join(&dir, name)?;
            run_ok(
                Command::new(bins.join("haven-gateway"))
                    .args(["enroll", "--data-dir"])
                    .arg(&dir)
                    .args(["--upstream", &format!("127.0.0.1:{mt_port}")])
                    .args(["--token", &mt.token()?, "--name", &format!("ps-{name}")]),
            )?;
            Gateway::start(
                bins,
                &format!("process server {name}"),
                dir.clone(),
                format!(
                    "data_dir = {dir:?}\n{ps_join}\n[process_server]\nlisten = \"127.0.0.1:{port}\"\n\
                     upstream = \"127.0.0.1:{mt_port}\"\n{}\n\n[api]\nlisten = \"127.0.0.1:{api}\"\n",
                    options.ps_config
                ),
                port,
                api,
                admin,
                options.ps_env.clone(),
            )
        };
        let ps = start_ps(ps_dir, ps_port, ps_api, admin.clone(), "ps1")?;
        let ps2 = match options.second_process_server {
            true => {
                let (dir, port, api, admin) =
                    Gateway::init(bins, root, "ps2", "primary", Some(&admin))?;
                Some(start_ps(dir, port, api, admin, "ps2")?)
            }
            false => None,
        };
        let machine = options.machine.as_deref().unwrap_or("web01");
        let agent = match (&cs, options.agent_via_config_server) {
            (Some(cs), true) => {
                Agent::enroll_with_config_server(
                    bins,
                    cs,
                    "primary",
                    &root.join("agent"),
                    machine,
                )?;
                Agent::start_disks(
                    bins,
                    None,
                    &root.join("agent"),
                    disk,
                    &options.more_disks,
                    options.agent_args,
                )?
            }
            _ => {
                let server = Agent::enroll(bins, &ps, &root.join("agent"), machine)?;
                Agent::start_disks(
                    bins,
                    Some(server),
                    &root.join("agent"),
                    disk,
                    &options.more_disks,
                    options.agent_args,
                )?
            }
        };
        Ok(Cluster {
            root: root.to_owned(),
            cs,
            mt,
            ps,
            ps2,
            agent,
        })
    }

    /// More machines of site `primary`, each with its disks (the first, then the others):
    /// enrolled with the cluster's configuration server and protected by an agent of their
    /// own (data folder `agent-NAME` beside the cluster's), with `extra` arguments.
    pub fn more_agents(
        &self,
        machines: &[(&str, &[PathBuf])],
        extra: &[String],
    ) -> Result<Vec<Agent>> {
        let cs = self
            .cs
            .as_ref()
            .context("the cluster has no configuration server")?;
        let bins = default_bin_dir();
        let mut agents = Vec::new();
        for (m, disks) in machines {
            let dir = self.root.join(format!("agent-{m}"));
            Agent::enroll_with_config_server(&bins, cs, "primary", &dir, m)?;
            let (first, more) = disks.split_first().context("a machine without disks")?;
            agents.push(Agent::start_disks(
                &bins,
                None,
                &dir,
                first,
                more,
                extra.to_vec(),
            )?);
        }
        Ok(agents)
    }

    /// `examples/pipelines/quickstart.toml` with this cluster's addresses and folders (its
    /// configuration server must run: [`ClusterOptions::config_server`]).
    pub fn quickstart_pipeline(&self) -> Result<String> {
        let cs = self
            .cs
            .as_ref()
            .context("the cluster has no configuration server")?;
        let file =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines/quickstart.toml");
        let text =
            fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        Ok(text
            .replace("127.0.0.1:9445", &format!("127.0.0.1:{}", cs.port))
            .replace("https://127.0.0.1:9482", &cs.api)
            .replace("127.0.0.1:9443", &format!("127.0.0.1:{}", self.ps.port))
            .replace("127.0.0.1:9444", &format!("127.0.0.1:{}", self.mt.port))
            .replace("/srv/mt/", &format!("{}/", self.mt.data_dir.display())))
    }

    /// The start of a pipeline file for this cluster, named `name`: its three sites, its
    /// gateways (`cs`, `ps1`, `ps2` when started, `mt1`) and the raw writer plugin; a test adds
    /// its policies, machines and webhooks.
    pub fn pipeline_head(&self, name: &str) -> Result<String> {
        let cs = self
            .cs
            .as_ref()
            .context("the cluster has no configuration server")?;
        let gateway = |name: &str, site: &str, role: &str, port: u16| {
            format!(
                "[[gateway]]\nname = \"{name}\"\nsite = \"{site}\"\nroles = [\"{role}\"]\n\
                 address = \"127.0.0.1:{port}\"\n\n"
            )
        };
        let mut text = format!(
            "version = 1\n\n[deployment]\nname = \"{name}\"\n\n[[site]]\nname = \"headquarters\"\n\n\
             [[site]]\nname = \"primary\"\n\n[[site]]\nname = \"secondary\"\n\n"
        );
        text += &gateway("cs", "headquarters", "config-server", cs.port);
        text += &gateway("ps1", "primary", "process-server", self.ps.port);
        if let Some(ps2) = &self.ps2 {
            text += &gateway("ps2", "primary", "process-server", ps2.port);
        }
        text += &gateway("mt1", "secondary", "master-target", self.mt.port);
        text += "[[plugin]]\nname = \"raw\"\nkind = \"target-writer\"\n\
                 path = \"/opt/haven/plugins/haven_raw.wasm\"\ngateways = [\"mt1\"]\n\n\
                 [plugin.grants]\nstorage_root = \"/var/lib/haven/replicas\"\n\n";
        Ok(text)
    }

    /// The way back: a master target at the primary site whose raw writer's storage root is
    /// `storage_root` (where the machine's disks are, so a reprotect can start from them), and
    /// a process server at the secondary site forwarding to it ([`Reverse::start`]).
    pub fn reverse(&self, storage_root: &Path) -> Result<Reverse> {
        self.reverse_with(ReverseWriter::raw(storage_root))
    }

    /// [`Cluster::reverse`] with another writer (a format, block devices).
    pub fn reverse_with(&self, writer: ReverseWriter) -> Result<Reverse> {
        Reverse::start(
            &default_bin_dir(),
            &self.root,
            writer,
            &self.mt.admin_token,
            self.cs.as_ref(),
        )
    }

    /// The replica's file on the master target (the raw writer's layout).
    pub fn replica(&self) -> Result<PathBuf> {
        let s = self.mt.status()?;
        let mt = s.master_target.context("no master target role")?;
        let r = mt.replicas.first().context("no replica yet")?;
        Ok(self.mt.data_dir.join("replicas").join(&r.path))
    }

    /// Fails when a process died.
    pub fn check_alive(&mut self) -> Result<()> {
        self.mt.proc.check_alive("master target")?;
        self.ps.proc.check_alive("process server")?;
        self.agent.proc.check_alive("haven-agent")
    }

    /// Waits until the agent, in a report made after `since_ms`, is protected with everything
    /// acknowledged, and the master target has applied all of it. Calls `progress` about twice a
    /// second with the latest statuses.
    pub fn wait_caught_up(
        &mut self,
        since_ms: u64,
        timeout: Duration,
        mut progress: impl FnMut(Option<&Report>, &GatewayStatus),
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let report = self.agent.report();
            let mt = self.mt.status()?;
            progress(report.as_ref(), &mt);
            if let Some(r) = &report
                && r.time_ms > since_ms
                && let Some(d) = r.disks.first()
                && d.state == DiskState::Protected
                && d.acked_seq == d.last_seq
                && let Some(rep) = mt.master_target.as_ref().and_then(|m| m.replicas.first())
                && rep.applied_seq >= d.last_seq
                && rep.error.is_none()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "not caught up after {timeout:?}: agent {report:?}, master target {:?}",
                    mt.master_target
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Cluster {
    /// How long after `end` (a workload's last acknowledged write; `end_ms` the same moment on
    /// the wall clock) the master target had applied everything the agent wrote: the master
    /// target's applied seq is sampled every 20 ms and compared with the agent's last seq from
    /// its first report made after `end_ms`.
    pub fn applied_after(
        &mut self,
        end: Instant,
        end_ms: u64,
        timeout: Duration,
    ) -> Result<Duration> {
        let mut samples: Vec<(Instant, u64)> = Vec::new();
        let mut last_seq = None;
        let deadline = end + timeout;
        loop {
            let applied = self
                .mt
                .status()?
                .master_target
                .and_then(|m| m.replicas.first().map(|r| r.applied_seq))
                .unwrap_or(0);
            samples.push((Instant::now(), applied));
            if last_seq.is_none()
                && let Some(r) = self.agent.report()
                && r.time_ms > end_ms
                && let Some(d) = r.disks.first()
            {
                last_seq = Some(d.last_seq);
            }
            if let Some(l) = last_seq
                && let Some((t, _)) = samples.iter().find(|(_, a)| *a >= l)
            {
                return Ok(t.saturating_duration_since(end));
            }
            if Instant::now() > deadline {
                bail!("not applied within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `qemu-img compare` of two raw images: `Ok(true)` when identical.
pub fn images_equal(a: &Path, b: &Path) -> Result<bool> {
    images_equal_as(a, "raw", b, "raw")
}

/// Whether `a` (format `fa`, as qemu-img names it) and `b` (format `fb`) hold the same disk
/// (`qemu-img compare`).
pub fn images_equal_as(a: &Path, fa: &str, b: &Path, fb: &str) -> Result<bool> {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b)
        .output()
        .context("cannot run qemu-img")?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => bail!(
            "qemu-img compare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Runs qemu-io commands against an NBD URI.
pub fn qemu_io(uri: &str, commands: &[String]) -> Result<()> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(uri);
    let out = run_ok(&mut cmd)?;
    if out.contains("failed") {
        bail!("qemu-io reported a failure: {out}");
    }
    Ok(())
}

/// A raw disk of `size` bytes made of a mix: zero regions, text-like data, random data.
pub fn mixed_disk(path: &Path, size: u64, seed: u64) -> Result<()> {
    let f = File::create(path)?;
    f.set_len(size)?;
    let mut rng = seed | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let chunk = 1 << 20;
    let mut buf = vec![0u8; chunk];
    let words = b"replica journal recovery point failover master target process server agent ";
    use std::os::unix::fs::FileExt;
    let mut off = 0;
    while off < size {
        match (off / chunk as u64) % 3 {
            0 => {} // stays a hole of zeroes
            1 => {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = words[(i + off as usize / 7) % words.len()];
                }
                f.write_all_at(&buf, off)?;
            }
            _ => {
                for b in buf.chunks_mut(8) {
                    let v = next().to_le_bytes();
                    b.copy_from_slice(&v[..b.len()]);
                }
                f.write_all_at(&buf, off)?;
            }
        }
        off += chunk as u64;
    }
    f.sync_all()?;
    Ok(())
}
