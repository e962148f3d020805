//! VMware's vCenter simulator (vcsim) as a process, for tests of the VMware adapter.
//!
//! [`Vcsim::start`] runs `target/vcsim/vcsim` (built from `tests/vcsim/main.go` by
//! `xtask/src/vcsim.rs`) on a free loopback port with its datastores in a fresh folder, waits
//! for the line giving its URL, and kills it when dropped. Each process is one vCenter with
//! datacenter DC0, hosts DC0_H0 (standalone) and DC0_C0_H0..2 (cluster DC0_C0), networks
//! "VM Network" and DC0_DVPG0, datastore LocalDS_0, and four running VMs (DC0_H0_VM0/1,
//! DC0_C0_RP0_VM0/1), each with one 1 MiB disk and one NIC on DC0_DVPG0.
//!
//! [`Vcsim::call`] speaks SOAP to it directly (plain HTTP over a socket), so tests can check
//! what an adapter reports against what the simulator holds without trusting the adapter.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

/// How long the simulator may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The command that builds the simulator, for error messages.
pub const BUILD_COMMAND: &str = "cargo xtask build (or, by hand: cd tests/vcsim && \
     GO111MODULE=off GOPATH=$PWD/../../target/vcsim/gopath:/usr/share/gocode GOPROXY=off \
     go build -o ../../target/vcsim/vcsim .)";

/// A running simulator.
pub struct Vcsim {
    child: Child,
    dir: PathBuf,
    url: String,
    user: String,
    password: String,
    host_port: String,
    datastores: Vec<(String, PathBuf)>,
    cookie: Mutex<Option<String>>,
}

impl std::fmt::Debug for Vcsim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcsim")
            .field("url", &self.url)
            .field("datastores", &self.datastores)
            .finish()
    }
}

/// Where the simulator binary is: `$HAVEN_VCSIM`, else `vcsim/vcsim` in `$CARGO_TARGET_DIR`
/// or this workspace's `target`.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("HAVEN_VCSIM") {
        return p.into();
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("vcsim/vcsim")
}

impl Vcsim {
    /// Starts a simulator with the default model.
    pub fn start() -> Result<Vcsim> {
        Self::start_with(&[])
    }

    /// Starts a simulator with extra flags (`-vm 3`, `-ds 2`, …; see `tests/vcsim/main.go`).
    pub fn start_with(args: &[&str]) -> Result<Vcsim> {
        let bin = binary();
        if !bin.exists() {
            bail!(
                "the vCenter simulator {} is missing: build it with {BUILD_COMMAND}",
                bin.display()
            );
        }
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("haven-vcsim-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let user = "haven".to_owned();
        let password = format!("pw-{}-{n}-{:x}", std::process::id(), nanos & 0xffff_ffff);
        let log = std::fs::File::create(dir.join("vcsim.log"))?;
        let mut child = Command::new(&bin)
            .args([
                "-listen",
                "127.0.0.1:0",
                "-username",
                &user,
                "-password",
                &password,
            ])
            .arg("-dir")
            .arg(dir.join("datastores"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;

        // Read its lines on a thread, so a silent simulator cannot hang the test.
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut datastores = Vec::new();
        let url = loop {
            match rx.recv_timeout(START_TIMEOUT) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("VCSIM_URL=") {
                        break url.to_owned();
                    }
                    if let Some(rest) = line.strip_prefix("VCSIM_DATASTORE ") {
                        let (name, path) = rest.split_once(' ').context("bad datastore line")?;
                        datastores.push((name.to_owned(), PathBuf::from(path)));
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(dir.join("vcsim.log")).unwrap_or_default();
                    let _ = std::fs::remove_dir_all(&dir);
                    bail!(
                        "{} printed no VCSIM_URL line within {} s: {log}",
                        bin.display(),
                        START_TIMEOUT.as_secs()
                    );
                }
            }
        };
        // http://USER:PASSWORD@127.0.0.1:PORT/sdk
        let rest = url
            .strip_prefix("http://")
            .context("VCSIM_URL is not http://")?;
        let (_credentials, rest) = rest.rsplit_once('@').context("VCSIM_URL has no user")?;
        let (host_port, path) = rest.split_once('/').context("VCSIM_URL has no path")?;
        Ok(Vcsim {
            child,
            dir,
            url: format!("http://{host_port}/{path}"),
            user,
            password,
            host_port: host_port.to_owned(),
            datastores,
            cookie: Mutex::new(None),
        })
    }

    /// The SDK URL without credentials, `http://127.0.0.1:PORT/sdk`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// `127.0.0.1:PORT`, what an adapter's HTTP grant names.
    pub fn host_port(&self) -> &str {
        &self.host_port
    }

    /// Datastore names and the local folders that hold their files.
    pub fn datastores(&self) -> &[(String, PathBuf)] {
        &self.datastores
    }

    /// The local file of datastore path `[ds] folder/file`.
    pub fn local_path(&self, datastore_path: &str) -> Result<PathBuf> {
        let rest = datastore_path
            .trim()
            .strip_prefix('[')
            .context("not a datastore path")?;
        let (ds, path) = rest.split_once(']').context("not a datastore path")?;
        let (_, dir) = self
            .datastores
            .iter()
            .find(|(name, _)| name == ds)
            .with_context(|| format!("no datastore {ds}"))?;
        Ok(dir.join(path.trim()))
    }

    /// Posts a SOAP envelope around `call` (e.g. `<RetrieveServiceContent xmlns="urn:vim25">…`)
    /// and returns the status and body.
    fn post(&self, call: &str, cookie: Option<&str>) -> Result<(u16, String, Option<String>)> {
        let body = format!(
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope"#,
                r#" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/""#,
                r#" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance""#,
                r#" xmlns:xsd="http://www.w3.org/2001/XMLSchema">"#,
                "<soapenv:Body>{}</soapenv:Body></soapenv:Envelope>"
            ),
            call
        );
        let mut conn = TcpStream::connect(&self.host_port)?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let cookie = cookie
            .map(|c| format!("Cookie: {c}\r\n"))
            .unwrap_or_default();
        write!(
            conn,
            "POST /sdk HTTP/1.1\r\nHost: {}\r\nContent-Type: text/xml; charset=utf-8\r\n\
             SOAPAction: \"urn:vim25/6.5\"\r\n{cookie}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.host_port,
            body.len()
        )?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").context("no header end")?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no status")?;
        let set_cookie = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .starts_with("set-cookie:")
                    .then(|| l["set-cookie:".len()..].trim().to_owned())
            })
            .and_then(|c| c.split(';').next().map(str::to_owned));
        Ok((status, body.to_owned(), set_cookie))
    }

    /// Calls the simulator with a session of its own (logged in on first use) and returns the
    /// answer's body; a fault is an error.
    pub fn call(&self, call: &str) -> Result<String> {
        let mut cookie = self
            .cookie
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        if cookie.is_none() {
            let login = format!(
                r#"<Login xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this><userName>{}</userName><password>{}</password></Login>"#,
                self.user, self.password
            );
            let (status, body, set) = self.post(&login, None)?;
            if status != 200 {
                bail!("vcsim login: HTTP {status}: {body}");
            }
            *cookie = Some(set.context("vcsim login set no cookie")?);
        }
        let (status, body, _) = self.post(call, cookie.as_deref())?;
        if status != 200 {
            bail!("vcsim: HTTP {status}: {body}");
        }
        Ok(body)
    }

    /// The XML inside `<val>` of property `path` of object `kind`/`id`, or `None` when the
    /// object does not exist.
    pub fn property(&self, kind: &str, id: &str, path: &str) -> Result<Option<String>> {
        let call = format!(
            concat!(
                r#"<RetrievePropertiesEx xmlns="urn:vim25"><_this type="PropertyCollector">propertyCollector</_this>"#,
                "<specSet><propSet><type>{kind}</type><pathSet>{path}</pathSet></propSet>",
                r#"<objectSet><obj type="{kind}">{id}</obj></objectSet></specSet><options/></RetrievePropertiesEx>"#
            ),
            kind = kind,
            id = id,
            path = path
        );
        let body = match self.call(&call) {
            Ok(body) => body,
            Err(e) if e.to_string().contains("ManagedObjectNotFound") => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(start) = body.find("<val") else {
            return Ok(None);
        };
        let open_end = body[start..].find('>').context("bad val")? + start + 1;
        let end = body.rfind("</val>").context("no </val>")?;
        Ok(Some(body[open_end..end].to_owned()))
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A test failover's files mounted in a datastore by a master target killed with it.
        crate::unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
