//! The memory storage: sharded, bounded in bytes, with a tag index.
//!
//! Each shard is a table of keys (each holding its Vary variants side by
//! side) that lookups read without taking a lock (see `eviction`), and a
//! mutex that writers take for the eviction rings and frequency sketch,
//! the bytes charged and the tag index. Bodies are `Bytes`, shared with every response that serves them.
//! The tag index lives in the same shard as the keys it points at, so it
//! changes under the same lock as the table and can never point at an
//! evicted entry.

use super::entry::{Entry, EntryMeta, MAX_ENTRY_EXTRA};
use super::eviction::{key_charge, key_hash, parts_hash, Clock, Slot, Table};
use super::frequency::FrequencySketch;
use super::tag_index::TagIndex;
use super::{MissHandler, Storage, TooLarge};
use crate::cache::key::{CacheKey, KeyParts};
use crate::cache::policy;
use bytes::Bytes;
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
    /// Read by lookups without a lock; changed only under `writer`.
    table: Table,
    writer: Mutex<Ledger>,
}

/// What a shard's writers change together.
struct Ledger {
    clock: Clock,
    tags: TagIndex,
}

/// A shard locked for writing.
struct ShardWriter<'a> {
    table: &'a Table,
    ledger: MutexGuard<'a, Ledger>,
}

impl ShardWriter<'_> {
    fn of(shard: &Shard) -> ShardWriter<'_> {
        ShardWriter {
            table: &shard.table,
            ledger: lock(&shard.writer),
        }
    }

    fn remove(&mut self, key: &CacheKey) -> usize {
        self.take(key).map_or(0, |slot| slot.variants().len())
    }

    /// Takes a key out, unindexing its tags.
    fn take(&mut self, key: &CacheKey) -> Option<Arc<Slot>> {
        let ledger = &mut *self.ledger;
        let slot = ledger.clock.pop(self.table, key)?;
        ledger.tags.unindex(key, slot.variants());
        Some(slot)
    }

    /// Replaces a key's variants (all of them) on an insert, keeping
    /// indexes and bytes right; the insert counts as a request for the key.
    fn put(&mut self, key: CacheKey, variants: Vec<Arc<Entry>>) {
        self.remove(&key);
        if variants.is_empty() {
            return;
        }
        let ledger = &mut *self.ledger;
        ledger.tags.index(&key, &variants);
        ledger.clock.push(self.table, key, variants);
    }

    /// Replaces a key's variants on a rewrite (not a request): the key
    /// keeps its ring and its count.
    fn put_rewritten(&mut self, key: CacheKey, variants: Vec<Arc<Entry>>) {
        let Some(old) = self.take(&key) else {
            return;
        };
        if variants.is_empty() {
            return;
        }
        let ledger = &mut *self.ledger;
        ledger.tags.index(&key, &variants);
        ledger.clock.push_rewritten(self.table, key, variants, &old);
    }

    fn evict_to_budget(&mut self) -> u64 {
        let ledger = &mut *self.ledger;
        let mut evicted = 0;
        while let Some(slot) = ledger.clock.pop_over_budget(self.table) {
            ledger.tags.unindex(&slot.key, slot.variants());
            evicted += slot.variants().len() as u64;
        }
        evicted
    }

    /// Applies `f` to every variant of `key`: keep, drop or replace it.
    fn rewrite(&mut self, key: &CacheKey, f: &mut impl FnMut(&Arc<Entry>) -> Rewrite) -> usize {
        let Some(slot) = self.table.peek(key) else {
            return 0;
        };
        let mut touched = 0;
        let mut next = Vec::with_capacity(slot.variants().len());
        for e in slot.variants().iter() {
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
            self.put_rewritten(slot.key.clone(), next);
        }
        touched
    }

    /// Every key and its variants (a snapshot; writers only).
    fn slots(&self) -> Vec<Arc<Slot>> {
        self.ledger.clock.slots(self.table)
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
    shards: Box<[Shard]>,
    max_object_bytes: usize,
    /// Most one entry may be charged: the body limit plus room for a long
    /// key, a full set of headers, tags and Vary fields, within a shard.
    max_entry_charge: usize,
    stats: StoreStats,
}

impl MemoryStorage {
    /// The key's entry when it is the key's only variant and has no
    /// secondary key (Vary): one a request may be answered from without
    /// its header fields being looked at (the HTTP/1.1 fast path has none
    /// parsed). Lent, and marked used, as `lookup_with` does.
    ///
    /// The key is given by its parts: nothing is allocated to find it.
    pub(crate) fn lookup_sole<R>(
        &self,
        key: &KeyParts<'_>,
        f: impl FnOnce(&Arc<Entry>) -> R,
    ) -> Option<R> {
        let hash = parts_hash(key);
        self.shard_at(hash)
            .table
            .find_by(
                hash,
                |k| k.is(key),
                |variants| match variants {
                    [e] if e.vary().is_empty() => {
                        e.mark_used();
                        Some(f(e))
                    }
                    _ => None,
                },
            )
            .flatten()
    }

    pub fn new(max_bytes: usize, max_object_bytes: usize, shards: usize) -> MemoryStorage {
        let shards = shards.clamp(1, 1024);
        let shard_bytes = (max_bytes / shards).max(1);
        let tables: Vec<Table> = (0..shards)
            .map(|_| Table::for_budget(shard_bytes))
            .collect();
        // The tables and frequency sketches are sized once from the budget
        // and paid out of it, so what is charged stays the bound.
        let budget = shard_bytes
            .saturating_sub(tables.first().map_or(0, Table::heap_bytes))
            .saturating_sub(FrequencySketch::heap_bytes_for(shard_bytes))
            .max(1);
        MemoryStorage {
            inner: Arc::new(Inner {
                shards: tables
                    .into_iter()
                    .map(|table| Shard {
                        table,
                        writer: Mutex::new(Ledger {
                            clock: Clock::new(budget),
                            tags: TagIndex::default(),
                        }),
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

    fn shard_at(&self, hash: u64) -> &Shard {
        let shards = &self.inner.shards;
        // High bits for the shard; the table uses the low ones.
        &shards[((hash >> 40) % shards.len() as u64) as usize]
    }

    /// The shard of `key`, locked for writing.
    fn writer(&self, key: &CacheKey) -> ShardWriter<'_> {
        ShardWriter::of(self.shard_at(key_hash(key)))
    }

    /// Whether an entry may be stored: its body within the object limit and
    /// its whole charge (body plus what its key, headers, tags and Vary
    /// add) within what one object may cost.
    fn admits(&self, key: &CacheKey, entry: &Entry) -> bool {
        entry.body_len() <= self.inner.max_object_bytes
            && key_charge(key) + entry.charge() <= self.inner.max_entry_charge
    }

    fn purge_where(&self, pred: impl Fn(&CacheKey) -> bool, soft: bool) -> usize {
        let mut total = 0;
        for s in self.inner.shards.iter() {
            let mut shard = ShardWriter::of(s);
            let keys: Vec<CacheKey> = shard
                .slots()
                .into_iter()
                .filter(|s| pred(&s.key))
                .map(|s| s.key.clone())
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
        let mut shard = ShardWriter::of(s);
        let keys: Vec<CacheKey> = shard
            .slots()
            .into_iter()
            .filter(|s| s.variants().iter().any(|e| !e.is_useful(now, keep, grace)))
            .map(|s| s.key.clone())
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
        self.inner
            .shards
            .iter()
            .map(|s| lock(&s.writer).tags.len())
            .sum()
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
            let shard = ShardWriter::of(s);
            for slot in shard.slots() {
                let (k, variants) = (&slot.key, slot.variants());
                if prefix.is_some_and(|p| !k.path_and_query().starts_with(p)) {
                    continue;
                }
                for (i, e) in variants.iter().enumerate() {
                    if tag.is_some_and(|t| !e.tags().iter().any(|x| &**x == t)) {
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
                                .vary()
                                .iter()
                                .map(|(n, v)| (n.as_str().to_string(), v.clone()))
                                .collect(),
                            status: e.status.as_u16(),
                            size: e.charge(),
                            age_secs: age.as_secs(),
                            ttl_secs: e.freshness.lifetime().as_secs() as i64
                                - age.as_secs() as i64,
                            tags: e.tags().iter().map(|t| t.to_string()).collect(),
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
        self.lookup_with(key, req, Arc::clone)
    }

    fn lookup_with<R>(
        &self,
        key: &CacheKey,
        req: &HeaderMap,
        f: impl FnOnce(&Arc<Entry>) -> R,
    ) -> Option<R> {
        // The hit path: no lock, and no shared write but the entry's
        // reference bit when it was clear. The entry is lent where it
        // lies, pinned by the table's arc-swap guards (a per-thread debt
        // slot, not the slot's or the entry's reference count).
        let hash = key_hash(key);
        self.shard_at(hash)
            .table
            .find(hash, key, |variants| {
                variants
                    .iter()
                    .rev()
                    .find(|e| e.vary().is_empty() || policy::vary_matches(e.vary(), req))
                    .map(|e| {
                        e.mark_used();
                        f(e)
                    })
            })
            .flatten()
    }

    fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        if !self.admits(&key, &entry) {
            return;
        }
        let mut shard = self.writer(&key);
        let mut variants: Vec<Arc<Entry>> = shard
            .table
            .peek(&key)
            .map(|slot| {
                slot.variants()
                    .iter()
                    .filter(|e| {
                        // A variant with the same field names and values is replaced.
                        e.vary() != entry.vary()
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
        let mut shard = self.writer(key);
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
        let mut shard = self.writer(key);
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
            let mut shard = ShardWriter::of(s);
            let Some(keys) = shard.ledger.tags.take(tag) else {
                continue;
            };
            for k in keys {
                total += shard.rewrite(&k, &mut |e| {
                    if !e.tags().iter().any(|t| &**t == tag) {
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
            let ledger = lock(&s.writer);
            bytes += ledger.clock.bytes();
            entries += ledger.clock.entries();
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
        // The copy shares one allocation with the header block.
        let entry = Entry::from_meta_chunks(meta, &chunks, len);
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
    fn bounded_in_bytes_and_evicts() {
        let s = MemoryStorage::new(10_000, 10_000, 1);
        for i in 0..100 {
            s.insert(key(&format!("/{i}")), entry(&"x".repeat(500), vec![], &[]));
        }
        let (bytes, entries) = s.usage();
        assert!(bytes <= 10_000, "bytes {bytes}");
        assert!(entries < 100 && entries > 0);
        // The newest is kept (never its own rival); which older keys stay
        // is the admission's choice (all were asked for once).
        assert!(s.lookup(&key("/99"), &HeaderMap::new()).is_some());
        assert_eq!(
            s.stats().evictions.load(Ordering::Relaxed),
            100 - entries as u64
        );
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
        assert_eq!(s.lookup(&key("/a"), &req).unwrap().body(), "en");
        assert_eq!(
            s.lookup(&key("/a"), &HeaderMap::new()).unwrap().body(),
            "any2"
        );
        assert_eq!(s.usage().1, 2);
    }

    /// A one-shard store with room for about `keys` entries of `body`
    /// bytes (plus the table and sketch the budget pays for), and the
    /// number of keys it holds once full.
    fn store_for(keys: usize, body: usize) -> MemoryStorage {
        let probe = MemoryStorage::new(1 << 30, 1 << 20, 1);
        probe.insert(key("/0"), entry(&"x".repeat(body), vec![], &[]));
        let budget = probe.usage().0 * keys;
        let overhead =
            Table::for_budget(budget).heap_bytes() + FrequencySketch::heap_bytes_for(budget);
        MemoryStorage::new(budget + overhead, 1 << 20, 1)
    }

    /// A request through the store: a hit, or a miss that stores the key.
    fn ask(s: &MemoryStorage, k: &CacheKey, body: &str) -> bool {
        let hit = s.lookup(k, &HeaderMap::new()).is_some();
        if !hit {
            s.insert(k.clone(), entry(body, vec![], &[]));
        }
        hit
    }

    /// An exact LRU of `cap` keys, for comparison: whether `k` was a hit.
    fn lru_ask(lru: &mut lru::LruCache<u64, ()>, k: u64, cap: usize) -> bool {
        if lru.get(&k).is_some() {
            return true;
        }
        lru.put(k, ());
        while lru.len() > cap.max(1) {
            lru.pop_lru();
        }
        false
    }

    /// The harness's working-set scenario in process: one fixed cycle over
    /// twice as many keys as fit. Any LRU (and CLOCK alone) evicts every
    /// key before it comes round again; the admission keeps a stable half.
    #[test]
    fn a_cycle_twice_the_cache_keeps_a_stable_half() {
        const FIT: usize = 2_000;
        const CYCLES: usize = 8;
        let body = "b".repeat(1024);
        let s = store_for(FIT, 1024);
        let mut lru = lru::LruCache::<u64, ()>::unbounded();
        let (mut hits, mut lru_hits, mut asked) = (0, 0, 0);
        for cycle in 0..CYCLES {
            for k in 0..2 * FIT as u64 {
                let hit = ask(&s, &key(&format!("/{k}")), &body);
                let lru_hit = lru_ask(&mut lru, k, s.usage().1);
                // The first cycle only fills: all misses for both.
                if cycle > 0 {
                    asked += 1;
                    hits += usize::from(hit);
                    lru_hits += usize::from(lru_hit);
                }
            }
        }
        let ratio = |h: usize| 100.0 * h as f64 / asked as f64;
        let (tinylfu, exact) = (ratio(hits), ratio(lru_hits));
        eprintln!("cyclic hit ratio: W-TinyLFU {tinylfu:.1} %, LRU {exact:.1} %");
        assert!(
            tinylfu >= 40.0,
            "W-TinyLFU {tinylfu:.1} % (LRU {exact:.1} %)"
        );
    }

    /// A hot set that keeps being asked for survives a scan of one-hit keys
    /// twice the cache's size, though each hot key is asked for only once
    /// while the scan passes (CLOCK alone would evict it: its hand goes
    /// round more often than that).
    #[test]
    fn a_hot_set_survives_a_scan_larger_than_the_cache() {
        const FIT: usize = 1_000;
        const HOT: usize = FIT / 4;
        let body = "b".repeat(1024);
        let s = store_for(FIT, 1024);
        let hot = |i: usize| key(&format!("/hot/{}", i % HOT));
        for i in 0..3 * HOT {
            ask(&s, &hot(i), &body);
        }
        let mut scan_hot_hits = 0;
        for j in 0..2 * FIT {
            ask(&s, &key(&format!("/scan/{j}")), &body);
            if j % 8 == 0 {
                scan_hot_hits += usize::from(ask(&s, &hot(j / 8), &body));
            }
        }
        let kept = (0..HOT)
            .filter(|&i| s.shard_at(key_hash(&hot(i))).table.peek(&hot(i)).is_some())
            .count();
        eprintln!("scan: {kept} of {HOT} hot keys kept, {scan_hot_hits} hot hits during it");
        assert!(kept >= HOT * 9 / 10, "{kept} of {HOT} hot keys kept");
        assert!(scan_hot_hits >= HOT * 9 / 10, "{scan_hot_hits} hot hits");
    }

    /// A full cache of keys asked for once still lets in a new key that is
    /// asked for again, and keeps it through a run of one-hit keys twice as
    /// long as the cache.
    #[test]
    fn a_new_key_asked_for_again_gets_in() {
        const FIT: usize = 1_000;
        let body = "b".repeat(1024);
        let s = store_for(FIT, 1024);
        let mut filler = 0;
        let mut fill = |s: &MemoryStorage, n: usize| {
            for _ in 0..n {
                ask(s, &key(&format!("/fill/{filler}")), &body);
                filler += 1;
            }
        };
        fill(&s, 2 * FIT);
        let new = key("/new");
        for _ in 0..3 {
            ask(&s, &new, &body);
            fill(&s, FIT / 10);
        }
        // Looked at without a lookup's reference bit: kept for its count.
        let holds = |k: &CacheKey| s.shard_at(key_hash(k)).table.peek(k).is_some();
        assert!(holds(&new), "admitted");
        fill(&s, 2 * FIT);
        assert!(holds(&new), "kept");
    }

    /// On a skewed trace over twice as many keys as fit, the store's hit
    /// ratio is not more than 5 points below an exact LRU holding as many
    /// entries (frequency admission does better on such traces).
    #[test]
    fn hit_ratio_not_five_points_below_lru() {
        const KEYS: u64 = 20_000;
        const REQUESTS: usize = 200_000;
        let s = store_for(KEYS as usize / 2, 1);
        let mut lru = lru::LruCache::<u64, ()>::unbounded();
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let (mut hits, mut lru_hits) = (0usize, 0usize);
        for _ in 0..REQUESTS {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Skewed: u^3 puts most requests on the first keys.
            let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
            let k = ((u * u * u) * KEYS as f64) as u64;
            hits += usize::from(ask(&s, &key(&format!("/{k}")), "x"));
            // The LRU holds as many keys as the store does now.
            lru_hits += usize::from(lru_ask(&mut lru, k, s.usage().1));
        }
        let ratio = |h: usize| 100.0 * h as f64 / REQUESTS as f64;
        let (tinylfu, exact) = (ratio(hits), ratio(lru_hits));
        eprintln!("skewed hit ratio: W-TinyLFU {tinylfu:.1} %, LRU {exact:.1} %");
        assert!(
            tinylfu >= exact - 5.0,
            "W-TinyLFU {tinylfu:.1} % against LRU {exact:.1} %"
        );
        assert!(
            tinylfu > 20.0,
            "the trace must have hits to compare ({tinylfu:.1} %)"
        );
    }

    #[test]
    fn lookup_sole_finds_a_lone_vary_less_entry_by_its_parts() {
        let s = MemoryStorage::new(1 << 20, 1 << 20, 4);
        fn parts<'a>(host: &'a str, path: &'a str) -> KeyParts<'a> {
            KeyParts {
                version: 1,
                tls: false,
                host,
                path_and_query: path,
            }
        }
        for i in 0..50 {
            s.insert(key(&format!("/k{i}")), entry(&format!("b{i}"), vec![], &[]));
        }
        for i in 0..50 {
            let path = format!("/k{i}");
            // The same shard and bucket as the built key: the hashes agree.
            let body = s.lookup_sole(&parts("H", &path), |e| e.body());
            assert_eq!(body, Some(Bytes::from(format!("b{i}"))));
        }
        assert!(s.lookup_sole(&parts("h", "/k50"), |_| ()).is_none());
        assert!(s
            .lookup_sole(
                &KeyParts {
                    tls: true,
                    ..parts("h", "/k1")
                },
                |_| ()
            )
            .is_none());
        // A key with a secondary key, or more than one variant, is not
        // answered without looking at the request's fields.
        let lang = HeaderName::from_static("accept-language");
        s.insert(
            key("/v"),
            entry("en", vec![(lang.clone(), Some("en".into()))], &[]),
        );
        assert!(s.lookup_sole(&parts("h", "/v"), |_| ()).is_none());
        s.insert(key("/v"), entry("any", vec![], &[]));
        assert!(s.lookup_sole(&parts("h", "/v"), |_| ()).is_none());
        assert!(s
            .lookup_with(&key("/v"), &HeaderMap::new(), |_| ())
            .is_some());
    }

    #[test]
    fn lookups_from_many_threads_while_writers_churn() {
        let s = MemoryStorage::new(64 * 1024, 4096, 2);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        for i in 0..200 {
                            if let Some(e) = s.lookup(&key(&format!("/{i}")), &HeaderMap::new()) {
                                assert_eq!(e.body(), format!("body-{i}"));
                            }
                        }
                    }
                });
            }
            for round in 0..50 {
                for i in 0..200 {
                    s.insert(
                        key(&format!("/{i}")),
                        entry(&format!("body-{i}"), vec![], &[]),
                    );
                }
                if round % 5 == 0 {
                    s.purge_prefix("/1", false);
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        let (bytes, entries) = s.usage();
        assert!(
            bytes <= 64 * 1024 && entries > 0,
            "{bytes} bytes, {entries} entries"
        );
    }

    #[test]
    fn lookup_with_lends_the_entry_without_a_reference() {
        let s = MemoryStorage::new(1 << 20, 1 << 20, 1);
        let stored = entry("x", vec![], &[]);
        s.insert(key("/a"), stored.clone());
        let counts = s.lookup_with(&key("/a"), &HeaderMap::new(), |e| {
            assert!(Arc::ptr_eq(e, &stored));
            Arc::strong_count(e)
        });
        // Ours and the slot's: the lookup took none of its own.
        assert_eq!(counts, Some(2));
        assert_eq!(s.lookup_with(&key("/b"), &HeaderMap::new(), |_| ()), None);
        let lang = HeaderName::from_static("accept-language");
        s.insert(
            key("/v"),
            entry("en", vec![(lang.clone(), Some("en".into()))], &[]),
        );
        let mut de = HeaderMap::new();
        de.insert(lang, http::HeaderValue::from_static("de"));
        assert_eq!(
            s.lookup_with(&key("/v"), &de, |_| ()),
            None,
            "no variant matches"
        );
    }

    #[test]
    fn clones_share_the_shards() {
        let s = MemoryStorage::new(1 << 20, 1 << 20, 4);
        let c = s.clone();
        c.insert(key("/a"), entry("x", vec![], &[]));
        assert!(s.lookup(&key("/a"), &HeaderMap::new()).is_some());
    }
}
