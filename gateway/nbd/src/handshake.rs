//! Option haggling: each option the client sends before transmission, answered without I/O.
//!
//! [`Negotiation::option`] takes one option and its data and returns the bytes to send and
//! what comes next; the server's driver reads the options from the socket, writes the replies
//! and, on [`Next::StartTls`], runs the TLS handshake and goes on with
//! [`Negotiation::secured`]. What the client negotiated — the framing of replies, the metadata
//! contexts — ends in the [`Session`] that transmission runs with.
//!
//! # TLS
//!
//! A server with TLS configured requires it (the protocol's FORCEDTLS mode): before TLS, every
//! option but `STARTTLS` and `ABORT` is answered `NBD_REP_ERR_TLS_REQD` with a message, and
//! `EXPORT_NAME` (which cannot be answered with an error) ends the connection. `STARTTLS`
//! forgets everything negotiated before it. A server without TLS answers `STARTTLS` with
//! `NBD_REP_ERR_POLICY`.
//!
//! # Connection limit
//!
//! At most [`Slots`]' count of connections of an export are in transmission at once. `GO`
//! over the limit is answered `NBD_REP_ERR_POLICY` with a message saying so (the client may
//! try again later); `EXPORT_NAME` over the limit ends the connection, having no error reply.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backend::Backend;
use crate::meta::{self, Context};
use crate::proto;
use crate::reply::Framing;

/// Most queries in one meta-context option (`NBD_REP_ERR_TOO_BIG` beyond): each may ask the
/// backend.
pub const MAX_QUERIES: usize = 64;

/// What the handshake serves: the one export of a server.
#[derive(Clone, Copy)]
pub(crate) struct Export<'a> {
    pub backend: &'a dyn Backend,
    pub name: &'a str,
    /// TLS is configured, hence required.
    pub tls: bool,
    pub slots: &'a Slots,
}

/// The count of an export's connections in transmission, bounded.
#[derive(Debug)]
pub(crate) struct Slots {
    max: usize,
    used: AtomicUsize,
}

/// A connection's place among [`Slots`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot<'a>(&'a Slots);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Slots {
    pub(crate) fn new(max: usize) -> Slots {
        Slots {
            max,
            used: AtomicUsize::new(0),
        }
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// A slot, unless all are taken.
    pub(crate) fn take(&self) -> Option<Slot<'_>> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self))
    }
}

/// What transmission runs with: what the client negotiated, and its slot.
#[derive(Debug)]
pub(crate) struct Session<'a> {
    pub framing: Framing,
    /// The selected metadata contexts; a context's id is its index.
    pub contexts: Vec<Context>,
    _slot: Slot<'a>,
}

/// What comes after an option.
#[derive(Debug)]
pub(crate) enum Next<'a> {
    /// Read the next option.
    Option,
    /// Enter transmission.
    Transmission(Session<'a>),
    /// Run the TLS handshake (the ACK is in the reply), then go on with
    /// [`Negotiation::secured`].
    StartTls,
    /// End the connection (after sending the reply).
    Close,
}

/// The answer to one option.
#[derive(Debug)]
pub(crate) struct Step<'a> {
    /// Bytes to send, possibly none.
    pub reply: Vec<u8>,
    pub next: Next<'a>,
}

impl<'a> Step<'a> {
    fn reply(option: u32, reply: u32, data: &[u8], next: Next<'a>) -> Step<'a> {
        Step {
            reply: proto::option_reply(option, reply, data),
            next,
        }
    }

    fn ack(option: u32) -> Step<'a> {
        Step::reply(option, proto::REP_ACK, &[], Next::Option)
    }

    /// An error reply with a message for the user; negotiation goes on.
    fn error(option: u32, reply: u32, message: &str) -> Step<'a> {
        tracing::debug!(option, reply, "option refused: {message}");
        Step::reply(option, reply, message.as_bytes(), Next::Option)
    }

    fn close(why: &str) -> Step<'a> {
        tracing::warn!("{why}; closing");
        Step {
            reply: Vec::new(),
            next: Next::Close,
        }
    }
}

/// One connection's option haggling.
pub(crate) struct Negotiation<'a> {
    export: Export<'a>,
    /// The client sent `NBD_FLAG_C_NO_ZEROES`.
    no_zeroes: bool,
    /// TLS is in place.
    secure: bool,
    framing: Framing,
    contexts: Vec<Context>,
}

impl<'a> Negotiation<'a> {
    pub(crate) fn new(export: Export<'a>, no_zeroes: bool) -> Negotiation<'a> {
        Negotiation {
            export,
            no_zeroes,
            secure: false,
            framing: Framing::Simple,
            contexts: Vec::new(),
        }
    }

    /// TLS is in place: everything negotiated before is forgotten, as the protocol requires.
    pub(crate) fn secured(&mut self) {
        self.secure = true;
        self.framing = Framing::Simple;
        self.contexts.clear();
    }

    /// Answers one option.
    pub(crate) fn option(&mut self, option: u32, data: &[u8]) -> Step<'a> {
        if self.export.tls && !self.secure {
            return self.before_tls(option, data);
        }
        match option {
            proto::OPT_EXPORT_NAME => self.export_name(data),
            proto::OPT_ABORT => Step::reply(option, proto::REP_ACK, &[], Next::Close),
            proto::OPT_LIST => self.list(data),
            proto::OPT_STARTTLS if self.secure => {
                Step::error(option, proto::REP_ERR_INVALID, "TLS is already in use")
            }
            proto::OPT_STARTTLS => Step::error(
                option,
                proto::REP_ERR_POLICY,
                "this NBD server is not configured for TLS; connect without it",
            ),
            proto::OPT_INFO | proto::OPT_GO => self.info(option, data),
            proto::OPT_STRUCTURED_REPLY => self.structured_reply(data),
            proto::OPT_EXTENDED_HEADERS => self.extended_headers(data),
            proto::OPT_LIST_META_CONTEXT => self.list_meta_context(data),
            proto::OPT_SET_META_CONTEXT => self.set_meta_context(data),
            other => Step::error(
                other,
                proto::REP_ERR_UNSUP,
                &format!("option {other} is not supported by this server"),
            ),
        }
    }

    /// FORCEDTLS before TLS: only STARTTLS and ABORT are served.
    fn before_tls(&mut self, option: u32, data: &[u8]) -> Step<'a> {
        match option {
            proto::OPT_STARTTLS if !data.is_empty() => Step::error(
                option,
                proto::REP_ERR_INVALID,
                "NBD_OPT_STARTTLS takes no data",
            ),
            proto::OPT_STARTTLS => Step::reply(option, proto::REP_ACK, &[], Next::StartTls),
            proto::OPT_ABORT => Step::reply(option, proto::REP_ACK, &[], Next::Close),
            proto::OPT_EXPORT_NAME => {
                Step::close("NBD_OPT_EXPORT_NAME without TLS on a server that requires TLS")
            }
            other => Step::error(
                other,
                proto::REP_ERR_TLS_REQD,
                &format!(
                    "export {:?} requires TLS: connect with TLS (NBD_OPT_STARTTLS) and a \
                     client certificate",
                    self.export.name
                ),
            ),
        }
    }

    fn is_export(&self, name: &str) -> bool {
        name.is_empty() || name == self.export.name
    }

    fn unknown_export(&self, option: u32, name: &str) -> Step<'a> {
        let msg = format!(
            "no export named {name:?} (this server exports {:?})",
            self.export.name
        );
        Step::error(option, proto::REP_ERR_UNKNOWN, &msg)
    }

    fn flags(&self) -> u16 {
        proto::transmission_flags(
            self.export.backend.read_only(),
            self.export.backend.multi_conn(),
            self.framing.chunks(),
        )
    }

    fn session(&mut self, slot: Slot<'a>) -> Session<'a> {
        Session {
            framing: self.framing,
            contexts: std::mem::take(&mut self.contexts),
            _slot: slot,
        }
    }

    fn export_name(&mut self, data: &[u8]) -> Step<'a> {
        let name = String::from_utf8_lossy(data);
        if self.framing == Framing::Extended {
            return Step::close("NBD_OPT_EXPORT_NAME after extended headers were negotiated");
        }
        if !self.is_export(&name) {
            return Step::close(&format!("unknown export {name:?} asked with EXPORT_NAME"));
        }
        let Some(slot) = self.export.slots.take() else {
            return Step::close(&format!(
                "export {:?} already has {} connections (EXPORT_NAME cannot be refused)",
                self.export.name,
                self.export.slots.max()
            ));
        };
        let size = self.export.backend.size();
        let framing = self.framing;
        tracing::info!(export = %self.export.name, size, ?framing, "transmission (EXPORT_NAME)");
        Step {
            reply: proto::export_name_reply(size, self.flags(), self.no_zeroes),
            next: Next::Transmission(self.session(slot)),
        }
    }

    fn list(&self, data: &[u8]) -> Step<'a> {
        if !data.is_empty() {
            return Step::error(
                proto::OPT_LIST,
                proto::REP_ERR_INVALID,
                "NBD_OPT_LIST takes no data",
            );
        }
        let mut reply = proto::option_reply(
            proto::OPT_LIST,
            proto::REP_SERVER,
            &proto::rep_server(self.export.name),
        );
        reply.extend(proto::option_reply(proto::OPT_LIST, proto::REP_ACK, &[]));
        Step {
            reply,
            next: Next::Option,
        }
    }

    fn info(&mut self, option: u32, data: &[u8]) -> Step<'a> {
        let req = match proto::parse_info_request(data) {
            Ok(req) => req,
            Err(why) => return Step::error(option, proto::REP_ERR_INVALID, &why),
        };
        if !self.is_export(&req.name) {
            return self.unknown_export(option, &req.name);
        }
        let slot = if option == proto::OPT_GO {
            match self.export.slots.take() {
                Some(slot) => Some(slot),
                None => {
                    let msg = format!(
                        "export {:?} already has {} connections, the most it allows; try again \
                         when one has ended",
                        self.export.name,
                        self.export.slots.max()
                    );
                    tracing::warn!("{msg}");
                    return Step::error(option, proto::REP_ERR_POLICY, &msg);
                }
            }
        } else {
            None
        };
        let size = self.export.backend.size();
        let mut reply = proto::option_reply(
            option,
            proto::REP_INFO,
            &proto::info_export(size, self.flags()),
        );
        reply.extend(proto::option_reply(
            option,
            proto::REP_INFO,
            &proto::info_block_size(),
        ));
        if req.requests.contains(&proto::INFO_NAME) {
            reply.extend(proto::option_reply(
                option,
                proto::REP_INFO,
                &proto::info_name(self.export.name),
            ));
        }
        reply.extend(proto::option_reply(option, proto::REP_ACK, &[]));
        let next = match slot {
            Some(slot) => {
                let (framing, contexts) = (self.framing, self.contexts.len());
                let export = self.export.name;
                tracing::info!(export, size, ?framing, contexts, "transmission (GO)");
                Next::Transmission(self.session(slot))
            }
            None => Next::Option,
        };
        Step { reply, next }
    }

    fn structured_reply(&mut self, data: &[u8]) -> Step<'a> {
        let option = proto::OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            return Step::error(
                option,
                proto::REP_ERR_INVALID,
                "NBD_OPT_STRUCTURED_REPLY takes no data",
            );
        }
        if self.framing == Framing::Extended {
            return Step::error(
                option,
                proto::REP_ERR_EXT_HEADER_REQD,
                "extended headers are already negotiated and take precedence",
            );
        }
        self.framing = Framing::Structured;
        Step::ack(option)
    }

    fn extended_headers(&mut self, data: &[u8]) -> Step<'a> {
        let option = proto::OPT_EXTENDED_HEADERS;
        if !data.is_empty() {
            return Step::error(
                option,
                proto::REP_ERR_INVALID,
                "NBD_OPT_EXTENDED_HEADERS takes no data",
            );
        }
        self.framing = Framing::Extended;
        Step::ack(option)
    }

    /// Parses a meta-context option's data, refusing what is malformed, too big or for
    /// another export.
    fn meta_request(&self, option: u32, data: &[u8]) -> Result<proto::MetaRequest, Step<'a>> {
        let req = proto::parse_meta_request(data)
            .map_err(|why| Step::error(option, proto::REP_ERR_INVALID, &why))?;
        if req.queries.len() > MAX_QUERIES {
            let msg = format!(
                "{} queries; at most {MAX_QUERIES} are served",
                req.queries.len()
            );
            return Err(Step::error(option, proto::REP_ERR_TOO_BIG, &msg));
        }
        if !self.is_export(&req.name) {
            return Err(self.unknown_export(option, &req.name));
        }
        Ok(req)
    }

    fn list_meta_context(&self, data: &[u8]) -> Step<'a> {
        let option = proto::OPT_LIST_META_CONTEXT;
        let req = match self.meta_request(option, data) {
            Ok(req) => req,
            Err(step) => return step,
        };
        let names = match meta::list(self.export.backend, &req.queries) {
            Ok(names) => names,
            Err(why) => return Step::error(option, proto::REP_ERR_INVALID, &why),
        };
        let mut reply = Vec::new();
        for name in names {
            // The id of a listed context is reserved: zero.
            reply.extend(proto::option_reply(
                option,
                proto::REP_META_CONTEXT,
                &proto::rep_meta_context(0, &name),
            ));
        }
        reply.extend(proto::option_reply(option, proto::REP_ACK, &[]));
        Step {
            reply,
            next: Next::Option,
        }
    }

    fn set_meta_context(&mut self, data: &[u8]) -> Step<'a> {
        let option = proto::OPT_SET_META_CONTEXT;
        // Replaces the selection even when it fails.
        self.contexts.clear();
        if !self.framing.chunks() {
            return Step::error(
                option,
                proto::REP_ERR_INVALID,
                "NBD_OPT_SET_META_CONTEXT needs structured replies or extended headers first",
            );
        }
        let req = match self.meta_request(option, data) {
            Ok(req) => req,
            Err(step) => return step,
        };
        let contexts = match meta::select(self.export.backend, &req.queries) {
            Ok(c) => c,
            Err(why) => return Step::error(option, proto::REP_ERR_INVALID, &why),
        };
        if contexts.len() > meta::MAX_CONTEXTS {
            let msg = format!(
                "{} metadata contexts selected; at most {} are served",
                contexts.len(),
                meta::MAX_CONTEXTS
            );
            return Step::error(option, proto::REP_ERR_TOO_BIG, &msg);
        }
        let mut reply = Vec::new();
        for (id, c) in contexts.iter().enumerate() {
            reply.extend(proto::option_reply(
                option,
                proto::REP_META_CONTEXT,
                &proto::rep_meta_context(id as u32, c.name()),
            ));
        }
        reply.extend(proto::option_reply(option, proto::REP_ACK, &[]));
        self.contexts = contexts;
        Step {
            reply,
            next: Next::Option,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Error, Extent};

    struct Disk {
        read_only: bool,
    }

    impl Backend for Disk {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            self.read_only
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
        fn meta_contexts(&self, query: &str) -> Vec<String> {
            let all = ["test:written".to_string()];
            all.into_iter()
                .filter(|n| query.is_empty() || n.starts_with(query))
                .collect()
        }
        fn context_status(&self, _: &str, _: u64, len: u64) -> Result<Vec<Extent>, Error> {
            Ok(vec![Extent { len, flags: 1 }])
        }
        fn multi_conn(&self) -> bool {
            true
        }
    }

    /// The replies in `b`: (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(b[0..8], proto::REPLY_MAGIC.to_be_bytes());
            let option = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let typ = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            out.push((option, typ, b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        out
    }

    fn info_data(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    fn export<'a>(backend: &'a Disk, tls: bool, slots: &'a Slots) -> Export<'a> {
        Export {
            backend,
            name: "vdb",
            tls,
            slots,
        }
    }

    /// The transmission flags a GO or INFO answered.
    fn go_flags(step: &Step<'_>) -> u16 {
        let info = replies(&step.reply)
            .into_iter()
            .find(|r| r.1 == proto::REP_INFO && r.2[0..2] == proto::INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        u16::from_be_bytes([info.2[10], info.2[11]])
    }

    #[test]
    fn structured_replies_and_contexts_reach_the_session() {
        let disk = Disk { read_only: false };
        let slots = Slots::new(4);
        let mut n = Negotiation::new(export(&disk, false, &slots), true);
        // SET before structured replies: refused.
        let s = n.option(
            proto::OPT_SET_META_CONTEXT,
            &meta_data("vdb", &["base:allocation"]),
        );
        assert_eq!(replies(&s.reply)[0].1, proto::REP_ERR_INVALID);
        let s = n.option(proto::OPT_INFO, &info_data("vdb"));
        let plain = go_flags(&s);
        assert_eq!(
            plain & proto::TFLAG_SEND_DF,
            0,
            "no DF without structured replies"
        );
        assert_ne!(plain & proto::TFLAG_CAN_MULTI_CONN, 0);
        assert_ne!(plain & proto::TFLAG_SEND_FAST_ZERO, 0);

        assert_eq!(
            replies(&n.option(proto::OPT_STRUCTURED_REPLY, &[]).reply)[0].1,
            proto::REP_ACK
        );
        let s = n.option(
            proto::OPT_SET_META_CONTEXT,
            &meta_data("", &["base:allocation", "test:written", "x-unknown:thing"]),
        );
        let r = replies(&s.reply);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].2, proto::rep_meta_context(0, "base:allocation"));
        assert_eq!(r[1].2, proto::rep_meta_context(1, "test:written"));
        assert_eq!(r[2].1, proto::REP_ACK);

        let s = n.option(proto::OPT_GO, &info_data("vdb"));
        assert_ne!(go_flags(&s) & proto::TFLAG_SEND_DF, 0);
        let Next::Transmission(session) = s.next else {
            panic!("GO enters transmission")
        };
        assert_eq!(session.framing, Framing::Structured);
        assert_eq!(
            session.contexts,
            [Context::Allocation, Context::Backend("test:written".into())]
        );
    }

    #[test]
    fn extended_headers_take_precedence_and_forbid_export_name() {
        let disk = Disk { read_only: true };
        let slots = Slots::new(4);
        let mut n = Negotiation::new(export(&disk, false, &slots), true);
        assert_eq!(
            replies(&n.option(proto::OPT_EXTENDED_HEADERS, &[]).reply)[0].1,
            proto::REP_ACK
        );
        let s = n.option(proto::OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(replies(&s.reply)[0].1, proto::REP_ERR_EXT_HEADER_REQD);
        let s = n.option(proto::OPT_LIST_META_CONTEXT, &meta_data("vdb", &[]));
        let names: Vec<Vec<u8>> = replies(&s.reply).into_iter().map(|r| r.2).collect();
        assert_eq!(
            names,
            [
                proto::rep_meta_context(0, "base:allocation"),
                proto::rep_meta_context(0, "test:written"),
                vec![]
            ]
        );
        let s = n.option(proto::OPT_EXPORT_NAME, b"vdb");
        assert!(matches!(s.next, Next::Close) && s.reply.is_empty());
    }

    #[test]
    fn tls_is_required_before_anything_but_starttls_and_abort() {
        let disk = Disk { read_only: false };
        let slots = Slots::new(4);
        let mut n = Negotiation::new(export(&disk, true, &slots), false);
        for option in [
            proto::OPT_LIST,
            proto::OPT_INFO,
            proto::OPT_GO,
            proto::OPT_STRUCTURED_REPLY,
            99,
        ] {
            let s = n.option(option, &info_data("vdb"));
            let r = replies(&s.reply);
            assert_eq!(
                (r.len(), r[0].0, r[0].1),
                (1, option, proto::REP_ERR_TLS_REQD)
            );
            assert!(String::from_utf8_lossy(&r[0].2).contains("requires TLS"));
            assert!(matches!(s.next, Next::Option));
        }
        assert!(matches!(
            n.option(proto::OPT_EXPORT_NAME, b"vdb").next,
            Next::Close
        ));
        let s = n.option(proto::OPT_STARTTLS, &[]);
        assert_eq!(replies(&s.reply)[0].1, proto::REP_ACK);
        assert!(matches!(s.next, Next::StartTls));

        // Negotiated before TLS, forgotten after it.
        let mut n = Negotiation::new(export(&disk, false, &slots), false);
        n.option(proto::OPT_STRUCTURED_REPLY, &[]);
        n.secured();
        let s = n.option(proto::OPT_STARTTLS, &[]);
        assert_eq!(replies(&s.reply)[0].1, proto::REP_ERR_INVALID);
        let Next::Transmission(session) = n.option(proto::OPT_GO, &info_data("")).next else {
            panic!("GO enters transmission")
        };
        assert_eq!(session.framing, Framing::Simple);

        // No TLS configured: STARTTLS refused by policy.
        let mut n = Negotiation::new(export(&disk, false, &slots), false);
        let s = n.option(proto::OPT_STARTTLS, &[]);
        assert_eq!(replies(&s.reply)[0].1, proto::REP_ERR_POLICY);
    }

    #[test]
    fn go_over_the_connection_limit_is_refused_with_a_message() {
        let disk = Disk { read_only: false };
        let slots = Slots::new(1);
        let mut first = Negotiation::new(export(&disk, false, &slots), false);
        let Next::Transmission(session) = first.option(proto::OPT_GO, &info_data("vdb")).next
        else {
            panic!("the first GO enters transmission")
        };
        let mut second = Negotiation::new(export(&disk, false, &slots), false);
        // INFO is not limited.
        assert!(matches!(
            second.option(proto::OPT_INFO, &info_data("vdb")).next,
            Next::Option
        ));
        let s = second.option(proto::OPT_GO, &info_data("vdb"));
        let r = replies(&s.reply);
        assert_eq!(r[0].1, proto::REP_ERR_POLICY);
        assert!(String::from_utf8_lossy(&r[0].2).contains("already has 1 connections"));
        assert!(matches!(
            second.option(proto::OPT_EXPORT_NAME, b"").next,
            Next::Close
        ));
        drop(session);
        assert!(matches!(
            second.option(proto::OPT_GO, &info_data("vdb")).next,
            Next::Transmission(_)
        ));
    }

    #[test]
    fn unknown_options_and_exports_are_answered_not_dropped() {
        let disk = Disk { read_only: false };
        let slots = Slots::new(4);
        let mut n = Negotiation::new(export(&disk, false, &slots), false);
        let s = n.option(42, &[1, 2, 3]);
        assert_eq!(replies(&s.reply)[0].1, proto::REP_ERR_UNSUP);
        let s = n.option(proto::OPT_GO, &info_data("other"));
        assert_eq!(replies(&s.reply)[0].1, proto::REP_ERR_UNKNOWN);
        n.option(proto::OPT_STRUCTURED_REPLY, &[]);
        let s = n.option(
            proto::OPT_SET_META_CONTEXT,
            &meta_data("other", &["base:allocation"]),
        );
        assert_eq!(replies(&s.reply)[0].1, proto::REP_ERR_UNKNOWN);
        let s = n.option(
            proto::OPT_LIST_META_CONTEXT,
            &meta_data("vdb", &["nocolon"]),
        );
        assert_eq!(replies(&s.reply)[0].1, proto::REP_ERR_INVALID);
        let many: Vec<&str> = (0..=MAX_QUERIES).map(|_| "base:").collect();
        let s = n.option(proto::OPT_LIST_META_CONTEXT, &meta_data("vdb", &many));
        assert_eq!(replies(&s.reply)[0].1, proto::REP_ERR_TOO_BIG);
    }
}
