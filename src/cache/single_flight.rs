//! One origin fetch per key at a time.
//!
//! `SingleFlight` keeps a table of keys being fetched or validated. The first
//! request for a key leads; later ones wait for the leader's response head
//! and then read its body as it streams in (`SharedBody`). A key whose
//! response could not be shared is remembered for a while (hit-for-miss), so
//! later requests go straight to the origin instead of queueing behind it.
//! Background refreshes (stale-while-revalidate) go through the same table,
//! so a key is never fetched twice at once.

use super::key::CacheKey;
use super::policy::Freshness;
use super::shared_body::SharedBody;
use http::{HeaderMap, StatusCode};
use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A response the leader can share with its waiters.
pub(crate) struct SharedResponse {
    pub status: StatusCode,
    /// Headers as stored (hop-by-hop and unstorable fields removed).
    pub headers: HeaderMap,
    /// The secondary key (Vary) the response was stored under; a waiter
    /// whose request does not match it fetches alone.
    pub vary: Box<[(http::HeaderName, Option<String>)]>,
    pub body: Arc<SharedBody>,
    pub freshness: Freshness,
    pub content_length: Option<u64>,
}

/// What waiters learn from the leader.
#[derive(Clone, Default)]
pub(crate) enum Outcome {
    #[default]
    Pending,
    /// Shareable: read this.
    Shared(Arc<SharedResponse>),
    /// Not shareable (uncacheable, failed, or the leader gave up): go to the
    /// origin on your own.
    GoAlone,
}

/// Whether this request leads the fetch for its key or waits on one.
pub(crate) enum Join {
    Leader(FlightGuard),
    Waiter(watch::Receiver<Outcome>),
    /// The key was recently uncacheable: do not queue, fetch alone.
    Bypass,
}

struct Table {
    flights: HashMap<CacheKey, watch::Sender<Outcome>>,
    /// Hit-for-miss marks by key hash: a client picks the key (a Host of up
    /// to 64 KiB), so the table must not hold 65,536 copies of it. A hash
    /// collision only costs one key its coalescing for a while.
    uncacheable: LruCache<u64, Instant>,
}

fn key_hash(key: &CacheKey) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed SipHash keys: the same key must hash alike on every call; the
    // table is an LRU bounded in entries, so a chosen collision buys nothing.
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// The single-flight table.
pub(crate) struct SingleFlight {
    table: Mutex<Table>,
    hit_for_miss: Duration,
    pub coalesced: AtomicU64,
}

impl SingleFlight {
    pub(crate) fn new(hit_for_miss: Duration) -> Arc<SingleFlight> {
        Arc::new(SingleFlight {
            table: Mutex::new(Table {
                flights: HashMap::new(),
                uncacheable: LruCache::new(NonZeroUsize::new(65_536).unwrap_or(NonZeroUsize::MIN)),
            }),
            hit_for_miss,
            coalesced: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the flight for `key`, or starts it.
    pub(crate) fn join(self: &Arc<Self>, key: &CacheKey) -> Join {
        let mut t = self.lock();
        let hash = key_hash(key);
        if let Some(until) = t.uncacheable.get(&hash) {
            if *until > Instant::now() {
                return Join::Bypass;
            }
            t.uncacheable.pop(&hash);
        }
        if let Some(tx) = t.flights.get(key) {
            self.coalesced.fetch_add(1, Ordering::Relaxed);
            return Join::Waiter(tx.subscribe());
        }
        let (tx, _) = watch::channel(Outcome::Pending);
        t.flights.insert(key.clone(), tx);
        Join::Leader(FlightGuard {
            table: self.clone(),
            key: key.clone(),
            done: false,
        })
    }

    /// Starts a flight only if none is under way (background refresh).
    pub(crate) fn try_lead(self: &Arc<Self>, key: &CacheKey) -> Option<FlightGuard> {
        let mut t = self.lock();
        if t.flights.contains_key(key) {
            return None;
        }
        let (tx, _) = watch::channel(Outcome::Pending);
        t.flights.insert(key.clone(), tx);
        Some(FlightGuard {
            table: self.clone(),
            key: key.clone(),
            done: false,
        })
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.lock().flights.len()
    }
}

/// Held by the leader. Publishing tells the waiters; dropping it ends the
/// flight (waiters that saw nothing go to the origin on their own).
pub(crate) struct FlightGuard {
    table: Arc<SingleFlight>,
    key: CacheKey,
    done: bool,
}

impl FlightGuard {
    /// Shares the response head (the body follows through `SharedBody`).
    /// The flight stays open until the guard is dropped, so requests that
    /// arrive while the body streams still join it.
    pub(crate) fn publish(&self, r: Arc<SharedResponse>) {
        let t = self.table.lock();
        if let Some(tx) = t.flights.get(&self.key) {
            tx.send_replace(Outcome::Shared(r));
        }
    }

    /// The response cannot be shared: waiters go alone, and for a while so
    /// do later requests (hit-for-miss).
    pub(crate) fn not_shareable(mut self) {
        let mut t = self.table.lock();
        let until = Instant::now() + self.table.hit_for_miss;
        t.uncacheable.put(key_hash(&self.key), until);
        if let Some(tx) = t.flights.remove(&self.key) {
            tx.send_replace(Outcome::GoAlone);
        }
        self.done = true;
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut t = self.table.lock();
        if let Some(tx) = t.flights.remove(&self.key) {
            tx.send_if_modified(|o| {
                if matches!(o, Outcome::Pending) {
                    *o = Outcome::GoAlone;
                    true
                } else {
                    false
                }
            });
        }
    }
}

/// Waits for the leader's outcome, up to `timeout` (then: go alone).
pub(crate) async fn wait(mut rx: watch::Receiver<Outcome>, timeout: Duration) -> Outcome {
    let waited =
        tokio::time::timeout(timeout, rx.wait_for(|o| !matches!(o, Outcome::Pending))).await;
    match waited {
        Ok(Ok(o)) => o.clone(),
        _ => Outcome::GoAlone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CacheKey {
        CacheKey::new(1, false, "h", "/k")
    }

    #[tokio::test]
    async fn second_joiner_waits_and_leader_drop_releases_it() {
        let sf = SingleFlight::new(Duration::from_secs(5));
        let Join::Leader(guard) = sf.join(&key()) else {
            panic!("first must lead")
        };
        let Join::Waiter(rx) = sf.join(&key()) else {
            panic!("second must wait")
        };
        drop(guard);
        assert!(matches!(
            wait(rx, Duration::from_secs(1)).await,
            Outcome::GoAlone
        ));
        assert_eq!(sf.in_flight(), 0);
    }

    #[tokio::test]
    async fn not_shareable_marks_hit_for_miss() {
        let sf = SingleFlight::new(Duration::from_secs(5));
        let Join::Leader(guard) = sf.join(&key()) else {
            panic!("first must lead")
        };
        guard.not_shareable();
        assert!(matches!(sf.join(&key()), Join::Bypass));
    }

    #[tokio::test]
    async fn waiter_times_out_alone() {
        let sf = SingleFlight::new(Duration::from_secs(5));
        let _guard = sf.join(&key());
        let Join::Waiter(rx) = sf.join(&key()) else {
            panic!("second must wait")
        };
        let started = Instant::now();
        assert!(matches!(
            wait(rx, Duration::from_millis(50)).await,
            Outcome::GoAlone
        ));
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn try_lead_refuses_while_in_flight() {
        let sf = SingleFlight::new(Duration::from_secs(5));
        let g = sf.try_lead(&key());
        assert!(g.is_some());
        assert!(sf.try_lead(&key()).is_none());
        drop(g);
        assert!(sf.try_lead(&key()).is_some());
    }
}
