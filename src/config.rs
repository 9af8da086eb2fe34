//! The TOML configuration: schema, defaults and validation.
//!
//! Unknown keys are errors. Every error names the file, line, column and key,
//! with a hint, so a typo never silently turns a feature off.

pub(crate) mod edge;
pub mod redis;
pub(crate) mod sfv;
pub mod tag_template;

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use toml::Spanned;

/// The whole configuration file; every section has defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: the main listener and its limits.
    pub server: ServerConfig,
    /// `[origin]`: where misses and passes go (unless a route names another).
    pub origin: OriginConfig,
    /// `[origins.NAME]`: further origins, each named by the routes that use it.
    pub origins: std::collections::BTreeMap<String, OriginConfig>,
    /// `[cache]`: the store and freshness defaults.
    pub cache: CacheConfig,
    /// `[log]`: log level and access lines.
    pub log: LogConfig,
    /// `[[route]]`: per-prefix cache rules.
    #[serde(rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// Edge decisions (identity, flags, experiments, preferences). Off
    /// unless the section is present.
    pub edge: Option<edge::EdgeConfig>,
    /// `[state]`: where edge state lives.
    pub state: StateConfig,
    /// The admin listener. Off unless the section (or `--admin-listen`) is
    /// present, so a second port is never opened by surprise.
    pub admin: Option<AdminConfig>,
    /// `[redis]`: shared state for several instances (or `--redis URL`).
    pub redis: Option<redis::RedisConfig>,
    /// `[tracing]`: one OpenTelemetry span per request, exported over OTLP.
    pub tracing: TracingConfig,
    /// The file this config was read from, for reloads (SIGHUP).
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// The text it was parsed from, so that checks made later (TLS files,
    /// the state path, the admin token) can still name line and column.
    #[serde(skip)]
    pub(crate) text: Option<Arc<SourceText>>,
    /// The flags applied over the file.
    #[serde(skip)]
    pub(crate) overrides: Overrides,
}

/// Command-line values that win over the file, kept with the config so
/// that a reload applies them again.
#[derive(Debug, Clone, Default)]
pub(crate) struct Overrides {
    pub(crate) listen: Option<String>,
    pub(crate) origin: Option<String>,
    pub(crate) tls: Option<(PathBuf, PathBuf)>,
    pub(crate) log_level: Option<String>,
    pub(crate) admin_listen: Option<String>,
    pub(crate) redis: Option<String>,
}

/// The environment variable that holds the admin token (wins over the config).
pub(crate) const ADMIN_TOKEN_ENV: &str = "KVGATE_ADMIN_TOKEN";

/// A config file's name and text, kept for locating later errors.
#[derive(Debug)]
pub(crate) struct SourceText {
    file: String,
    text: String,
}

/// Longest admin token accepted (and longest `Authorization` value the
/// admin API looks at).
pub(crate) const MAX_TOKEN_BYTES: usize = 4096;

/// Admin tokens are visible ASCII so that they fit in a header unchanged.
pub(crate) fn is_valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_BYTES
        && token.bytes().all(|b| b.is_ascii_graphic())
}

/// The admin API listener (`[admin]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener.
    pub listen: Spanned<String>,
    /// Bearer token; `KVGATE_ADMIN_TOKEN` wins when set. Without one the
    /// listener only starts on loopback, and then only `/healthz` answers.
    pub token: Option<String>,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Spanned::new(0..0, "127.0.0.1:9090".into()),
            token: None,
            max_body_bytes: 64 * 1024,
        }
    }
}

impl AdminConfig {
    pub(crate) fn listen_addr(&self) -> Result<SocketAddr, crate::error::ListenAddrError> {
        self.listen
            .get_ref()
            .parse()
            .map_err(|source| crate::error::ListenAddrError {
                what: "admin listen address",
                addr: self.listen.get_ref().clone(),
                source,
            })
    }
}

/// Where cache tags come from (`[cache.tags]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TagsConfig {
    /// Response header with space-separated tags ("" turns it off).
    pub surrogate_key_header: String,
    /// Response header with comma-separated tags ("" turns it off).
    pub cache_tag_header: String,
    /// Remove both headers before the response leaves the gateway.
    pub strip_headers: bool,
    /// Tags beyond this many per entry are dropped.
    pub max_per_entry: usize,
    /// Longer tags are dropped (not truncated: two tags must not collide).
    pub max_len: usize,
}

impl Default for TagsConfig {
    fn default() -> Self {
        TagsConfig {
            surrogate_key_header: "Surrogate-Key".into(),
            cache_tag_header: "Cache-Tag".into(),
            strip_headers: true,
            max_per_entry: 64,
            max_len: 256,
        }
    }
}

/// A tag every response stored under `prefix` gets (`[[cache.tag_rule]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagRuleConfig {
    /// Path prefix (in normal form) whose responses get the tag.
    pub prefix: Spanned<String>,
    /// A template: `{segmentN}` (N from 1) is replaced by that path segment.
    pub tag: Spanned<String>,
}

/// Where edge state (overrides, sticky assignments, preferences) lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// `durable` (redb file, survives restarts and kill -9), `memory`, or
    /// `redis` (shared by every instance; needs `[redis]`).
    pub backend: StateBackend,
    /// The redb file for the durable backend.
    pub path: PathBuf,
}

/// The KV backend behind edge state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    /// A redb file at `path`.
    Durable,
    /// Process memory: lost on restart.
    Memory,
    /// The `[redis]` servers, shared by every instance; no local file.
    Redis,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: StateBackend::Durable,
            path: PathBuf::from("kvgate-state.redb"),
        }
    }
}

/// Upper bound for the per-connection timeouts in `[server]` (one day).
pub(crate) const MAX_CONNECTION_TIMEOUT_MS: u64 = 86_400_000;

/// The main listener (`[server]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the main listener.
    pub listen: Spanned<String>,
    /// PEM files for TLS on the main listener (both or neither).
    pub tls_cert: Option<PathBuf>,
    /// The private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Open connections at most; a connection past the limit is closed at once.
    pub max_connections: usize,
    /// A client must send its whole request head within this time; it also
    /// bounds the TLS handshake and a new connection's wait for its first
    /// request (protocol detection, the h2 preface and SETTINGS exchange).
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight (h1 keep-alive, h2 without open
    /// streams) is closed after this long; also the h2 PING interval.
    pub idle_timeout_ms: u64,
    /// Larger request heads are refused (431).
    pub max_header_bytes: usize,
    /// Longer request targets are refused (414).
    pub max_uri_bytes: usize,
    /// Larger request bodies are refused (413).
    pub max_body_bytes: u64,
    /// How long in-flight requests may take to finish on SIGTERM / Ctrl-C.
    pub shutdown_grace_ms: u64,
    /// The name this gateway gives itself in `Via` and `Cache-Status`.
    pub name: String,
    /// Peers (load balancers) whose `X-Forwarded-For` / `-Proto` are kept;
    /// from anyone else those headers are replaced. Empty: trust no one.
    pub trusted_proxies: Vec<crate::protocol::cidr::Cidr>,
    /// Where the main listener answers the liveness probe itself (GET or
    /// HEAD, no token), e.g. "/healthz"; unset: every path goes to the origin.
    pub health_path: Option<Spanned<String>>,
    /// Where the main listener answers the readiness probe (as the admin
    /// API's `/readyz`).
    pub ready_path: Option<Spanned<String>>,
    /// Plain-TCP HTTP/1.1 connections answer fresh, unconditional GET and
    /// HEAD hits without going through hyper (`proxy::h1_hits`); anything
    /// else on the connection is served as before. On by default.
    pub fast_hits: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: Spanned::new(0..0, "127.0.0.1:8080".into()),
            tls_cert: None,
            tls_key: None,
            max_connections: 10_000,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_header_bytes: 64 * 1024,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            shutdown_grace_ms: 10_000,
            name: "kvgate".into(),
            trusted_proxies: Vec::new(),
            health_path: None,
            ready_path: None,
            fast_hits: true,
        }
    }
}

/// An origin (`[origin]`, the default, or `[origins.NAME]`, named by routes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OriginConfig {
    /// Base URL of the one server: `http://` or `https://`, host and port,
    /// no path. Ignored when `servers` is set (setting both is an error).
    pub url: Spanned<String>,
    /// Several servers of the same scheme, balanced round robin over those
    /// that are up.
    pub servers: Vec<Spanned<String>>,
    /// PEM file of the CA certificates an `https://` origin is verified
    /// against instead of the built-in web roots.
    pub ca_file: Option<Spanned<PathBuf>>,
    /// Time allowed to open a connection (TCP and TLS handshake).
    pub connect_timeout_ms: u64,
    /// Time from sending the request to the response head.
    pub first_byte_timeout_ms: u64,
    /// Longest pause between two body chunks.
    pub idle_timeout_ms: u64,
    /// Forward the client's Host (true) or send the origin's own (false).
    pub preserve_host: bool,
    /// Idle origin connections kept for reuse (per server).
    pub max_idle_per_host: usize,
    /// Passive ejection: a server whose connections fail this many times in
    /// a row is taken out of rotation (0: never).
    pub eject_after_failures: u32,
    /// How long an ejected server stays out (unless an active health check
    /// sees it answer again first).
    pub eject_ms: u64,
    /// `[origin.health]`: active health checks, off unless present.
    pub health: Option<OriginHealthConfig>,
}

/// Most servers one origin may list.
pub const MAX_ORIGIN_SERVERS: usize = 64;

impl Default for OriginConfig {
    fn default() -> Self {
        OriginConfig {
            url: Spanned::new(0..0, "http://127.0.0.1:8000".into()),
            servers: Vec::new(),
            ca_file: None,
            connect_timeout_ms: 2_000,
            first_byte_timeout_ms: 30_000,
            idle_timeout_ms: 30_000,
            preserve_host: false,
            max_idle_per_host: 256,
            eject_after_failures: 3,
            eject_ms: 10_000,
            health: None,
        }
    }
}

impl OriginConfig {
    /// The server URLs: `servers` when set, else `url`.
    pub fn server_urls(&self) -> Vec<&str> {
        if self.servers.is_empty() {
            vec![self.url.get_ref().as_str()]
        } else {
            self.servers.iter().map(|s| s.get_ref().as_str()).collect()
        }
    }
}

/// Active health checks of an origin's servers (`[origin.health]`): one
/// background task per server sends `GET path` every `interval_ms`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OriginHealthConfig {
    /// Path (and query) probed; a 2xx or 3xx answer is a success.
    pub path: Spanned<String>,
    /// Time between two probes of one server.
    pub interval_ms: u64,
    /// A probe without a whole answer within this time failed.
    pub timeout_ms: u64,
    /// Successes in a row that bring a server that is down back.
    pub healthy_threshold: u32,
    /// Failures in a row that take a server out.
    pub unhealthy_threshold: u32,
}

impl Default for OriginHealthConfig {
    fn default() -> Self {
        OriginHealthConfig {
            path: Spanned::new(0..0, "/".into()),
            interval_ms: 5_000,
            timeout_ms: 2_000,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// The response cache (`[cache]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Off: every request passes to the origin uncached.
    pub enabled: bool,
    /// Memory budget for stored responses; least recently used go first.
    pub max_bytes: usize,
    /// Larger responses stream through uncached.
    pub max_object_bytes: usize,
    /// Lock shards of the store.
    pub shards: usize,
    /// Namespace version: part of every key; bump it to drop everything.
    pub version: u64,
    /// Heuristic freshness (RFC 9111 4.2.2): this fraction of the time since
    /// Last-Modified, capped.
    pub heuristic_fraction: f64,
    /// Cap on a heuristic freshness lifetime.
    pub heuristic_max_secs: u64,
    /// When the origin cannot be reached at all (refused, reset, timed out),
    /// serve a stale entry up to this long past its lifetime (RFC 9111 4.2.4
    /// allows it when disconnected; must-revalidate / no-cache still win).
    pub grace_secs: u64,
    /// Keep stale entries that have a validator this long for revalidation.
    pub keep_secs: u64,
    /// A coalesced waiter gives up waiting after this and fetches alone.
    pub lock_timeout_ms: u64,
    /// How long a key stays "do not coalesce" after an uncacheable answer.
    pub hit_for_miss_secs: u64,
    /// Store responses that carry `Set-Cookie` (off by default: one user's
    /// cookie must not reach another).
    pub allow_set_cookie: bool,
    /// `[cache.tags]`: where purge tags come from.
    pub tags: TagsConfig,
    /// `[[cache.tag_rule]]`: tags given by path prefix.
    #[serde(rename = "tag_rule")]
    pub tag_rules: Vec<TagRuleConfig>,
    /// `[cache.l2]`: the shared response tier in Redis (needs `[redis]`).
    pub l2: Option<L2Config>,
}

/// `[cache.l2]`: misses look in Redis before the origin, so a new or
/// restarted instance starts warm.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct L2Config {
    /// Larger responses are not written to the shared tier.
    pub max_object_bytes: usize,
    /// A shared copy lives at most this long (and never past the time its
    /// freshness and stale windows allow).
    pub max_ttl_secs: u64,
}

/// Largest `cache.l2.max_object_bytes`: one Redis value per response.
pub const MAX_L2_OBJECT_BYTES: usize = 64 * 1024 * 1024;
/// Largest `cache.l2.max_ttl_secs` (30 days).
pub const MAX_L2_TTL_SECS: u64 = 30 * 86_400;

impl Default for L2Config {
    fn default() -> Self {
        L2Config {
            max_object_bytes: 1024 * 1024,
            max_ttl_secs: 3_600,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            max_bytes: 256 * 1024 * 1024,
            max_object_bytes: 8 * 1024 * 1024,
            shards: 64,
            version: 1,
            heuristic_fraction: 0.1,
            heuristic_max_secs: 86_400,
            grace_secs: 60,
            keep_secs: 3_600,
            lock_timeout_ms: 10_000,
            hit_for_miss_secs: 30,
            allow_set_cookie: false,
            tags: TagsConfig::default(),
            tag_rules: Vec::new(),
            l2: None,
        }
    }
}

/// Logging (`[log]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `warn`, `kvgate=debug`, ...
    pub level: String,
    /// One line per request at info.
    pub access: bool,
    /// `text` (one human-readable line per event) or `json` (one JSON
    /// object per line, for log shippers).
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable; colour only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            access: true,
            format: LogFormat::Text,
        }
    }
}

/// OpenTelemetry export (`[tracing]`). Off unless `otlp_endpoint` is set;
/// without it a valid incoming `traceparent` is still passed to the origin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// An OTLP/HTTP collector: `http://host:4318` (spans go to
    /// `/v1/traces`), or the full traces URL when it has a path.
    pub otlp_endpoint: Option<Spanned<String>>,
    /// The spans' `service.name`.
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            service_name: "kvgate".into(),
        }
    }
}

/// The URL spans are posted to: `http://` only (the exporter has no TLS
/// client), `/v1/traces` when the URL has no path.
pub(crate) fn otlp_traces_url(endpoint: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = endpoint.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("the URL must start with http:// (OTLP over HTTP, no TLS)".into());
    }
    let Some(authority) = uri.authority() else {
        return Err("the URL has no host".into());
    };
    let path = match uri.path_and_query().map_or("/", |p| p.as_str()) {
        "" | "/" => "/v1/traces",
        p => p,
    };
    format!("http://{authority}{path}")
        .parse()
        .map_err(|e| format!("not a URL: {e}"))
}

/// Levels a log filter directive may name (what `tracing` accepts).
const LOG_LEVELS: [&str; 12] = [
    "off", "error", "warn", "info", "debug", "trace", "0", "1", "2", "3", "4", "5",
];

/// A log filter where every directive names a level: `info`,
/// `warn,kvgate=debug`. A bare word that is not a level (`"inof"`) would
/// be read by tracing as a target to log at `trace` and silence everything
/// else, so it is refused.
pub(crate) fn check_log_filter(filter: &str) -> Result<(), String> {
    if filter.trim().is_empty() {
        return Err("is empty".into());
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!("{directive:?} does not name a level"));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Rules for requests whose path starts with `prefix` (longest wins).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Route name: labels the edge counters and names the route for the
    /// admin API's per-route version bump.
    pub name: String,
    /// Path prefix (in normal form) the rules apply to.
    pub prefix: Spanned<String>,
    /// Never cache: every request goes to the origin.
    #[serde(default)]
    pub bypass: bool,
    /// Freshness lifetime forced on storable responses, whatever the origin says.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Freshness lifetime for storable responses without explicit freshness.
    #[serde(default)]
    pub default_ttl_secs: Option<u64>,
    /// Serve stale this long while refreshing in the background (overrides the origin's).
    #[serde(default)]
    pub stale_while_revalidate_secs: Option<u64>,
    /// Serve stale this long when the origin fails (overrides the origin's).
    #[serde(default)]
    pub stale_if_error_secs: Option<u64>,
    /// Overrides `cache.allow_set_cookie` for the route.
    #[serde(default)]
    pub allow_set_cookie: Option<bool>,
    /// The `[origins.NAME]` this route's misses and passes go to (default:
    /// `[origin]`).
    #[serde(default)]
    pub origin: Option<Spanned<String>>,
}

/// Builds a located error: span, key, message, hint.
type ErrorAt<'a> = dyn Fn(std::ops::Range<usize>, &str, String, &str) -> ConfigError + 'a;

/// Requests are matched in their path's normal form (`protocol::path`), so
/// a prefix in any other form would never match: say so at load time.
fn check_normal_prefix(
    prefix: &Spanned<String>,
    key: &str,
    err: &ErrorAt<'_>,
) -> Result<(), ConfigError> {
    let p = prefix.get_ref();
    match crate::protocol::path::normalize(p) {
        Ok(n) if n == p.as_str() => Ok(()),
        Ok(n) => Err(err(
            prefix.span(),
            key,
            format!("{p:?} is not in normal form; requests are matched as {n:?}"),
            &format!("write \"{n}\" (no dot segments, repeated slashes or needless %-escapes)"),
        )),
        Err(e) => Err(err(
            prefix.span(),
            key,
            e.to_string(),
            "a path prefix such as \"/api/\"",
        )),
    }
}

/// The one route matcher: the route whose prefix is the longest that the
/// path (in normal form) starts with. An origin may route an encoded `/` as
/// a separator, so when the path has one and that reading falls under a
/// bypass route, bypass wins: no spelling dodges a bypass.
pub fn match_route<'r, R: std::borrow::Borrow<RouteConfig>>(
    routes: &'r [R],
    path: &str,
) -> Option<&'r R> {
    let longest = |p: &str| {
        routes
            .iter()
            .filter(|r| p.starts_with(r.borrow().prefix.get_ref().as_str()))
            .max_by_key(|r| r.borrow().prefix.get_ref().len())
    };
    let route = longest(path);
    if let Some(opened) = crate::protocol::path::separator_decoded(path) {
        if let Some(bypass) = longest(&opened).filter(|r| r.borrow().bypass) {
            return Some(bypass);
        }
    }
    route
}

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}{}", hint.as_ref().map(|h| format!("\n  hint: {h}")).unwrap_or_default())]
pub struct ConfigError {
    /// The file (or the name given to `parse`).
    pub file: String,
    /// 1-based line of the offending key.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when there is an obvious way.
    pub hint: Option<String>,
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
            hint: None,
        })?;
        let mut cfg = Config::parse(&src, &file)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Applies command-line values and the environment's admin token over
    /// the file's, and remembers them for reloads.
    pub(crate) fn apply(&mut self, o: Overrides) -> Result<(), crate::error::ArgsError> {
        use crate::error::ArgsError;
        let cfg = self;
        if let Some(l) = &o.listen {
            cfg.server.listen = Spanned::new(0..0, l.clone());
        }
        if let Some(u) = &o.origin {
            validate_origin_url(u).map_err(|reason| ArgsError::Origin {
                url: u.clone(),
                reason,
            })?;
            // The flag replaces the servers, not the tuning around them.
            cfg.origin.url = Spanned::new(0..0, u.clone());
            cfg.origin.servers.clear();
        }
        if let Some((c, k)) = &o.tls {
            cfg.server.tls_cert = Some(c.clone());
            cfg.server.tls_key = Some(k.clone());
        }
        if let Some(l) = &o.log_level {
            check_log_filter(l).map_err(|reason| ArgsError::LogLevel {
                level: l.clone(),
                reason,
            })?;
            cfg.log.level = l.clone();
        }
        if let Some(l) = &o.admin_listen {
            let admin = cfg.admin.get_or_insert_with(Default::default);
            admin.listen = Spanned::new(0..0, l.clone());
            admin.listen_addr().map_err(|source| ArgsError::Listen {
                flag: "--admin-listen",
                source,
            })?;
        }
        if let Some(url) = &o.redis {
            redis::check_url(url).map_err(|reason| ArgsError::Redis {
                url: url.clone(),
                reason,
            })?;
            // The flag replaces the servers, not the tuning around them.
            let r = match cfg.redis.take() {
                Some(old) => redis::RedisConfig {
                    url: Some(Spanned::new(0..0, url.clone())),
                    regions: Vec::new(),
                    ..old
                },
                None => redis::RedisConfig::single(url),
            };
            cfg.redis = Some(r);
            cfg.state.backend = StateBackend::Redis;
        }
        if let Some(admin) = &mut cfg.admin {
            // The environment wins over the file, so the file need not hold
            // the secret. An empty variable counts as unset.
            if let Some(token) = std::env::var(ADMIN_TOKEN_ENV)
                .ok()
                .filter(|t| !t.is_empty())
            {
                admin.token = Some(token);
            }
        }
        cfg.listen_addr().map_err(|source| ArgsError::Listen {
            flag: "--listen",
            source,
        })?;
        cfg.overrides = o;
        Ok(())
    }

    /// The file this config came from, read again, with the same flags on
    /// top: what a reload swaps in (after the start checks).
    pub(crate) fn reread(&self) -> Result<Config, crate::error::ArgsError> {
        let mut next = match &self.source {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        next.apply(self.overrides.clone())?;
        Ok(next)
    }

    /// Where `key` (dotted) is written: file, line and column (line 0 when
    /// it is not written in the file or there is no file).
    pub(crate) fn position(&self, key: &str) -> (String, usize, usize) {
        match &self.text {
            Some(t) => {
                let (line, column) =
                    locate(&t.text, key).map_or((0, 0), |span| line_col(&t.text, span.start));
                (t.file.clone(), line, column)
            }
            None => ("(flags)".to_string(), 0, 0),
        }
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(src).map_err(|e| {
            let (line, column) = e.span().map_or((0, 0), |s| line_col(src, s.start));
            let message = e.message().to_string();
            let hint = if message.contains("unknown field") {
                Some(
                    "check the key's spelling and section; see config/kvgate.toml for every key"
                        .into(),
                )
            } else if message.contains("invalid type") {
                Some("durations are integers with their unit in the key name (…_ms, …_secs)".into())
            } else {
                None
            };
            ConfigError {
                file: file.to_string(),
                line,
                column,
                message,
                hint,
            }
        })?;
        let mut cfg = cfg;
        cfg.validate(src, file)?;
        cfg.text = Some(Arc::new(SourceText {
            file: file.to_string(),
            text: src.to_string(),
        }));
        Ok(cfg)
    }

    fn validate(&self, src: &str, file: &str) -> Result<(), ConfigError> {
        let err = |span: std::ops::Range<usize>, key: &str, message: String, hint: &str| {
            // Values without a span of their own are found by their key.
            let span = if span.is_empty() {
                locate(src, key.split_whitespace().next().unwrap_or(key)).unwrap_or(span)
            } else {
                span
            };
            let (line, column) = if span.is_empty() {
                (0, 0)
            } else {
                line_col(src, span.start)
            };
            ConfigError {
                file: file.to_string(),
                line,
                column,
                message: format!("{key}: {message}"),
                hint: Some(hint.to_string()),
            }
        };
        if let Err(e) = self.server.listen.get_ref().parse::<SocketAddr>() {
            return Err(err(
                self.server.listen.span(),
                "server.listen",
                format!("{e}"),
                "an IP address and port, e.g. \"127.0.0.1:8080\"",
            ));
        }
        for (key, path) in [
            ("server.health_path", &self.server.health_path),
            ("server.ready_path", &self.server.ready_path),
        ] {
            let Some(path) = path else { continue };
            let p = path.get_ref();
            if !p.starts_with('/')
                || p.contains('?')
                || crate::protocol::path::normalize(p).ok().as_deref() != Some(p)
            {
                return Err(err(
                    path.span(),
                    key,
                    format!("{p:?} is not a path in normal form"),
                    "an absolute path without dot segments or encodings, e.g. \"/healthz\"",
                ));
            }
        }
        if let (Some(h), Some(r)) = (&self.server.health_path, &self.server.ready_path) {
            if h.get_ref() == r.get_ref() {
                return Err(err(
                    r.span(),
                    "server.ready_path",
                    "the same path as server.health_path".into(),
                    "e.g. health_path = \"/healthz\", ready_path = \"/readyz\"",
                ));
            }
        }
        validate_origin(&self.origin, "origin", false, &err)?;
        if self.origins.len() > MAX_NAMED_ORIGINS {
            return Err(err(
                0..0,
                "origins",
                format!("at most {MAX_NAMED_ORIGINS} named origins"),
                "routes that share servers can share an origin",
            ));
        }
        for (name, o) in &self.origins {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(err(
                    0..0,
                    &format!("origins.{name}"),
                    "an origin name is letters, digits, '-' and '_'".into(),
                    "e.g. [origins.api]",
                ));
            }
            validate_origin(o, &format!("origins.{name}"), true, &err)?;
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return Err(err(
                0..0,
                "server.tls_cert / server.tls_key",
                "both or neither must be set".into(),
                "give the certificate chain and the private key as PEM files",
            ));
        }
        // Zero would close every connection at once; past a day, deadline
        // arithmetic (Instant + Duration, in hyper too) can overflow.
        for (key, v) in [
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
            ),
            ("server.idle_timeout_ms", self.server.idle_timeout_ms),
        ] {
            if !(1..=MAX_CONNECTION_TIMEOUT_MS).contains(&v) {
                return Err(err(
                    0..0,
                    key,
                    format!("must be between 1 and {MAX_CONNECTION_TIMEOUT_MS}"),
                    "milliseconds, e.g. 10000",
                ));
            }
        }
        if self.cache.shards == 0 {
            return Err(err(
                0..0,
                "cache.shards",
                "must be at least 1".into(),
                "64 suits most machines",
            ));
        }
        if let Err(m) = check_log_filter(&self.log.level) {
            return Err(err(
                0..0,
                "log.level",
                m,
                "one of trace, debug, info, warn, error, off, or target=level pairs such as \"info,kvgate=debug\"",
            ));
        }
        if let Some(endpoint) = &self.tracing.otlp_endpoint {
            otlp_traces_url(endpoint.get_ref()).map_err(|m| {
                err(
                    endpoint.span(),
                    "tracing.otlp_endpoint",
                    m,
                    "an OTLP/HTTP collector, e.g. \"http://127.0.0.1:4318\"",
                )
            })?;
        }
        if self.tracing.service_name.is_empty() || self.tracing.service_name.len() > 256 {
            return Err(err(
                0..0,
                "tracing.service_name",
                "must be 1 to 256 characters".into(),
                "e.g. \"kvgate\"",
            ));
        }
        if !(0.0..=1.0).contains(&self.cache.heuristic_fraction) {
            return Err(err(
                0..0,
                "cache.heuristic_fraction",
                "must be between 0 and 1".into(),
                "RFC 9111 suggests 0.1",
            ));
        }
        if let Some(edge) = &self.edge {
            if let Err(e) = edge.validate() {
                // Inline tables (`variants = { a = 1 }`) have no line of
                // their own: the document's spans find the key inside them.
                let (line, column) = locate(src, &format!("edge.{}", e.field))
                    .map_or_else(|| locate_key(src, &e.field), |s| line_col(src, s.start));
                return Err(ConfigError {
                    file: file.to_string(),
                    line,
                    column,
                    message: e.to_string(),
                    hint: Some("see the [edge] section of config/kvgate.toml".into()),
                });
            }
        }
        if let Some(admin) = &self.admin {
            if let Err(e) = admin.listen.get_ref().parse::<SocketAddr>() {
                return Err(err(
                    admin.listen.span(),
                    "admin.listen",
                    format!("{e}"),
                    "an IP address and port, e.g. \"127.0.0.1:9090\"",
                ));
            }
            if admin.token.as_deref().is_some_and(|t| !is_valid_token(t)) {
                return Err(err(
                    0..0,
                    "admin.token",
                    "must be 1 to 4096 visible ASCII characters".into(),
                    "e.g. the output of `openssl rand -hex 32`",
                ));
            }
        }
        // `state.backend = "redis"` without [redis] is refused at start,
        // not here: `--redis URL` may supply the section.
        if let Some(redis) = &self.redis {
            redis.validate(src, file)?;
        }
        if let Some(l2) = &self.cache.l2 {
            for (key, ok, hint) in [
                (
                    "max_object_bytes",
                    (1..=MAX_L2_OBJECT_BYTES).contains(&l2.max_object_bytes),
                    format!("bytes, 1 to {MAX_L2_OBJECT_BYTES}"),
                ),
                (
                    "max_ttl_secs",
                    (1..=MAX_L2_TTL_SECS).contains(&l2.max_ttl_secs),
                    format!("seconds, 1 to {MAX_L2_TTL_SECS}"),
                ),
            ] {
                if !ok {
                    let (line, column) = locate_plain_key(src, "cache.l2", key);
                    return Err(ConfigError {
                        file: file.to_string(),
                        line,
                        column,
                        message: format!("cache.l2.{key}: out of range"),
                        hint: Some(hint),
                    });
                }
            }
        }
        let t = &self.cache.tags;
        for (key, name) in [
            ("cache.tags.surrogate_key_header", &t.surrogate_key_header),
            ("cache.tags.cache_tag_header", &t.cache_tag_header),
        ] {
            if !name.is_empty() && http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                let (line, column) = locate_plain_key(src, "cache.tags", key_tail(key));
                return Err(ConfigError {
                    file: file.to_string(),
                    line,
                    column,
                    message: format!("{key}: {name:?} is not a header name"),
                    hint: Some("a header name such as \"Surrogate-Key\", or \"\" for none".into()),
                });
            }
        }
        for rule in &self.cache.tag_rules {
            if !rule.prefix.get_ref().starts_with('/') {
                return Err(err(
                    rule.prefix.span(),
                    "cache.tag_rule.prefix",
                    "must start with '/'".into(),
                    "a path prefix such as \"/users/\"",
                ));
            }
            check_normal_prefix(&rule.prefix, "cache.tag_rule.prefix", &err)?;
            if let Err(m) = tag_template::Template::parse(rule.tag.get_ref()) {
                return Err(err(
                    rule.tag.span(),
                    "cache.tag_rule.tag",
                    m,
                    "placeholders are {segment1}, {segment2}, ... (path segments of the URL)",
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            // Names label counters and select per-route version bumps:
            // two routes with one name would share both.
            if !names.insert(r.name.as_str()) {
                return Err(err(
                    0..0,
                    &format!("route.{i}.name"),
                    format!("{:?} is already the name of another route", r.name),
                    "give every [[route]] its own name",
                ));
            }
        }
        for r in &self.routes {
            if !r.prefix.get_ref().starts_with('/') {
                return Err(err(
                    r.prefix.span(),
                    &format!("route[{}].prefix", r.name),
                    "must start with '/'".into(),
                    "a path prefix such as \"/api/\"",
                ));
            }
            check_normal_prefix(&r.prefix, &format!("route[{}].prefix", r.name), &err)?;
            if let Some(o) = &r.origin {
                if !self.origins.contains_key(o.get_ref()) {
                    let known: Vec<&str> = self.origins.keys().map(String::as_str).collect();
                    return Err(err(
                        o.span(),
                        &format!("route[{}].origin", r.name),
                        format!("{:?} is not a configured origin", o.get_ref()),
                        &if known.is_empty() {
                            "define it as [origins.NAME] (url or servers), or leave the key out to use [origin]".to_string()
                        } else {
                            format!("one of {known:?}, defined as [origins.NAME]")
                        },
                    ));
                }
            }
        }
        Ok(())
    }

    /// The edge environment (`edge.environment`, or its default): names
    /// the state namespace and the default Redis key prefix.
    pub(crate) fn environment(&self) -> String {
        match &self.edge {
            Some(e) => e.environment.clone(),
            None => edge::EdgeConfig::default().environment,
        }
    }

    /// The route for a path in normal form (see [`match_route`]).
    pub(crate) fn route_for(&self, path: &str) -> Option<&RouteConfig> {
        match_route(&self.routes, path)
    }

    pub(crate) fn listen_addr(&self) -> Result<SocketAddr, crate::error::ListenAddrError> {
        self.server
            .listen
            .get_ref()
            .parse()
            .map_err(|source| crate::error::ListenAddrError {
                what: "listen address",
                addr: self.server.listen.get_ref().clone(),
                source,
            })
    }
}

/// Finds the line of a dotted key (`experiments.new-checkout.traffic`)
/// under `[edge...]`: the last segment's `key =` line after the nearest
/// table header naming the earlier segments, else that header itself.
fn locate_key(src: &str, dotted: &str) -> (usize, usize) {
    let segments: Vec<&str> = dotted.split('.').collect();
    let last = segments.last().copied().unwrap_or("");
    let table_hint = segments[..segments.len().saturating_sub(1)].join(".");
    let mut in_table = table_hint.is_empty();
    let mut header_line = None;
    for (i, line) in src.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_table = t.contains(&table_hint) && t.contains("edge");
            if in_table && header_line.is_none() {
                header_line = Some(i + 1);
            }
            continue;
        }
        if in_table {
            if let Some((k, _)) = t.split_once('=') {
                if k.trim().trim_matches('"') == last {
                    return (i + 1, line.len() - line.trim_start().len() + 1);
                }
            }
        }
    }
    header_line.map_or((0, 0), |l| (l, 1))
}

/// The span of a dotted key (`edge.experiments.exp.traffic`, with array
/// indexes as segments: `route.1.name`) in TOML text: the key itself when it
/// is written, else its table. Works inside inline tables, where a line
/// scan cannot.
pub(crate) fn locate(src: &str, dotted: &str) -> Option<std::ops::Range<usize>> {
    use toml_edit::{Item, TableLike};
    let doc = toml_edit::ImDocument::parse(src).ok()?;
    let mut table: &dyn TableLike = doc.as_table();
    let mut found = None;
    let mut segments = dotted.split('.');
    while let Some(segment) = segments.next() {
        let Some((key, item)) = table.get_key_value(segment) else {
            break;
        };
        if let Some(span) = key.span().or_else(|| item.span()) {
            found = Some(span);
        }
        let next: Option<&dyn TableLike> = match item {
            Item::ArrayOfTables(array) => {
                let Some(t) = segments
                    .next()
                    .and_then(|i| i.parse::<usize>().ok())
                    .and_then(|i| array.get(i))
                else {
                    break;
                };
                if let Some(span) = t.span() {
                    found = Some(span);
                }
                Some(t)
            }
            other => other.as_table_like(),
        };
        match next {
            Some(t) => table = t,
            None => break,
        }
    }
    found
}

fn key_tail(dotted: &str) -> &str {
    dotted.rsplit('.').next().unwrap_or(dotted)
}

/// The line of `key =` inside the `[table]` section (values that are not
/// `Spanned` have no position of their own).
fn locate_plain_key(src: &str, table: &str, key: &str) -> (usize, usize) {
    let mut in_table = false;
    for (i, line) in src.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_table = t.trim_matches(|c| c == '[' || c == ']').trim() == table;
            continue;
        }
        if in_table {
            if let Some((k, _)) = t.split_once('=') {
                if k.trim().trim_matches('"') == key {
                    return (i + 1, line.len() - line.trim_start().len() + 1);
                }
            }
        }
    }
    (0, 0)
}

/// Most `[origins.NAME]` sections.
pub const MAX_NAMED_ORIGINS: usize = 64;

/// An origin server URL: `http://` or `https://`, a host, no user, path or
/// query (requests keep theirs).
pub(crate) fn validate_origin_url(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("the URL must start with http:// or https://".into()),
    }
    let Some(authority) = uri.authority() else {
        return Err("the URL has no host".into());
    };
    if authority.as_str().contains('@') {
        return Err("the URL must not carry user information".into());
    }
    if authority.host().is_empty() {
        return Err("the URL has no host".into());
    }
    if (uri.path() != "/" && !uri.path().is_empty()) || uri.query().is_some() {
        return Err("the origin URL must have no path; requests keep theirs".into());
    }
    Ok(uri)
}

/// The CA certificates in a PEM file (at least one).
pub(crate) fn read_ca_file(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

/// One origin section (`prefix` is `origin` or `origins.NAME`); a named
/// one must say where its servers are.
fn validate_origin(
    o: &OriginConfig,
    prefix: &str,
    named: bool,
    err: &ErrorAt<'_>,
) -> Result<(), ConfigError> {
    let url_written = !o.url.span().is_empty();
    if url_written && !o.servers.is_empty() {
        return Err(err(
            o.url.span(),
            &format!("{prefix}.url"),
            "set either url (one server) or servers, not both".into(),
            "move the url into servers = [...]",
        ));
    }
    if named && !url_written && o.servers.is_empty() {
        return Err(err(
            0..0,
            prefix,
            "names no server".into(),
            "set url = \"http://host:port\" or servers = [...]",
        ));
    }
    if o.servers.len() > MAX_ORIGIN_SERVERS {
        return Err(err(
            0..0,
            &format!("{prefix}.servers"),
            format!("at most {MAX_ORIGIN_SERVERS} servers"),
            "put a load balancer in front of larger pools",
        ));
    }
    let urls: Vec<&Spanned<String>> = if o.servers.is_empty() {
        vec![&o.url]
    } else {
        o.servers.iter().collect()
    };
    let key = if o.servers.is_empty() {
        "url"
    } else {
        "servers"
    };
    let mut scheme = None;
    let mut seen = std::collections::HashSet::new();
    for u in urls {
        let uri = validate_origin_url(u.get_ref()).map_err(|m| {
            err(
                u.span(),
                &format!("{prefix}.{key}"),
                m,
                "e.g. \"http://127.0.0.1:8000\" or \"https://origin.internal\"",
            )
        })?;
        let this = uri.scheme_str().unwrap_or("http").to_string();
        if scheme.get_or_insert_with(|| this.clone()) != &this {
            return Err(err(
                u.span(),
                &format!("{prefix}.{key}"),
                "all servers of one origin must use the same scheme".into(),
                "make them all http:// or all https://, or define two origins",
            ));
        }
        if !seen.insert(uri.authority().map(|a| a.as_str().to_ascii_lowercase())) {
            return Err(err(
                u.span(),
                &format!("{prefix}.{key}"),
                format!("{:?} is listed twice", u.get_ref()),
                "list every server once",
            ));
        }
    }
    if let Some(ca) = &o.ca_file {
        if scheme.as_deref() != Some("https") {
            return Err(err(
                ca.span(),
                &format!("{prefix}.ca_file"),
                "is only used by https:// origins".into(),
                "remove it, or use https:// servers",
            ));
        }
        read_ca_file(ca.get_ref()).map_err(|m| {
            err(
                ca.span(),
                &format!("{prefix}.ca_file"),
                m,
                "a readable PEM file with the CA certificates that signed the origin's",
            )
        })?;
    }
    for (k, v, lo, hi) in [
        ("connect_timeout_ms", o.connect_timeout_ms, 1, 600_000),
        (
            "first_byte_timeout_ms",
            o.first_byte_timeout_ms,
            1,
            MAX_CONNECTION_TIMEOUT_MS,
        ),
        (
            "idle_timeout_ms",
            o.idle_timeout_ms,
            1,
            MAX_CONNECTION_TIMEOUT_MS,
        ),
        ("eject_ms", o.eject_ms, 1, MAX_CONNECTION_TIMEOUT_MS),
    ] {
        if !(lo..=hi).contains(&v) {
            return Err(err(
                0..0,
                &format!("{prefix}.{k}"),
                format!("must be between {lo} and {hi}"),
                "milliseconds",
            ));
        }
    }
    if let Some(h) = &o.health {
        let path = h.path.get_ref();
        if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(err(
                h.path.span(),
                &format!("{prefix}.health.path"),
                format!("{path:?} is not a path"),
                "a path such as \"/healthz\"",
            ));
        }
        for (k, v, lo, hi) in [
            ("interval_ms", h.interval_ms, 10, MAX_CONNECTION_TIMEOUT_MS),
            ("timeout_ms", h.timeout_ms, 1, 600_000),
            (
                "healthy_threshold",
                u64::from(h.healthy_threshold),
                1,
                1_000,
            ),
            (
                "unhealthy_threshold",
                u64::from(h.unhealthy_threshold),
                1,
                1_000,
            ),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(err(
                    0..0,
                    &format!("{prefix}.health.{k}"),
                    format!("must be between {lo} and {hi}"),
                    "see [origin.health] in the README",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracing_endpoint_is_checked_and_located() {
        let c = Config::parse("[tracing]\notlp_endpoint = \"http://c:4318\"\n", "k.toml").unwrap();
        let url = otlp_traces_url(c.tracing.otlp_endpoint.unwrap().get_ref()).unwrap();
        assert_eq!(url, "http://c:4318/v1/traces");
        assert_eq!(
            otlp_traces_url("http://c:4318/otlp/v1/traces").unwrap(),
            "http://c:4318/otlp/v1/traces"
        );
        assert_eq!(
            Config::parse("", "k.toml").unwrap().tracing.service_name,
            "kvgate"
        );
        for bad in ["https://c:4318", "c:4318", "http://"] {
            let src = format!("[log]\nlevel = \"info\"\n[tracing]\notlp_endpoint = {bad:?}\n");
            let e = Config::parse(&src, "k.toml").unwrap_err();
            assert_eq!((e.line, e.column), (4, 17), "{bad}: {e:?}");
            assert!(e.message.starts_with("tracing.otlp_endpoint: "), "{e:?}");
        }
    }

    #[test]
    fn defaults_parse_from_empty() {
        let c = Config::parse("", "t.toml").unwrap();
        assert_eq!(c.cache.version, 1);
        assert!(c.routes.is_empty());
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = Config::parse("[cache]\nmax_bytes = 10\nmax_bites = 5\n", "k.toml").unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("k.toml", 3));
        assert!(e.message.contains("max_bites"), "{}", e.message);
        assert!(e.to_string().starts_with("k.toml:3:"), "{e}");
    }

    #[test]
    fn wrong_type_is_located() {
        let e = Config::parse("[origin]\nconnect_timeout_ms = \"2s\"\n", "k.toml").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.hint.is_some());
    }

    #[test]
    fn semantic_errors_are_located() {
        let e = Config::parse("[origin]\n\nurl = \"ftp://x\"\n", "k.toml").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.starts_with("origin.url"));
        let e = Config::parse("[server]\nlisten = \"nope\"\n", "k.toml").unwrap_err();
        assert_eq!(e.line, 2);
        let e = Config::parse("[[route]]\nname = \"a\"\nprefix = \"api\"\n", "k.toml").unwrap_err();
        assert_eq!(e.line, 3);
    }

    #[test]
    fn server_timeouts_are_bounded() {
        let c = Config::parse("", "t.toml").unwrap();
        assert_eq!(c.server.idle_timeout_ms, 60_000);
        for src in [
            "[server]\nidle_timeout_ms = 0\n",
            "[server]\nheader_read_timeout_ms = 0\n",
            "[server]\nidle_timeout_ms = 9223372036854775807\n",
            "[server]\nheader_read_timeout_ms = 86400001\n",
        ] {
            let e = Config::parse(src, "k.toml").unwrap_err();
            assert!(e.message.starts_with("server."), "{src}: {e}");
        }
        let c = Config::parse("[server]\nidle_timeout_ms = 300\n", "t.toml").unwrap();
        assert_eq!(c.server.idle_timeout_ms, 300);
    }

    #[test]
    fn edge_errors_are_located() {
        let src = "[edge.experiments.exp]\nvariants = { a = 1 }\ntraffic = 7.0\n";
        let e = Config::parse(src, "k.toml").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("traffic"), "{e}");
    }

    #[test]
    fn admin_and_tag_errors_are_located() {
        let e = Config::parse("[admin]\nlisten = \"nope\"\n", "k.toml").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = Config::parse(
            "[admin]\nlisten = \"127.0.0.1:1\"\ntokn = \"x\"\n",
            "k.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = Config::parse(
            "[cache.tags]\nmax_len = 10\ncache_tag_header = \"bad header\"\n",
            "k.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = Config::parse(
            "[[cache.tag_rule]]\nprefix = \"/users/\"\ntag = \"user:{usr}\"\n",
            "k.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("{usr}"), "{e}");
        let e = Config::parse(
            "[[cache.tag_rule]]\nprefix = \"/users/\"\ntag = \"user:{user}\"\n",
            "k.toml",
        )
        .unwrap_err();
        assert!(e.message.contains("whoever filled it"), "{e}");
        let c = Config::parse(
            "[admin]\ntoken = \"s3cret\"\n[[cache.tag_rule]]\nprefix = \"/users/\"\ntag = \"user:{segment2}\"\n",
            "k.toml",
        )
        .unwrap();
        assert_eq!(c.admin.unwrap().listen.get_ref(), "127.0.0.1:9090");
        assert_eq!(c.cache.tag_rules.len(), 1);
    }

    #[test]
    fn prefixes_must_be_in_the_normal_form_requests_are_matched_in() {
        let e = Config::parse(
            "[[route]]\nname = \"a\"\nprefix = \"/api//%61\"\n",
            "k.toml",
        )
        .unwrap_err();
        assert_eq!((e.line, e.message.contains("\"/api/a\"")), (3, true), "{e}");
        let e = Config::parse(
            "[[cache.tag_rule]]\nprefix = \"/../x\"\ntag = \"t\"\n",
            "k.toml",
        )
        .unwrap_err();
        assert!(e.message.contains("above the root"), "{e}");
        let e =
            Config::parse("[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n", "k.toml").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let c = Config::parse(
            "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n",
            "k.toml",
        )
        .unwrap();
        assert_eq!(c.server.trusted_proxies.len(), 2);
    }

    #[test]
    fn log_levels_must_name_a_level() {
        for bad in ["inof", "kvgate", "info,kvgate=verbose", ""] {
            let src = format!("[log]\nformat = \"json\"\nlevel = {bad:?}\n");
            let e = Config::parse(&src, "k.toml").unwrap_err();
            assert_eq!((e.line, e.column), (3, 1), "{bad}: {e}");
            assert!(e.message.starts_with("log.level"), "{e}");
        }
        for good in [
            "info",
            "WARN",
            "warn,kvgate=debug",
            "kvgate::access=off,info",
        ] {
            let src = format!("[log]\nlevel = {good:?}\n");
            Config::parse(&src, "k.toml").unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        let c = Config::parse("[log]\nformat = \"json\"\n", "k.toml").unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        let e = Config::parse("[log]\nformat = \"xml\"\n", "k.toml").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn duplicate_route_names_and_zero_shards_are_refused() {
        let src = "[[route]]\nname = \"a\"\nprefix = \"/x/\"\n\n[[route]]\nprefix = \"/y/\"\nname = \"a\"\n";
        let e = Config::parse(src, "k.toml").unwrap_err();
        assert_eq!((e.line, e.column), (7, 1), "{e}");
        assert!(e.message.contains("already the name"), "{e}");
        let e = Config::parse("[cache]\nmax_bytes = 1000\nshards = 0\n", "k.toml").unwrap_err();
        assert_eq!(
            (e.line, e.message.starts_with("cache.shards")),
            (3, true),
            "{e}"
        );
    }

    #[test]
    fn errors_inside_inline_tables_are_located() {
        let src = "[edge]\n[edge.experiments]\nexp = { variants = { a = 1 }, traffic = 7.0 }\n";
        let e = Config::parse(src, "k.toml").unwrap_err();
        assert_eq!((e.line, e.column), (3, 31), "{e}");
        assert!(e.message.contains("traffic"), "{e}");
        let src = "[server]\nlisten = \"127.0.0.1:1\"\nidle_timeout_ms = 0\n";
        let e = Config::parse(src, "k.toml").unwrap_err();
        assert_eq!((e.line, e.column), (3, 1), "{e}");
    }

    #[test]
    fn locate_walks_tables_arrays_and_inline_tables() {
        let src = "a = 1\n[t]\nx = { y = { z = 2 } }\n[[r]]\nn = 1\n[[r]]\nn = 2\n";
        let at = |k: &str| locate(src, k).map(|s| line_col(src, s.start));
        assert_eq!(at("a"), Some((1, 1)));
        assert_eq!(at("t.x.y.z"), Some((3, 13)));
        assert_eq!(at("r.1.n"), Some((7, 1)));
        assert_eq!(at("t.missing"), Some((2, 2)));
    }

    #[test]
    fn origins_accept_https_several_servers_and_named_origins() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let src = format!(
            "[origin]\nservers = [\"https://a.internal\", \"https://b.internal:8443\"]\nca_file = {:?}\n\
             [origin.health]\npath = \"/healthz\"\n\
             [origins.api]\nurl = \"http://10.0.0.1:8000\"\n\
             [[route]]\nname = \"api\"\nprefix = \"/api/\"\norigin = \"api\"\n",
            ca.display().to_string()
        );
        let c = Config::parse(&src, "k.toml").unwrap();
        assert_eq!(
            c.origin.server_urls(),
            vec!["https://a.internal", "https://b.internal:8443"]
        );
        assert_eq!(c.origin.health.as_ref().unwrap().healthy_threshold, 2);
        assert_eq!(c.origins["api"].server_urls(), vec!["http://10.0.0.1:8000"]);
        assert_eq!(c.routes[0].origin.as_ref().unwrap().get_ref(), "api");
        // Without `servers`, `url` is the one server.
        let c = Config::parse("[origin]\nurl = \"https://x.example\"\n", "k.toml").unwrap();
        assert_eq!(c.origin.server_urls(), vec!["https://x.example"]);
    }

    #[test]
    fn origin_errors_are_located() {
        let at = |src: &str| {
            let e = Config::parse(src, "k.toml").unwrap_err();
            (e.line, e.message)
        };
        let (line, m) = at("[origin]\nurl = \"http://a:1\"\nservers = [\"http://b:1\"]\n");
        assert_eq!(line, 2, "{m}");
        assert!(m.contains("not both"), "{m}");
        let (line, m) = at("[origin]\nservers = [\n  \"http://a:1\",\n  \"https://b:1\",\n]\n");
        assert_eq!(line, 4, "{m}");
        assert!(m.contains("same scheme"), "{m}");
        let (line, m) = at("[origin]\nservers = [\"http://a:1\", \"http://A:1\"]\n");
        assert_eq!(line, 2, "{m}");
        assert!(m.contains("twice"), "{m}");
        let (line, m) = at("[origin]\nservers = [\"http://a:1/path\"]\n");
        assert_eq!(line, 2, "{m}");
        assert!(m.starts_with("origin.servers"), "{m}");
        let (line, m) = at("[origin]\nurl = \"https://a\"\nca_file = \"/no/such/ca.pem\"\n");
        assert_eq!(line, 3, "{m}");
        assert!(
            m.starts_with("origin.ca_file") && m.contains("cannot read"),
            "{m}"
        );
        let (line, m) = at("[origin]\nurl = \"http://a\"\nca_file = \"/etc/hostname\"\n");
        assert_eq!(line, 3, "{m}");
        assert!(m.contains("only used by https"), "{m}");
        let (line, m) = at("[origin.health]\ninterval_ms = 1000\nhealthy_threshold = 0\n");
        assert_eq!(line, 3, "{m}");
        assert!(m.starts_with("origin.health.healthy_threshold"), "{m}");
        let (line, m) = at("[origin.health]\npath = \"healthz\"\n");
        assert_eq!(line, 2, "{m}");
        let (line, m) = at("[origins.api]\nconnect_timeout_ms = 5\n");
        assert_eq!(line, 1, "{m}");
        assert!(m.contains("names no server"), "{m}");
        let (line, m) = at("[origins.api]\nurl = \"ftp://x\"\n");
        assert_eq!(line, 2, "{m}");
        assert!(m.starts_with("origins.api.url"), "{m}");
        let (line, m) = at(
            "[origins.api]\nurl = \"http://x\"\n[[route]]\nname = \"a\"\nprefix = \"/a/\"\norigin = \"apj\"\n",
        );
        assert_eq!(line, 6, "{m}");
        assert!(m.contains("\"apj\" is not a configured origin"), "{m}");
        let (line, m) = at("[origin]\neject_ms = 0\n");
        assert_eq!(line, 2, "{m}");
    }

    #[test]
    fn the_origin_flag_replaces_the_servers() {
        let mut c = Config::parse(
            "[origin]\nservers = [\"http://a:1\", \"http://b:1\"]\n",
            "k.toml",
        )
        .unwrap();
        c.apply(Overrides {
            origin: Some("https://c.example".into()),
            ..Overrides::default()
        })
        .unwrap();
        assert_eq!(c.origin.server_urls(), vec!["https://c.example"]);
    }

    #[test]
    fn longest_route_prefix_wins() {
        let c = Config::parse(
            "[[route]]\nname = \"a\"\nprefix = \"/api/\"\n[[route]]\nname = \"b\"\nprefix = \"/api/v2/\"\nbypass = true\n",
            "k.toml",
        )
        .unwrap();
        assert_eq!(c.route_for("/api/v2/x").unwrap().name, "b");
        assert_eq!(c.route_for("/api/v1").unwrap().name, "a");
        assert!(c.route_for("/other").is_none());
        // An encoded separator cannot dodge the bypass route for /api/v2/.
        assert_eq!(c.route_for("/api/v2%2Fx").unwrap().name, "b");
        assert_eq!(c.route_for("/api/v1%2Fx").unwrap().name, "a");
    }
}
