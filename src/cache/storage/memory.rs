//! The memory storage: a sharded LRU bounded in bytes, with a tag index.
//!
//! Each shard is a mutex around its eviction LRU (keys, each holding its
//! Vary variants side by side) and its tag index. Bodies are `Bytes`, shared
//! with every response that serves them. The tag index lives in the same
//! shard as the keys it points at, so it changes under the same lock as the
//! LRU and can never point at an evicted entry.

use super::entry::{Entry, EntryMeta, MAX_ENTRY_EXTRA};
use super::eviction::{key_charge, BudgetedLru};
use super::tag_index::TagIndex;
use super::{MissHandler, Storage, TooLarge};
use crate::cache::key::CacheKey;
use crate::cache::policy;
use bytes::{Bytes, BytesMut};
use http::header::HeaderMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Most variants kept per primary key; the oldest goes first.
const MAX_VARIANTS: usize = 32;

/// Metadata of one stored entry, for listing (no body).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct EntryInfo {
    pub(crate) key: String,
    pub(crate) path: String,
    pub(crate) version: u64,
    pub(crate) variant: Vec<(String, Option<String>)>,
    pub(crate) status: u16,
    pub(crate) size: usize,
    pub(crate) age_secs: u64,
    pub(crate) ttl_secs: i64,
    pub(crate) tags: Vec<String>,
}

struct Shard {
    lru: BudgetedLru,
    tags: TagIndex,
}

impl Shard {
    fn remove(&mut self, key: &CacheKey) -> usize {
        match self.lru.pop(key) {
            Some(variants) => {
                self.tags.unindex(key, &variants);
                variants.len()
            }
            None => 0,
        }
    }

    /// Replaces a key's variants (all of them), keeping indexes and bytes right.
    fn put(&mut self, key: CacheKey, variants: Vec<Arc<Entry>>) {
        self.remove(&key);
        if variants.is_empty() {
            return;
        }
        self.tags.index(&key, &variants);
        self.lru.push(key, variants);
    }

    fn evict_to_budget(&mut self) -> u64 {
        let mut evicted = 0;
        while let Some((key, variants)) = self.lru.pop_over_budget() {
            self.tags.unindex(&key, &variants);
            evicted += variants.len() as u64;
        }
        evicted
    }

    /// Applies `f` to every variant of `key`: keep, drop or replace it.
    fn rewrite(&mut self, key: &CacheKey, f: &mut impl FnMut(&Arc<Entry>) -> Rewrite) -> usize {
        let Some(variants) = self.lru.peek(key) else {
            return 0;
        };
        let mut touched = 0;
        let mut next = Vec::with_capacity(variants.len());
        for e in variants {
            match f(e) {
                Rewrite::Keep => next.push(e.clone()),
                Rewrite::Drop => touched += 1,
                Rewrite::Replace(n) => {
                    touched += 1;
                    next.push(n)
                }
            }
        }
        if touched > 0 {
            let key = key.clone();
            self.put(key, next);
        }
        touched
    }
}

/// What to do with one entry during a scan.
enum Rewrite {
    Keep,
    Drop,
    Replace(Arc<Entry>),
}

/// Counters the store keeps for metrics.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Entries dropped to stay within the byte budget.
    pub evictions: AtomicU64,
    pub(crate) expired: AtomicU64,
}

/// The bytes-bounded, sharded response store. Cheap to clone: clones share
/// the shards (a miss handler holds one).
#[derive(Clone)]
pub struct MemoryStorage {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    max_object_bytes: usize,
    /// Most one entry may be charged: the body limit plus room for a long
    /// key, a full set of headers, tags and Vary fields, within a shard.
    max_entry_charge: usize,
    stats: StoreStats,
}

fn shard_hash(key: &CacheKey) -> u64 {
    // FNV-1a: cheap, and the LRU's own hasher does the heavy lifting.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ key.version();
    for b in key.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl MemoryStorage {
    pub fn new(max_bytes: usize, max_object_bytes: usize, shards: usize) -> MemoryStorage {
        let shards = shards.clamp(1, 1024);
        let budget = (max_bytes / shards).max(1);
        MemoryStorage {
            inner: Arc::new(Inner {
                shards: (0..shards)
                    .map(|_| {
                        Mutex::new(Shard {
                            lru: BudgetedLru::new(budget),
                            tags: TagIndex::default(),
                        })
                    })
                    .collect(),
                // An object may not take more than a shard's budget.
                max_object_bytes: max_object_bytes.min(budget),
                max_entry_charge: max_object_bytes
                    .min(budget)
                    .saturating_add(MAX_ENTRY_EXTRA)
                    .min(budget),
                stats: StoreStats::default(),
            }),
        }
    }

    /// Evictions and expiries so far, for metrics.
    pub fn stats(&self) -> &StoreStats {
        &self.inner.stats
    }

    fn shard(&self, key: &CacheKey) -> MutexGuard<'_, Shard> {
        let shards = &self.inner.shards;
        let i = (shard_hash(key) % shards.len() as u64) as usize;
        lock(&shards[i])
    }

    /// Whether an entry may be stored: its body within the object limit and
    /// its whole charge (body plus what its key, headers, tags and Vary
    /// add) within what one object may cost.
    fn admits(&self, key: &CacheKey, entry: &Entry) -> bool {
        entry.body.len() <= self.inner.max_object_bytes
            && key_charge(key) + entry.charge <= self.inner.max_entry_charge
    }

    fn purge_where(&self, pred: impl Fn(&CacheKey) -> bool, soft: bool) -> usize {
        let mut total = 0;
        for s in self.inner.shards.iter() {
            let mut shard = lock(s);
            let keys: Vec<CacheKey> = shard
                .lru
                .iter()
                .map(|(k, _)| k)
                .filter(|k| pred(k))
                .cloned()
                .collect();
            for k in keys {
                total += if soft {
                    shard.rewrite(&k, &mut |e| Rewrite::Replace(Arc::new(e.marked_stale())))
                } else {
                    shard.remove(&k)
                };
            }
        }
        total
    }

    /// Drops entries that can no longer be used at all, so expired content
    /// does not pin memory until the LRU gets to it. Returns how many.
    pub fn sweep(&self, now: SystemTime, keep: Duration, grace: Duration) -> usize {
        (0..self.shard_count())
            .map(|i| self.sweep_shard(i, now, keep, grace))
            .sum()
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.inner.shards.len()
    }

    /// Sweeps one shard. The sweeper walks the shards one at a time, so a
    /// large store never holds a lock, or the runtime, for a whole pass.
    pub(crate) fn sweep_shard(
        &self,
        i: usize,
        now: SystemTime,
        keep: Duration,
        grace: Duration,
    ) -> usize {
        let Some(s) = self.inner.shards.get(i) else {
            return 0;
        };
        let mut shard = lock(s);
        let keys: Vec<CacheKey> = shard
            .lru
            .iter()
            .filter(|(_, v)| v.iter().any(|e| !e.is_useful(now, keep, grace)))
            .map(|(k, _)| k.clone())
            .collect();
        let mut total = 0;
        for k in keys {
            total += shard.rewrite(&k, &mut |e| {
                if e.is_useful(now, keep, grace) {
                    Rewrite::Keep
                } else {
                    Rewrite::Drop
                }
            });
        }
        drop(shard);
        self.inner
            .stats
            .expired
            .fetch_add(total as u64, Ordering::Relaxed);
        total
    }

    /// Distinct tags indexed right now (to watch the index for leaks).
    pub fn tag_count(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).tags.len()).sum()
    }

    /// Lists entries in key order after `cursor`, filtered by path prefix
    /// and tag; returns the page and the cursor for the next one.
    pub(crate) fn list(
        &self,
        prefix: Option<&str>,
        tag: Option<&str>,
        cursor: Option<&str>,
        limit: usize,
        now: SystemTime,
    ) -> (Vec<EntryInfo>, Option<String>) {
        let mut rows: Vec<(String, EntryInfo)> = Vec::new();
        for s in self.inner.shards.iter() {
            let shard = lock(s);
            for (k, variants) in shard.lru.iter() {
                if prefix.is_some_and(|p| !k.path_and_query().starts_with(p)) {
                    continue;
                }
                for (i, e) in variants.iter().enumerate() {
                    if tag.is_some_and(|t| !e.tags.iter().any(|x| &**x == t)) {
                        continue;
                    }
                    let sort_key = format!("{}\u{0}{:020}\u{0}{:04}", k.as_str(), k.version(), i);
                    if cursor.is_some_and(|c| sort_key.as_str() <= c) {
                        continue;
                    }
                    let age = e.freshness.current_age(now);
                    rows.push((
                        sort_key,
                        EntryInfo {
                            key: k.as_str().to_string(),
                            path: k.path_and_query().to_string(),
                            version: k.version(),
                            variant: e
                                .vary
                                .iter()
                                .map(|(n, v)| (n.as_str().to_string(), v.clone()))
                                .collect(),
                            status: e.status.as_u16(),
                            size: e.charge,
                            age_secs: age.as_secs(),
                            ttl_secs: e.freshness.lifetime.as_secs() as i64 - age.as_secs() as i64,
                            tags: e.tags.iter().map(|t| t.to_string()).collect(),
                        },
                    ));
                }
            }
        }
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = if more {
            rows.last().map(|r| r.0.clone())
        } else {
            None
        };
        (rows.into_iter().map(|r| r.1).collect(), next)
    }
}

impl Storage for MemoryStorage {
    fn max_object_bytes(&self) -> usize {
        self.inner.max_object_bytes
    }

    fn lookup(&self, key: &CacheKey, req: &HeaderMap) -> Option<Arc<Entry>> {
        let mut shard = self.shard(key);
        let variants = shard.lru.get(key)?;
        variants
            .iter()
            .rev()
            .find(|e| e.vary.is_empty() || policy::vary_matches(&e.vary, req))
            .cloned()
    }

    fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        if !self.admits(&key, &entry) {
            return;
        }
        let mut shard = self.shard(&key);
        let mut variants: Vec<Arc<Entry>> = shard
            .lru
            .peek(&key)
            .map(|v| {
                v.iter()
                    .filter(|e| {
                        // A variant with the same field names and values is replaced.
                        let same_names = e.vary.len() == entry.vary.len()
                            && e.vary
                                .iter()
                                .zip(entry.vary.iter())
                                .all(|(a, b)| a.0 == b.0);
                        !(same_names && e.vary == entry.vary)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if variants.len() >= MAX_VARIANTS {
            variants.remove(0);
        }
        variants.push(entry);
        shard.put(key, variants);
        let evicted = shard.evict_to_budget();
        drop(shard);
        if evicted > 0 {
            self.inner
                .stats
                .evictions
                .fetch_add(evicted, Ordering::Relaxed);
        }
    }

    fn miss_handler(&self, key: CacheKey, meta: EntryMeta) -> Box<dyn MissHandler> {
        Box::new(MemoryMiss {
            storage: self.clone(),
            key,
            meta,
            body: Some(Vec::new()),
            len: 0,
        })
    }

    fn replace(&self, key: &CacheKey, old: &Arc<Entry>, new: Arc<Entry>) {
        let mut shard = self.shard(key);
        let mut new = Some(new);
        shard.rewrite(key, &mut |e| {
            if Arc::ptr_eq(e, old) {
                new.take().map_or(Rewrite::Keep, Rewrite::Replace)
            } else {
                Rewrite::Keep
            }
        });
        if new.is_some() {
            // The old one was evicted or purged meanwhile: store the fresh one.
            drop(shard);
            if let Some(n) = new {
                self.insert(key.clone(), n);
            }
        }
    }

    fn purge_key(&self, key: &CacheKey, soft: bool) -> usize {
        let mut shard = self.shard(key);
        if soft {
            shard.rewrite(key, &mut |e| Rewrite::Replace(Arc::new(e.marked_stale())))
        } else {
            shard.remove(key)
        }
    }

    fn purge_prefix(&self, prefix: &str, soft: bool) -> usize {
        self.purge_where(|k| k.path_and_query().starts_with(prefix), soft)
    }

    fn purge_path(&self, path_and_query: &str, soft: bool) -> usize {
        self.purge_where(|k| k.path_and_query() == path_and_query, soft)
    }

    fn purge_tag(&self, tag: &str, soft: bool) -> usize {
        let mut total = 0;
        for s in self.inner.shards.iter() {
            let mut shard = lock(s);
            let Some(keys) = shard.tags.take(tag) else {
                continue;
            };
            for k in keys {
                total += shard.rewrite(&k, &mut |e| {
                    if !e.tags.iter().any(|t| &**t == tag) {
                        Rewrite::Keep
                    } else if soft {
                        Rewrite::Replace(Arc::new(e.marked_stale()))
                    } else {
                        Rewrite::Drop
                    }
                });
            }
        }
        total
    }

    fn usage(&self) -> (usize, usize) {
        let mut bytes = 0;
        let mut entries = 0;
        for s in self.inner.shards.iter() {
            let shard = lock(s);
            bytes += shard.lru.bytes();
            entries += shard.lru.entries();
        }
        (bytes, entries)
    }
}

/// A body streaming into the memory storage: chunks are kept as they come
/// and joined once at the end (one chunk is kept as it is, uncopied).
struct MemoryMiss {
    storage: MemoryStorage,
    key: CacheKey,
    meta: EntryMeta,
    /// `None` once the body outgrew the limit.
    body: Option<Vec<Bytes>>,
    len: usize,
}

impl MissHandler for MemoryMiss {
    fn write(&mut self, chunk: Bytes) -> Result<(), TooLarge> {
        let Some(body) = &mut self.body else {
            return Err(TooLarge);
        };
        self.len = self.len.saturating_add(chunk.len());
        if self.len > self.storage.inner.max_object_bytes {
            // Nothing will be stored: free what was held now.
            self.body = None;
            return Err(TooLarge);
        }
        if !chunk.is_empty() {
            body.push(chunk);
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), TooLarge> {
        let MemoryMiss {
            storage,
            key,
            meta,
            body,
            len,
        } = *self;
        let chunks = body.ok_or(TooLarge)?;
        // Always one exact-size copy, even of a single chunk: chunks read
        // from a connection may be slices of a larger read buffer, which a
        // long-lived entry must not pin (its charge counts only its length).
        let mut joined = BytesMut::with_capacity(len);
        for c in &chunks {
            joined.extend_from_slice(c);
        }
        let body = joined.freeze();
        let entry = Entry::from_meta(meta, body);
        if !storage.admits(&key, &entry) {
            return Err(TooLarge);
        }
        storage.insert(key, Arc::new(entry));
        Ok(())
    }
}

/// A poisoned shard only means a panic elsewhere held it; the data is a
/// cache, so keep serving rather than propagate the panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::Freshness;
    use crate::cache::storage::conformance::storage_conformance_tests;
    use http::{HeaderName, StatusCode};

    storage_conformance_tests!(|max_bytes, max_object_bytes| MemoryStorage::new(
        max_bytes,
        max_object_bytes,
        4
    ));

    fn entry(body: &str, vary: Vec<(HeaderName, Option<String>)>, tags: &[&str]) -> Arc<Entry> {
        Arc::new(Entry::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from(body.to_string()),
            vary,
            Freshness::plain(Duration::from_secs(60), SystemTime::now()),
            tags.iter().map(|t| Arc::from(*t)).collect(),
        ))
    }

    fn key(p: &str) -> CacheKey {
        CacheKey::new(1, false, "h", p)
    }

    #[test]
    fn bounded_in_bytes_and_evicts_lru() {
        let s = MemoryStorage::new(10_000, 10_000, 1);
        for i in 0..100 {
            s.insert(key(&format!("/{i}")), entry(&"x".repeat(500), vec![], &[]));
        }
        let (bytes, entries) = s.usage();
        assert!(bytes <= 10_000, "bytes {bytes}");
        assert!(entries < 100 && entries > 0);
        assert!(s.lookup(&key("/99"), &HeaderMap::new()).is_some());
        assert!(s.lookup(&key("/0"), &HeaderMap::new()).is_none());
        assert!(s.stats().evictions.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn tag_index_follows_eviction_and_purge() {
        let s = MemoryStorage::new(20_000, 20_000, 2);
        for i in 0..1000 {
            s.insert(
                key(&format!("/{i}")),
                entry("x", vec![], &[&format!("t{i}"), "all"]),
            );
        }
        // bounded: the index holds only tags of entries still stored
        let (_, entries) = s.usage();
        assert!(
            s.tag_count() <= entries + 2,
            "{} tags for {entries} entries",
            s.tag_count()
        );
        let purged = s.purge_tag("all", false);
        assert_eq!(purged, entries);
        assert_eq!(s.usage(), (0, 0));
        assert_eq!(s.tag_count(), 0);
    }

    #[test]
    fn soft_purge_keeps_entry_but_stale() {
        let s = MemoryStorage::new(1 << 20, 1 << 20, 1);
        s.insert(key("/a"), entry("x", vec![], &["t"]));
        assert_eq!(s.purge_tag("t", true), 1);
        let e = s.lookup(&key("/a"), &HeaderMap::new()).unwrap();
        assert!(!e.freshness.is_fresh(SystemTime::now()));
        assert_eq!(s.tag_count(), 1, "a soft-purged entry stays indexed");
    }

    #[test]
    fn prefix_purge_and_listing() {
        let s = MemoryStorage::new(1 << 20, 1 << 20, 4);
        for p in ["/api/a", "/api/b", "/static/c"] {
            s.insert(key(p), entry("x", vec![], &[]));
        }
        let (page, next) = s.list(Some("/api/"), None, None, 1, SystemTime::now());
        assert_eq!(page.len(), 1);
        let (page2, next2) = s.list(Some("/api/"), None, next.as_deref(), 1, SystemTime::now());
        assert_eq!(page2.len(), 1);
        assert_ne!(page[0].path, page2[0].path);
        assert!(next2.is_none());
        assert_eq!(s.purge_prefix("/api/", false), 2);
        assert_eq!(s.usage().1, 1);
    }

    #[test]
    fn sweep_drops_useless_entries() {
        let s = MemoryStorage::new(1 << 20, 1 << 20, 1);
        s.insert(key("/a"), entry("x", vec![], &[]));
        assert_eq!(
            s.sweep(
                SystemTime::now() + Duration::from_secs(120),
                Duration::ZERO,
                Duration::ZERO
            ),
            1
        );
        assert_eq!(s.usage(), (0, 0));
        assert_eq!(s.stats().expired.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn replace_keeps_the_variant_in_place() {
        // Both variants match a request with `accept-language: en`; the newest
        // wins. Refreshing the older one must not make it the newest.
        let s = MemoryStorage::new(1 << 20, 1 << 20, 1);
        let lang = HeaderName::from_static("accept-language");
        s.insert(key("/a"), entry("any", vec![], &[]));
        s.insert(
            key("/a"),
            entry("en", vec![(lang.clone(), Some("en".into()))], &[]),
        );
        let mut req = HeaderMap::new();
        req.insert(lang, http::HeaderValue::from_static("en"));
        let any = s.lookup(&key("/a"), &HeaderMap::new()).unwrap();
        s.replace(&key("/a"), &any, entry("any2", vec![], &[]));
        assert_eq!(s.lookup(&key("/a"), &req).unwrap().body, "en");
        assert_eq!(
            s.lookup(&key("/a"), &HeaderMap::new()).unwrap().body,
            "any2"
        );
        assert_eq!(s.usage().1, 2);
    }

    #[test]
    fn clones_share_the_shards() {
        let s = MemoryStorage::new(1 << 20, 1 << 20, 4);
        let c = s.clone();
        c.insert(key("/a"), entry("x", vec![], &[]));
        assert!(s.lookup(&key("/a"), &HeaderMap::new()).is_some());
    }
}
