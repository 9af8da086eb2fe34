//! Hits on 16 hot keys from 1 and 2 threads: how the store's hit path
//! scales with cores. A hit that takes an exclusive lock or writes a shared
//! line (LRU promotion under a mutex, as the store did before) serialises
//! the threads; the store's lock-free table should not.
//!
//! Each hit does what the gateway's hit path does with the store: the
//! lookup, the response's `HeaderMap` from the stored block, and a handle
//! on the body (`Bytes`: a reference count shared by every core serving
//! that entry, which no hit can avoid). Entries are stored as a streamed
//! miss stores them (headers and body in one allocation).
//!
//! `cargo bench --bench store_scaling`: criterion reports hits per second
//! (elements/s) for each thread count; the scaling is the ratio of the
//! 2-thread figure to the 1-thread one. `store` lends the entry in place
//! (`lookup_with`, the gateway's hit path); `store_arc` takes an
//! `Arc<Entry>` out first (`lookup`, the hit path before); `mutex_lru` is
//! the design before that (one `lru::LruCache` behind a mutex per shard,
//! promoted on every hit), measured alongside for reference.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, HeaderValue, StatusCode};
use kvgate::cache::{CacheKey, Entry, Freshness, Storage, Store};

/// What a hit takes from an entry to build its response.
fn serve(e: &Entry) -> (HeaderMap, Bytes) {
    (e.header_map(), e.body())
}
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime};

const HOT_KEYS: usize = 16;

fn entry() -> Arc<Entry> {
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert(
        "cache-control",
        HeaderValue::from_static("public, max-age=3600"),
    );
    Arc::new(Entry::streamed(
        StatusCode::OK,
        h,
        &[Bytes::from(vec![b'x'; 1024])],
        Freshness::plain(Duration::from_secs(3600), SystemTime::now()),
    ))
}

fn keys() -> Vec<CacheKey> {
    (0..HOT_KEYS)
        .map(|i| CacheKey::new(1, false, "h", &format!("/static/hot-{i}")))
        .collect()
}

/// The previous design's hit path: a shard mutex and an LRU promotion.
struct MutexLru {
    hasher: RandomState,
    shards: Vec<Mutex<lru::LruCache<CacheKey, Arc<Entry>>>>,
}

impl MutexLru {
    fn shard(&self, key: &CacheKey) -> &Mutex<lru::LruCache<CacheKey, Arc<Entry>>> {
        &self.shards[self.hasher.hash_one(key) as usize % self.shards.len()]
    }

    fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.shard(key).lock().unwrap().get(key).cloned()
    }
}

/// Runs `iters` lookups on each of `threads` threads at once; the time from
/// the common start to the last thread's end.
fn timed(
    threads: usize,
    iters: u64,
    keys: &[CacheKey],
    look: &(dyn Fn(&CacheKey) + Sync),
) -> Duration {
    let start = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for t in 0..threads {
            let start = &start;
            s.spawn(move || {
                start.wait();
                // Threads start on different keys, as separate clients would.
                let first = t * HOT_KEYS / threads.max(1);
                for i in 0..iters as usize {
                    look(&keys[(first + i) % HOT_KEYS]);
                }
            });
        }
        start.wait();
        let began = Instant::now();
        // Leaving the scope joins every thread.
        began
    })
    .elapsed()
}

fn benches(c: &mut Criterion) {
    let keys = keys();
    let store = Store::new(256 << 20, 8 << 20, 64);
    for k in &keys {
        store.insert(k.clone(), entry());
    }
    let req = HeaderMap::new();
    let lru = MutexLru {
        hasher: RandomState::new(),
        shards: (0..64)
            .map(|_| Mutex::new(lru::LruCache::unbounded()))
            .collect(),
    };
    for k in &keys {
        lru.shard(k).lock().unwrap().put(k.clone(), entry());
    }

    let mut g = c.benchmark_group("hits_16_hot_keys");
    for threads in [1usize, 2] {
        // One element per lookup: elements/s is the store's hit throughput.
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_with_input(BenchmarkId::new("store", threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                timed(t, iters, &keys, &|k| {
                    black_box(store.lookup_with(k, &req, |e| serve(e)));
                })
            })
        });
        g.bench_with_input(BenchmarkId::new("store_arc", threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                timed(t, iters, &keys, &|k| {
                    black_box(store.lookup(k, &req).map(|e| serve(&e)));
                })
            })
        });
        g.bench_with_input(BenchmarkId::new("mutex_lru", threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                timed(t, iters, &keys, &|k| {
                    black_box(lru.get(k).map(|e| serve(&e)));
                })
            })
        });
    }
    g.finish();
}

criterion_group!(scaling, benches);
criterion_main!(scaling);
