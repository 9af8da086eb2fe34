//! The byte budget is the memory bound: hostile traffic (long hosts, many
//! tags, many Vary variants) leaves the heap within `cache.max_bytes` plus a
//! fixed overhead. The heap is measured exactly, by a counting allocator
//! around the system one, while a real gateway serves real sockets in this
//! process.

mod common;
use common::*;
use kvgate::cache::Storage;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MAX_BYTES: usize = 2 * 1024 * 1024;
/// Buffers of the client, origin and gateway connections, the runtime,
/// the single-flight table and the like: independent of what is cached.
const FIXED_OVERHEAD: isize = 1024 * 1024;

#[tokio::test(flavor = "current_thread")]
async fn long_hosts_and_many_tags_stay_within_the_budget() {
    let origin = Origin::start(|s, _| {
        // 64 distinct tags per response, unique to each path.
        let tags: Vec<String> = (0..64)
            .map(|i| format!("tag-{}-{i:02}-{}", s.path, "t".repeat(24)))
            .collect();
        Reply::ok(&"b".repeat(1024))
            .header("cache-control", "max-age=600")
            .header("surrogate-key", &tags.join(" "))
            .header("vary", "x-variant")
    })
    .await;
    let gw = Gateway::start(&origin.url(), |c| {
        c.cache.max_bytes = MAX_BYTES;
        c.cache.shards = 4;
        c.cache.max_object_bytes = 64 * 1024;
    })
    .await;
    let long_host = |i: usize| format!("{i}.{}", "h".repeat(40 * 1024));
    // Warm up every connection and buffer before the baseline.
    get_with(&gw.url("/warm"), &[("host", &long_host(0))]).await;
    origin.forget();
    let before = LIVE.load(Ordering::Relaxed);
    let mut stored = 0;
    for i in 0..200 {
        let r = get_with(
            &gw.url(&format!("/p{i}")),
            &[("host", &long_host(i)), ("x-variant", &"v".repeat(4096))],
        )
        .await;
        assert_eq!(r.status, 200);
        if r.header("cache-status").contains("stored") {
            stored += 1;
        }
    }
    origin.forget();
    let after = LIVE.load(Ordering::Relaxed);
    let (charged, entries) = gw.running.gateway.store.usage();
    let grown = after - before;
    eprintln!("heap grew {grown} bytes; charged {charged} in {entries} entries; {stored} stored");
    assert!(
        stored > 20,
        "the test must actually store entries ({stored})"
    );
    assert!(entries > 0 && charged <= MAX_BYTES);
    assert!(
        grown <= MAX_BYTES as isize + FIXED_OVERHEAD,
        "heap grew {grown} bytes for a {MAX_BYTES}-byte budget"
    );
    // The charge is the bound, not an estimate under it: what the cache
    // holds costs no more than it was charged (with the fixed overhead).
    assert!(
        grown <= charged as isize + FIXED_OVERHEAD,
        "heap grew {grown} bytes; {charged} charged"
    );
}
