//! Eviction for one memory shard: the keys in least-recently-used order,
//! each with its Vary variants, and the bytes they are charged against the
//! shard's budget.
//!
//! The LRU is also the shard's key map (one hash table, not two), so a key
//! is charged once for its node here and nowhere else.

use super::entry::Entry;
use crate::cache::key::CacheKey;
use lru::LruCache;
use std::sync::Arc;

/// Fixed cost per stored key besides its text: the LRU node and its hash
/// table slot.
const KEY_OVERHEAD: usize = 128;

/// What a key's presence costs, besides its entries: the text (shared by
/// the LRU and every tag-index slot) and the LRU node.
pub(super) fn key_charge(key: &CacheKey) -> usize {
    KEY_OVERHEAD + key.heap_bytes()
}

/// Everything a key and its variants are charged.
fn charge_of(key: &CacheKey, variants: &[Arc<Entry>]) -> usize {
    key_charge(key) + variants.iter().map(|e| e.charge).sum::<usize>()
}

/// Keys and their variants in LRU order, with the bytes they are charged.
pub(super) struct BudgetedLru {
    lru: LruCache<CacheKey, Vec<Arc<Entry>>>,
    bytes: usize,
    /// Variants stored, kept as a count so reading it is O(1).
    entries: usize,
    budget: usize,
}

impl BudgetedLru {
    pub(super) fn new(budget: usize) -> BudgetedLru {
        BudgetedLru {
            lru: LruCache::unbounded(),
            bytes: 0,
            entries: 0,
            budget,
        }
    }

    /// A key's variants, marking the key recently used.
    pub(super) fn get(&mut self, key: &CacheKey) -> Option<&Vec<Arc<Entry>>> {
        self.lru.get(key)
    }

    /// A key's variants, leaving its place in the LRU as it is.
    pub(super) fn peek(&self, key: &CacheKey) -> Option<&Vec<Arc<Entry>>> {
        self.lru.peek(key)
    }

    /// Stores a key's variants as the most recently used (the key must not
    /// be present: callers `pop` it first, to unindex what it held).
    pub(super) fn push(&mut self, key: CacheKey, variants: Vec<Arc<Entry>>) {
        self.bytes += charge_of(&key, &variants);
        self.entries += variants.len();
        self.lru.put(key, variants);
    }

    /// Takes a key and its variants out, uncharging them.
    pub(super) fn pop(&mut self, key: &CacheKey) -> Option<Vec<Arc<Entry>>> {
        let variants = self.lru.pop(key)?;
        self.uncharge(key, &variants);
        Some(variants)
    }

    /// The least recently used key, taken out while the shard is over its
    /// budget; `None` once it is within it.
    pub(super) fn pop_over_budget(&mut self) -> Option<(CacheKey, Vec<Arc<Entry>>)> {
        if self.bytes <= self.budget {
            return None;
        }
        let (key, variants) = self.lru.pop_lru()?;
        self.uncharge(&key, &variants);
        Some((key, variants))
    }

    fn uncharge(&mut self, key: &CacheKey, variants: &[Arc<Entry>]) {
        self.bytes -= charge_of(key, variants);
        self.entries -= variants.len();
    }

    /// Every key, most recently used first.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&CacheKey, &Vec<Arc<Entry>>)> {
        self.lru.iter()
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn entries(&self) -> usize {
        self.entries
    }
}
