//! Hop-by-hop fields (RFC 9110 7.6.1): what never crosses a proxy, in
//! either direction. The proxy strips them from requests, the cache from
//! what it stores.

use http::header::{self, HeaderMap, HeaderName};

/// Hop-by-hop fields that never cross a proxy (RFC 9110 7.6.1), plus the
/// de-facto ones (`Keep-Alive`, `Proxy-Connection`).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Removes the hop-by-hop fields and every field `Connection` names.
pub(crate) fn remove_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names present (most requests carry none of these)
    // instead of nine hash lookups on every request.
    let present = h.keys().any(|n| {
        HOP_BY_HOP.contains(n) || n.as_str() == "keep-alive" || n.as_str() == "proxy-connection"
    });
    if !present {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

/// Compact JSON of `doc`, with every byte in visible ASCII or space.
pub(crate) fn ascii_json(doc: &serde_json::Map<String, serde_json::Value>) -> String {
    use std::fmt::Write;
    // Serializing a map of JSON values cannot fail; "{}" is a safe fallback.
    let raw = serde_json::to_string(doc).unwrap_or_else(|_| "{}".to_owned());
    if raw.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return raw;
    }
    let mut out = String::with_capacity(raw.len() + 16);
    for c in raw.chars() {
        if c.is_ascii() && c != '\u{7f}' {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
}

/// One field in HTTP/1.1 form, `name: value\r\n` (RFC 9112 5). The caller
/// vouches for the bytes (a checked name and value).
pub(crate) fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn rfc9110_7_6_1_connection_named_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }
}
