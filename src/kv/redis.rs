//! Redis backend: edge state shared by every instance that uses the same
//! Redis, in one region or several.
//!
//! Layout under the key prefix `P` (`[redis] key_prefix`):
//! - `P kv:<key>`: a hash `v` (value), `m` (metadata JSON, absent when none),
//!   `x` (expiry, ms since the epoch, `0` = never), with `PEXPIREAT` set so
//!   Redis drops it on time;
//! - `P kv-index`: a sorted set of every key at score 0, so `list` walks
//!   keys in byte order with `ZRANGEBYLEX`;
//! - `P kv-expiry`: a sorted set of keys with a TTL scored by expiry, so a
//!   write sweeps a bounded number of dead index members.
//!
//! Writes are Lua scripts (atomic: a batch is all or nothing), sent to every
//! region in parallel, each bounded by the timeout. A region that fails a
//! write gets it later from its bounded retry queue, in order: while a
//! region's queue is not empty, its new writes queue behind the old ones.
//! Reads ask the local region first and the others when it fails.
//!
//! The scripts touch keys they compute from the prefix; on a Redis Cluster
//! the prefix is a hash tag (`RedisConfig::effective_key_prefix`), so every
//! key a script touches is in the slot of the keys it declares.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;

use super::{
    check_key, clamp_limit, now_ms, parse_metadata, prepare_put, time_from_ms, KeyInfo, Kv,
    KvEntry, KvError, KvFuture, ListPage, PutItem, PutOptions,
};
use crate::redis::{Redis, RedisError, Region};

/// Stores the items of ARGV[4..] (name, value, metadata or "", expiry ms)
/// and sweeps up to 64 expired keys. With ARGV[3] = "1" (one item), stores
/// only when no live entry exists; returns 1 when it stored.
const PUT_SCRIPT: &str = r"
local idx, exp = KEYS[1], KEYS[2]
local base, now = ARGV[1], tonumber(ARGV[2])
if ARGV[3] == '1' then
  local x = redis.call('HGET', base .. ARGV[4], 'x')
  if x and (x == '0' or tonumber(x) > now) then return 0 end
end
for i = 4, #ARGV, 4 do
  local name, value, meta, x = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local k = base .. name
  redis.call('DEL', k)
  if meta == '' then
    redis.call('HSET', k, 'v', value, 'x', x)
  else
    redis.call('HSET', k, 'v', value, 'm', meta, 'x', x)
  end
  redis.call('ZADD', idx, 0, name)
  if x == '0' then
    redis.call('ZREM', exp, name)
  else
    redis.call('PEXPIREAT', k, x)
    redis.call('ZADD', exp, x, name)
  end
end
local due = redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, 64)
for _, name in ipairs(due) do
  redis.call('DEL', base .. name)
  redis.call('ZREM', idx, name)
  redis.call('ZREM', exp, name)
end
return 1
";

/// Removes ARGV[2]; returns 1 when a live entry was removed.
const DELETE_SCRIPT: &str = r"
local k = ARGV[1] .. ARGV[2]
local x = redis.call('HGET', k, 'x')
redis.call('DEL', k)
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
if x and (x == '0' or tonumber(x) > tonumber(ARGV[3])) then return 1 end
return 0
";

/// Walks the index from ARGV[2] to ARGV[3] (ZRANGEBYLEX bounds) and returns
/// { {name, metadata or '', expiry}..., last scanned name or '' }: up to
/// ARGV[4] live keys; index members whose entry is gone are removed. At most
/// 4096 members are looked at per call; when that stops the walk early the
/// last scanned name is returned so the caller can go on from there.
const LIST_SCRIPT: &str = r"
local idx, base, min, max = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local want, now = tonumber(ARGV[4]), tonumber(ARGV[5])
local out, scanned, last = {}, 0, ''
while #out < want and scanned < 4096 do
  local batch = redis.call('ZRANGEBYLEX', idx, min, max, 'LIMIT', 0, 128)
  for _, name in ipairs(batch) do
    scanned = scanned + 1
    last = name
    min = '(' .. name
    local r = redis.call('HMGET', base .. name, 'm', 'x')
    if not r[2] then
      redis.call('ZREM', idx, name)
    elseif r[2] == '0' or tonumber(r[2]) > now then
      out[#out + 1] = {name, r[1] or '', r[2]}
      if #out >= want then break end
    end
  end
  if #batch < 128 then last = '' break end
end
if #out >= want then last = '' end
return {out, last}
";

/// A write as it is sent to a region (and replayed from its retry queue).
/// Expiries are absolute, so a replay does not extend a TTL.
#[derive(Debug, Clone)]
enum Write {
    Put { items: Vec<Stored>, if_absent: bool },
    Delete { key: String },
}

#[derive(Debug, Clone)]
struct Stored {
    key: String,
    value: Bytes,
    metadata: Option<Vec<u8>>,
    expires_ms: u64,
}

struct RegionState {
    region: Arc<Region>,
    queue: Mutex<VecDeque<Write>>,
}

impl RegionState {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Write>> {
        // Each operation is one push or pop: a poisoned lock still guards a
        // consistent queue.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Shared {
    redis: Arc<Redis>,
    regions: Vec<RegionState>,
    retry_capacity: usize,
    put: ::redis::Script,
    delete: ::redis::Script,
    list: ::redis::Script,
    base: String,
    index: String,
    expiry: String,
}

/// A [`Kv`] on Redis: shared by every instance using the same servers.
pub(crate) struct RedisKv {
    shared: Arc<Shared>,
}

/// How often a region's retry queue is drained.
const RETRY_INTERVAL: Duration = Duration::from_millis(200);

fn backend(err: RedisError) -> KvError {
    KvError::Shared(Box::new(err))
}

impl RedisKv {
    /// State under `redis`'s key prefix; `retry_capacity` writes per region
    /// wait for a region that missed them. Needs a tokio runtime.
    pub(crate) fn new(redis: Arc<Redis>, retry_capacity: usize) -> RedisKv {
        let regions = redis
            .regions()
            .iter()
            .map(|r| RegionState {
                region: Arc::clone(r),
                queue: Mutex::new(VecDeque::new()),
            })
            .collect();
        let shared = Arc::new(Shared {
            base: redis.key("kv:"),
            index: redis.key("kv-index"),
            expiry: redis.key("kv-expiry"),
            redis,
            regions,
            retry_capacity: retry_capacity.max(1),
            put: ::redis::Script::new(PUT_SCRIPT),
            delete: ::redis::Script::new(DELETE_SCRIPT),
            list: ::redis::Script::new(LIST_SCRIPT),
        });
        spawn_retrier(Arc::downgrade(&shared));
        RedisKv { shared }
    }
}

impl Shared {
    /// Sends `write` to one region; the script's answer (1 stored, 0 not).
    async fn send(&self, region: &Region, write: &Write) -> Result<i64, RedisError> {
        match write {
            Write::Put { items, if_absent } => {
                let mut inv = self.put.prepare_invoke();
                inv.key(&self.index)
                    .key(&self.expiry)
                    .arg(&self.base)
                    .arg(now_ms())
                    .arg(if *if_absent { "1" } else { "0" });
                for item in items {
                    inv.arg(&item.key)
                        .arg(item.value.as_ref())
                        .arg(item.metadata.as_deref().unwrap_or_default())
                        .arg(item.expires_ms);
                }
                region.script(&inv).await
            }
            Write::Delete { key } => {
                let mut inv = self.delete.prepare_invoke();
                inv.key(&self.index)
                    .key(&self.expiry)
                    .arg(&self.base)
                    .arg(key)
                    .arg(now_ms());
                region.script(&inv).await
            }
        }
    }

    fn enqueue(&self, state: &RegionState, write: Write) {
        let stats = state.region.writes();
        let mut queue = state.lock();
        if queue.len() >= self.retry_capacity {
            queue.pop_front();
            stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(write);
        stats.queued.store(queue.len() as u64, Ordering::Relaxed);
    }

    /// Sends `write` to every region at once and returns each region's
    /// answer (`None`: queued behind earlier writes or failed and queued).
    /// Fails only when no region took it; then nothing is queued.
    async fn write_all(&self, write: Write) -> Result<Vec<Option<i64>>, KvError> {
        let sends = self.regions.iter().map(|state| {
            let write = &write;
            async move {
                // Queued writes go first, so this one waits its turn.
                if !state.lock().is_empty() {
                    return None;
                }
                Some(self.send(&state.region, write).await)
            }
        });
        let results = super::join_all(sends.map(Box::pin)).await;
        let took = results.iter().any(|r| matches!(r, Some(Ok(_))));
        let failed = results.iter().any(|r| matches!(r, Some(Err(_))));
        // Accepted when a region took it, or when every region is queued
        // behind earlier writes (it will be sent in turn).
        let accepted = took || !failed;
        let mut answers = Vec::with_capacity(results.len());
        let mut last_err = None;
        for (state, result) in self.regions.iter().zip(results) {
            match result {
                Some(Ok(n)) => answers.push(Some(n)),
                Some(Err(e)) => {
                    state.region.writes().failed.fetch_add(1, Ordering::Relaxed);
                    if accepted {
                        self.enqueue(state, write.clone());
                    }
                    last_err = Some(e);
                    answers.push(None);
                }
                None => {
                    if accepted {
                        self.enqueue(state, write.clone());
                    }
                    answers.push(None);
                }
            }
        }
        match last_err {
            Some(e) if !accepted => Err(backend(e)),
            _ => Ok(answers),
        }
    }

    /// Runs `read` on the local region, then on the others until one answers.
    async fn read<T, F, Fut>(&self, read: F) -> Result<T, KvError>
    where
        F: Fn(Arc<Region>) -> Fut,
        Fut: std::future::Future<Output = Result<T, KvError>>,
    {
        let mut last = None;
        for region in self.redis.read_order() {
            match read(Arc::clone(region)).await {
                Ok(v) => return Ok(v),
                // A corrupt entry is an answer, not a region fault.
                Err(e @ KvError::Corrupt(_)) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| KvError::Backend("no Redis region configured".into())))
    }

    /// Replays each region's queue in order until it is empty or a write fails.
    async fn drain(&self) {
        for state in &self.regions {
            loop {
                let Some(next) = state.lock().front().cloned() else {
                    break;
                };
                if self.send(&state.region, &next).await.is_err() {
                    break;
                }
                let mut queue = state.lock();
                queue.pop_front();
                let stats = state.region.writes();
                stats.queued.store(queue.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

fn spawn_retrier(shared: Weak<Shared>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RETRY_INTERVAL).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            shared.drain().await;
        }
    });
}

fn prepare(items: Vec<PutItem>) -> Result<Vec<Stored>, KvError> {
    let mut stored = Vec::with_capacity(items.len());
    for item in items {
        check_key(&item.key)?;
        let (expires_ms, metadata) = prepare_put(&item.opts)?;
        stored.push(Stored {
            key: item.key,
            value: item.value,
            metadata,
            expires_ms,
        });
    }
    Ok(stored)
}

type HashFields = (Option<Vec<u8>>, Option<Vec<u8>>, Option<String>);

impl Kv for RedisKv {
    fn get<'a>(&'a self, key: &'a str) -> KvFuture<'a, Option<KvEntry>> {
        Box::pin(async move {
            check_key(key)?;
            let full = format!("{}{key}", self.shared.base);
            let cmd = ::redis::cmd("HMGET")
                .arg(&full)
                .arg("v")
                .arg("m")
                .arg("x")
                .to_owned();
            let (value, meta, expiry): HashFields = self
                .shared
                .read(|region| {
                    let cmd = &cmd;
                    async move { region.query(cmd).await.map_err(backend) }
                })
                .await?;
            let (Some(value), Some(expiry)) = (value, expiry) else {
                return Ok(None);
            };
            let expires_ms: u64 = expiry
                .parse()
                .map_err(|_| KvError::Corrupt(format!("expiry {expiry:?}")))?;
            if super::is_expired(expires_ms, now_ms()) {
                return Ok(None);
            }
            Ok(Some(KvEntry {
                value: Bytes::from(value),
                metadata: parse_metadata(meta.as_deref())?,
                expires_at: time_from_ms(expires_ms),
            }))
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Bytes, opts: PutOptions) -> KvFuture<'a, ()> {
        self.put_batch(vec![PutItem {
            key: key.to_owned(),
            value,
            opts,
        }])
    }

    fn put_batch<'a>(&'a self, items: Vec<PutItem>) -> KvFuture<'a, ()> {
        Box::pin(async move {
            let items = prepare(items)?;
            if items.is_empty() {
                return Ok(());
            }
            self.shared
                .write_all(Write::Put {
                    items,
                    if_absent: false,
                })
                .await
                .map(drop)
        })
    }

    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        opts: PutOptions,
    ) -> KvFuture<'a, bool> {
        Box::pin(async move {
            let items = prepare(vec![PutItem {
                key: key.to_owned(),
                value,
                opts,
            }])?;
            let answers = self
                .shared
                .write_all(Write::Put {
                    items,
                    if_absent: true,
                })
                .await?;
            // The first region in read order that answered decides, as a
            // read would have.
            let local = self.shared.redis.local().name();
            let position = |name: &str| {
                self.shared
                    .regions
                    .iter()
                    .position(|r| r.region.name() == name)
            };
            let first = position(local)
                .and_then(|i| answers[i])
                .or_else(|| answers.iter().flatten().next().copied());
            Ok(first == Some(1))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> KvFuture<'a, bool> {
        Box::pin(async move {
            check_key(key)?;
            let answers = self
                .shared
                .write_all(Write::Delete {
                    key: key.to_owned(),
                })
                .await?;
            Ok(answers.iter().flatten().any(|n| *n == 1))
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> KvFuture<'a, ListPage> {
        Box::pin(async move {
            let limit = clamp_limit(limit);
            let min: Vec<u8> = match super::list_start(prefix, cursor) {
                std::ops::Bound::Excluded(c) => [b"(", c.as_bytes()].concat(),
                _ => [b"[", prefix.as_bytes()].concat(),
            };
            // No UTF-8 key contains 0xFF, so every key with the prefix sorts
            // below prefix + 0xFF.
            let max: Vec<u8> = if prefix.is_empty() {
                b"+".to_vec()
            } else {
                [b"(", prefix.as_bytes(), &[0xFF]].concat()
            };
            type Row = (String, Vec<u8>, String);
            let (rows, stopped_at): (Vec<Row>, String) = self
                .shared
                .read(|region| {
                    let mut inv = self.shared.list.prepare_invoke();
                    inv.key(&self.shared.index)
                        .arg(&self.shared.base)
                        .arg(&min)
                        .arg(&max)
                        .arg(limit + 1)
                        .arg(now_ms());
                    async move { region.script(&inv).await.map_err(backend) }
                })
                .await?;
            let more = rows.len() > limit;
            let mut keys = Vec::with_capacity(rows.len().min(limit));
            for (name, meta, expiry) in rows.into_iter().take(limit) {
                let expires_ms: u64 = expiry
                    .parse()
                    .map_err(|_| KvError::Corrupt(format!("expiry {expiry:?}")))?;
                keys.push(KeyInfo {
                    name,
                    metadata: parse_metadata((!meta.is_empty()).then_some(meta.as_slice()))?,
                    expires_at: time_from_ms(expires_ms),
                });
            }
            if !more && !stopped_at.is_empty() {
                // The walk was cut short among dead entries: hand back a
                // cursor that resumes after the last one looked at.
                let cursor = keys.last().map_or(stopped_at, |k| k.name.clone());
                return Ok(ListPage {
                    keys,
                    cursor: Some(cursor),
                });
            }
            Ok(ListPage::new(keys, more))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::redis::{RedisConfig, RegionConfig};
    use crate::kv::conformance;
    use crate::redis::test_server::TestRedis;

    fn kv_on(urls: &[(&str, String)], local: &str, prefix: &str) -> RedisKv {
        let cfg = RedisConfig {
            region: Some(local.to_owned()),
            key_prefix: Some(prefix.to_owned()),
            timeout_ms: 300,
            regions: urls
                .iter()
                .map(|(name, url)| RegionConfig {
                    name: (*name).to_owned(),
                    url: toml::Spanned::new(0..0, url.clone()),
                })
                .collect(),
            ..RedisConfig::default()
        };
        RedisKv::new(Redis::connect(&cfg, "test").unwrap(), 100)
    }

    fn kv(server: &TestRedis, prefix: &str) -> RedisKv {
        kv_on(&[("default", server.url())], "default", prefix)
    }

    #[tokio::test]
    async fn conformance_on_a_real_server() {
        let server = TestRedis::start();
        // One server, a prefix per run: the runs never see each other's keys.
        conformance::put_get_delete(&kv(&server, "t1:")).await;
        conformance::metadata_round_trips(&kv(&server, "t2:")).await;
        conformance::ttl_expiry(&kv(&server, "t3:")).await;
        conformance::get_many(&kv(&server, "t9:")).await;
        conformance::list_prefix_and_cursor(&kv(&server, "t4:")).await;
        conformance::refusals(&kv(&server, "t5:")).await;
        conformance::put_batch(&kv(&server, "t6:")).await;
        conformance::put_if_absent(&kv(&server, "t7:")).await;
    }

    #[tokio::test]
    async fn conformance_on_a_redis_cluster() {
        let cluster = crate::redis::test_server::TestCluster::start();
        let on = |prefix: &str| kv_on(&[("default", cluster.url())], "default", prefix);
        conformance::put_get_delete(&on("t1:")).await;
        conformance::metadata_round_trips(&on("t2:")).await;
        conformance::ttl_expiry(&on("t3:")).await;
        conformance::get_many(&on("t9:")).await;
        conformance::list_prefix_and_cursor(&on("t4:")).await;
        conformance::refusals(&on("t5:")).await;
        conformance::put_batch(&on("t6:")).await;
        conformance::put_if_absent(&on("t7:")).await;
        // The keys went under the prefix as a hash tag.
        assert_eq!(on("t8:").shared.base, "{t8:}kv:");
    }

    #[tokio::test]
    async fn two_instances_share_state_and_create_once() {
        let server = TestRedis::start();
        let a = kv(&server, "shared:");
        let b = kv(&server, "shared:");
        a.put("k", Bytes::from_static(b"from a"), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(b.get("k").await.unwrap().unwrap().value, "from a");
        // Racing creators: exactly one stores, and both then read its value.
        let (x, y) = tokio::join!(
            a.put_if_absent("secret", Bytes::from_static(b"A"), PutOptions::default()),
            b.put_if_absent("secret", Bytes::from_static(b"B"), PutOptions::default()),
        );
        assert!(x.unwrap() ^ y.unwrap(), "exactly one creator wins");
        let seen_a = a.get("secret").await.unwrap().unwrap().value;
        let seen_b = b.get("secret").await.unwrap().unwrap().value;
        assert_eq!(seen_a, seen_b);
        // Another prefix sees none of it.
        assert_eq!(kv(&server, "other:").get("k").await.unwrap(), None);
    }

    #[tokio::test]
    async fn list_skips_many_dead_entries_without_losing_live_ones() {
        let server = TestRedis::start();
        let kv = kv(&server, "dead:");
        // More dead entries than one list call looks at (4096).
        for chunk in 0..10 {
            let items: Vec<PutItem> = (0..500)
                .map(|i| PutItem {
                    key: format!("a:{:05}", chunk * 500 + i),
                    value: Bytes::new(),
                    opts: PutOptions::ttl(Duration::from_millis(30)),
                })
                .collect();
            kv.put_batch(items).await.unwrap();
        }
        kv.put("a:zz", Bytes::new(), PutOptions::default())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut cursor: Option<String> = None;
        let mut found = Vec::new();
        for _ in 0..10 {
            let page = kv.list("a:", cursor.as_deref(), 10).await.unwrap();
            found.extend(page.keys.into_iter().map(|k| k.name));
            match page.cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(found, ["a:zz"]);
    }

    #[tokio::test]
    async fn writes_reach_every_region_and_a_missed_one_catches_up() {
        let eu = TestRedis::start();
        let mut us = TestRedis::start();
        let regions = [("eu", eu.url()), ("us", us.url())];
        let kv = kv_on(&regions, "eu", "mr:");
        let eu_only = kv_on(&[("eu", eu.url())], "eu", "mr:");
        kv.put("one", Bytes::from_static(b"1"), PutOptions::default())
            .await
            .unwrap();
        // Both regions hold it: read each alone.
        assert_eq!(eu_only.get("one").await.unwrap().unwrap().value, "1");
        assert_eq!(
            kv_on(&[("us", us.url())], "us", "mr:")
                .get("one")
                .await
                .unwrap()
                .unwrap()
                .value,
            "1"
        );

        us.kill();
        kv.put("two", Bytes::from_static(b"2"), PutOptions::default())
            .await
            .unwrap();
        assert!(kv.delete("one").await.unwrap());
        let stats = kv.shared.redis.health();
        assert_eq!(stats[1].name, "us");
        assert!(stats[1].failed_writes >= 1, "{stats:?}");
        assert_eq!(stats[1].queued_writes, 2, "{stats:?}");

        us.restart();
        let us_only = kv_on(&[("us", us.url())], "us", "mr:");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while kv.shared.redis.health()[1].queued_writes > 0 {
            assert!(std::time::Instant::now() < deadline, "never drained");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The restarted server lost everything; the queue replayed what it
        // missed, in order (the delete after the put it followed).
        assert_eq!(us_only.get("two").await.unwrap().unwrap().value, "2");
        assert_eq!(us_only.get("one").await.unwrap(), None);
    }

    #[tokio::test]
    async fn reads_fall_back_when_the_local_region_fails() {
        let mut eu = TestRedis::start();
        let us = TestRedis::start();
        let kv = kv_on(&[("eu", eu.url()), ("us", us.url())], "eu", "fb:");
        kv.put("k", Bytes::from_static(b"v"), PutOptions::default())
            .await
            .unwrap();
        eu.kill();
        for _ in 0..5 {
            let started = std::time::Instant::now();
            assert_eq!(kv.get("k").await.unwrap().unwrap().value, "v");
            assert!(started.elapsed() < Duration::from_secs(1));
        }
        let page = kv.list("", None, 10).await.unwrap();
        assert_eq!(page.keys.len(), 1);
    }

    #[tokio::test]
    async fn every_region_down_is_an_error_promptly() {
        let mut server = TestRedis::start();
        let kv = kv(&server, "down:");
        server.kill();
        for _ in 0..5 {
            let started = std::time::Instant::now();
            assert!(kv.get("k").await.is_err());
            let err = kv
                .put("k", Bytes::new(), PutOptions::default())
                .await
                .unwrap_err();
            assert!(matches!(err, KvError::Shared(_)), "{err}");
            assert!(std::error::Error::source(&err).is_some());
            assert!(started.elapsed() < Duration::from_secs(1));
        }
        assert_eq!(
            kv.shared.redis.health()[0].queued_writes,
            0,
            "a write no region took is not queued"
        );
    }
}
