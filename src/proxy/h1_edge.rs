//! The edge on the HTTP/1.1 fast path: a fast hit on a gateway with
//! `[edge]` gets what `Gateway::answer_with_edge` gives the usual path's
//! hit. The edge decides from the request's fields as the usual path hands
//! them to it (client forwarding fields stripped unless the peer is a
//! trusted proxy, injected ones removed), a new visitor's `Set-Cookie` joins
//! the answer, the route is counted, and exposures are observed once the
//! status is known.
//!
//! Order matters: a decision cannot be taken back (it counts evaluations
//! and exposures, and may issue an id), so the edge decides only for a
//! request already answered. The answer is written first (one lookup, as
//! for a plain fast hit) and the cookie, when there is one, is put in
//! before the head's blank line. A request that is not a fast hit is
//! relayed without a decision, and the usual path decides for it once.
//!
//! The answer does not depend on the decision otherwise: a fast hit is on
//! a response stored without Vary, so the injected fields select nothing.

use super::gateway::Gateway;
use super::h1_hits::Head;
use super::headers::ClientInfo;
use crate::edge::Edge;
use crate::protocol::headers::write_field;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};

impl Gateway {
    /// [`Gateway::fast_hit`] for a gateway with `[edge]`; `None` (nothing
    /// written, nothing decided) when the usual path must serve `req`.
    pub(super) async fn fast_edge_hit(
        &self,
        edge: &Edge,
        req: &Head<'_>,
        client: ClientInfo,
        out: &mut Vec<u8>,
    ) -> Option<Option<Bytes>> {
        // The preferences endpoint is not a cached path: the usual path's.
        if self.self_service_path.as_deref() == Some(req.path()) {
            return None;
        }
        // Before the answer: fields the usual path would refuse go to it.
        let mut headers = header_map(req.fields)?;
        let hit = self.write_fast_hit(req, client, out)?;
        self.strip_forwarding_from(&mut headers, client);
        edge.strip_injected(&mut headers);
        let decision = edge
            .decide(&headers, req.target, client.addr.ip(), false)
            .await;
        if let Some(cookie) = &decision.set_cookie {
            // Per response, never stored: the cookie is this client's alone.
            insert_field(out, hit.blank_line, b"set-cookie", cookie.as_bytes());
        }
        self.fast_hit_answered(req, client, &hit);
        let route = hit.route.map_or("default", |r| r.name.as_str());
        edge.counter_registry().count_route(route);
        if decision.observes() {
            let method = if req.head { Method::HEAD } else { Method::GET };
            edge.observe(&decision, &method, req.path(), route, hit.status)
                .await;
        }
        Some(hit.large)
    }
}

/// Puts `name: value\r\n` into `out` at `at`, moving what follows (one
/// copy of it, where `Vec::splice` moves byte by byte).
fn insert_field(out: &mut Vec<u8>, at: usize, name: &[u8], value: &[u8]) {
    let end = out.len();
    write_field(out, name, value);
    let added = out.len() - end;
    out[at..].rotate_right(added);
}

/// The request's fields as hyper would have given them to the usual path;
/// `None` for a name or value `http` does not accept (the usual path then
/// serves, or refuses, the request).
fn header_map(fields: &[httparse::Header<'_>]) -> Option<HeaderMap> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(f.value).ok()?;
        map.try_append(name, value).ok()?;
    }
    Some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_keep_their_order_and_repeats() {
        let fields = [
            httparse::Header {
                name: "Host",
                value: b"a",
            },
            httparse::Header {
                name: "Cookie",
                value: b"a=1",
            },
            httparse::Header {
                name: "cookie",
                value: b"b=2",
            },
        ];
        let map = header_map(&fields).expect("valid fields");
        let cookies: Vec<_> = map.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(map.get("host").map(|v| v.as_bytes()), Some(&b"a"[..]));
    }

    #[test]
    fn a_field_goes_in_before_what_follows() {
        let mut out = b"HTTP/1.1 200 OK\r\na: 1\r\n\r\nbody".to_vec();
        let blank_line = out.len() - b"\r\nbody".len();
        insert_field(&mut out, blank_line, b"set-cookie", b"x=1");
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\na: 1\r\nset-cookie: x=1\r\n\r\nbody"
        );
    }

    #[test]
    fn a_value_http_refuses_is_left_to_the_usual_path() {
        let fields = [httparse::Header {
            name: "X-A",
            value: b"a\x7fb",
        }];
        assert!(header_map(&fields).is_none());
    }
}
