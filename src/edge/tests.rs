//! Tests of the request-path decisions and the admin operations.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicBool;

use http::header::COOKIE;
use http::StatusCode;
use serde_json::{json, Value};

use super::*;
use crate::kv::{DurableKv, KvFuture, ListPage, MemoryKv};

const CONFIG: &str = r#"
    environment = "production"

    [identity]
    cookie = "session_user"

    [flags.newUI]
    default = false
    description = "The redesigned UI"

    [flags.betaFeatures]
    default = false

    [flags.theme]
    default = "light"

    [flags.ratio]
    default = 0.25

    [experiments.new-checkout]
    variants = { control = 50, variant_a = 25, variant_b = 25 }
    path_prefix = "/checkout"

    [experiments.search]
    variants = { old = 1, new = 1 }
    traffic = 0.5
    salt = "search-2024"

    [preferences]
    defaults = { theme = "light", language = "en", notifications = true }
"#;

fn config() -> EdgeConfig {
    toml::from_str(CONFIG).unwrap()
}

fn memory_edge() -> (Arc<MemoryKv>, Edge) {
    let kv = Arc::new(MemoryKv::new());
    let edge = Edge::new(&config(), kv.clone()).unwrap();
    (kv, edge)
}

fn user(id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-user-id", HeaderValue::from_str(id).unwrap());
    h
}

fn injected<'d>(decision: &'d EdgeDecision, name: &str) -> Option<&'d str> {
    decision
        .inject
        .iter()
        .find(|(n, _)| n.as_str() == name)
        .map(|(_, v)| v.to_str().unwrap())
}

/// A store that fails every operation while `down` is set.
#[derive(Default)]
struct FlakyKv {
    inner: MemoryKv,
    down: AtomicBool,
}

impl FlakyKv {
    fn check(&self) -> Result<(), KvError> {
        if self.down.load(Ordering::SeqCst) {
            Err(KvError::Backend("connection refused".into()))
        } else {
            Ok(())
        }
    }
}

impl Kv for FlakyKv {
    fn get<'a>(&'a self, key: &'a str) -> KvFuture<'a, Option<KvEntry>> {
        Box::pin(async move {
            self.check()?;
            self.inner.get(key).await
        })
    }
    fn put<'a>(&'a self, key: &'a str, value: Bytes, opts: PutOptions) -> KvFuture<'a, ()> {
        Box::pin(async move {
            self.check()?;
            self.inner.put(key, value, opts).await
        })
    }
    fn delete<'a>(&'a self, key: &'a str) -> KvFuture<'a, bool> {
        Box::pin(async move {
            self.check()?;
            self.inner.delete(key).await
        })
    }
    fn list<'a>(
        &'a self,
        prefix: &'a str,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> KvFuture<'a, ListPage> {
        Box::pin(async move {
            self.check()?;
            self.inner.list(prefix, cursor, limit).await
        })
    }
}

#[tokio::test]
async fn new_visitor_gets_an_anonymous_id_defaults_and_no_stored_state() {
    let (kv, edge) = memory_edge();
    let d = edge.decide(&HeaderMap::new(), "/checkout", true).await;
    assert!(d.anonymous);
    assert!(uuid::Uuid::parse_str(&d.user_id).is_ok());
    let cookie = d.set_cookie.as_ref().unwrap().to_str().unwrap();
    assert_eq!(
        cookie,
        format!(
            "kvgate_uid={}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax; Secure",
            d.user_id
        )
    );
    assert_eq!(
        injected(&d, "x-feature-flags"),
        Some("betafeatures=?0, newui=?0, ratio=0.25, theme=\"light\"")
    );
    let variant = injected(&d, "x-experiment-new-checkout").unwrap();
    assert!(["control", "variant_a", "variant_b"].contains(&variant));
    assert_eq!(
        injected(&d, "x-user-preferences"),
        Some(r#"{"language":"en","notifications":true,"theme":"light"}"#)
    );
    edge.settle().await;
    assert_eq!(
        kv.len_including_expired(),
        0,
        "a fresh id must not write state"
    );
}

#[tokio::test]
async fn returning_anonymous_visitor_keeps_the_id_and_gets_a_sticky_assignment() {
    let (kv, edge) = memory_edge();
    let first = edge.decide(&HeaderMap::new(), "/checkout", false).await;
    assert!(!first
        .set_cookie
        .as_ref()
        .unwrap()
        .to_str()
        .unwrap()
        .contains("Secure"));
    let mut h = HeaderMap::new();
    h.insert(
        COOKIE,
        HeaderValue::from_str(&format!("kvgate_uid={}", first.user_id)).unwrap(),
    );
    let again = edge.decide(&h, "/checkout/pay", false).await;
    assert_eq!(again.user_id, first.user_id);
    assert!(again.anonymous);
    assert_eq!(again.set_cookie, None);
    assert_eq!(
        injected(&again, "x-experiment-new-checkout"),
        injected(&first, "x-experiment-new-checkout")
    );
    edge.settle().await;
    let stored = kv
        .get(&format!(
            "production:exp:new-checkout:user:{}",
            first.user_id
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.value,
        injected(&first, "x-experiment-new-checkout").unwrap()
    );
    let ttl = stored
        .expires_at
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(ttl > Duration::from_secs(29 * 86_400) && ttl <= Duration::from_secs(30 * 86_400));
    assert_eq!(stored.metadata, None);
}

#[tokio::test]
async fn identity_from_header_or_configured_cookie_is_not_anonymous() {
    let (_kv, edge) = memory_edge();
    let d = edge.decide(&user("alice"), "/", false).await;
    assert_eq!(
        (d.user_id.as_str(), d.anonymous, d.set_cookie.is_none()),
        ("alice", false, true)
    );
    let mut h = HeaderMap::new();
    h.insert(
        COOKIE,
        HeaderValue::from_static("kvgate_uid=anon; session_user=bob"),
    );
    let d = edge.decide(&h, "/", false).await;
    assert_eq!((d.user_id.as_str(), d.anonymous), ("bob", false));
    // A malformed id is ignored, never an error.
    let d = edge.decide(&user("bad id with spaces"), "/", false).await;
    assert!(d.anonymous && d.set_cookie.is_some());
}

#[tokio::test]
async fn strip_injected_removes_every_injected_header_and_nothing_else() {
    let (_kv, edge) = memory_edge();
    let mut h = HeaderMap::new();
    h.insert("x-feature-flags", HeaderValue::from_static("newui"));
    h.insert(
        "X-Experiment-new-checkout",
        HeaderValue::from_static("variant_a"),
    );
    h.append("x-experiment-unconfigured", HeaderValue::from_static("x"));
    h.append("x-experiment-unconfigured", HeaderValue::from_static("y"));
    h.insert("x-user-preferences", HeaderValue::from_static("{}"));
    h.insert("x-user-id", HeaderValue::from_static("alice"));
    h.insert("x-experimental", HeaderValue::from_static("keep"));
    edge.strip_injected(&mut h);
    let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(h.contains_key("x-user-id") && h.contains_key("x-experimental"));

    // apply() then writes the decision in, replacing, never appending.
    let d = edge.decide(&user("alice"), "/checkout", false).await;
    h.insert("x-feature-flags", HeaderValue::from_static("forged"));
    d.apply(&mut h);
    assert_eq!(h.get_all("x-feature-flags").iter().count(), 1);
    assert_eq!(
        h.get("x-feature-flags").unwrap(),
        injected(&d, "x-feature-flags").unwrap()
    );
    assert!(h.contains_key("x-experiment-new-checkout"));
}

#[tokio::test]
async fn flag_overrides_win_over_defaults_and_can_be_removed() {
    let (_kv, edge) = memory_edge();
    edge.set_flag_override("newUI", "alice", json!(true))
        .await
        .unwrap();
    edge.set_flag_override("theme", "alice", json!("dark \"mode\""))
        .await
        .unwrap();
    edge.set_flag_override("ratio", "alice", json!(2))
        .await
        .unwrap();
    let d = edge.decide(&user("alice"), "/", false).await;
    assert_eq!(
        injected(&d, "x-feature-flags"),
        Some(r#"betafeatures=?0, newui, ratio=2, theme="dark \"mode\"""#)
    );
    // Other users are untouched.
    let bob = edge.decide(&user("bob"), "/", false).await;
    assert_eq!(
        injected(&bob, "x-feature-flags"),
        Some("betafeatures=?0, newui=?0, ratio=0.25, theme=\"light\"")
    );

    let removed = edge.delete_flag_override("newUI", "alice").await.unwrap();
    assert_eq!(removed["deleted"], true);
    assert_eq!(
        edge.delete_flag_override("newUI", "alice").await.unwrap()["deleted"],
        false
    );
    let d = edge.decide(&user("alice"), "/", false).await;
    assert!(injected(&d, "x-feature-flags")
        .unwrap()
        .contains("newui=?0"));
    // Admin lookups accept the name in any case.
    edge.set_flag_override("NEWUI", "alice", json!(true))
        .await
        .unwrap();
    let view = edge.user_view("alice").await.unwrap();
    assert_eq!(
        view["flags"]["newUI"],
        json!({"value": true, "source": "override", "description": "The redesigned UI"})
    );
    assert_eq!(view["flags"]["ratio"]["value"], 2);
}

#[tokio::test]
async fn flag_override_refusals() {
    let (kv, edge) = memory_edge();
    let cases = [
        ("nope", "alice", json!(true), StatusCode::NOT_FOUND),
        ("newUI", "alice", json!("yes"), StatusCode::BAD_REQUEST),
        ("newUI", "alice", json!([true]), StatusCode::BAD_REQUEST),
        ("newUI", "alice", json!(null), StatusCode::BAD_REQUEST),
        ("theme", "alice", json!(1), StatusCode::BAD_REQUEST),
        (
            "theme",
            "alice",
            json!("caf\u{e9}"),
            StatusCode::BAD_REQUEST,
        ),
        ("ratio", "alice", json!(1e15), StatusCode::BAD_REQUEST),
        ("newUI", "", json!(true), StatusCode::BAD_REQUEST),
        ("newUI", "a b", json!(true), StatusCode::BAD_REQUEST),
    ];
    for (flag, id, value, status) in cases {
        let err = edge
            .set_flag_override(flag, id, value.clone())
            .await
            .unwrap_err();
        assert_eq!(err.status(), status, "{flag} {id:?} {value}: {err}");
        assert!(err.body()["error"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(kv.len_including_expired(), 0, "refusals store nothing");
    let err = edge
        .delete_flag_override("nope", "alice")
        .await
        .unwrap_err();
    assert_eq!(err.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn stale_override_of_a_changed_flag_type_falls_back_to_the_default() {
    let (kv, edge) = memory_edge();
    // As if `theme` had been a boolean flag when this override was written.
    kv.put(
        "production:flag:theme:user:alice",
        Bytes::from_static(b"true"),
        PutOptions::default(),
    )
    .await
    .unwrap();
    kv.put(
        "production:flag:newUI:user:alice",
        Bytes::from_static(b"not json"),
        PutOptions::default(),
    )
    .await
    .unwrap();
    let d = edge.decide(&user("alice"), "/", false).await;
    assert_eq!(
        injected(&d, "x-feature-flags"),
        Some("betafeatures=?0, newui=?0, ratio=0.25, theme=\"light\"")
    );
}

#[tokio::test]
async fn experiments_apply_by_path_prefix_and_count_exposures() {
    let (_kv, edge) = memory_edge();
    for (path, expected) in [
        ("/checkout", true),
        ("/checkout/pay", true),
        ("/checkouts", false),
        ("/", false),
    ] {
        let d = edge.decide(&user("alice"), path, false).await;
        assert_eq!(
            injected(&d, "x-experiment-new-checkout").is_some(),
            expected,
            "{path}"
        );
    }
    let view = edge.experiment_view("new-checkout").await.unwrap();
    assert_eq!(view["exposures"], 2);
    assert_eq!(view["traffic"], 1.0);
    assert_eq!(view["header"], "x-experiment-new-checkout");
    let variants = view["variants"].as_array().unwrap();
    let names: Vec<&str> = variants
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["control", "variant_a", "variant_b"]);
    assert_eq!(variants[0]["weight"], 50.0);
    assert_eq!(variants[0]["share"], 0.5);
    let counted: u64 = variants
        .iter()
        .map(|v| v["exposures"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, 2);
    let err = edge.experiment_view("missing").await.unwrap_err();
    assert_eq!(err.status(), StatusCode::NOT_FOUND);

    let counters = edge.counters().await.unwrap();
    assert_eq!(counters["flag_evaluations"]["newUI"], 4);
    assert_eq!(
        counters["exposures"]["new-checkout"],
        json!({
            "control": variants[0]["exposures"],
            "variant_a": variants[1]["exposures"],
            "variant_b": variants[2]["exposures"],
        })
    );
}

#[tokio::test]
async fn traffic_share_gates_entry_and_only_grows_with_it() {
    let mut cfg = config();
    let kv: Arc<dyn Kv> = Arc::new(MemoryKv::new());
    let users: Vec<String> = (0..20_000).map(|i| format!("u{i}")).collect();
    let entered = |edge: &Edge| -> Vec<bool> {
        let exp = edge.experiment("search").unwrap();
        users
            .iter()
            .map(|u| exp.buckets(u).0 < exp.traffic_cutoff)
            .collect()
    };
    let half = entered(&Edge::new(&cfg, kv.clone()).unwrap());
    let share = half.iter().filter(|e| **e).count() as f64 / users.len() as f64;
    assert!((share - 0.5).abs() < 0.015, "{share}");

    cfg.experiments.get_mut("search").unwrap().traffic = 0.8;
    let more = entered(&Edge::new(&cfg, kv.clone()).unwrap());
    assert!(
        half.iter().zip(&more).all(|(was, is)| !was || *is),
        "a traffic increase removed users"
    );

    cfg.experiments.get_mut("search").unwrap().traffic = 0.0;
    let edge = Edge::new(&cfg, kv).unwrap();
    let d = edge.decide(&user("u1"), "/", false).await;
    assert_eq!(injected(&d, "x-experiment-search"), None);
}

fn variant_shares(decisions: &[EdgeDecision]) -> HashMap<String, f64> {
    let mut counts: HashMap<String, f64> = HashMap::new();
    for d in decisions {
        let v = injected(d, "x-experiment-new-checkout").unwrap();
        *counts.entry(v.to_owned()).or_default() += 1.0;
    }
    counts
        .values_mut()
        .for_each(|c| *c /= decisions.len() as f64);
    counts
}

async fn decide_all(edge: &Edge, ids: impl Iterator<Item = String>) -> Vec<EdgeDecision> {
    let mut out = Vec::new();
    for id in ids {
        out.push(edge.decide(&user(&id), "/checkout", false).await);
    }
    out
}

#[tokio::test]
async fn hundred_thousand_users_split_within_one_point_of_the_weights() {
    let (_kv, edge) = memory_edge();
    let decisions = decide_all(&edge, (0..100_000).map(|i| format!("user-{i}"))).await;
    let shares = variant_shares(&decisions);
    for (variant, want) in [("control", 0.50), ("variant_a", 0.25), ("variant_b", 0.25)] {
        let got = shares[variant];
        assert!((got - want).abs() < 0.01, "{variant}: {got} vs {want}");
    }
    // The same id always lands in the same place, across Edge instances.
    let (_kv2, other) = memory_edge();
    for d in decisions.iter().step_by(997) {
        let again = other.decide(&user(&d.user_id), "/checkout", false).await;
        assert_eq!(
            injected(&again, "x-experiment-new-checkout"),
            injected(d, "x-experiment-new-checkout")
        );
    }
    edge.settle().await;
}

#[tokio::test]
async fn assigned_users_keep_their_variant_when_weights_change() {
    let kv: Arc<dyn Kv> = Arc::new(MemoryKv::new());
    let before = Edge::new(&config(), kv.clone()).unwrap();
    let old_ids = || (0..20_000).map(|i| format!("old-{i}"));
    let first = decide_all(&before, old_ids()).await;
    before.settle().await;

    let mut cfg = config();
    let variants = &mut cfg.experiments.get_mut("new-checkout").unwrap().variants;
    variants.insert("control".into(), 10.0);
    variants.insert("variant_a".into(), 45.0);
    variants.insert("variant_b".into(), 45.0);
    let after = Edge::new(&cfg, kv.clone()).unwrap();

    let second = decide_all(&after, old_ids()).await;
    let moved = first
        .iter()
        .zip(&second)
        .filter(|(a, b)| {
            injected(a, "x-experiment-new-checkout") != injected(b, "x-experiment-new-checkout")
        })
        .count();
    assert_eq!(moved, 0, "already-assigned users moved");

    // Without the sticky records a sizeable share would have moved.
    let fresh_kv: Arc<dyn Kv> = Arc::new(MemoryKv::new());
    let unsticky = Edge::new(&cfg, fresh_kv).unwrap();
    let would_move = decide_all(&unsticky, old_ids())
        .await
        .iter()
        .zip(&first)
        .filter(|(a, b)| {
            injected(a, "x-experiment-new-checkout") != injected(b, "x-experiment-new-checkout")
        })
        .count();
    assert!(would_move > 4_000, "{would_move}");

    let newcomers = decide_all(&after, (0..20_000).map(|i| format!("new-{i}"))).await;
    let shares = variant_shares(&newcomers);
    for (variant, want) in [("control", 0.10), ("variant_a", 0.45), ("variant_b", 0.45)] {
        let got = shares[variant];
        assert!((got - want).abs() < 0.01, "{variant}: {got} vs {want}");
    }
    after.settle().await;
}

#[tokio::test]
async fn assignment_to_a_removed_variant_is_replaced() {
    let (kv, edge) = memory_edge();
    kv.put(
        "production:exp:new-checkout:user:alice",
        Bytes::from_static(b"variant_gone"),
        PutOptions::ttl(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let d = edge.decide(&user("alice"), "/checkout", false).await;
    let variant = injected(&d, "x-experiment-new-checkout")
        .unwrap()
        .to_owned();
    assert_ne!(variant, "variant_gone");
    edge.settle().await;
    let stored = kv
        .get("production:exp:new-checkout:user:alice")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.value, variant);
}

#[tokio::test]
async fn reading_a_user_assigns_nothing_and_counts_nothing() {
    let (kv, edge) = memory_edge();
    let view = edge.user_view("carol").await.unwrap();
    let exp = &view["experiments"]["new-checkout"];
    assert_eq!(exp["assigned"], Value::Null);
    assert_eq!(exp["in_traffic"], true);
    let would_be = exp["would_be"].as_str().unwrap().to_owned();
    assert_eq!(exp["variant"], would_be.as_str());
    assert_eq!(view["preferences"]["theme"], "light");
    assert_eq!(
        view["headers"]["x-feature-flags"],
        "betafeatures=?0, newui=?0, ratio=0.25, theme=\"light\""
    );
    edge.settle().await;
    assert_eq!(kv.len_including_expired(), 0);
    assert_eq!(
        edge.experiment_view("new-checkout").await.unwrap()["exposures"],
        0
    );

    let d = edge.decide(&user("carol"), "/checkout", false).await;
    assert_eq!(
        injected(&d, "x-experiment-new-checkout"),
        Some(would_be.as_str())
    );
    edge.settle().await;
    let view = edge.user_view("carol").await.unwrap();
    assert_eq!(
        view["experiments"]["new-checkout"]["assigned"],
        would_be.as_str()
    );
    assert!(view["experiments"]["new-checkout"]["assigned_expires_at"].is_u64());
    assert_eq!(
        edge.user_view("bad id").await.unwrap_err().status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn reset_assignment_lets_the_current_weights_decide_again() {
    let kv: Arc<dyn Kv> = Arc::new(MemoryKv::new());
    let edge = Edge::new(&config(), kv.clone()).unwrap();
    kv.put(
        "production:exp:new-checkout:user:dave",
        Bytes::from_static(b"variant_b"),
        PutOptions::ttl(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let mut cfg = config();
    cfg.experiments.get_mut("new-checkout").unwrap().variants =
        [("control".to_owned(), 1.0), ("variant_b".to_owned(), 0.0)].into();
    let edge_after = Edge::new(&cfg, kv.clone()).unwrap();
    let d = edge_after.decide(&user("dave"), "/checkout", false).await;
    assert_eq!(injected(&d, "x-experiment-new-checkout"), Some("variant_b"));

    let reset = edge.reset_assignment("new-checkout", "dave").await.unwrap();
    assert_eq!(reset["deleted"], true);
    assert_eq!(
        edge.reset_assignment("new-checkout", "dave").await.unwrap()["deleted"],
        false
    );
    let d = edge_after.decide(&user("dave"), "/checkout", false).await;
    assert_eq!(injected(&d, "x-experiment-new-checkout"), Some("control"));
    edge_after.settle().await;
    assert_eq!(
        edge.reset_assignment("nope", "dave")
            .await
            .unwrap_err()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        edge.reset_assignment("new-checkout", "")
            .await
            .unwrap_err()
            .status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn kv_outage_falls_back_to_defaults_and_the_hash() {
    let flaky = Arc::new(FlakyKv::default());
    let edge = Edge::new(&config(), flaky.clone()).unwrap();
    edge.set_flag_override("newUI", "erin", json!(true))
        .await
        .unwrap();
    edge.patch_preferences("erin", json!({"theme": "dark"}))
        .await
        .unwrap();
    let healthy = edge.decide(&user("erin"), "/checkout", false).await;
    assert!(injected(&healthy, "x-feature-flags")
        .unwrap()
        .contains("newui,"));
    edge.settle().await;

    flaky.down.store(true, Ordering::SeqCst);
    let d = edge.decide(&user("erin"), "/checkout", false).await;
    assert_eq!(
        injected(&d, "x-feature-flags"),
        Some("betafeatures=?0, newui=?0, ratio=0.25, theme=\"light\"")
    );
    // The pure hash gives the same variant the healthy path stored.
    assert_eq!(
        injected(&d, "x-experiment-new-checkout"),
        injected(&healthy, "x-experiment-new-checkout")
    );
    assert!(injected(&d, "x-user-preferences")
        .unwrap()
        .contains("\"theme\":\"light\""));
    // Admin operations report the outage instead of guessing.
    for err in [
        edge.user_view("erin").await.unwrap_err(),
        edge.get_preferences("erin").await.unwrap_err(),
        edge.patch_preferences("erin", json!({"theme": "dark"}))
            .await
            .unwrap_err(),
        edge.set_flag_override("newUI", "erin", json!(true))
            .await
            .unwrap_err(),
        edge.reset_assignment("new-checkout", "erin")
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE, "{err}");
    }
}

#[tokio::test]
async fn preferences_merge_over_defaults_and_reach_the_origin() {
    let (_kv, edge) = memory_edge();
    assert_eq!(
        edge.get_preferences("fay").await.unwrap(),
        json!({"theme": "light", "language": "en", "notifications": true})
    );
    let after = edge
        .patch_preferences(
            "fay",
            json!({"theme": "dark", "language": "fran\u{e7}ais", "font": 14}),
        )
        .await
        .unwrap();
    assert_eq!(
        after,
        json!({"theme": "dark", "language": "fran\u{e7}ais", "notifications": true, "font": 14})
    );
    assert_eq!(edge.get_preferences("fay").await.unwrap(), after);
    let d = edge.decide(&user("fay"), "/", false).await;
    let header = injected(&d, "x-user-preferences").unwrap();
    assert_eq!(
        header,
        r#"{"font":14,"language":"fran\u00e7ais","notifications":true,"theme":"dark"}"#
    );
    assert_eq!(serde_json::from_str::<Value>(header).unwrap(), after);

    let back = edge
        .patch_preferences("fay", json!({"theme": null, "font": null}))
        .await
        .unwrap();
    assert_eq!(back["theme"], "light");
    assert!(back.get("font").is_none());
}

#[tokio::test]
async fn preference_refusals_change_nothing() {
    let (_kv, edge) = memory_edge();
    edge.patch_preferences("gil", json!({"theme": "dark"}))
        .await
        .unwrap();
    let before = edge.get_preferences("gil").await.unwrap();
    let cases = [
        json!("dark"),
        json!(["theme"]),
        json!(null),
        json!({"notifications": "often"}),
        json!({"theme": "dark", "language": 7}),
        json!({"bio": "x".repeat(5000)}),
    ];
    for patch in cases {
        let err = edge
            .patch_preferences("gil", patch.clone())
            .await
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{patch}");
        assert_eq!(
            edge.get_preferences("gil").await.unwrap(),
            before,
            "{patch} changed state"
        );
    }
    let err = edge
        .patch_preferences("gil", json!({"bio": "x".repeat(5000)}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("limit of 4096"), "{err}");
    assert_eq!(
        edge.get_preferences("").await.unwrap_err().status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn environments_keep_separate_state_in_one_store() {
    let kv: Arc<dyn Kv> = Arc::new(MemoryKv::new());
    let production = Edge::new(&config(), kv.clone()).unwrap();
    let mut preview_cfg = config();
    preview_cfg.environment = "preview".into();
    let preview = Edge::new(&preview_cfg, kv.clone()).unwrap();
    preview
        .set_flag_override("newUI", "hal", json!(true))
        .await
        .unwrap();
    let p = production.decide(&user("hal"), "/", false).await;
    assert!(injected(&p, "x-feature-flags")
        .unwrap()
        .contains("newui=?0"));
    let v = preview.decide(&user("hal"), "/", false).await;
    assert!(injected(&v, "x-feature-flags").unwrap().contains("newui,"));
    assert_eq!(
        preview.user_view("hal").await.unwrap()["environment"],
        "preview"
    );
    assert!(kv
        .get("preview:flag:newUI:user:hal")
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn state_survives_a_restart_on_the_durable_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let variant;
    {
        let kv: Arc<dyn Kv> = Arc::new(DurableKv::open(&path).unwrap());
        let edge = Edge::new(&config(), kv).unwrap();
        edge.set_flag_override("betaFeatures", "ivy", json!(true))
            .await
            .unwrap();
        edge.patch_preferences("ivy", json!({"theme": "dark"}))
            .await
            .unwrap();
        let d = edge.decide(&user("ivy"), "/checkout", false).await;
        variant = injected(&d, "x-experiment-new-checkout")
            .unwrap()
            .to_owned();
        edge.settle().await;
    }
    let kv: Arc<dyn Kv> = Arc::new(DurableKv::open(&path).unwrap());
    let edge = Edge::new(&config(), kv).unwrap();
    let view = edge.user_view("ivy").await.unwrap();
    assert_eq!(view["flags"]["betaFeatures"]["source"], "override");
    assert_eq!(view["preferences"]["theme"], "dark");
    assert_eq!(
        view["experiments"]["new-checkout"]["assigned"],
        variant.as_str()
    );
}

#[tokio::test]
async fn edge_without_flags_injects_no_flags_header() {
    let cfg: EdgeConfig = toml::from_str("").unwrap();
    let edge = Edge::new(&cfg, Arc::new(MemoryKv::new())).unwrap();
    let d = edge.decide(&user("jo"), "/", false).await;
    assert_eq!(d.inject.len(), 1);
    assert_eq!(injected(&d, "x-user-preferences"), Some("{}"));
    assert_eq!(edge.preferences_header().as_str(), "x-user-preferences");
}

#[test]
fn invalid_config_is_refused_by_new() {
    let mut cfg = config();
    cfg.experiments.get_mut("new-checkout").unwrap().traffic = 2.0;
    let err = Edge::new(&cfg, Arc::new(MemoryKv::new())).err().unwrap();
    assert_eq!(err.field, "experiments.new-checkout.traffic");
}

#[test]
fn variant_cutoffs_follow_the_weights() {
    let edge = Edge::new(&config(), Arc::new(MemoryKv::new())).unwrap();
    let exp = edge.experiment("new-checkout").unwrap();
    let cutoffs: Vec<u64> = exp.variants.iter().map(|v| v.cutoff).collect();
    assert_eq!(cutoffs, [5_000, 7_500, 10_000]);
    assert_eq!(exp.pick(0).name, "control");
    assert_eq!(exp.pick(4_999).name, "control");
    assert_eq!(exp.pick(5_000).name, "variant_a");
    assert_eq!(exp.pick(9_999).name, "variant_b");
    assert_eq!(exp.hash_seed, "new-checkout:");
    assert_eq!(edge.experiment("search").unwrap().hash_seed, "search-2024:");
}

#[test]
fn decide_runs_without_a_tokio_runtime() {
    // Sticky writes are then awaited inline instead of spawned.
    let kv = Arc::new(MemoryKv::new());
    let edge = Edge::new(&config(), kv.clone()).unwrap();
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let headers = user("kim");
    let mut fut = std::pin::pin!(edge.decide(&headers, "/checkout", false));
    let Poll::Ready(d) = fut.as_mut().poll(&mut cx) else {
        panic!("MemoryKv decisions complete in one poll");
    };
    assert!(injected(&d, "x-experiment-new-checkout").is_some());
    assert_eq!(
        kv.len_including_expired(),
        2,
        "both experiments' assignments stored"
    );
}
