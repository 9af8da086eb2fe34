//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the
//! `traceparent` field, checked strictly so that nothing malformed is
//! passed on to the origin.

use http::header::{HeaderMap, HeaderName};

pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(crate) const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// A parsed version-00 `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lowercase
    /// hex, 55 bytes exactly; trace and parent ids not all zero. Other
    /// versions (including the future ones the spec lets a parser accept
    /// by prefix) are refused: kvgate forwards only what it understands.
    pub(crate) fn parse(v: &[u8]) -> Option<TraceParent> {
        if v.len() != 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        if &v[..2] != b"00" {
            return None;
        }
        let mut trace_id = [0u8; 16];
        hex_into(&v[3..35], &mut trace_id)?;
        let mut parent_id = [0u8; 8];
        hex_into(&v[36..52], &mut parent_id)?;
        let mut flags = [0u8; 1];
        hex_into(&v[53..55], &mut flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags: flags[0],
        })
    }

    pub(crate) fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// Lowercase hex (`HEXDIGLC`) only.
fn hex_into(hex: &[u8], out: &mut [u8]) -> Option<()> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if hex.len() != out.len() * 2 {
        return None;
    }
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

/// The request's trace context, if it has exactly one valid `traceparent`.
pub(crate) fn incoming(h: &HeaderMap) -> Option<TraceParent> {
    let mut all = h.get_all(&TRACEPARENT).iter();
    match (all.next(), all.next()) {
        (Some(v), None) => TraceParent::parse(v.as_bytes()),
        _ => None,
    }
}

/// Keeps a valid trace context for the next hop and removes anything else:
/// a missing, repeated or malformed `traceparent` takes `tracestate` with
/// it (the spec forbids reading `tracestate` without a valid parent).
pub(crate) fn keep_if_valid(h: &mut HeaderMap) -> Option<TraceParent> {
    if !h.contains_key(&TRACEPARENT) {
        // Common case: one lookup, nothing to remove unless a lone
        // tracestate came along.
        if h.contains_key(&TRACESTATE) {
            h.remove(&TRACESTATE);
        }
        return None;
    }
    let valid = incoming(h);
    if valid.is_none() {
        h.remove(&TRACEPARENT);
        h.remove(&TRACESTATE);
    }
    valid
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example() {
        let t = TraceParent::parse(GOOD.as_bytes()).expect("valid");
        assert_eq!(t.trace_id[0], 0x4b);
        assert_eq!(t.trace_id[15], 0x36);
        assert_eq!(
            t.parent_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert!(t.sampled());
        let unsampled = GOOD.replace("-01", "-00");
        assert!(!TraceParent::parse(unsampled.as_bytes()).unwrap().sampled());
    }

    #[test]
    fn refuses_everything_else() {
        let bad = [
            "",
            "00",
            // Version other than 00 (ff is forbidden, 01 not understood).
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Uppercase hex, non-hex, wrong separators, lengths.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01a",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ];
        for b in bad {
            assert_eq!(TraceParent::parse(b.as_bytes()), None, "{b:?}");
        }
    }

    #[test]
    fn headers_keep_only_a_single_valid_context() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(GOOD));
        h.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        assert!(keep_if_valid(&mut h).is_some());
        assert_eq!(h.get(TRACEPARENT).unwrap(), GOOD);
        assert_eq!(h.get(TRACESTATE).unwrap(), "congo=t61rcWkgMzE");

        // Two traceparents: neither is believed.
        h.append(TRACEPARENT, HeaderValue::from_static(GOOD));
        assert!(keep_if_valid(&mut h).is_none());
        assert!(!h.contains_key(TRACEPARENT) && !h.contains_key(TRACESTATE));

        h.insert(TRACEPARENT, HeaderValue::from_static("00-bogus"));
        h.insert(TRACESTATE, HeaderValue::from_static("a=b"));
        assert!(keep_if_valid(&mut h).is_none());
        assert!(!h.contains_key(TRACEPARENT) && !h.contains_key(TRACESTATE));

        // tracestate without a parent is not forwarded either.
        h.insert(TRACESTATE, HeaderValue::from_static("a=b"));
        assert!(keep_if_valid(&mut h).is_none());
        assert!(!h.contains_key(TRACESTATE));
    }
}
