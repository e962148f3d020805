//! Secrets a configuration server holds for the pipeline (`secret:NAME` settings: a vCenter
//! password, a storage account key), sealed at rest.
//!
//! Each value is sealed with AES-256-GCM under a key derived (HKDF-SHA256) from the at-rest
//! [`Key`] with the secret's name as salt, so a sealed value moved under another name does not
//! open. Sealed values live in the state database (`secret/<name>`); the key lives in its own
//! file (mode 0600). Values are never listed, logged or returned by the API: only the plugins
//! the pipeline gives them to read them.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::key::Key;
use crate::state::StateDb;
use crate::{Result, StoreError};

/// Longest secret value, in bytes.
pub const MAX_SECRET_LEN: usize = 64 * 1024;
/// Most secrets one configuration server holds.
pub const MAX_SECRETS: usize = 1024;

const KEY_INFO: &[u8] = b"haven secret v1";
const PREFIX: &str = "secret/";

/// A secret as it is stored.
#[derive(Serialize, Deserialize)]
struct Sealed {
    /// Nonce (12 bytes) then ciphertext and tag, hex.
    sealed: String,
    created_ms: u64,
    updated_ms: u64,
}

/// What is shown of a secret: never its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretInfo {
    pub name: String,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// The sealed secrets of one state database.
pub struct Secrets<'a> {
    state: &'a StateDb,
    key: &'a Key,
}

fn sealing_key(master: &Key, name: &str) -> Result<LessSafeKey> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, name.as_bytes()).extract(master.bytes());
    let okm = prk
        .expand(&[KEY_INFO], &aead::AES_256_GCM)
        .map_err(|_| StoreError::Invalid("cannot derive a secret's key".into()))?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl<'a> Secrets<'a> {
    pub fn new(state: &'a StateDb, key: &'a Key) -> Self {
        Self { state, key }
    }

    /// Sets secret `name` to `value`, replacing any value it had.
    pub fn set(&self, name: &str, value: &str, now_ms: u64) -> Result<SecretInfo> {
        if value.len() > MAX_SECRET_LEN {
            return Err(StoreError::Invalid(format!(
                "secret `{name}` is {} bytes; the most a secret may hold is {MAX_SECRET_LEN}",
                value.len()
            )));
        }
        let existing = self.state.get_json::<Sealed>(&format!("{PREFIX}{name}"))?;
        if existing.is_none() && self.list()?.len() >= MAX_SECRETS {
            return Err(StoreError::Invalid(format!(
                "{MAX_SECRETS} secrets are held already, the most there may be; delete one first"
            )));
        }
        let key = sealing_key(self.key, name)?;
        let mut nonce = [0u8; 12];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| StoreError::Invalid("no randomness for a nonce".into()))?;
        let mut data = value.as_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(name.as_bytes()),
            &mut data,
        )
        .map_err(|_| StoreError::Invalid(format!("cannot seal secret `{name}`")))?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&data);
        let created_ms = existing.map_or(now_ms, |s| s.created_ms);
        self.state.put_json(
            &format!("{PREFIX}{name}"),
            &Sealed {
                sealed: hex(&sealed),
                created_ms,
                updated_ms: now_ms,
            },
        )?;
        Ok(SecretInfo {
            name: name.to_owned(),
            created_ms,
            updated_ms: now_ms,
        })
    }

    /// The value of secret `name`, or `None` when there is none. A value that does not open
    /// under this key (damaged, or sealed by another configuration server) is an error.
    pub fn get(&self, name: &str) -> Result<Option<String>> {
        let Some(stored) = self.state.get_json::<Sealed>(&format!("{PREFIX}{name}"))? else {
            return Ok(None);
        };
        let damaged = || {
            StoreError::Invalid(format!(
                "secret `{name}` does not open with this configuration server's key (damaged, \
                 or sealed under another key); set it again with `haven secret set {name}`"
            ))
        };
        let bytes = unhex(&stored.sealed).ok_or_else(damaged)?;
        if bytes.len() < 12 + aead::AES_256_GCM.tag_len() {
            return Err(damaged());
        }
        let (nonce, data) = bytes.split_at(12);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| damaged())?;
        let mut data = data.to_vec();
        let plain = sealing_key(self.key, name)?
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut data)
            .map_err(|_| damaged())?;
        String::from_utf8(plain.to_vec())
            .map(Some)
            .map_err(|_| damaged())
    }

    /// Every secret's name and times, by name.
    pub fn list(&self) -> Result<Vec<SecretInfo>> {
        Ok(self
            .state
            .json_with_prefix::<Sealed>(PREFIX)?
            .into_iter()
            .map(|(key, s)| SecretInfo {
                name: key.trim_start_matches(PREFIX).to_owned(),
                created_ms: s.created_ms,
                updated_ms: s.updated_ms,
            })
            .collect())
    }

    /// Deletes secret `name`; false when there was none.
    pub fn remove(&self, name: &str) -> Result<bool> {
        let key = format!("{PREFIX}{name}");
        if self.state.get_json::<Sealed>(&key)?.is_none() {
            return Ok(false);
        }
        self.state.remove_json(&key)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_do_not_open_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDb::open(&dir.path().join("s.redb")).unwrap();
        let key = Key::from_bytes([7; 32]);
        let secrets = Secrets::new(&state, &key);
        secrets.set("vc-password", "hunter2", 10).unwrap();
        assert_eq!(
            secrets.get("vc-password").unwrap().as_deref(),
            Some("hunter2")
        );
        assert_eq!(secrets.get("other").unwrap(), None);
        let info = secrets.set("vc-password", "hunter3", 20).unwrap();
        assert_eq!((info.created_ms, info.updated_ms), (10, 20));
        assert_eq!(
            secrets.get("vc-password").unwrap().as_deref(),
            Some("hunter3")
        );
        // The stored form does not hold the value.
        let raw: serde_json::Value = state.get_json("secret/vc-password").unwrap().unwrap();
        assert!(!raw.to_string().contains("hunter3"));

        // Another key cannot open it.
        let other = Key::from_bytes([8; 32]);
        let err = Secrets::new(&state, &other).get("vc-password").unwrap_err();
        assert!(err.to_string().contains("does not open"), "{err}");

        // Moved under another name, it does not open either.
        state.put_json("secret/moved", &raw).unwrap();
        assert!(secrets.get("moved").is_err());

        assert_eq!(
            secrets
                .list()
                .unwrap()
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["moved", "vc-password"]
        );
        assert!(secrets.remove("vc-password").unwrap());
        assert!(!secrets.remove("vc-password").unwrap());
        assert!(
            secrets
                .set("big", &"x".repeat(MAX_SECRET_LEN + 1), 1)
                .is_err()
        );
    }
}
