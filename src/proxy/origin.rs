//! The origin client: one or several servers (http or https), balanced
//! over those in rotation, pooled keep-alive connections, connect and
//! time-to-first-byte timeouts, errors mapped to 502 / 504.

use super::origin_server::{now_ms, Background, Server, ServerSettings};
use crate::config::OriginConfig;
use crate::error::OriginSetupError;
use http::header::HOST;
use http::uri::Scheme;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

tokio::task_local! {
    /// Time spent waiting for origin response heads during one client
    /// request, for its access line. Set only while the access log is on
    /// (`Gateway::handle` scopes it); background refreshes have none.
    pub(crate) static ORIGIN_TIME: std::cell::Cell<Option<Duration>>;
}

/// Why the origin did not answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OriginError {
    #[error("origin connection failed: {0}")]
    Connect(String),
    #[error("origin timed out after {0:?}")]
    Timeout(Duration),
    #[error("origin request failed: {0}")]
    Request(String),
    /// RFC 9112 6.3: a response with both `Transfer-Encoding` and
    /// `Content-Length` may be an attempt at response splitting or
    /// smuggling; like nginx, answer 502 and keep nothing of it.
    #[error("origin response has both Transfer-Encoding and Content-Length")]
    AmbiguousFraming,
}

impl OriginError {
    /// 504 for timeouts, 502 for everything else (RFC 9110 15.6.3 / 15.6.5).
    pub(crate) fn status(&self) -> http::StatusCode {
        match self {
            OriginError::Timeout(_) => http::StatusCode::GATEWAY_TIMEOUT,
            _ => http::StatusCode::BAD_GATEWAY,
        }
    }
}

/// Errors a body may fail with, whichever side it comes from.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request bodies sent upstream: the client's, streamed (boxed, so that the
/// request path is generic over where requests come from), or nothing.
pub(crate) type UpstreamBody = http_body_util::Either<
    http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>,
    http_body_util::Empty<bytes::Bytes>,
>;

/// A response body from the origin, boxed for the same reason.
pub(crate) type DownstreamBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

/// What an [`Upstream`] answers with, once the origin's response head is in.
pub(crate) type UpstreamFuture<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<Response<DownstreamBody>, OriginError>> + Send + 'a,
    >,
>;

/// Where cache misses and passes go: the real origin over HTTP
/// (`OriginClient`), or, in the in-process tests, a scripted one. The
/// request path depends on this, not on sockets.
pub(crate) trait Upstream: Send + Sync + 'static {
    /// Sends a request whose URI holds only the path and query.
    fn send(&self, req: Request<UpstreamBody>) -> UpstreamFuture<'_>;

    /// Longest pause allowed between two body chunks.
    fn idle_timeout(&self) -> Duration;

    /// Stops background work (health checks, address refresh): a reload
    /// replaced this generation. Requests still running on it finish.
    fn retire(&self) {}

    /// Each server's URL and state (`up`, `ejected`, `down`), for `/readyz`.
    fn servers(&self) -> Vec<(String, &'static str)> {
        Vec::new()
    }
}

/// An origin: its servers, balanced round robin over those in rotation,
/// with one retry on another server for a GET or HEAD without a body whose
/// connection could not be opened (nothing reached the origin then).
pub(crate) struct OriginClient {
    servers: Box<[Arc<Server>]>,
    /// Round-robin position: one relaxed add per origin request (several
    /// servers only), never touched by hits.
    next: AtomicUsize,
    preserve_host: bool,
    first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    eject_after: u32,
    eject_for: Duration,
    background: Background,
}

impl OriginClient {
    /// Builds the origin's clients and starts its background tasks
    /// (address refresh, health checks) on the current runtime.
    pub(crate) fn new(cfg: &OriginConfig) -> Result<OriginClient, OriginSetupError> {
        let urls = cfg.server_urls();
        let mut uris = Vec::with_capacity(urls.len());
        for url in &urls {
            let uri = crate::config::validate_origin_url(url).map_err(|reason| {
                OriginSetupError::Url {
                    url: url.to_string(),
                    reason,
                }
            })?;
            uris.push((url.to_string(), uri));
        }
        let https = uris.iter().any(|(_, u)| u.scheme() == Some(&Scheme::HTTPS));
        let tls = if https {
            let ca = match &cfg.ca_file {
                Some(path) => Some(
                    crate::config::read_ca_file(path.get_ref())
                        .map_err(OriginSetupError::CaFile)?,
                ),
                None => None,
            };
            Some(super::connector::client_config(ca).map_err(OriginSetupError::Tls)?)
        } else {
            None
        };
        let settings = ServerSettings {
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            max_idle: cfg.max_idle_per_host,
            tls,
        };
        let servers = uris
            .into_iter()
            .map(|(url, uri)| Server::new(url, &uri, &settings).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let background = Background::start(&servers, cfg.health.as_ref());
        Ok(OriginClient {
            servers: servers.into_boxed_slice(),
            next: AtomicUsize::new(0),
            preserve_host: cfg.preserve_host,
            first_byte_timeout: Duration::from_millis(cfg.first_byte_timeout_ms),
            idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
            eject_after: cfg.eject_after_failures,
            eject_for: Duration::from_millis(cfg.eject_ms),
            background,
        })
    }

    /// The server for the next request: the next in rotation after the
    /// round-robin position, skipping `not`. When none is in rotation, one
    /// is tried all the same (the next in turn): a 502 from a failed attempt
    /// is no worse than refusing, and it finds a server that came back
    /// before its health check does.
    fn pick(&self, not: Option<usize>) -> usize {
        let n = self.servers.len();
        if n == 1 {
            return 0;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let candidates = (0..n).map(|i| (start + i) % n).filter(|&i| Some(i) != not);
        let mut fallback = None;
        for i in candidates {
            if self.servers[i].usable(now) {
                return i;
            }
            fallback.get_or_insert(i);
        }
        fallback.unwrap_or(start % n)
    }

    /// Sends a request (its URI holds only the path and query) to the origin.
    pub(crate) async fn send_http(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, OriginError> {
        use http_body::Body as _;
        let first = self.pick(None);
        // A retry needs the request again: kept only when one may happen.
        let retry = (self.servers.len() > 1
            && (req.method() == http::Method::GET || req.method() == http::Method::HEAD)
            && req.body().is_end_stream())
        .then(|| {
            let mut again = Request::new(UpstreamBody::Right(http_body_util::Empty::new()));
            *again.method_mut() = req.method().clone();
            *again.uri_mut() = req.uri().clone();
            *again.headers_mut() = req.headers().clone();
            again
        });
        let sent = std::time::Instant::now();
        let mut answered = self.send_to(first, req).await;
        if let (Err(OriginError::Connect(e)), Some(again)) = (&answered, retry) {
            let second = self.pick(Some(first));
            tracing::debug!(server = %self.servers[first].url, error = %e, retry = %self.servers[second].url, "origin connection failed; retrying on another server");
            answered = self.send_to(second, again).await;
        }
        let _ = ORIGIN_TIME.try_with(|t| t.set(Some(t.get().unwrap_or_default() + sent.elapsed())));
        answered
    }

    /// One attempt on one server; its outcome counts for passive ejection.
    async fn send_to(
        &self,
        index: usize,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, OriginError> {
        let server = &self.servers[index];
        let pq = req.uri().path_and_query().cloned();
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(server.scheme.clone());
        parts.authority = Some(server.authority.clone());
        parts.path_and_query = pq.or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
        *req.uri_mut() = Uri::from_parts(parts).map_err(|e| OriginError::Request(e.to_string()))?;
        if !self.preserve_host || !req.headers().contains_key(HOST) {
            req.headers_mut().insert(HOST, server.host_header.clone());
        }
        *req.version_mut() = http::Version::HTTP_11;
        let answered =
            tokio::time::timeout(self.first_byte_timeout, server.client.request(req)).await;
        // Whether a failure is the server's (its connection), not the
        // client's (a request body that broke off mid-upload).
        let mut server_fault = false;
        let result = match answered {
            Err(_) => Err(OriginError::Timeout(self.first_byte_timeout)),
            Ok(Err(e)) if e.is_connect() => {
                server_fault = true;
                Err(OriginError::Connect(error_chain(&e)))
            }
            Ok(Err(e)) => {
                server_fault = !std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<hyper::Error>())
                    .is_some_and(hyper::Error::is_user);
                Err(OriginError::Request(error_chain(&e)))
            }
            Ok(Ok(resp))
                if resp.headers().contains_key(http::header::TRANSFER_ENCODING)
                    && resp.headers().contains_key(http::header::CONTENT_LENGTH) =>
            {
                Err(OriginError::AmbiguousFraming)
            }
            Ok(Ok(resp)) => Ok(resp),
        };
        match &result {
            Ok(_) | Err(OriginError::AmbiguousFraming) => server.answered(),
            Err(_) if server_fault => server.failed(self.eject_after, self.eject_for),
            // A slow answer is the application's business, not the server's
            // reachability, and a broken upload is the client's: neither
            // counts towards ejection.
            Err(_) => {}
        }
        result
    }
}

impl Upstream for OriginClient {
    fn send(&self, req: Request<UpstreamBody>) -> UpstreamFuture<'_> {
        use http_body_util::BodyExt;
        Box::pin(async move {
            let resp = self.send_http(req).await?;
            Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
        })
    }

    fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    fn retire(&self) {
        self.background.stop();
    }

    fn servers(&self) -> Vec<(String, &'static str)> {
        self.servers
            .iter()
            .map(|s| (s.url.clone(), s.state()))
            .collect()
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
