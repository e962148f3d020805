//! Who may call the API: bearer tokens with roles ([`haven_store::tokens`]), an audit log of
//! every change, and callers that keep presenting bad tokens answered ever more slowly.
//!
//! Every route but `/v1/openapi.json`, `/v1/ca` and the console's assets (`/console…`) needs
//! `Authorization: Bearer <token>`. No token or a
//! token that is unknown, revoked or mistyped gets 401; a token whose role is too small for
//! the call gets 403 naming the role needed ([`required_role`]). Every call that changes
//! something (any method but GET and HEAD) is appended to the audit log — who (token id, name,
//! role), what (method, path), when, and the answer's status — refused calls included.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use haven_store::tokens::{ApiTokens, Role, TokenInfo};
use serde::{Deserialize, Serialize};

/// The role a call needs; `None` for the public routes.
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    // Public: the document, the site CA, and the web console's assets (they hold no data;
    // the page calls the API with the operator's token).
    if path == "/v1/openapi.json"
        || path == "/v1/ca"
        || path == "/console"
        || path.starts_with("/console/")
    {
        return None;
    }
    let reads = *method == Method::GET || *method == Method::HEAD;
    Some(
        if path.starts_with("/v1/api-tokens")
            || path.starts_with("/v1/audit")
            || path.starts_with("/v1/secrets")
        {
            Role::Admin
        } else if reads {
            Role::Viewer
        } else if path.starts_with("/v1/items")
            || path == "/v1/seeds"
            || path == "/v1/group-points"
            || path.starts_with("/v1/groups/")
            || path.starts_with("/v1/plans/")
            || path.starts_with("/v1/machines/")
            || (path.starts_with("/v1/platforms/") && path.ends_with("/refresh"))
        {
            Role::Operator
        } else {
            // Enrollment tokens, agent revocation, and whatever else changes the site.
            Role::Admin
        },
    )
}

/// The token a call carried, as handlers see it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Caller {
    /// The token's id (16 hex digits).
    pub id: String,
    /// What it is for.
    pub name: String,
    /// viewer, operator or admin.
    pub role: String,
}

impl Caller {
    /// `NAME (ID)`, as jobs and forwarded calls record who asked.
    pub fn label(&self) -> String {
        format!("{} ({})", self.name, self.id)
    }
}

/// One change made through the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// When it was answered, ms since the Unix epoch.
    pub time_ms: u64,
    /// The token's id, name and role (absent when no valid token came).
    pub token_id: Option<String>,
    pub token_name: Option<String>,
    pub role: Option<String>,
    /// Where the call came from.
    pub peer: String,
    pub method: String,
    /// The path with its query.
    pub path: String,
    /// The answer's HTTP status.
    pub status: u16,
}

/// An API token as the API lists it: never its secret or digest.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct TokenView {
    /// 16 hex digits.
    pub id: String,
    pub name: String,
    /// `admin`, `operator` or `viewer`.
    pub role: String,
    pub created_ms: u64,
    pub revoked_ms: Option<u64>,
}

impl From<&TokenInfo> for TokenView {
    fn from(t: &TokenInfo) -> TokenView {
        TokenView {
            id: t.id.clone(),
            name: t.name.clone(),
            role: t.role.as_str().to_string(),
            created_ms: t.created_ms,
            revoked_ms: t.revoked_ms,
        }
    }
}

/// Past this size the audit log is renamed to `<name>.1` (replacing an older one) and a new
/// one started.
pub const AUDIT_MAX_BYTES: u64 = 16 << 20;
/// Most entries `GET /v1/audit` returns.
pub const AUDIT_MAX_LIMIT: usize = 10_000;

/// Failed attempts from one address within [`FAILURE_WINDOW`] answered at once; each further
/// one waits a second more, up to [`MAX_DELAY`].
const FREE_FAILURES: u32 = 3;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
const MAX_DELAY: Duration = Duration::from_secs(10);

/// The API's tokens, audit log and failure counts.
#[derive(Debug)]
pub struct Auth {
    tokens: Arc<ApiTokens>,
    audit_path: PathBuf,
    audit: Mutex<()>,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Auth {
    /// Tokens from `tokens`, the audit log appended to `audit_path`.
    pub fn new(tokens: Arc<ApiTokens>, audit_path: &Path) -> Auth {
        Auth {
            tokens,
            audit_path: audit_path.to_path_buf(),
            audit: Mutex::new(()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The tokens.
    pub fn tokens(&self) -> &ApiTokens {
        &self.tokens
    }

    /// How long to hold a 401 for `ip`, counting this failure.
    fn failed(&self, ip: IpAddr) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        failures.retain(|_, (since, _)| now.duration_since(*since) < FAILURE_WINDOW);
        let (_, count) = failures.entry(ip).or_insert((now, 0));
        *count += 1;
        Duration::from_secs(u64::from(count.saturating_sub(FREE_FAILURES))).min(MAX_DELAY)
    }

    fn record(&self, entry: &AuditEntry) -> Result<()> {
        let _one = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        if std::fs::metadata(&self.audit_path).is_ok_and(|m| m.len() > AUDIT_MAX_BYTES) {
            let mut old = self.audit_path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.audit_path, old)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.audit_path)
            .with_context(|| format!("opening {}", self.audit_path.display()))?;
        let mut line = serde_json::to_vec(entry)?;
        line.push(b'\n');
        f.write_all(&line)?;
        f.sync_data()?;
        Ok(())
    }

    /// The newest `limit` entries, oldest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        let _one = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        let text = match std::fs::read_to_string(&self.audit_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).context(format!("reading {}", self.audit_path.display())),
        };
        let mut newest = VecDeque::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let entry: AuditEntry = serde_json::from_str(line).with_context(|| {
                format!(
                    "{}: a line that is not an audit entry",
                    self.audit_path.display()
                )
            })?;
            newest.push_back(entry);
            if newest.len() > limit {
                newest.pop_front();
            }
        }
        Ok(newest.into())
    }
}

fn refuse(code: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut r = (code, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if code == StatusCode::UNAUTHORIZED
        && let Ok(v) = "Bearer".parse()
    {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// The middleware: checks the token and its role, then audits the call if it changes
/// anything.
pub async fn authorize(
    State(auth): State<Arc<Auth>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_string());
    let Some(needed) = required_role(&method, &path) else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    let token = presented.as_deref().and_then(|t| auth.tokens.verify(t));
    let response = match &token {
        None => {
            let message = if presented.is_none() {
                "this API needs a token (Authorization: Bearer; the CLI sends --token or \
                 HAVEN_TOKEN): `haven-gateway init` printed the first admin token, and \
                 `haven api-token create` makes more"
            } else {
                "API token not valid here: unknown at this gateway, revoked or mistyped"
            };
            tokio::time::sleep(auth.failed(peer.ip())).await;
            refuse(StatusCode::UNAUTHORIZED, message)
        }
        Some(t) if t.role < needed => refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "token `{}` has role {}; {method} {path} needs {needed}{}",
                t.name,
                t.role,
                if needed == Role::Admin {
                    ""
                } else {
                    " or above"
                }
            ),
        ),
        Some(t) => {
            let mut req = req;
            req.extensions_mut().insert(Caller {
                id: t.id.clone(),
                name: t.name.clone(),
                role: t.role.as_str().to_string(),
            });
            next.run(req).await
        }
    };
    if method != Method::GET && method != Method::HEAD {
        let entry = AuditEntry {
            time_ms: haven_engine::now_ms(),
            token_id: token.as_ref().map(|t| t.id.clone()),
            token_name: token.as_ref().map(|t| t.name.clone()),
            role: token.as_ref().map(|t| t.role.as_str().to_string()),
            peer: peer.to_string(),
            method: method.to_string(),
            path: target,
            status: response.status().as_u16(),
        };
        let auth = auth.clone();
        // A file append and its sync: off the async workers.
        let recorded = tokio::task::spawn_blocking(move || auth.record(&entry)).await;
        if let Ok(Err(e)) | Err(e) = recorded.map_err(anyhow::Error::from) {
            tracing::error!(error = %format!("{e:#}"), "writing the API audit log");
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_route_needs_its_role() {
        let get = Method::GET;
        let post = Method::POST;
        let delete = Method::DELETE;
        assert_eq!(required_role(&get, "/v1/openapi.json"), None);
        assert_eq!(required_role(&get, "/v1/status"), Some(Role::Viewer));
        assert_eq!(required_role(&get, "/metrics"), Some(Role::Viewer));
        assert_eq!(
            required_role(&get, "/v1/items/web01/points"),
            Some(Role::Viewer)
        );
        assert_eq!(
            required_role(&post, "/v1/items/web01/points"),
            Some(Role::Operator)
        );
        assert_eq!(
            required_role(&post, "/v1/items/web01/failover"),
            Some(Role::Operator)
        );
        assert_eq!(
            required_role(&delete, "/v1/items/web01/test-failover"),
            Some(Role::Operator)
        );
        assert_eq!(required_role(&post, "/v1/tokens"), Some(Role::Admin));
        assert_eq!(
            required_role(&post, "/v1/agents/ab/revoke"),
            Some(Role::Admin)
        );
        assert_eq!(required_role(&get, "/v1/api-tokens"), Some(Role::Admin));
        assert_eq!(required_role(&get, "/v1/audit"), Some(Role::Admin));
        assert_eq!(
            required_role(&delete, "/v1/api-tokens/00"),
            Some(Role::Admin)
        );
        // Secrets are the admin's, even their names; platforms are read by viewers and
        // refreshed by operators.
        assert_eq!(required_role(&get, "/v1/secrets"), Some(Role::Admin));
        assert_eq!(
            required_role(&Method::PUT, "/v1/secrets/vc"),
            Some(Role::Admin)
        );
        assert_eq!(required_role(&get, "/v1/platforms"), Some(Role::Viewer));
        assert_eq!(
            required_role(&post, "/v1/plans/dr/failover"),
            Some(Role::Operator)
        );
        assert_eq!(
            required_role(&post, "/v1/platforms/vc/refresh"),
            Some(Role::Operator)
        );
    }

    #[test]
    fn failures_from_one_address_are_slowed_down_after_three() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tokens = Arc::new(ApiTokens::open(&tmp.path().join("t.json")).expect("tokens"));
        let auth = Auth::new(tokens, &tmp.path().join("audit.jsonl"));
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let waits: Vec<u64> = (0..6).map(|_| auth.failed(ip).as_secs()).collect();
        assert_eq!(waits, vec![0, 0, 0, 1, 2, 3]);
        assert_eq!(auth.failed("192.0.2.2".parse().expect("ip")).as_secs(), 0);
    }

    #[test]
    fn the_audit_log_keeps_entries_in_order_and_returns_the_newest() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tokens = Arc::new(ApiTokens::open(&tmp.path().join("t.json")).expect("tokens"));
        let auth = Auth::new(tokens, &tmp.path().join("audit.jsonl"));
        for i in 0..5u16 {
            auth.record(&AuditEntry {
                time_ms: u64::from(i),
                token_id: None,
                token_name: None,
                role: None,
                peer: "127.0.0.1:1".into(),
                method: "POST".into(),
                path: format!("/v1/x/{i}"),
                status: 200 + i,
            })
            .expect("record");
        }
        let newest = auth.audit(2).expect("audit");
        assert_eq!(
            newest.iter().map(|e| e.status).collect::<Vec<_>>(),
            vec![203, 204]
        );
        assert_eq!(auth.audit(100).expect("audit").len(), 5);
    }
}
