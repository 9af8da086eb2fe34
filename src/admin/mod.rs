//! The admin listener: a second HTTP port for operators, JSON in and out.
//!
//! Every route but `/healthz` and `/readyz` (a load balancer's probe cannot
//! send a token; both answer GET and HEAD) needs `Authorization: Bearer <token>`, checked
//! before anything else happens (an unauthenticated client learns nothing,
//! not even which routes exist). Without a configured token the listener
//! only starts on a loopback address, and then every authenticated route
//! answers 401 saying so: an open admin API on loopback would still be
//! reachable by any local process and by browsers (DNS rebinding).
//!
//! Routes and handlers are in [`routes`]; `/metrics` rendering in
//! [`prometheus`]; purge semantics in [`purge`].

pub(crate) mod auth;
mod flags;
pub(crate) mod prometheus;
pub(crate) mod purge;
pub(crate) mod reload;
mod reply;
mod request;
pub(crate) mod routes;
pub(crate) mod session;
mod stats;
pub(crate) mod ui;

use crate::config::AdminConfig;
use crate::error::AdminError;
use crate::proxy::gateway::{Gateway, Live};
use crate::proxy::probes;
use auth::Token;
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use reload::Reloader;
use reply::{AdminResponse, ApiError};
use routes::Route;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// The environment variable that holds the admin token (wins over the config).
pub(crate) const TOKEN_ENV: &str = crate::config::ADMIN_TOKEN_ENV;

/// Admin connections at once; operators and scrapers need few.
const MAX_CONNECTIONS: usize = 256;

/// The admin listener's settings, checked before anything binds so that a
/// refused configuration stops the gateway at start.
pub(crate) struct AdminSettings {
    pub addr: SocketAddr,
    token: Option<Token>,
    max_body_bytes: usize,
}

impl AdminSettings {
    pub(crate) fn from_config(cfg: &AdminConfig) -> Result<AdminSettings, AdminError> {
        let addr = cfg.listen_addr()?;
        let token = cfg.token.as_deref().map(Token::new).transpose()?;
        if token.is_none() && !addr.ip().is_loopback() {
            return Err(AdminError::NoToken(addr));
        }
        if token.is_none() {
            tracing::warn!(
                %addr,
                "no admin token configured: the admin API answers only /healthz; set {TOKEN_ENV}"
            );
        }
        Ok(AdminSettings {
            addr,
            token,
            max_body_bytes: cfg.max_body_bytes,
        })
    }
}

/// What every admin request can see.
#[derive(Clone)]
pub(crate) struct AdminState {
    /// The generation in force when the request came in.
    pub gateway: Arc<Gateway>,
    live: Arc<Live>,
    reloader: Arc<Reloader>,
    /// The gateway's own (main) listener address, for `/readyz`.
    pub gateway_addr: SocketAddr,
    /// Becomes true when the gateway starts shutting down.
    pub stopping: watch::Receiver<bool>,
    token: Option<Token>,
    max_body_bytes: usize,
    /// Dashboard sessions and sign-in throttling (`/ui/`), shared by the
    /// per-request copies of this state.
    ui: Arc<ui::UiState>,
}

/// A bound, running admin listener.
pub(crate) struct AdminListener {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds the admin listener and serves it until `stopping` turns true.
pub(crate) async fn start(
    settings: AdminSettings,
    live: Arc<Live>,
    reloader: Arc<Reloader>,
    gateway_addr: SocketAddr,
    stopping: watch::Receiver<bool>,
) -> Result<AdminListener, AdminError> {
    let listener = TcpListener::bind(settings.addr)
        .await
        .map_err(|source| AdminError::Bind {
            addr: settings.addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(AdminError::LocalAddr)?;
    let state = Arc::new(AdminState {
        gateway: live.load_full(),
        live,
        reloader,
        gateway_addr,
        stopping: stopping.clone(),
        token: settings.token,
        max_body_bytes: settings.max_body_bytes,
        ui: Arc::default(),
    });
    let task = tokio::spawn(serve(state, listener, stopping));
    Ok(AdminListener { addr, task })
}

async fn serve(state: Arc<AdminState>, listener: TcpListener, mut stopping: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stop = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stop => break,
            accepted = crate::proxy::server::accept(&listener, "admin") => accepted,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let state = state.clone();
        let service = service_fn(move |req| {
            // Each admin request sees the generation in force (admin
            // traffic is light: a copy of the state per request is fine).
            let state = AdminState {
                gateway: state.live.load_full(),
                ..(*state).clone()
            };
            async move { Ok::<_, Infallible>(answer(&state, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
}

async fn answer(state: &AdminState, req: Request<Incoming>) -> AdminResponse {
    dispatch(state, req)
        .await
        .unwrap_or_else(ApiError::into_response)
}

/// Probes, then authentication, then the route, the method, the body.
async fn dispatch(state: &AdminState, req: Request<Incoming>) -> Result<AdminResponse, ApiError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if path == "/healthz" || path == "/readyz" {
        if parts.method != Method::GET && parts.method != Method::HEAD {
            return Err(ApiError::method_not_allowed(&[Method::GET, Method::HEAD]));
        }
        let probe = if path == "/healthz" {
            probes::alive()
        } else {
            let stopping = *state.stopping.borrow();
            probes::ready(&state.gateway, state.gateway_addr, stopping).await
        };
        let mut r = reply::json(probe.status, &probe.body);
        if parts.method == Method::HEAD {
            *r.body_mut() = http_body_util::Full::new(bytes::Bytes::new());
        }
        return Ok(r);
    }
    if ui::is_ui_path(parts.uri.path()) {
        return ui::answer(state, &parts, body).await;
    }
    if let Err(refusal) = auth::check(state.token.as_ref(), &parts.headers) {
        // A browser signed in to the dashboard shows a session cookie instead.
        ui::session_instead_of_bearer(state, &parts, refusal)?;
    }
    if path == "/reload" {
        if parts.method != Method::POST {
            return Err(ApiError::method_not_allowed(&[Method::POST]));
        }
        return Ok(match state.reloader.reload().await {
            Ok(applied) => {
                let mut reply = serde_json::json!({
                    "status": "reloaded",
                    "version": applied.version,
                    "needs_restart": applied.needs_restart,
                });
                if let (Some(b), Some(map)) = (applied.broadcast, reply.as_object_mut()) {
                    map.insert("broadcast".into(), serde_json::json!(b));
                }
                reply::ok(&reply)
            }
            Err(e) => reply::json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({ "status": "refused", "error": e.chain() }),
            ),
        });
    }
    let segments = request::path_segments(parts.uri.path())?;
    let route = Route::parse(&segments)
        .ok_or_else(|| ApiError::not_found(format!("no admin route {}", parts.uri.path())))?;
    if !route.methods().contains(&parts.method) {
        return Err(ApiError::method_not_allowed(route.methods()));
    }
    let body = if route.takes_body(&parts.method) {
        request::read_body(&parts.headers, body, state.max_body_bytes).await?
    } else {
        bytes::Bytes::new()
    };
    routes::handle(
        state,
        route,
        &parts.method,
        &parts.headers,
        parts.uri.query(),
        body,
    )
    .await
}
