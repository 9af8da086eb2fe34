//! Who is asking: the user id from the configured header or cookie (only
//! from trusted peers), else kvgate's signed anonymous `kvgate_uid` cookie,
//! else a newly issued anonymous id.
//!
//! Anonymous ids are unforgeable and live in their own namespace: the cookie
//! holds `<id>.<mac>`, the mac being HMAC-SHA256 over the id under a secret
//! only kvgate knows (base64url, no padding), and the user id the rest of the
//! edge sees is `anon:<id>`. No cookie can therefore name an authenticated
//! user, and an authenticated id may not start with `anon:`, so nobody can
//! claim an anonymous user's state either.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::header::COOKIE;
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::Sha256;

pub(crate) use crate::config::edge::ANONYMOUS_COOKIE;
/// Prefix of every anonymous user id as the edge (KV keys, admin, tags) sees it.
pub(crate) const ANONYMOUS_PREFIX: &str = "anon:";
/// Longest user id accepted from a header or cookie.
pub(crate) const MAX_USER_ID_BYTES: usize = 128;
/// The anonymous cookie's attributes. `Max-Age`: one year, 365 * 86,400
/// seconds (browsers cap it at 400 days); written out, so that a new
/// visitor's cookie takes no formatting.
const ANONYMOUS_COOKIE_ATTRIBUTES: &str = "; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax";
pub(crate) use crate::config::edge::MIN_SECRET_BYTES;
/// Longest id part of a signed anonymous cookie (kvgate issues 32-byte UUIDs,
/// 36-byte ones before).
const MAX_ANONYMOUS_ID_BYTES: usize = 64;
/// Domain separation: the mac covers this label too, so a mac made with the
/// same secret for another purpose can never pass as an anonymous id's.
const MAC_LABEL: &[u8] = b"kvgate anonymous id v1\0";
/// An issued id's text: a UUID's 32 hex digits without hyphens, so that
/// the mac's label and the id fit one SHA-256 block (55 bytes): HMAC costs
/// two compressions instead of three. Ids issued with hyphens (36 bytes)
/// before still verify.
const UUID_TEXT_BYTES: usize = uuid::fmt::Simple::LENGTH;
// 55 bytes and SHA-256's padding (1 + 8 bytes) fill exactly one block.
const _: () = assert!(MAC_LABEL.len() + UUID_TEXT_BYTES <= 55);
/// A mac's length in the cookie: 32 bytes in unpadded base64url.
const MAC_TEXT_BYTES: usize = 43;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// `anon:<id>` for anonymous users, the header's or cookie's id otherwise.
    pub user_id: String,
    /// The id is kvgate's anonymous id (issued now or earlier).
    pub anonymous: bool,
    /// The id was issued by this request: no state can exist for it yet.
    /// `Some` holds the signed cookie value to send back.
    pub fresh: Option<String>,
}

/// A user id is 1 to 128 visible ASCII characters. Anything else (empty,
/// oversized, spaces, control or non-ASCII bytes) is treated as absent; it
/// would otherwise end up in KV keys and logs.
pub(crate) fn is_valid_user_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_USER_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `id` lies in the anonymous namespace (compared case-insensitively,
/// so `ANON:x` cannot be passed off as a different-looking twin either).
pub(crate) fn is_anonymous_id(id: &str) -> bool {
    id.len() >= ANONYMOUS_PREFIX.len()
        && id.as_bytes()[..ANONYMOUS_PREFIX.len()].eq_ignore_ascii_case(ANONYMOUS_PREFIX.as_bytes())
}

/// An id an authenticated source (trusted header or cookie) may name.
fn is_valid_authenticated_id(id: &str) -> bool {
    is_valid_user_id(id) && !is_anonymous_id(id)
}

/// Signs and verifies anonymous ids with one secret.
#[derive(Clone)]
pub(crate) struct Signer {
    /// Keyed once; cloned per use (cheaper than re-keying).
    mac: Hmac<Sha256>,
}

impl Signer {
    pub(crate) fn new(secret: &[u8]) -> Signer {
        // HMAC accepts keys of any length; the error case cannot happen.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        Signer { mac }
    }

    fn mac_of(&self, id: &str) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(MAC_LABEL);
        mac.update(id.as_bytes());
        mac
    }

    /// The cookie value for `id`: `<id>.<base64url mac>` (one allocation).
    pub(crate) fn sign(&self, id: &str) -> String {
        let tag = self.mac_of(id).finalize().into_bytes();
        let mut value = String::with_capacity(id.len() + 1 + MAC_TEXT_BYTES);
        value.push_str(id);
        value.push('.');
        URL_SAFE_NO_PAD.encode_string(tag, &mut value);
        value
    }

    /// The id inside a signed cookie value, if its mac is right (compared in
    /// constant time). Anything else is `None`: wrong shape, an id kvgate
    /// could not have issued, base64 that is not canonical, a wrong mac.
    pub(crate) fn verify<'v>(&self, value: &'v str) -> Option<&'v str> {
        let (id, tag) = value.rsplit_once('.')?;
        let id_ok = !id.is_empty()
            && id.len() <= MAX_ANONYMOUS_ID_BYTES
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !id_ok || tag.len() != MAC_TEXT_BYTES {
            return None;
        }
        // Decoded on the stack; 43 characters decode to exactly 32 bytes
        // (the buffer leaves the decoder's estimate room).
        let mut decoded = [0u8; MAC_TEXT_BYTES];
        let n = URL_SAFE_NO_PAD.decode_slice(tag, &mut decoded).ok()?;
        self.mac_of(id).verify_slice(decoded.get(..n)?).ok()?;
        Some(id)
    }
}

pub(crate) use crate::protocol::cidr::Cidr;

/// Every value of cookie `name` across every `Cookie` header (HTTP/2
/// clients may split cookies over several), unquoted, in order.
pub(crate) fn cookie_values<'h>(
    headers: &'h HeaderMap,
    name: &'h str,
) -> impl Iterator<Item = &'h str> + 'h {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            if k.trim() != name {
                return None;
            }
            let v = v.trim();
            // RFC 6265 allows a value wrapped in double quotes.
            Some(
                v.strip_prefix('"')
                    .and_then(|inner| inner.strip_suffix('"'))
                    .unwrap_or(v),
            )
        })
}

/// Where the request came from and what to trust of it.
pub(crate) struct Sources<'a> {
    pub header: &'a HeaderName,
    pub cookie: Option<&'a str>,
    /// The peer is in `identity.trusted_from`: the header and configured
    /// cookie are believed.
    pub trusted: bool,
}

/// The authenticated user the request names, if it comes from a trusted
/// peer and names a valid id outside the anonymous namespace.
pub(crate) fn authenticated(headers: &HeaderMap, sources: &Sources<'_>) -> Option<Identity> {
    if !sources.trusted {
        return None;
    }
    let from_header = headers
        .get(sources.header)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|id| is_valid_authenticated_id(id));
    let id = from_header.or_else(|| {
        sources
            .cookie
            .and_then(|name| cookie_values(headers, name).find(|v| is_valid_authenticated_id(v)))
    })?;
    Some(Identity {
        user_id: id.to_owned(),
        anonymous: false,
        fresh: None,
    })
}

/// The anonymous user of a validly signed `kvgate_uid` cookie, else a new
/// one: no cookie, or only forged or tampered ones, get a fresh id.
pub(crate) fn anonymous(headers: &HeaderMap, signer: &Signer) -> Identity {
    if let Some(id) = cookie_values(headers, ANONYMOUS_COOKIE).find_map(|v| signer.verify(v)) {
        let mut user_id = String::with_capacity(ANONYMOUS_PREFIX.len() + id.len());
        user_id.push_str(ANONYMOUS_PREFIX);
        user_id.push_str(id);
        return Identity {
            user_id,
            anonymous: true,
            fresh: None,
        };
    }
    let mut user_id = String::with_capacity(ANONYMOUS_PREFIX.len() + UUID_TEXT_BYTES);
    user_id.push_str(ANONYMOUS_PREFIX);
    user_id.push_str(new_anonymous_id(&mut [0; UUID_TEXT_BYTES]));
    let fresh = signer.sign(&user_id[ANONYMOUS_PREFIX.len()..]);
    Identity {
        user_id,
        anonymous: true,
        fresh: Some(fresh),
    }
}

/// A fresh anonymous id, written into `buf`: a UUID v4 whose 122 random
/// bits come from a per-thread ChaCha12 generator seeded once per thread
/// from the OS, rather than a `getrandom` system call per new visitor.
/// ChaCha12 is a cryptographic generator: without the seed the ids are as
/// unguessable as the OS's randomness.
fn new_anonymous_id(buf: &mut [u8; UUID_TEXT_BYTES]) -> &str {
    use rand::rngs::StdRng;
    use rand::{Rng as _, SeedableRng as _};
    use std::cell::RefCell;
    thread_local! {
        static RNG: RefCell<Option<StdRng>> = RefCell::new({
            let mut seed = [0u8; 32];
            getrandom::getrandom(&mut seed).ok().map(|()| StdRng::from_seed(seed))
        });
    }
    let mut bytes = [0u8; 16];
    let drawn = RNG.with(|rng| match rng.try_borrow_mut().as_deref_mut() {
        Ok(Some(rng)) => {
            rng.fill_bytes(&mut bytes);
            true
        }
        _ => false,
    });
    let uuid = if drawn {
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    } else {
        // The OS gave no seed for this thread: ask it per id.
        uuid::Uuid::new_v4()
    };
    uuid.simple().encode_lower(buf)
}

/// [`authenticated`], else [`anonymous`].
#[cfg(test)]
pub(crate) fn resolve(headers: &HeaderMap, sources: &Sources<'_>, signer: &Signer) -> Identity {
    authenticated(headers, sources).unwrap_or_else(|| anonymous(headers, signer))
}

/// `Set-Cookie` for a newly issued anonymous id (`value` is already
/// signed), built in one allocation the header value takes over.
pub(crate) fn anonymous_cookie(value: &str, secure: bool) -> Option<HeaderValue> {
    const ATTRIBUTES: &str = ANONYMOUS_COOKIE_ATTRIBUTES;
    const SECURE: &str = "; Secure";
    let mut cookie = String::with_capacity(
        ANONYMOUS_COOKIE.len() + 1 + value.len() + ATTRIBUTES.len() + SECURE.len(),
    );
    cookie.push_str(ANONYMOUS_COOKIE);
    cookie.push('=');
    cookie.push_str(value);
    cookie.push_str(ATTRIBUTES);
    if secure {
        cookie.push_str(SECURE);
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(cookie)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

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

    fn signer() -> Signer {
        Signer::new(SECRET)
    }

    fn resolve_with(h: &HeaderMap, cookie: Option<&str>, trusted: bool) -> Identity {
        let header = user_header();
        let sources = Sources {
            header: &header,
            cookie,
            trusted,
        };
        resolve(h, &sources, &signer())
    }

    #[test]
    fn header_wins_over_cookies_from_a_trusted_peer() {
        let anon = signer().sign("anon-1");
        let h = headers(&[
            ("x-user-id", "alice"),
            ("cookie", &format!("sid=bob; kvgate_uid={anon}")),
        ]);
        let id = resolve_with(&h, Some("sid"), true);
        assert_eq!(
            id,
            Identity {
                user_id: "alice".into(),
                anonymous: false,
                fresh: None
            }
        );
    }

    #[test]
    fn header_and_configured_cookie_are_ignored_from_an_untrusted_peer() {
        let anon = signer().sign("anon-1");
        let h = headers(&[
            ("x-user-id", "alice"),
            ("cookie", &format!("sid=bob; kvgate_uid={anon}")),
        ]);
        let id = resolve_with(&h, Some("sid"), false);
        assert_eq!((id.user_id.as_str(), id.anonymous), ("anon:anon-1", true));
        let id = resolve_with(&headers(&[("x-user-id", "alice")]), None, false);
        assert!(id.anonymous && id.fresh.is_some());
        assert!(id.user_id.starts_with(ANONYMOUS_PREFIX));
    }

    #[test]
    fn configured_cookie_then_anonymous_cookie() {
        let anon = signer().sign("anon-1");
        let h = headers(&[
            ("cookie", "a=1; sid=\"bob\""),
            ("cookie", &format!("kvgate_uid={anon}")),
        ]);
        let id = resolve_with(&h, Some("sid"), true);
        assert_eq!((id.user_id.as_str(), id.anonymous), ("bob", false));
        let id = resolve_with(&h, None, true);
        assert_eq!(
            (id.user_id.as_str(), id.anonymous, id.fresh),
            ("anon:anon-1", true, None)
        );
    }

    #[test]
    fn authenticated_ids_cannot_enter_the_anonymous_namespace() {
        let anon = signer().sign("anon-1");
        for claimed in ["anon:anon-1", "ANON:anon-1", "Anon:x"] {
            let h = headers(&[
                ("x-user-id", claimed),
                ("cookie", &format!("sid={claimed}")),
            ]);
            let id = resolve_with(&h, Some("sid"), true);
            assert!(id.fresh.is_some(), "{claimed} was accepted: {id:?}");
            let h = headers(&[
                ("x-user-id", claimed),
                ("cookie", &format!("kvgate_uid={anon}")),
            ]);
            assert_eq!(resolve_with(&h, None, true).user_id, "anon:anon-1");
        }
    }

    #[test]
    fn unsigned_forged_and_tampered_cookies_get_a_fresh_id() {
        let good = signer().sign("anon-1");
        let other_secret = Signer::new(b"another secret, also 32 bytes ok").sign("anon-1");
        let mut flipped = good.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        let (_, tag) = good.rsplit_once('.').unwrap();
        let moved = format!("anon-2.{tag}");
        for forged in [
            "alice",
            "anon-1",
            other_secret.as_str(),
            flipped.as_str(),
            moved.as_str(),
            "",
            ".",
        ] {
            let h = headers(&[("cookie", &format!("kvgate_uid={forged}"))]);
            let id = resolve_with(&h, None, true);
            assert!(id.fresh.is_some(), "{forged:?} was accepted as {id:?}");
            assert_ne!(id.user_id, "alice");
            assert_ne!(id.user_id, "anon:anon-1");
        }
        // A forged cookie next to a valid one does not hide the valid one.
        let h = headers(&[("cookie", &format!("kvgate_uid=alice; kvgate_uid={good}"))]);
        assert_eq!(resolve_with(&h, None, false).user_id, "anon:anon-1");
    }

    #[test]
    fn invalid_ids_are_treated_as_absent() {
        let anon = signer().sign("anon-2");
        let long = "x".repeat(MAX_USER_ID_BYTES + 1);
        let bad_header_values: [&[u8]; 4] = [b"", b"has space", long.as_bytes(), b"caf\xc3\xa9"];
        for bad in bad_header_values {
            let mut h = HeaderMap::new();
            h.insert(user_header(), HeaderValue::from_bytes(bad).unwrap());
            h.insert(
                COOKIE,
                HeaderValue::from_str(&format!("kvgate_uid={anon}")).unwrap(),
            );
            let id = resolve_with(&h, None, true);
            assert_eq!(id.user_id, "anon:anon-2", "{bad:?} was accepted");
        }
        assert!(is_valid_user_id(&"x".repeat(MAX_USER_ID_BYTES)));
    }

    #[test]
    fn fresh_ids_are_uuid_v4_and_distinct_across_threads() {
        let ids: Vec<String> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..500)
                        .map(|_| new_anonymous_id(&mut [0; UUID_TEXT_BYTES]).to_owned())
                        .collect::<Vec<_>>()
                })
            })
            .flat_map(|h| h.join().unwrap())
            .collect();
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        for id in &ids {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 4, "{id}");
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
    }

    #[test]
    fn issues_a_signed_uuid_and_a_cookie_when_nothing_identifies_the_user() {
        let id = resolve_with(&HeaderMap::new(), Some("sid"), true);
        let value = id.fresh.clone().unwrap();
        let raw = signer().verify(&value).unwrap();
        assert!(uuid::Uuid::parse_str(raw).is_ok());
        assert_eq!(id.user_id, format!("anon:{raw}"));
        let other = resolve_with(&HeaderMap::new(), None, true);
        assert_ne!(id.user_id, other.user_id);

        let plain = anonymous_cookie(&value, false).unwrap();
        assert_eq!(
            plain.to_str().unwrap(),
            format!("kvgate_uid={value}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax")
        );
        let secure = anonymous_cookie(&value, true).unwrap();
        assert!(secure.to_str().unwrap().ends_with("; SameSite=Lax; Secure"));
    }

    proptest! {
        /// Whatever a client puts in Cookie headers, resolving never panics,
        /// never yields an invalid id, and never reaches an authenticated id
        /// from an untrusted peer.
        #[test]
        fn arbitrary_cookie_headers_never_panic(
            lines in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..4),
            trusted in any::<bool>(),
        ) {
            let mut h = HeaderMap::new();
            for line in &lines {
                if let Ok(v) = HeaderValue::from_bytes(line) {
                    h.append(COOKIE, v);
                }
            }
            let id = resolve_with(&h, Some("sid"), trusted);
            prop_assert!(is_valid_user_id(&id.user_id));
            if !trusted {
                prop_assert!(id.anonymous);
            }
            prop_assert_eq!(id.anonymous, is_anonymous_id(&id.user_id));
            let _ = cookie_values(&h, ANONYMOUS_COOKIE).count();
        }

        /// Cookie-ish strings built from the separators the parser splits on.
        #[test]
        fn structured_cookie_headers_never_panic(line in "[a-z_=; \"\\.A-Za-z0-9-]{0,120}") {
            if let Ok(v) = HeaderValue::from_str(&line) {
                let mut h = HeaderMap::new();
                h.insert(COOKIE, v);
                let id = resolve_with(&h, None, false);
                prop_assert!(id.anonymous);
            }
        }

        /// Changing, inserting or deleting any byte of a signed value makes
        /// it fail verification.
        #[test]
        fn any_tamper_of_a_signed_value_is_rejected(
            id in "[A-Za-z0-9_-]{1,64}",
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            kind in 0u8..3,
        ) {
            let s = signer();
            let signed = s.sign(&id);
            prop_assert_eq!(s.verify(&signed), Some(id.as_str()));
            let mut bytes = signed.clone().into_bytes();
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ => { bytes.remove(i); }
            }
            if let Ok(tampered) = String::from_utf8(bytes) {
                if tampered != signed {
                    prop_assert_eq!(s.verify(&tampered), None, "{} accepted", tampered);
                }
            }
        }
    }
}
