//! Operational counters kept off the hit path: reloads, connections,
//! readiness probes. Plain atomics: each is touched at most once per
//! connection or per operator action, never per request.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every config generation (a reload keeps them).
#[derive(Default)]
pub(crate) struct Ops {
    /// Set once shutdown began: readiness answers 503 from then on.
    pub stopping: std::sync::atomic::AtomicBool,
    /// Reloads applied.
    pub reloads_ok: AtomicU64,
    /// Reloads refused (invalid config, unreadable TLS files, ...).
    pub reloads_failed: AtomicU64,
    /// Connections accepted on the main listener.
    pub connections_accepted: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub connections_rejected: AtomicU64,
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// State-store probes (`/readyz`) that failed or timed out.
    pub state_errors: AtomicU64,
    /// Request spans accepted by the OTLP collector, refused or lost on the
    /// way (`spans_failed`), and dropped because the export queue was full.
    pub spans_exported: AtomicU64,
    pub spans_failed: AtomicU64,
    pub spans_dropped: AtomicU64,
    /// Round trip of the last state-store probe that answered, in µs plus
    /// one (0: none yet).
    state_probe_us: AtomicU64,
}

impl Ops {
    pub(crate) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn state_probe_answered(&self, took: std::time::Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX - 1);
        self.state_probe_us.store(us + 1, Ordering::Relaxed);
    }

    /// The last state-store probe's round trip, if one has answered.
    pub(crate) fn state_probe_micros(&self) -> Option<u64> {
        Self::get(&self.state_probe_us).checked_sub(1)
    }
}
