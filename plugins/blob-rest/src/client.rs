//! A small blocking client of one container, over `ureq`: block blobs put, read, listed and
//! deleted, metadata, and leases. Every call is one request; errors name the blob, the HTTP
//! status and the service's error code.

use std::time::{Duration, SystemTime};

use crate::{Account, Request, blob_list};

/// Longest a request may take, connecting included.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes of one blob read back.
const MAX_BODY: u64 = 1 << 30;

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The service answered with a status the call does not expect.
    #[error("{what} of blob {blob}: HTTP {status} {code}{hint}: {excerpt}")]
    Status {
        what: &'static str,
        blob: String,
        status: u16,
        /// The service's `x-ms-error-code`.
        code: String,
        hint: &'static str,
        excerpt: String,
    },
    /// No answer (connection, timeout, a body that did not arrive whole).
    #[error("{what} of blob {blob}: {source}")]
    Transport {
        what: &'static str,
        blob: String,
        source: ureq::Error,
    },
    /// An answer that is not what the API documents.
    #[error("{what} of blob {blob}: {message}")]
    Malformed {
        what: &'static str,
        blob: String,
        message: String,
    },
}

impl BlobError {
    /// The HTTP status, when the service answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            BlobError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The service's error code (`LeaseIdMismatchWithLeaseOperation`, …), when it answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            BlobError::Status { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A blob of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub name: String,
    /// Its metadata, names lower-case.
    pub metadata: Vec<(String, String)>,
}

/// A lease held on a blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub blob: String,
    pub id: String,
}

/// One container of one account.
#[derive(Clone)]
pub struct Client {
    account: Account,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

struct Answer {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Client {
    pub fn new(account: Account) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(TIMEOUT))
            .user_agent(concat!("haven/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Client { account, agent }
    }

    pub fn account(&self) -> &Account {
        &self.account
    }

    fn send(
        &self,
        what: &'static str,
        blob: &str,
        r: Request,
        body: &[u8],
        ok: &[u16],
    ) -> Result<Answer, BlobError> {
        let transport = |source| BlobError::Transport {
            what,
            blob: blob.to_string(),
            source,
        };
        let headers = self.account.headers(&r, SystemTime::now());
        let mut request = ureq::http::Request::builder()
            .method(r.method)
            .uri(self.account.url(&r));
        for (n, v) in &headers {
            request = request.header(n.as_str(), v.as_str());
        }
        let request = request
            .body(body)
            .map_err(|e| transport(ureq::Error::Http(e)))?;
        let mut answer = self.agent.run(request).map_err(transport)?;
        let status = answer.status().as_u16();
        let headers = answer
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = match r.method {
            "HEAD" => Vec::new(),
            _ => answer
                .body_mut()
                .with_config()
                .limit(MAX_BODY)
                .read_to_vec()
                .map_err(transport)?,
        };
        let answer = Answer { headers, body };
        if ok.contains(&status) {
            return Ok(answer);
        }
        let hint = match status {
            401 | 403 => " (check the account key or SAS, and the clock)",
            _ => "",
        };
        Err(BlobError::Status {
            what,
            blob: blob.to_string(),
            status,
            code: answer.header("x-ms-error-code").unwrap_or("").to_string(),
            hint,
            excerpt: String::from_utf8_lossy(&answer.body[..answer.body.len().min(300)])
                .into_owned(),
        })
    }

    fn request(&self, method: &'static str, blob: &str, query: &[(&str, &str)]) -> Request {
        Request::new(method, self.account.blob_path(blob), query)
    }

    /// Creates the container; one that exists already is fine.
    pub fn create_container(&self) -> Result<(), BlobError> {
        let r = Request::new(
            "PUT",
            self.account.container_path(),
            &[("restype", "container")],
        );
        self.send("create", "(container)", r, &[], &[201, 409])
            .map(drop)
    }

    /// Puts the block blob `blob` whole. `only_new`: fails (409 `BlobAlreadyExists`) when it
    /// exists. Durable in the account when this returns.
    pub fn put(&self, blob: &str, body: &[u8], only_new: bool) -> Result<(), BlobError> {
        let mut r = self.request("PUT", blob, &[]);
        r.headers
            .push(("x-ms-blob-type".into(), "BlockBlob".into()));
        if only_new {
            r.headers.push(("if-none-match".into(), "*".into()));
        }
        r.content_length = body.len() as u64;
        self.send("put", blob, r, body, &[201]).map(drop)
    }

    /// The blob's bytes, or `None` when there is no such blob.
    pub fn get(&self, blob: &str) -> Result<Option<Vec<u8>>, BlobError> {
        match self.send("read", blob, self.request("GET", blob, &[]), &[], &[200]) {
            Ok(a) => Ok(Some(a.body)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The blob's metadata (names lower-case), or `None` when there is no such blob.
    pub fn metadata(&self, blob: &str) -> Result<Option<Vec<(String, String)>>, BlobError> {
        match self.send(
            "properties",
            blob,
            self.request("HEAD", blob, &[]),
            &[],
            &[200],
        ) {
            Ok(a) => Ok(Some(
                a.headers
                    .iter()
                    .filter_map(|(n, v)| {
                        let n = n.to_ascii_lowercase();
                        n.strip_prefix("x-ms-meta-")
                            .map(|m| (m.to_string(), v.clone()))
                    })
                    .collect(),
            )),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces the blob's metadata; with `lease`, only while that lease is held (412
    /// otherwise).
    pub fn set_metadata(
        &self,
        blob: &str,
        metadata: &[(String, String)],
        lease: Option<&Lease>,
    ) -> Result<(), BlobError> {
        let mut r = self.request("PUT", blob, &[("comp", "metadata")]);
        for (n, v) in metadata {
            r.headers.push((format!("x-ms-meta-{n}"), v.clone()));
        }
        if let Some(l) = lease {
            r.headers.push(("x-ms-lease-id".into(), l.id.clone()));
        }
        self.send("metadata", blob, r, &[], &[200]).map(drop)
    }

    /// Deletes the blob; one that is gone already is fine.
    pub fn delete(&self, blob: &str) -> Result<(), BlobError> {
        self.send(
            "delete",
            blob,
            self.request("DELETE", blob, &[]),
            &[],
            &[202, 404],
        )
        .map(drop)
    }

    /// Every blob whose name starts with `prefix`, in name order, with its metadata (none
    /// when the container does not exist).
    pub fn list(&self, prefix: &str) -> Result<Vec<Blob>, BlobError> {
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let mut query = vec![
                ("restype", "container"),
                ("comp", "list"),
                ("prefix", prefix),
                ("include", "metadata"),
            ];
            if let Some(m) = &marker {
                query.push(("marker", m));
            }
            let r = Request::new("GET", self.account.container_path(), &query);
            let a = match self.send("list", prefix, r, &[], &[200]) {
                Ok(a) => a,
                // No container yet: nothing in it.
                Err(e) if e.code() == Some("ContainerNotFound") => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let xml = String::from_utf8_lossy(&a.body);
            let (blobs, next) = blob_list(&xml).map_err(|message| BlobError::Malformed {
                what: "list",
                blob: prefix.to_string(),
                message,
            })?;
            out.extend(
                blobs
                    .into_iter()
                    .map(|(name, metadata)| Blob { name, metadata }),
            );
            match next {
                Some(m) => marker = Some(m),
                None => return Ok(out),
            }
        }
    }

    /// Acquires a lease of `seconds` (15 to 60) on the blob with the id `id`; `None` when
    /// someone else holds one.
    pub fn acquire_lease(
        &self,
        blob: &str,
        seconds: u32,
        id: &str,
    ) -> Result<Option<Lease>, BlobError> {
        let mut r = self.request("PUT", blob, &[("comp", "lease")]);
        r.headers
            .push(("x-ms-lease-action".into(), "acquire".into()));
        r.headers
            .push(("x-ms-lease-duration".into(), seconds.to_string()));
        r.headers.push(("x-ms-proposed-lease-id".into(), id.into()));
        match self.send("lease", blob, r, &[], &[201]) {
            Ok(a) => Ok(Some(Lease {
                blob: blob.to_string(),
                id: a.header("x-ms-lease-id").unwrap_or(id).to_string(),
            })),
            Err(e) if e.status() == Some(409) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Renews the lease; an error (409, 412) when it was lost.
    pub fn renew_lease(&self, lease: &Lease) -> Result<(), BlobError> {
        self.lease_action(lease, "renew")
    }

    /// Gives the lease up.
    pub fn release_lease(&self, lease: &Lease) -> Result<(), BlobError> {
        self.lease_action(lease, "release")
    }

    fn lease_action(&self, lease: &Lease, action: &str) -> Result<(), BlobError> {
        let mut r = self.request("PUT", &lease.blob, &[("comp", "lease")]);
        r.headers.push(("x-ms-lease-action".into(), action.into()));
        r.headers.push(("x-ms-lease-id".into(), lease.id.clone()));
        self.send("lease", &lease.blob, r, &[], &[200]).map(drop)
    }
}
