//! Several instances, one cache: what instances sharing a Redis do
//! together, on top of the connections in `redis`.
//!
//! - [`events`]: purges and version bumps broadcast to every instance's
//!   memory cache, and edge state writes to every instance's local copy of
//!   edge state, over every region, with catch-up after a disconnect;
//! - [`lease`]: one origin fetch per key across the cluster, the losers
//!   reading the winner's response back from Redis.
//!
//! Every Redis call is bounded by the region timeout and fails fast while
//! the region is down (see `redis::Region::call`); when Redis cannot
//! answer, the request path falls back to the instance's own single-flight
//! and the origin. Sits above `cache` (it reads and writes entries) and
//! below `proxy`, which implements [`events::LocalCache`] for the gateway.

pub(crate) mod events;
pub(crate) mod lease;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::redis::Redis;
pub(crate) use events::{Event, LocalCache, Published, Purge};
pub(crate) use lease::Miss;

/// How long a lease holds when its holder never releases it (crashed, cut
/// off): others wait at most this long before fetching themselves.
const LEASE_TTL: Duration = Duration::from_secs(5);
/// Largest response the lease winner hands to the other instances.
const HANDOFF_MAX_BYTES: usize = 1 << 20;

/// This instance's membership in the cluster.
pub(crate) struct Cluster {
    redis: Arc<Redis>,
    broadcast: Arc<events::Broadcast>,
    reader: Arc<events::ReaderState>,
    lease: lease::Settings,
}

impl Cluster {
    /// `wait` bounds how long a request waits for another instance's fetch;
    /// `max_object_bytes` the responses handed over through Redis; `l2`
    /// turns the shared response tier on.
    pub(crate) fn new(
        redis: Arc<Redis>,
        wait: Duration,
        max_object_bytes: usize,
        l2: Option<&crate::config::L2Config>,
    ) -> Cluster {
        let max_body = match l2 {
            Some(l2) => l2.max_object_bytes,
            None => HANDOFF_MAX_BYTES,
        };
        let broadcast = events::Broadcast::new(
            Arc::clone(&redis),
            Arc::from(uuid::Uuid::new_v4().simple().to_string()),
        );
        Cluster {
            reader: Arc::clone(&broadcast.reader),
            broadcast,
            lease: lease::Settings {
                ttl: LEASE_TTL,
                wait: wait.min(LEASE_TTL),
                // Never more than the memory store would keep.
                max_body: max_object_bytes.min(max_body),
                l2_max_ttl: l2.map(|l2| Duration::from_secs(l2.max_ttl_secs)),
            },
            redis,
        }
    }

    /// Starts following the other instances' events into `target`.
    pub(crate) fn start(&self, target: Weak<dyn LocalCache>) {
        events::spawn_readers(&self.broadcast, target);
    }

    /// Edge state writes through `cache` are broadcast, and other
    /// instances' writes invalidate it.
    pub(crate) fn share_state(&self, cache: &Arc<crate::kv::cached::CachedKv>) {
        self.broadcast.share_state(cache);
    }

    /// Each region's reader and retry queue (for `/readyz`).
    pub(crate) fn regions(&self) -> Vec<events::RegionFollowing> {
        self.broadcast.regions()
    }

    /// State writes not broadcast because the queue was full.
    pub(crate) fn state_dropped(&self) -> u64 {
        self.broadcast.state_dropped.load(Ordering::Relaxed)
    }

    /// Sends `event` (already applied here) to every other instance.
    pub(crate) async fn publish(&self, event: &Event) -> Published {
        let published = self.broadcast.publish(event).await;
        if let Some(seq) = published.local_seq {
            // Shared copies of the old generation are out of reach from
            // now on, before this instance's reader sees its own event.
            self.reader.applied_seq.fetch_max(seq, Ordering::Relaxed);
        }
        published
    }

    /// Whether the event reader is following its region now.
    pub(crate) fn following(&self) -> bool {
        self.reader.connected.load(Ordering::Relaxed)
    }

    /// Times the memory cache was dropped because events were lost.
    pub(crate) fn cache_drops(&self) -> u64 {
        self.reader.cache_drops.load(Ordering::Relaxed)
    }

    /// Before a cacheable miss goes to the origin: the response another
    /// instance fetched, the lease to fetch it for everyone, or neither
    /// (fetch alone).
    pub(crate) async fn before_fetch(
        &self,
        key: &crate::cache::key::CacheKey,
        request: &http::HeaderMap,
        directives: &crate::cache::directives::RequestDirectives,
    ) -> Miss {
        if !self.following() {
            // Without the event stream the keys' generation is unknown, and
            // Redis is probably unreachable anyway.
            return Miss::Alone;
        }
        let generation = self.reader.applied_seq.load(Ordering::Relaxed);
        let miss = lease::before_fetch(
            self.redis.local(),
            &self.lease,
            &self
                .redis
                .key(&format!("lease:{generation}:{}", key.as_str())),
            &self
                .redis
                .key(&format!("resp:{generation}:{}", key.as_str())),
            request,
            directives,
        )
        .await;
        match miss {
            // An event arrived meanwhile: the copy may be what it purged.
            Miss::Found(_) if self.reader.applied_seq.load(Ordering::Relaxed) != generation => {
                Miss::Alone
            }
            miss => miss,
        }
    }
}
