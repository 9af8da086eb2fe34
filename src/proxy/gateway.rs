//! The gateway: everything the request path shares, and the request path
//! itself as a sequence of phases. Each phase lives in its own file:
//!
//! 1. `request`: the request checked (guard: limits, Host, method) and put
//!    in normal form (hop-by-hop and client forwarding headers removed, the
//!    path normalised);
//! 2. the edge decided (flags, variants, preferences injected; `edge`);
//! 3. the key built (namespace version, scheme, authority, path);
//! 4. `lookup`: looked up, and served when usable (hit, stale, coalesced);
//! 5. `fetch`: fetched from the origin (conditional, stale-if-error, the
//!    304 merge), stored as it streams (`cache::filters` decides what and
//!    for how long);
//! 6. `pass`: or passed through uncached (bypass routes, unsafe methods);
//! 7. answered (`respond`: Age, X-Cache, Cache-Status).
//!
//! Data flows one way; every branch ends in one response and at most one
//! origin request per key at a time.

use super::body::Body;
use super::headers::{
    remove_hop_by_hop, request_id, strip_client_forwarding, ClientInfo, X_REQUEST_ID,
};
use super::origin::{BoxError, OriginClient, Upstream, ORIGIN_TIME};
use super::request::{authority, normalize_request_target, Ctx};
use super::respond::{self, Answer, CacheResult, CacheStatus, Forward, Labels};
use super::self_service;
use crate::cache::directives::RequestDirectives;
use crate::cache::key::CacheKey;
use crate::cache::single_flight::SingleFlight;
use crate::cache::storage::{Entry, Store};
use crate::cache::tags::Tagger;
use crate::config::{Config, RouteConfig};
use crate::edge::Edge;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::protocol::cidr;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

/// What the access line says about the request, read before it is consumed.
pub(super) struct AccessFields {
    pub(super) method: Method,
    pub(super) host: String,
    pub(super) path: String,
    pub(super) user_agent: String,
}

/// What the access line says about the answer.
pub(super) struct Answered {
    pub(super) status: StatusCode,
    pub(super) result: CacheResult,
    /// The body's length, when known.
    pub(super) bytes: Option<u64>,
    pub(super) origin_time: Option<Duration>,
    pub(super) elapsed: Duration,
}

/// The request's access line (target `kvgate::access`), in its id's scope.
pub(super) fn access_line(
    request_id: &HeaderValue,
    client: ClientInfo,
    f: &AccessFields,
    a: &Answered,
) {
    crate::logging::in_request_id(request_id.clone(), || {
        tracing::info!(
            target: "kvgate::access",
            client = %client.addr,
            method = %f.method,
            host = %f.host,
            path = %f.path,
            status = a.status.as_u16(),
            cache = a.result.as_str(),
            bytes = a.bytes,
            origin_micros = a.origin_time.map(|d| d.as_micros() as u64),
            micros = a.elapsed.as_micros() as u64,
            user_agent = %f.user_agent,
        )
    });
}

impl AccessFields {
    fn of<B>(req: &Request<B>) -> AccessFields {
        let text = |name| {
            req.headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default()
        };
        AccessFields {
            method: req.method().clone(),
            host: req
                .uri()
                .authority()
                .map_or_else(|| text(header::HOST), |a| a.to_string()),
            path: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            user_agent: text(header::USER_AGENT),
        }
    }
}

/// The gateway in force: replaced as a whole by a config reload
/// (`admin::reload`). A request loads it once, when it starts, and keeps
/// that generation to its end.
pub(crate) type Live = arc_swap::ArcSwap<Gateway>;

/// A request's answer: ready at once (a hit, a refusal) or still to come
/// (the edge, a probe, a miss, a pass), in a future of its own so that a
/// hit neither allocates nor moves the larger ones' state.
pub(super) enum Answering<'a> {
    Now(std::future::Ready<Answer>),
    Later(Pin<Box<dyn Future<Output = Answer> + Send + 'a>>),
}

impl<'a> Answering<'a> {
    fn now(answer: Answer) -> Answering<'a> {
        Answering::Now(std::future::ready(answer))
    }

    fn later(f: impl Future<Output = Answer> + Send + 'a) -> Answering<'a> {
        Answering::Later(Box::pin(f))
    }
}

impl Future for Answering<'_> {
    type Output = Answer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        match self.get_mut() {
            Answering::Now(ready) => Pin::new(ready).poll(cx),
            Answering::Later(f) => f.as_mut().poll(cx),
        }
    }
}

/// The probes `[server]` can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Probe {
    Alive,
    Ready,
}

/// Everything the request path needs, shared by all connections: one
/// generation of the configuration (routes, rules, origin, edge) over the
/// state that outlives reloads (store, single flights, metrics, versions,
/// the edge's state store), which a reloaded generation shares.
pub struct Gateway {
    pub(crate) config: Arc<Config>,
    /// The response store (shared by every generation).
    pub store: Store,
    pub(crate) flights: Arc<SingleFlight>,
    /// Where misses and passes go (the origin over HTTP, or a test's).
    pub(crate) origin: Box<dyn Upstream>,
    /// `[origins.NAME]`, for the routes that name one.
    pub(crate) named_origins: HashMap<String, Box<dyn Upstream>>,
    pub(crate) metrics: Arc<Metrics>,
    /// Reloads, connections, probes (off the hit path).
    pub(crate) ops: Arc<crate::metrics::ops::Ops>,
    pub(crate) labels: Labels,
    /// Route rules, shared with every request that matches them.
    pub(super) routes: Vec<Arc<RouteConfig>>,
    /// Edge decisions, when `[edge]` is configured.
    pub edge: Option<Edge>,
    /// Where users manage their own preferences, when configured.
    pub(super) self_service_path: Option<String>,
    /// Where stored responses get their tags (origin headers, config rules).
    pub(crate) tags: Tagger,
    /// The global cache namespace version (bumped by the admin API).
    pub(super) version: Arc<AtomicU64>,
    /// Bumps per route name: a key's version is the global version plus its
    /// route's bumps, so either bump moves every key of the route to a
    /// version it has never had. A reload keeps the bumps of routes whose
    /// name it keeps.
    pub(super) route_versions: HashMap<String, Arc<AtomicU64>>,
    /// The edge's state store, opened once: a reload builds its edge on it.
    pub(crate) state: Option<Arc<dyn crate::kv::Kv>>,
    /// The Redis regions, when `[redis]` (or `--redis`) is configured.
    pub(crate) redis: Option<Arc<crate::redis::Redis>>,
    /// The local copy of hot edge-state reads (Redis backend only); the
    /// purge broadcast invalidates it for writes made elsewhere.
    pub(crate) state_cache: Option<Arc<crate::kv::cached::CachedKv>>,
    /// Edge counters summed over every instance (Redis and `[edge]`).
    pub(crate) shared_counters: Option<Arc<crate::redis::counters::SharedCounters>>,
    /// Purge broadcast and cluster-wide single fetch (with Redis only).
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
    /// One span per request, when `[tracing] otlp_endpoint` is set.
    pub(crate) tracer: Option<Arc<crate::telemetry::Tracer>>,
    /// Whether plain hits may take the HTTP/1.1 fast path (`h1_hits`, and
    /// `h1_edge` with `[edge]`): `[server] fast_hits`, and nothing a hit
    /// must do besides answering (no tracing, the cache on).
    pub(super) fast_h1: bool,
}
impl Gateway {
    pub(crate) fn new(config: Config) -> Result<Arc<Gateway>, GatewayError> {
        let origin = OriginClient::new(&config.origin)?;
        Gateway::with_upstream(config, Box::new(origin))
    }

    /// A gateway whose misses and passes go to `origin` (the in-process
    /// tests give it a scripted one; `new` the real origin client).
    pub(crate) fn with_upstream(
        config: Config,
        origin: Box<dyn Upstream>,
    ) -> Result<Arc<Gateway>, GatewayError> {
        let redis = match &config.redis {
            Some(r) => Some(crate::redis::Redis::connect(r, &config.environment())?),
            None => None,
        };
        let (state, state_cache) = match &config.edge {
            Some(_) => {
                let opened = crate::kv::open(&config.state, redis.as_ref())?;
                (Some(opened.kv), opened.local_cache)
            }
            None => (None, None),
        };
        let shared_counters = match (&redis, &config.edge) {
            (Some(r), Some(_)) => Some(Arc::new(crate::redis::counters::SharedCounters::new(
                Arc::clone(r),
            ))),
            _ => None,
        };
        let c = &config.cache;
        let store = Store::new(c.max_bytes, c.max_object_bytes, c.shards);
        let flights = SingleFlight::new(Duration::from_secs(c.hit_for_miss_secs));
        let version = Arc::new(AtomicU64::new(c.version));
        if c.l2.is_some() && redis.is_none() {
            tracing::warn!("[cache.l2] is set but [redis] is not: the shared response tier is off");
        }
        let cluster = redis.as_ref().map(|r| {
            Arc::new(crate::cluster::Cluster::new(
                Arc::clone(r),
                Duration::from_millis(c.lock_timeout_ms),
                c.max_object_bytes,
                c.l2.as_ref(),
            ))
        });
        if let (Some(cluster), Some(cache)) = (&cluster, &state_cache) {
            cluster.share_state(cache);
        }
        let mut g = Gateway::generation(
            config,
            origin,
            store,
            flights,
            state,
            None,
            version,
            Arc::default(),
        )?;
        g.redis = redis;
        g.state_cache = state_cache;
        g.shared_counters = shared_counters;
        g.cluster = cluster;
        let gateway = Arc::new(g);
        // Events from other instances go to this first generation, which
        // `cli::Running` keeps for the life of the process; later
        // generations share its store, versions and (for the route names
        // they keep) route bumps, so they see every event applied.
        if let Some(cluster) = &gateway.cluster {
            let target: std::sync::Weak<Gateway> = Arc::downgrade(&gateway);
            cluster.start(target);
        }
        Ok(gateway)
    }

    /// The next generation for a reloaded `config`: everything rebuilt from
    /// it but the store, the single flights, the metrics, the versions, the
    /// state store and the edge's counters, which it shares with `self`.
    /// `config` must have passed the same checks as at start.
    pub(crate) fn reloaded(&self, config: Config) -> Result<Arc<Gateway>, GatewayError> {
        let origin = OriginClient::new(&config.origin)?;
        // An edge turned on by the reload needs a state store; one opened
        // before is kept (a durable file is locked by the first open).
        let (state, state_cache) = match (&self.state, &config.edge) {
            (Some(kv), _) => (Some(kv.clone()), self.state_cache.clone()),
            (None, Some(_)) => {
                let opened = crate::kv::open(&config.state, self.redis.as_ref())?;
                (Some(opened.kv), opened.local_cache)
            }
            (None, None) => (None, None),
        };
        let mut g = Gateway::generation(
            config,
            Box::new(origin),
            self.store.clone(),
            self.flights.clone(),
            state,
            self.edge.as_ref(),
            self.version.clone(),
            self.ops.clone(),
        )?;
        g.metrics = self.metrics.clone();
        // Redis connections are kept: `[redis]` changes need a restart.
        g.redis = self.redis.clone();
        // The cluster (broadcast reader, leases, L2) is kept: its events go
        // to the first generation, whose store and versions this one shares.
        g.cluster = self.cluster.clone();
        if let (Some(cluster), Some(cache), None) = (&g.cluster, &state_cache, &self.state) {
            // A state store opened by this reload.
            cluster.share_state(cache);
        }
        g.state_cache = state_cache;
        g.shared_counters = match (&self.shared_counters, &self.redis, &g.edge) {
            (Some(c), _, Some(_)) => Some(c.clone()),
            (None, Some(r), Some(_)) => Some(Arc::new(
                crate::redis::counters::SharedCounters::new(Arc::clone(r)),
            )),
            _ => None,
        };
        for (name, bumps) in &mut g.route_versions {
            if let Some(old) = self.route_versions.get(name) {
                *bumps = old.clone();
            }
        }
        Ok(Arc::new(g))
    }

    /// One generation: what `config` decides, over the given shared state.
    #[allow(clippy::too_many_arguments)] // each is state a generation shares
    fn generation(
        config: Config,
        origin: Box<dyn Upstream>,
        store: Store,
        flights: Arc<SingleFlight>,
        state: Option<Arc<dyn crate::kv::Kv>>,
        previous_edge: Option<&Edge>,
        version: Arc<AtomicU64>,
        ops: Arc<crate::metrics::ops::Ops>,
    ) -> Result<Gateway, GatewayError> {
        let tracer = crate::telemetry::Tracer::from_config(&config.tracing, ops.clone())?;
        let edge = match (&config.edge, &state) {
            (Some(e), Some(kv)) => Some(match previous_edge {
                Some(old) => Edge::with_counters(e, kv.clone(), old.counter_registry().clone())?,
                None => Edge::new(e, kv.clone())?,
            }),
            _ => None,
        };
        let tags = Tagger::new(&config.cache)?;
        let named_origins = config
            .origins
            .iter()
            .map(|(name, o)| {
                let client: Box<dyn Upstream> = Box::new(OriginClient::new(o)?);
                Ok((name.clone(), client))
            })
            .collect::<Result<_, GatewayError>>()?;
        let route_versions = config
            .routes
            .iter()
            .map(|r| (r.name.clone(), Arc::new(AtomicU64::new(0))))
            .collect();
        let fast_h1 = config.server.fast_hits && config.cache.enabled && tracer.is_none();
        Ok(Gateway {
            store,
            flights,
            origin,
            named_origins,
            metrics: Arc::new(Metrics::default()),
            ops,
            tracer,
            labels: Labels::new(&config.server.name),
            edge,
            routes: config.routes.iter().cloned().map(Arc::new).collect(),
            self_service_path: config
                .edge
                .as_ref()
                .and_then(|e| e.preferences.self_service_path.clone()),
            tags,
            version,
            route_versions,
            state,
            redis: None,
            state_cache: None,
            shared_counters: None,
            cluster: None,
            fast_h1,
            config: Arc::new(config),
        })
    }
    /// Where a request on `route` goes: the origin it names, else `[origin]`.
    /// (Names are checked against `[origins]` when the config loads.)
    pub(super) fn origin_for(&self, route: Option<&RouteConfig>) -> &dyn Upstream {
        route
            .and_then(|r| r.origin.as_ref())
            .and_then(|name| self.named_origins.get(name.get_ref()))
            .map_or(&*self.origin, |o| &**o)
    }

    /// Stops this generation's origin background tasks (health checks,
    /// address refresh): a reload replaced it.
    pub(crate) fn retire_origins(&self) {
        self.origin.retire();
        for o in self.named_origins.values() {
            o.retire();
        }
    }

    /// The global cache namespace version (bumped by the admin API).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }
    /// The route for a path in normal form (`config::match_route`).
    pub(super) fn route_for(&self, path: &str) -> Option<Arc<RouteConfig>> {
        self.route_ref(path).cloned()
    }

    /// [`Gateway::route_for`], lent: no reference count written (a hit
    /// that only reads the route must not write a count every core shares).
    pub(super) fn route_ref(&self, path: &str) -> Option<&Arc<RouteConfig>> {
        crate::config::match_route(&self.routes, path)
    }

    /// Removes the forwarding fields `client` may not set: all of them
    /// unless it is one of `[server] trusted_proxies` (both paths, before
    /// the edge or anything else reads the request).
    pub(super) fn strip_forwarding_from(&self, headers: &mut http::HeaderMap, client: ClientInfo) {
        let trusted = cidr::any_contains(&self.config.server.trusted_proxies, client.addr.ip());
        strip_client_forwarding(headers, trusted);
    }

    /// Whether the access log wants a line for each request.
    pub(super) fn access_logged(&self) -> bool {
        self.config.log.access && tracing::enabled!(target: "kvgate::access", tracing::Level::INFO)
    }

    /// Bumps the namespace version: every older entry becomes unreachable.
    pub(crate) fn bump_version(&self) -> u64 {
        self.version.fetch_add(1, Ordering::Relaxed) + 1
    }
    /// Raises the global version to at least `to` (a reloaded config's
    /// `cache.version`); never lowers it, which would resurrect old entries.
    pub(crate) fn raise_version_to(&self, to: u64) -> u64 {
        self.version.fetch_max(to, Ordering::Relaxed).max(to)
    }
    /// Follows a version bump made on another instance: moves to at least
    /// its version, and always past our own, so that nothing stored here
    /// before the bump stays reachable.
    pub(crate) fn follow_version(&self, to: u64) -> u64 {
        let before = self
            .version
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.wrapping_add(1).max(to))
            })
            .unwrap_or_else(|v| v);
        before.wrapping_add(1).max(to)
    }
    /// The version in the keys of requests on `route`.
    pub(crate) fn key_version(&self, route: Option<&RouteConfig>) -> u64 {
        let bumps = route
            .and_then(|r| self.route_versions.get(&r.name))
            .map_or(0, |v| v.load(Ordering::Relaxed));
        self.version().wrapping_add(bumps)
    }
    /// Bumps one route's version; `None` for an unknown route. Returns the
    /// version that route's keys now carry.
    pub(crate) fn bump_route_version(&self, name: &str) -> Option<u64> {
        let bumps = self.route_versions.get(name)?;
        let after = bumps.fetch_add(1, Ordering::Relaxed) + 1;
        Some(self.version().wrapping_add(after))
    }
    /// Serves one client request. What does not wait (the request id, a
    /// hit's whole answer) is done when this is called; the future returned
    /// holds only what the rest needs, not the request (hyper moves it).
    pub(crate) fn handle<B>(
        self: &Arc<Self>,
        mut req: Request<B>,
        client: ClientInfo,
    ) -> impl Future<Output = Response<Body>> + Send + '_
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let request_id = request_id(req.headers());
        req.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        // Only the access log needs these; the hit path should not pay for them.
        let logged = self.access_logged().then(|| AccessFields::of(&req));
        // With tracing on: the request's span, its context set for the origin.
        let traced = self.tracer.as_ref().map(|t| {
            let f = AccessFields::of(&req);
            t.start(f.method, f.host, f.path, req.headers_mut())
        });
        // Every line logged while serving the request carries its id: the
        // log formatter reads it from the scope of the synchronous part, then
        // from the task while the rest is awaited. A hit is answered here
        // and now, without awaiting; only what must wait is boxed (see
        // `answer`), so this future stays small (hyper moves it).
        let answering =
            crate::logging::in_request_id(request_id.clone(), || self.answer(req, client));
        async move {
            let (
                Answer {
                    response: mut resp,
                    result,
                },
                origin_time,
            ) = match answering {
                Answering::Now(answer) => (answer.into_inner(), None),
                Answering::Later(waiting) => {
                    let waiting = async {
                        if logged.is_some() {
                            let origin_time = std::cell::Cell::new(None);
                            ORIGIN_TIME
                                .scope(origin_time, async {
                                    let answer = waiting.await;
                                    (answer, ORIGIN_TIME.with(|t| t.get()))
                                })
                                .await
                        } else {
                            (waiting.await, None)
                        }
                    };
                    crate::logging::with_request_id(request_id.clone(), waiting).await
                }
            };
            // The second clock read of the request (the first is `started`):
            // the latency histogram and the access line share it.
            let elapsed = started.elapsed();
            self.metrics.record(result, resp.status(), elapsed);
            if let Some(f) = logged {
                use http_body::Body as _;
                let answered = Answered {
                    status: resp.status(),
                    result,
                    bytes: resp.body().size_hint().exact(),
                    origin_time,
                    elapsed,
                };
                access_line(&request_id, client, &f, &answered);
            }
            if let (Some(tracer), Some(started)) = (&self.tracer, traced) {
                tracer.finish(started, elapsed, resp.status(), result, &request_id);
            }
            resp.headers_mut().insert(X_REQUEST_ID, request_id);
            resp
        }
    }
    /// Phases 1 to 7 for one request (see the module docs), without
    /// awaiting anything a plain hit does not need: a hit or a refusal is
    /// answered at once; the edge, a probe, a miss and a pass continue in a
    /// boxed future. (One `async fn` holding every phase was a state machine
    /// of about 2 KiB, with the request in it twice over, that every
    /// request allocated past the allocator's per-thread cache and moved.)
    fn answer<B>(self: &Arc<Self>, req: Request<B>, client: ClientInfo) -> Answering<'_>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if let Some(refusal) = self.guard(&req) {
            return Answering::now(refusal);
        }
        if let Some(target) = self.probe_at(req.uri().path()) {
            return Answering::later(self.probe(req.method().clone(), target));
        }
        let (mut parts, body) = req.into_parts();
        // Hop-by-hop fields go first: a client must not be able to name an
        // injected header in `Connection` and have it removed after the
        // edge decided (the cache would file the origin's answer under the
        // wrong variant).
        remove_hop_by_hop(&mut parts.headers);
        self.strip_forwarding_from(&mut parts.headers, client);
        // One normal form of the path for everything that follows: routes,
        // bypass, the edge, tags, the key and the origin request.
        if let Err(e) = normalize_request_target(&mut parts) {
            let refusal = self.own(StatusCode::BAD_REQUEST, &e.to_string(), CacheResult::Bypass);
            return Answering::now(refusal);
        }
        // The authority the request names: the URI's (HTTP/2 `:authority`,
        // absolute-form) wins over `Host` (RFC 9112 3.2.2); the origin sees
        // the same one in `Host` when `preserve_host` is on.
        // Only HTTP/2 and absolute-form requests pay for this; the key is
        // built from the same `authority` below, without a copy.
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
        match &self.edge {
            Some(edge) => Answering::later(self.answer_with_edge(edge, parts, body, client)),
            None => {
                let route = self.route_for(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
                self.serve(parts, body, client, route)
            }
        }
    }

    /// Phase 2 and what follows it: the edge decides (flags, variants,
    /// preferences injected before the cache key and Vary see the request,
    /// so that variants the origin varies on are cached apart), the
    /// request is served, and exposures are recorded once the status is
    /// known. (A plain HTTP/1.1 hit gets the same from `h1_edge`.)
    async fn answer_with_edge<B>(
        self: &Arc<Self>,
        edge: &Edge,
        mut parts: http::request::Parts,
        body: B,
        client: ClientInfo,
    ) -> Answer
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        edge.strip_injected(&mut parts.headers);
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut decision = edge
            .decide(&parts.headers, target, client.addr.ip(), client.tls)
            .await;
        decision.apply(&mut parts.headers);
        let set_cookie = decision.set_cookie.take();
        if let Some(prefs) = self.self_service_path.as_deref() {
            if parts.uri.path() == prefs {
                let max = self
                    .config
                    .edge
                    .as_ref()
                    .map_or(4096, |e| e.preferences.max_bytes);
                let mut r = self_service::preferences(
                    edge,
                    &parts.method,
                    body,
                    &decision.user_id,
                    max,
                    &self.labels,
                )
                .await;
                if let Some(cookie) = set_cookie {
                    r.headers_mut().append(header::SET_COOKIE, cookie);
                }
                return Answer {
                    response: r,
                    result: CacheResult::Bypass,
                };
            }
        }
        let route = self.route_for(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
        edge.counter_registry()
            .count_route(route.as_ref().map_or("default", |r| r.name.as_str()));
        // Exposures and conversions are recorded once the status is known.
        // (Cheap clones: the URI shares its bytes, the route is an Arc.)
        let observed = decision.observes().then(|| {
            (
                decision,
                parts.method.clone(),
                parts.uri.clone(),
                route.clone(),
            )
        });
        let mut answer = self.serve(parts, body, client, route).await;
        if let Some((decision, method, uri, route)) = &observed {
            let route = route.as_ref().map_or("default", |r| r.name.as_str());
            let status = answer.response.status();
            edge.observe(decision, method, uri.path(), route, status)
                .await;
        }
        if let Some(cookie) = set_cookie {
            // Per response, never stored: the cookie is this client's alone.
            answer
                .response
                .headers_mut()
                .append(header::SET_COOKIE, cookie);
        }
        answer
    }

    /// Phases 3 to 6 for a request in normal form on `route`: the key, then
    /// the lookup (a usable stored response answers at once) or a pass.
    fn serve<B>(
        self: &Arc<Self>,
        parts: http::request::Parts,
        body: B,
        client: ClientInfo,
        route: Option<Arc<RouteConfig>>,
    ) -> Answering<'_>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let key = CacheKey::new(
            self.key_version(route.as_deref()),
            client.tls,
            authority(&parts),
            path,
        );
        let ctx = Ctx {
            req_cc: RequestDirectives::from_headers(&parts.headers),
            key,
            method: parts.method,
            headers: parts.headers,
            route,
            client,
        };
        let cacheable_method = ctx.method == Method::GET || ctx.method == Method::HEAD;
        if !self.config.cache.enabled
            || ctx.route.as_ref().is_some_and(|r| r.bypass)
            || !cacheable_method
        {
            return Answering::later(self.pass(ctx, body));
        }
        match self.serve_usable(&ctx) {
            Ok(hit) => Answering::now(hit),
            Err(stored) => Answering::Later(self.after_lookup(ctx, stored)),
        }
    }

    /// Which probe the request asks for, when it is for `[server]
    /// health_path` or `ready_path`. Costs nothing when neither is
    /// configured.
    pub(super) fn probe_at(&self, path: &str) -> Option<Probe> {
        let server = &self.config.server;
        if server.health_path.is_none() && server.ready_path.is_none() {
            return None;
        }
        let is =
            |p: &Option<toml::Spanned<String>>| p.as_ref().is_some_and(|p| p.get_ref() == path);
        if is(&server.health_path) {
            Some(Probe::Alive)
        } else if is(&server.ready_path) {
            Some(Probe::Ready)
        } else {
            None
        }
    }

    /// The liveness or readiness probe's answer (GET and HEAD only).
    async fn probe(&self, method: Method, target: Probe) -> Answer {
        let server = &self.config.server;
        if method != Method::GET && method != Method::HEAD {
            let mut a = self.own(
                StatusCode::METHOD_NOT_ALLOWED,
                "probes answer GET and HEAD",
                CacheResult::Bypass,
            );
            a.response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return a;
        }
        let probe = if target == Probe::Alive {
            super::probes::alive()
        } else {
            let stopping = self.ops.stopping.load(Ordering::Relaxed);
            super::probes::ready(self, server.listen.get_ref(), stopping).await
        };
        let body = if method == Method::HEAD {
            Body::Empty
        } else {
            Body::full(Bytes::from(probe.body.to_string()))
        };
        let mut r = Response::new(body);
        *r.status_mut() = probe.status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let status = CacheStatus::forward(CacheResult::Bypass, Forward::Bypass);
        Answer::marked(r, &self.labels, status)
    }

    /// A response from a stored entry for this request (HEAD: no body).
    pub(super) fn serve_stored(
        &self,
        e: &Entry,
        ctx: &Ctx,
        now: SystemTime,
        status: CacheStatus,
    ) -> Answer {
        let head = ctx.method == Method::HEAD;
        respond::from_entry(e, &ctx.headers, head, now, &self.labels, status)
    }

    /// The gateway's own answer (refusals, only-if-cached misses).
    pub(super) fn own(&self, status: StatusCode, msg: &str, result: CacheResult) -> Answer {
        let cache_status = CacheStatus::forward(result, Forward::Bypass);
        respond::own(status, msg, &self.labels, cache_status)
    }
}
