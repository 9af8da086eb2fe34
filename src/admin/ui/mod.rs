//! The dashboard at `/ui/` on the admin listener: hand-written HTML, CSS and
//! JavaScript embedded in the binary, and the sign-in that trades the admin
//! token for a session cookie ([`super::session`]).
//!
//! The page does nothing itself: it calls the admin API (same origin, with
//! the cookie and the CSRF header), so it can do exactly what the API can.
//! Every `/ui/` response carries a Content-Security-Policy that allows only
//! this origin's script and style (no inline script), and may not be framed.

mod assets;

use super::auth::Refusal;
use super::reply::{self, AdminResponse, ApiError};
use super::request::{parse_json, read_body};
use super::session::{self, SessionRefusal, Sessions};
use super::AdminState;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, LOCATION, SET_COOKIE};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// How long a wrong token waits before its answer.
pub(crate) const FAILED_SIGN_IN_DELAY: Duration = Duration::from_secs(1);
/// Sign-in attempts checked at once. A wrong one holds its slot through the
/// delay, so guessing runs at most this many per delay, and an attacker
/// cannot pile up sleeping connections: past the slots the answer is an
/// immediate 429, with the token not even looked at.
pub(crate) const SIGN_IN_SLOTS: usize = 4;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What the dashboard keeps between requests.
pub(crate) struct UiState {
    pub(crate) sessions: Sessions,
    sign_in_slots: Arc<Semaphore>,
}

impl Default for UiState {
    fn default() -> UiState {
        UiState {
            sessions: Sessions::default(),
            sign_in_slots: Arc::new(Semaphore::new(SIGN_IN_SLOTS)),
        }
    }
}

/// Whether the dashboard answers this path (it needs no bearer token).
pub(crate) fn is_ui_path(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// For an API request without a valid bearer token: let it in by its
/// session cookie (and CSRF token), or refuse it. A wrong bearer token is
/// refused even with a cookie: the client asked to be judged by the token.
pub(crate) fn session_instead_of_bearer(
    state: &AdminState,
    parts: &Parts,
    refusal: Refusal,
) -> Result<(), ApiError> {
    let unauthorized = |message: &str| {
        tracing::debug!(path = parts.uri.path(), message, "admin request refused");
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    };
    if refusal != Refusal::Missing {
        return Err(unauthorized(refusal.message()));
    }
    match state.ui.sessions.check(&parts.headers, &parts.method) {
        Ok(()) => Ok(()),
        Err(SessionRefusal::NoCookie) => Err(unauthorized(refusal.message())),
        Err(SessionRefusal::Csrf) => {
            tracing::debug!(path = parts.uri.path(), "CSRF token missing or wrong");
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                SessionRefusal::Csrf.message(),
            ))
        }
        Err(r) => Err(unauthorized(r.message())),
    }
}

/// Answers a `/ui` request, with the dashboard's security headers.
pub(crate) async fn answer(
    state: &AdminState,
    parts: &Parts,
    body: Incoming,
) -> Result<AdminResponse, ApiError> {
    let r = route(state, parts, body)
        .await
        .unwrap_or_else(ApiError::into_response);
    Ok(with_security_headers(r))
}

async fn route(
    state: &AdminState,
    parts: &Parts,
    body: Incoming,
) -> Result<AdminResponse, ApiError> {
    let path = parts.uri.path();
    if path == "/ui" {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
        r.headers_mut()
            .insert(LOCATION, HeaderValue::from_static("/ui/"));
        return Ok(r);
    }
    if path == "/ui/session" {
        return match parts.method {
            Method::POST => sign_in(state, parts, body).await,
            Method::GET => session_info(state, parts),
            Method::DELETE => sign_out(state, parts),
            _ => Err(ApiError::method_not_allowed(&[
                Method::GET,
                Method::POST,
                Method::DELETE,
            ])),
        };
    }
    let asset = assets::find(path)
        .ok_or_else(|| ApiError::not_found(format!("no dashboard page {path}")))?;
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return Err(ApiError::method_not_allowed(&[Method::GET, Method::HEAD]));
    }
    Ok(asset.response(&parts.headers))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    token: String,
}

/// `POST /ui/session` with `{"token": "..."}`: a session cookie and the
/// CSRF token, or 401 after [`FAILED_SIGN_IN_DELAY`].
async fn sign_in(
    state: &AdminState,
    parts: &Parts,
    body: Incoming,
) -> Result<AdminResponse, ApiError> {
    let Some(token) = state.token.as_ref() else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            Refusal::NoTokenConfigured.message(),
        ));
    };
    // JSON only: a cross-site form cannot send it without a CORS preflight,
    // which this listener never grants.
    let is_json = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the token as JSON: {\"token\": \"...\"}",
        ));
    }
    let body = read_body(&parts.headers, body, state.max_body_bytes).await?;
    let req: SignIn = parse_json(&body)?;
    let Ok(slot) = state.ui.sign_in_slots.clone().try_acquire_owned() else {
        return Err(too_many_attempts());
    };
    if !token.matches(&req.token) {
        tracing::warn!(target: "kvgate::admin", "dashboard sign-in with a wrong token");
        tokio::time::sleep(FAILED_SIGN_IN_DELAY).await;
        drop(slot);
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong admin token: check KVGATE_ADMIN_TOKEN (or [admin] token) and try again",
        ));
    }
    drop(slot);
    let s = state.ui.sessions.create().map_err(|e| {
        tracing::error!(error = %e, "cannot create a dashboard session");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    })?;
    tracing::info!(target: "kvgate::admin", "dashboard sign-in");
    let mut r = reply::ok(&json!({ "csrf": s.csrf, "expires_at": s.expires_at }));
    set_cookie(&mut r, &session::set_cookie(&s.id))?;
    Ok(r)
}

fn too_many_attempts() -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too many sign-in attempts at once: wait a second and try again",
    )
}

fn set_cookie(r: &mut AdminResponse, value: &str) -> Result<(), ApiError> {
    let v = HeaderValue::from_str(value)
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "cannot write the cookie"))?;
    r.headers_mut().insert(SET_COOKIE, v);
    Ok(())
}

/// `GET /ui/session`: whether the cookie names a live session. The page
/// asks on load; the CSRF token is never handed out again (the page keeps
/// it in its tab's sessionStorage), so a new tab signs in anew.
fn session_info(state: &AdminState, parts: &Parts) -> Result<AdminResponse, ApiError> {
    match state.ui.sessions.check(&parts.headers, &Method::GET) {
        Ok(()) => Ok(reply::ok(&json!({ "signed_in": true }))),
        Err(r) => Err(ApiError::new(StatusCode::UNAUTHORIZED, r.message())),
    }
}

/// `DELETE /ui/session`: ends the session (CSRF token required) and clears
/// the cookie.
fn sign_out(state: &AdminState, parts: &Parts) -> Result<AdminResponse, ApiError> {
    match state.ui.sessions.check(&parts.headers, &parts.method) {
        Ok(()) => {}
        Err(SessionRefusal::Csrf) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                SessionRefusal::Csrf.message(),
            ))
        }
        Err(r) => return Err(ApiError::new(StatusCode::UNAUTHORIZED, r.message())),
    }
    let removed = state.ui.sessions.remove(&parts.headers);
    let mut r = reply::ok(&json!({ "signed_out": removed }));
    set_cookie(&mut r, &session::clear_cookie())?;
    Ok(r)
}

fn with_security_headers(mut r: AdminResponse) -> AdminResponse {
    let h = r.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}
