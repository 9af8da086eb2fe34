//! In-memory backend, for tests and for deployments that accept losing
//! state on restart: `BTreeMap`s in shards, each under its own mutex.
//!
//! Why shards: with `[edge]`, a returning visitor's hit reads its state here
//! on every request. Under one mutex every core would take the same lock on
//! every such hit; keys hash to one of [`SHARDS`], so cores serving different
//! users mostly take different locks. Listing merges the shards' ordered
//! ranges (admin and definition polling, not the request path).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

use super::{
    check_key, clamp_limit, is_expired, now_ms, prepare_put, time_from_ms, KeyInfo, Kv, KvEntry,
    KvError, KvFuture, ListPage, PutItem, PutOptions, Reads,
};

/// Expired entries removed per put: bounded so no single write pays for a
/// large backlog, yet enough to outpace the rate at which entries expire.
const SWEEP_PER_PUT: usize = 64;

/// Shards of the key space (a power of two).
const SHARDS: usize = 32;

struct Stored {
    value: Bytes,
    metadata: Option<serde_json::Value>,
    /// Milliseconds since the Unix epoch; 0 = never.
    expires_ms: u64,
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<String, Stored>,
    /// (expiry, key) for every entry with a TTL, so sweeping finds the
    /// expired ones without scanning the whole map.
    expiry: BTreeSet<(u64, String)>,
}

impl Inner {
    fn remove(&mut self, key: &str) -> Option<Stored> {
        let old = self.entries.remove(key)?;
        if old.expires_ms != 0 {
            self.expiry.remove(&(old.expires_ms, key.to_owned()));
        }
        Some(old)
    }

    fn insert(&mut self, item: PutItem, expires_ms: u64) {
        self.remove(&item.key);
        if expires_ms != 0 {
            self.expiry.insert((expires_ms, item.key.clone()));
        }
        self.entries.insert(
            item.key,
            Stored {
                value: item.value,
                metadata: item.opts.metadata,
                expires_ms,
            },
        );
    }

    fn sweep(&mut self, now: u64, max: usize) -> usize {
        let due: Vec<(u64, String)> = self
            .expiry
            .iter()
            .take_while(|(at, _)| is_expired(*at, now))
            .take(max)
            .cloned()
            .collect();
        for (at, key) in &due {
            self.expiry.remove(&(*at, key.clone()));
            self.entries.remove(key);
        }
        due.len()
    }
}

/// A [`Kv`] in process memory: state is lost on restart.
pub struct MemoryKv {
    shards: Box<[Mutex<Inner>]>,
    /// The shard the next put also sweeps, so that every shard's expired
    /// entries go in turn, whichever shards the puts land on.
    sweep_next: AtomicUsize,
}

impl Default for MemoryKv {
    fn default() -> Self {
        MemoryKv {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            sweep_next: AtomicUsize::new(0),
        }
    }
}

/// The shard `key` lives in (FNV-1a: keys are short, and not chosen by
/// clients alone: the edge builds them from its own prefixes and ids).
fn shard_of(key: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    ((h ^ (h >> 32)) as usize) & (SHARDS - 1)
}

impl MemoryKv {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes every expired entry now; returns how many were removed.
    #[cfg(test)]
    pub(crate) fn sweep_expired(&self) -> usize {
        let now = now_ms();
        (0..SHARDS)
            .map(|i| self.lock(i).sweep(now, usize::MAX))
            .sum()
    }

    /// Number of entries held, expired ones not yet swept included.
    #[cfg(test)]
    pub(crate) fn len_including_expired(&self) -> usize {
        (0..SHARDS).map(|i| self.lock(i).entries.len()).sum()
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated in
        // a way that matters (each operation is a few map calls), so recover.
        self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get_now(&self, key: &str) -> Result<Option<KvEntry>, KvError> {
        check_key(key)?;
        let now = now_ms();
        Self::read(&mut self.lock(shard_of(key)), key, now)
    }

    /// Every key at one clock reading, each under its shard's lock.
    fn get_many_now(&self, keys: &[&str]) -> Reads {
        let now = now_ms();
        keys.iter()
            .map(|key| {
                check_key(key)?;
                Self::read(&mut self.lock(shard_of(key)), key, now)
            })
            .collect()
    }

    /// Sweeps the next shard in turn (after a put, with no lock held).
    fn sweep_one(&self, now: u64) {
        let i = self.sweep_next.fetch_add(1, Ordering::Relaxed) & (SHARDS - 1);
        self.lock(i).sweep(now, SWEEP_PER_PUT);
    }

    /// The live entry at `key` at `now` (an expired one is removed).
    fn read(inner: &mut Inner, key: &str, now: u64) -> Result<Option<KvEntry>, KvError> {
        let Some(stored) = inner.entries.get(key) else {
            return Ok(None);
        };
        if is_expired(stored.expires_ms, now) {
            inner.remove(key);
            return Ok(None);
        }
        Ok(Some(KvEntry {
            value: stored.value.clone(),
            metadata: stored.metadata.clone(),
            expires_at: time_from_ms(stored.expires_ms),
        }))
    }

    fn put_now(&self, key: &str, value: Bytes, opts: PutOptions) -> Result<(), KvError> {
        self.put_batch_now(vec![PutItem {
            key: key.to_owned(),
            value,
            opts,
        }])
    }

    /// Checks every item first, then stores them all with every shard they
    /// go to locked (in shard order: no two batches wait on each other), so
    /// a reader sees all of the batch or none of it.
    fn put_batch_now(&self, items: Vec<PutItem>) -> Result<(), KvError> {
        let mut checked = Vec::with_capacity(items.len());
        for item in items {
            check_key(&item.key)?;
            let (expires_ms, _) = prepare_put(&item.opts)?;
            checked.push((shard_of(&item.key), item, expires_ms));
        }
        let mut shards: Vec<usize> = checked.iter().map(|(shard, _, _)| *shard).collect();
        shards.sort_unstable();
        shards.dedup();
        let mut locked: Vec<(usize, MutexGuard<'_, Inner>)> =
            shards.into_iter().map(|i| (i, self.lock(i))).collect();
        for (shard, item, expires_ms) in checked {
            if let Some((_, inner)) = locked.iter_mut().find(|(i, _)| *i == shard) {
                inner.insert(item, expires_ms);
            }
        }
        let now = now_ms();
        for (_, inner) in locked.iter_mut() {
            inner.sweep(now, SWEEP_PER_PUT);
        }
        drop(locked);
        self.sweep_one(now);
        Ok(())
    }

    /// Checks for a live entry and stores under one lock: atomic.
    fn put_if_absent_now(
        &self,
        key: &str,
        value: Bytes,
        opts: PutOptions,
    ) -> Result<bool, KvError> {
        check_key(key)?;
        let (expires_ms, _) = prepare_put(&opts)?;
        let now = now_ms();
        let mut inner = self.lock(shard_of(key));
        if inner
            .entries
            .get(key)
            .is_some_and(|s| !is_expired(s.expires_ms, now))
        {
            return Ok(false);
        }
        let item = PutItem {
            key: key.to_owned(),
            value,
            opts,
        };
        inner.insert(item, expires_ms);
        inner.sweep(now, SWEEP_PER_PUT);
        drop(inner);
        self.sweep_one(now);
        Ok(true)
    }

    fn delete_now(&self, key: &str) -> Result<bool, KvError> {
        check_key(key)?;
        let now = now_ms();
        let removed = self.lock(shard_of(key)).remove(key);
        Ok(removed.is_some_and(|old| !is_expired(old.expires_ms, now)))
    }

    fn list_now(
        &self,
        prefix: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, KvError> {
        let limit = clamp_limit(limit);
        let now = now_ms();
        // Each shard's first `limit + 1` live keys in range, merged: the
        // page is the first `limit` of them all, and one more means more.
        let mut keys = Vec::new();
        for shard in 0..SHARDS {
            let inner = self.lock(shard);
            let start = super::list_start(prefix, cursor);
            let live = inner
                .entries
                .range::<str, _>((start, Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(_, s)| !is_expired(s.expires_ms, now))
                .take(limit + 1);
            keys.extend(live.map(|(name, stored)| KeyInfo {
                name: name.clone(),
                metadata: stored.metadata.clone(),
                expires_at: time_from_ms(stored.expires_ms),
            }));
        }
        keys.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let more = keys.len() > limit;
        keys.truncate(limit);
        Ok(ListPage::new(keys, more))
    }
}

// Every operation is a few map calls under a shard's mutex, so the work
// runs inline in the returned future.
impl Kv for MemoryKv {
    fn get<'a>(&'a self, key: &'a str) -> KvFuture<'a, Option<KvEntry>> {
        Box::pin(async move { self.get_now(key) })
    }

    fn get_many<'a>(&'a self, keys: &'a [&'a str]) -> KvFuture<'a, Reads> {
        Box::pin(async move { Ok(self.get_many_now(keys)) })
    }

    fn put<'a>(&'a self, key: &'a str, value: Bytes, opts: PutOptions) -> KvFuture<'a, ()> {
        Box::pin(async move { self.put_now(key, value, opts) })
    }

    fn put_batch<'a>(&'a self, items: Vec<PutItem>) -> KvFuture<'a, ()> {
        Box::pin(async move { self.put_batch_now(items) })
    }

    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        opts: PutOptions,
    ) -> KvFuture<'a, bool> {
        Box::pin(async move { self.put_if_absent_now(key, value, opts) })
    }

    fn delete<'a>(&'a self, key: &'a str) -> KvFuture<'a, bool> {
        Box::pin(async move { self.delete_now(key) })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> KvFuture<'a, ListPage> {
        Box::pin(async move { self.list_now(prefix, cursor, limit) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::conformance;
    use std::time::Duration;

    #[tokio::test]
    async fn put_get_delete() {
        conformance::put_get_delete(&MemoryKv::new()).await;
    }

    #[tokio::test]
    async fn metadata_round_trips() {
        conformance::metadata_round_trips(&MemoryKv::new()).await;
    }

    #[tokio::test]
    async fn ttl_expiry() {
        conformance::ttl_expiry(&MemoryKv::new()).await;
        conformance::get_many(&MemoryKv::new()).await;
    }

    #[tokio::test]
    async fn list_prefix_and_cursor() {
        conformance::list_prefix_and_cursor(&MemoryKv::new()).await;
    }

    #[tokio::test]
    async fn refusals() {
        conformance::refusals(&MemoryKv::new()).await;
    }

    #[tokio::test]
    async fn put_batch() {
        conformance::put_batch(&MemoryKv::new()).await;
    }

    #[tokio::test]
    async fn put_if_absent() {
        conformance::put_if_absent(&MemoryKv::new()).await;
    }

    #[tokio::test]
    async fn puts_sweep_expired_entries() {
        let kv = MemoryKv::new();
        for i in 0..10 {
            kv.put(
                &format!("gone:{i}"),
                Bytes::new(),
                PutOptions::ttl(Duration::from_millis(10)),
            )
            .await
            .unwrap();
        }
        assert_eq!(kv.len_including_expired(), 10);
        tokio::time::sleep(Duration::from_millis(30)).await;
        // Each put sweeps its own shard and the next in turn: one put per
        // shard reaches them all, wherever the expired entries are.
        for _ in 0..SHARDS {
            kv.put("keep", Bytes::new(), PutOptions::default())
                .await
                .unwrap();
        }
        assert_eq!(kv.len_including_expired(), 1);
    }

    #[test]
    fn keys_spread_over_the_shards() {
        let mut used = [0usize; SHARDS];
        for i in 0..SHARDS * 64 {
            used[shard_of(&format!("env:exp:checkout:user:anon:{i:032x}"))] += 1;
        }
        let (least, most) = (used.iter().min(), used.iter().max());
        assert!(
            least.is_some_and(|&n| n >= 32) && most.is_some_and(|&n| n <= 96),
            "{used:?}"
        );
    }

    #[tokio::test]
    async fn a_listing_merges_the_shards_in_key_order() {
        let kv = MemoryKv::new();
        for i in (0..300).rev() {
            kv.put(&format!("l:{i:04}"), Bytes::new(), PutOptions::default())
                .await
                .unwrap();
        }
        let mut names = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = kv.list("l:", cursor.as_deref(), 7).await.unwrap();
            names.extend(page.keys.iter().map(|k| k.name.clone()));
            match page.cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let expected: Vec<String> = (0..300).map(|i| format!("l:{i:04}")).collect();
        assert_eq!(names, expected);
    }

    #[tokio::test]
    async fn sweep_expired_removes_everything_due() {
        let kv = MemoryKv::new();
        kv.put(
            "a",
            Bytes::new(),
            PutOptions::ttl(Duration::from_millis(10)),
        )
        .await
        .unwrap();
        kv.put("b", Bytes::new(), PutOptions::ttl(Duration::from_secs(60)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(kv.sweep_expired(), 1);
        assert_eq!(kv.len_including_expired(), 1);
    }
}
