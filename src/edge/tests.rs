//! Tests of the request-path decisions and the admin operations.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::task::Poll;

use http::header::COOKIE;
use http::StatusCode;
use serde_json::{json, Value};

use super::*;
use crate::kv::{DurableKv, KvFuture, ListPage, MemoryKv};

const CONFIG: &str = r#"
    environment = "production"

    [identity]
    cookie = "session_user"
    trusted_from = ["127.0.0.0/8", "::1"]

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

/// A peer in `trusted_from`: its X-User-Id counts.
const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
/// A peer outside `trusted_from` (a documentation address; nothing is sent).
const STRANGER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 7));

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

/// The `name=value` pair of the anonymous cookie a decision set, ready to
/// send back in a `Cookie` header.
fn cookie_pair(decision: &EdgeDecision) -> String {
    let set = decision.set_cookie.as_ref().expect("a cookie was set");
    let set = set.to_str().unwrap();
    set.split(';').next().unwrap().to_owned()
}

fn with_cookie(pair: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(COOKIE, HeaderValue::from_str(pair).unwrap());
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
    let d = edge
        .decide(&HeaderMap::new(), "/checkout", PEER, true)
        .await;
    assert!(d.anonymous);
    let raw = d.user_id.strip_prefix("anon:").unwrap();
    assert!(uuid::Uuid::parse_str(raw).is_ok());
    let cookie = d.set_cookie.as_ref().unwrap().to_str().unwrap();
    // The cookie holds the bare id and its mac, never the namespaced id.
    let pair = cookie_pair(&d);
    let (id, mac) = pair
        .strip_prefix("kvgate_uid=")
        .unwrap()
        .rsplit_once('.')
        .unwrap();
    assert_eq!(id, raw);
    assert_eq!(mac.len(), 43);
    assert_eq!(
        cookie,
        format!("{pair}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax; Secure")
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
    let stored: Vec<String> = kv
        .list("", None, 10)
        .await
        .unwrap()
        .keys
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(
        stored,
        ["production:secret:anonymous-id"],
        "a fresh id must not write state (only the generated signing key)"
    );
}

#[tokio::test]
async fn returning_anonymous_visitor_keeps_the_id_and_gets_a_sticky_assignment() {
    let (kv, edge) = memory_edge();
    let first = edge
        .decide(&HeaderMap::new(), "/checkout", PEER, false)
        .await;
    assert!(!first
        .set_cookie
        .as_ref()
        .unwrap()
        .to_str()
        .unwrap()
        .contains("Secure"));
    let h = with_cookie(&cookie_pair(&first));
    // The signed cookie counts from any peer: it needs no trusted proxy.
    let again = edge.decide(&h, "/checkout/pay", STRANGER, false).await;
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

/// What a returning id has stored for exposures of new-checkout.
async fn exposure_records(kv: &MemoryKv) -> Vec<String> {
    let page = kv
        .list("production:exposed:new-checkout:", None, 1000)
        .await;
    page.unwrap().keys.into_iter().map(|k| k.name).collect()
}

#[tokio::test]
async fn a_new_visitor_is_exposed_when_it_returns_with_the_cookie() {
    let (kv, edge) = memory_edge();
    // Cookie-less requests (a crawler, a load generator): each is a new
    // visitor, and none leaves an exposure behind, in the store or in memory.
    let mut first = None;
    for _ in 0..50 {
        let d = edge
            .decide(&HeaderMap::new(), "/checkout", STRANGER, false)
            .await;
        assert!(injected(&d, "x-experiment-new-checkout").is_some());
        assert!(!d.observes(), "a new id is not observed");
        edge.observe(&d, &Method::GET, "/checkout", "default", StatusCode::OK)
            .await;
        first.get_or_insert(d);
    }
    edge.settle().await;
    assert_eq!(exposure_records(&kv).await, Vec::<String>::new());
    let first = first.unwrap();
    let variant = injected(&first, "x-experiment-new-checkout")
        .unwrap()
        .to_owned();
    assert_eq!(today(&edge, &variant).await, (0, 0));

    // The first id comes back: exposed once, in the same variant, and its
    // assignment stored with it.
    let h = with_cookie(&cookie_pair(&first));
    for _ in 0..3 {
        let d = edge.decide(&h, "/checkout", STRANGER, false).await;
        assert!(d.observes());
        assert_eq!(
            injected(&d, "x-experiment-new-checkout"),
            Some(variant.as_str())
        );
        edge.observe(&d, &Method::GET, "/checkout", "default", StatusCode::OK)
            .await;
    }
    edge.settle().await;
    assert_eq!(
        exposure_records(&kv).await,
        [format!(
            "production:exposed:new-checkout:{variant}:{}",
            first.user_id
        )]
    );
    assert_eq!(today(&edge, &variant).await, (1, 0));
    assert_eq!(checkout_sticky_keys(kv.as_ref()).await, 1);
}

#[tokio::test]
async fn identity_from_header_or_configured_cookie_is_not_anonymous() {
    let (_kv, edge) = memory_edge();
    let d = edge.decide(&user("alice"), "/", PEER, false).await;
    assert_eq!(
        (d.user_id.as_str(), d.anonymous, d.set_cookie.is_none()),
        ("alice", false, true)
    );
    let h = with_cookie("kvgate_uid=anon; session_user=bob");
    let d = edge.decide(&h, "/", PEER, false).await;
    assert_eq!((d.user_id.as_str(), d.anonymous), ("bob", false));
    // A malformed id is ignored, never an error.
    let d = edge
        .decide(&user("bad id with spaces"), "/", PEER, false)
        .await;
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
    let d = edge.decide(&user("alice"), "/checkout", PEER, false).await;
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
    let d = edge.decide(&user("alice"), "/", PEER, false).await;
    assert_eq!(
        injected(&d, "x-feature-flags"),
        Some(r#"betafeatures=?0, newui, ratio=2, theme="dark \"mode\"""#)
    );
    // Other users are untouched.
    let bob = edge.decide(&user("bob"), "/", PEER, false).await;
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
    let d = edge.decide(&user("alice"), "/", PEER, false).await;
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
    let d = edge.decide(&user("alice"), "/", PEER, false).await;
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
        let d = edge.decide(&user("alice"), path, PEER, false).await;
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
        let defs = edge.defs.current.load_full();
        let exp = defs.experiment("search").unwrap();
        users.iter().map(|u| exp.hashed(u).is_some()).collect()
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
    let d = edge.decide(&user("u1"), "/", PEER, false).await;
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
        out.push(edge.decide(&user(&id), "/checkout", PEER, false).await);
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
        let again = other
            .decide(&user(&d.user_id), "/checkout", PEER, false)
            .await;
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
    // 20,000 decisions back to back on one thread never let the flusher
    // run: the queue must hold them all, or the bound would drop some.
    let mut cfg = config();
    cfg.write_queue_capacity = 50_000;
    let before = Edge::new(&cfg, kv.clone()).unwrap();
    let old_ids = || (0..20_000).map(|i| format!("old-{i}"));
    let first = decide_all(&before, old_ids()).await;
    before.settle().await;
    assert_eq!(before.dropped_writes(), 0);

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
    let d = edge.decide(&user("alice"), "/checkout", PEER, false).await;
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

    let d = edge.decide(&user("carol"), "/checkout", PEER, false).await;
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
    let d = edge_after
        .decide(&user("dave"), "/checkout", PEER, false)
        .await;
    assert_eq!(injected(&d, "x-experiment-new-checkout"), Some("variant_b"));

    let reset = edge.reset_assignment("new-checkout", "dave").await.unwrap();
    assert_eq!(reset["deleted"], true);
    assert_eq!(
        edge.reset_assignment("new-checkout", "dave").await.unwrap()["deleted"],
        false
    );
    let d = edge_after
        .decide(&user("dave"), "/checkout", PEER, false)
        .await;
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
    let healthy = edge.decide(&user("erin"), "/checkout", PEER, false).await;
    assert!(injected(&healthy, "x-feature-flags")
        .unwrap()
        .contains("newui,"));
    edge.settle().await;

    flaky.down.store(true, Ordering::SeqCst);
    let d = edge.decide(&user("erin"), "/checkout", PEER, false).await;
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
    // The failed reads are counted for /metrics.
    let counted = edge.counter_registry().snapshot();
    assert!(counted.state_read_errors >= 3, "{counted:?}");
    assert_eq!(counted.state_write_errors, 0);
    // A write queued while the store answered and committed once it no
    // longer does is counted too.
    flaky.down.store(false, Ordering::SeqCst);
    edge.decide(&user("gina"), "/checkout", PEER, false).await;
    flaky.down.store(true, Ordering::SeqCst);
    edge.settle().await;
    let counted = edge.counter_registry().snapshot();
    assert!(counted.state_write_errors >= 1, "{counted:?}");
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
    let d = edge.decide(&user("fay"), "/", PEER, false).await;
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
    let p = production.decide(&user("hal"), "/", PEER, false).await;
    assert!(injected(&p, "x-feature-flags")
        .unwrap()
        .contains("newui=?0"));
    let v = preview.decide(&user("hal"), "/", PEER, false).await;
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
        let d = edge.decide(&user("ivy"), "/checkout", PEER, false).await;
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
    let d = edge.decide(&user("jo"), "/", PEER, false).await;
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
    let defs = edge.defs.current.load_full();
    let exp = defs.experiment("new-checkout").unwrap();
    let cutoffs: Vec<u64> = exp.variants.iter().map(|v| v.cutoff).collect();
    assert_eq!(cutoffs, [5_000, 7_500, 10_000]);
    assert_eq!(exp.pick(0).name, "control");
    assert_eq!(exp.pick(4_999).name, "control");
    assert_eq!(exp.pick(5_000).name, "variant_a");
    assert_eq!(exp.pick(9_999).name, "variant_b");
    assert_eq!(exp.hash_seed, "new-checkout:");
    assert_eq!(defs.experiment("search").unwrap().hash_seed, "search-2024:");
}

#[test]
fn decide_runs_without_a_tokio_runtime() {
    // Sticky writes are then awaited inline instead of spawned.
    let kv = Arc::new(MemoryKv::new());
    let edge = Edge::new(&config(), kv.clone()).unwrap();
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let headers = user("kim");
    let mut fut = std::pin::pin!(edge.decide(&headers, "/checkout", PEER, false));
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

// Identity hardening --------------------------------------------------------

/// Alice, an authenticated user with a flag override and a preference.
async fn with_alice(edge: &Edge) {
    edge.set_flag_override("newUI", "alice", json!(true))
        .await
        .unwrap();
    edge.patch_preferences("alice", json!({"theme": "dark"}))
        .await
        .unwrap();
}

const DEFAULT_FLAGS: &str = "betafeatures=?0, newui=?0, ratio=0.25, theme=\"light\"";
const DEFAULT_PREFS: &str = r#"{"language":"en","notifications":true,"theme":"light"}"#;

#[tokio::test]
async fn a_cookie_naming_a_user_gets_none_of_their_state() {
    let (_kv, edge) = memory_edge();
    with_alice(&edge).await;
    let honest = edge.decide(&user("alice"), "/", PEER, false).await;
    assert_eq!(honest.user_id, "alice");
    assert!(injected(&honest, "x-feature-flags")
        .unwrap()
        .contains("newui,"));

    for peer in [PEER, STRANGER] {
        let d = edge
            .decide(&with_cookie("kvgate_uid=alice"), "/", peer, false)
            .await;
        assert_ne!(d.user_id, "alice");
        assert!(d.anonymous && d.user_id.starts_with("anon:"));
        assert_eq!(injected(&d, "x-feature-flags"), Some(DEFAULT_FLAGS));
        assert_eq!(injected(&d, "x-user-preferences"), Some(DEFAULT_PREFS));
        // The forged cookie is replaced by a fresh, signed one.
        let pair = cookie_pair(&d);
        assert_ne!(pair, "kvgate_uid=alice");
        let again = edge.decide(&with_cookie(&pair), "/", peer, false).await;
        assert_eq!(again.user_id, d.user_id);
        assert_eq!(again.set_cookie, None);
    }
}

#[tokio::test]
async fn the_identity_header_and_cookie_count_only_from_trusted_peers() {
    let (_kv, edge) = memory_edge();
    with_alice(&edge).await;
    let mut h = user("alice");
    h.insert(COOKIE, HeaderValue::from_static("session_user=alice"));
    let d = edge.decide(&h, "/", STRANGER, false).await;
    assert!(d.anonymous && d.set_cookie.is_some(), "{}", d.user_id);
    assert_eq!(injected(&d, "x-feature-flags"), Some(DEFAULT_FLAGS));
    let d = edge
        .decide(&with_cookie("session_user=alice"), "/", STRANGER, false)
        .await;
    assert!(d.anonymous);

    // Trusted: loopback over IPv4, IPv6 and IPv4-mapped IPv6.
    for peer in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
        let d = edge.decide(&h, "/", peer.parse().unwrap(), false).await;
        assert_eq!(d.user_id, "alice", "from {peer}");
    }
    assert!(!edge.trusts("::2".parse().unwrap()));

    // Without trusted_from nobody is trusted.
    let mut cfg = config();
    cfg.identity.trusted_from.clear();
    let untrusting = Edge::new(&cfg, Arc::new(MemoryKv::new())).unwrap();
    let d = untrusting.decide(&user("alice"), "/", PEER, false).await;
    assert!(d.anonymous);
}

#[tokio::test]
async fn an_authenticated_id_cannot_claim_an_anonymous_users_state() {
    let (_kv, edge) = memory_edge();
    let first = edge.decide(&HeaderMap::new(), "/", PEER, false).await;
    let pair = cookie_pair(&first);
    edge.patch_preferences(&first.user_id, json!({"theme": "dark"}))
        .await
        .unwrap();
    let owner = edge.decide(&with_cookie(&pair), "/", PEER, false).await;
    assert!(injected(&owner, "x-user-preferences")
        .unwrap()
        .contains("dark"));

    let raw = first.user_id.strip_prefix("anon:").unwrap();
    for claimed in [first.user_id.clone(), format!("ANON:{raw}")] {
        let d = edge.decide(&user(&claimed), "/", PEER, false).await;
        assert_ne!(d.user_id, first.user_id);
        assert!(d.set_cookie.is_some(), "{claimed} was believed");
        assert_eq!(injected(&d, "x-user-preferences"), Some(DEFAULT_PREFS));
    }
    // The bare id in the cookie, unsigned, is no better.
    let d = edge
        .decide(&with_cookie(&format!("kvgate_uid={raw}")), "/", PEER, false)
        .await;
    assert_ne!(d.user_id, first.user_id);
}

#[tokio::test]
async fn a_tampered_cookie_gets_a_fresh_id() {
    let (_kv, edge) = memory_edge();
    let first = edge.decide(&HeaderMap::new(), "/", PEER, false).await;
    let pair = cookie_pair(&first);
    let (id, mac) = pair.rsplit_once('.').unwrap();
    let flipped_mac: String = mac
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 5 {
                if c == 'x' {
                    'y'
                } else {
                    'x'
                }
            } else {
                c
            }
        })
        .collect();
    let last = if id.ends_with('0') { '1' } else { '0' };
    let other_id = format!("{}{last}.", &id[..id.len() - 1]);
    for tampered in [
        format!("{id}.{flipped_mac}"),
        format!("{other_id}{mac}"),
        format!("{id}.{mac}x"),
        id.to_owned(),
    ] {
        let d = edge.decide(&with_cookie(&tampered), "/", PEER, false).await;
        assert_ne!(d.user_id, first.user_id, "{tampered} accepted");
        assert!(d.set_cookie.is_some(), "{tampered}: no fresh cookie");
    }
}

#[tokio::test]
async fn signed_ids_survive_a_restart_with_the_generated_or_configured_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let (pair, user_id) = {
        let kv: Arc<dyn Kv> = Arc::new(DurableKv::open(&path).unwrap());
        let edge = Edge::new(&config(), kv).unwrap();
        let d = edge.decide(&HeaderMap::new(), "/", PEER, false).await;
        (cookie_pair(&d), d.user_id)
    };
    let kv: Arc<dyn Kv> = Arc::new(DurableKv::open(&path).unwrap());
    let edge = Edge::new(&config(), kv).unwrap();
    let d = edge.decide(&with_cookie(&pair), "/", PEER, false).await;
    assert_eq!(d.user_id, user_id, "the generated secret was kept");
    assert_eq!(d.set_cookie, None);

    // A configured secret: any store, same ids; another secret, other ids.
    let mut cfg = config();
    cfg.identity.secret = Some("a-configured-secret-of-32-bytes-or-more".into());
    let one = Edge::new(&cfg, Arc::new(MemoryKv::new())).unwrap();
    let two = Edge::new(&cfg, Arc::new(MemoryKv::new())).unwrap();
    let d = one.decide(&HeaderMap::new(), "/", PEER, false).await;
    let back = two
        .decide(&with_cookie(&cookie_pair(&d)), "/", PEER, false)
        .await;
    assert_eq!(back.user_id, d.user_id);
    cfg.identity.secret = Some("another-configured-secret-32-bytes-long".into());
    let three = Edge::new(&cfg, Arc::new(MemoryKv::new())).unwrap();
    let other = three
        .decide(&with_cookie(&cookie_pair(&d)), "/", PEER, false)
        .await;
    assert_ne!(other.user_id, d.user_id);
    // The generated-secret edge does not accept the configured one's ids.
    let theirs = edge
        .decide(&with_cookie(&cookie_pair(&d)), "/", PEER, false)
        .await;
    assert_ne!(theirs.user_id, d.user_id);

    cfg.identity.secret = Some("short".into());
    assert_eq!(
        Edge::new(&cfg, Arc::new(MemoryKv::new()))
            .err()
            .unwrap()
            .field,
        "identity.secret"
    );
}

#[tokio::test]
async fn cookie_secure_marks_the_cookie_secure_on_plain_http() {
    let mut cfg = config();
    cfg.identity.cookie_secure = true;
    let edge = Edge::new(&cfg, Arc::new(MemoryKv::new())).unwrap();
    let d = edge.decide(&HeaderMap::new(), "/", PEER, false).await;
    let cookie = d.set_cookie.unwrap();
    assert!(cookie.to_str().unwrap().ends_with("; Secure"), "{cookie:?}");
}

#[tokio::test]
async fn an_unreadable_secret_keeps_the_visitors_cookie() {
    let flaky = Arc::new(FlakyKv::default());
    let edge = Edge::new(&config(), flaky.clone()).unwrap();
    flaky.down.store(true, Ordering::SeqCst);
    let d = edge
        .decide(&HeaderMap::new(), "/checkout", PEER, false)
        .await;
    assert!(d.anonymous);
    assert_eq!(d.set_cookie, None, "no cookie signed with a throwaway key");
    flaky.down.store(false, Ordering::SeqCst);
    let d = edge
        .decide(&HeaderMap::new(), "/checkout", PEER, false)
        .await;
    let pair = cookie_pair(&d);
    let again = edge.decide(&with_cookie(&pair), "/", PEER, false).await;
    assert_eq!(again.user_id, d.user_id);
}

// Bounded, batched, expiring state -------------------------------------------

/// A MemoryKv that counts how writes arrive.
#[derive(Default)]
struct CountingKv {
    inner: MemoryKv,
    puts: AtomicU64,
    batches: AtomicU64,
}

impl Kv for CountingKv {
    fn get<'a>(&'a self, key: &'a str) -> KvFuture<'a, Option<KvEntry>> {
        self.inner.get(key)
    }
    fn put<'a>(&'a self, key: &'a str, value: Bytes, opts: PutOptions) -> KvFuture<'a, ()> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put(key, value, opts)
    }
    fn put_batch<'a>(&'a self, items: Vec<crate::kv::PutItem>) -> KvFuture<'a, ()> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.inner.put_batch(items)
    }
    fn delete<'a>(&'a self, key: &'a str) -> KvFuture<'a, bool> {
        self.inner.delete(key)
    }
    fn list<'a>(
        &'a self,
        prefix: &'a str,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> KvFuture<'a, ListPage> {
        self.inner.list(prefix, cursor, limit)
    }
}

async fn sticky_keys(kv: &dyn Kv) -> usize {
    kv.list("production:exp:", None, 1000)
        .await
        .unwrap()
        .keys
        .len()
}

#[tokio::test]
async fn sticky_writes_are_committed_in_one_batch() {
    let kv = Arc::new(CountingKv::default());
    let edge = Edge::new(&config(), kv.clone()).unwrap();
    let mut expected = 0;
    // Back to back on this thread: the flusher runs only once they are queued.
    for i in 0..100 {
        let d = edge
            .decide(&user(&format!("batch-{i}")), "/checkout", PEER, false)
            .await;
        expected += d
            .inject
            .iter()
            .filter(|(n, _)| n.as_str().starts_with("x-experiment-"))
            .count();
    }
    edge.settle().await;
    assert_eq!(sticky_keys(kv.as_ref()).await, expected);
    assert_eq!(kv.puts.load(Ordering::SeqCst), 0, "no write on its own");
    assert_eq!(kv.batches.load(Ordering::SeqCst), 1, "one commit for all");
}

#[tokio::test]
async fn a_full_write_queue_drops_and_counts_and_the_next_request_redoes() {
    let kv = Arc::new(MemoryKv::new());
    let mut cfg = config();
    cfg.write_queue_capacity = 3;
    let edge = Edge::new(&cfg, kv.clone()).unwrap();
    let mut attempted = 0;
    for i in 0..10 {
        let d = edge
            .decide(&user(&format!("q-{i}")), "/checkout", PEER, false)
            .await;
        attempted += d
            .inject
            .iter()
            .filter(|(n, _)| n.as_str().starts_with("x-experiment-"))
            .count() as u64;
    }
    edge.settle().await;
    assert!(attempted > 3, "{attempted}");
    assert_eq!(sticky_keys(kv.as_ref()).await, 3, "the queue held 3");
    assert_eq!(edge.dropped_writes(), attempted - 3);
    assert_eq!(
        edge.counter_registry().snapshot().dropped_writes,
        attempted - 3
    );
    let counters = edge.counters().await.unwrap();
    assert_eq!(counters["dropped_writes"], attempted - 3);

    // Dropped assignments are stored by the users' next requests.
    for i in 0..10 {
        edge.decide(&user(&format!("q-{i}")), "/checkout", PEER, false)
            .await;
        edge.settle().await;
    }
    assert_eq!(sticky_keys(kv.as_ref()).await as u64, attempted);
}

#[tokio::test]
async fn sticky_assignments_expire_after_their_ttl() {
    let (kv, mut edge) = memory_edge();
    edge.sticky_ttl = Duration::from_millis(300);
    edge.decide(&user("tess"), "/checkout", PEER, false).await;
    edge.settle().await;
    let view = edge.user_view("tess").await.unwrap();
    assert!(view["experiments"]["new-checkout"]["assigned"].is_string());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let view = edge.user_view("tess").await.unwrap();
    assert!(
        view["experiments"]["new-checkout"]["assigned"].is_null(),
        "{view}"
    );
    kv.sweep_expired();
    assert_eq!(
        kv.list("production:exp:", None, 10)
            .await
            .unwrap()
            .keys
            .len(),
        0
    );
}

#[tokio::test]
async fn idle_preferences_expire_and_requests_renew_them() {
    let (kv, mut edge) = memory_edge();
    edge.prefs_ttl = Duration::from_secs(2);
    let key = "production:prefs:user:una";
    let expiry = |kv: Arc<MemoryKv>| async move {
        kv.get(key)
            .await
            .unwrap()
            .map(|e| e.expires_at.expect("preferences carry a TTL"))
    };
    edge.patch_preferences("una", json!({"theme": "dark"}))
        .await
        .unwrap();
    let set = expiry(kv.clone()).await.unwrap();
    // Renewal waits until half the TTL (capped at a day) has passed.
    edge.decide(&user("una"), "/", PEER, false).await;
    edge.settle().await;
    assert_eq!(expiry(kv.clone()).await, Some(set));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let d = edge.decide(&user("una"), "/", PEER, false).await;
    assert!(injected(&d, "x-user-preferences").unwrap().contains("dark"));
    edge.settle().await;
    let renewed = expiry(kv.clone()).await.unwrap();
    assert!(
        renewed > set + Duration::from_millis(900),
        "{renewed:?} vs {set:?}"
    );
    assert_eq!(edge.get_preferences("una").await.unwrap()["theme"], "dark");
    // Idle past the TTL: gone, the defaults apply again.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let d = edge.decide(&user("una"), "/", PEER, false).await;
    assert_eq!(injected(&d, "x-user-preferences"), Some(DEFAULT_PREFS));

    // A document stored without a TTL (before TTLs) gets one on its next read.
    kv.put(
        "production:prefs:user:old",
        Bytes::from_static(br#"{"theme":"dark"}"#),
        PutOptions::default(),
    )
    .await
    .unwrap();
    edge.decide(&user("old"), "/", PEER, false).await;
    edge.settle().await;
    let entry = kv.get("production:prefs:user:old").await.unwrap().unwrap();
    assert!(entry.expires_at.is_some());
    assert_eq!(entry.value, r#"{"theme":"dark"}"#);
}

#[tokio::test]
async fn settle_commits_queued_writes_to_the_durable_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let mut assigned = Vec::new();
    {
        let kv: Arc<dyn Kv> = Arc::new(DurableKv::open(&path).unwrap());
        let edge = Edge::new(&config(), kv).unwrap();
        for i in 0..50 {
            let id = format!("s-{i}");
            let d = edge.decide(&user(&id), "/checkout", PEER, false).await;
            assigned.push((
                id,
                injected(&d, "x-experiment-new-checkout")
                    .unwrap()
                    .to_owned(),
            ));
        }
        edge.settle().await;
    }
    let kv = DurableKv::open(&path).unwrap();
    for (id, variant) in assigned {
        let entry = kv
            .get(&format!("production:exp:new-checkout:user:{id}"))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id}'s assignment was not committed"));
        assert_eq!(entry.value, variant);
    }
}

#[tokio::test]
async fn spaced_out_writes_within_the_window_share_one_commit() {
    for (window_ms, commits) in [(0, 5), (2_000, 1)] {
        let kv = Arc::new(CountingKv::default());
        let mut cfg = config();
        cfg.write_flush_ms = window_ms;
        let edge = Edge::new(&cfg, kv.clone()).unwrap();
        let mut writes = 0;
        for i in 0..5 {
            let d = edge
                .decide(&user(&format!("w-{i}")), "/checkout", PEER, false)
                .await;
            writes += d
                .inject
                .iter()
                .filter(|(n, _)| n.as_str().starts_with("x-experiment-"))
                .count();
            // Time for the flusher to run between requests.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            edge.pending_writes(),
            if window_ms == 0 { 0 } else { writes },
            "window {window_ms}"
        );
        // Nothing but the window's end commits them (no settle here).
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(edge.pending_writes(), 0);
        assert_eq!(
            kv.batches.load(Ordering::SeqCst),
            commits,
            "window {window_ms}"
        );
    }
}

// Live definitions ----------------------------------------------------------

#[tokio::test]
async fn a_change_on_one_instance_reaches_another_sharing_the_store() {
    let kv: Arc<dyn Kv> = Arc::new(MemoryKv::new());
    let a = Edge::new(&config(), kv.clone()).unwrap();
    let b = Edge::new(&config(), kv.clone()).unwrap();
    let flags_of = |d: &EdgeDecision| injected(d, "x-feature-flags").unwrap().to_owned();
    let before = flags_of(&b.decide(&user("ann"), "/", PEER, false).await);
    assert!(before.contains("newui=?0"), "{before}");

    let changed = std::time::Instant::now();
    a.change_definition(
        DefKind::Flag,
        "newUI",
        Change::Patch(json!({"default": true})),
        "admin",
    )
    .await
    .unwrap();
    // `a` swaps at once; `b` sees it at its next poll of `defs:version`.
    let on_a = flags_of(&a.decide(&user("ann"), "/", PEER, false).await);
    assert!(on_a.starts_with("betafeatures=?0, newui,"), "{on_a}");
    let deadline = changed + Duration::from_secs(5);
    loop {
        let now = flags_of(&b.decide(&user("ann"), "/", PEER, false).await);
        if now == on_a {
            eprintln!(
                "change reached the other instance after {:?}",
                changed.elapsed()
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never reached b: {now}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A third instance started later reads the store, not its config.
    let c = Edge::new(&config(), kv).unwrap();
    assert_eq!(
        flags_of(&c.decide(&user("ann"), "/", PEER, false).await),
        on_a
    );
}

#[tokio::test]
async fn growthbook_hashing_agrees_with_the_sdk_vectors() {
    // cases.json "run": seed "foo", id "1", two even variations (with full
    // and 99 % coverage) -> variation 1.
    for traffic in [1.0, 0.99] {
        let mut cfg = config();
        cfg.experiments.clear();
        cfg.experiments.insert(
            "key".into(),
            toml::from_str(&format!(
                "variants = {{ a = 50, b = 50 }}\nhash = \"growthbook\"\nsalt = \"foo\"\ntraffic = {traffic}"
            ))
            .unwrap(),
        );
        let edge = Edge::new(&cfg, Arc::new(MemoryKv::new())).unwrap();
        let d = edge.decide(&user("1"), "/", PEER, false).await;
        assert_eq!(
            injected(&d, "x-experiment-key"),
            Some("b"),
            "coverage {traffic}"
        );
    }
}

#[tokio::test]
async fn bucket_version_reshuffles_and_ignores_older_sticky_assignments() {
    let kv: Arc<dyn Kv> = Arc::new(MemoryKv::new());
    let edge = Edge::new(&config(), kv.clone()).unwrap();
    let users: Vec<String> = (0..200).map(|i| format!("bv-{i}")).collect();
    let mut before = Vec::new();
    for u in &users {
        let d = edge.decide(&user(u), "/checkout", PEER, false).await;
        before.push(
            injected(&d, "x-experiment-new-checkout")
                .unwrap()
                .to_owned(),
        );
    }
    edge.settle().await;
    edge.change_definition(
        DefKind::Experiment,
        "new-checkout",
        Change::Patch(json!({"bucket_version": 1})),
        "admin",
    )
    .await
    .unwrap();
    let mut moved = 0;
    for (u, old) in users.iter().zip(&before) {
        let d = edge.decide(&user(u), "/checkout", PEER, false).await;
        if injected(&d, "x-experiment-new-checkout").unwrap() != old {
            moved += 1;
        }
    }
    // Independent hashes under 50/25/25: about 62.5 % land elsewhere.
    assert!(moved > 80, "only {moved} of 200 moved");
}

async fn patch_experiment(edge: &Edge, patch: Value) -> Result<Value, EdgeAdminError> {
    edge.change_definition(
        DefKind::Experiment,
        "new-checkout",
        Change::Patch(patch),
        "admin",
    )
    .await
}

/// Sticky assignments stored for new-checkout (the other experiment runs on).
async fn checkout_sticky_keys(kv: &dyn Kv) -> usize {
    let page = kv.list("production:exp:new-checkout:", None, 1000).await;
    page.unwrap().keys.len()
}

/// Today's exposures and conversions of one variant in the results' `daily`.
async fn today(edge: &Edge, variant: &str) -> (u64, u64) {
    let results = edge.results("new-checkout").await.unwrap();
    let date = exposures::utc_date(crate::kv::now_ms() / 86_400_000);
    results["daily"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["date"] == date.as_str() && r["variant"] == variant)
        .map_or((0, 0), |r| {
            (
                r["exposures"].as_u64().unwrap(),
                r["conversions"].as_u64().unwrap(),
            )
        })
}

#[tokio::test]
async fn pause_and_stop_withhold_assignments_and_resume_keeps_them() {
    let kv = Arc::new(MemoryKv::new());
    let edge = Edge::new(&config(), kv.clone()).unwrap();
    let d = edge.decide(&user("alice"), "/checkout", PEER, false).await;
    let variant = injected(&d, "x-experiment-new-checkout")
        .unwrap()
        .to_owned();
    edge.observe(&d, &Method::GET, "/checkout", "default", StatusCode::OK)
        .await;
    assert_eq!(today(&edge, &variant).await, (1, 0));
    edge.settle().await;
    let stored = checkout_sticky_keys(kv.as_ref()).await;
    assert_eq!(stored, 1);

    let done = patch_experiment(&edge, json!({"status": "paused"})).await;
    assert_eq!(done.unwrap()["after"]["status"], "paused");
    for u in ["alice", "bob", "carol"] {
        let d = edge.decide(&user(u), "/checkout", PEER, false).await;
        assert_eq!(injected(&d, "x-experiment-new-checkout"), None, "{u}");
        edge.observe(&d, &Method::GET, "/checkout", "default", StatusCode::OK)
            .await;
    }
    edge.settle().await;
    // Nobody new assigned, nothing exposed, alice's assignment kept.
    assert_eq!(checkout_sticky_keys(kv.as_ref()).await, stored);
    let results = edge.results("new-checkout").await.unwrap();
    assert_eq!(results["status"], "paused");
    let exposed: u64 = results["daily"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["exposures"].as_u64().unwrap())
        .sum();
    assert_eq!(exposed, 1);

    // Refused: an unknown status, an unknown winner, a winner while not stopped.
    for (patch, words) in [
        (json!({"status": "finished"}), "finished"),
        (
            json!({"status": "stopped", "winner": "nope"}),
            "not one of the experiment's variants",
        ),
        (json!({"winner": "control"}), "needs status"),
    ] {
        let err = patch_experiment(&edge, patch.clone()).await.unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{patch}");
        assert!(err.to_string().contains(words), "{patch}: {err}");
    }

    patch_experiment(&edge, json!({"status": "stopped", "winner": "variant_b"}))
        .await
        .unwrap();
    for u in ["alice", "bob", "carol", "dave"] {
        let d = edge.decide(&user(u), "/checkout", PEER, false).await;
        assert_eq!(
            injected(&d, "x-experiment-new-checkout"),
            Some("variant_b"),
            "{u}"
        );
        assert!(d.observes());
        let defs = edge.defs.current.load();
        assert!(
            d.assigned
                .iter()
                .all(|&(e, _)| defs.experiments[e].name != "new-checkout"),
            "a winner is no exposure"
        );
        // Outside the path prefix the experiment still does not apply.
        let d = edge.decide(&user(u), "/", PEER, false).await;
        assert_eq!(injected(&d, "x-experiment-new-checkout"), None);
    }

    let done = patch_experiment(&edge, json!({"status": "running", "winner": null}))
        .await
        .unwrap();
    // Running is the default: neither status nor winner is stored.
    assert!(done["after"].get("status").is_none(), "{done}");
    assert!(done["after"].get("winner").is_none(), "{done}");
    let d = edge.decide(&user("alice"), "/checkout", PEER, false).await;
    assert_eq!(
        injected(&d, "x-experiment-new-checkout"),
        Some(variant.as_str())
    );
}
