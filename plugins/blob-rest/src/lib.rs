//! Azure Blob storage's REST API as Haven speaks it: a storage account's endpoint and
//! container, the canonical request and its Shared Key signature, or a SAS token; and, with
//! the `client` feature, a small blocking client over `ureq` for the native parts (the agent's
//! cache-account shipping, the gateways that drain it).
//!
//! This crate builds for `wasm32-wasip2` too (without `client`): the page-blob writer plugin
//! signs its requests with it and sends them through the host's HTTP.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
pub use client::{Blob, BlobError, Client, Lease};

/// The REST API version spoken.
pub const API_VERSION: &str = "2021-12-02";
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

impl Request {
    /// A request without headers or body: `method` on the encoded `path`, with `query`.
    pub fn new(method: &'static str, path: String, query: &[(&str, &str)]) -> Request {
        Request {
            method,
            path,
            query: query
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            headers: Vec::new(),
            content_length: 0,
        }
    }
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

    /// Reads an account from a container's URL (`https://ACCOUNT.blob.core.windows.net/C`,
    /// or an emulator's `http://HOST:PORT/ACCOUNT/C`), with a SAS token as its query or the
    /// account key (base64) given apart.
    pub fn from_container_url(url: &str, key: Option<&str>) -> Result<Account, String> {
        let (base, sas) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let (endpoint, container) = base
            .trim_end_matches('/')
            .rsplit_once('/')
            .filter(|(e, _)| e.contains("://") && !e.ends_with('/'))
            .ok_or_else(|| {
                format!(
                    "{url:?} is not a container URL (give https://ACCOUNT.blob.core.windows.net/CONTAINER)"
                )
            })?;
        Account::from_settings(|name| match name {
            "endpoint" => Some(endpoint.to_string()),
            "container" => Some(container.to_string()),
            "key" => key.map(str::to_string),
            "sas" => sas.map(str::to_string),
            _ => None,
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

/// A blob's name and metadata (names lower-case), as a listing gives them.
pub type Listed = (String, Vec<(String, String)>);

/// The names (and metadata) of a List Blobs answer, and its `NextMarker` when more follow.
pub fn blob_list(xml: &str) -> Result<(Vec<Listed>, Option<String>), String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("blob list: {e}"))?;
    let mut out = Vec::new();
    for b in doc.descendants().filter(|n| n.has_tag_name("Blob")) {
        let name = b
            .children()
            .find(|c| c.has_tag_name("Name"))
            .and_then(|c| c.text())
            .ok_or("blob list: a <Blob> without a <Name>")?;
        let metadata = b
            .children()
            .find(|c| c.has_tag_name("Metadata"))
            .map(|m| {
                m.children()
                    .filter(|c| c.is_element())
                    .map(|c| {
                        (
                            c.tag_name().name().to_ascii_lowercase(),
                            c.text().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push((name.to_string(), metadata));
    }
    let next = doc
        .descendants()
        .find(|n| n.has_tag_name("NextMarker"))
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    Ok((out, next))
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
    fn a_blob_list_gives_names_metadata_and_the_next_marker() {
        let xml = "<?xml version=\"1.0\"?><EnumerationResults><Blobs>\
            <Blob><Name>a/lease</Name><Metadata><Released_1>7</Released_1></Metadata></Blob>\
            <Blob><Name>a/1/seg/x</Name></Blob></Blobs><NextMarker>m2</NextMarker></EnumerationResults>";
        let (blobs, next) = blob_list(xml).unwrap();
        assert_eq!(
            blobs[0],
            (
                "a/lease".to_string(),
                vec![("released_1".to_string(), "7".to_string())]
            )
        );
        assert_eq!(blobs[1], ("a/1/seg/x".to_string(), vec![]));
        assert_eq!(next.as_deref(), Some("m2"));
        let (_, next) =
            blob_list("<EnumerationResults><Blobs/><NextMarker/></EnumerationResults>").unwrap();
        assert_eq!(next, None);
    }
}
