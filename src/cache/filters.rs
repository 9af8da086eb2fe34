//! Where the operator's rules meet the origin's: a route's TTLs, stale
//! windows and Set-Cookie allowance layered over RFC 9111 storability and
//! freshness, and the grace for serving stale when the origin fails. Pure
//! functions of configuration, request and response; the proxy calls them.

use super::directives::{RequestDirectives, ResponseDirectives};
use super::policy::{self, Freshness, Heuristic, NotStorable, StoragePolicy};
use super::storage::StoredHeaders;
use crate::config::{CacheConfig, RouteConfig};
use http::{HeaderMap, Method, StatusCode};
use std::time::{Duration, SystemTime};

/// May this response be stored (9111 3), given the route? A route with a
/// TTL makes heuristically cacheable responses storable without explicit
/// freshness; a response whose headers an entry cannot keep whole is not
/// stored (a HIT must carry every header the MISS had).
pub(crate) fn storable(
    cache: &CacheConfig,
    route: Option<&RouteConfig>,
    method: &Method,
    req: &HeaderMap,
    status: StatusCode,
    resp: &HeaderMap,
    cc: &ResponseDirectives,
) -> Result<(), NotStorable> {
    let allow_set_cookie = route
        .and_then(|r| r.allow_set_cookie)
        .unwrap_or(cache.allow_set_cookie);
    let verdict = policy::storable(
        method,
        req,
        status,
        resp,
        cc,
        StoragePolicy { allow_set_cookie },
    )
    .and_then(|()| {
        StoredHeaders::fits(resp)
            .then_some(())
            .ok_or(NotStorable::HeadersTooLarge)
    });
    let route_ttl = route.is_some_and(|r| r.ttl_secs.is_some() || r.default_ttl_secs.is_some());
    match verdict {
        Err(NotStorable::NoFreshnessOrValidator)
            if route_ttl && policy::heuristically_cacheable(status) =>
        {
            Ok(())
        }
        v => v,
    }
}

/// The stored response's freshness (9111 4.2): the origin's lifetime, or
/// the route's `ttl_secs` (forced) / `default_ttl_secs` (when the origin
/// says nothing); stale windows from the origin, else the route.
pub(crate) fn freshness(
    cache: &CacheConfig,
    route: Option<&RouteConfig>,
    status: StatusCode,
    h: &HeaderMap,
    cc: &ResponseDirectives,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Freshness {
    let heuristic = Heuristic {
        fraction: cache.heuristic_fraction,
        max: Duration::from_secs(cache.heuristic_max_secs),
    };
    let mut lifetime = policy::freshness_lifetime(status, h, cc, response_time, heuristic);
    if let Some(r) = route {
        if let Some(t) = r.ttl_secs {
            lifetime = Duration::from_secs(t);
        } else if let (Some(t), false) = (r.default_ttl_secs, policy::has_explicit_freshness(h, cc))
        {
            lifetime = Duration::from_secs(t);
        }
    }
    let swr = cc
        .stale_while_revalidate
        .or(route.and_then(|r| r.stale_while_revalidate_secs))
        .unwrap_or(0);
    let sie = cc
        .stale_if_error
        .or(route.and_then(|r| r.stale_if_error_secs))
        .unwrap_or(0);
    let mut f = Freshness::plain(lifetime, response_time);
    f.set_corrected_initial_age(policy::corrected_initial_age(
        h,
        request_time,
        response_time,
    ));
    f.no_cache = cc.no_cache || !cc.no_cache_fields.is_empty();
    f.forbids_stale = cc.forbids_stale();
    f.set_stale_while_revalidate(Duration::from_secs(swr));
    f.set_stale_if_error(Duration::from_secs(sie));
    f
}

/// Stale-if-error (RFC 5861 4): the stored response's own window, the
/// request's `stale-if-error`, and, when the origin could not be reached at
/// all ("disconnected", 9111 4.2.4), the configured `grace_secs`.
pub(crate) fn can_serve_on_error(
    cache: &CacheConfig,
    req_cc: &RequestDirectives,
    stored: &Freshness,
    now: SystemTime,
    disconnected: bool,
) -> bool {
    let grace = if disconnected {
        Duration::from_secs(cache.grace_secs)
    } else {
        Duration::ZERO
    };
    let allowed = req_cc
        .stale_if_error
        .map(Duration::from_secs)
        .map_or(grace, |r| r.max(grace));
    stored.can_serve_on_error(now, Some(allowed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http::HeaderValue;

    fn route(ttl: Option<u64>, default_ttl: Option<u64>) -> RouteConfig {
        RouteConfig {
            origin: None,
            name: "r".into(),
            prefix: toml::Spanned::new(0..0, "/".into()),
            bypass: false,
            ttl_secs: ttl,
            default_ttl_secs: default_ttl,
            stale_while_revalidate_secs: Some(7),
            stale_if_error_secs: None,
            allow_set_cookie: Some(true),
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_route_ttl_makes_responses_without_freshness_storable() {
        let c = Config::default().cache;
        let resp = headers(&[]);
        let cc = ResponseDirectives::from_headers(&resp);
        let req = HeaderMap::new();
        let get = Method::GET;
        assert_eq!(
            storable(&c, None, &get, &req, StatusCode::OK, &resp, &cc),
            Err(NotStorable::NoFreshnessOrValidator)
        );
        let r = route(None, Some(30));
        assert_eq!(
            storable(&c, Some(&r), &get, &req, StatusCode::OK, &resp, &cc),
            Ok(())
        );
        // The route's Set-Cookie allowance wins over the cache-wide default.
        let with_cookie = headers(&[("cache-control", "max-age=5"), ("set-cookie", "a=1")]);
        let cc = ResponseDirectives::from_headers(&with_cookie);
        assert_eq!(
            storable(&c, None, &get, &req, StatusCode::OK, &with_cookie, &cc),
            Err(NotStorable::SetCookie)
        );
        assert_eq!(
            storable(&c, Some(&r), &get, &req, StatusCode::OK, &with_cookie, &cc),
            Ok(())
        );
    }

    #[test]
    fn route_ttls_force_or_fill_in_the_lifetime() {
        let c = Config::default().cache;
        let now = SystemTime::now();
        let explicit = headers(&[("cache-control", "max-age=5")]);
        let cc = ResponseDirectives::from_headers(&explicit);
        let forced = freshness(
            &c,
            Some(&route(Some(100), None)),
            StatusCode::OK,
            &explicit,
            &cc,
            now,
            now,
        );
        assert_eq!(forced.lifetime(), Duration::from_secs(100));
        let filled = freshness(
            &c,
            Some(&route(None, Some(100))),
            StatusCode::OK,
            &explicit,
            &cc,
            now,
            now,
        );
        assert_eq!(
            filled.lifetime(),
            Duration::from_secs(5),
            "the origin said max-age"
        );
        assert_eq!(filled.stale_while_revalidate(), Duration::from_secs(7));
    }

    #[test]
    fn rfc5861_4_request_stale_if_error_and_grace() {
        let c = Config::default().cache; // grace_secs = 60
        let now = SystemTime::now();
        let stored = Freshness::plain(Duration::from_secs(10), now - Duration::from_secs(100));
        // 90 s stale: beyond the 60 s grace, within a request's 120 s.
        let none = RequestDirectives::default();
        assert!(!can_serve_on_error(&c, &none, &stored, now, true));
        let asks = RequestDirectives {
            stale_if_error: Some(120),
            ..Default::default()
        };
        assert!(can_serve_on_error(&c, &asks, &stored, now, false));
        let recent = Freshness::plain(Duration::from_secs(10), now - Duration::from_secs(30));
        assert!(
            can_serve_on_error(&c, &none, &recent, now, true),
            "within grace"
        );
        assert!(
            !can_serve_on_error(&c, &none, &recent, now, false),
            "grace is for disconnection"
        );
    }
}
