//! Probes for load balancers and orchestrators, answered without a token:
//! alive (the process answers) and ready (it can serve: not shutting down,
//! the state store answers, the origin accepts connections). The admin
//! listener serves them at `/healthz` and `/readyz`; the main listener at
//! `[server] health_path` and `ready_path`, when configured.

use super::gateway::Gateway;
use crate::metrics::ops::Ops;
use http::StatusCode;
use serde_json::{json, Value};
use std::fmt::Display;
use std::time::Duration;

/// Longest a readiness check waits for the state store or the origin.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A probe's answer: its status and JSON body.
pub(crate) struct Probe {
    pub(crate) status: StatusCode,
    pub(crate) body: Value,
}

/// `f`'s output and how long it took.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, std::time::Duration) {
    let start = std::time::Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

/// The process is up and answers.
pub(crate) fn alive() -> Probe {
    Probe {
        status: StatusCode::OK,
        body: json!({ "status": "ok" }),
    }
}

/// 200 when the gateway can serve, else 503 naming what failed.
pub(crate) async fn ready(gw: &Gateway, listen: impl Display, stopping: bool) -> Probe {
    if stopping {
        return Probe {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: json!({ "status": "shutting down" }),
        };
    }
    let state = match &gw.state {
        None => "none".to_string(),
        Some(kv) => match tokio::time::timeout(PROBE_TIMEOUT, timed(kv.get("kvgate-readyz"))).await
        {
            Ok((Ok(_), took)) => {
                gw.ops.state_probe_answered(took);
                "ok".to_string()
            }
            Ok((Err(e), took)) => {
                gw.ops.state_probe_answered(took);
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
            // Each server of the default origin: "up", "ejected" (passive)
            // or "down" (failed its health checks).
            "origin_servers": gw.origin.servers().into_iter()
                .map(|(url, state)| json!({ "url": url, "state": state }))
                .collect::<Vec<_>>(),
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

/// "ok" when a TCP connection to one of the default origin's servers opens
/// within its connect timeout (no HTTP request: probes must not load the
/// origin); else what failed for the last one tried.
async fn origin_reachable(gw: &Gateway) -> String {
    let cfg = &gw.config.origin;
    let limit = Duration::from_millis(cfg.connect_timeout_ms).min(PROBE_TIMEOUT);
    let mut failure = "the origin has no server".to_string();
    for url in cfg.server_urls() {
        let Ok(uri) = url.parse::<http::Uri>() else {
            failure = format!("{url}: the URL does not parse");
            continue;
        };
        let Some(host) = uri.host() else {
            failure = format!("{url}: the URL has no host");
            continue;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        match tokio::time::timeout(limit, tokio::net::TcpStream::connect((host, port))).await {
            Ok(Ok(_)) => return "ok".into(),
            Ok(Err(e)) => failure = format!("cannot connect to {url}: {e}"),
            Err(_) => failure = format!("no connection to {url} within {limit:?}"),
        }
    }
    failure
}
