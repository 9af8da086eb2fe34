//! The cache's verdict on one request, as `X-Cache` and the metrics name it.

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

    pub(crate) fn from_bytes(b: &[u8]) -> Option<CacheResult> {
        CacheResult::ALL
            .into_iter()
            .find(|r| r.as_str().as_bytes() == b)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}
