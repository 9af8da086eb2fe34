//! The request path in one normal form (RFC 3986 6.2.2), computed once per
//! request and used for routing, bypass, tag rules, prefix purges, the cache
//! key and the origin request alike. Matching on the raw path let
//! `/%61ccount/x`, `/x/../account/x` and `//account/x` dodge a bypass route
//! for `/account/` while the origin served `/account/x`.

use std::borrow::Cow;

/// Why a path has no normal form; the request gets a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathError {
    /// `..` segments climb above the root (`/../etc/passwd`).
    #[error("the path climbs above the root")]
    AboveRoot,
    /// A `%` not followed by two hex digits (RFC 3986 2.1).
    #[error("the path has a malformed percent-encoding")]
    BadEscape,
}

/// RFC 3986 2.3: characters that mean the same encoded or not.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 2.3 and 2.2: unreserved characters and sub-delims, which a
/// host and a path segment may both hold as they are.
pub(crate) fn is_unreserved_or_sub_delim(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
        )
}

/// The value of one hex digit (RFC 3986 2.1: case-insensitive).
pub(crate) fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-encodings of unreserved characters decoded, the others with
/// uppercase hex digits (RFC 3986 6.2.2.1, 6.2.2.2). Nothing else changes:
/// an encoded `/` stays encoded, since the origin may tell them apart.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let hi = b.get(i + 1).copied().and_then(hex_value);
        let lo = b.get(i + 2).copied().and_then(hex_value);
        let (Some(hi), Some(lo)) = (hi, lo) else {
            return Err(PathError::BadEscape);
        };
        let byte = hi * 16 + lo;
        if is_unreserved(byte) {
            out.push(byte);
        } else {
            out.push(b'%');
            out.push(b[i + 1].to_ascii_uppercase());
            out.push(b[i + 2].to_ascii_uppercase());
        }
        i += 3;
    }
    // Only ASCII was removed or added around the input's own bytes, and the
    // decoded bytes are unreserved ASCII: still valid UTF-8.
    String::from_utf8(out).map_err(|_| PathError::BadEscape)
}

/// Dot segments removed (RFC 3986 5.2.4) and runs of `/` merged into one;
/// a `..` that would climb above the root is an error rather than dropped
/// silently, since no honest client sends one.
fn remove_dot_segments(path: &str) -> Result<String, PathError> {
    let mut segments: Vec<&str> = Vec::new();
    // Whether the output ends in `/`: after `/`, `/.` or `/..` at the end.
    let mut trailing = false;
    for seg in path.split('/').skip(1) {
        match seg {
            "" | "." => trailing = true,
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
                trailing = true;
            }
            s => {
                segments.push(s);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || segments.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Whether a path may not be in normal form (cheap test for the hot path).
fn needs_work(path: &str) -> bool {
    let b = path.as_bytes();
    b.contains(&b'%') || b.windows(2).any(|w| w == b"//" || w == b"/.")
}

/// The normal form of an origin-form path (no query). Paths that do not
/// start with `/` (`*` for OPTIONS) are returned as they are.
pub(crate) fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') || !needs_work(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)?))
}

/// A path and query with the path in normal form; the query is kept as
/// sent (its order and encoding are the origin's business).
pub(crate) fn normalize_target(path_and_query: &str) -> Result<Cow<'_, str>, PathError> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    match (normalize(path)?, query) {
        (Cow::Borrowed(_), _) => Ok(Cow::Borrowed(path_and_query)),
        (Cow::Owned(mut p), Some(q)) => {
            p.push('?');
            p.push_str(q);
            Ok(Cow::Owned(p))
        }
        (Cow::Owned(p), None) => Ok(Cow::Owned(p)),
    }
}

/// The path as a server that treats an encoded `/` (or `\`) as a separator
/// would route it; `None` when the path has no such encoding. A bypass rule
/// holds if either form matches it.
pub(crate) fn separator_decoded(normal_path: &str) -> Option<String> {
    let path = normal_path.split_once('?').map_or(normal_path, |(p, _)| p);
    // Most paths have no escape at all: one byte scan, no substring search.
    if !path.as_bytes().contains(&b'%') || (!path.contains("%2F") && !path.contains("%5C")) {
        return None;
    }
    let opened = path.replace("%2F", "/").replace("%5C", "/");
    // Dots in the decoded form may climb; such a path matches no prefix.
    Some(normalize(&opened).map_or_else(|_| String::new(), Cow::into_owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize(p).map(Cow::into_owned)
    }

    #[test]
    fn rfc3986_6_2_2_2_unreserved_escapes_are_decoded() {
        assert_eq!(norm("/%61ccount/x").unwrap(), "/account/x");
        assert_eq!(norm("/a%7Eb%2d%5F").unwrap(), "/a~b-_");
        // Reserved characters stay encoded, with uppercase hex (6.2.2.1).
        assert_eq!(norm("/a%2fb%3a").unwrap(), "/a%2Fb%3A");
        assert_eq!(norm("/caf%c3%a9").unwrap(), "/caf%C3%A9");
    }

    #[test]
    fn rfc3986_5_2_4_dot_segments_are_removed() {
        assert_eq!(norm("/x/../account/x").unwrap(), "/account/x");
        assert_eq!(norm("/a/./b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/%2e%2E/b").unwrap(), "/b");
        assert_eq!(norm("/.").unwrap(), "/");
        // Not dot segments: dots inside a name.
        assert_eq!(norm("/a/..b/.c").unwrap(), "/a/..b/.c");
    }

    #[test]
    fn repeated_slashes_merge() {
        assert_eq!(norm("//account/x").unwrap(), "/account/x");
        assert_eq!(norm("/a///b//").unwrap(), "/a/b/");
        assert_eq!(norm("/").unwrap(), "/");
    }

    #[test]
    fn climbing_above_the_root_and_bad_escapes_are_errors() {
        assert_eq!(norm("/../etc/passwd"), Err(PathError::AboveRoot));
        assert_eq!(norm("/a/../../b"), Err(PathError::AboveRoot));
        assert_eq!(norm("/%2e%2e/x"), Err(PathError::AboveRoot));
        assert_eq!(norm("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(norm("/a%4"), Err(PathError::BadEscape));
    }

    #[test]
    fn already_normal_paths_are_borrowed_and_queries_kept() {
        assert!(matches!(normalize("/api/v1/x"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize("*"), Ok(Cow::Borrowed("*"))));
        assert_eq!(
            normalize_target("//a/./b?x=/../&y=%61").unwrap(),
            "/a/b?x=/../&y=%61"
        );
        assert_eq!(normalize_target("/a?b//c").unwrap(), "/a?b//c");
    }

    #[test]
    fn encoded_separators_open_for_bypass_matching() {
        assert_eq!(separator_decoded("/api/x"), None);
        assert_eq!(
            separator_decoded("/account%2Fx?q").as_deref(),
            Some("/account/x")
        );
        assert_eq!(separator_decoded("/a%2F..%2F..%2Fb").as_deref(), Some(""));
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = normalize(&s);
            let _ = normalize_target(&s);
            let _ = separator_decoded(&s);
        }

        #[test]
        fn normal_form_is_a_fixed_point(s in "/[a-zA-Z0-9%./_~-]{0,40}") {
            if let Ok(n) = normalize(&s) {
                let again = normalize(&n).unwrap();
                prop_assert_eq!(&again, &n);
                prop_assert!(n.starts_with('/'));
                prop_assert!(!n.contains("//"));
                prop_assert!(!n.split('/').any(|seg| seg == "." || seg == ".."));
            }
        }

        #[test]
        fn decoding_unreserved_does_not_change_meaning(seg in "[a-z0-9~_.-]{1,10}") {
            let encoded: String = seg.bytes().map(|b| format!("%{b:02X}")).collect();
            let plain = normalize(&format!("/p/{seg}")).map(Cow::into_owned);
            let enc = normalize(&format!("/p/{encoded}")).map(Cow::into_owned);
            prop_assert_eq!(plain, enc);
        }
    }
}
