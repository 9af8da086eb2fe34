//! Test support: a real origin server (hyper) whose answers each test
//! scripts, a real gateway on an ephemeral loopback port, and a plain
//! HTTP client. Nothing is mocked: every request crosses real sockets.
#![allow(dead_code)]

pub mod redis;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kvgate::config::Config;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the origin answers.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub delay: Duration,
}

impl Reply {
    /// A 200 the gateway must not store: every request reaches the origin.
    pub fn no_store(body: &str) -> Reply {
        Reply::ok(body).header("cache-control", "no-store")
    }

    pub fn ok(body: &str) -> Reply {
        Reply {
            status: StatusCode::OK,
            headers: Vec::new(),
            body: Bytes::from(body.to_string()),
            delay: Duration::ZERO,
        }
    }
    pub fn status(mut self, s: u16) -> Reply {
        self.status = StatusCode::from_u16(s).expect("valid status");
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

/// A request as the origin saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
}

type Script = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

/// A scripted origin. `script(seen, n)` gets the n-th (1-based) request for
/// that path and returns the reply.
pub struct Origin {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Origin {
    pub async fn start(script: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let script: Arc<Script> = Arc::new(script);
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen2.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        let script = script.clone();
                        async move {
                            let s = Seen {
                                method: req.method().clone(),
                                path: req
                                    .uri()
                                    .path_and_query()
                                    .map_or("/".into(), |p| p.to_string()),
                                headers: req.headers().clone(),
                            };
                            let n = {
                                let mut v = seen.lock().expect("lock");
                                v.push(s.clone());
                                v.iter().filter(|x| x.path == s.path).count()
                            };
                            let _ = req.into_body().collect().await;
                            let reply = script(&s, n);
                            if !reply.delay.is_zero() {
                                tokio::time::sleep(reply.delay).await;
                            }
                            let mut r = Response::new(Full::new(reply.body));
                            *r.status_mut() = reply.status;
                            for (k, v) in reply.headers {
                                r.headers_mut().append(
                                    HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                                    HeaderValue::from_str(&v).expect("header value"),
                                );
                            }
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops the record of requests seen so far (memory tests measure the
    /// gateway's heap, not this log's).
    pub fn forget(&self) {
        *self.seen.lock().expect("lock") = Vec::new();
    }

    /// Requests the origin received for `path` (path and query).
    pub fn count(&self, path: &str) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.path == path)
            .count()
    }

    pub fn total(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }

    pub fn requests(&self, path: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }
}

/// A gateway running in this process on an ephemeral port.
pub struct Gateway {
    pub running: kvgate::cli::Running,
}

impl Gateway {
    pub async fn start(origin: &str, tweak: impl FnOnce(&mut Config)) -> Gateway {
        let mut cfg = Config::default();
        cfg.server.listen = toml::Spanned::new(0..0, "127.0.0.1:0".to_string());
        cfg.origin.url = toml::Spanned::new(0..0, origin.to_string());
        cfg.log.access = false;
        tweak(&mut cfg);
        let running = kvgate::cli::start(cfg).await.expect("gateway starts");
        Gateway { running }
    }

    /// A gateway configured by a test's TOML: the sections the edge,
    /// state and cluster suites set (edge, state, admin, redis, routes,
    /// `cache.l2`) are taken from it; the rest stays the test default.
    pub async fn from_toml(origin: &Origin, toml: &str) -> Gateway {
        let parsed = Config::parse(toml, "t.toml").expect("test config parses");
        Gateway::start(&origin.url(), |c| {
            c.edge = parsed.edge;
            c.state = parsed.state;
            c.admin = parsed.admin;
            c.redis = parsed.redis;
            c.routes = parsed.routes;
            c.cache.l2 = parsed.cache.l2;
        })
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.running.addr, path)
    }

    /// A call to the admin API with `token` as the bearer token.
    pub async fn admin(&self, token: &str, method: Method, path: &str, body: &str) -> Got {
        let addr = self.running.admin_addr.expect("admin listener runs");
        admin_at(&addr.to_string(), token, method, path, body).await
    }

    /// An admin call that must answer 200 with JSON.
    pub async fn admin_ok(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: &str,
    ) -> serde_json::Value {
        let r = self.admin(token, method.clone(), path, body).await;
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        serde_json::from_slice(&r.body).expect("JSON")
    }

    /// Waits until the edge-state writes queued so far are committed.
    pub async fn settle_edge(&self) {
        self.running
            .gateway
            .edge
            .as_ref()
            .expect("edge configured")
            .settle()
            .await;
    }

    /// Stops the gateway after its queued edge-state writes are committed.
    pub async fn stop(self) {
        let Gateway { running } = self;
        if let Some(edge) = &running.gateway.edge {
            edge.settle().await;
        }
        running.stop.send(true).expect("gateway still running");
        running.task.await.expect("gateway task");
    }
}

/// A call to the admin API listening at `addr` (`host:port`), with
/// `token` as the bearer token.
pub async fn admin_at(addr: &str, token: &str, method: Method, path: &str, body: &str) -> Got {
    let auth = format!("Bearer {token}");
    send(
        method,
        &format!("http://{addr}{path}"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await
}

/// Polls `check` every `every` until it holds; panics naming `what` after
/// `tries` attempts.
pub async fn eventually<F, Fut>(what: &str, tries: usize, every: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..tries {
        if check().await {
            return;
        }
        tokio::time::sleep(every).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A response, whole.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn x_cache(&self) -> &str {
        self.header("x-cache")
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Sends one request and reads the whole response.
pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Got {
    let mut req = Request::new(Full::new(Bytes::from(body.to_string())));
    *req.method_mut() = method;
    *req.uri_mut() = url.parse().expect("url");
    for (k, v) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    let resp = client().request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str) -> Got {
    send(Method::GET, url, &[], "").await
}

pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Got {
    send(Method::GET, url, headers, "").await
}

/// Counts of X-Cache values in a set of responses.
pub fn tally(got: &[Got]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for g in got {
        *m.entry(g.x_cache().to_string()).or_insert(0) += 1;
    }
    m
}

/// A raw TCP origin for faults hyper would never produce: it reads one
/// request head per connection, writes `bytes`, then (if `hang` is set)
/// keeps the connection open that long, and closes.
pub struct RawOrigin {
    pub addr: SocketAddr,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl RawOrigin {
    pub async fn start(bytes: &'static [u8], hang: Duration) -> RawOrigin {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c2 = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = s.write_all(bytes).await;
                    let _ = s.flush().await;
                    tokio::time::sleep(hang).await;
                });
            }
        });
        RawOrigin { addr, connections }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A closed loopback port: connecting to it is refused.
pub async fn refused_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("http://{addr}")
}

/// Sends a request and reads the body; `Err` when the connection was cut.
pub async fn try_get(url: &str) -> Result<Got, String> {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = client().request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Got {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// A self-signed certificate for `localhost` in PEM files, and a client
/// connector that trusts it (HTTP/1.1 by ALPN). The files live as long as
/// this does.
pub struct TestCert {
    _dir: tempfile::TempDir,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub connector: tokio_rustls::TlsConnector,
}

impl TestCert {
    pub fn new() -> TestCert {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).expect("write cert");
        std::fs::write(&key, certified.key_pair.serialize_pem()).expect("write key");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(certified.cert.der().clone())
            .expect("trust the test certificate");
        let mut client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        TestCert {
            _dir: dir,
            cert,
            key,
            connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(client)),
        }
    }

    /// Makes `c`'s listener serve TLS with this certificate.
    pub fn serve(&self, c: &mut Config) {
        c.server.tls_cert = Some(self.cert.clone());
        c.server.tls_key = Some(self.key.clone());
    }
}
