//! Counters summed over every instance: each instance adds its local
//! growth to Redis now and then, spread over sharded keys, and a read sums
//! the shards (the reference's "shard hot keys", across machines).
//!
//! Counters arrive as a JSON tree of numbers (the edge's counter snapshot,
//! e.g. `{"requests": {"api": 5}, "exposures": {"exp": {"a": 2}}}`), so this
//! module needs nothing from the layers above it. Each leaf is one counter,
//! named by its path (segments joined with `:`, `%` and `:` escaped), kept
//! in `counter:<name>:<shard>`. An instance always adds to one shard (picked
//! at random when it starts), so N instances spread over up to `shards` keys.
//!
//! Each region gets every delta (its own bookkeeping of what it was sent),
//! so a region that was down catches up on the next flush; a flush that
//! times out after Redis applied it would count twice (rare, and only ever
//! over-counts by one flush).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use super::{Redis, RedisError};

/// A counter's name: its path in the tree, escaped and joined with `:`.
fn escape(segment: &str) -> String {
    segment.replace('%', "%25").replace(':', "%3A")
}

/// The counters of a JSON tree: every non-negative integer leaf, by path.
pub(crate) fn flatten(tree: &Value) -> BTreeMap<String, u64> {
    fn walk(v: &Value, path: &mut Vec<String>, out: &mut BTreeMap<String, u64>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    path.push(escape(k));
                    walk(child, path, out);
                    path.pop();
                }
            }
            Value::Number(n) => {
                if let Some(n) = n.as_u64() {
                    out.insert(path.join(":"), n);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk(tree, &mut Vec::new(), &mut out);
    out
}

/// `tree` with each counter leaf replaced by its value in `totals` (leaves
/// missing there are kept).
pub(crate) fn replace_leaves(tree: &Value, totals: &BTreeMap<String, u64>) -> Value {
    fn walk(v: &Value, path: &mut Vec<String>, totals: &BTreeMap<String, u64>) -> Value {
        match v {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, child)| {
                        path.push(escape(k));
                        let replaced = walk(child, path, totals);
                        path.pop();
                        (k.clone(), replaced)
                    })
                    .collect(),
            ),
            Value::Number(n) if n.as_u64().is_some() => totals
                .get(&path.join(":"))
                .map_or_else(|| v.clone(), |t| Value::from(*t)),
            other => other.clone(),
        }
    }
    walk(tree, &mut Vec::new(), totals)
}

/// One instance's side of the shared counters.
pub(crate) struct SharedCounters {
    redis: Arc<Redis>,
    shards: u32,
    shard: u32,
    /// Per region (configuration order): the local totals it was sent.
    /// The lock also keeps two flushes from sending one delta twice.
    sent: tokio::sync::Mutex<Vec<BTreeMap<String, u64>>>,
}

impl SharedCounters {
    pub(crate) fn new(redis: Arc<Redis>) -> SharedCounters {
        let shards = redis.settings().counter_shards.max(1);
        let mut seed = [0u8; 4];
        // Without randomness every instance adds to shard 0: still exact,
        // only less spread.
        let _ = getrandom::getrandom(&mut seed);
        let regions = redis.regions().len();
        SharedCounters {
            shard: u32::from_le_bytes(seed) % shards,
            shards,
            sent: tokio::sync::Mutex::new(vec![BTreeMap::new(); regions]),
            redis,
        }
    }

    fn key(&self, name: &str, shard: u32) -> String {
        self.redis.key(&format!("counter:{name}:{shard}"))
    }

    /// Adds to every region what each counter in `local` (this instance's
    /// running totals) grew since that region was last sent it. A region
    /// that fails keeps its bookkeeping and gets the delta next time.
    pub(crate) async fn flush(&self, local: &BTreeMap<String, u64>) -> Result<(), RedisError> {
        let mut sent = self.sent.lock().await;
        let mut last_err = None;
        for (region, sent) in self.redis.regions().iter().zip(sent.iter_mut()) {
            let mut pipe = ::redis::pipe();
            pipe.atomic();
            let mut any = false;
            for (name, &now) in local {
                let before = sent.get(name).copied().unwrap_or(0);
                // A counter never shrinks; if it did (a reset), start over.
                let delta = now.checked_sub(before).unwrap_or(now);
                if delta > 0 {
                    let delta = i64::try_from(delta).unwrap_or(i64::MAX);
                    pipe.cmd("INCRBY")
                        .arg(self.key(name, self.shard))
                        .arg(delta)
                        .ignore();
                    any = true;
                }
            }
            if !any {
                continue;
            }
            match region.pipeline::<()>(&pipe).await {
                Ok(()) => sent.clone_from(local),
                Err(e) => last_err = Some(e),
            }
        }
        last_err.map_or(Ok(()), Err)
    }

    /// The cluster total of each named counter: the sum of its shards, from
    /// the local region (the others when it fails).
    pub(crate) async fn totals<'n>(
        &self,
        names: impl Iterator<Item = &'n String>,
    ) -> Result<BTreeMap<String, u64>, RedisError> {
        let names: Vec<&String> = names.collect();
        if names.is_empty() {
            return Ok(BTreeMap::new());
        }
        let keys: Vec<String> = names
            .iter()
            .flat_map(|n| (0..self.shards).map(move |s| self.key(n, s)))
            .collect();
        let mut last_err = None;
        for region in self.redis.read_order() {
            let mut cmd = ::redis::cmd("MGET");
            cmd.arg(&keys);
            match region.query::<Vec<Option<u64>>>(&cmd).await {
                Ok(values) => {
                    let per = self.shards as usize;
                    return Ok(names
                        .iter()
                        .zip(values.chunks(per))
                        .map(|(n, shards)| {
                            let sum = shards
                                .iter()
                                .flatten()
                                .fold(0u64, |a, b| a.saturating_add(*b));
                            ((*n).clone(), sum)
                        })
                        .collect());
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or(RedisError::Down {
            region: "none".into(),
        }))
    }

    /// Flushes `tree`'s counters, then returns the tree with cluster totals.
    pub(crate) async fn cluster_view(&self, tree: &Value) -> Result<Value, RedisError> {
        let local = flatten(tree);
        self.flush(&local).await?;
        let totals = self.totals(local.keys()).await?;
        Ok(replace_leaves(tree, &totals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::redis::RedisConfig;
    use crate::redis::test_server::TestRedis;
    use serde_json::json;

    fn connect(url: String, shards: u32) -> Arc<Redis> {
        let cfg = RedisConfig {
            url: Some(toml::Spanned::new(0..0, url)),
            counter_shards: shards,
            ..RedisConfig::default()
        };
        Redis::connect(&cfg, "counters").unwrap()
    }

    #[test]
    fn names_are_paths_and_round_trip() {
        let tree =
            json!({"requests": {"a:b": 5, "c%": 1}, "exposures": {"e": {"v": 2}}, "x": "text"});
        let flat = flatten(&tree);
        assert_eq!(flat["requests:a%3Ab"], 5);
        assert_eq!(flat["requests:c%25"], 1);
        assert_eq!(flat["exposures:e:v"], 2);
        assert_eq!(flat.len(), 3);
        let doubled: BTreeMap<String, u64> = flat.iter().map(|(k, v)| (k.clone(), v * 2)).collect();
        assert_eq!(
            replace_leaves(&tree, &doubled),
            json!({"requests": {"a:b": 10, "c%": 2}, "exposures": {"e": {"v": 4}}, "x": "text"})
        );
    }

    #[tokio::test]
    async fn instances_add_up_exactly_across_shards() {
        let server = TestRedis::start();
        // Many instances, so several shards are in use.
        let instances: Vec<SharedCounters> = (0..12)
            .map(|_| SharedCounters::new(connect(server.url(), 4)))
            .collect();
        let mut expected = 0u64;
        for round in 1..=3u64 {
            for (i, inst) in instances.iter().enumerate() {
                let local = (i as u64 + 1) * round * 10;
                let tree = json!({"requests": {"api": local}});
                inst.flush(&flatten(&tree)).await.unwrap();
            }
        }
        for i in 0..12u64 {
            expected += (i + 1) * 30;
        }
        let view = instances[0]
            .cluster_view(&json!({"requests": {"api": 30}}))
            .await
            .unwrap();
        assert_eq!(view, json!({"requests": {"api": expected}}));
        let shards_used: std::collections::BTreeSet<u32> =
            instances.iter().map(|i| i.shard).collect();
        assert!(shards_used.iter().all(|s| *s < 4));
    }

    #[tokio::test]
    async fn a_failed_flush_is_sent_later() {
        let mut server = TestRedis::start();
        let counters = SharedCounters::new(connect(server.url(), 2));
        counters.flush(&flatten(&json!({"n": 5}))).await.unwrap();
        server.kill();
        assert!(counters.flush(&flatten(&json!({"n": 8}))).await.is_err());
        // Back empty (no persistence): the region gets all it has not acknowledged.
        server.restart();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            tokio::time::sleep(crate::redis::PROBE_INTERVAL).await;
            if counters.flush(&flatten(&json!({"n": 9}))).await.is_ok() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never reconnected");
        }
        let totals = counters
            .totals([&"n".to_string()].into_iter())
            .await
            .unwrap();
        assert_eq!(totals["n"], 4, "the 4 not acknowledged before the restart");
    }
}
