//! Request tracing: one OpenTelemetry span per client request, exported
//! over OTLP (`otlp`), with the W3C trace context carried to the origin.
//!
//! Off unless `[tracing] otlp_endpoint` is set; then a request costs one
//! wall-clock read, a few thread-local random numbers, a `traceparent`
//! header written, a small record (method, path, host) and a bounded
//! channel send. Without it, `proxy::headers` still passes a valid incoming
//! `traceparent` on and drops invalid ones.

mod otlp;

use crate::cache::result::CacheResult;
use crate::config::TracingConfig;
use crate::error::TracingError;
use crate::metrics::ops::Ops;
use crate::protocol::trace_context::{self, TraceParent, TRACEPARENT, TRACESTATE};
use http::header::{HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Spans waiting for export; past this, new spans are dropped (counted).
const QUEUE: usize = 4096;

/// Starts and exports spans; one per config generation (a reload builds a
/// new one; the old exporter flushes what it holds and stops).
pub(crate) struct Tracer {
    queue: tokio::sync::mpsc::Sender<otlp::Span>,
    ops: Arc<Ops>,
}

/// A request's span while it is served.
pub(crate) struct Started {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    sampled: bool,
    start: SystemTime,
    method: Method,
    path: String,
    host: String,
}

impl Tracer {
    /// A tracer for `cfg`, or `None` when export is off.
    pub(crate) fn from_config(
        cfg: &TracingConfig,
        ops: Arc<Ops>,
    ) -> Result<Option<Arc<Tracer>>, TracingError> {
        let Some(endpoint) = &cfg.otlp_endpoint else {
            return Ok(None);
        };
        let url =
            crate::config::otlp_traces_url(endpoint.get_ref()).map_err(TracingError::Endpoint)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| TracingError::NoRuntime)?;
        let (queue, rx) = tokio::sync::mpsc::channel(QUEUE);
        let exporter = otlp::Exporter::new(url, &cfg.service_name, ops.clone());
        runtime.spawn(exporter.run(rx));
        Ok(Some(Arc::new(Tracer { queue, ops })))
    }

    /// Opens the request's span: continues the client's trace when it sent
    /// a valid `traceparent` (and honours its sampled flag), else starts
    /// one. The request's `traceparent` becomes this span's, so that the
    /// origin's spans are its children; an invalid one is replaced and its
    /// `tracestate` dropped.
    pub(crate) fn start(
        &self,
        method: Method,
        host: String,
        path: String,
        headers: &mut HeaderMap,
    ) -> Started {
        let incoming = trace_context::incoming(headers);
        if incoming.is_none() {
            headers.remove(&TRACESTATE);
        }
        let span_id = ids::span_id();
        let started = Started {
            trace_id: incoming.map_or_else(ids::trace_id, |p| p.trace_id),
            span_id,
            parent: incoming.map(|p| p.parent_id),
            sampled: incoming.is_none_or(|p| p.sampled()),
            start: SystemTime::now(),
            method,
            path,
            host,
        };
        let ours = TraceParent {
            trace_id: started.trace_id,
            parent_id: span_id,
            flags: u8::from(started.sampled),
        };
        headers.insert(TRACEPARENT, ours.header_value());
        started
    }

    /// Closes the span after `elapsed` with the response's status and
    /// cache result, and queues it for export when sampled.
    pub(crate) fn finish(
        &self,
        s: Started,
        elapsed: Duration,
        status: StatusCode,
        cache: CacheResult,
        request_id: &HeaderValue,
    ) {
        if !s.sampled {
            return;
        }
        let span = otlp::Span {
            trace_id: s.trace_id,
            span_id: s.span_id,
            parent_span_id: s.parent,
            start: s.start,
            end: s.start + elapsed,
            method: s.method,
            path: s.path,
            host: s.host,
            status: status.as_u16(),
            cache: cache.as_str(),
            request_id: request_id.to_str().unwrap_or_default().to_string(),
        };
        if self.queue.try_send(span).is_err() {
            Ops::count(&self.ops.spans_dropped);
        }
    }
}

impl TraceParent {
    /// `00-<trace id>-<parent id>-<flags>` in lowercase hex.
    pub(crate) fn header_value(&self) -> HeaderValue {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        ids::push_hex(&mut s, &self.trace_id);
        s.push('-');
        ids::push_hex(&mut s, &self.parent_id);
        s.push('-');
        ids::push_hex(&mut s, &[self.flags]);
        // Hex digits and dashes are always a valid header value.
        HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static(""))
    }
}

/// Trace and span ids: random (W3C asks for randomness in the trace id),
/// from a per-thread generator seeded by the OS once, so no system call
/// per request.
pub(crate) mod ids {
    use std::cell::Cell;

    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }

    fn seed() -> u64 {
        let mut b = [0u8; 8];
        if getrandom::getrandom(&mut b).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            return t ^ u64::from(std::process::id()).rotate_left(32);
        }
        u64::from_le_bytes(b)
    }

    /// SplitMix64: a full-period, well-mixed sequence per thread.
    fn next() -> u64 {
        STATE.with(|s| {
            let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            s.set(x);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    }

    fn nonzero(v: u64) -> u64 {
        if v == 0 {
            1
        } else {
            v
        }
    }

    pub(crate) fn trace_id() -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&nonzero(next()).to_be_bytes());
        id[8..].copy_from_slice(&next().to_be_bytes());
        id
    }

    pub(crate) fn span_id() -> [u8; 8] {
        nonzero(next()).to_be_bytes()
    }

    pub(crate) fn push_hex(s: &mut String, bytes: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for b in bytes {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }

    pub(crate) fn hex(bytes: &[u8]) -> String {
        let mut s = String::with_capacity(bytes.len() * 2);
        push_hex(&mut s, bytes);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_context_round_trips_through_the_parser() {
        let t = TraceParent {
            trace_id: ids::trace_id(),
            parent_id: ids::span_id(),
            flags: 1,
        };
        let v = t.header_value();
        assert_eq!(v.len(), 55);
        assert_eq!(TraceParent::parse(v.as_bytes()), Some(t));
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| ids::span_id()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
