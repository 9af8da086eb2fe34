//! Users managing their own preferences on the main listener.

mod common;
use common::*;
use http::Method;

#[tokio::test]
async fn users_read_and_patch_their_own_preferences() {
    let origin = Origin::start(|_, _| Reply::ok("ok")).await;
    let gw = Gateway::start(&origin.url(), |c| {
        let parsed = kvgate::config::Config::parse(
            "[state]\nbackend = \"memory\"\n[edge.identity]\ntrusted_from = [\"127.0.0.0/8\", \"::1/128\"]\n[edge.preferences]\nself_service_path = \"/_prefs\"\nmax_bytes = 200\ndefaults = { theme = \"light\", lang = \"en\" }\n",
            "t",
        )
        .expect("config");
        c.edge = parsed.edge;
        c.state = parsed.state;
    })
    .await;
    let alice = [("x-user-id", "alice")];
    let r = get_with(&gw.url("/_prefs"), &alice).await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["theme"], "light");
    assert_eq!(r.header("cache-control"), "private, no-store");

    let r = send(
        Method::PATCH,
        &gw.url("/_prefs"),
        &alice,
        r#"{"theme":"dark"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // the origin now sees alice's merged document; bob keeps the defaults
    get_with(&gw.url("/page"), &alice).await;
    get_with(&gw.url("/page"), &[("x-user-id", "bob")]).await;
    let seen = origin.requests("/page");
    let prefs = |i: usize| {
        seen[i]
            .headers
            .get("x-user-preferences")
            .map(|v| v.to_str().unwrap_or("").to_string())
    };
    assert!(
        prefs(0).is_some_and(|p| p.contains("\"theme\":\"dark\"") && p.contains("\"lang\":\"en\"")),
        "{:?}",
        prefs(0)
    );
    assert!(
        prefs(1).is_some_and(|p| p.contains("\"theme\":\"light\"")),
        "{:?}",
        prefs(1)
    );

    // refusals change nothing
    for bad in ["{not json", "[1,2]", r#"{"theme": 5}"#] {
        let r = send(Method::PATCH, &gw.url("/_prefs"), &alice, bad).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    let huge = format!(r#"{{"theme":"{}"}}"#, "x".repeat(500));
    let r = send(Method::PATCH, &gw.url("/_prefs"), &alice, &huge).await;
    assert!(r.status == 400 || r.status == 413, "{}", r.status);
    let r = send(Method::DELETE, &gw.url("/_prefs"), &alice, "").await;
    assert_eq!(r.status, 405);
    let v: serde_json::Value =
        serde_json::from_slice(&get_with(&gw.url("/_prefs"), &alice).await.body).expect("json");
    assert_eq!(v["theme"], "dark");
    assert_eq!(origin.count("/_prefs"), 0, "answered by the gateway itself");
}

/// Before anonymous ids were signed, `Cookie: kvgate_uid=alice` read and
/// patched alice's document. Now it names a fresh anonymous user.
#[tokio::test]
async fn a_forged_cookie_cannot_read_or_patch_another_users_preferences() {
    let origin = Origin::start(|_, _| Reply::ok("ok")).await;
    let gw = Gateway::start(&origin.url(), |c| {
        let parsed = kvgate::config::Config::parse(
            "[state]\nbackend = \"memory\"\n[edge.identity]\ntrusted_from = [\"127.0.0.0/8\"]\n[edge.preferences]\nself_service_path = \"/_prefs\"\ndefaults = { theme = \"light\" }\n",
            "t",
        )
        .expect("config");
        c.edge = parsed.edge;
        c.state = parsed.state;
    })
    .await;
    let r = send(
        Method::PATCH,
        &gw.url("/_prefs"),
        &[("x-user-id", "alice")],
        r#"{"theme":"dark"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let forged = [("cookie", "kvgate_uid=alice")];
    let r = get_with(&gw.url("/_prefs"), &forged).await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["theme"], "light", "alice's document leaked");
    let cookie = r.header("set-cookie");
    assert!(
        cookie.starts_with("kvgate_uid=") && !cookie.starts_with("kvgate_uid=alice;"),
        "{cookie}"
    );
    let r = send(
        Method::PATCH,
        &gw.url("/_prefs"),
        &forged,
        r#"{"theme":"pwned"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(
        &get_with(&gw.url("/_prefs"), &[("x-user-id", "alice")])
            .await
            .body,
    )
    .expect("json");
    assert_eq!(v["theme"], "dark", "alice's document was changed");
}
