//! Origins over real sockets: an https origin verified against a CA made
//! here (and refused without it), two servers with one killed (traffic
//! moves, no 5xx), active health checks taking a server out and bringing
//! it back, per-route origins, and a reload that replaces the health checks.

mod common;
use bytes::Bytes;
use common::*;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kvgate::config::{Config, OriginHealthConfig};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use toml::Spanned;

/// An origin server that can be killed (listener and open connections
/// closed) and started again on the same port. It answers `name` with
/// `no-store` (so every request reaches an origin) and `/healthz` with 200
/// or 503 as `healthy` says.
struct Server {
    addr: SocketAddr,
    name: &'static str,
    tls: Option<Arc<rustls::ServerConfig>>,
    healthy: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    /// Health-check paths seen, in order.
    probes: Arc<Mutex<Vec<String>>>,
    stop: watch::Sender<bool>,
}

impl Server {
    async fn start(name: &'static str) -> Server {
        Server::start_tls(name, None).await
    }

    async fn start_tls(name: &'static str, tls: Option<Arc<rustls::ServerConfig>>) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut s = Server {
            addr: listener.local_addr().expect("addr"),
            name,
            tls,
            healthy: Arc::new(AtomicBool::new(true)),
            hits: Arc::default(),
            probes: Arc::default(),
            stop: watch::channel(false).0,
        };
        s.serve(listener);
        s
    }

    /// Starts again on the same port after `kill`.
    async fn revive(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("bind the same port again");
        self.serve(listener);
    }

    fn kill(&self) {
        self.stop.send_replace(true);
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (stop, _) = watch::channel(false);
        self.stop = stop;
        let mut stopped = self.stop.subscribe();
        let (name, healthy, hits, probes) = (
            self.name,
            self.healthy.clone(),
            self.hits.clone(),
            self.probes.clone(),
        );
        let acceptor = self.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let conn_stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => return,
                    },
                };
                let (healthy, hits, probes) = (healthy.clone(), hits.clone(), probes.clone());
                let acceptor = acceptor.clone();
                let mut conn_stopped = conn_stop.subscribe();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let path = req.uri().path().to_string();
                        let answer = if path.ends_with("healthz") {
                            probes.lock().expect("lock").push(path);
                            let ok = healthy.load(Ordering::SeqCst);
                            Response::builder()
                                .status(if ok { 200 } else { 503 })
                                .body(Full::new(Bytes::from_static(b"health")))
                        } else {
                            hits.fetch_add(1, Ordering::SeqCst);
                            Response::builder()
                                .header("cache-control", "no-store")
                                .body(Full::new(Bytes::from(name)))
                        };
                        async move { Ok::<_, Infallible>(answer.expect("response")) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let serving = async {
                        match acceptor {
                            None => {
                                let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                            }
                            Some(a) => {
                                if let Ok(tls) = a.accept(tcp).await {
                                    let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = serving => {}
                        // Killed: the connection closes with the task.
                        _ = conn_stopped.wait_for(|s| *s) => {}
                    }
                });
            }
        });
    }
}

/// A gateway on an ephemeral port from `cfg`.
async fn gateway(mut cfg: Config) -> Gateway {
    cfg.server.listen = Spanned::new(0..0, "127.0.0.1:0".into());
    cfg.log.access = false;
    let running = kvgate::cli::start(cfg).await.expect("gateway starts");
    Gateway { running }
}

fn servers(list: &[&Server]) -> Vec<Spanned<String>> {
    list.iter().map(|s| Spanned::new(0..0, s.url())).collect()
}

/// Fast health checks for the tests.
fn health(path: &str) -> OriginHealthConfig {
    OriginHealthConfig {
        path: Spanned::new(0..0, path.into()),
        interval_ms: 40,
        timeout_ms: 500,
        healthy_threshold: 2,
        unhealthy_threshold: 2,
    }
}

/// `n` GETs of distinct paths; the statuses and bodies.
async fn gets(gw: &Gateway, n: usize, tag: &str) -> Vec<(u16, String)> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let g = get(&gw.url(&format!("/{tag}/{i}"))).await;
        out.push((g.status.as_u16(), g.text()));
    }
    out
}

/// Polls `cond` every 20 ms for up to `limit`.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test]
async fn https_origin_is_verified_against_the_configured_ca() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server config");
    let origin = Server::start_tls("over tls", Some(Arc::new(tls))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");
    // By name: SNI and the certificate check use "localhost".
    let url = format!("https://localhost:{}", origin.addr.port());

    let mut cfg = Config::default();
    cfg.origin.url = Spanned::new(0..0, url.clone());
    cfg.origin.ca_file = Some(Spanned::new(0..0, ca_file.clone()));
    let trusted = gateway(cfg).await;
    let g = get(&trusted.url("/secure")).await;
    assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "over tls"));

    // The web roots do not know this CA: verification fails, 502.
    let mut cfg = Config::default();
    cfg.origin.url = Spanned::new(0..0, url);
    let untrusted = gateway(cfg).await;
    let g = get(&untrusted.url("/secure")).await;
    assert_eq!(g.status, 502, "{}", g.text());
    assert!(g.text().contains("certificate"), "{}", g.text());

    // A name the certificate does not carry fails too, with the CA.
    let mut cfg = Config::default();
    cfg.origin.url = Spanned::new(0..0, format!("https://127.0.0.1:{}", origin.addr.port()));
    cfg.origin.ca_file = Some(Spanned::new(0..0, ca_file));
    let wrong_name = gateway(cfg).await;
    assert_eq!(get(&wrong_name.url("/secure")).await.status, 502);
    assert_eq!(origin.hits(), 1, "only the verified connection got through");
}

#[tokio::test]
async fn a_killed_server_loses_its_traffic_without_a_5xx() {
    let a = Server::start("a").await;
    let mut b = Server::start("b").await;
    let mut cfg = Config::default();
    cfg.origin.servers = servers(&[&a, &b]);
    cfg.origin.eject_after_failures = 1;
    cfg.origin.eject_ms = 60_000;
    cfg.admin = Some(kvgate::config::AdminConfig {
        listen: Spanned::new(0..0, "127.0.0.1:0".into()),
        token: None,
        max_body_bytes: 4096,
    });
    let gw = gateway(cfg).await;
    let before = gets(&gw, 20, "warm").await;
    assert!(before.iter().all(|(s, _)| *s == 200), "{before:?}");
    // Round robin: both take traffic.
    assert_eq!((a.hits(), b.hits()), (10, 10));

    a.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The first request that meets the dead server is retried on the other
    // (a GET, nothing sent); from then on the dead one is ejected.
    let after = gets(&gw, 30, "after").await;
    assert!(
        after.iter().all(|(s, body)| *s == 200 && body == "b"),
        "{after:?}"
    );
    assert_eq!(a.hits(), 10);
    // Not retried, but not sent to the ejected server either.
    for i in 0..10 {
        let p = send(Method::POST, &gw.url(&format!("/post/{i}")), &[], "x").await;
        assert_eq!((p.status.as_u16(), p.text().as_str()), (200, "b"));
    }
    let admin = gw.running.admin_addr.expect("admin");
    let ready = get(&format!("http://{admin}/readyz")).await;
    let ready: serde_json::Value = serde_json::from_slice(&ready.body).expect("json");
    assert_eq!(ready["origin"], "ok", "{ready}");
    assert_eq!(ready["origin_servers"][0]["state"], "ejected", "{ready}");
    assert_eq!(ready["origin_servers"][1]["state"], "up", "{ready}");

    // Both down: 502 (and both ejected)...
    b.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(get(&gw.url("/both-down")).await.status, 502);
    // ...yet one is still tried, so a server that is back answers at once,
    // long before its 60 s ejection ends.
    b.revive().await;
    let g = get(&gw.url("/b-is-back")).await;
    assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "b"));
}

#[tokio::test]
async fn only_idempotent_requests_are_retried_on_another_server() {
    let a = Server::start("a").await;
    let b = Server::start("b").await;
    let mut cfg = Config::default();
    cfg.origin.servers = servers(&[&a, &b]);
    // Never ejected: every other request meets the dead server.
    cfg.origin.eject_after_failures = 0;
    let gw = gateway(cfg).await;
    a.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let got = gets(&gw, 10, "g").await;
    assert!(got.iter().all(|(s, _)| *s == 200), "{got:?}");
    let mut statuses = Vec::new();
    for i in 0..10 {
        let p = send(Method::POST, &gw.url(&format!("/post/{i}")), &[], "x").await;
        statuses.push(p.status.as_u16());
    }
    // Half the POSTs went to the dead server: 502, not replayed elsewhere.
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
}

#[tokio::test]
async fn health_checks_take_a_server_out_and_bring_it_back() {
    let mut a = Server::start("a").await;
    let b = Server::start("b").await;
    let mut cfg = Config::default();
    cfg.origin.servers = servers(&[&a, &b]);
    cfg.origin.health = Some(health("/healthz"));
    // Passive ejection long enough that only the health check can end it.
    cfg.origin.eject_after_failures = 1;
    cfg.origin.eject_ms = 60_000;
    let gw = gateway(cfg).await;

    // Unhealthy but answering: out of rotation once the checks say so.
    a.healthy.store(false, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(5), || a.probes.lock().unwrap().len()
            >= 3)
        .await
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let hits = a.hits();
    let got = gets(&gw, 10, "sick").await;
    assert!(got.iter().all(|(s, b)| *s == 200 && b == "b"), "{got:?}");
    assert_eq!(a.hits(), hits);
    a.healthy.store(true, Ordering::SeqCst);
    let mut back = false;
    for round in 0..100 {
        gets(&gw, 2, &format!("healed{round}")).await;
        if a.hits() > hits {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(back, "the health check brought the server back");

    // Killed: ejected at its first failure (no 5xx: the GET is retried).
    a.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let got = gets(&gw, 10, "dead").await;
    assert!(got.iter().all(|(s, b)| *s == 200 && b == "b"), "{got:?}");
    // Back on its port: the checks end the 60 s ejection within moments.
    a.revive().await;
    let hits = a.hits();
    let started = Instant::now();
    let mut back = false;
    while started.elapsed() < Duration::from_secs(10) {
        let got = gets(&gw, 2, "revived").await;
        assert!(got.iter().all(|(s, _)| *s == 200), "{got:?}");
        if a.hits() > hits {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(back, "a revived server is back in rotation");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_route_names_its_origin() {
    let default = Server::start("default").await;
    let api = Server::start("api").await;
    let src = format!(
        "[origin]\nurl = \"{}\"\n\n[origins.api]\nservers = [\"{}\"]\n\n\
         [[route]]\nname = \"api\"\nprefix = \"/api/\"\norigin = \"api\"\n\n\
         [[route]]\nname = \"static\"\nprefix = \"/static/\"\n",
        default.url(),
        api.url()
    );
    let cfg = Config::parse(&src, "origins.toml").expect("config");
    let gw = gateway(cfg).await;
    for (path, from) in [
        ("/api/users", "api"),
        ("/static/app.js", "default"),
        ("/", "default"),
        ("/api/v2/x", "api"),
    ] {
        let g = get(&gw.url(path)).await;
        assert_eq!(
            (g.status.as_u16(), g.text().as_str()),
            (200, from),
            "{path}"
        );
    }
    let p = send(Method::POST, &gw.url("/api/orders"), &[], "{}").await;
    assert_eq!(p.text(), "api", "passes follow the route too");
    assert_eq!((api.hits(), default.hits()), (3, 2));
}

#[tokio::test]
async fn a_reload_replaces_the_health_checks() {
    const TOKEN: &str = "origins-test-token-0123456789";
    let a = Server::start("a").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kvgate.toml");
    let text = |path: &str| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n[log]\naccess = false\n\n\
             [origin]\nurl = \"{}\"\n\n[origin.health]\npath = \"{path}\"\ninterval_ms = 20\n",
            a.url()
        )
    };
    std::fs::write(&file, text("/old-healthz")).expect("write");
    let args = kvgate::cli::RunArgs {
        config: Some(file.clone()),
        listen: Some("127.0.0.1:0".into()),
        ..Default::default()
    };
    let cfg = args.resolve().expect("config resolves");
    let gw = Gateway {
        running: kvgate::cli::start(cfg).await.expect("gateway starts"),
    };
    let count = |p: &str| a.probes.lock().unwrap().iter().filter(|x| *x == p).count();
    assert!(eventually(Duration::from_secs(5), || count("/old-healthz") >= 3).await);

    std::fs::write(&file, text("/new-healthz")).expect("write");
    let admin = gw.running.admin_addr.expect("admin");
    let auth = format!("Bearer {TOKEN}");
    let r = send(
        Method::POST,
        &format!("http://{admin}/reload"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(eventually(Duration::from_secs(5), || count("/new-healthz") >= 3).await);
    // The first generation's checks stopped (one may have been in flight).
    let old = count("/old-healthz");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(count("/old-healthz") <= old + 1, "old checks go on");
    assert_eq!(get(&gw.url("/x")).await.text(), "a");
}
