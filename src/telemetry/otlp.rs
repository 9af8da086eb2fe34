//! OTLP/HTTP export with the JSON encoding (OTLP 1.0: `POST /v1/traces`,
//! `Content-Type: application/json`, ids in hex, 64-bit integers as
//! strings). Written against the protocol rather than through the
//! `opentelemetry` crates: the wire format is small and stable, and those
//! crates (with their gRPC / HTTP client stacks) would more than double the
//! build for one span per request.

use super::ids::hex;
use crate::metrics::ops::Ops;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::Receiver;

/// Spans per export request.
const BATCH: usize = 512;
/// Longest a span waits in a partial batch.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Connect plus answer, per export request.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// One finished request, as exported.
pub(super) struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub method: Method,
    pub path: String,
    pub host: String,
    pub status: u16,
    pub cache: &'static str,
    pub request_id: String,
}

fn unix_nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

fn string_attr(key: &str, v: &str) -> Value {
    json!({ "key": key, "value": { "stringValue": v } })
}

impl Span {
    /// The span in OTLP JSON, with HTTP semantic-convention attributes.
    fn to_json(&self) -> Value {
        let mut span = json!({
            "traceId": hex(&self.trace_id),
            "spanId": hex(&self.span_id),
            "name": self.method.as_str(),
            "kind": 2, // SPAN_KIND_SERVER
            "startTimeUnixNano": unix_nanos(self.start),
            "endTimeUnixNano": unix_nanos(self.end),
            "attributes": [
                string_attr("http.request.method", self.method.as_str()),
                string_attr("url.path", &self.path),
                string_attr("server.address", &self.host),
                json!({ "key": "http.response.status_code", "value": { "intValue": self.status.to_string() } }),
                string_attr("kvgate.cache", self.cache),
                string_attr("kvgate.request_id", &self.request_id),
            ],
            // Server spans are errors for 5xx only (semantic conventions).
            "status": { "code": if self.status >= 500 { 2 } else { 0 } },
        });
        if let (Some(parent), Some(obj)) = (self.parent_span_id, span.as_object_mut()) {
            obj.insert("parentSpanId".into(), hex(&parent).into());
        }
        span
    }
}

/// Posts batches of spans to the collector.
pub(super) struct Exporter {
    client: Client<HttpConnector, Full<Bytes>>,
    url: http::Uri,
    resource: Value,
    ops: Arc<Ops>,
}

impl Exporter {
    pub(super) fn new(url: http::Uri, service_name: &str, ops: Arc<Ops>) -> Exporter {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(EXPORT_TIMEOUT));
        Exporter {
            client: Client::builder(TokioExecutor::new()).build(connector),
            url,
            resource: json!({
                "attributes": [
                    string_attr("service.name", service_name),
                    string_attr("service.version", env!("CARGO_PKG_VERSION")),
                ]
            }),
            ops,
        }
    }

    /// Runs until every sender is gone (the generation was replaced or
    /// the gateway stopped), then sends what is left.
    pub(super) async fn run(self, mut rx: Receiver<Span>) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let Some(first) = rx.recv().await else { return };
            batch.push(first);
            let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
            let mut closed = false;
            while batch.len() < BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(s)) => batch.push(s),
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.export(&batch).await;
            batch.clear();
            if closed {
                return;
            }
        }
    }

    fn body(&self, spans: &[Span]) -> Value {
        json!({
            "resourceSpans": [{
                "resource": self.resource,
                "scopeSpans": [{
                    "scope": { "name": "kvgate", "version": env!("CARGO_PKG_VERSION") },
                    "spans": spans.iter().map(Span::to_json).collect::<Vec<_>>(),
                }],
            }],
        })
    }

    async fn export(&self, spans: &[Span]) {
        let n = spans.len() as u64;
        let body = Bytes::from(self.body(spans).to_string());
        let req = Request::post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body));
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "OTLP export request could not be built");
                self.ops
                    .spans_failed
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                return;
            }
        };
        let outcome = tokio::time::timeout(EXPORT_TIMEOUT, self.client.request(req)).await;
        let counter = match outcome {
            Ok(Ok(resp)) if resp.status().is_success() => &self.ops.spans_exported,
            Ok(Ok(resp)) => {
                tracing::warn!(
                    status = resp.status().as_u16(),
                    spans = n,
                    "OTLP collector refused spans"
                );
                &self.ops.spans_failed
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, spans = n, "OTLP export failed");
                &self.ops.spans_failed
            }
            Err(_) => {
                tracing::warn!(timeout = ?EXPORT_TIMEOUT, spans = n, "OTLP export timed out");
                &self.ops.spans_failed
            }
        };
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_encode_as_otlp_json() {
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let span = Span {
            trace_id: [0x4b; 16],
            span_id: [1, 2, 3, 4, 5, 6, 7, 8],
            parent_span_id: Some([0xaa; 8]),
            start,
            end: start + Duration::from_micros(250),
            method: Method::GET,
            path: "/a?b=\"c\"".into(),
            host: "example.org".into(),
            status: 503,
            cache: "MISS",
            request_id: "r1".into(),
        };
        let v = span.to_json();
        assert_eq!(v["traceId"], "4b".repeat(16));
        assert_eq!(v["spanId"], "0102030405060708");
        assert_eq!(v["parentSpanId"], "aa".repeat(8));
        assert_eq!(v["startTimeUnixNano"], "1700000000123456789");
        assert_eq!(v["endTimeUnixNano"], "1700000000123706789");
        assert_eq!(v["kind"], 2);
        assert_eq!(v["status"]["code"], 2);
        let attrs = v["attributes"].as_array().unwrap();
        let attr = |k: &str| attrs.iter().find(|a| a["key"] == k).unwrap()["value"].clone();
        assert_eq!(attr("kvgate.cache")["stringValue"], "MISS");
        assert_eq!(attr("url.path")["stringValue"], "/a?b=\"c\"");
        assert_eq!(attr("http.response.status_code")["intValue"], "503");
        let root = Span {
            parent_span_id: None,
            ..span
        };
        assert!(root.to_json().get("parentSpanId").is_none());
    }
}
