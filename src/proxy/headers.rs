//! Header rules on the request path that are not caching: hop-by-hop
//! removal (RFC 9110 7.6.1), Via (7.6.3) and the X-Forwarded-* family.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

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
pub fn remove_hop_by_hop(h: &mut HeaderMap) {
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

/// What the gateway knows about the client connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    pub addr: std::net::SocketAddr,
    pub tls: bool,
}

/// Prepares a client's request headers for the origin: hop-by-hop removed,
/// `Via` appended, `X-Forwarded-For/Proto/Host` set.
pub fn forward_request_headers(h: &mut HeaderMap, client: ClientInfo, via: &HeaderValue) {
    let host = h.get(header::HOST).cloned();
    remove_hop_by_hop(h);
    h.append(header::VIA, via.clone());
    let ip = client.addr.ip().to_string();
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    h.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if client.tls { "https" } else { "http" }),
    );
    if let Some(host) = host {
        h.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn rfc9110_7_6_3_via_and_forwarded_for_are_appended() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("api.example"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let client = ClientInfo {
            addr: "127.0.0.2:5555".parse().unwrap(),
            tls: false,
        };
        forward_request_headers(&mut h, client, &HeaderValue::from_static("1.1 kvgate"));
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.2");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "api.example");
        assert_eq!(h.get(header::VIA).unwrap(), "1.1 kvgate");
    }
}
