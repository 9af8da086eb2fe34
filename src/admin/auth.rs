//! Bearer-token authentication for the admin API.
//!
//! The token is kept only as its SHA-256 digest, and a presented token is
//! hashed and compared to it in constant time: comparing digests of fixed
//! length leaks neither the matching prefix nor the token's length.

use crate::error::InvalidToken;
use http::header::{HeaderMap, AUTHORIZATION};
use sha2::{Digest, Sha256};

/// The rule for tokens is the config's (it validates `admin.token`).
pub(crate) use crate::config::{is_valid_token, MAX_TOKEN_BYTES};

/// The name the audit log records for the (one) admin token.
pub(crate) const ADMIN_TOKEN_NAME: &str = "admin";

/// The configured token, as its digest.
#[derive(Clone)]
pub(crate) struct Token {
    digest: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The gateway has no token, so nothing but `/healthz` can be allowed.
    NoTokenConfigured,
    Missing,
    Invalid,
}

impl Refusal {
    pub(crate) fn message(self) -> &'static str {
        match self {
            Refusal::NoTokenConfigured => {
                "no admin token is configured: set KVGATE_ADMIN_TOKEN or [admin] token and restart"
            }
            Refusal::Missing => "missing credentials: send Authorization: Bearer <token>",
            Refusal::Invalid => "invalid bearer token",
        }
    }
}

pub(crate) fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Compares without branching on the data, so the time taken does not
/// depend on how many bytes match.
pub(crate) fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

impl Token {
    pub(crate) fn new(token: &str) -> Result<Token, InvalidToken> {
        if !is_valid_token(token) {
            return Err(InvalidToken);
        }
        Ok(Token {
            digest: digest(token.as_bytes()),
        })
    }

    pub(crate) fn matches(&self, presented: &str) -> bool {
        constant_time_eq(&self.digest, &digest(presented.as_bytes()))
    }
}

/// Checks a request's `Authorization: Bearer <token>` against `token`.
pub(crate) fn check(token: Option<&Token>, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(token) = token else {
        return Err(Refusal::NoTokenConfigured);
    };
    let presented = headers
        .get(AUTHORIZATION)
        .filter(|v| v.len() <= MAX_TOKEN_BYTES + 16)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            // The auth scheme is case-insensitive (RFC 9110 11.1).
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .ok_or(Refusal::Missing)?;
    if token.matches(presented) {
        Ok(())
    } else {
        Err(Refusal::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn bearer_token_is_checked() {
        let t = Token::new("s3cret").unwrap();
        assert_eq!(check(Some(&t), &with_auth("Bearer s3cret")), Ok(()));
        assert_eq!(check(Some(&t), &with_auth("bearer  s3cret ")), Ok(()));
        assert_eq!(
            check(Some(&t), &with_auth("Bearer s3cre")),
            Err(Refusal::Invalid)
        );
        assert_eq!(
            check(Some(&t), &with_auth("Bearer s3cretx")),
            Err(Refusal::Invalid)
        );
        assert_eq!(
            check(Some(&t), &with_auth("Basic s3cret")),
            Err(Refusal::Missing)
        );
        assert_eq!(check(Some(&t), &HeaderMap::new()), Err(Refusal::Missing));
        assert_eq!(
            check(None, &with_auth("Bearer s3cret")),
            Err(Refusal::NoTokenConfigured)
        );
    }

    #[test]
    fn tokens_are_validated() {
        assert!(Token::new("").is_err());
        assert!(Token::new("has space").is_err());
        assert!(Token::new(&"x".repeat(MAX_TOKEN_BYTES + 1)).is_err());
        assert!(Token::new("ok-Token_1").is_ok());
        assert!(!format!("{:?}", Token::new("abc").unwrap()).contains("abc"));
    }

    #[test]
    fn constant_time_eq_compares_every_byte() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] ^= 1;
        assert!(!constant_time_eq(&a, &b));
    }
}
