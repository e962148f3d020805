//! Compiled components: each compiled once per [`Host`](crate::Host), and precompiled artefacts
//! on disk so a restarted gateway does not compile its plugins again.
//!
//! In memory, components are kept by the SHA-256 of their bytes for the life of the cache (the
//! host's); concurrent first loads of one component wait for a single load, the others share
//! its result ([`CacheOutcome::Shared`]).
//!
//! On disk, an artefact is named by the SHA-256 of the component's bytes and the engine's
//! compatibility hash (wasmtime version and every setting that changes code), so a new gateway
//! version or configuration never loads an artefact made by another. The file is `MAGIC`, a
//! format version, the SHA-256 of the payload, then the payload; it is written by
//! `haven_fsutil::write_atomic_with` (a temporary file of its own, mode 0600, synced, renamed
//! into place, the folder synced), so processes storing the same artefact at once all succeed
//! and the last rename wins with the same content. A damaged artefact is logged, removed and rebuilt. Failing to store an artefact
//! does not fail the load: the component is used and the failure logged.

use std::collections::HashMap;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

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
    /// Compiled now (and stored, when a cache folder is set and it could be written).
    Compiled,
    /// Already loaded through the same cache (an earlier or concurrent load of the same bytes).
    Shared,
}

/// The SHA-256 of a component's bytes.
type Key = [u8; 32];

/// One component's slot: empty until its first load succeeds. Its lock is held during that load.
type Slot = Arc<Mutex<Option<Component>>>;

/// The compiled components of one engine: in memory, and in a folder of precompiled artefacts
/// when one is set.
pub struct ArtifactCache {
    engine: Engine,
    dir: Option<PathBuf>,
    /// Every component loaded so far. The map's lock is held only to find a slot.
    loaded: Mutex<HashMap<Key, Slot>>,
}

impl std::fmt::Debug for ArtifactCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactCache")
            .field("dir", &self.dir)
            .field("loaded", &lock(&self.loaded).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A load that panicked leaves its slot empty, which the next load fills: nothing to repair.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ArtifactCache {
    /// A cache for `engine`'s components, with precompiled artefacts in `dir` when it is set
    /// (created at the first store, mode 0700).
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> Self {
        Self {
            engine: engine.clone(),
            dir,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// The component for `wasm`: loaded earlier through this cache, precompiled on disk, or
    /// compiled now. Concurrent loads of the same bytes compile (or read) it once.
    pub fn load(&self, wasm: &[u8]) -> wasmtime::Result<(Component, CacheOutcome)> {
        let key: Key = Sha256::digest(wasm).into();
        let slot = lock(&self.loaded).entry(key).or_default().clone();
        let mut slot = lock(&slot);
        if let Some(component) = &*slot {
            return Ok((component.clone(), CacheOutcome::Shared));
        }
        let (component, outcome) = match &self.dir {
            Some(dir) => self.load_precompiled(dir, &key, wasm)?,
            None => (Component::new(&self.engine, wasm)?, CacheOutcome::Compiled),
        };
        *slot = Some(component.clone());
        Ok((component, outcome))
    }

    /// The artefact's path in `dir`.
    fn path(&self, dir: &Path, key: &Key) -> PathBuf {
        let mut h = DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        dir.join(format!("{}-{:016x}.cwasm", hex::encode(key), h.finish()))
    }

    /// The component from its artefact in `dir`, or compiled now and stored there.
    fn load_precompiled(
        &self,
        dir: &Path,
        key: &Key,
        wasm: &[u8],
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let path = self.path(dir, key);
        if let Some(bytes) = read_trusted(dir, &path) {
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
                    let component = unsafe { Component::deserialize(&self.engine, payload) };
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
        let component = Component::new(&self.engine, wasm)?;
        // The component is usable whether or not it can be stored: a full disk or an unwritable
        // folder costs the next start a compile, not this load.
        let stored = component
            .serialize()
            .and_then(|bytes| store(&path, &bytes).map_err(wasmtime::Error::from));
        if let Err(e) = stored {
            tracing::warn!(path = %path.display(), "cannot store precompiled plugin, using it without: {e:#}");
        }
        Ok((component, CacheOutcome::Compiled))
    }
}

/// The artefact's bytes, if the folder and the file can only have been written by this user:
/// both owned by the effective user, neither writable by group or others, the file not a
/// symbolic link. Anything else is ignored (and recompiled), never loaded.
fn read_trusted(dir: &Path, path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let me = rustix::process::geteuid().as_raw();
    let private = |m: &fs::Metadata| m.uid() == me && m.mode() & 0o022 == 0;
    if !private(&fs::metadata(dir).ok()?) {
        tracing::warn!(dir = %dir.display(), "plugin cache folder is not private to this user; not using it");
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
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = path.parent().expect("artefacts live in a folder");
    {
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
    // A temporary file of this writer's own (created exclusively, mode 0600, removed if
    // anything fails): other threads and processes storing the same artefact write their own,
    // and each rename replaces the artefact whole with the same content.
    haven_fsutil::write_atomic_with(path, 0o600, |f| {
        f.write_all(MAGIC)?;
        f.write_all(&FORMAT_VERSION.to_le_bytes())?;
        f.write_all(&Sha256::digest(payload))?;
        f.write_all(payload)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writers storing one artefact at once (appliers starting together, or several processes
    /// sharing the folder) all succeed and leave the artefact whole, private, and no temporary
    /// file behind.
    #[test]
    fn concurrent_stores_of_one_artefact_all_succeed() {
        use std::os::unix::fs::PermissionsExt;
        const THREADS: usize = 16;
        const ROUNDS: usize = 4;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("plugins");
        let path = dir.join("artefact.cwasm");
        let data: Vec<u8> = (0..256 << 10).map(|i| (i % 251) as u8).collect();
        let barrier = std::sync::Barrier::new(THREADS);
        let failures: Vec<String> = std::thread::scope(|s| {
            let writers: Vec<_> = (0..THREADS)
                .map(|_| {
                    s.spawn(|| {
                        // Every writer reaches every round's start, failed or not, so a failure
                        // is reported rather than leaving the others waiting.
                        (0..ROUNDS)
                            .filter_map(|_| {
                                barrier.wait();
                                store(&path, &data).err().map(|e| e.to_string())
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            writers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        assert_eq!(failures, Vec::<String>::new());
        let bytes = read_trusted(&dir, &path).expect("the artefact is there and private");
        assert_eq!(payload(&bytes).unwrap(), data);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&dir), mode(&path)), (0o700, 0o600));
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            ["artefact.cwasm"],
            "temporary files were left behind"
        );
    }
}
