//! Header rules on the request path that are not caching: hop-by-hop
//! removal (RFC 9110 7.6.1), Via (7.6.3) and the X-Forwarded-* family,
//! which kvgate writes itself rather than trust from clients.

pub(crate) use crate::protocol::headers::remove_hop_by_hop;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// What the gateway knows about the client connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientInfo {
    pub addr: std::net::SocketAddr,
    pub tls: bool,
}

/// Forwarding fields a client could use to make the origin believe in
/// another host, scheme, port, path, method or client address. An origin
/// that reflects one into a cacheable response would poison the entry for
/// everyone (the key does not include them), so none of them crosses kvgate
/// from a client; `X-Forwarded-For` and `X-Forwarded-Proto` only from a
/// trusted proxy.
const CLIENT_FORWARDING: [&str; 19] = [
    "x-forwarded-host",
    "x-host",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-ssl",
    "x-forwarded-uri",
    "x-forwarded-path",
    "forwarded",
    "x-original-url",
    "x-original-host",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
];

/// Removes what a client may not tell the origin about the request's
/// routing (see [`CLIENT_FORWARDING`]). A trusted peer (a load balancer in
/// `server.trusted_proxies`) keeps its `X-Forwarded-For` and
/// `X-Forwarded-Proto`; anyone else's are removed too.
pub(crate) fn strip_client_forwarding(h: &mut HeaderMap, trusted_peer: bool) {
    // One pass over the names present (most requests carry none of these)
    // instead of a hash lookup per name on every request.
    let untrusted_only =
        |n: &str| !trusted_peer && (n == "x-forwarded-for" || n == "x-forwarded-proto");
    let present = h
        .keys()
        .any(|n| CLIENT_FORWARDING.contains(&n.as_str()) || untrusted_only(n.as_str()));
    if !present {
        return;
    }
    for n in CLIENT_FORWARDING {
        h.remove(n);
    }
    if !trusted_peer {
        h.remove("x-forwarded-for");
        h.remove("x-forwarded-proto");
    }
}

/// Prepares request headers for the origin, after
/// [`strip_client_forwarding`]: hop-by-hop removed, `Via` appended, the
/// peer's address appended to `X-Forwarded-For`, `X-Forwarded-Proto` set
/// from the connection unless a trusted proxy sent one, and
/// `X-Forwarded-Host` set to the request's authority.
pub(crate) fn forward_request_headers(
    h: &mut HeaderMap,
    client: ClientInfo,
    authority: &str,
    via: &HeaderValue,
) {
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
    if !h.contains_key("x-forwarded-proto") {
        h.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static(if client.tls { "https" } else { "http" }),
        );
    }
    match HeaderValue::from_str(authority) {
        Ok(v) if !authority.is_empty() => {
            h.insert(HeaderName::from_static("x-forwarded-host"), v);
        }
        _ => {
            h.remove("x-forwarded-host");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc9110_7_6_3_via_and_forwarded_for_are_appended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let client = ClientInfo {
            addr: "127.0.0.2:5555".parse().unwrap(),
            tls: false,
        };
        let via = HeaderValue::from_static("1.1 kvgate");
        // From a trusted proxy: its chain is extended, its scheme kept.
        let mut trusted = h.clone();
        strip_client_forwarding(&mut trusted, true);
        forward_request_headers(&mut trusted, client, "api.example", &via);
        assert_eq!(
            trusted.get("x-forwarded-for").unwrap(),
            "10.0.0.1, 127.0.0.2"
        );
        assert_eq!(trusted.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(trusted.get("x-forwarded-host").unwrap(), "api.example");
        assert_eq!(trusted.get(header::VIA).unwrap(), "1.1 kvgate");
        // From anyone else: only what kvgate saw itself.
        strip_client_forwarding(&mut h, false);
        forward_request_headers(&mut h, client, "api.example", &via);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "127.0.0.2");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
    }

    #[test]
    fn client_forwarding_never_reaches_the_origin() {
        let mut h = HeaderMap::new();
        for n in CLIENT_FORWARDING {
            h.insert(n, HeaderValue::from_static("evil.example"));
        }
        for trusted in [false, true] {
            let mut h = h.clone();
            strip_client_forwarding(&mut h, trusted);
            let client = ClientInfo {
                addr: "10.0.0.9:1".parse().unwrap(),
                tls: true,
            };
            forward_request_headers(
                &mut h,
                client,
                "api.example",
                &HeaderValue::from_static("v"),
            );
            for n in CLIENT_FORWARDING {
                let v = h.get(n).map(|v| v.to_str().unwrap());
                assert!(v.is_none() || v == Some("api.example"), "{n}: {v:?}");
            }
        }
    }
}
