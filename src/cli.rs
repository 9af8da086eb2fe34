//! Command line: run the gateway, check a config, or run the demo.

use crate::admin::reload::Reloader;
use crate::admin::AdminSettings;
use crate::config::{Config, StateBackend};
pub use crate::error::{ArgsError, CheckError, StartError};
use crate::proxy::gateway::{Gateway, Live};
use crate::proxy::server;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "kvgate",
    version,
    about = "A caching reverse-proxy gateway (RFC 9111 shared cache)"
)]
/// The `kvgate` command line.
pub struct Cli {
    /// A subcommand; without one the gateway runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags for running the gateway.
    #[command(flatten)]
    pub run: RunArgs,
}

/// What to do instead of running the gateway.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate a config file and exit (status 0 when valid).
    CheckConfig {
        /// The TOML file to check.
        #[arg(long)]
        config: PathBuf,
    },
    /// Ask a running gateway's `/healthz` (exit status 0 when it answers
    /// 200): a container HEALTHCHECK without curl in the image.
    Health {
        /// The admin listener's address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: String,
    },
    /// Start a small demo origin and the gateway in front of it.
    Demo {
        /// Where the demo gateway listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
    },
}

/// Flags for running the gateway; they override the config file.
#[derive(Args, Debug, Default, Clone)]
pub struct RunArgs {
    /// TOML config file (see config/kvgate.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub listen: Option<String>,
    /// Origin URL, e.g. http://127.0.0.1:8000.
    #[arg(long, env = "KVGATE_ORIGIN")]
    pub origin: Option<String>,
    /// TLS certificate chain (PEM) for the main listener.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the main listener.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Log filter (info, warn, kvgate=debug, ...).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Admin API listen address, e.g. 127.0.0.1:9090 (starts the admin
    /// listener even without an [admin] section). The token comes from
    /// KVGATE_ADMIN_TOKEN or [admin] token.
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// Redis URL, e.g. redis://127.0.0.1:6379: edge state lives there,
    /// shared by every instance using it (one region; more with [redis]).
    #[arg(long)]
    pub redis: Option<String>,
}

impl RunArgs {
    /// The config: file (if any), then flags on top.
    pub fn resolve(&self) -> Result<Config, ArgsError> {
        let mut cfg = match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        cfg.apply(crate::config::Overrides {
            listen: self.listen.clone(),
            origin: self.origin.clone(),
            tls: self.tls_cert.clone().zip(self.tls_key.clone()),
            log_level: self.log_level.clone(),
            admin_listen: self.admin_listen.clone(),
            redis: self.redis.clone(),
        })?;
        Ok(cfg)
    }
}

/// Sets up text logging at `level` (RUST_LOG wins when set).
pub fn init_logging(level: &str) {
    init_logs(&crate::config::LogConfig {
        level: level.to_string(),
        ..Default::default()
    });
}

/// Sets up logging from `[log]` (RUST_LOG wins over its level); a reload
/// changes level and format in place.
pub fn init_logs(cfg: &crate::config::LogConfig) {
    crate::logging::init(cfg);
}

/// A running gateway: its bound address and a handle to stop it.
pub struct Running {
    /// The main listener's bound address (the real port when 0 was asked).
    pub addr: std::net::SocketAddr,
    /// The admin listener's bound address, when it runs.
    pub admin_addr: Option<std::net::SocketAddr>,
    /// The gateway as it started (store, edge, versions); after a reload
    /// [`Running::current`] has the generation in force.
    pub gateway: Arc<Gateway>,
    /// Weak: once stopped, the last generation (and the state file it
    /// holds open) goes with `gateway`.
    live: std::sync::Weak<Live>,
    /// Send `true` to stop accepting and drain in-flight requests.
    pub stop: tokio::sync::watch::Sender<bool>,
    /// Ends once the listeners have drained and edge writes settled.
    pub task: tokio::task::JoinHandle<()>,
}

/// What a start needs that can be refused before anything binds. `start`
/// and `check-config` both get it from [`preflight`], so a config that
/// checks also starts (up to what only binding can tell: a taken port).
struct Prepared {
    addr: std::net::SocketAddr,
    admin: Option<AdminSettings>,
    tls: Option<(tokio_rustls::TlsAcceptor, Arc<server::CertResolver>)>,
}

/// Every check a start makes before binding: addresses, the admin token
/// rule, the TLS files (loaded), the state file (writable).
fn preflight(cfg: &Config) -> Result<Prepared, StartError> {
    let addr = cfg.listen_addr()?;
    let admin = cfg
        .admin
        .as_ref()
        .map(AdminSettings::from_config)
        .transpose()?;
    let tls = match (&cfg.server.tls_cert, &cfg.server.tls_key) {
        (Some(c), Some(k)) => Some(server::tls_acceptor(c, k)?),
        _ => None,
    };
    if cfg.edge.is_some() && cfg.state.backend == StateBackend::Durable {
        check_writable(&cfg.state.path).map_err(|source| StartError::StatePath {
            path: cfg.state.path.clone(),
            source,
        })?;
    }
    Ok(Prepared { addr, admin, tls })
}

/// The state file can be opened for writing, or created in its directory
/// (probed with a file of our own, removed at once: the real one may be
/// locked by a running instance).
fn check_writable(path: &std::path::Path) -> std::io::Result<()> {
    use std::fs::OpenOptions;
    if path.exists() {
        return OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(drop);
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let probe = dir.join(format!(".kvgate-probe-{}", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

/// The config key a setup error is about.
fn key_of(cfg: &Config, e: &StartError) -> &'static str {
    use crate::error::{AdminError, GatewayError, OriginSetupError, TlsError};
    let tls_key = |p: &std::path::Path| {
        if cfg.server.tls_key.as_deref() == Some(p) {
            "server.tls_key"
        } else {
            "server.tls_cert"
        }
    };
    match e {
        StartError::Listen(_) | StartError::Bind { .. } => "server.listen",
        StartError::Admin(AdminError::Token(_)) => "admin.token",
        StartError::Admin(_) => "admin.listen",
        StartError::Tls(TlsError::Read { path, .. }) => tls_key(path),
        StartError::Tls(TlsError::NoKey(_)) => "server.tls_key",
        StartError::Tls(_) => "server.tls_cert",
        StartError::StatePath { .. } | StartError::Gateway(GatewayError::State { .. }) => {
            "state.path"
        }
        StartError::Gateway(GatewayError::Origin(OriginSetupError::CaFile(_))) => "origin.ca_file",
        StartError::Gateway(GatewayError::Origin(_)) if !cfg.origin.servers.is_empty() => {
            "origin.servers"
        }
        StartError::Gateway(GatewayError::Origin(_)) => "origin.url",
        StartError::Gateway(GatewayError::Edge(_)) => "edge",
        StartError::Gateway(GatewayError::Tags(_)) => "cache.tags",
        _ => "server",
    }
}

/// Runs every check a start runs (see [`preflight`]) and locates a refusal
/// at its key in the config file: what `kvgate check-config` answers.
pub fn check(cfg: &Config) -> Result<(), CheckError> {
    preflight(cfg).map(drop).map_err(|source| {
        let key = key_of(cfg, &source);
        let (file, line, column) = cfg.position(key);
        CheckError {
            file,
            line,
            column,
            key,
            source: Box::new(source),
        }
    })
}

impl Running {
    /// The gateway generation in force (replaced by config reloads).
    pub fn current(&self) -> Arc<Gateway> {
        self.live
            .upgrade()
            .map_or_else(|| self.gateway.clone(), |l| l.load_full())
    }
}

/// Binds and starts the gateway on the current runtime.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    // Checked before anything binds: a refused config stops the start.
    let Prepared {
        addr,
        admin: admin_settings,
        tls,
    } = preflight(&cfg)?;
    let gw = Gateway::new(cfg)?;
    let live = Arc::new(Live::new(gw.clone()));
    let (tls, resolver) = match tls {
        Some((acceptor, resolver)) => (Some(acceptor), Some(resolver)),
        None => (None, None),
    };
    let reloader = Reloader::new(live.clone(), resolver);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener.local_addr().map_err(StartError::LocalAddr)?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let admin = match admin_settings {
        Some(s) => Some(
            crate::admin::start(s, live.clone(), reloader.clone(), addr, stopped.clone()).await?,
        ),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|a| a.addr);
    let reload = match &gw.config.source {
        Some(_) => Some(
            crate::admin::reload::spawn_on_sighup(reloader, stopped.clone())
                .map_err(StartError::Signal)?,
        ),
        None => None,
    };
    // Expired entries must not pin memory until the LRU reaches them.
    let sweeper = {
        let live = live.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let gw = live.load_full();
            // One shard per tick, a full pass about every 5 s, each on a
            // blocking thread: a large store must not stall the request path.
            let shards = gw.store.shard_count().max(1);
            let tick = Duration::from_secs(5) / shards as u32;
            let mut next = 0;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(tick) => {}
                    _ = stopped.changed() => break,
                }
                // The settings in force now (a reload may change them).
                let gw = live.load_full();
                let keep = Duration::from_secs(gw.config.cache.keep_secs);
                let grace = Duration::from_secs(gw.config.cache.grace_secs);
                let shard = next;
                next = (next + 1) % shards;
                let _ = tokio::task::spawn_blocking(move || {
                    gw.store
                        .sweep_shard(shard, std::time::SystemTime::now(), keep, grace)
                })
                .await;
            }
        })
    };
    let counter_flusher = gw.shared_counters.clone().map(|shared| {
        let live = live.clone();
        let mut stopped = stopped.clone();
        let gw = gw.clone();
        tokio::spawn(async move {
            // [redis] needs a restart (a reload says so): the first
            // generation's settings hold.
            let every = Duration::from_millis(
                gw.redis
                    .as_ref()
                    .map_or(1_000, |r| r.settings().counter_flush_ms),
            );
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => break,
                }
                flush_counters(&live.load_full(), &shared).await;
            }
            // What was counted since the last tick is not lost at shutdown.
            flush_counters(&live.load_full(), &shared).await;
        })
    });
    let task = {
        let live = live.clone();
        tokio::spawn(async move {
            server::serve(live.clone(), listener, tls, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
            let gw = live.load_full();
            // Queued edge writes (sticky assignments, preference renewals)
            // are committed before the process goes; a hung store gets the
            // same grace as in-flight requests.
            if let Some(edge) = &gw.edge {
                let grace = Duration::from_millis(gw.config.server.shutdown_grace_ms);
                if tokio::time::timeout(grace, edge.settle()).await.is_err() {
                    tracing::warn!("edge state writes still pending at shutdown were abandoned");
                }
            }
            // Awaited, not aborted: both stop on `stopped`, and an aborted
            // task (or the blocking sweep it waits on) may still hold the
            // gateway, and with it the state file, after this task ends.
            let _ = sweeper.await;
            if let Some(f) = counter_flusher {
                let _ = f.await;
            }
            if let Some(r) = reload {
                let _ = r.await;
            }
            if let Some(a) = admin {
                let _ = a.task.await;
            }
        })
    };
    Ok(Running {
        addr,
        admin_addr,
        gateway: gw,
        live: Arc::downgrade(&live),
        stop,
        task,
    })
}

/// `GET /healthz` on the admin listener at `admin` (HTTP/1.1 over plain
/// TCP, 2 s in all): Ok when it answers 200.
pub fn health(admin: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = admin
        .parse()
        .map_err(|e| format!("{admin:?} is not an address and port: {e}"))?;
    let limit = Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, limit)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let io = |e: std::io::Error| format!("{addr}: {e}");
    stream.set_read_timeout(Some(limit)).map_err(io)?;
    stream.set_write_timeout(Some(limit)).map_err(io)?;
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    // The status line is all we need; read at most a little more.
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).map_err(io)?;
    let line = String::from_utf8_lossy(&head[..n]);
    match line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        Some(status) => Err(format!("{addr}/healthz answered {status}")),
        None => Err(format!("{addr}/healthz: no HTTP status line")),
    }
}

/// Adds this instance's counter growth to the shared totals (a failure is
/// logged by the region, and the growth is sent next time).
async fn flush_counters(gw: &Gateway, shared: &crate::redis::counters::SharedCounters) {
    let Some(edge) = &gw.edge else { return };
    if let Ok(tree) = edge.counters().await {
        let _ = shared.flush(&crate::redis::counters::flatten(&tree)).await;
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the gateway until a shutdown signal, then drains.
pub async fn run(cfg: Config) -> Result<(), StartError> {
    let origin = cfg.origin.server_urls().join(" ");
    let running = start(cfg).await?;
    tracing::info!(listen = %running.addr, %origin, "kvgate listening");
    if let Some(admin) = running.admin_addr {
        tracing::info!(listen = %admin, "admin API listening");
    }
    shutdown_signal().await;
    tracing::info!("shutting down; draining in-flight requests");
    running
        .gateway
        .ops
        .stopping
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = running.stop.send(true);
    let _ = running.task.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TlsError;
    use std::error::Error;

    fn config(listen: &str) -> Config {
        let mut cfg = Config::default();
        cfg.server.listen = toml::Spanned::new(0..0, listen.into());
        cfg
    }

    #[tokio::test]
    async fn a_missing_tls_file_is_named_and_its_io_error_kept() {
        let mut cfg = config("127.0.0.1:0");
        cfg.server.tls_cert = Some(PathBuf::from("/nonexistent/cert.pem"));
        cfg.server.tls_key = Some(PathBuf::from("/nonexistent/key.pem"));
        let Err(err) = start(cfg).await else {
            panic!("started without its certificate");
        };
        match &err {
            StartError::Tls(TlsError::Read { path, source }) => {
                assert_eq!(path, &PathBuf::from("/nonexistent/cert.pem"));
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("unexpected error: {other:?}"),
        }
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
        assert!(err.source().is_some(), "the io error is kept");
    }

    #[tokio::test]
    async fn a_taken_port_names_the_address() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = taken.local_addr().expect("addr");
        let Err(err) = start(config(&addr.to_string())).await else {
            panic!("bound a port already in use");
        };
        match &err {
            StartError::Bind { addr: a, source } => {
                assert_eq!(*a, addr);
                assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
            }
            other => panic!("unexpected error: {other:?}"),
        }
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    /// `check` on config text: the located refusal, if any.
    fn checked(src: &str) -> Result<(), CheckError> {
        let cfg = Config::parse(src, "k.toml").expect("parses");
        check(&cfg)
    }

    #[test]
    fn check_refuses_what_start_refuses_and_locates_it() {
        let e = checked("[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"0.0.0.0:9090\"\n")
            .unwrap_err();
        assert_eq!((e.key, e.line, e.column), ("admin.listen", 4, 1), "{e}");
        assert!(matches!(
            *e.source,
            StartError::Admin(crate::error::AdminError::NoToken(_))
        ));
        let e = checked(
            "[server]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n",
        )
        .unwrap_err();
        assert_eq!((e.key, e.line), ("server.tls_cert", 2), "{e}");
        assert!(matches!(*e.source, StartError::Tls(TlsError::Read { .. })));
        let e = checked("[state]\npath = \"/nonexistent/dir/state.redb\"\n[edge]\n").unwrap_err();
        assert_eq!((e.key, e.line), ("state.path", 2), "{e}");
        let cause = e.source.source().expect("the io error is kept");
        assert!(cause.to_string().contains("No such file"), "{cause}");
        // Without [edge] the state file is not used, so not checked.
        checked("[state]\npath = \"/nonexistent/dir/state.redb\"\n").expect("no edge");
        checked("[admin]\nlisten = \"0.0.0.0:9090\"\ntoken = \"s3cret\"\n").expect("token");
    }

    #[test]
    fn check_loads_the_tls_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, "not a key").expect("write");
        let src = format!("[server]\ntls_cert = {c:?}\ntls_key = {k:?}\n");
        let e = checked(&src).unwrap_err();
        assert_eq!((e.key, e.line), ("server.tls_key", 3), "{e}");
        std::fs::write(&k, key.serialize_pem()).expect("write");
        checked(&src).expect("a real pair checks");
    }

    #[test]
    fn a_bad_log_level_flag_is_refused() {
        let args = RunArgs {
            log_level: Some("inof".into()),
            ..Default::default()
        };
        let err = args.resolve().expect_err("refused");
        assert!(err.to_string().contains("inof"), "{err}");
    }

    #[test]
    fn the_redis_flag_selects_the_redis_backend_and_refuses_bad_urls() {
        let args = RunArgs {
            redis: Some("redis://127.0.0.1:6390".into()),
            ..Default::default()
        };
        let cfg = args.resolve().expect("accepted");
        assert_eq!(cfg.state.backend, crate::config::StateBackend::Redis);
        let (targets, _) = cfg.redis.expect("[redis] set").targets();
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].url, "redis://127.0.0.1:6390");

        let args = RunArgs {
            redis: Some("http://127.0.0.1:6390".into()),
            ..Default::default()
        };
        let err = args.resolve().expect_err("refused");
        assert!(matches!(err, ArgsError::Redis { .. }), "{err}");
        assert!(err.to_string().contains("redis://"), "{err}");
    }

    #[test]
    fn a_bad_listen_flag_keeps_the_parse_error() {
        let args = RunArgs {
            listen: Some("nope".into()),
            ..Default::default()
        };
        let err = args.resolve().expect_err("refused");
        assert_eq!(err.to_string(), "--listen");
        let cause = err.source().expect("the parse error is kept");
        assert!(cause.to_string().contains("\"nope\""), "{cause}");
    }
}
