//! Phase 5, fetched and stored: the origin request (conditional when a
//! stored response has validators), stale-if-error on failures, the 304
//! merge into the stored entry, and the response captured into the store
//! and for coalesced waiters as it streams to the client.

use super::body::{Body, Capture, CaptureEnd, OriginBody, SharedBody};
use super::gateway::Gateway;
use super::headers::remove_hop_by_hop;
use super::origin::DownstreamBody;
use super::request::Ctx;
use super::respond::{self, Answer, CacheResult, CacheStatus, Detail, Forward};
use crate::cache::directives::ResponseDirectives;
use crate::cache::filters;
use crate::cache::policy::{self, Freshness};
use crate::cache::single_flight::{self, SharedResponse};
use crate::cache::storage::{Entry, EntryMeta, Storage};
use crate::cluster::lease::Lease;
use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Empty};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

impl Gateway {
    /// Goes to the origin for a GET/HEAD: a conditional request when a stored
    /// entry has validators, a plain one otherwise. Stores what may be
    /// stored, serves stale on errors where allowed (RFC 5861 4).
    ///
    /// Boxed: the origin round trip is a large state machine, and every
    /// branch of `lookup` that fetches would otherwise carry it inline in
    /// the request's future (a hit would move it around, and deep debug
    /// builds overflowed a worker's stack). A miss pays one allocation.
    pub(super) fn fetch<'a>(
        self: &'a Arc<Self>,
        ctx: &'a Ctx,
        stored: Option<Arc<Entry>>,
        may_store: bool,
        guard: Option<single_flight::FlightGuard>,
        lease: Option<Lease>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send + 'a>> {
        Box::pin(self.fetch_from_origin(ctx, stored, may_store, guard, lease))
    }

    async fn fetch_from_origin(
        self: &Arc<Self>,
        ctx: &Ctx,
        stored: Option<Arc<Entry>>,
        may_store: bool,
        guard: Option<single_flight::FlightGuard>,
        lease: Option<Lease>,
    ) -> Answer {
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
                if let Some(etag) = e.headers().get(&header::ETAG) {
                    headers.insert(header::IF_NONE_MATCH, etag.clone());
                }
                if let Some(lm) = e.headers().get(&header::LAST_MODIFIED) {
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
        let result = self.origin_for(ctx.route.as_deref()).send(req).await;
        self.metrics.observe_origin(sent.elapsed());
        let now = SystemTime::now();
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                self.metrics.origin_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %ctx.path(), error = %e, "origin failed");
                if let Some(s) = stored.filter(|s| self.can_serve_on_error(ctx, s, now, true)) {
                    return self.serve_stored(&s, ctx, now, stale_if_error());
                }
                let msg = e.to_string();
                return respond::own(
                    e.status(),
                    &msg,
                    &self.labels,
                    CacheStatus::forward(CacheResult::Miss, Forward::Miss)
                        .detail(Detail::OriginError),
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
                return self.serve_stored(s, ctx, now, stale_if_error());
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
        let forwarded = CacheStatus::forward(
            CacheResult::Miss,
            if stored.is_some() {
                Forward::Stale
            } else {
                Forward::UriMiss
            },
        )
        .status(status.as_u16());
        let idle = self.origin_for(ctx.route.as_deref()).idle_timeout();
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
                let miss = self.store.miss_handler(
                    ctx.key.clone(),
                    EntryMeta {
                        status,
                        headers: stored_headers,
                        vary,
                        freshness,
                        tags,
                    },
                );
                let old = stored.clone();
                let mut guard = guard;
                // The cluster lease's holder hands what it stored to the
                // other instances (looked up with this request's headers).
                let mut lease =
                    lease.map(|l| (l, self.clone(), ctx.key.clone(), ctx.headers.clone()));
                let capture = Capture {
                    shared: Some(shared),
                    miss,
                    on_complete: Box::new(move |end| {
                        match end {
                            CaptureEnd::Stored => {
                                if let Some((lease, gw, key, headers)) = lease.take() {
                                    lease.complete(gw.store.lookup(&key, &headers));
                                }
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
                let client_resp = self.client_response(ctx, parts, incoming, idle, Some(capture));
                Answer::marked(client_resp, &self.labels, forwarded.stored())
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
                    Err(e) => Detail::NotStored(e),
                    Ok(()) => Detail::TooLarge,
                };
                let client_resp = self.client_response(ctx, parts, incoming, idle, None);
                Answer::marked(client_resp, &self.labels, forwarded.detail(why))
            }
        }
    }
    /// The client's response to an origin response: the client's own
    /// conditional answered with 304 when the fresh response matches.
    fn client_response(
        &self,
        ctx: &Ctx,
        parts: http::response::Parts,
        incoming: DownstreamBody,
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
    /// Stale-if-error and grace (see `cache::filters::can_serve_on_error`).
    fn can_serve_on_error(
        &self,
        ctx: &Ctx,
        s: &Entry,
        now: SystemTime,
        disconnected: bool,
    ) -> bool {
        filters::can_serve_on_error(
            &self.config.cache,
            &ctx.req_cc,
            &s.freshness,
            now,
            disconnected,
        )
    }
    /// Storability with the route's rules (see `cache::filters::storable`).
    fn storable(
        &self,
        ctx: &Ctx,
        status: StatusCode,
        h: &HeaderMap,
        cc: &ResponseDirectives,
    ) -> Result<(), policy::NotStorable> {
        filters::storable(
            &self.config.cache,
            ctx.route.as_deref(),
            &ctx.method,
            &ctx.headers,
            status,
            h,
            cc,
        )
    }
    /// Freshness with the route's rules (see `cache::filters::freshness`).
    fn freshness(
        &self,
        ctx: &Ctx,
        status: StatusCode,
        h: &HeaderMap,
        cc: &ResponseDirectives,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Freshness {
        filters::freshness(
            &self.config.cache,
            ctx.route.as_deref(),
            status,
            h,
            cc,
            request_time,
            response_time,
        )
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
    ) -> Answer {
        let merged = merged_304_headers(s, not_modified);
        let cc = ResponseDirectives::from_headers(&merged);
        let verdict = self.storable(ctx, s.status, &merged, &cc);
        let refreshed = Arc::new(self.refreshed(ctx, s, merged, not_modified, request_time, now));
        let merged = refreshed.header_map();
        let revalidated =
            CacheStatus::forward(CacheResult::Revalidated, Forward::Stale).status(304);
        let cache_status = match verdict {
            Ok(()) => {
                self.store.replace(&ctx.key, s, refreshed.clone());
                if let Some(g) = guard {
                    g.publish(Arc::new(SharedResponse {
                        status: refreshed.status,
                        headers: merged,
                        vary: refreshed.vary().into(),
                        body: SharedBody::complete(refreshed.body()),
                        freshness: refreshed.freshness.clone(),
                        content_length: Some(refreshed.body_len() as u64),
                    }));
                }
                revalidated
            }
            Err(why) => {
                if let Some(g) = guard {
                    g.not_shareable();
                }
                if why != policy::NotStorable::Authorization {
                    self.store.purge_key(&ctx.key, false);
                }
                revalidated.detail(Detail::NotStored(why))
            }
        };
        let mut answer = self.serve_stored(&refreshed, ctx, now, cache_status);
        for cookie in not_modified.get_all(header::SET_COOKIE) {
            answer
                .response
                .headers_mut()
                .append(header::SET_COOKIE, cookie.clone());
        }
        answer
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
        Entry::refreshed(s, headers, freshness)
    }
}

/// Served stale because the origin failed (RFC 5861 4, 9111 4.2.4).
fn stale_if_error() -> CacheStatus {
    CacheStatus::hit(CacheResult::Stale).detail(Detail::StaleIfError)
}

/// A stored entry's headers updated from a 304 (9111 3.2), except for the
/// 304's `Set-Cookie`: that belongs to the client whose request caused it.
fn merged_304_headers(s: &Entry, not_modified: &HeaderMap) -> HeaderMap {
    let mut headers = s.header_map();
    let mut update = not_modified.clone();
    update.remove(header::SET_COOKIE);
    policy::update_from_304(&mut headers, &update);
    headers
}
fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
