//! What a storage keeps per response: the entry (status, compact headers,
//! body, secondary key, freshness, tags) and what it is charged.

use super::tag_index::TAG_SLOT_CHARGE;
use crate::cache::policy::Freshness;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};
use http::StatusCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The heap an allocation of `n` bytes takes with glibc's malloc on 64-bit:
/// an 8-byte chunk header, rounded up to 16, at least 32.
pub(super) const fn heap_chunk(n: usize) -> usize {
    let chunk = (n + 8 + 15) & !15;
    if chunk < 32 {
        32
    } else {
        chunk
    }
}

/// The `Arc<Entry>` allocation (its place in the key's slot is the key's).
const ENTRY_OVERHEAD: usize = heap_chunk(std::mem::size_of::<Entry>() + 16);
/// What the entry's one buffer (header block, then body) costs beyond its
/// length: the shared count `Bytes` allocates when the buffer is first
/// cloned (24 bytes, done when the entry is made, see `Entry::build`) and
/// the buffer's own chunk header and rounding (at most 8 + 15).
const BLOCK_OVERHEAD: usize = heap_chunk(24) + 8 + 15;

/// A stored response: one buffer with the compact header block and the
/// body, and the fixed fields beside it. Vary and tags, which most entries
/// do not have, sit behind one optional box.
///
/// 88 bytes (112 with the `Arc` and the allocator's header), where two
/// `Bytes` handles, two boxed slices and a stored charge took 152 (176).
#[derive(Debug)]
pub struct Entry {
    /// The header block (see [`StoredHeaders`]) followed by the body, in
    /// one exact-size allocation that hits share.
    block: Bytes,
    /// Where the body starts in `block`.
    body_at: u32,
    pub(crate) status: StatusCode,
    /// CLOCK's reference bit: set by a hit (only when clear, so a hot
    /// entry's hits only read it), cleared by the eviction hand. Kept here
    /// rather than in the key's slot, whose allocation it would take from
    /// 80 bytes to 96.
    referenced: AtomicBool,
    /// How long the entry is fresh and how far past that it may be served.
    pub freshness: Freshness,
    /// The secondary key and purge tags; `None` when both are empty.
    extras: Option<Box<Extras>>,
}

/// What few entries have: a secondary key, purge tags.
#[derive(Debug, Clone, Default)]
struct Extras {
    /// The secondary key: Vary field names and the request's values.
    vary: Box<[(HeaderName, Option<String>)]>,
    tags: Box<[Arc<str>]>,
}

impl Extras {
    /// What the box and what it holds take on the heap. An upper bound: a
    /// custom field name is charged a buffer and a shared count of its own
    /// (`HeaderName` keeps it in `Bytes`), a tag its whole `Arc<str>` although
    /// the index shares it, plus the entry's share of the index.
    fn charge(&self) -> usize {
        let vary_slots = std::mem::size_of_val::<[(HeaderName, Option<String>)]>(&self.vary);
        let tag_slots = std::mem::size_of_val::<[Arc<str>]>(&self.tags);
        let vary_fields: usize = self
            .vary
            .iter()
            .map(|(n, v)| {
                let name = if STANDARD_NAMES.contains(n) {
                    0
                } else {
                    heap_chunk(n.as_str().len()) + heap_chunk(24)
                };
                name + v
                    .as_ref()
                    .filter(|v| v.capacity() > 0)
                    .map_or(0, |v| heap_chunk(v.capacity()))
            })
            .sum();
        let tags: usize = self
            .tags
            .iter()
            .map(|t| heap_chunk(t.len() + 16) + TAG_SLOT_CHARGE)
            .sum();
        heap_chunk(std::mem::size_of::<Extras>())
            + slice_chunk(vary_slots)
            + slice_chunk(tag_slots)
            + vary_fields
            + tags
    }
}

/// The heap a boxed slice of `bytes` takes (none when empty).
fn slice_chunk(bytes: usize) -> usize {
    if bytes == 0 {
        0
    } else {
        heap_chunk(bytes)
    }
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

impl Clone for Entry {
    /// A copy sharing the buffer; unreferenced, as a newly stored entry is.
    fn clone(&self) -> Entry {
        Entry {
            block: self.block.clone(),
            body_at: self.body_at,
            status: self.status,
            referenced: AtomicBool::new(false),
            freshness: self.freshness.clone(),
            extras: self.extras.clone(),
        }
    }
}

impl Entry {
    /// An entry from a response's parts: `vary` is the secondary key (the
    /// Vary field names with the request's values), `tags` the purge tags.
    /// The body is copied next to the header block (one exact buffer that
    /// pins nothing else).
    pub fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        vary: Vec<(HeaderName, Option<String>)>,
        freshness: Freshness,
        tags: Vec<Arc<str>>,
    ) -> Entry {
        let meta = EntryMeta {
            status,
            headers,
            vary,
            freshness,
            tags,
        };
        let len = body.len();
        Entry::from_meta_chunks(meta, std::slice::from_ref(&body), len)
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
        // Exact size: `Bytes::from` keeps the allocation as it is, and the
        // charge counts its length.
        debug_assert_eq!(block.len(), block.capacity());
        let block = Bytes::from(block);
        // The first clone of a `Bytes` made from a `Vec` allocates its
        // shared count. Done here, on the miss, so a hit never allocates
        // and the charge is what the entry holds from the start.
        drop(block.clone());
        let extras = (!meta.vary.is_empty() || !meta.tags.is_empty()).then(|| {
            Box::new(Extras {
                vary: meta.vary.into_boxed_slice(),
                tags: meta.tags.into_boxed_slice(),
            })
        });
        Entry {
            block,
            // A header block is at most 256 fields of under 64 KiB each.
            body_at: u32::try_from(at).unwrap_or(u32::MAX),
            status: meta.status,
            referenced: AtomicBool::new(false),
            freshness: meta.freshness,
            extras,
        }
    }

    /// The entry a 304 refresh makes of `stored` (RFC 9111 4.3.4): the
    /// merged `headers` and new `freshness`, the same body copied next to
    /// them into one exact-size buffer. A slice of the old buffer would
    /// keep its old header bytes alive, uncharged, for as long as the entry
    /// lives.
    pub(crate) fn refreshed(stored: &Entry, headers: HeaderMap, freshness: Freshness) -> Entry {
        let meta = EntryMeta {
            status: stored.status,
            headers,
            vary: stored.vary().to_vec(),
            freshness,
            tags: stored.tags().to_vec(),
        };
        let body = stored.body();
        let len = body.len();
        Entry::from_meta_chunks(meta, std::slice::from_ref(&body), len)
    }

    /// An entry as the memory storage keeps a response that streamed in
    /// (`chunks` are its body): headers and body in one allocation. For
    /// benchmarks that must measure what the gateway really stores.
    pub fn streamed(
        status: StatusCode,
        headers: HeaderMap,
        chunks: &[Bytes],
        freshness: Freshness,
    ) -> Entry {
        let meta = EntryMeta {
            status,
            headers,
            vary: Vec::new(),
            freshness,
            tags: Vec::new(),
        };
        let len = chunks.iter().map(Bytes::len).sum();
        Entry::from_meta_chunks(meta, chunks, len)
    }

    /// The stored headers, read in place.
    pub(crate) fn headers(&self) -> StoredHeaders<'_> {
        StoredHeaders {
            block: &self.block,
            end: self.body_start(),
        }
    }

    /// The response headers as stored, as a map (what a hit serves); the
    /// values share the entry's buffer.
    pub fn header_map(&self) -> HeaderMap {
        self.headers().to_map()
    }

    fn body_start(&self) -> usize {
        (self.body_at as usize).min(self.block.len())
    }

    /// The stored body: a handle sharing the entry's buffer (a reference
    /// count, no copy).
    pub fn body(&self) -> Bytes {
        self.block.slice(self.body_start()..)
    }

    /// Part of the body (`range` within it), sharing the buffer.
    pub(crate) fn body_slice(&self, range: std::ops::Range<usize>) -> Bytes {
        let at = self.body_start();
        self.block.slice(at + range.start..at + range.end)
    }

    /// The body's bytes, read in place (no handle, so no reference count
    /// written: what the HTTP/1.1 fast path copies into its output).
    pub(crate) fn body_bytes(&self) -> &[u8] {
        self.block.get(self.body_start()..).unwrap_or(&[])
    }

    /// The body's length.
    pub fn body_len(&self) -> usize {
        self.block.len() - self.body_start()
    }

    /// The secondary key: Vary field names and the request's values.
    pub(crate) fn vary(&self) -> &[(HeaderName, Option<String>)] {
        self.extras.as_deref().map_or(&[], |x| &x.vary)
    }

    /// The purge tags.
    pub(crate) fn tags(&self) -> &[Arc<str>] {
        self.extras.as_deref().map_or(&[], |x| &x.tags)
    }

    /// Bytes charged against the store's budget for the entry itself (its
    /// key is charged once per key, see `key_charge`): its `Arc`, its
    /// buffer and what Vary and tags hold. Computed, not stored (the entry
    /// is immutable, so it is the same when charged and uncharged): a
    /// field would take the `Arc` from 112 bytes to 128.
    pub(crate) fn charge(&self) -> usize {
        ENTRY_OVERHEAD
            + BLOCK_OVERHEAD
            + self.block.len()
            + self.extras.as_ref().map_or(0, |x| x.charge())
    }

    /// Marks the entry recently used (the hit path: a write only when the
    /// bit was clear).
    pub(super) fn mark_used(&self) {
        if !self.referenced.load(Ordering::Relaxed) {
            self.referenced.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the entry was used since the last call (the CLOCK hand).
    pub(super) fn take_referenced(&self) -> bool {
        self.referenced.load(Ordering::Relaxed) && self.referenced.swap(false, Ordering::Relaxed)
    }

    /// The entry for a response whose metadata was known before its body.
    #[cfg(test)]
    pub(crate) fn from_meta(meta: EntryMeta, body: Bytes) -> Entry {
        let len = body.len();
        Entry::from_meta_chunks(meta, std::slice::from_ref(&body), len)
    }

    /// Whether the entry can still be of any use at `now`: served stale under
    /// SWR / stale-if-error, or revalidated (when it has a validator) within
    /// `keep` past its lifetime.
    pub(crate) fn is_useful(&self, now: SystemTime, keep: Duration, grace: Duration) -> bool {
        let f = &self.freshness;
        let mut window = f
            .stale_while_revalidate()
            .max(f.stale_if_error())
            .max(grace);
        let headers = self.headers();
        if headers.contains(&http::header::ETAG) || headers.contains(&http::header::LAST_MODIFIED) {
            window = window.max(keep);
        }
        f.staleness(now) <= window
    }

    /// A copy that is already stale (soft purge): still usable under
    /// stale-while-revalidate / stale-if-error, revalidated before a plain hit.
    pub(crate) fn marked_stale(&self) -> Entry {
        let mut e = self.clone();
        e.freshness.set_lifetime(Duration::ZERO);
        let age = e.freshness.corrected_initial_age();
        e.freshness
            .set_corrected_initial_age(age.max(Duration::from_secs(1)));
        e
    }
}

/// Response headers in the compact form an entry keeps, read in place: the
/// head of the entry's buffer (a single allocation, shared by every
/// response built from it) with each field's name and value. A `HeaderMap` costs several times as much per
/// entry, and values parsed by hyper would pin the connection's read buffer
/// besides.
///
/// Layout: `count: u16`, then field after field: `code: u8` (a standard
/// name's place in [`STANDARD_NAMES`] plus one; 0: the name follows as
/// `name_len: u16` and its bytes, in `HeaderName`'s lowercase form), then
/// `value_len: u16` and the value. Standard names as one byte make the
/// block smaller (`content-type`: 12 bytes to 1) and a hit's `HeaderMap`
/// cheaper: a coded name is a constant, not text to parse.
#[derive(Debug, Clone)]
pub(crate) struct StoredHeaders<'a> {
    block: &'a Bytes,
    /// Where the header block ends (the body follows).
    end: usize,
}

/// What an entry may cost beyond its body: headers, key, tags, Vary.
pub(super) const MAX_ENTRY_EXTRA: usize = 512 * 1024;

/// Fields a stored response keeps at most.
const MAX_STORED_FIELDS: usize = 256;

/// Names stored as one-byte codes, the most common in responses first (the
/// encoder looks them up in order). At most 255.
static STANDARD_NAMES: [HeaderName; 68] = {
    use http::header::*;
    [
        CONTENT_TYPE,
        CACHE_CONTROL,
        ETAG,
        DATE,
        CONTENT_LENGTH,
        LAST_MODIFIED,
        EXPIRES,
        VARY,
        CONTENT_ENCODING,
        SET_COOKIE,
        SERVER,
        AGE,
        ACCEPT_RANGES,
        ACCESS_CONTROL_ALLOW_ORIGIN,
        STRICT_TRANSPORT_SECURITY,
        X_CONTENT_TYPE_OPTIONS,
        X_FRAME_OPTIONS,
        CONTENT_SECURITY_POLICY,
        CONTENT_LANGUAGE,
        CONTENT_DISPOSITION,
        CONTENT_LOCATION,
        CONTENT_RANGE,
        LINK,
        LOCATION,
        PRAGMA,
        VIA,
        WARNING,
        ALT_SVC,
        CDN_CACHE_CONTROL,
        REFERRER_POLICY,
        RETRY_AFTER,
        ALLOW,
        ACCESS_CONTROL_ALLOW_CREDENTIALS,
        ACCESS_CONTROL_ALLOW_HEADERS,
        ACCESS_CONTROL_ALLOW_METHODS,
        ACCESS_CONTROL_EXPOSE_HEADERS,
        ACCESS_CONTROL_MAX_AGE,
        CONTENT_SECURITY_POLICY_REPORT_ONLY,
        X_XSS_PROTECTION,
        X_DNS_PREFETCH_CONTROL,
        WWW_AUTHENTICATE,
        PROXY_AUTHENTICATE,
        REFRESH,
        TRAILER,
        TRANSFER_ENCODING,
        CONNECTION,
        UPGRADE,
        PUBLIC_KEY_PINS,
        PUBLIC_KEY_PINS_REPORT_ONLY,
        SEC_WEBSOCKET_ACCEPT,
        SEC_WEBSOCKET_EXTENSIONS,
        SEC_WEBSOCKET_PROTOCOL,
        SEC_WEBSOCKET_VERSION,
        ACCEPT,
        ACCEPT_CHARSET,
        ACCEPT_ENCODING,
        ACCEPT_LANGUAGE,
        AUTHORIZATION,
        COOKIE,
        FORWARDED,
        HOST,
        ORIGIN,
        RANGE,
        REFERER,
        TE,
        USER_AGENT,
        CACHE_STATUS,
        IF_NONE_MATCH,
    ]
};

/// The one-byte code of a standard name; 0 for any other.
fn code_of(name: &HeaderName) -> u8 {
    STANDARD_NAMES
        .iter()
        .position(|s| s == name)
        .map_or(0, |i| (i + 1) as u8)
}

/// A stored field's name: a standard one by code, or its text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StoredName<'a> {
    Code(u8),
    Text(&'a [u8]),
}

impl StoredName<'_> {
    fn of(name: &HeaderName) -> StoredName<'_> {
        match code_of(name) {
            0 => StoredName::Text(name.as_str().as_bytes()),
            c => StoredName::Code(c),
        }
    }

    fn to_header_name(self) -> Option<HeaderName> {
        match self {
            StoredName::Code(c) => STANDARD_NAMES.get(usize::from(c).checked_sub(1)?).cloned(),
            StoredName::Text(t) => HeaderName::from_bytes(t).ok(),
        }
    }
}

/// What an entry keeps of `h`: the fields that fit the compact form.
fn storable_fields(h: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &http::HeaderValue)> {
    h.iter()
        .filter(|(n, v)| n.as_str().len() <= u16::MAX as usize && v.len() <= u16::MAX as usize)
        .take(MAX_STORED_FIELDS)
}

impl StoredHeaders<'_> {
    /// Whether every field of `h` fits the compact form (at most 256
    /// fields, names and values under 64 KiB). A response that does not is
    /// not stored: a HIT must not lose headers the MISS had.
    pub(crate) fn fits(h: &HeaderMap) -> bool {
        h.len() <= MAX_STORED_FIELDS
            && h.iter()
                .all(|(n, v)| n.as_str().len() <= u16::MAX as usize && v.len() <= u16::MAX as usize)
    }

    /// The compact form of `h` in a buffer with exactly `room` bytes
    /// spare after it (for a body that shares the allocation).
    fn block_with_room(h: &HeaderMap, room: usize) -> Vec<u8> {
        // Sized exactly first, so the buffer is allocated once and without
        // slack: the entry is charged what it holds.
        let mut count = 0usize;
        let mut len = 2;
        for (n, v) in storable_fields(h) {
            count += 1;
            len += match StoredName::of(n) {
                StoredName::Code(_) => 1,
                StoredName::Text(t) => 3 + t.len(),
            } + 2
                + v.len();
        }
        let mut block = Vec::with_capacity(len + room);
        block.extend_from_slice(&(count as u16).to_le_bytes());
        for (n, v) in storable_fields(h) {
            match StoredName::of(n) {
                StoredName::Code(c) => block.push(c),
                StoredName::Text(t) => {
                    block.push(0);
                    block.extend_from_slice(&(t.len() as u16).to_le_bytes());
                    block.extend_from_slice(t);
                }
            }
            block.extend_from_slice(&(v.len() as u16).to_le_bytes());
            block.extend_from_slice(v.as_bytes());
        }
        debug_assert_eq!(block.len(), len);
        block
    }

    fn count(&self) -> usize {
        self.block
            .get(..self.end)
            .and_then(|b| b.get(..2))
            .map_or(0, |c| u16::from_le_bytes([c[0], c[1]]) as usize)
    }

    /// Each field as (name, value range in the block).
    fn fields(&self) -> impl Iterator<Item = (StoredName<'_>, std::ops::Range<usize>)> + '_ {
        let b = self.block.get(..self.end).unwrap_or(&[]);
        let u16_at = move |at: usize| b.get(at..at + 2).map(|l| u16::from_le_bytes([l[0], l[1]]));
        let mut at = 2;
        (0..self.count()).map_while(move |_| {
            let code = *b.get(at)?;
            at += 1;
            let name = if code == 0 {
                let len = usize::from(u16_at(at)?);
                let text = b.get(at + 2..at + 2 + len)?;
                at += 2 + len;
                StoredName::Text(text)
            } else {
                StoredName::Code(code)
            };
            let len = usize::from(u16_at(at)?);
            let value = at + 2..at + 2 + len;
            b.get(value.clone())?;
            at = value.end;
            Some((name, value))
        })
    }

    fn value(&self, range: std::ops::Range<usize>) -> Option<http::HeaderValue> {
        // Validated again (a vectorised byte check): http 1 has no safe way
        // to build a value from bytes it did not check itself.
        http::HeaderValue::from_maybe_shared(self.block.slice(range)).ok()
    }

    /// A `HeaderMap` for a response; values share the stored buffer.
    pub(crate) fn to_map(&self) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(self.count() + 4);
        for (name, range) in self.fields() {
            if let (Some(name), Some(v)) = (name.to_header_name(), self.value(range)) {
                h.append(name, v);
            }
        }
        h
    }

    /// The first value of a field.
    pub(crate) fn get(&self, name: &HeaderName) -> Option<http::HeaderValue> {
        let wanted = StoredName::of(name);
        let (_, range) = self.fields().find(|(n, _)| *n == wanted)?;
        self.value(range)
    }

    pub(crate) fn contains(&self, name: &HeaderName) -> bool {
        let wanted = StoredName::of(name);
        self.fields().any(|(n, _)| n == wanted)
    }

    /// Writes the stored fields in HTTP/1.1 form (`name: value\r\n`, the
    /// name lowercase as `HeaderMap` keeps it), each as `choose` says for
    /// its name and value. `false` when `choose` refused a field (the
    /// response must then be built the usual way). Names and values were
    /// checked as a `HeaderName` and a `HeaderValue` when stored (no CR, LF
    /// or other controls), so they are written as they are.
    pub(crate) fn write_h1(
        &self,
        out: &mut Vec<u8>,
        mut choose: impl FnMut(&[u8], &[u8]) -> H1Field,
    ) -> bool {
        for (name, range) in self.fields() {
            let name = match name {
                StoredName::Code(c) => {
                    match usize::from(c)
                        .checked_sub(1)
                        .and_then(|i| STANDARD_NAMES.get(i))
                    {
                        Some(n) => n.as_str().as_bytes(),
                        None => return false,
                    }
                }
                StoredName::Text(t) => t,
            };
            let Some(value) = self.block.get(range) else {
                return false;
            };
            match choose(name, value) {
                H1Field::Write => crate::protocol::headers::write_field(out, name, value),
                H1Field::Skip => {}
                H1Field::Refuse => return false,
            }
        }
        true
    }
}

/// What [`StoredHeaders::write_h1`] does with one stored field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum H1Field {
    Write,
    /// Left out (the caller writes its own value).
    Skip,
    /// The response cannot be written this way.
    Refuse,
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// The compact form of `h` alone, and a view of it.
    fn block_of(h: &HeaderMap) -> Bytes {
        Bytes::from(StoredHeaders::block_with_room(h, 0))
    }

    fn view(block: &Bytes) -> StoredHeaders<'_> {
        StoredHeaders {
            block,
            end: block.len(),
        }
    }

    /// The HTTP/1.1 form carries every field `to_map` gives, in order, as
    /// `name: value` lines (RFC 9112 5), and `choose` decides per field.
    #[test]
    fn write_h1_writes_the_fields_to_map_gives() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        h.insert("x-custom", HeaderValue::from_static("v\tw"));
        h.insert("x-cache", HeaderValue::from_static("stale"));
        let block = block_of(&h);
        let mut out = Vec::new();
        assert!(view(&block).write_h1(&mut out, |name, _| match name {
            b"x-cache" => H1Field::Skip,
            _ => H1Field::Write,
        }));
        let mut expected = Vec::new();
        for (n, v) in view(&block)
            .to_map()
            .iter()
            .filter(|(n, _)| *n != "x-cache")
        {
            expected.extend_from_slice(n.as_str().as_bytes());
            expected.extend_from_slice(b": ");
            expected.extend_from_slice(v.as_bytes());
            expected.extend_from_slice(b"\r\n");
        }
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&expected)
        );
        assert!(String::from_utf8_lossy(&out).contains("x-custom: v\tw\r\n"));
        let mut out = Vec::new();
        assert!(!view(&block).write_h1(&mut out, |name, _| match name {
            b"set-cookie" => H1Field::Refuse,
            _ => H1Field::Write,
        }));
    }

    #[test]
    fn a_refreshed_entry_owns_its_buffer() {
        let mut h = HeaderMap::new();
        h.insert("etag", HeaderValue::from_static("\"v1\""));
        let f = Freshness::plain(Duration::from_secs(1), SystemTime::now());
        let old = Entry::streamed(StatusCode::OK, h, &[Bytes::from_static(b"body")], f.clone());
        let mut merged = HeaderMap::new();
        merged.insert("etag", HeaderValue::from_static("\"v1\""));
        merged.insert("x-new", HeaderValue::from_static("1"));
        let new = Entry::refreshed(&old, merged, f);
        assert_eq!(new.body(), old.body());
        assert_eq!(
            new.headers()
                .get(&HeaderName::from_static("x-new"))
                .unwrap(),
            "1"
        );
        // Not a slice of the old buffer, which would stay pinned uncharged.
        let old_buffer = old.block.as_ptr() as usize..old.block.as_ptr() as usize + old.block.len();
        assert!(!old_buffer.contains(&(new.body().as_ptr() as usize)));
        // Headers and body share one buffer, charged once.
        assert_eq!(new.charge(), old.charge() + "x-new".len() + 6);
    }

    #[test]
    fn an_entry_is_one_buffer_and_a_112_byte_arc() {
        // The sizes the charge and the README's per-entry table rest on.
        assert_eq!(std::mem::size_of::<Entry>(), 88);
        assert_eq!(ENTRY_OVERHEAD, 112);
        let mut h = HeaderMap::new();
        h.insert("etag", HeaderValue::from_static("\"v1\""));
        let body = Bytes::from(vec![b'b'; 1024]);
        let f = Freshness::plain(Duration::from_secs(1), SystemTime::now());
        let e = Entry::new(
            StatusCode::OK,
            h.clone(),
            body.clone(),
            vec![],
            f.clone(),
            vec![],
        );
        assert!(e.extras.is_none(), "no Vary, no tags: no box");
        assert_eq!(e.body(), body);
        assert_eq!(e.body_len(), 1024);
        assert_eq!(e.body_slice(1..3), "bb");
        assert_eq!(e.header_map(), h);
        // The body was copied next to the headers, not kept as a slice.
        assert_ne!(e.body().as_ptr(), body.as_ptr());
        let block = 2 + 1 + 2 + "\"v1\"".len();
        assert_eq!(e.charge(), ENTRY_OVERHEAD + BLOCK_OVERHEAD + block + 1024);
        let lang = HeaderName::from_static("accept-language");
        let tagged = Entry::new(
            StatusCode::OK,
            h,
            body,
            vec![(lang.clone(), Some("en".into()))],
            f,
            vec![Arc::from("t1")],
        );
        assert_eq!(tagged.vary(), &[(lang, Some("en".to_string()))]);
        assert_eq!(&*tagged.tags()[0], "t1");
        assert!(tagged.charge() > e.charge() + TAG_SLOT_CHARGE);
    }

    #[test]
    fn the_reference_bit_is_taken_once_and_not_cloned() {
        let f = Freshness::plain(Duration::from_secs(1), SystemTime::now());
        let e = Entry::streamed(StatusCode::OK, HeaderMap::new(), &[], f);
        assert!(!e.take_referenced());
        e.mark_used();
        e.mark_used();
        assert!(!e.clone().take_referenced(), "a copy starts unused");
        assert!(e.take_referenced());
        assert!(!e.take_referenced());
    }

    #[test]
    fn stored_headers_round_trip() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        h.insert("etag", HeaderValue::from_static("\"e\""));
        let b = block_of(&h);
        let s = view(&b);
        assert_eq!(s.to_map(), h);
        assert_eq!(s.get(&http::header::ETAG).unwrap(), "\"e\"");
        assert!(s.contains(&HeaderName::from_static("x-multi")));
        assert!(!s.contains(&http::header::LAST_MODIFIED));
        assert_eq!(view(&block_of(&HeaderMap::new())).to_map().len(), 0);
    }

    #[test]
    fn standard_names_are_one_byte_and_others_keep_their_text() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        let coded = block_of(&h);
        // count, code, value length, value
        assert_eq!(coded.len(), 2 + 1 + 2 + "text/plain".len());
        let mut custom = HeaderMap::new();
        custom.insert("x-custom-thing", HeaderValue::from_static("v"));
        custom.append("x-custom-thing", HeaderValue::from_static(""));
        let b = block_of(&custom);
        let s = view(&b);
        assert_eq!(b.len(), 2 + 2 * (1 + 2 + "x-custom-thing".len() + 2) + 1);
        assert_eq!(s.to_map(), custom);
        assert_eq!(
            s.get(&HeaderName::from_static("x-custom-thing")).unwrap(),
            "v"
        );
        assert!(!s.contains(&http::header::CONTENT_TYPE));
    }

    #[test]
    fn every_standard_name_round_trips() {
        assert!(STANDARD_NAMES.len() < 256);
        let mut h = HeaderMap::new();
        for (i, n) in STANDARD_NAMES.iter().enumerate() {
            assert_eq!(code_of(n) as usize, i + 1, "{n} listed twice");
            h.append(n.clone(), HeaderValue::from(i));
        }
        h.append("x-after", HeaderValue::from_static("last"));
        let b = block_of(&h);
        let s = view(&b);
        assert_eq!(s.to_map(), h);
        assert_eq!(s.get(&http::header::VIA).unwrap(), h[http::header::VIA]);
    }

    #[test]
    fn blocks_are_allocated_exactly() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert("x-y", HeaderValue::from_static("z"));
        let b = StoredHeaders::block_with_room(&h, 100);
        assert_eq!(b.capacity(), b.len() + 100);
        let e = Entry::streamed(
            StatusCode::OK,
            h.clone(),
            &[Bytes::from_static(b"ab"), Bytes::from_static(b"cd")],
            Freshness::plain(Duration::from_secs(1), SystemTime::now()),
        );
        assert_eq!(e.body(), "abcd");
        assert_eq!(e.header_map(), h);
    }

    #[test]
    fn a_corrupt_block_yields_what_it_can_and_no_panic() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert("x-y", HeaderValue::from_static("z"));
        let full = block_of(&h);
        for cut in 0..full.len() {
            let s = StoredHeaders {
                block: &full,
                end: cut,
            };
            assert!(s.to_map().len() < 2, "cut at {cut}");
        }
        let bad = Bytes::from_static(&[1, 0, 255, 1, 0, b'v']);
        assert!(view(&bad).to_map().is_empty());
    }
}
