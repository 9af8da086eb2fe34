//! How often a shard's keys were asked for, approximately: a count-min
//! sketch of 4-bit counters that forgets by halving.
//!
//! It is TinyLFU's memory of popularity, kept in a few bytes per KiB of
//! budget whatever the number of keys seen, including keys no longer (or
//! never) stored: that is what lets a key asked for again be told from a
//! one-hit wonder of a scan. Only the shard's writer touches it.

/// Rows of counters: a key's estimate is the least of its 4 counters.
const ROWS: usize = 4;
/// Budget bytes per counter of a row.
const BYTES_PER_COUNTER: usize = 1024;
const MIN_WIDTH: usize = 64;
const MAX_WIDTH: usize = 1 << 22;
/// Counters per `u64` word (4 bits each).
const PER_WORD: usize = 16;
/// A counter saturates here.
const MAX_COUNT: u64 = 15;
/// After this many increments per counter of a row, every counter is
/// halved, so what was popular once fades and the counters stay small.
const SAMPLE_PER_WIDTH: usize = 10;
/// One multiplier per row (odd): each row indexes with different bits.
const ROW_MULTIPLIERS: [u64; ROWS] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0xd6e8_feb8_6659_fd93,
];

pub(super) struct FrequencySketch {
    /// `ROWS` rows of `width` counters, 16 to a word, row after row.
    words: Box<[u64]>,
    /// log2 of the row width.
    width_bits: u32,
    increments: usize,
    sample: usize,
}

impl FrequencySketch {
    /// A sketch for a shard of `budget` bytes: about one counter per KiB
    /// in each row.
    pub(super) fn for_budget(budget: usize) -> FrequencySketch {
        let width = width_for(budget);
        FrequencySketch {
            words: vec![0; ROWS * width / PER_WORD].into_boxed_slice(),
            width_bits: width.trailing_zeros(),
            increments: 0,
            sample: SAMPLE_PER_WIDTH * width,
        }
    }

    /// Heap a sketch for `budget` takes (taken from the shard's budget).
    pub(super) fn heap_bytes_for(budget: usize) -> usize {
        ROWS * width_for(budget) / PER_WORD * std::mem::size_of::<u64>()
    }

    /// Heap this sketch takes.
    #[cfg(test)]
    pub(super) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.words)
    }

    /// Counts one request for the key of `hash` (saturating), halving
    /// every counter once a sample's worth were counted.
    pub(super) fn increment(&mut self, hash: u64) {
        for row in 0..ROWS {
            let (word, shift) = self.place(row, hash);
            if (self.words[word] >> shift) & MAX_COUNT < MAX_COUNT {
                self.words[word] += 1 << shift;
            }
        }
        self.increments += 1;
        if self.increments >= self.sample {
            self.halve();
        }
    }

    /// How often the key of `hash` was asked for (never less than it was,
    /// since the last halvings; more when its counters are shared).
    pub(super) fn estimate(&self, hash: u64) -> u8 {
        (0..ROWS)
            .map(|row| {
                let (word, shift) = self.place(row, hash);
                ((self.words[word] >> shift) & MAX_COUNT) as u8
            })
            .min()
            .unwrap_or(0)
    }

    fn halve(&mut self) {
        // Each 4-bit counter shifted right by one: the bit that crosses
        // into the counter below is masked off.
        for w in self.words.iter_mut() {
            *w = (*w >> 1) & 0x7777_7777_7777_7777;
        }
        self.increments /= 2;
    }

    /// The word and bit offset of the key's counter in `row`.
    fn place(&self, row: usize, hash: u64) -> (usize, u32) {
        // Multiply-shift: the top bits of the product depend on every bit
        // of the hash (the shard's keys share its high bits).
        let index = (hash.wrapping_mul(ROW_MULTIPLIERS[row]) >> (64 - self.width_bits)) as usize;
        let counter = (row << self.width_bits) | index;
        (counter / PER_WORD, (counter % PER_WORD) as u32 * 4)
    }
}

fn width_for(budget: usize) -> usize {
    (budget / BYTES_PER_COUNTER)
        .clamp(MIN_WIDTH, MAX_WIDTH)
        .next_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: u64) -> u64 {
        // Any well-mixed hash; the store's is FNV-1a with a finaliser.
        let mut h = i.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h.wrapping_mul(0xc4ce_b9fe_1a85_ec53)
    }

    #[test]
    fn counts_saturate_at_15_and_never_underestimate() {
        let mut s = FrequencySketch::for_budget(1 << 20);
        for i in 0..200u64 {
            for _ in 0..(i % 7) {
                s.increment(hash(i));
            }
        }
        for i in 0..200u64 {
            assert!(u64::from(s.estimate(hash(i))) >= i % 7, "key {i}");
        }
        for _ in 0..40 {
            s.increment(hash(1000));
        }
        assert_eq!(s.estimate(hash(1000)), 15);
        assert_eq!(s.estimate(hash(1001)), 0, "a key never counted");
    }

    #[test]
    fn a_sample_of_increments_halves_every_counter() {
        let mut s = FrequencySketch::for_budget(0);
        assert_eq!(s.sample, 10 * MIN_WIDTH);
        for _ in 0..8 {
            s.increment(hash(1));
        }
        assert_eq!(s.estimate(hash(1)), 8);
        // Fill the rest of the sample with one other key.
        for _ in 8..s.sample {
            s.increment(hash(2));
        }
        assert_eq!(s.estimate(hash(1)), 4);
        assert_eq!(s.estimate(hash(2)), 7, "15, halved");
        assert_eq!(s.increments, s.sample / 2);
    }

    #[test]
    fn sized_from_the_budget_and_charged_its_heap() {
        let s = FrequencySketch::for_budget(1_500_000);
        assert_eq!(1 << s.width_bits, 2048);
        assert_eq!(s.heap_bytes(), 4 * 2048 / 2);
        assert_eq!(s.heap_bytes(), FrequencySketch::heap_bytes_for(1_500_000));
        assert_eq!(FrequencySketch::heap_bytes_for(0), 4 * 64 / 2);
    }
}
