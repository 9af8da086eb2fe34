//! Definitions (flags, segments, experiments) in the state store, where the
//! admin API changes them and every instance reads them.
//!
//! KV layout (in the environment's namespace): `defs:doc` holds the whole
//! definitions document as JSON, `defs:version` a token rewritten after
//! every change, `audit:{unix ms, 13 digits}:{random}` one audit record per
//! change. Each instance polls `defs:version` (one GET) every
//! [`POLL_INTERVAL`] and reloads the document when it moved, so a change
//! reaches every instance sharing the store within a second without a
//! per-request read; with Redis, the cluster broadcast of the write wakes
//! the poll at once. While the store has no document the TOML's definitions
//! are current; the first change stores them (with the change), and from
//! then on the store is the truth.

use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;

use super::counters::Counters;
use super::definitions::Compiled;
use super::exposures::OutcomeCounters;
use crate::config::edge::{Definitions, EdgeConfigError, WeightRule};
use crate::kv::{Kv, KvError, Namespaced, PutOptions};

pub(crate) const DOC_KEY: &str = "defs:doc";
pub(crate) const VERSION_KEY: &str = "defs:version";
pub(crate) const AUDIT_PREFIX: &str = "audit:";
/// How often each instance checks `defs:version`.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The live definitions and what compiling them needs.
pub(crate) struct DefsStore {
    pub(crate) kv: Arc<Namespaced>,
    pub(crate) current: ArcSwap<Compiled>,
    /// The `defs:version` the current definitions came from.
    version: std::sync::Mutex<Option<Bytes>>,
    pub(crate) json_max: usize,
    pub(crate) counters: Arc<Counters>,
    pub(crate) outcomes: Arc<OutcomeCounters>,
    /// Serializes this instance's changes (read, modify, write).
    pub(crate) changes: tokio::sync::Mutex<()>,
    loaded: tokio::sync::OnceCell<()>,
}

/// Why definitions could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("the stored definitions are invalid: {0}")]
    Invalid(#[from] EdgeConfigError),
    #[error("the stored definitions are not JSON: {0}")]
    Corrupt(#[from] serde_json::Error),
}

fn new_token() -> Bytes {
    let mut raw = [0u8; 8];
    if getrandom::getrandom(&mut raw).is_err() {
        raw = crate::kv::now_ms().to_be_bytes();
    }
    Bytes::from(format!("{:016x}", u64::from_be_bytes(raw)))
}

impl DefsStore {
    pub(crate) fn new(
        kv: Arc<Namespaced>,
        seed: Compiled,
        json_max: usize,
        counters: Arc<Counters>,
        outcomes: Arc<OutcomeCounters>,
    ) -> DefsStore {
        DefsStore {
            kv,
            current: ArcSwap::from_pointee(seed),
            version: std::sync::Mutex::new(None),
            json_max,
            counters,
            outcomes,
            changes: tokio::sync::Mutex::new(()),
            loaded: tokio::sync::OnceCell::new(),
        }
    }

    pub(crate) fn compile(&self, doc: Definitions) -> Result<Compiled, EdgeConfigError> {
        Compiled::new(
            doc,
            WeightRule::Percent,
            self.json_max,
            &self.counters,
            &self.outcomes,
        )
    }

    /// The stored document, `None` when the store has none yet.
    pub(crate) async fn read_doc(&self) -> Result<Option<Definitions>, StoreError> {
        match self.kv.get(DOC_KEY).await? {
            None => Ok(None),
            Some(entry) => Ok(Some(serde_json::from_slice(&entry.value)?)),
        }
    }

    /// Writes `doc` and a new version token, and makes it current here.
    pub(crate) async fn write_doc(&self, compiled: Compiled) -> Result<(), StoreError> {
        let json = serde_json::to_vec(&compiled.doc)?;
        self.kv
            .put(DOC_KEY, Bytes::from(json), PutOptions::default())
            .await?;
        let token = new_token();
        self.kv
            .put(VERSION_KEY, token.clone(), PutOptions::default())
            .await?;
        *self.version.lock().unwrap_or_else(|p| p.into_inner()) = Some(token);
        self.current.store(Arc::new(compiled));
        Ok(())
    }

    /// Once, before the first request is decided: the stored definitions
    /// become current (the config file's stay current while the store has
    /// none; the first change through the admin API stores them with the
    /// change). Then a poller keeps them in step with the store. A failed
    /// read leaves the config file's current; the poller retries.
    pub(crate) async fn ensure_loaded(self: &Arc<DefsStore>) {
        self.loaded
            .get_or_init(|| async {
                match self.load().await {
                    Ok(true) => tracing::info!(
                        "edge flags, segments and experiments come from the state store; the \
                         config file's only seed an empty store (change them through the admin API)"
                    ),
                    Ok(false) => tracing::info!(
                        "edge state store has no definitions yet: using the config file's; the \
                         first change through the admin API stores them, and from then on the \
                         state store is the truth"
                    ),
                    Err(err) => tracing::warn!(error = %err, "edge definitions could not be read from the state store; using the config file's until they can"),
                }
                Self::spawn_poller(self);
            })
            .await;
    }

    /// Makes the stored definitions current; false when there are none.
    async fn load(&self) -> Result<bool, StoreError> {
        let _serialized = self.changes.lock().await;
        let version = self.kv.get(VERSION_KEY).await?.map(|e| e.value);
        let Some(doc) = self.read_doc().await? else {
            return Ok(false);
        };
        let compiled = self.compile(doc)?;
        self.current.store(Arc::new(compiled));
        *self.version.lock().unwrap_or_else(|p| p.into_inner()) = version;
        Ok(true)
    }

    /// Reloads when `defs:version` moved since the last load or change.
    pub(crate) async fn poll(&self) -> Result<bool, StoreError> {
        let version = self.kv.get(VERSION_KEY).await?.map(|e| e.value);
        let unchanged = *self.version.lock().unwrap_or_else(|p| p.into_inner()) == version;
        if unchanged || version.is_none() {
            return Ok(false);
        }
        let _serialized = self.changes.lock().await;
        if let Some(doc) = self.read_doc().await? {
            let compiled = self.compile(doc)?;
            self.current.store(Arc::new(compiled));
        }
        *self.version.lock().unwrap_or_else(|p| p.into_inner()) = version;
        Ok(true)
    }

    /// Polls every [`POLL_INTERVAL`] until the store is dropped (the `Edge`
    /// replaced by a reload or the gateway stopped); holds it only while
    /// polling.
    fn spawn_poller(store: &Arc<DefsStore>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "no async runtime: edge definitions are not kept in step with the state store"
            );
            return;
        };
        let weak: Weak<DefsStore> = Arc::downgrade(store);
        // With a shared store, a change another instance made wakes the
        // poller at once (the cluster broadcast), so it does not wait for
        // its tick; the tick stays for when the broadcast is down.
        let mut changes = store.kv.changes();
        runtime.spawn(async move {
            let mut warned = false;
            loop {
                let tick = tokio::time::sleep(POLL_INTERVAL);
                match changes.as_mut() {
                    Some(rx) => {
                        tokio::select! {
                            () = tick => {}
                            changed = rx.changed() => if changed.is_err() { changes = None },
                        }
                    }
                    None => tick.await,
                }
                let Some(store) = weak.upgrade() else { return };
                match store.poll().await {
                    Ok(_) => warned = false,
                    Err(err) if !warned => {
                        tracing::warn!(error = %err, "edge definitions could not be reloaded from the state store; keeping the current ones");
                        warned = true;
                    }
                    Err(_) => {}
                }
            }
        });
    }
}
