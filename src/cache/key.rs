//! The cache key: namespace version, scheme, host and request target.
//!
//! GET and HEAD share a key (a HEAD is answered from a stored GET), so the
//! method is not part of it; only those two methods ever reach the cache.

use std::fmt;
use std::sync::Arc;

/// A primary cache key (RFC 9111 2). Built once per request; cheap to hash,
/// compare and clone (the tag index and the LRU share one copy of the text,
/// which a client chooses and may make long). The version makes old entries
/// unreachable when bumped.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    version: u64,
    /// `scheme://host` followed by the path and query.
    text: Arc<str>,
    /// Where the path starts in `text`.
    path_at: u32,
}

/// A key's parts, before its text is built: what a lookup that allocates
/// nothing hashes and compares (the HTTP/1.1 fast path). Names the same
/// key as `CacheKey::new` with the same arguments.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyParts<'a> {
    pub(crate) version: u64,
    pub(crate) tls: bool,
    pub(crate) host: &'a str,
    pub(crate) path_and_query: &'a str,
}

impl KeyParts<'_> {
    fn scheme(&self) -> &'static str {
        if self.tls {
            "https://"
        } else {
            "http://"
        }
    }

    /// The key's text, byte by byte, as `CacheKey::new` would write it.
    pub(crate) fn text_bytes(&self) -> impl Iterator<Item = u8> + '_ {
        self.scheme()
            .bytes()
            .chain(self.host.bytes().map(|b| b.to_ascii_lowercase()))
            .chain(self.path_and_query.bytes())
    }
}

impl CacheKey {
    /// Whether this is the key `parts` name, compared piece by piece.
    pub(crate) fn is(&self, parts: &KeyParts<'_>) -> bool {
        let scheme = parts.scheme();
        let text = self.text.as_bytes();
        let path_at = self.path_at as usize;
        self.version == parts.version
            && path_at == scheme.len() + parts.host.len()
            && text.len() == path_at + parts.path_and_query.len()
            && text.starts_with(scheme.as_bytes())
            // The stored host is lowercase: equal ignoring case means equal
            // to the lowercased one.
            && text[scheme.len()..path_at].eq_ignore_ascii_case(parts.host.as_bytes())
            && &text[path_at..] == parts.path_and_query.as_bytes()
    }

    /// `host` is lowercased (hosts are case-insensitive, RFC 3986 3.2.2);
    /// the path and query are kept as given (the request path's normal form,
    /// see `protocol::path`), since origins may treat case and parameter
    /// order as significant.
    pub fn new(version: u64, tls: bool, host: &str, path_and_query: &str) -> CacheKey {
        let scheme = if tls { "https://" } else { "http://" };
        let mut text = String::with_capacity(scheme.len() + host.len() + path_and_query.len());
        text.push_str(scheme);
        for c in host.chars() {
            text.push(c.to_ascii_lowercase());
        }
        let path_at = u32::try_from(text.len()).unwrap_or(u32::MAX);
        text.push_str(path_and_query);
        CacheKey {
            version,
            text: Arc::from(text),
            path_at,
        }
    }

    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// The path and query part.
    pub(crate) fn path_and_query(&self) -> &str {
        self.text.get(self.path_at as usize..).unwrap_or("")
    }

    /// The host part (lowercased), without the scheme.
    pub(crate) fn authority(&self) -> &str {
        let head = self.text.get(..self.path_at as usize).unwrap_or("");
        head.split_once("://").map_or(head, |(_, h)| h)
    }

    /// Another target on the same scheme, host and version.
    pub(crate) fn with_path(&self, path_and_query: &str) -> CacheKey {
        let mut text = String::with_capacity(self.path_at as usize + path_and_query.len());
        text.push_str(self.text.get(..self.path_at as usize).unwrap_or(""));
        text.push_str(path_and_query);
        CacheKey {
            version: self.version,
            text: Arc::from(text),
            path_at: self.path_at,
        }
    }

    /// The same target under another namespace version.
    pub(crate) fn with_version(&self, version: u64) -> CacheKey {
        CacheKey {
            version,
            ..self.clone()
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// Bytes this key holds on the heap, once however often it is cloned.
    pub(crate) fn heap_bytes(&self) -> usize {
        // Arc's two counters precede the text.
        self.text.len() + 16
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}:{}", self.version, self.text)
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// A key's parts name the key `new` builds from them, and no other.
        #[test]
        fn parts_name_the_key_new_builds(
            version in 0u64..3,
            tls: bool,
            host in "[a-zA-Z0-9.:-]{0,12}",
            path in "/[a-zA-Z0-9/?=&%.-]{0,16}",
            other_host in "[a-zA-Z0-9.:-]{0,12}",
            other_path in "/[a-zA-Z0-9/?=&%.-]{0,16}",
        ) {
            let parts = KeyParts { version, tls, host: &host, path_and_query: &path };
            let key = CacheKey::new(version, tls, &host, &path);
            proptest::prop_assert!(key.is(&parts));
            proptest::prop_assert_eq!(parts.text_bytes().collect::<Vec<u8>>(), key.as_str().as_bytes());
            let other = CacheKey::new(version, tls, &other_host, &other_path);
            proptest::prop_assert_eq!(other.is(&parts), other == key);
            proptest::prop_assert!(!key.with_version(version + 1).is(&parts));
        }
    }

    #[test]
    fn host_is_case_insensitive_path_is_not() {
        let a = CacheKey::new(1, false, "API.example", "/A?x=1");
        let b = CacheKey::new(1, false, "api.example", "/A?x=1");
        let c = CacheKey::new(1, false, "api.example", "/a?x=1");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.path_and_query(), "/A?x=1");
        assert_eq!(a.authority(), "api.example");
        assert_eq!(
            a.with_path("/b"),
            CacheKey::new(1, false, "api.example", "/b")
        );
    }

    #[test]
    fn version_and_scheme_separate_keys() {
        let a = CacheKey::new(1, false, "h", "/");
        assert_ne!(a, a.with_version(2));
        assert_ne!(a, CacheKey::new(1, true, "h", "/"));
    }
}
