//! RFC 9111 behaviour of the whole gateway over real HTTP: a real origin,
//! the gateway on an ephemeral port, and a client.

mod common;
use common::*;
use http::Method;
use std::time::Duration;

fn cc(v: &'static str) -> impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static {
    move |_, n| Reply::ok(&format!("v{n}")).header("cache-control", v)
}

#[tokio::test]
async fn rfc9111_3_no_store_private_and_set_cookie_are_not_stored() {
    let origin = Origin::start(|s, n| {
        let r = Reply::ok(&format!("v{n}"));
        match s.path.as_str() {
            "/no-store" => r.header("cache-control", "max-age=60, no-store"),
            "/private" => r.header("cache-control", "max-age=60, private"),
            "/cookie" => r
                .header("cache-control", "max-age=60")
                .header("set-cookie", "a=b"),
            _ => r.header("cache-control", "max-age=60"),
        }
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    for p in ["/no-store", "/private", "/cookie"] {
        get(&gw.url(p)).await;
        let second = get(&gw.url(p)).await;
        assert_eq!(second.x_cache(), "MISS", "{p}");
        assert_eq!(origin.count(p), 2, "{p}");
    }
}

#[tokio::test]
async fn set_cookie_stored_when_route_allows() {
    let origin = Origin::start(|_, n| {
        Reply::ok(&format!("v{n}"))
            .header("cache-control", "max-age=60")
            .header("set-cookie", "a=b")
    })
    .await;
    let gw = Gateway::start(&origin.url(), |c| {
        c.routes = kvgate::config::Config::parse(
            "[[route]]\nname = \"c\"\nprefix = \"/c/\"\nallow_set_cookie = true\n",
            "t",
        )
        .expect("config")
        .routes;
    })
    .await;
    get(&gw.url("/c/x")).await;
    assert_eq!(get(&gw.url("/c/x")).await.x_cache(), "HIT");
}

#[tokio::test]
async fn rfc9111_3_5_authorization_not_stored_without_permission() {
    let origin = Origin::start(|s, n| {
        let v = if s.path == "/public" {
            "max-age=60, public"
        } else {
            "max-age=60"
        };
        Reply::ok(&format!("v{n}")).header("cache-control", v)
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    let auth = [("authorization", "Bearer x")];
    get_with(&gw.url("/plain"), &auth).await;
    assert_eq!(get_with(&gw.url("/plain"), &auth).await.x_cache(), "MISS");
    get_with(&gw.url("/public"), &auth).await;
    assert_eq!(get_with(&gw.url("/public"), &auth).await.x_cache(), "HIT");
}

#[tokio::test]
async fn rfc9111_4_2_3_age_header_on_hits_counts_origin_age() {
    let origin = Origin::start(|_, _| {
        Reply::ok("x")
            .header("cache-control", "max-age=600")
            .header("age", "100")
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/a")).await;
    let hit = get(&gw.url("/a")).await;
    assert_eq!(hit.x_cache(), "HIT");
    let age: u64 = hit.header("age").parse().expect("numeric Age");
    assert!((100..110).contains(&age), "age {age}");
    assert!(hit.header("cache-status").contains("hit"));
}

#[tokio::test]
async fn rfc9111_4_2_expired_entry_is_not_served() {
    let origin = Origin::start(cc("max-age=1")).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/a")).await;
    assert_eq!(get(&gw.url("/a")).await.x_cache(), "HIT");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let third = get(&gw.url("/a")).await;
    assert_eq!(third.x_cache(), "MISS");
    assert_eq!(third.text(), "v2");
}

#[tokio::test]
async fn rfc9111_4_3_stale_entry_revalidated_with_validators_and_304_refreshes() {
    let origin = Origin::start(|s, n| {
        if s.headers
            .get("if-none-match")
            .is_some_and(|v| v == "\"e1\"")
        {
            Reply::ok("")
                .status(304)
                .header("cache-control", "max-age=1")
                .header("x-refreshed", &n.to_string())
        } else {
            Reply::ok("body")
                .header("cache-control", "max-age=1")
                .header("etag", "\"e1\"")
        }
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/a")).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = get(&gw.url("/a")).await;
    assert_eq!(r.x_cache(), "REVALIDATED");
    assert_eq!(r.text(), "body");
    assert_eq!(
        r.header("x-refreshed"),
        "2",
        "304 headers update the stored ones"
    );
    let seen = origin.requests("/a");
    assert_eq!(
        seen[1].headers.get("if-none-match").map(|v| v.as_bytes()),
        Some(&b"\"e1\""[..])
    );
    let hit = get(&gw.url("/a")).await;
    assert_eq!(hit.x_cache(), "HIT", "freshness refreshed by the 304");
    assert_eq!(hit.header("x-refreshed"), "2");
}

#[tokio::test]
async fn rfc9111_4_3_2_client_conditional_answered_from_cache() {
    let origin = Origin::start(|_, _| {
        Reply::ok("body")
            .header("cache-control", "max-age=60")
            .header("etag", "\"abc\"")
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/a")).await;
    let r = get_with(&gw.url("/a"), &[("if-none-match", "\"abc\"")]).await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let r = get_with(&gw.url("/a"), &[("if-none-match", "\"other\"")]).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "body"));
    assert_eq!(origin.count("/a"), 1);
}

#[tokio::test]
async fn rfc9111_5_2_2_4_no_cache_response_always_revalidated() {
    let origin = Origin::start(|_, n| {
        Reply::ok(&format!("v{n}"))
            .header("cache-control", "no-cache")
            .header("etag", "\"x\"")
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/a")).await;
    get(&gw.url("/a")).await;
    assert_eq!(origin.count("/a"), 2);
    assert!(origin.requests("/a")[1]
        .headers
        .contains_key("if-none-match"));
}

#[tokio::test]
async fn rfc9111_5_2_1_request_directives() {
    let origin = Origin::start(cc("max-age=60")).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    // only-if-cached with nothing stored: 504
    let r = get_with(&gw.url("/a"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!(r.status, 504);
    assert_eq!(origin.count("/a"), 0);
    get(&gw.url("/a")).await;
    assert_eq!(
        get_with(&gw.url("/a"), &[("cache-control", "only-if-cached")])
            .await
            .x_cache(),
        "HIT"
    );
    // no-cache forces validation with the origin
    let r = get_with(&gw.url("/a"), &[("cache-control", "no-cache")]).await;
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(origin.count("/a"), 2);
    // Pragma: no-cache counts only without Cache-Control
    get_with(&gw.url("/a"), &[("pragma", "no-cache")]).await;
    assert_eq!(origin.count("/a"), 3);
    get_with(
        &gw.url("/a"),
        &[("pragma", "no-cache"), ("cache-control", "x-unknown")],
    )
    .await;
    assert_eq!(origin.count("/a"), 3);
    // max-age=0 from the client also validates
    get_with(&gw.url("/a"), &[("cache-control", "max-age=0")]).await;
    assert_eq!(origin.count("/a"), 4);
    // no-store: answered, but the response is not stored
    let r = get_with(&gw.url("/b"), &[("cache-control", "no-store")]).await;
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(get(&gw.url("/b")).await.x_cache(), "MISS");
}

/// An origin that answers with the Accept-Language it saw and varies on it.
fn echo_language(s: &Seen, _: usize) -> Reply {
    let lang = s
        .headers
        .get("accept-language")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none");
    Reply::ok(lang)
        .header("cache-control", "max-age=60")
        .header("vary", "Accept-Language")
}

#[tokio::test]
async fn rfc9111_4_1_vary_variants_stored_side_by_side() {
    let origin = Origin::start(echo_language).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    assert_eq!(
        get_with(&gw.url("/v"), &[("accept-language", "en")])
            .await
            .text(),
        "en"
    );
    assert_eq!(
        get_with(&gw.url("/v"), &[("accept-language", "fr")])
            .await
            .text(),
        "fr"
    );
    let en = get_with(&gw.url("/v"), &[("accept-language", "en")]).await;
    let fr = get_with(&gw.url("/v"), &[("accept-language", "fr")]).await;
    assert_eq!((en.x_cache(), en.text().as_str()), ("HIT", "en"));
    assert_eq!((fr.x_cache(), fr.text().as_str()), ("HIT", "fr"));
    assert_eq!(origin.count("/v"), 2);
}

#[tokio::test]
async fn rfc9111_4_1_vary_star_never_matches() {
    let origin = Origin::start(|_, n| {
        Reply::ok(&format!("v{n}"))
            .header("cache-control", "max-age=60")
            .header("vary", "*")
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/a")).await;
    assert_eq!(get(&gw.url("/a")).await.x_cache(), "MISS");
}

#[tokio::test]
async fn rfc9111_4_4_unsafe_method_invalidates_target_and_location() {
    let origin = Origin::start(|s, n| {
        if s.method == Method::POST {
            Reply::ok("created")
                .status(201)
                .header("location", "/other")
        } else {
            Reply::ok(&format!("v{n}")).header("cache-control", "max-age=60")
        }
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/a")).await;
    get(&gw.url("/other")).await;
    assert_eq!(get(&gw.url("/a")).await.x_cache(), "HIT");
    let post = send(Method::POST, &gw.url("/a"), &[], "payload").await;
    assert_eq!((post.status.as_u16(), post.x_cache()), (201, "BYPASS"));
    assert_eq!(get(&gw.url("/a")).await.x_cache(), "MISS");
    assert_eq!(get(&gw.url("/other")).await.x_cache(), "MISS");
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get() {
    let origin = Origin::start(cc("max-age=60")).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/a")).await;
    let head = send(Method::HEAD, &gw.url("/a"), &[], "").await;
    assert_eq!(head.x_cache(), "HIT");
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), "2");
    assert_eq!(origin.count("/a"), 1);
}

#[tokio::test]
async fn heuristic_freshness_from_last_modified() {
    let lm = httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(10_000));
    let origin =
        Origin::start(move |_, n| Reply::ok(&format!("v{n}")).header("last-modified", &lm)).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/a")).await;
    assert_eq!(get(&gw.url("/a")).await.x_cache(), "HIT");
}

#[tokio::test]
async fn route_rules_bypass_and_override_ttl() {
    let origin =
        Origin::start(|_, n| Reply::ok(&format!("v{n}")).header("cache-control", "max-age=60"))
            .await;
    let gw = Gateway::start(&origin.url(), |c| {
        c.routes = kvgate::config::Config::parse(
            "[[route]]\nname = \"b\"\nprefix = \"/nocache/\"\nbypass = true\n[[route]]\nname = \"t\"\nprefix = \"/short/\"\nttl_secs = 1\n",
            "t",
        )
        .expect("config")
        .routes;
    })
    .await;
    get(&gw.url("/nocache/a")).await;
    assert_eq!(get(&gw.url("/nocache/a")).await.x_cache(), "BYPASS");
    get(&gw.url("/short/a")).await;
    assert_eq!(get(&gw.url("/short/a")).await.x_cache(), "HIT");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(get(&gw.url("/short/a")).await.x_cache(), "MISS");
}

#[tokio::test]
async fn proxy_headers_hop_by_hop_removed_via_and_forwarded_added() {
    let origin = Origin::start(|_, _| {
        Reply::ok("x")
            .header("cache-control", "max-age=60")
            .header("connection", "x-hop")
            .header("x-hop", "1")
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    let r = get_with(
        &gw.url("/a"),
        &[
            ("connection", "x-secret"),
            ("x-secret", "s"),
            ("x-kept", "k"),
        ],
    )
    .await;
    assert!(
        r.headers.get("x-hop").is_none(),
        "hop-by-hop response field leaked"
    );
    assert!(r.header("via").contains("kvgate"));
    let seen = &origin.requests("/a")[0];
    assert!(seen.headers.get("x-secret").is_none());
    assert_eq!(
        seen.headers.get("x-kept").map(|v| v.as_bytes()),
        Some(&b"k"[..])
    );
    assert_eq!(
        seen.headers.get("x-forwarded-for").map(|v| v.as_bytes()),
        Some(&b"127.0.0.1"[..])
    );
    assert_eq!(
        seen.headers.get("x-forwarded-proto").map(|v| v.as_bytes()),
        Some(&b"http"[..])
    );
    assert!(seen.headers.get("via").is_some());
}

#[tokio::test]
async fn large_objects_stream_through_uncached() {
    let big = "x".repeat(200_000);
    let origin =
        Origin::start(move |_, _| Reply::ok(&big).header("cache-control", "max-age=60")).await;
    let gw = Gateway::start(&origin.url(), |c| c.cache.max_object_bytes = 100_000).await;
    let a = get(&gw.url("/big")).await;
    assert_eq!(a.body.len(), 200_000);
    let b = get(&gw.url("/big")).await;
    assert_eq!((b.x_cache(), b.body.len()), ("MISS", 200_000));
    assert_eq!(origin.count("/big"), 2);
}

#[tokio::test]
async fn range_request_served_from_stored_body() {
    let origin =
        Origin::start(|_, _| Reply::ok("0123456789").header("cache-control", "max-age=60")).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/r")).await;
    let r = get_with(&gw.url("/r"), &[("range", "bytes=2-4")]).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (206, "234"));
    assert_eq!(r.header("content-range"), "bytes 2-4/10");
}

#[tokio::test]
async fn config_file_errors_name_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[origin]\nurl = \"http://127.0.0.1:1\"\ntimeout = 5\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run kvgate");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:3:1") && err.contains("timeout"),
        "{err}"
    );
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["check-config", "--config", "config/kvgate.toml"])
        .output()
        .expect("run kvgate");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[tokio::test]
async fn rfc9110_7_6_1_connection_cannot_poison_a_vary_variant() {
    let origin = Origin::start(echo_language).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    // The attacker's Accept-Language is hop-by-hop for this hop: the origin
    // never sees it, so the answer must not be filed under "fr".
    let attacker = get_with(
        &gw.url("/v"),
        &[("connection", "accept-language"), ("accept-language", "fr")],
    )
    .await;
    assert_eq!(attacker.text(), "none");
    let victim = get_with(&gw.url("/v"), &[("accept-language", "fr")]).await;
    assert_eq!(
        victim.text(),
        "fr",
        "a French reader got the poisoned variant"
    );
}
