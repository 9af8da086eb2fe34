//! Connections to the Redis servers several instances share: one per
//! region, each a lazily connected, self-reconnecting `ConnectionManager`,
//! or, for a Redis Cluster (`[redis] cluster` or a `redis+cluster://` url),
//! a cluster connection made on first use that routes by key slot.
//!
//! Every call goes through [`Region::call`], which bounds it by the
//! configured timeout, keeps the region's health (up, degraded, down and
//! the last latency) and, while a region is down, fails at once instead of
//! waiting: only one probe per [`PROBE_INTERVAL`] goes through, so a dead
//! Redis costs a request nothing. Faults are logged once per
//! [`LOG_INTERVAL`] per region, not once per call.
//!
//! Users: the Redis state backend (`kv::redis`), the shared counters
//! ([`counters`]) and the cluster layer (purge broadcast, lease locks, the
//! response tier), which takes [`Redis`] from the gateway.

pub(crate) mod counters;

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;

use crate::config::redis::RedisConfig;

/// After this many failed calls in a row a region counts as down.
const DOWN_AFTER: u32 = 3;
/// While a region is down, one call per interval is let through to probe it.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// A region's faults are logged at most once per interval.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How often the background task pings every region (keeps the health
/// fresh and the connection warm when no request needs Redis).
const PING_INTERVAL: Duration = Duration::from_secs(1);

/// Why a Redis call failed. Every variant names the region.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RedisError {
    /// No answer within the timeout (the call was abandoned).
    #[error("redis region {region}: no answer within {timeout_ms} ms")]
    Timeout { region: String, timeout_ms: u64 },
    /// The region is down; the call was not sent (see [`PROBE_INTERVAL`]).
    #[error("redis region {region} is down")]
    Down { region: String },
    /// The server or the connection failed the call.
    #[error("redis region {region}")]
    Command {
        region: String,
        #[source]
        source: ::redis::RedisError,
    },
}

/// A region's state as the admin API and metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Health {
    /// The last call succeeded within half the timeout.
    Up,
    /// The last call failed or was slow, but the region is not down yet.
    Degraded,
    /// Several calls in a row failed; calls fail fast until a probe succeeds.
    Down,
}

/// One region's health and latency.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct RegionHealth {
    pub(crate) name: String,
    pub(crate) health: Health,
    /// Round trip of the last successful call, in microseconds.
    pub(crate) last_latency_us: Option<u64>,
    /// Failed calls since start.
    pub(crate) failures: u64,
    /// State writes this region missed (each queued for a retry).
    pub(crate) failed_writes: u64,
    /// Queued writes dropped because the retry queue was full.
    pub(crate) dropped_writes: u64,
    /// Writes waiting in the retry queue now.
    pub(crate) queued_writes: u64,
}

/// Write bookkeeping a region's users (the state backend) keep on it.
#[derive(Default)]
pub(crate) struct WriteStats {
    pub(crate) failed: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) queued: AtomicU64,
}

/// A connection to a region: one server, or a Redis Cluster (commands
/// routed by key slot; every kvgate key shares one slot, see
/// `RedisConfig::effective_key_prefix`).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    /// A standalone server's connection that does not reconnect (its
    /// owner makes a new one).
    Own(::redis::aio::MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a ::redis::Cmd,
    ) -> ::redis::RedisFuture<'a, ::redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Own(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> ::redis::RedisFuture<'a, Vec<::redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Own(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Own(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How a region is reached.
enum Link {
    /// A standalone server: a lazily connected, self-reconnecting manager.
    Single {
        client: ::redis::Client,
        conn: ConnectionManager,
    },
    /// A Redis Cluster: connected on first use (the cluster may be down at
    /// start); the connection then follows slot moves and reconnects.
    Cluster(Box<ClusterLink>),
}

struct ClusterLink {
    url: String,
    client: ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

/// One region: its client, its connection and its health.
pub(crate) struct Region {
    name: String,
    link: Link,
    timeout: Duration,
    epoch: Instant,
    consecutive_failures: AtomicU32,
    failures: AtomicU64,
    /// u64::MAX until the first success.
    last_latency_us: AtomicU64,
    /// Milliseconds since `epoch` before which no probe is sent while down.
    next_probe_ms: AtomicU64,
    /// Milliseconds since `epoch` of the last fault logged (u64::MAX: never).
    last_logged_ms: AtomicU64,
    /// Faults not logged since the last line.
    unlogged: AtomicU64,
    writes: WriteStats,
}

impl Region {
    fn connect(
        name: &str,
        url: &str,
        cluster: bool,
        timeout: Duration,
    ) -> Result<Region, ::redis::RedisError> {
        let link = if cluster {
            Link::Cluster(Box::new(ClusterLink {
                url: url.to_owned(),
                client: cluster_client(url, timeout)?,
                conn: tokio::sync::OnceCell::new(),
            }))
        } else {
            let client = ::redis::Client::open(url)?;
            // The manager retries a lost connection in the background; the
            // timeouts bound each attempt, the breaker in `call` bounds callers.
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_min_delay(Duration::from_millis(20))
                .set_max_delay(Duration::from_millis(500));
            let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
            Link::Single { client, conn }
        };
        Ok(Region {
            name: name.to_owned(),
            link,
            timeout,
            epoch: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            failures: AtomicU64::new(0),
            last_latency_us: AtomicU64::new(u64::MAX),
            next_probe_ms: AtomicU64::new(0),
            last_logged_ms: AtomicU64::new(u64::MAX),
            unlogged: AtomicU64::new(0),
            writes: WriteStats::default(),
        })
    }

    /// The region's name (`default` for a single `url`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The shared connection (for a cluster, made on first use).
    async fn conn(&self) -> ::redis::RedisResult<Conn> {
        match &self.link {
            Link::Single { conn, .. } => Ok(Conn::Single(conn.clone())),
            Link::Cluster(link) => link
                .conn
                .get_or_try_init(|| link.client.get_async_connection())
                .await
                .cloned()
                .map(Conn::Cluster),
        }
    }

    /// A connection of its own, whose answers may take up to
    /// `response_timeout` (a blocking `XREAD` holds the connection it runs
    /// on, so it cannot share the others').
    pub(crate) async fn dedicated(&self, response_timeout: Duration) -> ::redis::RedisResult<Conn> {
        match &self.link {
            Link::Single { client, .. } => {
                let config = ::redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(response_timeout));
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(Conn::Own)
            }
            Link::Cluster(link) => ClusterClient::builder(vec![link.url.as_str()])
                .connection_timeout(self.timeout)
                .response_timeout(response_timeout)
                .build()?
                .get_async_connection()
                .await
                .map(Conn::Cluster),
        }
    }

    /// Counters of state writes to this region (kept by `kv::redis`).
    pub(crate) fn writes(&self) -> &WriteStats {
        &self.writes
    }

    /// The bound on every call.
    #[allow(dead_code)] // for the cluster layer's waits (part B)
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether a call may be sent now: always while the region is not down,
    /// else once per probe interval (the caller that wins the probe slot).
    fn admit(&self) -> bool {
        if self.consecutive_failures.load(Ordering::Relaxed) < DOWN_AFTER {
            return true;
        }
        let now = self.now_ms();
        let next = self.next_probe_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_probe_ms
                .compare_exchange(
                    next,
                    now.saturating_add(PROBE_INTERVAL.as_millis() as u64),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    fn succeeded(&self, took: Duration) {
        let was = self.consecutive_failures.swap(0, Ordering::Relaxed);
        self.last_latency_us.store(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX - 1),
            Ordering::Relaxed,
        );
        if was >= DOWN_AFTER {
            tracing::info!(region = %self.name, "redis region is back");
            self.last_logged_ms.store(u64::MAX, Ordering::Relaxed);
        }
    }

    fn failed(&self, err: &RedisError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let consecutive = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if consecutive >= DOWN_AFTER {
            // Down (or a failed probe): the next probe waits an interval.
            self.next_probe_ms.store(
                self.now_ms()
                    .saturating_add(PROBE_INTERVAL.as_millis() as u64),
                Ordering::Relaxed,
            );
        }
        self.log_fault(err);
    }

    /// Logs `err` unless this region logged a fault within [`LOG_INTERVAL`];
    /// the next line says how many were left out.
    pub(crate) fn log_fault(&self, err: &dyn std::error::Error) {
        let now = self.now_ms();
        let last = self.last_logged_ms.load(Ordering::Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= LOG_INTERVAL.as_millis() as u64;
        if due
            && self
                .last_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.unlogged.swap(0, Ordering::Relaxed);
            tracing::warn!(
                region = %self.name,
                error = %error_chain(err),
                suppressed,
                "redis fault; state falls back to local defaults (logged once per {}s)",
                LOG_INTERVAL.as_secs()
            );
        } else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs `op` on this region's connection, bounded by the timeout.
    /// A refused or failed connection, or no answer in time, counts against
    /// the region's health; an error answer from a healthy server does not.
    pub(crate) async fn call<T, F, Fut>(&self, op: F) -> Result<T, RedisError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = ::redis::RedisResult<T>>,
    {
        if !self.admit() {
            return Err(RedisError::Down {
                region: self.name.clone(),
            });
        }
        let started = Instant::now();
        let run = async {
            let conn = self.conn().await?;
            op(conn).await
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(value)) => {
                self.succeeded(started.elapsed());
                Ok(value)
            }
            Ok(Err(source)) => {
                let connection_fault = source.is_io_error()
                    || source.is_connection_dropped()
                    || source.is_connection_refusal()
                    || source.is_timeout()
                    || source.is_unrecoverable_error();
                let err = RedisError::Command {
                    region: self.name.clone(),
                    source,
                };
                if connection_fault {
                    self.failed(&err);
                } else {
                    self.succeeded(started.elapsed());
                }
                Err(err)
            }
            Err(_) => {
                let err = RedisError::Timeout {
                    region: self.name.clone(),
                    timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
                };
                self.failed(&err);
                Err(err)
            }
        }
    }

    /// One command.
    pub(crate) async fn query<T: ::redis::FromRedisValue>(
        &self,
        cmd: &::redis::Cmd,
    ) -> Result<T, RedisError> {
        self.call(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// A pipeline (atomic when built with `.atomic()`: MULTI/EXEC).
    pub(crate) async fn pipeline<T: ::redis::FromRedisValue>(
        &self,
        pipe: &::redis::Pipeline,
    ) -> Result<T, RedisError> {
        self.call(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await
    }

    /// A Lua script (EVALSHA, loading it on the first NOSCRIPT).
    pub(crate) async fn script<T: ::redis::FromRedisValue>(
        &self,
        invocation: &::redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        self.call(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await
    }

    /// Health and latency now.
    pub(crate) fn health(&self) -> RegionHealth {
        let consecutive = self.consecutive_failures.load(Ordering::Relaxed);
        let latency = self.last_latency_us.load(Ordering::Relaxed);
        let slow = latency != u64::MAX
            && latency > u64::try_from(self.timeout.as_micros() / 2).unwrap_or(u64::MAX);
        let health = if consecutive >= DOWN_AFTER {
            Health::Down
        } else if consecutive > 0 || slow {
            Health::Degraded
        } else {
            Health::Up
        };
        RegionHealth {
            name: self.name.clone(),
            health,
            last_latency_us: (latency != u64::MAX).then_some(latency),
            failures: self.failures.load(Ordering::Relaxed),
            failed_writes: self.writes.failed.load(Ordering::Relaxed),
            dropped_writes: self.writes.dropped.load(Ordering::Relaxed),
            queued_writes: self.writes.queued.load(Ordering::Relaxed),
        }
    }
}

/// A cluster client seeded with `url`, every connection and answer bounded
/// by `timeout`.
fn cluster_client(url: &str, timeout: Duration) -> ::redis::RedisResult<ClusterClient> {
    ClusterClient::builder(vec![url])
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(2)
        .min_retry_wait(20)
        .max_retry_wait(500)
        .build()
}

/// The text of an error and its sources, joined with ": ".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Every region of the deployment, this instance's own first in read order.
pub(crate) struct Redis {
    regions: Vec<Arc<Region>>,
    local: usize,
    key_prefix: String,
    settings: RedisConfig,
}

impl Redis {
    /// Sets up a connection per region without waiting for any: Redis may
    /// be down when the gateway starts, and the gateway starts anyway.
    /// Needs a tokio runtime (a background task pings every region).
    pub(crate) fn connect(
        cfg: &RedisConfig,
        environment: &str,
    ) -> Result<Arc<Redis>, crate::error::GatewayError> {
        let (targets, local) = cfg.targets();
        let mut regions = Vec::with_capacity(targets.len());
        for t in targets {
            let region =
                Region::connect(&t.name, &t.url, t.cluster, cfg.timeout()).map_err(|source| {
                    crate::error::GatewayError::Redis {
                        region: t.name.clone(),
                        source: Box::new(source),
                    }
                })?;
            regions.push(Arc::new(region));
        }
        let redis = Arc::new(Redis {
            regions,
            local,
            key_prefix: cfg.effective_key_prefix(environment),
            settings: cfg.clone(),
        });
        spawn_pinger(Arc::downgrade(&redis));
        Ok(redis)
    }

    /// The `[redis]` section this was set up from (queue, cache, counter
    /// settings).
    pub(crate) fn settings(&self) -> &RedisConfig {
        &self.settings
    }

    /// This instance's region.
    pub(crate) fn local(&self) -> &Arc<Region> {
        &self.regions[self.local]
    }

    /// Every region, in configuration order.
    pub(crate) fn regions(&self) -> &[Arc<Region>] {
        &self.regions
    }

    /// Regions in the order reads try them: the local one, then the others.
    pub(crate) fn read_order(&self) -> impl Iterator<Item = &Arc<Region>> {
        std::iter::once(self.local()).chain(
            self.regions
                .iter()
                .enumerate()
                .filter(move |(i, _)| *i != self.local)
                .map(|(_, r)| r),
        )
    }

    /// The prefix of every key kvgate writes (`[redis] key_prefix`).
    #[allow(dead_code)] // for the cluster layer's channels (part B)
    pub(crate) fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// `suffix` under the key prefix.
    pub(crate) fn key(&self, suffix: &str) -> String {
        let mut key = String::with_capacity(self.key_prefix.len() + suffix.len());
        key.push_str(&self.key_prefix);
        key.push_str(suffix);
        key
    }

    /// Every region's health, in configuration order.
    pub(crate) fn health(&self) -> Vec<RegionHealth> {
        self.regions.iter().map(|r| r.health()).collect()
    }
}

/// Pings every region once per [`PING_INTERVAL`] until the `Redis` is dropped.
fn spawn_pinger(redis: Weak<Redis>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(PING_INTERVAL).await;
            let Some(redis) = redis.upgrade() else {
                return;
            };
            for region in redis.regions() {
                let _ = region.query::<String>(&::redis::cmd("PING")).await;
            }
        }
    });
}

/// A real `redis-server` for the unit tests that need one.
#[cfg(test)]
pub(crate) mod test_server {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A `redis-server` on a free loopback port; killed on drop.
    pub(crate) struct TestRedis {
        child: Child,
        pub(crate) port: u16,
    }

    impl TestRedis {
        pub(crate) fn start() -> TestRedis {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            TestRedis::start_on(port)
        }

        pub(crate) fn start_on(port: u16) -> TestRedis {
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed: apt-get install redis-server");
            let server = TestRedis { child, port };
            let deadline = Instant::now() + Duration::from_secs(10);
            let client = ::redis::Client::open(server.url()).expect("url");
            loop {
                if let Ok(mut conn) = client.get_connection() {
                    if ::redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                        return server;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "redis-server did not answer PING"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        pub(crate) fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        pub(crate) fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }

        /// Starts it again, empty, on the same port.
        pub(crate) fn restart(&mut self) {
            self.kill();
            *self = TestRedis::start_on(self.port);
        }
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            self.kill();
        }
    }

    /// A three-master Redis Cluster (no replicas); killed on drop.
    pub(crate) struct TestCluster {
        nodes: Vec<Child>,
        pub(crate) ports: Vec<u16>,
        _dir: tempfile::TempDir,
    }

    impl TestCluster {
        pub(crate) fn start() -> TestCluster {
            let mut cluster = TestCluster {
                nodes: Vec::new(),
                ports: Vec::new(),
                _dir: tempfile::tempdir().expect("tempdir"),
            };
            let dir = cluster._dir.path().to_owned();
            for _ in 0..3 {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port")
                    .port();
                let child = Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no"])
                    .args(["--cluster-enabled", "yes"])
                    .arg("--cluster-config-file")
                    .arg(dir.join(format!("nodes-{port}.conf")))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server must be installed: apt-get install redis-server");
                cluster.nodes.push(child);
                cluster.ports.push(port);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            let info = |port: u16| -> Option<String> {
                let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
                let mut conn = client.get_connection().ok()?;
                ::redis::cmd("CLUSTER").arg("INFO").query(&mut conn).ok()
            };
            for &port in &cluster.ports {
                while info(port).is_none() {
                    assert!(Instant::now() < deadline, "a cluster node did not start");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let status = Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
                .arg("--cluster-yes")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("redis-cli must be installed");
            assert!(status.success(), "redis-cli --cluster create failed");
            for &port in &cluster.ports {
                while !info(port).is_some_and(|i| i.contains("cluster_state:ok")) {
                    assert!(Instant::now() < deadline, "the cluster did not form");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            cluster
        }

        pub(crate) fn url(&self) -> String {
            format!("redis+cluster://127.0.0.1:{}", self.ports[0])
        }
    }

    impl Drop for TestCluster {
        fn drop(&mut self) {
            for child in &mut self.nodes {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_server::TestRedis;
    use super::*;

    fn config(urls: &[(&str, String)], local: &str) -> RedisConfig {
        let mut cfg = RedisConfig {
            region: Some(local.to_owned()),
            timeout_ms: 200,
            ..RedisConfig::default()
        };
        cfg.regions = urls
            .iter()
            .map(|(name, url)| crate::config::redis::RegionConfig {
                name: (*name).to_owned(),
                url: toml::Spanned::new(0..0, url.clone()),
            })
            .collect();
        cfg
    }

    #[tokio::test]
    async fn calls_answer_and_health_follows_the_server() {
        let mut server = TestRedis::start();
        let redis = Redis::connect(&config(&[("eu", server.url())], "eu"), "test").unwrap();
        assert_eq!(redis.key("x"), "kvgate:test:x");
        let region = redis.local();
        let pong: String = region.query(&::redis::cmd("PING")).await.unwrap();
        assert_eq!(pong, "PONG");
        let h = region.health();
        assert_eq!(h.health, Health::Up);
        assert!(h.last_latency_us.is_some());

        // An error answer from a live server is not a connection fault.
        let err = region
            .query::<String>(&::redis::cmd("NOSUCHCOMMAND"))
            .await
            .unwrap_err();
        assert!(matches!(err, RedisError::Command { .. }), "{err}");
        assert_eq!(region.health().health, Health::Up);

        server.kill();
        for _ in 0..DOWN_AFTER {
            let started = Instant::now();
            assert!(region.query::<String>(&::redis::cmd("PING")).await.is_err());
            assert!(started.elapsed() < Duration::from_secs(2));
        }
        assert_eq!(region.health().health, Health::Down);
        // One log line for the first fault; the others wait for the interval.
        assert!(
            region.unlogged.load(Ordering::Relaxed) >= u64::from(DOWN_AFTER) - 1,
            "faults are not logged one by one"
        );
        // Down: calls fail at once, without waiting for the timeout.
        let started = Instant::now();
        let err = region
            .query::<String>(&::redis::cmd("PING"))
            .await
            .unwrap_err();
        assert!(matches!(err, RedisError::Down { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_millis(50));

        // Back on the same port: a probe reconnects and the region is up.
        let _server = TestRedis::start_on(server.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            if region.query::<String>(&::redis::cmd("PING")).await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "never reconnected");
        }
        assert_eq!(region.health().health, Health::Up);
        assert!(region.health().failures >= u64::from(DOWN_AFTER));
    }

    #[tokio::test]
    async fn a_silent_server_times_out_within_the_bound() {
        // A listener that accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", silent.local_addr().unwrap());
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let redis = Redis::connect(&config(&[("eu", url)], "eu"), "test").unwrap();
        let started = Instant::now();
        let err = redis
            .local()
            .query::<String>(&::redis::cmd("PING"))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(600), "{err}");
        assert_eq!(redis.local().health().health, Health::Degraded);
    }

    #[tokio::test]
    async fn reads_try_the_local_region_first() {
        let a = TestRedis::start();
        let b = TestRedis::start();
        let redis =
            Redis::connect(&config(&[("eu", a.url()), ("us", b.url())], "us"), "t").unwrap();
        let order: Vec<&str> = redis.read_order().map(|r| r.name()).collect();
        assert_eq!(order, ["us", "eu"]);
        assert_eq!(redis.health().len(), 2);
    }
}
