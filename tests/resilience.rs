//! One origin fetch per key, stale-while-revalidate, stale-if-error, and
//! origin and client faults, over real sockets with a fault-injecting origin.

mod common;
use common::*;
use kvgate::cache::Storage;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn concurrent(url: String, n: usize) -> Vec<Got> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(get_owned(url.clone())))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

async fn get_owned(url: String) -> Got {
    get(&url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_origin_request() {
    let origin = Origin::start(|_, n| {
        Reply::ok(&format!("body-{n}"))
            .header("cache-control", "max-age=60")
            .delay(Duration::from_millis(300))
    })
    .await;
    // The admin listener, to read the coalescing counter from /metrics.
    let token = "test-admin-token-0123456789";
    let gw = Gateway::start(&origin.url(), |c| {
        c.admin = Some(kvgate::config::AdminConfig {
            listen: toml::Spanned::new(0..0, "127.0.0.1:0".into()),
            token: Some(token.into()),
            max_body_bytes: 4096,
        });
    })
    .await;
    let got = concurrent(gw.url("/cold"), 100).await;
    assert_eq!(origin.count("/cold"), 1, "exactly one origin request");
    assert!(got.iter().all(|g| g.status == 200 && g.text() == "body-1"));
    let t = tally(&got);
    assert_eq!(t.get("MISS"), Some(&1), "{t:?}");
    assert_eq!(t.get("HIT"), Some(&99), "{t:?}");
    let admin = gw.running.admin_addr.expect("admin listener runs");
    let metrics = get_with(
        &format!("http://{admin}/metrics"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
    .text();
    let coalesced: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kvgate_coalesced_waiters_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the coalescing counter is exported");
    assert!(coalesced >= 99, "{coalesced} coalesced waiters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncacheable_response_is_never_shared_and_later_requests_do_not_queue() {
    let origin = Origin::start(|_, n| {
        Reply::ok(&format!("user-{n}"))
            .header("cache-control", "private")
            .delay(Duration::from_millis(200))
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    let got = concurrent(gw.url("/me"), 20).await;
    let mut bodies: Vec<String> = got.iter().map(|g| g.text()).collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 20, "every client got its own origin response");
    assert_eq!(origin.count("/me"), 20);
    // hit-for-miss: now 20 more in parallel take about one origin delay, not 20
    let started = Instant::now();
    concurrent(gw.url("/me"), 20).await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_gives_up_after_lock_timeout() {
    let origin = Origin::start(|_, n| {
        Reply::ok(&format!("v{n}"))
            .header("cache-control", "max-age=60")
            .delay(Duration::from_millis(1000))
    })
    .await;
    let gw = Gateway::start(&origin.url(), |c| c.cache.lock_timeout_ms = 100).await;
    let leader = tokio::spawn(get_owned(gw.url("/slow")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiter = get(&gw.url("/slow")).await;
    assert_eq!(waiter.status, 200);
    assert_eq!(leader.await.expect("leader").status, 200);
    assert_eq!(
        origin.count("/slow"),
        2,
        "the waiter went to the origin on its own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    // The refreshed copy is fresh for a minute: the final HIT must not
    // depend on how long a loaded machine takes between the refresh and
    // the last request (with max-age=1 it could age out before it).
    let origin = Origin::start(|_, n| {
        if n > 1 {
            Reply::ok(&format!("v{n}"))
                .header("cache-control", "max-age=60")
                .delay(Duration::from_millis(500))
        } else {
            Reply::ok(&format!("v{n}"))
                .header("cache-control", "max-age=1, stale-while-revalidate=30")
        }
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/s")).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = Instant::now();
    let got = concurrent(gw.url("/s"), 30).await;
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "stale answers must not wait: {:?}",
        started.elapsed()
    );
    assert!(got
        .iter()
        .all(|g| g.x_cache() == "STALE" && g.text() == "v1"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(origin.count("/s"), 2, "one background refresh");
    let fresh = get(&gw.url("/s")).await;
    assert_eq!((fresh.x_cache(), fresh.text().as_str()), ("HIT", "v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_background_refresh_keeps_the_stale_entry() {
    let origin = Origin::start(|_, n| {
        if n == 1 {
            Reply::ok("v1").header("cache-control", "max-age=1, stale-while-revalidate=30")
        } else {
            Reply::ok("down").status(503)
        }
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/s")).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get(&gw.url("/s")).await.text(), "v1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = get(&gw.url("/s")).await;
    assert_eq!((again.x_cache(), again.text().as_str()), ("STALE", "v1"));
}

#[tokio::test]
async fn stale_if_error_on_5xx_and_passthrough_without_it() {
    let origin = Origin::start(|s, n| {
        if n == 1 {
            let cc = if s.path == "/sie" {
                "max-age=1, stale-if-error=60"
            } else {
                "max-age=1"
            };
            Reply::ok("v1").header("cache-control", cc)
        } else {
            Reply::ok("origin broke").status(500)
        }
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/sie")).await;
    get(&gw.url("/plain")).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sie = get(&gw.url("/sie")).await;
    assert_eq!(
        (sie.status.as_u16(), sie.x_cache(), sie.text().as_str()),
        (200, "STALE", "v1")
    );
    assert!(sie.header("cache-status").contains("stale-if-error"));
    let plain = get(&gw.url("/plain")).await;
    assert_eq!(
        plain.status, 500,
        "no stale-if-error: the origin's 500 passes through"
    );
}

#[tokio::test]
async fn origin_down_gives_502_or_stale_within_grace() {
    let url = refused_url().await;
    let gw = Gateway::start(&url, |_| {}).await;
    let r = get(&gw.url("/x")).await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("origin"), "clear body: {}", r.text());
}

#[tokio::test]
async fn must_revalidate_forbids_stale_on_error() {
    let origin = Origin::start(|_, n| {
        if n == 1 {
            Reply::ok("v1").header(
                "cache-control",
                "max-age=1, must-revalidate, stale-if-error=60",
            )
        } else {
            Reply::ok("x").status(503)
        }
    })
    .await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    get(&gw.url("/m")).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get(&gw.url("/m")).await.status, 503);
}

#[tokio::test]
async fn slow_origin_times_out_with_504() {
    let origin = Origin::start(|_, _| Reply::ok("late").delay(Duration::from_secs(3))).await;
    let gw = Gateway::start(&origin.url(), |c| c.origin.first_byte_timeout_ms = 200).await;
    let started = Instant::now();
    let r = get(&gw.url("/slow")).await;
    assert_eq!(r.status, 504);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn truncated_body_aborts_client_and_is_never_cached() {
    const HEAD: &[u8] =
        b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 100\r\n\r\n0123456789";
    let origin = RawOrigin::start(HEAD, Duration::ZERO).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    let first = try_get(&gw.url("/t")).await;
    assert!(first.is_err(), "a truncated body must not look whole");
    let second = try_get(&gw.url("/t")).await;
    assert!(second.is_err());
    assert_eq!(origin.count(), 2, "nothing was cached");
    assert_eq!(gw.running.gateway.store.usage().1, 0);
}

#[tokio::test]
async fn idle_origin_body_is_cut_and_not_cached() {
    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
    let origin = RawOrigin::start(HEAD, Duration::from_secs(5)).await;
    let gw = Gateway::start(&origin.url(), |c| c.origin.idle_timeout_ms = 200).await;
    let started = Instant::now();
    assert!(try_get(&gw.url("/i")).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(gw.running.gateway.store.usage().1, 0);
}

#[tokio::test]
async fn slow_loris_client_is_dropped_and_others_are_served() {
    let origin = Origin::start(|_, _| Reply::ok("ok")).await;
    let gw = Gateway::start(&origin.url(), |c| c.server.header_read_timeout_ms = 300).await;
    let mut slow = tokio::net::TcpStream::connect(gw.running.addr)
        .await
        .expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    assert_eq!(
        get(&gw.url("/")).await.status,
        200,
        "others are not held up"
    );
    let mut buf = [0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(3), slow.read(&mut buf)).await;
    match read {
        Ok(Ok(n)) => {
            // closed (0) or a 408 before closing
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(n == 0 || text.contains("408"), "{text}");
        }
        Ok(Err(_)) => {}
        Err(_) => panic!("slow client still connected after the header timeout"),
    }
}

#[tokio::test]
async fn client_limits_answer_414_413_431() {
    let origin = Origin::start(|_, _| Reply::ok("ok")).await;
    let gw = Gateway::start(&origin.url(), |c| {
        c.server.max_uri_bytes = 100;
        c.server.max_body_bytes = 10;
        c.server.max_header_bytes = 8192;
    })
    .await;
    let long = format!("/{}", "a".repeat(200));
    assert_eq!(get(&gw.url(&long)).await.status, 414);
    let post = send(
        http::Method::POST,
        &gw.url("/p"),
        &[],
        "this body is too long",
    )
    .await;
    assert_eq!(post.status, 413);
    let big = "b".repeat(20_000);
    let mut s = tokio::net::TcpStream::connect(gw.running.addr)
        .await
        .expect("connect");
    s.write_all(format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("answer in time")
        .unwrap_or(0);
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert_eq!(origin.total(), 0, "nothing reached the origin");
}

#[tokio::test]
async fn graceful_shutdown_drains_in_flight_requests() {
    let origin = Origin::start(|_, _| Reply::ok("done").delay(Duration::from_millis(500))).await;
    let gw = Gateway::start(&origin.url(), |_| {}).await;
    let url = gw.url("/slow");
    let in_flight = tokio::spawn(async move { try_get(&url).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = gw.running.stop.send(true);
    let r = in_flight
        .await
        .expect("task")
        .expect("in-flight request completes");
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "done"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(gw.running.addr)
            .await
            .is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed() {
    let origin = Origin::start(|_, _| Reply::ok("ok")).await;
    let gw = Gateway::start(&origin.url(), |c| c.server.max_connections = 1).await;
    // The first connection holds the only permit while it stays open.
    let mut first = tokio::net::TcpStream::connect(gw.running.addr)
        .await
        .expect("connect");
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 256];
    let n = first.read(&mut buf).await.expect("first answered");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // A second one is accepted by the kernel, then closed without an answer.
    let mut second = tokio::net::TcpStream::connect(gw.running.addr)
        .await
        .expect("connect");
    let _ = second.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let read = tokio::time::timeout(Duration::from_secs(3), second.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "second connection must be closed"
    );
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get(&gw.url("/")).await.status, 200, "the permit comes back");
}
