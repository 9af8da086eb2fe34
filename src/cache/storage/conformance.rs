//! The behaviour every [`Storage`] must show, run against each one by its
//! tests through [`storage_conformance_tests!`]. Each check builds its own
//! storage from `make(max_bytes, max_object_bytes)`.

use super::{Entry, EntryMeta, Storage, TooLarge};
use crate::cache::key::CacheKey;
use crate::cache::policy::Freshness;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Builds a storage of `max_bytes` in all that stores bodies of at most
/// `max_object_bytes`.
pub(crate) type Make = dyn Fn(usize, usize) -> Box<dyn Storage>;

/// One `#[test]` per check, for the storage `$make` builds.
macro_rules! storage_conformance_tests {
    ($make:expr) => {
        mod conformance {
            use super::*;
            use $crate::cache::storage::conformance as check;
            fn make(
                max_bytes: usize,
                max_object_bytes: usize,
            ) -> Box<dyn $crate::cache::storage::Storage> {
                Box::new(($make)(max_bytes, max_object_bytes))
            }
            #[test]
            fn lookup_hits_and_shares_body() {
                check::lookup_hits_and_shares_body(&make)
            }
            #[test]
            fn rfc9111_4_1_variants_stored_side_by_side() {
                check::rfc9111_4_1_variants_stored_side_by_side(&make)
            }
            #[test]
            fn replace_after_304() {
                check::replace_after_304(&make)
            }
            #[test]
            fn purge_key_hard_and_soft() {
                check::purge_key_hard_and_soft(&make)
            }
            #[test]
            fn purge_prefix_and_path() {
                check::purge_prefix_and_path(&make)
            }
            #[test]
            fn purge_tag_hard_and_soft() {
                check::purge_tag_hard_and_soft(&make)
            }
            #[test]
            fn bounded_in_bytes_and_keeps_keys_in_use() {
                check::bounded_in_bytes_and_keeps_keys_in_use(&make)
            }
            #[test]
            fn oversized_objects_are_not_stored() {
                check::oversized_objects_are_not_stored(&make)
            }
            #[test]
            fn miss_handler_assembles_chunks() {
                check::miss_handler_assembles_chunks(&make)
            }
            #[test]
            fn miss_handler_over_the_limit_stores_nothing() {
                check::miss_handler_over_the_limit_stores_nothing(&make)
            }
            #[test]
            fn miss_handler_dropped_unfinished_stores_nothing() {
                check::miss_handler_dropped_unfinished_stores_nothing(&make)
            }
        }
    };
}
pub(crate) use storage_conformance_tests;

const MIB: usize = 1 << 20;

fn meta(vary: Vec<(HeaderName, Option<String>)>, tags: &[&str]) -> EntryMeta {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("text/plain"));
    EntryMeta {
        status: StatusCode::OK,
        headers,
        vary,
        freshness: Freshness::plain(Duration::from_secs(60), SystemTime::now()),
        tags: tags.iter().map(|t| Arc::from(*t)).collect(),
    }
}

fn entry(body: &str, vary: Vec<(HeaderName, Option<String>)>, tags: &[&str]) -> Arc<Entry> {
    Arc::new(Entry::from_meta(
        meta(vary, tags),
        Bytes::from(body.to_string()),
    ))
}

fn key(p: &str) -> CacheKey {
    CacheKey::new(1, false, "h", p)
}

fn lang() -> HeaderName {
    HeaderName::from_static("accept-language")
}

fn lang_req(v: &'static str) -> HeaderMap {
    let mut req = HeaderMap::new();
    req.insert(lang(), HeaderValue::from_static(v));
    req
}

fn lang_entry(body: &str, v: &str, tags: &[&str]) -> Arc<Entry> {
    entry(body, vec![(lang(), Some(v.into()))], tags)
}

fn get(s: &dyn Storage, p: &str) -> Option<Arc<Entry>> {
    s.lookup(&key(p), &HeaderMap::new())
}

fn is_fresh(e: &Entry) -> bool {
    e.freshness.is_fresh(SystemTime::now())
}

pub(crate) fn lookup_hits_and_shares_body(make: &Make) {
    let s = make(MIB, MIB);
    assert!(get(&*s, "/a").is_none());
    assert_eq!(s.usage(), (0, 0));
    let e = entry("hello", vec![], &[]);
    s.insert(key("/a"), e.clone());
    let got = get(&*s, "/a").unwrap();
    assert_eq!(got.body().as_ptr(), e.body().as_ptr());
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.headers().get(&http::header::CONTENT_TYPE).unwrap(),
        "text/plain"
    );
    assert!(get(&*s, "/b").is_none());
    let (bytes, entries) = s.usage();
    assert_eq!(entries, 1);
    assert!(bytes >= 5, "the body is charged: {bytes}");
}

pub(crate) fn rfc9111_4_1_variants_stored_side_by_side(make: &Make) {
    let s = make(MIB, MIB);
    s.insert(key("/a"), lang_entry("en", "en", &[]));
    s.insert(key("/a"), lang_entry("fr", "fr", &[]));
    assert_eq!(s.lookup(&key("/a"), &lang_req("fr")).unwrap().body(), "fr");
    assert_eq!(s.lookup(&key("/a"), &lang_req("en")).unwrap().body(), "en");
    assert!(s.lookup(&key("/a"), &lang_req("de")).is_none());
    assert_eq!(s.usage().1, 2);
    // The same secondary key replaces its variant, leaving the other.
    s.insert(key("/a"), lang_entry("fr2", "fr", &[]));
    assert_eq!(s.lookup(&key("/a"), &lang_req("fr")).unwrap().body(), "fr2");
    assert_eq!(s.lookup(&key("/a"), &lang_req("en")).unwrap().body(), "en");
    assert_eq!(s.usage().1, 2);
}

pub(crate) fn replace_after_304(make: &Make) {
    let s = make(MIB, MIB);
    s.insert(key("/a"), lang_entry("en", "en", &[]));
    s.insert(key("/a"), lang_entry("fr", "fr", &[]));
    let old = s.lookup(&key("/a"), &lang_req("fr")).unwrap();
    let refreshed = lang_entry("fr", "fr", &["refreshed"]);
    s.replace(&key("/a"), &old, refreshed.clone());
    let got = s.lookup(&key("/a"), &lang_req("fr")).unwrap();
    assert!(Arc::ptr_eq(&got, &refreshed));
    assert_eq!(s.lookup(&key("/a"), &lang_req("en")).unwrap().body(), "en");
    assert_eq!(s.usage().1, 2);
    // The refreshed entry is indexed under its tags.
    assert_eq!(s.purge_tag("refreshed", false), 1);
    assert_eq!(s.usage().1, 1);

    // Gone meanwhile: the refreshed entry is stored as a miss would be.
    let old = s.lookup(&key("/a"), &lang_req("en")).unwrap();
    assert_eq!(s.purge_key(&key("/a"), false), 1);
    s.replace(&key("/a"), &old, lang_entry("en2", "en", &[]));
    assert_eq!(s.lookup(&key("/a"), &lang_req("en")).unwrap().body(), "en2");
    assert_eq!(s.usage().1, 1);
}

pub(crate) fn purge_key_hard_and_soft(make: &Make) {
    let s = make(MIB, MIB);
    s.insert(key("/a"), lang_entry("en", "en", &[]));
    s.insert(key("/a"), lang_entry("fr", "fr", &[]));
    s.insert(key("/b"), entry("b", vec![], &[]));
    assert_eq!(s.purge_key(&key("/a"), true), 2);
    let en = s.lookup(&key("/a"), &lang_req("en")).unwrap();
    assert!(!is_fresh(&en), "a soft purge leaves the entry stale");
    assert_eq!(en.body(), "en");
    assert_eq!(s.usage().1, 3);
    assert_eq!(s.purge_key(&key("/a"), false), 2);
    assert!(s.lookup(&key("/a"), &lang_req("en")).is_none());
    assert_eq!(s.purge_key(&key("/a"), false), 0);
    assert!(is_fresh(&get(&*s, "/b").unwrap()));
    assert_eq!(s.usage().1, 1);
}

pub(crate) fn purge_prefix_and_path(make: &Make) {
    let s = make(MIB, MIB);
    for (v, tls, host, path) in [
        (1, false, "a.example", "/api/x?q=1"),
        (1, true, "b.example", "/api/x?q=1"),
        (2, false, "a.example", "/api/x?q=1"),
        (1, false, "a.example", "/api/x?q=12"),
        (1, false, "a.example", "/api/y"),
        (1, false, "a.example", "/static/z"),
    ] {
        s.insert(CacheKey::new(v, tls, host, path), entry("x", vec![], &[]));
    }
    // Exact path and query, on every host, scheme and version.
    assert_eq!(s.purge_path("/api/x?q=1", false), 3);
    assert_eq!(s.usage().1, 3);
    assert_eq!(s.purge_path("/api/x?q=1", false), 0);
    // Soft: kept, stale.
    assert_eq!(s.purge_prefix("/api/", true), 2);
    assert_eq!(s.usage().1, 3);
    let y = s
        .lookup(
            &CacheKey::new(1, false, "a.example", "/api/y"),
            &HeaderMap::new(),
        )
        .unwrap();
    assert!(!is_fresh(&y));
    assert_eq!(s.purge_prefix("/api/", false), 2);
    assert_eq!(s.usage().1, 1);
    let z = s
        .lookup(
            &CacheKey::new(1, false, "a.example", "/static/z"),
            &HeaderMap::new(),
        )
        .unwrap();
    assert!(is_fresh(&z));
}

pub(crate) fn purge_tag_hard_and_soft(make: &Make) {
    let s = make(MIB, MIB);
    s.insert(key("/a"), lang_entry("en", "en", &["t", "en"]));
    s.insert(key("/a"), lang_entry("fr", "fr", &["fr"]));
    s.insert(key("/b"), entry("b", vec![], &["t"]));
    s.insert(key("/c"), entry("c", vec![], &["other"]));
    assert_eq!(s.purge_tag("unknown", false), 0);
    assert_eq!(s.purge_tag("t", true), 2);
    assert!(!is_fresh(&get(&*s, "/b").unwrap()));
    assert!(!is_fresh(&s.lookup(&key("/a"), &lang_req("en")).unwrap()));
    assert!(is_fresh(&s.lookup(&key("/a"), &lang_req("fr")).unwrap()));
    assert_eq!(s.usage().1, 4);
    // Soft-purged entries keep their tags.
    assert_eq!(s.purge_tag("t", false), 2);
    assert!(get(&*s, "/b").is_none());
    assert!(s.lookup(&key("/a"), &lang_req("en")).is_none());
    // The key's other variant stays.
    assert!(s.lookup(&key("/a"), &lang_req("fr")).is_some());
    assert!(get(&*s, "/c").is_some());
    assert_eq!(s.usage().1, 2);
    assert_eq!(
        s.purge_tag("en", false),
        0,
        "purged entries leave the index"
    );
}

pub(crate) fn bounded_in_bytes_and_keeps_keys_in_use(make: &Make) {
    let s = make(10_000, 10_000);
    s.insert(key("/hot"), entry("hot", vec![], &[]));
    for i in 0..100 {
        s.insert(key(&format!("/{i}")), entry(&"x".repeat(500), vec![], &[]));
        // Used after every insert: a key in use is not the one evicted.
        assert!(get(&*s, "/hot").is_some(), "/hot evicted after /{i}");
    }
    let (bytes, entries) = s.usage();
    assert!(bytes <= 10_000, "bytes {bytes}");
    assert!(entries < 100 && entries > 0, "{entries} entries");
    // The newest stays; which of the older, unused ones go is the store's
    // choice (the memory store admits by frequency, not recency).
    assert!(get(&*s, "/99").is_some());
    // Everything evicted leaves its charge behind.
    for i in 0..100 {
        s.purge_key(&key(&format!("/{i}")), false);
    }
    s.purge_key(&key("/hot"), false);
    assert_eq!(s.usage(), (0, 0));
}

pub(crate) fn oversized_objects_are_not_stored(make: &Make) {
    let s = make(MIB, 100);
    assert_eq!(s.max_object_bytes(), 100);
    s.insert(key("/big"), entry(&"x".repeat(101), vec![], &[]));
    assert!(get(&*s, "/big").is_none());
    s.insert(key("/fits"), entry(&"x".repeat(100), vec![], &[]));
    assert!(get(&*s, "/fits").is_some());
    // Nor an entry whose extras (here, tags) take it past what an object may cost.
    let many: Vec<String> = (0..4096).map(|i| format!("tag-{i:04}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    s.insert(key("/tags"), entry("x", vec![], &many));
    assert!(get(&*s, "/tags").is_none());
    assert_eq!(s.usage().1, 1);
}

pub(crate) fn miss_handler_assembles_chunks(make: &Make) {
    let s = make(MIB, 100);
    let mut h = s.miss_handler(key("/a"), meta(vec![(lang(), Some("en".into()))], &["t"]));
    for c in ["he", "", "llo", " world"] {
        h.write(Bytes::from(c)).unwrap();
    }
    assert!(
        s.lookup(&key("/a"), &lang_req("en")).is_none(),
        "nothing is stored before finish"
    );
    // The handler owns what it needs: it may finish on another thread.
    std::thread::spawn(move || h.finish())
        .join()
        .unwrap()
        .unwrap();
    let got = s.lookup(&key("/a"), &lang_req("en")).unwrap();
    assert_eq!(got.body(), "hello world");
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.headers().get(&http::header::CONTENT_TYPE).unwrap(),
        "text/plain"
    );
    assert!(s.lookup(&key("/a"), &lang_req("fr")).is_none());
    assert_eq!(s.purge_tag("t", false), 1);

    // A body exactly at the limit, and an empty one, are stored.
    let mut h = s.miss_handler(key("/full"), meta(vec![], &[]));
    h.write(Bytes::from("x".repeat(60))).unwrap();
    h.write(Bytes::from("x".repeat(40))).unwrap();
    h.finish().unwrap();
    assert_eq!(get(&*s, "/full").unwrap().body_len(), 100);
    s.miss_handler(key("/empty"), meta(vec![], &[]))
        .finish()
        .unwrap();
    assert_eq!(get(&*s, "/empty").unwrap().body(), "");
}

pub(crate) fn miss_handler_over_the_limit_stores_nothing(make: &Make) {
    let s = make(MIB, 100);
    s.insert(key("/a"), entry("old", vec![], &[]));
    let mut h = s.miss_handler(key("/a"), meta(vec![], &[]));
    h.write(Bytes::from("x".repeat(60))).unwrap();
    assert_eq!(h.write(Bytes::from("x".repeat(41))), Err(TooLarge));
    assert_eq!(h.write(Bytes::from("x")), Err(TooLarge), "stays refused");
    assert_eq!(h.finish(), Err(TooLarge));
    // What was stored before is left as it was.
    assert_eq!(get(&*s, "/a").unwrap().body(), "old");
    assert_eq!(s.usage().1, 1);

    // Extras too large for an object are refused at finish.
    let many: Vec<String> = (0..4096).map(|i| format!("tag-{i:04}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let mut h = s.miss_handler(key("/tags"), meta(vec![], &many));
    h.write(Bytes::from("x")).unwrap();
    assert_eq!(h.finish(), Err(TooLarge));
    assert!(get(&*s, "/tags").is_none());
}

pub(crate) fn miss_handler_dropped_unfinished_stores_nothing(make: &Make) {
    let s = make(MIB, 100);
    let mut h = s.miss_handler(key("/a"), meta(vec![], &[]));
    h.write(Bytes::from("partial")).unwrap();
    drop(h);
    assert!(get(&*s, "/a").is_none());
    assert_eq!(s.usage(), (0, 0));
}
