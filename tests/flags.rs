//! Flags and experiments over real HTTP: definitions created and changed
//! through the admin API reach the origin, targeting by header, cookie and
//! query, rollouts that only grow, refusals with their reason, the audit
//! log, exposures once per user and day, and results from real traffic.

mod common;
use common::*;
use http::Method;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

const TOKEN: &str = "flags-test-admin-token-0123456789";
const FLAGS: &str = "x-feature-flags";

fn toml(extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n[state]\nbackend = \"memory\"\n\
         [edge]\n{extra}\n[edge.identity]\ntrusted_from = [\"127.0.0.0/8\"]\n"
    )
}

async fn admin(gw: &Gateway, method: Method, path: &str, body: &str) -> Got {
    gw.admin(TOKEN, method, path, body).await
}

async fn admin_ok(gw: &Gateway, method: Method, path: &str, body: &str) -> Value {
    let r = admin(gw, method.clone(), path, body).await;
    assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
    serde_json::from_slice(&r.body).expect("JSON")
}

/// The X-Feature-Flags the origin saw on the last request for `path`.
fn seen(origin: &Origin, path: &str, name: &str) -> Option<String> {
    origin
        .requests(path)
        .last()
        .and_then(|s| s.headers.get(name))
        .map(|v| v.to_str().expect("ASCII").to_string())
}

#[tokio::test]
async fn flags_created_through_the_api_target_by_header_cookie_and_query() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let gw = Gateway::from_toml(&origin, &toml("")).await;
    assert_eq!(
        admin_ok(&gw, Method::GET, "/flags", "").await,
        json!({"flags": {}})
    );

    admin_ok(
        &gw,
        Method::PUT,
        "/segments/pro",
        r#"{"conditions": [{"attribute": "header:x-plan", "op": "in", "value": ["pro", "team"]}]}"#,
    )
    .await;
    let flag = json!({
        "type": "string",
        "default": "classic",
        "rules": [
            {"segment": "pro", "value": "pro-ui"},
            {"conditions": [{"attribute": "cookie:beta", "op": "equals", "value": "yes"}], "value": "beta-ui"},
            {"conditions": [{"attribute": "query:preview", "op": "exists"}], "value": "preview-ui"}
        ]
    });
    let put = admin_ok(&gw, Method::PUT, "/flags/checkoutUI", &flag.to_string()).await;
    assert_eq!(put["action"], "put");
    admin_ok(
        &gw,
        Method::PUT,
        "/flags/limits",
        r#"{"type": "json", "default": {"max": 3}}"#,
    )
    .await;

    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 5] = [
        ("/a", vec![], "classic"),
        ("/b", vec![("x-plan", "team")], "pro-ui"),
        ("/c", vec![("cookie", "x=1; beta=yes")], "beta-ui"),
        ("/d?preview=1", vec![], "preview-ui"),
        // The first matching rule wins.
        (
            "/e",
            vec![("x-plan", "pro"), ("cookie", "beta=yes")],
            "pro-ui",
        ),
    ];
    for (path, headers, want) in &cases {
        let mut h = headers.clone();
        h.push(("x-user-id", "alice"));
        let r = get_with(&gw.url(path), &h).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            seen(&origin, path, FLAGS).as_deref(),
            Some(format!(r#"checkoutui="{want}", limits="{{\"max\":3}}""#).as_str()),
            "{path} {headers:?}"
        );
    }

    // A change reaches the origin at once (this instance swaps on write;
    // others poll every 500 ms), without a restart.
    admin_ok(
        &gw,
        Method::PATCH,
        "/flags/checkoutUI",
        r#"{"default": "modern"}"#,
    )
    .await;
    get_with(&gw.url("/f"), &[("x-user-id", "alice")]).await;
    assert_eq!(
        seen(&origin, "/f", FLAGS).as_deref(),
        Some(r#"checkoutui="modern", limits="{\"max\":3}""#)
    );
    let listed = admin_ok(&gw, Method::GET, "/flags", "").await;
    assert_eq!(listed["flags"]["checkoutUI"]["default"], "modern");
    assert_eq!(
        listed["flags"]["checkoutUI"]["rules"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // A segment in use cannot go; a flag can.
    let r = admin(&gw, Method::DELETE, "/segments/pro", "").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("no segment named"), "{}", r.text());
    admin_ok(&gw, Method::DELETE, "/flags/limits", "").await;
    get_with(&gw.url("/g"), &[("x-user-id", "alice")]).await;
    assert_eq!(
        seen(&origin, "/g", FLAGS).as_deref(),
        Some(r#"checkoutui="modern""#)
    );
}

#[tokio::test]
async fn invalid_changes_are_refused_with_their_reason_and_change_nothing() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let gw = Gateway::from_toml(&origin, &toml("")).await;
    admin_ok(&gw, Method::PUT, "/flags/on", r#"{"default": true}"#).await;
    let before = admin_ok(&gw, Method::GET, "/flags", "").await;
    let cases = [
        (
            "/flags/x",
            r#"{"default": true, "rules": [{"conditions": [{"attribute": "planet", "op": "equals", "value": "x"}], "value": false}]}"#,
            "unknown attribute",
        ),
        (
            "/flags/x",
            r#"{"default": true, "rules": [{"value": "yes"}]}"#,
            "boolean flag cannot take",
        ),
        (
            "/flags/x",
            r#"{"default": [1, 2]}"#,
            "a boolean, a string or a number",
        ),
        (
            "/flags/x",
            &format!(
                r#"{{"type": "json", "default": {{"blob": "{}"}}}}"#,
                "x".repeat(2000)
            ),
            "more than the limit",
        ),
        (
            "/flags/x",
            r#"{"default": true, "colour": 1}"#,
            "unknown field",
        ),
        (
            "/experiments/e",
            r#"{"variants": {"a": 50, "b": 40}}"#,
            "must sum to 100",
        ),
        (
            "/flags/x",
            r#"{"default": true, "rules": [{"conditions": [{"attribute": "path", "op": "matches", "value": "(a{1000}){1000}"}], "value": false}]}"#,
            "invalid pattern",
        ),
        (
            "/flags/x",
            r#"{"default": true, "rules": [{"value": false, "percent": 120}]}"#,
            "within 0..=100",
        ),
    ];
    for (path, body, reason) in cases {
        let r = admin(&gw, Method::PUT, path, body).await;
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        assert!(
            r.text().contains(reason),
            "{path}: {} lacks {reason}",
            r.text()
        );
    }
    assert_eq!(admin_ok(&gw, Method::GET, "/flags", "").await, before);
    let r = admin(&gw, Method::PATCH, "/flags/nope", r#"{"default": false}"#).await;
    assert_eq!(r.status, 404);
    let r = admin(&gw, Method::PUT, "/flags/on", "").await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn a_rollout_raised_from_10_to_50_percent_keeps_everyone_who_was_in() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let gw = Gateway::from_toml(&origin, &toml("")).await;
    let rollout =
        |p: u32| format!(r#"{{"default": false, "rules": [{{"value": true, "percent": {p}}}]}}"#);
    admin_ok(&gw, Method::PUT, "/flags/newCheckout", &rollout(10)).await;
    let users: Vec<String> = (0..400).map(|i| format!("roll-{i}")).collect();
    let on_at = |phase: &str| {
        let origin = &origin;
        let phase = phase.to_string();
        let users = users.clone();
        let gw = &gw;
        async move {
            let mut on = Vec::new();
            for u in &users {
                let p = format!("/{phase}/{u}");
                get_with(&gw.url(&p), &[("x-user-id", u)]).await;
                let v = seen(origin, &p, FLAGS).expect("flags header");
                assert!(v == "newcheckout" || v == "newcheckout=?0", "{v}");
                if v == "newcheckout" {
                    on.push(u.clone());
                }
            }
            on
        }
    };
    let at_10 = on_at("ten").await;
    admin_ok(
        &gw,
        Method::PATCH,
        "/flags/newCheckout",
        r#"{"rules": [{"value": true, "percent": 50}]}"#,
    )
    .await;
    let at_50 = on_at("fifty").await;
    for u in &at_10 {
        assert!(at_50.contains(u), "{u} was in at 10 % and out at 50 %");
    }
    // 10 % and 50 % of 400, within 4 standard deviations.
    assert!((16..=64).contains(&at_10.len()), "{}", at_10.len());
    assert!((160..=240).contains(&at_50.len()), "{}", at_50.len());

    // Each change is in the audit log, with before, after and the token's name.
    let audit = admin_ok(&gw, Method::GET, "/audit", "").await;
    let entries = audit["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 2, "{audit}");
    assert_eq!(entries[0]["action"], "put");
    assert_eq!(entries[0]["before"], Value::Null);
    assert_eq!(entries[1]["action"], "patch");
    assert_eq!(entries[1]["before"]["rules"][0]["percent"], 10.0);
    assert_eq!(entries[1]["after"]["rules"][0]["percent"], 50.0);
    for e in entries {
        assert_eq!(e["actor"], "admin");
        assert_eq!(e["kind"], "flag");
        assert_eq!(e["name"], "newCheckout");
        assert!(e["at_ms"].as_u64().expect("time") > 1_700_000_000_000);
    }
}

#[tokio::test]
async fn definitions_survive_a_restart_and_the_store_wins_over_the_config() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.redb");
    let text = toml("[edge.flags.seeded]\ndefault = false\n").replace(
        "backend = \"memory\"",
        &format!(
            "backend = \"durable\"\npath = {:?}",
            state.display().to_string()
        ),
    );
    let gw = Gateway::from_toml(&origin, &text).await;
    get_with(&gw.url("/1"), &[("x-user-id", "u")]).await;
    assert_eq!(seen(&origin, "/1", FLAGS).as_deref(), Some("seeded=?0"));
    admin_ok(&gw, Method::PATCH, "/flags/seeded", r#"{"default": true}"#).await;
    admin_ok(&gw, Method::PUT, "/flags/added", r#"{"default": 7}"#).await;
    if let Some(edge) = &gw.running.gateway.edge {
        edge.settle().await;
    }
    let Gateway { running } = gw;
    running.stop.send(true).expect("running");
    running.task.await.expect("stopped");
    drop(running.gateway);

    let gw = Gateway::from_toml(&origin, &text).await;
    get_with(&gw.url("/2"), &[("x-user-id", "u")]).await;
    assert_eq!(
        seen(&origin, "/2", FLAGS).as_deref(),
        Some("added=7, seeded")
    );
}

/// Deterministic "truth": whether a user converts, with a known rate per variant.
fn converts(user: usize, variant: &str) -> bool {
    let rate_per_mille = if variant == "control" { 100 } else { 200 };
    (user * 7919 % 1000) < rate_per_mille
}

#[tokio::test]
async fn exposures_once_per_user_and_day_and_results_from_real_traffic() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("exposures.jsonl");
    let gw = Gateway::from_toml(
        &origin,
        &toml(&format!(
            "[edge.exposures]\npath = {:?}\n",
            file.display().to_string()
        )),
    )
    .await;
    admin_ok(
        &gw,
        Method::PUT,
        "/experiments/checkout",
        r#"{"variants": {"control": 50, "treatment": 50}, "path_prefix": "/shop",
            "goals": [{"method": "POST", "path": "/checkout/complete"}]}"#,
    )
    .await;

    let users = 2000usize;
    let mut truth: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let base = gw.url("");
    for i in 0..users {
        let base = base.clone();
        tasks.spawn(async move {
            let user = format!("sim-{i}");
            let h = [("x-user-id", user.as_str())];
            // Exposed twice on one day: counted once.
            get_with(&format!("{base}/shop/{i}"), &h).await;
            get_with(&format!("{base}/shop/{i}/again"), &h).await;
            (i, user)
        });
        if tasks.len() >= 32 {
            let _ = tasks.join_next().await;
        }
    }
    while tasks.join_next().await.is_some() {}
    for i in 0..users {
        let variant = seen(&origin, &format!("/shop/{i}"), "x-experiment-checkout")
            .expect("variant injected");
        let t = truth.entry(variant.clone()).or_default();
        t.0 += 1;
        if converts(i, &variant) {
            t.1 += 1;
            let user = format!("sim-{i}");
            for _ in 0..2 {
                let r = send(
                    Method::POST,
                    &gw.url("/checkout/complete"),
                    &[("x-user-id", &user)],
                    "{}",
                )
                .await;
                assert_eq!(r.status, 200);
            }
        }
    }
    // A goal reached by someone never exposed is not a conversion of any variant.
    send(
        Method::POST,
        &gw.url("/checkout/complete"),
        &[("x-user-id", "outsider")],
        "",
    )
    .await;
    if let Some(edge) = &gw.running.gateway.edge {
        edge.settle().await;
    }

    let results = admin_ok(&gw, Method::GET, "/experiments/checkout/results", "").await;
    eprintln!("{results}");
    let variants = results["variants"].as_array().expect("variants");
    assert_eq!(variants.len(), 2);
    for v in variants {
        let name = v["name"].as_str().expect("name");
        let (n, x) = truth[name];
        assert_eq!(v["users"], n, "{name}: {results}");
        assert_eq!(v["conversions"], x, "{name}: {results}");
        let rate = v["rate"].as_f64().expect("rate");
        let (lo, hi) = (
            v["rate_interval"][0].as_f64().unwrap(),
            v["rate_interval"][1].as_f64().unwrap(),
        );
        assert!(lo < rate && rate < hi);
    }
    let treatment = variants
        .iter()
        .find(|v| v["name"] == "treatment")
        .expect("treatment");
    let cmp = &treatment["vs_control"];
    // 10 % against 20 % over ~1000 users each: far beyond chance.
    assert_eq!(cmp["significant"], true, "{results}");
    assert!(cmp["p_value"].as_f64().unwrap() < 1e-6, "{results}");
    let d = cmp["difference"].as_f64().unwrap();
    assert!((0.07..0.13).contains(&d), "{d}");
    assert!(cmp["difference_interval"][0].as_f64().unwrap() > 0.0);
    assert!(results["summary"][0]
        .as_str()
        .unwrap()
        .contains("significant at the 0.05 level"));

    // Metrics count each user once; the file holds one exposure per user.
    let view = admin_ok(&gw, Method::GET, "/experiments/checkout", "").await;
    let exposed: u64 = view["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["exposed_users"].as_u64().unwrap())
        .sum();
    assert_eq!(exposed, users as u64);
    let injected: u64 = view["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["exposures"].as_u64().unwrap())
        .sum();
    assert_eq!(
        injected,
        2 * users as u64,
        "requests the variant was injected on"
    );
    let metrics = admin(&gw, Method::GET, "/metrics", "").await.text();
    for (name, (n, _)) in &truth {
        let series = format!(
            "kvgate_edge_exposed_users_total{{experiment=\"checkout\",variant=\"{name}\"}} {n}"
        );
        assert!(metrics.contains(&series), "no {series}");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let exposures = text
            .lines()
            .filter(|l| l.contains("\"event\":\"exposure\""))
            .count();
        if exposures == users || tokio::time::Instant::now() > deadline {
            assert_eq!(exposures, users, "one exposure line per user");
            let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
            for key in ["time_ms", "experiment", "variant", "user_id", "route"] {
                assert!(!first[key].is_null(), "{key} in {first}");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_anonymous_user_who_logs_in_keeps_the_variant() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let gw = Gateway::from_toml(
        &origin,
        &toml("").replace(
            "[edge.identity]\n",
            "[edge.identity]\nalias_header = \"x-anonymous-id\"\n",
        ),
    )
    .await;
    admin_ok(
        &gw,
        Method::PUT,
        "/experiments/hero",
        r#"{"variants": {"a": 50, "b": 50}}"#,
    )
    .await;
    let mut kept = 0;
    for i in 0..40 {
        // An anonymous visit: a signed id in the kvgate_uid cookie.
        let first = get(&gw.url(&format!("/anon/{i}"))).await;
        let cookie = first
            .headers
            .get("set-cookie")
            .expect("cookie")
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let again = get_with(&gw.url(&format!("/anon2/{i}")), &[("cookie", &cookie)]).await;
        assert_eq!(again.status, 200);
        let variant = seen(&origin, &format!("/anon2/{i}"), "x-experiment-hero").expect("variant");
        if let Some(edge) = &gw.running.gateway.edge {
            edge.settle().await;
        }
        let anon = format!(
            "anon:{}",
            cookie
                .trim_start_matches("kvgate_uid=")
                .rsplit_once('.')
                .unwrap()
                .0
        );
        // Logged in: the auth proxy names the user and the anonymous id.
        let user = format!("member-{i}");
        let p = format!("/in/{i}");
        get_with(
            &gw.url(&p),
            &[("x-user-id", &user), ("x-anonymous-id", &anon)],
        )
        .await;
        assert_eq!(
            seen(&origin, &p, "x-experiment-hero").as_deref(),
            Some(variant.as_str()),
            "{user}"
        );
        if let Some(edge) = &gw.running.gateway.edge {
            edge.settle().await;
        }
        // And later without the alias header: the copied assignment holds.
        let p = format!("/later/{i}");
        get_with(&gw.url(&p), &[("x-user-id", &user)]).await;
        assert_eq!(
            seen(&origin, &p, "x-experiment-hero").as_deref(),
            Some(variant.as_str()),
            "{user}"
        );
        kept += 1;
    }
    assert_eq!(kept, 40);
    // The admin call does the same for ids the proxy did not name.
    let r = admin(
        &gw,
        Method::PUT,
        "/users/alice/alias",
        r#"{"user_id": "bob"}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
}

#[tokio::test]
async fn a_paused_experiment_withholds_its_header_and_resumes_with_the_same_variants() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let gw = Gateway::from_toml(&origin, &toml("")).await;
    admin_ok(
        &gw,
        Method::PUT,
        "/experiments/hero",
        r#"{"variants": {"a": 50, "b": 50}}"#,
    )
    .await;
    let visit = |phase: &'static str, i: usize| {
        let gw = &gw;
        let origin = &origin;
        async move {
            let p = format!("/{phase}/{i}");
            let r = get_with(&gw.url(&p), &[("x-user-id", &format!("user-{i}"))]).await;
            assert_eq!(r.status, 200);
            seen(origin, &p, "x-experiment-hero")
        }
    };
    let mut before = Vec::new();
    for i in 0..10 {
        before.push(visit("before", i).await.expect("a variant while running"));
    }
    if let Some(edge) = &gw.running.gateway.edge {
        edge.settle().await;
    }

    let r = admin(
        &gw,
        Method::PATCH,
        "/experiments/hero",
        r#"{"status": "halted"}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("halted"), "{}", r.text());
    admin_ok(
        &gw,
        Method::PATCH,
        "/experiments/hero",
        r#"{"status": "paused"}"#,
    )
    .await;
    for i in 0..10 {
        assert_eq!(visit("paused", i).await, None, "user-{i} while paused");
    }
    let results = admin_ok(&gw, Method::GET, "/experiments/hero/results", "").await;
    assert_eq!(results["status"], "paused");
    let exposed: u64 = results["daily"]
        .as_array()
        .expect("daily")
        .iter()
        .map(|row| row["exposures"].as_u64().unwrap())
        .sum();
    assert_eq!(exposed, 10, "paused visits are no exposures: {results}");

    admin_ok(
        &gw,
        Method::PATCH,
        "/experiments/hero",
        r#"{"status": "running"}"#,
    )
    .await;
    for (i, variant) in before.iter().enumerate() {
        assert_eq!(
            visit("resumed", i).await.as_ref(),
            Some(variant),
            "user-{i}"
        );
    }
    let audit = admin_ok(&gw, Method::GET, "/audit", "").await;
    let statuses = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "hero" && e["action"] == "patch")
        .count();
    assert_eq!(statuses, 2, "pause and resume are audited: {audit}");
}
