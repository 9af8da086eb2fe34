//! The request pipeline: guard -> cache key -> lookup -> (hit | stale |
//! validate | miss) -> response. Data flows one way; every branch ends in one
//! response and at most one origin request per key at a time.

use super::body::{Body, Capture, CaptureEnd, OriginBody, SharedBody};
use super::headers::{
    forward_request_headers, remove_hop_by_hop, strip_client_forwarding, ClientInfo,
};
use super::origin::{OriginClient, UpstreamBody};
use super::respond::{self, CacheResult, Labels};
use super::self_service;
use crate::cache::directives::{RequestDirectives, ResponseDirectives};
use crate::cache::key::CacheKey;
use crate::cache::policy::{self, Freshness, Heuristic, StoragePolicy, Usability};
use crate::cache::single_flight::{self, Join, Outcome, SharedResponse, SingleFlight};
use crate::cache::storage::{Entry, Storage, Store, StoredHeaders};
use crate::cache::tags::Tagger;
use crate::config::{Config, RouteConfig, StateBackend, StateConfig};
use crate::edge::Edge;
use crate::kv::{DurableKv, Kv, MemoryKv};
use crate::metrics::Metrics;
use crate::protocol::cidr;
use crate::protocol::path::{self, PathError};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Everything the request path needs, shared by all connections.
pub struct Gateway {
    pub config: Arc<Config>,
    pub store: Store,
    pub flights: Arc<SingleFlight>,
    pub origin: OriginClient,
    pub metrics: Metrics,
    pub labels: Labels,
    /// Route rules, shared with every request that matches them.
    routes: Vec<Arc<RouteConfig>>,
    /// Edge decisions, when `[edge]` is configured.
    pub edge: Option<Edge>,
    /// Where users manage their own preferences, when configured.
    self_service_path: Option<String>,
    /// Where stored responses get their tags (origin headers, config rules).
    pub tags: Tagger,
    /// The global cache namespace version (bumped by the admin API).
    version: AtomicU64,
    /// Bumps per route name: a key's version is the global version plus its
    /// route's bumps, so either bump moves every key of the route to a
    /// version it has never had.
    route_versions: HashMap<String, AtomicU64>,
}

/// The per-request facts every branch needs.
struct Ctx {
    key: CacheKey,
    method: Method,
    /// The request headers as forwarded (after the guard and edge).
    headers: HeaderMap,
    req_cc: RequestDirectives,
    route: Option<Arc<RouteConfig>>,
    client: ClientInfo,
}

impl Ctx {
    /// The request target (path and query), in normal form.
    fn path(&self) -> &str {
        self.key.path_and_query()
    }

    /// Headers for the origin: the client's (after edge injection), with
    /// hop-by-hop fields removed and Via / X-Forwarded-* added.
    fn origin_headers(&self, via: &HeaderValue) -> HeaderMap {
        let mut h = self.headers.clone();
        forward_request_headers(&mut h, self.client, self.key.authority(), via);
        h
    }

    /// Whether this request alone keeps a response from being stored
    /// (`Authorization`, or its own `no-store`): such a request neither
    /// joins nor leads a shared fetch, and does not evict what others
    /// stored (9111 3.5, 5.2.1.5).
    fn limits_storage_itself(&self) -> bool {
        self.req_cc.no_store || self.headers.contains_key(header::AUTHORIZATION)
    }
}

/// The request's authority: the URI's (HTTP/2 `:authority`, or an
/// absolute-form target, which wins over `Host` per RFC 9112 3.2.2), else
/// `Host`, else empty (HTTP/1.0).
fn authority(parts: &http::request::Parts) -> &str {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

/// RFC 9112 3.2: an HTTP/1.1 request without `Host`, with more than one, or
/// with one that is not a valid authority, gets 400 (it must not reach the
/// origin, nor name a cache key).
fn check_host<B>(req: &Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    match host {
        None if req.version() == http::Version::HTTP_11 && req.uri().authority().is_none() => {
            Err("HTTP/1.1 request without Host")
        }
        None => Ok(()),
        Some(h) => {
            let valid = h
                .to_str()
                .ok()
                .filter(|s| !s.contains('@'))
                .and_then(|s| s.parse::<http::uri::Authority>().ok())
                .is_some();
            if valid {
                Ok(())
            } else {
                Err("invalid Host header")
            }
        }
    }
}

/// Rewrites the request target to its normal form (see `protocol::path`).
fn normalize_request_target(parts: &mut http::request::Parts) -> Result<(), PathError> {
    let Some(pq) = parts.uri.path_and_query() else {
        return Ok(());
    };
    let std::borrow::Cow::Owned(normal) = path::normalize_target(pq.as_str())? else {
        return Ok(());
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    // The normal form only drops and decodes characters the original had,
    // so it is still a valid path and query.
    uri.path_and_query = http::uri::PathAndQuery::try_from(normal).ok();
    parts.uri = http::Uri::from_parts(uri).map_err(|_| PathError::BadEscape)?;
    Ok(())
}

impl Gateway {
    pub fn new(config: Config) -> Result<Arc<Gateway>, String> {
        let origin = OriginClient::new(&config.origin)?;
        let edge = match &config.edge {
            Some(e) => Some(Edge::new(e, open_state(&config.state)?).map_err(|e| e.to_string())?),
            None => None,
        };
        let c = &config.cache;
        let tags = Tagger::new(c)?;
        let route_versions = config
            .routes
            .iter()
            .map(|r| (r.name.clone(), AtomicU64::new(0)))
            .collect();
        Ok(Arc::new(Gateway {
            store: Store::new(c.max_bytes, c.max_object_bytes, c.shards),
            flights: SingleFlight::new(Duration::from_secs(c.hit_for_miss_secs)),
            origin,
            metrics: Metrics::default(),
            labels: Labels::new(&config.server.name),
            edge,
            routes: config.routes.iter().cloned().map(Arc::new).collect(),
            self_service_path: config
                .edge
                .as_ref()
                .and_then(|e| e.preferences.self_service_path.clone()),
            tags,
            version: AtomicU64::new(c.version),
            route_versions,
            config: Arc::new(config),
        }))
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// The route for a path in normal form: the longest matching prefix.
    /// An origin may route an encoded `/` as a separator, so when the path
    /// has one and that reading falls under a bypass route, bypass wins.
    fn route_for(&self, path: &str) -> Option<Arc<RouteConfig>> {
        let longest = |p: &str| {
            self.routes
                .iter()
                .filter(|r| p.starts_with(r.prefix.get_ref().as_str()))
                .max_by_key(|r| r.prefix.get_ref().len())
                .cloned()
        };
        let route = longest(path);
        if let Some(opened) = path::separator_decoded(path) {
            if let Some(bypass) = longest(&opened).filter(|r| r.bypass) {
                return Some(bypass);
            }
        }
        route
    }

    /// Bumps the namespace version: every older entry becomes unreachable.
    pub fn bump_version(&self) -> u64 {
        self.version.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Raises the global version to at least `to` (a reloaded config's
    /// `cache.version`); never lowers it, which would resurrect old entries.
    pub fn raise_version_to(&self, to: u64) -> u64 {
        self.version.fetch_max(to, Ordering::Relaxed).max(to)
    }

    /// The version in the keys of requests on `route`.
    pub fn key_version(&self, route: Option<&RouteConfig>) -> u64 {
        let bumps = route
            .and_then(|r| self.route_versions.get(&r.name))
            .map_or(0, |v| v.load(Ordering::Relaxed));
        self.version().wrapping_add(bumps)
    }

    /// Bumps one route's version; `None` for an unknown route. Returns the
    /// version that route's keys now carry.
    pub fn bump_route_version(&self, name: &str) -> Option<u64> {
        let bumps = self.route_versions.get(name)?;
        let after = bumps.fetch_add(1, Ordering::Relaxed) + 1;
        Some(self.version().wrapping_add(after))
    }

    /// Serves one client request.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        client: ClientInfo,
    ) -> Response<Body> {
        let started = Instant::now();
        // Only the access log needs these; the hit path should not pay for them.
        let logged = (self.config.log.access
            && tracing::enabled!(target: "kvgate::access", tracing::Level::INFO))
        .then(|| {
            (
                req.method().clone(),
                req.uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string(),
            )
        });
        let resp = self.route(req, client).await;
        let result = resp
            .headers()
            .get(respond::X_CACHE)
            .and_then(|v| CacheResult::from_bytes(v.as_bytes()));
        self.metrics.record(result, resp.status());
        if let Some((method, path)) = logged {
            tracing::info!(
                target: "kvgate::access",
                method = %method,
                path = %path,
                status = resp.status().as_u16(),
                cache = result.map_or("-", CacheResult::as_str),
                micros = started.elapsed().as_micros() as u64,
            );
        }
        resp
    }

    async fn route(self: &Arc<Self>, req: Request<Incoming>, client: ClientInfo) -> Response<Body> {
        let cfg = &self.config;
        if let Some(refusal) = self.guard(&req) {
            return refusal;
        }
        let (mut parts, body) = req.into_parts();
        // Hop-by-hop fields go first: a client must not be able to name an
        // injected header in `Connection` and have it removed after the
        // edge decided (the cache would file the origin's answer under the
        // wrong variant).
        remove_hop_by_hop(&mut parts.headers);
        let trusted_peer = cidr::any_contains(&cfg.server.trusted_proxies, client.addr.ip());
        strip_client_forwarding(&mut parts.headers, trusted_peer);
        // One normal form of the path for everything that follows: routes,
        // bypass, the edge, tags, the key and the origin request.
        if let Err(e) = normalize_request_target(&mut parts) {
            return self.own(StatusCode::BAD_REQUEST, &e.to_string(), CacheResult::Bypass);
        }
        // The authority the request names: the URI's (HTTP/2 `:authority`,
        // absolute-form) wins over `Host` (RFC 9112 3.2.2); the origin sees
        // the same one in `Host` when `preserve_host` is on.
        let authority = authority(&parts).to_owned();
        if parts.uri.authority().is_some() {
            if let Ok(v) = HeaderValue::from_str(&authority) {
                parts.headers.insert(header::HOST, v);
            }
        }
        // Edge: decide flags / variants / preferences and inject them before
        // the cache key and Vary see the request, so that variants the origin
        // varies on are cached apart.
        let mut set_cookie = None;
        if let Some(edge) = &self.edge {
            edge.strip_injected(&mut parts.headers);
            let decision = edge
                .decide(
                    &parts.headers,
                    parts.uri.path(),
                    client.addr.ip(),
                    client.tls,
                )
                .await;
            decision.apply(&mut parts.headers);
            set_cookie = decision.set_cookie;
            if let Some(prefs) = self.self_service_path.as_deref() {
                if parts.uri.path() == prefs {
                    let max = cfg.edge.as_ref().map_or(4096, |e| e.preferences.max_bytes);
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
                    return r;
                }
            }
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let route = self.route_for(path);
        if let Some(edge) = &self.edge {
            edge.counter_registry()
                .route(route.as_ref().map_or("default", |r| r.name.as_str()))
                .incr();
        }
        let key = CacheKey::new(
            self.key_version(route.as_deref()),
            client.tls,
            &authority,
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
        let mut resp = if !cfg.cache.enabled
            || ctx.route.as_ref().is_some_and(|r| r.bypass)
            || !cacheable_method
        {
            self.pass(ctx, body).await
        } else {
            self.lookup(ctx).await
        };
        if let Some(cookie) = set_cookie {
            // Per response, never stored: the cookie is this client's alone.
            resp.headers_mut().append(header::SET_COOKIE, cookie);
        }
        resp
    }

    /// Guard: limits a client cannot exceed (414, 413) and a request head
    /// that names no valid authority (400). Header size (431) and the
    /// header-read timeout are enforced by the listener.
    fn guard(&self, req: &Request<Incoming>) -> Option<Response<Body>> {
        let limits = &self.config.server;
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        if path.len() > limits.max_uri_bytes {
            return Some(self.own(
                StatusCode::URI_TOO_LONG,
                "request target too long",
                CacheResult::Bypass,
            ));
        }
        if let Err(why) = check_host(req) {
            return Some(self.own(StatusCode::BAD_REQUEST, why, CacheResult::Bypass));
        }
        // A reverse proxy tunnels nothing (CONNECT), and TRACE would echo
        // the client's cookies and credentials back through any script
        // that can send it (cross-site tracing).
        if req.method() == Method::CONNECT || req.method() == Method::TRACE {
            return Some(self.own(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed",
                CacheResult::Bypass,
            ));
        }
        let declared_len = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_len.is_some_and(|n| n > limits.max_body_bytes)
            || req.body().size_hint().lower() > limits.max_body_bytes
        {
            return Some(self.own(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
                CacheResult::Bypass,
            ));
        }
        None
    }

    /// A response from a stored entry for this request (HEAD: no body).
    fn serve_stored(
        &self,
        e: &Entry,
        ctx: &Ctx,
        now: SystemTime,
        result: CacheResult,
        status_params: &str,
    ) -> Response<Body> {
        let head = ctx.method == Method::HEAD;
        respond::from_entry(
            e,
            &ctx.headers,
            head,
            now,
            &self.labels,
            result,
            status_params,
        )
    }

    fn own(&self, status: StatusCode, msg: &str, result: CacheResult) -> Response<Body> {
        respond::own(status, msg, &self.labels, result, "fwd=bypass")
    }

    /// Cache lookup and the decision it leads to (9111 4).
    async fn lookup(self: &Arc<Self>, ctx: Ctx) -> Response<Body> {
        let now = SystemTime::now();
        let head = ctx.method == Method::HEAD;
        let stored = self.store.lookup(&ctx.key, &ctx.headers);
        if let Some(e) = &stored {
            match policy::usability(&e.freshness, &ctx.req_cc, now) {
                Usability::Fresh => {
                    return self.serve_stored(e, &ctx, now, CacheResult::Hit, "hit");
                }
                Usability::StaleAllowed => {
                    return self.serve_stored(
                        e,
                        &ctx,
                        now,
                        CacheResult::Stale,
                        "hit; detail=max-stale",
                    );
                }
                Usability::StaleWhileRevalidate => {
                    self.refresh_in_background(&ctx, e.clone());
                    return self.serve_stored(
                        e,
                        &ctx,
                        now,
                        CacheResult::Stale,
                        "hit; detail=stale-while-revalidate",
                    );
                }
                Usability::MustValidate => {}
            }
        }
        if ctx.req_cc.only_if_cached {
            // 9111 5.2.1.7: nothing usable stored.
            return self.own(
                StatusCode::GATEWAY_TIMEOUT,
                "only-if-cached and nothing usable is stored",
                CacheResult::Miss,
            );
        }
        if head {
            // A HEAD is answered from a stored GET; without one it passes.
            return self.fetch(&ctx, None, false, None).await;
        }
        if ctx.limits_storage_itself() {
            // Its answer may not be shareable for reasons of its own; others
            // must neither wait on it nor be marked hit-for-miss by it.
            return self.fetch(&ctx, stored, true, None).await;
        }
        match self.flights.join(&ctx.key) {
            Join::Leader(guard) => self.fetch(&ctx, stored, true, Some(guard)).await,
            Join::Bypass => self.fetch(&ctx, stored, true, None).await,
            Join::Waiter(rx) => {
                let lock_timeout = Duration::from_millis(self.config.cache.lock_timeout_ms);
                match single_flight::wait(rx, lock_timeout).await {
                    Outcome::Shared(r)
                        if r.vary.is_empty() || policy::vary_matches(&r.vary, &ctx.headers) =>
                    {
                        self.serve_shared(&ctx, &r)
                    }
                    _ => {
                        // Not shareable: fetch alone (and store, if we can).
                        let stored = self.store.lookup(&ctx.key, &ctx.headers).or(stored);
                        self.fetch(&ctx, stored, true, None).await
                    }
                }
            }
        }
    }

    /// A coalesced waiter's answer: the leader's head, its body as it streams.
    fn serve_shared(&self, ctx: &Ctx, r: &SharedResponse) -> Response<Body> {
        let now = SystemTime::now();
        if r.status == StatusCode::OK && policy::conditional_matches(&ctx.headers, &r.headers) {
            let mut resp = Response::new(Body::Empty);
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            *resp.headers_mut() = policy::not_modified_headers(&r.headers);
            respond::mark(
                resp.headers_mut(),
                &self.labels,
                CacheResult::Hit,
                "hit; detail=coalesced",
            );
            return resp;
        }
        let hint = r.content_length.map_or_else(
            http_body::SizeHint::default,
            http_body::SizeHint::with_exact,
        );
        let mut resp = Response::new(Body::Shared(r.body.reader(hint)));
        *resp.status_mut() = r.status;
        *resp.headers_mut() = r.headers.clone();
        resp.headers_mut().insert(
            header::AGE,
            HeaderValue::from(r.freshness.current_age(now).as_secs()),
        );
        respond::mark(
            resp.headers_mut(),
            &self.labels,
            CacheResult::Hit,
            "hit; detail=coalesced",
        );
        resp
    }

    /// Stale-while-revalidate: one background refresh per key, not tied to
    /// the client connection (RFC 5861 3).
    fn refresh_in_background(self: &Arc<Self>, ctx: &Ctx, stored: Arc<Entry>) {
        let Some(guard) = self.flights.try_lead(&ctx.key) else {
            return; // already being fetched or refreshed
        };
        self.metrics
            .background_refreshes
            .fetch_add(1, Ordering::Relaxed);
        let gw = self.clone();
        let ctx = Ctx {
            key: ctx.key.clone(),
            method: Method::GET,
            headers: ctx.headers.clone(),
            req_cc: RequestDirectives::default(),
            route: ctx.route.clone(),
            client: ctx.client,
        };
        tokio::spawn(async move {
            let resp = gw.fetch(&ctx, Some(stored), true, Some(guard)).await;
            // Drain the body so the capture completes and the store updates.
            let mut body = resp.into_body();
            while let Some(frame) =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
            {
                if frame.is_err() {
                    break;
                }
            }
        });
    }

    /// Goes to the origin for a GET/HEAD: a conditional request when a stored
    /// entry has validators, a plain one otherwise. Stores what may be
    /// stored, serves stale on errors where allowed (RFC 5861 4).
    async fn fetch(
        self: &Arc<Self>,
        ctx: &Ctx,
        stored: Option<Arc<Entry>>,
        may_store: bool,
        guard: Option<single_flight::FlightGuard>,
    ) -> Response<Body> {
        let may_store = may_store && !ctx.req_cc.no_store && ctx.method == Method::GET;
        let mut headers = ctx.origin_headers(&self.labels.via);
        // The cache path never forwards a request body (GET / HEAD): a
        // Content-Length left in place would make the origin wait for bytes
        // that never come, or read the next request as this body.
        headers.remove(header::CONTENT_LENGTH);
        if may_store {
            // We want a response we can store and share: the client's own
            // conditionals are answered by us, from that response.
            headers.remove(header::IF_NONE_MATCH);
            headers.remove(header::IF_MODIFIED_SINCE);
            headers.remove(header::IF_MATCH);
            headers.remove(header::IF_UNMODIFIED_SINCE);
            headers.remove(header::IF_RANGE);
            if let Some(e) = &stored {
                if let Some(etag) = e.headers.get(&header::ETAG) {
                    headers.insert(header::IF_NONE_MATCH, etag.clone());
                }
                if let Some(lm) = e.headers.get(&header::LAST_MODIFIED) {
                    headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
                }
            }
        }
        let mut req = Request::new(Either::Right(Empty::<Bytes>::new()));
        *req.method_mut() = ctx.method.clone();
        *req.uri_mut() = ctx
            .path()
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/"));
        *req.headers_mut() = headers;
        let request_time = SystemTime::now();
        self.metrics.origin_requests.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let result = self.origin.send(req).await;
        self.metrics.observe_origin(sent.elapsed());
        let now = SystemTime::now();
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                self.metrics.origin_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %ctx.path(), error = %e, "origin failed");
                if let Some(s) = stored.filter(|s| self.can_serve_on_error(ctx, s, now, true)) {
                    return self.serve_stored(
                        &s,
                        ctx,
                        now,
                        CacheResult::Stale,
                        "hit; detail=stale-if-error",
                    );
                }
                let msg = e.to_string();
                return respond::own(
                    e.status(),
                    &msg,
                    &self.labels,
                    CacheResult::Miss,
                    "fwd=miss; detail=origin-error",
                );
            }
        };
        let status = resp.status();
        // 304 to our conditional: refresh the stored entry (9111 4.3.4).
        if let (StatusCode::NOT_MODIFIED, Some(s), true) = (status, &stored, may_store) {
            return self.merge_304(ctx, s, resp.headers(), request_time, now, guard);
        }
        if status.is_server_error() && matches!(status.as_u16(), 500 | 502 | 503 | 504) {
            if let Some(s) = stored
                .as_ref()
                .filter(|s| self.can_serve_on_error(ctx, s, now, false))
            {
                return self.serve_stored(
                    s,
                    ctx,
                    now,
                    CacheResult::Stale,
                    "hit; detail=stale-if-error",
                );
            }
        }
        let (mut parts, incoming) = resp.into_parts();
        let origin_tags = self.tags.take_from_response(&mut parts.headers);
        let cc = ResponseDirectives::from_headers(&parts.headers);
        let verdict = if may_store {
            self.storable(ctx, status, &parts.headers, &cc)
        } else {
            Err(policy::NotStorable::Method)
        };
        let too_big = content_length(&parts.headers)
            .is_some_and(|n| n > self.store.max_object_bytes() as u64);
        let result = if stored.is_some() {
            "fwd=stale"
        } else {
            "fwd=uri-miss"
        };
        let idle = self.origin.idle_timeout;
        match (verdict, too_big) {
            (Ok(()), false) => {
                let vary: Vec<_> = policy::vary_fields(&parts.headers)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|n| {
                        let v = policy::vary_value(&ctx.headers, &n);
                        (n, v)
                    })
                    .collect();
                let mut stored_headers = parts.headers.clone();
                policy::strip_unstorable(&mut stored_headers);
                stored_headers.remove(header::AGE);
                let freshness = self.freshness(ctx, status, &parts.headers, &cc, request_time, now);
                let tags = self.tags.entry_tags(origin_tags, ctx.path());
                let shared = Arc::new(SharedBody::default());
                if let Some(g) = &guard {
                    g.publish(Arc::new(SharedResponse {
                        status,
                        headers: stored_headers.clone(),
                        vary: vary.clone().into_boxed_slice(),
                        body: shared.clone(),
                        freshness: freshness.clone(),
                        content_length: content_length(&parts.headers),
                    }));
                }
                let gw = self.clone();
                let key = ctx.key.clone();
                let old = stored.clone();
                let mut guard = guard;
                let capture = Capture {
                    shared: Some(shared),
                    limit: self.store.max_object_bytes(),
                    on_complete: Box::new(move |end| {
                        match end {
                            CaptureEnd::Complete(body) => {
                                let entry = Arc::new(Entry::new(
                                    status,
                                    stored_headers,
                                    body,
                                    vary,
                                    freshness,
                                    tags,
                                ));
                                gw.store.insert(key, entry);
                            }
                            CaptureEnd::TooLarge => {
                                // Nobody could share it: later requests go
                                // straight to the origin for a while.
                                if let Some(g) = guard.take() {
                                    g.not_shareable();
                                }
                            }
                            // The refresh failed mid-body: keep serving the
                            // stale entry.
                            CaptureEnd::Failed => drop(old),
                        }
                        drop(guard); // end the flight only after the store has it
                    }),
                };
                remove_hop_by_hop(&mut parts.headers);
                let detail = format!("{result}; fwd-status={}; stored", status.as_u16());
                let mut client_resp =
                    self.client_response(ctx, parts, incoming, idle, Some(capture));
                respond::mark(
                    client_resp.headers_mut(),
                    &self.labels,
                    CacheResult::Miss,
                    &detail,
                );
                client_resp
            }
            (verdict, _) => {
                if let Some(g) = guard {
                    g.not_shareable();
                }
                let request_caused = verdict == Err(policy::NotStorable::Authorization);
                if stored.is_some() && may_store && status.is_success() && !request_caused {
                    // The origin now says "do not store": drop the old copy.
                    self.store.purge_key(&ctx.key, false);
                }
                remove_hop_by_hop(&mut parts.headers);
                let why = match verdict {
                    Err(e) => e.as_str(),
                    Ok(()) => "too-large",
                };
                let detail = format!("{result}; fwd-status={}; detail={why}", status.as_u16());
                let mut client_resp = self.client_response(ctx, parts, incoming, idle, None);
                respond::mark(
                    client_resp.headers_mut(),
                    &self.labels,
                    CacheResult::Miss,
                    &detail,
                );
                client_resp
            }
        }
    }

    /// The client's response to an origin response: the client's own
    /// conditional answered with 304 when the fresh response matches.
    fn client_response(
        &self,
        ctx: &Ctx,
        parts: http::response::Parts,
        incoming: Incoming,
        idle: Duration,
        capture: Option<Capture>,
    ) -> Response<Body> {
        let conditional = parts.status == StatusCode::OK
            && capture.is_some()
            && policy::conditional_matches(&ctx.headers, &parts.headers);
        let body = Body::Origin(Box::new(OriginBody::new(incoming, idle, capture)));
        if conditional {
            // Dropping the origin body finishes the capture in the background.
            drop(body);
            let mut r = Response::new(Body::Empty);
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            *r.headers_mut() = policy::not_modified_headers(&parts.headers);
            return r;
        }
        Response::from_parts(parts, body)
    }

    /// Stale-if-error (RFC 5861 4) and, when the origin could not be reached
    /// at all ("disconnected", 9111 4.2.4), the configured grace.
    fn can_serve_on_error(
        &self,
        ctx: &Ctx,
        s: &Entry,
        now: SystemTime,
        disconnected: bool,
    ) -> bool {
        let grace = if disconnected {
            Duration::from_secs(self.config.cache.grace_secs)
        } else {
            Duration::ZERO
        };
        let req_sie = ctx
            .headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|d| d.trim().strip_prefix("stale-if-error="))
            .find_map(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        s.freshness
            .can_serve_on_error(now, Some(req_sie.map_or(grace, |r| r.max(grace))))
    }

    fn storable(
        &self,
        ctx: &Ctx,
        status: StatusCode,
        h: &HeaderMap,
        cc: &ResponseDirectives,
    ) -> Result<(), policy::NotStorable> {
        let allow_set_cookie = ctx
            .route
            .as_ref()
            .and_then(|r| r.allow_set_cookie)
            .unwrap_or(self.config.cache.allow_set_cookie);
        let verdict = policy::storable(
            &ctx.method,
            &ctx.headers,
            status,
            h,
            cc,
            StoragePolicy { allow_set_cookie },
        )
        .and_then(|()| {
            // A HIT must carry every header the MISS had.
            StoredHeaders::fits(h)
                .then_some(())
                .ok_or(policy::NotStorable::HeadersTooLarge)
        });
        let route_ttl = ctx
            .route
            .as_ref()
            .is_some_and(|r| r.ttl_secs.is_some() || r.default_ttl_secs.is_some());
        match verdict {
            Err(policy::NotStorable::NoFreshnessOrValidator)
                if route_ttl && policy::heuristically_cacheable(status) =>
            {
                Ok(())
            }
            v => v,
        }
    }

    fn freshness(
        &self,
        ctx: &Ctx,
        status: StatusCode,
        h: &HeaderMap,
        cc: &ResponseDirectives,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Freshness {
        let c = &self.config.cache;
        let heuristic = Heuristic {
            fraction: c.heuristic_fraction,
            max: Duration::from_secs(c.heuristic_max_secs),
        };
        let route = ctx.route.as_ref();
        let mut lifetime = policy::freshness_lifetime(status, h, cc, response_time, heuristic);
        if let Some(r) = route {
            if let Some(t) = r.ttl_secs {
                lifetime = Duration::from_secs(t);
            } else if let (Some(t), false) =
                (r.default_ttl_secs, policy::has_explicit_freshness(h, cc))
            {
                lifetime = Duration::from_secs(t);
            }
        }
        let swr = cc
            .stale_while_revalidate
            .or(route.and_then(|r| r.stale_while_revalidate_secs))
            .unwrap_or(0);
        let sie = cc
            .stale_if_error
            .or(route.and_then(|r| r.stale_if_error_secs))
            .unwrap_or(0);
        Freshness {
            lifetime,
            corrected_initial_age: policy::corrected_initial_age(h, request_time, response_time),
            response_time,
            no_cache: cc.no_cache || !cc.no_cache_fields.is_empty(),
            forbids_stale: cc.forbids_stale(),
            stale_while_revalidate: Duration::from_secs(swr),
            stale_if_error: Duration::from_secs(sie),
        }
    }

    /// A 304 to our conditional (9111 4.3.4): the stored entry's headers
    /// updated and its freshness measured anew. The 304's `Set-Cookie` goes
    /// to this client only, never into the shared entry. If the merged
    /// headers no longer allow storing (`no-store`, `private`, `Vary: *`),
    /// the entry is dropped and this client alone gets it; if only this
    /// request forbids it (`Authorization`), the entry stays as it was.
    fn merge_304(
        &self,
        ctx: &Ctx,
        s: &Arc<Entry>,
        not_modified: &HeaderMap,
        request_time: SystemTime,
        now: SystemTime,
        guard: Option<single_flight::FlightGuard>,
    ) -> Response<Body> {
        let merged = merged_304_headers(s, not_modified);
        let cc = ResponseDirectives::from_headers(&merged);
        let verdict = self.storable(ctx, s.status, &merged, &cc);
        let refreshed = Arc::new(self.refreshed(ctx, s, merged, not_modified, request_time, now));
        let merged = refreshed.headers.to_map();
        let detail = match verdict {
            Ok(()) => {
                self.store.replace(&ctx.key, s, refreshed.clone());
                if let Some(g) = guard {
                    g.publish(Arc::new(SharedResponse {
                        status: refreshed.status,
                        headers: merged,
                        vary: refreshed.vary.clone(),
                        body: SharedBody::complete(refreshed.body.clone()),
                        freshness: refreshed.freshness.clone(),
                        content_length: Some(refreshed.body.len() as u64),
                    }));
                }
                "fwd=stale; fwd-status=304".to_owned()
            }
            Err(why) => {
                if let Some(g) = guard {
                    g.not_shareable();
                }
                if why != policy::NotStorable::Authorization {
                    self.store.purge_key(&ctx.key, false);
                }
                format!("fwd=stale; fwd-status=304; detail={}", why.as_str())
            }
        };
        let mut resp = self.serve_stored(&refreshed, ctx, now, CacheResult::Revalidated, &detail);
        for cookie in not_modified.get_all(header::SET_COOKIE) {
            resp.headers_mut()
                .append(header::SET_COOKIE, cookie.clone());
        }
        resp
    }

    /// The stored entry with `headers` merged from a 304 (9111 4.3.4) and
    /// freshness measured from this exchange.
    fn refreshed(
        &self,
        ctx: &Ctx,
        s: &Entry,
        mut headers: HeaderMap,
        not_modified: &HeaderMap,
        request_time: SystemTime,
        now: SystemTime,
    ) -> Entry {
        self.tags.take_from_response(&mut headers);
        let mut with_age = headers.clone();
        if let Some(a) = not_modified.get(header::AGE) {
            with_age.insert(header::AGE, a.clone());
        }
        headers.remove(header::AGE);
        let cc = ResponseDirectives::from_headers(&headers);
        let freshness = self.freshness(ctx, s.status, &with_age, &cc, request_time, now);
        Entry::new(
            s.status,
            headers,
            s.body.clone(),
            s.vary.to_vec(),
            freshness,
            s.tags.to_vec(),
        )
    }

    /// Forwards a request the cache does not handle (unsafe methods,
    /// bypass routes), streaming the body both ways, then invalidates what
    /// an unsafe method changed (9111 4.4).
    async fn pass(self: &Arc<Self>, ctx: Ctx, body: Incoming) -> Response<Body> {
        let mut req = Request::new(Either::Left(body) as UpstreamBody);
        *req.method_mut() = ctx.method.clone();
        *req.uri_mut() = ctx
            .path()
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/"));
        *req.headers_mut() = ctx.origin_headers(&self.labels.via);
        self.metrics.origin_requests.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let result = self.origin.send(req).await;
        self.metrics.observe_origin(sent.elapsed());
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                self.metrics.origin_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %ctx.path(), error = %e, "origin failed");
                return respond::own(
                    e.status(),
                    &e.to_string(),
                    &self.labels,
                    CacheResult::Bypass,
                    "fwd=bypass; detail=origin-error",
                );
            }
        };
        let (mut parts, incoming) = resp.into_parts();
        self.tags.take_from_response(&mut parts.headers);
        let targets = policy::invalidation_targets(
            &ctx.method,
            parts.status,
            &parts.headers,
            ctx.key.authority(),
            ctx.path(),
        );
        for target in targets {
            // Location targets are the origin's; keys are in normal form.
            let Ok(target) = path::normalize_target(&target) else {
                continue;
            };
            let version = self.key_version(self.route_for(&target).as_deref());
            let key = ctx.key.with_path(&target).with_version(version);
            self.store.purge_key(&key, false);
        }
        remove_hop_by_hop(&mut parts.headers);
        let detail = format!("fwd=bypass; fwd-status={}", parts.status.as_u16());
        let mut r = Response::from_parts(
            parts,
            Body::Origin(Box::new(OriginBody::new(
                incoming,
                self.origin.idle_timeout,
                None,
            ))),
        );
        respond::mark(r.headers_mut(), &self.labels, CacheResult::Bypass, &detail);
        r
    }
}

/// A stored entry's headers updated from a 304 (9111 3.2), except for the
/// 304's `Set-Cookie`: that belongs to the client whose request caused it.
fn merged_304_headers(s: &Entry, not_modified: &HeaderMap) -> HeaderMap {
    let mut headers = s.headers.to_map();
    let mut update = not_modified.clone();
    update.remove(header::SET_COOKIE);
    policy::update_from_304(&mut headers, &update);
    headers
}

/// Opens the KV that edge state lives in.
fn open_state(cfg: &StateConfig) -> Result<Arc<dyn Kv>, String> {
    Ok(match cfg.backend {
        StateBackend::Memory => Arc::new(MemoryKv::new()),
        StateBackend::Durable => Arc::new(
            DurableKv::open(&cfg.path)
                .map_err(|e| format!("state file {}: {e}", cfg.path.display()))?,
        ),
    })
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
