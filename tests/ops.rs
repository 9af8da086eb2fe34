//! Operations over real sockets: probes without a token (GET and HEAD),
//! request ids end to end, reloads through `POST /reload` (routes, flags,
//! TLS certificates; refusals located, the old config kept, the cache
//! kept), and the metrics that count them.

mod common;
use common::*;
use http::Method;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

const TOKEN: &str = "ops-test-token-0123456789";

fn json_of(g: &Got) -> Value {
    serde_json::from_slice(&g.body).unwrap_or(Value::Null)
}

fn admin_url(gw: &Gateway, path: &str) -> String {
    format!(
        "http://{}{path}",
        gw.running.admin_addr.expect("admin runs")
    )
}

async fn admin(gw: &Gateway, method: Method, path: &str) -> Got {
    let auth = format!("Bearer {TOKEN}");
    send(
        method,
        &admin_url(gw, path),
        &[("authorization", &auth)],
        "",
    )
    .await
}

/// A gateway started from `file` the way the binary starts one (flags on
/// top of the file), on ephemeral ports.
async fn from_file(file: &Path, origin: &str) -> Gateway {
    let args = kvgate::cli::RunArgs {
        config: Some(file.to_path_buf()),
        listen: Some("127.0.0.1:0".into()),
        origin: Some(origin.into()),
        admin_listen: Some("127.0.0.1:0".into()),
        ..Default::default()
    };
    let cfg = args.resolve().expect("config resolves");
    let running = kvgate::cli::start(cfg).await.expect("gateway starts");
    Gateway { running }
}

fn config_text(ttl: u64, newui: bool) -> String {
    format!(
        "[admin]\ntoken = \"{TOKEN}\"\n\n[log]\naccess = false\n\n[state]\nbackend = \"memory\"\n\n\
         [[route]]\nname = \"api\"\nprefix = \"/api/\"\nttl_secs = {ttl}\n\n\
         [edge]\n[edge.flags.newUI]\ndefault = {newui}\n"
    )
}

#[tokio::test]
async fn probes_answer_get_and_head_without_a_token() {
    let origin = Origin::start(|_, _| Reply::ok("x")).await;
    let gw = Gateway::start(&origin.url(), |c| {
        c.admin = Some(kvgate::config::AdminConfig {
            listen: toml::Spanned::new(0..0, "127.0.0.1:0".into()),
            token: Some(TOKEN.into()),
            max_body_bytes: 4096,
        });
    })
    .await;
    for path in ["/healthz", "/readyz"] {
        let g = get(&admin_url(&gw, path)).await;
        assert_eq!(g.status, 200, "{path}: {}", g.text());
        let h = send(Method::HEAD, &admin_url(&gw, path), &[], "").await;
        assert_eq!((h.status.as_u16(), h.body.len()), (200, 0), "HEAD {path}");
        let p = send(Method::POST, &admin_url(&gw, path), &[], "").await;
        assert_eq!(p.status, 405, "POST {path}");
    }
    let ready = json_of(&get(&admin_url(&gw, "/readyz")).await);
    assert_eq!(ready["origin"], "ok");
    assert_eq!(ready["state_store"], "none");
    // Everything else still needs the token.
    assert_eq!(get(&admin_url(&gw, "/metrics")).await.status, 401);
    assert_eq!(
        send(Method::POST, &admin_url(&gw, "/reload"), &[], "")
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn the_main_listener_answers_probes_at_configured_paths() {
    let origin = Origin::start(|_, _| Reply::ok("from origin")).await;
    let gw = Gateway::start(&origin.url(), |c| {
        c.server.health_path = Some(toml::Spanned::new(0..0, "/_kvgate/health".into()));
        c.server.ready_path = Some(toml::Spanned::new(0..0, "/_kvgate/ready".into()));
    })
    .await;
    let alive = get(&gw.url("/_kvgate/health")).await;
    assert_eq!(alive.status, 200, "{}", alive.text());
    assert_eq!(json_of(&alive)["status"], "ok");
    assert_eq!(alive.x_cache(), "BYPASS");
    assert!(!alive.header("x-request-id").is_empty());
    let ready = get(&gw.url("/_kvgate/ready")).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(json_of(&ready)["origin"], "ok");
    let head = send(Method::HEAD, &gw.url("/_kvgate/ready"), &[], "").await;
    assert_eq!((head.status.as_u16(), head.body.len()), (200, 0));
    let post = send(Method::POST, &gw.url("/_kvgate/health"), &[], "").await;
    assert_eq!(post.status, 405);
    // Nothing of it reached the origin; other paths still do.
    assert_eq!(
        origin.count("/_kvgate/health") + origin.count("/_kvgate/ready"),
        0
    );
    assert_eq!(get(&gw.url("/other")).await.text(), "from origin");
}

#[tokio::test]
async fn the_main_listeners_ready_path_is_503_when_the_origin_is_down() {
    let gw = Gateway::start(&refused_url().await, |c| {
        c.server.ready_path = Some(toml::Spanned::new(0..0, "/ready".into()));
    })
    .await;
    let r = get(&gw.url("/ready")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(json_of(&r)["status"], "not ready");
}

#[test]
fn probe_paths_must_be_in_normal_form() {
    for bad in ["healthz", "/a/../healthz", "/h%7az", "/h?x=1"] {
        let text = format!("[server]\nhealth_path = \"{bad}\"\n");
        let err = kvgate::config::Config::parse(&text, "k.toml").expect_err(bad);
        assert!(
            err.to_string().contains("server.health_path"),
            "{bad}: {err}"
        );
        assert!(err.to_string().contains("k.toml:2:"), "{bad}: {err}");
    }
    let same = "[server]\nhealth_path = \"/h\"\nready_path = \"/h\"\n";
    let err = kvgate::config::Config::parse(same, "k.toml").expect_err("same path");
    assert!(err.to_string().contains("server.ready_path"), "{err}");
}

#[tokio::test]
async fn readyz_is_503_when_the_origin_cannot_be_reached() {
    let gw = Gateway::start(&refused_url().await, |c| {
        c.admin = Some(kvgate::config::AdminConfig {
            listen: toml::Spanned::new(0..0, "127.0.0.1:0".into()),
            token: None,
            max_body_bytes: 4096,
        });
    })
    .await;
    let r = get(&admin_url(&gw, "/readyz")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        json_of(&r)["origin"]
            .as_str()
            .unwrap_or("")
            .starts_with("cannot connect"),
        "{}",
        r.text()
    );
    assert_eq!(get(&admin_url(&gw, "/healthz")).await.status, 200);
}

#[tokio::test]
async fn request_ids_are_kept_or_made_and_reach_the_origin() {
    let origin = Origin::start(|_, _| Reply::ok("x")).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    let mine = get_with(&gw.url("/a"), &[("x-request-id", "client-id-42")]).await;
    assert_eq!(mine.header("x-request-id"), "client-id-42");
    let made = get(&gw.url("/b")).await;
    let id = made.header("x-request-id").to_string();
    assert_eq!(id.len(), 24, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let bad = get_with(&gw.url("/c"), &[("x-request-id", "no spaces <allowed>")]).await;
    assert_ne!(bad.header("x-request-id"), "no spaces <allowed>");
    assert_eq!(bad.header("x-request-id").len(), 24);
    let seen = |p: &str| {
        origin.requests(p)[0]
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(seen("/a"), "client-id-42");
    assert_eq!(seen("/b"), id);
    assert_eq!(seen("/c"), bad.header("x-request-id"));
    // Gateway-made answers carry one too (a refusal here).
    let refused = get(&gw.url("/../x")).await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.header("x-request-id").len(), 24);
    // Ids differ per request.
    assert_ne!(get(&gw.url("/b")).await.header("x-request-id"), id);
}

#[tokio::test]
async fn reload_applies_routes_and_flags_keeps_the_cache_and_refuses_bad_configs() {
    let origin = Origin::start(|s, n| {
        let flags = s
            .headers
            .get("x-feature-flags")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Reply::ok(&format!("{} v{n} [{flags}]", s.path))
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kvgate.toml");
    std::fs::write(&file, config_text(60, false)).expect("write");
    let gw = from_file(&file, &origin.url()).await;

    let first = get(&gw.url("/api/one")).await;
    assert_eq!(first.x_cache(), "MISS");
    assert!(first.text().contains("newui=?0"), "{}", first.text());
    assert_eq!(get(&gw.url("/api/one")).await.x_cache(), "HIT");

    // A route TTL of 0 and the flag on.
    std::fs::write(&file, config_text(0, true)).expect("write");
    let r = admin(&gw, Method::POST, "/reload").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json_of(&r)["status"], "reloaded");
    // The memory cache survived the reload...
    assert_eq!(get(&gw.url("/api/one")).await.x_cache(), "HIT");
    // ...and new entries follow the new rules.
    let two = get(&gw.url("/api/two")).await;
    assert!(two.text().contains("newui"), "{}", two.text());
    assert!(!two.text().contains("newui=?0"), "{}", two.text());
    assert_ne!(get(&gw.url("/api/two")).await.x_cache(), "HIT");

    // An invalid file is refused, located, and the running config stays.
    std::fs::write(
        &file,
        format!("{}\n[cache]\nshards = 0\n", config_text(60, false)),
    )
    .expect("write");
    let r = admin(&gw, Method::POST, "/reload").await;
    assert_eq!(r.status, 422, "{}", r.text());
    let error = json_of(&r)["error"].as_str().unwrap_or("").to_string();
    assert!(
        error.contains("kvgate.toml:20:1") && error.contains("cache.shards"),
        "{error}"
    );
    let three = get(&gw.url("/api/three")).await;
    assert!(
        !three.text().contains("newui=?0"),
        "still the reloaded flag"
    );

    // A changed listen address is named as needing a restart.
    std::fs::write(
        &file,
        format!("[server]\nmax_connections = 5\n{}", config_text(0, true)),
    )
    .expect("write");
    let r = admin(&gw, Method::POST, "/reload").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        json_of(&r)["needs_restart"],
        serde_json::json!(["server.max_connections"])
    );

    let m = admin(&gw, Method::GET, "/metrics").await.text();
    assert!(m.contains("kvgate_reloads_total{result=\"ok\"} 2"), "{m}");
    assert!(
        m.contains("kvgate_reloads_total{result=\"refused\"} 1"),
        "{m}"
    );
    assert!(m.contains("kvgate_build_info{version="), "{m}");
    assert!(m.contains("process_resident_memory_bytes "), "{m}");
    assert!(m.contains("kvgate_connections_accepted_total "), "{m}");
}

/// The leaf certificate a TLS client is shown by `addr`.
async fn served_certificate(addr: std::net::SocketAddr) -> Vec<u8> {
    #[derive(Debug)]
    struct AcceptAny;
    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let (_, conn) = tls.get_ref();
    conn.peer_certificates().expect("certificates")[0].to_vec()
}

fn write_pair(dir: &Path, name: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![name.into(), "localhost".into()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    std::fs::write(dir.join("cert.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write");
    cert.der().to_vec()
}

#[tokio::test]
async fn reload_swaps_the_tls_certificate_for_new_connections() {
    let origin = Origin::start(|_, _| Reply::ok("x")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let first = write_pair(dir.path(), "first.test");
    let file = dir.path().join("kvgate.toml");
    let text = format!(
        "[server]\ntls_cert = {:?}\ntls_key = {:?}\n[admin]\ntoken = \"{TOKEN}\"\n",
        dir.path().join("cert.pem"),
        dir.path().join("key.pem")
    );
    std::fs::write(&file, &text).expect("write");
    let gw = from_file(&file, &origin.url()).await;
    assert_eq!(served_certificate(gw.running.addr).await, first);

    let second = write_pair(dir.path(), "second.test");
    assert_ne!(first, second);
    let r = admin(&gw, Method::POST, "/reload").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(served_certificate(gw.running.addr).await, second);

    // A broken key is refused with its location; the second pair stays.
    std::fs::write(dir.path().join("key.pem"), "not a key").expect("write");
    let r = admin(&gw, Method::POST, "/reload").await;
    assert_eq!(r.status, 422, "{}", r.text());
    let error = json_of(&r)["error"].as_str().unwrap_or("").to_string();
    assert!(error.contains("kvgate.toml:3:1: server.tls_key"), "{error}");
    assert_eq!(served_certificate(gw.running.addr).await, second);
}

#[tokio::test]
async fn the_health_subcommand_reports_the_admin_probe() {
    let origin = Origin::start(|_, _| Reply::ok("x")).await;
    let gw = Gateway::start(&origin.url(), |c| {
        c.admin = Some(kvgate::config::AdminConfig {
            listen: toml::Spanned::new(0..0, "127.0.0.1:0".into()),
            token: Some(TOKEN.into()),
            max_body_bytes: 4096,
        });
    })
    .await;
    let health = |addr: String| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(["health", "--admin", &addr])
            .output()
            .await
            .expect("run kvgate")
    };
    let admin = gw.running.admin_addr.expect("admin runs").to_string();
    let up = health(admin).await;
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    // A closed port fails.
    let down = health(
        refused_url()
            .await
            .trim_start_matches("http://")
            .to_string(),
    )
    .await;
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot connect"));
}
