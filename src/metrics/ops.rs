//! Operational counters kept off the hit path: reloads, connections,
//! readiness probes. Plain atomics: each is touched at most once per
//! connection or per operator action, never per request.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every config generation (a reload keeps them).
#[derive(Default)]
pub(crate) struct Ops {
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
}

impl Ops {
    pub(crate) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
