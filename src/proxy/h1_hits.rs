//! The HTTP/1.1 fast path for cache hits. A plain-TCP connection is read
//! here first: a request that is a fresh hit on a response stored without
//! Vary, with nothing in it that the usual path would act on, is answered
//! from the entry's stored header block and body, written straight to the
//! socket. Another request without a body (a miss, a conditional, a
//! range...) is relayed to hyper, one request on a connection of its own
//! (`h1_relay`), and the client's connection stays here. Anything else (a
//! body, hop-by-hop fields, HTTP/1.0, h2c, bytes hyper's parsers judge, or
//! eight relays in a row) hands the connection, with the bytes already
//! read, to hyper for the rest of its life.
//!
//! Why: on a hit, hyper's request `HeaderMap`, the response `HeaderMap`
//! rebuilt from the stored block, its encoding and the dispatcher's futures
//! cost more than the lookup itself (README, Benchmarks). Here a hit is one
//! parse (httparse, as hyper does), one lookup and one copy of the stored
//! bytes.
//!
//! What makes a request a fast hit is deliberately narrow ([`parse`]): GET
//! or HEAD, HTTP/1.1, an origin-form target already in normal form, exactly
//! one valid `Host`, and no field that the usual path would act on for a
//! hit (a body, `Connection`, request cache directives, conditionals,
//! ranges). The response is the one the usual path sends, field for field
//! ([`Gateway::fast_hit`]); `tests/fast_hits.rs` compares the two.

use super::gateway::{access_line, AccessFields, Answered, Gateway, Live};
use super::h1_relay::relay;
use super::headers::{new_request_id_text, valid_request_id_bytes, ClientInfo};
use super::request::is_valid_host;
use super::respond::{CacheResult, X_CACHE};
use crate::cache::key::KeyParts;
use crate::cache::policy::{self, Usability};
use crate::cache::storage::{Entry, H1Field};
use crate::config::RouteConfig;
use crate::protocol::headers::write_field;
use crate::protocol::path;
use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::Service;
use std::borrow::Cow;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Request fields parsed at most: a request with more goes to hyper (whose
/// own limit is 100).
const MAX_FIELDS: usize = 48;

/// Bodies up to this size are copied behind the head (one write); larger
/// ones are written from the entry's buffer after it.
const COPY_BODY_MAX: usize = 16 * 1024;

/// Answers to pipelined requests are written once this much is pending, so
/// that a client pipelining many requests holds at most about this much
/// (plus one copied body) of the gateway's memory before reading them.
const OUT_FLUSH_AT: usize = 64 * 1024;

/// The output buffer's usual size: a few answers with small bodies.
const OUT_START: usize = 8 * 1024;

/// Bodiless requests relayed to hyper one after the other before a
/// connection is handed to hyper for good (see `serve`).
const MAX_RELAYS_IN_A_ROW: u32 = 8;

/// How the fast path serves what it does not answer itself: the service
/// and settings of the connection's hyper side.
pub(super) struct Others<S> {
    pub(super) service: S,
    pub(super) http1: hyper::server::conn::http1::Builder,
}

/// What the fast path does with the next request in the buffer.
enum Next {
    /// Answered into the output (its length in the buffer; a large body to
    /// write after the output).
    Answered(usize, Option<Bytes>),
    /// Without a body, but not a plain hit: relayed to hyper (its length;
    /// whether it is a HEAD).
    Relay(usize, bool),
    /// Anything else: hyper serves the rest of the connection.
    Handover,
}

/// How a fast-path connection ended.
pub(super) enum Served<I> {
    /// Closed: the client closed, an I/O error, or the gateway is stopping.
    Closed,
    /// A request the fast path does not answer: the connection and the
    /// bytes read but not answered, for hyper.
    Handover(Prefixed<I>),
}

/// Serves hits on `io` until a request is not one (`Handover`) or the
/// connection ends. `begin` marks requests in flight for the idle watchdog
/// (its guard is held from a complete request head until its answer is
/// written); `stop` asks the loop to close between requests. The read
/// buffer never grows past `max_buf`: a head that does not fit goes to
/// hyper, which refuses it (431).
#[allow(clippy::too_many_arguments)] // the connection's parts and its bounds
pub(super) async fn serve<I, G, S, B>(
    mut io: I,
    live: &Live,
    client: ClientInfo,
    begin: impl Fn() -> G,
    stop: &AtomicBool,
    max_buf: usize,
    others: &Others<S>,
) -> Served<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(OUT_START);
    // Requests relayed one after the other: past `MAX_RELAYS_IN_A_ROW` the
    // connection is not one of hits, and goes to hyper for good.
    let mut relays = 0;
    loop {
        // Every complete request in the buffer, answered in order
        // (pipelined requests get their answers in one write).
        let mut in_flight = None;
        let mut large = None;
        let mut more = false;
        while !stop.load(Ordering::Relaxed) {
            let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
            let next = match parse(&buf, &mut fields) {
                Parsed::Partial => break,
                Parsed::Other => Next::Handover,
                Parsed::Request(head) => {
                    in_flight.get_or_insert_with(&begin);
                    let answered = if !head.fast {
                        None
                    } else {
                        let gateway = live.load();
                        match &gateway.edge {
                            None => gateway.fast_hit(&head, client, &mut out),
                            Some(edge) => {
                                gateway.fast_edge_hit(edge, &head, client, &mut out).await
                            }
                        }
                    };
                    match answered {
                        Some(body) => Next::Answered(head.len, body),
                        None if relays < MAX_RELAYS_IN_A_ROW => Next::Relay(head.len, head.head),
                        None => Next::Handover,
                    }
                }
            };
            if !matches!(next, Next::Answered(..)) && !out.is_empty() {
                if io.write_all(&out).await.is_err() {
                    return Served::Closed;
                }
                out.clear();
            }
            let (len, body) = match next {
                Next::Answered(len, body) => {
                    relays = 0;
                    (len, body)
                }
                Next::Relay(len, head_request) => {
                    relays += 1;
                    let service = others.service.clone();
                    let http1 = &others.http1;
                    let relayed = relay(
                        &mut io,
                        &mut buf,
                        len,
                        max_buf,
                        head_request,
                        http1,
                        service,
                    );
                    if !relayed.await {
                        return Served::Closed;
                    }
                    (len, None)
                }
                Next::Handover => return Served::Handover(Prefixed::new(io, buf.freeze())),
            };
            buf.advance(len);
            if body.is_some() || out.len() >= OUT_FLUSH_AT {
                large = body;
                more = true;
                break;
            }
        }
        if !out.is_empty() {
            if io.write_all(&out).await.is_err() {
                return Served::Closed;
            }
            out.clear();
            // A burst of pipelined answers does not stay held by an idle
            // connection.
            if out.capacity() > 2 * OUT_START {
                out = Vec::with_capacity(OUT_START);
            }
        }
        if let Some(body) = large {
            if io.write_all(&body).await.is_err() {
                return Served::Closed;
            }
        }
        if more {
            // More requests may be buffered behind these.
            continue;
        }
        drop(in_flight);
        if stop.load(Ordering::Relaxed) {
            return Served::Closed;
        }
        if buf.len() >= max_buf {
            return Served::Handover(Prefixed::new(io, buf.freeze()));
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8 * 1024);
        }
        match io.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Served::Closed,
            Ok(_) => {}
        }
    }
}

/// A request head without a body, for the fast path to answer or relay.
pub(super) struct Head<'a> {
    /// Nothing in it that the usual path acts on for a hit: the fast path
    /// may answer it.
    fast: bool,
    /// HEAD rather than GET.
    pub(super) head: bool,
    /// The request target: origin-form, in normal form.
    pub(super) target: &'a str,
    host: &'a str,
    /// The client's `X-Request-Id`, when it sent exactly one valid one.
    request_id: Option<&'a [u8]>,
    /// The first `User-Agent` (for the access line).
    user_agent: Option<&'a [u8]>,
    /// The head's length in the buffer.
    len: usize,
    /// Every field, as parsed (the edge reads them).
    pub(super) fields: &'a [httparse::Header<'a>],
}

impl Head<'_> {
    /// The target's path, without the query.
    pub(super) fn path(&self) -> &str {
        self.target.split_once('?').map_or(self.target, |(p, _)| p)
    }
}

enum Parsed<'a> {
    Request(Head<'a>),
    /// Not a whole head yet.
    Partial,
    /// Anything else (for hyper to answer or refuse).
    Other,
}

/// What a request field means to the fast path.
#[derive(Debug, PartialEq, Eq)]
enum Field {
    Host,
    RequestId,
    UserAgent,
    /// Acted on by the usual path for a hit: request cache directives
    /// (9111 5.2.1), conditionals (9110 13), ranges (9110 14). Relayed.
    Usual,
    /// A body's framing or a hop-by-hop field (RFC 9112 6, 9110 7.6.1):
    /// hyper's.
    Framing,
    /// Not looked at on a hit without Vary.
    Other,
}

fn field(name: &str) -> Field {
    let n = name.as_bytes();
    let is = |s: &str| n.eq_ignore_ascii_case(s.as_bytes());
    if n.len() > 3 && n[..3].eq_ignore_ascii_case(b"if-") {
        return Field::Usual;
    }
    match n.len() {
        2 if is("te") => Field::Framing,
        4 if is("host") => Field::Host,
        5 if is("range") => Field::Usual,
        6 if is("expect") => Field::Framing,
        6 if is("pragma") => Field::Usual,
        7 if is("upgrade") || is("trailer") => Field::Framing,
        10 if is("user-agent") => Field::UserAgent,
        10 if is("connection") || is("keep-alive") => Field::Framing,
        12 if is("x-request-id") => Field::RequestId,
        13 if is("cache-control") => Field::Usual,
        14 if is("content-length") => Field::Framing,
        16 if is("proxy-connection") => Field::Framing,
        17 if is("transfer-encoding") => Field::Framing,
        _ => Field::Other,
    }
}

/// Bytes a target may have here: RFC 3986 unreserved, sub-delims, `:@/?`
/// and `%` (escapes, which the normal form check below looks at). Others
/// go to hyper, whose URI parser decides.
fn target_byte(b: u8) -> bool {
    path::is_unreserved_or_sub_delim(b) || matches!(b, b':' | b'@' | b'/' | b'?' | b'%')
}

/// Parses the head at the start of `buf`, its fields into `fields`.
fn parse<'a>(buf: &'a [u8], fields: &'a mut [httparse::Header<'a>]) -> Parsed<'a> {
    let mut req = httparse::Request::new(fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let head = match req.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => return Parsed::Other,
    };
    let Some(target) = req.path else {
        return Parsed::Other;
    };
    if req.version != Some(1) || !target.starts_with('/') || !target.bytes().all(target_byte) {
        return Parsed::Other;
    }
    // Targets not in normal form are the usual path's to rewrite (or refuse).
    let mut fast = matches!(path::normalize_target(target), Ok(Cow::Borrowed(_)));
    let (mut host, mut hosts) = ("", 0);
    let (mut request_id, mut ids) = (None, 0);
    let mut user_agent = None;
    let fields: &'a [httparse::Header<'a>] = req.headers;
    for f in fields {
        match field(f.name) {
            Field::Host => {
                hosts += 1;
                host = match std::str::from_utf8(f.value) {
                    Ok(h) if is_valid_host(f.value) => h,
                    _ => return Parsed::Other,
                };
            }
            Field::RequestId => {
                ids += 1;
                request_id = Some(f.value);
            }
            Field::UserAgent => {
                user_agent = user_agent.or(Some(f.value));
            }
            Field::Usual => fast = false,
            Field::Framing => return Parsed::Other,
            Field::Other => {}
        }
    }
    if hosts != 1 {
        return Parsed::Other;
    }
    Parsed::Request(Head {
        fast,
        head,
        target,
        host,
        request_id: request_id.filter(|id| ids == 1 && valid_request_id_bytes(id)),
        user_agent,
        len,
        fields,
    })
}

/// A fast hit written into the output, not yet counted or logged.
pub(super) struct FastHit<'g> {
    pub(super) status: StatusCode,
    /// The body's length (what the access line counts for a GET).
    body_len: u64,
    /// A large body to write after the output.
    pub(super) large: Option<Bytes>,
    /// Where in the output the head's closing blank line starts: a field
    /// added after the lookup (the edge's `Set-Cookie`) goes there.
    pub(super) blank_line: usize,
    pub(super) route: Option<&'g Arc<RouteConfig>>,
    request_id: RequestIdText,
    started: Instant,
}

/// The request's id: the client's, or a new one.
enum RequestIdText {
    Client,
    New([u8; 24]),
}

impl Gateway {
    /// Answers `req` into `out` when it is a plain fresh hit, as the usual
    /// path would (`respond::from_entry` and `handle`, with its metrics and
    /// access line): the stored fields,
    /// `Age`, `X-Cache`, `Cache-Status`, `Via`, `X-Request-Id`, and
    /// `Content-Length` and `Date` as hyper adds them. `None` (and nothing
    /// written): the usual path must serve it. `Some(Some(body))`: a large
    /// body to write after `out`.
    pub(super) fn fast_hit(
        &self,
        req: &Head<'_>,
        client: ClientInfo,
        out: &mut Vec<u8>,
    ) -> Option<Option<Bytes>> {
        let hit = self.write_fast_hit(req, client, out)?;
        self.fast_hit_answered(req, client, &hit);
        Some(hit.large)
    }

    /// The lookup and the answer written into `out`, when `req` is a plain
    /// fresh hit; metrics and the access line are [`Self::fast_hit_answered`]'s.
    pub(super) fn write_fast_hit<'g>(
        &'g self,
        req: &Head<'_>,
        client: ClientInfo,
        out: &mut Vec<u8>,
    ) -> Option<FastHit<'g>> {
        // The guard's refusals are the usual path's (414 here; the others
        // cannot pass `parse`). The limit is per generation: a reload may
        // lower it under targets already stored.
        if !self.fast_h1
            || client.tls
            || req.target.len() > self.config.server.max_uri_bytes
            || self.probe_at(req.path()).is_some()
        {
            return None;
        }
        let started = Instant::now();
        let route = self.route_ref(req.target);
        if route.is_some_and(|r| r.bypass) {
            return None;
        }
        let key = KeyParts {
            version: self.key_version(route.map(|r| &**r)),
            tls: false,
            host: req.host,
            path_and_query: req.target,
        };
        let now = SystemTime::now();
        let request_id = match req.request_id {
            Some(_) => RequestIdText::Client,
            None => RequestIdText::New(new_request_id_text()),
        };
        let id = request_id.of(req);
        let (status, body_len, large, blank_line) = self
            .store
            .lookup_sole(&key, |e| self.write_hit(e, req, id, now, out))
            .flatten()?;
        Some(FastHit {
            status,
            body_len,
            large,
            blank_line,
            route,
            request_id,
            started,
        })
    }

    /// Counts and logs an answered fast hit.
    pub(super) fn fast_hit_answered(&self, req: &Head<'_>, client: ClientInfo, hit: &FastHit<'_>) {
        let elapsed = hit.started.elapsed();
        self.metrics.record(CacheResult::Hit, hit.status, elapsed);
        self.metrics.fast_hits.incr();
        if self.access_logged() {
            let bytes = if req.head { 0 } else { hit.body_len };
            let id = hit.request_id.of(req);
            self.log_fast_hit(req, id, client, (hit.status, bytes), elapsed);
        }
    }

    /// The access line the usual path writes for this hit.
    fn log_fast_hit(
        &self,
        req: &Head<'_>,
        request_id: &[u8],
        client: ClientInfo,
        (status, bytes): (StatusCode, u64),
        elapsed: std::time::Duration,
    ) {
        let Ok(id) = http::HeaderValue::from_bytes(request_id) else {
            return;
        };
        let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
        let fields = AccessFields {
            method: if req.head { Method::HEAD } else { Method::GET },
            host: req.host.to_string(),
            path: req.target.to_string(),
            user_agent: text(req.user_agent).unwrap_or_default(),
        };
        let answered = Answered {
            status,
            result: CacheResult::Hit,
            bytes: Some(bytes),
            origin_time: None,
            elapsed,
        };
        access_line(&id, client, &fields, &answered);
    }

    /// The answer from a fresh entry; `None` when it is not one the fast
    /// path writes (then `out` is as it was).
    fn write_hit(
        &self,
        e: &Arc<Entry>,
        req: &Head<'_>,
        request_id: &[u8],
        now: SystemTime,
        out: &mut Vec<u8>,
    ) -> Option<(StatusCode, u64, Option<Bytes>, usize)> {
        let no_directives = Default::default();
        if policy::usability(&e.freshness, &no_directives, now) != Usability::Fresh {
            return None;
        }
        // hyper writes no length for these (and no body for 304); leave
        // them to it.
        let status = e.status;
        if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return None;
        }
        let start = out.len();
        let body = e.body_bytes();
        let length = Digits::of(body.len() as u64);
        write_status_line(out, status);
        let mut dated = false;
        let written = e.headers().write_h1(out, |name, value| match name {
            // Replaced by the gateway's own (`mark`, `handle`) or not
            // stored at all (`age`).
            b"age" | b"x-cache" | b"x-request-id" => H1Field::Skip,
            // Written below from the body's length, which the stored one
            // must agree with (else hyper would send a broken message).
            b"content-length" if value == length.text() => H1Field::Skip,
            b"content-length" | b"transfer-encoding" | b"connection" => H1Field::Refuse,
            b"date" => {
                dated = true;
                H1Field::Write
            }
            _ => H1Field::Write,
        });
        if !written {
            out.truncate(start);
            return None;
        }
        let age = e.freshness.current_age(now).as_secs();
        write_field(out, b"age", Digits::of(age).text());
        write_field(
            out,
            X_CACHE.as_str().as_bytes(),
            CacheResult::Hit.as_str().as_bytes(),
        );
        write_field(out, b"cache-status", self.labels.hit().as_bytes());
        write_field(out, b"via", self.labels.via.as_bytes());
        write_field(out, b"x-request-id", request_id);
        // A HEAD answer keeps the GET's Content-Length (RFC 9110 9.3.2).
        write_field(out, b"content-length", length.text());
        if !dated {
            write_field(out, b"date", httpdate::fmt_http_date(now).as_bytes());
        }
        let blank_line = out.len();
        out.extend_from_slice(b"\r\n");
        let len = body.len() as u64;
        if req.head {
            return Some((status, len, None, blank_line));
        }
        if body.len() <= COPY_BODY_MAX {
            out.extend_from_slice(body);
            return Some((status, len, None, blank_line));
        }
        Some((status, len, Some(e.body()), blank_line))
    }
}

impl RequestIdText {
    fn of<'a>(&'a self, req: &Head<'a>) -> &'a [u8] {
        match self {
            RequestIdText::Client => req.request_id.unwrap_or_default(),
            RequestIdText::New(id) => id,
        }
    }
}

/// `HTTP/1.1 <code> <reason>`, as hyper writes it.
fn write_status_line(out: &mut Vec<u8>, status: StatusCode) {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A number's decimal digits, without formatting machinery.
struct Digits {
    buf: [u8; 20],
    at: usize,
}

impl Digits {
    fn of(mut n: u64) -> Digits {
        let mut d = Digits {
            buf: [0; 20],
            at: 20,
        };
        loop {
            d.at -= 1;
            d.buf[d.at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return d;
            }
        }
    }

    fn text(&self) -> &[u8] {
        &self.buf[self.at..]
    }
}

/// A connection with bytes already read from it in front: what hyper is
/// given when the fast path hands a connection over.
pub(super) struct Prefixed<I> {
    prefix: Bytes,
    io: I,
}

impl<I> Prefixed<I> {
    pub(super) fn new(io: I, prefix: Bytes) -> Prefixed<I> {
        Prefixed { prefix, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the fast path does with `raw`: answer it if it is a hit
    /// ("fast"), relay it ("relay"), or hand the connection over ("hyper").
    fn kind(raw: &str) -> &'static str {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        match parse(raw.as_bytes(), &mut fields) {
            Parsed::Request(h) if h.fast => "fast",
            Parsed::Request(_) => "relay",
            Parsed::Partial => "partial",
            Parsed::Other => "hyper",
        }
    }

    fn parsed(raw: &str) -> Option<(bool, String, String, Option<String>, usize)> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        match parse(raw.as_bytes(), &mut fields) {
            Parsed::Request(h) if h.fast => Some((
                h.head,
                h.target.to_string(),
                h.host.to_string(),
                h.request_id
                    .map(|id| String::from_utf8_lossy(id).into_owned()),
                h.len,
            )),
            _ => None,
        }
    }

    #[test]
    fn a_plain_get_or_head_is_eligible() {
        let raw = "GET /static/a?x=1 HTTP/1.1\r\nHost: Api.Example:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            parsed(raw),
            Some((
                false,
                "/static/a?x=1".into(),
                "Api.Example:8080".into(),
                None,
                raw.len()
            ))
        );
        let raw = "HEAD / HTTP/1.1\r\nhost: a\r\nX-Request-Id: abc-1\r\n\r\nGET";
        let (head, _, _, id, len) = parsed(raw).expect("eligible");
        assert!(head);
        assert_eq!(id.as_deref(), Some("abc-1"));
        assert_eq!(
            len,
            raw.len() - 3,
            "the next request's bytes are not consumed"
        );
    }

    #[test]
    fn a_partial_head_waits_for_more() {
        assert_eq!(kind("GET / HTTP/1.1\r\nHost: a\r\n"), "partial");
        assert_eq!(kind("GE"), "partial");
    }

    /// The usual path serves each of these. Without a body and with a
    /// plain head, relayed one request at a time: request directives (RFC
    /// 9111 5.2.1), conditionals (RFC 9110 13.1), ranges (RFC 9110 14.2),
    /// targets not in normal form. The rest of the connection goes to
    /// hyper for a body or its framing (RFC 9112 6), hop-by-hop fields (RFC
    /// 9110 7.6.1), a missing, doubled or invalid Host (RFC 9112 3.2), other
    /// versions and methods, absolute targets, bytes hyper's parsers judge.
    #[test]
    fn anything_the_usual_path_acts_on_is_not_answered_here() {
        let with = |field: &str| format!("GET /a HTTP/1.1\r\nHost: a\r\n{field}\r\n\r\n");
        for f in [
            "Cache-Control: no-cache",
            "Pragma: no-cache",
            "If-None-Match: \"x\"",
            "if-modified-since: Thu, 01 Jan 2026 00:00:00 GMT",
            "If-Range: \"x\"",
            "Range: bytes=0-1",
        ] {
            assert_eq!(kind(&with(f)), "relay", "{f}");
        }
        for raw in [
            "GET /a/../b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET //b HTTP/1.1\r\nHost: a\r\n\r\n",
            "HEAD /%61 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(kind(raw), "relay", "{raw:?}");
        }
        for f in [
            "Content-Length: 0",
            "Transfer-Encoding: chunked",
            "Connection: close",
            "connection: keep-alive",
            "Keep-Alive: 5",
            "Upgrade: websocket",
            "Expect: 100-continue",
            "TE: trailers",
            "Trailer: x",
            "Proxy-Connection: close",
            "Host: b",
        ] {
            assert_eq!(kind(&with(f)), "hyper", "{f}");
        }
        for raw in [
            "GET /a HTTP/1.0\r\nHost: a\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: a\r\n\r\n",
            "get /a HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a HTTP/1.1\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: user@a\r\n\r\n",
            "GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a\"b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a#f HTTP/1.1\r\nHost: a\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
        ] {
            assert_eq!(kind(raw), "hyper", "{raw:?}");
        }
        assert_eq!(kind("GET /a HTTP/1.1\r\nHost: a\r\n\r\n"), "fast");
        assert_eq!(kind("GET /a HTTP/1.1\r\nHost: a\r\n"), "partial");
    }

    #[test]
    fn a_request_id_is_echoed_only_when_single_and_valid() {
        let id = |fields: &str| {
            let raw = format!("GET /a HTTP/1.1\r\nHost: a\r\n{fields}\r\n");
            parsed(&raw).expect("eligible").3
        };
        assert_eq!(id("X-Request-Id: a-1\r\n").as_deref(), Some("a-1"));
        assert_eq!(id("X-Request-Id: a b\r\n"), None);
        assert_eq!(id("X-Request-Id: a\r\nX-Request-Id: b\r\n"), None);
    }

    #[test]
    fn too_many_fields_go_to_hyper() {
        let mut raw = String::from("GET /a HTTP/1.1\r\nHost: a\r\n");
        for i in 0..MAX_FIELDS {
            raw.push_str(&format!("x-f{i}: 1\r\n"));
        }
        raw.push_str("\r\n");
        assert!(parsed(&raw).is_none());
    }

    #[test]
    fn digits_and_status_lines() {
        for n in [0u64, 7, 10, 1024, u64::MAX] {
            assert_eq!(Digits::of(n).text(), n.to_string().as_bytes());
        }
        let mut out = Vec::new();
        write_status_line(&mut out, StatusCode::OK);
        write_status_line(&mut out, StatusCode::NOT_FOUND);
        write_status_line(&mut out, StatusCode::from_u16(299).expect("valid"));
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nHTTP/1.1 404 Not Found\r\nHTTP/1.1 299 <none>\r\n"
        );
    }
}
