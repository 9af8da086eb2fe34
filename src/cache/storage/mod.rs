//! Cache storage: the seam between the HTTP cache and where responses live.
//!
//! [`Storage`] is what the cache asks of a store: look up the variant that
//! matches a request, store a response (whole, or streamed through a
//! [`MissHandler`]), replace a variant after a 304, purge, report usage.
//! [`MemoryStorage`] is the sharded in-process implementation; its eviction
//! (`eviction`) and tag index (`tag_index`) are pieces of it, not of the seam.
//!
//! Semantics every storage shares (checked by one conformance suite):
//! - a key holds its Vary variants side by side; storing a variant with the
//!   same secondary key (field names and values) replaces it;
//! - a body larger than [`Storage::max_object_bytes`] is never stored, and
//!   nor is an entry whose key, headers, tags and Vary would take it past
//!   what one object may cost;
//! - a soft purge keeps entries but makes them stale; a hard one drops them;
//!   both return the variants they touched;
//! - what is stored stays within the storage's byte budget, keys in use
//!   kept before keys that are not.
//!
//! Listing, sweeping dead entries, the tag count and eviction counters stay
//! inherent to [`MemoryStorage`]: they report on or tidy this process's
//! memory (the admin listing pages over its shards, the sweeper walks them
//! one at a time), where a remote tier would expire entries by TTL itself.

mod entry;
mod eviction;
mod frequency;
mod memory;
mod tag_index;

#[cfg(test)]
pub(crate) mod conformance;

pub use entry::Entry;
pub(crate) use entry::{EntryMeta, H1Field, StoredHeaders};
pub(crate) use memory::MemoryStorage;
pub use memory::StoreStats;

use crate::cache::key::CacheKey;
use bytes::Bytes;
use http::HeaderMap;
use std::sync::Arc;

/// The storage the gateway runs on.
pub type Store = MemoryStorage;

/// A body passed the storage's largest object size; nothing is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the body is larger than the storage keeps")]
pub struct TooLarge;

/// Where responses are cached. Implementations are shared by every request
/// (`Send + Sync`) and must never block for long: the cache calls them on
/// the request path.
pub trait Storage: Send + Sync {
    /// Largest body stored; larger responses stream through uncached.
    fn max_object_bytes(&self) -> usize;

    /// The stored variant of `key` that matches the request's Vary fields
    /// (RFC 9111 4.1), newest first. Marks the key recently used.
    fn lookup(&self, key: &CacheKey, req: &HeaderMap) -> Option<Arc<Entry>>;

    /// The hit path: `f` on the variant [`Storage::lookup`] would return,
    /// and its result. A storage that can lends the entry where it is
    /// stored, so a hit writes no reference count every core shares (`f`
    /// clones the `Arc` only if it must keep the entry).
    fn lookup_with<R>(
        &self,
        key: &CacheKey,
        req: &HeaderMap,
        f: impl FnOnce(&Arc<Entry>) -> R,
    ) -> Option<R>
    where
        Self: Sized,
    {
        self.lookup(key, req).map(|e| f(&e))
    }

    /// Stores a whole entry, replacing the variant with the same secondary
    /// key. An entry too large to store is dropped.
    fn insert(&self, key: CacheKey, entry: Arc<Entry>);

    /// A handler to stream a response's body into: the entry is stored when
    /// it finishes, and not at all if it is dropped unfinished or the body
    /// grows past [`Storage::max_object_bytes`]. It owns what it needs, so
    /// it may outlive the call (and the request) that made it.
    fn miss_handler(&self, key: CacheKey, meta: EntryMeta) -> Box<dyn MissHandler>;

    /// After a 304 refresh: replaces `old` (a variant `lookup` returned)
    /// with `new` if it is still stored, else stores `new` as a miss would.
    fn replace(&self, key: &CacheKey, old: &Arc<Entry>, new: Arc<Entry>);

    /// Removes (or soft-purges) every variant of one key; returns how many.
    fn purge_key(&self, key: &CacheKey, soft: bool) -> usize;

    /// Every key whose path and query starts with `prefix` (any host,
    /// scheme, version).
    fn purge_prefix(&self, prefix: &str, soft: bool) -> usize;

    /// Every key of exactly this path and query (any host, scheme, version).
    fn purge_path(&self, path_and_query: &str, soft: bool) -> usize;

    /// Every entry carrying `tag`; a key's other variants are kept.
    fn purge_tag(&self, tag: &str, soft: bool) -> usize;

    /// Bytes charged against the budget and entries (variants) stored.
    fn usage(&self) -> (usize, usize);
}

/// A response body on its way into a storage.
pub trait MissHandler: Send {
    /// Appends a chunk. Once the body passes the storage's largest object
    /// size this fails, drops what it held, and every later call fails too.
    fn write(&mut self, chunk: Bytes) -> Result<(), TooLarge>;

    /// Stores the entry with the body written. Fails, storing nothing, when
    /// the body or the whole entry is larger than the storage keeps.
    fn finish(self: Box<Self>) -> Result<(), TooLarge>;
}
