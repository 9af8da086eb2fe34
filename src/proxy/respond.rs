//! Response construction: from a stored entry, from the origin, and the
//! gateway's own errors; the `X-Cache` and `Cache-Status` (RFC 9211) fields.

use super::body::Body;
use crate::cache::policy;
pub use crate::cache::result::CacheResult;
use crate::cache::storage::Entry;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use std::time::SystemTime;

pub(crate) const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub(crate) const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Prebuilt header values for the hot path.
pub struct Labels {
    pub(crate) name: String,
    pub(crate) via: HeaderValue,
    hit: HeaderValue,
}

impl Labels {
    /// Labels for a gateway named `name` (in `Via` and `Cache-Status`).
    pub fn new(name: &str) -> Labels {
        let name = if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            "kvgate".to_string()
        } else {
            name.to_string()
        };
        Labels {
            via: HeaderValue::from_str(&format!("1.1 {name}"))
                .unwrap_or(HeaderValue::from_static("1.1 kvgate")),
            hit: HeaderValue::from_str(&format!("{name}; hit"))
                .unwrap_or(HeaderValue::from_static("kvgate; hit")),
            name,
        }
    }

    /// A Cache-Status member (RFC 9211 2): `name; params`.
    pub(crate) fn cache_status(&self, params: &str) -> HeaderValue {
        if params == "hit" {
            return self.hit.clone();
        }
        HeaderValue::from_str(&format!("{}; {}", self.name, params))
            .unwrap_or_else(|_| self.hit.clone())
    }
}

/// Adds the gateway's own fields to a response.
pub(crate) fn mark(h: &mut HeaderMap, labels: &Labels, result: CacheResult, status_params: &str) {
    h.insert(X_CACHE, result.header());
    h.append(CACHE_STATUS, labels.cache_status(status_params));
    h.append(header::VIA, labels.via.clone());
}

/// A response from a stored entry, with `Age` (9111 4.2.3, 5.1). Answers 304
/// when the client's own conditional matches (9111 4.3.2). `head` omits the
/// body.
pub fn from_entry(
    e: &Entry,
    req: &HeaderMap,
    head: bool,
    now: SystemTime,
    labels: &Labels,
    result: CacheResult,
    status_params: &str,
) -> Response<Body> {
    let age = e.freshness.current_age(now).as_secs();
    let stored = e.headers.to_map();
    let conditional = e.status == StatusCode::OK && policy::conditional_matches(req, &stored);
    let mut resp = if conditional {
        let mut r = Response::new(Body::Empty);
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        *r.headers_mut() = policy::not_modified_headers(&stored);
        r
    } else if req.contains_key(header::RANGE) {
        partial(e, stored, req, head)
    } else {
        let mut r = Response::new(if head {
            Body::Empty
        } else {
            Body::full(e.body.clone())
        });
        *r.status_mut() = e.status;
        *r.headers_mut() = stored;
        if head {
            // A HEAD answer keeps the GET's Content-Length (RFC 9110 9.3.2).
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(e.body.len()));
        }
        r
    };
    resp.headers_mut()
        .insert(header::AGE, HeaderValue::from(age));
    mark(resp.headers_mut(), labels, result, status_params);
    resp
}

/// For a Range request: a 206 (or 416) from a stored 200 for a single byte
/// range (RFC 9110 14.2, 15.3.7), the slice sharing the stored body; the
/// whole response when the range cannot or need not be honoured.
fn partial(e: &Entry, stored: HeaderMap, req: &HeaderMap, head: bool) -> Response<Body> {
    let len = e.body.len() as u64;
    let answer = if e.status == StatusCode::OK && policy::if_range_allows(req, &stored) {
        policy::byte_range(req, len)
    } else {
        policy::RangeAnswer::Whole
    };
    // byte_range promises a non-empty part within the body; should that ever
    // break, send the whole body rather than panic in `slice` or underflow
    // `end - 1` below.
    let answer = match answer {
        policy::RangeAnswer::Part(r) if r.start >= r.end || r.end > len => {
            policy::RangeAnswer::Whole
        }
        a => a,
    };
    let mut r = match answer {
        policy::RangeAnswer::Whole => {
            let mut r = Response::new(if head {
                Body::Empty
            } else {
                Body::full(e.body.clone())
            });
            *r.status_mut() = e.status;
            *r.headers_mut() = stored;
            return r;
        }
        policy::RangeAnswer::Part(range) => {
            let body = e.body.slice(range.start as usize..range.end as usize);
            let mut r = Response::new(Body::Empty);
            *r.headers_mut() = stored;
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            let cr = format!("bytes {}-{}/{len}", range.start, range.end - 1);
            if let Ok(v) = HeaderValue::from_str(&cr) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            if !head {
                *r.body_mut() = Body::full(body);
            }
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            r
        }
        policy::RangeAnswer::Unsatisfiable => {
            let mut r = Response::new(Body::Empty);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            r
        }
    };
    r.headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    r
}

/// The gateway's own answer (errors, refusals): short plain text.
pub(crate) fn own(
    status: StatusCode,
    message: &str,
    labels: &Labels,
    result: CacheResult,
    params: &str,
) -> Response<Body> {
    let mut r = Response::new(Body::from(format!("kvgate: {message}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    mark(r.headers_mut(), labels, result, params);
    r
}
