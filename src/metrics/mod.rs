//! Process-wide counters for `/metrics` (Prometheus text format) and tests.
//!
//! What every request counts is striped ([`StripedCounter`]): no core
//! writes a cache line another core writes. Counters of origin requests,
//! purges and refreshes are plain atomics: an origin round trip or an admin
//! call costs far more than the line they bounce.

mod striped;

pub(crate) use striped::StripedCounter;

pub(crate) mod ops;

use crate::cache::result::CacheResult;
use http::StatusCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the origin latency histogram buckets.
pub(crate) const ORIGIN_BUCKETS: [f64; 10] =
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
pub(crate) struct Metrics {
    /// Requests by `X-Cache` result, in `CacheResult::ALL` order.
    requests: [StripedCounter; 5],
    pub responses_5xx: AtomicU64,
    pub origin_requests: AtomicU64,
    pub origin_errors: AtomicU64,
    pub background_refreshes: AtomicU64,
    /// Misses answered with a response another instance fetched (cluster).
    pub cluster_hits: AtomicU64,
    /// Purge requests served by the admin API, and the entries they touched
    /// (removed, or marked stale by a soft purge).
    pub purges: AtomicU64,
    pub purged_entries: AtomicU64,
    /// Cumulative-style counts per bucket (plus +Inf) and the sum in µs.
    origin_latency: [AtomicU64; 11],
    origin_latency_sum_us: AtomicU64,
}

impl Metrics {
    pub(crate) fn record(&self, result: Option<CacheResult>, status: StatusCode) {
        if let Some(r) = result {
            self.requests[r.index()].incr();
        }
        if status.is_server_error() {
            self.responses_5xx.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn observe_origin(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = ORIGIN_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(ORIGIN_BUCKETS.len());
        self.origin_latency[i].fetch_add(1, Ordering::Relaxed);
        self.origin_latency_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub(crate) fn requests_for(&self, r: CacheResult) -> u64 {
        self.requests[r.index()].sum()
    }

    /// Origin latency histogram: per-bucket counts (not cumulative), sum in µs.
    pub(crate) fn origin_latency(&self) -> ([u64; 11], u64) {
        let mut out = [0; 11];
        for (o, a) in out.iter_mut().zip(self.origin_latency.iter()) {
            *o = a.load(Ordering::Relaxed);
        }
        (out, self.origin_latency_sum_us.load(Ordering::Relaxed))
    }
}
