//! RFC 9111 as pure functions: what may be stored, how long it stays fresh,
//! how old it is, whether a stored variant matches, whether a client's
//! conditional request is satisfied, what an unsafe method invalidates.
//! No I/O and no clocks: callers pass `now`.

use super::directives::{Delta, RequestDirectives, ResponseDirectives, DELTA_SECONDS_MAX};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use std::time::{Duration, SystemTime};

/// Knobs a route or the cache config can turn on the storage decision.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StoragePolicy {
    /// Store responses that carry `Set-Cookie` (off by default: a shared
    /// cache handing one user's cookie to another is the classic leak).
    pub(crate) allow_set_cookie: bool,
}

/// Heuristic freshness settings (9111 4.2.2).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heuristic {
    pub(crate) fraction: f64,
    pub(crate) max: Duration,
}

/// Why a response is not stored; shown in Cache-Status `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotStorable {
    Method,
    Status,
    NoStore,
    Private,
    Authorization,
    SetCookie,
    VaryStar,
    NoFreshnessOrValidator,
    Partial,
    /// More header fields, or a longer value, than an entry keeps.
    HeadersTooLarge,
}

impl NotStorable {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NotStorable::Method => "method",
            NotStorable::Status => "status",
            NotStorable::NoStore => "no-store",
            NotStorable::Private => "private",
            NotStorable::Authorization => "authorization",
            NotStorable::SetCookie => "set-cookie",
            NotStorable::VaryStar => "vary-star",
            NotStorable::NoFreshnessOrValidator => "no-freshness",
            NotStorable::Partial => "partial",
            NotStorable::HeadersTooLarge => "headers-too-large",
        }
    }
}

/// Status codes whose semantics we understand (9111 3, `must-understand`).
pub(crate) fn status_understood(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203
            | 204
            | 300
            | 301
            | 302
            | 303
            | 307
            | 308
            | 400
            | 403
            | 404
            | 405
            | 410
            | 414
            | 421
            | 451
            | 500
            | 501
            | 502
            | 503
            | 504
    )
}

/// Heuristically cacheable status codes (RFC 9110 15.1).
pub(crate) fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

fn has_validator(resp: &HeaderMap) -> bool {
    resp.contains_key(header::ETAG) || resp.contains_key(header::LAST_MODIFIED)
}

/// Whether the response carries explicit freshness (9111 4.2.1), valid or not.
pub(crate) fn has_explicit_freshness(resp: &HeaderMap, cc: &ResponseDirectives) -> bool {
    cc.s_maxage.is_present()
        || cc.max_age.is_present()
        || (!cc.targeted && resp.contains_key(header::EXPIRES))
}

/// Vary field names, lowercased; `None` when Vary contains `*` (9111 4.1).
pub(crate) fn vary_fields(resp: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut fields = Vec::new();
    for line in resp.get_all(header::VARY) {
        let Ok(s) = line.to_str() else { continue };
        for f in s.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            if f == "*" {
                return None;
            }
            if let Ok(name) = HeaderName::from_bytes(f.to_ascii_lowercase().as_bytes()) {
                if !fields.contains(&name) {
                    fields.push(name);
                }
            }
        }
    }
    Some(fields)
}

/// May a shared cache store this response? (9111 3, 3.5, 5.2.2)
pub(crate) fn storable(
    method: &Method,
    req: &HeaderMap,
    status: StatusCode,
    resp: &HeaderMap,
    cc: &ResponseDirectives,
    policy: StoragePolicy,
) -> Result<(), NotStorable> {
    if method != Method::GET {
        return Err(NotStorable::Method);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        // We do not combine partial content (9111 3.3); pass it through.
        return Err(NotStorable::Partial);
    }
    if status.is_informational() || status == StatusCode::NOT_MODIFIED {
        return Err(NotStorable::Status);
    }
    // 9111 5.2.2.3: must-understand lets a cache ignore no-store, but only
    // for status codes it understands; otherwise nothing may be stored.
    if cc.must_understand {
        if !status_understood(status) {
            return Err(NotStorable::Status);
        }
    } else if cc.no_store {
        return Err(NotStorable::NoStore);
    }
    if cc.private {
        return Err(NotStorable::Private);
    }
    // 9111 3.5: an authenticated request's response only with explicit consent.
    if req.contains_key(header::AUTHORIZATION)
        && !(cc.public || cc.must_revalidate || cc.s_maxage.is_present())
    {
        return Err(NotStorable::Authorization);
    }
    if !policy.allow_set_cookie && resp.contains_key(header::SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    if vary_fields(resp).is_none() {
        return Err(NotStorable::VaryStar);
    }
    // 9111 3: explicit freshness, or a heuristically cacheable status / public
    // with a validator. Without freshness and validator a stored copy could
    // never be used, so we do not keep one.
    // Any final status may be stored with explicit freshness (9111 3); only
    // `must-understand` restricts it to understood codes (checked above).
    let explicit = has_explicit_freshness(resp, cc);
    let validator = has_validator(resp);
    if explicit {
        return Ok(());
    }
    if validator && (heuristically_cacheable(status) || cc.public || cc.no_cache) {
        return Ok(());
    }
    if explicit || validator {
        return Err(NotStorable::Status);
    }
    Err(NotStorable::NoFreshnessOrValidator)
}

/// Parses an HTTP-date (RFC 9110 5.6.7): IMF-fixdate, RFC 850 or asctime.
pub(crate) fn parse_http_date(v: &HeaderValue) -> Option<SystemTime> {
    let s = v.to_str().ok()?;
    httpdate::parse_http_date(s.trim()).ok()
}

/// The single value of a header that must appear once; several lines make it
/// invalid (9111 4.2.1 allows treating duplicates as stale).
fn single<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<Result<&'a HeaderValue, ()>> {
    let mut it = h.get_all(name).iter();
    let first = it.next()?;
    if it.next().is_some() {
        return Some(Err(()));
    }
    Some(Ok(first))
}

/// Freshness lifetime (9111 4.2.1, shared cache): s-maxage, max-age, Expires
/// minus Date, else heuristic (4.2.2). An invalid value yields zero (stale).
pub(crate) fn freshness_lifetime(
    status: StatusCode,
    resp: &HeaderMap,
    cc: &ResponseDirectives,
    response_time: SystemTime,
    heuristic: Heuristic,
) -> Duration {
    match cc.s_maxage {
        Delta::Valid(s) => return Duration::from_secs(s),
        Delta::Invalid => return Duration::ZERO,
        Delta::Absent => {}
    }
    match cc.max_age {
        Delta::Valid(s) => return Duration::from_secs(s),
        Delta::Invalid => return Duration::ZERO,
        Delta::Absent => {}
    }
    let date = date_value(resp).unwrap_or(response_time);
    // RFC 9213 2.1: with a targeted field, Expires is ignored.
    if let Some(expires) = single(resp, &header::EXPIRES).filter(|_| !cc.targeted) {
        // An invalid Expires, including "0", means already expired.
        return match expires.ok().and_then(parse_http_date) {
            Some(exp) => exp.duration_since(date).unwrap_or(Duration::ZERO),
            None => Duration::ZERO,
        };
    }
    if heuristically_cacheable(status) || cc.public {
        if let Some(Ok(lm)) = single(resp, &header::LAST_MODIFIED) {
            if let Some(lm) = parse_http_date(lm) {
                if let Ok(since) = date.duration_since(lm) {
                    return since.mul_f64(heuristic.fraction).min(heuristic.max);
                }
            }
        }
    }
    Duration::ZERO
}

/// The Date header as a time, if valid and single.
pub(crate) fn date_value(resp: &HeaderMap) -> Option<SystemTime> {
    match single(resp, &header::DATE)? {
        Ok(v) => parse_http_date(v),
        Err(()) => None,
    }
}

/// The origin's Age (9111 5.1): the first line's leading delta-seconds.
/// Non-numeric or negative values are ignored; huge values saturate at 2^31.
pub(crate) fn age_value(resp: &HeaderMap) -> Option<u64> {
    let first = resp.get(header::AGE)?.to_str().ok()?;
    let digits: &str = {
        let t = first.trim_start();
        let end = t
            .bytes()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(t.len());
        &t[..end]
    };
    if digits.is_empty() {
        return None;
    }
    let rest = first.trim_start()[digits.len()..].trim_start();
    // "7200.0" is not delta-seconds: ignore it entirely.
    if rest.starts_with('.') {
        return None;
    }
    let mut n: u64 = 0;
    for b in digits.bytes() {
        n = n.saturating_mul(10).saturating_add(u64::from(b - b'0'));
        if n > DELTA_SECONDS_MAX {
            return Some(DELTA_SECONDS_MAX);
        }
    }
    Some(n)
}

/// corrected_initial_age (9111 4.2.3).
pub(crate) fn corrected_initial_age(
    resp: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    // Date has one-second resolution: compare it with the response time
    // truncated to the second, or a response would look up to 1 s old the
    // moment it arrives (and a max-age=1 response be stale at once).
    let response_second = response_time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(response_time, |d| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs())
        });
    let apparent_age = date_value(resp)
        .and_then(|d| response_second.duration_since(d).ok())
        .unwrap_or(Duration::ZERO);
    let response_delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    let corrected_age_value = Duration::from_secs(age_value(resp).unwrap_or(0)) + response_delay;
    apparent_age.max(corrected_age_value)
}

/// The facts about a stored response that decide how it may be used.
///
/// Kept in every stored entry, so compact (40 bytes, not the 88 of four
/// `Duration`s and a `SystemTime`): times and ages as nanoseconds (the
/// precision `SystemTime` and the age arithmetic have), the RFC 5861
/// windows as whole seconds (they are delta-seconds; a fraction rounds up).
/// Each saturates rather than wraps: at 584 years for nanoseconds, 136 for
/// seconds, far past any delta-seconds a cache honours (2^31 s).
#[derive(Debug, Clone)]
pub struct Freshness {
    lifetime_ns: u64,
    corrected_initial_age_ns: u64,
    /// Since the Unix epoch; a time before it counts as the epoch.
    response_time_ns: u64,
    stale_while_revalidate_s: u32,
    stale_if_error_s: u32,
    pub(crate) no_cache: bool,
    pub(crate) forbids_stale: bool,
}

fn to_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn to_secs_up(d: Duration) -> u32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

impl Freshness {
    /// A response fresh for `lifetime` from `response_time`, with no
    /// directives that restrict or extend its use.
    pub fn plain(lifetime: Duration, response_time: SystemTime) -> Freshness {
        Freshness {
            lifetime_ns: to_ns(lifetime),
            corrected_initial_age_ns: 0,
            response_time_ns: response_time
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, to_ns),
            stale_while_revalidate_s: 0,
            stale_if_error_s: 0,
            no_cache: false,
            forbids_stale: false,
        }
    }

    /// The freshness lifetime (9111 4.2.1).
    pub(crate) fn lifetime(&self) -> Duration {
        Duration::from_nanos(self.lifetime_ns)
    }

    pub(crate) fn set_lifetime(&mut self, d: Duration) {
        self.lifetime_ns = to_ns(d);
    }

    /// corrected_initial_age (9111 4.2.3).
    pub(crate) fn corrected_initial_age(&self) -> Duration {
        Duration::from_nanos(self.corrected_initial_age_ns)
    }

    pub(crate) fn set_corrected_initial_age(&mut self, d: Duration) {
        self.corrected_initial_age_ns = to_ns(d);
    }

    /// When the response was received.
    pub(crate) fn response_time(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.response_time_ns)
    }

    /// RFC 5861 3's window.
    pub(crate) fn stale_while_revalidate(&self) -> Duration {
        Duration::from_secs(u64::from(self.stale_while_revalidate_s))
    }

    pub(crate) fn set_stale_while_revalidate(&mut self, d: Duration) {
        self.stale_while_revalidate_s = to_secs_up(d);
    }

    /// RFC 5861 4's window.
    pub(crate) fn stale_if_error(&self) -> Duration {
        Duration::from_secs(u64::from(self.stale_if_error_s))
    }

    pub(crate) fn set_stale_if_error(&mut self, d: Duration) {
        self.stale_if_error_s = to_secs_up(d);
    }

    /// current_age (9111 4.2.3).
    pub(crate) fn current_age(&self, now: SystemTime) -> Duration {
        self.corrected_initial_age() + now.duration_since(self.response_time()).unwrap_or_default()
    }

    /// How long past its lifetime the response is at `now`; zero when fresh.
    pub(crate) fn staleness(&self, now: SystemTime) -> Duration {
        self.current_age(now).saturating_sub(self.lifetime())
    }

    /// Whether the response is fresh at `now` (the tests' shorthand; the
    /// request path asks `usability`).
    #[cfg(test)]
    pub(crate) fn is_fresh(&self, now: SystemTime) -> bool {
        self.current_age(now) < self.lifetime()
    }

    /// Whether stale-if-error (RFC 5861, or configured grace) still covers it.
    /// `extra` is what the client (request stale-if-error) or the gateway's
    /// grace allows beyond the origin's own stale-if-error.
    pub(crate) fn can_serve_on_error(
        &self,
        now: SystemTime,
        request_allows: Option<Duration>,
    ) -> bool {
        // 9111 5.2.2.4: no-cache means never without successful validation.
        if self.forbids_stale || self.no_cache {
            return false;
        }
        let sie = self.stale_if_error();
        let window = request_allows.map_or(sie, |r| r.max(sie));
        self.staleness(now) <= window
    }
}

/// What a lookup may do with a stored response (9111 4, RFC 5861).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usability {
    /// Serve it as is.
    Fresh,
    /// Stale, but the client accepts it (request `max-stale`).
    StaleAllowed,
    /// Stale within stale-while-revalidate: serve now, refresh in background.
    StaleWhileRevalidate,
    /// Must be validated with the origin before use.
    MustValidate,
}

/// Decides how a stored response may answer this request (9111 4, 4.2.4,
/// 5.2.1, RFC 5861 3).
pub fn usability(f: &Freshness, req: &RequestDirectives, now: SystemTime) -> Usability {
    if f.no_cache || req.no_cache {
        return Usability::MustValidate;
    }
    let age = f.current_age(now);
    if let Some(max_age) = req.max_age {
        if age > Duration::from_secs(max_age) {
            return Usability::MustValidate;
        }
    }
    let lifetime = f.lifetime();
    let fresh_for = lifetime.saturating_sub(age);
    if age < lifetime {
        if let Some(min_fresh) = req.min_fresh {
            if fresh_for < Duration::from_secs(min_fresh) {
                return Usability::MustValidate;
            }
        }
        return Usability::Fresh;
    }
    if f.forbids_stale {
        return Usability::MustValidate;
    }
    let staleness = age - lifetime;
    if let Some(max_stale) = req.max_stale {
        if max_stale.is_none_or(|m| staleness <= Duration::from_secs(m)) {
            return Usability::StaleAllowed;
        }
    }
    if req.min_fresh.is_none() && req.max_age.is_none() && staleness < f.stale_while_revalidate() {
        return Usability::StaleWhileRevalidate;
    }
    Usability::MustValidate
}

/// Normalizes a request's value for one Vary field (9111 4.1): lines joined
/// with commas, whitespace around list separators removed. `None` if absent.
pub(crate) fn vary_value(req: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut it = req.get_all(name).iter().peekable();
    it.peek()?;
    let mut out = String::new();
    for (i, v) in it.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let s = String::from_utf8_lossy(v.as_bytes());
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        out.push_str(&parts.join(","));
    }
    Some(out)
}

/// Whether a stored variant's secondary key matches a request (9111 4.1).
/// Runs on every lookup of a Vary'd entry, so it compares without building
/// the request's normal form.
pub(crate) fn vary_matches(stored: &[(HeaderName, Option<String>)], req: &HeaderMap) -> bool {
    stored
        .iter()
        .all(|(name, value)| vary_value_is(req, name, value.as_deref()))
}

/// `vary_value(req, name).as_deref() == stored`, without allocating: the
/// request's list members, trimmed, are matched against `stored` one by
/// one, separated by single commas. A value that is not UTF-8 (rare)
/// takes the allocating path, whose lossy decoding `stored` went through.
fn vary_value_is(req: &HeaderMap, name: &HeaderName, stored: Option<&str>) -> bool {
    let mut lines = req.get_all(name).iter().peekable();
    let Some(stored) = stored else {
        return lines.peek().is_none();
    };
    if lines.peek().is_none() {
        return false;
    }
    let mut rest = stored.as_bytes();
    let mut first = true;
    for line in lines {
        let Ok(text) = std::str::from_utf8(line.as_bytes()) else {
            return vary_value(req, name).as_deref() == Some(stored);
        };
        for member in text.split(',').map(str::trim) {
            if !first {
                match rest.split_first() {
                    Some((b',', after)) => rest = after,
                    _ => return false,
                }
            }
            first = false;
            match rest.strip_prefix(member.as_bytes()) {
                Some(after) => rest = after,
                None => return false,
            }
        }
    }
    rest.is_empty()
}

/// Weak comparison of entity tags (RFC 9110 8.8.3.2).
fn etag_weak_eq(a: &str, b: &str) -> bool {
    a.trim().trim_start_matches("W/") == b.trim().trim_start_matches("W/")
}

/// Does a client's conditional GET/HEAD match the stored response, so that
/// the cache answers 304? (9111 4.3.2, RFC 9110 13.1.2 / 13.1.3)
pub(crate) fn conditional_matches(req: &HeaderMap, stored: &HeaderMap) -> bool {
    let inm: Vec<&HeaderValue> = req.get_all(header::IF_NONE_MATCH).iter().collect();
    if !inm.is_empty() {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        return inm.iter().any(|line| {
            line.to_str().is_ok_and(|s| {
                s.split(',')
                    .map(str::trim)
                    .any(|t| t == "*" || etag_weak_eq(t, etag))
            })
        });
    }
    if let Some(ims) = req.get(header::IF_MODIFIED_SINCE).and_then(parse_http_date) {
        let validator = stored
            .get(header::LAST_MODIFIED)
            .and_then(parse_http_date)
            .or_else(|| date_value(stored));
        return validator.is_some_and(|lm| lm <= ims);
    }
    false
}

/// How a Range request can be answered from a stored body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RangeAnswer {
    /// Ignore the header (absent, several ranges, not bytes): send it all.
    Whole,
    Part(std::ops::Range<u64>),
    Unsatisfiable,
}

/// A single byte range a stored body of `len` bytes can satisfy (RFC 9110
/// 14.1.2, 14.2). A `Part` is never empty and always within `0..len`.
pub(crate) fn byte_range(req: &HeaderMap, len: u64) -> RangeAnswer {
    match byte_range_inner(req, len) {
        Ok(Some(r)) => RangeAnswer::Part(r),
        Ok(None) => RangeAnswer::Whole,
        Err(()) => RangeAnswer::Unsatisfiable,
    }
}

/// A 1*DIGIT position (RFC 9110 14.1.1): digits only, no sign or spaces
/// inside. 14.1.2 asks recipients to expect numerals past any integer
/// type, so overflow saturates: such a position is beyond every length.
fn range_pos(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |n, b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

#[allow(clippy::result_unit_err)]
fn byte_range_inner(req: &HeaderMap, len: u64) -> Result<Option<std::ops::Range<u64>>, ()> {
    let Some(spec) = req.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    // The range unit is case-insensitive (RFC 9110 14.1).
    let spec = spec.trim();
    let Some(set) = spec
        .get(..6)
        .filter(|u| u.eq_ignore_ascii_case("bytes="))
        .and_then(|_| spec.get(6..))
    else {
        return Ok(None);
    };
    // Empty list elements are ignored (RFC 9110 5.6.1); several ranges are
    // answered with the whole representation (14.2 lets a server ignore).
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let (Some(one), None) = (specs.next(), specs.next()) else {
        return Ok(None);
    };
    let Some((first, last)) = one.split_once('-') else {
        return Ok(None);
    };
    let range = if first.is_empty() {
        // suffix-range (14.1.2): the last N bytes, the whole representation
        // when it is shorter than N; a zero suffix is unsatisfiable.
        match range_pos(last) {
            Some(0) => return Err(()),
            // Content-Range cannot express an empty range: send it all.
            Some(_) if len == 0 => return Ok(None),
            Some(n) => len.saturating_sub(n)..len,
            None => return Ok(None),
        }
    } else {
        let Some(a) = range_pos(first) else {
            return Ok(None);
        };
        let end = if last.is_empty() {
            len
        } else {
            match range_pos(last) {
                Some(b) if b >= a => b.min(len.saturating_sub(1)).saturating_add(1),
                // last-pos < first-pos: invalid, so the field is ignored (14.1.1).
                _ => return Ok(None),
            }
        };
        // 14.1.2: a last-pos at or beyond the length means "to the end";
        // clamped above before adding one, so u64::MAX cannot overflow.
        a..end
    };
    // 14.1.1: an int-range is satisfiable only if first-pos < length.
    if range.start >= len {
        return Err(());
    }
    Ok(Some(range))
}

/// Whether `If-Range` lets a range request be answered partially (RFC 9110
/// 13.1.5): only a strong ETag match or an exact date match.
pub(crate) fn if_range_allows(req: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(v) = req.get(header::IF_RANGE) else {
        return true;
    };
    // A validator we cannot read cannot match: the Range is ignored then
    // (13.1.5), never honoured as if If-Range were absent.
    let Ok(v) = v.to_str() else {
        return false;
    };
    let v = v.trim();
    if v.starts_with('"') {
        return stored.get(header::ETAG).and_then(|e| e.to_str().ok()) == Some(v);
    }
    stored
        .get(header::LAST_MODIFIED)
        .and_then(|l| l.to_str().ok())
        == Some(v)
}

/// Headers a stored response's 304 keeps from the stored 200 (RFC 9110
/// 15.4.5): everything but the content framing.
pub(crate) fn not_modified_headers(stored: &HeaderMap) -> HeaderMap {
    let mut h = stored.clone();
    h.remove(header::CONTENT_LENGTH);
    h.remove(header::TRANSFER_ENCODING);
    h
}

/// Fields a cache must not store (9111 3.1) in addition to hop-by-hop ones.
const NOT_STORED: [&str; 4] = [
    "proxy-authenticate",
    "proxy-authentication-info",
    "proxy-authorization",
    "proxy-connection",
];

/// Removes from a response what a cache must not store (9111 3.1): the
/// hop-by-hop fields, fields named by `Connection`, and the proxy-auth ones.
pub(crate) fn strip_unstorable(h: &mut HeaderMap) {
    crate::protocol::headers::remove_hop_by_hop(h);
    for n in NOT_STORED {
        h.remove(n);
    }
}

/// Updates stored headers from a 304 (9111 3.2, 4.3.4): every field in the
/// 304 replaces the stored one, except content framing.
pub(crate) fn update_from_304(stored: &mut HeaderMap, not_modified: &HeaderMap) {
    let mut fresh = not_modified.clone();
    strip_unstorable(&mut fresh);
    fresh.remove(header::CONTENT_LENGTH);
    let names: Vec<HeaderName> = fresh.keys().cloned().collect();
    for name in names {
        stored.remove(&name);
        for v in fresh.get_all(&name) {
            stored.append(name.clone(), v.clone());
        }
    }
}

/// Whether a request method is safe (RFC 9110 9.2.1).
pub(crate) fn is_safe_method(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// Paths an unsafe request invalidates (9111 4.4): its own target, and the
/// `Location` / `Content-Location` targets on the same origin, when the
/// response is a non-error (2xx or 3xx).
pub(crate) fn invalidation_targets(
    method: &Method,
    status: StatusCode,
    resp: &HeaderMap,
    request_authority: &str,
    request_path_and_query: &str,
) -> Vec<String> {
    if is_safe_method(method) || !(status.is_success() || status.is_redirection()) {
        return Vec::new();
    }
    let mut out = vec![request_path_and_query.to_string()];
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(v) = resp.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(p) = same_origin_path(v, request_authority) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// Resolves a Location-style reference to a path if it is same-origin.
fn same_origin_path(reference: &str, authority: &str) -> Option<String> {
    if reference.starts_with('/') && !reference.starts_with("//") {
        return Some(reference.to_string());
    }
    let uri: http::Uri = reference.parse().ok()?;
    let host = uri.authority()?.as_str();
    if !host.eq_ignore_ascii_case(authority) {
        return None;
    }
    Some(uri.path_and_query().map_or("/", |p| p.as_str()).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const POLICY: StoragePolicy = StoragePolicy {
        allow_set_cookie: false,
    };
    const HEUR: Heuristic = Heuristic {
        fraction: 0.1,
        max: Duration::from_secs(86_400),
    };

    fn store(req: &[(&str, &str)], status: u16, resp: &[(&str, &str)]) -> Result<(), NotStorable> {
        let r = headers(resp);
        storable(
            &Method::GET,
            &headers(req),
            StatusCode::from_u16(status).unwrap(),
            &r,
            &ResponseDirectives::from_headers(&r),
            POLICY,
        )
    }

    #[test]
    fn rfc9111_3_stores_explicitly_fresh_get() {
        assert_eq!(store(&[], 200, &[("cache-control", "max-age=60")]), Ok(()));
    }

    #[test]
    fn rfc9111_3_refuses_without_freshness_or_validator() {
        assert_eq!(
            store(&[], 200, &[]),
            Err(NotStorable::NoFreshnessOrValidator)
        );
    }

    #[test]
    fn rfc9111_3_stores_heuristically_cacheable_with_validator() {
        assert_eq!(store(&[], 200, &[("etag", "\"a\"")]), Ok(()));
        assert_eq!(
            store(&[], 201, &[("etag", "\"a\"")]),
            Err(NotStorable::Status)
        );
    }

    #[test]
    fn rfc9111_5_2_2_5_no_store_and_private() {
        assert_eq!(
            store(&[], 200, &[("cache-control", "max-age=60, no-store")]),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            store(&[], 200, &[("cache-control", "max-age=60, private")]),
            Err(NotStorable::Private)
        );
    }

    #[test]
    fn rfc9111_5_2_2_3_must_understand_overrides_no_store_for_known_status() {
        let cc = "max-age=60, no-store, must-understand";
        assert_eq!(store(&[], 200, &[("cache-control", cc)]), Ok(()));
        assert_eq!(
            store(&[], 299, &[("cache-control", cc)]),
            Err(NotStorable::Status)
        );
    }

    #[test]
    fn rfc9111_3_5_authorization_needs_explicit_permission() {
        let auth = [("authorization", "Basic YTpi")];
        assert_eq!(
            store(&auth, 200, &[("cache-control", "max-age=60")]),
            Err(NotStorable::Authorization)
        );
        assert_eq!(
            store(&auth, 200, &[("cache-control", "max-age=60, public")]),
            Ok(())
        );
        assert_eq!(
            store(&auth, 200, &[("cache-control", "s-maxage=60")]),
            Ok(())
        );
    }

    #[test]
    fn set_cookie_not_stored_unless_allowed() {
        assert_eq!(
            store(
                &[],
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")]
            ),
            Err(NotStorable::SetCookie)
        );
    }

    #[test]
    fn rfc9111_4_1_vary_star_never_stored() {
        assert_eq!(
            store(
                &[],
                200,
                &[("cache-control", "max-age=60"), ("vary", "Foo, *")]
            ),
            Err(NotStorable::VaryStar)
        );
    }

    fn lifetime(status: u16, resp: &[(&str, &str)], now: SystemTime) -> Duration {
        let h = headers(resp);
        freshness_lifetime(
            StatusCode::from_u16(status).unwrap(),
            &h,
            &ResponseDirectives::from_headers(&h),
            now,
            HEUR,
        )
    }

    #[test]
    fn rfc9111_4_2_1_s_maxage_beats_max_age_beats_expires() {
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now);
        let exp = httpdate::fmt_http_date(now + Duration::from_secs(1000));
        assert_eq!(
            lifetime(200, &[("cache-control", "max-age=5, s-maxage=9")], now),
            Duration::from_secs(9)
        );
        assert_eq!(
            lifetime(
                200,
                &[("cache-control", "max-age=5"), ("expires", &exp)],
                now
            ),
            Duration::from_secs(5)
        );
        assert_eq!(
            lifetime(200, &[("date", &date), ("expires", &exp)], now),
            Duration::from_secs(1000)
        );
    }

    #[test]
    fn rfc9111_5_3_invalid_expires_is_stale() {
        let now = SystemTime::now();
        assert_eq!(lifetime(200, &[("expires", "0")], now), Duration::ZERO);
        let exp = httpdate::fmt_http_date(now + Duration::from_secs(1000));
        assert_eq!(
            lifetime(200, &[("expires", &exp), ("expires", &exp)], now),
            Duration::ZERO
        );
        assert_eq!(
            lifetime(200, &[("expires", &exp.replace("GMT", "UTC"))], now),
            Duration::ZERO
        );
    }

    #[test]
    fn rfc9111_4_2_2_heuristic_is_fraction_of_last_modified_capped() {
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now);
        let lm = httpdate::fmt_http_date(now - Duration::from_secs(1000));
        assert_eq!(
            lifetime(200, &[("date", &date), ("last-modified", &lm)], now),
            Duration::from_secs(100)
        );
        let old = httpdate::fmt_http_date(now - Duration::from_secs(100 * 86_400));
        assert_eq!(
            lifetime(200, &[("date", &date), ("last-modified", &old)], now),
            Duration::from_secs(86_400)
        );
        // not heuristically cacheable: no heuristic
        assert_eq!(
            lifetime(201, &[("date", &date), ("last-modified", &lm)], now),
            Duration::ZERO
        );
    }

    #[test]
    fn rfc9111_5_1_age_parsing() {
        assert_eq!(age_value(&headers(&[("age", "abc")])), None);
        assert_eq!(age_value(&headers(&[("age", "-7200")])), None);
        assert_eq!(age_value(&headers(&[("age", "7200.0")])), None);
        assert_eq!(age_value(&headers(&[("age", "7200, 0")])), Some(7200));
        assert_eq!(age_value(&headers(&[("age", "0, 7200")])), Some(0));
        assert_eq!(
            age_value(&headers(&[("age", "7200"), ("age", "0")])),
            Some(7200)
        );
        assert_eq!(
            age_value(&headers(&[("age", "2147483649")])),
            Some(DELTA_SECONDS_MAX)
        );
    }

    #[test]
    fn rfc9111_4_2_3_corrected_initial_age_takes_the_larger() {
        let now = SystemTime::now();
        let h = headers(&[("age", "30")]);
        let req_t = now - Duration::from_secs(2);
        assert_eq!(
            corrected_initial_age(&h, req_t, now),
            Duration::from_secs(32)
        );
        let date = httpdate::fmt_http_date(now - Duration::from_secs(100));
        let h = headers(&[("age", "30"), ("date", &date)]);
        assert!(corrected_initial_age(&h, now, now) >= Duration::from_secs(100));
    }

    fn fresh(lifetime: u64, age: u64) -> Freshness {
        let mut f = Freshness::plain(Duration::from_secs(lifetime), SystemTime::now());
        f.set_corrected_initial_age(Duration::from_secs(age));
        f
    }

    #[test]
    fn rfc9111_4_2_fresh_vs_stale() {
        let now = SystemTime::now();
        let req = RequestDirectives::default();
        assert_eq!(usability(&fresh(60, 10), &req, now), Usability::Fresh);
        assert_eq!(
            usability(&fresh(60, 61), &req, now),
            Usability::MustValidate
        );
    }

    #[test]
    fn rfc9111_5_2_1_request_max_age_min_fresh_max_stale() {
        let now = SystemTime::now();
        let f = fresh(60, 30);
        let r = RequestDirectives {
            max_age: Some(10),
            ..Default::default()
        };
        assert_eq!(usability(&f, &r, now), Usability::MustValidate);
        let r = RequestDirectives {
            min_fresh: Some(40),
            ..Default::default()
        };
        assert_eq!(usability(&f, &r, now), Usability::MustValidate);
        let stale = fresh(60, 90);
        let r = RequestDirectives {
            max_stale: Some(Some(60)),
            ..Default::default()
        };
        assert_eq!(usability(&stale, &r, now), Usability::StaleAllowed);
        let r = RequestDirectives {
            max_stale: Some(Some(10)),
            ..Default::default()
        };
        assert_eq!(usability(&stale, &r, now), Usability::MustValidate);
    }

    #[test]
    fn rfc9111_5_2_2_must_revalidate_forbids_max_stale() {
        let now = SystemTime::now();
        let mut f = fresh(60, 90);
        f.forbids_stale = true;
        let r = RequestDirectives {
            max_stale: Some(None),
            ..Default::default()
        };
        assert_eq!(usability(&f, &r, now), Usability::MustValidate);
        assert!(!f.can_serve_on_error(now, Some(Duration::from_secs(1000))));
    }

    #[test]
    fn rfc5861_3_stale_while_revalidate_window() {
        let now = SystemTime::now();
        let mut f = fresh(1, 5);
        f.set_stale_while_revalidate(Duration::from_secs(30));
        let req = RequestDirectives::default();
        assert_eq!(usability(&f, &req, now), Usability::StaleWhileRevalidate);
        f.set_stale_while_revalidate(Duration::from_secs(2));
        assert_eq!(usability(&f, &req, now), Usability::MustValidate);
    }

    #[test]
    fn rfc5861_4_stale_if_error_window() {
        let now = SystemTime::now();
        let mut f = fresh(1, 5);
        assert!(!f.can_serve_on_error(now, None));
        f.set_stale_if_error(Duration::from_secs(10));
        assert!(f.can_serve_on_error(now, None));
    }

    #[test]
    fn rfc9111_5_2_2_4_no_cache_always_validates() {
        let now = SystemTime::now();
        let mut f = fresh(60, 0);
        f.no_cache = true;
        assert_eq!(
            usability(&f, &RequestDirectives::default(), now),
            Usability::MustValidate
        );
    }

    #[test]
    fn rfc9111_4_1_vary_matching_normalizes_whitespace_and_lines() {
        let name = HeaderName::from_static("foo");
        let stored = vec![(
            name.clone(),
            vary_value(&headers(&[("foo", "a, b")]), &name),
        )];
        assert!(vary_matches(&stored, &headers(&[("foo", "a,b")])));
        assert!(vary_matches(
            &stored,
            &headers(&[("foo", "a"), ("foo", "b")])
        ));
        assert!(!vary_matches(&stored, &headers(&[("foo", "b, a")])));
        assert!(!vary_matches(&stored, &headers(&[])));
        let absent = vec![(name.clone(), None)];
        assert!(vary_matches(&absent, &headers(&[])));
        assert!(!vary_matches(&absent, &headers(&[("foo", "")])));
    }

    #[test]
    fn rfc9111_4_1_vary_fields_parsing() {
        let f = vary_fields(&headers(&[("vary", "Foo, bar"), ("vary", "FOO")])).unwrap();
        assert_eq!(
            f,
            vec![
                HeaderName::from_static("foo"),
                HeaderName::from_static("bar")
            ]
        );
        assert!(vary_fields(&headers(&[("vary", ""), ("vary", "*")])).is_none());
    }

    #[test]
    fn rfc9111_4_3_2_client_conditionals() {
        let stored = headers(&[
            ("etag", "\"abc\""),
            ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ]);
        assert!(conditional_matches(
            &headers(&[("if-none-match", "W/\"abc\"")]),
            &stored
        ));
        assert!(conditional_matches(
            &headers(&[("if-none-match", "\"x\", \"abc\"")]),
            &stored
        ));
        assert!(!conditional_matches(
            &headers(&[("if-none-match", "\"x\"")]),
            &stored
        ));
        assert!(conditional_matches(
            &headers(&[("if-modified-since", "Tue, 02 Jan 2024 00:00:00 GMT")]),
            &stored
        ));
        assert!(!conditional_matches(
            &headers(&[("if-modified-since", "Sun, 31 Dec 2023 00:00:00 GMT")]),
            &stored
        ));
        // If-None-Match takes precedence over If-Modified-Since (RFC 9110 13.2.2)
        assert!(!conditional_matches(
            &headers(&[
                ("if-none-match", "\"x\""),
                ("if-modified-since", "Tue, 02 Jan 2024 00:00:00 GMT")
            ]),
            &stored
        ));
    }

    #[test]
    fn rfc9110_14_2_byte_ranges() {
        let r = |v: &str| byte_range(&headers(&[("range", v)]), 10);
        assert_eq!(r("bytes=0-4"), RangeAnswer::Part(0..5));
        assert_eq!(r("bytes=5-"), RangeAnswer::Part(5..10));
        assert_eq!(r("bytes=-3"), RangeAnswer::Part(7..10));
        assert_eq!(r("bytes=5-100"), RangeAnswer::Part(5..10));
        assert_eq!(r("bytes=10-"), RangeAnswer::Unsatisfiable);
        assert_eq!(r("bytes=0-1,3-4"), RangeAnswer::Whole);
        assert_eq!(r("items=0-1"), RangeAnswer::Whole);
        assert_eq!(byte_range(&headers(&[]), 10), RangeAnswer::Whole);
    }

    #[test]
    fn rfc9110_14_1_2_last_pos_at_or_past_length_means_the_rest() {
        // 14.1.2: a last-pos at or beyond the length is replaced by len - 1;
        // u64::MAX once overflowed `last + 1` (panic in debug, and in
        // release an empty 206 claiming bytes 0-18446744073709551615/100).
        let r = |v: &str| byte_range(&headers(&[("range", v)]), 100);
        assert_eq!(r("bytes=5-18446744073709551615"), RangeAnswer::Part(5..100));
        assert_eq!(r("bytes=0-18446744073709551615"), RangeAnswer::Part(0..100));
        assert_eq!(r("bytes=0-18446744073709551614"), RangeAnswer::Part(0..100));
        assert_eq!(
            r("bytes=99-18446744073709551615"),
            RangeAnswer::Part(99..100)
        );
        assert_eq!(r("bytes=0-99"), RangeAnswer::Part(0..100));
        assert_eq!(r("bytes=0-100"), RangeAnswer::Part(0..100));
        // Past u64 altogether: still "to the end" (14.1.2 asks recipients to
        // expect numerals larger than their integers).
        assert_eq!(
            r("bytes=3-99999999999999999999999"),
            RangeAnswer::Part(3..100)
        );
    }

    #[test]
    fn rfc9110_14_1_2_huge_first_pos_and_suffix() {
        let r = |v: &str| byte_range(&headers(&[("range", v)]), 100);
        // A first-pos past u64 is past the length: unsatisfiable (14.1.1).
        assert_eq!(r("bytes=99999999999999999999-"), RangeAnswer::Unsatisfiable);
        assert_eq!(r("bytes=18446744073709551615-"), RangeAnswer::Unsatisfiable);
        // A suffix longer than the representation selects all of it
        // (14.1.2); it used to be refused with 416 once past u64.
        assert_eq!(r("bytes=-99999999999999999999"), RangeAnswer::Part(0..100));
        assert_eq!(r("bytes=-18446744073709551615"), RangeAnswer::Part(0..100));
        assert_eq!(r("bytes=-100"), RangeAnswer::Part(0..100));
        // A zero suffix is the unsatisfiable suffix-range (14.1.1).
        assert_eq!(r("bytes=-0"), RangeAnswer::Unsatisfiable);
    }

    #[test]
    fn rfc9110_14_1_1_syntax_errors_are_ignored_not_refused() {
        let r = |v: &str| byte_range(&headers(&[("range", v)]), 100);
        // Not 1*DIGIT: the field is invalid and ignored (14.2), where `-`,
        // `-x` and `-+3` used to get 416 and `+5-` a 206.
        for junk in [
            "bytes=-",
            "bytes=-x",
            "bytes=-+3",
            "bytes=+5-",
            "bytes=5",
            "bytes=a-b",
            "bytes=5-4",
            "bytes=1-2-3",
            "bytes=",
            "bytes=--",
            "bytes=0x10-",
        ] {
            assert_eq!(r(junk), RangeAnswer::Whole, "{junk}");
        }
        // The unit is case-insensitive (14.1); empty list elements are
        // skipped (5.6.1).
        assert_eq!(r("Bytes=0-4"), RangeAnswer::Part(0..5));
        assert_eq!(r("bytes=0-4,"), RangeAnswer::Part(0..5));
        assert_eq!(r("bytes=, 0-4"), RangeAnswer::Part(0..5));
    }

    #[test]
    fn rfc9110_14_1_1_zero_length_representation() {
        let r = |v: &str| byte_range(&headers(&[("range", v)]), 0);
        // No int-range fits an empty body (14.1.1) ...
        assert_eq!(r("bytes=0-"), RangeAnswer::Unsatisfiable);
        assert_eq!(
            r("bytes=0-18446744073709551615"),
            RangeAnswer::Unsatisfiable
        );
        // ... a non-zero suffix does, but no Content-Range can name an empty
        // part, so the (empty) whole is sent.
        assert_eq!(r("bytes=-5"), RangeAnswer::Whole);
    }

    #[test]
    fn rfc9110_13_1_5_if_range() {
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ]);
        let allows = |v: &str| if_range_allows(&headers(&[("if-range", v)]), &stored);
        assert!(if_range_allows(&headers(&[]), &stored));
        assert!(allows("\"v1\""));
        assert!(!allows("\"v2\""));
        // A weak tag never matches (strong comparison).
        assert!(!allows("W/\"v1\""));
        assert!(allows("Mon, 01 Jan 2024 00:00:00 GMT"));
        assert!(!allows("Tue, 02 Jan 2024 00:00:00 GMT"));
        // An unreadable validator cannot match: ignore the Range.
        let mut req = HeaderMap::new();
        req.insert(
            header::IF_RANGE,
            HeaderValue::from_bytes(b"\"v1\"\xff").unwrap(),
        );
        assert!(!if_range_allows(&req, &stored));
    }

    #[test]
    fn rfc9111_3_2_304_updates_headers_but_not_content_length() {
        let mut stored = headers(&[("content-length", "10"), ("x-a", "1"), ("etag", "\"1\"")]);
        let nm = headers(&[
            ("content-length", "0"),
            ("x-a", "2"),
            ("connection", "x-b"),
            ("x-b", "3"),
        ]);
        update_from_304(&mut stored, &nm);
        assert_eq!(stored.get("x-a").unwrap(), "2");
        assert_eq!(stored.get("content-length").unwrap(), "10");
        assert!(stored.get("x-b").is_none());
    }

    #[test]
    fn rfc9111_4_4_unsafe_methods_invalidate_target_and_same_origin_locations() {
        let resp = headers(&[
            ("location", "/other"),
            ("content-location", "http://elsewhere.example/x"),
        ]);
        let t = invalidation_targets(
            &Method::POST,
            StatusCode::CREATED,
            &resp,
            "a.example",
            "/p?q",
        );
        assert_eq!(t, vec!["/p?q".to_string(), "/other".to_string()]);
        assert!(
            invalidation_targets(&Method::POST, StatusCode::NOT_FOUND, &resp, "a", "/p").is_empty()
        );
        assert!(invalidation_targets(&Method::GET, StatusCode::OK, &resp, "a", "/p").is_empty());
        let resp = headers(&[("location", "http://a.example/abs")]);
        let t = invalidation_targets(&Method::DELETE, StatusCode::OK, &resp, "a.example", "/p");
        assert_eq!(t, vec!["/p".to_string(), "/abs".to_string()]);
    }

    // Property tests: the Range, If-Range and Vary parsers read untrusted
    // request and response fields, so arbitrary input must never panic and
    // every answer must be usable as is.
    mod props {
        use super::*;
        use proptest::prelude::*;

        /// A header map with one field, when the bytes make a valid value.
        fn one(name: &str, value: &[u8]) -> HeaderMap {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(value) {
                h.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), v);
            }
            h
        }

        /// Lengths that matter: tiny, around u64's end, and anything.
        fn lengths() -> impl Strategy<Value = u64> {
            prop_oneof![0u64..300, (u64::MAX - 3)..=u64::MAX, any::<u64>()]
        }

        /// Range values shaped like the grammar, with junk mixed in.
        fn range_values() -> impl Strategy<Value = String> {
            let pos = prop_oneof![
                any::<u64>().prop_map(|n| n.to_string()),
                (0u64..300).prop_map(|n| n.to_string()),
                "[0-9]{15,30}",
                Just(String::new()),
                "[ +x-]{0,2}[0-9]{0,3}",
            ];
            let spec = (pos.clone(), pos).prop_map(|(a, b)| format!("{a}-{b}"));
            prop_oneof![
                (
                    prop::collection::vec(spec, 1..3),
                    "(bytes|Bytes|BYTES|items)="
                )
                    .prop_map(|(specs, unit)| format!("{unit}{}", specs.join(","))),
                "\\PC{0,40}",
            ]
        }

        const RESPONSE_FIELDS: [HeaderName; 12] = [
            header::CACHE_CONTROL,
            header::EXPIRES,
            header::DATE,
            header::DATE,
            header::LAST_MODIFIED,
            header::AGE,
            header::ETAG,
            header::VARY,
            header::SET_COOKIE,
            header::LOCATION,
            header::CONTENT_LOCATION,
            header::CONNECTION,
        ];
        const REQUEST_FIELDS: [HeaderName; 7] = [
            header::CACHE_CONTROL,
            header::PRAGMA,
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::AUTHORIZATION,
            header::RANGE,
            header::IF_RANGE,
        ];

        /// Header values: HTTP-dates far and near, numerals of any size,
        /// directive-like text, and plain junk.
        fn field_value() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                (0u64..253_402_300_799).prop_map(|s| httpdate::fmt_http_date(
                    SystemTime::UNIX_EPOCH + Duration::from_secs(s)
                )
                .into_bytes()),
                "[0-9]{1,30}".prop_map(String::into_bytes),
                "[a-z-]{1,16}(=[0-9\"a-z, ]{0,20})?(, [a-z-]{1,16}(=[0-9]{1,25})?){0,3}"
                    .prop_map(String::into_bytes),
                "(W/)?\"[!#-~]{0,10}\"(, (W/)?\"[a-z]{0,4}\")?".prop_map(String::into_bytes),
                "(https?://[a-z.]{1,10}(:[0-9]{1,6})?)?/[!-~]{0,20}".prop_map(String::into_bytes),
                prop::collection::vec(any::<u8>(), 0..40),
            ]
        }

        fn check_answer(answer: &RangeAnswer, len: u64) -> Result<(), TestCaseError> {
            if let RangeAnswer::Part(r) = answer {
                prop_assert!(r.start < r.end, "empty part {r:?} of {len}");
                prop_assert!(r.end <= len, "part {r:?} past {len}");
            }
            Ok(())
        }

        /// Header lines for a Vary field: list members with odd spacing,
        /// empty members and, now and then, bytes that are not UTF-8.
        fn vary_lines() -> impl Strategy<Value = Vec<Vec<u8>>> {
            let member = prop_oneof![
                "[a-c]{0,3}".prop_map(String::into_bytes),
                Just(b" ".to_vec()),
                Just(vec![0xe9]),
            ];
            let line = prop::collection::vec(member, 0..4).prop_map(|ms| ms.join(&b", "[..]));
            prop::collection::vec(line, 0..3)
        }

        fn field(lines: &[Vec<u8>]) -> HeaderMap {
            let mut h = HeaderMap::new();
            for l in lines {
                if let Ok(v) = HeaderValue::from_bytes(l) {
                    h.append(header::ACCEPT_LANGUAGE, v);
                }
            }
            h
        }

        proptest! {
            /// 9111 4.1: the allocation-free comparison says what comparing
            /// the normalized values says, for matching and other requests.
            #[test]
            fn vary_matches_agrees_with_the_normal_form(a in vary_lines(), b in vary_lines()) {
                let (stored_req, req) = (field(&a), field(&b));
                let name = header::ACCEPT_LANGUAGE;
                let stored = vec![(name.clone(), vary_value(&stored_req, &name))];
                prop_assert!(vary_matches(&stored, &stored_req));
                prop_assert_eq!(
                    vary_matches(&stored, &req),
                    vary_value(&req, &name) == vary_value(&stored_req, &name)
                );
            }

            #[test]
            fn byte_range_never_panics_and_parts_fit(
                v in prop::collection::vec(any::<u8>(), 0..64),
                len in lengths(),
            ) {
                let answer = byte_range(&one("range", &v), len);
                check_answer(&answer, len)?;
            }

            #[test]
            fn byte_range_grammar_shaped(v in range_values(), len in lengths()) {
                let answer = byte_range(&one("range", v.as_bytes()), len);
                check_answer(&answer, len)?;
            }

            /// RFC 9110 14.1.2 as a model: first-pos..=min(last-pos, len - 1).
            #[test]
            fn byte_range_int_range_model(a in any::<u64>(), b in any::<u64>(), len in lengths()) {
                let answer = byte_range(&one("range", format!("bytes={a}-{b}").as_bytes()), len);
                let expected = if b < a {
                    RangeAnswer::Whole
                } else if a >= len {
                    RangeAnswer::Unsatisfiable
                } else {
                    RangeAnswer::Part(a..b.min(len - 1) + 1)
                };
                prop_assert_eq!(answer, expected);
            }

            /// RFC 9110 14.1.2: the last n bytes, or all of them.
            #[test]
            fn byte_range_suffix_model(n in any::<u64>(), len in lengths()) {
                let answer = byte_range(&one("range", format!("bytes=-{n}").as_bytes()), len);
                let expected = if n == 0 {
                    RangeAnswer::Unsatisfiable
                } else if len == 0 {
                    RangeAnswer::Whole
                } else {
                    RangeAnswer::Part(len.saturating_sub(n)..len)
                };
                prop_assert_eq!(answer, expected);
            }

            /// Everything the store path reads from an origin's response and
            /// a client's request, fed arbitrary values: no panic anywhere.
            #[test]
            fn response_policy_never_panics(
                resp_values in prop::collection::vec(field_value(), RESPONSE_FIELDS.len()),
                req_values in prop::collection::vec(field_value(), REQUEST_FIELDS.len()),
                status in 100u16..600,
                now_secs in 0u64..(1 << 40),
                delay in 0u64..(1 << 32),
            ) {
                let mut resp = HeaderMap::new();
                for (name, v) in RESPONSE_FIELDS.iter().zip(&resp_values) {
                    if let Ok(v) = HeaderValue::from_bytes(v) {
                        resp.append(name, v);
                    }
                }
                let mut req = HeaderMap::new();
                for (name, v) in REQUEST_FIELDS.iter().zip(&req_values) {
                    if let Ok(v) = HeaderValue::from_bytes(v) {
                        req.append(name, v);
                    }
                }
                let status = StatusCode::from_u16(status).unwrap();
                let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now_secs);
                let later = now + Duration::from_secs(delay);
                let cc = ResponseDirectives::from_headers(&resp);
                let _ = storable(&Method::GET, &req, status, &resp, &cc, POLICY);
                let lifetime = freshness_lifetime(status, &resp, &cc, now, HEUR);
                let age = corrected_initial_age(&resp, now, later);
                let mut f = Freshness::plain(lifetime, later);
                f.set_corrected_initial_age(age);
                f.no_cache = cc.no_cache;
                f.forbids_stale = cc.forbids_stale();
                f.set_stale_while_revalidate(Duration::from_secs(cc.stale_while_revalidate.unwrap_or(0)));
                f.set_stale_if_error(Duration::from_secs(cc.stale_if_error.unwrap_or(0)));
                let rd = RequestDirectives::from_headers(&req);
                let _ = usability(&f, &rd, later + Duration::from_secs(delay));
                let _ = f.can_serve_on_error(later, Some(Duration::from_secs(delay)));
                let _ = conditional_matches(&req, &resp);
                let _ = if_range_allows(&req, &resp);
                let mut stored = resp.clone();
                update_from_304(&mut stored, &resp);
                let _ = not_modified_headers(&stored);
                let _ = invalidation_targets(&Method::POST, StatusCode::CREATED, &resp, "a.example", "/p");
            }

            #[test]
            fn if_range_never_panics(
                v in prop::collection::vec(any::<u8>(), 0..64),
                etag in "\\PC{0,12}",
            ) {
                let stored = one("etag", etag.as_bytes());
                let _ = if_range_allows(&one("if-range", &v), &stored);
            }

            #[test]
            fn vary_parsing_never_panics(
                lines in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), 0..4),
                req in prop::collection::vec(any::<u8>(), 0..48),
            ) {
                let mut resp = HeaderMap::new();
                for l in &lines {
                    if let Ok(v) = HeaderValue::from_bytes(l) {
                        resp.append(header::VARY, v);
                    }
                }
                if let Some(fields) = vary_fields(&resp) {
                    // Every field is a usable, lowercased header name.
                    for f in &fields {
                        prop_assert_eq!(f.as_str(), f.as_str().to_ascii_lowercase());
                    }
                    let req = one("accept-language", &req);
                    let stored: Vec<_> =
                        fields.iter().map(|f| (f.clone(), vary_value(&req, f))).collect();
                    // A request always matches the variant recorded from it.
                    prop_assert!(vary_matches(&stored, &req));
                }
            }
        }
    }
}
