//! Log output: a level filter and a format (text or JSON), both
//! replaceable while running so that a config reload applies them.
//!
//! Lines go to stderr, with ANSI colour only when stderr is a terminal
//! (never in files or journald). Every line logged while a request is
//! served carries its id (`line::REQUEST_ID`, a task-local rather than a
//! span per request: a span costs a registry slot and a formatted field on
//! every request, logged or not).

use crate::config::{LogConfig, LogFormat};
use std::io::IsTerminal;
use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

mod line;

pub(crate) use line::{in_request_id, with_request_id};
use line::{JsonLine, TextLine};
use tracing_subscriber::fmt::format::JsonFields;

type FilterLayer = reload::Layer<EnvFilter, Registry>;
type Filtered = tracing_subscriber::layer::Layered<FilterLayer, Registry>;
type FormatLayer = Box<dyn Layer<Filtered> + Send + Sync>;

/// Handles to the installed filter and format, for reloads.
struct Handles {
    filter: reload::Handle<EnvFilter, Registry>,
    format: reload::Handle<FormatLayer, Filtered>,
    /// Set when RUST_LOG chose the filter: a reload keeps it.
    from_env: bool,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

fn format_layer(format: LogFormat) -> FormatLayer {
    match format {
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .event_format(TextLine {
                    ansi: std::io::stderr().is_terminal(),
                }),
        ),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .fmt_fields(JsonFields::new())
                .event_format(JsonLine),
        ),
    }
}

/// The filter for `level` (already validated by the config loader).
/// The Redis client's own records are kept to errors unless the level names
/// them: its cluster connection logs every failed reconnect attempt (every
/// 100 ms while a cluster is down), and kvgate logs Redis faults itself,
/// once per interval per region.
fn filter(level: &str) -> EnvFilter {
    let directives = if level.contains("redis") {
        level.to_owned()
    } else {
        format!("{level},redis=error")
    };
    EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info,redis=error"))
}

/// Installs the subscriber once per process; later calls reconfigure it.
pub(crate) fn init(cfg: &LogConfig) {
    if HANDLES.get().is_some() {
        reconfigure(cfg);
        return;
    }
    let (env, from_env) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, true),
        Err(_) => (filter(&cfg.level), false),
    };
    let (filter_layer, filter_handle) = reload::Layer::new(env);
    let (format, format_handle) = reload::Layer::new(format_layer(cfg.format));
    let installed = tracing_subscriber::registry()
        .with(filter_layer)
        .with(format)
        .try_init();
    if installed.is_ok() {
        let _ = HANDLES.set(Handles {
            filter: filter_handle,
            format: format_handle,
            from_env,
        });
    }
}

/// Applies a reloaded `[log]`: level (unless RUST_LOG set it) and format.
/// Does nothing when logging was not set up by [`init`] (tests, embedders).
pub(crate) fn reconfigure(cfg: &LogConfig) {
    let Some(h) = HANDLES.get() else {
        return;
    };
    if !h.from_env {
        let _ = h.filter.reload(filter(&cfg.level));
    }
    let _ = h.format.reload(format_layer(cfg.format));
}
