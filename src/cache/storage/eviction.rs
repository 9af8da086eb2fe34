//! One memory shard's keys: a hash table that readers walk without a lock,
//! and the CLOCK that evicts from it within the shard's byte budget.
//!
//! Readers (`Table::find`) take no lock and write nothing shared: each
//! bucket is an `ArcSwapOption` chain of immutable slots (arc-swap's loads
//! pin a slot through the reading thread's own debt list), and "recently
//! used" is a reference bit in the entry served (`Entry::mark_used`), set
//! only when it is clear, so a hot entry's hits only read it. Writers
//! (insert, remove, evict) hold the shard's mutex and replace whole slots,
//! so a reader sees a key's variants before or after a change, never half
//! of one.
//!
//! Eviction is CLOCK (second chance) over a ring in insertion order: the
//! oldest key goes first unless one of its variants was used since the
//! hand last passed it, in which case the bits are cleared and it goes to
//! the back. That is LRU's order for keys that are not used, and keeps keys
//! that are.

use super::entry::{heap_chunk, Entry};
use crate::cache::key::{CacheKey, KeyParts};
use arc_swap::ArcSwapOption;
use std::collections::VecDeque;
use std::sync::{Arc, Weak};

/// Fixed cost per stored key besides its text and its entries: its slot
/// (`Arc<Slot>` with the allocator's header), the husk of a removed slot
/// the ring may hold until the next compaction (a `Weak` keeps the
/// allocation: at most one per live key, see `Clock::compact_if_sparse`),
/// and its place in the ring (8 bytes, twice that while the ring grows).
const KEY_OVERHEAD: usize = 2 * heap_chunk(std::mem::size_of::<Slot>() + 16) + 16;

/// Budget bytes per hash bucket: the table is sized once from the budget
/// (one 8-byte bucket per KiB, 0.8 %), so it never resizes under readers.
const BYTES_PER_BUCKET: usize = 1024;
const MIN_BUCKETS: usize = 16;
const MAX_BUCKETS: usize = 1 << 22;

/// What a key's presence costs, besides its entries: the text (shared by
/// the table and every tag-index slot) and its slot.
pub(super) fn key_charge(key: &CacheKey) -> usize {
    KEY_OVERHEAD + heap_chunk(key.heap_bytes())
}

/// Everything a key and its variants are charged: the key, each entry, and
/// the list of a key with several variants (boxed: see `Variants`).
fn charge_of(key: &CacheKey, variants: &[Arc<Entry>]) -> usize {
    let list = if variants.len() > 1 {
        heap_chunk(std::mem::size_of::<Vec<Arc<Entry>>>())
            + heap_chunk(std::mem::size_of_val(variants))
    } else {
        0
    };
    key_charge(key) + list + variants.iter().map(|e| e.charge()).sum::<usize>()
}

/// The hash that picks a key's shard (high bits) and bucket (low bits).
pub(super) fn key_hash(key: &CacheKey) -> u64 {
    text_hash(key.version(), key.as_str().bytes())
}

/// [`key_hash`] of the key `parts` name, without building it.
pub(super) fn parts_hash(parts: &KeyParts<'_>) -> u64 {
    text_hash(parts.version, parts.text_bytes())
}

fn text_hash(version: u64, text: impl Iterator<Item = u8>) -> u64 {
    // FNV-1a over the text, then a finaliser so both ends of the word mix.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ version;
    for b in text {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// A key and its Vary variants, as readers see them. Immutable but for the
/// link to the next slot of its bucket. 56 bytes (80 with the `Arc` and the
/// allocator's header): the reference bit lives in the entries.
pub(super) struct Slot {
    pub(super) key: CacheKey,
    variants: Variants,
    next: ArcSwapOption<Slot>,
}

/// Most keys have one variant: kept inline, without a list to allocate.
/// The list of several is a thin box (16 bytes for the enum, not 24).
enum Variants {
    One(Arc<Entry>),
    // Boxed on purpose: a thin pointer keeps the slot at 56 bytes.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Arc<Entry>>>),
}

impl Slot {
    /// The key's variants, oldest first.
    pub(super) fn variants(&self) -> &[Arc<Entry>] {
        match &self.variants {
            Variants::One(e) => std::slice::from_ref(e),
            Variants::Many(v) => v,
        }
    }

    /// Whether a variant was used since the hand last passed; clears
    /// every variant's bit.
    fn take_referenced(&self) -> bool {
        self.variants()
            .iter()
            .fold(false, |used, e| e.take_referenced() | used)
    }
}

/// A shard's keys: buckets of slot chains, read without a lock.
pub(super) struct Table {
    buckets: Box<[ArcSwapOption<Slot>]>,
    mask: u64,
}

impl Table {
    /// A table sized for `budget` bytes of entries.
    pub(super) fn for_budget(budget: usize) -> Table {
        let n = (budget / BYTES_PER_BUCKET)
            .clamp(MIN_BUCKETS, MAX_BUCKETS)
            .next_power_of_two();
        Table {
            buckets: (0..n).map(|_| ArcSwapOption::empty()).collect(),
            mask: n as u64 - 1,
        }
    }

    /// Heap the bucket array takes (taken from the shard's budget).
    pub(super) fn heap_bytes(&self) -> usize {
        self.buckets.len() * std::mem::size_of::<ArcSwapOption<Slot>>()
    }

    fn bucket(&self, hash: u64) -> &ArcSwapOption<Slot> {
        // The mask keeps the index within the power-of-two length.
        &self.buckets[(hash & self.mask) as usize]
    }

    /// The hit path: `f` over a key's variants (the caller marks the one
    /// it serves used). Takes no lock.
    pub(super) fn find<R>(
        &self,
        hash: u64,
        key: &CacheKey,
        f: impl FnOnce(&[Arc<Entry>]) -> R,
    ) -> Option<R> {
        self.find_by(hash, |k| k == key, f)
    }

    /// [`Table::find`] for the key `is` accepts (`hash` is its hash).
    pub(super) fn find_by<R>(
        &self,
        hash: u64,
        is: impl Fn(&CacheKey) -> bool,
        f: impl FnOnce(&[Arc<Entry>]) -> R,
    ) -> Option<R> {
        let mut cur = self.bucket(hash).load();
        loop {
            let next = match &*cur {
                None => return None,
                Some(s) if is(&s.key) => return Some(f(s.variants())),
                Some(s) => s.next.load(),
            };
            cur = next;
        }
    }

    /// A key's slot, leaving its reference bit as it is.
    pub(super) fn peek(&self, key: &CacheKey) -> Option<Arc<Slot>> {
        let mut cur = self.bucket(key_hash(key)).load_full();
        while let Some(s) = cur {
            if s.key == *key {
                return Some(s);
            }
            cur = s.next.load_full();
        }
        None
    }

    fn is_current(&self, slot: &Arc<Slot>) -> bool {
        self.peek(&slot.key).is_some_and(|s| Arc::ptr_eq(&s, slot))
    }

    fn link(&self, slot: &Arc<Slot>) {
        let bucket = self.bucket(key_hash(&slot.key));
        slot.next.store(bucket.load_full());
        bucket.store(Some(Arc::clone(slot)));
    }

    /// Takes a key's slot out of its chain. A reader standing on it still
    /// sees the rest of the chain through its `next`.
    fn unlink(&self, key: &CacheKey) -> Option<Arc<Slot>> {
        let bucket = self.bucket(key_hash(key));
        let mut prev: Option<Arc<Slot>> = None;
        let mut cur = bucket.load_full();
        while let Some(s) = cur {
            if s.key == *key {
                let next = s.next.load_full();
                match &prev {
                    None => bucket.store(next),
                    Some(p) => p.next.store(next),
                }
                return Some(s);
            }
            cur = s.next.load_full();
            prev = Some(s);
        }
        None
    }
}

impl Drop for Table {
    /// Dropping an `ArcSwap` walks every thread's debt list, empty or not;
    /// a table has one per KiB of budget (262,144 for 256 MiB), most of
    /// them empty. An empty bucket holds no reference and no reader is left
    /// to owe it one, so it is forgotten rather than dropped: dropping a
    /// table costs its keys, not its size.
    fn drop(&mut self) {
        for bucket in std::mem::take(&mut self.buckets).into_vec() {
            if bucket.load().is_none() {
                std::mem::forget(bucket);
            }
        }
    }
}

/// The writer's side of a shard: the CLOCK ring and the bytes charged.
/// Reached only through the shard's mutex, so writers are serialised.
pub(super) struct Clock {
    /// Keys in insertion order; removed or replaced slots are skipped
    /// (and compacted away) rather than searched for.
    ring: VecDeque<Weak<Slot>>,
    keys: usize,
    bytes: usize,
    /// Variants stored, kept as a count so reading it is O(1).
    entries: usize,
    budget: usize,
}

impl Clock {
    pub(super) fn new(budget: usize) -> Clock {
        Clock {
            ring: VecDeque::new(),
            keys: 0,
            bytes: 0,
            entries: 0,
            budget,
        }
    }

    /// Stores a key's variants, unused so far (the key must not be present:
    /// callers `pop` it first, to unindex what it held).
    pub(super) fn push(&mut self, table: &Table, key: CacheKey, mut variants: Vec<Arc<Entry>>) {
        self.bytes += charge_of(&key, &variants);
        self.entries += variants.len();
        self.keys += 1;
        let variants = if variants.len() == 1 {
            match variants.pop() {
                Some(e) => Variants::One(e),
                None => Variants::Many(Box::default()),
            }
        } else {
            // Exact capacity: the charge counts the length.
            variants.shrink_to_fit();
            Variants::Many(Box::new(variants))
        };
        let slot = Arc::new(Slot {
            key,
            variants,
            next: ArcSwapOption::empty(),
        });
        table.link(&slot);
        self.ring.push_back(Arc::downgrade(&slot));
    }

    /// Takes a key and its variants out, uncharging them.
    pub(super) fn pop(&mut self, table: &Table, key: &CacheKey) -> Option<Arc<Slot>> {
        let slot = table.unlink(key)?;
        self.uncharge(&slot);
        self.compact_if_sparse();
        Some(slot)
    }

    /// The next key the CLOCK hand evicts, taken out while the shard is
    /// over its budget; `None` once it is within it.
    pub(super) fn pop_over_budget(&mut self, table: &Table) -> Option<Arc<Slot>> {
        if self.bytes <= self.budget {
            return None;
        }
        // Two turns of the ring at most: the first clears every bit.
        let mut second_chances = 2 * self.ring.len();
        while let Some(weak) = self.ring.pop_front() {
            let Some(slot) = weak.upgrade() else {
                continue;
            };
            if !table.is_current(&slot) {
                continue;
            }
            if second_chances > 0 && slot.take_referenced() {
                second_chances -= 1;
                self.ring.push_back(weak);
                continue;
            }
            table.unlink(&slot.key);
            self.uncharge(&slot);
            return Some(slot);
        }
        None
    }

    /// Every key's slot, oldest first (for listing and scans): a walk of
    /// the ring, so it costs what the shard holds, not its table's size.
    pub(super) fn slots(&self, table: &Table) -> Vec<Arc<Slot>> {
        self.ring
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|s| table.is_current(s))
            .collect()
    }

    fn uncharge(&mut self, slot: &Slot) {
        self.bytes -= charge_of(&slot.key, slot.variants());
        self.entries -= slot.variants().len();
        self.keys -= 1;
    }

    /// Drops ring places of removed slots once they outnumber live keys, so
    /// a churn of purges without evictions cannot grow the ring.
    fn compact_if_sparse(&mut self) {
        if self.ring.len() > 2 * self.keys + 32 {
            self.ring.retain(|w| w.strong_count() > 0);
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn entries(&self) -> usize {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::Freshness;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use std::time::{Duration, SystemTime};

    fn entry() -> Arc<Entry> {
        Arc::new(Entry::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from_static(b"x"),
            vec![],
            Freshness::plain(Duration::from_secs(60), SystemTime::now()),
            vec![],
        ))
    }

    fn key(i: usize) -> CacheKey {
        CacheKey::new(1, false, "h", &format!("/{i}"))
    }

    #[test]
    fn a_slot_takes_an_80_byte_chunk() {
        assert_eq!(std::mem::size_of::<Slot>(), 56);
        assert_eq!(heap_chunk(std::mem::size_of::<Slot>() + 16), 80);
    }

    #[test]
    fn several_variants_are_charged_their_list() {
        let one = charge_of(&key(0), &[entry()]);
        let two = charge_of(&key(0), &[entry(), entry()]);
        assert_eq!(two, 2 * one - key_charge(&key(0)) + 32 + 32);
    }

    #[test]
    fn chains_hold_every_key_of_a_crowded_table() {
        // 16 buckets, 500 keys: long chains, links and unlinks in the middle.
        let table = Table::for_budget(0);
        let mut clock = Clock::new(usize::MAX);
        for i in 0..500 {
            clock.push(&table, key(i), vec![entry()]);
        }
        for i in (0..500).step_by(3) {
            assert!(clock.pop(&table, &key(i)).is_some());
        }
        for i in 0..500 {
            let found = table.find(key_hash(&key(i)), &key(i), |v| v.len());
            assert_eq!(found, (i % 3 != 0).then_some(1), "key {i}");
        }
        assert_eq!(clock.slots(&table).len(), 500 - 167);
        assert_eq!(clock.entries(), 500 - 167);
    }

    #[test]
    fn the_hand_spares_used_keys_and_takes_the_oldest_unused() {
        let table = Table::for_budget(0);
        let one = charge_of(&key(0), &[entry()]);
        let mut clock = Clock::new(3 * one);
        for i in 0..3 {
            clock.push(&table, key(i), vec![entry()]);
        }
        table.find(key_hash(&key(0)), &key(0), |v| v[0].mark_used());
        clock.push(&table, key(3), vec![entry()]);
        let evicted = clock.pop_over_budget(&table).unwrap();
        assert_eq!(evicted.key, key(1), "0 was used, 1 is the oldest unused");
        assert!(clock.pop_over_budget(&table).is_none());
        assert_eq!(clock.bytes(), 3 * one);
    }

    #[test]
    fn the_ring_does_not_grow_with_churn() {
        let table = Table::for_budget(0);
        let mut clock = Clock::new(usize::MAX);
        for round in 0..100 {
            for i in 0..10 {
                clock.push(&table, key(round * 10 + i), vec![entry()]);
            }
            for i in 0..10 {
                clock.pop(&table, &key(round * 10 + i));
            }
        }
        assert!(clock.ring.len() <= 32 + 10, "{}", clock.ring.len());
        assert_eq!((clock.bytes(), clock.entries()), (0, 0));
    }
}
