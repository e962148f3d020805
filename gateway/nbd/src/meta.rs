//! Metadata contexts and block status: which contexts a client's queries name, the extents of
//! one request gathered from the backend, and the plan of a sparse read. No I/O here (the
//! backend is asked, nothing is sent).
//!
//! # Contexts
//!
//! Every export has `base:allocation` ([`Backend::allocation`]); a backend adds its own
//! ([`Backend::meta_contexts`], [`Backend::context_status`]). Queries:
//!
//! - `NBD_OPT_LIST_META_CONTEXT`: a full name, or a namespace prefix `ns:` (every context of
//!   that namespace); no query at all lists every context.
//! - `NBD_OPT_SET_META_CONTEXT`: full names only. A prefix selects nothing (the protocol says
//!   an empty leaf name SHOULD NOT select, and `base:` MUST NOT); an unknown name is ignored, so
//!   a client asking for a context this server does not have is told so by the reply, which
//!   does not list it, and a BLOCK_STATUS with no context selected is refused with `EINVAL`.
//!
//! # Extents
//!
//! A backend may answer with fewer bytes than asked; the server asks again from where its
//! answer ended, merges adjacent extents of equal flags, cuts the last one at the end of the
//! request, and stops at [`MAX_EXTENTS`] extents (the client asks again from there) or after
//! [`MAX_BACKEND_CALLS`] calls. With `NBD_CMD_FLAG_REQ_ONE` only the first run is answered.

use crate::backend::{Backend, Error, Extent};
use crate::proto;
use crate::reply::Piece;

/// Most extents in one context's BLOCK_STATUS reply (the protocol's own bound is 2^20): a
/// reply of at most 64 KiB with extended headers, and as many backend answers per request.
pub const MAX_EXTENTS: usize = 4096;
/// Most calls to the backend for one context of one request, or one read's plan: a backend
/// answering one small extent at a time cannot keep a request going for long.
pub const MAX_BACKEND_CALLS: usize = MAX_EXTENTS;
/// Most chunks in one READ reply: past that, the rest of the read is sent as data.
pub const MAX_READ_CHUNKS: usize = 128;
/// Most contexts a client may select at once (`NBD_REP_ERR_TOO_BIG` beyond).
pub const MAX_CONTEXTS: usize = 16;

/// A metadata context selected on a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Context {
    /// `base:allocation`.
    Allocation,
    /// One of the backend's own, by name.
    Backend(String),
}

impl Context {
    pub(crate) fn name(&self) -> &str {
        match self {
            Context::Allocation => proto::BASE_ALLOCATION,
            Context::Backend(name) => name,
        }
    }
}

/// The namespace of a query (`base` of `base:allocation`), or why the query is malformed.
fn namespace(query: &str) -> Result<&str, String> {
    match query.split_once(':') {
        Some((ns, _)) if !ns.is_empty() => Ok(ns),
        _ => Err(format!(
            "metadata context query {query:?} is not \"namespace:\" or \"namespace:name\""
        )),
    }
}

/// Whether `name` answers `query` (the full name, or a prefix ending in ':').
fn matches(query: &str, name: &str) -> bool {
    name == query || (query.ends_with(':') && name.starts_with(query))
}

/// The backend's contexts matching `query` ("" for all), minus anything it must not claim.
fn backend_contexts(backend: &dyn Backend, query: &str) -> Vec<String> {
    backend
        .meta_contexts(query)
        .into_iter()
        .filter(|name| query.is_empty() || matches(query, name))
        .filter(|name| namespace(name).is_ok_and(|ns| ns != "base"))
        .filter(|name| name.len() <= proto::MAX_STRING)
        .collect()
}

fn push_unique(out: &mut Vec<String>, name: String) {
    if !out.contains(&name) {
        out.push(name);
    }
}

/// The names answering `NBD_OPT_LIST_META_CONTEXT`, or why a query is malformed.
pub(crate) fn list(backend: &dyn Backend, queries: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    if queries.is_empty() {
        out.push(proto::BASE_ALLOCATION.to_string());
        for name in backend_contexts(backend, "") {
            push_unique(&mut out, name);
        }
        return Ok(out);
    }
    for query in queries {
        if namespace(query)? == "base" {
            if matches(query, proto::BASE_ALLOCATION) {
                push_unique(&mut out, proto::BASE_ALLOCATION.to_string());
            }
            continue;
        }
        for name in backend_contexts(backend, query) {
            push_unique(&mut out, name);
        }
    }
    Ok(out)
}

/// The contexts `NBD_OPT_SET_META_CONTEXT` selects, or why a query is malformed.
pub(crate) fn select(backend: &dyn Backend, queries: &[String]) -> Result<Vec<Context>, String> {
    let mut out = Vec::new();
    for query in queries {
        let ns = namespace(query)?;
        let context = if ns == "base" {
            (query == proto::BASE_ALLOCATION).then_some(Context::Allocation)
        } else if query.ends_with(':') {
            None
        } else {
            backend_contexts(backend, query)
                .contains(query)
                .then(|| Context::Backend(query.clone()))
        };
        if let Some(c) = context
            && !out.contains(&c)
        {
            out.push(c);
        }
    }
    Ok(out)
}

/// Appends an extent, merged into the last one when their flags are equal.
fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    match out.last_mut() {
        Some(last) if last.flags == e.flags => last.len += e.len,
        _ => out.push(e),
    }
}

/// Gathers the extents of `[offset, offset + len)` from `query` (a backend's answer for a
/// range): merged, cut at the end, at most `max` of them. Fails when the backend fails or
/// answers nothing or an empty extent (it would never make progress).
fn gather(
    offset: u64,
    len: u64,
    max: usize,
    mut query: impl FnMut(u64, u64) -> Result<Vec<Extent>, Error>,
) -> Result<Vec<Extent>, Error> {
    let end = offset.saturating_add(len);
    let mut out: Vec<Extent> = Vec::new();
    let mut at = offset;
    for _ in 0..MAX_BACKEND_CALLS {
        if at >= end {
            break;
        }
        let answer = query(at, end - at)?;
        if answer.is_empty() {
            return Err(Error::io(format!(
                "the backend answered no extent for {at}+{}",
                end - at
            )));
        }
        for e in answer {
            if e.len == 0 {
                return Err(Error::io(format!(
                    "the backend answered an empty extent at {at}"
                )));
            }
            let e = Extent {
                len: e.len.min(end - at),
                flags: e.flags,
            };
            let merges = out.last().is_some_and(|l| l.flags == e.flags);
            if !merges && out.len() == max {
                return Ok(out);
            }
            push_merged(&mut out, e);
            at += e.len;
            if at == end {
                break;
            }
        }
    }
    Ok(out)
}

/// The extents of one context for a BLOCK_STATUS of `[offset, offset + len)` (a range the
/// backend accepted, `len` > 0): at least one, none past the request, one with `req_one`.
pub(crate) fn status(
    backend: &dyn Backend,
    context: &Context,
    offset: u64,
    len: u64,
    req_one: bool,
) -> Result<Vec<Extent>, Error> {
    let max = if req_one { 1 } else { MAX_EXTENTS };
    gather(offset, len, max, |at, left| match context {
        Context::Allocation => backend.allocation(at, left),
        Context::Backend(name) => backend.context_status(name, at, left),
    })
}

/// How a READ of `[offset, offset + len)` is answered with chunks: the zero extents of
/// `base:allocation` as holes (not read), the rest as data, in order, at most
/// [`MAX_READ_CHUNKS`] pieces (the rest of the read past that is data). When the backend
/// cannot say, everything is data: a read never fails for want of allocation information.
pub(crate) fn plan_read(backend: &dyn Backend, offset: u64, len: u64) -> Vec<Piece> {
    let all_data = vec![Piece::Data { offset, len }];
    // One piece kept for the data past the last extent gathered.
    let extents = match gather(offset, len, MAX_READ_CHUNKS - 1, |at, left| {
        backend.allocation(at, left)
    }) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(offset, len, error = %e, "allocation unknown; reading it all");
            return all_data;
        }
    };
    let mut pieces: Vec<Piece> = Vec::with_capacity(extents.len() + 1);
    let mut at = offset;
    for e in extents {
        let zero = e.flags & proto::STATE_ZERO != 0;
        match pieces.last_mut() {
            Some(Piece::Zero { len, .. }) if zero => *len += e.len,
            Some(Piece::Data { len, .. }) if !zero => *len += e.len,
            _ if zero => pieces.push(Piece::Zero {
                offset: at,
                len: e.len,
            }),
            _ => pieces.push(Piece::Data {
                offset: at,
                len: e.len,
            }),
        }
        at += e.len;
    }
    let end = offset + len;
    if at < end {
        match pieces.last_mut() {
            Some(Piece::Data { len, .. }) => *len += end - at,
            _ => pieces.push(Piece::Data {
                offset: at,
                len: end - at,
            }),
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const DATA: u32 = 0;
    const HOLE: u32 = proto::STATE_HOLE | proto::STATE_ZERO;

    fn ext(len: u64, flags: u32) -> Extent {
        Extent { len, flags }
    }

    /// A backend with fixed allocation (answered `per_call` extents at a time) and one
    /// context of its own.
    struct Fixed {
        map: Vec<Extent>,
        per_call: usize,
        calls: AtomicUsize,
    }

    impl Fixed {
        fn new(map: Vec<Extent>, per_call: usize) -> Fixed {
            Fixed {
                map,
                per_call,
                calls: AtomicUsize::new(0),
            }
        }

        fn answer(&self, offset: u64, len: u64) -> Vec<Extent> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let mut out = Vec::new();
            let mut start = 0;
            for e in &self.map {
                let end = start + e.len;
                if end > offset && start < offset + len && out.len() < self.per_call {
                    let from = start.max(offset);
                    out.push(ext(end.min(offset + len) - from, e.flags));
                }
                start = end;
            }
            out
        }
    }

    impl Backend for Fixed {
        fn size(&self) -> u64 {
            self.map.iter().map(|e| e.len).sum()
        }
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), Error> {
            unreachable!()
        }
        fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), Error> {
            unreachable!()
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool, _: bool) -> Result<(), Error> {
            unreachable!()
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), Error> {
            unreachable!()
        }
        fn flush(&self) -> Result<(), Error> {
            unreachable!()
        }
        fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
            Ok(self.answer(offset, len))
        }
        fn meta_contexts(&self, query: &str) -> Vec<String> {
            ["test:written", "test:other", "base:allocation", "nocolon"]
                .iter()
                .map(|s| s.to_string())
                .filter(|s| query.is_empty() || s == query || s.starts_with(query))
                .collect()
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn list_and_select_answer_names_and_prefixes() {
        let b = Fixed::new(vec![ext(4096, DATA)], 1);
        assert_eq!(
            list(&b, &[]).unwrap(),
            ["base:allocation", "test:written", "test:other"],
            "a backend cannot add base: contexts nor malformed names"
        );
        assert_eq!(
            list(&b, &strings(&["base:", "test:written", "x-none:"])).unwrap(),
            ["base:allocation", "test:written"]
        );
        assert_eq!(
            list(&b, &strings(&["test:"])).unwrap(),
            ["test:written", "test:other"]
        );
        assert!(list(&b, &strings(&["nocolon"])).is_err());
        assert!(list(&b, &strings(&[":leaf"])).is_err());

        let picked = select(
            &b,
            &strings(&[
                "base:",
                "test:",
                "test:written",
                "base:allocation",
                "test:nope",
                "base:x",
            ]),
        )
        .unwrap();
        assert_eq!(
            picked,
            [Context::Backend("test:written".into()), Context::Allocation],
            "prefixes and unknown names select nothing"
        );
        assert_eq!(
            select(&b, &strings(&["test:written", "test:written"]))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn extents_are_gathered_merged_cut_and_bounded() {
        // Answered one extent per call: the server asks again, merging equal neighbours.
        let map = vec![
            ext(4096, DATA),
            ext(4096, DATA),
            ext(8192, HOLE),
            ext(4096, DATA),
        ];
        let b = Fixed::new(map, 1);
        let got = status(&b, &Context::Allocation, 0, 20480, false).unwrap();
        assert_eq!(got, [ext(8192, DATA), ext(8192, HOLE), ext(4096, DATA)]);
        // Never past the request, starting mid-extent.
        let got = status(&b, &Context::Allocation, 2048, 8192, false).unwrap();
        assert_eq!(got, [ext(6144, DATA), ext(2048, HOLE)]);
        // REQ_ONE: the first run only, within the request.
        let got = status(&b, &Context::Allocation, 0, 20480, true).unwrap();
        assert_eq!(got, [ext(8192, DATA)]);
        let got = status(&b, &Context::Allocation, 0, 1024, true).unwrap();
        assert_eq!(got, [ext(1024, DATA)]);

        // Alternating extents: at most MAX_EXTENTS, each answered by one call.
        let map: Vec<Extent> = (0..MAX_EXTENTS as u64 + 10)
            .map(|i| ext(512, if i % 2 == 0 { DATA } else { HOLE }))
            .collect();
        let total = map.len() as u64 * 512;
        let b = Fixed::new(map, usize::MAX);
        let got = status(&b, &Context::Allocation, 0, total, false).unwrap();
        assert_eq!(got.len(), MAX_EXTENTS);
        assert_eq!(b.calls.load(Ordering::Relaxed), 1);
        // One byte at a time, all equal: bounded by the calls, not by the bytes.
        let b = Fixed::new(vec![ext(u64::MAX / 2, DATA)], 1);
        let tiny = |at: u64, _: u64| b.allocation(at, 1);
        let got = gather(0, u64::MAX / 2, MAX_EXTENTS, tiny).unwrap();
        assert_eq!(got, [ext(MAX_BACKEND_CALLS as u64, DATA)]);
    }

    #[test]
    fn a_backend_answering_nothing_fails_the_request() {
        let none = |_: u64, _: u64| Ok(Vec::new());
        assert_eq!(gather(0, 4096, 8, none).unwrap_err().errno(), proto::EIO);
        let empty = |_: u64, _: u64| Ok(vec![ext(0, DATA)]);
        assert_eq!(gather(0, 4096, 8, empty).unwrap_err().errno(), proto::EIO);
        let b = Fixed::new(vec![ext(4096, DATA)], 1);
        let named = Context::Backend("test:written".into());
        assert_eq!(
            status(&b, &named, 0, 4096, false).unwrap_err().errno(),
            proto::ENOTSUP
        );
    }

    #[test]
    fn a_read_plan_skips_the_zero_extents_only() {
        let map = vec![
            ext(4096, DATA),
            ext(4096, proto::STATE_HOLE),
            ext(8192, HOLE),
            ext(4096, proto::STATE_ZERO),
            ext(4096, DATA),
        ];
        let b = Fixed::new(map, 2);
        let plan = plan_read(&b, 1024, 24576 - 2048);
        assert_eq!(
            plan,
            [
                // An unallocated extent that does not read as zeroes is read.
                Piece::Data {
                    offset: 1024,
                    len: 3072 + 4096
                },
                Piece::Zero {
                    offset: 8192,
                    len: 8192 + 4096
                },
                Piece::Data {
                    offset: 20480,
                    len: 4096 - 1024
                },
            ]
        );
        assert_eq!(plan.iter().map(|p| p.len()).sum::<u64>(), 24576 - 2048);

        // Past MAX_READ_CHUNKS the rest is data.
        let map: Vec<Extent> = (0..MAX_READ_CHUNKS as u64 * 2)
            .map(|i| ext(512, if i % 2 == 0 { DATA } else { HOLE }))
            .collect();
        let total = map.len() as u64 * 512;
        let plan = plan_read(&Fixed::new(map, usize::MAX), 0, total);
        assert!(
            (MAX_READ_CHUNKS - 1..=MAX_READ_CHUNKS).contains(&plan.len()),
            "{}",
            plan.len()
        );
        assert_eq!(plan.iter().map(|p| p.len()).sum::<u64>(), total);
        assert!(matches!(plan.last(), Some(Piece::Data { .. })));
    }
}
