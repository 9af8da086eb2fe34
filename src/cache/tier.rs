//! The seam between the memory store and a shared response tier (Redis,
//! see `cluster::tier`): a stored entry in a byte form another instance can
//! read back into the same entry, with everything the memory store needs
//! (status, headers, body, Vary, freshness inputs, tags).
//!
//! The bytes come back from a shared server, so decoding checks every
//! field and bounds every size; anything odd is a miss, never a panic.

use super::policy::Freshness;
use super::storage::Entry;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Largest header block (JSON) a shared entry may carry.
const MAX_META_BYTES: usize = 256 * 1024;

/// Everything but the body, as it travels.
#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    vary: Vec<(String, Option<String>)>,
    tags: Vec<String>,
    lifetime_ms: u64,
    corrected_initial_age_ms: u64,
    /// Milliseconds since the Unix epoch.
    response_time_ms: u64,
    no_cache: bool,
    forbids_stale: bool,
    stale_while_revalidate_ms: u64,
    stale_if_error_ms: u64,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `entry` as bytes: a 4-byte big-endian length, the header block, the body.
pub(crate) fn encode(entry: &Entry) -> Vec<u8> {
    let f = &entry.freshness;
    let meta = Meta {
        status: entry.status.as_u16(),
        headers: entry
            .header_map()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        vary: entry
            .vary()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.clone()))
            .collect(),
        tags: entry.tags().iter().map(|t| t.to_string()).collect(),
        lifetime_ms: ms(f.lifetime()),
        corrected_initial_age_ms: ms(f.corrected_initial_age()),
        response_time_ms: f.response_time().duration_since(UNIX_EPOCH).map_or(0, ms),
        no_cache: f.no_cache,
        forbids_stale: f.forbids_stale,
        stale_while_revalidate_ms: ms(f.stale_while_revalidate()),
        stale_if_error_ms: ms(f.stale_if_error()),
    };
    // Plain data: serialising cannot fail; an empty block decodes as a miss.
    let meta = serde_json::to_vec(&meta).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + meta.len() + entry.body_len());
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&entry.body());
    out
}

/// The entry `encode` made, or `None` when the bytes are not one or the
/// body exceeds `max_body`.
pub(crate) fn decode(bytes: &[u8], max_body: usize) -> Option<Entry> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    if len > MAX_META_BYTES {
        return None;
    }
    let meta: Meta = serde_json::from_slice(bytes.get(4..4 + len)?).ok()?;
    let body = bytes.get(4 + len..)?;
    if body.len() > max_body {
        return None;
    }
    let mut headers = HeaderMap::with_capacity(meta.headers.len());
    for (n, v) in meta.headers {
        headers.append(
            HeaderName::from_bytes(n.as_bytes()).ok()?,
            HeaderValue::from_bytes(&v).ok()?,
        );
    }
    let mut vary = Vec::with_capacity(meta.vary.len());
    for (n, v) in meta.vary {
        vary.push((HeaderName::from_bytes(n.as_bytes()).ok()?, v));
    }
    let mut freshness = Freshness::plain(
        Duration::from_millis(meta.lifetime_ms),
        UNIX_EPOCH.checked_add(Duration::from_millis(meta.response_time_ms))?,
    );
    freshness.set_corrected_initial_age(Duration::from_millis(meta.corrected_initial_age_ms));
    freshness.no_cache = meta.no_cache;
    freshness.forbids_stale = meta.forbids_stale;
    freshness.set_stale_while_revalidate(Duration::from_millis(meta.stale_while_revalidate_ms));
    freshness.set_stale_if_error(Duration::from_millis(meta.stale_if_error_ms));
    Some(Entry::new(
        StatusCode::from_u16(meta.status).ok()?,
        headers,
        Bytes::copy_from_slice(body),
        vary,
        freshness,
        meta.tags.into_iter().map(Arc::from).collect(),
    ))
}

/// How long a shared copy is worth keeping: until it is past every use
/// (fresh, then stale-while-revalidate or stale-if-error), at least one
/// second, at most `cap`.
pub(crate) fn keep_for(entry: &Entry, now: SystemTime, cap: Duration) -> Duration {
    let f = &entry.freshness;
    let usable = f.lifetime() + f.stale_while_revalidate().max(f.stale_if_error());
    usable
        .saturating_sub(f.current_age(now))
        .clamp(Duration::from_secs(1), cap.max(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.append("x-many", HeaderValue::from_static("a"));
        h.append("x-many", HeaderValue::from_static("b"));
        let mut f = Freshness::plain(Duration::from_secs(60), SystemTime::now());
        f.set_stale_if_error(Duration::from_secs(30));
        Entry::new(
            StatusCode::OK,
            h,
            Bytes::from_static(b"hello"),
            vec![(
                HeaderName::from_static("accept-language"),
                Some("de".into()),
            )],
            f,
            vec![Arc::from("t1")],
        )
    }

    #[test]
    fn entries_round_trip() {
        let e = entry();
        let back = decode(&encode(&e), 1024).unwrap();
        assert_eq!(back.status, e.status);
        assert_eq!(back.body(), e.body());
        assert_eq!(back.header_map(), e.header_map());
        assert_eq!(back.vary(), e.vary());
        assert_eq!(back.tags(), e.tags());
        assert_eq!(back.freshness.lifetime(), e.freshness.lifetime());
        assert_eq!(
            back.freshness.stale_if_error(),
            e.freshness.stale_if_error()
        );
        let drift = e
            .freshness
            .response_time()
            .duration_since(back.freshness.response_time())
            .unwrap_or_default();
        assert!(drift < Duration::from_millis(1));
    }

    #[test]
    fn bad_or_oversized_bytes_are_misses() {
        let bytes = encode(&entry());
        assert!(decode(&bytes, 4).is_none(), "body over the bound");
        assert!(decode(&bytes[..10], 1024).is_none());
        assert!(decode(b"", 1024).is_none());
        assert!(decode(&[0xff, 0xff, 0xff, 0xff, b'{'], 1024).is_none());
        let mut bad = bytes.clone();
        bad[5] = b'!';
        assert!(decode(&bad, 1024).is_none());
    }

    #[test]
    fn shared_copies_live_as_long_as_they_are_usable() {
        let e = entry();
        let now = SystemTime::now();
        let cap = Duration::from_secs(3600);
        let kept = keep_for(&e, now, cap);
        assert!(kept > Duration::from_secs(85) && kept <= Duration::from_secs(90));
        assert_eq!(
            keep_for(&e, now, Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        let later = now + Duration::from_secs(600);
        assert_eq!(keep_for(&e, later, cap), Duration::from_secs(1));
    }
}
