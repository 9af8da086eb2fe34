//! `/metrics`: the gateway's counters in the Prometheus text format (0.0.4).

use crate::cache::result::CacheResult;
use crate::cache::storage::Storage;
use crate::edge::CountersSnapshot;
use crate::metrics::ops::Ops;
use crate::metrics::ORIGIN_BUCKETS;
use crate::proxy::gateway::Gateway;
use std::fmt::Write;
use std::sync::atomic::Ordering;

pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Text(String);

impl Text {
    fn help(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// One metric with one value and no labels.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.help(name, kind, help);
        let _ = writeln!(self.0, "{name} {value}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let _ = writeln!(self.0, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// Renders every series.
pub(crate) fn render(gw: &Gateway) -> String {
    let m = &gw.metrics;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut t = Text(String::with_capacity(4096));

    t.help(
        "kvgate_requests_total",
        "counter",
        "Client requests by cache result (X-Cache).",
    );
    for r in CacheResult::ALL {
        t.sample(
            "kvgate_requests_total",
            &[("cache", r.as_str())],
            m.requests_for(r),
        );
    }
    t.single(
        "kvgate_responses_5xx_total",
        "counter",
        "Responses with a 5xx status.",
        load(&m.responses_5xx),
    );
    t.single(
        "kvgate_origin_requests_total",
        "counter",
        "Requests sent to the origin.",
        load(&m.origin_requests),
    );
    t.single(
        "kvgate_origin_errors_total",
        "counter",
        "Origin requests that failed (refused, reset, timed out).",
        load(&m.origin_errors),
    );

    let (buckets, sum_us) = m.origin_latency();
    t.help(
        "kvgate_origin_latency_seconds",
        "histogram",
        "Time from sending a request to the origin to its response head.",
    );
    let mut cumulative = 0u64;
    for (i, count) in buckets.iter().enumerate() {
        cumulative += count;
        let le = ORIGIN_BUCKETS
            .get(i)
            .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
        t.sample(
            "kvgate_origin_latency_seconds_bucket",
            &[("le", &le)],
            cumulative,
        );
    }
    let _ = writeln!(
        t.0,
        "kvgate_origin_latency_seconds_sum {}",
        sum_us as f64 / 1e6
    );
    let _ = writeln!(t.0, "kvgate_origin_latency_seconds_count {cumulative}");

    let (bytes, entries) = gw.store.usage();
    t.single(
        "kvgate_cache_bytes",
        "gauge",
        "Bytes charged by stored responses (bodies, headers, overhead).",
        bytes,
    );
    t.single(
        "kvgate_cache_max_bytes",
        "gauge",
        "The store's byte budget.",
        gw.config.cache.max_bytes,
    );
    t.single(
        "kvgate_cache_entries",
        "gauge",
        "Stored responses (each Vary variant counts).",
        entries,
    );
    t.single(
        "kvgate_cache_tags",
        "gauge",
        "Distinct tags in the tag index.",
        gw.store.tag_count(),
    );
    t.single(
        "kvgate_cache_version",
        "gauge",
        "The global cache namespace version.",
        gw.version(),
    );
    t.single(
        "kvgate_cache_evictions_total",
        "counter",
        "Entries evicted to stay within the byte budget.",
        load(&gw.store.stats().evictions),
    );
    t.single(
        "kvgate_cache_expired_total",
        "counter",
        "Expired entries swept because they could no longer be used.",
        load(&gw.store.stats().expired),
    );
    t.single(
        "kvgate_purges_total",
        "counter",
        "Purge requests served by the admin API.",
        load(&m.purges),
    );
    t.single(
        "kvgate_purged_entries_total",
        "counter",
        "Entries removed (or marked stale, for soft purges) by purges.",
        load(&m.purged_entries),
    );
    t.single(
        "kvgate_background_refreshes_total",
        "counter",
        "Stale-while-revalidate refreshes started.",
        load(&m.background_refreshes),
    );
    t.single(
        "kvgate_coalesced_waiters_total",
        "counter",
        "Requests that waited for another request's origin fetch instead of making their own.",
        load(&gw.flights.coalesced),
    );
    t.single(
        "kvgate_flights_in_progress",
        "gauge",
        "Origin fetches being coalesced right now.",
        gw.flights.in_flight(),
    );
    if let Some(edge) = &gw.edge {
        render_edge(&mut t, &edge.counter_registry().snapshot());
        render_outcomes(&mut t, edge.outcome_counts());
    }
    if let Some(redis) = &gw.redis {
        render_redis(&mut t, &redis.health());
    }
    if let Some(cluster) = &gw.cluster {
        t.single(
            "kvgate_cluster_following",
            "gauge",
            "1 while this instance reads the purge broadcast (purges made elsewhere reach it).",
            u8::from(cluster.following()),
        );
        t.single(
            "kvgate_cluster_cache_drops_total",
            "counter",
            "Times the memory cache was dropped because broadcast events were lost.",
            cluster.cache_drops(),
        );
        let regions = cluster.regions();
        t.help(
            "kvgate_cluster_region_following",
            "gauge",
            "1 while this instance reads the region's broadcast streams.",
        );
        for r in &regions {
            t.sample(
                "kvgate_cluster_region_following",
                &[("region", &r.name)],
                u8::from(r.following),
            );
        }
        t.help(
            "kvgate_cluster_retry_queued",
            "gauge",
            "Broadcast messages waiting to be resent to a region that failed them.",
        );
        for r in &regions {
            t.sample(
                "kvgate_cluster_retry_queued",
                &[("region", &r.name)],
                r.retry_queued,
            );
        }
        t.single(
            "kvgate_cluster_state_broadcast_dropped_total",
            "counter",
            "Edge state writes not broadcast (queue full): other instances see them after their local copy's TTL.",
            cluster.state_dropped(),
        );
        t.single(
            "kvgate_cluster_hits_total",
            "counter",
            "Misses answered with a response another instance fetched (lease handoff or L2).",
            load(&m.cluster_hits),
        );
    }
    render_ops(&mut t, &gw.ops);
    render_process(&mut t);
    t.0
}

fn render_ops(t: &mut Text, ops: &Ops) {
    t.help(
        "kvgate_reloads_total",
        "counter",
        "Config reloads (SIGHUP, POST /reload) by result.",
    );
    t.sample(
        "kvgate_reloads_total",
        &[("result", "ok")],
        Ops::get(&ops.reloads_ok),
    );
    t.sample(
        "kvgate_reloads_total",
        &[("result", "refused")],
        Ops::get(&ops.reloads_failed),
    );
    t.single(
        "kvgate_connections_accepted_total",
        "counter",
        "Connections accepted on the main listener.",
        Ops::get(&ops.connections_accepted),
    );
    t.single(
        "kvgate_connections_rejected_total",
        "counter",
        "Connections closed at once because server.max_connections were open.",
        Ops::get(&ops.connections_rejected),
    );
    t.single(
        "kvgate_connections_open",
        "gauge",
        "Connections open on the main listener.",
        Ops::get(&ops.connections_open),
    );
    t.single(
        "kvgate_state_store_errors_total",
        "counter",
        "State-store probes (/readyz) that failed or timed out.",
        Ops::get(&ops.state_errors),
    );
    t.help("kvgate_build_info", "gauge", "The running build (value 1).");
    t.sample(
        "kvgate_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
}

/// Process metrics from /proc (Linux; absent elsewhere).
fn render_process(t: &mut Text) {
    let page = 4096;
    if let Some(rss_pages) = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
    {
        t.single(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss_pages * page,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        t.single(
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            fds.count(),
        );
    }
    if let Some(start) = process_start_seconds() {
        t.single(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
            start,
        );
    }
}

/// Boot time (/proc/stat `btime`) plus the process's start in clock ticks
/// (/proc/self/stat field 22), assuming the usual 100 ticks per second.
fn process_start_seconds() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')')?.1;
    let ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    Some(btime + ticks / 100)
}

fn render_redis(t: &mut Text, regions: &[crate::redis::RegionHealth]) {
    use crate::redis::Health;
    t.help(
        "kvgate_redis_region_state",
        "gauge",
        "1 for each Redis region's current state (up, degraded, down), 0 for the others.",
    );
    for r in regions {
        for (state, name) in [
            (Health::Up, "up"),
            (Health::Degraded, "degraded"),
            (Health::Down, "down"),
        ] {
            let on = u8::from(r.health == state);
            t.sample(
                "kvgate_redis_region_state",
                &[("region", &r.name), ("state", name)],
                on,
            );
        }
    }
    t.help(
        "kvgate_redis_latency_seconds",
        "gauge",
        "Round trip of the last successful call to each Redis region.",
    );
    for r in regions {
        if let Some(us) = r.last_latency_us {
            t.sample(
                "kvgate_redis_latency_seconds",
                &[("region", &r.name)],
                us as f64 / 1e6,
            );
        }
    }
    t.help(
        "kvgate_redis_failures_total",
        "counter",
        "Calls to each Redis region that failed or timed out.",
    );
    for r in regions {
        t.sample(
            "kvgate_redis_failures_total",
            &[("region", &r.name)],
            r.failures,
        );
    }
    t.help(
        "kvgate_redis_write_retries",
        "gauge",
        "State writes each region missed (failed, dropped from the full retry queue) and still queued.",
    );
    for r in regions {
        for (kind, n) in [
            ("failed", r.failed_writes),
            ("dropped", r.dropped_writes),
            ("queued", r.queued_writes),
        ] {
            t.sample(
                "kvgate_redis_write_retries",
                &[("region", &r.name), ("kind", kind)],
                n,
            );
        }
    }
}

fn render_edge(t: &mut Text, c: &CountersSnapshot) {
    t.help(
        "kvgate_edge_route_requests_total",
        "counter",
        "Requests per configured route (\"default\" for none).",
    );
    for (route, n) in &c.requests {
        t.sample("kvgate_edge_route_requests_total", &[("route", route)], n);
    }
    t.help(
        "kvgate_edge_flag_evaluations_total",
        "counter",
        "Feature flag evaluations per flag.",
    );
    for (flag, n) in &c.flag_evaluations {
        t.sample("kvgate_edge_flag_evaluations_total", &[("flag", flag)], n);
    }
    t.help(
        "kvgate_edge_exposures_total",
        "counter",
        "Experiment exposures per experiment and variant.",
    );
    for (exp, variants) in &c.exposures {
        for (variant, n) in variants {
            t.sample(
                "kvgate_edge_exposures_total",
                &[("experiment", exp), ("variant", variant)],
                n,
            );
        }
    }
}

/// Unique exposures and conversions (2xx, once per user and day).
fn render_outcomes(t: &mut Text, (counts, dropped): (Vec<(&str, String, String, u64)>, u64)) {
    for (kind, name, help) in [
        ("exposure", "kvgate_edge_exposed_users_total", "Users exposed to a variant on a 2xx response, once per user, experiment and day."),
        ("conversion", "kvgate_edge_conversions_total", "Users reaching an experiment goal (2xx), once per user, experiment and day, by the variant injected on that request."),
    ] {
        t.help(name, "counter", help);
        for (k, exp, variant, n) in &counts {
            if *k == kind {
                t.sample(name, &[("experiment", exp), ("variant", variant)], n);
            }
        }
    }
    t.single(
        "kvgate_edge_exposure_events_dropped_total",
        "counter",
        "Exposure events dropped because the file writer's queue was full.",
        dropped,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut t = Text(String::new());
        t.sample("m", &[("a", "x\"y"), ("b", "z")], 3);
        assert_eq!(t.0, "m{a=\"x\\\"y\",b=\"z\"} 3\n");
    }
}
