//! The HTTP/1.1 hit fast path (`[server] fast_hits`) against the normal
//! path, over raw TCP. One origin, two gateways identical but for
//! `fast_hits`; both get the same request bytes, and their answers must be
//! the same: status line bytes, header fields as a multiset (only `date`,
//! `age` and generated request ids may differ, within bounds), body bytes,
//! and whether the connection stays open afterwards.
//!
//! `kvgate_fast_hits_total` must grow on the fast gateway by exactly the
//! number of eligible hits each case sent, and never on the other, so a
//! fast path that is silently never taken, or taken for a request it must
//! hand to hyper, fails here.
//!
//! Every case runs whatever the earlier ones found: a test collects its
//! divergences and fails at the end listing all of them.

mod common;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kvgate::config::Config;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "fast-hits-test-token-0123456789";
/// Every request names this authority (part of the cache key).
const HOST: &str = "kvgate.test";
const MAX_URI_BYTES: usize = 1024;
/// hyper's read buffer never goes below 8 KiB: the smallest limit both
/// paths can share.
const MAX_HEADER_BYTES: usize = 8192;
/// As a case's count of eligible hits: the contract does not say whether
/// the fast path may answer (the answers must still be the same).
const ANY: u64 = u64::MAX;
/// A response that has not arrived by then is reported as stalled.
const READ_LIMIT: Duration = Duration::from_secs(3);
const BIG_BYTES: usize = 100 * 1024;
/// An entity tag the origin gives every stored 200.
const ETAG: &str = "\"v1\"";

// ---------------------------------------------------------------- origin

/// The origin every pair shares: the path picks the kind of response.
fn script(seen: &Seen, _n: usize) -> Reply {
    let path = seen.path.as_str();
    let fresh = "public, max-age=600";
    // Revalidations of a stored 200 get a 304 when the tag still matches.
    let inm = seen
        .headers
        .get("if-none-match")
        .and_then(|v| v.to_str().ok());
    if inm == Some(ETAG) {
        return Reply::ok("")
            .status(304)
            .header("etag", ETAG)
            .header("cache-control", fresh);
    }
    match path {
        "/vary" => {
            let lang = seen
                .headers
                .get("accept-language")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none");
            Reply::ok(&format!("language {lang}"))
                .header("cache-control", fresh)
                .header("vary", "Accept-Language")
        }
        "/stale" => Reply::ok("stale body, fresh for one second")
            .header("cache-control", "max-age=1")
            .header("etag", "\"stale\""),
        "/swr" => Reply::ok("served stale while revalidating")
            .header("cache-control", "max-age=1, stale-while-revalidate=60"),
        "/missing" => Reply::ok("no such thing")
            .status(404)
            .header("cache-control", fresh),
        "/moved" => Reply::ok("moved")
            .status(301)
            .header("location", "/static/x")
            .header("cache-control", fresh),
        "/big" => Reply {
            body: Bytes::from(
                (0..BIG_BYTES)
                    .map(|i| b'a' + (i % 26) as u8)
                    .collect::<Vec<u8>>(),
            ),
            ..Reply::ok("")
        }
        .header("cache-control", fresh)
        .header("content-type", "application/octet-stream"),
        "/post" => Reply::no_store("posted"),
        // Stored response shapes (see `stored_response_shapes`).
        "/tagged" => Reply::ok("tagged")
            .header("cache-control", fresh)
            .header("surrogate-key", "product:1 list")
            .header("cache-tag", "t1,t2"),
        "/s203" => Reply::ok("non-authoritative")
            .status(203)
            .header("cache-control", fresh),
        "/s204" => Reply::ok("").status(204).header("cache-control", fresh),
        "/s299" => Reply::ok("unknown status")
            .status(299)
            .header("cache-control", fresh),
        "/s410" => Reply::ok("gone").status(410).header("cache-control", fresh),
        "/empty" => Reply::ok("").header("cache-control", fresh),
        "/aged" => Reply::ok("aged at the origin")
            .header("cache-control", fresh)
            .header("age", "100"),
        "/expires" => Reply::ok("expires in an hour").header(
            "expires",
            &httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600)),
        ),
        "/lastmod" => Reply::ok("heuristic freshness")
            .header("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        "/hop" => Reply::ok("hop-by-hop named by the origin")
            .header("cache-control", fresh)
            .header("connection", "x-hop")
            .header("x-hop", "secret")
            .header("keep-alive", "timeout=5"),
        "/s-maxage" => {
            Reply::ok("shared max age").header("cache-control", "max-age=0, s-maxage=600")
        }
        "/vary-empty" => Reply::ok("empty vary")
            .header("cache-control", fresh)
            .header("vary", ""),
        "/vary-star" => Reply::ok("vary star")
            .header("cache-control", fresh)
            .header("vary", "*"),
        "/vary-encoding" => Reply::ok("vary on an absent field")
            .header("cache-control", fresh)
            .header("vary", "Accept-Encoding"),
        // Fields the gateway sets itself, already sent by an upstream cache.
        "/upstream-marks" => Reply::ok("marked upstream")
            .header("cache-control", fresh)
            .header("via", "1.1 upstream")
            .header("cache-status", "upstream; hit")
            .header("x-cache", "HIT from upstream")
            .header("x-request-id", "from-the-origin")
            .header("age", "5"),
        // Stored per injected flags (see `edge_hits_are_answered_...`).
        "/vary-flags" => {
            let flags = seen
                .headers
                .get("x-feature-flags")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none");
            Reply::ok(&format!("flags {flags}"))
                .header("cache-control", fresh)
                .header("vary", "X-Feature-Flags")
        }
        "/private" => Reply::ok("private").header("cache-control", "private, max-age=600"),
        "/nocache" => Reply::ok("no-cache response")
            .header("cache-control", "no-cache, max-age=600")
            .header("etag", "\"nc\""),
        _ => Reply::ok(&format!("static body of {path}"))
            .header("cache-control", fresh)
            .header("etag", ETAG)
            .header("content-type", "text/plain")
            .header("x-origin-field", "one")
            .header("x-origin-field", "two"),
    }
}

// ---------------------------------------------------------------- gateways

/// Two gateways on one origin, identical but for `[server] fast_hits`.
struct Pair {
    fast: Gateway,
    normal: Gateway,
}

impl Pair {
    async fn start(origin: &str, extra: impl Fn(&mut Config)) -> Pair {
        let setup = |fast: bool| {
            let extra = &extra;
            move |c: &mut Config| {
                c.server.fast_hits = fast;
                c.server.max_uri_bytes = MAX_URI_BYTES;
                c.server.max_header_bytes = MAX_HEADER_BYTES;
                c.admin = Some(kvgate::config::AdminConfig {
                    listen: toml::Spanned::new(0..0, "127.0.0.1:0".into()),
                    token: Some(TOKEN.into()),
                    max_body_bytes: 4096,
                });
                extra(c);
            }
        };
        let fast = Gateway::start(origin, setup(true)).await;
        let normal = Gateway::start(origin, setup(false)).await;
        Pair { fast, normal }
    }

    /// Gets `path` from both until both answer it from the cache.
    async fn warm(&self, path: &str, headers: &str) {
        for gw in [&self.fast, &self.normal] {
            let addr = gw.running.addr;
            let mut first = Conn::open(addr).await;
            let req = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n{headers}\r\n");
            first.send(req.as_bytes(), Pace::Whole).await;
            let got = first.answer(false).await;
            assert!(
                matches!(&got, Answer::Response(r) if r.status_line.contains(" 200 ") || r.status_line.contains(" 404 ") || r.status_line.contains(" 301 ")),
                "warming {path}: {got:?}"
            );
            // Storing may finish just after the client has the body. The
            // check uses `Pragma`, which keeps it off the fast path.
            let check =
                format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\nPragma: warm\r\n{headers}\r\n");
            eventually(&format!("{path} stored"), 100, Duration::from_millis(20), || {
                let check = check.clone();
                async move {
                    let mut c = Conn::open(addr).await;
                    c.send(check.as_bytes(), Pace::Whole).await;
                    matches!(c.answer(false).await, Answer::Response(r) if r.header("x-cache") == Some("HIT"))
                }
            })
            .await;
        }
    }

    /// `kvgate_fast_hits_total` on (fast, normal).
    async fn fast_hits(&self) -> (u64, u64) {
        (
            fast_hits_total(&self.fast).await,
            fast_hits_total(&self.normal).await,
        )
    }
}

async fn fast_hits_total(gw: &Gateway) -> u64 {
    metric(gw, "kvgate_fast_hits_total").await as u64
}

/// The request-side series (by result, status class, origin requests,
/// connections), which the fast path must count as the normal path does.
async fn request_series(gw: &Gateway) -> std::collections::BTreeMap<String, f64> {
    const COUNTED: [&str; 6] = [
        "kvgate_requests_total",
        "kvgate_responses_total",
        "kvgate_responses_5xx_total",
        "kvgate_origin_requests_total",
        "kvgate_request_duration_seconds_count",
        "kvgate_connections_accepted_total",
    ];
    series_of(gw, &COUNTED).await
}

/// The edge's series: route requests, flag evaluations, variant exposures,
/// exposed users and conversions (what a decision counts).
async fn edge_series(gw: &Gateway) -> std::collections::BTreeMap<String, f64> {
    const COUNTED: [&str; 5] = [
        "kvgate_edge_route_requests_total",
        "kvgate_edge_flag_evaluations_total",
        "kvgate_edge_exposures_total",
        "kvgate_edge_exposed_users_total",
        "kvgate_edge_conversions_total",
    ];
    series_of(gw, &COUNTED).await
}

/// Every series of `/metrics` whose line starts with one of `names`.
async fn series_of(gw: &Gateway, names: &[&str]) -> std::collections::BTreeMap<String, f64> {
    let url = format!(
        "http://{}/metrics",
        gw.running.admin_addr.expect("admin listener runs")
    );
    let auth = format!("Bearer {TOKEN}");
    let text = send(http::Method::GET, &url, &[("authorization", &auth)], "")
        .await
        .text();
    text.lines()
        .filter(|l| names.iter().any(|c| l.starts_with(c)))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The growth of each series since `before`.
fn growth(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
) -> std::collections::BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

impl Pair {
    /// Both gateways' request series, to compare growth later.
    async fn series(&self) -> [std::collections::BTreeMap<String, f64>; 2] {
        [
            request_series(&self.fast).await,
            request_series(&self.normal).await,
        ]
    }

    /// Whether both counted what they were sent the same way since `start`.
    async fn check_counted_alike(
        &self,
        found: &mut Findings,
        start: &[std::collections::BTreeMap<String, f64>; 2],
    ) {
        let end = self.series().await;
        let (f, n) = (growth(&start[0], &end[0]), growth(&start[1], &end[1]));
        found.check(f == n && !f.is_empty(), || {
            format!("request metrics grew differently:\n  fast   {f:?}\n  normal {n:?}")
        });
    }
}

// ---------------------------------------------------------------- raw client

/// One response as it came off the wire (chunked bodies decoded).
#[derive(Clone)]
struct Raw {
    status_line: String,
    /// (lowercased name, value), in wire order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn status(&self) -> u16 {
        self.status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.status_line)?;
        for (n, v) in &self.headers {
            writeln!(f, "  {n}: {v}")?;
        }
        let shown = &self.body[..self.body.len().min(120)];
        write!(
            f,
            "  [body {} bytes] {:?}",
            self.body.len(),
            String::from_utf8_lossy(shown)
        )
    }
}

/// What reading one response gave.
#[derive(Clone, Debug)]
enum Answer {
    Response(Raw),
    /// The peer closed first; the bytes of an unfinished response, if any.
    Closed(Vec<u8>),
    /// Nothing more within `READ_LIMIT`; the bytes so far.
    Stalled(Vec<u8>),
}

/// How request bytes are written.
#[derive(Clone, Copy, Debug)]
enum Pace {
    /// In one write.
    Whole,
    /// One byte per write, a millisecond apart (a slow client).
    ByteByByte,
}

/// What became of the connection after the responses.
#[derive(Clone, Debug, PartialEq)]
enum After {
    /// It answered one more request.
    Open,
    Closed,
    /// Bytes nobody asked for were waiting.
    Extra(String),
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

enum Read {
    More,
    Eof,
    Timeout,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A chunked body (RFC 9112 7.1) at the start of `b`: the decoded body and
/// how many bytes it took; `None` while incomplete.
fn dechunk(b: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + find(&b[at..], b"\r\n")?;
        let line = std::str::from_utf8(&b[at..line_end]).ok()?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // Trailer fields, then the empty line.
            loop {
                let end = at + find(&b[at..], b"\r\n")?;
                let empty = end == at;
                at = end + 2;
                if empty {
                    return Some((body, at));
                }
            }
        }
        if b.len() < at + size + 2 {
            return None;
        }
        body.extend_from_slice(&b[at..at + size]);
        at += size + 2;
    }
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Conn {
            s,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Writes `bytes`; a connection the peer already closed is not an
    /// error here (the reads that follow say what happened).
    async fn send(&mut self, bytes: &[u8], pace: Pace) {
        match pace {
            Pace::Whole => {
                let _ = self.s.write_all(bytes).await;
            }
            Pace::ByteByByte => {
                for b in bytes {
                    if self.s.write_all(std::slice::from_ref(b)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }

    async fn more(&mut self) -> Read {
        if self.eof {
            return Read::Eof;
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(READ_LIMIT, self.s.read(&mut chunk)).await {
            Err(_) => Read::Timeout,
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                Read::Eof
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Read::More
            }
        }
    }

    fn cut(&mut self, n: usize) {
        self.buf.drain(..n);
    }

    /// Reads one response; `head`: it answers a HEAD (no body).
    async fn answer(&mut self, head: bool) -> Answer {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            match self.more().await {
                Read::More => {}
                Read::Eof => return Answer::Closed(std::mem::take(&mut self.buf)),
                Read::Timeout => return Answer::Stalled(std::mem::take(&mut self.buf)),
            }
        };
        let text = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = lines
            .map(|l| match l.split_once(':') {
                Some((n, v)) => (n.to_ascii_lowercase(), v.trim().to_string()),
                None => (l.to_ascii_lowercase(), String::from("<no colon>")),
            })
            .collect();
        let mut raw = Raw {
            status_line,
            headers,
            body: Vec::new(),
        };
        let start = head_end + 4;
        let status = raw.status();
        let bodiless = head || status / 100 == 1 || status == 204 || status == 304;
        let chunked = raw
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length = raw
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok());
        if bodiless {
            self.cut(start);
            return Answer::Response(raw);
        }
        loop {
            let have = &self.buf[start..];
            let done = if chunked {
                dechunk(have).map(|(body, used)| (body, start + used))
            } else if let Some(n) = length {
                (have.len() >= n).then(|| (have[..n].to_vec(), start + n))
            } else if self.eof {
                // Delimited by the close.
                Some((have.to_vec(), self.buf.len()))
            } else {
                None
            };
            if let Some((body, used)) = done {
                raw.body = body;
                self.cut(used);
                return Answer::Response(raw);
            }
            match self.more().await {
                Read::More => {}
                Read::Eof if !chunked && length.is_none() => {}
                Read::Eof => return Answer::Closed(std::mem::take(&mut self.buf)),
                Read::Timeout => return Answer::Stalled(std::mem::take(&mut self.buf)),
            }
        }
    }

    /// Reads one response per entry of `heads`, stopping at the first that
    /// is not a whole response.
    async fn answers(&mut self, heads: &[bool]) -> Vec<Answer> {
        let mut out = Vec::new();
        for &head in heads {
            let a = self.answer(head).await;
            let whole = matches!(a, Answer::Response(_));
            out.push(a);
            if !whole {
                break;
            }
        }
        out
    }

    /// Whether the connection still serves: a request that stays off the
    /// fast path (`Pragma`), so the fast-hit count is not moved by it.
    async fn after(&mut self) -> After {
        if !self.buf.is_empty() {
            return After::Extra(String::from_utf8_lossy(&self.buf).into_owned());
        }
        if self.eof {
            return After::Closed;
        }
        let probe = format!("GET /static/x HTTP/1.1\r\nHost: {HOST}\r\nPragma: probe\r\n\r\n");
        self.send(probe.as_bytes(), Pace::Whole).await;
        match self.answer(false).await {
            Answer::Response(r) if r.status() == 200 => After::Open,
            Answer::Response(r) => After::Extra(format!("{r:?}")),
            Answer::Closed(b) if b.is_empty() => After::Closed,
            other => After::Extra(format!("{other:?}")),
        }
    }
}

/// A connection's answers to some request bytes, and its state after.
#[derive(Debug)]
struct Exchange {
    answers: Vec<Answer>,
    after: After,
}

async fn exchange(addr: SocketAddr, req: &[u8], heads: &[bool], pace: Pace) -> Exchange {
    let mut c = Conn::open(addr).await;
    c.send(req, pace).await;
    let answers = c.answers(heads).await;
    let after = c.after().await;
    Exchange { answers, after }
}

// ---------------------------------------------------------------- comparison

/// Divergences found so far; the test fails at its end with all of them.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let w = what();
            eprintln!("DIVERGENCE: {w}");
            self.0.push(w);
        }
    }

    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} divergence(s):\n\n{}",
            self.0.len(),
            self.0.join("\n\n")
        );
    }
}

/// A generated request id: 24 hex digits (see `proxy::headers`).
fn is_generated_id(v: &str) -> bool {
    v.len() == 24 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The header multiset with the allowed differences taken out: `date` and
/// `age` values (checked apart), generated request ids.
fn normal_form(r: &Raw) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|(n, v)| {
            let v = match n.as_str() {
                "date" => "<date>".to_string(),
                "age" => "<age>".to_string(),
                "x-request-id" if is_generated_id(v) => "<generated>".to_string(),
                // `[edge]` gives each new visitor an id of its own.
                "set-cookie" if v.starts_with("kvgate_uid=") => "<new visitor id>".to_string(),
                _ => v.clone(),
            };
            (n.clone(), v)
        })
        .collect();
    h.sort();
    h
}

/// The values of the field lines named `name`, in order.
fn ordered_values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Compares one response of each gateway; `None` when they agree.
fn response_differs(f: &Raw, n: &Raw) -> Option<String> {
    if f.status_line != n.status_line {
        return Some(format!(
            "status line {:?} vs {:?}",
            f.status_line, n.status_line
        ));
    }
    let (fh, nh) = (normal_form(f), normal_form(n));
    if fh != nh {
        let only_f: Vec<_> = fh.iter().filter(|x| !nh.contains(x)).collect();
        let only_n: Vec<_> = nh.iter().filter(|x| !fh.contains(x)).collect();
        return Some(format!(
            "header fields differ: only fast {only_f:?}, only normal {only_n:?} (or counts differ)"
        ));
    }
    // Field lines of one name keep their order (RFC 9110 5.3: it is their
    // combined value's); lines of different names may interleave freely.
    for (name, _) in &f.headers {
        let (a, b) = (
            ordered_values(&f.headers, name),
            ordered_values(&n.headers, name),
        );
        let normalised = matches!(
            name.as_str(),
            "date" | "age" | "x-request-id" | "set-cookie"
        );
        if a.len() > 1 && !normalised && a != b {
            return Some(format!(
                "the {name} lines come in another order: {a:?} vs {b:?}"
            ));
        }
    }
    if f.body != n.body {
        return Some(format!(
            "bodies differ ({} vs {} bytes)",
            f.body.len(),
            n.body.len()
        ));
    }
    let dates = |r: &Raw| -> Vec<Option<std::time::SystemTime>> {
        r.headers
            .iter()
            .filter(|(k, _)| k == "date")
            .map(|(_, v)| httpdate::parse_http_date(v).ok())
            .collect()
    };
    for (a, b) in dates(f).into_iter().zip(dates(n)) {
        let close = match (a, b) {
            (Some(a), Some(b)) => {
                let d = a.duration_since(b).or_else(|_| b.duration_since(a));
                d.is_ok_and(|d| d <= Duration::from_secs(1))
            }
            _ => false,
        };
        if !close {
            return Some("date values unparsable or more than 1 s apart".into());
        }
    }
    let age = |r: &Raw| r.header("age").map(|v| v.parse::<u64>().ok());
    match (age(f), age(n)) {
        (None, None) => {}
        (Some(Some(a)), Some(Some(b))) if a.abs_diff(b) <= 1 => {}
        (a, b) => return Some(format!("age {a:?} vs {b:?}")),
    }
    None
}

/// [`differential`] for one request (not HEAD) sent whole.
async fn one_request(
    pair: &Pair,
    found: &mut Findings,
    case: &str,
    req: &[u8],
    eligible: u64,
) -> (Exchange, Exchange) {
    differential(pair, found, case, req, &[false], Pace::Whole, eligible).await
}

/// Runs `req` on both gateways and records every difference, and whether
/// the fast-hit count moved by `eligible` on the fast gateway only.
async fn differential(
    pair: &Pair,
    found: &mut Findings,
    case: &str,
    req: &[u8],
    heads: &[bool],
    pace: Pace,
    eligible: u64,
) -> (Exchange, Exchange) {
    let before = pair.fast_hits().await;
    let fast = exchange(pair.fast.running.addr, req, heads, pace).await;
    let normal = exchange(pair.normal.running.addr, req, heads, pace).await;
    let after = pair.fast_hits().await;
    if std::env::var_os("FAST_HITS_DUMP").is_some() {
        eprintln!(
            "=== {case}\n{:?}\n--- fast:\n{fast:#?}\n--- normal:\n{normal:#?}",
            String::from_utf8_lossy(req)
        );
    }
    let shown = || {
        format!(
            "request bytes: {:?}\n--- fast gateway:\n{:#?}\n--- normal gateway:\n{:#?}",
            String::from_utf8_lossy(req),
            fast,
            normal
        )
    };
    found.check(fast.answers.len() == normal.answers.len(), || {
        format!("{case}: number of answers differs\n{}", shown())
    });
    for (i, (f, n)) in fast.answers.iter().zip(&normal.answers).enumerate() {
        let differs = match (f, n) {
            (Answer::Response(f), Answer::Response(n)) => response_differs(f, n),
            (Answer::Closed(a), Answer::Closed(b)) if a == b => None,
            (Answer::Stalled(a), Answer::Stalled(b)) if a == b => None,
            _ => Some("one answered, the other closed or stalled".into()),
        };
        found.check(differs.is_none(), || {
            format!(
                "{case}: answer {} differs: {}\n{}",
                i + 1,
                differs.unwrap_or_default(),
                shown()
            )
        });
    }
    for (who, x) in [("fast", &fast), ("normal", &normal)] {
        found.check(
            x.answers.len() == heads.len()
                && x.answers.iter().all(|a| matches!(a, Answer::Response(_))),
            || {
                format!(
                    "{case}: the {who} gateway did not answer every request\n{}",
                    shown()
                )
            },
        );
    }
    found.check(fast.after == normal.after, || {
        format!(
            "{case}: after the answers the fast connection is {:?}, the normal one {:?}",
            fast.after, normal.after
        )
    });
    found.check(eligible == ANY || after.0 - before.0 == eligible, || {
        format!(
            "{case}: kvgate_fast_hits_total grew by {} on the fast gateway, expected {eligible}",
            after.0 - before.0
        )
    });
    found.check(after.1 == before.1, || {
        format!(
            "{case}: kvgate_fast_hits_total grew by {} on the gateway with fast_hits = false",
            after.1 - before.1
        )
    });
    (fast, normal)
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n")
}

/// The first response of an exchange, when it is one.
fn first(x: &Exchange) -> Option<&Raw> {
    match x.answers.first() {
        Some(Answer::Response(r)) => Some(r),
        _ => None,
    }
}

fn x_cache(x: &Exchange) -> Vec<String> {
    x.answers
        .iter()
        .map(|a| match a {
            Answer::Response(r) => r.header("x-cache").unwrap_or("").to_string(),
            _ => "<none>".into(),
        })
        .collect()
}

// ---------------------------------------------------------------- cases

/// Cases 1-4, 14, 18, 19: hits the fast path must answer, alone, pipelined,
/// slowly, and around a miss that hands the connection over.
#[tokio::test]
async fn eligible_hits_are_answered_like_the_normal_path() {
    let origin = Origin::start(script).await;
    let pair = Pair::start(&origin.url(), |_| {}).await;
    for p in [
        "/static/x",
        "/static/y",
        "/static/z",
        "/missing",
        "/moved",
        "/big",
    ] {
        pair.warm(p, "").await;
    }
    let mut found = Findings::default();
    let counted = pair.series().await;

    // 1. A plain GET hit.
    let (fast, _) = one_request(
        &pair,
        &mut found,
        "1 GET hit",
        get("/static/x", "").as_bytes(),
        1,
    )
    .await;
    found.check(
        first(&fast).is_some_and(|r| r.header("x-cache") == Some("HIT")),
        || format!("1 GET hit: not a HIT on the fast gateway: {fast:?}"),
    );

    // 2. HEAD: the GET's content-length, no body.
    let (fast, _) = differential(
        &pair,
        &mut found,
        "2 HEAD hit",
        format!("HEAD /static/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
        &[true],
        Pace::Whole,
        1,
    )
    .await;
    let get_len = "static body of /static/x".len().to_string();
    found.check(
        first(&fast).is_some_and(|r| r.header("content-length") == Some(&get_len)),
        || format!("2 HEAD hit: content-length is not the GET's ({get_len}): {fast:?}"),
    );

    // 3. Three pipelined hits in one write, then one byte per write.
    let three = [
        get("/static/x", ""),
        get("/static/y", ""),
        get("/static/z", ""),
    ]
    .concat();
    for pace in [Pace::Whole, Pace::ByteByByte] {
        let (fast, _) = differential(
            &pair,
            &mut found,
            &format!("3 three pipelined hits ({pace:?})"),
            three.as_bytes(),
            &[false, false, false],
            pace,
            3,
        )
        .await;
        found.check(x_cache(&fast) == ["HIT", "HIT", "HIT"], || {
            format!(
                "3 ({pace:?}): X-Cache on the fast gateway {:?}",
                x_cache(&fast)
            )
        });
    }

    // 3, more: GET, HEAD, GET pipelined (HEAD framing between two bodies),
    // and fifty hits in one write (responses larger than one read).
    let mixed = [
        get("/static/x", ""),
        format!("HEAD /static/y HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
        get("/big", ""),
    ]
    .concat();
    differential(
        &pair,
        &mut found,
        "3 GET, HEAD, GET pipelined",
        mixed.as_bytes(),
        &[false, true, false],
        Pace::Whole,
        3,
    )
    .await;
    let bodies = [
        get("/big", ""),
        get("/static/x", ""),
        format!("HEAD /big HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
        get("/big", ""),
        get("/static/y", ""),
    ]
    .concat();
    differential(
        &pair,
        &mut found,
        "3 large and small bodies pipelined",
        bodies.as_bytes(),
        &[false, false, true, false, false],
        Pace::Whole,
        5,
    )
    .await;
    // More answers than the fast path buffers before writing.
    let many = get("/static/x", "").repeat(300);
    differential(
        &pair,
        &mut found,
        "3 three hundred pipelined hits",
        many.as_bytes(),
        &[false; 300],
        Pace::Whole,
        300,
    )
    .await;
    let fifty = get("/static/z", "").repeat(50);
    differential(
        &pair,
        &mut found,
        "3 fifty pipelined hits",
        fifty.as_bytes(),
        &[false; 50],
        Pace::Whole,
        50,
    )
    .await;

    // 4. Hit, miss, hit on one connection: the miss is relayed to hyper and
    // the connection stays on the fast path, so both hits are its own.
    for (pipelined, new) in [(false, "/new/one"), (true, "/new/two")] {
        let reqs = [get("/static/x", ""), get(new, ""), get("/static/y", "")];
        let case = format!("4 hit, miss, hit (pipelined: {pipelined})");
        let before = pair.fast_hits().await;
        let mut got = Vec::new();
        for gw in [&pair.fast, &pair.normal] {
            let mut c = Conn::open(gw.running.addr).await;
            let mut answers = Vec::new();
            if pipelined {
                c.send(reqs.concat().as_bytes(), Pace::Whole).await;
                answers = c.answers(&[false, false, false]).await;
            } else {
                for r in &reqs {
                    c.send(r.as_bytes(), Pace::Whole).await;
                    answers.extend(c.answers(&[false]).await);
                }
            }
            let after = c.after().await;
            got.push(Exchange { answers, after });
        }
        let after = pair.fast_hits().await;
        let (fast, normal) = (&got[0], &got[1]);
        found.check(x_cache(fast) == x_cache(normal), || {
            format!(
                "{case}: X-Cache {:?} vs {:?}",
                x_cache(fast),
                x_cache(normal)
            )
        });
        found.check(x_cache(normal) == ["HIT", "MISS", "HIT"], || {
            format!(
                "{case}: X-Cache on the normal gateway {:?}",
                x_cache(normal)
            )
        });
        for (i, (f, n)) in fast.answers.iter().zip(&normal.answers).enumerate() {
            let differs = match (f, n) {
                (Answer::Response(f), Answer::Response(n)) => response_differs(f, n),
                _ => Some("not both responses".into()),
            };
            found.check(differs.is_none(), || {
                format!(
                    "{case}: answer {} differs: {}\n--- fast:\n{f:#?}\n--- normal:\n{n:#?}",
                    i + 1,
                    differs.unwrap_or_default()
                )
            });
        }
        found.check(
            fast.after == After::Open && normal.after == After::Open,
            || {
                format!(
                    "{case}: after: fast {:?}, normal {:?}",
                    fast.after, normal.after
                )
            },
        );
        found.check(after.0 - before.0 == 2 && after.1 == before.1, || {
            format!(
                "{case}: fast hits grew by {:?}, expected (2, 0)",
                (after.0 - before.0, after.1 - before.1)
            )
        });
    }

    // 14. A valid X-Request-Id is echoed, an invalid one replaced.
    let (fast, _) = one_request(
        &pair,
        &mut found,
        "14 valid X-Request-Id",
        get("/static/x", "X-Request-Id: abc-123\r\n").as_bytes(),
        1,
    )
    .await;
    found.check(
        first(&fast).is_some_and(|r| r.header("x-request-id") == Some("abc-123")),
        || format!("14: valid id not echoed by the fast gateway: {fast:?}"),
    );
    let (fast, _) = one_request(
        &pair,
        &mut found,
        "14 invalid X-Request-Id",
        get("/static/x", "X-Request-Id: not valid{}\r\n").as_bytes(),
        1,
    )
    .await;
    found.check(
        first(&fast).is_some_and(|r| r.header("x-request-id").is_some_and(is_generated_id)),
        || format!("14: invalid id not replaced by the fast gateway: {fast:?}"),
    );
    one_request(
        &pair,
        &mut found,
        "14 two X-Request-Ids",
        get("/static/x", "X-Request-Id: a1\r\nX-Request-Id: a2\r\n").as_bytes(),
        1,
    )
    .await;

    // 18. Stored 404 and 301 are fresh hits like any other.
    for p in ["/missing", "/moved"] {
        one_request(
            &pair,
            &mut found,
            &format!("18 cached {p}"),
            get(p, "").as_bytes(),
            1,
        )
        .await;
    }

    // 19. A 100 KiB body, whole and as HEAD.
    let (fast, _) = one_request(
        &pair,
        &mut found,
        "19 100 KiB hit",
        get("/big", "").as_bytes(),
        1,
    )
    .await;
    found.check(
        first(&fast).is_some_and(|r| r.body.len() == BIG_BYTES),
        || "19: the fast gateway's body is not 100 KiB".into(),
    );
    pair.check_counted_alike(&mut found, &counted).await;

    found.finish();
}

/// Cases 5-10, 13, 15: requests the fast path must hand over, with the
/// answers the normal path gives.
#[tokio::test]
async fn ineligible_requests_are_handed_over() {
    let origin = Origin::start(script).await;
    let pair = Pair::start(&origin.url(), |_| {}).await;
    for p in ["/static/x", "/static/y", "/reval"] {
        pair.warm(p, "").await;
    }
    pair.warm("/vary", "Accept-Language: en\r\n").await;
    pair.warm("/vary", "Accept-Language: de\r\n").await;
    let mut found = Findings::default();
    let counted = pair.series().await;

    // 5. If-None-Match, matching (304) and not.
    let (fast, _) = one_request(
        &pair,
        &mut found,
        "5 If-None-Match matching",
        get("/static/x", &format!("If-None-Match: {ETAG}\r\n")).as_bytes(),
        0,
    )
    .await;
    found.check(first(&fast).is_some_and(|r| r.status() == 304), || {
        format!("5: no 304 from the fast gateway: {fast:?}")
    });
    one_request(
        &pair,
        &mut found,
        "5 If-None-Match not matching",
        get("/static/x", "If-None-Match: \"other\"\r\n").as_bytes(),
        0,
    )
    .await;

    // 6. A byte range.
    let (fast, _) = one_request(
        &pair,
        &mut found,
        "6 Range",
        get("/static/x", "Range: bytes=0-9\r\n").as_bytes(),
        0,
    )
    .await;
    found.check(first(&fast).is_some_and(|r| r.status() == 206), || {
        format!("6: no 206 from the fast gateway: {fast:?}")
    });

    // 7. Cache-Control: no-cache revalidates on both: one origin request each.
    let before = origin.count("/reval");
    let (fast, normal) = one_request(
        &pair,
        &mut found,
        "7 Cache-Control: no-cache",
        get("/reval", "Cache-Control: no-cache\r\n").as_bytes(),
        0,
    )
    .await;
    found.check(origin.count("/reval") - before == 2, || {
        format!(
            "7: the origin saw {} revalidations, expected one per gateway",
            origin.count("/reval") - before
        )
    });
    found.check(x_cache(&fast) == x_cache(&normal), || {
        format!("7: X-Cache {:?} vs {:?}", x_cache(&fast), x_cache(&normal))
    });

    // 8. HTTP/1.0.
    one_request(
        &pair,
        &mut found,
        "8 HTTP/1.0",
        format!("GET /static/x HTTP/1.0\r\nHost: {HOST}\r\n\r\n").as_bytes(),
        0,
    )
    .await;
    differential(
        &pair,
        &mut found,
        "8 HTTP/1.0 keep-alive",
        format!("GET /static/x HTTP/1.0\r\nHost: {HOST}\r\nConnection: keep-alive\r\n\r\n")
            .as_bytes(),
        &[false],
        Pace::Whole,
        0,
    )
    .await;

    // 9. Connection: close, alone and after a fast hit.
    let (fast, _) = one_request(
        &pair,
        &mut found,
        "9 Connection: close",
        get("/static/x", "Connection: close\r\n").as_bytes(),
        0,
    )
    .await;
    found.check(fast.after == After::Closed, || {
        format!(
            "9: the fast gateway's connection is {:?} after Connection: close",
            fast.after
        )
    });
    differential(
        &pair,
        &mut found,
        "9 hit then Connection: close, pipelined",
        [
            get("/static/y", ""),
            get("/static/x", "Connection: close\r\n"),
        ]
        .concat()
        .as_bytes(),
        &[false, false],
        Pace::Whole,
        1,
    )
    .await;

    // 10. Missing, doubled and invalid Host: 400.
    for (what, req) in [
        ("missing Host", "GET /static/x HTTP/1.1\r\n\r\n".to_string()),
        (
            "two Hosts",
            format!("GET /static/x HTTP/1.1\r\nHost: {HOST}\r\nHost: {HOST}\r\n\r\n"),
        ),
        (
            "invalid Host",
            "GET /static/x HTTP/1.1\r\nHost: user@evil\r\n\r\n".to_string(),
        ),
        (
            "empty Host",
            "GET /static/x HTTP/1.1\r\nHost: \r\n\r\n".to_string(),
        ),
    ] {
        let (fast, _) =
            one_request(&pair, &mut found, &format!("10 {what}"), req.as_bytes(), 0).await;
        found.check(first(&fast).is_some_and(|r| r.status() == 400), || {
            format!("10 {what}: no 400 from the fast gateway: {fast:?}")
        });
    }

    // 13. Bodies: POST, and GET with chunked or Content-Length framing,
    // each followed by a hit on the same connection.
    let post = format!(
        "POST /post HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n\r\nhello{}",
        get("/static/x", "")
    );
    differential(
        &pair,
        &mut found,
        "13 POST with a body, then a hit",
        post.as_bytes(),
        &[false, false],
        Pace::Whole,
        0,
    )
    .await;
    let chunked = format!(
        "GET /static/x HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{}",
        get("/static/y", "")
    );
    differential(
        &pair,
        &mut found,
        "13 GET with a chunked body, then a hit",
        chunked.as_bytes(),
        &[false, false],
        Pace::Whole,
        0,
    )
    .await;
    let with_length = format!(
        "GET /static/x HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n\r\nhello{}",
        get("/static/y", "")
    );
    differential(
        &pair,
        &mut found,
        "13 GET with Content-Length: 5, then a hit",
        with_length.as_bytes(),
        &[false, false],
        Pace::Whole,
        0,
    )
    .await;
    one_request(
        &pair,
        &mut found,
        "13 GET with Content-Length: 0",
        get("/static/x", "Content-Length: 0\r\n").as_bytes(),
        0,
    )
    .await;

    // 15. A Vary'd stored response, two languages.
    for lang in ["en", "de"] {
        let (fast, _) = one_request(
            &pair,
            &mut found,
            &format!("15 Vary, Accept-Language: {lang}"),
            get("/vary", &format!("Accept-Language: {lang}\r\n")).as_bytes(),
            0,
        )
        .await;
        let want = format!("language {lang}");
        found.check(
            first(&fast).is_some_and(|r| r.body == want.as_bytes()),
            || format!("15: wrong variant from the fast gateway for {lang}: {fast:?}"),
        );
    }

    // Other fields the contract names: each hands the request over.
    for (what, extra) in [
        ("Upgrade", "Upgrade: websocket\r\n"),
        ("Expect", "Expect: 100-continue\r\n"),
        ("TE", "TE: trailers\r\n"),
        ("Pragma", "Pragma: no-cache\r\n"),
        (
            "If-Modified-Since",
            "If-Modified-Since: Thu, 01 Jan 2099 00:00:00 GMT\r\n",
        ),
        ("Connection: keep-alive", "Connection: keep-alive\r\n"),
    ] {
        one_request(
            &pair,
            &mut found,
            &format!("ineligible field {what}"),
            get("/static/x", extra).as_bytes(),
            0,
        )
        .await;
    }
    // Absolute-form and a method other than GET / HEAD.
    one_request(
        &pair,
        &mut found,
        "absolute-form target",
        format!("GET http://{HOST}/static/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
        0,
    )
    .await;
    one_request(
        &pair,
        &mut found,
        "OPTIONS",
        format!("OPTIONS /static/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
        0,
    )
    .await;

    // Spellings at the edge of the grammar: the fast path may answer some
    // of them (no count is asserted), but the answers must be the same.
    for (what, req, eligible) in [
        (
            "lowercase method",
            format!("get /static/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            0,
        ),
        (
            "HTTP/1.2",
            format!("GET /static/x HTTP/1.2\r\nHost: {HOST}\r\n\r\n"),
            0,
        ),
        (
            "HTTP/2.0 request line",
            format!("GET /static/x HTTP/2.0\r\nHost: {HOST}\r\n\r\n"),
            0,
        ),
        (
            "fragment in the target",
            format!("GET /static/x#f HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            ANY,
        ),
        (
            "space in the target",
            format!("GET /static/x y HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            0,
        ),
        (
            "bare LF line ends",
            format!("GET /static/x HTTP/1.1\nHost: {HOST}\n\n"),
            ANY,
        ),
        (
            "an empty line first",
            format!("\r\nGET /static/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            ANY,
        ),
        (
            "upper-case HOST, no space",
            format!("GET /static/x HTTP/1.1\r\nHOST:{HOST}\r\n\r\n"),
            ANY,
        ),
        (
            "Host with a port",
            format!("GET /static/x HTTP/1.1\r\nHost: {HOST}:80\r\n\r\n"),
            ANY,
        ),
        (
            "Host in upper case",
            format!(
                "GET /static/x HTTP/1.1\r\nHost: {}\r\n\r\n",
                HOST.to_uppercase()
            ),
            ANY,
        ),
        (
            "obs-fold",
            format!("GET /static/x HTTP/1.1\r\nHost: {HOST}\r\nX-A: a\r\n b\r\n\r\n"),
            ANY,
        ),
        (
            "space before the colon",
            format!("GET /static/x HTTP/1.1\r\nHost : {HOST}\r\n\r\n"),
            0,
        ),
        (
            "NUL in a value",
            format!("GET /static/x HTTP/1.1\r\nHost: {HOST}\r\nX-A: a\0b\r\n\r\n"),
            0,
        ),
        (
            "Authorization",
            get("/static/x", "Authorization: Bearer t\r\n"),
            ANY,
        ),
        ("Cookie", get("/static/x", "Cookie: a=b\r\n"), ANY),
        (
            "X-Forwarded-For",
            get("/static/x", "X-Forwarded-For: 192.0.2.1\r\n"),
            ANY,
        ),
        ("If-Match", get("/static/x", "If-Match: \"v1\"\r\n"), 0),
        ("If-Range", get("/static/x", "If-Range: \"v1\"\r\n"), 0),
        ("Max-Forwards", get("/static/x", "Max-Forwards: 0\r\n"), ANY),
        (
            "Content-Length and Transfer-Encoding",
            get(
                "/static/x",
                "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
            ),
            0,
        ),
        (
            "Transfer-Encoding: identity",
            get("/static/x", "Transfer-Encoding: identity\r\n"),
            0,
        ),
    ] {
        one_request(
            &pair,
            &mut found,
            &format!("grammar: {what}"),
            req.as_bytes(),
            eligible,
        )
        .await;
    }
    // Shut for writing right after the requests: hyper (no half-close)
    // and the fast path must agree on what is answered (a relayed miss
    // is dropped when the close is read, as hyper drops it).
    let three_hits = get("/static/x", "").repeat(3);
    let hit_then_miss = [get("/static/x", ""), get("/new/half", "")].concat();
    for (what, req, heads) in [
        ("a hit", get("/static/x", ""), &[false][..]),
        ("three hits", three_hits, &[false; 3][..]),
        ("a hit and a miss", hit_then_miss, &[false; 2][..]),
    ] {
        let before = pair.fast_hits().await;
        let mut half_closed = Vec::new();
        for gw in [&pair.fast, &pair.normal] {
            let mut c = Conn::open(gw.running.addr).await;
            c.send(req.as_bytes(), Pace::Whole).await;
            let _ = c.s.shutdown().await;
            half_closed.push(c.answers(heads).await);
        }
        let after = pair.fast_hits().await;
        if std::env::var_os("FAST_HITS_DUMP").is_some() {
            eprintln!("=== half-closed after {what}\n{half_closed:#?}");
        }
        let (fast, normal) = (&half_closed[0], &half_closed[1]);
        let same = fast.len() == normal.len()
            && fast.iter().zip(normal).all(|pair| match pair {
                (Answer::Response(f), Answer::Response(n)) => response_differs(f, n).is_none(),
                (Answer::Closed(a), Answer::Closed(b)) => a == b,
                _ => false,
            });
        found.check(same && after.1 == before.1, || {
            format!(
                "half-closed client after {what}: fast {:#?}\nnormal {:#?}",
                half_closed[0], half_closed[1]
            )
        });
    }
    // A hit, then bytes that are no request: hyper refuses them after the
    // hit's answer on both.
    differential(
        &pair,
        &mut found,
        "a hit, then garbage",
        [get("/static/y", ""), "NOT A REQUEST\r\n\r\n".to_string()]
            .concat()
            .as_bytes(),
        &[false, false],
        Pace::Whole,
        1,
    )
    .await;
    pair.check_counted_alike(&mut found, &counted).await;

    found.finish();
}

/// Cases 11, 12: targets not in normal form, and the size limits.
#[tokio::test]
async fn targets_and_limits_match_the_normal_path() {
    let origin = Origin::start(script).await;
    let pair = Pair::start(&origin.url(), |_| {}).await;
    pair.warm("/static/x", "").await;
    let mut found = Findings::default();

    // 11. Dot segments and encodings: the same answer and X-Cache.
    for target in ["/a/../static/x", "/%73tatic/x", "//static/x", "/static/./x"] {
        let (fast, normal) = one_request(
            &pair,
            &mut found,
            &format!("11 target {target}"),
            get(target, "").as_bytes(),
            0,
        )
        .await;
        found.check(x_cache(&fast) == x_cache(&normal), || {
            format!(
                "11 {target}: X-Cache {:?} vs {:?}",
                x_cache(&fast),
                x_cache(&normal)
            )
        });
    }
    // Targets the fast path takes as they are, which hyper's URI parser
    // might not: stored through the normal path first, then compared.
    for target in [
        "/static/x?",
        "/static/x?a=1&b=2",
        "/static/x?a=%41",
        "/static/x;p=1",
        "/static/x@y:z",
        "/static/x!$'()*+,=",
        "/static/~x_y-z.w",
    ] {
        for gw in [&pair.fast, &pair.normal] {
            for _ in 0..2 {
                let mut c = Conn::open(gw.running.addr).await;
                c.send(get(target, "Pragma: warm\r\n").as_bytes(), Pace::Whole)
                    .await;
                let _ = c.answer(false).await;
            }
        }
        let (fast, normal) = one_request(
            &pair,
            &mut found,
            &format!("11 stored target {target}"),
            get(target, "").as_bytes(),
            ANY,
        )
        .await;
        found.check(x_cache(&fast) == x_cache(&normal), || {
            format!(
                "11 {target}: X-Cache {:?} vs {:?}",
                x_cache(&fast),
                x_cache(&normal)
            )
        });
    }
    // A query is part of the normal form as sent: a new key, then a hit.
    pair.warm("/static/x?q=1", "").await;
    one_request(
        &pair,
        &mut found,
        "11 query hit",
        get("/static/x?q=1", "").as_bytes(),
        1,
    )
    .await;

    // 12. A target over max_uri_bytes (414), a head over max_header_bytes
    // (431), too many fields (431), and a large head within the limit.
    let long = format!("/static/{}", "a".repeat(MAX_URI_BYTES));
    let (fast, _) = one_request(
        &pair,
        &mut found,
        "12 target over max_uri_bytes",
        get(&long, "").as_bytes(),
        0,
    )
    .await;
    found.check(first(&fast).is_some_and(|r| r.status() == 414), || {
        format!("12: no 414 from the fast gateway: {fast:?}")
    });
    let big_field = format!("X-Filler: {}\r\n", "b".repeat(MAX_HEADER_BYTES + 1024));
    let (fast, _) = one_request(
        &pair,
        &mut found,
        "12 head over max_header_bytes",
        get("/static/x", &big_field).as_bytes(),
        0,
    )
    .await;
    found.check(first(&fast).is_some_and(|r| r.status() == 431), || {
        format!("12: no 431 from the fast gateway: {fast:?}")
    });
    let many: String = (0..120).map(|i| format!("X-F{i}: v\r\n")).collect();
    one_request(
        &pair,
        &mut found,
        "12 120 header fields",
        get("/static/x", &many).as_bytes(),
        0,
    )
    .await;
    let sixty: String = (0..60).map(|i| format!("X-F{i}: v\r\n")).collect();
    one_request(
        &pair,
        &mut found,
        "12 60 header fields (fewer than hyper's 100)",
        get("/static/x", &sixty).as_bytes(),
        ANY,
    )
    .await;
    let mut obs_text = get("/static/x", "X-Request-Id: caf\u{e9}\r\n").into_bytes();
    // Latin-1 0xE9, not UTF-8: obs-text (RFC 9110 5.5).
    if let Some(i) = obs_text.windows(2).position(|w| w == "\u{e9}".as_bytes()) {
        obs_text.splice(i..i + 2, [0xE9]);
    }
    one_request(
        &pair,
        &mut found,
        "12 obs-text in X-Request-Id",
        &obs_text,
        ANY,
    )
    .await;
    let within = format!("X-Filler: {}\r\n", "c".repeat(MAX_HEADER_BYTES / 2));
    one_request(
        &pair,
        &mut found,
        "12 head within max_header_bytes",
        get("/static/x", &within).as_bytes(),
        1,
    )
    .await;

    found.finish();
}

/// Case 16: stale entries (no fast hit) and case 17: a stored response
/// without `Date`.
#[tokio::test]
async fn stale_entries_and_a_response_without_date() {
    let origin = Origin::start(script).await;
    let pair = Pair::start(&origin.url(), |_| {}).await;
    pair.warm("/stale", "").await;
    pair.warm("/swr", "").await;

    // 17, meanwhile: an origin that sends no Date (hyper always would).
    let raw = RawOrigin::start(
        b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-type: text/plain\r\ncontent-length: 12\r\nconnection: close\r\n\r\nno date here",
        Duration::ZERO,
    )
    .await;
    let undated = Pair::start(&raw.url(), |_| {}).await;
    undated.warm("/undated", "").await;
    let mut found = Findings::default();
    let (fast, _) = one_request(
        &undated,
        &mut found,
        "17 stored response without Date",
        get("/undated", "").as_bytes(),
        1,
    )
    .await;
    found.check(
        first(&fast).is_some_and(|r| r.headers.iter().filter(|(n, _)| n == "date").count() == 1),
        || format!("17: the fast gateway's answer has not exactly one date: {fast:?}"),
    );

    // 16. Past max-age=1.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before = origin.count("/stale");
    let (fast, normal) = one_request(
        &pair,
        &mut found,
        "16 stale entry",
        get("/stale", "").as_bytes(),
        0,
    )
    .await;
    found.check(x_cache(&fast) == x_cache(&normal), || {
        format!("16: X-Cache {:?} vs {:?}", x_cache(&fast), x_cache(&normal))
    });
    found.check(origin.count("/stale") - before == 2, || {
        format!(
            "16: the origin saw {} requests for the stale entry, expected one per gateway",
            origin.count("/stale") - before
        )
    });
    let (fast, normal) = one_request(
        &pair,
        &mut found,
        "16 stale-while-revalidate",
        get("/swr", "").as_bytes(),
        0,
    )
    .await;
    found.check(x_cache(&fast) == x_cache(&normal), || {
        format!(
            "16 swr: X-Cache {:?} vs {:?}",
            x_cache(&fast),
            x_cache(&normal)
        )
    });

    found.finish();
}

/// Case 20: HTTP/2 with prior knowledge still works on the fast gateway.
#[tokio::test]
async fn h2_prior_knowledge_is_still_served() {
    let origin = Origin::start(script).await;
    let pair = Pair::start(&origin.url(), |_| {}).await;
    pair.warm("/static/x", "").await;
    let mut found = Findings::default();
    let before = pair.fast_hits().await;
    let mut got = Vec::new();
    for gw in [&pair.fast, &pair.normal] {
        let tcp = TcpStream::connect(gw.running.addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        let req = http::Request::get(format!("http://{HOST}/static/x"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = tokio::time::timeout(READ_LIMIT, sender.send_request(req))
            .await
            .expect("h2 answer in time")
            .expect("h2 response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        let mut headers: Vec<(String, String)> = parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        headers.sort();
        got.push(Raw {
            status_line: format!("{:?} {}", parts.version, parts.status),
            headers,
            body: body.to_vec(),
        });
    }
    let after = pair.fast_hits().await;
    found.check(response_differs(&got[0], &got[1]).is_none(), || {
        format!(
            "20 h2: {}\n--- fast:\n{:#?}\n--- normal:\n{:#?}",
            response_differs(&got[0], &got[1]).unwrap_or_default(),
            got[0],
            got[1]
        )
    });
    found.check(
        got[0].status() == 200 && got[0].header("x-cache") == Some("HIT"),
        || format!("20 h2: not a 200 HIT from the fast gateway: {:?}", got[0]),
    );
    found.check(after.0 == before.0 && after.1 == before.1, || {
        "20 h2: an h2 request moved kvgate_fast_hits_total".into()
    });
    // The bare preface: both answer the same bytes (a SETTINGS frame).
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut first_bytes = Vec::new();
    for gw in [&pair.fast, &pair.normal] {
        let mut c = Conn::open(gw.running.addr).await;
        c.send(preface, Pace::Whole).await;
        let _ = c.more().await;
        first_bytes.push(c.buf.clone());
    }
    found.check(
        !first_bytes[0].is_empty() && first_bytes[0] == first_bytes[1],
        || {
            format!(
                "20 preface: fast answered {:?}, normal {:?}",
                first_bytes[0], first_bytes[1]
            )
        },
    );
    found.finish();
}

/// Liveness: a half-sent head is cut after `header_read_timeout_ms`, an
/// idle keep-alive connection after `idle_timeout_ms`, on both gateways.
#[tokio::test]
async fn stalled_and_idle_connections_are_closed() {
    const HEADER_READ_MS: u64 = 300;
    const IDLE_MS: u64 = 600;
    let origin = Origin::start(script).await;
    let pair = Pair::start(&origin.url(), |c| {
        c.server.header_read_timeout_ms = HEADER_READ_MS;
        c.server.idle_timeout_ms = IDLE_MS;
    })
    .await;
    pair.warm("/static/x", "").await;
    let mut found = Findings::default();

    /// How long until the peer closed, or `None` if not within 2 s.
    async fn closed_within(c: &mut Conn) -> Option<Duration> {
        let start = Instant::now();
        let deadline = Duration::from_secs(2);
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(
                deadline.saturating_sub(start.elapsed()),
                c.s.read(&mut chunk),
            )
            .await
            {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }

    for (who, gw) in [("fast", &pair.fast), ("normal", &pair.normal)] {
        // Half a head, then nothing.
        let mut c = Conn::open(gw.running.addr).await;
        c.send(
            format!("GET /static/x HTTP/1.1\r\nHost: {HOST}\r\n").as_bytes(),
            Pace::Whole,
        )
        .await;
        let took = closed_within(&mut c).await;
        found.check(
            took.is_some_and(|t| t >= Duration::from_millis(HEADER_READ_MS - 50)),
            || format!("liveness: the {who} gateway closed a half-sent head after {took:?}, expected about {HEADER_READ_MS} ms"),
        );

        // A hit, then idle.
        let mut c = Conn::open(gw.running.addr).await;
        c.send(get("/static/x", "").as_bytes(), Pace::Whole).await;
        let a = c.answer(false).await;
        found.check(
            matches!(&a, Answer::Response(r) if r.status() == 200),
            || format!("liveness: the {who} gateway did not answer the hit: {a:?}"),
        );
        let took = closed_within(&mut c).await;
        found.check(
            took.is_some_and(|t| t >= Duration::from_millis(IDLE_MS - 100)),
            || format!("liveness: the {who} gateway closed an idle connection after {took:?}, expected about {IDLE_MS} ms"),
        );

        // A hit, then half of the next head: bounded by the idle limit.
        let mut c = Conn::open(gw.running.addr).await;
        c.send(get("/static/x", "").as_bytes(), Pace::Whole).await;
        let _ = c.answer(false).await;
        c.send(
            format!("GET /static/x HTTP/1.1\r\nHost: {HOST}\r\n").as_bytes(),
            Pace::Whole,
        )
        .await;
        let took = closed_within(&mut c).await;
        found.check(took.is_some(), || {
            format!("liveness: the {who} gateway kept a half-sent second head open past 2 s")
        });
    }
    // A whole head trickling in slower than header_read_timeout allows:
    // both gateways must treat it alike (hyper's watchdog counts from the
    // accept, the fast path's too).
    let mut outcomes = Vec::new();
    for gw in [&pair.fast, &pair.normal] {
        let mut c = Conn::open(gw.running.addr).await;
        let head = get("/static/x", "");
        for b in head.as_bytes() {
            c.send(std::slice::from_ref(b), Pace::Whole).await;
            tokio::time::sleep(Duration::from_millis(
                HEADER_READ_MS * 2 / head.len() as u64 + 1,
            ))
            .await;
        }
        outcomes.push(match c.answer(false).await {
            Answer::Response(r) => format!("answered {}", r.status_line),
            Answer::Closed(b) => format!("closed after {} bytes", b.len()),
            Answer::Stalled(b) => format!("stalled after {} bytes", b.len()),
        });
    }
    if std::env::var_os("FAST_HITS_DUMP").is_some() {
        eprintln!("=== trickled head: {outcomes:?}");
    }
    found.check(outcomes[0] == outcomes[1], || {
        format!(
            "liveness: a trickled head: fast {}, normal {}",
            outcomes[0], outcomes[1]
        )
    });
    found.finish();
}

/// The comparison itself: each allowed difference passes, anything else
/// is caught, and chunked bodies decode.
#[test]
fn the_comparison_catches_differences() {
    let base = Raw {
        status_line: "HTTP/1.1 200 OK".into(),
        headers: vec![
            ("content-length".into(), "2".into()),
            ("date".into(), "Thu, 26 Nov 2026 02:31:11 GMT".into()),
            ("age".into(), "3".into()),
            ("x-request-id".into(), "866de98eb986edd000000030".into()),
            ("x-cache".into(), "HIT".into()),
        ],
        body: b"ok".to_vec(),
    };
    let with = |f: &dyn Fn(&mut Raw)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };
    let set = |name: &'static str, value: &'static str| {
        move |r: &mut Raw| {
            for (n, v) in &mut r.headers {
                if n == name {
                    *v = value.into();
                }
            }
        }
    };
    // Allowed: another order, a date a second off, age one off, another
    // generated id.
    let mut reordered = base.clone();
    reordered.headers.reverse();
    assert!(response_differs(&base, &reordered).is_none());
    for allowed in [
        with(&set("date", "Thu, 26 Nov 2026 02:31:12 GMT")),
        with(&set("age", "4")),
        with(&set("x-request-id", "0123456789abcdef01234567")),
    ] {
        assert!(response_differs(&base, &allowed).is_none(), "{allowed:?}");
    }
    // Caught: everything else.
    for caught in [
        with(&|r| r.status_line = "HTTP/1.1 200 Ok".into()),
        with(&|r| r.body = b"OK".to_vec()),
        with(&set("date", "Thu, 26 Nov 2026 02:31:14 GMT")),
        with(&set("age", "5")),
        with(&set("age", "three")),
        with(&set("x-request-id", "abc-123")),
        with(&set("x-cache", "MISS")),
        with(&|r| r.headers.retain(|(n, _)| n != "date")),
        with(&|r| r.headers.push(("x-cache".into(), "HIT".into()))),
    ] {
        assert!(response_differs(&base, &caught).is_some(), "{caught:?}");
    }
    // Lines of one name keep their order; other names may move around them.
    let mut two_vias = base.clone();
    two_vias.headers.push(("via".into(), "1.1 upstream".into()));
    two_vias.headers.push(("x-other".into(), "between".into()));
    two_vias.headers.push(("via".into(), "1.1 kvgate".into()));
    let mut moved = two_vias.clone();
    moved.headers.swap(5, 6);
    assert!(response_differs(&two_vias, &moved).is_none(), "{moved:?}");
    let mut swapped = two_vias.clone();
    swapped.headers.swap(5, 7);
    assert!(
        response_differs(&two_vias, &swapped).is_some(),
        "{swapped:?}"
    );
    let (body, used) = dechunk(b"5\r\nhello\r\n1;x=y\r\n!\r\n0\r\n\r\nrest").expect("whole");
    assert_eq!((body.as_slice(), used), (&b"hello!"[..], 25));
    assert!(dechunk(b"5\r\nhel").is_none());
}

/// What the fast path serves follows purges and version bumps at once,
/// and it stays off wherever the contract turns it off: bypass routes,
/// `[tracing]`; with the access log on it answers and logs. (`[edge]`
/// keeps it on: `edge_hits_are_answered_like_the_normal_path`.)
#[tokio::test]
async fn purges_versions_routes_and_configuration() {
    let origin = Origin::start(script).await;
    let routes = Config::parse(
        "[[route]]\nname = \"private\"\nprefix = \"/private/\"\nbypass = true\n[[route]]\nname = \"pages\"\nprefix = \"/pages/\"\nttl_secs = 600\n",
        "routes.toml",
    )
    .expect("routes parse")
    .routes;
    let pair = Pair::start(&origin.url(), |c| c.routes = routes.clone()).await;
    pair.warm("/static/x", "").await;
    pair.warm("/pages/a", "").await;
    let mut found = Findings::default();
    let hit = get("/static/x", "");

    one_request(
        &pair,
        &mut found,
        "route with a ttl",
        get("/pages/a", "").as_bytes(),
        1,
    )
    .await;
    one_request(
        &pair,
        &mut found,
        "bypass route",
        get("/private/a", "").as_bytes(),
        0,
    )
    .await;

    for (what, path, body) in [
        ("purge by URL", "/purge", r#"{"urls": ["/static/x"]}"#),
        (
            "soft purge",
            "/purge",
            r#"{"urls": ["/static/x"], "soft": true}"#,
        ),
        ("version bump", "/version", ""),
    ] {
        for gw in [&pair.fast, &pair.normal] {
            let r = gw.admin(TOKEN, http::Method::POST, path, body).await;
            assert_eq!(r.status, 200, "{what}: {}", r.text());
        }
        let (fast, normal) = one_request(
            &pair,
            &mut found,
            &format!("first request after a {what}"),
            hit.as_bytes(),
            0,
        )
        .await;
        found.check(
            x_cache(&fast) == x_cache(&normal) && x_cache(&fast) != ["HIT"],
            || {
                format!(
                    "{what}: X-Cache {:?} vs {:?}",
                    x_cache(&fast),
                    x_cache(&normal)
                )
            },
        );
        pair.warm("/static/x", "").await;
        one_request(
            &pair,
            &mut found,
            &format!("hit after a {what}"),
            hit.as_bytes(),
            1,
        )
        .await;
    }

    // Configurations under which the fast path must not answer at all.
    let tracing_to = refused_url().await;
    type Tweak = Box<dyn Fn(&mut Config)>;
    // The access log is on when configured and its target enabled (as on
    // the normal path): a subscriber for it, into a buffer. Global, but
    // only this test's gateway sets `log.access`.
    let access_lines = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("kvgate::access=info"))
        .with_ansi(false)
        .with_writer({
            let c = access_lines.clone();
            move || c.clone()
        })
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    // The access log keeps the fast path on: a fast hit writes the line a
    // usual hit writes (`tests/reload.rs` compares their fields).
    let logged = Pair::start(&origin.url(), |c| c.log.access = true).await;
    logged.warm("/static/x", "").await;
    let hit_lines = || {
        access_lines
            .text()
            .lines()
            .filter(|l| l.contains("path=/static/x") && l.contains("HIT"))
            .count()
    };
    let before = hit_lines();
    one_request(
        &logged,
        &mut found,
        "with the access log",
        hit.as_bytes(),
        1,
    )
    .await;
    // The same lines from both gateways (the comparison sends the hit
    // more than once on each).
    let logged_hits = hit_lines() - before;
    found.check(logged_hits >= 2 && logged_hits % 2 == 0, || {
        format!(
            "as many access lines from each gateway for the hit, got {}: {}",
            hit_lines() - before,
            access_lines.text()
        )
    });
    let offs: Vec<(&str, Tweak)> = vec![(
        "[tracing]",
        Box::new(move |c: &mut Config| {
            c.tracing.otlp_endpoint = Some(toml::Spanned::new(0..0, tracing_to.clone()));
        }),
    )];
    for (what, tweak) in offs {
        let off = Pair::start(&origin.url(), |c| tweak(c)).await;
        off.warm("/static/x", "").await;
        let (fast, _) = one_request(
            &off,
            &mut found,
            &format!("fast path off with {what}"),
            hit.as_bytes(),
            0,
        )
        .await;
        found.check(x_cache(&fast) == ["HIT"], || {
            format!("{what}: not a hit at all, the case proves nothing: {fast:?}")
        });
    }
    found.finish();
}

/// Log output kept in memory.
#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A config reload (`POST /reload`) reaches the fast path with the next
/// request: a lowered `max_uri_bytes` refuses a stored long target (414)
/// as the normal path does, and `fast_hits = false` turns it off.
#[tokio::test]
async fn a_reload_reaches_the_fast_path() {
    let origin = Origin::start(script).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, fast: bool, max_uri: usize| {
        let path = dir.path().join(name);
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nfast_hits = {fast}\nmax_uri_bytes = {max_uri}\n\
             max_header_bytes = {MAX_HEADER_BYTES}\n[origin]\nurl = \"{}\"\n[log]\naccess = false\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n",
            origin.url()
        );
        std::fs::write(&path, text).expect("config written");
        path
    };
    let origin_url = origin.url();
    let start = |path: std::path::PathBuf| {
        Gateway::start(&origin_url, move |c| {
            *c = Config::load(&path).expect("config loads");
        })
    };
    let pair = Pair {
        fast: start(write("fast.toml", true, MAX_URI_BYTES)).await,
        normal: start(write("normal.toml", false, MAX_URI_BYTES)).await,
    };
    let reload = || async {
        for gw in [&pair.fast, &pair.normal] {
            let r = gw.admin(TOKEN, http::Method::POST, "/reload", "").await;
            assert_eq!(r.status, 200, "reload: {}", r.text());
        }
    };
    let long = format!("/static/{}", "l".repeat(MAX_URI_BYTES / 2));
    pair.warm("/static/x", "").await;
    pair.warm(&long, "").await;
    let mut found = Findings::default();
    one_request(
        &pair,
        &mut found,
        "long target before the reload",
        get(&long, "").as_bytes(),
        1,
    )
    .await;

    write("fast.toml", true, 100);
    write("normal.toml", false, 100);
    reload().await;
    let (fast, _) = one_request(
        &pair,
        &mut found,
        "stored long target after max_uri_bytes = 100",
        get(&long, "").as_bytes(),
        0,
    )
    .await;
    found.check(first(&fast).is_some_and(|r| r.status() == 414), || {
        format!(
            "reload: the fast gateway serves a target over the reloaded max_uri_bytes: {fast:?}"
        )
    });
    one_request(
        &pair,
        &mut found,
        "short target after the reload",
        get("/static/x", "").as_bytes(),
        1,
    )
    .await;

    write("fast.toml", false, 100);
    reload().await;
    one_request(
        &pair,
        &mut found,
        "hit after a reload to fast_hits = false",
        get("/static/x", "").as_bytes(),
        0,
    )
    .await;
    found.finish();
}

/// Stored responses of every shape: tags (stripped), unusual statuses, an
/// empty body, the origin's own `Age`, `Expires` and heuristic freshness,
/// hop-by-hop fields the origin named, `s-maxage`, and what the origin
/// sent with a custom reason phrase, chunked, or delimited by its close.
#[tokio::test]
async fn stored_response_shapes() {
    let origin = Origin::start(script).await;
    let pair = Pair::start(&origin.url(), |_| {}).await;
    let mut found = Findings::default();
    // Stored and fresh: the fast path's (eligible 1); ANY where the
    // contract leaves it open (hyper frames 204 itself) or the normal path
    // may not store it.
    for (path, eligible) in [
        ("/tagged", 1),
        ("/s203", 1),
        ("/s410", 1),
        ("/empty", 1),
        ("/aged", 1),
        ("/expires", 1),
        ("/hop", 1),
        ("/s-maxage", 1),
        ("/s204", ANY),
        ("/s299", ANY),
        ("/lastmod", ANY),
        ("/upstream-marks", 1),
        ("/private", ANY),
        ("/vary-empty", ANY),
        ("/vary-star", ANY),
        ("/vary-encoding", 0),
        ("/nocache", ANY),
    ] {
        // Twice on each gateway: whatever is stored by then is stored.
        for _ in 0..2 {
            for gw in [&pair.fast, &pair.normal] {
                let mut c = Conn::open(gw.running.addr).await;
                c.send(get(path, "Pragma: warm\r\n").as_bytes(), Pace::Whole)
                    .await;
                let _ = c.answer(false).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (fast, normal) = one_request(
            &pair,
            &mut found,
            &format!("stored {path}"),
            get(path, "").as_bytes(),
            eligible,
        )
        .await;
        found.check(x_cache(&fast) == x_cache(&normal), || {
            format!(
                "{path}: X-Cache {:?} vs {:?}",
                x_cache(&fast),
                x_cache(&normal)
            )
        });
        if eligible == 1 {
            found.check(x_cache(&normal) == ["HIT"], || {
                format!(
                    "{path}: not a hit on the normal gateway, the case proves nothing: {normal:?}"
                )
            });
        }
        differential(
            &pair,
            &mut found,
            &format!("stored {path}, HEAD"),
            format!("HEAD {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
            &[true],
            Pace::Whole,
            eligible,
        )
        .await;
    }
    pair.warm("/big", "").await;
    differential(
        &pair,
        &mut found,
        "HEAD of a 100 KiB entry",
        format!("HEAD /big HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
        &[true],
        Pace::Whole,
        1,
    )
    .await;

    // What hyper's origin would never send.
    for (what, bytes) in [
        ("custom reason phrase", &b"HTTP/1.1 200 Fine Thanks\r\ncache-control: max-age=600\r\ncontent-length: 2\r\n\r\nok"[..]),
        ("chunked", &b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n"[..]),
        ("delimited by the close", &b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\nconnection: close\r\n\r\nbody until the close"[..]),
        ("mixed-case names, two Dates", &b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nX-Mixed-Case: Value\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nDate: Tue, 02 Jan 2024 00:00:00 GMT\r\nContent-Length: 2\r\n\r\nok"[..]),
        ("content-length with leading zeros", &b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-length: 002\r\n\r\nok"[..]),
    ] {
        let raw = RawOrigin::start(bytes, Duration::ZERO).await;
        let shaped = Pair::start(&raw.url(), |_| {}).await;
        for _ in 0..2 {
            for gw in [&shaped.fast, &shaped.normal] {
                let mut c = Conn::open(gw.running.addr).await;
                c.send(get("/shape", "Pragma: warm\r\n").as_bytes(), Pace::Whole).await;
                let _ = c.answer(false).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (fast, normal) = differential(&shaped, &mut found, &format!("origin response {what}"), get("/shape", "").as_bytes(), &[false], Pace::Whole, ANY).await;
        found.check(x_cache(&fast) == x_cache(&normal), || {
            format!("origin response {what}: X-Cache {:?} vs {:?}", x_cache(&fast), x_cache(&normal))
        });
    }
    found.finish();
}

/// TLS connections never take the fast path: hits over TLS are the normal
/// path's, and the count stays 0.
#[tokio::test]
async fn tls_hits_stay_on_the_normal_path() {
    let origin = Origin::start(script).await;
    let tls = TestCert::new();
    let pair = Pair::start(&origin.url(), |c| tls.serve(c)).await;
    let connector = tls.connector.clone();
    // One request per TLS connection; its response head, lowercased.
    let tls_get = |addr: SocketAddr| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
            tls.write_all(get("/static/tls", "").as_bytes())
                .await
                .expect("request");
            let mut got = Vec::new();
            let _ = tokio::time::timeout(READ_LIMIT, async {
                let mut chunk = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await;
            String::from_utf8_lossy(&got).to_ascii_lowercase()
        }
    };
    let before = pair.fast_hits().await;
    for gw in [&pair.fast, &pair.normal] {
        let addr = gw.running.addr;
        let first = tls_get(addr).await;
        assert!(first.starts_with("http/1.1 200"), "TLS request: {first}");
        eventually("a hit over TLS", 100, Duration::from_millis(20), || {
            let tls_get = &tls_get;
            async move { tls_get(addr).await.contains("x-cache: hit") }
        })
        .await;
    }
    let after = pair.fast_hits().await;
    assert_eq!(after, before, "hits over TLS moved kvgate_fast_hits_total");
}

/// Stopping a gateway closes its idle fast-path connections at once, as
/// hyper closes idle ones, and lets an answer being written finish.
#[tokio::test]
async fn shutdown_closes_idle_fast_connections() {
    let origin = Origin::start(script).await;
    let pair = Pair::start(&origin.url(), |c| c.server.shutdown_grace_ms = 5_000).await;
    pair.warm("/static/x", "").await;
    let mut idle = Vec::new();
    for gw in [&pair.fast, &pair.normal] {
        let mut c = Conn::open(gw.running.addr).await;
        c.send(get("/static/x", "").as_bytes(), Pace::Whole).await;
        let a = c.answer(false).await;
        assert!(
            matches!(&a, Answer::Response(r) if r.status() == 200),
            "hit before the shutdown: {a:?}"
        );
        idle.push(c);
    }
    let Pair { fast, normal } = pair;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), async {
        tokio::join!(fast.stop(), normal.stop());
    })
    .await
    .expect("both gateways stop well within the grace");
    let stopped = started.elapsed();
    for (who, c) in ["fast", "normal"].into_iter().zip(&mut idle) {
        let end = c.answer(false).await;
        assert!(
            matches!(&end, Answer::Closed(b) if b.is_empty()),
            "the {who} gateway's idle connection after the shutdown: {end:?}"
        );
    }
    assert!(
        stopped < Duration::from_secs(2),
        "stopping took {stopped:?} with idle connections open"
    );
}

/// A gauge or counter from a gateway's `/metrics`.
async fn metric(gw: &Gateway, name: &str) -> f64 {
    let url = format!(
        "http://{}/metrics",
        gw.running.admin_addr.expect("admin listener runs")
    );
    let auth = format!("Bearer {TOKEN}");
    let got = send(http::Method::GET, &url, &[("authorization", &auth)], "").await;
    assert_eq!(got.status, 200, "/metrics: {}", got.text());
    let text = got.text();
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// A client that leaves while its miss is being fetched frees its
/// connection at once on both gateways (hyper notices the close; the fast
/// path reads the client while it relays), not when the origin answers.
#[tokio::test]
async fn a_client_that_leaves_during_a_relayed_miss_frees_its_connection() {
    let origin = Origin::start(|seen, n| {
        if seen.path.starts_with("/slow/") {
            Reply::ok(&format!("slow {n}"))
                .header("cache-control", "max-age=60")
                .delay(Duration::from_secs(4))
        } else {
            script(seen, n)
        }
    })
    .await;
    let pair = Pair::start(&origin.url(), |_| {}).await;
    pair.warm("/static/x", "").await;
    for (name, gw) in [("fast", &pair.fast), ("normal", &pair.normal)] {
        let before = metric(gw, "kvgate_connections_open").await;
        let mut c = Conn::open(gw.running.addr).await;
        // A hit first: the connection is on the fast path when the miss comes.
        c.send(get("/static/x", "").as_bytes(), Pace::Whole).await;
        let hit = c.answers(&[false]).await;
        assert!(
            matches!(hit.first(), Some(Answer::Response(r)) if r.header("x-cache") == Some("HIT")),
            "{name}: {hit:?}"
        );
        c.send(get(&format!("/slow/{name}"), "").as_bytes(), Pace::Whole)
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(c);
        let left = Instant::now();
        eventually(
            &format!("{name}: the connection is freed"),
            100,
            Duration::from_millis(20),
            || async { metric(gw, "kvgate_connections_open").await <= before },
        )
        .await;
        assert!(
            left.elapsed() < Duration::from_secs(2),
            "{name}: freed only after {:?}, with the origin's answer",
            left.elapsed()
        );
    }
}

/// Flags, an experiment with a goal, and one that enters only requests
/// with `X-Forwarded-For` (which a client that is not a trusted proxy
/// cannot send: the usual path strips it before the edge decides). The
/// secret is shared, so either gateway's visitor cookie holds on both.
const EDGE_TOML: &str = r#"
[state]
backend = "memory"
[edge.identity]
secret = "fast-hits-edge-secret-0123456789abcdef"
[edge.flags.newUI]
default = false
[edge.flags.theme]
default = "dark"
[edge.experiments.checkout]
variants = { control = 50, treatment = 50 }
goals = [{ path = "/static/goal" }]
[edge.experiments.forwarded]
variants = { a = 50, b = 50 }
conditions = [{ attribute = "header:x-forwarded-for", op = "exists" }]
"#;

/// `[edge]` keeps the fast path: a hit is answered as the usual path
/// answers it, a new visitor's `Set-Cookie` included, and its decision is
/// counted alike (route requests, flag evaluations, variant exposures,
/// exposed users, conversions). A response stored with Vary on an
/// injected field, and a miss, go the usual way, decided there once.
#[tokio::test]
async fn edge_hits_are_answered_like_the_normal_path() {
    let origin = Origin::start(script).await;
    let edge = Config::parse(EDGE_TOML, "edge.toml").expect("edge parses");
    let pair = Pair::start(&origin.url(), |c| {
        c.edge = edge.edge.clone();
        c.state = edge.state.clone();
    })
    .await;
    for p in ["/static/x", "/static/goal", "/big", "/vary-flags"] {
        pair.warm(p, "").await;
    }
    let mut found = Findings::default();
    let start = pair.series().await;
    let start_edge = [
        edge_series(&pair.fast).await,
        edge_series(&pair.normal).await,
    ];

    let (fast, normal) = one_request(
        &pair,
        &mut found,
        "a new visitor's hit",
        get("/static/x", "").as_bytes(),
        1,
    )
    .await;
    let new_cookie = |x: &Exchange| {
        first(x)
            .and_then(|r| r.header("set-cookie"))
            .filter(|c| c.starts_with("kvgate_uid="))
            .and_then(|c| c.split(';').next())
            .map(str::to_string)
    };
    for (who, x) in [("fast", &fast), ("normal", &normal)] {
        found.check(new_cookie(x).is_some(), || {
            format!("{who}: a new visitor got no kvgate_uid cookie: {x:?}")
        });
    }
    let cookie = format!("Cookie: {}\r\n", new_cookie(&fast).unwrap_or_default());

    let (fast, _) = one_request(
        &pair,
        &mut found,
        "a returning visitor's hit",
        get("/static/x", &cookie).as_bytes(),
        1,
    )
    .await;
    found.check(
        first(&fast).is_some_and(|r| r.header("set-cookie").is_none()),
        || format!("a returning visitor was given a new id: {fast:?}"),
    );
    let head = format!("HEAD /static/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let pipelined = get("/big", "") + &head + &get("/static/x", &cookie);
    differential(
        &pair,
        &mut found,
        "pipelined: a large body and a HEAD for new visitors, a returning one",
        pipelined.as_bytes(),
        &[false, true, false],
        Pace::Whole,
        3,
    )
    .await;
    one_request(
        &pair,
        &mut found,
        "a returning visitor reaches a goal",
        get("/static/goal", &cookie).as_bytes(),
        1,
    )
    .await;
    let sent = format!(
        "{cookie}X-Forwarded-For: 10.0.0.1\r\nX-Feature-Flags: newui\r\nX-Experiment-Checkout: treatment\r\nX-User-Preferences: {{}}\r\n"
    );
    one_request(
        &pair,
        &mut found,
        "forwarding and injected fields from a client",
        get("/static/x", &sent).as_bytes(),
        1,
    )
    .await;
    let (fast, _) = one_request(
        &pair,
        &mut found,
        "stored with Vary on an injected field",
        get("/vary-flags", &cookie).as_bytes(),
        0,
    )
    .await;
    found.check(x_cache(&fast) == ["HIT"], || {
        format!("the Vary case is not a hit, it proves nothing: {fast:?}")
    });
    let (fast, _) = one_request(
        &pair,
        &mut found,
        "a miss",
        get("/static/edge-miss", &cookie).as_bytes(),
        0,
    )
    .await;
    found.check(x_cache(&fast) == ["MISS"], || {
        format!("not a miss: {fast:?}")
    });

    pair.check_counted_alike(&mut found, &start).await;
    let end_edge = [
        edge_series(&pair.fast).await,
        edge_series(&pair.normal).await,
    ];
    // A new visitor's variant comes from its random id: exposures are
    // compared per experiment (returning visitors' per variant, in the
    // exposed users and conversions).
    let per_experiment = |g: std::collections::BTreeMap<String, f64>| {
        let mut out = std::collections::BTreeMap::new();
        for (k, v) in g {
            let k = match k.split_once(",variant=") {
                Some((series, _)) if series.starts_with("kvgate_edge_exposures_total") => {
                    format!("{series}}}")
                }
                _ => k,
            };
            *out.entry(k).or_insert(0.0) += v;
        }
        out
    };
    let (f, n) = (
        per_experiment(growth(&start_edge[0], &end_edge[0])),
        per_experiment(growth(&start_edge[1], &end_edge[1])),
    );
    found.check(f == n, || {
        format!("edge counts grew differently:\n  fast   {f:?}\n  normal {n:?}")
    });
    for series in [
        "kvgate_edge_flag_evaluations_total",
        "kvgate_edge_exposures_total",
        "kvgate_edge_exposed_users_total",
        "kvgate_edge_conversions_total",
    ] {
        found.check(f.keys().any(|k| k.starts_with(series)), || {
            format!("{series} did not grow, the case proves nothing: {f:?}")
        });
    }
    found.check(!f.keys().any(|k| k.contains("\"forwarded\"")), || {
        format!("a client that is not a trusted proxy entered `forwarded`: {f:?}")
    });
    found.finish();
}
