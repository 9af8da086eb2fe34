//! Header names and values kept in static memory, so that putting them on
//! a request or response copies a pointer: the edge's injected fields
//! (built once per definition change) and the gateway's `Via` and
//! `Cache-Status` labels (once per config generation).
//!
//! A `HeaderValue` or custom `HeaderName` made from a `String` shares its
//! bytes through a reference count: each request's clone into the
//! injection list and into the request's headers, and each drop, writes
//! that count, one cache line every core writes on every request. Bytes
//! with a `'static` lifetime have no count. Texts are interned (each
//! distinct text stored once, for the life of the process) up to
//! [`CAPACITY_BYTES`] in all: past that, e.g. after a very long run of
//! admin changes, new texts are built the counted way (correct, slower).

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

use bytes::Bytes;
use http::header::{InvalidHeaderName, InvalidHeaderValue};
use http::{HeaderName, HeaderValue};

/// The most bytes of text ever interned (the process keeps them).
pub(crate) const CAPACITY_BYTES: usize = 1 << 20;

struct Interned {
    texts: HashSet<&'static str>,
    bytes: usize,
}

static INTERNED: LazyLock<Mutex<Interned>> = LazyLock::new(|| {
    Mutex::new(Interned {
        texts: HashSet::new(),
        bytes: 0,
    })
});

/// `text` in static memory: the interned copy, `None` once the capacity is
/// used up.
fn intern(text: &str) -> Option<&'static str> {
    // A poisoned lock still guards a consistent set (inserts are whole).
    let mut interned = INTERNED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&known) = interned.texts.get(text) {
        return Some(known);
    }
    if interned.bytes + text.len() > CAPACITY_BYTES {
        return None;
    }
    let stored: &'static str = Box::leak(text.to_owned().into_boxed_str());
    interned.bytes += stored.len();
    interned.texts.insert(stored);
    Some(stored)
}

/// A header value of `text`, static when it can be.
pub(crate) fn value(text: &str) -> Result<HeaderValue, InvalidHeaderValue> {
    // Validated first, so nothing invalid is interned.
    let counted = HeaderValue::from_str(text)?;
    Ok(match intern(text) {
        Some(stored) => {
            HeaderValue::from_maybe_shared(Bytes::from_static(stored.as_bytes())).unwrap_or(counted)
        }
        None => counted,
    })
}

/// A header name of `text` (lowercased as `HeaderName` does), static when
/// it can be.
pub(crate) fn name(text: &str) -> Result<HeaderName, InvalidHeaderName> {
    let counted = HeaderName::from_bytes(text.as_bytes())?;
    Ok(match intern(counted.as_str()) {
        // Valid and lowercase already: `from_static` cannot panic on it.
        Some(stored) => HeaderName::from_static(stored),
        None => counted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_names_equal_the_counted_ones_and_share_one_copy() {
        let v = value("variant_a").unwrap();
        assert_eq!(v, HeaderValue::from_static("variant_a"));
        let again = value("variant_a").unwrap();
        assert_eq!(v.as_bytes().as_ptr(), again.as_bytes().as_ptr());
        let n = name("X-Experiment-Checkout").unwrap();
        assert_eq!(n.as_str(), "x-experiment-checkout");
        assert_eq!(n, HeaderName::from_bytes(b"x-experiment-checkout").unwrap());
    }

    #[test]
    fn invalid_text_is_refused_and_not_interned() {
        assert!(value("new\nline").is_err());
        assert!(name("has space").is_err());
        let interned = INTERNED.lock().unwrap_or_else(|p| p.into_inner());
        assert!(!interned.texts.contains("new\nline"));
        assert!(!interned.texts.contains("has space"));
    }
}
