//! Purges and listings over the store, as the admin API defines them.
//!
//! URL purges match the exact path and query on every scheme and host (keys
//! carry `scheme://host`; the operator names what clients requested, not
//! which Host header they sent) and every namespace version, like prefix
//! and tag purges: entries of older versions are unreachable already, and
//! purging them too frees their memory at once.

use crate::cache::storage::Storage;
use crate::cluster::Purge;
use crate::protocol::path::normalize_target;

/// What one `POST /purge` asks for.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PurgeRequest {
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default)]
    pub prefixes: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub soft: bool,
}

/// Most targets one purge request may name.
pub(crate) const MAX_TARGETS: usize = 10_000;

impl PurgeRequest {
    pub(crate) fn validate(&self) -> Result<(), String> {
        let total = self.urls.len() + self.prefixes.len() + self.tags.len();
        if total == 0 {
            return Err("nothing to purge: give \"urls\", \"prefixes\" or \"tags\"".into());
        }
        if total > MAX_TARGETS {
            return Err(format!(
                "at most {MAX_TARGETS} urls, prefixes and tags per request"
            ));
        }
        if let Some(u) = self.urls.iter().find(|u| !u.starts_with('/')) {
            return Err(format!(
                "url {u:?} must be a path (and query) starting with '/'"
            ));
        }
        if let Some(p) = self.prefixes.iter().find(|p| !p.starts_with('/')) {
            return Err(format!("prefix {p:?} must start with '/'"));
        }
        for t in self.urls.iter().chain(&self.prefixes) {
            if let Err(e) = normalize_target(t) {
                return Err(format!("{t:?}: {e}"));
            }
        }
        if self.tags.iter().any(String::is_empty) {
            return Err("tags must not be empty".into());
        }
        Ok(())
    }

    /// Applies the purge; returns how many entries it touched (an entry
    /// matched by several targets of a soft purge counts once per target).
    /// URLs and prefixes are matched in the normal form keys are in, so
    /// `/a/../b` purges what requests for `/b` stored (see `validate`).
    pub(crate) fn apply(&self, store: &dyn Storage) -> usize {
        self.targets().apply(store)
    }

    /// The targets as the cluster broadcast carries them (and applies them:
    /// one implementation for local and remote purges).
    fn targets(&self) -> Purge {
        Purge {
            urls: self.urls.clone(),
            prefixes: self.prefixes.clone(),
            tags: self.tags.clone(),
            soft: self.soft,
        }
    }

    /// The targets, for the broadcast.
    pub(crate) fn into_targets(self) -> Purge {
        Purge {
            urls: self.urls,
            prefixes: self.prefixes,
            tags: self.tags,
            soft: self.soft,
        }
    }
}

/// Listing cursors are `MemoryStorage::list`'s sort keys, hex-encoded so
/// that they travel in a query string untouched.
pub(crate) fn encode_cursor(raw: &str) -> String {
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn decode_cursor(hex: &str) -> Option<String> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::CacheKey;
    use crate::cache::policy::Freshness;
    use crate::cache::storage::{Entry, Store};
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use std::sync::Arc;
    use std::time::Duration;
    use std::time::SystemTime;

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

    #[test]
    fn url_purge_is_exact_and_covers_hosts_schemes_versions() {
        let s = Store::new(1 << 20, 1 << 20, 4);
        for (v, tls, host, path) in [
            (1, false, "a.example", "/p?x=1"),
            (1, true, "B.example", "/p?x=1"),
            (2, false, "a.example", "/p?x=1"),
            (1, false, "a.example", "/p?x=12"),
            (1, false, "a.example", "/p"),
        ] {
            s.insert(CacheKey::new(v, tls, host, path), entry());
        }
        assert_eq!(s.purge_path("/p?x=1", false), 3);
        assert_eq!(s.usage().1, 2);
        assert_eq!(s.purge_path("/p?x=1", false), 0);
        assert_eq!(s.purge_path("/p", true), 1);
        assert_eq!(s.usage().1, 2);
    }

    #[test]
    fn cursors_round_trip() {
        let raw = "http://h/a\u{0}00000000000000000001\u{0}0000";
        assert_eq!(decode_cursor(&encode_cursor(raw)).as_deref(), Some(raw));
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor("abc"), None);
    }

    #[test]
    fn requests_are_validated() {
        assert!(PurgeRequest::default().validate().is_err());
        let bad_url = PurgeRequest {
            urls: vec!["http://x/a".into()],
            ..Default::default()
        };
        assert!(bad_url.validate().is_err());
        let ok = PurgeRequest {
            tags: vec!["t".into()],
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let climbing = PurgeRequest {
            prefixes: vec!["/a/../../b".into()],
            ..Default::default()
        };
        assert!(climbing.validate().is_err());
    }

    #[test]
    fn urls_and_prefixes_match_in_normal_form() {
        let s = Store::new(1 << 20, 1 << 20, 4);
        s.insert(CacheKey::new(1, false, "h", "/account/x"), entry());
        s.insert(CacheKey::new(1, false, "h", "/account/y"), entry());
        let by_url = PurgeRequest {
            urls: vec!["/x/../%61ccount//x".into()],
            ..Default::default()
        };
        assert_eq!(by_url.apply(&s), 1);
        let by_prefix = PurgeRequest {
            prefixes: vec!["//account/".into()],
            ..Default::default()
        };
        assert_eq!(by_prefix.apply(&s), 1);
        assert_eq!(s.usage().1, 0);
    }
}
