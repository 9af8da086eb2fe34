//! Key-value state: one async, dyn-compatible trait and its backends.
//!
//! Everything kvgate keeps per user (flag overrides, sticky experiment
//! assignments, preferences) lives behind [`Kv`], so a Redis backend can later
//! slot in without touching the callers. Futures are boxed to keep the trait
//! usable as `Arc<dyn Kv>`.
//!
//! Semantics shared by every backend (checked by one conformance suite):
//! - keys are non-empty and at most [`MAX_KEY_BYTES`] bytes; metadata
//!   serializes to at most [`MAX_METADATA_BYTES`] bytes; a TTL must be > 0;
//! - an entry past its expiry is never returned by `get` or `list`;
//! - `list` walks keys in byte order, starting strictly after `cursor`, and
//!   returns a `cursor` only when at least one more live key matches.

use std::task::Poll;

pub(crate) mod cached;
mod durable;
mod memory;
mod namespaced;
pub(crate) mod redis;

pub use durable::DurableKv;
pub use memory::MemoryKv;
pub(crate) use namespaced::Namespaced;

/// What [`open`] built: the store, and the local read cache in front of it
/// when the store is shared (Redis).
pub(crate) struct Opened {
    /// The store edge state goes to.
    pub(crate) kv: std::sync::Arc<dyn Kv>,
    /// The local copy of hot reads; the cluster layer calls
    /// [`cached::CachedKv::invalidate`] with a store key (namespace
    /// included, e.g. `production:flag:newUI:user:1`) when another instance
    /// wrote it.
    pub(crate) local_cache: Option<std::sync::Arc<cached::CachedKv>>,
}

/// Opens the store `[state]` names: the backend is chosen here, not by
/// its callers. `redis` is the connection `[redis]` set up, if any; with
/// the Redis backend no local file is opened.
pub(crate) fn open(
    cfg: &crate::config::StateConfig,
    redis: Option<&std::sync::Arc<crate::redis::Redis>>,
) -> Result<Opened, crate::error::GatewayError> {
    use crate::config::StateBackend;
    use std::sync::Arc;
    let kv: Arc<dyn Kv> = match cfg.backend {
        StateBackend::Memory => Arc::new(MemoryKv::new()),
        StateBackend::Durable => Arc::new(DurableKv::open(&cfg.path).map_err(|source| {
            crate::error::GatewayError::State {
                path: cfg.path.clone(),
                source,
            }
        })?),
        StateBackend::Redis => {
            let Some(redis) = redis else {
                return Err(crate::error::GatewayError::State {
                    path: cfg.path.clone(),
                    source: KvError::InvalidArgument(
                        "state.backend = \"redis\" needs [redis] or --redis".into(),
                    ),
                });
            };
            let settings = redis.settings();
            let shared: Arc<dyn Kv> =
                Arc::new(redis::RedisKv::new(Arc::clone(redis), settings.retry_queue));
            if settings.cache_ttl_ms == 0 {
                shared
            } else {
                let cache = Arc::new(cached::CachedKv::new(
                    shared,
                    cached::Limits {
                        ttl: std::time::Duration::from_millis(settings.cache_ttl_ms),
                        max_entries: settings.cache_max_entries,
                        max_bytes: settings.cache_max_bytes,
                    },
                ));
                return Ok(Opened {
                    kv: Arc::clone(&cache) as Arc<dyn Kv>,
                    local_cache: Some(cache),
                });
            }
        }
    };
    Ok(Opened {
        kv,
        local_cache: None,
    })
}

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// The boxed future every [`Kv`] method returns.
pub type KvFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, KvError>> + Send + 'a>>;

/// Longest key accepted, namespace included.
pub(crate) const MAX_KEY_BYTES: usize = 1024;
/// Largest metadata document accepted, as compact JSON.
pub(crate) const MAX_METADATA_BYTES: usize = 1024;
/// Most keys one `list` call returns; larger limits are clamped.
pub(crate) const MAX_LIST_LIMIT: usize = 1000;

/// One stored value with its metadata and expiry.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEntry {
    /// The stored bytes.
    pub value: Bytes,
    /// The JSON metadata stored with the value, if any.
    pub metadata: Option<serde_json::Value>,
    /// When the entry expires; `None` when it never does.
    pub expires_at: Option<SystemTime>,
}

/// Options for [`Kv::put`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PutOptions {
    /// The entry disappears this long after the put. `None` keeps it forever.
    pub ttl: Option<Duration>,
    /// JSON metadata kept with the value (and shown by `list`).
    pub metadata: Option<serde_json::Value>,
}

impl PutOptions {
    /// Options with only a TTL.
    pub fn ttl(ttl: Duration) -> Self {
        PutOptions {
            ttl: Some(ttl),
            metadata: None,
        }
    }
}

/// One write of a [`Kv::put_batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct PutItem {
    /// The key to write.
    pub key: String,
    /// The value to store.
    pub value: Bytes,
    /// TTL and metadata, as for [`Kv::put`].
    pub opts: PutOptions,
}

/// A listed key: name, metadata and expiry, never the value.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KeyInfo {
    /// The key.
    pub name: String,
    /// The entry's metadata, if any.
    pub metadata: Option<serde_json::Value>,
    /// When the entry expires; `None` when it never does.
    #[serde(serialize_with = "serialize_opt_time")]
    pub expires_at: Option<SystemTime>,
}

/// One page of a prefix listing.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ListPage {
    /// Matching live keys, in byte order.
    pub keys: Vec<KeyInfo>,
    /// Pass back to `list` for the next page; `None` when this page is the last.
    pub cursor: Option<String>,
}

impl ListPage {
    /// A page of `keys`; when `more` live keys follow, the cursor is the
    /// last key returned.
    pub(crate) fn new(keys: Vec<KeyInfo>, more: bool) -> ListPage {
        let cursor = if more {
            keys.last().map(|k| k.name.clone())
        } else {
            None
        };
        ListPage { keys, cursor }
    }
}

/// Why a [`Kv`] operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The key is empty or too long.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// An option is refused (zero TTL, metadata too large).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A stored entry could not be decoded.
    #[error("stored entry is corrupt: {0}")]
    Corrupt(String),
    /// The backend failed (I/O, transaction, task).
    #[error("storage backend failed: {0}")]
    Backend(String),
    /// The shared store (Redis) failed or did not answer in time.
    #[error("shared state store failed")]
    Shared(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The state store. Implementations must be cheap to share (`Arc<dyn Kv>`).
pub trait Kv: Send + Sync + 'static {
    /// The live entry at `key`, if any.
    fn get<'a>(&'a self, key: &'a str) -> KvFuture<'a, Option<KvEntry>>;
    /// Stores `value` at `key`, replacing what was there.
    fn put<'a>(&'a self, key: &'a str, value: Bytes, opts: PutOptions) -> KvFuture<'a, ()>;
    /// Stores every item as one write (one commit for a durable backend):
    /// when any item is refused (key or options), nothing is stored. A later
    /// item wins over an earlier one with the same key.
    ///
    /// The default checks every item, then puts them one by one, so a
    /// backend failure part-way can leave some stored; the bundled backends
    /// override it with a single transaction.
    fn put_batch<'a>(&'a self, items: Vec<PutItem>) -> KvFuture<'a, ()> {
        Box::pin(async move {
            for item in &items {
                check_key(&item.key)?;
                prepare_put(&item.opts)?;
            }
            for item in items {
                self.put(&item.key, item.value, item.opts).await?;
            }
            Ok(())
        })
    }
    /// Stores `value` at `key` only when no live entry is there (SET NX):
    /// of several instances creating one key at once, one wins and the
    /// others see its value. Returns whether this call stored.
    ///
    /// The default reads then writes, which is not atomic; every bundled
    /// backend overrides it with an atomic one.
    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        opts: PutOptions,
    ) -> KvFuture<'a, bool> {
        Box::pin(async move {
            check_key(key)?;
            prepare_put(&opts)?;
            if self.get(key).await?.is_some() {
                return Ok(false);
            }
            self.put(key, value, opts).await?;
            Ok(true)
        })
    }
    /// The live entries at `keys`, in order; each read succeeds or fails
    /// on its own. The default polls every `get` together (a networked
    /// store pays one round trip, not one per key); the in-process stores
    /// read them all under one lock or transaction and one clock reading.
    fn get_many<'a>(&'a self, keys: &'a [&'a str]) -> KvFuture<'a, Reads> {
        Box::pin(async move { Ok(join_all(keys.iter().map(|key| self.get(key))).await) })
    }
    /// Returns whether a live entry was removed.
    fn delete<'a>(&'a self, key: &'a str) -> KvFuture<'a, bool>;
    /// Live keys starting with `prefix`, after `cursor`, at most `limit`
    /// (clamped to `MAX_LIST_LIMIT`) per page.
    fn list<'a>(
        &'a self,
        prefix: &'a str,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> KvFuture<'a, ListPage>;
    /// A signal that moves whenever entries may have been changed by
    /// another instance (the cluster broadcast invalidated them here), so a
    /// poller can look again at once instead of at its next tick. `None`
    /// for stores no other instance writes to.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// One result per key read ([`Kv::get_many`]).
pub type Reads = Vec<Result<Option<KvEntry>, KvError>>;

/// A future in flight or its output, for [`join_all`].
enum Slot<F: std::future::Future> {
    Pending(F),
    Done(F::Output),
}

/// Polls every future concurrently (a networked store's reads, the Redis
/// regions' sends: one round trip, not one each) and returns their outputs
/// in input order. One `Vec` holds both the futures and, in their place,
/// the outputs. (Futures that are not `Unpin` are boxed by the caller.)
pub(crate) async fn join_all<F: std::future::Future + Unpin>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut slots: Vec<Slot<F>> = futures.map(Slot::Pending).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for slot in slots.iter_mut() {
            if let Slot::Pending(fut) = slot {
                match std::pin::Pin::new(fut).poll(cx) {
                    Poll::Ready(output) => *slot = Slot::Done(output),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    // Every slot is done once the poll above is ready.
    slots
        .into_iter()
        .filter_map(|slot| match slot {
            Slot::Done(output) => Some(output),
            Slot::Pending(_) => None,
        })
        .collect()
}

pub(crate) fn check_key(key: &str) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::InvalidKey("key is empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KvError::InvalidKey(format!(
            "key is {} bytes, the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

/// Validates put options and turns them into the stored form: the expiry in
/// milliseconds since the Unix epoch (0 = never) and the metadata as JSON.
pub(crate) fn prepare_put(opts: &PutOptions) -> Result<(u64, Option<Vec<u8>>), KvError> {
    let expires_ms = match opts.ttl {
        None => 0,
        Some(ttl) if ttl.is_zero() => {
            return Err(KvError::InvalidArgument(
                "ttl must be greater than zero".into(),
            ))
        }
        Some(ttl) => {
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            now_ms().saturating_add(ttl_ms)
        }
    };
    let metadata = match &opts.metadata {
        None => None,
        Some(meta) => {
            let encoded = serde_json::to_vec(meta)
                .map_err(|e| KvError::InvalidArgument(format!("metadata: {e}")))?;
            if encoded.len() > MAX_METADATA_BYTES {
                return Err(KvError::InvalidArgument(format!(
                    "metadata is {} bytes, the limit is {MAX_METADATA_BYTES}",
                    encoded.len()
                )));
            }
            Some(encoded)
        }
    };
    Ok((expires_ms, metadata))
}

pub(crate) fn clamp_limit(limit: usize) -> usize {
    limit.clamp(1, MAX_LIST_LIMIT)
}

/// Where a listing starts: just after the cursor (the last key of the
/// previous page) when it lies within the prefix range, else at the prefix.
pub(crate) fn list_start<'a>(prefix: &'a str, cursor: Option<&'a str>) -> std::ops::Bound<&'a str> {
    match cursor {
        Some(c) if c >= prefix => std::ops::Bound::Excluded(c),
        _ => std::ops::Bound::Included(prefix),
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// 0 means "never expires".
pub(crate) fn is_expired(expires_ms: u64, now_ms: u64) -> bool {
    expires_ms != 0 && expires_ms <= now_ms
}

pub(crate) fn time_from_ms(expires_ms: u64) -> Option<SystemTime> {
    (expires_ms != 0).then(|| UNIX_EPOCH + Duration::from_millis(expires_ms))
}

pub(crate) fn parse_metadata(raw: Option<&[u8]>) -> Result<Option<serde_json::Value>, KvError> {
    raw.map(|bytes| {
        serde_json::from_slice(bytes).map_err(|e| KvError::Corrupt(format!("metadata: {e}")))
    })
    .transpose()
}

fn serialize_opt_time<S: serde::Serializer>(
    time: &Option<SystemTime>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match time.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
        Some(since) => serializer.serialize_u64(since.as_secs()),
        None => serializer.serialize_none(),
    }
}

/// The behaviour every backend must show, run against each one by its tests.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;
    use serde_json::json;

    pub(crate) async fn put_get_delete(kv: &dyn Kv) {
        assert_eq!(kv.get("a").await.unwrap(), None);
        kv.put("a", Bytes::from_static(b"one"), PutOptions::default())
            .await
            .unwrap();
        let entry = kv.get("a").await.unwrap().unwrap();
        assert_eq!(entry.value, Bytes::from_static(b"one"));
        assert_eq!(entry.metadata, None);
        assert_eq!(entry.expires_at, None);

        kv.put("a", Bytes::from_static(b"two"), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(kv.get("a").await.unwrap().unwrap().value, "two");

        assert!(kv.delete("a").await.unwrap());
        assert!(!kv.delete("a").await.unwrap());
        assert_eq!(kv.get("a").await.unwrap(), None);
    }

    pub(crate) async fn metadata_round_trips(kv: &dyn Kv) {
        let meta = json!({"version": "v2", "updated": 1700000000});
        kv.put(
            "m",
            Bytes::from_static(b"x"),
            PutOptions {
                ttl: Some(Duration::from_secs(3600)),
                metadata: Some(meta.clone()),
            },
        )
        .await
        .unwrap();
        let entry = kv.get("m").await.unwrap().unwrap();
        assert_eq!(entry.metadata, Some(meta.clone()));
        let expires = entry.expires_at.unwrap();
        let left = expires.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600));

        let page = kv.list("m", None, 10).await.unwrap();
        assert_eq!(page.keys.len(), 1);
        assert_eq!(page.keys[0].name, "m");
        assert_eq!(page.keys[0].metadata, Some(meta));
        assert_eq!(page.keys[0].expires_at, Some(expires));
    }

    /// `get_many` answers each key as `get` does, in order: live entries,
    /// absent ones, and a refused key failing on its own.
    pub(crate) async fn get_many(kv: &dyn Kv) {
        kv.put("gm:a", Bytes::from_static(b"1"), PutOptions::default())
            .await
            .unwrap();
        kv.put(
            "gm:b",
            Bytes::from_static(b"2"),
            PutOptions::ttl(Duration::from_secs(60)),
        )
        .await
        .unwrap();
        let too_long = "k".repeat(MAX_KEY_BYTES + 1);
        let keys = ["gm:b", "gm:missing", "", too_long.as_str(), "gm:a"];
        let many = kv.get_many(&keys).await.unwrap();
        assert_eq!(many.len(), keys.len());
        for (key, got) in keys.iter().zip(many) {
            match (got, kv.get(key).await) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{key}"),
                (Err(KvError::InvalidKey(_)), Err(KvError::InvalidKey(_))) => {}
                (a, b) => panic!("{key:?}: get_many {a:?}, get {b:?}"),
            }
        }
        let values = kv.get_many(&["gm:a", "gm:b"]).await.unwrap();
        let values: Vec<_> = values
            .into_iter()
            .map(|r| r.unwrap().map(|e| e.value))
            .collect();
        assert_eq!(
            values,
            [
                Some(Bytes::from_static(b"1")),
                Some(Bytes::from_static(b"2"))
            ]
        );
    }

    pub(crate) async fn ttl_expiry(kv: &dyn Kv) {
        // The long-lived entry first: a durable put can take tens of ms on
        // a loaded machine, and the short one must still be live when read
        // right after its own put.
        kv.put(
            "t:long",
            Bytes::from_static(b"y"),
            PutOptions::ttl(Duration::from_secs(60)),
        )
        .await
        .unwrap();
        kv.put(
            "t:short",
            Bytes::from_static(b"x"),
            PutOptions::ttl(Duration::from_millis(250)),
        )
        .await
        .unwrap();
        assert!(kv.get("t:short").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(kv.get("t:short").await.unwrap(), None);
        let page = kv.list("t:", None, 10).await.unwrap();
        let names: Vec<_> = page.keys.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["t:long"]);
        // Deleting an expired entry reports that nothing live was removed.
        assert!(!kv.delete("t:short").await.unwrap());
        // A put replaces the TTL: no TTL now means no expiry.
        kv.put("t:long", Bytes::from_static(b"z"), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(kv.get("t:long").await.unwrap().unwrap().expires_at, None);
    }

    pub(crate) async fn list_prefix_and_cursor(kv: &dyn Kv) {
        for i in 0..25 {
            let key = format!("user:{i:02}");
            kv.put(&key, Bytes::from(key.clone()), PutOptions::default())
                .await
                .unwrap();
        }
        kv.put("other:1", Bytes::new(), PutOptions::default())
            .await
            .unwrap();
        kv.put("users", Bytes::new(), PutOptions::default())
            .await
            .unwrap();

        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = kv.list("user:", cursor.as_deref(), 10).await.unwrap();
            pages += 1;
            assert!(page.keys.len() <= 10);
            seen.extend(page.keys.into_iter().map(|k| k.name));
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        let expected: Vec<String> = (0..25).map(|i| format!("user:{i:02}")).collect();
        assert_eq!(seen, expected);

        // Exactly one full page: no cursor, since nothing follows.
        let page = kv.list("user:1", None, 10).await.unwrap();
        assert_eq!(page.keys.len(), 10);
        assert_eq!(page.cursor, None);

        // Empty prefix lists everything; limit 0 is clamped to 1.
        let page = kv.list("", None, 0).await.unwrap();
        assert_eq!(page.keys.len(), 1);
        assert_eq!(page.keys[0].name, "other:1");
        assert_eq!(page.cursor.as_deref(), Some("other:1"));

        // Expired keys are skipped when deciding whether a next page exists.
        kv.put("x:a", Bytes::new(), PutOptions::default())
            .await
            .unwrap();
        kv.put(
            "x:b",
            Bytes::new(),
            PutOptions::ttl(Duration::from_millis(20)),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let page = kv.list("x:", None, 1).await.unwrap();
        assert_eq!(page.keys.len(), 1);
        assert_eq!(page.cursor, None);
    }

    pub(crate) async fn put_batch(kv: &dyn Kv) {
        kv.put_batch(Vec::new()).await.unwrap();
        let item = |key: &str, value: &'static str, opts: PutOptions| PutItem {
            key: key.to_owned(),
            value: Bytes::from_static(value.as_bytes()),
            opts,
        };
        kv.put(
            "b:old",
            Bytes::from_static(b"before"),
            PutOptions::default(),
        )
        .await
        .unwrap();
        kv.put_batch(vec![
            item("b:1", "one", PutOptions::default()),
            item(
                "b:2",
                "two",
                PutOptions {
                    ttl: Some(Duration::from_secs(3600)),
                    metadata: Some(json!({"n": 2})),
                },
            ),
            item("b:old", "first", PutOptions::default()),
            item("b:old", "last", PutOptions::ttl(Duration::from_secs(60))),
        ])
        .await
        .unwrap();
        assert_eq!(kv.get("b:1").await.unwrap().unwrap().value, "one");
        let two = kv.get("b:2").await.unwrap().unwrap();
        assert_eq!(two.value, "two");
        assert_eq!(two.metadata, Some(json!({"n": 2})));
        assert!(two.expires_at.is_some());
        let old = kv.get("b:old").await.unwrap().unwrap();
        assert_eq!(old.value, "last", "the later item wins");
        assert!(old.expires_at.is_some());
        let names: Vec<String> = kv
            .list("b:", None, 10)
            .await
            .unwrap()
            .keys
            .into_iter()
            .map(|k| k.name)
            .collect();
        assert_eq!(names, ["b:1", "b:2", "b:old"]);

        // One refused item refuses the whole batch.
        for bad in [
            item("", "x", PutOptions::default()),
            item("b:3", "x", PutOptions::ttl(Duration::ZERO)),
        ] {
            let err = kv
                .put_batch(vec![item("b:3", "x", PutOptions::default()), bad])
                .await
                .unwrap_err();
            assert!(
                matches!(err, KvError::InvalidKey(_) | KvError::InvalidArgument(_)),
                "{err}"
            );
            assert_eq!(kv.get("b:3").await.unwrap(), None, "nothing was stored");
        }

        // Items with a TTL expire like single puts.
        kv.put_batch(vec![item(
            "b:short",
            "x",
            PutOptions::ttl(Duration::from_millis(40)),
        )])
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(kv.get("b:short").await.unwrap(), None);
    }

    pub(crate) async fn put_if_absent(kv: &dyn Kv) {
        assert!(kv
            .put_if_absent("p", Bytes::from_static(b"first"), PutOptions::default())
            .await
            .unwrap());
        assert!(!kv
            .put_if_absent("p", Bytes::from_static(b"second"), PutOptions::default())
            .await
            .unwrap());
        assert_eq!(kv.get("p").await.unwrap().unwrap().value, "first");
        // An expired entry counts as absent.
        kv.put(
            "p:short",
            Bytes::from_static(b"old"),
            PutOptions::ttl(Duration::from_millis(30)),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(kv
            .put_if_absent("p:short", Bytes::from_static(b"new"), PutOptions::default())
            .await
            .unwrap());
        assert_eq!(kv.get("p:short").await.unwrap().unwrap().value, "new");
        assert!(matches!(
            kv.put_if_absent("", Bytes::new(), PutOptions::default())
                .await,
            Err(KvError::InvalidKey(_))
        ));
    }

    pub(crate) async fn refusals(kv: &dyn Kv) {
        assert!(matches!(kv.get("").await, Err(KvError::InvalidKey(_))));
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(
            kv.put(&long, Bytes::new(), PutOptions::default()).await,
            Err(KvError::InvalidKey(_))
        ));
        assert!(matches!(
            kv.put("k", Bytes::new(), PutOptions::ttl(Duration::ZERO))
                .await,
            Err(KvError::InvalidArgument(_))
        ));
        let big = PutOptions {
            ttl: None,
            metadata: Some(json!({ "blob": "x".repeat(MAX_METADATA_BYTES) })),
        };
        assert!(matches!(
            kv.put("k", Bytes::new(), big).await,
            Err(KvError::InvalidArgument(_))
        ));
        assert_eq!(
            kv.get("k").await.unwrap(),
            None,
            "a refused put stores nothing"
        );
    }
}
