//! SIGHUP: re-read the config file and apply what can change at run time.
//!
//! Only `cache.version` is applied for now (everything else needs a
//! restart, and the log says so). A changed version raises the global
//! version to the new value, or bumps it by one when the new value is not
//! higher: going back would make old entries reachable again.

use crate::config::Config;
use crate::proxy::gateway::Gateway;
use std::path::Path;
use std::sync::Arc;

/// Applies a reloaded config's cache version; returns the version now in
/// effect when it changed. `last` is the version the previous config file said.
pub(crate) fn apply(gw: &Gateway, last: u64, next: &Config) -> Option<u64> {
    let wanted = next.cache.version;
    if wanted == last {
        return None;
    }
    let current = gw.version();
    Some(if wanted > current {
        gw.raise_version_to(wanted)
    } else {
        gw.bump_version()
    })
}

/// Re-reads `path` on every SIGHUP until `stopping` turns true.
#[cfg(unix)]
pub(crate) fn spawn_on_sighup(
    gw: Arc<Gateway>,
    path: &Path,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let path = path.to_path_buf();
    let mut last = gw.config.cache.version;
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
            match Config::load(&path) {
                Err(e) => {
                    tracing::error!(error = %e, "config reload failed; keeping the running config")
                }
                Ok(next) => {
                    match apply(&gw, last, &next) {
                        Some(v) => tracing::info!(version = v, "config reloaded: cache version changed"),
                        None => tracing::info!("config reloaded: cache version unchanged (other changes need a restart)"),
                    }
                    last = next.cache.version;
                }
            }
        }
    }))
}

/// Signals are a unix feature; elsewhere reloads need a restart.
#[cfg(not(unix))]
pub fn spawn_on_sighup(
    _gw: Arc<Gateway>,
    _path: &Path,
    _stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    Ok(tokio::spawn(async {}))
}
