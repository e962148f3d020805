//! Blocking outgoing HTTP for adapters and cloud writers, over `wasi:http/outgoing-handler`.
//!
//! [`request`] sends one request and returns the whole response. Requests go only to the hosts
//! the instance was granted; the host refuses any other, and [`request`] reports that as
//! `denied` (the host's error for the call names the grant). Transport failures (connection
//! refused, timeouts, a reset) are `io`: retrying may help. An HTTP error status is *not* an
//! error here: the caller reads [`Response::status`] and the body (a SOAP fault, a JSON error)
//! and decides; [`Response::excerpt`] gives a short, printable piece of the body for messages.
//!
//! The request body is written through the outgoing-body stream in pieces of at most 4096
//! bytes (`blocking-write-and-flush` accepts no more), after the request was handed to the
//! host, so a large body never waits on a buffer nobody drains. The response body is read to
//! its end, at most [`MAX_RESPONSE_BYTES`]: a larger answer fails with `limit`.

#[cfg(feature = "adapter")]
use crate::adapter::{WitError, bindings};
#[cfg(feature = "cloud-writer")]
use crate::cloud_writer::{WitError, bindings};
use bindings::wasi::http::{outgoing_handler, types};
use bindings::wasi::io::streams::StreamError;

/// The largest response body [`request`] reads.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Most bytes one `blocking-write-and-flush` accepts.
const WRITE_CHUNK: usize = 4096;

/// How long connecting, waiting for the first byte of the answer, and waiting between two of
/// its bytes may each take. A call into a plugin has its own deadline (30 s by default), so
/// these only keep a dead peer from using all of it.
const CONNECT_TIMEOUT_NS: u64 = 10_000_000_000;
const BYTE_TIMEOUT_NS: u64 = 60_000_000_000;

/// An HTTP response, read to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names (lower-case, as the host gives them) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The whole body.
    pub body: Vec<u8>,
}

impl Response {
    /// The values of header `name` (case-insensitive), in order.
    pub fn header<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first `max` characters of the body as text, control characters replaced, for an
    /// error message.
    pub fn excerpt(&self, max: usize) -> String {
        excerpt(&self.body, max)
    }
}

/// The first `max` characters of `body` as text on one line, with `…` when cut.
pub fn excerpt(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

/// Sends `method url` with `headers` and `body` and returns the response.
///
/// `url` is `http://host[:port]/path?query` or `https://…`. Fails with `invalid-argument` on a
/// URL or header the host cannot send, `denied` when the host is not granted, `io` when the
/// connection fails or times out, `limit` when the answer exceeds [`MAX_RESPONSE_BYTES`].
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, WitError> {
    let (scheme, authority, path) = split_url(url)?;
    let what = format!("HTTP {method} {scheme}://{authority}{path}");

    let mut entries: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    // Said outright, also for an empty body of a method other than GET, HEAD and OPTIONS:
    // without it the body may go chunked, which some servers refuse.
    let carries_body = !body.is_empty() || !matches!(method, "GET" | "HEAD" | "OPTIONS");
    if carries_body
        && !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        entries.push(("content-length".into(), body.len().to_string().into_bytes()));
    }
    let fields = types::Fields::from_list(&entries)
        .map_err(|e| WitError::InvalidArgument(format!("{what}: bad header: {e:?}")))?;
    let request = types::OutgoingRequest::new(fields);
    let method = match method {
        "GET" => types::Method::Get,
        "HEAD" => types::Method::Head,
        "POST" => types::Method::Post,
        "PUT" => types::Method::Put,
        "DELETE" => types::Method::Delete,
        "PATCH" => types::Method::Patch,
        "OPTIONS" => types::Method::Options,
        other => types::Method::Other(other.to_string()),
    };
    let scheme_value = match scheme {
        "https" => types::Scheme::Https,
        _ => types::Scheme::Http,
    };
    let invalid =
        |part: &str| WitError::InvalidArgument(format!("{what}: the host refuses its {part}"));
    request
        .set_method(&method)
        .map_err(|()| invalid("method"))?;
    request
        .set_scheme(Some(&scheme_value))
        .map_err(|()| invalid("scheme"))?;
    request
        .set_authority(Some(authority))
        .map_err(|()| invalid("authority"))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| invalid("path"))?;

    let options = types::RequestOptions::new();
    // A host that does not support a timeout keeps its own: nothing to do about it here.
    let _ = options.set_connect_timeout(Some(CONNECT_TIMEOUT_NS));
    let _ = options.set_first_byte_timeout(Some(BYTE_TIMEOUT_NS));
    let _ = options.set_between_bytes_timeout(Some(BYTE_TIMEOUT_NS));

    let outgoing = request
        .body()
        .map_err(|()| WitError::Io(format!("{what}: request body taken twice")))?;
    let pending =
        outgoing_handler::handle(request, Some(options)).map_err(|e| transport_error(&what, &e))?;
    // A host that refuses the request (not granted, unreachable) closes the body stream; the
    // reason is in the response, so a failed write is reported only when the response has none.
    let written = write_body(&outgoing, body, &what);
    let finished = types::OutgoingBody::finish(outgoing, None);

    pending.subscribe().block();
    let response = pending
        .get()
        .ok_or_else(|| WitError::Io(format!("{what}: no response after waiting for it")))?
        .map_err(|()| WitError::Io(format!("{what}: response taken twice")))?
        .map_err(|e| transport_error(&what, &e))?;
    written?;
    finished.map_err(|e| transport_error(&what, &e))?;

    let status = response.status();
    let headers = response
        .headers()
        .entries()
        .into_iter()
        .map(|(n, v)| (n, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    let incoming = response
        .consume()
        .map_err(|()| WitError::Io(format!("{what}: response body taken twice")))?;
    let mut body = Vec::new();
    {
        let stream = incoming
            .stream()
            .map_err(|()| WitError::Io(format!("{what}: response body stream taken twice")))?;
        loop {
            match stream.blocking_read(65_536) {
                Ok(bytes) => {
                    if body.len() + bytes.len() > MAX_RESPONSE_BYTES {
                        return Err(WitError::Limit(format!(
                            "{what}: the response is larger than {} MiB",
                            MAX_RESPONSE_BYTES >> 20
                        )));
                    }
                    body.extend_from_slice(&bytes);
                }
                Err(StreamError::Closed) => break,
                Err(e) => return Err(stream_error(&what, "reading the response body", e)),
            }
        }
    }
    drop(types::IncomingBody::finish(incoming));
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Writes `body` to the request's body stream, at most [`WRITE_CHUNK`] bytes at a time.
fn write_body(outgoing: &types::OutgoingBody, body: &[u8], what: &str) -> Result<(), WitError> {
    let stream = outgoing
        .write()
        .map_err(|()| WitError::Io(format!("{what}: request body stream taken twice")))?;
    for chunk in body.chunks(WRITE_CHUNK) {
        stream
            .blocking_write_and_flush(chunk)
            .map_err(|e| stream_error(what, "writing the request body", e))?;
    }
    Ok(())
}

/// `(scheme, authority, path-with-query)` of an `http://` or `https://` URL.
fn split_url(url: &str) -> Result<(&str, &str, &str), WitError> {
    let bad = |why: &str| WitError::InvalidArgument(format!("URL `{url}`: {why}"));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected http://host[:port]/path"))?;
    if scheme != "http" && scheme != "https" {
        return Err(bad("only http and https are supported"));
    }
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    if authority.contains('@') {
        return Err(bad("credentials do not belong in the URL"));
    }
    Ok((scheme, authority, path))
}

fn transport_error(what: &str, e: &types::ErrorCode) -> WitError {
    match e {
        types::ErrorCode::HttpRequestDenied => WitError::Denied(format!(
            "{what}: refused by the host: the host is not in this plugin's grant `http_hosts`"
        )),
        other => WitError::Io(format!("{what}: {other:?}")),
    }
}

fn stream_error(what: &str, doing: &str, e: StreamError) -> WitError {
    match e {
        StreamError::Closed => WitError::Io(format!("{what}: connection closed while {doing}")),
        StreamError::LastOperationFailed(err) => {
            let detail = types::http_error_code(&err)
                .map(|c| format!("{c:?}"))
                .unwrap_or_else(|| err.to_debug_string());
            WitError::Io(format!("{what}: {doing} failed: {detail}"))
        }
    }
}
