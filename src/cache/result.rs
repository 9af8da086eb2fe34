//! The cache's verdict on one request: `CacheResult` (as `X-Cache` and
//! the metrics name it) and the full `CacheStatus` (RFC 9211).

use super::policy::NotStorable;
use http::HeaderValue;

/// How a response was produced, as `X-Cache` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Served from the store, fresh (or stale within what the request allows).
    Hit,
    /// Fetched from the origin (stored or not).
    Miss,
    /// A stale entry served: while revalidating, or because the origin failed.
    Stale,
    /// A stored entry confirmed by the origin's 304.
    Revalidated,
    /// Passed to the origin without consulting the store (route rule or method).
    Bypass,
}

impl CacheResult {
    pub(crate) const ALL: [CacheResult; 5] = [
        CacheResult::Hit,
        CacheResult::Miss,
        CacheResult::Stale,
        CacheResult::Revalidated,
        CacheResult::Bypass,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "HIT",
            CacheResult::Miss => "MISS",
            CacheResult::Stale => "STALE",
            CacheResult::Revalidated => "REVALIDATED",
            CacheResult::Bypass => "BYPASS",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

/// How the origin was involved (RFC 9211 2.2, `fwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forward {
    /// Not a cache request at all (bypass route, unsafe method).
    Bypass,
    /// Nothing usable was stored.
    Miss,
    /// Nothing was stored for this URI.
    UriMiss,
    /// A stored response had to be validated or replaced.
    Stale,
}

impl Forward {
    fn as_str(self) -> &'static str {
        match self {
            Forward::Bypass => "bypass",
            Forward::Miss => "miss",
            Forward::UriMiss => "uri-miss",
            Forward::Stale => "stale",
        }
    }
}

/// Why, in kvgate's words (RFC 9211 2.8, `detail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detail {
    /// Answered from another request's fetch (single flight).
    Coalesced,
    /// Stale, and the client's `max-stale` accepts it.
    MaxStale,
    /// Stale within stale-while-revalidate; a refresh runs behind it.
    StaleWhileRevalidate,
    /// Stale, because the origin failed (RFC 5861 4, or the grace).
    StaleIfError,
    /// The origin could not be reached or answered badly (502 / 504).
    OriginError,
    /// Answered by the self-service preferences endpoint.
    SelfService,
    /// Not stored, and why (9111 3).
    NotStored(NotStorable),
    /// Not stored: larger than `max_object_bytes`.
    TooLarge,
}

impl Detail {
    fn as_str(self) -> &'static str {
        match self {
            Detail::Coalesced => "coalesced",
            Detail::MaxStale => "max-stale",
            Detail::StaleWhileRevalidate => "stale-while-revalidate",
            Detail::StaleIfError => "stale-if-error",
            Detail::OriginError => "origin-error",
            Detail::SelfService => "self-service",
            Detail::NotStored(why) => why.as_str(),
            Detail::TooLarge => "too-large",
        }
    }
}

/// Everything a response says about how the cache produced it: the
/// `X-Cache` verdict and the RFC 9211 `Cache-Status` parameters, built as
/// values where the decision is made and rendered once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheStatus {
    pub(crate) result: CacheResult,
    /// `None`: answered from the cache (`hit`).
    pub(crate) fwd: Option<Forward>,
    pub(crate) fwd_status: Option<u16>,
    pub(crate) stored: bool,
    pub(crate) detail: Option<Detail>,
}

impl CacheStatus {
    /// Answered from the cache.
    pub(crate) fn hit(result: CacheResult) -> CacheStatus {
        CacheStatus {
            result,
            fwd: None,
            fwd_status: None,
            stored: false,
            detail: None,
        }
    }

    /// Went to the origin (or would have).
    pub(crate) fn forward(result: CacheResult, fwd: Forward) -> CacheStatus {
        CacheStatus {
            fwd: Some(fwd),
            ..CacheStatus::hit(result)
        }
    }

    pub(crate) fn status(self, s: u16) -> CacheStatus {
        CacheStatus {
            fwd_status: Some(s),
            ..self
        }
    }

    pub(crate) fn stored(self) -> CacheStatus {
        CacheStatus {
            stored: true,
            ..self
        }
    }

    pub(crate) fn detail(self, d: Detail) -> CacheStatus {
        CacheStatus {
            detail: Some(d),
            ..self
        }
    }

    /// A plain hit, whose header value is prebuilt.
    pub(crate) fn is_plain_hit(&self) -> bool {
        self.fwd.is_none() && self.detail.is_none()
    }

    /// The parameters after the cache's name: `hit; detail=coalesced`,
    /// `fwd=uri-miss; fwd-status=200; stored`.
    pub(crate) fn params(&self) -> String {
        use std::fmt::Write;
        let mut s = String::with_capacity(48);
        match self.fwd {
            None => s.push_str("hit"),
            Some(f) => {
                s.push_str("fwd=");
                s.push_str(f.as_str());
            }
        }
        if let Some(st) = self.fwd_status {
            let _ = write!(s, "; fwd-status={st}");
        }
        if self.stored {
            s.push_str("; stored");
        }
        if let Some(d) = self.detail {
            s.push_str("; detail=");
            s.push_str(d.as_str());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc9211_parameters_render_in_order() {
        assert_eq!(CacheStatus::hit(CacheResult::Hit).params(), "hit");
        assert_eq!(
            CacheStatus::hit(CacheResult::Hit)
                .detail(Detail::Coalesced)
                .params(),
            "hit; detail=coalesced"
        );
        assert_eq!(
            CacheStatus::forward(CacheResult::Miss, Forward::UriMiss)
                .status(200)
                .stored()
                .params(),
            "fwd=uri-miss; fwd-status=200; stored"
        );
        assert_eq!(
            CacheStatus::forward(CacheResult::Revalidated, Forward::Stale)
                .status(304)
                .detail(Detail::NotStored(NotStorable::Private))
                .params(),
            "fwd=stale; fwd-status=304; detail=private"
        );
    }
}
