//! What a storage keeps per response: the entry (status, compact headers,
//! body, secondary key, freshness, tags) and what it is charged.

use super::tag_index::TAG_SLOT_CHARGE;
use crate::cache::policy::Freshness;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};
use http::StatusCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Fixed bookkeeping cost charged per entry besides its headers and body:
/// the `Arc<Entry>` allocation and its slot in the key's variant list.
const ENTRY_OVERHEAD: usize = 320;
/// Cost of one Vary field in an entry's secondary key, besides its bytes.
const VARY_FIELD_OVERHEAD: usize = 64;

/// A stored response.
#[derive(Debug, Clone)]
pub struct Entry {
    pub(crate) status: StatusCode,
    /// Response headers as stored: unstorable fields and `Age` removed.
    pub(crate) headers: StoredHeaders,
    pub(crate) body: Bytes,
    /// The secondary key: Vary field names and the request's values.
    pub(crate) vary: Box<[(HeaderName, Option<String>)]>,
    /// How long the entry is fresh and how far past that it may be served.
    pub freshness: Freshness,
    pub(crate) tags: Box<[Arc<str>]>,
    /// Bytes charged against the store's budget for the entry itself (its
    /// key is charged once per key, see `key_charge`).
    pub(crate) charge: usize,
}

/// Everything about a response but its body: what a miss handler is given
/// before the body streams in. Headers are as they will be stored
/// (unstorable fields and `Age` already removed).
#[derive(Debug, Clone)]
pub struct EntryMeta {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    /// The secondary key: Vary field names and the request's values.
    pub(crate) vary: Vec<(HeaderName, Option<String>)>,
    pub(crate) freshness: Freshness,
    pub(crate) tags: Vec<Arc<str>>,
}

impl Entry {
    /// An entry from a response's parts: `vary` is the secondary key (the
    /// Vary field names with the request's values), `tags` the purge tags.
    pub fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        vary: Vec<(HeaderName, Option<String>)>,
        freshness: Freshness,
        tags: Vec<Arc<str>>,
    ) -> Entry {
        let headers = StoredHeaders::from_map(&headers);
        Entry::assemble(status, headers, body, vary, freshness, tags)
    }

    fn assemble(
        status: StatusCode,
        headers: StoredHeaders,
        body: Bytes,
        vary: Vec<(HeaderName, Option<String>)>,
        freshness: Freshness,
        tags: Vec<Arc<str>>,
    ) -> Entry {
        let header_bytes = headers.charge();
        // A tag's text (shared with the index), its slot in the entry, and
        // the entry's share of the index: one hash-set slot per tag.
        let tag_bytes: usize = tags.iter().map(|t| t.len() + 32 + TAG_SLOT_CHARGE).sum();
        let vary_bytes: usize = vary
            .iter()
            .map(|(n, v)| {
                n.as_str().len() + v.as_ref().map_or(0, String::len) + VARY_FIELD_OVERHEAD
            })
            .sum();
        let charge = ENTRY_OVERHEAD + header_bytes + body.len() + tag_bytes + vary_bytes;
        Entry {
            status,
            headers,
            body,
            vary: vary.into_boxed_slice(),
            freshness,
            tags: tags.into_boxed_slice(),
            charge,
        }
    }

    /// The entry for a streamed response: its header block and its body
    /// copied into one exact-size buffer (one allocation, not two, and no
    /// slice of a larger read buffer pinned by a long-lived entry).
    pub(crate) fn from_meta_chunks(meta: EntryMeta, chunks: &[Bytes], body_len: usize) -> Entry {
        let mut block = StoredHeaders::block_with_room(&meta.headers, body_len);
        let at = block.len();
        for c in chunks {
            block.extend_from_slice(c);
        }
        let all = Bytes::from(block);
        let headers = StoredHeaders {
            block: all.slice(..at),
        };
        Entry::assemble(
            meta.status,
            headers,
            all.slice(at..),
            meta.vary,
            meta.freshness,
            meta.tags,
        )
    }

    /// The entry for a response whose metadata was known before its body.
    #[cfg(test)]
    pub(crate) fn from_meta(meta: EntryMeta, body: Bytes) -> Entry {
        Entry::new(
            meta.status,
            meta.headers,
            body,
            meta.vary,
            meta.freshness,
            meta.tags,
        )
    }

    /// Whether the entry can still be of any use at `now`: served stale under
    /// SWR / stale-if-error, or revalidated (when it has a validator) within
    /// `keep` past its lifetime.
    pub(crate) fn is_useful(&self, now: SystemTime, keep: Duration, grace: Duration) -> bool {
        let f = &self.freshness;
        let mut window = f.stale_while_revalidate.max(f.stale_if_error).max(grace);
        if self.headers.contains(&http::header::ETAG)
            || self.headers.contains(&http::header::LAST_MODIFIED)
        {
            window = window.max(keep);
        }
        f.staleness(now) <= window
    }

    /// A copy that is already stale (soft purge): still usable under
    /// stale-while-revalidate / stale-if-error, revalidated before a plain hit.
    pub(crate) fn marked_stale(&self) -> Entry {
        let mut e = self.clone();
        e.freshness.lifetime = Duration::ZERO;
        e.freshness.corrected_initial_age = e
            .freshness
            .corrected_initial_age
            .max(Duration::from_secs(1));
        e
    }
}

/// Response headers in the compact form an entry keeps: one buffer (a
/// single allocation, shared by every response built from it) holding a
/// little index of name and value lengths, then each field's name and value.
/// A `HeaderMap` costs several times as much per entry, and values parsed by
/// hyper would pin the connection's read buffer besides.
///
/// Layout: `count: u16`, then `count` x (`name_len: u16`, `value_len: u16`),
/// then the names and values, field after field. Names are stored in
/// `HeaderName`'s lowercase form.
#[derive(Debug, Clone)]
pub(crate) struct StoredHeaders {
    block: Bytes,
}

/// What an entry may cost beyond its body: headers, key, tags, Vary.
pub(super) const MAX_ENTRY_EXTRA: usize = 512 * 1024;

/// Fields a stored response keeps at most.
const MAX_STORED_FIELDS: usize = 256;

impl StoredHeaders {
    /// Whether every field of `h` fits the compact form (at most 256
    /// fields, names and values under 64 KiB). A response that does not is
    /// not stored: a HIT must not lose headers the MISS had.
    pub(crate) fn fits(h: &HeaderMap) -> bool {
        h.len() <= MAX_STORED_FIELDS
            && h.iter()
                .all(|(n, v)| n.as_str().len() <= u16::MAX as usize && v.len() <= u16::MAX as usize)
    }

    /// The compact form; fields beyond what [`StoredHeaders::fits`] allows
    /// are dropped (callers check first).
    pub(crate) fn from_map(h: &HeaderMap) -> StoredHeaders {
        StoredHeaders {
            block: Bytes::from(StoredHeaders::block_with_room(h, 0)),
        }
    }

    /// The compact form of `h` in a buffer with exactly `room` bytes
    /// spare after it (for a body that shares the allocation).
    fn block_with_room(h: &HeaderMap, room: usize) -> Vec<u8> {
        let fields: Vec<(&HeaderName, &http::HeaderValue)> = h
            .iter()
            .filter(|(n, v)| n.as_str().len() <= u16::MAX as usize && v.len() <= u16::MAX as usize)
            .take(MAX_STORED_FIELDS)
            .collect();
        let data: usize = fields.iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
        let mut block = Vec::with_capacity(2 + 4 * fields.len() + data + room);
        block.extend_from_slice(&(fields.len() as u16).to_le_bytes());
        for (n, v) in &fields {
            block.extend_from_slice(&(n.as_str().len() as u16).to_le_bytes());
            block.extend_from_slice(&(v.len() as u16).to_le_bytes());
        }
        for (n, v) in &fields {
            block.extend_from_slice(n.as_str().as_bytes());
            block.extend_from_slice(v.as_bytes());
        }
        block
    }

    /// Each field as (name bytes, value range in the block).
    fn fields(&self) -> impl Iterator<Item = (&[u8], std::ops::Range<usize>)> + '_ {
        let b = &self.block[..];
        let count = b
            .get(..2)
            .map_or(0, |c| u16::from_le_bytes([c[0], c[1]]) as usize);
        let mut at = 2 + 4 * count;
        (0..count).map_while(move |i| {
            let lens = b.get(2 + 4 * i..2 + 4 * i + 4)?;
            let name_len = u16::from_le_bytes([lens[0], lens[1]]) as usize;
            let value_len = u16::from_le_bytes([lens[2], lens[3]]) as usize;
            let name = b.get(at..at + name_len)?;
            let value = at + name_len..at + name_len + value_len;
            at = value.end;
            Some((name, value))
        })
    }

    fn value(&self, range: std::ops::Range<usize>) -> Option<http::HeaderValue> {
        http::HeaderValue::from_maybe_shared(self.block.slice(range)).ok()
    }

    /// A `HeaderMap` for a response; values share the stored buffer.
    pub(crate) fn to_map(&self) -> HeaderMap {
        let count = self
            .block
            .get(..2)
            .map_or(0, |c| u16::from_le_bytes([c[0], c[1]]) as usize);
        let mut h = HeaderMap::with_capacity(count + 4);
        for (name, range) in self.fields() {
            if let (Ok(name), Some(v)) = (HeaderName::from_bytes(name), self.value(range)) {
                h.append(name, v);
            }
        }
        h
    }

    /// The first value of a field.
    pub(crate) fn get(&self, name: &HeaderName) -> Option<http::HeaderValue> {
        let wanted = name.as_str().as_bytes();
        let (_, range) = self.fields().find(|(n, _)| *n == wanted)?;
        self.value(range)
    }

    pub(crate) fn contains(&self, name: &HeaderName) -> bool {
        let wanted = name.as_str().as_bytes();
        self.fields().any(|(n, _)| n == wanted)
    }

    /// Bytes charged against the store's budget for these headers.
    fn charge(&self) -> usize {
        self.block.len() + 32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn stored_headers_round_trip() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        h.insert("etag", HeaderValue::from_static("\"e\""));
        let s = StoredHeaders::from_map(&h);
        assert_eq!(s.to_map(), h);
        assert_eq!(s.get(&http::header::ETAG).unwrap(), "\"e\"");
        assert!(s.contains(&HeaderName::from_static("x-multi")));
        assert!(!s.contains(&http::header::LAST_MODIFIED));
        assert_eq!(StoredHeaders::from_map(&HeaderMap::new()).to_map().len(), 0);
    }
}
