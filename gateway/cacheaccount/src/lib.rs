//! The cache storage account of Azure → Azure replication.
//!
//! An Azure VM's agent needs only outbound connections: instead of a process server it ships
//! its records to a container of a storage account in the source region, and any gateway of
//! the target region drains them to the master target (`haven_engine::drain`). The container
//! is the process server's cache, kept by Azure:
//!
//! ```text
//! leases/<agent>                          empty; a draining gateway holds its lease (fencing),
//!                                         metadata `released_<disk>`: freed up to that seq
//! streams/<agent>/report                  the agent's last report (JSON), every few seconds
//! streams/<agent>/failed-over             why the agent's machine failed over: it stops shipping
//! streams/<agent>/control/<id>            a request of the master target (JSON), for the agent
//! streams/<agent>/reply/<id>              the agent's reply to it (JSON)
//! streams/<agent>/<disk>/hello            the disk's Hello frame (its size and block size)
//! streams/<agent>/<disk>/seg/<first>-<last>  records first..=last, in order (20 digits each)
//! streams/<agent>/<disk>/req/<offset>     a resync's digest request
//! streams/<agent>/<disk>/ans/<offset>     the master target's digests for it
//! ```
//!
//! Rules:
//! - A segment is put whole (Put Blob), named by the seqs it holds; the agent frees its log
//!   only up to segments whose put was answered (durable in the account), and a new segment
//!   starts after the highest seq the account holds ([`CacheAccount::frontier`]), so segments
//!   never overlap.
//! - A gateway drains an agent only while it holds the lease of `leases/<agent>` (60 s by
//!   default, renewed every quarter of that). It records `released_<disk>` in that blob's metadata, which only the
//!   lease holder can write, before it deletes the segments the master target acknowledged.
//!   A gateway that lost its lease can neither record nor, as it checks the lease first,
//!   delete: another took over, from `released` onwards.
//! - Every blob's body is sealed: AES-256-GCM under a key derived (HKDF-SHA256) from the cache
//!   key and a random 128-bit salt kept in the blob, with the blob's name as associated data
//!   (a body moved under another name does not open), over the zstd-compressed frames. The
//!   account holds no plaintext; a body sealed with another key is refused, naming the blob.

use std::collections::BTreeMap;
use std::path::Path;

pub use haven_blob_rest::{Account, Blob, BlobError, Client, Lease};
use haven_wire::{Decoder, DiskId, Frame, HashRequest, Hashes, Hello, PeerId, Record, Seq};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};
use ring::rand::{SecureRandom, SystemRandom};

/// A sealed body starts with this.
const MAGIC: &[u8; 8] = b"HVNCACH1";
const SALT_LEN: usize = 16;
/// Length of a lease on an agent's streams, by default; Azure allows 15 to 60 seconds.
pub const LEASE_SECONDS: u32 = 60;

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// A body that does not open or decode: named with its blob.
    #[error("blob {blob} of the cache account: {what}")]
    Corrupt { blob: String, what: String },
    #[error("{0}")]
    Key(String),
}

/// The 256-bit cache key, shared by the agents and the draining gateways of a deployment.
#[derive(Clone)]
pub struct CacheKey([u8; 32]);

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheKey(…)")
    }
}

impl CacheKey {
    /// Reads a key file: 64 hexadecimal digits (`openssl rand -hex 32`), readable by its owner
    /// only.
    pub fn load(path: &Path) -> Result<CacheKey, CacheError> {
        use std::os::unix::fs::PermissionsExt as _;
        let bad = |what: String| CacheError::Key(format!("cache key {}: {what}", path.display()));
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad(format!(
                "readable by others (mode {:o}); chmod 600 it",
                meta.permissions().mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        CacheKey::from_hex(text.trim()).map_err(bad)
    }

    /// A key from 64 hexadecimal digits.
    pub fn from_hex(hex: &str) -> Result<CacheKey, String> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return Err(format!(
                "{} characters; give 64 hexadecimal digits (openssl rand -hex 32)",
                bytes.len()
            ));
        }
        let mut key = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).map_err(|_| "not hexadecimal".to_string())?;
            key[i] = u8::from_str_radix(s, 16).map_err(|_| format!("{s:?} is not hexadecimal"))?;
        }
        Ok(CacheKey(key))
    }

    fn aead(&self, salt: &[u8]) -> LessSafeKey {
        let prk = Salt::new(HKDF_SHA256, salt).extract(&self.0);
        let mut key = [0u8; 32];
        prk.expand(&[b"haven cache account body"], &AES_256_GCM)
            .and_then(|okm| okm.fill(&mut key))
            .expect("32 bytes is AES-256's key length");
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("an AES-256 key"))
    }

    /// `frames` encoded, compressed and sealed as the body of blob `name`.
    pub fn seal(&self, name: &str, frames: &[Frame]) -> Result<Vec<u8>, CacheError> {
        let mut plain = Vec::new();
        for f in frames {
            f.encode(&mut plain).map_err(|e| CacheError::Corrupt {
                blob: name.into(),
                what: format!("encoding: {e}"),
            })?;
        }
        self.seal_bytes(name, &plain)
    }

    /// `plain` compressed and sealed as the body of blob `name`.
    pub fn seal_bytes(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>, CacheError> {
        let mut body = zstd::bulk::compress(plain, 1).map_err(|e| CacheError::Corrupt {
            blob: name.into(),
            what: format!("compressing: {e}"),
        })?;
        let mut salt = [0u8; SALT_LEN];
        SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| CacheError::Key("the system's random source failed".into()))?;
        // Each salt derives a key of its own, used for this one body: nonce 0 is unique.
        self.aead(&salt)
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(name.as_bytes()),
                &mut body,
            )
            .map_err(|_| CacheError::Key("sealing failed".into()))?;
        let mut out = Vec::with_capacity(MAGIC.len() + SALT_LEN + body.len() + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&salt);
        out.extend_from_slice(&(plain.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The frames of blob `name`'s body.
    pub fn open(&self, name: &str, body: &[u8]) -> Result<Vec<Frame>, CacheError> {
        let plain = self.open_bytes(name, body)?;
        let mut decoder = Decoder::new();
        decoder.push(&plain);
        let mut frames = Vec::new();
        while let Some(f) = decoder.next().map_err(|e| CacheError::Corrupt {
            blob: name.into(),
            what: format!("decoding: {e}"),
        })? {
            frames.push(f);
        }
        Ok(frames)
    }

    /// The bytes sealed in blob `name`'s body.
    pub fn open_bytes(&self, name: &str, body: &[u8]) -> Result<Vec<u8>, CacheError> {
        let corrupt = |what: &str| CacheError::Corrupt {
            blob: name.into(),
            what: what.into(),
        };
        let head = MAGIC.len() + SALT_LEN + 8;
        if body.len() < head || &body[..MAGIC.len()] != MAGIC {
            return Err(corrupt("not a sealed body of Haven's cache"));
        }
        let salt = &body[MAGIC.len()..MAGIC.len() + SALT_LEN];
        let raw_len = u64::from_le_bytes(body[head - 8..head].try_into().expect("8 bytes"));
        if raw_len > 1 << 30 {
            return Err(corrupt("says it holds more than 1 GiB"));
        }
        let mut sealed = body[head..].to_vec();
        let plain = self
            .aead(salt)
            .open_in_place(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(name.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| {
                corrupt("does not open with this cache key (another deployment's key, or damaged)")
            })?;
        zstd::bulk::decompress(plain, raw_len as usize)
            .map_err(|e| corrupt(&format!("decompressing: {e}")))
    }
}

/// An agent's id as blob names spell it.
pub fn agent_name(peer: &PeerId) -> String {
    peer.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_agent(name: &str) -> Option<PeerId> {
    if name.len() != 32 {
        return None;
    }
    let mut peer = PeerId::default();
    for (i, b) in peer.iter_mut().enumerate() {
        *b = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(peer)
}

fn lease_blob(peer: &PeerId) -> String {
    format!("leases/{}", agent_name(peer))
}

fn stream_prefix(peer: &PeerId, disk: DiskId) -> String {
    format!("streams/{}/{disk}/", agent_name(peer))
}

fn released_key(disk: DiskId) -> String {
    format!("released_{disk}")
}

/// A new lease id: a random GUID, the form Azure requires.
pub fn new_lease_id() -> String {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random source");
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// One cache account's container, sealed with one key.
#[derive(Clone, Debug)]
pub struct CacheAccount {
    client: Client,
    key: CacheKey,
    lease_seconds: u32,
}

/// The segments a disk's stream holds: first seq → last seq.
pub type Segments = BTreeMap<Seq, Seq>;

impl CacheAccount {
    pub fn new(account: Account, key: CacheKey) -> CacheAccount {
        CacheAccount {
            client: Client::new(account),
            key,
            lease_seconds: LEASE_SECONDS,
        }
    }

    /// Leases of `seconds` (15 to 60): how long a killed draining gateway holds its agents
    /// before another takes them over.
    pub fn with_lease_seconds(mut self, seconds: u32) -> Result<CacheAccount, String> {
        if !(15..=60).contains(&seconds) {
            return Err(format!(
                "lease of {seconds} s: Azure leases last 15 to 60 seconds"
            ));
        }
        self.lease_seconds = seconds;
        Ok(self)
    }

    /// How long a lease lasts.
    pub fn lease_seconds(&self) -> u32 {
        self.lease_seconds
    }

    /// The container's URL, for messages.
    pub fn describe(&self) -> String {
        let a = self.client.account();
        format!("{}://{}{}", a.scheme, a.authority, a.container_path())
    }

    fn get_frames(&self, name: &str) -> Result<Option<Vec<Frame>>, CacheError> {
        match self.client.get(name)? {
            Some(body) => Ok(Some(self.key.open(name, &body)?)),
            None => Ok(None),
        }
    }

    // --- The agent's side.

    /// Announces a disk of an agent: its lease blob (kept if there) and its `Hello`.
    pub fn announce(&self, hello: &Hello) -> Result<(), CacheError> {
        self.client.create_container()?;
        match self.client.put(&lease_blob(&hello.peer_id), &[], true) {
            Ok(()) => {}
            // There already (and perhaps leased).
            Err(e) if matches!(e.status(), Some(409 | 412)) => {}
            Err(e) => return Err(e.into()),
        }
        for d in &hello.disks {
            let name = format!("{}hello", stream_prefix(&hello.peer_id, d.id));
            let one = Hello {
                disks: vec![*d],
                ..hello.clone()
            };
            let body = self.key.seal(&name, &[Frame::Hello(one)])?;
            self.client.put(&name, &body, false)?;
        }
        Ok(())
    }

    /// The highest seq of the disk the account holds or held (what a new segment follows).
    pub fn frontier(&self, peer: &PeerId, disk: DiskId) -> Result<Seq, CacheError> {
        let held = self
            .segments(peer, disk)?
            .values()
            .max()
            .copied()
            .unwrap_or(0);
        Ok(held.max(self.released(peer)?.get(&disk).copied().unwrap_or(0)))
    }

    /// Puts records (consecutive seqs of one disk) as one segment; durable when this returns.
    pub fn put_segment(&self, peer: &PeerId, records: &[Record]) -> Result<(), CacheError> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let name = format!(
            "{}seg/{:020}-{:020}",
            stream_prefix(peer, first.disk()),
            first.seq(),
            last.seq()
        );
        let frames: Vec<Frame> = records.iter().map(Record::to_frame).collect();
        let body = self.key.seal(&name, &frames)?;
        self.client.put(&name, &body, false)?;
        Ok(())
    }

    /// Asks for a range's digests.
    pub fn put_request(&self, peer: &PeerId, request: &HashRequest) -> Result<(), CacheError> {
        let name = format!(
            "{}req/{:020}",
            stream_prefix(peer, request.disk),
            request.offset
        );
        let body = self.key.seal(&name, &[Frame::HashRequest(*request)])?;
        Ok(self.client.put(&name, &body, false)?)
    }

    /// The answer to the request at `offset`, taken (deleted) when there is one.
    pub fn take_answer(
        &self,
        peer: &PeerId,
        disk: DiskId,
        offset: u64,
    ) -> Result<Option<Result<Hashes, String>>, CacheError> {
        let name = format!("{}ans/{offset:020}", stream_prefix(peer, disk));
        let Some(frames) = self.get_frames(&name)? else {
            return Ok(None);
        };
        self.client.delete(&name)?;
        Ok(Some(match frames.into_iter().next() {
            Some(Frame::Hashes(h)) => Ok(h),
            Some(Frame::Error(e)) => Err(e.message),
            _ => {
                return Err(CacheError::Corrupt {
                    blob: name,
                    what: "holds no digests".into(),
                });
            }
        }))
    }

    /// Puts the agent's report (its JSON).
    pub fn put_report(&self, peer: &PeerId, json: &[u8]) -> Result<(), CacheError> {
        let name = format!("streams/{}/report", agent_name(peer));
        let body = self.key.seal_bytes(&name, json)?;
        Ok(self.client.put(&name, &body, false)?)
    }

    /// Why the agent's machine failed over, when a draining gateway said so.
    pub fn failed_over(&self, peer: &PeerId) -> Result<Option<String>, CacheError> {
        let name = format!("streams/{}/failed-over", agent_name(peer));
        match self.client.get(&name)? {
            Some(body) => Ok(Some(
                String::from_utf8_lossy(&self.key.open_bytes(&name, &body)?).into_owned(),
            )),
            None => Ok(None),
        }
    }

    /// Tells the agent its machine failed over (the master target's `message`).
    pub fn put_failed_over(&self, peer: &PeerId, message: &str) -> Result<(), CacheError> {
        let name = format!("streams/{}/failed-over", agent_name(peer));
        let body = self.key.seal_bytes(&name, message.as_bytes())?;
        Ok(self.client.put(&name, &body, false)?)
    }

    /// The requests waiting for the agent: (id, JSON), oldest first.
    pub fn control_requests(&self, peer: &PeerId) -> Result<Vec<(String, Vec<u8>)>, CacheError> {
        let prefix = format!("streams/{}/control/", agent_name(peer));
        let mut out = Vec::new();
        for b in self.client.list(&prefix)? {
            if let Some(body) = self.client.get(&b.name)? {
                let id = b.name[prefix.len()..].to_string();
                out.push((id, self.key.open_bytes(&b.name, &body)?));
            }
        }
        Ok(out)
    }

    /// Answers request `id` (the reply's JSON) and removes the request.
    pub fn put_reply(&self, peer: &PeerId, id: &str, json: &[u8]) -> Result<(), CacheError> {
        let agent = agent_name(peer);
        let name = format!("streams/{agent}/reply/{id}");
        let body = self.key.seal_bytes(&name, json)?;
        self.client.put(&name, &body, false)?;
        Ok(self
            .client
            .delete(&format!("streams/{agent}/control/{id}"))?)
    }

    // --- The draining gateway's side.

    /// Leaves a request for the agent under `id` (unique: time and a random part).
    pub fn put_request_for(&self, peer: &PeerId, id: &str, json: &[u8]) -> Result<(), CacheError> {
        let name = format!("streams/{}/control/{id}", agent_name(peer));
        let body = self.key.seal_bytes(&name, json)?;
        Ok(self.client.put(&name, &body, true)?)
    }

    /// The agent's reply to request `id`, taken (deleted) when it is there.
    pub fn take_reply(&self, peer: &PeerId, id: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let name = format!("streams/{}/reply/{id}", agent_name(peer));
        let Some(body) = self.client.get(&name)? else {
            return Ok(None);
        };
        let json = self.key.open_bytes(&name, &body)?;
        self.client.delete(&name)?;
        Ok(Some(json))
    }

    /// Withdraws request `id` (no reply came in time).
    pub fn withdraw_request(&self, peer: &PeerId, id: &str) -> Result<(), CacheError> {
        Ok(self
            .client
            .delete(&format!("streams/{}/control/{id}", agent_name(peer)))?)
    }

    /// The agent's last report (its JSON), if it made one.
    pub fn report(&self, peer: &PeerId) -> Result<Option<Vec<u8>>, CacheError> {
        let name = format!("streams/{}/report", agent_name(peer));
        match self.client.get(&name)? {
            Some(body) => Ok(Some(self.key.open_bytes(&name, &body)?)),
            None => Ok(None),
        }
    }

    /// The agents that have streams here.
    pub fn agents(&self) -> Result<Vec<PeerId>, CacheError> {
        Ok(self
            .client
            .list("leases/")?
            .iter()
            .filter_map(|b| parse_agent(b.name.strip_prefix("leases/")?))
            .collect())
    }

    /// The `Hello` of each of the agent's disks.
    pub fn disks(&self, peer: &PeerId) -> Result<Vec<Hello>, CacheError> {
        let prefix = format!("streams/{}/", agent_name(peer));
        let mut out = Vec::new();
        for b in self.client.list(&prefix)? {
            if !b.name.ends_with("/hello") {
                continue;
            }
            match self.get_frames(&b.name)?.and_then(|f| f.into_iter().next()) {
                Some(Frame::Hello(h)) if h.peer_id == *peer && h.disks.len() == 1 => out.push(h),
                Some(_) => {
                    return Err(CacheError::Corrupt {
                        blob: b.name,
                        what: "is not this agent's Hello of one disk".into(),
                    });
                }
                None => {}
            }
        }
        Ok(out)
    }

    /// Takes the lease of the agent's streams, as `id`; `None` while another gateway holds it.
    pub fn lease(&self, peer: &PeerId, id: &str) -> Result<Option<Lease>, CacheError> {
        Ok(self
            .client
            .acquire_lease(&lease_blob(peer), self.lease_seconds, id)?)
    }

    pub fn renew(&self, lease: &Lease) -> Result<(), CacheError> {
        Ok(self.client.renew_lease(lease)?)
    }

    pub fn release_lease(&self, lease: &Lease) -> Result<(), CacheError> {
        Ok(self.client.release_lease(lease)?)
    }

    /// How far each disk of the agent was freed.
    pub fn released(&self, peer: &PeerId) -> Result<BTreeMap<DiskId, Seq>, CacheError> {
        let meta = self.client.metadata(&lease_blob(peer))?.unwrap_or_default();
        Ok(meta
            .iter()
            .filter_map(|(n, v)| {
                Some((n.strip_prefix("released_")?.parse().ok()?, v.parse().ok()?))
            })
            .collect())
    }

    /// The disk's segments.
    pub fn segments(&self, peer: &PeerId, disk: DiskId) -> Result<Segments, CacheError> {
        let prefix = format!("{}seg/", stream_prefix(peer, disk));
        let mut out = Segments::new();
        for b in self.client.list(&prefix)? {
            let range = b.name[prefix.len()..]
                .split_once('-')
                .and_then(|(f, l)| Some((f.parse().ok()?, l.parse().ok()?)))
                .filter(|(f, l): &(Seq, Seq)| f <= l);
            match range {
                Some((first, last)) => {
                    out.insert(first, last);
                }
                None => {
                    return Err(CacheError::Corrupt {
                        blob: b.name,
                        what: "is not named FIRST-LAST".into(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// The records of the segment `first..=last`.
    pub fn read_segment(
        &self,
        peer: &PeerId,
        disk: DiskId,
        first: Seq,
        last: Seq,
    ) -> Result<Vec<Record>, CacheError> {
        let name = format!("{}seg/{first:020}-{last:020}", stream_prefix(peer, disk));
        let frames = self.get_frames(&name)?.ok_or_else(|| CacheError::Corrupt {
            blob: name.clone(),
            what: "is gone (freed by another gateway?)".into(),
        })?;
        let records: Vec<Record> = frames
            .into_iter()
            .filter_map(|f| match f {
                Frame::Write(w) => Some(Record::Write(w)),
                Frame::Tag(t) => Some(Record::Tag(t)),
                _ => None,
            })
            .collect();
        let in_order = records
            .iter()
            .zip(first..=last)
            .all(|(r, s)| r.seq() == s && r.disk() == disk);
        if !in_order || records.len() as u64 != last - first + 1 {
            return Err(CacheError::Corrupt {
                blob: name,
                what: format!("does not hold records {first}..={last} of disk {disk} in order"),
            });
        }
        Ok(records)
    }

    /// Frees the disk's records up to `up_to`: recorded under the lease first, then the
    /// segments that end at or below it are deleted. Fails, freeing nothing, once the lease
    /// is lost.
    pub fn free(
        &self,
        lease: &Lease,
        peer: &PeerId,
        disk: DiskId,
        up_to: Seq,
        segments: &Segments,
    ) -> Result<(), CacheError> {
        let mut released = self.released(peer)?;
        released.insert(disk, up_to);
        let meta: Vec<(String, String)> = released
            .iter()
            .map(|(d, s)| (released_key(*d), s.to_string()))
            .collect();
        self.client.set_metadata(&lease.blob, &meta, Some(lease))?;
        for (&first, &last) in segments.range(..=up_to) {
            if last <= up_to {
                self.client.delete(&format!(
                    "{}seg/{first:020}-{last:020}",
                    stream_prefix(peer, disk)
                ))?;
            }
        }
        Ok(())
    }

    /// The digest requests waiting for an answer.
    pub fn requests(&self, peer: &PeerId, disk: DiskId) -> Result<Vec<HashRequest>, CacheError> {
        let prefix = format!("{}req/", stream_prefix(peer, disk));
        let mut out = Vec::new();
        for b in self.client.list(&prefix)? {
            match self.get_frames(&b.name)?.and_then(|f| f.into_iter().next()) {
                Some(Frame::HashRequest(r)) if r.disk == disk => out.push(r),
                Some(_) => {
                    return Err(CacheError::Corrupt {
                        blob: b.name,
                        what: "is not a digest request of its disk".into(),
                    });
                }
                None => {}
            }
        }
        Ok(out)
    }

    /// Answers the request at `offset` (the digests, or why there are none) and removes it.
    pub fn answer(
        &self,
        peer: &PeerId,
        disk: DiskId,
        offset: u64,
        answer: Result<Hashes, String>,
    ) -> Result<(), CacheError> {
        let prefix = stream_prefix(peer, disk);
        let name = format!("{prefix}ans/{offset:020}");
        let frame = match answer {
            Ok(h) => Frame::Hashes(h),
            Err(why) => Frame::Error(haven_wire::ErrorFrame::new(
                haven_wire::frame::error_code::INTERNAL,
                why,
            )),
        };
        let body = self.key.seal(&name, &[frame])?;
        self.client.put(&name, &body, false)?;
        self.client.delete(&format!("{prefix}req/{offset:020}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_wire::{Payload, Write};

    fn key(b: u8) -> CacheKey {
        CacheKey([b; 32])
    }

    #[test]
    fn a_sealed_body_opens_only_under_its_name_and_key() {
        let frames = vec![Frame::Write(Write {
            disk: 1,
            seq: 7,
            offset: 4096,
            data: Payload::Data(vec![0xab; 4096].into()),
        })];
        let body = key(1).seal("streams/a/1/seg/x", &frames).unwrap();
        // No plaintext: the data's bytes do not appear.
        assert!(!body.windows(64).any(|w| w.iter().all(|&b| b == 0xab)));
        assert_eq!(key(1).open("streams/a/1/seg/x", &body).unwrap(), frames);
        let moved = key(1).open("streams/a/1/seg/y", &body).unwrap_err();
        assert!(
            moved
                .to_string()
                .contains("does not open with this cache key"),
            "{moved}"
        );
        assert!(key(2).open("streams/a/1/seg/x", &body).is_err());
        let mut damaged = body.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert!(key(1).open("streams/a/1/seg/x", &damaged).is_err());
        assert!(key(1).open("streams/a/1/seg/x", b"plain").is_err());
    }

    #[test]
    fn key_files_are_hex_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.key");
        std::fs::write(&path, format!("{}\n", "0f".repeat(32))).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = CacheKey::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("readable by others") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(CacheKey::load(&path).unwrap().0, [0x0f; 32]);
        std::fs::write(&path, "abc").unwrap();
        let e = CacheKey::load(&path).unwrap_err().to_string();
        assert!(e.contains("64 hexadecimal digits"), "{e}");
    }

    #[test]
    fn agent_names_round_trip() {
        let peer: PeerId = [0x5a; 16];
        assert_eq!(parse_agent(&agent_name(&peer)), Some(peer));
        assert_eq!(parse_agent("xyz"), None);
    }
}
