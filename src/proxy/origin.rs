//! The origin client: pooled keep-alive connections, connect and
//! time-to-first-byte timeouts, errors mapped to 502 / 504.

use crate::config::OriginConfig;
use crate::error::OriginSetupError;
use http::header::{HeaderValue, HOST};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
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
}

pub(crate) struct OriginClient {
    client: Client<HttpConnector, UpstreamBody>,
    authority: http::uri::Authority,
    scheme: http::uri::Scheme,
    host_header: HeaderValue,
    preserve_host: bool,
    first_byte_timeout: Duration,
    pub idle_timeout: Duration,
}

impl OriginClient {
    pub(crate) fn new(cfg: &OriginConfig) -> Result<OriginClient, OriginSetupError> {
        let url = cfg.url.get_ref();
        let bad_url = |reason: &str| OriginSetupError::Url {
            url: url.clone(),
            reason: reason.to_owned(),
        };
        let uri = crate::config::validate_origin_url(url).map_err(|r| bad_url(&r))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| bad_url("the URL has no host"))?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(cfg.max_idle_per_host)
            // The origin may close an idle keep-alive connection just as we
            // reuse it; retrying that is safe (the request never reached it).
            .retry_canceled_requests(true)
            .build(connector);
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|source| OriginSetupError::Host {
                url: url.clone(),
                source,
            })?;
        Ok(OriginClient {
            client,
            authority,
            scheme: uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP),
            host_header,
            preserve_host: cfg.preserve_host,
            first_byte_timeout: Duration::from_millis(cfg.first_byte_timeout_ms),
            idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
        })
    }

    /// Sends a request (its URI holds only the path and query) to the origin.
    pub(crate) async fn send_http(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, OriginError> {
        let pq = req.uri().path_and_query().cloned();
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = pq.or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
        *req.uri_mut() = Uri::from_parts(parts).map_err(|e| OriginError::Request(e.to_string()))?;
        if !self.preserve_host || !req.headers().contains_key(HOST) {
            req.headers_mut().insert(HOST, self.host_header.clone());
        }
        *req.version_mut() = http::Version::HTTP_11;
        let sent = std::time::Instant::now();
        let answered =
            tokio::time::timeout(self.first_byte_timeout, self.client.request(req)).await;
        let _ = ORIGIN_TIME.try_with(|t| t.set(Some(t.get().unwrap_or_default() + sent.elapsed())));
        match answered {
            Err(_) => Err(OriginError::Timeout(self.first_byte_timeout)),
            Ok(Err(e)) if e.is_connect() => Err(OriginError::Connect(error_chain(&e))),
            Ok(Err(e)) => Err(OriginError::Request(error_chain(&e))),
            Ok(Ok(resp))
                if resp.headers().contains_key(http::header::TRANSFER_ENCODING)
                    && resp.headers().contains_key(http::header::CONTENT_LENGTH) =>
            {
                Err(OriginError::AmbiguousFraming)
            }
            Ok(Ok(resp)) => Ok(resp),
        }
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
