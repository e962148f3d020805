//! API tokens: who may call a gateway's HTTP API, and with which role.
//!
//! A token is `hvt_<id>_<secret>`: 16 hex digits naming it and 64 hex digits of secret, drawn
//! from the system's random source. It is shown once, when created; the file keeps its id,
//! name, role and the SHA-256 of the whole token, never the token itself, so a copy of the
//! file lets nobody in. The file (`api-tokens.json`, mode 0600) is replaced atomically on every
//! change.
//!
//! Roles, each including the one below it:
//!
//! | role       | may                                                              |
//! |------------|------------------------------------------------------------------|
//! | `viewer`   | read: status, items, points, metrics                             |
//! | `operator` | take points, test failover and clean it up, fail over, commit    |
//! | `admin`    | mint enrollment tokens, revoke agents, manage API tokens, audit |

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::util::hex;

/// What a token may do. Ordered: a role may do everything the ones below it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read only.
    Viewer,
    /// Points, test failover, failover.
    Operator,
    /// Everything, enrollment and tokens included.
    Admin,
}

impl Role {
    /// The role's name, as in the file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!("role {other:?}: use admin, operator or viewer")),
        }
    }
}

/// A token as the file keeps it (no secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenInfo {
    /// 16 hex digits, the token's public part.
    pub id: String,
    /// What the token is for (`ops-laptop`, `prometheus`).
    pub name: String,
    pub role: Role,
    /// When it was created, ms since the Unix epoch.
    pub created_ms: u64,
    /// When it was revoked; a revoked token lets nobody in.
    #[serde(default)]
    pub revoked_ms: Option<u64>,
    /// SHA-256 of the whole token, hex.
    sha256: String,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    version: u32,
    tokens: Vec<TokenInfo>,
}

/// Most tokens one gateway keeps (revoked ones included).
pub const MAX_TOKENS: usize = 1024;
/// Longest token name.
pub const MAX_NAME_LEN: usize = 64;

/// The API tokens of one gateway. See the [module documentation](self).
#[derive(Debug)]
pub struct ApiTokens {
    path: PathBuf,
    tokens: Mutex<Vec<TokenInfo>>,
}

impl ApiTokens {
    /// Opens `path` (none yet: no token).
    pub fn open(path: &Path) -> Result<ApiTokens> {
        let tokens = match std::fs::read(path) {
            Ok(bytes) => {
                let file: TokenFile = serde_json::from_slice(&bytes).map_err(|e| {
                    StoreError::Invalid(format!(
                        "{}: not an API token file ({e}); restore it from a backup, or move it \
                         aside and create an admin token with `haven-gateway api-token create`",
                        path.display()
                    ))
                })?;
                if file.version != 1 {
                    return Err(StoreError::Invalid(format!(
                        "{}: API token file version {} is not supported (this build reads 1)",
                        path.display(),
                        file.version
                    )));
                }
                file.tokens
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(StoreError::Io {
                    what: "reading",
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(ApiTokens {
            path: path.to_path_buf(),
            tokens: Mutex::new(tokens),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<TokenInfo>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store(&self, tokens: &[TokenInfo]) -> Result<()> {
        let file = TokenFile {
            version: 1,
            tokens: tokens.to_vec(),
        };
        let bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| StoreError::Invalid(format!("encoding API tokens: {e}")))?;
        if let Some(dir) = self.path.parent() {
            haven_fsutil::create_dir_all(dir)?;
        }
        haven_fsutil::write_atomic(&self.path, &bytes, 0o600)?;
        Ok(())
    }

    /// Creates a token; returns it (shown once, never stored) and what is kept of it.
    pub fn create(&self, name: &str, role: Role, now_ms: u64) -> Result<(String, TokenInfo)> {
        let mut raw = [0u8; 40];
        ring::rand::SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| StoreError::Invalid("no random source for a token".into()))?;
        let token = format!("hvt_{}_{}", hex(&raw[..8]), hex(&raw[8..]));
        let info = self.add(&token, name, role, now_ms)?;
        Ok((token, info))
    }

    /// Keeps a token made elsewhere (another gateway of the deployment printed it), so one
    /// token reaches several gateways. It must have the form of a token this module makes.
    pub fn add(&self, token: &str, name: &str, role: Role, now_ms: u64) -> Result<TokenInfo> {
        let id = parse(token).ok_or_else(|| {
            StoreError::Invalid(
                "that is not an API token: one looks like hvt_ and 16 hex digits, _ and 64 hex                  digits, as `haven-gateway init` prints it"
                    .into(),
            )
        })?;
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        {
            return Err(StoreError::Invalid(format!(
                "token name {name:?}: give 1 to {MAX_NAME_LEN} letters, digits, '-', '_', '.' \
                 or '@'"
            )));
        }
        let mut tokens = self.lock();
        if tokens.len() >= MAX_TOKENS {
            return Err(StoreError::Invalid(format!(
                "this gateway keeps {MAX_TOKENS} API tokens already (revoked ones count); \
                 remove the file's revoked entries to make room"
            )));
        }
        if tokens.iter().any(|t| t.id == id) {
            return Err(StoreError::Invalid(format!(
                "API token {id} is kept here already"
            )));
        }
        let info = TokenInfo {
            id: id.to_string(),
            name: name.to_string(),
            role,
            created_ms: now_ms,
            revoked_ms: None,
            sha256: sha256_hex(token),
        };
        let mut next = tokens.clone();
        next.push(info.clone());
        self.store(&next)?;
        *tokens = next;
        Ok(info)
    }

    /// The token's kept part when `token` is valid and not revoked.
    pub fn verify(&self, token: &str) -> Option<TokenInfo> {
        let id = parse(token)?;
        let tokens = self.lock();
        let info = tokens.iter().find(|t| t.id == id)?;
        let given = sha256_hex(token);
        // Digests are compared, so timing says nothing of the secret; compared in full anyway.
        let same = given.len() == info.sha256.len()
            && given
                .bytes()
                .zip(info.sha256.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        (same && info.revoked_ms.is_none()).then(|| info.clone())
    }

    /// Every token kept, oldest first.
    pub fn list(&self) -> Vec<TokenInfo> {
        self.lock().clone()
    }

    /// Whether any token could let someone in.
    pub fn any_active(&self) -> bool {
        self.lock().iter().any(|t| t.revoked_ms.is_none())
    }

    /// Revokes token `id`; the token as kept now. `NotFound`-like error when there is none.
    pub fn revoke(&self, id: &str, now_ms: u64) -> Result<TokenInfo> {
        let mut tokens = self.lock();
        let mut next = tokens.clone();
        let Some(t) = next.iter_mut().find(|t| t.id == id) else {
            return Err(StoreError::Invalid(format!(
                "no API token {id}; `haven token list` shows them"
            )));
        };
        t.revoked_ms.get_or_insert(now_ms);
        let revoked = t.clone();
        self.store(&next)?;
        *tokens = next;
        Ok(revoked)
    }
}

/// The id of a token of the right form: `hvt_` 16 hex digits `_` 64 hex digits.
fn parse(token: &str) -> Option<&str> {
    let (id, secret) = token.strip_prefix("hvt_")?.split_once('_')?;
    let hex_digits = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hex_digits(id, 16) && hex_digits(secret, 64)).then_some(id)
}

fn sha256_hex(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_kept_hashed_and_lets_in_with_its_role_until_revoked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("api-tokens.json");
        let tokens = ApiTokens::open(&path).expect("open");
        assert!(!tokens.any_active());
        let (admin, info) = tokens
            .create("first-admin", Role::Admin, 1)
            .expect("create");
        let (viewer, _) = tokens.create("grafana", Role::Viewer, 2).expect("create");
        assert!(admin.starts_with(&format!("hvt_{}_", info.id)));
        assert_eq!(admin.len(), 4 + 16 + 1 + 64);
        let file = std::fs::read_to_string(&path).expect("read");
        assert!(!file.contains(&admin[21..]) && !file.contains(&viewer[21..]));

        // Reopened, the same tokens let in, with their roles; others do not.
        let tokens = ApiTokens::open(&path).expect("reopen");
        assert_eq!(tokens.verify(&admin).map(|t| t.role), Some(Role::Admin));
        assert_eq!(tokens.verify(&viewer).map(|t| t.role), Some(Role::Viewer));
        let mut forged = admin.clone();
        forged.pop();
        forged.push(if admin.ends_with('0') { '1' } else { '0' });
        assert_eq!(tokens.verify(&forged), None);
        assert_eq!(tokens.verify("hvt_"), None);
        assert_eq!(tokens.verify("Bearer x"), None);

        tokens.revoke(&info.id, 3).expect("revoke");
        assert_eq!(tokens.verify(&admin), None);
        assert_eq!(ApiTokens::open(&path).expect("reopen").verify(&admin), None);
        assert!(tokens.any_active());
        assert!(tokens.revoke("0000", 4).is_err());

        // A token printed by one gateway is kept by another, and lets in there.
        let other = ApiTokens::open(&tmp.path().join("other.json")).expect("open");
        other
            .add(&viewer, "shared", Role::Operator, 5)
            .expect("add");
        assert_eq!(other.verify(&viewer).map(|t| t.role), Some(Role::Operator));
        let e = other
            .add("hvt_12_34", "x", Role::Admin, 6)
            .expect_err("malformed");
        assert!(e.to_string().contains("not an API token"), "{e}");
        assert!(other.add(&viewer, "again", Role::Admin, 7).is_err());
    }

    #[test]
    fn names_and_roles_are_checked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tokens = ApiTokens::open(&tmp.path().join("t.json")).expect("open");
        let e = tokens.create("a b", Role::Viewer, 1).expect_err("space");
        assert!(e.to_string().contains("token name \"a b\""), "{e}");
        assert_eq!("operator".parse::<Role>(), Ok(Role::Operator));
        assert_eq!(
            "root".parse::<Role>(),
            Err("role \"root\": use admin, operator or viewer".to_string())
        );
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
    }
}
