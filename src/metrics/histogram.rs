//! Striped latency histograms: per thread stripe, one cache-line-aligned
//! block holding every bucket count and the sum, so recording touches only
//! lines the recording thread owns (no lock, no line shared between cores).
//! Scrapes add the stripes up.

use super::striped::stripe_index;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of every latency histogram: from 100 µs (hits
/// are served in tens of µs) to 60 s, past the 30 s first-byte timeout.
pub(crate) const LATENCY_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// The same bounds in nanoseconds, for placement without float maths.
const BOUNDS_NS: [u64; 18] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
];

/// Buckets plus +Inf.
pub(crate) const BUCKET_COUNT: usize = LATENCY_BUCKETS.len() + 1;

/// The bucket a duration falls in: the first whose bound it does not
/// exceed (Prometheus `le`), else +Inf.
pub(crate) fn bucket_index(d: Duration) -> usize {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    BOUNDS_NS.partition_point(|&bound| bound < ns)
}

const STRIPES: usize = super::striped::STRIPES;

/// One thread stripe: the bucket counts and the sum in µs (the sum in ns
/// would wrap a u64 within months under load; µs within millennia).
#[repr(align(128))]
#[derive(Default)]
struct Stripe {
    counts: [AtomicU64; BUCKET_COUNT],
    sum_us: AtomicU64,
}

/// A latency histogram over [`LATENCY_BUCKETS`].
#[derive(Default)]
pub(crate) struct Histogram {
    stripes: [Stripe; STRIPES],
}

/// What a scrape reads: per-bucket counts (not cumulative), their total,
/// and the sum of observations in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct HistogramSnapshot {
    pub buckets: [u64; BUCKET_COUNT],
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    /// Two relaxed adds on the calling thread's stripe.
    pub(crate) fn observe(&self, d: Duration) {
        let stripe = &self.stripes[stripe_index()];
        stripe.counts[bucket_index(d)].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        stripe.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = [0u64; BUCKET_COUNT];
        let mut sum_us = 0u64;
        for s in &self.stripes {
            for (b, c) in buckets.iter_mut().zip(s.counts.iter()) {
                *b = b.wrapping_add(c.load(Ordering::Relaxed));
            }
            sum_us = sum_us.wrapping_add(s.sum_us.load(Ordering::Relaxed));
        }
        HistogramSnapshot {
            buckets,
            count: buckets.iter().fold(0u64, |a, b| a.wrapping_add(*b)),
            sum_seconds: sum_us as f64 / 1e6,
        }
    }

    /// Observations recorded (every bucket added up).
    pub(crate) fn count(&self) -> u64 {
        self.snapshot().count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_agree_in_seconds_and_nanoseconds() {
        for (s, ns) in LATENCY_BUCKETS.iter().zip(BOUNDS_NS) {
            assert_eq!((s * 1e9).round() as u64, ns);
        }
        assert!(BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
        assert!(
            *LATENCY_BUCKETS.last().unwrap() >= 60.0,
            "past the first-byte timeout"
        );
    }

    #[test]
    fn placement_is_le() {
        let ms = Duration::from_millis;
        assert_eq!(bucket_index(Duration::ZERO), 0);
        assert_eq!(bucket_index(Duration::from_micros(100)), 0, "on the bound");
        assert_eq!(
            bucket_index(Duration::from_nanos(100_001)),
            1,
            "just past it"
        );
        assert_eq!(bucket_index(ms(1)), 3);
        assert_eq!(LATENCY_BUCKETS[bucket_index(ms(7))], 0.01);
        assert_eq!(LATENCY_BUCKETS[bucket_index(ms(30_000))], 30.0);
        assert_eq!(LATENCY_BUCKETS[bucket_index(ms(30_001))], 60.0);
        assert_eq!(bucket_index(ms(60_001)), LATENCY_BUCKETS.len(), "+Inf");
        assert_eq!(bucket_index(Duration::MAX), LATENCY_BUCKETS.len());
    }

    #[test]
    fn snapshot_adds_stripes_from_every_thread() {
        let h = std::sync::Arc::new(Histogram::default());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        h.observe(Duration::from_millis(if i % 2 == 0 { 2 } else { 200 }));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = h.snapshot();
        assert_eq!(s.count, 8000);
        assert_eq!(s.buckets[bucket_index(Duration::from_millis(2))], 4000);
        assert_eq!(s.buckets[bucket_index(Duration::from_millis(200))], 4000);
        assert!((s.sum_seconds - (4000.0 * 0.002 + 4000.0 * 0.2)).abs() < 1e-6);
    }

    #[test]
    fn a_stripe_is_its_own_cache_lines() {
        assert_eq!(std::mem::align_of::<Stripe>(), 128);
        assert_eq!(std::mem::size_of::<Stripe>() % 128, 0);
    }
}
