//! The listener: HTTP/1.1 and HTTP/2 (hyper-util's auto builder), optional
//! TLS (rustls), a connection cap, and graceful shutdown that drains
//! in-flight requests. Every connection slot is bounded in time: the TLS
//! handshake and the first request head (which covers protocol detection and
//! the h2 preface / SETTINGS exchange) within `header_read_timeout_ms`, and
//! no request in flight for `idle_timeout_ms` closes the connection.

use super::body::Body;
use super::gateway::Live;
use super::h1_hits::{self, Prefixed, Served};
use super::headers::ClientInfo;
use crate::error::TlsError;
use crate::metrics::ops::Ops;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// The main listener's certificate, replaceable by a config reload: new
/// handshakes get the certificate in force when they start.
#[derive(Debug)]
pub(crate) struct CertResolver {
    current: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
}

impl rustls::server::ResolvesServerCert for CertResolver {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl CertResolver {
    /// Serves `cert` from the next handshake on.
    pub(crate) fn set(&self, cert: rustls::sign::CertifiedKey) {
        self.current.store(Arc::new(cert));
    }
}

/// A certificate chain and its private key from PEM files, checked to match.
pub(crate) fn certified_key(
    cert: &Path,
    key: &Path,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let read = |path: &Path, source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).map_err(|e| read(cert, e))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| read(cert, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_path_buf()));
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).map_err(|e| read(key, e))?,
    ))
    .map_err(|e| read(key, e))?
    .ok_or_else(|| TlsError::NoKey(key.to_path_buf()))?;
    let provider = rustls::crypto::ring::default_provider();
    Ok(rustls::sign::CertifiedKey::from_der(certs, key, &provider)?)
}

/// Builds a TLS acceptor from PEM files (certificate chain, private key),
/// and the handle that replaces its certificate.
pub(crate) fn tls_acceptor(
    cert: &Path,
    key: &Path,
) -> Result<(TlsAcceptor, Arc<CertResolver>), TlsError> {
    let resolver = Arc::new(CertResolver {
        current: arc_swap::ArcSwap::from_pointee(certified_key(cert, key)?),
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(cfg)), resolver))
}

/// The next connection; accept errors (EMFILE and friends) are logged and
/// retried after a short pause instead of spinning.
pub(crate) async fn accept(
    listener: &TcpListener,
    what: &str,
) -> (tokio::net::TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(a) => return a,
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection(Arc<Ops>);

impl OpenConnection {
    fn new(ops: &Arc<Ops>) -> OpenConnection {
        ops.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(ops.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-connection limits, from `[server]`.
#[derive(Clone, Copy)]
struct Limits {
    /// TLS handshake, and accept -> first request head.
    first_request: Duration,
    /// No request in flight for this long: close.
    idle: Duration,
}

/// What the accept loop tells its connections.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Serving,
    /// Finish in-flight requests, take no new ones.
    Draining,
    /// The shutdown grace is over: close now.
    Closing,
}

/// Request bookkeeping for one connection, for the idle watchdog.
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    started: AtomicBool,
    /// When `in_flight` last fell to zero, in ms since `opened`.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.started.store(true, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// When the watchdog should look again; `None`: the connection has been
    /// idle (or silent, before its first request) for too long.
    fn deadline(&self, limits: Limits, now: Instant) -> Option<Instant> {
        let at = if self.in_flight.load(Ordering::SeqCst) > 0 {
            now.checked_add(limits.idle)?
        } else if !self.started.load(Ordering::SeqCst) {
            let expiry = self.opened.checked_add(limits.first_request)?;
            if expiry <= now {
                return None;
            }
            // Requests do not wake the watchdog: a first request could
            // start and end before `expiry`, so look again within `idle`.
            return Some(expiry.min(now.checked_add(limits.idle)?));
        } else {
            let since = Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
            self.opened.checked_add(since)?.checked_add(limits.idle)?
        };
        (at > now).then_some(at)
    }
}

/// Held from the start of a request until its response body is dropped
/// (sent or abandoned), so a long download never counts as idle.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Store before the decrement: a watchdog that sees zero requests
        // must also see the time they ended.
        a.idle_since_ms.store(ms, Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in flight.
struct Tracked {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Accepts connections until `shutdown` resolves, then lets in-flight
/// requests finish for up to the configured grace period.
pub(crate) async fn serve(
    gw: Arc<Live>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    // Read once: a reload cannot change the listener's limits (it says so).
    let cfg = gw.load().config.server.clone();
    // Shared by every generation; counted once per connection.
    let ops = gw.load().ops.clone();
    // Semaphore::new panics past MAX_PERMITS, and draining waits for all
    // permits with a u32 count: keep the cap within both.
    let cap = cfg
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let permits = Arc::new(Semaphore::new(cap));
    let limits = Limits {
        first_request: Duration::from_millis(cfg.header_read_timeout_ms),
        idle: Duration::from_millis(cfg.idle_timeout_ms),
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No timer for HTTP/1.1: with one, hyper arms a header-read timer on
    // every request (a clock read, a boxed sleep, the timer wheel twice and
    // an extra read). The watchdog below bounds the first request head and
    // idle time per connection instead.
    builder
        .http1()
        .header_read_timeout(None)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        // PINGs find peers that vanished mid-stream; the idle watchdog
        // below closes live but unused connections.
        .keep_alive_interval(limits.idle)
        .keep_alive_timeout(limits.first_request)
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let (phase, _) = watch::channel(Phase::Serving);
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept(&listener, "gateway") => accepted,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            Ops::count(&ops.connections_rejected);
            tracing::warn!(%addr, "connection limit reached; closing new connection");
            drop(stream);
            continue;
        };
        Ops::count(&ops.connections_accepted);
        let open = OpenConnection::new(&ops);
        let _ = stream.set_nodelay(true);
        let client = ClientInfo {
            addr,
            tls: tls.is_some(),
        };
        let gw = gw.clone();
        let builder = builder.clone();
        let phase = phase.subscribe();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(&builder, stream, gw, client, limits, phase).await,
                Some(acceptor) => {
                    // A client that never finishes the handshake must not
                    // hold its slot longer than one that never sends a head.
                    let handshake =
                        tokio::time::timeout(limits.first_request, acceptor.accept(stream)).await;
                    if let Ok(Ok(tls_stream)) = handshake {
                        serve_connection(&builder, tls_stream, gw, client, limits, phase).await;
                    }
                }
            }
            drop(permit);
            drop(open);
        });
    }
    drop(listener);
    let _ = phase.send(Phase::Draining);
    let grace = Duration::from_millis(cfg.shutdown_grace_ms);
    // Every connection holds a permit until it is gone.
    let drained = permits.acquire_many(cap as u32);
    tokio::select! {
        _ = drained => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "shutdown grace elapsed; closing remaining connections");
            let _ = phase.send(Phase::Closing);
        }
    }
}

/// Serves one connection (h1 or h2, after TLS if any) under the idle
/// watchdog and the shutdown phases: a plain-TCP one first on the HTTP/1.1
/// fast path for hits (`h1_hits`, unless `[server] fast_hits = false`),
/// then, from the first request that is not a plain hit, by hyper.
async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    gw: Arc<Live>,
    client: ClientInfo,
    limits: Limits,
    mut phase: watch::Receiver<Phase>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let mut watch = Watch {
        activity: &activity,
        limits,
        phase: &mut phase,
        phase_open: true,
        closing_since: None,
        addr: client.addr,
    };
    let service = {
        let activity = activity.clone();
        let gw = gw.clone();
        service_fn(move |req| {
            let guard = activity.begin();
            // The generation in force when the request starts serves it to
            // its end, whatever a reload swaps in meanwhile. `load` takes a
            // thread-local debt slot, no shared write; the guard is Send and
            // held across the awaits (past a few suspended requests per
            // thread arc-swap falls back to a refcount).
            let gw = gw.load();
            async move {
                let resp = gw.handle(req, client).await;
                Ok::<_, Infallible>(resp.map(|inner| Tracked {
                    inner,
                    _guard: guard,
                }))
            }
        })
    };
    let fast = {
        let server = &gw.load().config.server;
        (!client.tls && server.fast_hits).then(|| server.max_header_bytes.max(8192))
    };
    let io = match fast {
        None => Prefixed::new(io, bytes::Bytes::new()),
        Some(max_buf) => {
            let stop = AtomicBool::new(false);
            // Bodiless requests that are not plain hits go to hyper one at a
            // time, set as the listener's HTTP/1.1 (see `serve`).
            let mut http1 = hyper::server::conn::http1::Builder::new();
            http1
                .header_read_timeout(None)
                .max_buf_size(max_buf)
                .keep_alive(true);
            let others = h1_hits::Others {
                service: service.clone(),
                http1,
            };
            let fast = h1_hits::serve(
                io,
                &gw,
                client,
                || activity.begin(),
                &stop,
                max_buf,
                &others,
            );
            tokio::pin!(fast);
            // Between requests the fast path holds nothing: it closes when
            // asked to drain (as hyper closes an idle connection), else it
            // stops after the answers it is writing.
            let drained = watch
                .run(fast, |_| {
                    stop.store(true, Ordering::Relaxed);
                    activity.in_flight.load(Ordering::SeqCst) == 0
                })
                .await;
            match drained {
                Some(Served::Handover(io)) => io,
                Some(Served::Closed) | None => return,
            }
        }
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    watch
        .run(conn, |conn| {
            conn.graceful_shutdown();
            false
        })
        .await;
}

/// The idle watchdog and the shutdown phases over one connection's server
/// (the fast path's, then hyper's).
struct Watch<'a> {
    activity: &'a Activity,
    limits: Limits,
    phase: &'a mut watch::Receiver<Phase>,
    phase_open: bool,
    /// Set once the connection was asked to finish: from then on, with no
    /// request left, it gets `first_request` more to close by itself.
    closing_since: Option<Instant>,
    addr: std::net::SocketAddr,
}

impl Watch<'_> {
    /// Drives `conn` to its end; `None` when the watchdog or the shutdown
    /// closed it first. `drain` asks it to finish what it is doing and take
    /// no more requests; `true`: it may be closed at once.
    async fn run<F: Future>(
        &mut self,
        mut conn: Pin<&mut F>,
        mut drain: impl FnMut(Pin<&mut F>) -> bool,
    ) -> Option<F::Output> {
        let (activity, limits) = (self.activity, self.limits);
        loop {
            let now = Instant::now();
            let wake = match (activity.deadline(limits, now), self.closing_since) {
                (_, Some(since)) if activity.in_flight.load(Ordering::SeqCst) == 0 => {
                    match since.checked_add(limits.first_request) {
                        Some(at) if at > now => at,
                        _ => return None, // dropping the connection closes the socket
                    }
                }
                (Some(at), _) => at,
                (None, _) if !activity.started.load(Ordering::SeqCst) => {
                    // Nothing to drain: no request ever started.
                    tracing::debug!(addr = %self.addr, "no request head in time; closing");
                    return None;
                }
                (None, _) => {
                    if drain(conn.as_mut()) {
                        return None;
                    }
                    self.closing_since = Some(now);
                    continue;
                }
            };
            tokio::select! {
                out = conn.as_mut() => return Some(out),
                // Requests do not wake the watchdog: it sleeps to the
                // earliest moment the connection could be overdue and, on
                // waking, recomputes from the request bookkeeping (an exact
                // idle deadline, without a wake-up and a timer per request).
                _ = tokio::time::sleep_until(wake) => {}
                changed = self.phase.changed(), if self.phase_open => {
                    if changed.is_err() {
                        self.phase_open = false;
                        continue;
                    }
                    let p = *self.phase.borrow_and_update();
                    match p {
                        Phase::Serving => {}
                        // Nothing started on it: nothing to drain.
                        Phase::Draining if !activity.started.load(Ordering::SeqCst) => return None,
                        Phase::Draining => {
                            if self.closing_since.is_none() {
                                if drain(conn.as_mut()) {
                                    return None;
                                }
                                self.closing_since = Some(Instant::now());
                            }
                        }
                        Phase::Closing => return None,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        first_request: Duration::from_millis(100),
        idle: Duration::from_millis(500),
    };

    #[test]
    fn watchdog_deadlines() {
        let a = Activity::new();
        let t0 = a.opened;
        let ms = |n| t0 + Duration::from_millis(n);
        // Before any request: the first-request limit, then expiry.
        assert_eq!(a.deadline(LIMITS, ms(10)), Some(ms(100)));
        assert_eq!(a.deadline(LIMITS, ms(100)), None);
        // With an idle limit shorter than the first-request one, the
        // watchdog looks again within the idle limit (nothing wakes it).
        let short_idle = Limits {
            first_request: Duration::from_millis(1000),
            idle: Duration::from_millis(50),
        };
        assert_eq!(a.deadline(short_idle, ms(10)), Some(ms(60)));
        // A request in flight is never idle, however long it takes.
        let guard = a.begin();
        assert_eq!(a.deadline(LIMITS, ms(10_000)), Some(ms(10_500)));
        // Once it ends, the idle limit counts from its end.
        drop(guard);
        let ended = Duration::from_millis(a.idle_since_ms.load(Ordering::SeqCst));
        let at = t0 + ended + LIMITS.idle;
        assert_eq!(a.deadline(LIMITS, t0 + ended), Some(at));
        assert_eq!(a.deadline(LIMITS, at), None);
    }
}
