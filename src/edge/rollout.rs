//! Hash bucketing: which bucket (of [`BUCKETS`]) a user falls in for a
//! seed, by SHA-256 (kvgate's experiments) or GrowthBook's FNV-1a scheme
//! (flag rollouts, and experiments with `hash = "growthbook"`).
//!
//! A rollout includes a user when their bucket is below the percentage's
//! cutoff, so raising the percentage only ever adds users.

use sha2::{Digest, Sha256};

/// Buckets a user id hashes into: weights and percentages resolve to 0.01 %.
pub(crate) const BUCKETS: u64 = 10_000;

/// FNV-1a, 32 bits, over the concatenation of `parts`.
pub(crate) fn fnv1a32(parts: &[&[u8]]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for part in parts {
        for &b in *part {
            hash ^= u32::from(b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    hash
}

/// Decimal digits of `n` in a stack buffer (no allocation on the request path).
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

/// GrowthBook's hash v2 as an integer bucket in `0..BUCKETS`:
/// `fnv1a32(str(fnv1a32(seed + value))) % 10000`.
pub(crate) fn growthbook_v2_bucket(seed: &str, value: &str) -> u64 {
    let inner = fnv1a32(&[seed.as_bytes(), value.as_bytes()]);
    let mut buf = [0u8; 10];
    u64::from(fnv1a32(&[decimal(inner, &mut buf)])) % BUCKETS
}

/// GrowthBook's `hash(seed, value, version)` in `[0, 1)`; `None` for an
/// unknown version, as the SDK (the tests check both versions against
/// GrowthBook's vectors; the edge uses v2).
#[cfg(test)]
pub(crate) fn growthbook_hash(seed: &str, value: &str, version: u32) -> Option<f64> {
    match version {
        1 => Some(f64::from(fnv1a32(&[value.as_bytes(), seed.as_bytes()]) % 1000) / 1000.0),
        2 => Some(growthbook_v2_bucket(seed, value) as f64 / BUCKETS as f64),
        _ => None,
    }
}

/// GrowthBook's `getBucketRanges`: each variant's `[start, end)` on the unit
/// line, shrunk to `coverage` of its share. Weights that do not sum to 1
/// (within 1 %) or do not match the variant count fall back to equal shares.
pub(crate) fn growthbook_ranges(count: usize, coverage: f64, weights: &[f64]) -> Vec<(f64, f64)> {
    let coverage = coverage.clamp(0.0, 1.0);
    let equal = || vec![1.0 / count as f64; count];
    let weights = if weights.len() != count {
        equal()
    } else {
        let total: f64 = weights.iter().sum();
        if !(0.99..=1.01).contains(&total) {
            equal()
        } else {
            weights.to_vec()
        }
    };
    let mut cumulative = 0.0;
    weights
        .iter()
        .map(|w| {
            let start = cumulative;
            cumulative += w;
            (start, start + coverage * w)
        })
        .collect()
}

/// GrowthBook's `chooseVariation`: the range `n` falls in, if any.
pub(crate) fn choose_variation(n: f64, ranges: &[(f64, f64)]) -> Option<usize> {
    ranges
        .iter()
        .position(|&(start, end)| n >= start && n < end)
}

/// (entry bucket, variant bucket) from one SHA-256 of seed and id: bytes
/// 0..8 pick the variant, bytes 8..16 decide entry, so the two are
/// independent, and a traffic increase only adds users.
pub(crate) fn sha256_buckets(seed: &str, user_id: &str) -> (u64, u64) {
    let mut hasher = Sha256::new();
    hasher.update(seed.as_bytes());
    hasher.update(user_id.as_bytes());
    let digest = hasher.finalize();
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&digest[at..at + 8]);
        u64::from_be_bytes(bytes) % BUCKETS
    };
    (word(8), word(0))
}

/// The bucket cutoff of a percentage (0..=100): buckets below it are in.
pub(crate) fn percent_cutoff(percent: f64) -> u64 {
    ((percent.clamp(0.0, 100.0) / 100.0) * BUCKETS as f64).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// GrowthBook's own vectors (packages/sdk-js/test/cases.json, "hash"):
    /// seed, value, version, expected.
    const HASH_CASES: &[(&str, &str, u32, Option<f64>)] = &[
        ("", "a", 1, Some(0.22)),
        ("", "b", 1, Some(0.077)),
        ("b", "a", 1, Some(0.946)),
        ("ef", "d", 1, Some(0.652)),
        ("asdf", "8952klfjas09ujk", 1, Some(0.549)),
        ("", "123", 1, Some(0.011)),
        ("", "___)((*\":&", 1, Some(0.563)),
        ("seed", "a", 2, Some(0.0505)),
        ("seed", "b", 2, Some(0.2696)),
        ("foo", "ab", 2, Some(0.2575)),
        ("foo", "def", 2, Some(0.2019)),
        ("89123klj", "8952klfjas09ujkasdf", 2, Some(0.124)),
        ("90850943850283058242805", "123", 2, Some(0.7516)),
        ("()**(%$##$%#$#", "___)((*\":&", 2, Some(0.0128)),
        ("abc", "def", 99, None),
    ];

    #[test]
    fn growthbook_hash_vectors() {
        for &(seed, value, version, want) in HASH_CASES {
            let got = growthbook_hash(seed, value, version);
            match (got, want) {
                (Some(g), Some(w)) => assert!(
                    (g - w).abs() < 1e-9,
                    "{seed:?} {value:?} v{version}: {g} != {w}"
                ),
                (None, None) => {}
                _ => panic!("{seed:?} {value:?} v{version}: {got:?} != {want:?}"),
            }
        }
    }

    /// GrowthBook's "getBucketRange" and "chooseVariation" cases.
    #[test]
    fn growthbook_range_vectors() {
        type Case = (usize, f64, &'static [f64], &'static [(f64, f64)]);
        let cases: &[Case] = &[
            (2, 1.0, &[], &[(0.0, 0.5), (0.5, 1.0)]),
            (2, 0.5, &[], &[(0.0, 0.25), (0.5, 0.75)]),
            (2, 0.0, &[], &[(0.0, 0.0), (0.5, 0.5)]),
            (
                4,
                1.0,
                &[],
                &[(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)],
            ),
            (2, 1.0, &[0.4, 0.6], &[(0.0, 0.4), (0.4, 1.0)]),
            (
                3,
                0.2,
                &[0.2, 0.3, 0.5],
                &[(0.0, 0.04), (0.2, 0.26), (0.5, 0.6)],
            ),
            (2, -0.2, &[], &[(0.0, 0.0), (0.5, 0.5)]),
            (2, 1.5, &[], &[(0.0, 0.5), (0.5, 1.0)]),
            (2, 1.0, &[0.4, 0.1], &[(0.0, 0.5), (0.5, 1.0)]),
            (2, 1.0, &[0.7, 0.6], &[(0.0, 0.5), (0.5, 1.0)]),
            (
                4,
                1.0,
                &[0.4, 0.4, 0.2],
                &[(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)],
            ),
            (2, 1.0, &[0.4, 0.5999], &[(0.0, 0.4), (0.4, 0.9999)]),
        ];
        for (count, coverage, weights, want) in cases {
            let got = growthbook_ranges(*count, *coverage, weights);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want.iter()) {
                assert!(
                    (g.0 - w.0).abs() < 1e-9 && (g.1 - w.1).abs() < 1e-9,
                    "{got:?} != {want:?}"
                );
            }
        }
        let even = [(0.0, 0.5), (0.5, 1.0)];
        let reduced = [(0.0, 0.25), (0.5, 0.75)];
        for (n, ranges, want) in [
            (0.2, &even[..], Some(0)),
            (0.6, &even[..], Some(1)),
            (0.0, &even[..], Some(0)),
            (0.5, &even[..], Some(1)),
            (0.2, &reduced[..], Some(0)),
            (0.4, &reduced[..], None),
            (0.25, &reduced[..], None),
            (0.5, &reduced[..], Some(1)),
            (0.5, &[(0.0, 0.5), (0.5, 0.5), (0.5, 1.0)][..], Some(2)),
        ] {
            assert_eq!(choose_variation(n, ranges), want, "{n} in {ranges:?}");
        }
    }

    #[test]
    fn decimal_digits() {
        let mut buf = [0u8; 10];
        for n in [0u32, 7, 10, 4_294_967_295] {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }

    #[test]
    fn buckets_spread_evenly() {
        let mut in_rollout = 0;
        for i in 0..20_000 {
            if growthbook_v2_bucket("flag", &format!("user-{i}")) < percent_cutoff(30.0) {
                in_rollout += 1;
            }
        }
        // 30 % of 20,000 is 6,000; 4 standard deviations is about 260.
        assert!((5_740..=6_260).contains(&in_rollout), "{in_rollout}");
    }

    proptest! {
        #[test]
        fn a_user_in_at_a_lower_percentage_stays_in_at_a_higher_one(
            user in "[a-z0-9:-]{1,40}", seed in "[a-zA-Z]{1,10}", low in 0.0f64..=100.0, high in 0.0f64..=100.0,
        ) {
            let (low, high) = if low <= high { (low, high) } else { (high, low) };
            let bucket = growthbook_v2_bucket(&seed, &user);
            if bucket < percent_cutoff(low) {
                prop_assert!(bucket < percent_cutoff(high));
            }
            prop_assert!(bucket < BUCKETS);
        }
    }
}
