//! `kvgate demo`: a small origin API and the gateway in front of it, so a
//! newcomer sees MISS, HIT, STALE and BYPASS with curl in a minute, and the
//! admin listener with its dashboard (a generated token, an example flag
//! and experiment) to see purges, flags and experiments in a browser.

use crate::cli;
use crate::config::Config;
use crate::error::StartError;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The demo origin's answer for a path.
async fn origin(req: Request<Incoming>, hits: Arc<AtomicU64>) -> Response<Full<Bytes>> {
    let n = hits.fetch_add(1, Ordering::Relaxed) + 1;
    let path = req.uri().path().to_string();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(none)")
            .to_string()
    };
    let (status, cc, body, delay) = match path.as_str() {
        "/" => (
            StatusCode::OK,
            "no-store",
            "kvgate demo origin: try /cacheable, /swr, /uncacheable, /slow, /whoami\n".to_string(),
            0,
        ),
        // What the edge told the origin about this user.
        "/whoami" => (
            StatusCode::OK,
            "private, no-store",
            format!(
                "X-Feature-Flags: {}\nX-Experiment-new-checkout: {}\nX-User-Preferences: {}\n",
                header("x-feature-flags"),
                header("x-experiment-new-checkout"),
                header("x-user-preferences"),
            ),
            0,
        ),
        "/cacheable" => (
            StatusCode::OK,
            "public, max-age=60",
            format!("cacheable, origin request #{n}\n"),
            0,
        ),
        "/swr" => (
            StatusCode::OK,
            "public, max-age=5, stale-while-revalidate=30",
            format!("short TTL with stale-while-revalidate, origin request #{n}\n"),
            0,
        ),
        "/uncacheable" => (
            StatusCode::OK,
            "private, no-store",
            format!("never cached, origin request #{n}\n"),
            0,
        ),
        "/slow" => (
            StatusCode::OK,
            "public, max-age=30",
            format!("slow (1 s), origin request #{n}\n"),
            1000,
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "max-age=10",
            "not found\n".to_string(),
            0,
        ),
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CACHE_CONTROL, header::HeaderValue::from_static(cc));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    // Tags, so that a purge by tag has something to remove.
    if matches!(path.as_str(), "/cacheable" | "/swr" | "/slow") {
        r.headers_mut()
            .insert("cache-tag", header::HeaderValue::from_static("demo"));
    }
    if let Ok(v) =
        header::HeaderValue::from_str(&httpdate::fmt_http_date(std::time::SystemTime::now()))
    {
        r.headers_mut().insert(header::DATE, v);
    }
    r
}

/// Starts the demo origin on an ephemeral loopback port.
pub(crate) async fn start_origin() -> Result<SocketAddr, StartError> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let listener = tokio::net::TcpListener::bind(any)
        .await
        .map_err(|source| StartError::Bind { addr: any, source })?;
    let addr = listener.local_addr().map_err(StartError::LocalAddr)?;
    let hits = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let hits = hits.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let hits = hits.clone();
                    async move { Ok::<_, Infallible>(origin(req, hits).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// The demo's edge: loopback may name its user in `X-User-Id` (curl plays
/// the auth proxy), one flag and one experiment; state in memory.
const DEMO_EDGE: &str = r#"
[state]
backend = "memory"
[edge.identity]
trusted_from = ["127.0.0.0/8", "::1/128"]
[edge.flags.newUI]
default = false
description = "The redesigned UI"
[edge.experiments.new-checkout]
variants = { control = 50, variant_a = 25, variant_b = 25 }
description = "One-page checkout against the current three steps"
"#;

/// The admin token: `KVGATE_ADMIN_TOKEN` when set, else a random one.
fn demo_token() -> String {
    std::env::var(crate::admin::TOKEN_ENV)
        .ok()
        .filter(|t| crate::config::is_valid_token(t))
        // 122 random bits.
        .unwrap_or_else(|| format!("demo-{}", uuid::Uuid::new_v4().simple()))
}

/// The demo's config: the gateway on `listen` in front of `origin`, the
/// admin listener on an ephemeral loopback port with `token`, the edge.
fn demo_config(listen: &str, origin: SocketAddr, token: String) -> Config {
    let mut cfg = match Config::parse(DEMO_EDGE, "kvgate demo") {
        Ok(cfg) => cfg,
        Err(e) => {
            // A unit test parses DEMO_EDGE: this is not reached.
            tracing::error!(error = %e, "demo edge config refused; running without flags");
            Config::default()
        }
    };
    cfg.server.listen = toml::Spanned::new(0..0, listen.to_string());
    cfg.origin.url = toml::Spanned::new(0..0, format!("http://{origin}"));
    cfg.admin = Some(crate::config::AdminConfig {
        listen: toml::Spanned::new(0..0, "127.0.0.1:0".to_string()),
        token: Some(token),
        ..Default::default()
    });
    cfg
}

/// Starts a demo origin on an ephemeral port and the gateway in front of it
/// on `listen`, with the admin listener and dashboard, until a shutdown signal.
pub async fn run(listen: &str) -> Result<(), StartError> {
    cli::init_logging("info");
    let origin = start_origin().await?;
    let token = demo_token();
    let running = cli::start(demo_config(listen, origin, token.clone())).await?;
    let a = running.addr;
    let dashboard = running
        .admin_addr
        .map_or_else(String::new, |admin| format!("http://{admin}/ui/"));
    println!(
        "kvgate demo: gateway on http://{a} in front of a demo origin on http://{origin}\n\n\
         Try (look at X-Cache, Age and Cache-Status):\n\
         \x20 curl -si http://{a}/cacheable     # MISS, then HIT on the second call\n\
         \x20 curl -si http://{a}/cacheable\n\
         \x20 curl -si http://{a}/swr           # after 5 s: STALE at once, refreshed in the background\n\
         \x20 curl -si http://{a}/uncacheable   # MISS every time (private, no-store)\n\
         \x20 curl -si http://{a}/slow          # 1 s the first time, instant after\n\
         \x20 curl -s -H 'X-User-Id: alice' http://{a}/whoami   # the flags and variant the origin receives\n\n\
         Dashboard: {dashboard}\n\
         Admin token: {token}\n\
         (cache numbers, purges by tag \"demo\", the newUI flag and the new-checkout experiment;\n\
         \x20the admin API takes the same token: curl -H 'Authorization: Bearer {token}' {dashboard_api}stats)\n\n\
         Ctrl-C stops.",
        dashboard_api = dashboard.trim_end_matches("ui/"),
    );
    cli::shutdown_signal().await;
    let _ = running.stop.send(true);
    let _ = running.task.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_has_admin_edge_and_a_valid_token() {
        let token = demo_token();
        assert!(crate::config::is_valid_token(&token), "{token}");
        let origin = SocketAddr::from(([127, 0, 0, 1], 8000));
        let cfg = demo_config("127.0.0.1:8080", origin, token.clone());
        assert!(cfg.edge.is_some(), "DEMO_EDGE parses");
        let admin = cfg.admin.expect("admin listener");
        assert_eq!(admin.token.as_deref(), Some(token.as_str()));
        assert!(admin.listen_addr().expect("addr").ip().is_loopback());
        assert_eq!(cfg.origin.url.get_ref(), "http://127.0.0.1:8000");
    }

    #[tokio::test]
    async fn the_demo_serves_the_dashboard_and_the_example_flag() {
        let origin = start_origin().await.expect("origin");
        let running = cli::start(demo_config("127.0.0.1:0", origin, "demo-test-token".into()))
            .await
            .expect("demo starts");
        let admin = running.admin_addr.expect("admin runs");
        let stream = tokio::net::TcpStream::connect(admin)
            .await
            .expect("connect");
        let (mut send, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let get = |path: &str, auth: bool| {
            let mut b = Request::get(path).header("host", "demo");
            if auth {
                b = b.header("authorization", "Bearer demo-test-token");
            }
            b.body(Full::new(Bytes::new())).expect("request")
        };
        let ui = send.send_request(get("/ui/", false)).await.expect("ui");
        assert_eq!(ui.status(), 200);
        let counters = send
            .send_request(get("/counters", true))
            .await
            .expect("counters");
        assert_eq!(counters.status(), 200);
        use http_body_util::BodyExt;
        let body = counters
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert!(v["flag_evaluations"].get("newUI").is_some(), "{v}");
        assert!(v["exposures"].get("new-checkout").is_some(), "{v}");
        let _ = running.stop.send(true);
        let _ = running.task.await;
    }
}
