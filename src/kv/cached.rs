//! A short-lived local copy of hot reads in front of a shared store.
//!
//! Every request with an `[edge]` reads a user's flag overrides, sticky
//! assignments and preferences; against Redis each is a round trip. This
//! layer answers repeated reads of a key from memory for `ttl` (about a
//! second), absent keys included, bounded in entries and in bytes. A local
//! write drops its keys from the copy, so this instance reads its own
//! writes; writes made on other instances show after at most `ttl`, or at
//! once when the cluster layer calls [`CachedKv::invalidate_remote`] for
//! them. Every local write is also reported to a [`WriteListener`] (the
//! cluster layer, which broadcasts the keys to the other instances).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;

use super::{Kv, KvEntry, KvFuture, ListPage, PutItem, PutOptions};

/// Bytes charged per cached key beyond its key and value: the map slot,
/// the LRU links and the entry's fixed fields.
const OVERHEAD_BYTES: usize = 128;

/// How much the local copy may hold, and for how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) ttl: Duration,
    pub(crate) max_entries: usize,
    pub(crate) max_bytes: usize,
}

struct Cached {
    read: Option<KvEntry>,
    at: Instant,
    bytes: usize,
}

struct Inner {
    entries: LruCache<String, Cached>,
    bytes: usize,
    /// Bumped by every invalidation: a read that started before one must
    /// not store what it read (it may be the value just replaced).
    generation: u64,
}

/// Told of every key this instance wrote (after the write), so the other
/// instances can drop their copies. Must not block: it runs on the
/// request that wrote.
pub(crate) trait WriteListener: Send + Sync {
    fn written(&self, key: &str);
}

/// Counters of the local copy.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CacheStats {
    pub(crate) entries: usize,
    pub(crate) bytes: usize,
}

/// A [`Kv`] that serves repeated `get`s from a bounded, short-lived copy.
pub(crate) struct CachedKv {
    inner: Arc<dyn Kv>,
    limits: Limits,
    state: Mutex<Inner>,
    /// Set once by the cluster layer when it broadcasts writes.
    listener: std::sync::OnceLock<Arc<dyn WriteListener>>,
    /// Moved by every invalidation from another instance (see
    /// [`Kv::changes`]).
    changes: tokio::sync::watch::Sender<u64>,
}

fn charge(key: &str, read: &Option<KvEntry>) -> usize {
    let entry = read.as_ref().map_or(0, |e| {
        e.value.len() + e.metadata.as_ref().map_or(0, |m| m.to_string().len())
    });
    OVERHEAD_BYTES + key.len() + entry
}

impl CachedKv {
    pub(crate) fn new(inner: Arc<dyn Kv>, limits: Limits) -> CachedKv {
        CachedKv {
            inner,
            limits,
            state: Mutex::new(Inner {
                entries: LruCache::unbounded(),
                bytes: 0,
                generation: 0,
            }),
            listener: std::sync::OnceLock::new(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Reports every later local write to `listener`; false when one was
    /// set already (it stays).
    pub(crate) fn set_listener(&self, listener: Arc<dyn WriteListener>) -> bool {
        self.listener.set(listener).is_ok()
    }

    /// After a local write of `key`: no read from before it is served
    /// again here, and the other instances are told.
    fn wrote(&self, key: &str) {
        self.invalidate(key);
        if let Some(listener) = self.listener.get() {
            listener.written(key);
        }
    }

    /// Another instance wrote `keys`: forget them and wake the watchers of
    /// [`Kv::changes`].
    pub(crate) fn invalidate_remote<'k>(&self, keys: impl IntoIterator<Item = &'k str>) {
        for key in keys {
            self.invalidate(key);
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Writes of other instances may have been missed: forget everything
    /// and wake the watchers.
    pub(crate) fn invalidate_all_remote(&self) {
        self.invalidate_all();
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every operation leaves the map and its byte count consistent
        // before it can panic; recover from poisoning.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets `key` (its full name in the store, namespace included):
    /// the next read goes to the shared store. The cluster layer calls this
    /// for writes made on other instances.
    pub(crate) fn invalidate(&self, key: &str) {
        let mut inner = self.lock();
        inner.generation = inner.generation.wrapping_add(1);
        if let Some(old) = inner.entries.pop(key) {
            inner.bytes -= old.bytes;
        }
    }

    /// Forgets everything (after a reconnect, writes may have been missed).
    pub(crate) fn invalidate_all(&self) {
        let mut inner = self.lock();
        inner.generation = inner.generation.wrapping_add(1);
        inner.entries.clear();
        inner.bytes = 0;
    }

    #[cfg(test)]
    pub(crate) fn stats(&self) -> CacheStats {
        let inner = self.lock();
        CacheStats {
            entries: inner.entries.len(),
            bytes: inner.bytes,
        }
    }

    fn cached(&self, key: &str) -> Option<Option<KvEntry>> {
        let mut inner = self.lock();
        let hit = inner.entries.get(key)?;
        let expired_entry = hit
            .read
            .as_ref()
            .and_then(|e| e.expires_at)
            .is_some_and(|at| at <= std::time::SystemTime::now());
        if hit.at.elapsed() < self.limits.ttl && !expired_entry {
            return Some(hit.read.clone());
        }
        if let Some(old) = inner.entries.pop(key) {
            inner.bytes -= old.bytes;
        }
        None
    }

    fn remember(&self, key: &str, read: Option<KvEntry>, generation: u64) {
        let bytes = charge(key, &read);
        let mut inner = self.lock();
        if inner.generation != generation || bytes > self.limits.max_bytes {
            return;
        }
        if let Some(old) = inner.entries.pop(key) {
            inner.bytes -= old.bytes;
        }
        while inner.entries.len() >= self.limits.max_entries.max(1)
            || inner.bytes + bytes > self.limits.max_bytes
        {
            match inner.entries.pop_lru() {
                Some((_, old)) => inner.bytes -= old.bytes,
                None => break,
            }
        }
        if self.limits.max_entries == 0 {
            return;
        }
        inner.bytes += bytes;
        inner.entries.put(
            key.to_owned(),
            Cached {
                read,
                at: Instant::now(),
                bytes,
            },
        );
    }

    fn generation(&self) -> u64 {
        self.lock().generation
    }
}

impl Kv for CachedKv {
    fn get<'a>(&'a self, key: &'a str) -> KvFuture<'a, Option<KvEntry>> {
        Box::pin(async move {
            if let Some(hit) = self.cached(key) {
                return Ok(hit);
            }
            let generation = self.generation();
            let read = self.inner.get(key).await?;
            self.remember(key, read.clone(), generation);
            Ok(read)
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Bytes, opts: PutOptions) -> KvFuture<'a, ()> {
        Box::pin(async move {
            let result = self.inner.put(key, value, opts).await;
            // Dropped after the write (and also when it failed: it may have
            // landed), so no read from before it is served again.
            self.wrote(key);
            result
        })
    }

    fn put_batch<'a>(&'a self, items: Vec<PutItem>) -> KvFuture<'a, ()> {
        Box::pin(async move {
            let keys: Vec<String> = items.iter().map(|i| i.key.clone()).collect();
            let result = self.inner.put_batch(items).await;
            for key in &keys {
                self.wrote(key);
            }
            result
        })
    }

    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        opts: PutOptions,
    ) -> KvFuture<'a, bool> {
        Box::pin(async move {
            let result = self.inner.put_if_absent(key, value, opts).await;
            match result {
                // Nothing changed: no other instance needs to know.
                Ok(false) => self.invalidate(key),
                _ => self.wrote(key),
            }
            result
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> KvFuture<'a, bool> {
        Box::pin(async move {
            let result = self.inner.delete(key).await;
            match result {
                Ok(false) => self.invalidate(key),
                _ => self.wrote(key),
            }
            result
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> KvFuture<'a, ListPage> {
        // Listings are admin reads: always from the store.
        self.inner.list(prefix, cursor, limit)
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{conformance, MemoryKv};

    fn limits(ttl_ms: u64, max_entries: usize, max_bytes: usize) -> Limits {
        Limits {
            ttl: Duration::from_millis(ttl_ms),
            max_entries,
            max_bytes,
        }
    }

    fn over(store: &Arc<MemoryKv>, l: Limits) -> CachedKv {
        CachedKv::new(Arc::clone(store) as Arc<dyn Kv>, l)
    }

    #[tokio::test]
    async fn behaves_like_a_store() {
        let l = limits(1_000, 100, 1 << 20);
        conformance::put_get_delete(&over(&Arc::new(MemoryKv::new()), l)).await;
        conformance::metadata_round_trips(&over(&Arc::new(MemoryKv::new()), l)).await;
        conformance::ttl_expiry(&over(&Arc::new(MemoryKv::new()), l)).await;
        conformance::get_many(&over(&Arc::new(MemoryKv::new()), l)).await;
        conformance::list_prefix_and_cursor(&over(&Arc::new(MemoryKv::new()), l)).await;
        conformance::refusals(&over(&Arc::new(MemoryKv::new()), l)).await;
        conformance::put_batch(&over(&Arc::new(MemoryKv::new()), l)).await;
        conformance::put_if_absent(&over(&Arc::new(MemoryKv::new()), l)).await;
    }

    #[tokio::test]
    async fn repeated_reads_are_local_until_the_ttl_or_an_invalidation() {
        let store = Arc::new(MemoryKv::new());
        let cached = over(&store, limits(150, 100, 1 << 20));
        store
            .put("k", Bytes::from_static(b"one"), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(cached.get("k").await.unwrap().unwrap().value, "one");
        // Another instance's write (straight to the store) is not seen yet...
        store
            .put("k", Bytes::from_static(b"two"), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(cached.get("k").await.unwrap().unwrap().value, "one");
        // ...until the broadcast invalidates it,
        cached.invalidate("k");
        assert_eq!(cached.get("k").await.unwrap().unwrap().value, "two");
        // or the TTL passes.
        store
            .put("k", Bytes::from_static(b"three"), PutOptions::default())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(cached.get("k").await.unwrap().unwrap().value, "three");
        // Absent keys are remembered too, and a local write is seen at once.
        assert_eq!(cached.get("absent").await.unwrap(), None);
        store
            .put("absent", Bytes::from_static(b"x"), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(cached.get("absent").await.unwrap(), None);
        cached
            .put("absent", Bytes::from_static(b"mine"), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(cached.get("absent").await.unwrap().unwrap().value, "mine");
        cached.invalidate_all();
        assert_eq!(cached.stats().entries, 0);
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);
    impl WriteListener for Recorder {
        fn written(&self, key: &str) {
            self.0.lock().unwrap().push(key.to_owned());
        }
    }

    #[tokio::test]
    async fn local_writes_are_reported_and_remote_ones_wake_the_watchers() {
        let store = Arc::new(MemoryKv::new());
        let cached = over(&store, limits(10_000, 100, 1 << 20));
        let recorder = Arc::new(Recorder::default());
        assert!(cached.set_listener(recorder.clone()));
        assert!(!cached.set_listener(Arc::new(Recorder::default())));
        let v = || Bytes::from_static(b"v");
        cached.put("a", v(), PutOptions::default()).await.unwrap();
        assert!(cached
            .put_if_absent("b", v(), PutOptions::default())
            .await
            .unwrap());
        // Nothing changed: nothing to tell.
        assert!(!cached
            .put_if_absent("b", v(), PutOptions::default())
            .await
            .unwrap());
        assert!(!cached.delete("absent").await.unwrap());
        assert!(cached.delete("a").await.unwrap());
        cached
            .put_batch(vec![PutItem {
                key: "c".into(),
                value: v(),
                opts: PutOptions::default(),
            }])
            .await
            .unwrap();
        assert_eq!(*recorder.0.lock().unwrap(), ["a", "b", "a", "c"]);

        let mut changes = cached.changes().unwrap();
        assert_eq!(cached.get("c").await.unwrap().unwrap().value, "v");
        store
            .put("c", Bytes::from_static(b"w"), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(cached.get("c").await.unwrap().unwrap().value, "v");
        cached.invalidate_remote(["c"]);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(cached.get("c").await.unwrap().unwrap().value, "w");
        cached.invalidate_all_remote();
        assert!(changes.has_changed().unwrap());
        assert_eq!(cached.stats().entries, 0);
        // Remote invalidations are not reported back.
        assert_eq!(recorder.0.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn bounded_in_entries_and_bytes() {
        let store = Arc::new(MemoryKv::new());
        let cached = over(&store, limits(10_000, 10, 4_096));
        for i in 0..50 {
            let key = format!("k{i}");
            store
                .put(&key, Bytes::from(vec![b'x'; 300]), PutOptions::default())
                .await
                .unwrap();
            cached.get(&key).await.unwrap();
            let s = cached.stats();
            assert!(s.entries <= 10, "{s:?}");
            assert!(s.bytes <= 4_096, "{s:?}");
        }
        assert!(cached.stats().entries >= 4);
        // One entry larger than the whole budget is read but not kept.
        store
            .put("big", Bytes::from(vec![b'x'; 8_192]), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(cached.get("big").await.unwrap().unwrap().value.len(), 8_192);
        assert!(cached.stats().bytes <= 4_096);
    }
}
