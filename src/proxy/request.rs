//! Phase 1, the request checked: limits a client cannot exceed, a valid
//! authority, no tunnels; the request target in normal form; and the
//! per-request facts every later phase reads (`Ctx`).

use super::gateway::Gateway;
use super::headers::{forward_request_headers, ClientInfo};
use super::respond::{Answer, CacheResult};
use crate::cache::directives::RequestDirectives;
use crate::cache::key::CacheKey;
use crate::config::RouteConfig;
use crate::protocol::path::{self, PathError};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode};
use std::sync::Arc;

/// The per-request facts every branch needs.
pub(super) struct Ctx {
    pub(super) key: CacheKey,
    pub(super) method: Method,
    /// The request headers as forwarded (after the guard and edge).
    pub(super) headers: HeaderMap,
    pub(super) req_cc: RequestDirectives,
    pub(super) route: Option<Arc<RouteConfig>>,
    pub(super) client: ClientInfo,
}
impl Ctx {
    /// The request target (path and query), in normal form.
    pub(super) fn path(&self) -> &str {
        self.key.path_and_query()
    }

    /// Headers for the origin: the client's (after edge injection), with
    /// hop-by-hop fields removed and Via / X-Forwarded-* added.
    pub(super) fn origin_headers(&self, via: &HeaderValue) -> HeaderMap {
        let mut h = self.headers.clone();
        forward_request_headers(&mut h, self.client, self.key.authority(), via);
        h
    }

    /// Whether this request alone keeps a response from being stored
    /// (`Authorization`, or its own `no-store`): such a request neither
    /// joins nor leads a shared fetch, and does not evict what others
    /// stored (9111 3.5, 5.2.1.5).
    pub(super) fn limits_storage_itself(&self) -> bool {
        self.req_cc.no_store || self.headers.contains_key(header::AUTHORIZATION)
    }
}
/// The request's authority: the URI's (HTTP/2 `:authority`, or an
/// absolute-form target, which wins over `Host` per RFC 9112 3.2.2), else
/// `Host`, else empty (HTTP/1.0).
pub(super) fn authority(parts: &http::request::Parts) -> &str {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}
/// RFC 9112 3.2: an HTTP/1.1 request without `Host`, with more than one, or
/// with one that is not a valid authority, gets 400 (it must not reach the
/// origin, nor name a cache key).
pub(super) fn check_host<B>(req: &Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    match host {
        None if req.version() == http::Version::HTTP_11 && req.uri().authority().is_none() => {
            Err("HTTP/1.1 request without Host")
        }
        None => Ok(()),
        Some(h) if is_valid_host(h.as_bytes()) => Ok(()),
        Some(_) => Err("invalid Host header"),
    }
}

/// RFC 9110 7.2 / RFC 3986 3.2.2: `uri-host [ ":" port ]`, checked byte by
/// byte without allocating (this runs on every request): reg-name
/// characters, percent-escapes, an IP literal's brackets and colons. No
/// userinfo (`@`), path, query, fragment, whitespace or controls.
pub(super) fn is_valid_host(h: &[u8]) -> bool {
    !h.is_empty()
        && h.iter()
            .all(|&b| path::is_unreserved_or_sub_delim(b) || matches!(b, b'%' | b':' | b'[' | b']'))
}
/// Rewrites the request target to its normal form (see `protocol::path`).
pub(super) fn normalize_request_target(parts: &mut http::request::Parts) -> Result<(), PathError> {
    let Some(pq) = parts.uri.path_and_query() else {
        return Ok(());
    };
    let std::borrow::Cow::Owned(normal) = path::normalize_target(pq.as_str())? else {
        return Ok(());
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    // The normal form only drops and decodes characters the original had,
    // so it is still a valid path and query.
    uri.path_and_query = http::uri::PathAndQuery::try_from(normal).ok();
    parts.uri = http::Uri::from_parts(uri).map_err(|_| PathError::BadEscape)?;
    Ok(())
}
impl Gateway {
    /// Guard: limits a client cannot exceed (414, 413) and a request head
    /// that names no valid authority (400). Header size (431) and the
    /// header-read timeout are enforced by the listener.
    pub(super) fn guard<B: http_body::Body>(&self, req: &Request<B>) -> Option<Answer> {
        let limits = &self.config.server;
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        if path.len() > limits.max_uri_bytes {
            return Some(self.own(
                StatusCode::URI_TOO_LONG,
                "request target too long",
                CacheResult::Bypass,
            ));
        }
        if let Err(why) = check_host(req) {
            return Some(self.own(StatusCode::BAD_REQUEST, why, CacheResult::Bypass));
        }
        // A reverse proxy tunnels nothing (CONNECT), and TRACE would echo
        // the client's cookies and credentials back through any script
        // that can send it (cross-site tracing).
        if req.method() == Method::CONNECT || req.method() == Method::TRACE {
            return Some(self.own(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed",
                CacheResult::Bypass,
            ));
        }
        let declared_len = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_len.is_some_and(|n| n > limits.max_body_bytes)
            || req.body().size_hint().lower() > limits.max_body_bytes
        {
            return Some(self.own(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
                CacheResult::Bypass,
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc9110_7_2_host_values() {
        for ok in [
            "api.example",
            "api.example:8080",
            "[::1]:80",
            "127.0.0.1",
            "xn--bcher-kva.example",
        ] {
            assert!(is_valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "user@evil",
            "a b",
            "a/b",
            "a?b",
            "a#b",
            "a\tb",
            "h\u{7f}",
        ] {
            assert!(!is_valid_host(bad.as_bytes()), "{bad:?}");
        }
    }
}
