//! `GET /stats`: the gateway's counters as one JSON document, for the
//! dashboard's live charts (and anyone who would rather not parse the
//! Prometheus text). Counters are totals since start; a reader takes rates
//! from the difference between two snapshots and their `time_ms`.

use crate::cache::result::CacheResult;
use crate::cache::storage::Storage;
use crate::metrics::LATENCY_BUCKETS;
use crate::proxy::gateway::Gateway;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

pub(super) fn snapshot(gw: &Gateway) -> Value {
    let m = &gw.metrics;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut requests = Map::new();
    let mut total = 0u64;
    for r in CacheResult::ALL {
        let n = m.requests_for(r);
        total += n;
        requests.insert(r.as_str().to_string(), n.into());
    }
    let hits = m.requests_for(CacheResult::Hit);
    let origin = m.origin_latency();
    let latency: Vec<Value> = origin
        .buckets
        .iter()
        .enumerate()
        .map(|(i, n)| json!({ "le": LATENCY_BUCKETS.get(i), "count": n }))
        .collect();
    let (bytes, entries) = gw.store.usage();
    let stats = gw.store.stats();
    json!({
        "time_ms": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        "requests": requests,
        "requests_total": total,
        "hit_ratio": if total == 0 { Value::Null } else { (hits as f64 / total as f64).into() },
        "responses_5xx": m.responses_5xx(),
        "origin": {
            "requests": load(&m.origin_requests),
            "errors": load(&m.origin_errors),
            "latency_buckets": latency,
            "latency_sum_seconds": origin.sum_seconds,
            "latency_count": origin.count,
        },
        "cache": {
            "bytes": bytes,
            "max_bytes": gw.config.cache.max_bytes,
            "entries": entries,
            "tags": gw.store.tag_count(),
            "version": gw.version(),
            "evictions": load(&stats.evictions),
            "expired": load(&stats.expired),
        },
        "purges": load(&m.purges),
        "purged_entries": load(&m.purged_entries),
        "background_refreshes": load(&m.background_refreshes),
        "coalesced_waiters": load(&gw.flights.coalesced),
        "edge": gw.edge.is_some(),
    })
}
