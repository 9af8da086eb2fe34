//! Striped counters: the reference's "shard hot keys", done with local atomics.
//!
//! Each counter is 16 cache-line-padded `AtomicU64` stripes; a thread always
//! adds to its own stripe (assigned round-robin on first use), so threads on
//! different cores rarely touch the same cache line. A read sums the stripes:
//! exact once the increments it should see have happened-before it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

const STRIPES: usize = 16;

/// 128 bytes covers the adjacent-line prefetcher on x86 and the 128-byte
/// lines of some ARM cores.
#[repr(align(128))]
#[derive(Default)]
struct Stripe(AtomicU64);

#[derive(Default)]
pub(crate) struct StripedCounter {
    stripes: [Stripe; STRIPES],
}

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD_STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
}

impl StripedCounter {
    pub(crate) fn add(&self, n: u64) {
        let stripe = THREAD_STRIPE.with(|s| *s);
        self.stripes[stripe].0.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn incr(&self) {
        self.add(1);
    }

    pub(crate) fn sum(&self) -> u64 {
        self.stripes
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

/// Every counter kvgate's edge keeps, by name. Look a counter up once (at
/// startup or config load) and keep the `Arc`: the registry lock is only for
/// registration and snapshots, never per request.
#[derive(Default)]
pub(crate) struct Counters {
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    requests: BTreeMap<String, Arc<StripedCounter>>,
    flag_evaluations: BTreeMap<String, Arc<StripedCounter>>,
    exposures: BTreeMap<String, BTreeMap<String, Arc<StripedCounter>>>,
    dropped_writes: Arc<StripedCounter>,
}

/// Exact sums at one moment, shaped for the admin API and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct CountersSnapshot {
    /// route -> requests
    pub(crate) requests: BTreeMap<String, u64>,
    /// flag -> evaluations
    pub(crate) flag_evaluations: BTreeMap<String, u64>,
    /// experiment -> variant -> exposures
    pub(crate) exposures: BTreeMap<String, BTreeMap<String, u64>>,
    /// State writes dropped because the edge's write queue was full.
    pub(crate) dropped_writes: u64,
}

fn entry(map: &mut BTreeMap<String, Arc<StripedCounter>>, name: &str) -> Arc<StripedCounter> {
    Arc::clone(map.entry(name.to_owned()).or_default())
}

impl Counters {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // The registry only ever grows by whole entries; a poisoned lock still
        // guards a consistent map.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The request counter of a route (created at zero on first use).
    pub(crate) fn route(&self, route: &str) -> Arc<StripedCounter> {
        entry(&mut self.lock().requests, route)
    }

    pub(crate) fn flag_evaluations(&self, flag: &str) -> Arc<StripedCounter> {
        entry(&mut self.lock().flag_evaluations, flag)
    }

    pub(crate) fn exposures(&self, experiment: &str, variant: &str) -> Arc<StripedCounter> {
        let mut registry = self.lock();
        let variants = registry.exposures.entry(experiment.to_owned()).or_default();
        entry(variants, variant)
    }

    /// Writes the edge dropped at a full write queue.
    pub(crate) fn dropped_writes(&self) -> Arc<StripedCounter> {
        Arc::clone(&self.lock().dropped_writes)
    }

    pub(crate) fn snapshot(&self) -> CountersSnapshot {
        let registry = self.lock();
        let sums = |map: &BTreeMap<String, Arc<StripedCounter>>| {
            map.iter().map(|(k, c)| (k.clone(), c.sum())).collect()
        };
        CountersSnapshot {
            requests: sums(&registry.requests),
            flag_evaluations: sums(&registry.flag_evaluations),
            exposures: registry
                .exposures
                .iter()
                .map(|(exp, variants)| (exp.clone(), sums(variants)))
                .collect(),
            dropped_writes: registry.dropped_writes.sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_are_exact_across_many_threads() {
        let counters = Arc::new(Counters::new());
        let threads = 32;
        let per_thread = 20_000u64;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let counters = Arc::clone(&counters);
                std::thread::spawn(move || {
                    // Half the threads look the counter up themselves, to
                    // check that registration is idempotent under races.
                    let route = counters.route("/checkout");
                    let exposure = counters.exposures("new-checkout", "variant_a");
                    for _ in 0..per_thread {
                        route.incr();
                        if t % 2 == 0 {
                            exposure.add(2);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let snap = counters.snapshot();
        assert_eq!(snap.requests["/checkout"], threads * per_thread);
        assert_eq!(
            snap.exposures["new-checkout"]["variant_a"],
            (threads / 2) * per_thread * 2
        );
    }

    #[test]
    fn snapshot_lists_registered_counters_at_zero() {
        let counters = Counters::new();
        counters.flag_evaluations("newUI");
        counters.route("api").add(5);
        let snap = counters.snapshot();
        assert_eq!(snap.flag_evaluations["newUI"], 0);
        assert_eq!(snap.requests["api"], 5);
        assert_eq!(
            serde_json::to_value(&snap).unwrap(),
            serde_json::json!({
                "requests": {"api": 5},
                "flag_evaluations": {"newUI": 0},
                "exposures": {},
                "dropped_writes": 0
            })
        );
    }

    #[test]
    fn stripes_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<Stripe>(), 128);
        assert_eq!(std::mem::size_of::<StripedCounter>(), STRIPES * 128);
    }
}
