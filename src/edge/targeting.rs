//! Evaluating targeting conditions (compiled by `config::edge::targeting`)
//! against one request: pure functions, no allocation unless a query
//! parameter needs percent-decoding.

use std::borrow::Cow;

use http::header::{COOKIE, USER_AGENT};
use http::HeaderMap;

use crate::config::edge::targeting::{Attribute, Condition, Operator, Version};

/// What a condition can read of a request.
pub(crate) struct RequestAttributes<'a> {
    pub(crate) user_id: &'a str,
    /// The path, without the query.
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    pub(crate) headers: &'a HeaderMap,
    /// The configured country header's value, only from a trusted peer.
    pub(crate) country: Option<&'a str>,
}

/// A user agent's family, from the product tokens browsers send (the most
/// specific first: Edge and Opera also claim Chrome, Chrome claims Safari).
pub(crate) fn user_agent_family(ua: &str) -> &'static str {
    let lower_has = |needle: &str| {
        ua.as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    };
    if lower_has("bot") || lower_has("spider") || lower_has("crawl") {
        "bot"
    } else if ua.contains("Edg/") || ua.contains("Edge/") {
        "edge"
    } else if ua.contains("OPR/") || ua.contains("Opera") {
        "opera"
    } else if ua.contains("Firefox/") || ua.contains("FxiOS/") {
        "firefox"
    } else if ua.contains("Chrome/") || ua.contains("CriOS/") || ua.contains("Chromium/") {
        "chrome"
    } else if ua.contains("Safari/") {
        "safari"
    } else if ua.starts_with("curl/") {
        "curl"
    } else {
        "other"
    }
}

/// Percent-decodes a query component (`+` is a space); `None` when it does
/// not decode to UTF-8.
fn query_decode(raw: &str) -> Option<Cow<'_, str>> {
    if !raw.bytes().any(|b| b == b'%' || b == b'+') {
        return Some(Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| crate::protocol::path::hex_value(b);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(h << 4 | l);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

impl<'a> RequestAttributes<'a> {
    /// The attribute's value, `None` when the request has none.
    pub(crate) fn value(&self, attribute: &Attribute) -> Option<Cow<'a, str>> {
        match attribute {
            Attribute::UserId => Some(Cow::Borrowed(self.user_id)),
            Attribute::Path => Some(Cow::Borrowed(self.path)),
            Attribute::Country => self.country.map(Cow::Borrowed),
            Attribute::UserAgentFamily => {
                let ua = self.headers.get(USER_AGENT)?.to_str().ok()?;
                Some(Cow::Borrowed(user_agent_family(ua)))
            }
            Attribute::Header(name) => self
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| Cow::Borrowed(v.trim())),
            Attribute::Cookie(name) => {
                let headers: &'a HeaderMap = self.headers;
                headers
                    .get_all(COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|line| line.split(';'))
                    .find_map(|pair| {
                        let (k, v) = pair.trim().split_once('=')?;
                        (k.trim() == name).then(|| Cow::Borrowed(v.trim().trim_matches('"')))
                    })
            }
            Attribute::Query(name) => {
                let query: &'a str = self.query?;
                query.split('&').find_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (query_decode(k)?.as_ref() == name.as_str())
                        .then(|| query_decode(v))
                        .flatten()
                })
            }
        }
    }

    /// Whether one condition holds. A missing attribute satisfies only
    /// `not_equals` and `not_in` (it is neither the value nor in the list).
    pub(crate) fn holds(&self, condition: &Condition) -> bool {
        let value = self.value(&condition.attribute);
        let Some(value) = value else {
            return matches!(condition.op, Operator::NotEquals(_) | Operator::NotIn(_));
        };
        let v = value.as_ref();
        match &condition.op {
            Operator::Equals(x) => v == x,
            Operator::NotEquals(x) => v != x,
            Operator::In(list) => list.iter().any(|x| x == v),
            Operator::NotIn(list) => !list.iter().any(|x| x == v),
            Operator::StartsWith(x) => v.starts_with(x.as_str()),
            Operator::Matches(re) => re.is_match(v),
            Operator::Number(ord, or_equal, x) => match v.trim().parse::<f64>() {
                Ok(n) if n.is_finite() => n
                    .partial_cmp(x)
                    .is_some_and(|o| o == *ord || (*or_equal && o.is_eq())),
                _ => false,
            },
            Operator::Version(ord, or_equal, x) => match Version::parse(v) {
                Some(n) => {
                    let o = n.cmp(x);
                    o == *ord || (*or_equal && o.is_eq())
                }
                None => false,
            },
            Operator::Exists => true,
        }
    }

    /// Whether every condition holds (true for none).
    pub(crate) fn all(&self, conditions: &[Condition]) -> bool {
        conditions.iter().all(|c| self.holds(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::edge::targeting::ConditionConfig;
    use http::HeaderValue;
    use proptest::prelude::*;
    use serde_json::json;

    fn cond(attribute: &str, op: &str, value: serde_json::Value) -> Condition {
        Condition::compile(&ConditionConfig {
            attribute: attribute.into(),
            op: op.into(),
            value,
        })
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn every_attribute_and_operator() {
        let h = headers(&[
            ("x-plan", "pro"),
            ("x-app-version", "2.10.1"),
            ("x-age", "42"),
            ("cookie", "a=1; plan=\"gold\""),
            ("cookie", "beta=yes"),
            (
                "user-agent",
                "Mozilla/5.0 (X11) AppleWebKit Chrome/120.0 Safari/537.36",
            ),
        ]);
        let req = RequestAttributes {
            user_id: "alice",
            path: "/checkout/pay",
            query: Some("ref=news%20letter&x=1&utm+src=a+b"),
            headers: &h,
            country: Some("DE"),
        };
        let yes = [
            cond("user_id", "equals", json!("alice")),
            cond("user_id", "in", json!(["bob", "alice"])),
            cond("user_id", "not_in", json!(["bob"])),
            cond("path", "starts_with", json!("/checkout")),
            cond("path", "matches", json!("^/checkout/(pay|confirm)$")),
            cond("country", "in", json!(["DE", "AT"])),
            cond("user_agent", "equals", json!("chrome")),
            cond("header:X-Plan", "equals", json!("pro")),
            cond("header:x-app-version", "version_gte", json!("2.9")),
            cond("header:x-app-version", "version_lt", json!("2.10.2")),
            cond("header:x-age", "gte", json!(42)),
            cond("header:x-age", "lt", json!(100.5)),
            cond("cookie:plan", "equals", json!("gold")),
            cond("cookie:beta", "exists", serde_json::Value::Null),
            cond("query:ref", "equals", json!("news letter")),
            cond("query:utm src", "equals", json!("a b")),
            cond("header:x-missing", "not_equals", json!("x")),
            cond("header:x-missing", "not_in", json!(["x"])),
        ];
        for c in &yes {
            assert!(req.holds(c), "{c:?}");
        }
        let no = [
            cond("user_id", "equals", json!("Alice")),
            cond("user_id", "not_in", json!(["alice"])),
            cond("path", "matches", json!("^/cart")),
            cond("header:x-app-version", "version_gt", json!("2.10.1")),
            cond("header:x-age", "gt", json!(42)),
            cond("header:x-plan", "gt", json!(1)),
            cond("header:x-plan", "version_gt", json!("1.0")),
            cond("cookie:nope", "exists", serde_json::Value::Null),
            cond("header:x-missing", "equals", json!("x")),
            cond("query:nope", "equals", json!("")),
        ];
        for c in &no {
            assert!(!req.holds(c), "{c:?}");
        }
        assert!(req.all(&yes));
        assert!(!req.all(&[yes[0].clone(), no[0].clone()]));
        assert!(req.all(&[]));
        let untrusted = RequestAttributes {
            country: None,
            ..req
        };
        assert!(!untrusted.holds(&cond("country", "equals", json!("DE"))));
    }

    #[test]
    fn user_agent_families() {
        for (ua, family) in [
            ("Mozilla/5.0 (Windows NT 10.0) AppleWebKit/537.36 Chrome/120.0 Safari/537.36 Edg/120.0", "edge"),
            ("Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0", "firefox"),
            ("Mozilla/5.0 (Macintosh) AppleWebKit/605.1.15 Version/17.1 Safari/605.1.15", "safari"),
            ("Mozilla/5.0 AppleWebKit Chrome/120.0 Safari/537.36 OPR/106.0", "opera"),
            ("Mozilla/5.0 (compatible; Googlebot/2.1)", "bot"),
            ("curl/8.4.0", "curl"),
            ("", "other"),
        ] {
            assert_eq!(user_agent_family(ua), family, "{ua}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_requests_never_panic(query in "[a-z=&%+0-9A-F]{0,40}", cookie in "[a-z=;\" ]{0,40}", ua in "\\PC{0,40}") {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&cookie) { h.insert(COOKIE, v); }
            if let Ok(v) = HeaderValue::from_str(&ua) { h.insert(USER_AGENT, v); }
            let req = RequestAttributes { user_id: "u", path: "/", query: Some(&query), headers: &h, country: None };
            for c in [cond("query:a", "exists", serde_json::Value::Null), cond("cookie:a", "equals", json!("b")), cond("user_agent", "in", json!(["chrome"]))] {
                let _ = req.holds(&c);
            }
        }
    }
}
