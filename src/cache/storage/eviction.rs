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
//! Eviction is W-TinyLFU over two CLOCK (second chance) rings: new keys
//! enter a small window ring, the rest live in a main ring, and when the
//! shard is over budget the window's CLOCK victim is admitted to main only
//! if a count-min sketch (`frequency`) says it was asked for more often
//! than main's CLOCK victim. Each hand takes the oldest key unless one of
//! its variants was used since the hand last passed it, in which case the
//! bits are cleared, the use is counted in the sketch, and it goes to the
//! back. Frequency is learnt on the writer's side only (inserts, and the
//! hands' passes), so lookups stay as they were. The admission is what
//! makes the store scan-resistant: one-hit keys do not push out keys that
//! are asked for again.

use super::entry::{heap_chunk, Entry};
use super::frequency::FrequencySketch;
use crate::cache::key::{CacheKey, KeyParts};
use arc_swap::ArcSwapOption;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

/// Fixed cost per stored key besides its text and its entries: its slot
/// (`Arc<Slot>` with the allocator's header), the husk of a removed slot
/// the ring may hold until the next compaction (a `Weak` keeps the
/// allocation: at most one per live key, see `Ring::compact_if_sparse`),
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
/// link to the next slot of its bucket and the ring that charges it (both
/// changed by writers only). 56 bytes (80 with the `Arc` and the
/// allocator's header): the reference bit lives in the entries.
pub(super) struct Slot {
    pub(super) key: CacheKey,
    variants: Variants,
    next: ArcSwapOption<Slot>,
}

/// Most keys have one variant: kept inline, without a list to allocate.
/// The list of several is a thin box (16 bytes for the enum, not 24).
/// Each form also carries the slot's ring flag (true: main, false: the
/// window; see `Clock`), which fits beside the enum's tag: a field of its
/// own would take the slot to 64 bytes and its allocation to 96.
enum Variants {
    One(Arc<Entry>, AtomicBool),
    // Boxed on purpose: a thin pointer keeps the slot at 56 bytes.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Arc<Entry>>>, AtomicBool),
}

impl Slot {
    /// The key's variants, oldest first.
    pub(super) fn variants(&self) -> &[Arc<Entry>] {
        match &self.variants {
            Variants::One(e, _) => std::slice::from_ref(e),
            Variants::Many(v, _) => v,
        }
    }

    /// Whether main charges the key, rather than the window (writers
    /// only: readers never look).
    fn in_main(&self) -> bool {
        self.main_flag().load(Ordering::Relaxed)
    }

    fn main_flag(&self) -> &AtomicBool {
        match &self.variants {
            Variants::One(_, f) | Variants::Many(_, f) => f,
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

/// Share of a shard's budget, in percent, for the window: the ring where
/// new keys wait for their duel (see `Clock`).
const WINDOW_PERCENT: usize = 1;

/// One CLOCK ring and what its keys are charged.
struct Ring {
    /// Keys in the order the hand meets them; removed or replaced slots
    /// are skipped (and compacted away) rather than searched for.
    order: VecDeque<Weak<Slot>>,
    keys: usize,
    bytes: usize,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            order: VecDeque::new(),
            keys: 0,
            bytes: 0,
        }
    }

    fn push_back(&mut self, slot: &Arc<Slot>, charge: usize) {
        self.bytes += charge;
        self.keys += 1;
        self.order.push_back(Arc::downgrade(slot));
    }

    /// Moves the hand to the ring's victim and returns it, left first in
    /// line. A slot used since the hand last passed gets a second chance:
    /// its bits are cleared, the pass is counted in `sketch` (the only way
    /// hits are counted: once per pass, nothing written on the hit path),
    /// and it goes to the back. `spare` (the key pushed last) also goes to
    /// the back, uncounted. Two turns of the ring at most.
    fn hand(
        &mut self,
        table: &Table,
        sketch: &mut FrequencySketch,
        spare: Option<&Weak<Slot>>,
    ) -> Option<Arc<Slot>> {
        let mut second_chances = 2 * self.order.len();
        while let Some(weak) = self.order.front() {
            let Some(slot) = weak.upgrade().filter(|s| table.is_current(s)) else {
                self.order.pop_front();
                continue;
            };
            if second_chances == 0 {
                return Some(slot);
            }
            let spared = spare.is_some_and(|n| Weak::ptr_eq(n, weak));
            if spared || slot.take_referenced() {
                if !spared {
                    sketch.increment(key_hash(&slot.key));
                }
                second_chances -= 1;
                self.order.rotate_left(1);
                continue;
            }
            return Some(slot);
        }
        None
    }

    /// Drops ring places of removed slots once they outnumber live keys, so
    /// a churn of purges without evictions cannot grow the ring.
    fn compact_if_sparse(&mut self) {
        if self.order.len() > 2 * self.keys + 32 {
            self.order.retain(|w| w.strong_count() > 0);
        }
    }
}

/// The writer's side of a shard: W-TinyLFU over two CLOCK rings, and the
/// bytes charged. Reached only through the shard's mutex, so writers are
/// serialised.
///
/// New keys go to the window (1 % of the budget); what overflows it moves
/// to main freely while the shard is within its budget. Over budget, the
/// window's victim (the candidate) duels main's victim: the candidate
/// takes main's place only if it was asked for strictly more often (the
/// frequency sketch), else it is evicted itself. A scan of keys asked for
/// once therefore passes through the window without displacing keys that
/// are asked for again, and a cycle larger than the cache keeps a stable
/// part of it where LRU or a lone CLOCK keeps none.
pub(super) struct Clock {
    window: Ring,
    main: Ring,
    sketch: FrequencySketch,
    /// The key pushed last: never the window's candidate, so a response
    /// just fetched is served at least until the shard's next insert.
    newest: Weak<Slot>,
    /// Variants stored, kept as a count so reading it is O(1).
    entries: usize,
    budget: usize,
    window_budget: usize,
}

impl Clock {
    /// A clock for `budget` bytes; its frequency sketch takes
    /// `FrequencySketch::heap_bytes_for(budget)` besides (callers pay it
    /// out of the budget they pass).
    pub(super) fn new(budget: usize) -> Clock {
        Clock {
            window: Ring::new(),
            main: Ring::new(),
            sketch: FrequencySketch::for_budget(budget),
            newest: Weak::new(),
            entries: 0,
            budget,
            window_budget: budget / 100 * WINDOW_PERCENT,
        }
    }

    /// Stores a key's variants, unused so far, in the window, and counts
    /// the request that brought them (the key must not be present: callers
    /// `pop` it first, to unindex what it held).
    pub(super) fn push(&mut self, table: &Table, key: CacheKey, variants: Vec<Arc<Entry>>) {
        self.sketch.increment(key_hash(&key));
        let slot = self.store(table, key, variants, false);
        self.newest = Arc::downgrade(&slot);
        if self.bytes() <= self.budget {
            // Nothing to duel for: the window's overflow moves to main.
            while self.window.bytes > self.window_budget && self.window.keys > 1 {
                let Some(slot) = self
                    .window
                    .hand(table, &mut self.sketch, Some(&self.newest))
                else {
                    break;
                };
                self.admit_front(&slot);
            }
        }
    }

    /// Stores again a key whose variants a rewrite changed (a refresh
    /// after a 304, a soft purge, a sweep), in the ring `old` was in: a
    /// rewrite is not a request, so it is not counted.
    pub(super) fn push_rewritten(
        &mut self,
        table: &Table,
        key: CacheKey,
        variants: Vec<Arc<Entry>>,
        old: &Slot,
    ) {
        self.store(table, key, variants, old.in_main());
    }

    fn store(
        &mut self,
        table: &Table,
        key: CacheKey,
        mut variants: Vec<Arc<Entry>>,
        in_main: bool,
    ) -> Arc<Slot> {
        let charge = charge_of(&key, &variants);
        self.entries += variants.len();
        let flag = AtomicBool::new(in_main);
        let variants = if variants.len() == 1 {
            match variants.pop() {
                Some(e) => Variants::One(e, flag),
                None => Variants::Many(Box::default(), flag),
            }
        } else {
            // Exact capacity: the charge counts the length.
            variants.shrink_to_fit();
            Variants::Many(Box::new(variants), flag)
        };
        let slot = Arc::new(Slot {
            key,
            variants,
            next: ArcSwapOption::empty(),
        });
        table.link(&slot);
        self.ring(in_main).push_back(&slot, charge);
        slot
    }

    /// Takes a key and its variants out, uncharging them.
    pub(super) fn pop(&mut self, table: &Table, key: &CacheKey) -> Option<Arc<Slot>> {
        let slot = table.unlink(key)?;
        self.uncharge(&slot);
        self.ring(slot.in_main()).compact_if_sparse();
        Some(slot)
    }

    /// The next key evicted, taken out while the shard is over its budget;
    /// `None` once it is within it.
    pub(super) fn pop_over_budget(&mut self, table: &Table) -> Option<Arc<Slot>> {
        if self.bytes() <= self.budget {
            return None;
        }
        if self.window.bytes > self.window_budget && self.window.keys > 1 {
            let candidate = self
                .window
                .hand(table, &mut self.sketch, Some(&self.newest))?;
            let Some(victim) = self.main.hand(table, &mut self.sketch, None) else {
                return Some(self.evict_front(table, candidate));
            };
            let asked = |s: &Slot| self.sketch.estimate(key_hash(&s.key));
            // Strictly more: on a tie the key already kept stays, so a
            // cycle larger than the cache does not churn it.
            let admitted = asked(&candidate) > asked(&victim);
            return Some(if admitted {
                self.admit_front(&candidate);
                self.evict_front(table, victim)
            } else {
                self.evict_front(table, candidate)
            });
        }
        let victim = match self.main.hand(table, &mut self.sketch, None) {
            Some(victim) => victim,
            // Main is empty: the window's victim, the newest key last.
            None => {
                let spare = (self.window.keys > 1).then_some(&self.newest);
                self.window.hand(table, &mut self.sketch, spare)?
            }
        };
        Some(self.evict_front(table, victim))
    }

    /// Moves the window's first key (`slot`, which its hand just chose)
    /// to the back of main.
    fn admit_front(&mut self, slot: &Arc<Slot>) {
        let charge = charge_of(&slot.key, slot.variants());
        self.window.order.pop_front();
        self.window.bytes -= charge;
        self.window.keys -= 1;
        slot.main_flag().store(true, Ordering::Relaxed);
        self.main.push_back(slot, charge);
    }

    /// Evicts `slot`, first in line in its ring (its hand just chose it).
    fn evict_front(&mut self, table: &Table, slot: Arc<Slot>) -> Arc<Slot> {
        self.ring(slot.in_main()).order.pop_front();
        table.unlink(&slot.key);
        self.uncharge(&slot);
        slot
    }

    fn ring(&mut self, in_main: bool) -> &mut Ring {
        if in_main {
            &mut self.main
        } else {
            &mut self.window
        }
    }

    /// Every key's slot, main's then the window's, each oldest first (for
    /// listing and scans): a walk of the rings, so it costs what the shard
    /// holds, not its table's size.
    pub(super) fn slots(&self, table: &Table) -> Vec<Arc<Slot>> {
        self.main
            .order
            .iter()
            .chain(self.window.order.iter())
            .filter_map(Weak::upgrade)
            .filter(|s| table.is_current(s))
            .collect()
    }

    fn uncharge(&mut self, slot: &Slot) {
        let charge = charge_of(&slot.key, slot.variants());
        self.entries -= slot.variants().len();
        let ring = self.ring(slot.in_main());
        ring.bytes -= charge;
        ring.keys -= 1;
    }

    pub(super) fn bytes(&self) -> usize {
        self.window.bytes + self.main.bytes
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
        // Room for 3: the window's share (1 %) is less than a key, so it
        // keeps just the newest and the rest moves to main while within
        // the budget.
        let table = Table::for_budget(0);
        let one = charge_of(&key(0), &[entry()]);
        let mut clock = Clock::new(3 * one);
        for i in 0..3 {
            clock.push(&table, key(i), vec![entry()]);
        }
        assert_eq!((clock.main.keys, clock.window.keys), (2, 1));
        table.find(key_hash(&key(0)), &key(0), |v| v[0].mark_used());
        clock.push(&table, key(3), vec![entry()]);
        // The window's candidate is 2 (3 just arrived); main's hand spares
        // 0, which was used, and stops at 1. Both were asked for once: on a
        // tie the key already in main stays, and the candidate goes.
        let evicted = clock.pop_over_budget(&table).unwrap();
        assert_eq!(evicted.key, key(2), "2 loses its duel against 1");
        assert!(clock.pop_over_budget(&table).is_none());
        assert_eq!(clock.bytes(), 3 * one);
        // 3 is asked for again (evicted and fetched anew would count the
        // same): now it beats 1, the victim still first in line.
        table.find(key_hash(&key(3)), &key(3), |v| v[0].mark_used());
        clock.push(&table, key(4), vec![entry()]);
        let evicted = clock.pop_over_budget(&table).unwrap();
        assert_eq!(evicted.key, key(1), "3 was used: it takes 1's place");
        assert!(clock.pop_over_budget(&table).is_none());
        let kept: Vec<CacheKey> = clock.slots(&table).iter().map(|s| s.key.clone()).collect();
        assert_eq!(kept, vec![key(0), key(3), key(4)]);
    }

    #[test]
    fn the_newest_key_is_never_the_candidate() {
        // A key just pushed is not the window's candidate, even when the
        // window's other key was used (the hand passes that one by first).
        let table = Table::for_budget(0);
        let one = charge_of(&key(0), &[entry()]);
        let mut clock = Clock::new(2 * one);
        clock.push(&table, key(0), vec![entry()]);
        clock.push(&table, key(1), vec![entry()]);
        table.find(key_hash(&key(1)), &key(1), |v| v[0].mark_used());
        clock.push(&table, key(2), vec![entry()]);
        let evicted = clock.pop_over_budget(&table).unwrap();
        assert_ne!(evicted.key, key(2));
        assert!(table.peek(&key(2)).is_some());
        assert!(clock.pop_over_budget(&table).is_none());
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
        let places = clock.window.order.len() + clock.main.order.len();
        assert!(places <= 2 * 32 + 10, "{places}");
        assert_eq!((clock.bytes(), clock.entries()), (0, 0));
    }
}
