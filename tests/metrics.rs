//! `/metrics` over real sockets: the client-facing latency histogram by
//! cache result, responses by status class, build and process metrics, in
//! both exposition formats; and the W3C trace context passed to a real
//! origin only when valid.

mod common;
use common::*;
use http::Method;
use std::collections::HashMap;

const TOKEN: &str = "metrics-test-token-0123456789";

async fn gateway(origin: &Origin) -> Gateway {
    Gateway::start(&origin.url(), |c| {
        c.admin = Some(kvgate::config::AdminConfig {
            listen: toml::Spanned::new(0..0, "127.0.0.1:0".into()),
            token: Some(TOKEN.into()),
            max_body_bytes: 4096,
        });
    })
    .await
}

async fn scrape(gw: &Gateway, accept: Option<&str>) -> Got {
    let url = format!(
        "http://{}/metrics",
        gw.running.admin_addr.expect("admin runs")
    );
    let auth = format!("Bearer {TOKEN}");
    let mut headers = vec![("authorization", auth.as_str())];
    if let Some(a) = accept {
        headers.push(("accept", a));
    }
    send(Method::GET, &url, &headers, "").await
}

/// The value of one series (name and labels exactly as rendered).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse()
        .unwrap_or_else(|e| panic!("{series}: {e}"))
}

/// Every sample belongs to exactly one declared family of the right type,
/// histogram buckets are cumulative and end in +Inf = count.
fn check_well_formed(text: &str, openmetrics: bool) {
    let mut types: HashMap<String, String> = HashMap::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            let before = types.insert(name.to_string(), kind.to_string());
            assert!(before.is_none(), "family {name} declared twice");
        }
    }
    let mut last_bucket: HashMap<String, f64> = HashMap::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = l.find(['{', ' ']).expect("a sample has a value");
        let name = &l[..name_end];
        let family = types
            .iter()
            .find(|(family, kind)| {
                let suffixes: &[&str] = match (kind.as_str(), openmetrics) {
                    ("histogram", _) => &["_bucket", "_sum", "_count"],
                    ("counter", true) => &["_total"],
                    ("info", true) => &["_info"],
                    _ => &[""],
                };
                suffixes
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(family.as_str()))
            })
            .unwrap_or_else(|| panic!("sample {l:?} has no family of its type"));
        let v: f64 = l
            .rsplit_once(' ')
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no value in {l:?}"));
        if family.1 == "counter" {
            assert!(v >= 0.0, "{l}");
        }
        if name.ends_with("_bucket") {
            // Labels without le: one histogram series.
            let labels = &l[name_end..l.rfind(' ').unwrap_or(l.len())];
            let series: String = labels
                .split(['{', '}', ','])
                .filter(|p| !p.starts_with("le=") && !p.is_empty())
                .collect::<Vec<_>>()
                .join(",");
            let key = format!("{name}{{{series}}}");
            let prev = last_bucket.insert(key.clone(), v).unwrap_or(0.0);
            assert!(v >= prev, "buckets of {key} not cumulative at {l}");
            if l.contains("le=\"+Inf\"") {
                let count_line = format!("{}_count", name.trim_end_matches("_bucket"));
                let count = text
                    .lines()
                    .filter(|c| c.starts_with(&count_line))
                    .find(|c| series.split(',').all(|p| c.contains(p)))
                    .and_then(|c| c.rsplit_once(' ')?.1.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("no {count_line} for {key}"));
                assert_eq!(v, count, "+Inf bucket of {key} is its count");
            }
        }
    }
}

#[tokio::test]
async fn latency_by_result_status_classes_build_and_process_metrics() {
    let origin = Origin::start(|s, _| match s.path.as_str() {
        "/cached" => Reply::ok("c").header("cache-control", "max-age=60"),
        "/broken" => Reply::ok("b").status(500),
        _ => Reply::ok("n").status(404),
    })
    .await;
    let gw = gateway(&origin).await;
    assert_eq!(get(&gw.url("/cached")).await.x_cache(), "MISS");
    assert_eq!(get(&gw.url("/cached")).await.x_cache(), "HIT");
    let broken = get(&gw.url("/broken")).await;
    assert_eq!((broken.status.as_u16(), broken.x_cache()), (500, "MISS"));
    assert_eq!(get(&gw.url("/nope")).await.status, 404);

    let got = scrape(&gw, None).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.header("content-type"),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let t = got.text();
    check_well_formed(&t, false);

    // One latency histogram per cache result; its count is the requests.
    assert!(
        t.contains("# TYPE kvgate_request_duration_seconds histogram\n"),
        "{t}"
    );
    let duration = "kvgate_request_duration_seconds";
    assert_eq!(
        value(&t, &format!("{duration}_count{{cache=\"HIT\"}}")),
        1.0
    );
    assert_eq!(
        value(&t, &format!("{duration}_count{{cache=\"MISS\"}}")),
        3.0
    );
    assert_eq!(
        value(&t, &format!("{duration}_count{{cache=\"STALE\"}}")),
        0.0
    );
    assert_eq!(value(&t, "kvgate_requests_total{cache=\"HIT\"}"), 1.0);
    assert_eq!(value(&t, "kvgate_requests_total{cache=\"MISS\"}"), 3.0);
    // A loopback hit takes well under a second; buckets reach 60 s (past
    // the 30 s first-byte timeout).
    assert_eq!(
        value(&t, &format!("{duration}_bucket{{cache=\"HIT\",le=\"1\"}}")),
        1.0
    );
    assert_eq!(
        value(
            &t,
            &format!("{duration}_bucket{{cache=\"MISS\",le=\"60\"}}")
        ),
        3.0
    );
    assert_eq!(
        value(
            &t,
            &format!("{duration}_bucket{{cache=\"MISS\",le=\"+Inf\"}}")
        ),
        3.0
    );
    assert!(value(&t, &format!("{duration}_sum{{cache=\"HIT\"}}")) > 0.0);
    assert_eq!(
        value(&t, "kvgate_origin_latency_seconds_bucket{le=\"60\"}"),
        3.0
    );
    assert_eq!(value(&t, "kvgate_origin_latency_seconds_count"), 3.0);

    // Responses by status class, and the old 5xx counter beside them.
    assert_eq!(value(&t, "kvgate_responses_total{class=\"2xx\"}"), 2.0);
    assert_eq!(value(&t, "kvgate_responses_total{class=\"4xx\"}"), 1.0);
    assert_eq!(value(&t, "kvgate_responses_total{class=\"5xx\"}"), 1.0);
    assert_eq!(value(&t, "kvgate_responses_total{class=\"3xx\"}"), 0.0);
    assert_eq!(value(&t, "kvgate_responses_5xx_total"), 1.0);
    assert!(!t.contains("class=\"other\""), "no odd status seen");

    // Build and process.
    let build = t
        .lines()
        .find(|l| l.starts_with("kvgate_build_info{"))
        .unwrap_or_else(|| panic!("no build info in\n{t}"));
    assert!(
        build.starts_with(&format!(
            "kvgate_build_info{{version=\"{}\",rustc=\"rustc ",
            env!("CARGO_PKG_VERSION")
        )) && build.ends_with("} 1"),
        "{build}"
    );
    assert!(value(&t, "process_resident_memory_bytes") > 1e6);
    assert!(value(&t, "process_virtual_memory_bytes") > 1e6);
    assert!(value(&t, "process_cpu_seconds_total") >= 0.0);
    assert!(value(&t, "process_open_fds") >= 3.0);
    assert!(value(&t, "process_max_fds") >= value(&t, "process_open_fds"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    let start = value(&t, "process_start_time_seconds");
    assert!(
        start <= now + 1.0 && start > now - 86_400.0,
        "{start} vs {now}"
    );
    // Connections: the five client requests above each opened one.
    assert!(value(&t, "kvgate_connections_accepted_total") >= 4.0);
    assert_eq!(value(&t, "kvgate_connections_rejected_total"), 0.0);
    assert!(t.contains("\nkvgate_connections_open "), "{t}");
    assert_eq!(value(&t, "kvgate_reloads_total{result=\"ok\"}"), 0.0);

    // The same numbers in OpenMetrics, for a scraper that asks for it.
    let om = scrape(
        &gw,
        Some("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3"),
    )
    .await;
    assert_eq!(
        om.header("content-type"),
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let o = om.text();
    check_well_formed(&o, true);
    assert!(o.ends_with("# EOF\n"), "{o}");
    assert!(o.contains("# TYPE kvgate_requests counter\n"), "{o}");
    assert!(o.contains("# TYPE kvgate_build info\n"), "{o}");
    assert_eq!(value(&o, "kvgate_requests_total{cache=\"HIT\"}"), 1.0);
    assert_eq!(value(&o, "kvgate_responses_total{class=\"5xx\"}"), 1.0);
    assert_eq!(
        value(
            &o,
            &format!("{duration}_bucket{{le=\"+Inf\",cache=\"MISS\"}}")
        ),
        3.0
    );
}

#[tokio::test]
async fn only_a_valid_traceparent_reaches_the_origin() {
    let origin = Origin::start(|_, _| Reply::ok("t")).await;
    let gw = gateway(&origin).await;
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let sent = |path: &str| {
        let seen = origin.requests(path);
        assert_eq!(seen.len(), 1, "{path} reached the origin once");
        let h = &seen[0].headers;
        (
            h.get("traceparent")
                .map(|v| v.to_str().unwrap_or("?").to_string()),
            h.get("tracestate")
                .map(|v| v.to_str().unwrap_or("?").to_string()),
        )
    };

    // Valid: passed on unchanged, with its tracestate (a miss and a pass).
    let state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    get_with(
        &gw.url("/valid"),
        &[("traceparent", valid), ("tracestate", state)],
    )
    .await;
    assert_eq!(sent("/valid"), (Some(valid.into()), Some(state.into())));
    let post = send(
        Method::POST,
        &gw.url("/posted"),
        &[("traceparent", valid)],
        "body",
    )
    .await;
    assert_eq!(post.x_cache(), "BYPASS");
    assert_eq!(sent("/posted").0.as_deref(), Some(valid));

    // Invalid (or repeated): dropped with its tracestate, never forwarded.
    for (i, bad) in [
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        "garbage",
    ]
    .iter()
    .enumerate()
    {
        let path = format!("/invalid-{i}");
        get_with(
            &gw.url(&path),
            &[("traceparent", bad), ("tracestate", state)],
        )
        .await;
        assert_eq!(sent(&path), (None, None), "{bad}");
    }
    get_with(
        &gw.url("/twice"),
        &[("traceparent", valid), ("traceparent", valid)],
    )
    .await;
    assert_eq!(sent("/twice"), (None, None));

    // None sent: none invented.
    get(&gw.url("/none")).await;
    assert_eq!(sent("/none"), (None, None));
}

#[tokio::test]
async fn readiness_probes_time_the_state_store() {
    let origin = Origin::start(|_, _| Reply::ok("x")).await;
    let parsed = kvgate::config::Config::parse(
        "[state]\nbackend = \"memory\"\n\n[edge]\n[edge.flags.newUI]\ndefault = false\n",
        "t.toml",
    )
    .expect("edge config");
    let gw = Gateway::start(&origin.url(), |c| {
        c.edge = parsed.edge;
        c.state = parsed.state;
        c.admin = Some(kvgate::config::AdminConfig {
            listen: toml::Spanned::new(0..0, "127.0.0.1:0".into()),
            token: Some(TOKEN.into()),
            max_body_bytes: 4096,
        });
    })
    .await;
    let before = scrape(&gw, None).await.text();
    assert!(
        !before.contains("kvgate_state_store_probe_seconds"),
        "no probe yet: {before}"
    );
    let ready = get(&format!(
        "http://{}/readyz",
        gw.running.admin_addr.expect("admin runs")
    ))
    .await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let t = scrape(&gw, None).await.text();
    check_well_formed(&t, false);
    let took = value(&t, "kvgate_state_store_probe_seconds");
    assert!(took > 0.0 && took < 2.0, "{took}");
    assert_eq!(
        value(&t, "kvgate_state_store_errors_total{op=\"probe\"}"),
        0.0
    );
    assert!(t.contains("kvgate_edge_flag_evaluations_total"), "{t}");
    assert_eq!(value(&t, "kvgate_edge_state_writes_dropped_total"), 0.0);
}

#[tokio::test]
async fn connections_open_accepted_and_rejected_are_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start(|_, _| Reply::ok("ok")).await;
    let gw = Gateway::start(&origin.url(), |c| {
        c.server.max_connections = 1;
        c.admin = Some(kvgate::config::AdminConfig {
            listen: toml::Spanned::new(0..0, "127.0.0.1:0".into()),
            token: Some(TOKEN.into()),
            max_body_bytes: 4096,
        });
    })
    .await;
    // One keep-alive connection holds the only slot...
    let mut first = tokio::net::TcpStream::connect(gw.running.addr)
        .await
        .expect("connect");
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 256];
    let n = first.read(&mut buf).await.expect("first answered");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // ...so the next one is closed at once.
    let mut second = tokio::net::TcpStream::connect(gw.running.addr)
        .await
        .expect("connect");
    let _ = second.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let read = tokio::time::timeout(std::time::Duration::from_secs(3), second.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    let t = scrape(&gw, None).await.text();
    assert_eq!(value(&t, "kvgate_connections_open"), 1.0);
    assert_eq!(value(&t, "kvgate_connections_accepted_total"), 1.0);
    assert_eq!(value(&t, "kvgate_connections_rejected_total"), 1.0);
    // Closed: no longer open.
    drop(first);
    let mut open = 1.0;
    for _ in 0..50 {
        open = value(&scrape(&gw, None).await.text(), "kvgate_connections_open");
        if open == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(open, 0.0);
}
