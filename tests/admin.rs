//! The admin API over real HTTP: authentication and refusals, purges (URL,
//! prefix, tag, soft), versions, listing, metrics, health, the edge routes,
//! and the tag index staying bounded as entries come and go.

mod common;
use common::*;
use http::Method;
use kvgate::cache::Storage;
use kvgate::config::{AdminConfig, Config, TagRuleConfig};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime};

const TOKEN: &str = "test-admin-token-0123456789";

fn admin_config(token: Option<&str>) -> AdminConfig {
    AdminConfig {
        listen: toml::Spanned::new(0..0, "127.0.0.1:0".into()),
        token: token.map(str::to_string),
        max_body_bytes: 4096,
    }
}

/// A gateway with the admin listener on an ephemeral port and [`TOKEN`].
async fn gateway(origin: &Origin, tweak: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start(&origin.url(), |c| {
        c.admin = Some(admin_config(Some(TOKEN)));
        tweak(c);
    })
    .await
}

fn admin_url(gw: &Gateway, path: &str) -> String {
    let addr = gw.running.admin_addr.expect("admin listener runs");
    format!("http://{addr}{path}")
}

/// An authenticated admin request.
async fn admin(gw: &Gateway, method: Method, path: &str, body: &str) -> Got {
    let auth = format!("Bearer {TOKEN}");
    send(
        method,
        &admin_url(gw, path),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await
}

fn json_of(g: &Got) -> Value {
    serde_json::from_slice(&g.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", g.text()))
}

async fn purge(gw: &Gateway, body: Value) -> u64 {
    let r = admin(gw, Method::POST, "/purge", &body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    json_of(&r)["purged"].as_u64().expect("purged is a number")
}

fn cached(body: &str) -> Reply {
    Reply::ok(body).header("cache-control", "max-age=60")
}

#[tokio::test]
async fn healthz_needs_no_token_everything_else_does() {
    let origin = Origin::start(|_, n| cached(&format!("v{n}"))).await;
    let gw = gateway(&origin, |_| {}).await;
    let h = get(&admin_url(&gw, "/healthz")).await;
    assert_eq!(
        (h.status.as_u16(), json_of(&h)),
        (200, json!({"status": "ok"}))
    );

    get(&gw.url("/a")).await;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic dGVzdA=="),
        Some(TOKEN),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        for (method, path, body) in [
            (Method::POST, "/purge", r#"{"urls":["/a"]}"#),
            (Method::POST, "/version", ""),
            (Method::GET, "/metrics", ""),
            (Method::GET, "/no-such-route", ""),
        ] {
            let r = send(method, &admin_url(&gw, path), &headers, body).await;
            assert_eq!(r.status, 401, "{path} with {auth:?}");
            assert!(json_of(&r)["error"].is_string());
            assert!(r.header("www-authenticate").starts_with("Bearer"));
        }
    }
    // nothing happened: still cached, same version
    assert_eq!(get(&gw.url("/a")).await.x_cache(), "HIT");
    assert_eq!(gw.running.gateway.version(), 1);
    assert_eq!(origin.count("/a"), 1);
}

#[tokio::test]
async fn malformed_requests_are_refused_with_json_errors() {
    let origin = Origin::start(|_, _| cached("x")).await;
    let gw = gateway(&origin, |_| {}).await;
    let cases: Vec<(Method, &str, String, u16)> = vec![
        (Method::POST, "/purge", "{not json".into(), 400),
        (Method::POST, "/purge", "".into(), 400),
        (Method::POST, "/purge", r#"{"urls": "/a"}"#.into(), 400),
        (Method::POST, "/purge", r#"{"url": ["/a"]}"#.into(), 400),
        (Method::POST, "/purge", "{}".into(), 400),
        (
            Method::POST,
            "/purge",
            r#"{"urls": ["http://h/a"]}"#.into(),
            400,
        ),
        (Method::POST, "/purge", r#"{"prefixes": [""]}"#.into(), 400),
        (
            Method::POST,
            "/purge",
            format!(r#"{{"tags": ["{}"]}}"#, "x".repeat(5000)),
            413,
        ),
        (Method::POST, "/version", "[1]".into(), 400),
        (Method::POST, "/version", r#"{"route": "nope"}"#.into(), 404),
        (Method::GET, "/purge", "".into(), 405),
        (Method::DELETE, "/entries", "".into(), 405),
        (Method::GET, "/nope", "".into(), 404),
        (Method::GET, "/users/%zz", "".into(), 400),
        (Method::GET, "/entries?cursor=xyz", "".into(), 400),
        (Method::GET, "/entries?limit=0", "".into(), 400),
        (Method::GET, "/entries?colour=red", "".into(), 400),
        (Method::GET, "/users/alice", "".into(), 404),
    ];
    for (method, path, body, status) in cases {
        let r = admin(&gw, method.clone(), path, &body).await;
        assert_eq!(r.status, status, "{method} {path} {body:.40}: {}", r.text());
        let err = json_of(&r)["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!err.is_empty(), "{method} {path}");
    }
    let r = admin(&gw, Method::GET, "/purge", "").await;
    assert_eq!(r.header("allow"), "POST");
    let r = admin(&gw, Method::GET, "/users/alice", "").await;
    assert_eq!(json_of(&r)["error"], "edge is not configured");
    let r = admin(&gw, Method::POST, "/purge", "{oops").await;
    assert!(json_of(&r)["error"]
        .as_str()
        .unwrap()
        .contains("malformed JSON"));
}

#[tokio::test]
async fn without_a_token_loopback_serves_only_healthz() {
    let origin = Origin::start(|_, _| cached("x")).await;
    let gw = Gateway::start(&origin.url(), |c| c.admin = Some(admin_config(None))).await;
    assert_eq!(get(&admin_url(&gw, "/healthz")).await.status, 200);
    let r = admin(&gw, Method::GET, "/metrics", "").await;
    assert_eq!(r.status, 401);
    assert!(
        json_of(&r)["error"]
            .as_str()
            .unwrap()
            .contains("no admin token is configured"),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn non_loopback_without_a_token_refuses_to_start() {
    let mut cfg = Config::default();
    cfg.server.listen = toml::Spanned::new(0..0, "127.0.0.1:0".into());
    let mut admin = admin_config(None);
    admin.listen = toml::Spanned::new(0..0, "0.0.0.0:0".into());
    cfg.admin = Some(admin);
    let err = kvgate::cli::start(cfg.clone())
        .await
        .err()
        .expect("refused");
    let err = err.to_string();
    assert!(err.contains("without a token"), "{err}");
    // with a token it starts
    if let Some(a) = cfg.admin.as_mut() {
        a.token = Some(TOKEN.into());
    }
    let running = kvgate::cli::start(cfg).await.expect("starts with a token");
    assert!(running.admin_addr.is_some());
}

#[tokio::test]
async fn admin_listen_flag_enables_the_listener() {
    let args = kvgate::cli::RunArgs {
        admin_listen: Some("127.0.0.1:0".into()),
        ..Default::default()
    };
    let cfg = args.resolve().expect("resolves");
    assert_eq!(cfg.admin.expect("admin on").listen.get_ref(), "127.0.0.1:0");
    let bad = kvgate::cli::RunArgs {
        admin_listen: Some("nope".into()),
        ..Default::default()
    };
    let err = bad.resolve().unwrap_err();
    assert!(err.to_string().contains("--admin-listen"), "{err}");
    // the parse failure stays reachable as the source
    assert!(std::error::Error::source(&err).is_some());
    assert!(kvgate::cli::RunArgs::default()
        .resolve()
        .expect("resolves")
        .admin
        .is_none());
}

#[tokio::test]
async fn readyz_reports_the_gateway_listener() {
    let origin = Origin::start(|_, _| cached("x")).await;
    let gw = gateway(&origin, |_| {}).await;
    let r = admin(&gw, Method::GET, "/readyz", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(json_of(&r)["listen"], gw.running.addr.to_string());
}

#[tokio::test]
async fn url_purge_takes_effect_for_the_very_next_request() {
    let origin =
        Origin::start(|s, n| cached(&format!("{} v{n}", s.path)).header("vary", "accept-language"))
            .await;
    let gw = gateway(&origin, |_| {}).await;
    let url = gw.url("/a?x=1");
    for lang in ["en", "fr"] {
        assert_eq!(
            get_with(&url, &[("accept-language", lang)]).await.x_cache(),
            "MISS"
        );
        assert_eq!(
            get_with(&url, &[("accept-language", lang)]).await.x_cache(),
            "HIT"
        );
    }
    get(&gw.url("/a?x=12")).await;
    assert_eq!(origin.count("/a?x=1"), 2);
    // both variants, and nothing that merely starts the same
    assert_eq!(purge(&gw, json!({"urls": ["/a?x=1"]})).await, 2);
    let again = get_with(&url, &[("accept-language", "en")]).await;
    assert_eq!(
        (again.x_cache(), again.text().as_str()),
        ("MISS", "/a?x=1 v3")
    );
    assert_eq!(origin.count("/a?x=1"), 3);
    assert_eq!(get(&gw.url("/a?x=12")).await.x_cache(), "HIT");
    assert_eq!(purge(&gw, json!({"urls": ["/never-stored"]})).await, 0);
}

#[tokio::test]
async fn prefix_purge() {
    let origin = Origin::start(|_, n| cached(&format!("v{n}"))).await;
    let gw = gateway(&origin, |_| {}).await;
    for p in ["/p/1", "/p/2?q", "/q/1"] {
        get(&gw.url(p)).await;
    }
    assert_eq!(purge(&gw, json!({"prefixes": ["/p/"]})).await, 2);
    assert_eq!(get(&gw.url("/p/1")).await.x_cache(), "MISS");
    assert_eq!(get(&gw.url("/p/2?q")).await.x_cache(), "MISS");
    assert_eq!(get(&gw.url("/q/1")).await.x_cache(), "HIT");
}

#[tokio::test]
async fn tag_purge_from_origin_headers_which_never_reach_the_client() {
    let origin = Origin::start(|s, n| {
        let r = cached(&format!("{} v{n}", s.path));
        match s.path.as_str() {
            "/products/1" => r.header("surrogate-key", "product:1 all"),
            "/products/2" => r.header("cache-tag", "product:2, all"),
            _ => r,
        }
    })
    .await;
    let gw = gateway(&origin, |_| {}).await;
    for p in ["/products/1", "/products/2"] {
        for expect in ["MISS", "HIT"] {
            let r = get(&gw.url(p)).await;
            assert_eq!(r.x_cache(), expect);
            assert_eq!(r.header("surrogate-key"), "");
            assert_eq!(r.header("cache-tag"), "");
        }
    }
    assert_eq!(purge(&gw, json!({"tags": ["no-such-tag"]})).await, 0);
    assert_eq!(purge(&gw, json!({"tags": ["product:1"]})).await, 1);
    assert_eq!(get(&gw.url("/products/1")).await.x_cache(), "MISS");
    assert_eq!(get(&gw.url("/products/2")).await.x_cache(), "HIT");
    assert_eq!(purge(&gw, json!({"tags": ["all"]})).await, 2);
    assert_eq!(get(&gw.url("/products/2")).await.x_cache(), "MISS");
}

#[tokio::test]
async fn tag_headers_can_be_kept_for_the_client() {
    let origin = Origin::start(|_, _| cached("x").header("surrogate-key", "a b")).await;
    let gw = gateway(&origin, |c| c.cache.tags.strip_headers = false).await;
    assert_eq!(get(&gw.url("/k")).await.header("surrogate-key"), "a b");
    assert_eq!(get(&gw.url("/k")).await.header("surrogate-key"), "a b");
    assert_eq!(purge(&gw, json!({"tags": ["b"]})).await, 1);
}

fn tag_rule(prefix: &str, tag: &str) -> TagRuleConfig {
    TagRuleConfig {
        prefix: toml::Spanned::new(0..0, prefix.into()),
        tag: toml::Spanned::new(0..0, tag.into()),
    }
}

#[tokio::test]
async fn tag_purge_from_config_rules() {
    let origin = Origin::start(|s, n| cached(&format!("{} v{n}", s.path))).await;
    let gw = gateway(&origin, |c| {
        c.cache.tag_rules = vec![
            tag_rule("/users/", "user:{segment2}"),
            tag_rule("/", "section:{segment1}"),
        ];
    })
    .await;
    // Bob's profile is first fetched by alice: its tag must still name bob,
    // the page's owner, not whoever filled the shared entry (hardening #6).
    for (path, user) in [
        ("/users/alice/profile", "alice"),
        ("/users/alice/orders", "alice"),
        ("/users/bob/profile", "alice"),
    ] {
        let r = get_with(&gw.url(path), &[("x-user-id", user)]).await;
        assert_eq!(r.x_cache(), "MISS");
    }
    get(&gw.url("/news/today")).await;
    let listed = json_of(&admin(&gw, Method::GET, "/entries?tag=section:users", "").await);
    assert_eq!(listed["entries"].as_array().unwrap().len(), 3);

    assert_eq!(purge(&gw, json!({"tags": ["user:alice"]})).await, 2);
    let alice = get_with(&gw.url("/users/alice/profile"), &[("x-user-id", "alice")]).await;
    assert_eq!(alice.x_cache(), "MISS");
    let bob = get_with(&gw.url("/users/bob/profile"), &[("x-user-id", "bob")]).await;
    assert_eq!(bob.x_cache(), "HIT");
    assert_eq!(purge(&gw, json!({"tags": ["user:bob"]})).await, 1);
    let bob = get_with(&gw.url("/users/bob/profile"), &[("x-user-id", "bob")]).await;
    assert_eq!(bob.x_cache(), "MISS");
    assert_eq!(purge(&gw, json!({"tags": ["section:news"]})).await, 1);
    assert_eq!(get(&gw.url("/news/today")).await.x_cache(), "MISS");
}

#[tokio::test]
async fn soft_purge_revalidates_with_the_stored_validator() {
    let origin = Origin::start(|s, _| {
        if s.headers
            .get("if-none-match")
            .is_some_and(|v| v == "\"v1\"")
        {
            Reply::ok("").status(304).header("etag", "\"v1\"")
        } else {
            cached("body").header("etag", "\"v1\"")
        }
    })
    .await;
    let gw = gateway(&origin, |_| {}).await;
    assert_eq!(get(&gw.url("/s")).await.x_cache(), "MISS");
    assert_eq!(get(&gw.url("/s")).await.x_cache(), "HIT");
    assert_eq!(purge(&gw, json!({"urls": ["/s"], "soft": true})).await, 1);
    let r = get(&gw.url("/s")).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("REVALIDATED", "body"));
    let seen = origin.requests("/s");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].headers["if-none-match"], "\"v1\"");
    assert_eq!(get(&gw.url("/s")).await.x_cache(), "HIT");
}

#[tokio::test]
async fn soft_purge_serves_stale_under_stale_while_revalidate() {
    let origin = Origin::start(|_, n| {
        Reply::ok(&format!("v{n}"))
            .header("cache-control", "max-age=60, stale-while-revalidate=30")
            .header("surrogate-key", "swr")
    })
    .await;
    let gw = gateway(&origin, |_| {}).await;
    get(&gw.url("/w")).await;
    assert_eq!(purge(&gw, json!({"tags": ["swr"], "soft": true})).await, 1);
    let r = get(&gw.url("/w")).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("STALE", "v1"));
    // the background refresh lands
    for _ in 0..100 {
        if origin.count("/w") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(origin.count("/w"), 2);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = get(&gw.url("/w")).await;
    assert_eq!((r.x_cache(), r.text().as_str()), ("HIT", "v2"));
}

#[tokio::test]
async fn version_bumps_global_and_per_route() {
    let origin = Origin::start(|_, n| cached(&format!("v{n}"))).await;
    let gw = gateway(&origin, |c| {
        c.routes = Config::parse("[[route]]\nname = \"api\"\nprefix = \"/api/\"\n", "t.toml")
            .expect("routes")
            .routes;
    })
    .await;
    get(&gw.url("/api/a")).await;
    get(&gw.url("/other")).await;
    let r = admin(&gw, Method::POST, "/version", "").await;
    assert_eq!(json_of(&r), json!({"version": 2}));
    assert_eq!(get(&gw.url("/api/a")).await.x_cache(), "MISS");
    assert_eq!(get(&gw.url("/other")).await.x_cache(), "MISS");

    let r = admin(&gw, Method::POST, "/version", r#"{"route": "api"}"#).await;
    assert_eq!(json_of(&r), json!({"version": 3, "route": "api"}));
    assert_eq!(get(&gw.url("/api/a")).await.x_cache(), "MISS");
    assert_eq!(get(&gw.url("/other")).await.x_cache(), "HIT");
    assert_eq!(get(&gw.url("/api/a")).await.x_cache(), "HIT");

    // the old entries are listed as unreachable until they age out
    let listed = json_of(&admin(&gw, Method::GET, "/entries?prefix=/api/", "").await);
    let current: Vec<bool> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["current"].as_bool().unwrap())
        .collect();
    assert_eq!(current.iter().filter(|c| **c).count(), 1);
    assert_eq!(current.len(), 3);
    // the global version moves every route on
    let r = admin(&gw, Method::POST, "/version", "{}").await;
    assert_eq!(json_of(&r), json!({"version": 3}));
    assert_eq!(get(&gw.url("/api/a")).await.x_cache(), "MISS");
}

#[tokio::test]
async fn entries_are_listed_with_metadata_and_paginated() {
    let origin = Origin::start(|s, _| {
        let r = cached("0123456789");
        if s.path.ends_with('3') {
            r.header("surrogate-key", "three")
        } else {
            r
        }
    })
    .await;
    let gw = gateway(&origin, |_| {}).await;
    for i in 0..5 {
        get(&gw.url(&format!("/e/{i}"))).await;
    }
    get(&gw.url("/other")).await;
    let mut paths = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = json_of(
            &admin(
                &gw,
                Method::GET,
                &format!("/entries?prefix=%2Fe%2F&limit=2&cursor={cursor}"),
                "",
            )
            .await,
        );
        let entries = page["entries"].as_array().unwrap();
        assert!(entries.len() <= 2);
        for e in entries {
            paths.push(e["path"].as_str().unwrap().to_string());
            assert_eq!(e["status"], 200);
            assert_eq!(e["version"], 1);
            assert!(e["ttl_secs"].as_i64().unwrap() > 50);
            assert!(e["size"].as_u64().unwrap() >= 10);
            assert!(e["key"]
                .as_str()
                .unwrap()
                .ends_with(e["path"].as_str().unwrap()));
            assert!(e.get("body").is_none());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(paths, ["/e/0", "/e/1", "/e/2", "/e/3", "/e/4"]);
    let tagged = json_of(&admin(&gw, Method::GET, "/entries?tag=three", "").await);
    assert_eq!(tagged["entries"][0]["path"], "/e/3");
    assert_eq!(tagged["entries"][0]["tags"], json!(["three"]));
    let all = json_of(&admin(&gw, Method::GET, "/entries", "").await);
    assert_eq!(all["entries"].as_array().unwrap().len(), 6);
    assert!(all["next_cursor"].is_null());
}

#[tokio::test]
async fn tag_index_stays_bounded_as_entries_are_evicted_and_expire() {
    let origin = Origin::start(|s, _| {
        let i: usize = s.path.trim_start_matches("/t/").parse().unwrap_or(0);
        Reply::ok(&"x".repeat(200))
            .header("cache-control", "max-age=60")
            .header("surrogate-key", &format!("item:{i} group:{}", i % 10))
    })
    .await;
    let gw = gateway(&origin, |c| {
        c.cache.max_bytes = 64 * 1024;
        c.cache.shards = 4;
    })
    .await;
    let store = &gw.running.gateway.store;
    let mut peak_tags = 0;
    for i in 0..1500 {
        get(&gw.url(&format!("/t/{i}"))).await;
        if i % 100 == 99 {
            let (bytes, entries) = store.usage();
            let tags = store.tag_count();
            assert!(bytes <= 64 * 1024, "bytes {bytes}");
            // one item tag per entry, plus at most ten groups per shard
            assert!(tags <= entries + 40, "{tags} tags for {entries} entries");
            peak_tags = peak_tags.max(tags);
        }
    }
    let (_, entries) = store.usage();
    assert!(entries < 500, "the cache is bounded: {entries} entries");
    assert!(
        peak_tags < 600,
        "the tag index is bounded: peak {peak_tags}"
    );
    assert!(
        gw.running
            .gateway
            .store
            .stats()
            .evictions
            .load(std::sync::atomic::Ordering::Relaxed)
            > 1000
    );
    // every entry expires: the index empties with the store
    let later = SystemTime::now() + Duration::from_secs(3600);
    store.sweep(later, Duration::ZERO, Duration::ZERO);
    assert_eq!(store.usage(), (0, 0));
    assert_eq!(store.tag_count(), 0);
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse()
        .expect("a number")
}

#[tokio::test]
async fn metrics_count_a_known_sequence() {
    let origin = Origin::start(|s, _| match s.path.as_str() {
        "/nostore" => Reply::ok("n").header("cache-control", "no-store"),
        _ => cached("m").header("surrogate-key", "m"),
    })
    .await;
    let gw = gateway(&origin, |_| {}).await;
    get(&gw.url("/m")).await; // MISS
    get(&gw.url("/m")).await; // HIT
    get(&gw.url("/m")).await; // HIT
    get(&gw.url("/nostore")).await; // MISS
    send(Method::POST, &gw.url("/post"), &[], "x").await; // BYPASS
    assert_eq!(purge(&gw, json!({"tags": ["m"]})).await, 1);
    get(&gw.url("/m")).await; // MISS
    let r = admin(&gw, Method::GET, "/metrics", "").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .starts_with("text/plain; version=0.0.4"));
    let t = r.text();
    for (series, value) in [
        ("kvgate_requests_total{cache=\"HIT\"}", 2.0),
        ("kvgate_requests_total{cache=\"MISS\"}", 3.0),
        ("kvgate_requests_total{cache=\"BYPASS\"}", 1.0),
        ("kvgate_requests_total{cache=\"STALE\"}", 0.0),
        ("kvgate_requests_total{cache=\"REVALIDATED\"}", 0.0),
        ("kvgate_origin_requests_total", 4.0),
        ("kvgate_origin_errors_total", 0.0),
        ("kvgate_origin_latency_seconds_count", 4.0),
        ("kvgate_origin_latency_seconds_bucket{le=\"+Inf\"}", 4.0),
        ("kvgate_cache_entries", 1.0),
        ("kvgate_cache_tags", 1.0),
        ("kvgate_cache_version", 1.0),
        ("kvgate_purges_total", 1.0),
        ("kvgate_purged_entries_total", 1.0),
        ("kvgate_cache_evictions_total", 0.0),
        ("kvgate_cache_expired_total", 0.0),
        ("kvgate_background_refreshes_total", 0.0),
        ("kvgate_coalesced_waiters_total", 0.0),
        ("kvgate_flights_in_progress", 0.0),
    ] {
        assert_eq!(metric(&t, series), value, "{series}");
    }
    assert!(metric(&t, "kvgate_cache_bytes") > 0.0);
    assert!(metric(&t, "kvgate_origin_latency_seconds_sum") > 0.0);
    assert!(t.contains("# TYPE kvgate_origin_latency_seconds histogram"));
    // buckets are cumulative
    let buckets: Vec<f64> = t
        .lines()
        .filter(|l| l.starts_with("kvgate_origin_latency_seconds_bucket"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    // 100 µs to 60 s (past the 30 s first-byte timeout), then +Inf.
    assert_eq!(buckets.len(), 19);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]));
    assert!(!t.contains("kvgate_edge_"), "no edge series without edge");
}

const EDGE_TOML: &str = r#"
[state]
backend = "memory"
[edge.identity]
trusted_from = ["127.0.0.0/8", "::1/128"]
[edge.flags.newUI]
default = false
[edge.experiments.new-checkout]
variants = { control = 50, variant_a = 25, variant_b = 25 }
[edge.preferences]
defaults = { theme = "light" }
"#;

#[tokio::test]
async fn edge_routes() {
    let origin = Origin::start(|_, _| Reply::ok("e")).await;
    let parsed = Config::parse(EDGE_TOML, "edge.toml").expect("edge config");
    let gw = gateway(&origin, |c| {
        c.edge = parsed.edge;
        c.state = parsed.state;
    })
    .await;
    get_with(&gw.url("/x"), &[("x-user-id", "alice")]).await;

    let u = json_of(&admin(&gw, Method::GET, "/users/alice", "").await);
    assert_eq!(u["flags"]["newUI"]["value"], false);
    let r = admin(&gw, Method::PUT, "/flags/newUI/users/alice", "true").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let u = json_of(&admin(&gw, Method::GET, "/users/alice", "").await);
    assert_eq!(
        u["flags"]["newUI"],
        json!({"value": true, "source": "override", "description": ""})
    );
    assert_eq!(
        admin(&gw, Method::PUT, "/flags/newUI/users/alice", "\"on\"")
            .await
            .status,
        400
    );
    assert_eq!(
        admin(&gw, Method::PUT, "/flags/newUI/users/alice", "")
            .await
            .status,
        400
    );
    assert_eq!(
        admin(&gw, Method::PUT, "/flags/nope/users/alice", "true")
            .await
            .status,
        404
    );
    let r = admin(&gw, Method::DELETE, "/flags/newUI/users/alice", "").await;
    assert_eq!(json_of(&r)["deleted"], true);

    let p = json_of(&admin(&gw, Method::GET, "/users/alice/preferences", "").await);
    assert_eq!(p, json!({"theme": "light"}));
    let r = admin(
        &gw,
        Method::PATCH,
        "/users/alice/preferences",
        r#"{"theme":"dark"}"#,
    )
    .await;
    assert_eq!(json_of(&r), json!({"theme": "dark"}));
    let r = admin(
        &gw,
        Method::PATCH,
        "/users/alice/preferences",
        r#"{"theme":1}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    let r = admin(&gw, Method::PATCH, "/users/alice/preferences", "{").await;
    assert_eq!(r.status, 400);

    let e = json_of(&admin(&gw, Method::GET, "/experiments/new-checkout", "").await);
    assert_eq!(e["exposures"], 1);
    assert_eq!(
        admin(&gw, Method::GET, "/experiments/nope", "")
            .await
            .status,
        404
    );
    let r = admin(
        &gw,
        Method::DELETE,
        "/experiments/new-checkout/users/alice",
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let c = json_of(&admin(&gw, Method::GET, "/counters", "").await);
    assert_eq!(c["requests"]["default"], 1);

    // path segments are percent-decoded
    let u = json_of(&admin(&gw, Method::GET, "/users/a%40b%2Fc", "").await);
    assert_eq!(u["user_id"], "a@b/c");

    let t = admin(&gw, Method::GET, "/metrics", "").await.text();
    assert_eq!(
        metric(&t, "kvgate_edge_route_requests_total{route=\"default\"}"),
        1.0
    );
    assert_eq!(
        metric(&t, "kvgate_edge_flag_evaluations_total{flag=\"newUI\"}"),
        1.0
    );
    let exposures: f64 = t
        .lines()
        .filter(|l| l.starts_with("kvgate_edge_exposures_total{experiment=\"new-checkout\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(exposures, 1.0);
}

#[cfg(unix)]
#[tokio::test]
async fn sighup_applies_a_changed_cache_version() {
    let origin = Origin::start(|_, n| cached(&format!("v{n}"))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kvgate.toml");
    let write = |version: u64| {
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[origin]\nurl = \"{}\"\n[log]\naccess = false\n[cache]\nversion = {version}\n",
                origin.url()
            ),
        )
        .expect("write config");
    };
    write(1);
    let cfg = Config::load(&path).expect("loads");
    let running = kvgate::cli::start(cfg).await.expect("starts");
    let url = format!("http://{}/a", running.addr);
    get(&url).await;
    assert_eq!(get(&url).await.x_cache(), "HIT");
    write(7);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    for _ in 0..200 {
        if running.gateway.version() == 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(running.gateway.version(), 7);
    assert_eq!(get(&url).await.x_cache(), "MISS");
}
