//! Several instances, one cache: purges and version bumps reach every
//! instance (with catch-up after a disconnect), and a cold URL requested
//! through two instances at once reaches the origin once. Real
//! `redis-server` processes, a real counting origin, gateways on ephemeral
//! loopback ports (in-process, and the real binary for the figures).

mod common;
use common::redis::{free_port, RedisServer};
use common::*;
use http::Method;
use serde_json::Value;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "cluster-test-admin-token-0123456789";

fn cached(body: &str) -> Reply {
    Reply::ok(body).header("cache-control", "max-age=300")
}

/// Admin on, Redis at `redis_url` with a 200 ms timeout, then `extra`.
fn config_toml(redis_url: &str, extra: &str) -> String {
    config_with_timeout(redis_url, 200, extra)
}

fn config_with_timeout(redis_url: &str, timeout_ms: u64, extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n[redis]\nurl = \"{redis_url}\"\ntimeout_ms = {timeout_ms}\n{extra}"
    )
}

async fn admin_at(addr: &str, method: Method, path: &str, body: &str) -> Got {
    common::admin_at(addr, TOKEN, method, path, body).await
}

async fn admin_ok(gw: &Gateway, method: Method, path: &str, body: &str) -> Value {
    gw.admin_ok(TOKEN, method, path, body).await
}

/// Polls `check` every 5 ms for up to 10 s.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    common::eventually(what, 2000, Duration::from_millis(5), check).await
}

/// `n` concurrent GETs with one `Host` (one site behind a load balancer),
/// alternating between two instances' URLs; the responses in order.
async fn stampede(urls: [String; 2], n: usize) -> Vec<Got> {
    let requests: Vec<_> = (0..n)
        .map(|i| {
            let url = urls[i % 2].clone();
            tokio::spawn(async move { get_with(&url, &[("host", "site.example")]).await })
        })
        .collect();
    let mut got = Vec::with_capacity(n);
    for r in requests {
        got.push(r.await.expect("request task"));
    }
    got
}

async fn readyz(gw: &Gateway) -> Value {
    let addr = gw.running.admin_addr.expect("admin").to_string();
    let r = admin_at(&addr, Method::GET, "/readyz", "").await;
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

/// Whether the gateway's event reader follows the stream (it reports it in
/// /readyz as `cluster.following`).
async fn following(gw: &Gateway) -> bool {
    readyz(gw).await["cluster"]["following"] == Value::Bool(true)
}

async fn hit(gw: &Gateway, path: &str) -> bool {
    get(&gw.url(path)).await.x_cache().starts_with("HIT")
}

/// Stores `path` on `gw` and checks that it is now a hit there.
async fn warm(gw: &Gateway, path: &str) {
    let first = get(&gw.url(path)).await;
    assert_eq!(first.status, 200);
    assert!(hit(gw, path).await, "{path} is stored");
}

#[tokio::test]
async fn purges_and_version_bumps_reach_the_other_instance() {
    let redis = RedisServer::start();
    let origin = Origin::start(|s, n| {
        let r = cached(&format!("{} #{n}", s.path));
        if s.path.starts_with("/tagged") {
            r.header("surrogate-key", "red")
        } else {
            r
        }
    })
    .await;
    let toml = config_toml(
        &redis.url(),
        "[[route]]\nname = \"api\"\nprefix = \"/api/\"\n",
    );
    let a = Gateway::from_toml(&origin, &toml).await;
    let b = Gateway::from_toml(&origin, &toml).await;
    eventually("both follow the stream", || async {
        following(&a).await && following(&b).await
    })
    .await;

    // URL purge: gone on B, made on A.
    for gw in [&a, &b] {
        warm(gw, "/page?x=1").await;
        warm(gw, "/other").await;
    }
    let reply = admin_ok(&a, Method::POST, "/purge", r#"{"urls":["/page?x=1"]}"#).await;
    assert_eq!(reply["broadcast"]["regions"][0], "default", "{reply}");
    eventually("B drops the purged URL", || async {
        !hit(&b, "/page?x=1").await
    })
    .await;
    assert!(hit(&b, "/other").await, "only the purged URL went");

    // Prefix purge from B reaches A.
    warm(&a, "/docs/1").await;
    admin_ok(&b, Method::POST, "/purge", r#"{"prefixes":["/docs/"]}"#).await;
    eventually("A drops the prefix", || async { !hit(&a, "/docs/1").await }).await;

    // Tag purge.
    warm(&b, "/tagged/1").await;
    admin_ok(&a, Method::POST, "/purge", r#"{"tags":["red"]}"#).await;
    eventually("B drops the tag", || async { !hit(&b, "/tagged/1").await }).await;

    // Global version bump.
    warm(&b, "/v").await;
    admin_ok(&a, Method::POST, "/version", "").await;
    eventually("B follows the version bump", || async {
        !hit(&b, "/v").await
    })
    .await;
    assert!(b.running.gateway.version() >= a.running.gateway.version());

    // Route version bump: the route's keys move, others stay.
    warm(&b, "/api/x").await;
    warm(&b, "/keep").await;
    admin_ok(&a, Method::POST, "/version", r#"{"route":"api"}"#).await;
    eventually("B follows the route bump", || async {
        !hit(&b, "/api/x").await
    })
    .await;
    assert!(hit(&b, "/keep").await);

    // A's own purges are applied once (by the admin call), not again.
    warm(&a, "/self").await;
    let before = origin.count("/self");
    admin_ok(&a, Method::POST, "/purge", r#"{"urls":["/self"]}"#).await;
    assert!(!hit(&a, "/self").await);
    assert_eq!(origin.count("/self"), before + 1);
}

/// Admin on, two regions `eu` and `us` (this instance in `local`), 200 ms
/// Redis timeout.
fn two_regions_toml(eu: &RedisServer, us: &RedisServer, local: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n[redis]\nregion = \"{local}\"\ntimeout_ms = 200\n\
         [[redis.regions]]\nname = \"eu\"\nurl = \"{}\"\n[[redis.regions]]\nname = \"us\"\nurl = \"{}\"\n",
        eu.url(),
        us.url()
    )
}

/// Whether `gw` follows the region at `index` of its `/readyz` list.
async fn follows_region(gw: &Gateway, index: usize) -> bool {
    readyz(gw).await["cluster"]["regions"][index]["following"] == Value::Bool(true)
}

#[tokio::test]
async fn purges_reach_every_instance_through_any_region_and_a_killed_region_catches_up() {
    let eu = RedisServer::start();
    let mut us = RedisServer::start();
    let origin = Origin::start(|s, n| cached(&format!("{} #{n}", s.path))).await;
    let a = Gateway::from_toml(&origin, &two_regions_toml(&eu, &us, "eu")).await;
    let b = Gateway::from_toml(&origin, &two_regions_toml(&eu, &us, "us")).await;
    eventually("both follow both regions", || async {
        follows_region(&a, 0).await
            && follows_region(&a, 1).await
            && follows_region(&b, 0).await
            && follows_region(&b, 1).await
    })
    .await;

    // Both regions up: a purge arrives through both, and is applied once.
    warm(&b, "/both").await;
    let reply = admin_ok(&a, Method::POST, "/purge", r#"{"urls":["/both"]}"#).await;
    assert_eq!(
        reply["broadcast"]["regions"],
        serde_json::json!(["eu", "us"])
    );
    eventually("B drops /both", || async { !hit(&b, "/both").await }).await;

    // B's own region dies: purges made on A still reach B through eu, and
    // purges made on B reach A through eu.
    for gw in [&a, &b] {
        warm(gw, "/gone").await;
        warm(gw, "/stays").await;
    }
    us.kill();
    eventually("B notices its region is gone", || async {
        !following(&b).await && !follows_region(&b, 1).await
    })
    .await;
    let reply = admin_ok(&a, Method::POST, "/purge", r#"{"urls":["/gone"]}"#).await;
    assert_eq!(
        reply["broadcast"]["failed"],
        serde_json::json!(["us"]),
        "{reply}"
    );
    eventually("B drops /gone through eu", || async {
        !hit(&b, "/gone").await
    })
    .await;
    warm(&a, "/from-b").await;
    admin_ok(&b, Method::POST, "/purge", r#"{"urls":["/from-b"]}"#).await;
    eventually("A drops /from-b through eu", || async {
        !hit(&a, "/from-b").await
    })
    .await;
    assert_eq!(readyz(&a).await["cluster"]["regions"][1]["retry_queued"], 1);

    // us comes back empty: it is given what it missed, and B, which
    // followed eu all along, keeps its memory cache.
    us.restart();
    eventually("A resent what us missed", || async {
        readyz(&a).await["cluster"]["regions"][1]["retry_queued"] == 0
            && readyz(&b).await["cluster"]["regions"][1]["retry_queued"] == 0
    })
    .await;
    eventually("B follows us again", || async {
        following(&b).await && follows_region(&b, 1).await
    })
    .await;
    let replayed = us
        .command(&["XLEN", "kvgate:production:cluster:events"])
        .unwrap_or_default();
    assert_eq!(replayed, ":2\r\n", "the purges made while us was down");
    assert!(hit(&b, "/stays").await, "B kept what was not purged");
    assert_eq!(readyz(&b).await["cluster"]["cache_drops"], 0);
    // And us carries purges again.
    warm(&b, "/after").await;
    let reply = admin_ok(&a, Method::POST, "/purge", r#"{"urls":["/after"]}"#).await;
    assert_eq!(
        reply["broadcast"]["regions"],
        serde_json::json!(["eu", "us"])
    );
    eventually("B drops /after", || async { !hit(&b, "/after").await }).await;
    let addr = b.running.admin_addr.expect("admin").to_string();
    let metrics = admin_at(&addr, Method::GET, "/metrics", "").await.text();
    for line in [
        "kvgate_cluster_region_following{region=\"eu\"} 1",
        "kvgate_cluster_region_following{region=\"us\"} 1",
        "kvgate_cluster_retry_queued{region=\"us\"} 0",
        "kvgate_cluster_cache_drops_total 0",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

/// A TCP relay to a Redis server that the test can cut (existing
/// connections closed, new ones refused by closing at once) and restore:
/// one instance loses Redis while the others keep it.
struct Relay {
    port: u16,
    open: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
}

impl Relay {
    async fn start(target_port: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (open2, cut2) = (open.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !open2.load(Ordering::SeqCst) {
                    continue; // dropped: the connection closes at once
                }
                let cut = cut2.clone();
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.notified() => {}
                    }
                });
            }
        });
        Relay { port, open, cut }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
        if !open {
            self.cut.notify_waiters();
        }
    }
}

#[tokio::test]
async fn an_instance_cut_off_catches_up_on_purges_made_meanwhile() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port).await;
    let origin = Origin::start(|s, n| cached(&format!("{} #{n}", s.path))).await;
    let a = Gateway::from_toml(&origin, &config_toml(&redis.url(), "")).await;
    let b = Gateway::from_toml(&origin, &config_toml(&relay.url(), "")).await;
    eventually("both follow the stream", || async {
        following(&a).await && following(&b).await
    })
    .await;
    warm(&b, "/gone").await;
    warm(&b, "/stays").await;

    relay.set_open(false);
    eventually("B notices it is cut off", || async { !following(&b).await }).await;
    admin_ok(&a, Method::POST, "/purge", r#"{"urls":["/gone"]}"#).await;
    // Cut off, B cannot know yet (the broadcast is all it has).
    relay.set_open(true);
    eventually("B is back", || async { following(&b).await }).await;
    eventually("B replayed the purge", || async { !hit(&b, "/gone").await }).await;
    assert!(
        hit(&b, "/stays").await,
        "a replay drops only what was purged"
    );
    assert_eq!(readyz(&b).await["cluster"]["cache_drops"], 0);

    // A gap that cannot be replayed (the stream trimmed past B's position):
    // B drops its whole memory cache rather than serve what may be purged.
    relay.set_open(false);
    eventually("B cut off again", || async { !following(&b).await }).await;
    admin_ok(&a, Method::POST, "/purge", r#"{"urls":["/whatever"]}"#).await;
    let stream = "kvgate:production:cluster:events";
    let trimmed = redis
        .command(&["XTRIM", stream, "MAXLEN", "0"])
        .unwrap_or_default();
    assert!(trimmed.starts_with(':'), "XTRIM answered {trimmed:?}");
    relay.set_open(true);
    eventually("B dropped everything", || async {
        !hit(&b, "/stays").await
    })
    .await;
    assert_eq!(readyz(&b).await["cluster"]["cache_drops"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_origin_fetch_for_a_cold_url_over_two_instances() {
    let redis = RedisServer::start();
    let origin = Origin::start(|_, _| cached("cold").delay(Duration::from_millis(300))).await;
    // A loaded test machine must not turn a slow Redis answer into a second
    // fetch: this test is about the lease, the fault tests about timeouts.
    let toml = config_with_timeout(&redis.url(), 2_000, "");
    let a = Gateway::from_toml(&origin, &toml).await;
    let b = Gateway::from_toml(&origin, &toml).await;
    eventually("both follow the stream", || async {
        following(&a).await && following(&b).await
    })
    .await;
    let got = stampede([a.url("/cold"), b.url("/cold")], 100).await;
    assert!(got.iter().all(|g| g.status == 200 && g.text() == "cold"));
    assert_eq!(origin.count("/cold"), 1, "{:?}", tally(&got));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_l2_a_new_instance_starts_warm_and_purges_reach_the_shared_copy() {
    let redis = RedisServer::start();
    let origin = Origin::start(|s, n| {
        if s.path == "/private" {
            Reply::ok("mine").header("cache-control", "private, max-age=300")
        } else {
            cached(&format!("{} #{n}", s.path))
        }
    })
    .await;
    let toml = config_with_timeout(
        &redis.url(),
        2_000,
        "[cache.l2]\nmax_object_bytes = 65536\n",
    );
    let a = Gateway::from_toml(&origin, &toml).await;
    eventually("A follows", || async { following(&a).await }).await;
    let host = [("host", "site.example")];
    assert_eq!(get_with(&a.url("/warm"), &host).await.text(), "/warm #1");
    get_with(&a.url("/private"), &host).await;
    // Written once the body is stored: wait for it to be in Redis.
    eventually("A wrote the shared copy", || async {
        redis.command(&["DBSIZE"]).is_some_and(|r| r != ":0\r\n")
    })
    .await;

    let fresh = Gateway::from_toml(&origin, &toml).await;
    eventually("the new instance follows", || async {
        following(&fresh).await
    })
    .await;
    let got = get_with(&fresh.url("/warm"), &host).await;
    assert_eq!(got.text(), "/warm #1", "served from the shared tier");
    assert_eq!(origin.count("/warm"), 1);
    assert!(got.x_cache().starts_with("HIT"), "{}", got.x_cache());
    // What the memory cache would not store is not shared either.
    get_with(&fresh.url("/private"), &host).await;
    assert_eq!(origin.count("/private"), 2);

    // A purge moves the shared tier's generation: no instance reads the
    // purged copy back.
    admin_ok(&a, Method::POST, "/purge", r#"{"urls":["/warm"]}"#).await;
    let late = Gateway::from_toml(&origin, &toml).await;
    eventually("the late instance follows", || async {
        following(&late).await
    })
    .await;
    assert_eq!(get_with(&late.url("/warm"), &host).await.text(), "/warm #2");
}

#[tokio::test]
async fn redis_down_never_holds_a_request_past_the_timeout() {
    let mut redis = RedisServer::start();
    let origin = Origin::start(|s, n| cached(&format!("{} #{n}", s.path))).await;
    let gw = Gateway::from_toml(&origin, &config_toml(&redis.url(), "")).await;
    eventually("follows the stream", || async { following(&gw).await }).await;
    warm(&gw, "/warm").await;
    redis.kill();
    // A hit needs no Redis; a miss tries the lease (bounded by the 200 ms
    // timeout, then failing fast) and goes to the origin.
    for i in 0..5 {
        let started = Instant::now();
        let r = get(&gw.url(&format!("/cold/{i}"))).await;
        assert_eq!(r.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(hit(&gw, "/warm").await);
    }
    let purged = admin_ok(&gw, Method::POST, "/purge", r#"{"urls":["/warm"]}"#).await;
    assert_eq!(purged["purged"], 1);
    assert_eq!(purged["broadcast"]["failed"][0], "default", "{purged}");
    // Back: the reader reconnects on its own.
    redis.restart();
    eventually("reader reconnects", || async { following(&gw).await }).await;
}

// The real binary: the figures for the README --------------------------------

/// A real `kvgate` process; killed when dropped.
struct Process {
    child: std::process::Child,
    listen: String,
    admin: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_binary(dir: &Path, origin: &str, redis: &str) -> Process {
    start_binary_with(dir, None, origin, redis).await
}

/// With `config`, the process reads that file (and reloads it on
/// `POST /reload`).
async fn start_binary_with(
    dir: &Path,
    config: Option<&Path>,
    origin: &str,
    redis: &str,
) -> Process {
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"));
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let child = command
        .current_dir(dir)
        .args(["--listen", &listen, "--origin", origin, "--redis", redis])
        .args(["--admin-listen", &admin, "--log-level", "warn"])
        .env("KVGATE_ADMIN_TOKEN", TOKEN)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kvgate starts");
    let mut p = Process {
        child,
        listen,
        admin,
    };
    for _ in 0..1000 {
        if try_get(&format!("http://{}/healthz", p.admin))
            .await
            .is_ok()
        {
            let r = admin_at(&p.admin, Method::GET, "/readyz", "").await;
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            if v["cluster"]["following"] == Value::Bool(true) {
                return p;
            }
        }
        if let Some(status) = p.child.try_wait().expect("try_wait") {
            panic!("kvgate exited with {status} before it was ready");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("kvgate did not become ready");
}

async fn process_hit(p: &Process, path: &str) -> bool {
    get(&format!("http://{}{path}", p.listen))
        .await
        .x_cache()
        .starts_with("HIT")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test]
async fn a_reloads_version_raise_reaches_the_other_process() {
    let redis = RedisServer::start();
    let origin = Origin::start(|s, n| cached(&format!("{} #{n}", s.path))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("a.toml");
    std::fs::write(&config, "[cache]\nversion = 1\n").expect("config");
    let a = start_binary_with(dir.path(), Some(&config), &origin.url(), &redis.url()).await;
    let b = start_binary(dir.path(), &origin.url(), &redis.url()).await;
    get(&format!("http://{}/kept", b.listen)).await;
    assert!(process_hit(&b, "/kept").await);

    // Reloading the same version moves nothing and sends nothing.
    let r = admin_at(&a.admin, Method::POST, "/reload", "").await;
    let v: Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(v["status"], "reloaded", "{v}");
    assert!(v.get("broadcast").is_none(), "{v}");
    assert!(process_hit(&b, "/kept").await);

    std::fs::write(&config, "[cache]\nversion = 7\n").expect("config");
    let r = admin_at(&a.admin, Method::POST, "/reload", "").await;
    let v: Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(v["version"], 7, "{v}");
    assert_eq!(v["broadcast"]["regions"][0], "default", "{v}");
    let started = Instant::now();
    while process_hit(&b, "/kept").await {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "B never followed A's reloaded version"
        );
    }
}

#[tokio::test]
async fn figures_from_two_processes() {
    let redis = RedisServer::start();
    let origin = Origin::start(|s, n| {
        let r = cached(&format!("{} #{n}", s.path));
        if s.path == "/stampede" {
            r.delay(Duration::from_millis(300))
        } else {
            r
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start_binary(dir.path(), &origin.url(), &redis.url()).await;
    let b = start_binary(dir.path(), &origin.url(), &redis.url()).await;

    // Purge propagation: store on B, purge on A, poll B until it misses.
    let mut delays = Vec::new();
    for i in 0..100 {
        let path = format!("/p/{i}");
        get(&format!("http://{}{path}", b.listen)).await;
        assert!(process_hit(&b, &path).await);
        let body = format!("{{\"urls\":[\"{path}\"]}}");
        let started = Instant::now();
        let r = admin_at(&a.admin, Method::POST, "/purge", &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        while process_hit(&b, &path).await {
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "purge {i} never arrived"
            );
        }
        delays.push(started.elapsed());
    }
    delays.sort();
    println!(
        "FIGURE purge propagation over 100 purges: median {:?}, p90 {:?}, max {:?}",
        percentile(&delays, 0.5),
        percentile(&delays, 0.9),
        delays[delays.len() - 1]
    );

    // Cluster-wide stampede: 100 concurrent requests, half on each process.
    let urls = [a.listen.as_str(), b.listen.as_str()].map(|l| format!("http://{l}/stampede"));
    for r in stampede(urls, 100).await {
        assert_eq!(r.status, 200);
    }
    println!(
        "FIGURE stampede: 100 concurrent requests over 2 processes -> {} origin request(s)",
        origin.count("/stampede")
    );
    assert_eq!(origin.count("/stampede"), 1);

    // What a request costs with Redis up, then killed: hits and misses on A.
    let mut redis = redis;
    for state in ["up", "down"] {
        if state == "down" {
            redis.kill();
        }
        let (mut hits, mut misses) = (Vec::new(), Vec::new());
        for i in 0..50 {
            let path = format!("/cost/{state}/{i}");
            let url = format!("http://{}{path}", a.listen);
            let started = Instant::now();
            assert_eq!(get(&url).await.status, 200);
            misses.push(started.elapsed());
            let started = Instant::now();
            assert_eq!(get(&url).await.status, 200);
            hits.push(started.elapsed());
        }
        misses.sort();
        hits.sort();
        println!(
            "FIGURE redis {state}: miss median {:?} max {:?}; hit median {:?} max {:?}",
            percentile(&misses, 0.5),
            misses[misses.len() - 1],
            percentile(&hits, 0.5),
            hits[hits.len() - 1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_purges_broadcast_and_one_fetch_per_key() {
    let cluster = common::redis::RedisCluster::start();
    let origin = Origin::start(|s, n| {
        let r = cached(&format!("{} #{n}", s.path));
        if s.path == "/cold" {
            r.delay(Duration::from_millis(300))
        } else {
            r
        }
    })
    .await;
    let toml = config_with_timeout(&cluster.url(), 2_000, "");
    let a = Gateway::from_toml(&origin, &toml).await;
    let b = Gateway::from_toml(&origin, &toml).await;
    eventually("both follow the stream", || async {
        following(&a).await && following(&b).await
    })
    .await;

    warm(&b, "/page").await;
    let reply = admin_ok(&a, Method::POST, "/purge", r#"{"urls":["/page"]}"#).await;
    assert_eq!(reply["broadcast"]["regions"][0], "default", "{reply}");
    eventually("B drops the purged URL", || async {
        !hit(&b, "/page").await
    })
    .await;

    for r in stampede([a.url("/cold"), b.url("/cold")], 20).await {
        assert_eq!(r.status, 200);
    }
    assert_eq!(origin.count("/cold"), 1);

    // Every key kvgate wrote carries the prefix's hash tag: one slot.
    let mut keys = String::new();
    for node in cluster.nodes() {
        keys.push_str(&node.command(&["KEYS", "*"]).unwrap_or_default());
    }
    assert!(
        keys.contains("{kvgate:production:}cluster:events"),
        "{keys}"
    );
    assert!(!keys.contains("\nkvgate:"), "an untagged key: {keys}");
}
