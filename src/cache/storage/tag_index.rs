//! The tag index of one memory shard: tag -> keys with an entry carrying it.
//!
//! It lives beside the shard's LRU, under the same lock, and is updated
//! whenever a key's variants change, so it never points at an evicted key
//! (nor grows once entries are gone).

use super::entry::{heap_chunk, Entry};
use crate::cache::key::CacheKey;
use std::collections::{HashMap, HashSet};
use std::mem::size_of;
use std::sync::Arc;

/// Cost of one (tag, key) pair in the index, charged to the entry carrying
/// the tag: for a tag only this entry has (the worst case), the set's own
/// table (hashbrown's smallest: 4 buckets and 20 control bytes) and its
/// slot in the index, taken at its sparsest (just after the table doubled,
/// 7/16 full). A key joining a tag's existing set costs less: one slot of
/// that set. The key text itself is shared, charged once per key.
pub(super) const TAG_SLOT_CHARGE: usize = heap_chunk(4 * size_of::<CacheKey>() + 4 + 16)
    + (size_of::<(Arc<str>, HashSet<CacheKey>)>() + 1) * 16 / 7
    + 1;

#[derive(Default)]
pub(super) struct TagIndex {
    tags: HashMap<Arc<str>, HashSet<CacheKey>>,
}

impl TagIndex {
    /// Points every tag of `variants` at `key`.
    pub(super) fn index(&mut self, key: &CacheKey, variants: &[Arc<Entry>]) {
        for e in variants {
            for t in e.tags().iter() {
                self.tags.entry(t.clone()).or_default().insert(key.clone());
            }
        }
    }

    /// Forgets `key` under every tag of `variants`; a tag left with no key
    /// goes too.
    pub(super) fn unindex(&mut self, key: &CacheKey, variants: &[Arc<Entry>]) {
        for e in variants {
            for t in e.tags().iter() {
                if let Some(set) = self.tags.get_mut(t) {
                    set.remove(key);
                    if set.is_empty() {
                        self.tags.remove(t);
                    }
                }
            }
        }
    }

    /// Takes a tag's keys out of the index whole (a tag purge rewrites each
    /// of them, and rewriting re-indexes what stays).
    pub(super) fn take(&mut self, tag: &str) -> Option<HashSet<CacheKey>> {
        self.tags.remove(tag)
    }

    /// Distinct tags indexed.
    pub(super) fn len(&self) -> usize {
        self.tags.len()
    }
}
