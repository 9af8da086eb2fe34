//! State writes off the request path, committed in batches.
//!
//! A request that decides something worth keeping (a sticky assignment, a
//! preferences renewal) queues it and moves on. One flusher at a time waits
//! up to `write_flush_ms` for more to arrive (less once a full batch is
//! there, none when [`WriteQueue::settle`] asks), then commits what it took
//! with a single `put_batch`: one commit (one fsync on the durable backend)
//! per window, however many users arrive in it. The queue is bounded: past `capacity` writes are dropped and
//! counted, which is safe because every queued write is redone by the
//! user's next request.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::counters::StripedCounter;
use super::prefs_key;
use crate::kv::{Kv, KvError, Namespaced, PutItem, PutOptions};

/// Most writes one commit carries; the rest wait for the next round.
const MAX_BATCH: usize = 512;
/// Locks serializing read-modify-write of one user's preferences.
pub(super) const PREFS_LOCK_STRIPES: usize = 16;

pub(super) enum Write {
    /// Store `value` under `key` for `ttl`.
    Put {
        key: String,
        value: Bytes,
        ttl: Duration,
    },
    /// Re-store a user's preferences with a fresh TTL. The document is read
    /// again under the user's lock when committing, so a PATCH in between
    /// is never overwritten by the older copy.
    RenewPrefs { user: String, ttl: Duration },
}

impl Write {
    /// What identifies the write in the queue: a second identical one is
    /// not queued again.
    fn slot(&self) -> String {
        match self {
            Write::Put { key, .. } => key.clone(),
            Write::RenewPrefs { user, .. } => prefs_key(user),
        }
    }
}

#[derive(Default)]
struct Pending {
    writes: Vec<Write>,
    slots: HashSet<String>,
    /// A flusher is running (it owns the writes it took out of `writes`).
    flushing: bool,
    /// Writes the flusher took and has not committed yet.
    in_flight: usize,
    /// Someone waits in `settle`: commit without waiting for the window.
    urgent: bool,
    /// The last flusher task started: `settle` waits for it to be gone, so
    /// that once it returns nothing of the queue holds the store (a state
    /// file can then be opened again at once, as a restart does).
    flusher: Option<tokio::task::JoinHandle<()>>,
}

pub(super) struct WriteQueue {
    kv: Arc<Namespaced>,
    capacity: usize,
    /// How long a flusher gathers writes before committing them.
    window: Duration,
    pending: Mutex<Pending>,
    idle: Notify,
    /// Cuts the flusher's window short (full batch, settle).
    wake: Notify,
    dropped: Arc<StripedCounter>,
    /// Writes whose commit to the store failed.
    failed: Arc<StripedCounter>,
    prefs_locks: Vec<tokio::sync::Mutex<()>>,
}

pub(super) fn prefs_stripe(user: &str) -> usize {
    user.bytes().fold(0usize, |h, b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    }) % PREFS_LOCK_STRIPES
}

impl WriteQueue {
    pub(super) fn new(
        kv: Arc<Namespaced>,
        capacity: usize,
        window: Duration,
        dropped: Arc<StripedCounter>,
        failed: Arc<StripedCounter>,
    ) -> WriteQueue {
        WriteQueue {
            kv,
            capacity,
            window,
            pending: Mutex::default(),
            idle: Notify::new(),
            wake: Notify::new(),
            dropped,
            failed,
            prefs_locks: (0..PREFS_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Each critical section is a few Vec/HashSet calls; a panic in one
        // leaves a usable queue.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock serializing read-modify-write of `user`'s preferences.
    pub(super) fn prefs_lock(&self, user: &str) -> &tokio::sync::Mutex<()> {
        &self.prefs_locks[prefs_stripe(user)]
    }

    #[cfg(test)]
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.sum()
    }

    /// Writes queued or being committed.
    pub(super) fn pending(&self) -> usize {
        let pending = self.lock();
        pending.writes.len() + pending.in_flight
    }

    /// Queues `write`; starts a flusher when none runs. Returns false when
    /// the write was dropped because the queue is full.
    pub(super) async fn push(self: &Arc<Self>, write: Write) -> bool {
        let start = {
            let mut pending = self.lock();
            let slot = write.slot();
            if pending.slots.contains(&slot) {
                return true;
            }
            if pending.writes.len() >= self.capacity {
                drop(pending);
                self.dropped.incr();
                return false;
            }
            pending.slots.insert(slot);
            pending.writes.push(write);
            if pending.writes.len() == MAX_BATCH {
                self.wake.notify_one();
            }
            !std::mem::replace(&mut pending.flushing, true)
        };
        if start {
            // Off the request path when a runtime is there to run it;
            // without one (no timer either) it commits at once, inline.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let queue = Arc::clone(self);
                    // Spawned under the lock: the flusher cannot finish (it
                    // locks to) and a later one start before this one's
                    // handle is kept, so the kept handle is the latest.
                    let mut pending = self.lock();
                    pending.flusher = Some(runtime.spawn(async move { queue.flush(true).await }));
                }
                Err(_) => self.flush(false).await,
            }
        }
        true
    }

    /// Commits batches until the queue is empty, each after the window
    /// unless a full batch is waiting or `settle` was called.
    async fn flush(&self, gather: bool) {
        loop {
            let wait = gather && !self.window.is_zero() && {
                let pending = self.lock();
                !pending.urgent && pending.writes.len() < MAX_BATCH
            };
            if wait {
                tokio::select! {
                    _ = tokio::time::sleep(self.window) => {}
                    _ = self.wake.notified() => {}
                }
            }
            let batch: Vec<Write> = {
                let mut pending = self.lock();
                if pending.writes.is_empty() {
                    pending.flushing = false;
                    pending.urgent = false;
                    drop(pending);
                    self.idle.notify_waiters();
                    return;
                }
                let take = pending.writes.len().min(MAX_BATCH);
                let batch: Vec<Write> = pending.writes.drain(..take).collect();
                for write in &batch {
                    pending.slots.remove(&write.slot());
                }
                pending.in_flight = batch.len();
                batch
            };
            let writes = batch.len() as u64;
            if let Err(err) = self.commit(batch).await {
                self.failed.add(writes);
                tracing::warn!(error = %err, "committing edge state writes failed; they are redone on the users' next requests");
            }
            self.lock().in_flight = 0;
        }
    }

    async fn commit(&self, batch: Vec<Write>) -> Result<(), KvError> {
        let mut items = Vec::with_capacity(batch.len());
        let mut renew = Vec::new();
        for write in batch {
            match write {
                Write::Put { key, value, ttl } => items.push(PutItem {
                    key,
                    value,
                    opts: PutOptions::ttl(ttl),
                }),
                Write::RenewPrefs { user, ttl } => renew.push((user, ttl)),
            }
        }
        // Stripe locks in ascending order: PATCH holds at most one, so no
        // cycle is possible.
        let mut stripes: Vec<usize> = renew.iter().map(|(u, _)| prefs_stripe(u)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            guards.push(self.prefs_locks[stripe].lock().await);
        }
        for (user, ttl) in renew {
            let key = prefs_key(&user);
            match self.kv.get(&key).await {
                Ok(Some(entry)) => items.push(PutItem {
                    key,
                    value: entry.value,
                    opts: PutOptions {
                        ttl: Some(ttl),
                        metadata: entry.metadata,
                    },
                }),
                // Gone (deleted or expired meanwhile): nothing to renew.
                Ok(None) => {}
                // The other writes of the batch still go ahead; the renewal
                // is retried on the user's next request.
                Err(err) => {
                    tracing::warn!(key, error = %err, "reading preferences to renew failed")
                }
            }
        }
        if items.is_empty() {
            return Ok(());
        }
        let result = self.kv.put_batch(items).await;
        drop(guards);
        result
    }

    /// Waits until every write queued so far is committed (or failed), and
    /// the flusher that committed them is gone.
    pub(super) async fn settle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let mut pending = self.lock();
                if pending.writes.is_empty() && !pending.flushing {
                    break;
                }
                pending.urgent = true;
            }
            self.wake.notify_one();
            idle.await;
        }
        // It has signalled idle; its end (and its hold on the queue) follows.
        let flusher = self.lock().flusher.take();
        if let Some(task) = flusher {
            let _ = task.await;
        }
    }
}
