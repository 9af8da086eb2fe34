//! `kvgate demo`: a small origin API and the gateway in front of it, so a
//! newcomer sees MISS, HIT, STALE and BYPASS with curl in a minute.

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
    let (status, cc, body, delay) = match path.as_str() {
        "/" => (
            StatusCode::OK,
            "no-store",
            "kvgate demo origin: try /cacheable, /swr, /uncacheable, /slow\n".to_string(),
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

/// Starts a demo origin on an ephemeral port and the gateway in front of it
/// on `listen`, until a shutdown signal.
pub async fn run(listen: &str) -> Result<(), StartError> {
    cli::init_logging("info");
    let origin = start_origin().await?;
    let mut cfg = Config::default();
    cfg.server.listen = toml::Spanned::new(0..0, listen.to_string());
    cfg.origin.url = toml::Spanned::new(0..0, format!("http://{origin}"));
    let running = cli::start(cfg).await?;
    let a = running.addr;
    println!(
        "kvgate demo: gateway on http://{a} in front of a demo origin on http://{origin}\n\n\
         Try (look at X-Cache, Age and Cache-Status):\n\
         \x20 curl -si http://{a}/cacheable     # MISS, then HIT on the second call\n\
         \x20 curl -si http://{a}/cacheable\n\
         \x20 curl -si http://{a}/swr           # after 5 s: STALE at once, refreshed in the background\n\
         \x20 curl -si http://{a}/uncacheable   # MISS every time (private, no-store)\n\
         \x20 curl -si http://{a}/slow          # 1 s the first time, instant after\n\n\
         Ctrl-C stops."
    );
    cli::shutdown_signal().await;
    let _ = running.stop.send(true);
    let _ = running.task.await;
    Ok(())
}
