//! The in-process tier: the whole request path (`Gateway::handle`) against
//! a scripted `Upstream`, no sockets. Coalescing, stale-if-error, the 304
//! merge and hit-for-miss are decided here, so they are tested here; the
//! socket tests in `tests/` stay for what crosses the wire.

use super::body::Body;
use super::gateway::Gateway;
use super::headers::ClientInfo;
use super::origin::{BoxError, OriginError, Upstream, UpstreamBody, UpstreamFuture};
use crate::config::Config;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the scripted origin answers to its n-th request (1-based).
type Reply = Result<(u16, Vec<(&'static str, &'static str)>, &'static str), OriginError>;

/// The script: request number and headers in, reply out.
type Script = Box<dyn Fn(usize, &http::HeaderMap) -> Reply + Send + Sync>;

struct Scripted {
    calls: Arc<AtomicUsize>,
    delay: Duration,
    script: Script,
    seen: Arc<Mutex<Vec<http::HeaderMap>>>,
}

impl Upstream for Scripted {
    fn send(&self, req: Request<UpstreamBody>) -> UpstreamFuture<'_> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(req.headers().clone());
        let reply = (self.script)(n, req.headers());
        let delay = self.delay;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let (status, headers, body) = reply?;
            let mut r = Response::new(
                Full::new(Bytes::from_static(body.as_bytes()))
                    .map_err(|never| -> BoxError { match never {} })
                    .boxed_unsync(),
            );
            *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            for (k, v) in headers {
                r.headers_mut().append(k, http::HeaderValue::from_static(v));
            }
            Ok(r)
        })
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }
}

struct Harness {
    gw: Arc<Gateway>,
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<http::HeaderMap>>>,
}

fn harness(
    delay: Duration,
    script: impl Fn(usize, &http::HeaderMap) -> Reply + Send + Sync + 'static,
) -> Harness {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let upstream = Scripted {
        calls: calls.clone(),
        delay,
        script: Box::new(script),
        seen: seen.clone(),
    };
    let gw = Gateway::with_upstream(Config::default(), Box::new(upstream)).expect("gateway");
    Harness { gw, calls, seen }
}

struct Got {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Got {
    fn x_cache(&self) -> &str {
        self.header("x-cache")
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn get(gw: &Arc<Gateway>, path: &str) -> Got {
    let req = Request::builder()
        .uri(path)
        .header("host", "api.example")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let client = ClientInfo {
        addr: "127.0.0.1:40000".parse().expect("addr"),
        tls: false,
    };
    let resp: Response<Body> = gw.handle(req, client).await;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

#[tokio::test]
async fn concurrent_misses_share_one_upstream_request() {
    let h = harness(Duration::from_millis(100), |n, _| {
        Ok((
            200,
            vec![("cache-control", "max-age=60")],
            if n == 1 { "one" } else { "more" },
        ))
    });
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let gw = h.gw.clone();
            tokio::spawn(async move { get(&gw, "/cold").await })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("task"));
    }
    assert_eq!(h.calls.load(Ordering::SeqCst), 1);
    assert!(results.iter().all(|g| g.status == 200 && g.body == "one"));
    let misses = results.iter().filter(|g| g.x_cache() == "MISS").count();
    assert_eq!(misses, 1);
    assert_eq!(get(&h.gw, "/cold").await.x_cache(), "HIT");
}

#[tokio::test]
async fn rfc5861_4_stale_if_error_when_the_origin_is_unreachable() {
    let h = harness(Duration::ZERO, |n, _| match n {
        1 => Ok((
            200,
            vec![("cache-control", "max-age=0, stale-if-error=60")],
            "kept",
        )),
        _ => Err(OriginError::Connect("refused".into())),
    });
    assert_eq!(get(&h.gw, "/s").await.x_cache(), "MISS");
    let stale = get(&h.gw, "/s").await;
    assert_eq!(stale.x_cache(), "STALE");
    assert_eq!(stale.body, "kept");
    assert!(stale.header("cache-status").contains("stale-if-error"));
    // Nothing stored: the failure is the answer.
    let cold = get(&h.gw, "/never-stored").await;
    assert_eq!(cold.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn rfc9111_4_3_4_a_304_refreshes_the_entry_but_its_cookie_stays_with_its_client() {
    let h = harness(Duration::ZERO, |_, req| {
        if req.contains_key("if-none-match") {
            Ok((
                304,
                vec![
                    ("etag", "\"v1\""),
                    ("cache-control", "max-age=60"),
                    ("set-cookie", "sid=one-client"),
                    ("x-refreshed", "yes"),
                ],
                "",
            ))
        } else {
            Ok((
                200,
                vec![("etag", "\"v1\""), ("cache-control", "max-age=0")],
                "body",
            ))
        }
    });
    assert_eq!(get(&h.gw, "/r").await.x_cache(), "MISS");
    let reval = get(&h.gw, "/r").await;
    assert_eq!(reval.x_cache(), "REVALIDATED");
    assert_eq!(reval.header("set-cookie"), "sid=one-client");
    let hit = get(&h.gw, "/r").await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(hit.body, "body");
    assert_eq!(
        hit.header("x-refreshed"),
        "yes",
        "the 304's fields were merged"
    );
    assert_eq!(hit.header("set-cookie"), "", "the cookie was merged too");
    // The conditional carried the stored validator.
    let seen = h.seen.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(
        seen[1].get("if-none-match").map(|v| v.as_bytes()),
        Some(&b"\"v1\""[..])
    );
}

#[tokio::test]
async fn hit_for_miss_after_an_unshareable_answer() {
    let h = harness(Duration::from_millis(50), |_, _| {
        Ok((200, vec![("cache-control", "private")], "mine"))
    });
    // The first leads and learns the answer is private; later requests go
    // straight to the origin instead of queueing behind a leader.
    assert_eq!(get(&h.gw, "/me").await.x_cache(), "MISS");
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let gw = h.gw.clone();
            tokio::spawn(async move { get(&gw, "/me").await })
        })
        .collect();
    for t in tasks {
        let g = t.await.expect("task");
        assert_eq!(g.x_cache(), "MISS");
    }
    assert_eq!(h.calls.load(Ordering::SeqCst), 6);
    assert_eq!(
        h.gw.flights.coalesced.load(Ordering::Relaxed),
        0,
        "nobody queued"
    );
}

#[tokio::test]
async fn an_authorized_request_does_not_turn_off_coalescing_for_others() {
    let h = harness(Duration::from_millis(50), |_, _| {
        Ok((200, vec![("cache-control", "max-age=60")], "page"))
    });
    // Without `public`, an authorized request's answer is not stored
    // (9111 3.5): a verdict about that request alone.
    let req = Request::builder()
        .uri("/doc")
        .header("host", "api.example")
        .header("authorization", "Bearer x")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let client = ClientInfo {
        addr: "127.0.0.1:40000".parse().expect("addr"),
        tls: false,
    };
    let _ = h.gw.handle(req, client).await;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let gw = h.gw.clone();
            tokio::spawn(async move { get(&gw, "/doc").await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task").body, "page");
    }
    assert_eq!(
        h.calls.load(Ordering::SeqCst),
        2,
        "anonymous requests were not coalesced after an authorized one"
    );
}

/// hyper's service future and the request-id scope hold the request's
/// future by value and move it: past a few KiB every hit pays for copying
/// it (a merge once made it 11 KiB, 30k instructions of memcpy per hit).
/// A hit's answer is made when `handle` is called, only what must wait is
/// boxed (`Answering`), and the future `handle` returns holds neither the
/// request nor the request path's state: 656 bytes in a debug build when
/// this bound was set (1,440 while `handle` was an `async fn`).
#[tokio::test]
async fn a_requests_future_stays_small() {
    let h = harness(Duration::ZERO, |_, _| Ok((200, vec![], "x")));
    let client = ClientInfo {
        addr: "127.0.0.1:40000".parse().expect("addr"),
        tls: false,
    };
    let req = Request::builder()
        .uri("/x")
        .header("host", "api.example")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let size = std::mem::size_of_val(&h.gw.handle(req, client));
    assert!(size <= 1024, "the handle future is {size} bytes");
}
