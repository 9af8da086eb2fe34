//! Who is asking: the user id from a configured header or cookie, else the
//! anonymous `kvgate_uid` cookie, else a newly issued anonymous id.

use http::header::COOKIE;
use http::{HeaderMap, HeaderName, HeaderValue};

/// Cookie that carries an anonymous id kvgate issued.
pub const ANONYMOUS_COOKIE: &str = "kvgate_uid";
/// Longest user id accepted from a header or cookie.
pub const MAX_USER_ID_BYTES: usize = 128;
/// Lifetime of the anonymous cookie: one year (browsers cap at 400 days).
pub const ANONYMOUS_COOKIE_MAX_AGE_SECS: u64 = 365 * 24 * 60 * 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub user_id: String,
    /// The id is kvgate's anonymous id (issued now or earlier).
    pub anonymous: bool,
    /// The id was issued by this request: no state can exist for it yet.
    pub fresh: bool,
}

/// A user id is 1 to 128 visible ASCII characters. Anything else (empty,
/// oversized, spaces, control or non-ASCII bytes) is treated as absent; it
/// would otherwise end up in KV keys and logs.
pub fn is_valid_user_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_USER_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic())
}

/// The first valid value of cookie `name` across every `Cookie` header (HTTP/2
/// clients may split cookies over several).
fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            if k.trim() != name {
                return None;
            }
            let v = v.trim();
            // RFC 6265 allows a value wrapped in double quotes.
            let v = v
                .strip_prefix('"')
                .and_then(|inner| inner.strip_suffix('"'))
                .unwrap_or(v);
            is_valid_user_id(v).then_some(v)
        })
        .next()
}

pub(crate) fn resolve(headers: &HeaderMap, header: &HeaderName, cookie: Option<&str>) -> Identity {
    let known = |id: &str, anonymous: bool| Identity {
        user_id: id.to_owned(),
        anonymous,
        fresh: false,
    };
    let from_header = headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|id| is_valid_user_id(id));
    if let Some(id) = from_header {
        return known(id, false);
    }
    if let Some(id) = cookie.and_then(|name| cookie_value(headers, name)) {
        return known(id, false);
    }
    if let Some(id) = cookie_value(headers, ANONYMOUS_COOKIE) {
        return known(id, true);
    }
    Identity {
        user_id: uuid::Uuid::new_v4().to_string(),
        anonymous: true,
        fresh: true,
    }
}

/// `Set-Cookie` for a newly issued anonymous id.
pub(crate) fn anonymous_cookie(user_id: &str, tls: bool) -> Option<HeaderValue> {
    let secure = if tls { "; Secure" } else { "" };
    let cookie = format!(
        "{ANONYMOUS_COOKIE}={user_id}; Path=/; Max-Age={ANONYMOUS_COOKIE_MAX_AGE_SECS}; \
         HttpOnly; SameSite=Lax{secure}"
    );
    HeaderValue::from_str(&cookie).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v.as_bytes()).unwrap(),
            );
        }
        map
    }

    fn user_header() -> HeaderName {
        HeaderName::from_static("x-user-id")
    }

    #[test]
    fn header_wins_over_cookies() {
        let h = headers(&[
            ("x-user-id", "alice"),
            ("cookie", "sid=bob; kvgate_uid=anon-1"),
        ]);
        let id = resolve(&h, &user_header(), Some("sid"));
        assert_eq!(
            id,
            Identity {
                user_id: "alice".into(),
                anonymous: false,
                fresh: false
            }
        );
    }

    #[test]
    fn configured_cookie_then_anonymous_cookie() {
        let h = headers(&[
            ("cookie", "a=1; sid=\"bob\""),
            ("cookie", "kvgate_uid=anon-1"),
        ]);
        let id = resolve(&h, &user_header(), Some("sid"));
        assert_eq!((id.user_id.as_str(), id.anonymous), ("bob", false));
        let id = resolve(&h, &user_header(), None);
        assert_eq!(
            (id.user_id.as_str(), id.anonymous, id.fresh),
            ("anon-1", true, false)
        );
    }

    #[test]
    fn invalid_ids_are_treated_as_absent() {
        let long = "x".repeat(MAX_USER_ID_BYTES + 1);
        let bad_header_values: [&[u8]; 4] = [b"", b"has space", long.as_bytes(), b"caf\xc3\xa9"];
        for bad in bad_header_values {
            let mut h = HeaderMap::new();
            h.insert(user_header(), HeaderValue::from_bytes(bad).unwrap());
            h.insert(COOKIE, HeaderValue::from_static("kvgate_uid=anon-2"));
            let id = resolve(&h, &user_header(), None);
            assert_eq!(id.user_id, "anon-2", "{bad:?} was accepted");
        }
        let h = headers(&[("cookie", "kvgate_uid=; kvgate_uid=a b")]);
        assert!(resolve(&h, &user_header(), None).fresh);
        assert!(is_valid_user_id(&"x".repeat(MAX_USER_ID_BYTES)));
    }

    #[test]
    fn issues_a_uuid_and_a_cookie_when_nothing_identifies_the_user() {
        let id = resolve(&HeaderMap::new(), &user_header(), Some("sid"));
        assert!(id.anonymous && id.fresh);
        assert!(uuid::Uuid::parse_str(&id.user_id).is_ok());
        let other = resolve(&HeaderMap::new(), &user_header(), None);
        assert_ne!(id.user_id, other.user_id);

        let plain = anonymous_cookie(&id.user_id, false).unwrap();
        assert_eq!(
            plain.to_str().unwrap(),
            format!(
                "kvgate_uid={}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax",
                id.user_id
            )
        );
        let secure = anonymous_cookie(&id.user_id, true).unwrap();
        assert!(secure.to_str().unwrap().ends_with("; SameSite=Lax; Secure"));
    }
}
