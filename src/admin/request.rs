//! Reading admin requests: the body (bounded), JSON, the query string and
//! percent-encoded path segments. Every failure is a 4xx `ApiError`.

use super::reply::ApiError;
use crate::protocol::path::hex_value;
use bytes::Bytes;
use http::header::{HeaderMap, CONTENT_LENGTH};
use http::StatusCode;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;

/// The whole body, refused with 413 past `limit` bytes (declared or sent).
pub(super) async fn read_body<B>(
    headers: &HeaderMap,
    body: B,
    limit: usize,
) -> Result<Bytes, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!("cannot read the body: {e}"))),
    }
}

/// A JSON body into `T`; serde's message (with line and column) on failure.
pub(super) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("a JSON body is required"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))
}

/// Like [`parse_json`], but an empty body is `None`.
pub(super) fn parse_optional_json<T: DeserializeOwned>(body: &[u8]) -> Result<Option<T>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(None)
    } else {
        parse_json(body).map(Some)
    }
}

/// Percent-decodes one path segment or query component; `+` is a space in
/// query components only (form encoding), a literal `+` in paths.
pub(super) fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(ApiError::bad_request(format!(
                        "bad percent-encoding in {s:?}"
                    )));
                };
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::bad_request(format!("{s:?} does not decode to UTF-8")))
}

/// The decoded segments of a path: `/users/a%2Fb` -> `["users", "a/b"]`.
pub(super) fn path_segments(path: &str) -> Result<Vec<String>, ApiError> {
    path.strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .map(|s| percent_decode(s, false))
        .collect()
}

/// The decoded `name=value` pairs of a query string.
pub(super) fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let Some(q) = query else {
        return Ok(Vec::new());
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%20c+d", false).unwrap(), "a/b c+d");
        assert_eq!(percent_decode("a+b", true).unwrap(), "a b");
        assert_eq!(percent_decode("%C3%A9", false).unwrap(), "é");
        assert!(percent_decode("%zz", false).is_err());
        assert!(percent_decode("%4", false).is_err());
        assert!(percent_decode("%FF", false).is_err());
    }

    #[test]
    fn segments_and_queries() {
        assert_eq!(
            path_segments("/users/a%2Fb/preferences").unwrap(),
            ["users", "a/b", "preferences"]
        );
        assert_eq!(path_segments("/").unwrap(), [""]);
        assert_eq!(
            query_pairs(Some("prefix=%2Fapi%2F&tag=a+b&limit")).unwrap(),
            [
                ("prefix".to_string(), "/api/".to_string()),
                ("tag".into(), "a b".into()),
                ("limit".into(), "".into())
            ]
        );
        assert!(query_pairs(None).unwrap().is_empty());
    }

    #[test]
    fn json_bodies() {
        assert!(parse_json::<serde_json::Value>(b" ").is_err());
        let e = parse_json::<serde_json::Value>(b"{nope").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        assert_eq!(parse_optional_json::<serde_json::Value>(b"").unwrap(), None);
    }

    // Property tests: query strings and path segments come from the network.
    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Percent-encodes everything but unreserved characters (RFC 3986
        /// 2.3); in a query component a space may also be `+`.
        fn encode(s: &str, space_as_plus: bool) -> String {
            let mut out = String::new();
            for b in s.bytes() {
                match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        out.push(b as char)
                    }
                    b' ' if space_as_plus => out.push('+'),
                    _ => out.push_str(&format!("%{b:02X}")),
                }
            }
            out
        }

        proptest! {
            #[test]
            fn arbitrary_input_never_panics(s in "\\PC{0,64}", raw in "[%+&=/a-fA-F0-9\u{e9}\u{1F600}]{0,32}") {
                for input in [&s, &raw] {
                    let _ = percent_decode(input, true);
                    let _ = percent_decode(input, false);
                    let _ = query_pairs(Some(input));
                    let _ = path_segments(input);
                }
            }

            #[test]
            fn percent_decoding_round_trips(s in "\\PC{0,32}", plus in any::<bool>()) {
                prop_assert_eq!(percent_decode(&encode(&s, plus), plus).unwrap(), s.clone());
                // Lowercase hex digits decode the same (RFC 3986 2.1).
                let lower = encode(&s, plus).to_ascii_lowercase();
                let no_letters = s.bytes().all(|b| !b.is_ascii_alphabetic());
                if no_letters {
                    prop_assert_eq!(percent_decode(&lower, plus).unwrap(), s);
                }
            }

            #[test]
            fn query_pairs_round_trip(
                pairs in prop::collection::vec(("\\PC{0,12}", "\\PC{0,12}"), 0..5),
            ) {
                let q = pairs
                    .iter()
                    .map(|(k, v)| format!("{}={}", encode(k, true), encode(v, true)))
                    .collect::<Vec<_>>()
                    .join("&");
                prop_assert_eq!(query_pairs(Some(&q)).unwrap(), pairs);
            }

            #[test]
            fn path_segments_round_trip(segs in prop::collection::vec("\\PC{0,12}", 1..5)) {
                let path = format!(
                    "/{}",
                    segs.iter().map(|s| encode(s, false)).collect::<Vec<_>>().join("/")
                );
                prop_assert_eq!(path_segments(&path).unwrap(), segs);
            }
        }
    }
}
