//! Admin API responses: JSON bodies, and errors as `{"error": "..."}`.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

pub(super) type AdminResponse = Response<Full<Bytes>>;

/// A JSON response. Admin answers are never cached by anyone.
pub(super) fn json(status: StatusCode, body: &Value) -> AdminResponse {
    let mut text = body.to_string();
    text.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(super) fn ok(body: &Value) -> AdminResponse {
    json(StatusCode::OK, body)
}

/// A plain-text response (`/metrics`).
pub(super) fn text(content_type: &'static str, body: String) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// For 405: the methods the route takes.
    pub allow: Option<&'static [Method]>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            allow: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    pub(crate) fn method_not_allowed(allow: &'static [Method]) -> ApiError {
        ApiError {
            allow: Some(allow),
            ..ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
    }

    pub(crate) fn into_response(self) -> AdminResponse {
        let mut r = json(self.status, &json!({ "error": self.message }));
        if let Some(methods) = self.allow {
            let list: Vec<&str> = methods.iter().map(Method::as_str).collect();
            if let Ok(v) = HeaderValue::from_str(&list.join(", ")) {
                r.headers_mut().insert(ALLOW, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"kvgate-admin\""),
            );
        }
        r
    }
}

impl From<crate::edge::EdgeAdminError> for ApiError {
    fn from(e: crate::edge::EdgeAdminError) -> ApiError {
        ApiError::new(e.status(), e.to_string())
    }
}
