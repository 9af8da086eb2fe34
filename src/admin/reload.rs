//! Reloads: on SIGHUP and `POST /reload`, the config file is read again
//! (with the same command-line flags on top), checked as at start, and the
//! whole gateway generation is swapped in at once: routes, cache rules,
//! tags, origin settings, edge flags and experiments, log level and
//! format, the TLS certificate. Requests in flight finish on the
//! generation they started with; the store, single flights, metrics,
//! versions and the state store are shared, so the cache survives. A
//! config that fails any check is refused whole and the running one stays.

use crate::config::Config;
use crate::error::{ArgsError, GatewayError, TlsError};
use crate::metrics::ops::Ops;
use crate::proxy::gateway::{Gateway, Live};
use crate::proxy::server::{certified_key, CertResolver};
use std::sync::Arc;

/// Why a reload was refused (the running config stays).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    /// The file is unreadable or invalid, or a flag no longer applies.
    #[error("config")]
    Config(#[from] ArgsError),
    /// The TLS files named by the new config do not load.
    #[error("{file}:{line}:{column}: {key}")]
    Tls {
        file: String,
        line: usize,
        column: usize,
        key: &'static str,
        #[source]
        source: TlsError,
    },
    /// The new generation could not be built (origin, edge, tags, state).
    #[error("config")]
    Gateway(#[from] GatewayError),
}

impl ReloadError {
    /// The message and its causes on one line.
    pub(crate) fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }
}

/// What a reload applied.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Applied {
    /// The namespace version, when the reload changed `cache.version`.
    pub version: Option<u64>,
    /// Settings that changed in the file but take effect only on restart.
    pub needs_restart: Vec<&'static str>,
    /// With Redis, when the version moved: the regions that took the
    /// version event to the other instances.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broadcast: Option<crate::cluster::Published>,
}

/// Swaps reloaded generations into the live gateway, one reload at a time.
pub(crate) struct Reloader {
    live: Arc<Live>,
    tls: Option<Arc<CertResolver>>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub(crate) fn new(live: Arc<Live>, tls: Option<Arc<CertResolver>>) -> Arc<Reloader> {
        Arc::new(Reloader {
            live,
            tls,
            one_at_a_time: tokio::sync::Mutex::new(()),
        })
    }

    /// Re-reads, checks and swaps in the config; logs the outcome and
    /// counts it in the metrics.
    pub(crate) async fn reload(&self) -> Result<Applied, ReloadError> {
        let _one = self.one_at_a_time.lock().await;
        let current = self.live.load_full();
        let mut result = self.apply(&current);
        if let (Ok(applied), Some(cluster)) = (&mut result, &current.cluster) {
            // The other instances follow the raised version as they follow
            // an admin bump (past their own, so nothing older stays).
            if let Some(version) = applied.version {
                let event = crate::cluster::Event::Version { version };
                applied.broadcast = Some(cluster.publish(&event).await);
            }
        }
        match &result {
            Ok(applied) => {
                Ops::count(&current.ops.reloads_ok);
                tracing::info!(
                    version = ?applied.version,
                    needs_restart = ?applied.needs_restart,
                    "config reloaded"
                );
            }
            Err(e) => {
                Ops::count(&current.ops.reloads_failed);
                tracing::error!(error = %e.chain(), "config reload refused; the running config stays");
            }
        }
        result
    }

    fn apply(&self, current: &Arc<Gateway>) -> Result<Applied, ReloadError> {
        let next = current.config.reread()?;
        // Everything that can fail is done before anything is swapped.
        let cert = match (&self.tls, &next.server.tls_cert, &next.server.tls_key) {
            (Some(_), Some(c), Some(k)) => Some(certified_key(c, k).map_err(|source| {
                let key = match &source {
                    TlsError::Read { path, .. } if path == k => "server.tls_key",
                    TlsError::NoKey(_) => "server.tls_key",
                    _ => "server.tls_cert",
                };
                let (file, line, column) = next.position(key);
                ReloadError::Tls {
                    file,
                    line,
                    column,
                    key,
                    source,
                }
            })?),
            _ => None,
        };
        let needs_restart = needs_restart(&current.config, &next);
        let version = version_change(current, &next);
        let log = next.log.clone();
        let gw = current.reloaded(next)?;
        self.live.store(gw);
        // The first generation lives as long as the process (see
        // `cli::Running`): its origins' health checks are stopped here,
        // not by a drop. Requests still on it finish with its pools.
        current.retire_origins();
        if let (Some(resolver), Some(cert)) = (&self.tls, cert) {
            resolver.set(cert);
        }
        crate::logging::reconfigure(&log);
        let version = version.map(|wanted| {
            if wanted > current.version() {
                current.raise_version_to(wanted)
            } else {
                // Going back would make old entries reachable again.
                current.bump_version()
            }
        });
        // The replaced edge commits what it has queued; requests still
        // running on it may queue more, which its own flushes commit.
        if current.edge.is_some() {
            let old = current.clone();
            tokio::spawn(async move {
                if let Some(edge) = &old.edge {
                    edge.settle().await;
                }
            });
        }
        Ok(Applied {
            version,
            needs_restart,
            broadcast: None,
        })
    }
}

/// The new `cache.version`, when the file changed it.
fn version_change(current: &Gateway, next: &Config) -> Option<u64> {
    (next.cache.version != current.config.cache.version).then_some(next.cache.version)
}

/// Settings read once at start (listeners, limits of the accept loop, the
/// store's sizing, the state backend) that differ in `next`.
fn needs_restart(old: &Config, next: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.server, &next.server);
    let mut changed = Vec::new();
    let mut check = |key, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    check("server.listen", o.listen.get_ref() != n.listen.get_ref());
    check(
        "server.tls_cert / server.tls_key (TLS on or off)",
        o.tls_cert.is_some() != n.tls_cert.is_some(),
    );
    check(
        "server.max_connections",
        o.max_connections != n.max_connections,
    );
    check(
        "server.header_read_timeout_ms",
        o.header_read_timeout_ms != n.header_read_timeout_ms,
    );
    check(
        "server.idle_timeout_ms",
        o.idle_timeout_ms != n.idle_timeout_ms,
    );
    check(
        "server.max_header_bytes",
        o.max_header_bytes != n.max_header_bytes,
    );
    check(
        "server.shutdown_grace_ms",
        o.shutdown_grace_ms != n.shutdown_grace_ms,
    );
    let (oc, nc) = (&old.cache, &next.cache);
    check("cache.max_bytes", oc.max_bytes != nc.max_bytes);
    check(
        "cache.max_object_bytes",
        oc.max_object_bytes != nc.max_object_bytes,
    );
    check("cache.shards", oc.shards != nc.shards);
    check(
        "cache.hit_for_miss_secs",
        oc.hit_for_miss_secs != nc.hit_for_miss_secs,
    );
    check(
        "admin",
        old.admin
            .as_ref()
            .map(|a| (a.listen.get_ref(), &a.token, a.max_body_bytes))
            != next
                .admin
                .as_ref()
                .map(|a| (a.listen.get_ref(), &a.token, a.max_body_bytes)),
    );
    check(
        "state",
        old.state.backend != next.state.backend || old.state.path != next.state.path,
    );
    changed
}

/// Reloads on every SIGHUP until `stopping` turns true.
#[cfg(unix)]
pub(crate) fn spawn_on_sighup(
    reloader: Arc<Reloader>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        let stop = async move {
            let _ = stopping.wait_for(|s| *s).await;
        };
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                got = hup.recv() => if got.is_none() { break },
            }
            // The outcome is logged and counted by `reload`.
            let _ = reloader.reload().await;
        }
    }))
}

/// Signals are a unix feature; elsewhere `POST /reload` remains.
#[cfg(not(unix))]
pub(crate) fn spawn_on_sighup(
    _reloader: Arc<Reloader>,
    _stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    Ok(tokio::spawn(async {}))
}
