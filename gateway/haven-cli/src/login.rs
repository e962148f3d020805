//! `haven login` and `haven logout`: the servers this user logged in to, each with its API
//! token and the site CA certificate pinned at login.
//!
//! Kept in `logins.json` (mode 0600) in `$HAVEN_CONFIG_DIR`, else `$XDG_CONFIG_HOME/haven`,
//! else `~/.config/haven`. An `https://` server is trusted only through the CA pinned here: the
//! CLI sends nothing to one it has no login for.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use ureq::http::Method;

use crate::remote::{self, Client};

/// The file's format version.
const VERSION: u32 = 1;

/// One server logged in to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// The API token sent to this server.
    pub token: String,
    /// The site CA's certificate (PEM) the server's certificate must chain to (HTTPS only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_pem: Option<String>,
    /// Its SHA-256, lowercase hex, as given at login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
}

/// Every login of this user, and the server commands use when none is named.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logins {
    version: u32,
    /// The server of the last `haven login`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// By server URL (`https://HOST:PORT`).
    #[serde(default)]
    pub servers: BTreeMap<String, Login>,
}

impl Logins {
    /// The file's path, or `None` when there is no home to keep it in.
    pub fn path() -> Option<PathBuf> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(dir) = var("HAVEN_CONFIG_DIR") {
            return Some(PathBuf::from(dir).join("logins.json"));
        }
        let base = var("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(base.join("haven/logins.json"))
    }

    /// The logins on file; none when there is no file.
    pub fn load() -> Result<Logins> {
        let Some(path) = Self::path() else {
            return Ok(Logins::default());
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Logins::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let logins: Logins = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged; remove it and run `haven login` again",
                path.display()
            )
        })?;
        if logins.version != VERSION {
            bail!(
                "{} has format version {}; this haven reads version {VERSION}",
                path.display(),
                logins.version
            );
        }
        Ok(logins)
    }

    fn save(&self) -> Result<PathBuf> {
        let path = Self::path().context(
            "no folder to keep logins in: set HAVEN_CONFIG_DIR (or HOME, or XDG_CONFIG_HOME)",
        )?;
        let dir = path.parent().context("a file without a folder")?;
        haven_fsutil::create_dir_all(dir)?;
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        // Tokens inside: for this user only.
        haven_fsutil::write_atomic(&path, text.as_bytes(), 0o600)?;
        Ok(path)
    }

    /// The login for `server` (compared as [`normalize`] writes it).
    pub fn get(&self, server: &str) -> Option<&Login> {
        self.servers.get(&normalize(server).ok()?)
    }
}

/// `scheme://HOST:PORT` of a server address, without a trailing `/`.
pub fn normalize(server: &str) -> Result<String> {
    let (scheme, authority) = remote::split_server(server)?;
    Ok(format!("{scheme}://{authority}"))
}

/// SHA-256 of a certificate's DER, lowercase hex.
fn fingerprint(cert_pem: &str) -> Result<String> {
    let cert = ureq::tls::Certificate::from_pem(cert_pem.as_bytes())
        .context("the CA certificate the server sent is not a PEM certificate")?;
    Ok(Sha256::digest(cert.der())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A fingerprint as operators may paste it (`SHA256:`, colons, upper case) made plain.
fn plain_fingerprint(given: &str) -> String {
    let given = given.trim();
    let given = given
        .strip_prefix("sha256:")
        .or_else(|| given.strip_prefix("SHA256:"))
        .unwrap_or(given);
    given
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// `haven login`: checks the server's CA against `ca_fingerprint` (HTTPS), then the token, and
/// keeps both for the commands that follow.
pub fn login(server: &str, token: &str, ca_fingerprint: Option<&str>) -> Result<()> {
    let server = normalize(server)?;
    let mut logins = Logins::load()?;
    let (ca_cert_pem, pinned) = if server.starts_with("https://") {
        let Some(expected) = ca_fingerprint.map(plain_fingerprint) else {
            bail!(
                "{server} speaks HTTPS: give the site CA's fingerprint with --ca-fingerprint \
                 (`haven-gateway init` printed it; `haven-gateway ca-fingerprint --data-dir D` \
                 prints it again) so that haven can tell the gateway from an impostor"
            );
        };
        // The CA certificate is public; it is fetched without checking the server, and
        // trusted only if it is the one the operator named.
        let ca = Client::unverified()
            .request_with(&server, Method::GET, "/v1/ca", Duration::from_secs(10))
            .context("fetching the site CA's certificate")?;
        let ca: serde_json::Value = serde_json::from_str(&ca)
            .with_context(|| format!("{server}/v1/ca: unexpected answer"))?;
        let pem = ca["ca_cert_pem"]
            .as_str()
            .with_context(|| format!("{server}/v1/ca: no certificate in the answer"))?
            .to_string();
        let presented = fingerprint(&pem)?;
        if presented != expected {
            bail!(
                "{server} presents a site CA with fingerprint {presented}, not {expected}: \
                 not logged in. Check the fingerprint; if it is right, something between you \
                 and the gateway is answering in its place"
            );
        }
        (Some(pem), Some(presented))
    } else {
        if ca_fingerprint.is_some() {
            bail!("--ca-fingerprint is for an https:// server; {server} is plain HTTP");
        }
        // A token in clear goes nowhere but this machine.
        let (_, authority) = remote::split_server(&server)?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            bail!(
                "{server} is plain HTTP beyond loopback: the token would cross the network in \
                 clear; log in to its https:// address (gateways serve HTTPS off loopback)"
            );
        }
        (None, None)
    };
    let login = Login {
        token: token.to_string(),
        ca_cert_pem,
        ca_fingerprint: pinned,
    };
    // The token must work there before it is kept.
    let client = Client::with_logins(None, {
        let mut only = Logins::default();
        only.servers.insert(server.clone(), login.clone());
        only
    });
    let me = client
        .request(&server, Method::GET, "/v1/whoami")
        .context("checking the token")?;
    let me: serde_json::Value = serde_json::from_str(&me)
        .with_context(|| format!("{server}/v1/whoami: unexpected answer"))?;
    logins.version = VERSION;
    logins.servers.insert(server.clone(), login);
    logins.default = Some(server.clone());
    let path = logins.save()?;
    println!(
        "logged in to {server} with token `{}` (role {}); kept in {}",
        me["name"].as_str().unwrap_or("?"),
        me["role"].as_str().unwrap_or("?"),
        path.display()
    );
    Ok(())
}

/// `haven logout`: forgets the login for `server` (default: the default one).
pub fn logout(server: Option<&str>) -> Result<()> {
    let mut logins = Logins::load()?;
    let server = match server {
        Some(s) => normalize(s)?,
        None => logins
            .default
            .clone()
            .context("not logged in anywhere; nothing to forget")?,
    };
    if logins.servers.remove(&server).is_none() {
        bail!("not logged in to {server}");
    }
    if logins.default.as_deref() == Some(server.as_str()) {
        logins.default = logins.servers.keys().next().cloned();
    }
    logins.version = VERSION;
    logins.save()?;
    println!("logged out of {server}");
    Ok(())
}
