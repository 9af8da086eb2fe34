//! The cache's verdict on one request, as `X-Cache` and the metrics name it.

use http::HeaderValue;

/// How a response was produced, as `X-Cache` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
    Stale,
    Revalidated,
    Bypass,
}

impl CacheResult {
    pub const ALL: [CacheResult; 5] = [
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
