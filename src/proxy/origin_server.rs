//! One server of an origin: its connection pool, and whether it is in
//! rotation. Two things take it out: passive ejection (its connections
//! failed `eject_after_failures` times in a row; it stays out `eject_ms`)
//! and the active health check (`unhealthy_threshold` failed probes in a
//! row; it comes back after `healthy_threshold` good ones, which also ends a
//! passive ejection early). Everything here is touched by origin requests
//! and background tasks only, never by cache hits.

use super::connector::{Addresses, Connector, TlsTarget, RESOLVE_EVERY};
use super::origin::UpstreamBody;
use crate::config::OriginHealthConfig;
use crate::error::OriginSetupError;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, Scheme};
use http::{Request, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Largest health-check answer read (the rest is dropped with the connection).
const MAX_PROBE_BODY: usize = 64 * 1024;

/// Milliseconds since the first call: the clock of ejection deadlines.
pub(crate) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One origin server and its pool.
pub(crate) struct Server {
    /// The configured URL, for logs and status.
    pub(crate) url: String,
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    pub(crate) host_header: HeaderValue,
    pub(crate) client: Client<Connector, UpstreamBody>,
    pub(crate) addresses: Arc<Addresses>,
    /// False while the active health check says it is down.
    up: AtomicBool,
    /// Connection failures in a row (reset by any answer).
    failures: AtomicU32,
    /// Out of rotation until this [`now_ms`] (0: not ejected).
    ejected_until: AtomicU64,
}

/// How a server's own settings are built (shared by all its origin's servers).
pub(crate) struct ServerSettings {
    pub(crate) connect_timeout: Duration,
    pub(crate) max_idle: usize,
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

impl Server {
    pub(crate) fn new(
        url: String,
        uri: &Uri,
        s: &ServerSettings,
    ) -> Result<Server, OriginSetupError> {
        let bad_url = |reason: String| OriginSetupError::Url {
            url: url.clone(),
            reason,
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| bad_url("the URL has no host".into()))?;
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
        let https = scheme == Scheme::HTTPS;
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addresses = Arc::new(Addresses::new(authority.host(), port));
        let tls = match (&s.tls, https) {
            (Some(cfg), true) => {
                let host = authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| bad_url(format!("{host:?} is not a TLS server name: {e}")))?;
                Some(TlsTarget {
                    connector: tokio_rustls::TlsConnector::from(cfg.clone()),
                    name,
                })
            }
            _ => None,
        };
        let connector = Connector {
            addresses: addresses.clone(),
            tls,
            connect_timeout: s.connect_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(s.max_idle)
            // The origin may close an idle keep-alive connection just as we
            // reuse it; retrying that is safe (the request never reached it).
            .retry_canceled_requests(true)
            .build(connector);
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|source| OriginSetupError::Host {
                url: url.clone(),
                source,
            })?;
        Ok(Server {
            url,
            scheme,
            authority,
            host_header,
            client,
            addresses,
            up: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
        })
    }

    /// In rotation at `now` (from [`now_ms`]).
    pub(crate) fn usable(&self, now: u64) -> bool {
        self.up.load(Ordering::Relaxed) && self.ejected_until.load(Ordering::Relaxed) <= now
    }

    /// The server answered: its failure streak ends. (Read first: most
    /// answers find no streak, and then nothing is written.)
    pub(crate) fn answered(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A connection failed or broke before an answer: after `eject_after`
    /// in a row the server is out for `eject_for`. A server whose ejection
    /// ran out goes out again at its next failure (the streak is kept).
    pub(crate) fn failed(&self, eject_after: u32, eject_for: Duration) {
        let streak = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if eject_after == 0 || streak < eject_after {
            return;
        }
        let now = now_ms();
        if self.ejected_until.load(Ordering::Relaxed) > now {
            return;
        }
        self.ejected_until
            .store(now + eject_for.as_millis() as u64, Ordering::Relaxed);
        tracing::warn!(
            server = %self.url,
            failures = streak,
            for_ms = eject_for.as_millis() as u64,
            "origin server ejected"
        );
    }

    /// The server's state for status pages: `up`, `ejected` or `down`.
    pub(crate) fn state(&self) -> &'static str {
        if !self.up.load(Ordering::Relaxed) {
            "down"
        } else if self.ejected_until.load(Ordering::Relaxed) > now_ms() {
            "ejected"
        } else {
            "up"
        }
    }

    /// One health probe: `GET path`, 2xx or 3xx within `timeout`.
    async fn probe(&self, path: &http::uri::PathAndQuery, timeout: Duration) -> Result<(), String> {
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path.clone())
            .build()
            .map_err(|e| e.to_string())?;
        let mut req = Request::new(UpstreamBody::Right(http_body_util::Empty::new()));
        *req.uri_mut() = uri;
        req.headers_mut().insert(HOST, self.host_header.clone());
        req.headers_mut().insert(
            http::header::USER_AGENT,
            HeaderValue::from_static("kvgate-health-check"),
        );
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let mut s = e.to_string();
                let mut cur = std::error::Error::source(&e);
                while let Some(c) = cur {
                    s.push_str(": ");
                    s.push_str(&c.to_string());
                    cur = c.source();
                }
                s
            })?;
            let status = resp.status();
            // Read the (bounded) answer so that the connection can be reused.
            let _ = http_body_util::Limited::new(resp.into_body(), MAX_PROBE_BODY)
                .collect()
                .await;
            if status.is_success() || status.is_redirection() {
                Ok(())
            } else {
                Err(format!("answered {status}"))
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }
}

/// Stops an origin's background tasks when told to, or when dropped.
pub(crate) struct Background {
    stop: watch::Sender<bool>,
}

impl Background {
    /// Starts, on the current runtime (if any), the address refresh of
    /// every named server and the health checks when configured.
    pub(crate) fn start(
        servers: &[Arc<Server>],
        health: Option<&OriginHealthConfig>,
    ) -> Background {
        let (stop, _) = watch::channel(false);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Background { stop };
        };
        for server in servers {
            if server.addresses.is_name() {
                runtime.spawn(resolve_loop(server.clone(), stop.subscribe()));
            }
            if let Some(h) = health {
                runtime.spawn(health_loop(server.clone(), h.clone(), stop.subscribe()));
            }
        }
        Background { stop }
    }

    /// Ends the tasks (a reload replaced this origin).
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }
}

/// Waits `d`; false when the tasks must end instead.
async fn wait(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        // Told to stop, or the origin is gone (the sender dropped).
        _ = stop.wait_for(|s| *s) => return false,
    }
    !*stop.borrow()
}

/// Resolves the server's host now and every [`RESOLVE_EVERY`]; a failed
/// lookup keeps the last good answer.
async fn resolve_loop(server: Arc<Server>, mut stop: watch::Receiver<bool>) {
    let mut delay = Duration::ZERO;
    while wait(delay, &mut stop).await {
        if let Err(e) = server.addresses.refresh().await {
            tracing::warn!(server = %server.url, error = %e, "cannot resolve the origin server; keeping its last addresses");
        }
        delay = RESOLVE_EVERY;
    }
}

/// Probes the server every `interval_ms` and moves it in and out of rotation.
async fn health_loop(
    server: Arc<Server>,
    cfg: OriginHealthConfig,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(path) = cfg.path.get_ref().parse::<http::uri::PathAndQuery>() else {
        tracing::error!(path = %cfg.path.get_ref(), "health-check path does not parse; no checks");
        return;
    };
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let (mut good, mut bad) = (0u32, 0u32);
    // The passive ejection the current streak of good probes counts against:
    // only probes made after an ejection may end it.
    let mut ejection_seen = 0;
    while wait(Duration::from_millis(cfg.interval_ms), &mut stop).await {
        let ejected = server.ejected_until.load(Ordering::Relaxed);
        if ejected != ejection_seen {
            ejection_seen = ejected;
            good = 0;
        }
        match server.probe(&path, timeout).await {
            Ok(()) => {
                bad = 0;
                good = good.saturating_add(1);
                if good < cfg.healthy_threshold {
                    continue;
                }
                if !server.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(server = %server.url, "origin server healthy again");
                }
                if server.ejected_until.load(Ordering::Relaxed) > now_ms() {
                    server.ejected_until.store(0, Ordering::Relaxed);
                    server.failures.store(0, Ordering::Relaxed);
                    ejection_seen = 0;
                    tracing::info!(server = %server.url, "origin server answers health checks again; ejection ended");
                }
            }
            Err(e) => {
                good = 0;
                bad = bad.saturating_add(1);
                if bad >= cfg.unhealthy_threshold && server.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(server = %server.url, error = %e, "origin server failed its health checks; out of rotation");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Server {
        let settings = ServerSettings {
            connect_timeout: Duration::from_secs(1),
            max_idle: 1,
            tls: None,
        };
        let uri: Uri = "http://127.0.0.1:9".parse().unwrap();
        Server::new("http://127.0.0.1:9".into(), &uri, &settings).unwrap()
    }

    #[test]
    fn failures_in_a_row_eject_and_an_answer_ends_the_streak() {
        let s = server();
        let long = Duration::from_secs(60);
        s.failed(3, long);
        s.failed(3, long);
        s.answered();
        s.failed(3, long);
        s.failed(3, long);
        assert!(s.usable(now_ms()), "the answer reset the streak");
        s.failed(3, long);
        assert!(!s.usable(now_ms()));
        assert_eq!(s.state(), "ejected");
        // Never ejected with 0.
        let s = server();
        for _ in 0..10 {
            s.failed(0, long);
        }
        assert!(s.usable(now_ms()));
    }

    #[test]
    fn an_expired_ejection_returns_at_its_next_failure() {
        let s = server();
        let short = Duration::from_millis(1);
        for _ in 0..3 {
            s.failed(3, short);
        }
        std::thread::sleep(Duration::from_millis(5));
        assert!(s.usable(now_ms()), "the ejection ran out");
        s.failed(3, Duration::from_secs(60));
        assert!(
            !s.usable(now_ms()),
            "one failure is enough once ejected before"
        );
        s.up.store(false, Ordering::Relaxed);
        assert_eq!(s.state(), "down");
    }
}
