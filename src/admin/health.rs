//! Probes for load balancers and orchestrators, answered without a token:
//! `/healthz` (the process answers) and `/readyz` (it can serve: not
//! shutting down, the state store answers, the origin accepts connections).

use super::reply::{self, AdminResponse};
use crate::metrics::ops::Ops;
use crate::proxy::gateway::Gateway;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

/// Longest a readiness check waits for the state store or the origin.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A probe's answer.
pub(super) struct Probe {
    status: StatusCode,
    body: Value,
}

impl Probe {
    /// The JSON answer; without a body for HEAD.
    pub(super) fn response(self, head: bool) -> AdminResponse {
        let mut r = reply::json(self.status, &self.body);
        if head {
            *r.body_mut() = Full::new(Bytes::new());
        }
        r
    }
}

/// The process is up and its admin listener answers.
pub(super) fn alive() -> Probe {
    Probe {
        status: StatusCode::OK,
        body: json!({ "status": "ok" }),
    }
}

/// 200 when the gateway can serve, else 503 naming what failed.
pub(super) async fn ready(gw: &Gateway, listen: SocketAddr, stopping: bool) -> Probe {
    if stopping {
        return Probe {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: json!({ "status": "shutting down" }),
        };
    }
    let state = match &gw.state {
        None => "none".to_string(),
        Some(kv) => match tokio::time::timeout(PROBE_TIMEOUT, kv.get("kvgate-readyz")).await {
            Ok(Ok(_)) => "ok".to_string(),
            Ok(Err(e)) => {
                Ops::count(&gw.ops.state_errors);
                format!("error: {e}")
            }
            Err(_) => {
                Ops::count(&gw.ops.state_errors);
                format!("no answer within {PROBE_TIMEOUT:?}")
            }
        },
    };
    let origin = origin_reachable(gw).await;
    // A shared (Redis) store that fails is reported but does not make the
    // instance unready: every instance shares it, so failing readiness
    // would take them all out of rotation, while each still serves from
    // memory, the origin and default flags. A local store that fails does.
    let shared_state = gw.redis.is_some();
    let ready = (state == "ok" || state == "none" || shared_state) && origin == "ok";
    Probe {
        status: if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body: json!({
            "status": if ready { "ready" } else { "not ready" },
            "listen": listen.to_string(),
            "state_store": state,
            "origin": origin,
            "redis": gw.redis.as_ref().map(|r| r.health()),
            // Whether purges made elsewhere reach this instance right now.
            "cluster": gw.cluster.as_ref().map(|c| json!({
                "following": c.following(),
                "cache_drops": c.cache_drops(),
                "regions": c.regions(),
                "state_broadcast_dropped": c.state_dropped(),
            })),
        }),
    }
}

/// "ok" when a TCP connection to the origin opens within its connect
/// timeout (no HTTP request: probes must not load the origin).
async fn origin_reachable(gw: &Gateway) -> String {
    let cfg = &gw.config.origin;
    let Ok(uri) = cfg.url.get_ref().parse::<http::Uri>() else {
        return "the origin URL does not parse".into();
    };
    let Some(host) = uri.host() else {
        return "the origin URL has no host".into();
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let limit = Duration::from_millis(cfg.connect_timeout_ms).min(PROBE_TIMEOUT);
    match tokio::time::timeout(limit, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => "ok".into(),
        Ok(Err(e)) => format!("cannot connect: {e}"),
        Err(_) => format!("no connection within {limit:?}"),
    }
}
