//! Striped counters: one logical counter in 16 cache-line-padded
//! `AtomicU64` stripes. A thread always adds to its own stripe (assigned
//! round-robin on first use), so threads on different cores rarely touch
//! the same cache line. A read sums the stripes: exact once the increments
//! it should see have happened-before it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub(super) const STRIPES: usize = 16;

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

/// The calling thread's stripe (shared by every striped metric).
pub(super) fn stripe_index() -> usize {
    THREAD_STRIPE.with(|s| *s)
}

impl StripedCounter {
    pub(crate) fn add(&self, n: u64) {
        self.stripes[stripe_index()]
            .0
            .fetch_add(n, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn stripes_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<Stripe>(), 128);
        assert_eq!(std::mem::size_of::<StripedCounter>(), STRIPES * 128);
    }

    #[test]
    fn sums_are_exact_across_threads() {
        let c = Arc::new(StripedCounter::default());
        let handles: Vec<_> = (0..24)
            .map(|_| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || (0..10_000).for_each(|_| c.incr()))
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(c.sum(), 240_000);
    }
}
