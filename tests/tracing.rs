//! `[tracing]` over real sockets: one OTLP/HTTP span per request, with its
//! cache result, posted to a real (test) collector; the origin sees
//! kvgate's span as its parent in `traceparent`; the client's sampling
//! decision is honoured.

mod common;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A collector that keeps every span posted to `/v1/traces`.
struct Collector {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<Value>>>,
    posts: Arc<Mutex<Vec<(String, String)>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("collector addr");
        let spans: Arc<Mutex<Vec<Value>>> = Arc::default();
        let posts: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let (spans2, posts2) = (spans.clone(), posts.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (spans, posts) = (spans2.clone(), posts2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<Incoming>| {
                        let (spans, posts) = (spans.clone(), posts.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let content_type = req
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            posts.lock().expect("lock").push((path, content_type));
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let doc: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let mut got = spans.lock().expect("lock");
                            for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
                                let service =
                                    rs["resource"]["attributes"][0]["value"]["stringValue"].clone();
                                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                                    for s in ss["spans"].as_array().into_iter().flatten() {
                                        let mut s = s.clone();
                                        s["service"] = service.clone();
                                        got.push(s);
                                    }
                                }
                            }
                            Ok::<_, Infallible>(http::Response::new(Full::new(
                                bytes::Bytes::from_static(b"{}"),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector { addr, spans, posts }
    }

    /// The span of the request whose `kvgate.request_id` is `id`, waiting
    /// for the exporter's next flush.
    async fn span_of(&self, id: &str) -> Value {
        for _ in 0..100 {
            let found = self
                .spans
                .lock()
                .expect("lock")
                .iter()
                .find(|s| attr(s, "kvgate.request_id") == id)
                .cloned();
            if let Some(s) = found {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no span for request {id} within 10 s");
    }
}

fn attr(span: &Value, key: &str) -> String {
    span["attributes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["key"] == key)
        .map(|a| {
            let v = &a["value"];
            v["stringValue"]
                .as_str()
                .or(v["intValue"].as_str())
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}

const TOKEN: &str = "tracing-test-token-0123456789";

/// A gateway exporting spans to `endpoint`, with the admin API on.
async fn traced_gateway(origin: &Origin, endpoint: String) -> Gateway {
    Gateway::start(&origin.url(), |c| {
        c.tracing.otlp_endpoint = Some(toml::Spanned::new(0..0, endpoint));
        c.tracing.service_name = "edge-eu".into();
        c.admin = Some(kvgate::config::AdminConfig {
            listen: toml::Spanned::new(0..0, "127.0.0.1:0".into()),
            token: Some(TOKEN.into()),
            max_body_bytes: 4096,
        });
    })
    .await
}

/// `kvgate_trace_spans_total{result=...}`, waiting up to 10 s for it to
/// reach at least `min`.
async fn spans_counted(gw: &Gateway, result: &str, min: u64) -> u64 {
    let url = format!(
        "http://{}/metrics",
        gw.running.admin_addr.expect("admin runs")
    );
    let auth = format!("Bearer {TOKEN}");
    let series = format!("kvgate_trace_spans_total{{result=\"{result}\"}} ");
    let mut n = 0;
    for _ in 0..100 {
        let text = get_with(&url, &[("authorization", &auth)]).await.text();
        n = text
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"));
        if n >= min {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    n
}

/// `(trace id, parent id, flags)` of the `traceparent` the origin saw.
fn origin_saw(origin: &Origin, path: &str) -> (String, String, String) {
    let seen = origin.requests(path);
    assert_eq!(seen.len(), 1, "{path} reached the origin once");
    let tp = seen[0]
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("{path}: no traceparent at the origin"))
        .to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!((parts.len(), parts[0]), (4, "00"), "{tp}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test]
async fn one_span_per_request_with_its_cache_result() {
    let collector = Collector::start().await;
    let origin = Origin::start(|s, _| match s.path.as_str() {
        "/cached" => Reply::ok("c").header("cache-control", "max-age=60"),
        _ => Reply::ok("x").status(503),
    })
    .await;
    let gw = traced_gateway(&origin, format!("http://{}", collector.addr)).await;

    // A client in a trace: kvgate's span is its child, the origin's parent.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_parent = "00f067aa0ba902b7";
    let incoming = format!("00-{trace}-{client_parent}-01");
    let miss = get_with(
        &gw.url("/cached"),
        &[
            ("traceparent", &incoming),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
    )
    .await;
    assert_eq!(miss.x_cache(), "MISS");
    let (origin_trace, origin_parent, flags) = origin_saw(&origin, "/cached");
    assert_eq!((origin_trace.as_str(), flags.as_str()), (trace, "01"));
    assert_ne!(
        origin_parent, client_parent,
        "kvgate's own span is the parent"
    );
    let tracestate = origin.requests("/cached")[0]
        .headers
        .get("tracestate")
        .cloned();
    assert_eq!(
        tracestate.as_ref().map(|v| v.as_bytes()),
        Some(&b"congo=t61rcWkgMzE"[..])
    );

    let span = collector.span_of(miss.header("x-request-id")).await;
    assert_eq!(span["traceId"], trace);
    assert_eq!(span["parentSpanId"], client_parent);
    assert_eq!(span["spanId"], origin_parent.as_str());
    assert_eq!(span["kind"], 2);
    assert_eq!(span["service"], "edge-eu");
    assert_eq!(attr(&span, "kvgate.cache"), "MISS");
    assert_eq!(attr(&span, "http.request.method"), "GET");
    assert_eq!(attr(&span, "url.path"), "/cached");
    assert_eq!(attr(&span, "http.response.status_code"), "200");
    let nanos = |k: &str| {
        span[k]
            .as_str()
            .and_then(|v| v.parse::<u128>().ok())
            .unwrap_or(0)
    };
    assert!(nanos("endTimeUnixNano") >= nanos("startTimeUnixNano"));
    assert!(nanos("startTimeUnixNano") > 1_700_000_000 * 1_000_000_000);

    // A hit, with no trace of its own: a new root span, HIT.
    let hit = get(&gw.url("/cached")).await;
    assert_eq!(hit.x_cache(), "HIT");
    let span = collector.span_of(hit.header("x-request-id")).await;
    assert_eq!(attr(&span, "kvgate.cache"), "HIT");
    assert!(span.get("parentSpanId").is_none(), "{span}");
    assert_ne!(span["traceId"], trace);
    assert_eq!(span["traceId"].as_str().map(str::len), Some(32));

    // An invalid traceparent starts a new trace; its tracestate is dropped.
    let bad = get_with(
        &gw.url("/bad"),
        &[("traceparent", "00-xyz"), ("tracestate", "a=b")],
    )
    .await;
    assert_eq!(bad.status, 503);
    let (bad_trace, bad_parent, _) = origin_saw(&origin, "/bad");
    assert!(origin.requests("/bad")[0]
        .headers
        .get("tracestate")
        .is_none());
    let span = collector.span_of(bad.header("x-request-id")).await;
    assert_eq!(
        (span["traceId"].as_str(), span["spanId"].as_str()),
        (Some(bad_trace.as_str()), Some(bad_parent.as_str()))
    );
    assert_eq!(span["status"]["code"], 2, "5xx is an error span");

    // A client that does not sample: the origin is told so, nothing exported.
    let unsampled_trace = "0af7651916cd43dd8448eb211c80319c";
    let quiet = get_with(
        &gw.url("/quiet"),
        &[(
            "traceparent",
            &format!("00-{unsampled_trace}-b7ad6b7169203331-00"),
        )],
    )
    .await;
    let (t, _, flags) = origin_saw(&origin, "/quiet");
    assert_eq!((t.as_str(), flags.as_str()), (unsampled_trace, "00"));
    // Spans are exported in order: once a later one is in, the quiet one
    // would have been too.
    let later = get(&gw.url("/later")).await;
    collector.span_of(later.header("x-request-id")).await;
    let quiet_id = quiet.header("x-request-id").to_string();
    assert!(
        !collector
            .spans
            .lock()
            .expect("lock")
            .iter()
            .any(|s| attr(s, "kvgate.request_id") == quiet_id || s["traceId"] == unsampled_trace),
        "an unsampled request exported a span"
    );

    let posts = collector.posts.lock().expect("lock").clone();
    assert!(!posts.is_empty());
    for (path, content_type) in posts {
        assert_eq!(
            (path.as_str(), content_type.as_str()),
            ("/v1/traces", "application/json")
        );
    }

    // Four sampled requests, four spans exported; none failed or dropped.
    assert_eq!(spans_counted(&gw, "exported", 4).await, 4);
    assert_eq!(spans_counted(&gw, "failed", 0).await, 0);
    assert_eq!(spans_counted(&gw, "dropped", 0).await, 0);
}

#[tokio::test]
async fn an_unreachable_collector_fails_spans_not_requests() {
    let origin = Origin::start(|_, _| Reply::ok("x")).await;
    let gw = traced_gateway(&origin, refused_url().await).await;
    for i in 0..20 {
        let got = get(&gw.url(&format!("/r{i}"))).await;
        assert_eq!(got.status, 200);
    }
    assert_eq!(origin.total(), 20);
    // The spans are counted as failed, not retried forever or queued.
    assert_eq!(spans_counted(&gw, "failed", 20).await, 20);
    assert_eq!(spans_counted(&gw, "exported", 0).await, 0);
}
