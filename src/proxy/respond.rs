//! Response construction: from a stored entry, from the origin, and the
//! gateway's own errors; the `X-Cache` and `Cache-Status` (RFC 9211) fields.

use super::body::Body;
use crate::cache::policy;
pub use crate::cache::result::CacheResult;
pub(crate) use crate::cache::result::{CacheStatus, Detail, Forward};
use crate::cache::storage::Entry;
use crate::protocol::interned;
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
        // Static (interned) values: a hit clones them without writing a
        // reference count every core shares.
        Labels {
            via: interned::value(&format!("1.1 {name}"))
                .unwrap_or(HeaderValue::from_static("1.1 kvgate")),
            hit: interned::value(&format!("{name}; hit"))
                .unwrap_or(HeaderValue::from_static("kvgate; hit")),
            name,
        }
    }

    /// The plain hit's Cache-Status member (`name; hit`).
    pub(crate) fn hit(&self) -> &HeaderValue {
        &self.hit
    }

    /// A Cache-Status member (RFC 9211 2): `name; params`.
    pub(crate) fn cache_status(&self, status: &CacheStatus) -> HeaderValue {
        if status.is_plain_hit() {
            return self.hit.clone();
        }
        HeaderValue::from_str(&format!("{}; {}", self.name, status.params()))
            .unwrap_or_else(|_| self.hit.clone())
    }
}

/// A response and the cache's verdict on it, carried together from where
/// it is decided to the metrics and the access log (never re-parsed from
/// the headers).
pub(crate) struct Answer {
    pub response: Response<Body>,
    pub result: CacheResult,
}

impl Answer {
    /// Marks `response` with the gateway's fields for `status`.
    pub(crate) fn marked(
        mut response: Response<Body>,
        labels: &Labels,
        status: CacheStatus,
    ) -> Answer {
        mark(response.headers_mut(), labels, &status);
        Answer {
            response,
            result: status.result,
        }
    }
}

/// Adds the gateway's own fields to a response.
pub(crate) fn mark(h: &mut HeaderMap, labels: &Labels, status: &CacheStatus) {
    h.insert(X_CACHE, status.result.header());
    h.append(CACHE_STATUS, labels.cache_status(status));
    h.append(header::VIA, labels.via.clone());
}

/// A response from a stored entry, with `Age` (9111 4.2.3, 5.1). Answers 304
/// when the client's own conditional matches (9111 4.3.2). `head` omits the
/// body.
pub(crate) fn from_entry(
    e: &Entry,
    req: &HeaderMap,
    head: bool,
    now: SystemTime,
    labels: &Labels,
    status: CacheStatus,
) -> Answer {
    let age = e.freshness.current_age(now).as_secs();
    let stored = e.header_map();
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
            Body::full(e.body())
        });
        *r.status_mut() = e.status;
        *r.headers_mut() = stored;
        if head {
            // A HEAD answer keeps the GET's Content-Length (RFC 9110 9.3.2).
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(e.body_len()));
        }
        r
    };
    resp.headers_mut()
        .insert(header::AGE, HeaderValue::from(age));
    Answer::marked(resp, labels, status)
}

/// For a Range request: a 206 (or 416) from a stored 200 for a single byte
/// range (RFC 9110 14.2, 15.3.7), the slice sharing the stored body; the
/// whole response when the range cannot or need not be honoured.
fn partial(e: &Entry, stored: HeaderMap, req: &HeaderMap, head: bool) -> Response<Body> {
    let len = e.body_len() as u64;
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
                Body::full(e.body())
            });
            *r.status_mut() = e.status;
            *r.headers_mut() = stored;
            return r;
        }
        policy::RangeAnswer::Part(range) => {
            let body = e.body_slice(range.start as usize..range.end as usize);
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
    cache_status: CacheStatus,
) -> Answer {
    let mut r = Response::new(Body::from(format!("kvgate: {message}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Answer::marked(r, labels, cache_status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_interned_and_names_checked() {
        let (a, b) = (Labels::new("edge-1.eu"), Labels::new("edge-1.eu"));
        assert_eq!(a.via, "1.1 edge-1.eu");
        assert_eq!(a.hit, "edge-1.eu; hit");
        // One leaked text per distinct name, however many generations ask.
        assert_eq!(a.via.as_bytes().as_ptr(), b.via.as_bytes().as_ptr());
        assert_eq!(a.hit.as_bytes().as_ptr(), b.hit.as_bytes().as_ptr());
        // A name a header value may not carry falls back to the default.
        for bad in ["", "a b", "x\r\ny", "é"] {
            assert_eq!(Labels::new(bad).via, "1.1 kvgate");
        }
    }
}
