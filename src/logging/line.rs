//! One log line, text or JSON, with the id of the request it was logged
//! for.
//!
//! The id travels in a task-local set once per request
//! ([`with_request_id`]) and is read only when a line is written, so a
//! request that logs nothing pays one task-local swap per poll instead of a
//! span (registry slot, formatted fields, enter and exit on every poll).

use http::HeaderValue;
use std::fmt;
use std::future::Future;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

tokio::task_local! {
    /// The id of the request the current task serves.
    static REQUEST_ID: HeaderValue;
}

/// Runs `serving` with `id` as the request id of every line it logs.
pub(crate) fn with_request_id<F: Future>(
    id: HeaderValue,
    serving: F,
) -> impl Future<Output = F::Output> {
    REQUEST_ID.scope(id, serving)
}

/// Runs `f`, synchronous work of a request (its hit path), with `id` as the
/// request id of every line it logs.
pub(crate) fn in_request_id<R>(id: HeaderValue, f: impl FnOnce() -> R) -> R {
    REQUEST_ID.sync_scope(id, f)
}

/// The current task's request id, if it serves one.
fn request_id<R>(f: impl FnOnce(&str) -> R) -> Option<R> {
    REQUEST_ID
        .try_with(|v| v.to_str().ok().map(f))
        .ok()
        .flatten()
}

/// `2026-11-25T18:40:00.123456Z  INFO request_id=… span{…}: message k=v`
pub(crate) struct TextLine {
    /// Colour the level (stderr is a terminal).
    pub(crate) ansi: bool,
}

impl<S, N> FormatEvent<S, N> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        SystemTime.format_time(&mut w)?;
        let level = *event.metadata().level();
        if self.ansi {
            write!(w, " {}{level:>5}\x1b[0m ", colour(level))?;
        } else {
            write!(w, " {level:>5} ")?;
        }
        request_id(|id| write!(w, "request_id={id} ")).unwrap_or(Ok(()))?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                w.write_str(span.name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(w, "{{{fields}}}")?;
                    }
                }
                w.write_str(": ")?;
            }
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

fn colour(level: Level) -> &'static str {
    match level {
        Level::ERROR => "\x1b[31m",
        Level::WARN => "\x1b[33m",
        Level::INFO => "\x1b[32m",
        Level::DEBUG => "\x1b[34m",
        Level::TRACE => "\x1b[35m",
    }
}

/// One JSON object per line: `timestamp`, `level`, `target`, `request_id`
/// (when serving a request), the event's fields at the top level
/// (`message` among them) and the innermost span as `span`.
pub(crate) struct JsonLine;

impl<S> FormatEvent<S, JsonFields> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = serde_json::Map::new();
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        line.insert("timestamp".into(), time.into());
        let meta = event.metadata();
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some(id) = request_id(|id| id.to_owned()) {
            line.insert("request_id".into(), id.into());
        }
        if let Some(span) = ctx.lookup_current() {
            let ext = span.extensions();
            let mut fields = ext
                .get::<FormattedFields<JsonFields>>()
                .and_then(|f| serde_json::from_str::<serde_json::Value>(f).ok())
                .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
            if let Some(o) = fields.as_object_mut() {
                o.insert("name".into(), span.name().into());
            }
            line.insert("span".into(), fields);
        }
        event.record(&mut JsonVisitor(&mut line));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(w, "{text}")
    }
}

/// Records an event's fields into a JSON object, keeping their types.
struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    /// Lines written by one subscriber, for the assertions.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    fn logged(json: bool, f: impl FnOnce()) -> String {
        let out = Lines::default();
        let sink = out.clone();
        let layer: Box<dyn tracing_subscriber::Layer<_> + Send + Sync> = if json {
            Box::new(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || sink.clone())
                    .fmt_fields(JsonFields::new())
                    .event_format(JsonLine),
            )
        } else {
            Box::new(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || sink.clone())
                    .with_ansi(false)
                    .event_format(TextLine { ansi: false }),
            )
        };
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, f);
        out.text()
    }

    fn in_request(f: impl FnOnce()) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(with_request_id(
            HeaderValue::from_static("req-42"),
            async move { f() },
        ));
    }

    #[test]
    fn text_lines_carry_the_request_id_and_the_fields() {
        let text = logged(false, || {
            in_request(|| tracing::warn!(status = 502, "origin failed"));
            tracing::info!("outside any request");
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains(" WARN request_id=req-42 origin failed status=502"),
            "{text}"
        );
        assert!(!lines[1].contains("request_id"), "{text}");
        assert!(!text.contains('\u{1b}'), "no colour: {text}");
    }

    #[test]
    fn synchronous_request_work_carries_the_request_id() {
        let text = logged(false, || {
            let n = in_request_id(HeaderValue::from_static("req-7"), || {
                tracing::warn!("served from the store");
                7
            });
            assert_eq!(n, 7);
            tracing::info!("after the request");
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains(" WARN request_id=req-7 served from the store"),
            "{text}"
        );
        assert!(!lines[1].contains("request_id"), "{text}");
    }

    #[test]
    fn json_lines_are_objects_with_typed_fields() {
        let text = logged(true, || {
            in_request(|| {
                let span = tracing::info_span!("refresh", key = "k1");
                let _in = span.enter();
                tracing::error!(bytes = 12u64, ok = false, "stored")
            });
        });
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["request_id"], "req-42");
        assert_eq!(line["level"], "ERROR");
        assert_eq!(line["message"], "stored");
        assert_eq!(line["bytes"], 12);
        assert_eq!(line["ok"], false);
        assert_eq!(line["span"]["name"], "refresh");
        assert_eq!(line["span"]["key"], "k1");
        assert!(line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
