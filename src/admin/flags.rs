//! Admin routes for live flags, segments and experiments: list, read,
//! create or replace (PUT), merge-patch (PATCH), delete; experiment
//! results; anonymous-id aliases; the audit log. The work is in
//! `edge::changes`; this only maps HTTP onto it.

use bytes::Bytes;
use http::Method;
use serde_json::Value;

use super::auth::ADMIN_TOKEN_NAME;
use super::reply::{self, AdminResponse, ApiError};
use super::request::{parse_json, query_pairs};
use crate::edge::{Change, DefKind, Edge};

/// `GET /flags`, `/segments`, `/experiments`.
pub(super) async fn list(edge: &Edge, kind: DefKind) -> AdminResponse {
    reply::ok(&edge.list_definitions(kind).await)
}

/// `GET/PUT/PATCH/DELETE /{kind}s/{name}`.
pub(super) async fn one(
    edge: &Edge,
    kind: DefKind,
    name: &str,
    method: &Method,
    body: &Bytes,
) -> Result<AdminResponse, ApiError> {
    let change = match *method {
        Method::GET => return Ok(reply::ok(&edge.get_definition(kind, name).await?)),
        Method::PUT => Change::Put(parse_json::<Value>(body)?),
        Method::PATCH => Change::Patch(parse_json::<Value>(body)?),
        _ => Change::Delete,
    };
    // One admin token today; its name is what the audit log records.
    let done = edge
        .change_definition(kind, name, change, ADMIN_TOKEN_NAME)
        .await?;
    Ok(reply::ok(&done))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AliasRequest {
    user_id: String,
}

/// `PUT /users/{anonymous id}/alias` with `{"user_id": "..."}`.
pub(super) async fn alias(
    edge: &Edge,
    anonymous: &str,
    body: &Bytes,
) -> Result<AdminResponse, ApiError> {
    let req: AliasRequest = parse_json(body)?;
    Ok(reply::ok(&edge.alias(anonymous, &req.user_id).await?))
}

/// `GET /audit?cursor=&limit=`.
pub(super) async fn audit(edge: &Edge, query: Option<&str>) -> Result<AdminResponse, ApiError> {
    let (mut cursor, mut limit) = (None, 100);
    for (k, v) in query_pairs(query)? {
        match k.as_str() {
            "cursor" if !v.is_empty() => cursor = Some(v),
            "cursor" => {}
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::bad_request("limit must be 1 to 1000"))?
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {other:?}; use cursor, limit"
                )))
            }
        }
    }
    Ok(reply::ok(&edge.audit(cursor.as_deref(), limit).await?))
}
