//! Phase 6, passed through: requests the cache does not handle (unsafe
//! methods, bypass routes, the cache switched off) stream both ways, and a
//! successful unsafe method invalidates what it changed (9111 4.4).

use super::body::{Body, OriginBody};
use super::gateway::Gateway;
use super::headers::remove_hop_by_hop;
use super::origin::{BoxError, UpstreamBody};
use super::request::Ctx;
use super::respond::{self, Answer, CacheResult, CacheStatus, Detail, Forward};
use crate::cache::policy;
use crate::cache::storage::Storage;
use crate::protocol::path;
use bytes::Bytes;
use http::Request;
use http::Response;
use http_body_util::BodyExt;
use http_body_util::Either;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

impl Gateway {
    /// Forwards a request the cache does not handle (unsafe methods,
    /// bypass routes), streaming the body both ways, then invalidates what
    /// an unsafe method changed (9111 4.4).
    pub(super) async fn pass<B>(self: &Arc<Self>, ctx: Ctx, body: B) -> Answer
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let body = body.map_err(Into::into).boxed_unsync();
        let mut req = Request::new(Either::Left(body) as UpstreamBody);
        *req.method_mut() = ctx.method.clone();
        *req.uri_mut() = ctx
            .path()
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/"));
        *req.headers_mut() = ctx.origin_headers(&self.labels.via);
        self.metrics.origin_requests.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let result = self.origin_for(ctx.route.as_deref()).send(req).await;
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
                    CacheStatus::forward(CacheResult::Bypass, Forward::Bypass)
                        .detail(Detail::OriginError),
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
        let status = CacheStatus::forward(CacheResult::Bypass, Forward::Bypass)
            .status(parts.status.as_u16());
        let r = Response::from_parts(
            parts,
            Body::Origin(Box::new(OriginBody::new(
                incoming,
                self.origin_for(ctx.route.as_deref()).idle_timeout(),
                None,
            ))),
        );
        Answer::marked(r, &self.labels, status)
    }
}
