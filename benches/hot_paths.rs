//! Hot functions of the request path: Cache-Control parsing, key building,
//! a store lookup on a hit, and building the hit response.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, StatusCode};
use kvgate::cache::CacheKey;
use kvgate::cache::{usability, Freshness};
use kvgate::cache::{Entry, Storage, Store};
use kvgate::cache::{RequestDirectives, ResponseDirectives};
use kvgate::{hit_response, Labels};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

fn entry(body: usize) -> Arc<Entry> {
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert(
        "cache-control",
        HeaderValue::from_static("public, max-age=3600"),
    );
    h.insert("etag", HeaderValue::from_static("\"abc123\""));
    h.insert(
        "date",
        HeaderValue::from_static("Tue, 24 Nov 2026 10:00:00 GMT"),
    );
    Arc::new(Entry::new(
        StatusCode::OK,
        h,
        Bytes::from(vec![b'x'; body]),
        Vec::new(),
        Freshness::plain(Duration::from_secs(3600), SystemTime::now()),
        Vec::new(),
    ))
}

fn benches(c: &mut Criterion) {
    let mut resp = HeaderMap::new();
    resp.insert(
        "cache-control",
        HeaderValue::from_static(
            "public, max-age=3600, stale-while-revalidate=30, stale-if-error=86400",
        ),
    );
    c.bench_function("parse_response_cache_control", |b| {
        b.iter(|| ResponseDirectives::from_headers(black_box(&resp)))
    });
    let mut req = HeaderMap::new();
    req.insert(
        "cache-control",
        HeaderValue::from_static("max-age=0, no-cache"),
    );
    c.bench_function("parse_request_cache_control", |b| {
        b.iter(|| RequestDirectives::from_headers(black_box(&req)))
    });
    c.bench_function("cache_key_new", |b| {
        b.iter(|| {
            CacheKey::new(
                1,
                false,
                black_box("api.example.com"),
                black_box("/static/hot-7?size=1024"),
            )
        })
    });

    let store = Store::new(256 << 20, 8 << 20, 64);
    for i in 0..10_000 {
        store.insert(
            CacheKey::new(1, false, "h", &format!("/static/hot-{i}")),
            entry(1024),
        );
    }
    let key = CacheKey::new(1, false, "h", "/static/hot-7");
    let req = HeaderMap::new();
    c.bench_function("store_lookup_hit", |b| {
        b.iter(|| store.lookup(black_box(&key), &req))
    });

    let labels = Labels::new("kvgate");
    let e = entry(1024);
    c.bench_function("hit_response_build", |b| {
        b.iter(|| {
            let now = SystemTime::now();
            let f = usability(&e.freshness, &RequestDirectives::default(), now);
            black_box(f);
            hit_response(&e, &req, false, now, &labels)
        })
    });
}

criterion_group!(hot, benches);
criterion_main!(hot);
