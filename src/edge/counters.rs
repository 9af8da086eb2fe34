//! The edge's counters by name (routes, flag evaluations, exposures), each
//! a [`StripedCounter`] so that counting writes no cache line another core
//! writes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;

pub(crate) use crate::metrics::StripedCounter;

/// Every counter kvgate's edge keeps, by name. Look a counter up once (at
/// startup or config load) and keep the `Arc`: the registry lock is only for
/// registration and snapshots, never per request.
#[derive(Default)]
pub(crate) struct Counters {
    registry: Mutex<Registry>,
    /// Route request counters, read on every request without a lock or an
    /// allocation; a new route copies the map (under `registry`'s lock).
    /// Route names come from the configuration, so the map stays small.
    routes: ArcSwap<BTreeMap<String, Arc<StripedCounter>>>,
    /// State-store reads made for requests that failed (the request used
    /// its fallback), and queued writes whose commit failed.
    state_read_errors: StripedCounter,
    state_write_errors: Arc<StripedCounter>,
}

#[derive(Default)]
struct Registry {
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
    /// State-store reads for requests that failed (in `/metrics` only:
    /// `/counters` keeps its shape).
    #[serde(skip)]
    pub(crate) state_read_errors: u64,
    /// Queued state writes whose commit failed (likewise).
    #[serde(skip)]
    pub(crate) state_write_errors: u64,
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
        if let Some(c) = self.routes.load().get(route) {
            return Arc::clone(c);
        }
        let _registering = self.lock();
        let mut routes = BTreeMap::clone(&self.routes.load());
        let c = entry(&mut routes, route);
        self.routes.store(Arc::new(routes));
        c
    }

    /// Counts one request for `route`: once the route is known, no lock,
    /// no allocation, and no write to a cache line another thread writes.
    pub(crate) fn count_route(&self, route: &str) {
        match self.routes.load().get(route) {
            Some(c) => c.incr(),
            None => self.route(route).incr(),
        }
    }

    pub(crate) fn flag_evaluations(&self, flag: &str) -> Arc<StripedCounter> {
        entry(&mut self.lock().flag_evaluations, flag)
    }

    pub(crate) fn exposures(&self, experiment: &str, variant: &str) -> Arc<StripedCounter> {
        let mut registry = self.lock();
        let variants = registry.exposures.entry(experiment.to_owned()).or_default();
        entry(variants, variant)
    }

    /// Counts a failed state-store read (rare: an atomic is enough, but
    /// the striped one is at hand).
    pub(crate) fn count_state_read_error(&self) {
        self.state_read_errors.incr();
    }

    /// Where the write queue counts writes whose commit failed.
    pub(crate) fn state_write_errors(&self) -> Arc<StripedCounter> {
        Arc::clone(&self.state_write_errors)
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
            requests: sums(&self.routes.load()),
            flag_evaluations: sums(&registry.flag_evaluations),
            exposures: registry
                .exposures
                .iter()
                .map(|(exp, variants)| (exp.clone(), sums(variants)))
                .collect(),
            dropped_writes: registry.dropped_writes.sum(),
            state_read_errors: self.state_read_errors.sum(),
            state_write_errors: self.state_write_errors.sum(),
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
                    let exposure = counters.exposures("new-checkout", "variant_a");
                    for _ in 0..per_thread {
                        counters.count_route("/checkout");
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
}
