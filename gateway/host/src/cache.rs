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
        if let Ok(bytes) = fs::read(&path) {
            match payload(&bytes) {
                Ok(payload) => {
                    // SAFETY: `Component::deserialize` requires bytes produced by
                    // `Component::serialize` of a compatible engine. The file name carries the
                    // engine's compatibility hash, and the payload is exactly what `store` wrote:
                    // its SHA-256 is checked above, so a torn or damaged file is never
                    // deserialized. Only a party able to write this gateway's cache folder
                    // could substitute an artefact, and such a party can already replace the
                    // gateway binary itself.
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
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(MAGIC)?;
        f.write_all(&FORMAT_VERSION.to_le_bytes())?;
        f.write_all(&Sha256::digest(payload))?;
        f.write_all(payload)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}
