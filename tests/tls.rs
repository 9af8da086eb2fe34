//! The TLS listener: a self-signed certificate, a rustls client that trusts
//! it, HTTP/1.1 over TLS through the gateway to a plain-HTTP origin.

mod common;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[tokio::test]
async fn serves_over_tls_with_certificate_files() {
    let origin =
        Origin::start(|_, n| Reply::ok(&format!("v{n}")).header("cache-control", "max-age=60"))
            .await;
    let tls = TestCert::new();
    let gw = Gateway::start(&origin.url(), |c| tls.serve(c)).await;
    let connector = tls.connector.clone();
    for expected in ["MISS", "HIT"] {
        let tcp = tokio::net::TcpStream::connect(gw.running.addr)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = connector.connect(name, tcp).await.expect("TLS handshake");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("http handshake");
        tokio::spawn(conn);
        let req = http::Request::get("/secure")
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers().get("x-cache").and_then(|v| v.to_str().ok()),
            Some(expected)
        );
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, "v1");
    }
    // The origin saw the client's scheme as https.
    let seen = origin.requests("/secure");
    assert_eq!(
        seen[0]
            .headers
            .get("x-forwarded-proto")
            .map(|v| v.as_bytes()),
        Some(&b"https"[..])
    );
}
