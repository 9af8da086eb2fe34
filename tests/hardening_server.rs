//! Listener hardening over real sockets: silent and idle connections give
//! their slot back in bounded time, and hostile Range values on a stored
//! response never panic the connection.

mod common;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Short limits so the tests are quick; each test states which one it is
/// about by making the other one long.
const SHORT_MS: u64 = 300;
const LONG_MS: u64 = 10_000;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn gateway(origin: &str, header_read_ms: u64, idle_ms: u64, max_conn: usize) -> Gateway {
    Gateway::start(origin, |c| {
        c.server.header_read_timeout_ms = header_read_ms;
        c.server.idle_timeout_ms = idle_ms;
        c.server.max_connections = max_conn;
    })
    .await
}

/// Reads (and discards) until the peer closes; how long that took, or
/// `None` if it was still open after `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let wait = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // e.g. the server's own SETTINGS frame
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .ok()
        .map(|_| start.elapsed())
}

#[tokio::test]
async fn silent_connection_is_closed_after_header_read_timeout() {
    let origin = Origin::start(|_, _| Reply::ok("x")).await;
    let gw = gateway(&origin.url(), SHORT_MS, LONG_MS, 100).await;
    let mut s = TcpStream::connect(gw.running.addr).await.expect("connect");
    // Before the fix this socket stayed open for good: protocol detection
    // waited for 24 bytes with no timer.
    let took = closed_within(&mut s, Duration::from_secs(3))
        .await
        .expect("a silent connection must be closed");
    assert!(took >= Duration::from_millis(SHORT_MS - 50), "{took:?}");
}

#[tokio::test]
async fn h2_preface_only_connection_is_closed_after_header_read_timeout() {
    let origin = Origin::start(|_, _| Reply::ok("x")).await;
    let gw = gateway(&origin.url(), SHORT_MS, LONG_MS, 100).await;
    let mut s = TcpStream::connect(gw.running.addr).await.expect("connect");
    s.write_all(H2_PREFACE).await.expect("preface");
    let took = closed_within(&mut s, Duration::from_secs(3))
        .await
        .expect("a preface-only connection must be closed");
    assert!(took >= Duration::from_millis(SHORT_MS - 50), "{took:?}");
}

#[tokio::test]
async fn h2_settings_but_no_request_is_closed_after_header_read_timeout() {
    let origin = Origin::start(|_, _| Reply::ok("x")).await;
    let gw = gateway(&origin.url(), SHORT_MS, LONG_MS, 100).await;
    let mut s = TcpStream::connect(gw.running.addr).await.expect("connect");
    s.write_all(H2_PREFACE).await.expect("preface");
    // An empty SETTINGS frame (RFC 9113 6.5): length 0, type 4, no flags,
    // stream 0. The handshake completes; no stream is ever opened.
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .expect("settings");
    closed_within(&mut s, Duration::from_secs(3))
        .await
        .expect("an h2 connection without a request must be closed");
}

#[tokio::test]
async fn silent_connections_do_not_lock_out_real_clients() {
    let origin = Origin::start(|_, _| Reply::ok("served")).await;
    let gw = gateway(&origin.url(), SHORT_MS, LONG_MS, 2).await;
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(gw.running.addr).await.expect("connect"));
    }
    // Let the gateway accept both, then show the limit really is reached:
    // a third connection's request is closed unanswered.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(gw.running.addr).await.expect("connect");
    let _ = third.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let answer = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
        .await
        .expect("closed, not left hanging");
    assert!(
        matches!(answer, Ok(0) | Err(_)),
        "the connection limit was not reached: {:?}",
        answer.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    // Once the silent ones time out, their slots are free again.
    for s in &mut silent {
        closed_within(s, Duration::from_secs(3))
            .await
            .expect("silent connection closed");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let got = try_get(&gw.url("/after"))
        .await
        .expect("a real client gets in");
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "served");
}

#[tokio::test]
async fn idle_h1_keep_alive_connection_is_closed_after_idle_timeout() {
    let origin = Origin::start(|_, _| Reply::ok("hello")).await;
    // header_read_timeout is long: hyper would otherwise close the idle
    // connection at that deadline, which is not what this test is about.
    let gw = gateway(&origin.url(), LONG_MS, SHORT_MS, 100).await;
    let mut s = TcpStream::connect(gw.running.addr).await.expect("connect");
    // Idle time starts once the request is over: at least idle_timeout
    // passes between sending it and the close.
    let start = Instant::now();
    s.write_all(b"GET /ka HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("request");
    // Read the whole response (Content-Length framed, kept alive).
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"hello") {
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "closed before the response: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    closed_within(&mut s, Duration::from_secs(3))
        .await
        .expect("an idle keep-alive connection must be closed");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(SHORT_MS), "{took:?}");
}

#[tokio::test]
async fn idle_h2_connection_is_closed_after_idle_timeout() {
    let origin = Origin::start(|_, _| Reply::ok("h2 body")).await;
    let gw = gateway(&origin.url(), LONG_MS, SHORT_MS, 100).await;
    let tcp = TcpStream::connect(gw.running.addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    let driver = tokio::spawn(conn);
    let req = http::Request::get(gw.url("/h2"))
        .body(Empty::<Bytes>::new())
        .expect("request");
    // Idle time only starts once the request is over, so at least
    // idle_timeout passes between sending it and the close.
    let start = Instant::now();
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "h2 body");
    // No stream open now: the gateway must close the connection, which
    // ends the client's connection driver.
    // The driver's own result (clean close or reset) does not matter here.
    let _ = tokio::time::timeout(Duration::from_secs(3), driver)
        .await
        .expect("an idle h2 connection must be closed")
        .expect("driver task");
    assert!(start.elapsed() >= Duration::from_millis(SHORT_MS));
}

#[tokio::test]
async fn slow_response_is_not_cut_by_the_idle_timeout() {
    // The origin takes longer than idle_timeout: a request in flight must
    // keep its connection, however quiet the socket is meanwhile.
    let origin = Origin::start(|_, _| Reply::ok("late").delay(Duration::from_millis(900))).await;
    let gw = gateway(&origin.url(), SHORT_MS, SHORT_MS, 100).await;
    let got = try_get(&gw.url("/slow")).await.expect("slow response");
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "late");
}

#[tokio::test]
async fn shutdown_closes_idle_and_silent_connections_without_waiting_the_grace() {
    let origin = Origin::start(|_, _| Reply::ok("hello")).await;
    let gw = Gateway::start(&origin.url(), |c| {
        c.server.header_read_timeout_ms = LONG_MS;
        c.server.idle_timeout_ms = LONG_MS;
        c.server.shutdown_grace_ms = LONG_MS;
    })
    .await;
    // One kept-alive connection after a request, one that never spoke.
    let mut idle = TcpStream::connect(gw.running.addr).await.expect("connect");
    idle.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("request");
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).await.expect("response");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let mut silent = TcpStream::connect(gw.running.addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let _ = gw.running.stop.send(true);
    // Neither has anything in flight, so the drain ends at once instead of
    // after shutdown_grace_ms (or header_read_timeout_ms for the silent one).
    tokio::time::timeout(Duration::from_secs(3), gw.running.task)
        .await
        .expect("the gateway stops well inside the grace period")
        .expect("serve task");
    assert!(start.elapsed() < Duration::from_secs(3));
    for s in [&mut idle, &mut silent] {
        closed_within(s, Duration::from_secs(1))
            .await
            .expect("connection closed by shutdown");
    }
}

/// A 100-byte cacheable body, stored by one MISS.
async fn stored_hundred_bytes() -> (Origin, Gateway, Vec<u8>) {
    let body: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
    let text = String::from_utf8(body.clone()).expect("ascii");
    let origin =
        Origin::start(move |_, _| Reply::ok(&text).header("cache-control", "max-age=600")).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    let first = get(&gw.url("/r")).await;
    assert_eq!(first.x_cache(), "MISS");
    assert_eq!(first.body.len(), 100);
    (origin, gw, body)
}

#[tokio::test]
async fn huge_range_ends_are_clamped_to_the_stored_length() {
    let (origin, gw, body) = stored_hundred_bytes().await;
    // RFC 9110 14.1.2: a last-pos at or past the length means "to the end".
    for (range, first) in [
        ("bytes=5-18446744073709551615", 5usize),
        ("bytes=0-18446744073709551615", 0),
        ("bytes=99-18446744073709551615", 99),
        ("bytes=7-99999999999999999999999", 7),
    ] {
        let got = try_get_with(&gw.url("/r"), &[("range", range)])
            .await
            .unwrap_or_else(|e| panic!("{range}: connection failed: {e}"));
        assert_eq!(got.status, 206, "{range}");
        assert_eq!(
            got.header("content-range"),
            format!("bytes {first}-99/100"),
            "{range}"
        );
        assert_eq!(&got.body[..], &body[first..], "{range}");
    }
    // A suffix longer than the body is the whole body (14.1.2).
    let got = get_with(&gw.url("/r"), &[("range", "bytes=-99999999999999999999")]).await;
    assert_eq!(got.status, 206);
    assert_eq!(got.header("content-range"), "bytes 0-99/100");
    assert_eq!(&got.body[..], &body[..]);
    assert_eq!(origin.count("/r"), 1, "all answered from the stored entry");
}

#[tokio::test]
async fn junk_ranges_get_the_whole_body_or_416_never_a_broken_connection() {
    let (origin, gw, body) = stored_hundred_bytes().await;
    for range in [
        "bytes=99999999999999999999-",
        "bytes=18446744073709551615-18446744073709551615",
        "bytes=100-",
        "bytes=-0",
        "bytes=-",
        "bytes=--1",
        "bytes=+1-2",
        "bytes=5-4",
        "bytes=0-1,2-3",
        "bytes=1-2-3",
        "bytes=0-1\t",
        "bytes=0-0x10",
        "bytes= 1 - 2 ",
        "items=0-1",
        "bytes=18446744073709551616-1",
        "bytes=-18446744073709551616",
    ] {
        let got = try_get_with(&gw.url("/r"), &[("range", range)])
            .await
            .unwrap_or_else(|e| panic!("{range:?}: connection failed: {e}"));
        match got.status.as_u16() {
            200 => assert_eq!(&got.body[..], &body[..], "{range:?}"),
            416 => assert_eq!(got.header("content-range"), "bytes */100", "{range:?}"),
            // A suffix past u64 is still "all of it" (RFC 9110 14.1.2), and
            // whitespace around the one range is OWS.
            206 if range == "bytes=-18446744073709551616" => {
                assert_eq!(got.header("content-range"), "bytes 0-99/100")
            }
            206 if range == "bytes=0-1\t" => {
                assert_eq!(got.header("content-range"), "bytes 0-1/100");
                assert_eq!(&got.body[..], &body[..2]);
            }
            s => panic!("{range:?}: unexpected {s}"),
        }
    }
    assert_eq!(origin.count("/r"), 1);
}

/// Like `try_get`, with request headers.
async fn try_get_with(url: &str, headers: &[(&str, &str)]) -> Result<Got, String> {
    let mut req = http::Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(Bytes::new()))
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

#[tokio::test]
async fn tls_handshake_is_bounded_by_header_read_timeout() {
    let origin = Origin::start(|_, _| Reply::ok("x")).await;
    let tls = TestCert::new();
    let gw = Gateway::start(&origin.url(), |c| {
        tls.serve(c);
        c.server.header_read_timeout_ms = SHORT_MS;
    })
    .await;
    // A client that connects and never says hello: the handshake used to
    // get a fixed 10 s.
    let mut s = TcpStream::connect(gw.running.addr).await.expect("connect");
    closed_within(&mut s, Duration::from_secs(3))
        .await
        .expect("a silent TLS connection must be closed");
}
