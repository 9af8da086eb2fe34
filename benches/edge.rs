//! Request-path cost of `Edge::decide` (identity + 3 flags + 2 experiments +
//! preferences) on each KV backend.
//!
//! Run: `cargo bench --bench edge`. Each decision is driven by `block_on` on
//! a current-thread runtime; `block_on_overhead` measures that harness cost.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use kvgate::edge::{Edge, EdgeConfig};
use kvgate::kv::{DurableKv, Kv, MemoryKv};

/// The peer every benchmarked request comes from: trusted, so X-User-Id counts.
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

const CONFIG: &str = r#"
    [identity]
    trusted_from = ["127.0.0.0/8"]
    secret = "bench-secret-bench-secret-bench-secret"
    [flags.newUI]
    default = false
    [flags.betaFeatures]
    default = false
    [flags.theme]
    default = "light"

    [experiments.new-checkout]
    variants = { control = 50, variant_a = 25, variant_b = 25 }
    path_prefix = "/checkout"

    [experiments.search]
    variants = { old = 1, new = 1 }

    [preferences]
    defaults = { theme = "light", language = "en", notifications = true }
"#;

fn headers_for(user: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("x-user-id", HeaderValue::from_str(user).unwrap());
    headers.insert("accept", HeaderValue::from_static("application/json"));
    headers
}

fn bench_backend(c: &mut Criterion, name: &str, kv: Arc<dyn Kv>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg: EdgeConfig = toml::from_str(CONFIG).unwrap();
    let edge = Edge::new(&cfg, kv).unwrap();

    // A returning user with sticky assignments in both experiments.
    let assigned = headers_for("user-assigned-42");
    // A returning user with overrides and stored preferences as well.
    let customized = headers_for("user-custom-7");
    rt.block_on(async {
        edge.decide(&assigned, "/checkout/pay", LOOPBACK, false)
            .await;
        edge.decide(&customized, "/checkout/pay", LOOPBACK, false)
            .await;
        edge.set_flag_override("newUI", "user-custom-7", serde_json::json!(true))
            .await
            .unwrap();
        edge.set_flag_override("theme", "user-custom-7", serde_json::json!("dark"))
            .await
            .unwrap();
        edge.patch_preferences("user-custom-7", serde_json::json!({"language": "de"}))
            .await
            .unwrap();
        edge.settle().await;
    });
    let anonymous = HeaderMap::new();

    let mut group = c.benchmark_group(format!("decide/{name}"));
    group.bench_function("assigned_user", |b| {
        b.iter(|| rt.block_on(edge.decide(black_box(&assigned), "/checkout/pay", LOOPBACK, false)))
    });
    group.bench_function("user_with_overrides_and_prefs", |b| {
        b.iter(|| {
            rt.block_on(edge.decide(black_box(&customized), "/checkout/pay", LOOPBACK, false))
        })
    });
    group.bench_function("new_anonymous_visitor", |b| {
        b.iter(|| rt.block_on(edge.decide(black_box(&anonymous), "/checkout/pay", LOOPBACK, true)))
    });
    group.finish();
}

fn decide(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    c.bench_function("block_on_overhead", |b| {
        b.iter(|| rt.block_on(async { black_box(1) }))
    });
    drop(rt);

    bench_backend(c, "memory", Arc::new(MemoryKv::new()));
    let dir = tempfile::tempdir().unwrap();
    let durable = DurableKv::open(dir.path().join("bench.redb")).unwrap();
    bench_backend(c, "durable", Arc::new(durable));
}

criterion_group!(benches, decide);
criterion_main!(benches);
