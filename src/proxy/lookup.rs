//! Phase 4, looked up: a usable stored response is served (fresh, stale
//! the client accepts, stale while one background refresh runs); otherwise
//! the request joins the key's single flight, as its leader (it fetches) or
//! a waiter (it reads the leader's response as it streams).

use super::body::Body;
use super::gateway::Gateway;
use super::request::Ctx;
use super::respond::{Answer, CacheResult, CacheStatus, Detail};
use crate::cache::directives::RequestDirectives;
use crate::cache::policy::{self, Usability};
use crate::cache::shared_body::SharedBody;
use crate::cache::single_flight::{self, Join, Outcome, SharedResponse};
use crate::cache::storage::{Entry, Storage};
use crate::cluster::Miss;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body::Body as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

impl Gateway {
    /// Phase 4's hit (9111 4): the stored response usable for this request, served where
    /// it is stored, without taking a reference to it (a count every core
    /// would write). Otherwise the entry to revalidate, if one is stored
    /// (the only one taken out).
    pub(super) fn serve_usable(self: &Arc<Self>, ctx: &Ctx) -> Result<Answer, Option<Arc<Entry>>> {
        let now = SystemTime::now();
        let served = self.store.lookup_with(&ctx.key, &ctx.headers, |e| {
            let status = match policy::usability(&e.freshness, &ctx.req_cc, now) {
                Usability::Fresh => CacheStatus::hit(CacheResult::Hit),
                Usability::StaleAllowed => {
                    CacheStatus::hit(CacheResult::Stale).detail(Detail::MaxStale)
                }
                Usability::StaleWhileRevalidate => {
                    self.refresh_in_background(ctx, e.clone());
                    CacheStatus::hit(CacheResult::Stale).detail(Detail::StaleWhileRevalidate)
                }
                Usability::MustValidate => return Err(e.clone()),
            };
            Ok(self.serve_stored(e, ctx, now, status))
        });
        match served {
            Some(Ok(answer)) => Ok(answer),
            Some(Err(e)) => Err(Some(e)),
            None => Err(None),
        }
    }

    /// Nothing usable is stored (`stored` is an entry to revalidate, if
    /// any): only-if-cached, a HEAD's pass, or the key's single flight.
    ///
    /// Boxed: the waits, the cluster's round trips and the fetch are a state
    /// machine that a hit must not carry inline (the request's future is
    /// boxed and moved whole; past the allocator's per-thread cache size its
    /// allocation takes the slow path). A miss pays one allocation.
    pub(super) fn after_lookup(
        self: &Arc<Self>,
        ctx: Ctx,
        stored: Option<Arc<Entry>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send + '_>> {
        Box::pin(self.lookup_missed(ctx, stored))
    }

    async fn lookup_missed(self: &Arc<Self>, ctx: Ctx, stored: Option<Arc<Entry>>) -> Answer {
        let head = ctx.method == Method::HEAD;
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
            return self.fetch(&ctx, None, false, None, None).await;
        }
        if ctx.limits_storage_itself() {
            // Its answer may not be shareable for reasons of its own; others
            // must neither wait on it nor be marked hit-for-miss by it.
            return self.fetch(&ctx, stored, true, None, None).await;
        }
        match self.flights.join(&ctx.key) {
            Join::Leader(guard) => match (&self.cluster, &stored) {
                // Nothing stored here: the cluster may have it, or another
                // instance may be fetching it (revalidations stay local).
                (Some(cluster), None) => {
                    // Boxed: the Redis round trips are a large state
                    // machine that hits must not carry (and copy) inline.
                    match Box::pin(cluster.before_fetch(&ctx.key, &ctx.headers, &ctx.req_cc)).await
                    {
                        Miss::Found(entry) => self.serve_from_cluster(&ctx, entry, guard),
                        Miss::Lead(lease) => {
                            self.fetch(&ctx, None, true, Some(guard), Some(lease)).await
                        }
                        Miss::Alone => self.fetch(&ctx, None, true, Some(guard), None).await,
                    }
                }
                _ => self.fetch(&ctx, stored, true, Some(guard), None).await,
            },
            Join::Bypass => self.fetch(&ctx, stored, true, None, None).await,
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
                        self.fetch(&ctx, stored, true, None, None).await
                    }
                }
            }
        }
    }
    /// A response another instance fetched: stored here, shared with this
    /// instance's waiters, served.
    fn serve_from_cluster(
        &self,
        ctx: &Ctx,
        entry: Arc<Entry>,
        guard: single_flight::FlightGuard,
    ) -> Answer {
        self.store.insert(ctx.key.clone(), entry.clone());
        guard.publish(Arc::new(SharedResponse {
            status: entry.status,
            headers: entry.header_map(),
            vary: entry.vary().into(),
            body: SharedBody::complete(entry.body()),
            freshness: entry.freshness.clone(),
            content_length: Some(entry.body_len() as u64),
        }));
        drop(guard);
        self.metrics.cluster_hits.fetch_add(1, Ordering::Relaxed);
        let status = CacheStatus::hit(CacheResult::Hit).detail(Detail::Coalesced);
        self.serve_stored(&entry, ctx, SystemTime::now(), status)
    }
    /// A coalesced waiter's answer: the leader's head, its body as it streams.
    pub(super) fn serve_shared(&self, ctx: &Ctx, r: &SharedResponse) -> Answer {
        let coalesced = CacheStatus::hit(CacheResult::Hit).detail(Detail::Coalesced);
        let now = SystemTime::now();
        if r.status == StatusCode::OK && policy::conditional_matches(&ctx.headers, &r.headers) {
            let mut resp = Response::new(Body::Empty);
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            *resp.headers_mut() = policy::not_modified_headers(&r.headers);
            return Answer::marked(resp, &self.labels, coalesced);
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
        Answer::marked(resp, &self.labels, coalesced)
    }
    /// Stale-while-revalidate: one background refresh per key, not tied to
    /// the client connection (RFC 5861 3).
    pub(super) fn refresh_in_background(self: &Arc<Self>, ctx: &Ctx, stored: Arc<Entry>) {
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
            let answer = gw.fetch(&ctx, Some(stored), true, Some(guard), None).await;
            // Drain the body so the capture completes and the store updates.
            let mut body = answer.response.into_body();
            while let Some(frame) =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
            {
                if frame.is_err() {
                    break;
                }
            }
        });
    }
}
