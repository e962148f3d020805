//! Precompiled components on disk, so a restarted gateway does not compile its plugins again.
//!
//! An artefact is named by the SHA-256 of the component's bytes and the engine's compatibility
//! hash (wasmtime version and every setting that changes code), so a new gateway version or
//! configuration never loads an artefact made by another. The file is `MAGIC`, a format version,
//! the SHA-256 of the payload, then the payload; it is written to a temporary file, synced,
//! renamed into place and the folder synced. A damaged artefact is logged, removed and rebuilt.

use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

const MAGIC: &[u8; 8] = b"HVNCWASM";
const FORMAT_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 32;

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded from a precompiled artefact.
    Hit,
    /// Compiled now (and stored, when a cache folder is set).
    Compiled,
}

/// A folder of precompiled artefacts.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
}

impl ArtifactCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, engine: &Engine, wasm: &[u8]) -> PathBuf {
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let name = format!(
            "{}-{:016x}.cwasm",
            hex::encode(Sha256::digest(wasm)),
            h.finish()
        );
        self.dir.join(name)
    }

    /// The component for `wasm`, from the cache or compiled now.
    pub fn load(
        &self,
        engine: &Engine,
        wasm: &[u8],
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let path = self.path(engine, wasm);
        if let Some(bytes) = self.read_trusted(&path) {
            match payload(&bytes) {
                Ok(payload) => {
                    // SAFETY: `Component::deserialize` requires bytes produced by
                    // `Component::serialize` of a compatible engine. The file name carries the
                    // engine's compatibility hash; the payload's SHA-256 is checked above, so a
                    // torn or damaged file is never deserialized; and `read_trusted` loads only
                    // a regular file (not a link) in a folder, both owned by this user and
                    // writable by no one else. So the bytes are what `store` below wrote for
                    // this engine, unless this same user (who could equally replace the
                    // program or its plugins) put them there.
                    #[allow(unsafe_code)]
                    let component = unsafe { Component::deserialize(engine, payload) };
                    match component {
                        Ok(c) => return Ok((c, CacheOutcome::Hit)),
                        Err(e) => {
                            tracing::warn!(path = %path.display(), "precompiled plugin refused by the engine, recompiling: {e:#}")
                        }
                    }
                }
                Err(why) => {
                    tracing::warn!(path = %path.display(), "damaged precompiled plugin, recompiling: {why}")
                }
            }
            let _ = fs::remove_file(&path);
        }
        let component = Component::new(engine, wasm)?;
        let bytes = component.serialize()?;
        store(&path, &bytes).map_err(|e| {
            wasmtime::format_err!("storing precompiled plugin {}: {e}", path.display())
        })?;
        Ok((component, CacheOutcome::Compiled))
    }
}

impl ArtifactCache {
    /// The artefact's bytes, if the folder and the file can only have been written by this
    /// user: both owned by the effective user, neither writable by group or others, the file
    /// not a symbolic link. Anything else is ignored (and recompiled), never loaded.
    fn read_trusted(&self, path: &Path) -> Option<Vec<u8>> {
        use std::io::Read;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let me = rustix::process::geteuid().as_raw();
        let private = |m: &fs::Metadata| m.uid() == me && m.mode() & 0o022 == 0;
        let dir = fs::metadata(&self.dir).ok()?;
        if !private(&dir) {
            tracing::warn!(dir = %self.dir.display(), "plugin cache folder is not private to this user; not using it");
            return None;
        }
        let mut file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .ok()?;
        if !private(&file.metadata().ok()?) {
            tracing::warn!(path = %path.display(), "precompiled plugin is not private to this user; recompiling");
            return None;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).ok()?;
        Some(bytes)
    }
}

fn payload(bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, expected {FORMAT_VERSION}"
        ));
    }
    let payload = &bytes[HEADER..];
    if Sha256::digest(payload).as_slice() != &bytes[12..HEADER] {
        return Err("checksum mismatch".into());
    }
    Ok(payload)
}

fn store(path: &Path, payload: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("artefacts live in a folder");
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        // A folder created earlier by a wider umask is narrowed to this user.
        let mode = fs::metadata(dir)?.permissions().mode();
        if mode & 0o022 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode & !0o022))?;
        }
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(MAGIC)?;
        f.write_all(&FORMAT_VERSION.to_le_bytes())?;
        f.write_all(&Sha256::digest(payload))?;
        f.write_all(payload)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}
