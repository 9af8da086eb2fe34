//! The dashboard over real sockets, no browser: its files (content types,
//! CSP, framing, validators), sign-in (cookie attributes, the wrong-token
//! delay and its bound), the session as an alternative to the bearer token,
//! CSRF on state-changing requests, sign-out, and `GET /stats`.

mod common;
use common::*;
use http::Method;
use kvgate::config::AdminConfig;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const TOKEN: &str = "dashboard-token-0123456789";

async fn gateway(origin: &Origin) -> Gateway {
    Gateway::start(&origin.url(), |c| {
        c.admin = Some(AdminConfig {
            listen: toml::Spanned::new(0..0, "127.0.0.1:0".into()),
            token: Some(TOKEN.into()),
            max_body_bytes: 4096,
        });
    })
    .await
}

fn admin_url(gw: &Gateway, path: &str) -> String {
    format!(
        "http://{}{path}",
        gw.running.admin_addr.expect("admin runs")
    )
}

fn json_of(g: &Got) -> Value {
    serde_json::from_slice(&g.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", g.text()))
}

/// Signs in; returns the `Cookie` header value and the CSRF token.
async fn sign_in(gw: &Gateway) -> (String, String) {
    let r = send(
        Method::POST,
        &admin_url(gw, "/ui/session"),
        &[("content-type", "application/json")],
        &json!({ "token": TOKEN }).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let set_cookie = r.header("set-cookie").to_string();
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    assert!(cookie.starts_with("kvgate_session="), "{set_cookie}");
    (cookie, json_of(&r)["csrf"].as_str().unwrap().to_string())
}

/// Whether the HTML has an attribute like ` onclick=` (CSP would block it).
fn has_inline_handler(html: &str) -> bool {
    html.match_indices(" on").any(|(i, _)| {
        let rest = &html[i + 3..];
        let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
        name_len > 0 && rest[name_len..].starts_with('=')
    })
}

fn cached(body: &str) -> Reply {
    Reply::ok(body).header("cache-control", "max-age=60")
}

#[tokio::test]
async fn pages_have_types_csp_no_framing_and_validators() {
    let origin = Origin::start(|_, _| cached("x")).await;
    let gw = gateway(&origin).await;
    for (path, ty) in [
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
        ("/ui/icon.svg", "image/svg+xml"),
    ] {
        // No credentials needed to load the page itself.
        let r = get(&admin_url(&gw, path)).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), ty, "{path}");
        let csp = r.header("content-security-policy");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert_eq!(r.header("x-frame-options"), "DENY");
        assert_eq!(r.header("x-content-type-options"), "nosniff");
        assert_eq!(r.header("cache-control"), "no-cache");
        let etag = r.header("etag").to_string();
        assert!(etag.starts_with('"'), "{path}: {etag}");
        let again = get_with(&admin_url(&gw, path), &[("if-none-match", &etag)]).await;
        assert_eq!(again.status, 304, "{path}");
        assert!(again.body.is_empty());
    }
    let html = get(&admin_url(&gw, "/ui/")).await.text();
    // No inline script: every <script> has a src.
    assert!(html.contains("<script src=\"/ui/app.js\""));
    assert_eq!(
        html.matches("<script").count(),
        1,
        "one external script only"
    );
    assert!(!has_inline_handler(&html), "no inline event handlers");

    let r = get(&admin_url(&gw, "/ui")).await;
    assert_eq!((r.status.as_u16(), r.header("location")), (308, "/ui/"));
    for bad in ["/ui/nope", "/ui/../metrics", "/ui/app.js/x"] {
        let r = get(&admin_url(&gw, bad)).await;
        assert_eq!(r.status, 404, "{bad}");
        assert_eq!(r.header("x-frame-options"), "DENY", "{bad}");
    }
    let r = send(Method::POST, &admin_url(&gw, "/ui/app.js"), &[], "").await;
    assert_eq!(r.status, 405);
    assert!(has_inline_handler("<a onclick=\"x\">"));
}

#[tokio::test]
async fn sign_in_sets_a_strict_http_only_cookie_that_opens_the_api() {
    let origin = Origin::start(|_, _| cached("x")).await;
    let gw = gateway(&origin).await;
    let r = send(
        Method::POST,
        &admin_url(&gw, "/ui/session"),
        &[("content-type", "application/json")],
        &json!({ "token": TOKEN }).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sc = r.header("set-cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(sc.contains(attr), "{attr} missing in {sc}");
    }
    assert_eq!(r.header("cache-control"), "no-store");
    let body = json_of(&r);
    assert!(body["csrf"].as_str().unwrap().len() >= 40);
    assert!(body["expires_at"].as_u64().unwrap() > 0);

    let (cookie, csrf) = sign_in(&gw).await;
    // A GET with the cookie alone works; without it, 401.
    let stats = get_with(&admin_url(&gw, "/stats"), &[("cookie", &cookie)]).await;
    assert_eq!(stats.status, 200, "{}", stats.text());
    assert_eq!(get(&admin_url(&gw, "/stats")).await.status, 401);
    let me = get_with(&admin_url(&gw, "/ui/session"), &[("cookie", &cookie)]).await;
    assert_eq!(json_of(&me), json!({ "signed_in": true }));
    assert_eq!(get(&admin_url(&gw, "/ui/session")).await.status, 401);

    // A state-changing request needs the CSRF header too.
    get(&gw.url("/a")).await;
    let purge = |headers: Vec<(&'static str, String)>| {
        let url = admin_url(&gw, "/purge");
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send(Method::POST, &url, &h, r#"{"urls":["/a"]}"#).await
        }
    };
    let no_csrf = purge(vec![("cookie", cookie.clone())]).await;
    assert_eq!(no_csrf.status, 403, "{}", no_csrf.text());
    assert!(json_of(&no_csrf)["error"]
        .as_str()
        .unwrap()
        .contains("X-CSRF-Token"));
    let wrong = purge(vec![
        ("cookie", cookie.clone()),
        ("x-csrf-token", "not-the-token".into()),
    ])
    .await;
    assert_eq!(wrong.status, 403);
    // Refused requests changed nothing.
    assert_eq!(get(&gw.url("/a")).await.x_cache(), "HIT");
    let ok = purge(vec![
        ("cookie", cookie.clone()),
        ("x-csrf-token", csrf.clone()),
    ])
    .await;
    assert_eq!(
        (ok.status.as_u16(), json_of(&ok)),
        (200, json!({"purged": 1}))
    );
    assert_eq!(get(&gw.url("/a")).await.x_cache(), "MISS");

    // A wrong bearer token is not rescued by a good cookie.
    let r = get_with(
        &admin_url(&gw, "/stats"),
        &[("cookie", &cookie), ("authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(r.status, 401);
    // The token keeps working without any cookie.
    let auth = format!("Bearer {TOKEN}");
    let r = get_with(&admin_url(&gw, "/stats"), &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn sign_out_needs_csrf_and_ends_the_session() {
    let origin = Origin::start(|_, _| cached("x")).await;
    let gw = gateway(&origin).await;
    let (cookie, csrf) = sign_in(&gw).await;
    let url = admin_url(&gw, "/ui/session");
    let r = send(Method::DELETE, &url, &[("cookie", &cookie)], "").await;
    assert_eq!(r.status, 403, "sign-out without CSRF is refused");
    let r = send(
        Method::DELETE,
        &url,
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("set-cookie").contains("Max-Age=0"));
    let r = get_with(&admin_url(&gw, "/stats"), &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 401);
    assert!(json_of(&r)["error"]
        .as_str()
        .unwrap()
        .contains("sign in again"));
    let r = send(
        Method::POST,
        &admin_url(&gw, "/version"),
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
        "",
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(gw.running.gateway.version(), 1);
}

#[tokio::test]
async fn wrong_tokens_wait_and_cannot_pile_up() {
    let origin = Origin::start(|_, _| cached("x")).await;
    let gw = gateway(&origin).await;
    let url = admin_url(&gw, "/ui/session");
    let attempt = |token: &'static str| {
        let url = url.clone();
        async move {
            let t = Instant::now();
            let r = send(
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                &json!({ "token": token }).to_string(),
            )
            .await;
            (r, t.elapsed())
        }
    };
    let (r, took) = attempt("wrong").await;
    assert_eq!(r.status, 401);
    assert!(r.header("set-cookie").is_empty());
    assert!(
        json_of(&r)["error"]
            .as_str()
            .unwrap()
            .contains("wrong admin token"),
        "{}",
        r.text()
    );
    assert!(
        took >= Duration::from_millis(900),
        "answered after {took:?}"
    );

    // Twenty at once: four are checked (and wait), the rest are turned
    // away at once with 429, their token not even looked at.
    let results = futures_join_all((0..20).map(|_| attempt("wrong"))).await;
    let waited = results.iter().filter(|(r, _)| r.status == 401).count();
    let turned_away: Vec<_> = results.iter().filter(|(r, _)| r.status == 429).collect();
    assert_eq!(waited + turned_away.len(), 20);
    assert!((1..=4).contains(&waited), "{waited} were checked");
    assert!(turned_away
        .iter()
        .all(|(_, took)| *took < Duration::from_millis(900)));

    // Malformed sign-ins are 4xx, not 500s.
    for (ct, body, status) in [
        ("text/plain", r#"{"token":"x"}"#, 415),
        ("application/json", "{nope", 400),
        ("application/json", r#"{"token":"x","extra":1}"#, 400),
        ("application/json", &"x".repeat(5000), 413),
    ] {
        let r = send(Method::POST, &url, &[("content-type", ct)], body).await;
        assert_eq!(r.status, status, "{ct} {}", &body[..body.len().min(30)]);
    }
    let r = send(Method::PUT, &url, &[], "").await;
    assert_eq!(r.status, 405);
    // After the rush, the right token still gets in.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sign_in(&gw).await;
}

/// `join_all` without a futures dependency: spawn each, await in order.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn forged_and_oversized_cookies_are_refused() {
    let origin = Origin::start(|_, _| cached("x")).await;
    let gw = gateway(&origin).await;
    let (cookie, _) = sign_in(&gw).await;
    let long = format!("kvgate_session={}", "a".repeat(10_000));
    for c in [
        "kvgate_session=forged".to_string(),
        format!("{cookie}x"),
        long,
        "kvgate_session=".into(),
    ] {
        let r = get_with(&admin_url(&gw, "/entries"), &[("cookie", &c)]).await;
        assert_eq!(r.status, 401, "{}", &c[..c.len().min(40)]);
    }
}

#[tokio::test]
async fn stats_reports_results_latency_and_budget() {
    let origin = Origin::start(|_, _| cached("hello")).await;
    let gw = gateway(&origin).await;
    get(&gw.url("/s")).await;
    get(&gw.url("/s")).await;
    get(&gw.url("/s")).await;
    let auth = format!("Bearer {TOKEN}");
    let r = get_with(&admin_url(&gw, "/stats"), &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200);
    let s = json_of(&r);
    assert_eq!(s["requests"]["HIT"], 2);
    assert_eq!(s["requests"]["MISS"], 1);
    assert_eq!(s["requests_total"], 3);
    assert!((s["hit_ratio"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(s["origin"]["requests"], 1);
    assert_eq!(s["origin"]["latency_count"], 1);
    // 18 bounds (100 µs to 60 s) and the last, open bucket.
    assert_eq!(s["origin"]["latency_buckets"].as_array().unwrap().len(), 19);
    assert_eq!(s["cache"]["entries"], 1);
    assert!(s["cache"]["bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        s["cache"]["max_bytes"].as_u64().unwrap(),
        kvgate::config::Config::default().cache.max_bytes as u64
    );
    assert_eq!(s["cache"]["version"], 1);
    assert!(s["time_ms"].as_u64().unwrap() > 0);
    let r = send(
        Method::POST,
        &admin_url(&gw, "/stats"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 405);
}
