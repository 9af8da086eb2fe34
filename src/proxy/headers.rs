//! Header rules on the request path that are not caching: hop-by-hop
//! removal (RFC 9110 7.6.1), Via (7.6.3) and the X-Forwarded-* family,
//! which kvgate writes itself rather than trust from clients.

pub(crate) use crate::protocol::headers::remove_hop_by_hop;
use crate::protocol::trace_context;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The request's id: the client's when valid, else one kvgate makes. It
/// goes to the origin, back on the response, and into the request's logs.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

// Named once as constants: `HeaderName::from_static` at a call site
// validates the name on every call, and a `&str` key is parsed per lookup.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Longest request id kept from a client.
const MAX_REQUEST_ID_BYTES: usize = 128;

/// An id worth keeping: 1 to 128 bytes of letters, digits and `-_.:+/=@`
/// (UUIDs, hex, base64), nothing that could break a log line or a header.
fn valid_request_id(v: &HeaderValue) -> bool {
    valid_request_id_bytes(v.as_bytes())
}

/// [`valid_request_id`] for a field's raw bytes.
pub(super) fn valid_request_id_bytes(b: &[u8]) -> bool {
    !b.is_empty()
        && b.len() <= MAX_REQUEST_ID_BYTES
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:+/=@".contains(c))
}

/// The client's `X-Request-Id` when there is exactly one and it is valid,
/// else a new one.
pub(crate) fn request_id(h: &HeaderMap) -> HeaderValue {
    let mut sent = h.get_all(&X_REQUEST_ID).iter();
    match (sent.next(), sent.next()) {
        (Some(v), None) if valid_request_id(v) => v.clone(),
        _ => new_request_id(),
    }
}

/// 24 hex digits: a random 64-bit prefix drawn once per thread, then that
/// thread's counter. Unique within a process (and, with the random prefix,
/// across restarts and instances in practice), and no system call per
/// request.
fn new_request_id() -> HeaderValue {
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&new_request_id_text()).unwrap_or(HeaderValue::from_static("0"))
}

/// A new request id's text (see [`new_request_id`]).
pub(super) fn new_request_id_text() -> [u8; 24] {
    use std::cell::Cell;
    thread_local! {
        static NEXT: Cell<(u64, u32)> = Cell::new((thread_prefix(), 0));
    }
    let (prefix, n) = NEXT.with(|c| {
        let (p, n) = c.get();
        // A wrapped counter takes a new prefix rather than repeat an id.
        let next = if n == u32::MAX {
            (thread_prefix(), 0)
        } else {
            (p, n + 1)
        };
        c.set(next);
        (p, n)
    });
    let mut buf = [0u8; 24];
    let hex = b"0123456789abcdef";
    for (i, b) in buf[..16].iter_mut().enumerate() {
        *b = hex[((prefix >> (60 - 4 * i)) & 0xf) as usize];
    }
    for (i, b) in buf[16..].iter_mut().enumerate() {
        *b = hex[((n >> (28 - 4 * i)) & 0xf) as usize];
    }
    buf
}

fn thread_prefix() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // No entropy: fall back on the clock and the thread, still distinct.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ (std::process::id() as u64) << 32;
    }
    u64::from_le_bytes(b)
}

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

/// Every forwarding name starts with `x`, `f` or `t`: most fields (`host`,
/// `accept`, `user-agent`) are ruled out by their first byte.
fn may_be_forwarding(name: &str) -> bool {
    matches!(name.as_bytes().first(), Some(b'x' | b'f' | b't'))
}

/// Removes what a client may not tell the origin about the request's
/// routing (see [`CLIENT_FORWARDING`]). A trusted peer (a load balancer in
/// `server.trusted_proxies`) keeps its `X-Forwarded-For` and
/// `X-Forwarded-Proto`; anyone else's are removed too.
pub(crate) fn strip_client_forwarding(h: &mut HeaderMap, trusted_peer: bool) {
    // One pass over the names present (most requests carry none of these)
    // instead of a hash lookup per name on every request.
    let untrusted_only =
        |n: &str| !trusted_peer && (n == "x-forwarded-for" || n == "x-forwarded-proto");
    let present = h.keys().any(|n| {
        let n = n.as_str();
        may_be_forwarding(n) && (CLIENT_FORWARDING.contains(&n) || untrusted_only(n))
    });
    if !present {
        return;
    }
    for n in CLIENT_FORWARDING {
        h.remove(n);
    }
    if !trusted_peer {
        h.remove(&X_FORWARDED_FOR);
        h.remove(&X_FORWARDED_PROTO);
    }
}

/// Prepares request headers for the origin, after
/// [`strip_client_forwarding`]: hop-by-hop removed, `Via` appended, the
/// peer's address appended to `X-Forwarded-For`, `X-Forwarded-Proto` set
/// from the connection unless a trusted proxy sent one, and
/// `X-Forwarded-Host` set to the request's authority, and the W3C trace
/// context (`traceparent`, `tracestate`) passed on only when valid
/// (checked here, on the way to the origin, so hits never pay for it).
pub(crate) fn forward_request_headers(
    h: &mut HeaderMap,
    client: ClientInfo,
    authority: &str,
    via: &HeaderValue,
) {
    remove_hop_by_hop(h);
    trace_context::keep_if_valid(h);
    h.append(header::VIA, via.clone());
    // Built in a stack buffer: an IP's text, and a previous chain only when
    // a trusted proxy sent one (no `format!` and `to_string` per miss).
    let mut ip = [0u8; 64];
    let ip = {
        use std::io::Write as _;
        let mut w = &mut ip[..];
        let room = w.len();
        let _ = write!(w, "{}", client.addr.ip());
        let written = room - w.len();
        &ip[..written]
    };
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            let mut chain = Vec::with_capacity(prev.len() + 2 + ip.len());
            chain.extend_from_slice(prev.as_bytes());
            chain.extend_from_slice(b", ");
            chain.extend_from_slice(ip);
            HeaderValue::from_bytes(&chain)
        }
        _ => HeaderValue::from_bytes(ip),
    };
    if let Ok(v) = xff {
        h.insert(X_FORWARDED_FOR, v);
    }
    if !h.contains_key(&X_FORWARDED_PROTO) {
        h.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if client.tls { "https" } else { "http" }),
        );
    }
    match HeaderValue::from_str(authority) {
        Ok(v) if !authority.is_empty() => {
            h.insert(X_FORWARDED_HOST, v);
        }
        _ => {
            h.remove(&X_FORWARDED_HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_byte_filter_passes_every_forwarding_name() {
        for n in CLIENT_FORWARDING
            .iter()
            .chain(&["x-forwarded-for", "x-forwarded-proto"])
        {
            assert!(may_be_forwarding(n), "{n}");
        }
        assert!(!may_be_forwarding("host") && !may_be_forwarding("accept"));
    }

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

#[cfg(test)]
mod request_id_tests {
    use super::*;

    #[test]
    fn a_valid_client_id_is_kept_anything_else_replaced() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123_X.y:z"));
        assert_eq!(request_id(&h), "abc-123_X.y:z");
        for bad in ["", "a b", "a\"b", "<script>", &"x".repeat(129)] {
            h.insert(&X_REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let id = request_id(&h);
            assert_ne!(id, bad);
            assert_eq!(id.len(), 24, "{bad:?} -> {id:?}");
        }
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("one"));
        h.append(&X_REQUEST_ID, HeaderValue::from_static("two"));
        assert_eq!(request_id(&h).len(), 24, "two ids: neither is believed");
    }

    #[test]
    fn generated_ids_differ() {
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(valid_request_id));
    }
}
