//! `/metrics`: the gateway's counters through `prometheus-client`, in the
//! Prometheus text format (0.0.4) or, when the scraper asks for it in
//! `Accept`, OpenMetrics 1.0.
//!
//! Nothing here is on the request path: requests add to striped counters
//! and histograms (`crate::metrics`), and the collector below reads them,
//! the store, the edge and /proc only when scraped. The crate's own metric
//! types are not used on the request path: their counters are one atomic
//! shared by every core, their histograms take a lock.

use crate::cache::result::CacheResult;
use crate::cache::storage::Storage;
use crate::edge::CountersSnapshot;
use crate::metrics::ops::Ops;
use crate::metrics::{HistogramSnapshot, LATENCY_BUCKETS, STATUS_CLASSES};
use crate::proxy::gateway::Gateway;
use http::header::{HeaderMap, ACCEPT};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The exposition format of one scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Prometheus text 0.0.4: what browsers, curl and older scrapers get.
    Prometheus,
    /// OpenMetrics 1.0 text (`# EOF`, counters typed without `_total`).
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when `Accept` names it with a non-zero quality
    /// (Prometheus does by default), else the Prometheus text format.
    pub(crate) fn negotiate(h: &HeaderMap) -> Format {
        let wanted = h
            .get_all(ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|range| {
                let mut params = range.split(';').map(str::trim);
                let media = params.next().unwrap_or_default();
                media.eq_ignore_ascii_case("application/openmetrics-text")
                    && !params.any(|p| {
                        p.strip_prefix("q=")
                            .and_then(|q| q.parse::<f32>().ok())
                            .is_some_and(|q| q <= 0.0)
                    })
            });
        if wanted {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Renders every series of `gw` in `format`.
pub(crate) fn render(gw: &Arc<Gateway>, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(GatewayCollector(gw.clone())));
    let mut out = String::with_capacity(16 * 1024);
    let encoded = match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
    };
    if let Err(e) = encoded {
        // Writing to a String cannot fail; a collector's error would be a bug.
        tracing::error!(error = %e, "encoding /metrics failed");
    }
    out
}

/// Reads the gateway's counters when scraped.
struct GatewayCollector(Arc<Gateway>);

impl fmt::Debug for GatewayCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GatewayCollector")
    }
}

impl Collector for GatewayCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        let mut t = Out(encoder);
        render_gateway(&mut t, &self.0)?;
        let edge_counters = self
            .0
            .edge
            .as_ref()
            .map(|e| e.counter_registry().snapshot());
        if let (Some(edge), Some(counters)) = (&self.0.edge, &edge_counters) {
            render_edge(&mut t, counters)?;
            render_outcomes(&mut t, edge.outcome_counts())?;
        }
        if let Some(redis) = &self.0.redis {
            render_redis(&mut t, &redis.health())?;
        }
        render_ops(&mut t, &self.0.ops, edge_counters.as_ref())?;
        render_process(&mut t)
    }
}

/// One metric family at a time, named as scraped (`..._total` included:
/// the encoders add that suffix to counters themselves, so it is taken off
/// here, which keeps every series name greppable in this file).
struct Out<'a>(DescriptorEncoder<'a>);

fn counter_base(name: &str) -> &str {
    debug_assert!(
        name.ends_with("_total"),
        "counter {name} must end in _total"
    );
    name.strip_suffix("_total").unwrap_or(name)
}

impl Out<'_> {
    fn counter(&mut self, name: &str, help: &str, v: u64) -> fmt::Result {
        self.0
            .encode_descriptor(counter_base(name), help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, u64, u64>(&v, None)
    }

    fn counter_f64(&mut self, name: &str, help: &str, v: f64) -> fmt::Result {
        self.0
            .encode_descriptor(counter_base(name), help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, f64, f64>(&v, None)
    }

    fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let mut family =
            self.0
                .encode_descriptor(counter_base(name), help, None, MetricType::Counter)?;
        for (labels, v) in series {
            family
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
        }
        Ok(())
    }

    fn gauge(&mut self, name: &str, help: &str, v: impl EncodeGaugeValue) -> fmt::Result {
        self.0
            .encode_descriptor(name, help, None, MetricType::Gauge)?
            .encode_gauge(&v)
    }

    fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, V)>,
    ) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in series {
            family.encode_family(&labels)?.encode_gauge(&v)?;
        }
        Ok(())
    }

    fn histograms<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, HistogramSnapshot)>,
    ) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, h) in series {
            family
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &buckets(&h), None)?;
        }
        Ok(())
    }

    /// An info metric: `<name>_info{labels} 1`.
    fn info(&mut self, name: &str, help: &str, labels: &impl EncodeLabelSet) -> fmt::Result {
        let base = name.strip_suffix("_info").unwrap_or(name);
        self.0
            .encode_descriptor(base, help, None, MetricType::Info)?
            .encode_info(labels)
    }
}

/// `(upper bound, count in that bucket)` pairs, +Inf last, as the encoders
/// take them (they make the counts cumulative).
fn buckets(h: &HistogramSnapshot) -> Vec<(f64, u64)> {
    LATENCY_BUCKETS
        .iter()
        .copied()
        .chain(std::iter::once(f64::INFINITY))
        .zip(h.buckets)
        .collect()
}

/// A family's one series without labels.
const NO_LABELS: [(&str, &str); 0] = [];

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn render_gateway(t: &mut Out, gw: &Gateway) -> fmt::Result {
    let m = &gw.metrics;
    t.counters(
        "kvgate_requests_total",
        "Client requests by cache result (X-Cache).",
        CacheResult::ALL.map(|r| ([("cache", r.as_str())], m.requests_for(r))),
    )?;
    t.histograms(
        "kvgate_request_duration_seconds",
        "Client requests from the request head read to the response head written, by cache result.",
        CacheResult::ALL.map(|r| ([("cache", r.as_str())], m.latency_for(r))),
    )?;
    let classes = m.responses_by_class();
    t.counters(
        "kvgate_responses_total",
        "Responses by status class (\"other\" outside 100-599).",
        STATUS_CLASSES
            .iter()
            .zip(classes)
            // An origin's odd status is rare: "other" appears once seen.
            .filter(|(class, n)| **class != "other" || *n > 0)
            .map(|(class, n)| ([("class", *class)], n)),
    )?;
    t.counter(
        "kvgate_responses_5xx_total",
        "Responses with a 5xx status (kvgate_responses_total{class=\"5xx\"}, kept for existing dashboards).",
        m.responses_5xx(),
    )?;
    t.counter(
        "kvgate_fast_hits_total",
        "Hits answered by the HTTP/1.1 fast path (also in kvgate_requests_total).",
        m.fast_hits.sum(),
    )?;
    t.counter(
        "kvgate_origin_requests_total",
        "Requests sent to the origin.",
        load(&m.origin_requests),
    )?;
    t.counter(
        "kvgate_origin_errors_total",
        "Origin requests that failed (refused, reset, timed out).",
        load(&m.origin_errors),
    )?;
    t.histograms(
        "kvgate_origin_latency_seconds",
        "Time from sending a request to the origin to its response head.",
        [(NO_LABELS, m.origin_latency())],
    )?;

    let (bytes, entries) = gw.store.usage();
    t.gauge(
        "kvgate_cache_bytes",
        "Bytes charged by stored responses (bodies, headers, overhead).",
        bytes as u64,
    )?;
    t.gauge(
        "kvgate_cache_max_bytes",
        "The store's byte budget.",
        gw.config.cache.max_bytes as u64,
    )?;
    t.gauge(
        "kvgate_cache_entries",
        "Stored responses (each Vary variant counts).",
        entries as u64,
    )?;
    t.gauge(
        "kvgate_cache_tags",
        "Distinct tags in the tag index.",
        gw.store.tag_count() as u64,
    )?;
    t.gauge(
        "kvgate_cache_version",
        "The global cache namespace version.",
        gw.version(),
    )?;
    t.counter(
        "kvgate_cache_evictions_total",
        "Entries evicted to stay within the byte budget.",
        load(&gw.store.stats().evictions),
    )?;
    t.counter(
        "kvgate_cache_expired_total",
        "Expired entries swept because they could no longer be used.",
        load(&gw.store.stats().expired),
    )?;
    t.counter(
        "kvgate_purges_total",
        "Purge requests served by the admin API.",
        load(&m.purges),
    )?;
    t.counter(
        "kvgate_purged_entries_total",
        "Entries removed (or marked stale, for soft purges) by purges.",
        load(&m.purged_entries),
    )?;
    t.counter(
        "kvgate_background_refreshes_total",
        "Stale-while-revalidate refreshes started.",
        load(&m.background_refreshes),
    )?;
    t.counter(
        "kvgate_coalesced_waiters_total",
        "Requests that waited for another request's origin fetch instead of making their own.",
        load(&gw.flights.coalesced),
    )?;
    t.gauge(
        "kvgate_flights_in_progress",
        "Origin fetches being coalesced right now.",
        gw.flights.in_flight() as u64,
    )?;
    if let Some(cluster) = &gw.cluster {
        t.gauge(
            "kvgate_cluster_following",
            "1 while this instance reads the purge broadcast (purges made elsewhere reach it).",
            u64::from(cluster.following()),
        )?;
        t.counter(
            "kvgate_cluster_cache_drops_total",
            "Times the memory cache was dropped because broadcast events were lost.",
            cluster.cache_drops(),
        )?;
        let regions = cluster.regions();
        t.gauges(
            "kvgate_cluster_region_following",
            "1 while this instance reads the region's broadcast streams.",
            regions
                .iter()
                .map(|r| ([("region", r.name.as_str())], u64::from(r.following))),
        )?;
        t.gauges(
            "kvgate_cluster_retry_queued",
            "Broadcast messages waiting to be resent to a region that failed them.",
            regions
                .iter()
                .map(|r| ([("region", r.name.as_str())], r.retry_queued as u64)),
        )?;
        t.counter(
            "kvgate_cluster_state_broadcast_dropped_total",
            "Edge state writes not broadcast (queue full): other instances see them after their local copy's TTL.",
            cluster.state_dropped(),
        )?;
        t.counter(
            "kvgate_cluster_hits_total",
            "Misses answered with a response another instance fetched (lease handoff or L2).",
            load(&m.cluster_hits),
        )?;
    }
    Ok(())
}

fn render_ops(t: &mut Out, ops: &Ops, edge: Option<&CountersSnapshot>) -> fmt::Result {
    t.counters(
        "kvgate_reloads_total",
        "Config reloads (SIGHUP, POST /reload) by result.",
        [
            ([("result", "ok")], Ops::get(&ops.reloads_ok)),
            ([("result", "refused")], Ops::get(&ops.reloads_failed)),
        ],
    )?;
    t.counter(
        "kvgate_connections_accepted_total",
        "Connections accepted on the main listener.",
        Ops::get(&ops.connections_accepted),
    )?;
    t.counter(
        "kvgate_connections_rejected_total",
        "Connections closed at once because server.max_connections were open.",
        Ops::get(&ops.connections_rejected),
    )?;
    t.gauge(
        "kvgate_connections_open",
        "Connections open on the main listener.",
        Ops::get(&ops.connections_open),
    )?;
    let (reads, writes) = edge.map_or((0, 0), |c| (c.state_read_errors, c.state_write_errors));
    t.counters(
        "kvgate_state_store_errors_total",
        "State-store operations that failed: probe (/readyz, failed or timed out), read (for a request, which used its fallback), write (queued edge writes whose commit failed).",
        [
            ([("op", "probe")], Ops::get(&ops.state_errors)),
            ([("op", "read")], reads),
            ([("op", "write")], writes),
        ],
    )?;
    if let Some(us) = ops.state_probe_micros() {
        t.gauge(
            "kvgate_state_store_probe_seconds",
            "Round trip of the last state-store probe (/readyz) that answered.",
            us as f64 / 1e6,
        )?;
    }
    t.counters(
        "kvgate_trace_spans_total",
        "Request spans ([tracing]) by fate: exported to the collector, failed (refused, unreachable), dropped (export queue full).",
        [
            ([("result", "exported")], Ops::get(&ops.spans_exported)),
            ([("result", "failed")], Ops::get(&ops.spans_failed)),
            ([("result", "dropped")], Ops::get(&ops.spans_dropped)),
        ],
    )?;
    t.info(
        "kvgate_build_info",
        "The running build (value 1).",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("rustc", env!("KVGATE_RUSTC_VERSION")),
        ],
    )
}

/// Process metrics from /proc, read at scrape time (Linux; absent
/// elsewhere). Names and meanings as in the Prometheus client libraries.
fn render_process(t: &mut Out) -> fmt::Result {
    let p = crate::metrics::process::read();
    if let Some(v) = p.resident_bytes {
        t.gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            v,
        )?;
    }
    if let Some(v) = p.virtual_bytes {
        t.gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            v,
        )?;
    }
    if let Some(v) = p.cpu_seconds {
        t.counter_f64(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            v,
        )?;
    }
    if let Some(v) = p.open_fds {
        t.gauge("process_open_fds", "Number of open file descriptors.", v)?;
    }
    if let Some(v) = p.max_fds {
        t.gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            v,
        )?;
    }
    if let Some(v) = p.start_time_seconds {
        t.gauge(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds.",
            v,
        )?;
    }
    Ok(())
}

fn render_redis(t: &mut Out, regions: &[crate::redis::RegionHealth]) -> fmt::Result {
    use crate::redis::Health;
    t.gauges(
        "kvgate_redis_region_state",
        "1 for each Redis region's current state (up, degraded, down), 0 for the others.",
        regions.iter().flat_map(|r| {
            [
                (Health::Up, "up"),
                (Health::Degraded, "degraded"),
                (Health::Down, "down"),
            ]
            .map(|(state, name)| {
                (
                    [("region", r.name.as_str()), ("state", name)],
                    u64::from(r.health == state),
                )
            })
        }),
    )?;
    t.gauges(
        "kvgate_redis_latency_seconds",
        "Round trip of the last successful call to each Redis region.",
        regions.iter().filter_map(|r| {
            let us = r.last_latency_us?;
            Some(([("region", r.name.as_str())], us as f64 / 1e6))
        }),
    )?;
    t.counters(
        "kvgate_redis_failures_total",
        "Calls to each Redis region that failed or timed out.",
        regions
            .iter()
            .map(|r| ([("region", r.name.as_str())], r.failures)),
    )?;
    t.gauges(
        "kvgate_redis_write_retries",
        "State writes each region missed (failed, dropped from the full retry queue) and still queued.",
        regions.iter().flat_map(|r| {
            [
                ("failed", r.failed_writes),
                ("dropped", r.dropped_writes),
                ("queued", r.queued_writes),
            ]
            .map(|(kind, n)| ([("region", r.name.as_str()), ("kind", kind)], n))
        }),
    )
}

fn render_edge(t: &mut Out, c: &CountersSnapshot) -> fmt::Result {
    t.counters(
        "kvgate_edge_route_requests_total",
        "Requests per configured route (\"default\" for none).",
        c.requests
            .iter()
            .map(|(route, n)| ([("route", route.as_str())], *n)),
    )?;
    t.counters(
        "kvgate_edge_flag_evaluations_total",
        "Feature flag evaluations per flag.",
        c.flag_evaluations
            .iter()
            .map(|(flag, n)| ([("flag", flag.as_str())], *n)),
    )?;
    t.counter(
        "kvgate_edge_state_writes_dropped_total",
        "Edge state writes (sticky assignments, preference renewals) dropped because the write queue was full; each is redone by the user's next request.",
        c.dropped_writes,
    )?;
    t.counters(
        "kvgate_edge_exposures_total",
        "Experiment exposures per experiment and variant.",
        c.exposures.iter().flat_map(|(exp, variants)| {
            variants.iter().map(move |(variant, n)| {
                (
                    [("experiment", exp.as_str()), ("variant", variant.as_str())],
                    *n,
                )
            })
        }),
    )
}

/// Unique exposures and conversions (2xx, once per user and day).
fn render_outcomes(
    t: &mut Out,
    (counts, dropped): (Vec<(&str, String, String, u64)>, u64),
) -> fmt::Result {
    for (kind, name, help) in [
        ("exposure", "kvgate_edge_exposed_users_total", "Users exposed to a variant on a 2xx response, once per user, experiment and day (a new anonymous visitor counts when it returns with its cookie)."),
        ("conversion", "kvgate_edge_conversions_total", "Users reaching an experiment goal (2xx), once per user, experiment and day, by the variant injected on that request."),
    ] {
        t.counters(
            name,
            help,
            counts
                .iter()
                .filter(|(k, ..)| *k == kind)
                .map(|(_, exp, variant, n)| {
                    ([("experiment", exp.as_str()), ("variant", variant.as_str())], *n)
                }),
        )?;
    }
    t.counter(
        "kvgate_edge_exposure_events_dropped_total",
        "Exposure events dropped because the file writer's queue was full.",
        dropped,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn accept(v: &'static str) -> Format {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static(v));
        Format::negotiate(&h)
    }

    #[test]
    fn openmetrics_only_when_asked() {
        assert_eq!(Format::negotiate(&HeaderMap::new()), Format::Prometheus);
        assert_eq!(accept("*/*"), Format::Prometheus);
        assert_eq!(accept("text/plain;version=0.0.4"), Format::Prometheus);
        // What Prometheus sends by default.
        assert_eq!(
            accept("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"),
            Format::OpenMetrics
        );
        assert_eq!(
            accept("application/openmetrics-text; q=0"),
            Format::Prometheus
        );
    }

    /// A collector over hand-made values, to see the encoders' output.
    #[derive(Debug)]
    struct Sample;

    impl Collector for Sample {
        fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
            let mut t = Out(encoder);
            t.counters("m_total", "Help.", [([("a", "x\"y\\z\nw")], 3u64)])?;
            let mut h = HistogramSnapshot {
                buckets: [0; LATENCY_BUCKETS.len() + 1],
                count: 3,
                sum_seconds: 61.5,
            };
            h.buckets[0] = 1;
            h.buckets[LATENCY_BUCKETS.len() - 1] = 1;
            h.buckets[LATENCY_BUCKETS.len()] = 1;
            t.histograms("h_seconds", "Latency.", [([("cache", "HIT")], h)])?;
            t.info("b_info", "Build.", &[("version", "1")])
        }
    }

    fn encoded(format: Format) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Sample));
        let mut out = String::new();
        match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            }
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        }
        .unwrap();
        out
    }

    #[test]
    fn prometheus_text_keeps_series_names_and_escapes_labels() {
        let t = encoded(Format::Prometheus);
        assert!(t.contains("# TYPE m_total counter\n"), "{t}");
        assert!(t.contains("m_total{a=\"x\\\"y\\\\z\\nw\"} 3\n"), "{t}");
        assert!(t.contains("# TYPE h_seconds histogram\n"), "{t}");
        assert!(
            t.contains("h_seconds_bucket{cache=\"HIT\",le=\"0.0001\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("h_seconds_bucket{cache=\"HIT\",le=\"30\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("h_seconds_bucket{cache=\"HIT\",le=\"60\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("h_seconds_bucket{cache=\"HIT\",le=\"+Inf\"} 3\n"),
            "{t}"
        );
        assert!(t.contains("h_seconds_count{cache=\"HIT\"} 3\n"), "{t}");
        assert!(t.contains("h_seconds_sum{cache=\"HIT\"} 61.5\n"), "{t}");
        assert!(t.contains("b_info{version=\"1\"} 1\n"), "{t}");
        assert!(!t.contains("# EOF"), "{t}");
    }

    #[test]
    fn openmetrics_types_counters_by_family_and_ends_with_eof() {
        let t = encoded(Format::OpenMetrics);
        assert!(t.contains("# TYPE m counter\n"), "{t}");
        assert!(t.contains("m_total{a=\"x\\\"y\\\\z\\nw\"} 3\n"), "{t}");
        assert!(t.contains("# TYPE b info\n"), "{t}");
        assert!(t.contains("b_info{version=\"1\"} 1\n"), "{t}");
        assert!(
            t.contains("h_seconds_bucket{le=\"+Inf\",cache=\"HIT\"} 3\n"),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"), "{t}");
    }
}
