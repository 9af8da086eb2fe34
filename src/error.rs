//! Setup errors: why a gateway did not start. Each keeps its cause as
//! [`std::error::Error::source`] instead of folding it into a string, and
//! its own message names the file, address or flag involved; print the
//! chain of sources for the whole story (the binary joins them with ": ").

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Why [`crate::cli::start`] (or [`crate::cli::run`]) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The main listen address does not parse.
    #[error(transparent)]
    Listen(#[from] ListenAddrError),
    /// The admin listener's settings were refused or it could not bind.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The gateway could not be built (origin, state store, edge, tags).
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// The main listener could not bind.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed (in use, permission denied, ...).
        #[source]
        source: io::Error,
    },
    /// A bound listener could not report its address.
    #[error("cannot read the listener's address")]
    LocalAddr(#[source] io::Error),
    /// The SIGHUP handler for config reloads could not be installed.
    #[error("cannot install the SIGHUP handler")]
    Signal(#[source] io::Error),
    /// The durable state file cannot be created or written.
    #[error("state file {} is not writable", path.display())]
    StatePath {
        /// The `[state] path` file.
        path: PathBuf,
        /// Why it cannot be written.
        #[source]
        source: io::Error,
    },
}

/// A setup error located at the config key that caused it
/// (`kvgate check-config` and the start of `kvgate --config`).
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {key}")]
pub struct CheckError {
    /// The config file (`(flags)` when the value came from a flag).
    pub file: String,
    /// 1-based line, 0 when the key is not written in the file.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The dotted key, e.g. `admin.listen`.
    pub key: &'static str,
    /// What is wrong (boxed: `StartError` is large, and this error is
    /// returned by value).
    #[source]
    pub source: Box<StartError>,
}

/// A command-line flag or config file refused by [`crate::cli::RunArgs::resolve`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArgsError {
    /// The config file is missing or invalid (the error names file and line).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// `--origin` is not an `http://` or `https://` origin URL.
    #[error("--origin {url:?}: {reason}")]
    Origin {
        /// The flag's value.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--log-level` is not a log filter naming levels.
    #[error("--log-level {level:?}: {reason}")]
    LogLevel {
        /// The flag's value.
        level: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--redis` is not a Redis URL kvgate can use.
    #[error("--redis {url:?}: {reason}")]
    Redis {
        /// The flag's value.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--listen` or `--admin-listen` (named by `flag`) does not parse.
    #[error("{flag}")]
    Listen {
        /// The flag, e.g. `--listen`.
        flag: &'static str,
        /// The parse failure.
        #[source]
        source: ListenAddrError,
    },
}

/// A listen address that is not an IP address and port.
#[derive(Debug, thiserror::Error)]
#[error("{what} {addr:?} is not an IP address and port")]
pub struct ListenAddrError {
    pub(crate) what: &'static str,
    pub(crate) addr: String,
    #[source]
    pub(crate) source: std::net::AddrParseError,
}

/// Why the admin listener did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// `[admin] listen` does not parse.
    #[error(transparent)]
    Listen(#[from] ListenAddrError),
    /// The configured token is empty, too long or not visible ASCII.
    #[error("admin: {0}")]
    Token(#[from] InvalidToken),
    /// No token, and the address is reachable from other hosts.
    #[error(
        "refusing to start the admin API on {0} without a token: set {env} \
         or [admin] token, or listen on a loopback address such as 127.0.0.1:9090",
        env = crate::admin::TOKEN_ENV
    )]
    NoToken(SocketAddr),
    /// The admin listener could not bind.
    #[error("cannot listen on {addr} for the admin API")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        #[source]
        source: io::Error,
    },
    /// The bound admin listener could not report its address.
    #[error("cannot read the admin listener's address")]
    LocalAddr(#[source] io::Error),
}

/// An admin token kvgate refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the admin token must be 1 to {max} visible ASCII characters",
    max = crate::config::MAX_TOKEN_BYTES
)]
pub struct InvalidToken;

/// Why the TLS acceptor could not be built from the PEM files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be opened or parsed.
    #[error("{}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O or PEM syntax error.
        #[source]
        source: io::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{}: no certificate found", .0.display())]
    NoCertificate(PathBuf),
    /// The key file holds no private key.
    #[error("{}: no private key found", .0.display())]
    NoKey(PathBuf),
    /// rustls refused the certificate/key pair (or the protocol setup).
    #[error("TLS certificate/key")]
    Rustls(#[from] rustls::Error),
}

/// Why a gateway could not be built from a valid-looking config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The origin client could not be set up.
    #[error(transparent)]
    Origin(#[from] OriginSetupError),
    /// The edge state store could not be opened.
    #[error("state file {}", path.display())]
    State {
        /// The `[state] path` file.
        path: PathBuf,
        /// The backend's error.
        #[source]
        source: crate::kv::KvError,
    },
    /// The `[edge]` section was refused.
    #[error(transparent)]
    Edge(#[from] crate::edge::EdgeConfigError),
    /// `[cache.tags]` or a `[[cache.tag_rule]]` was refused.
    #[error(transparent)]
    Tags(#[from] TagConfigError),
    /// A `[redis]` region's client could not be set up (its URL).
    #[error("redis region {region}")]
    Redis {
        /// The region's name.
        region: String,
        /// The client's error (boxed: it is large).
        #[source]
        source: Box<redis::RedisError>,
    },
    /// `[tracing]` could not start its exporter.
    #[error(transparent)]
    Tracing(#[from] TracingError),
}

/// Why request tracing (`[tracing]`) could not start.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    /// The OTLP endpoint is not a URL the exporter can post to.
    #[error("tracing.otlp_endpoint: {0}")]
    Endpoint(String),
    /// Built outside a Tokio runtime: the exporter needs one.
    #[error("tracing needs a Tokio runtime to export from")]
    NoRuntime,
}

/// Why the origin client could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OriginSetupError {
    /// The origin URL is not an http(s) URL without a path.
    #[error("origin URL {url:?}: {reason}")]
    Url {
        /// The configured URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL's host cannot be sent as a Host header.
    #[error("origin URL {url:?}: the host is not a valid Host header")]
    Host {
        /// The configured URL.
        url: String,
        /// Why the header value was refused.
        #[source]
        source: http::header::InvalidHeaderValue,
    },
    /// The CA file of an https origin cannot be used.
    #[error("origin CA file: {0}")]
    CaFile(String),
    /// rustls refused the client setup for an https origin.
    #[error("origin TLS setup")]
    Tls(#[source] rustls::Error),
}

/// A tag setting that cannot be used (the config loader checks these
/// first; this guards configs built in code).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TagConfigError {
    /// A `[[cache.tag_rule]]` template does not parse (the message quotes it).
    #[error("{0}")]
    Template(String),
    /// A `[cache.tags]` header setting is not a header name.
    #[error("{0:?} is not a header name")]
    HeaderName(String, #[source] http::header::InvalidHeaderName),
}
