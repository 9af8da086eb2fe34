//! The edge features over real HTTP: flags, identity, experiments (pure hash,
//! sticky across a weights change, cached apart per variant), preferences,
//! counters, the admin refusals, and durable state across `kill -9` of the
//! real binary.

mod common;
use common::*;
use http::Method;
use kvgate::config::Config;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::time::Duration;

const TOKEN: &str = "edge-test-admin-token-0123456789";
const EXP_HEADER: &str = "x-experiment-new-checkout";
const FLAGS_HEADER: &str = "x-feature-flags";
const PREFS_HEADER: &str = "x-user-preferences";
const DEFAULT_FLAGS: &str = r#"betafeatures=?0, newui=?0, theme="dark""#;
const VARIANTS: [&str; 3] = ["control", "variant_a", "variant_b"];

/// What makes the tests' own requests (from loopback) trusted to name their
/// user in X-User-Id, like an auth proxy on the same host.
const TRUST_LOOPBACK: &str = r#"trusted_from = ["127.0.0.0/8", "::1/128"]"#;

/// The `[edge]` section the tests share: loopback trusted for X-User-Id,
/// three flags, one experiment with weights `control / variant_a /
/// variant_b`, preference defaults.
fn edge_toml(weights: (u32, u32, u32)) -> String {
    let (c, a, b) = weights;
    format!(
        r#"
[edge.identity]
{TRUST_LOOPBACK}
[edge.flags.newUI]
default = false
[edge.flags.betaFeatures]
default = false
[edge.flags.theme]
default = "dark"
[edge.experiments.new-checkout]
variants = {{ control = {c}, variant_a = {a}, variant_b = {b} }}
[edge.preferences]
max_bytes = 512
defaults = {{ theme = "light", language = "en" }}
"#
    )
}

/// A full config snippet: admin listener with [`TOKEN`], memory state, edge.
fn memory_toml(extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n[state]\nbackend = \"memory\"\n{}{extra}",
        edge_toml((50, 25, 25))
    )
}

fn admin_url(gw: &Gateway, path: &str) -> String {
    let addr = gw.running.admin_addr.expect("admin listener runs");
    format!("http://{addr}{path}")
}

/// An admin request with the given `Authorization` header (or none).
async fn admin_as(gw: &Gateway, auth: Option<&str>, method: Method, path: &str, body: &str) -> Got {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = auth {
        headers.push(("authorization", a));
    }
    send(method, &admin_url(gw, path), &headers, body).await
}

/// An authenticated admin request.
async fn admin(gw: &Gateway, method: Method, path: &str, body: &str) -> Got {
    gw.admin(TOKEN, method, path, body).await
}

fn json_of(g: &Got) -> Value {
    serde_json::from_slice(&g.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", g.text()))
}

async fn admin_json(gw: &Gateway, method: Method, path: &str, body: &str) -> Value {
    let r = admin(gw, method.clone(), path, body).await;
    assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
    json_of(&r)
}

/// A request to the main listener as `user` (X-User-Id).
async fn get_as(gw: &Gateway, path: &str, user: &str) -> Got {
    get_with(&gw.url(path), &[("x-user-id", user)]).await
}

/// The single value of `name` in the one request the origin saw for `path`.
fn seen_header(origin: &Origin, path: &str, name: &str) -> String {
    let seen = origin.requests(path);
    let last = seen
        .last()
        .unwrap_or_else(|| panic!("origin saw no request for {path}"));
    let values: Vec<&str> = last
        .headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ASCII header"))
        .collect();
    assert_eq!(
        values.len(),
        1,
        "origin saw {name} {values:?} for {path} (want exactly one)"
    );
    values[0].to_string()
}

/// The variant the admin API says `user` would be injected now.
async fn view_variant(gw: &Gateway, user: &str) -> String {
    let u = admin_json(gw, Method::GET, &format!("/users/{user}"), "").await;
    u["experiments"]["new-checkout"]["variant"]
        .as_str()
        .unwrap_or_else(|| panic!("no variant for {user}: {u}"))
        .to_string()
}

/// Polls `check` every 10 ms for up to 5 s.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    common::eventually(what, 500, Duration::from_millis(10), check).await
}

/// Waits until the stored (sticky) assignment of `user` is `variant`.
async fn assigned_becomes(gw: &Gateway, user: &str, variant: &str) {
    let path = format!("/users/{user}");
    eventually(&format!("{user} assigned {variant}"), || async {
        let u = admin_json(gw, Method::GET, &path, "").await;
        u["experiments"]["new-checkout"]["assigned"] == variant
    })
    .await;
}

/// Exposure counts per variant from `GET /experiments/new-checkout`.
async fn exposures(gw: &Gateway) -> BTreeMap<String, u64> {
    let e = admin_json(gw, Method::GET, "/experiments/new-checkout", "").await;
    e["variants"]
        .as_array()
        .expect("variants array")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().expect("name").to_string(),
                v["exposures"].as_u64().expect("exposures"),
            )
        })
        .collect()
}

fn tally_variants<'a>(seen: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, u64> {
    let mut m: BTreeMap<String, u64> = VARIANTS.iter().map(|v| (v.to_string(), 0)).collect();
    for v in seen {
        *m.get_mut(v.as_str())
            .unwrap_or_else(|| panic!("unknown variant {v:?}")) += 1;
    }
    m
}

// 1 ------------------------------------------------------------------------

#[tokio::test]
async fn flags_reach_the_origin_and_overrides_apply_per_user() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let gw = Gateway::from_toml(&origin, &memory_toml("")).await;

    get_as(&gw, "/f1", "alice").await;
    assert_eq!(seen_header(&origin, "/f1", FLAGS_HEADER), DEFAULT_FLAGS);

    let r = admin(&gw, Method::PUT, "/flags/newUI/users/alice", "true").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json_of(&r)["value"], true);

    get_as(&gw, "/f2", "alice").await;
    assert_eq!(
        seen_header(&origin, "/f2", FLAGS_HEADER),
        r#"betafeatures=?0, newui, theme="dark""#
    );
    get_as(&gw, "/f3", "bob").await;
    assert_eq!(seen_header(&origin, "/f3", FLAGS_HEADER), DEFAULT_FLAGS);

    // what the admin API says alice gets matches what the origin saw
    let u = admin_json(&gw, Method::GET, "/users/alice", "").await;
    assert_eq!(u["flags"]["newUI"]["value"], true);
    assert_eq!(u["flags"]["newUI"]["source"], "override");
    assert_eq!(u["flags"]["betaFeatures"]["source"], "default");
    assert_eq!(
        u["headers"][FLAGS_HEADER],
        r#"betafeatures=?0, newui, theme="dark""#
    );

    // a string flag, overridden for bob only
    let r = admin(&gw, Method::PUT, "/flags/theme/users/bob", "\"light\"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    get_as(&gw, "/f4", "bob").await;
    assert_eq!(
        seen_header(&origin, "/f4", FLAGS_HEADER),
        r#"betafeatures=?0, newui=?0, theme="light""#
    );

    let r = admin_json(&gw, Method::DELETE, "/flags/newUI/users/alice", "").await;
    assert_eq!(r["deleted"], true);
    get_as(&gw, "/f5", "alice").await;
    assert_eq!(seen_header(&origin, "/f5", FLAGS_HEADER), DEFAULT_FLAGS);
    let r = admin_json(&gw, Method::DELETE, "/flags/newUI/users/alice", "").await;
    assert_eq!(r["deleted"], false, "the override is gone");
}

// 2 ------------------------------------------------------------------------

#[tokio::test]
async fn clients_cannot_spoof_injected_headers() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let gw = Gateway::from_toml(&origin, &memory_toml("")).await;
    let real_variant = view_variant(&gw, "mallory").await;
    let fake_variant = VARIANTS
        .iter()
        .find(|v| **v != real_variant)
        .expect("another variant");

    get_with(
        &gw.url("/s"),
        &[
            ("x-user-id", "mallory"),
            ("x-feature-flags", "newui, betafeatures, theme=\"evil\""),
            ("X-Experiment-new-checkout", fake_variant),
            ("x-experiment-new-checkout", "also-fake"),
            ("X-Experiment-unconfigured", "x"),
            ("x-user-preferences", r#"{"theme":"evil"}"#),
        ],
    )
    .await;
    assert_eq!(seen_header(&origin, "/s", FLAGS_HEADER), DEFAULT_FLAGS);
    assert_eq!(seen_header(&origin, "/s", EXP_HEADER), real_variant);
    assert_eq!(
        seen_header(&origin, "/s", PREFS_HEADER),
        r#"{"language":"en","theme":"light"}"#
    );
    let seen = &origin.requests("/s")[0];
    assert!(
        seen.headers.get("x-experiment-unconfigured").is_none(),
        "an X-Experiment-* header no experiment injects still reached the origin"
    );
}

/// A client must not be able to make kvgate drop its own headers either:
/// naming them in `Connection` turns them into hop-by-hop fields, which the
/// forwarding step removes *after* the edge injected them. The cache still
/// keys the response under the injected variant (Vary), so whatever the
/// origin answers without the header is served to that whole variant.
#[tokio::test]
async fn clients_cannot_strip_injected_headers_through_connection() {
    let origin = Origin::start(|s, _| {
        let v = s
            .headers
            .get(EXP_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        Reply::ok(&format!("variant={v}"))
            .header("cache-control", "max-age=60")
            .header("vary", "X-Experiment-new-checkout")
    })
    .await;
    let gw = Gateway::from_toml(&origin, &memory_toml("")).await;
    let variant = view_variant(&gw, "mallory").await;
    let r = get_with(
        &gw.url("/c"),
        &[
            ("x-user-id", "mallory"),
            (
                "connection",
                "X-Feature-Flags, X-Experiment-new-checkout, X-User-Preferences",
            ),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    // nobody else in that variant may be served a response made without it
    let mut victim = None;
    for i in 0..200 {
        let u = format!("victim-{i}");
        if view_variant(&gw, &u).await == variant {
            victim = Some(u);
            break;
        }
    }
    let victim = victim.expect("a user in mallory's variant");
    let r = get_as(&gw, "/c", &victim).await;
    assert_eq!(
        r.text(),
        format!("variant={variant}"),
        "{victim} ({variant}) was served an entry stored under {variant} that the origin made \
         without the variant header (X-Cache {})",
        r.x_cache()
    );
    let seen = &origin.requests("/c")[0];
    for name in [FLAGS_HEADER, EXP_HEADER, PREFS_HEADER] {
        assert!(
            seen.headers.get(name).is_some(),
            "a client's Connection header removed the injected {name} before the origin saw it \
             (origin saw {:?})",
            seen.headers
        );
    }
}

// 3 ------------------------------------------------------------------------

/// The `kvgate_uid` value (`<uuid>.<mac>`) of a response's single
/// Set-Cookie, checked for form.
fn issued_uid(r: &Got) -> String {
    let cookies: Vec<&str> = r
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ASCII"))
        .collect();
    assert_eq!(cookies.len(), 1, "want one Set-Cookie, got {cookies:?}");
    let cookie = cookies[0];
    let (pair, attrs) = cookie.split_once(';').expect("attributes");
    let uid = pair
        .strip_prefix("kvgate_uid=")
        .unwrap_or_else(|| panic!("not a kvgate_uid cookie: {cookie}"));
    let (id, mac) = uid.rsplit_once('.').expect("<id>.<mac>");
    let parsed = uuid::Uuid::parse_str(id).expect("a UUID");
    assert_eq!(parsed.get_version_num(), 4, "{uid}");
    assert_eq!(mac.len(), 43, "base64url of 32 bytes: {uid}");
    let attrs: Vec<&str> = attrs.split(';').map(str::trim).collect();
    for want in ["Path=/", "HttpOnly", "SameSite=Lax"] {
        assert!(attrs.contains(&want), "{want} missing in {cookie}");
    }
    let max_age: u64 = attrs
        .iter()
        .find_map(|a| a.strip_prefix("Max-Age="))
        .expect("Max-Age")
        .parse()
        .expect("number");
    assert!(max_age >= 30 * 86_400, "Max-Age {max_age} is not long");
    assert!(!attrs.contains(&"Secure"), "Secure over plain HTTP");
    uid.to_string()
}

/// The user id the edge (and the admin API) knows a cookie value as.
fn anon_user(uid: &str) -> String {
    let (id, _) = uid.rsplit_once('.').expect("<id>.<mac>");
    format!("anon:{id}")
}

#[tokio::test]
async fn anonymous_identity_is_issued_once_and_sticks() {
    // cacheable, varied per variant: HITs must not carry anyone's cookie
    let origin = Origin::start(|s, _| {
        let v = s
            .headers
            .get(EXP_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        Reply::ok(&format!("variant={v}"))
            .header("cache-control", "max-age=60")
            .header("vary", "X-Experiment-new-checkout")
    })
    .await;
    let gw = Gateway::from_toml(&origin, &memory_toml("")).await;

    let first = get(&gw.url("/i")).await;
    assert_eq!(first.status, 200);
    let uid = issued_uid(&first);
    let variant = first
        .text()
        .strip_prefix("variant=")
        .expect("variant body")
        .to_string();
    assert!(VARIANTS.contains(&variant.as_str()), "{variant}");
    let user = anon_user(&uid);
    assert_eq!(view_variant(&gw, &user).await, variant);

    // a second newcomer gets a different id, also with a cookie (HIT or not)
    let second = get(&gw.url("/i")).await;
    assert_ne!(issued_uid(&second), uid);

    let cookie = format!("kvgate_uid={uid}");
    for i in 0..5 {
        let r = get_with(
            &gw.url("/i"),
            &[("cookie", &cookie), ("accept", "text/plain")],
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(
            r.headers.get("set-cookie").is_none(),
            "request {i} with the cookie got a new Set-Cookie"
        );
        assert_eq!(r.text(), format!("variant={variant}"), "request {i}");
    }
    let p = format!("/i-own-{uid}");
    get_with(&gw.url(&p), &[("cookie", &cookie)]).await;
    assert_eq!(seen_header(&origin, &p, EXP_HEADER), variant);
    // the returning id is stored as a sticky assignment
    assigned_becomes(&gw, &user, &variant).await;

    // X-User-Id wins over the cookie
    let r = admin(&gw, Method::PUT, "/flags/newUI/users/carol", "true").await;
    assert_eq!(r.status, 200);
    let r = get_with(
        &gw.url("/who"),
        &[("x-user-id", "carol"), ("cookie", &cookie)],
    )
    .await;
    assert!(r.headers.get("set-cookie").is_none());
    assert_eq!(
        seen_header(&origin, "/who", FLAGS_HEADER),
        r#"betafeatures=?0, newui, theme="dark""#
    );
    assert_eq!(
        seen_header(&origin, "/who", EXP_HEADER),
        view_variant(&gw, "carol").await
    );
    assert_eq!(
        seen_header(&origin, "/who", "x-user-id"),
        "carol",
        "the user id reaches the origin"
    );
}

// 4 ------------------------------------------------------------------------

#[tokio::test]
async fn variants_are_a_pure_hash_the_same_everywhere_and_exposures_are_exact() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let gw1 = Gateway::from_toml(&origin, &memory_toml("")).await;
    let gw2 = Gateway::from_toml(&origin, &memory_toml("")).await;
    let users: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let mut on_gw1 = Vec::new();
    for u in &users {
        let mut mine = BTreeSet::new();
        for n in 0..3 {
            let p = format!("/g1/{u}/{n}");
            get_as(&gw1, &p, u).await;
            let v = seen_header(&origin, &p, EXP_HEADER);
            on_gw1.push(v.clone());
            mine.insert(v);
        }
        assert_eq!(mine.len(), 1, "{u} moved between variants: {mine:?}");
        let p = format!("/g2/{u}");
        get_as(&gw2, &p, u).await;
        let v1 = mine.into_iter().next().expect("one variant");
        assert_eq!(
            seen_header(&origin, &p, EXP_HEADER),
            v1,
            "{u} differs between two gateways with the same config"
        );
    }
    let counts = tally_variants(&on_gw1);
    assert!(
        counts.values().all(|&n| n > 0),
        "60 users should land in every variant: {counts:?}"
    );
    assert_eq!(exposures(&gw1).await, counts, "gw1 exposures");
    let e = admin_json(&gw1, Method::GET, "/experiments/new-checkout", "").await;
    assert_eq!(e["exposures"], 180);
    assert_eq!(e["header"], EXP_HEADER);
    let weights: Vec<(String, f64)> = e["variants"]
        .as_array()
        .expect("variants")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().expect("name").into(),
                v["weight"].as_f64().expect("w"),
            )
        })
        .collect();
    assert_eq!(
        weights,
        vec![
            ("control".into(), 50.0),
            ("variant_a".into(), 25.0),
            ("variant_b".into(), 25.0)
        ]
    );
    assert_eq!(
        exposures(&gw2).await.values().sum::<u64>(),
        60,
        "gw2 counts its own requests only"
    );
}

fn durable_toml(state: &Path, weights: (u32, u32, u32)) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n[state]\nbackend = \"durable\"\npath = {:?}\n{}",
        state.display().to_string(),
        edge_toml(weights)
    )
}

#[tokio::test]
async fn sticky_assignments_survive_a_weights_change_and_can_be_reset() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.redb");
    let users: Vec<String> = (0..200).map(|i| format!("sticky-{i}")).collect();

    let a = Gateway::from_toml(&origin, &durable_toml(&state, (50, 25, 25))).await;
    let mut before = BTreeMap::new();
    for u in &users {
        let p = format!("/a/{u}");
        get_as(&a, &p, u).await;
        before.insert(u.clone(), seen_header(&origin, &p, EXP_HEADER));
    }
    assert_eq!(exposures(&a).await, tally_variants(before.values()));
    a.stop().await;

    let b = Gateway::from_toml(&origin, &durable_toml(&state, (10, 45, 45))).await;
    let mut moved_by_weights = Vec::new();
    for u in &users {
        let p = format!("/b/{u}");
        get_as(&b, &p, u).await;
        assert_eq!(
            seen_header(&origin, &p, EXP_HEADER),
            before[u],
            "{u} changed variant after the weights changed"
        );
        let view = admin_json(&b, Method::GET, &format!("/users/{u}"), "").await;
        let exp = &view["experiments"]["new-checkout"];
        assert_eq!(exp["assigned"], before[u].as_str(), "{u}: {exp}");
        if exp["would_be"] != before[u].as_str() {
            moved_by_weights.push((u.clone(), exp["would_be"].as_str().expect("s").to_string()));
        }
    }
    // 40 of 100 control users' buckets now fall to variant_a / variant_b
    assert!(
        moved_by_weights.len() >= 20,
        "the new weights should move many users without stickiness: {}",
        moved_by_weights.len()
    );

    let (user, fresh) = &moved_by_weights[0];
    let r = admin_json(
        &b,
        Method::DELETE,
        &format!("/experiments/new-checkout/users/{user}"),
        "",
    )
    .await;
    assert_eq!(r["deleted"], true);
    let p = format!("/b/{user}/after-reset");
    get_as(&b, &p, user).await;
    assert_eq!(&seen_header(&origin, &p, EXP_HEADER), fresh);
    assigned_becomes(&b, user, fresh).await;
    let p = format!("/b/{user}/again");
    get_as(&b, &p, user).await;
    assert_eq!(&seen_header(&origin, &p, EXP_HEADER), fresh);
    b.stop().await;
}

// 5 ------------------------------------------------------------------------

#[tokio::test]
async fn each_variant_is_cached_apart_and_shared_within() {
    let origin = Origin::start(|s, _| {
        let v = s
            .headers
            .get(EXP_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        Reply::ok(&format!("checkout for {v}"))
            .header("cache-control", "max-age=60")
            .header("vary", "X-Experiment-new-checkout")
    })
    .await;
    let gw = Gateway::from_toml(&origin, &memory_toml("")).await;

    // two users per variant
    let mut by_variant: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..200 {
        let u = format!("shopper-{i}");
        let v = view_variant(&gw, &u).await;
        let list = by_variant.entry(v).or_default();
        if list.len() < 2 {
            list.push(u);
        }
        if by_variant.len() == 3 && by_variant.values().all(|l| l.len() == 2) {
            break;
        }
    }
    assert_eq!(by_variant.len(), 3, "{by_variant:?}");

    for (variant, users) in &by_variant {
        let want = format!("checkout for {variant}");
        let r = get_as(&gw, "/checkout", &users[0]).await;
        assert_eq!((r.text(), r.x_cache()), (want.clone(), "MISS"), "{users:?}");
        let r = get_as(&gw, "/checkout", &users[1]).await;
        assert_eq!(
            (r.text(), r.x_cache()),
            (want.clone(), "HIT"),
            "second user of {variant} should share the first one's entry"
        );
    }
    // everyone again: all HITs with their own variant's body
    for (variant, users) in &by_variant {
        for u in users {
            let r = get_as(&gw, "/checkout", u).await;
            assert_eq!(
                (r.text(), r.x_cache()),
                (format!("checkout for {variant}"), "HIT"),
                "{u}"
            );
        }
    }
    assert_eq!(
        origin.count("/checkout"),
        3,
        "one origin request per variant"
    );
    let seen: BTreeSet<String> = origin
        .requests("/checkout")
        .iter()
        .map(|s| {
            s.headers
                .get(EXP_HEADER)
                .and_then(|v| v.to_str().ok())
                .expect("variant header")
                .to_string()
        })
        .collect();
    assert_eq!(seen.len(), 3, "{seen:?}");
}

// 6 ------------------------------------------------------------------------

#[tokio::test]
async fn preferences_merge_reach_the_origin_and_refusals_change_nothing() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let gw = Gateway::from_toml(&origin, &memory_toml("")).await;
    let prefs = "/users/alice/preferences";
    let defaults = json!({"theme": "light", "language": "en"});

    assert_eq!(admin_json(&gw, Method::GET, prefs, "").await, defaults);
    get_as(&gw, "/p0", "alice").await;
    assert_eq!(
        seen_header(&origin, "/p0", PREFS_HEADER),
        r#"{"language":"en","theme":"light"}"#
    );

    let dark = json!({"theme": "dark", "language": "en"});
    assert_eq!(
        admin_json(&gw, Method::PATCH, prefs, r#"{"theme":"dark"}"#).await,
        dark
    );
    assert_eq!(admin_json(&gw, Method::GET, prefs, "").await, dark);
    get_as(&gw, "/p1", "alice").await;
    let header = seen_header(&origin, "/p1", PREFS_HEADER);
    assert_eq!(header, r#"{"language":"en","theme":"dark"}"#);
    // bob is untouched
    get_as(&gw, "/p1b", "bob").await;
    assert_eq!(
        seen_header(&origin, "/p1b", PREFS_HEADER),
        r#"{"language":"en","theme":"light"}"#
    );

    let big = format!(r#"{{"bio": "{}"}}"#, "x".repeat(600));
    let refused = [
        ("malformed", "{\"theme\":"),
        ("not JSON", "dark"),
        ("empty", ""),
        ("array", r#"["theme","light"]"#),
        ("string", r#""light""#),
        ("null", "null"),
        ("wrong type", r#"{"theme": 5}"#),
        ("one wrong of two", r#"{"language": "fr", "theme": false}"#),
        ("oversized", big.as_str()),
    ];
    for (what, body) in refused {
        let r = admin(&gw, Method::PATCH, prefs, body).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert!(
            json_of(&r)["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {}",
            r.text()
        );
        assert_eq!(
            admin_json(&gw, Method::GET, prefs, "").await,
            dark,
            "{what} changed the preferences"
        );
    }
    get_as(&gw, "/p2", "alice").await;
    assert_eq!(seen_header(&origin, "/p2", PREFS_HEADER), header);

    // a key without a default merges in; null brings a default back
    let r = admin_json(
        &gw,
        Method::PATCH,
        prefs,
        r#"{"fontSize": 14, "theme": null}"#,
    )
    .await;
    assert_eq!(
        r,
        json!({"theme": "light", "language": "en", "fontSize": 14})
    );
    let u = admin_json(&gw, Method::GET, "/users/alice", "").await;
    assert_eq!(u["preferences"], r);
}

// 7 ------------------------------------------------------------------------

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The real binary; killed (SIGKILL) when dropped.
struct Process {
    child: std::process::Child,
    listen: String,
    admin: String,
}

impl Process {
    async fn start(config: &Path, origin: &str, log: &Path) -> Process {
        let (listen, admin) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .arg("--config")
            .arg(config)
            .args(["--listen", &listen, "--origin", origin])
            .args(["--admin-listen", &admin, "--log-level", "warn"])
            .env("KVGATE_ADMIN_TOKEN", TOKEN)
            .env_remove("RUST_LOG")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("kvgate starts");
        let mut p = Process {
            child,
            listen,
            admin,
        };
        let health = format!("http://{}/healthz", p.admin);
        for _ in 0..500 {
            if let Ok(r) = try_get(&health).await {
                if r.status == 200 {
                    return p;
                }
            }
            if let Some(status) = p.child.try_wait().expect("try_wait") {
                panic!("kvgate exited with {status} before it was ready");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("kvgate did not become ready");
    }

    async fn admin(&self, method: Method, path: &str, body: &str) -> Got {
        let auth = format!("Bearer {TOKEN}");
        send(
            method,
            &format!("http://{}{path}", self.admin),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await
    }

    async fn user_view(&self, user: &str) -> Value {
        let r = self.admin(Method::GET, &format!("/users/{user}"), "").await;
        assert_eq!(r.status, 200, "{}", r.text());
        json_of(&r)
    }

    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn state_survives_kill_9_of_the_real_binary() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kvgate.toml");
    let state = dir.path().join("state.redb");
    let log = dir.path().join("kvgate.log");
    std::fs::write(
        &config,
        format!(
            "[log]\naccess = false\n[state]\nbackend = \"durable\"\npath = {:?}\n{}",
            state.display().to_string(),
            edge_toml((50, 25, 25))
        ),
    )
    .expect("write config");

    let p = Process::start(&config, &origin.url(), &log).await;
    let r = p
        .admin(Method::PUT, "/flags/newUI/users/dana", "true")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = p
        .admin(
            Method::PATCH,
            "/users/dana/preferences",
            r#"{"theme":"dark"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // a request stores dana's sticky assignment in the background
    let got = get_with(&format!("http://{}/k1", p.listen), &[("x-user-id", "dana")]).await;
    assert_eq!(got.status, 200);
    let variant = seen_header(&origin, "/k1", EXP_HEADER);
    for _ in 0..500 {
        if p.user_view("dana").await["experiments"]["new-checkout"]["assigned"] == variant.as_str()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = p.user_view("dana").await;
    assert_eq!(before["experiments"]["new-checkout"]["assigned"], variant);
    p.kill9();

    let p = Process::start(&config, &origin.url(), &log).await;
    let after = p.user_view("dana").await;
    assert_eq!(
        after["flags"]["newUI"],
        json!({"value": true, "source": "override", "description": ""}),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(
        after["preferences"],
        json!({"theme": "dark", "language": "en"})
    );
    assert_eq!(after["experiments"]["new-checkout"]["assigned"], variant);
    assert_eq!(after["headers"], before["headers"]);
    // and the origin sees it all on the next request
    get_with(&format!("http://{}/k2", p.listen), &[("x-user-id", "dana")]).await;
    assert_eq!(
        seen_header(&origin, "/k2", FLAGS_HEADER),
        r#"betafeatures=?0, newui, theme="dark""#
    );
    assert_eq!(
        seen_header(&origin, "/k2", PREFS_HEADER),
        r#"{"language":"en","theme":"dark"}"#
    );
    assert_eq!(seen_header(&origin, "/k2", EXP_HEADER), variant);
    p.kill9();
}

// 8 ------------------------------------------------------------------------

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse()
        .expect("a number")
}

#[tokio::test]
async fn counters_and_metrics_are_exact() {
    let origin = Origin::start(|_, _| Reply::ok("c").header("cache-control", "max-age=60")).await;
    let routes = "[[route]]\nname = \"api\"\nprefix = \"/api/\"\n";
    let gw = Gateway::from_toml(&origin, &memory_toml(routes)).await;

    // (path, user, method): cache hits and a POST count as requests too
    let plan: Vec<(&str, &str, Method)> = vec![
        ("/api/x", "u1", Method::GET),
        ("/api/x", "u2", Method::GET),
        ("/api/x", "u3", Method::GET),
        ("/api/y", "u4", Method::GET),
        ("/api/post", "u1", Method::POST),
        ("/home", "u2", Method::GET),
        ("/home", "u5", Method::GET),
        ("/home", "u6", Method::GET),
    ];
    let mut expected_exposures: BTreeMap<String, u64> =
        VARIANTS.iter().map(|v| (v.to_string(), 0)).collect();
    for (path, user, method) in &plan {
        let body = if *method == Method::POST { "b" } else { "" };
        let r = send(method.clone(), &gw.url(path), &[("x-user-id", user)], body).await;
        assert_eq!(r.status, 200, "{method} {path} as {user}: {}", r.text());
        *expected_exposures
            .get_mut(&view_variant(&gw, user).await)
            .expect("known variant") += 1;
    }
    assert!(origin.total() < plan.len(), "some requests were HITs");

    let c = admin_json(&gw, Method::GET, "/counters", "").await;
    assert_eq!(
        c,
        json!({
            "requests": {"api": 5, "default": 3},
            "flag_evaluations": {"betaFeatures": 8, "newUI": 8, "theme": 8},
            "exposures": {"new-checkout": expected_exposures},
            "dropped_writes": 0,
        })
    );
    assert_eq!(exposures(&gw).await, expected_exposures);

    let t = admin(&gw, Method::GET, "/metrics", "").await.text();
    assert_eq!(
        metric(&t, "kvgate_edge_route_requests_total{route=\"api\"}"),
        5.0
    );
    assert_eq!(
        metric(&t, "kvgate_edge_route_requests_total{route=\"default\"}"),
        3.0
    );
    for flag in ["newUI", "betaFeatures", "theme"] {
        assert_eq!(
            metric(
                &t,
                &format!("kvgate_edge_flag_evaluations_total{{flag=\"{flag}\"}}")
            ),
            8.0,
            "{flag}"
        );
    }
    for (variant, n) in &expected_exposures {
        assert_eq!(
            metric(
                &t,
                &format!(
                    "kvgate_edge_exposures_total{{experiment=\"new-checkout\",variant=\"{variant}\"}}"
                )
            ),
            *n as f64,
            "{variant}"
        );
    }
    // reading counters and users through the admin API counted nothing
    let again = admin_json(&gw, Method::GET, "/counters", "").await;
    assert_eq!(again, c);
}

// 9 ------------------------------------------------------------------------

#[tokio::test]
async fn admin_edge_refusals_change_nothing() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let gw = Gateway::from_toml(&origin, &memory_toml("")).await;
    let r = admin(&gw, Method::PUT, "/flags/newUI/users/alice", "true").await;
    assert_eq!(r.status, 200);
    let r = admin(
        &gw,
        Method::PATCH,
        "/users/alice/preferences",
        r#"{"theme":"dark"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    get_as(&gw, "/r", "alice").await;
    let variant = view_variant(&gw, "alice").await;
    assigned_becomes(&gw, "alice", &variant).await;
    let before = admin_json(&gw, Method::GET, "/users/alice", "").await;
    let counters = admin_json(&gw, Method::GET, "/counters", "").await;

    let wrong_case = format!("bearer{TOKEN}");
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer "),
        Some(TOKEN),
        Some(wrong_case.as_str()),
        Some("Basic YWRtaW46YWRtaW4="),
    ] {
        for (method, path, body) in [
            (Method::PUT, "/flags/newUI/users/alice", "false"),
            (Method::DELETE, "/flags/newUI/users/alice", ""),
            (Method::PUT, "/flags/newUI/users/bob", "true"),
            (
                Method::PATCH,
                "/users/alice/preferences",
                r#"{"theme":"light"}"#,
            ),
            (Method::DELETE, "/experiments/new-checkout/users/alice", ""),
            (Method::GET, "/users/alice", ""),
            (Method::GET, "/users/alice/preferences", ""),
            (Method::GET, "/experiments/new-checkout", ""),
            (Method::GET, "/experiments/nope", ""),
            (Method::GET, "/counters", ""),
            (Method::PUT, "/flags/nope/users/alice", "true"),
        ] {
            let r = admin_as(&gw, auth, method.clone(), path, body).await;
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {}", r.text());
            assert!(r.header("www-authenticate").starts_with("Bearer"));
        }
    }
    assert_eq!(
        admin_json(&gw, Method::GET, "/users/alice", "").await,
        before,
        "an unauthenticated request changed alice"
    );
    let bob = admin_json(&gw, Method::GET, "/users/bob", "").await;
    assert_eq!(bob["flags"]["newUI"]["source"], "default");

    // unknown names
    for (method, path, body) in [
        (Method::PUT, "/flags/nope/users/alice", "true"),
        (Method::DELETE, "/flags/nope/users/alice", ""),
        (Method::GET, "/experiments/nope", ""),
        (Method::DELETE, "/experiments/nope/users/alice", ""),
    ] {
        let r = admin(&gw, method.clone(), path, body).await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
        assert!(json_of(&r)["error"].is_string());
    }

    // values of the wrong type for the flag
    for (path, body) in [
        ("/flags/newUI/users/bob", r#""yes""#),
        ("/flags/newUI/users/bob", "1"),
        ("/flags/newUI/users/bob", "null"),
        ("/flags/newUI/users/bob", "[true]"),
        ("/flags/newUI/users/bob", r#"{"value": true}"#),
        ("/flags/newUI/users/bob", "tru"),
        ("/flags/newUI/users/bob", ""),
        ("/flags/theme/users/bob", "true"),
        ("/flags/theme/users/bob", "5"),
        ("/flags/theme/users/bob", "\"caf\u{e9}\""),
    ] {
        let r = admin(&gw, Method::PUT, path, body).await;
        assert_eq!(r.status, 400, "PUT {path} {body}: {}", r.text());
        assert!(json_of(&r)["error"].is_string());
    }
    let bob = admin_json(&gw, Method::GET, "/users/bob", "").await;
    assert_eq!(bob["flags"]["newUI"]["source"], "default");
    assert_eq!(bob["flags"]["theme"]["source"], "default");
    get_as(&gw, "/r-bob", "bob").await;
    assert_eq!(seen_header(&origin, "/r-bob", FLAGS_HEADER), DEFAULT_FLAGS);

    // everything about alice is as before
    assert_eq!(
        admin_json(&gw, Method::GET, "/users/alice", "").await,
        before
    );
    // refused requests counted no edge traffic (only /r-bob was added)
    let after = admin_json(&gw, Method::GET, "/counters", "").await;
    assert_eq!(
        after["requests"]["default"],
        counters["requests"]["default"].as_u64().expect("n") + 1
    );
}

// Found on the way ---------------------------------------------------------

/// Not an edge feature, found while writing these tests: a GET that carries
/// a body goes down the cache path, whose origin request has an empty body
/// but keeps the client's `Content-Length`. The origin then waits for bytes
/// that never come (here until the first-byte timeout; on a reused
/// connection it would read the next request's bytes as this body).
#[tokio::test]
async fn a_get_with_a_body_does_not_leave_the_origin_waiting() {
    let origin = Origin::start(|_, _| Reply::ok("c").header("cache-control", "max-age=60")).await;
    let parsed = Config::parse(&memory_toml(""), "t").expect("parses");
    let gw = Gateway::start(&origin.url(), |c| {
        c.edge = parsed.edge;
        c.state = parsed.state;
        c.origin.first_byte_timeout_ms = 2000;
    })
    .await;
    let r = send(Method::GET, &gw.url("/body"), &[("x-user-id", "u1")], "b").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "c");
}

// Identity hardening -----------------------------------------------------------

/// A `Got`'s Set-Cookie headers.
fn set_cookies(r: &Got) -> Vec<String> {
    r.headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ASCII").to_string())
        .collect()
}

#[tokio::test]
async fn a_forged_cookie_or_an_untrusted_header_gets_nothing_of_alice() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    // No trusted_from: X-User-Id is never believed, even from loopback.
    let untrusting = memory_toml("").replace(TRUST_LOOPBACK, "");
    let gw = Gateway::from_toml(&origin, &untrusting).await;
    let r = admin(&gw, Method::PUT, "/flags/newUI/users/alice", "true").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin(
        &gw,
        Method::PATCH,
        "/users/alice/preferences",
        r#"{"theme":"dark"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let forged = get_with(&gw.url("/forged"), &[("cookie", "kvgate_uid=alice")]).await;
    assert_eq!(seen_header(&origin, "/forged", FLAGS_HEADER), DEFAULT_FLAGS);
    assert_eq!(
        seen_header(&origin, "/forged", PREFS_HEADER),
        r#"{"language":"en","theme":"light"}"#
    );
    let fresh = issued_uid(&forged);
    assert_ne!(fresh, "alice", "the forged cookie is replaced");

    let claimed = get_as(&gw, "/claimed", "alice").await;
    assert_eq!(
        seen_header(&origin, "/claimed", FLAGS_HEADER),
        DEFAULT_FLAGS
    );
    issued_uid(&claimed);
    gw.stop().await;

    // The same header from a trusted peer names alice.
    let gw = Gateway::from_toml(&origin, &memory_toml("")).await;
    let r = admin(&gw, Method::PUT, "/flags/newUI/users/alice", "true").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get_as(&gw, "/trusted", "alice").await;
    assert!(set_cookies(&r).is_empty());
    assert_eq!(
        seen_header(&origin, "/trusted", FLAGS_HEADER),
        r#"betafeatures=?0, newui, theme="dark""#
    );
    // ... but never an anonymous user's id.
    let r = get_as(
        &gw,
        "/claims-anon",
        "anon:00000000-0000-4000-8000-000000000000",
    )
    .await;
    issued_uid(&r);
}

#[tokio::test]
async fn signed_ids_hold_across_requests_and_a_restart_and_tampering_is_refused() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.redb");
    let gw = Gateway::from_toml(&origin, &durable_toml(&state, (50, 25, 25))).await;

    let first = get(&gw.url("/s1")).await;
    let uid = issued_uid(&first);
    let variant = seen_header(&origin, "/s1", EXP_HEADER);
    let cookie = format!("kvgate_uid={uid}");
    let again = get_with(&gw.url("/s2"), &[("cookie", &cookie)]).await;
    assert!(set_cookies(&again).is_empty(), "the id was kept");
    assert_eq!(seen_header(&origin, "/s2", EXP_HEADER), variant);
    assigned_becomes(&gw, &anon_user(&uid), &variant).await;

    // One character of the mac changed: a new id, not this one.
    let (id, mac) = uid.rsplit_once('.').expect("<id>.<mac>");
    let swapped = if mac.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("kvgate_uid={id}.{swapped}{}", &mac[1..]);
    let r = get_with(&gw.url("/s3"), &[("cookie", &tampered)]).await;
    let replaced = issued_uid(&r);
    assert_ne!(replaced, uid);
    assert_ne!(anon_user(&replaced), anon_user(&uid));
    gw.stop().await;

    // A restart on the same state keeps the generated secret: same id.
    let gw = Gateway::from_toml(&origin, &durable_toml(&state, (50, 25, 25))).await;
    let r = get_with(&gw.url("/s4"), &[("cookie", &cookie)]).await;
    assert!(set_cookies(&r).is_empty(), "the id survived the restart");
    assert_eq!(seen_header(&origin, "/s4", EXP_HEADER), variant);
    gw.stop().await;
}

#[tokio::test]
async fn cookie_secure_sets_secure_over_plain_http() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let toml = memory_toml("").replace(
        TRUST_LOOPBACK,
        &format!("{TRUST_LOOPBACK}\ncookie_secure = true"),
    );
    let gw = Gateway::from_toml(&origin, &toml).await;
    let r = get(&gw.url("/sec")).await;
    let cookies = set_cookies(&r);
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    assert!(cookies[0].ends_with("; Secure"), "{}", cookies[0]);
}

#[tokio::test]
async fn an_invalid_trusted_network_is_a_config_error_naming_the_key() {
    let toml = memory_toml("").replace(
        TRUST_LOOPBACK,
        r#"trusted_from = ["127.0.0.0/8", "10.0.0.0/40"]"#,
    );
    let Err(err) = Config::parse(&toml, "t") else {
        panic!("an invalid network was accepted");
    };
    let text = err.to_string();
    assert!(text.contains("edge.identity.trusted_from[1]"), "{text}");
}

// Edge writes at shutdown ------------------------------------------------------

#[tokio::test]
async fn shutdown_commits_the_queued_edge_writes() {
    let origin = Origin::start(|_, _| Reply::no_store("ok")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.redb");
    // A commit window far longer than the test: every write is still
    // queued when the gateway is told to stop.
    let toml = durable_toml(&state, (50, 25, 25)).replace(
        "[edge.identity]",
        "[edge]\nwrite_flush_ms = 60000\n[edge.identity]",
    );
    let gw = Gateway::from_toml(&origin, &toml).await;
    let users: Vec<String> = (0..60).map(|i| format!("quit-{i}")).collect();
    let mut requests = tokio::task::JoinSet::new();
    for u in &users {
        let (url, u) = (gw.url(&format!("/q/{u}")), u.clone());
        requests.spawn(async move { get_with(&url, &[("x-user-id", u.as_str())]).await });
    }
    while let Some(r) = requests.join_next().await {
        assert_eq!(r.expect("request task").status, 200);
    }
    // Stopped without settling first: the shutdown path must do it.
    let Gateway { running } = gw;
    let queued = running.gateway.edge.as_ref().map(|e| e.pending_writes());
    // Per user: the sticky assignment and the exposure record (a 2xx).
    assert_eq!(
        queued,
        Some(2 * users.len()),
        "the writes wait in the queue"
    );
    running.stop.send(true).expect("gateway still running");
    running.task.await.expect("gateway task");
    let edge = running.gateway.edge.as_ref().expect("edge on");
    assert_eq!(edge.pending_writes(), 0, "writes left behind at shutdown");
    drop(running.gateway);

    let kv = kvgate::kv::DurableKv::open(&state).expect("state file released");
    use kvgate::kv::Kv;
    for u in &users {
        let entry = kv
            .get(&format!("production:exp:new-checkout:user:{u}"))
            .await
            .expect("read")
            .unwrap_or_else(|| panic!("{u}'s assignment was lost at shutdown"));
        let seen = seen_header(&origin, &format!("/q/{u}"), EXP_HEADER);
        assert_eq!(entry.value, seen.as_str());
    }
}
