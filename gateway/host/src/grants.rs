//! What a plugin instance may use, and the checks that enforce it.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

/// Capabilities granted to one plugin instance, from its pipeline config. Everything is off
/// unless named here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Directory the plugin's `storage` import works below. Without it the plugin may not
    /// import `haven:plugin/storage`.
    #[serde(default)]
    pub storage_root: Option<PathBuf>,
    /// With `storage_root`: files may be read but not created, written, renamed or removed.
    #[serde(default)]
    pub storage_read_only: bool,
    /// With `storage_root`: block devices the plugin may also open, by their absolute path
    /// (a physical server's disks, which a failback writes in place). Never created, resized
    /// or removed; written only when the grant is not read-only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<PathBuf>,
    /// Hosts the plugin may send HTTP requests to, as `name` (any port) or `name:port`. Without
    /// any the plugin may not import `wasi:http`.
    #[serde(default)]
    pub http_hosts: Vec<String>,
    /// Most linear memory the plugin may use, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Longest one call into the plugin may run, in milliseconds; a call past it is stopped.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
}

fn default_memory_mib() -> u64 {
    256
}

fn default_call_timeout_ms() -> u64 {
    30_000
}

impl Default for Grants {
    fn default() -> Self {
        Self {
            storage_root: None,
            storage_read_only: false,
            devices: Vec::new(),
            http_hosts: Vec::new(),
            memory_mib: default_memory_mib(),
            call_timeout_ms: default_call_timeout_ms(),
        }
    }
}

/// Why an import is refused, or `None` when the grants allow it.
///
/// `import` is a component import name such as `wasi:io/streams@0.2.4`.
pub fn refuse_import(import: &str, grants: &Grants) -> Option<String> {
    let (name, version) = import.split_once('@').unwrap_or((import, ""));
    let (package, _interface) = name.split_once('/').unwrap_or((name, ""));
    match package {
        "haven:plugin" => {
            if version != "0.1.0" && version != "0.2.0" {
                return Some(format!(
                    "it is built against haven:plugin@{version}, which this gateway does not \
                     support (supported: 0.1.0, 0.2.0); rebuild it against a supported SDK"
                ));
            }
            if name == "haven:plugin/storage" && grants.storage_root.is_none() {
                return Some(
                    "it needs file storage but has no storage grant; give it `storage_root` in \
                     its config"
                        .into(),
                );
            }
            None
        }
        // Inert with the empty WASI context every plugin gets: no arguments, no environment,
        // no stdin, stdout/stderr discarded, clocks and randomness.
        "wasi:io" | "wasi:clocks" | "wasi:random" => None,
        "wasi:cli" => match name {
            "wasi:cli/environment"
            | "wasi:cli/exit"
            | "wasi:cli/stdin"
            | "wasi:cli/stdout"
            | "wasi:cli/stderr" => None,
            n if n.starts_with("wasi:cli/terminal-") => None,
            _ => Some("Haven grants no such command-line interface".into()),
        },
        "wasi:http" if grants.http_hosts.is_empty() => Some(
            "it makes HTTP requests but has no HTTP grant; list the hosts it may reach in \
             `http_hosts` in its config"
                .into(),
        ),
        "wasi:http" => None,
        "wasi:filesystem" => Some(
            "Haven never grants wasi:filesystem; plugins reach files only through \
             haven:plugin/storage below a granted root"
                .into(),
        ),
        "wasi:sockets" => Some(
            "Haven never grants wasi:sockets; plugins reach the network only through wasi:http \
             to granted hosts"
                .into(),
        ),
        _ => Some("Haven does not provide this interface".into()),
    }
}

/// The outgoing-HTTP policy of one instance: requests go only to granted hosts. Refusals are
/// recorded so the host can name the grant in the error it reports.
pub struct HttpGrant {
    pub plugin: Arc<str>,
    pub hosts: Vec<String>,
    pub denials: Vec<String>,
    /// Longest any wait of a request may be (connecting, the first byte, between bytes): the
    /// plugin's call deadline. Epoch interruption cannot stop a host function that waits, so
    /// a platform that stops answering is cut off here instead.
    pub max_wait: std::time::Duration,
}

impl HttpGrant {
    /// True when `host:port` is granted (by `host` alone, or by `host:port`).
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let with_port = format!("{host}:{port}");
        self.hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host) || h.eq_ignore_ascii_case(&with_port))
    }
}

/// What `send_request` returns: the response and a future that finishes its body's I/O.
type SendFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for HttpGrant {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendFuture {
        drop(fut);
        let uri = request.uri();
        let host = uri.host().unwrap_or_default().to_owned();
        let tls = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        if !self.allows(&host, port) {
            let message = format!(
                "plugin `{}`: HTTP request to {host}:{port} denied: not in its grant \
                 http_hosts = {:?}",
                self.plugin, self.hosts
            );
            tracing::warn!(plugin = %self.plugin, %host, port, "{message}");
            self.denials.push(message);
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        let cap = |t: Option<std::time::Duration>| {
            Some(t.map_or(self.max_wait, |t| t.min(self.max_wait)))
        };
        let options = options.unwrap_or_default();
        let options = Some(RequestOptions {
            connect_timeout: cap(options.connect_timeout),
            first_byte_timeout: cap(options.first_byte_timeout),
            between_bytes_timeout: cap(options.between_bytes_timeout),
        });
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}
