//! The response store: a sharded LRU bounded in bytes, with a tag index.
//!
//! Each shard is a mutex around an `lru::LruCache` of primary keys; a key
//! holds its Vary variants side by side. Bodies are `Bytes`, shared with every
//! response that serves them. The tag index lives in the same shard as the
//! keys it points at, so it changes under the same lock as the LRU and can
//! never point at an evicted entry (nor grow once entries are gone).

use super::key::CacheKey;
use super::policy::{self, Freshness};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};
use http::StatusCode;
use lru::LruCache;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Most variants kept per primary key; the oldest goes first.
const MAX_VARIANTS: usize = 32;
/// Fixed bookkeeping cost charged per entry besides its headers and body:
/// the `Arc<Entry>` allocation and its slot in the key's variant list.
const ENTRY_OVERHEAD: usize = 320;
/// Fixed cost per stored key besides its text: the LRU node and its hash
/// table slot.
const KEY_OVERHEAD: usize = 128;
/// Cost of one (tag, key) pair in the tag index: a key handle in a hash set
/// and, for a tag only this entry has, the set's own table and its slot in
/// the index (the key text itself is shared, charged once per key).
const TAG_INDEX_OVERHEAD: usize = 256;
/// Cost of one Vary field in an entry's secondary key, besides its bytes.
const VARY_FIELD_OVERHEAD: usize = 64;

/// A stored response.
#[derive(Debug, Clone)]
pub struct Entry {
    pub status: StatusCode,
    /// Response headers as stored: unstorable fields and `Age` removed.
    pub headers: StoredHeaders,
    pub body: Bytes,
    /// The secondary key: Vary field names and the request's values.
    pub vary: Box<[(HeaderName, Option<String>)]>,
    pub freshness: Freshness,
    pub tags: Box<[Arc<str>]>,
    /// Bytes charged against the store's budget for the entry itself (its
    /// key is charged once per key, see `key_charge`).
    pub charge: usize,
}

impl Entry {
    pub fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        vary: Vec<(HeaderName, Option<String>)>,
        freshness: Freshness,
        tags: Vec<Arc<str>>,
    ) -> Entry {
        let headers = StoredHeaders::from_map(&headers);
        let header_bytes = headers.charge();
        // A tag's text (shared with the index), its slot in the entry, and
        // the entry's share of the index: one hash-set slot per tag.
        let tag_bytes: usize = tags.iter().map(|t| t.len() + 32 + TAG_INDEX_OVERHEAD).sum();
        let vary_bytes: usize = vary
            .iter()
            .map(|(n, v)| {
                n.as_str().len() + v.as_ref().map_or(0, String::len) + VARY_FIELD_OVERHEAD
            })
            .sum();
        let charge = ENTRY_OVERHEAD + header_bytes + body.len() + tag_bytes + vary_bytes;
        Entry {
            status,
            headers,
            body,
            vary: vary.into_boxed_slice(),
            freshness,
            tags: tags.into_boxed_slice(),
            charge,
        }
    }

    /// Whether the entry can still be of any use at `now`: served stale under
    /// SWR / stale-if-error, or revalidated (when it has a validator) within
    /// `keep` past its lifetime.
    pub fn is_useful(&self, now: SystemTime, keep: Duration, grace: Duration) -> bool {
        let f = &self.freshness;
        let mut window = f.stale_while_revalidate.max(f.stale_if_error).max(grace);
        if self.headers.contains(&http::header::ETAG)
            || self.headers.contains(&http::header::LAST_MODIFIED)
        {
            window = window.max(keep);
        }
        f.staleness(now) <= window
    }

    /// A copy that is already stale (soft purge): still usable under
    /// stale-while-revalidate / stale-if-error, revalidated before a plain hit.
    pub fn marked_stale(&self) -> Entry {
        let mut e = self.clone();
        e.freshness.lifetime = Duration::ZERO;
        e.freshness.corrected_initial_age = e
            .freshness
            .corrected_initial_age
            .max(Duration::from_secs(1));
        e
    }
}

/// Response headers in the compact form an entry keeps: one buffer (a
/// single allocation, shared by every response built from it) holding a
/// little index of name and value lengths, then each field's name and value.
/// A `HeaderMap` costs several times as much per entry, and values parsed by
/// hyper would pin the connection's read buffer besides.
///
/// Layout: `count: u16`, then `count` x (`name_len: u16`, `value_len: u16`),
/// then the names and values, field after field. Names are stored in
/// `HeaderName`'s lowercase form.
#[derive(Debug, Clone)]
pub struct StoredHeaders {
    block: Bytes,
}

/// What an entry may cost beyond its body: headers, key, tags, Vary.
const MAX_ENTRY_EXTRA: usize = 512 * 1024;

/// Fields a stored response keeps at most.
const MAX_STORED_FIELDS: usize = 256;

impl StoredHeaders {
    /// Whether every field of `h` fits the compact form (at most 256
    /// fields, names and values under 64 KiB). A response that does not is
    /// not stored: a HIT must not lose headers the MISS had.
    pub fn fits(h: &HeaderMap) -> bool {
        h.len() <= MAX_STORED_FIELDS
            && h.iter()
                .all(|(n, v)| n.as_str().len() <= u16::MAX as usize && v.len() <= u16::MAX as usize)
    }

    /// The compact form; fields beyond what [`StoredHeaders::fits`] allows
    /// are dropped (callers check first).
    pub fn from_map(h: &HeaderMap) -> StoredHeaders {
        let fields: Vec<(&HeaderName, &http::HeaderValue)> = h
            .iter()
            .filter(|(n, v)| n.as_str().len() <= u16::MAX as usize && v.len() <= u16::MAX as usize)
            .take(MAX_STORED_FIELDS)
            .collect();
        let data: usize = fields.iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
        let mut block = Vec::with_capacity(2 + 4 * fields.len() + data);
        block.extend_from_slice(&(fields.len() as u16).to_le_bytes());
        for (n, v) in &fields {
            block.extend_from_slice(&(n.as_str().len() as u16).to_le_bytes());
            block.extend_from_slice(&(v.len() as u16).to_le_bytes());
        }
        for (n, v) in &fields {
            block.extend_from_slice(n.as_str().as_bytes());
            block.extend_from_slice(v.as_bytes());
        }
        StoredHeaders {
            block: Bytes::from(block),
        }
    }

    /// Each field as (name bytes, value range in the block).
    fn fields(&self) -> impl Iterator<Item = (&[u8], std::ops::Range<usize>)> + '_ {
        let b = &self.block[..];
        let count = b
            .get(..2)
            .map_or(0, |c| u16::from_le_bytes([c[0], c[1]]) as usize);
        let mut at = 2 + 4 * count;
        (0..count).map_while(move |i| {
            let lens = b.get(2 + 4 * i..2 + 4 * i + 4)?;
            let name_len = u16::from_le_bytes([lens[0], lens[1]]) as usize;
            let value_len = u16::from_le_bytes([lens[2], lens[3]]) as usize;
            let name = b.get(at..at + name_len)?;
            let value = at + name_len..at + name_len + value_len;
            at = value.end;
            Some((name, value))
        })
    }

    fn value(&self, range: std::ops::Range<usize>) -> Option<http::HeaderValue> {
        http::HeaderValue::from_maybe_shared(self.block.slice(range)).ok()
    }

    /// A `HeaderMap` for a response; values share the stored buffer.
    pub fn to_map(&self) -> HeaderMap {
        let count = self
            .block
            .get(..2)
            .map_or(0, |c| u16::from_le_bytes([c[0], c[1]]) as usize);
        let mut h = HeaderMap::with_capacity(count + 4);
        for (name, range) in self.fields() {
            if let (Ok(name), Some(v)) = (HeaderName::from_bytes(name), self.value(range)) {
                h.append(name, v);
            }
        }
        h
    }

    /// The first value of a field.
    pub fn get(&self, name: &HeaderName) -> Option<http::HeaderValue> {
        let wanted = name.as_str().as_bytes();
        let (_, range) = self.fields().find(|(n, _)| *n == wanted)?;
        self.value(range)
    }

    pub fn contains(&self, name: &HeaderName) -> bool {
        let wanted = name.as_str().as_bytes();
        self.fields().any(|(n, _)| n == wanted)
    }

    /// Bytes charged against the store's budget for these headers.
    fn charge(&self) -> usize {
        self.block.len() + 32
    }
}

/// Metadata of one stored entry, for listing (no body).
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntryInfo {
    pub key: String,
    pub path: String,
    pub version: u64,
    pub variant: Vec<(String, Option<String>)>,
    pub status: u16,
    pub size: usize,
    pub age_secs: u64,
    pub ttl_secs: i64,
    pub tags: Vec<String>,
}

struct Shard {
    lru: LruCache<CacheKey, Vec<Arc<Entry>>>,
    tags: HashMap<Arc<str>, HashSet<CacheKey>>,
    bytes: usize,
    /// Variants stored, kept as a count so reading it is O(1).
    entries: usize,
    budget: usize,
}

/// What a key's presence costs, besides its entries: the text (shared by
/// the LRU and every tag-index slot) and the LRU node.
fn key_charge(key: &CacheKey) -> usize {
    KEY_OVERHEAD + key.heap_bytes()
}

/// Everything a key and its variants are charged.
fn charge_of(key: &CacheKey, variants: &[Arc<Entry>]) -> usize {
    key_charge(key) + variants.iter().map(|e| e.charge).sum::<usize>()
}

impl Shard {
    fn unindex(&mut self, key: &CacheKey, variants: &[Arc<Entry>]) {
        for e in variants {
            for t in e.tags.iter() {
                if let Some(set) = self.tags.get_mut(t) {
                    set.remove(key);
                    if set.is_empty() {
                        self.tags.remove(t);
                    }
                }
            }
        }
    }

    fn index(&mut self, key: &CacheKey, variants: &[Arc<Entry>]) {
        for e in variants {
            for t in e.tags.iter() {
                self.tags.entry(t.clone()).or_default().insert(key.clone());
            }
        }
    }

    fn remove(&mut self, key: &CacheKey) -> usize {
        match self.lru.pop(key) {
            Some(variants) => {
                self.unindex(key, &variants);
                self.bytes -= charge_of(key, &variants);
                self.entries -= variants.len();
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
        self.bytes += charge_of(&key, &variants);
        self.entries += variants.len();
        self.index(&key, &variants);
        self.lru.put(key, variants);
    }

    fn evict_to_budget(&mut self) -> u64 {
        let mut evicted = 0;
        while self.bytes > self.budget {
            let Some((key, variants)) = self.lru.pop_lru() else {
                break;
            };
            self.unindex(&key, &variants);
            self.bytes -= charge_of(&key, &variants);
            self.entries -= variants.len();
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
pub enum Rewrite {
    Keep,
    Drop,
    Replace(Arc<Entry>),
}

/// Counters the store keeps for metrics.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub evictions: AtomicU64,
    pub expired: AtomicU64,
}

/// The bytes-bounded, sharded response store.
pub struct Store {
    shards: Box<[Mutex<Shard>]>,
    max_object_bytes: usize,
    /// Most one entry may be charged: the body limit plus room for a long
    /// key, a full set of headers, tags and Vary fields, within a shard.
    max_entry_charge: usize,
    pub stats: StoreStats,
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

impl Store {
    pub fn new(max_bytes: usize, max_object_bytes: usize, shards: usize) -> Store {
        let shards = shards.clamp(1, 1024);
        let budget = (max_bytes / shards).max(1);
        Store {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        lru: LruCache::unbounded(),
                        tags: HashMap::new(),
                        bytes: 0,
                        entries: 0,
                        budget,
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
        }
    }

    /// Largest body this store accepts; larger responses stream through.
    pub fn max_object_bytes(&self) -> usize {
        self.max_object_bytes
    }

    fn shard(&self, key: &CacheKey) -> MutexGuard<'_, Shard> {
        let i = (shard_hash(key) % self.shards.len() as u64) as usize;
        lock(&self.shards[i])
    }

    /// The stored variant that matches the request's Vary fields (9111 4.1),
    /// newest first. Marks the key recently used.
    pub fn lookup(&self, key: &CacheKey, req: &HeaderMap) -> Option<Arc<Entry>> {
        let mut shard = self.shard(key);
        let variants = shard.lru.get(key)?;
        variants
            .iter()
            .rev()
            .find(|e| e.vary.is_empty() || policy::vary_matches(&e.vary, req))
            .cloned()
    }

    /// Stores an entry, replacing the variant with the same secondary key.
    /// An entry that would cost more than an object may (body limit plus
    /// what its key, headers, tags and Vary may add) is not stored.
    pub fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        if entry.body.len() > self.max_object_bytes
            || key_charge(&key) + entry.charge > self.max_entry_charge
        {
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
            self.stats.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
    }

    /// Replaces one variant (after a 304 refresh) if it is still stored.
    pub fn replace(&self, key: &CacheKey, old: &Arc<Entry>, new: Arc<Entry>) {
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

    /// Removes (or soft-purges) every variant of one key; returns how many.
    pub fn purge_key(&self, key: &CacheKey, soft: bool) -> usize {
        let mut shard = self.shard(key);
        if soft {
            shard.rewrite(key, &mut |e| Rewrite::Replace(Arc::new(e.marked_stale())))
        } else {
            shard.remove(key)
        }
    }

    /// Visits every key whose path starts with `prefix` (all versions).
    pub fn purge_prefix(&self, prefix: &str, soft: bool) -> usize {
        self.purge_where(|k| k.path_and_query().starts_with(prefix), soft)
    }

    /// Every key of exactly this path and query (any host, scheme, version).
    pub fn purge_path(&self, path_and_query: &str, soft: bool) -> usize {
        self.purge_where(|k| k.path_and_query() == path_and_query, soft)
    }

    fn purge_where(&self, pred: impl Fn(&CacheKey) -> bool, soft: bool) -> usize {
        let mut total = 0;
        for s in self.shards.iter() {
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

    /// Removes (or soft-purges) every entry carrying `tag`.
    pub fn purge_tag(&self, tag: &str, soft: bool) -> usize {
        let mut total = 0;
        for s in self.shards.iter() {
            let mut shard = lock(s);
            // Taken out of the index whole: every key in it is rewritten
            // below, and rewriting re-indexes what stays (soft purge).
            let Some(keys) = shard.tags.remove(tag) else {
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

    /// Drops entries that can no longer be used at all, so expired content
    /// does not pin memory until the LRU gets to it. Returns how many.
    pub fn sweep(&self, now: SystemTime, keep: Duration, grace: Duration) -> usize {
        (0..self.shards.len())
            .map(|i| self.sweep_shard(i, now, keep, grace))
            .sum()
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Sweeps one shard. The sweeper walks the shards one at a time, so a
    /// large store never holds a lock, or the runtime, for a whole pass.
    pub fn sweep_shard(&self, i: usize, now: SystemTime, keep: Duration, grace: Duration) -> usize {
        let Some(s) = self.shards.get(i) else {
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
        self.stats
            .expired
            .fetch_add(total as u64, Ordering::Relaxed);
        total
    }

    /// Bytes charged and entries (variants) stored right now.
    pub fn usage(&self) -> (usize, usize) {
        let mut bytes = 0;
        let mut entries = 0;
        for s in self.shards.iter() {
            let shard = lock(s);
            bytes += shard.bytes;
            entries += shard.entries;
        }
        (bytes, entries)
    }

    /// Distinct tags indexed right now (to watch the index for leaks).
    pub fn tag_count(&self) -> usize {
        self.shards.iter().map(|s| lock(s).tags.len()).sum()
    }

    /// Lists entries in key order after `cursor`, filtered by path prefix
    /// and tag; returns the page and the cursor for the next one.
    pub fn list(
        &self,
        prefix: Option<&str>,
        tag: Option<&str>,
        cursor: Option<&str>,
        limit: usize,
        now: SystemTime,
    ) -> (Vec<EntryInfo>, Option<String>) {
        let mut rows: Vec<(String, EntryInfo)> = Vec::new();
        for s in self.shards.iter() {
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

/// A poisoned shard only means a panic elsewhere held it; the data is a
/// cache, so keep serving rather than propagate the panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
    fn stored_headers_round_trip() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        h.insert("etag", HeaderValue::from_static("\"e\""));
        let s = StoredHeaders::from_map(&h);
        assert_eq!(s.to_map(), h);
        assert_eq!(s.get(&http::header::ETAG).unwrap(), "\"e\"");
        assert!(s.contains(&HeaderName::from_static("x-multi")));
        assert!(!s.contains(&http::header::LAST_MODIFIED));
        assert_eq!(StoredHeaders::from_map(&HeaderMap::new()).to_map().len(), 0);
    }

    #[test]
    fn lookup_hits_and_shares_body() {
        let s = Store::new(1 << 20, 1 << 20, 4);
        let e = entry("hello", vec![], &[]);
        s.insert(key("/a"), e.clone());
        let got = s.lookup(&key("/a"), &HeaderMap::new()).unwrap();
        assert_eq!(got.body.as_ptr(), e.body.as_ptr());
        assert!(s.lookup(&key("/b"), &HeaderMap::new()).is_none());
    }

    #[test]
    fn rfc9111_4_1_variants_stored_side_by_side() {
        let s = Store::new(1 << 20, 1 << 20, 1);
        let name = HeaderName::from_static("accept-language");
        s.insert(
            key("/a"),
            entry("en", vec![(name.clone(), Some("en".into()))], &[]),
        );
        s.insert(
            key("/a"),
            entry("fr", vec![(name.clone(), Some("fr".into()))], &[]),
        );
        let mut req = HeaderMap::new();
        req.insert(name.clone(), HeaderValue::from_static("fr"));
        assert_eq!(s.lookup(&key("/a"), &req).unwrap().body, "fr");
        req.insert(name, HeaderValue::from_static("en"));
        assert_eq!(s.lookup(&key("/a"), &req).unwrap().body, "en");
        assert_eq!(s.usage().1, 2);
    }

    #[test]
    fn bounded_in_bytes_and_evicts_lru() {
        let s = Store::new(10_000, 10_000, 1);
        for i in 0..100 {
            s.insert(key(&format!("/{i}")), entry(&"x".repeat(500), vec![], &[]));
        }
        let (bytes, entries) = s.usage();
        assert!(bytes <= 10_000, "bytes {bytes}");
        assert!(entries < 100 && entries > 0);
        assert!(s.lookup(&key("/99"), &HeaderMap::new()).is_some());
        assert!(s.lookup(&key("/0"), &HeaderMap::new()).is_none());
        assert!(s.stats.evictions.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn oversized_objects_are_not_stored() {
        let s = Store::new(1 << 20, 100, 1);
        s.insert(key("/big"), entry(&"x".repeat(101), vec![], &[]));
        assert!(s.lookup(&key("/big"), &HeaderMap::new()).is_none());
    }

    #[test]
    fn tag_index_follows_eviction_and_purge() {
        let s = Store::new(20_000, 20_000, 2);
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
        let s = Store::new(1 << 20, 1 << 20, 1);
        s.insert(key("/a"), entry("x", vec![], &["t"]));
        assert_eq!(s.purge_tag("t", true), 1);
        let e = s.lookup(&key("/a"), &HeaderMap::new()).unwrap();
        assert!(!e.freshness.is_fresh(SystemTime::now()));
    }

    #[test]
    fn prefix_purge_and_listing() {
        let s = Store::new(1 << 20, 1 << 20, 4);
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
        let s = Store::new(1 << 20, 1 << 20, 1);
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
    }
}
