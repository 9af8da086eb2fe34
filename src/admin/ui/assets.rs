//! The dashboard's files, embedded at build time, with their content types
//! and validators.
//!
//! Every file is revalidated on use (`no-cache` with a strong ETag): a new
//! binary's page never runs with an old script, and a reload costs a 304.

use super::super::reply::AdminResponse;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use http::{Response, StatusCode};
use http_body_util::Full;
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

/// One embedded file.
pub(super) struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/ui/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("assets/index.html"),
    },
    Asset {
        path: "/ui/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("assets/app.js"),
    },
    Asset {
        path: "/ui/app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/app.css"),
    },
    Asset {
        path: "/ui/icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("assets/icon.svg"),
    },
];

/// The file served at `path`.
pub(super) fn find(path: &str) -> Option<&'static Asset> {
    let path = if path == "/ui/index.html" {
        "/ui/"
    } else {
        path
    };
    ASSETS.iter().find(|a| a.path == path)
}

/// Strong ETags, one per asset in [`ASSETS`] order, computed once.
fn etags() -> &'static [HeaderValue] {
    static ETAGS: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let d = Sha256::digest(a.body);
                let hex: String = d[..12].iter().map(|b| format!("{b:02x}")).collect();
                HeaderValue::from_str(&format!("\"{hex}\""))
                    .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
            })
            .collect()
    })
}

impl Asset {
    fn etag(&self) -> HeaderValue {
        let i = ASSETS
            .iter()
            .position(|a| std::ptr::eq(a, self))
            .unwrap_or(0);
        etags()[i].clone()
    }

    /// The file, or 304 when the client's copy is current.
    pub(super) fn response(&self, request: &HeaderMap) -> AdminResponse {
        let etag = self.etag();
        let current = request
            .get_all(IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim() == "*" || t.trim().trim_start_matches("W/") == etag);
        let mut r = if current {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r
        } else {
            let mut r = Response::new(Full::new(Bytes::from_static(self.body)));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
            r
        };
        r.headers_mut().insert(ETAG, etag);
        r.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_are_found_with_types_and_validators() {
        assert_eq!(
            find("/ui/").map(|a| a.content_type),
            Some("text/html; charset=utf-8")
        );
        assert!(std::ptr::eq(
            find("/ui/index.html").unwrap(),
            find("/ui/").unwrap()
        ));
        assert!(find("/ui/../secret").is_none());
        assert!(find("/ui/nope.js").is_none());
        let js = find("/ui/app.js").unwrap();
        let r = js.response(&HeaderMap::new());
        assert_eq!(r.status(), 200);
        let etag = r.headers()[ETAG].clone();
        let mut h = HeaderMap::new();
        h.insert(IF_NONE_MATCH, etag.clone());
        assert_eq!(js.response(&h).status(), 304);
        // Different files, different validators.
        assert_ne!(find("/ui/app.css").unwrap().etag(), etag);
    }
}
