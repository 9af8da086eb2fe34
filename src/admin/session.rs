//! Dashboard sessions: the browser's alternative to the bearer token.
//!
//! Signing in trades the admin token, once, for a random session id in an
//! `HttpOnly; SameSite=Strict` cookie and a CSRF token the page keeps in
//! memory. A request with the cookie is let in like one with the token,
//! except that a state-changing method must also carry the CSRF token in
//! `X-CSRF-Token`: SameSite already keeps other sites' requests from
//! carrying the cookie, the header keeps a forgotten case (an old browser, a
//! same-site sibling) from doing so unseen.
//!
//! Both secrets are kept as SHA-256 digests and compared in constant time.
//! At most [`MAX_SESSIONS`] live at once; expired ones are dropped whenever
//! one is created, and when the table is full the one closest to expiry
//! makes room.

use super::auth::{constant_time_eq, digest};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::{HeaderMap, COOKIE};
use http::Method;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The cookie's name.
pub(crate) const COOKIE_NAME: &str = "kvgate_session";
/// The header a state-changing request carries the CSRF token in.
pub(crate) const CSRF_HEADER: &str = "x-csrf-token";
/// Sessions held at once: a few operators, a few browsers each.
pub(crate) const MAX_SESSIONS: usize = 64;
/// How long a session lasts from sign-in (a working day).
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// Random bytes in a session id and a CSRF token.
const SECRET_BYTES: usize = 32;
/// Longest cookie or header value looked at (a base64url secret is 43).
const MAX_PRESENTED: usize = 128;

type Digest32 = [u8; 32];

struct Session {
    csrf: Digest32,
    expires: Instant,
}

/// A freshly created session: what the sign-in answer hands out.
#[derive(Debug)]
pub(crate) struct NewSession {
    /// The cookie value.
    pub id: String,
    /// The CSRF token for `X-CSRF-Token`.
    pub csrf: String,
    /// Unix seconds when it stops working.
    pub expires_at: u64,
}

/// Why a cookie-carrying request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionRefusal {
    /// No session cookie at all: the caller falls back to bearer auth.
    NoCookie,
    /// A cookie naming no live session (unknown, expired, signed out).
    Expired,
    /// A state-changing request without a matching CSRF token.
    Csrf,
}

impl SessionRefusal {
    pub(crate) fn message(self) -> &'static str {
        match self {
            SessionRefusal::NoCookie => {
                "missing credentials: sign in or send Authorization: Bearer <token>"
            }
            SessionRefusal::Expired => "your session has expired or was signed out: sign in again",
            SessionRefusal::Csrf => {
                "missing or wrong X-CSRF-Token header for a state-changing request"
            }
        }
    }
}

/// Why no session could be created.
#[derive(Debug, thiserror::Error)]
#[error("the system's random source failed: {0}")]
pub(crate) struct RandomError(getrandom::Error);

/// The live sessions, by digest of their id.
#[derive(Default)]
pub(crate) struct Sessions {
    table: Mutex<HashMap<Digest32, Session>>,
}

fn random_secret() -> Result<String, RandomError> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::getrandom(&mut bytes).map_err(RandomError)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The value of the cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty() && v.len() <= MAX_PRESENTED)
}

impl Sessions {
    /// Creates a session; drops expired ones first, and the one closest to
    /// expiry when the table is still full.
    pub(crate) fn create(&self) -> Result<NewSession, RandomError> {
        let id = random_secret()?;
        let csrf = random_secret()?;
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.retain(|_, s| s.expires > now);
        while table.len() >= MAX_SESSIONS {
            let Some(oldest) = table.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k) else {
                break;
            };
            table.remove(&oldest);
        }
        table.insert(
            digest(id.as_bytes()),
            Session {
                csrf: digest(csrf.as_bytes()),
                expires: now + SESSION_TTL,
            },
        );
        Ok(NewSession {
            id,
            csrf,
            expires_at: unix_seconds(SystemTime::now() + SESSION_TTL),
        })
    }

    /// Lets a request in by its session cookie; a state-changing method
    /// must also carry the session's CSRF token.
    pub(crate) fn check(&self, headers: &HeaderMap, method: &Method) -> Result<(), SessionRefusal> {
        let id = cookie(headers, COOKIE_NAME).ok_or(SessionRefusal::NoCookie)?;
        let id = digest(id.as_bytes());
        let now = Instant::now();
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        // A HashMap lookup by digest: the attacker does not choose the
        // digest, so its timing says nothing about a live id.
        let session = table
            .get(&id)
            .filter(|s| s.expires > now)
            .ok_or(SessionRefusal::Expired)?;
        if is_safe(method) {
            return Ok(());
        }
        let presented = headers
            .get(CSRF_HEADER)
            .filter(|v| v.len() <= MAX_PRESENTED)
            .ok_or(SessionRefusal::Csrf)?;
        if constant_time_eq(&session.csrf, &digest(presented.as_bytes())) {
            Ok(())
        } else {
            Err(SessionRefusal::Csrf)
        }
    }

    /// Ends the session the request's cookie names; whether one was live.
    pub(crate) fn remove(&self, headers: &HeaderMap) -> bool {
        let Some(id) = cookie(headers, COOKIE_NAME) else {
            return false;
        };
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.remove(&digest(id.as_bytes())).is_some()
    }

    /// Sessions held now, expired or not (for tests of the bound).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Methods that change nothing and so need no CSRF token.
fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The `Set-Cookie` value for a new session.
pub(crate) fn set_cookie(id: &str) -> String {
    format!(
        "{COOKIE_NAME}={id}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict",
        SESSION_TTL.as_secs()
    )
}

/// The `Set-Cookie` value that removes the cookie.
pub(crate) fn clear_cookie() -> String {
    format!("{COOKIE_NAME}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(cookie: Option<&str>, csrf: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(c) = cookie {
            h.insert(COOKIE, HeaderValue::from_str(c).unwrap());
        }
        if let Some(t) = csrf {
            h.insert(CSRF_HEADER, HeaderValue::from_str(t).unwrap());
        }
        h
    }

    #[test]
    fn cookie_and_csrf_are_checked() {
        let sessions = Sessions::default();
        let s = sessions.create().unwrap();
        let c = format!("other=1; {COOKIE_NAME}={}", s.id);
        assert_eq!(
            sessions.check(&headers(Some(&c), None), &Method::GET),
            Ok(())
        );
        assert_eq!(
            sessions.check(&headers(Some(&c), None), &Method::POST),
            Err(SessionRefusal::Csrf)
        );
        assert_eq!(
            sessions.check(&headers(Some(&c), Some("nope")), &Method::DELETE),
            Err(SessionRefusal::Csrf)
        );
        assert_eq!(
            sessions.check(&headers(Some(&c), Some(&s.csrf)), &Method::POST),
            Ok(())
        );
        assert_eq!(
            sessions.check(&headers(None, Some(&s.csrf)), &Method::GET),
            Err(SessionRefusal::NoCookie)
        );
        let forged = format!("{COOKIE_NAME}={}x", s.id);
        assert_eq!(
            sessions.check(&headers(Some(&forged), None), &Method::GET),
            Err(SessionRefusal::Expired)
        );
        // Another session's CSRF token does not do.
        let t = sessions.create().unwrap();
        assert_eq!(
            sessions.check(&headers(Some(&c), Some(&t.csrf)), &Method::PUT),
            Err(SessionRefusal::Csrf)
        );
        assert!(sessions.remove(&headers(Some(&c), None)));
        assert_eq!(
            sessions.check(&headers(Some(&c), Some(&s.csrf)), &Method::GET),
            Err(SessionRefusal::Expired)
        );
        assert!(!sessions.remove(&headers(Some(&c), None)));
    }

    #[test]
    fn the_table_is_bounded_and_drops_the_oldest() {
        let sessions = Sessions::default();
        let first = sessions.create().unwrap();
        for _ in 0..MAX_SESSIONS * 2 {
            sessions.create().unwrap();
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
        let c = format!("{COOKIE_NAME}={}", first.id);
        assert_eq!(
            sessions.check(&headers(Some(&c), None), &Method::GET),
            Err(SessionRefusal::Expired)
        );
    }

    #[test]
    fn expired_sessions_are_refused_and_dropped() {
        let sessions = Sessions::default();
        let s = sessions.create().unwrap();
        for session in sessions.table.lock().unwrap().values_mut() {
            session.expires = Instant::now() - Duration::from_secs(1);
        }
        let c = format!("{COOKIE_NAME}={}", s.id);
        assert_eq!(
            sessions.check(&headers(Some(&c), None), &Method::GET),
            Err(SessionRefusal::Expired)
        );
        sessions.create().unwrap();
        assert_eq!(sessions.len(), 1, "the expired one went when one was made");
    }

    #[test]
    fn cookies_are_parsed_strictly() {
        let h = headers(Some("a=1;kvgate_session_x=2; kvgate_session=abc"), None);
        assert_eq!(cookie(&h, COOKIE_NAME), Some("abc"));
        let long = format!("{COOKIE_NAME}={}", "a".repeat(MAX_PRESENTED + 1));
        assert_eq!(cookie(&headers(Some(&long), None), COOKIE_NAME), None);
        assert_eq!(
            cookie(&headers(Some("kvgate_session="), None), COOKIE_NAME),
            None
        );
        assert!(set_cookie("x").contains("HttpOnly; SameSite=Strict"));
        assert!(clear_cookie().contains("Max-Age=0"));
    }
}
