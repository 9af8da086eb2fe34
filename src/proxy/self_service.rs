//! Users reading and updating their own preferences on the main listener
//! (`[edge.preferences] self_service_path`): GET returns the effective
//! document, PATCH merges a JSON object into it (like the reference's
//! `updateUserPreferences`). Answered by the gateway itself, never cached.

use super::body::Body;
use super::respond::{self, CacheResult, CacheStatus, Detail, Forward, Labels};
use crate::edge::Edge;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

fn json(status: StatusCode, v: &serde_json::Value, labels: &Labels) -> Response<Body> {
    let mut r = Response::new(Body::full(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // One user's document: never stored by any cache on the way.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    respond::mark(
        h,
        labels,
        &CacheStatus::forward(CacheResult::Bypass, Forward::Bypass).detail(Detail::SelfService),
    );
    r
}

fn error(status: StatusCode, msg: &str, labels: &Labels) -> Response<Body> {
    json(status, &serde_json::json!({ "error": msg }), labels)
}

/// Answers GET / PATCH on the self-service path for `user`.
pub(crate) async fn preferences<B>(
    edge: &Edge,
    method: &Method,
    body: B,
    user: &str,
    max_bytes: usize,
    labels: &Labels,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<super::origin::BoxError>,
{
    let result = match *method {
        Method::GET => edge.get_preferences(user).await,
        Method::PATCH => {
            let bytes = match Limited::new(body, max_bytes).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &format!("the document may not exceed {max_bytes} bytes"),
                        labels,
                    )
                }
            };
            let patch: serde_json::Value = match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("malformed JSON: {e}"),
                        labels,
                    )
                }
            };
            edge.patch_preferences(user, patch).await
        }
        _ => {
            let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "use GET or PATCH", labels);
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, PATCH"));
            return r;
        }
    };
    match result {
        Ok(v) => json(StatusCode::OK, &v, labels),
        Err(e) => json(e.status(), &e.body(), labels),
    }
}
