//! Invalidation costs: purging one tag that covers 100,000 entries, and the
//! hit path (`Store::lookup`) with an empty versus a large tag index (the
//! index lives beside the LRU in each shard, so a hit should not care).
//!
//! Run: `cargo bench --bench purge`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderMap, StatusCode};
use kvgate::cache::CacheKey;
use kvgate::cache::Freshness;
use kvgate::cache::{Entry, Storage, Store};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const ENTRIES: usize = 100_000;

fn entry(tags: Vec<Arc<str>>) -> Arc<Entry> {
    Arc::new(Entry::new(
        StatusCode::OK,
        HeaderMap::new(),
        Bytes::from_static(b"{\"ok\":true}"),
        vec![],
        Freshness::plain(Duration::from_secs(3600), SystemTime::now()),
        tags,
    ))
}

fn key(i: usize) -> CacheKey {
    CacheKey::new(1, false, "api.example", &format!("/items/{i}?page=1"))
}

/// A store of `ENTRIES` entries; each carries the shared tag `all` when
/// `shared` is set, and its own unique tag when `unique` is set.
fn filled(shared: bool, unique: bool) -> Store {
    let store = Store::new(1 << 30, 1 << 20, 64);
    let all: Arc<str> = Arc::from("all");
    for i in 0..ENTRIES {
        let mut tags = Vec::new();
        if shared {
            tags.push(all.clone());
        }
        if unique {
            tags.push(Arc::from(format!("item:{i}")));
        }
        store.insert(key(i), entry(tags));
    }
    store
}

fn purge_tag(c: &mut Criterion) {
    let mut g = c.benchmark_group("purge_tag_100k");
    g.sample_size(10);
    g.bench_function("hard", |b| {
        b.iter_batched(
            || filled(true, false),
            |store| {
                assert_eq!(store.purge_tag("all", false), ENTRIES);
                store // dropped outside the measurement
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("soft", |b| {
        b.iter_batched(
            || filled(true, false),
            |store| {
                assert_eq!(store.purge_tag("all", true), ENTRIES);
                store
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup_hit");
    let req = HeaderMap::new();
    for (name, unique_tags) in [("empty_tag_index", false), ("100k_tag_index", true)] {
        let store = filled(false, unique_tags);
        assert_eq!(store.tag_count(), if unique_tags { ENTRIES } else { 0 });
        let keys: Vec<CacheKey> = (0..1024).map(|i| key(i * 97 % ENTRIES)).collect();
        let mut n = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                n = (n + 1) & 1023;
                black_box(store.lookup(black_box(&keys[n]), &req))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, purge_tag, lookup);
criterion_main!(benches);
