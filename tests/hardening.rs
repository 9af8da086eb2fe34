//! A shared cache that cannot be turned against its users: leaks between
//! users, poisoned entries, request-target tricks, origin framing and
//! resource bounds, each over real sockets against a real origin.

mod common;
use common::*;
use kvgate::cache::Storage;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends raw bytes on a fresh connection and reads until the server closes
/// or `Connection: close` answers are done; returns what came back.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(raw: &str) -> u16 {
    raw.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

// 1. A 304 merged into a stored entry must not carry the revalidating
// client's Set-Cookie to everyone else.
#[tokio::test]
async fn set_cookie_from_a_304_goes_to_the_revalidating_client_only() {
    let origin = Origin::start(|s, _| {
        if s.headers.contains_key("if-none-match") {
            Reply::ok("")
                .status(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=60")
                .header("set-cookie", "sid=revalidator-secret")
        } else {
            Reply::ok("page")
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=0")
        }
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    assert_eq!(get(&gw.url("/p")).await.x_cache(), "MISS");
    let reval = get(&gw.url("/p")).await;
    assert_eq!(reval.x_cache(), "REVALIDATED");
    assert_eq!(reval.header("set-cookie"), "sid=revalidator-secret");
    let other = get(&gw.url("/p")).await;
    assert_eq!(other.x_cache(), "HIT");
    assert_eq!(other.text(), "page");
    assert!(
        !other.headers.contains_key("set-cookie"),
        "a later HIT got the revalidator's cookie"
    );
}

// 1b. After a 304 merge the entry is checked again: a 304 that says
// `private` (or no-store) takes the entry out of the shared cache.
#[tokio::test]
async fn a_304_that_makes_the_entry_private_drops_it() {
    let origin = Origin::start(|s, _| {
        if s.headers.contains_key("if-none-match") {
            Reply::ok("")
                .status(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "private, max-age=60")
        } else {
            Reply::ok("page")
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=0")
        }
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/p")).await;
    let reval = get(&gw.url("/p")).await;
    assert_eq!(reval.status, 200);
    assert!(reval.header("cache-status").contains("detail=private"));
    let after = get(&gw.url("/p")).await;
    assert_eq!(after.x_cache(), "MISS", "the private entry is still shared");
    assert_eq!(origin.count("/p"), 3);
}

// 2. Forwarding headers a client sends never reach the origin (they are
// not in the key; a reflected value would poison the entry).
#[tokio::test]
async fn client_forwarding_headers_are_replaced_by_kvgates_own() {
    let origin = Origin::start(|_, _| Reply::ok("x").header("cache-control", "max-age=60")).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    let evil = [
        ("x-forwarded-host", "evil.example"),
        ("x-host", "evil.example"),
        ("x-forwarded-server", "evil.example"),
        ("x-forwarded-scheme", "javascript"),
        ("x-forwarded-port", "666"),
        ("x-forwarded-prefix", "/evil"),
        ("forwarded", "host=evil.example"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-http-method-override", "DELETE"),
        ("x-forwarded-for", "1.2.3.4"),
        ("x-forwarded-proto", "https"),
        ("x-real-ip", "1.2.3.4"),
    ];
    get_with(&gw.url("/f"), &evil).await;
    let seen = &origin.requests("/f")[0].headers;
    for (name, value) in evil {
        let got = seen.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(!got.contains(value), "{name}: {got:?} reached the origin");
    }
    assert_eq!(seen.get("x-forwarded-for").unwrap(), "127.0.0.1");
    assert_eq!(seen.get("x-forwarded-proto").unwrap(), "http");
    let host = seen.get("x-forwarded-host").unwrap().to_str().unwrap();
    assert_eq!(host, gw.running.addr.to_string());
}

#[tokio::test]
async fn a_trusted_proxy_keeps_its_forwarded_for_and_proto() {
    let origin = Origin::start(|_, _| Reply::ok("x")).await;
    let gw = Gateway::start(&origin.url(), |c| {
        c.server.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    get_with(
        &gw.url("/t"),
        &[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
        ],
    )
    .await;
    let seen = &origin.requests("/t")[0].headers;
    assert_eq!(
        seen.get("x-forwarded-for").unwrap(),
        "203.0.113.9, 127.0.0.1"
    );
    assert_eq!(seen.get("x-forwarded-proto").unwrap(), "https");
    assert_ne!(seen.get("x-forwarded-host").unwrap(), "evil.example");
}

// 2b. An absolute-form request names its authority in the target; Host and
// X-Forwarded-Host sent beside it must not reach the origin.
#[tokio::test]
async fn absolute_form_requests_use_the_targets_authority() {
    let origin = Origin::start(|_, _| Reply::ok("x").header("cache-control", "max-age=60")).await;
    let gw = Gateway::start(&origin.url(), |c| c.origin.preserve_host = true).await;
    let r = raw(
        gw.running.addr,
        "GET http://api.example/abs HTTP/1.1\r\nHost: other.example\r\n\
         X-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&r), 200, "{r}");
    let seen = &origin.requests("/abs")[0].headers;
    assert_eq!(seen.get("host").unwrap(), "api.example");
    assert_eq!(seen.get("x-forwarded-host").unwrap(), "api.example");
}

// 3. RFC 9112 3.2: HTTP/1.1 without Host (or with two) is a 400.
#[tokio::test]
async fn http11_without_host_is_refused() {
    let origin = Origin::start(|_, _| Reply::ok("x")).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    for head in [
        "GET /nohost HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /twohosts HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        "GET /badhost HTTP/1.1\r\nHost: user@evil\r\nConnection: close\r\n\r\n",
    ] {
        let r = raw(gw.running.addr, head).await;
        assert_eq!(status_of(&r), 400, "{head:?}: {r}");
    }
    // HTTP/1.0 has no Host requirement.
    let r = raw(gw.running.addr, "GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(status_of(&r), 200, "{r}");
    assert_eq!(origin.total(), 1, "refused requests reached the origin");
}

// Beyond the list: a reverse proxy tunnels nothing and echoes nothing.
#[tokio::test]
async fn connect_and_trace_are_refused() {
    let origin = Origin::start(|_, _| Reply::ok("x")).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    for head in [
        "TRACE / HTTP/1.1\r\nHost: x\r\nCookie: sid=1\r\nConnection: close\r\n\r\n",
        "CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\n\r\n",
    ] {
        let r = raw(gw.running.addr, head).await;
        assert_eq!(status_of(&r), 405, "{head:?}: {r}");
    }
    // A request with both Content-Length and Transfer-Encoding never
    // reaches the origin as two requests (smuggling).
    let r = raw(
        gw.running.addr,
        "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
         0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    // hyper reads the chunked body (Transfer-Encoding wins, RFC 9112 6.3),
    // answers, and closes instead of reading what follows as a request.
    assert_eq!(status_of(&r), 200, "{r}");
    assert!(r.contains("connection: close"), "{r}");
    assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "{r}");
    assert_eq!(origin.count("/smuggled"), 0);
}

// 4. Encodings, dot segments and repeated slashes cannot dodge a bypass
// route; every spelling is one cache key and one origin path.
#[tokio::test]
async fn path_tricks_do_not_dodge_a_bypass_route() {
    let origin = Origin::start(|s, n| {
        Reply::ok(&format!("{} #{n}", s.path)).header("cache-control", "max-age=60")
    })
    .await;
    let gw = Gateway::start(&origin.url(), |c| {
        c.routes = vec![kvgate::config::RouteConfig {
            name: "account".into(),
            prefix: toml::Spanned::new(0..0, "/account/".into()),
            bypass: true,
            ttl_secs: None,
            default_ttl_secs: None,
            stale_while_revalidate_secs: None,
            stale_if_error_secs: None,
            allow_set_cookie: None,
            origin: None,
        }];
    })
    .await;
    for trick in [
        "/%61ccount/x",
        "/x/../account/x",
        "//account/x",
        "/./account/x",
        "/account%2Fx",
        "/%2e/account/x",
    ] {
        for _ in 0..2 {
            let r = get(&gw.url(trick)).await;
            assert_eq!(r.x_cache(), "BYPASS", "{trick} was not bypassed");
        }
    }
    for seen in origin.requests("/account/x") {
        assert_eq!(seen.path, "/account/x");
    }
    // Spellings of one cacheable path share one entry.
    assert_eq!(get(&gw.url("/pub/a")).await.x_cache(), "MISS");
    assert_eq!(get(&gw.url("/pub/./b/../%61")).await.x_cache(), "HIT");
    assert_eq!(get(&gw.url("//pub//a")).await.x_cache(), "HIT");
    // Climbing above the root is refused before the origin.
    let r = raw(
        gw.running.addr,
        "GET /../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&r), 400, "{r}");
    let r = raw(
        gw.running.addr,
        "GET /a/%2e%2e/%2e%2e/etc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&r), 400, "{r}");
}

// 5. Content-Length and Transfer-Encoding together: 502, never stored.
#[tokio::test]
async fn ambiguous_origin_framing_is_a_502_and_never_stored() {
    let origin = RawOrigin::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\
          Cache-Control: max-age=60\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Duration::ZERO,
    )
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    let first = get(&gw.url("/smuggle")).await;
    assert_eq!(first.status, 502);
    let second = get(&gw.url("/smuggle")).await;
    assert_eq!(second.status, 502);
    assert_ne!(second.x_cache(), "HIT");
}

// 7. A request that is unstorable only because of itself neither evicts
// the shared entry nor turns off coalescing for others.
#[tokio::test]
async fn an_authorized_request_does_not_evict_the_shared_entry() {
    let origin2 = Origin::start(|s, n| {
        if s.headers.contains_key("authorization") {
            Reply::ok(&format!("private #{n}"))
        } else {
            Reply::ok(&format!("public #{n}")).header("cache-control", "max-age=60")
        }
    })
    .await;
    let gw = Gateway::start(&origin2.url(), |_| {}).await;
    assert_eq!(get(&gw.url("/doc")).await.x_cache(), "MISS");
    let authed = get_with(&gw.url("/doc"), &[("authorization", "Bearer x")]).await;
    // A fresh stored response may serve it; if it went to the origin, its
    // private answer must not replace or evict the shared one.
    assert!(authed.x_cache() == "HIT" || authed.text().starts_with("private"));
    let nostore = get_with(&gw.url("/doc"), &[("cache-control", "no-cache, no-store")]).await;
    assert_eq!(nostore.x_cache(), "MISS");
    let later = get(&gw.url("/doc")).await;
    assert_eq!(later.x_cache(), "HIT", "the shared entry was evicted");
    assert_eq!(later.text(), "public #1");
    // And no hit-for-miss was recorded: a cold key still coalesces after an
    // authorized request for it.
    let authed = get_with(&gw.url("/cold"), &[("authorization", "Bearer x")]).await;
    assert!(authed.text().starts_with("private"));
    assert_eq!(get(&gw.url("/cold")).await.x_cache(), "MISS");
    assert_eq!(get(&gw.url("/cold")).await.x_cache(), "HIT");
}

// 7b. The origin changing its mind for an authorized request (no explicit
// consent to share) must not purge what anonymous clients get.
#[tokio::test]
async fn an_authorized_revalidation_keeps_the_shared_entry() {
    let origin = Origin::start(|s, n| {
        if s.headers.contains_key("authorization") {
            Reply::ok(&format!("private #{n}")).header("cache-control", "no-cache")
        } else {
            Reply::ok(&format!("public #{n}")).header("cache-control", "max-age=60")
        }
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/d")).await;
    // Forces the authorized request to the origin past the fresh entry.
    let authed = get_with(
        &gw.url("/d"),
        &[("authorization", "Bearer x"), ("cache-control", "no-cache")],
    )
    .await;
    assert!(authed.text().starts_with("private"), "{}", authed.text());
    let later = get(&gw.url("/d")).await;
    assert_eq!(later.x_cache(), "HIT", "the authorized request evicted it");
    assert_eq!(later.text(), "public #1");
}

// 9. A cacheable body without Content-Length that outgrows
// max_object_bytes streams through whole, is not stored, and is not
// downloaded further once its client has left.
#[tokio::test]
async fn chunked_bodies_past_the_object_limit_stream_through_uncached() {
    use bytes::Bytes;
    use hyper::body::Frame;
    // 64 chunks of 16 KiB, the last ones slowly: 1 MiB against a 64 KiB limit.
    let chunks_sent = Arc::new(AtomicUsize::new(0));
    let sent = chunks_sent.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let sent = sent.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let sent = sent.clone();
                    async move {
                        let slow = req.uri().path() == "/slow";
                        let (tx, rx) = tokio::sync::mpsc::channel::<
                            Result<Frame<Bytes>, std::convert::Infallible>,
                        >(1);
                        tokio::spawn(async move {
                            for i in 0..64 {
                                if slow && i >= 8 {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                if tx
                                    .send(Ok(Frame::data(Bytes::from(vec![b'x'; 16 * 1024]))))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                                sent.fetch_add(1, Ordering::SeqCst);
                            }
                        });
                        let mut resp = http::Response::new(ChannelBody(rx));
                        resp.headers_mut()
                            .insert("cache-control", "max-age=60".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let gw = Gateway::start(&format!("http://{addr}"), |c| {
        c.cache.max_object_bytes = 64 * 1024;
    })
    .await;
    let whole = get(&gw.url("/big")).await;
    assert_eq!(whole.body.len(), 1024 * 1024, "the client got it all");
    assert_eq!(
        get(&gw.url("/big")).await.x_cache(),
        "MISS",
        "stored past the limit"
    );
    assert_eq!(gw.running.gateway.store.usage().1, 0);

    // A client that leaves: the origin fetch is abandoned, not finished.
    chunks_sent.store(0, Ordering::SeqCst);
    let mut s = tokio::net::TcpStream::connect(gw.running.addr)
        .await
        .unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < 200 * 1024 {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    drop(s);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let sent = chunks_sent.load(Ordering::SeqCst);
    assert!(
        sent < 40,
        "{sent} of 64 chunks fetched after the client left"
    );
}

/// A response body fed from a channel: chunked, without Content-Length.
struct ChannelBody(
    tokio::sync::mpsc::Receiver<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>>,
);

impl http_body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0.poll_recv(cx)
    }
}

// 14. A response whose headers an entry cannot keep whole is not stored
// (a HIT must not lose headers the MISS had). The origin client refuses
// more than 100 fields outright (502), so the reachable case is a value
// over 64 KiB.
#[tokio::test]
async fn responses_with_oversized_header_values_are_not_stored() {
    let big = "v".repeat(70 * 1024);
    let origin = Origin::start(move |_, _| {
        Reply::ok("x")
            .header("cache-control", "max-age=60")
            .header("x-big", &big)
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    let first = get(&gw.url("/big-header")).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-big").len(), 70 * 1024);
    assert!(first.header("cache-status").contains("headers-too-large"));
    let second = get(&gw.url("/big-header")).await;
    assert_eq!(second.x_cache(), "MISS");
    assert_eq!(second.header("x-big").len(), 70 * 1024);
}

// 2c. Over HTTP/2 there is no Host header: the authority is `:authority`,
// which the origin sees with preserve_host, and a client's
// X-Forwarded-Host still never reaches it.
#[tokio::test]
async fn h2_requests_forward_their_authority_not_the_clients_headers() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let origin = Origin::start(|_, _| Reply::ok("x").header("cache-control", "max-age=60")).await;
    let gw = Gateway::start(&origin.url(), |c| c.origin.preserve_host = true).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let mut conn_req = http::Request::new(Full::new(Bytes::new()));
    *conn_req.uri_mut() = format!("http://{}/h2", gw.running.addr).parse().unwrap();
    conn_req
        .headers_mut()
        .insert("x-forwarded-host", "evil.example".parse().unwrap());
    let resp = client.request(conn_req).await.expect("h2 request");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let _ = resp.into_body().collect().await;
    let seen = &origin.requests("/h2")[0].headers;
    let authority = gw.running.addr.to_string();
    assert_eq!(seen.get("host").unwrap().to_str().unwrap(), authority);
    assert_eq!(
        seen.get("x-forwarded-host").unwrap().to_str().unwrap(),
        authority
    );
}
