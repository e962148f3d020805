//! The at-rest key: 256 bits from which every journal segment's AES-256-GCM key is derived.
//!
//! # Key file format (version 1, integers little-endian), [`KEY_FILE_LEN`] bytes
//!
//! | bytes  | field                                 |
//! |--------|---------------------------------------|
//! | 0..8   | magic `HVNATKEY`                      |
//! | 8..12  | format version ([`KEY_FILE_VERSION`]) |
//! | 12..16 | key length (32)                       |
//! | 16..48 | the key                               |
//! | 48..52 | CRC32C of bytes 0..48                 |
//!
//! The file is created with mode 0600 by [`haven_fsutil::write_new`]: a temporary file in the
//! same folder, synced, linked to its name (which never replaces a key another process created
//! meanwhile: losing a key loses every journal sealed with it), the temporary name removed and
//! the folder synced. A key file that is damaged, not a regular file, not owned by this user, or open to
//! group or others is refused, never repaired: replacing a key makes the journals unreadable.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use haven_wire::crc32c::crc32c;

use crate::error::{Result, StoreError};
use crate::util::le32;

/// Magic at the start of a key file.
pub const KEY_FILE_MAGIC: [u8; 8] = *b"HVNATKEY";
/// Key file format version written and understood.
pub const KEY_FILE_VERSION: u32 = 1;
/// Size of a key file.
pub const KEY_FILE_LEN: usize = 52;

/// A 256-bit at-rest key. `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// A key from its bytes (tests, or a key kept elsewhere).
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Loads the key at `path`, or creates a random one there (mode 0600, atomically) when no
    /// file exists. Refuses, with [`StoreError::KeyFile`], a damaged file, a symbolic link or
    /// other non-regular file, a file owned by another user, or one group or others may access.
    pub fn load_or_create(path: &Path) -> Result<Key> {
        match Self::load(path) {
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Self::create(path)
            }
            other => other,
        }
    }

    fn load(path: &Path) -> Result<Key> {
        let refuse = |what: String| StoreError::KeyFile {
            path: path.to_path_buf(),
            what,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map_err(|source| {
                if source.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                    refuse(
                        "is a symbolic link; a key file must be a regular file (replace the link \
                         with the file it points to)"
                            .into(),
                    )
                } else {
                    StoreError::Io {
                        what: "opening key file",
                        path: path.to_path_buf(),
                        source,
                    }
                }
            })?;
        let meta = file.metadata().map_err(|source| StoreError::Io {
            what: "reading metadata of key file",
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(refuse(
                "is not a regular file; point the configuration at the key file".into(),
            ));
        }
        let uid = rustix::process::geteuid().as_raw();
        if meta.uid() != uid {
            return Err(refuse(format!(
                "is owned by user {} but this process runs as {uid}; a key file must belong to \
                 the user that uses it (chown it)",
                meta.uid()
            )));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(refuse(format!(
                "mode {mode:04o} lets group or others access the key; run `chmod 600 {}` (and \
                 consider the key exposed: re-key if others could read it)",
                path.display()
            )));
        }
        if meta.len() != KEY_FILE_LEN as u64 {
            return Err(refuse(format!(
                "is {} bytes long, a key file is {KEY_FILE_LEN}; the file is damaged or not a \
                 Haven key: restore it from a backup (journals sealed with another key cannot \
                 be read)",
                meta.len()
            )));
        }
        let mut buf = [0u8; KEY_FILE_LEN];
        file.read_exact(&mut buf).map_err(|source| StoreError::Io {
            what: "reading key file",
            path: path.to_path_buf(),
            source,
        })?;
        let damaged = |offset: usize, why: &str| {
            refuse(format!(
                "damaged at offset {offset}: {why}; restore the key from a backup (journals \
                 sealed with another key cannot be read)"
            ))
        };
        if buf[0..8] != KEY_FILE_MAGIC {
            return Err(damaged(0, "bad magic, not a Haven key file"));
        }
        if crc32c(&buf[0..48]) != le32(&buf, 48) {
            return Err(damaged(48, "checksum mismatch"));
        }
        let version = le32(&buf, 8);
        if version != KEY_FILE_VERSION {
            return Err(damaged(
                8,
                &format!("format version {version} is not supported (this build reads 1)"),
            ));
        }
        if le32(&buf, 12) != 32 {
            return Err(damaged(12, "key length is not 32"));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&buf[16..48]);
        Ok(Key(key))
    }

    fn create(path: &Path) -> Result<Key> {
        let key = Key(crate::util::random::<32>()?);
        let mut buf = [0u8; KEY_FILE_LEN];
        buf[0..8].copy_from_slice(&KEY_FILE_MAGIC);
        buf[8..12].copy_from_slice(&KEY_FILE_VERSION.to_le_bytes());
        buf[12..16].copy_from_slice(&32u32.to_le_bytes());
        buf[16..48].copy_from_slice(&key.0);
        let crc = crc32c(&buf[0..48]);
        buf[48..52].copy_from_slice(&crc.to_le_bytes());

        // Whole, private, and never over a key another process created meanwhile.
        match haven_fsutil::write_new(path, &buf, 0o600) {
            Ok(()) => {}
            // Another process created the key meanwhile: use that one.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Self::load(path),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(path = %path.display(), "created a new at-rest key");
        Ok(key)
    }
}
