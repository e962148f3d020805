//! Replica disks as fixed VHDs in Azure page blobs, over the Blob REST API.
//!
//! A disk at path `P` is the page blob `P` in the container the operator names: its data, then
//! the 512-byte VHD footer in the blob's last page, so the blob is exactly what an Azure
//! managed disk is imported from (whole MiB plus the footer). Writes are Put Page (`update`,
//! at most [`MAX_PUT_PAGE`] bytes per request, 512-byte aligned as every call of the contract
//! is); zero writes are Put Page `clear`, which frees the pages; the allocation map is Get Page
//! Ranges. A Put Page that was answered is durable in the storage account, so `flush` has
//! nothing left to do.
//!
//! Requests are signed with the account's Shared Key (`Authorization: SharedKey`, HMAC-SHA256
//! of the canonical request) or carry a SAS token the operator gives instead, and go only to
//! the endpoint's host, which the instance must be granted (`http_hosts`).
//!
//! This file holds what runs natively too (endpoints, signing, page-range lists); `plugin.rs`
//! is the component's side, over the host's HTTP.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

#[cfg(target_arch = "wasm32")]
mod plugin;

/// The REST API version spoken.
pub const API_VERSION: &str = "2021-12-02";
/// Most bytes one Put Page writes (the service's limit).
pub const MAX_PUT_PAGE: u64 = 4 << 20;
/// Page size: every offset and length of a page write is a multiple of it.
pub const PAGE: u64 = 512;

/// How requests prove who sends them.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// The account key (decoded): each request signed with it.
    SharedKey(Vec<u8>),
    /// A SAS token (the query string, without `?`), added to every request.
    Sas(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key or the token.
        match self {
            Auth::SharedKey(_) => f.write_str("SharedKey(…)"),
            Auth::Sas(_) => f.write_str("Sas(…)"),
        }
    }
}

/// A storage account's blob endpoint and the container disks are kept in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`.
    pub authority: String,
    /// The path before the container: empty for `https://ACCOUNT.blob.core.windows.net`,
    /// `/devstoreaccount1` for an emulator's path-style endpoint.
    pub base: String,
    /// The account's name.
    pub name: String,
    pub container: String,
    pub auth: Auth,
}

/// One request, as it is signed and sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: &'static str,
    /// The URL's path, percent-encoded, from `/`.
    pub path: String,
    /// Query parameters, unencoded (values here are plain words and numbers).
    pub query: Vec<(String, String)>,
    /// Headers other than `Authorization` (names lower-case).
    pub headers: Vec<(String, String)>,
    /// Bytes of the body.
    pub content_length: u64,
}

impl Account {
    /// Reads an account from the writer's settings: `endpoint`
    /// (`https://ACCOUNT.blob.core.windows.net`, or an emulator's
    /// `http://HOST:PORT/ACCOUNT`), `account` (default: the first label of the endpoint's host,
    /// or the emulator path's account), `container`, and `key` (base64) or `sas`.
    pub fn from_settings(get: impl Fn(&str) -> Option<String>) -> Result<Account, String> {
        let endpoint = get("endpoint").ok_or("setting `endpoint` is required (the blob endpoint, e.g. https://ACCOUNT.blob.core.windows.net)")?;
        let (scheme, rest) = endpoint
            .split_once("://")
            .filter(|(s, _)| *s == "http" || *s == "https")
            .ok_or_else(|| {
                format!("setting `endpoint` {endpoint:?}: give an http:// or https:// URL")
            })?;
        let (authority, base) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("setting `endpoint` {endpoint:?} names no host"));
        }
        let name = match get("account") {
            Some(a) => a,
            None if !base.is_empty() => base.trim_start_matches('/').to_string(),
            None => authority.split('.').next().unwrap_or_default().to_string(),
        };
        let container =
            get("container").ok_or("setting `container` is required (where the disks are kept)")?;
        let valid = (3..=63).contains(&container.len())
            && container
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(format!(
                "setting `container` {container:?}: 3 to 63 lower-case letters, digits and `-`"
            ));
        }
        let auth = match (get("key"), get("sas")) {
            (Some(key), None) => Auth::SharedKey(
                base64::engine::general_purpose::STANDARD
                    .decode(key.trim())
                    .map_err(|_| {
                        "setting `key`: the account key is base64; this is not".to_string()
                    })?,
            ),
            (None, Some(sas)) => Auth::Sas(sas.trim_start_matches('?').to_string()),
            (Some(_), Some(_)) => return Err("give `key` or `sas`, not both".into()),
            (None, None) => {
                return Err(
                    "setting `key` (the account key) or `sas` (a SAS token) is required".into(),
                );
            }
        };
        Ok(Account {
            scheme: scheme.to_string(),
            authority: authority.to_string(),
            base: base.to_string(),
            name,
            container,
            auth,
        })
    }

    /// The encoded path of blob `blob` (a disk's path: `/`-separated names).
    pub fn blob_path(&self, blob: &str) -> String {
        let mut path = format!("{}/{}", self.base, self.container);
        for part in blob.split('/') {
            path.push('/');
            path.push_str(&encode(part));
        }
        path
    }

    /// The container's path.
    pub fn container_path(&self) -> String {
        format!("{}/{}", self.base, self.container)
    }

    /// The request's URL, with the SAS token when that is the auth.
    pub fn url(&self, r: &Request) -> String {
        let mut query: Vec<String> = r
            .query
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        if let Auth::Sas(sas) = &self.auth {
            query.push(sas.clone());
        }
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        format!("{}://{}{}{q}", self.scheme, self.authority, r.path)
    }

    /// The headers to send: the request's, `x-ms-date` (`now`) and `x-ms-version`, and the
    /// `Authorization` of a Shared Key.
    pub fn headers(&self, r: &Request, now: std::time::SystemTime) -> Vec<(String, String)> {
        let mut headers = r.headers.clone();
        headers.push(("x-ms-date".into(), httpdate::fmt_http_date(now)));
        headers.push(("x-ms-version".into(), API_VERSION.into()));
        if let Auth::SharedKey(key) = &self.auth {
            let to_sign = string_to_sign(&self.name, r, &headers);
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
            mac.update(to_sign.as_bytes());
            let signature =
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            headers.push((
                "authorization".into(),
                format!("SharedKey {}:{signature}", self.name),
            ));
        }
        headers
    }
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The Shared Key string to sign of `r` with `headers` (the `x-ms-` ones included), for
/// account `account`: the verb, the standard headers in their order (`Content-Length` empty
/// when zero), the `x-ms-` headers sorted, and the canonical resource.
pub fn string_to_sign(account: &str, r: &Request, headers: &[(String, String)]) -> String {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map_or("", |(_, v)| v.as_str())
    };
    let length = match r.content_length {
        0 => String::new(),
        n => n.to_string(),
    };
    let mut ms: Vec<(String, String)> = headers
        .iter()
        .filter(|(n, _)| n.to_ascii_lowercase().starts_with("x-ms-"))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    ms.sort();
    let mut s = format!(
        "{}\n{}\n{}\n{length}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
        r.method,
        header("content-encoding"),
        header("content-language"),
        header("content-md5"),
        header("content-type"),
        header("date"),
        header("if-modified-since"),
        header("if-match"),
        header("if-none-match"),
        header("if-unmodified-since"),
        header("range"),
    );
    for (n, v) in ms {
        s.push_str(&format!("{n}:{v}\n"));
    }
    s.push_str(&format!("/{account}{}", r.path));
    let mut query: Vec<(String, String)> = r
        .query
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    query.sort();
    for (k, v) in query {
        s.push_str(&format!("\n{k}:{v}"));
    }
    s
}

/// The page ranges of a Get Page Ranges answer (`<PageRange><Start>…</Start><End>…</End>`,
/// `End` inclusive), as `(offset, length)` in order; clear ranges are left out.
pub fn page_ranges(xml: &str) -> Result<Vec<(u64, u64)>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("page ranges: {e}"))?;
    let mut out = Vec::new();
    for r in doc.descendants().filter(|n| n.has_tag_name("PageRange")) {
        let field = |name: &str| -> Result<u64, String> {
            r.children()
                .find(|c| c.has_tag_name(name))
                .and_then(|c| c.text())
                .and_then(|t| t.trim().parse().ok())
                .ok_or_else(|| format!("page ranges: a range without a numeric <{name}>"))
        };
        let (start, end) = (field("Start")?, field("End")?);
        if end < start {
            return Err(format!(
                "page ranges: range {start}..{end} ends before it starts"
            ));
        }
        out.push((start, end - start + 1));
    }
    out.sort_unstable();
    Ok(out)
}

/// The allocation map of `[offset, offset+len)` from a blob's page ranges: data where a range
/// covers it, zero elsewhere; consecutive, in order, covering the whole span.
pub fn allocation(ranges: &[(u64, u64)], offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = offset + len;
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut push = |o: u64, l: u64, data: bool| {
        if l == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, data)),
        }
    };
    let mut at = offset;
    for &(s, l) in ranges {
        let (s, e) = (s.max(offset), (s + l).min(end));
        if e <= s || e <= at {
            continue;
        }
        let s = s.max(at);
        push(at, s - at, false);
        push(s, e - s, true);
        at = e;
    }
    push(at, end - at, false);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| owned.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn an_emulator_endpoint_names_its_account_in_the_path() {
        let a = Account::from_settings(settings(&[
            ("endpoint", "http://127.0.0.1:10000/devstoreaccount1"),
            ("container", "replicas"),
            ("key", "a2V5"),
        ]))
        .unwrap();
        assert_eq!(a.authority, "127.0.0.1:10000");
        assert_eq!(a.name, "devstoreaccount1");
        assert_eq!(
            a.blob_path("failover/ab cd/disk1.vhd"),
            "/devstoreaccount1/replicas/failover/ab%20cd/disk1.vhd"
        );
        let cloud = Account::from_settings(settings(&[
            ("endpoint", "https://haven1.blob.core.windows.net/"),
            ("container", "replicas"),
            ("sas", "?sv=2021&sig=x"),
        ]))
        .unwrap();
        assert_eq!((cloud.name.as_str(), cloud.base.as_str()), ("haven1", ""));
        let r = Request {
            method: "GET",
            path: cloud.blob_path("d.vhd"),
            query: vec![("comp".into(), "pagelist".into())],
            headers: vec![],
            content_length: 0,
        };
        assert_eq!(
            cloud.url(&r),
            "https://haven1.blob.core.windows.net/replicas/d.vhd?comp=pagelist&sv=2021&sig=x"
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let e = Account::from_settings(settings(&[
            ("endpoint", "ftp://x"),
            ("container", "replicas"),
            ("key", "a2V5"),
        ]))
        .unwrap_err();
        assert!(e.contains("`endpoint`"), "{e}");
        let e = Account::from_settings(settings(&[
            ("endpoint", "https://x.blob.core.windows.net"),
            ("container", "Replicas"),
            ("key", "a2V5"),
        ]))
        .unwrap_err();
        assert!(e.contains("`container`"), "{e}");
        let e = Account::from_settings(settings(&[
            ("endpoint", "https://x.blob.core.windows.net"),
            ("container", "replicas"),
        ]))
        .unwrap_err();
        assert!(e.contains("`key`"), "{e}");
    }

    #[test]
    fn the_string_to_sign_is_canonical() {
        let r = Request {
            method: "PUT",
            path: "/devstoreaccount1/replicas/d.vhd".into(),
            query: vec![("comp".into(), "page".into())],
            headers: vec![
                ("x-ms-range".into(), "bytes=0-511".into()),
                ("x-ms-page-write".into(), "update".into()),
            ],
            content_length: 512,
        };
        let mut headers = r.headers.clone();
        headers.push(("x-ms-date".into(), "Mon, 07 Dec 2026 18:00:00 GMT".into()));
        assert_eq!(
            string_to_sign("devstoreaccount1", &r, &headers),
            "PUT\n\n\n512\n\n\n\n\n\n\n\n\n\
             x-ms-date:Mon, 07 Dec 2026 18:00:00 GMT\nx-ms-page-write:update\n\
             x-ms-range:bytes=0-511\n\
             /devstoreaccount1/devstoreaccount1/replicas/d.vhd\ncomp:page"
        );
    }

    #[test]
    fn page_ranges_become_a_whole_allocation_map() {
        let xml = "<?xml version=\"1.0\" encoding=\"utf-8\"?><PageList>\
            <PageRange><Start>1024</Start><End>2047</End></PageRange>\
            <ClearRange><Start>2048</Start><End>4095</End></ClearRange>\
            <PageRange><Start>4096</Start><End>8191</End></PageRange></PageList>";
        let ranges = page_ranges(xml).unwrap();
        assert_eq!(ranges, vec![(1024, 1024), (4096, 4096)]);
        assert_eq!(
            allocation(&ranges, 0, 10240),
            vec![
                (0, 1024, false),
                (1024, 1024, true),
                (2048, 2048, false),
                (4096, 4096, true),
                (8192, 2048, false)
            ]
        );
        assert_eq!(
            allocation(&ranges, 1536, 3072),
            vec![(1536, 512, true), (2048, 2048, false), (4096, 512, true)]
        );
        assert_eq!(allocation(&[], 0, 512), vec![(0, 512, false)]);
        assert!(
            page_ranges("<PageList><PageRange><Start>9</Start></PageRange></PageList>").is_err()
        );
    }
}
