//! Edge decisions on the request path: who the user is, which flags are on,
//! which experiment variants they are in and what they prefer, delivered to
//! the origin as request headers.
//!
//! Per request the proxy calls [`Edge::strip_injected`] on the client's
//! headers, then [`Edge::decide`], then [`EdgeDecision::apply`]; a newly
//! issued anonymous id comes back as `set_cookie` for the response.
//!
//! Headers the origin receives:
//! - `X-Feature-Flags`: an RFC 8941 dictionary of every configured flag, keys
//!   lowercased (see [`sfv`]), e.g. `newui=?0, betafeatures, theme="dark"`;
//! - `X-Experiment-<name>: <variant>` per experiment the user is in on this path;
//! - the preferences header (default `X-User-Preferences`): the effective
//!   preferences as compact JSON, non-ASCII escaped as `\uXXXX` (see [`prefs`]).
//!
//! State lives in the KV under the environment's namespace:
//! `flag:{flag}:user:{id}` (override, JSON value), `exp:{name}:user:{id}`
//! (sticky variant, with a TTL) and `prefs:user:{id}` (the user's own keys).

mod admin;
pub mod config;
mod counters;
mod identity;
pub mod prefs;
pub mod sfv;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::kv::{Kv, KvEntry, KvError, KvFuture, Namespaced, PutOptions};

pub use admin::EdgeAdminError;
pub use config::{
    EdgeConfig, EdgeConfigError, ExperimentConfig, FlagConfig, FlagValue, IdentityConfig,
    PreferencesConfig,
};
pub use counters::{Counters, CountersSnapshot, StripedCounter};
pub use identity::{
    is_valid_user_id, ANONYMOUS_COOKIE, ANONYMOUS_COOKIE_MAX_AGE_SECS, MAX_USER_ID_BYTES,
};

use config::{EXPERIMENT_HEADER_PREFIX, FEATURE_FLAGS_HEADER};

/// Buckets a user id hashes into, per experiment: weights resolve to 0.01%.
pub const BUCKETS: u64 = 10_000;

/// What the edge decided for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeDecision {
    pub user_id: String,
    /// The id is kvgate's anonymous `kvgate_uid` id rather than a configured one.
    pub anonymous: bool,
    /// `Set-Cookie` for the response when this request was issued a new id.
    pub set_cookie: Option<HeaderValue>,
    /// Request headers for the origin.
    pub inject: Vec<(HeaderName, HeaderValue)>,
}

impl EdgeDecision {
    /// Writes the injected headers into the request, replacing any value
    /// already there.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.inject {
            headers.insert(name.clone(), value.clone());
        }
    }
}

struct FlagRuntime {
    name: String,
    description: String,
    sf_key: String,
    default: FlagValue,
    evaluations: Arc<StripedCounter>,
}

struct VariantRuntime {
    name: String,
    weight: f64,
    /// Buckets below this (and at or above the previous variant's) pick it.
    cutoff: u64,
    header_value: HeaderValue,
    stored: Bytes,
    exposures: Arc<StripedCounter>,
}

struct ExperimentRuntime {
    name: String,
    description: String,
    header: HeaderName,
    /// `"{salt or name}:"`, hashed in front of the user id.
    hash_seed: String,
    salted: bool,
    traffic: f64,
    /// Users whose entry bucket is below this enter the experiment.
    traffic_cutoff: u64,
    path_prefix: Option<String>,
    variants: Vec<VariantRuntime>,
}

impl ExperimentRuntime {
    /// (entry bucket, variant bucket) for a user. Both come from one SHA-256
    /// of seed and id: bytes 0..8 pick the variant, bytes 8..16 decide entry,
    /// so the two are independent, and a traffic increase only adds users
    /// (everyone below the old cutoff is still below the new one).
    fn buckets(&self, user_id: &str) -> (u64, u64) {
        let mut hasher = Sha256::new();
        hasher.update(self.hash_seed.as_bytes());
        hasher.update(user_id.as_bytes());
        let digest = hasher.finalize();
        let word = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&digest[at..at + 8]);
            u64::from_be_bytes(bytes) % BUCKETS
        };
        (word(8), word(0))
    }

    fn pick(&self, variant_bucket: u64) -> &VariantRuntime {
        let index = self
            .variants
            .iter()
            .position(|v| variant_bucket < v.cutoff)
            .unwrap_or(self.variants.len() - 1);
        &self.variants[index]
    }

    fn variant(&self, name: &[u8]) -> Option<&VariantRuntime> {
        self.variants.iter().find(|v| v.name.as_bytes() == name)
    }

    /// Segment-wise prefix match: `/checkout` applies to `/checkout` and
    /// `/checkout/pay`, not to `/checkouts`.
    fn applies_to(&self, path: &str) -> bool {
        let Some(prefix) = &self.path_prefix else {
            return true;
        };
        match path.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
            None => false,
        }
    }
}

struct PrefsRuntime {
    header: HeaderName,
    defaults: prefs::Document,
    default_value: HeaderValue,
    max_bytes: usize,
}

/// Sticky writes run after the response path moves on; this counts them so
/// that shutdown (and tests) can wait for them with [`Edge::settle`].
#[derive(Default)]
struct Background {
    pending: AtomicUsize,
    idle: Notify,
}

struct PendingGuard(Arc<Background>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if self.0.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Logs a KV failure at most once a second, so an outage does not turn into
/// one log line per request.
#[derive(Default)]
struct WarnThrottle {
    last_second: AtomicU64,
}

impl WarnThrottle {
    fn allow(&self) -> bool {
        let now = crate::kv::now_ms() / 1000;
        let last = self.last_second.load(Ordering::Relaxed);
        now > last
            && self
                .last_second
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

const PREFS_LOCK_STRIPES: usize = 16;

/// The per-request decision maker, built once per config.
pub struct Edge {
    kv: Arc<Namespaced>,
    identity_header: HeaderName,
    identity_cookie: Option<String>,
    sticky_ttl: Duration,
    flags: Vec<FlagRuntime>,
    /// `X-Feature-Flags` for a user without overrides; `None` without flags.
    default_flags_value: Option<HeaderValue>,
    experiments: Vec<ExperimentRuntime>,
    prefs: PrefsRuntime,
    counters: Arc<Counters>,
    background: Arc<Background>,
    /// Serializes read-modify-write of one user's preferences in this process.
    prefs_locks: Vec<tokio::sync::Mutex<()>>,
    warn: WarnThrottle,
}

static FEATURE_FLAGS: HeaderName = HeaderName::from_static(FEATURE_FLAGS_HEADER);

fn config_error(field: impl Into<String>, message: impl std::fmt::Display) -> EdgeConfigError {
    EdgeConfigError {
        field: field.into(),
        message: message.to_string(),
    }
}

fn flag_key(flag: &str, user_id: &str) -> String {
    format!("flag:{flag}:user:{user_id}")
}

fn sticky_key(experiment: &str, user_id: &str) -> String {
    format!("exp:{experiment}:user:{user_id}")
}

fn prefs_key(user_id: &str) -> String {
    format!("prefs:user:{user_id}")
}

/// Results of the KV reads for one user, in flag and experiment order.
struct UserState {
    flags: Vec<Result<Option<KvEntry>, KvError>>,
    sticky: Vec<Result<Option<KvEntry>, KvError>>,
    prefs: Result<Option<KvEntry>, KvError>,
}

/// Polls every future concurrently (a Redis backend then pays one round trip,
/// not one per key) and returns their results in order.
async fn join_all<'a, T>(futures: Vec<KvFuture<'a, T>>) -> Vec<Result<T, KvError>> {
    let mut futures: Vec<Option<KvFuture<'a, T>>> = futures.into_iter().map(Some).collect();
    let mut results: Vec<Option<Result<T, KvError>>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, future) in futures.iter_mut().zip(results.iter_mut()) {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(result) => {
                        *future = Some(result);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(KvError::Backend("read was not completed".into()))))
        .collect()
}

fn unix_seconds() -> u64 {
    crate::kv::now_ms() / 1000
}

impl Edge {
    /// Validates `cfg` and prebuilds everything the request path needs.
    /// State is kept in `kv` under the namespace `cfg.environment`.
    pub fn new(cfg: &EdgeConfig, kv: Arc<dyn Kv>) -> Result<Edge, EdgeConfigError> {
        Self::with_counters(cfg, kv, Arc::new(Counters::new()))
    }

    /// Like [`Edge::new`], but counting into `counters`, so a config reload
    /// keeps the counts of the `Edge` it replaces.
    pub fn with_counters(
        cfg: &EdgeConfig,
        kv: Arc<dyn Kv>,
        counters: Arc<Counters>,
    ) -> Result<Edge, EdgeConfigError> {
        cfg.validate()?;
        let kv =
            Namespaced::new(kv, &cfg.environment).map_err(|e| config_error("environment", e))?;
        let header = |field: &str, name: &str| {
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| config_error(field, e))
        };

        let flags: Vec<FlagRuntime> = cfg
            .flags
            .iter()
            .map(|(name, flag)| FlagRuntime {
                name: name.clone(),
                description: flag.description.clone(),
                sf_key: sfv::dictionary_key(name),
                default: flag.default.clone(),
                evaluations: counters.flag_evaluations(name),
            })
            .collect();
        let default_flags_value = if flags.is_empty() {
            None
        } else {
            let mut dict = String::new();
            for flag in &flags {
                sfv::write_member(&mut dict, &flag.sf_key, &flag.default)
                    .map_err(|e| config_error(format!("flags.{}.default", flag.name), e))?;
            }
            Some(HeaderValue::from_str(&dict).map_err(|e| config_error("flags", e))?)
        };

        let mut experiments = Vec::with_capacity(cfg.experiments.len());
        for (name, exp) in &cfg.experiments {
            let field = format!("experiments.{name}");
            let total: f64 = exp.variants.values().sum();
            let mut cumulative = 0.0;
            let mut variants = Vec::with_capacity(exp.variants.len());
            for (variant, &weight) in &exp.variants {
                cumulative += weight;
                let cutoff = ((cumulative / total) * BUCKETS as f64).round() as u64;
                variants.push(VariantRuntime {
                    name: variant.clone(),
                    weight,
                    cutoff: cutoff.min(BUCKETS),
                    header_value: HeaderValue::from_str(variant)
                        .map_err(|e| config_error(format!("{field}.variants.{variant}"), e))?,
                    stored: Bytes::from(variant.clone()),
                    exposures: counters.exposures(name, variant),
                });
            }
            experiments.push(ExperimentRuntime {
                name: name.clone(),
                description: exp.description.clone(),
                header: header(&field, &format!("{EXPERIMENT_HEADER_PREFIX}{name}"))?,
                hash_seed: format!("{}:", exp.salt.as_deref().unwrap_or(name)),
                salted: exp.salt.is_some(),
                traffic: exp.traffic,
                traffic_cutoff: (exp.traffic * BUCKETS as f64).round() as u64,
                path_prefix: exp.path_prefix.clone(),
                variants,
            });
        }

        let prefs_cfg = &cfg.preferences;
        let prefs = PrefsRuntime {
            header: header("preferences.header", &prefs_cfg.header)?,
            defaults: prefs_cfg.defaults.clone(),
            default_value: HeaderValue::from_str(&prefs::header_json(&prefs_cfg.defaults))
                .map_err(|e| config_error("preferences.defaults", e))?,
            max_bytes: prefs_cfg.max_bytes,
        };

        Ok(Edge {
            kv: Arc::new(kv),
            identity_header: header("identity.header", &cfg.identity.header)?,
            identity_cookie: cfg.identity.cookie.clone(),
            sticky_ttl: Duration::from_secs(u64::from(cfg.sticky_ttl_days) * 86_400),
            flags,
            default_flags_value,
            experiments,
            prefs,
            counters,
            background: Arc::default(),
            prefs_locks: (0..PREFS_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            warn: WarnThrottle::default(),
        })
    }

    /// The counter registry; the proxy takes its per-route request counters
    /// from here (`counters().route(name)`, looked up once per route).
    pub fn counter_registry(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The header the preferences document is injected in.
    pub fn preferences_header(&self) -> &HeaderName {
        &self.prefs.header
    }

    /// Removes every header kvgate injects (`X-Feature-Flags`, every
    /// `X-Experiment-*`, configured or not, and the preferences header), so a
    /// client can never hand the origin its own flags or variants. A method
    /// rather than a free function because the preferences header is configurable.
    pub fn strip_injected(&self, headers: &mut HeaderMap) {
        headers.remove(&FEATURE_FLAGS);
        headers.remove(&self.prefs.header);
        let is_experiment = |name: &HeaderName| name.as_str().starts_with(EXPERIMENT_HEADER_PREFIX);
        if headers.keys().any(is_experiment) {
            let doomed: Vec<HeaderName> = headers
                .keys()
                .filter(|n| is_experiment(n))
                .cloned()
                .collect();
            for name in doomed {
                headers.remove(&name);
            }
        }
    }

    /// Decides identity, flags, experiment variants and preferences for one
    /// request. Never fails: when the KV fails, flags fall back to their
    /// defaults, experiments to the pure hash assignment and preferences to
    /// the defaults, and a warning is logged (at most once a second).
    ///
    /// `path` is the request path without the query.
    pub async fn decide(&self, headers: &HeaderMap, path: &str, tls: bool) -> EdgeDecision {
        let identity = identity::resolve(
            headers,
            &self.identity_header,
            self.identity_cookie.as_deref(),
        );
        let user = identity.user_id.as_str();

        let mut entered: Vec<(&ExperimentRuntime, u64)> =
            Vec::with_capacity(self.experiments.len());
        for exp in &self.experiments {
            if !exp.applies_to(path) {
                continue;
            }
            let (entry, variant_bucket) = exp.buckets(user);
            if entry < exp.traffic_cutoff {
                entered.push((exp, variant_bucket));
            }
        }

        // A freshly issued id cannot have state yet: skip the reads.
        let state = if identity.fresh {
            None
        } else {
            Some(
                self.read_user_state(user, entered.iter().map(|(e, _)| *e))
                    .await,
            )
        };
        let (flag_reads, sticky_reads, prefs_read) = match state {
            Some(s) => (Some(s.flags), Some(s.sticky), Some(s.prefs)),
            None => (None, None, None),
        };

        let mut inject = Vec::with_capacity(entered.len() + 2);
        for flag in &self.flags {
            flag.evaluations.incr();
        }
        if let Some(value) = self.flags_value(user, flag_reads) {
            inject.push((FEATURE_FLAGS.clone(), value));
        }

        let mut sticky_reads = sticky_reads.map(Vec::into_iter);
        for (exp, variant_bucket) in entered {
            let read = sticky_reads.as_mut().and_then(Iterator::next);
            let variant = self
                .assign(exp, variant_bucket, user, read, identity.fresh)
                .await;
            variant.exposures.incr();
            inject.push((exp.header.clone(), variant.header_value.clone()));
        }

        inject.push((
            self.prefs.header.clone(),
            self.prefs_value(user, prefs_read),
        ));

        let set_cookie = if identity.fresh {
            identity::anonymous_cookie(user, tls)
        } else {
            None
        };
        EdgeDecision {
            set_cookie,
            anonymous: identity.anonymous,
            user_id: identity.user_id,
            inject,
        }
    }

    /// Waits until every sticky assignment write started so far has finished.
    /// Call on shutdown; tests call it before inspecting the KV.
    pub async fn settle(&self) {
        loop {
            let idle = self.background.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.background.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    async fn read_user_state<'e>(
        &self,
        user: &str,
        experiments: impl Iterator<Item = &'e ExperimentRuntime>,
    ) -> UserState {
        let mut keys: Vec<String> = self.flags.iter().map(|f| flag_key(&f.name, user)).collect();
        let flag_count = keys.len();
        keys.extend(experiments.map(|e| sticky_key(&e.name, user)));
        keys.push(prefs_key(user));
        let reads = keys.iter().map(|k| self.kv.get(k)).collect();
        let mut results = join_all(reads).await;
        let prefs = results
            .pop()
            .unwrap_or_else(|| Err(KvError::Backend("missing preferences read".into())));
        let sticky = results.split_off(flag_count);
        UserState {
            flags: results,
            sticky,
            prefs,
        }
    }

    fn warn_kv(&self, what: &str, user: &str, err: &dyn std::fmt::Display) {
        if self.warn.allow() {
            tracing::warn!(user_id = user, error = %err, "edge state read for {what} failed; using the fallback");
        }
    }

    /// A stored override, if it is valid for the flag's current definition.
    fn parse_override(flag: &FlagRuntime, raw: &[u8]) -> Result<FlagValue, String> {
        let json: serde_json::Value = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
        let value = FlagValue::from_json(&json).ok_or("not a boolean, string or number")?;
        if value.kind() != flag.default.kind() {
            return Err(format!(
                "a {} override for a {} flag",
                value.kind(),
                flag.default.kind()
            ));
        }
        sfv::serialize_item(&value).map_err(|e| e.to_string())?;
        Ok(value)
    }

    /// The user's value of each flag, and whether it came from an override.
    fn flag_values<'f>(
        &'f self,
        user: &str,
        reads: Option<Vec<Result<Option<KvEntry>, KvError>>>,
    ) -> Vec<(&'f FlagRuntime, Option<FlagValue>)> {
        let mut reads = reads.map(Vec::into_iter);
        self.flags
            .iter()
            .map(|flag| {
                let overridden = match reads.as_mut().and_then(Iterator::next) {
                    Some(Ok(Some(entry))) => match Self::parse_override(flag, &entry.value) {
                        Ok(value) => Some(value),
                        Err(why) => {
                            self.warn_kv(&format!("flag {} override", flag.name), user, &why);
                            None
                        }
                    },
                    Some(Err(err)) => {
                        self.warn_kv("flag overrides", user, &err);
                        None
                    }
                    Some(Ok(None)) | None => None,
                };
                (flag, overridden)
            })
            .collect()
    }

    fn flags_value(
        &self,
        user: &str,
        reads: Option<Vec<Result<Option<KvEntry>, KvError>>>,
    ) -> Option<HeaderValue> {
        let default = self.default_flags_value.as_ref()?;
        if reads
            .as_ref()
            .is_none_or(|r| r.iter().all(|r| matches!(r, Ok(None))))
        {
            return Some(default.clone());
        }
        let values = self.flag_values(user, reads);
        if values.iter().all(|(_, v)| v.is_none()) {
            return Some(default.clone());
        }
        Some(
            HeaderValue::from_str(&Self::flags_dictionary(&values))
                .unwrap_or_else(|_| default.clone()),
        )
    }

    fn flags_dictionary(values: &[(&FlagRuntime, Option<FlagValue>)]) -> String {
        let mut dict = String::with_capacity(values.len() * 16);
        for (flag, overridden) in values {
            let value = overridden.as_ref().unwrap_or(&flag.default);
            // Every value was checked to serialize (config validation or
            // `parse_override`), so this cannot fail; skip the member if it did.
            let _ = sfv::write_member(&mut dict, &flag.sf_key, value);
        }
        dict
    }

    /// The variant for a user who entered `exp`: a stored assignment whose
    /// variant still exists wins; otherwise the hash picks and the pick is
    /// stored in the background. Not stored: a KV read failure (the store is
    /// down; the hash answer is the fallback) and a freshly issued anonymous
    /// id (a client that drops cookies would otherwise write one record per
    /// request; the id's first return stores the same, deterministic pick).
    async fn assign<'x>(
        &self,
        exp: &'x ExperimentRuntime,
        variant_bucket: u64,
        user: &str,
        read: Option<Result<Option<KvEntry>, KvError>>,
        fresh: bool,
    ) -> &'x VariantRuntime {
        let store = match read {
            Some(Ok(Some(entry))) => match exp.variant(&entry.value) {
                Some(variant) => return variant,
                None => true, // the stored variant was removed from the config
            },
            Some(Ok(None)) => !fresh,
            Some(Err(err)) => {
                self.warn_kv(&format!("experiment {} assignment", exp.name), user, &err);
                false
            }
            None => !fresh,
        };
        let variant = exp.pick(variant_bucket);
        if store {
            self.store_assignment(sticky_key(&exp.name, user), variant.stored.clone())
                .await;
        }
        variant
    }

    async fn store_assignment(&self, key: String, value: Bytes) {
        let kv = Arc::clone(&self.kv);
        // No metadata: every request of the user reads this entry back, and
        // the assignment time is already implied by the expiry (expiry - TTL).
        let opts = PutOptions::ttl(self.sticky_ttl);
        self.background.pending.fetch_add(1, Ordering::AcqRel);
        let guard = PendingGuard(Arc::clone(&self.background));
        let write = async move {
            let _guard = guard;
            if let Err(err) = kv.put(&key, value, opts).await {
                tracing::warn!(key, error = %err, "storing a sticky experiment assignment failed");
            }
        };
        // Off the request path when a runtime is there to run it.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(write);
            }
            Err(_) => write.await,
        }
    }

    /// The user's stored preference keys (empty when none or unreadable).
    fn stored_prefs(entry: &KvEntry) -> Result<prefs::Document, String> {
        match serde_json::from_slice(&entry.value) {
            Ok(serde_json::Value::Object(doc)) => Ok(doc),
            Ok(other) => Err(format!(
                "stored preferences are a {}",
                prefs::json_kind(&other)
            )),
            Err(err) => Err(err.to_string()),
        }
    }

    fn prefs_value(
        &self,
        user: &str,
        read: Option<Result<Option<KvEntry>, KvError>>,
    ) -> HeaderValue {
        match read {
            Some(Ok(Some(entry))) => match Self::stored_prefs(&entry) {
                Ok(doc) => {
                    let json = prefs::header_json(&prefs::effective(&self.prefs.defaults, &doc));
                    HeaderValue::from_str(&json)
                        .unwrap_or_else(|_| self.prefs.default_value.clone())
                }
                Err(why) => {
                    self.warn_kv("preferences", user, &why);
                    self.prefs.default_value.clone()
                }
            },
            Some(Err(err)) => {
                self.warn_kv("preferences", user, &err);
                self.prefs.default_value.clone()
            }
            Some(Ok(None)) | None => self.prefs.default_value.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
