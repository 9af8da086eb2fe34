//! The admin API's routes: which path and method go to which handler, and
//! the handlers themselves (thin: the work is in the store, the gateway and
//! the edge's admin operations).

use super::flags;
use super::prometheus;
use super::purge::{decode_cursor, encode_cursor, PurgeRequest};
use super::reply::{self, AdminResponse, ApiError};
use super::request::{parse_json, parse_optional_json, query_pairs};
use super::AdminState;
use crate::cluster::{Event, Published};
use crate::edge::{DefKind, Edge};
use crate::proxy::gateway::Gateway;
use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::SystemTime;

/// Default and largest page of `GET /entries`.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// A matched admin route, path parameters decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Metrics,
    Stats,
    Purge,
    Version,
    Entries,
    Counters,
    User(String),
    UserPreferences(String),
    FlagOverride {
        flag: String,
        user: String,
    },
    Experiment(String),
    ExperimentUser {
        experiment: String,
        user: String,
    },
    /// `GET /flags`, `/segments`, `/experiments`.
    Definitions(DefKind),
    /// `/flags/{name}`, `/segments/{name}` (experiments: [`Route::Experiment`]).
    Definition(DefKind, String),
    ExperimentResults(String),
    UserAlias(String),
    Audit,
}

const GET: &[Method] = &[Method::GET];
const POST: &[Method] = &[Method::POST];
const GET_PATCH: &[Method] = &[Method::GET, Method::PATCH];
const PUT_DELETE: &[Method] = &[Method::PUT, Method::DELETE];
const DELETE: &[Method] = &[Method::DELETE];
const PUT: &[Method] = &[Method::PUT];
const DEFINITION: &[Method] = &[Method::GET, Method::PUT, Method::PATCH, Method::DELETE];

impl Route {
    /// The route for decoded path segments; `None` is a 404.
    pub(crate) fn parse(segments: &[String]) -> Option<Route> {
        let s: Vec<&str> = segments.iter().map(String::as_str).collect();
        let id = |x: &str| (!x.is_empty()).then(|| x.to_string());
        Some(match s.as_slice() {
            ["metrics"] => Route::Metrics,
            ["stats"] => Route::Stats,
            ["purge"] => Route::Purge,
            ["version"] => Route::Version,
            ["entries"] => Route::Entries,
            ["counters"] => Route::Counters,
            ["users", u] => Route::User(id(u)?),
            ["users", u, "preferences"] => Route::UserPreferences(id(u)?),
            ["flags", f, "users", u] => Route::FlagOverride {
                flag: id(f)?,
                user: id(u)?,
            },
            ["flags"] => Route::Definitions(DefKind::Flag),
            ["segments"] => Route::Definitions(DefKind::Segment),
            ["experiments"] => Route::Definitions(DefKind::Experiment),
            ["flags", f] => Route::Definition(DefKind::Flag, id(f)?),
            ["segments", s] => Route::Definition(DefKind::Segment, id(s)?),
            ["experiments", e] => Route::Experiment(id(e)?),
            ["experiments", e, "results"] => Route::ExperimentResults(id(e)?),
            ["users", u, "alias"] => Route::UserAlias(id(u)?),
            ["audit"] => Route::Audit,
            ["experiments", e, "users", u] => Route::ExperimentUser {
                experiment: id(e)?,
                user: id(u)?,
            },
            _ => return None,
        })
    }

    /// The methods the route takes (anything else is a 405).
    pub(crate) fn methods(&self) -> &'static [Method] {
        match self {
            Route::Purge | Route::Version => POST,
            Route::UserPreferences(_) => GET_PATCH,
            Route::FlagOverride { .. } => PUT_DELETE,
            Route::ExperimentUser { .. } => DELETE,
            Route::Definition(..) | Route::Experiment(_) => DEFINITION,
            Route::UserAlias(_) => PUT,
            _ => GET,
        }
    }

    /// Whether the handler reads a request body.
    pub(crate) fn takes_body(&self, method: &Method) -> bool {
        matches!(*method, Method::POST | Method::PUT | Method::PATCH)
    }
}

/// Runs an authenticated, routed request.
pub(crate) async fn handle(
    state: &AdminState,
    route: Route,
    method: &Method,
    headers: &http::HeaderMap,
    query: Option<&str>,
    body: Bytes,
) -> Result<AdminResponse, ApiError> {
    let gw = &state.gateway;
    match route {
        Route::Metrics => {
            let format = prometheus::Format::negotiate(headers);
            Ok(reply::text(
                format.content_type(),
                prometheus::render(gw, format),
            ))
        }
        Route::Stats => Ok(reply::ok(&super::stats::snapshot(gw))),
        Route::Purge => {
            let req: PurgeRequest = parse_json(&body)?;
            req.validate().map_err(ApiError::bad_request)?;
            let purged = req.apply(&gw.store);
            gw.metrics.purges.fetch_add(1, Ordering::Relaxed);
            gw.metrics
                .purged_entries
                .fetch_add(purged as u64, Ordering::Relaxed);
            tracing::info!(
                target: "kvgate::admin",
                urls = req.urls.len(),
                prefixes = req.prefixes.len(),
                tags = req.tags.len(),
                soft = req.soft,
                purged,
                "purge"
            );
            let broadcast = broadcast(gw, &Event::Purge(req.into_targets())).await;
            Ok(reply::ok(&with_broadcast(
                json!({ "purged": purged }),
                broadcast,
            )))
        }
        Route::Version => bump_version(state, &body).await,
        Route::Entries => entries(state, query),
        Route::Counters => {
            let local = edge(state)?.counters().await?;
            // With Redis, the sums over every instance; the local ones when
            // Redis cannot answer (the fault is logged by its region).
            let shown = match &gw.shared_counters {
                Some(shared) => shared.cluster_view(&local).await.unwrap_or(local),
                None => local,
            };
            Ok(reply::ok(&shown))
        }
        Route::User(user) => Ok(reply::ok(&edge(state)?.user_view(&user).await?)),
        Route::UserPreferences(user) => {
            let edge = edge(state)?;
            let v = if *method == Method::PATCH {
                edge.patch_preferences(&user, parse_json::<Value>(&body)?)
                    .await?
            } else {
                edge.get_preferences(&user).await?
            };
            Ok(reply::ok(&v))
        }
        Route::FlagOverride { flag, user } => {
            let edge = edge(state)?;
            let v = if *method == Method::PUT {
                edge.set_flag_override(&flag, &user, parse_json::<Value>(&body)?)
                    .await?
            } else {
                edge.delete_flag_override(&flag, &user).await?
            };
            Ok(reply::ok(&v))
        }
        Route::Experiment(name) if *method == Method::GET => {
            Ok(reply::ok(&edge(state)?.experiment_view(&name).await?))
        }
        Route::Experiment(name) => {
            flags::one(edge(state)?, DefKind::Experiment, &name, method, &body).await
        }
        Route::Definitions(kind) => Ok(flags::list(edge(state)?, kind).await),
        Route::Definition(kind, name) => flags::one(edge(state)?, kind, &name, method, &body).await,
        Route::ExperimentResults(name) => Ok(reply::ok(&edge(state)?.results(&name).await?)),
        Route::UserAlias(anonymous) => flags::alias(edge(state)?, &anonymous, &body).await,
        Route::Audit => flags::audit(edge(state)?, query).await,
        Route::ExperimentUser { experiment, user } => Ok(reply::ok(
            &edge(state)?.reset_assignment(&experiment, &user).await?,
        )),
    }
}

fn edge(state: &AdminState) -> Result<&Edge, ApiError> {
    state
        .gateway
        .edge
        .as_ref()
        .ok_or_else(|| ApiError::not_found("edge is not configured"))
}

/// Ready while the gateway's listener accepts connections. The origin is
/// deliberately not probed: a gateway with a down origin still serves
/// cached and stale content, and probes must not add load to the origin.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionRequest {
    route: Option<String>,
}

/// Sends an event already applied here to the other instances (with
/// Redis); the reply shows which regions took it.
async fn broadcast(gw: &Gateway, event: &Event) -> Option<Published> {
    match &gw.cluster {
        Some(cluster) => Some(cluster.publish(event).await),
        None => None,
    }
}

/// `reply` with `"broadcast"` added when there was one (with Redis only:
/// without it the reply stays what it always was).
fn with_broadcast(mut reply: Value, broadcast: Option<Published>) -> Value {
    if let (Some(b), Some(map)) = (broadcast, reply.as_object_mut()) {
        map.insert("broadcast".into(), json!(b));
    }
    reply
}

async fn bump_version(state: &AdminState, body: &[u8]) -> Result<AdminResponse, ApiError> {
    let gw = &state.gateway;
    let req: Option<VersionRequest> = parse_optional_json(body)?;
    match req.and_then(|r| r.route) {
        None => {
            let version = gw.bump_version();
            tracing::info!(target: "kvgate::admin", version, "cache version bumped");
            let broadcast = broadcast(gw, &Event::Version { version }).await;
            Ok(reply::ok(&with_broadcast(
                json!({ "version": version }),
                broadcast,
            )))
        }
        Some(route) => {
            let version = gw
                .bump_route_version(&route)
                .ok_or_else(|| ApiError::not_found(format!("no route named {route:?}")))?;
            tracing::info!(target: "kvgate::admin", %route, version, "route cache version bumped");
            let event = Event::RouteVersion {
                route: route.clone(),
            };
            let broadcast = broadcast(gw, &event).await;
            Ok(reply::ok(&with_broadcast(
                json!({ "version": version, "route": route }),
                broadcast,
            )))
        }
    }
}

fn entries(state: &AdminState, query: Option<&str>) -> Result<AdminResponse, ApiError> {
    let gw = &state.gateway;
    let (mut prefix, mut tag, mut cursor, mut limit) = (None, None, None, DEFAULT_LIMIT);
    for (k, v) in query_pairs(query)? {
        match k.as_str() {
            "prefix" if !v.is_empty() => prefix = Some(v),
            "tag" if !v.is_empty() => tag = Some(v),
            "cursor" if !v.is_empty() => {
                cursor =
                    Some(decode_cursor(&v).ok_or_else(|| ApiError::bad_request("invalid cursor"))?)
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("limit must be 1 to {MAX_LIMIT}"))
                    })?
                    .min(MAX_LIMIT)
            }
            "prefix" | "tag" | "cursor" => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {other:?}; use prefix, tag, cursor, limit"
                )))
            }
        }
    }
    let (page, next) = gw.store.list(
        prefix.as_deref(),
        tag.as_deref(),
        cursor.as_deref(),
        limit,
        SystemTime::now(),
    );
    let entries: Vec<Value> = page
        .into_iter()
        .map(|info| {
            // Whether requests still reach it (older versions only age out).
            let current = info.version == gw.key_version(gw.config.route_for(&info.path));
            let mut v = serde_json::to_value(&info).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("current".into(), current.into());
            }
            v
        })
        .collect();
    Ok(reply::ok(&json!({
        "entries": entries,
        "next_cursor": next.as_deref().map(encode_cursor),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn routes_match_and_know_their_methods() {
        assert_eq!(Route::parse(&segs(&["purge"])), Some(Route::Purge));
        assert_eq!(
            Route::parse(&segs(&["flags", "newUI", "users", "a/b"])),
            Some(Route::FlagOverride {
                flag: "newUI".into(),
                user: "a/b".into()
            })
        );
        assert_eq!(Route::parse(&segs(&["users", ""])), None);
        assert_eq!(Route::parse(&segs(&["purge", ""])), None);
        assert_eq!(Route::parse(&segs(&["nope"])), None);
        assert_eq!(Route::Purge.methods(), POST);
        assert_eq!(Route::UserPreferences("u".into()).methods(), GET_PATCH);
    }
}
