//! Process-wide counters for `/metrics` (`admin::prometheus`) and tests.
//!
//! What every request counts is striped ([`StripedCounter`]): no core
//! writes a cache line another core writes. Counters of origin requests,
//! purges and refreshes are plain atomics: an origin round trip or an admin
//! call costs far more than the line they bounce.

mod histogram;
mod striped;

pub(crate) use histogram::{Histogram, HistogramSnapshot, LATENCY_BUCKETS};
pub(crate) use striped::StripedCounter;

pub(crate) mod ops;
pub(crate) mod process;

use crate::cache::result::CacheResult;
use http::StatusCode;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Status classes counted apart, in this order; anything outside 100..=599
/// (the http crate allows up to 999) is "other".
pub(crate) const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

fn status_class(status: StatusCode) -> usize {
    match status.as_u16() {
        100..=599 => usize::from(status.as_u16() / 100 - 1),
        _ => STATUS_CLASSES.len() - 1,
    }
}

#[derive(Default)]
pub(crate) struct Metrics {
    /// Client-facing latency (request head in to response head out) by
    /// `X-Cache` result, in `CacheResult::ALL` order; their counts are the
    /// requests by result.
    latency: [Histogram; 5],
    /// Responses by status class, in `STATUS_CLASSES` order.
    responses: [StripedCounter; 6],
    pub origin_requests: AtomicU64,
    pub origin_errors: AtomicU64,
    pub background_refreshes: AtomicU64,
    /// Misses answered with a response another instance fetched (cluster).
    pub cluster_hits: AtomicU64,
    /// Purge requests served by the admin API, and the entries they touched
    /// (removed, or marked stale by a soft purge).
    pub purges: AtomicU64,
    pub purged_entries: AtomicU64,
    /// Time from sending a request to the origin to its response head.
    origin_latency: Histogram,
    /// Hits answered by the HTTP/1.1 fast path (`proxy::h1_hits`), also
    /// counted in the requests by result.
    pub fast_hits: StripedCounter,
}

impl Metrics {
    /// One client request answered: three relaxed adds on cache lines the
    /// calling thread owns (latency bucket, latency sum, status class).
    pub(crate) fn record(&self, result: CacheResult, status: StatusCode, elapsed: Duration) {
        self.latency[result.index()].observe(elapsed);
        self.responses[status_class(status)].incr();
    }

    pub(crate) fn observe_origin(&self, d: Duration) {
        self.origin_latency.observe(d);
    }

    pub(crate) fn requests_for(&self, r: CacheResult) -> u64 {
        self.latency[r.index()].count()
    }

    /// Client-facing latency of the requests with result `r`.
    pub(crate) fn latency_for(&self, r: CacheResult) -> HistogramSnapshot {
        self.latency[r.index()].snapshot()
    }

    /// Responses by status class, in `STATUS_CLASSES` order.
    pub(crate) fn responses_by_class(&self) -> [u64; 6] {
        std::array::from_fn(|i| self.responses[i].sum())
    }

    pub(crate) fn responses_5xx(&self) -> u64 {
        self.responses[4].sum()
    }

    pub(crate) fn origin_latency(&self) -> HistogramSnapshot {
        self.origin_latency.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        let class = |n| STATUS_CLASSES[status_class(StatusCode::from_u16(n).unwrap())];
        assert_eq!(class(101), "1xx");
        assert_eq!(class(200), "2xx");
        assert_eq!(class(304), "3xx");
        assert_eq!(class(499), "4xx");
        assert_eq!(class(504), "5xx");
        assert_eq!(class(599), "5xx");
        assert_eq!(class(600), "other");
        assert_eq!(class(999), "other");
    }

    #[test]
    fn a_request_counts_once_by_result_latency_and_class() {
        let m = Metrics::default();
        m.record(CacheResult::Hit, StatusCode::OK, Duration::from_micros(40));
        m.record(
            CacheResult::Miss,
            StatusCode::BAD_GATEWAY,
            Duration::from_secs(31),
        );
        assert_eq!(m.requests_for(CacheResult::Hit), 1);
        assert_eq!(m.requests_for(CacheResult::Miss), 1);
        assert_eq!(m.latency_for(CacheResult::Hit).buckets[0], 1);
        let miss = m.latency_for(CacheResult::Miss);
        assert_eq!(miss.buckets[LATENCY_BUCKETS.len() - 1], 1, "le=60");
        assert_eq!(m.responses_by_class(), [0, 1, 0, 0, 1, 0]);
        assert_eq!(m.responses_5xx(), 1);
    }
}
