//! Edge decisions on the request path: who the user is, which flags are on,
//! which experiment variants they are in and what they prefer, delivered to
//! the origin as request headers.
//!
//! Per request the proxy calls [`Edge::strip_injected`] on the client's
//! headers, then [`Edge::decide`] (with the peer's address: only peers in
//! `identity.trusted_from` may name a user), then [`EdgeDecision::apply`]; a
//! newly issued anonymous id comes back as `set_cookie` for the response.
//! On shutdown the gateway calls [`Edge::settle`] so queued writes commit.
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
//! (sticky variant, `sticky_ttl_days`), `prefs:user:{id}` (the user's own
//! keys, `preferences.ttl_days` after the last change or daily renewal) and
//! `secret:anonymous-id` (the generated signing key, when none is configured).
//! Anonymous users' ids are `anon:<id>` (see [`identity`]).

mod changes;
mod counters;
mod definitions;
mod exposures;
mod identity;
mod operations;
pub(crate) mod prefs;
mod rollout;
pub(crate) mod stats;
mod store;
mod targeting;
mod writes;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use crate::kv::{Kv, KvEntry, KvError, Namespaced, PutOptions};

pub use crate::config::edge::{EdgeConfig, EdgeConfigError};
pub(crate) use config::FlagValue;
pub(crate) use counters::{Counters, CountersSnapshot};
pub(crate) use identity::{is_valid_user_id, Cidr, MAX_USER_ID_BYTES, MIN_SECRET_BYTES};
pub use operations::EdgeAdminError;

use definitions::{Compiled, ExperimentRuntime, FlagRuntime};
use exposures::{DailyDedup, EventLog, Outcome, OutcomeCounters};
use identity::Signer;
use store::DefsStore;
use targeting::RequestAttributes;
use writes::{Write, WriteQueue};

/// Environment variable with the anonymous-id signing secret; wins over
/// `edge.identity.secret`.
pub(crate) const SECRET_ENV: &str = "KVGATE_EDGE_SECRET";
/// KV key (in the environment's namespace) of the generated signing secret.
const SECRET_KEY: &str = "secret:anonymous-id";
/// Bytes of a generated signing secret.
const GENERATED_SECRET_BYTES: usize = 32;

use crate::config::edge::{EXPERIMENT_HEADER_PREFIX, FEATURE_FLAGS_HEADER};
use crate::config::{edge as config, sfv};

pub(crate) use changes::{Change, DefKind};

/// What the edge decided for one request.
#[derive(Debug, Clone)]
pub struct EdgeDecision {
    /// The user's id: `anon:<id>` for anonymous users.
    pub(crate) user_id: String,
    /// The id is kvgate's anonymous `kvgate_uid` id rather than a configured one.
    #[cfg_attr(not(test), allow(dead_code))] // the tests check it
    pub(crate) anonymous: bool,
    /// `Set-Cookie` for the response when this request was issued a new id.
    pub(crate) set_cookie: Option<HeaderValue>,
    /// Request headers for the origin.
    pub(crate) inject: Vec<(HeaderName, HeaderValue)>,
    /// The [`Compiled::generation`] of the definitions decided with, when
    /// [`Edge::observe`] has something to record, and (experiment, variant)
    /// indexes into them for each variant injected.
    observed: Option<u64>,
    assigned: Vec<(usize, usize)>,
}

impl EdgeDecision {
    /// Whether [`Edge::observe`] has anything to record for this request
    /// (there are experiments and the id was not issued by this request),
    /// so the proxy keeps the request's method and path for it only then.
    pub(crate) fn observes(&self) -> bool {
        self.observed.is_some()
    }

    /// Writes the injected headers into the request, replacing any value
    /// already there.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        // One resize for all of them: a request with few headers would
        // otherwise grow the map (and rehash it) twice or three times.
        // Past the map's limit the inserts fail as they would have anyway.
        let _ = headers.try_reserve(self.inject.len());
        for (name, value) in &self.inject {
            headers.insert(name.clone(), value.clone());
        }
    }
}

struct PrefsRuntime {
    header: HeaderName,
    defaults: prefs::Document,
    default_value: HeaderValue,
    max_bytes: usize,
}

/// The key anonymous ids are signed with.
struct Keys {
    /// From `KVGATE_EDGE_SECRET` or the config.
    configured: Option<Signer>,
    /// Loaded from (or generated into) the KV on first use.
    stored: tokio::sync::OnceCell<Signer>,
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

/// The per-request decision maker, built once per config.
pub struct Edge {
    kv: Arc<Namespaced>,
    /// The store under `kv`, and `kv`'s namespace prefix (`{environment}:`):
    /// a request's reads build the full keys themselves, in one buffer,
    /// rather than through `kv` (a key, a prefixed copy and a boxed future
    /// more per read).
    user_reads: Arc<dyn Kv>,
    key_prefix: String,
    identity_header: HeaderName,
    identity_cookie: Option<String>,
    /// Peers whose identity header and cookie are believed.
    trusted: Vec<Cidr>,
    keys: Keys,
    cookie_secure: bool,
    sticky_ttl: Duration,
    prefs_ttl: Duration,
    /// Flags, segments and experiments, live from the state store.
    defs: Arc<DefsStore>,
    /// The CDN's country header, believed from trusted peers only.
    country_header: Option<HeaderName>,
    /// Names the anonymous id an authenticated user had (trusted peers only).
    alias_header: Option<HeaderName>,
    dedup: DailyDedup,
    events: EventLog,
    /// Unique exposures and conversions, in total and per UTC day.
    outcomes: Arc<OutcomeCounters>,
    prefs: PrefsRuntime,
    counters: Arc<Counters>,
    /// Sticky assignments and preference renewals on their way to the KV.
    writes: Arc<WriteQueue>,
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

/// `exposed:{experiment key}:{variant}:{user}`: the user was exposed (2xx).
fn exposed_key(exp: &ExperimentRuntime, variant: &str, user_id: &str) -> String {
    format!("exposed:{}:{variant}:{user_id}", exp.key_name)
}

/// `converted:{experiment key}:{user}`: the user reached a goal.
fn converted_key(exp: &ExperimentRuntime, user_id: &str) -> String {
    format!("converted:{}:{user_id}", exp.key_name)
}

/// `prefs:user:`: [`prefs_key`] without the user.
const PREFS_KEY_PREFIX: &str = "prefs:user:";

fn prefs_key(user_id: &str) -> String {
    format!("{PREFS_KEY_PREFIX}{user_id}")
}

type Read = Result<Option<KvEntry>, KvError>;

/// Results of the KV reads for one user, in one `Vec`: the flag overrides
/// (flag order), the sticky assignments of the experiments entered, the
/// aliased anonymous id's (when there is an alias), the preferences.
struct UserState {
    reads: Vec<Read>,
    flags: usize,
    entered: usize,
    alias: bool,
}

impl UserState {
    fn flags(&self) -> &[Read] {
        &self.reads[..self.flags.min(self.reads.len())]
    }

    fn sticky(&self, i: usize) -> Option<&Read> {
        (i < self.entered).then(|| self.reads.get(self.flags + i))?
    }

    fn alias_sticky(&self, i: usize) -> Option<&Read> {
        (self.alias && i < self.entered).then(|| self.reads.get(self.flags + self.entered + i))?
    }

    fn prefs(&self) -> Option<&Read> {
        self.reads.last()
    }
}

fn unix_seconds() -> u64 {
    crate::kv::now_ms() / 1000
}

fn days(n: u32) -> Duration {
    Duration::from_secs(u64::from(n) * 86_400)
}

/// A signing key from its stored text (hex), if well-formed.
fn parse_stored_secret(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() != GENERATED_SECRET_BYTES * 2 {
        return None;
    }
    raw.chunks(2)
        .map(|pair| {
            let hex = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(hex, 16).ok()
        })
        .collect()
}

/// The stored signing key, or a newly generated one stored for next time.
async fn load_or_create_secret(kv: &Namespaced) -> Result<Signer, KvError> {
    if let Some(entry) = kv.get(SECRET_KEY).await? {
        match parse_stored_secret(&entry.value) {
            Some(secret) => return Ok(Signer::new(&secret)),
            // Overwriting loses nothing: no id signed with it can be checked.
            None => {
                tracing::warn!("the stored anonymous-id secret is malformed; generating a new one")
            }
        }
    }
    let mut secret = [0u8; GENERATED_SECRET_BYTES];
    getrandom::getrandom(&mut secret)
        .map_err(|e| KvError::Backend(format!("no randomness for a secret: {e}")))?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    // Create-if-absent: of several instances starting at once on one shared
    // store, one secret wins and every instance signs with it.
    if kv
        .put_if_absent(SECRET_KEY, Bytes::from(hex.clone()), PutOptions::default())
        .await?
    {
        return Ok(Signer::new(&secret));
    }
    match kv
        .get(SECRET_KEY)
        .await?
        .map(|e| parse_stored_secret(&e.value))
    {
        Some(Some(winner)) => Ok(Signer::new(&winner)),
        // Still malformed (or gone): overwrite, as before.
        _ => {
            kv.put(SECRET_KEY, Bytes::from(hex), PutOptions::default())
                .await?;
            Ok(Signer::new(&secret))
        }
    }
}

impl Edge {
    /// Validates `cfg` and prebuilds everything the request path needs.
    /// State is kept in `kv` under the namespace `cfg.environment`.
    pub fn new(cfg: &EdgeConfig, kv: Arc<dyn Kv>) -> Result<Edge, EdgeConfigError> {
        Self::with_counters(cfg, kv, Arc::new(Counters::new()))
    }

    /// Like [`Edge::new`], but counting into `counters`, so a config reload
    /// keeps the counts of the `Edge` it replaces.
    pub(crate) fn with_counters(
        cfg: &EdgeConfig,
        kv: Arc<dyn Kv>,
        counters: Arc<Counters>,
    ) -> Result<Edge, EdgeConfigError> {
        cfg.validate()?;
        let kv_store = Arc::clone(&kv);
        let kv =
            Namespaced::new(kv, &cfg.environment).map_err(|e| config_error("environment", e))?;
        let key_prefix = kv.prefix().to_owned();
        let header = |field: &str, name: &str| {
            crate::protocol::interned::name(name).map_err(|e| config_error(field, e))
        };

        let outcomes = Arc::new(OutcomeCounters::default());
        let seed = Compiled::new(
            cfg.definitions().with_percent_weights(),
            config::WeightRule::Percent,
            cfg.flag_json_max_bytes,
            &counters,
            &outcomes,
        )?;
        let optional_header = |field: &str, name: &Option<String>| {
            name.as_deref().map(|n| header(field, n)).transpose()
        };
        let country_header =
            optional_header("targeting.country_header", &cfg.targeting.country_header)?;
        let alias_header = optional_header("identity.alias_header", &cfg.identity.alias_header)?;

        let prefs_cfg = &cfg.preferences;
        let prefs = PrefsRuntime {
            header: header("preferences.header", &prefs_cfg.header)?,
            defaults: prefs_cfg.defaults.clone(),
            default_value: crate::protocol::interned::value(&prefs::header_json(
                &prefs_cfg.defaults,
            ))
            .map_err(|e| config_error("preferences.defaults", e))?,
            max_bytes: prefs_cfg.max_bytes,
        };

        // The environment wins over the file, so the file need not hold the
        // secret. An empty variable counts as unset.
        let secret = std::env::var(SECRET_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| cfg.identity.secret.clone());
        let configured = match secret {
            Some(s) if s.len() < MIN_SECRET_BYTES => {
                return Err(config_error(
                    "identity.secret",
                    format!("{SECRET_ENV} or edge.identity.secret must be at least {MIN_SECRET_BYTES} bytes"),
                ))
            }
            Some(s) => Some(Signer::new(s.as_bytes())),
            None => None,
        };

        let kv = Arc::new(kv);
        let defs = Arc::new(DefsStore::new(
            Arc::clone(&kv),
            seed,
            cfg.flag_json_max_bytes,
            Arc::clone(&counters),
            Arc::clone(&outcomes),
        ));
        let prefs_ttl = days(cfg.preferences.ttl_days);
        let writes = Arc::new(WriteQueue::new(
            Arc::clone(&kv),
            cfg.write_queue_capacity,
            Duration::from_millis(cfg.write_flush_ms),
            counters.dropped_writes(),
            counters.state_write_errors(),
        ));
        Ok(Edge {
            user_reads: kv_store,
            key_prefix,
            kv,
            identity_header: header("identity.header", &cfg.identity.header)?,
            identity_cookie: cfg.identity.cookie.clone(),
            trusted: cfg.identity.trusted_networks()?,
            keys: Keys {
                configured,
                stored: tokio::sync::OnceCell::new(),
            },
            cookie_secure: cfg.identity.cookie_secure,
            sticky_ttl: days(cfg.sticky_ttl_days),
            prefs_ttl,
            defs,
            country_header,
            alias_header,
            dedup: DailyDedup::new(cfg.exposures.dedup_capacity),
            events: EventLog::new(&cfg.exposures),
            outcomes,
            prefs,
            counters,
            writes,
            warn: WarnThrottle::default(),
        })
    }

    /// Unique exposures and conversions per (outcome, experiment, variant),
    /// and exposure events dropped at a full queue.
    pub(crate) fn outcome_counts(&self) -> (Vec<(&'static str, String, String, u64)>, u64) {
        let counts = self
            .outcomes
            .snapshot()
            .into_iter()
            .map(|(o, e, v, n)| {
                let kind = match o {
                    Outcome::Exposure => "exposure",
                    Outcome::Conversion => "conversion",
                };
                (kind, e, v, n)
            })
            .collect();
        (counts, self.events.dropped.load(Ordering::Relaxed))
    }

    /// Whether requests from `peer` may name their user (header or cookie).
    pub(crate) fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(peer))
    }

    /// State writes dropped because the write queue was full (also in the
    /// counter snapshot as `dropped_writes`).
    #[cfg(test)]
    pub(crate) fn dropped_writes(&self) -> u64 {
        self.writes.dropped()
    }

    /// State writes queued or being committed right now; 0 once
    /// [`Edge::settle`] returns (until the next request queues one).
    pub fn pending_writes(&self) -> usize {
        self.writes.pending()
    }

    /// The key anonymous ids are signed with. Without a configured one it is
    /// read from the KV (generated and stored the first time); while the KV
    /// fails, the error: no id can be checked or issued with a lasting key,
    /// and the next request tries again.
    async fn signer(&self) -> Result<&Signer, KvError> {
        if let Some(signer) = &self.keys.configured {
            return Ok(signer);
        }
        self.keys
            .stored
            .get_or_try_init(|| load_or_create_secret(&self.kv))
            .await
    }

    /// The counter registry; the proxy takes its per-route request counters
    /// from here (`counters().route(name)`, looked up once per route).
    pub(crate) fn counter_registry(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The header the preferences document is injected in.
    #[cfg(test)]
    pub(crate) fn preferences_header(&self) -> &HeaderName {
        &self.prefs.header
    }

    /// Removes every header kvgate injects (`X-Feature-Flags`, every
    /// `X-Experiment-*`, configured or not, and the preferences header), so a
    /// client can never hand the origin its own flags or variants. A method
    /// rather than a free function because the preferences header is configurable.
    pub(crate) fn strip_injected(&self, headers: &mut HeaderMap) {
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
    /// rules and defaults, experiments to the pure hash assignment and
    /// preferences to the defaults, and a warning is logged (at most once a
    /// second).
    ///
    /// `target` is the request path, with or without its query (query
    /// parameters can be targeted); `peer` the address the connection comes
    /// from (the identity header, cookie, alias and country headers count
    /// only from `identity.trusted_from`); `tls` whether it came over TLS.
    pub async fn decide(
        &self,
        headers: &HeaderMap,
        target: &str,
        peer: IpAddr,
        tls: bool,
    ) -> EdgeDecision {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let trusted = self.trusts(peer);
        let sources = identity::Sources {
            header: &self.identity_header,
            cookie: self.identity_cookie.as_deref(),
            trusted,
        };
        // Authenticated users need no signing key: it is only looked up (and
        // on first use generated) for anonymous ones.
        let authenticated = identity::authenticated(headers, &sources);
        let (identity, keep_cookie) = match authenticated {
            Some(identity) => (identity, false),
            None => match self.signer().await {
                Ok(signer) => (identity::anonymous(headers, signer), false),
                Err(err) => {
                    // Without the key no cookie can be checked: every anonymous
                    // visitor is treated as new for this request (nothing is
                    // stored for a new id), and no cookie is sent, so the one
                    // the browser holds still counts once the store is back.
                    self.read_failed("the anonymous-id secret", "-", &err);
                    let throwaway = Signer::new(&fallback_secret());
                    (identity::anonymous(headers, &throwaway), true)
                }
            },
        };
        let fresh = identity.fresh.is_some();
        let user = identity.user_id.as_str();
        let trusted_header = |name: &Option<HeaderName>| {
            name.as_ref()
                .filter(|_| trusted)
                .and_then(|h| headers.get(h))
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let req = RequestAttributes {
            user_id: user,
            path,
            query,
            headers,
            country: trusted_header(&self.country_header),
        };
        // The anonymous id this user had before logging in, if named.
        let alias = trusted_header(&self.alias_header)
            .filter(|a| !identity.anonymous && identity::is_anonymous_id(a) && is_valid_user_id(a));

        self.defs.ensure_loaded().await;
        // A guard, not a clone of the `Arc`: no reference count written by
        // every core on every request. Only a decision kept for `observe`
        // takes the `Arc`.
        let defs = self.defs.current.load();
        let mut entered: Vec<(&ExperimentRuntime, Option<usize>)> = Vec::new();
        let mut inject = Vec::with_capacity(defs.experiments.len() + 2);
        for exp in &defs.experiments {
            if !exp.applies_to(&req) {
                continue;
            }
            // Paused or stopped: no assignment (sticky ones stay stored for a
            // resume), no exposure; a stopped experiment's winner for everyone.
            if !exp.status.is_running() {
                if let Some(winner) = exp.winner.and_then(|w| exp.variants.get(w)) {
                    inject.push((exp.header.clone(), winner.header_value.clone()));
                }
                continue;
            }
            let hashed = exp.hashed(user);
            // With an alias, a stored variant of the anonymous id counts
            // even where the user's own hash is outside the traffic.
            if hashed.is_some() || alias.is_some() {
                entered.push((exp, hashed));
            }
        }

        // A freshly issued id cannot have state yet: skip the reads.
        let state = if fresh {
            None
        } else {
            Some(self.read_user_state(&defs, user, alias, &entered).await)
        };

        for flag in &defs.flags {
            flag.evaluations.incr();
        }
        if let Some(value) = self.flags_value(&defs, &req, state.as_ref().map(UserState::flags)) {
            inject.push((FEATURE_FLAGS.clone(), value));
        }

        let mut assigned = Vec::with_capacity(entered.len());
        for (i, (exp, hashed)) in entered.into_iter().enumerate() {
            let read = state.as_ref().and_then(|s| s.sticky(i));
            let alias_read = state.as_ref().and_then(|s| s.alias_sticky(i));
            let Some(index) = self
                .assign(exp, hashed, user, read, alias_read, fresh)
                .await
            else {
                continue;
            };
            let variant = &exp.variants[index];
            variant.exposures.incr();
            inject.push((exp.header.clone(), variant.header_value.clone()));
            if let Some(e) = defs.experiments.iter().position(|x| std::ptr::eq(x, exp)) {
                assigned.push((e, index));
            }
        }

        let prefs_read = state.as_ref().and_then(UserState::prefs);
        if let Some(Ok(Some(entry))) = prefs_read {
            self.renew_prefs_if_due(user, entry).await;
        }
        inject.push((
            self.prefs.header.clone(),
            self.prefs_value(user, prefs_read),
        ));

        let set_cookie = identity
            .fresh
            .as_deref()
            .filter(|_| !keep_cookie)
            .and_then(|value| identity::anonymous_cookie(value, tls || self.cookie_secure));
        // A freshly issued id records nothing after the response: see
        // `observe`.
        let observed = !fresh && !defs.experiments.is_empty();
        EdgeDecision {
            set_cookie,
            anonymous: identity.anonymous,
            user_id: identity.user_id,
            inject,
            observed: observed.then_some(defs.generation),
            assigned,
        }
    }

    /// After the response: records exposures of the variants injected (on a
    /// 2xx, once per user, experiment and day) and conversions of the
    /// experiments whose goals match the request (2xx, once a day). Never
    /// waits on I/O: events go to bounded queues.
    ///
    /// Not for a freshly issued anonymous id (the decision does not observe):
    /// its exposure is recorded when it comes back with the cookie, the
    /// same request that stores its sticky assignment. A client that drops
    /// cookies (a crawler, a load generator) would otherwise add an
    /// `exposed:` record, a dedup entry and a "user" to the results on every
    /// request, and fill the day's dedup set so that real users are counted
    /// twice; it could never convert on a later request either.
    pub(crate) async fn observe(
        &self,
        decision: &EdgeDecision,
        method: &Method,
        path: &str,
        route: &str,
        status: StatusCode,
    ) {
        let Some(generation) = decision.observed else {
            return;
        };
        if !status.is_success() {
            return;
        }
        // A guard, not an `Arc`, as in `decide`. Definitions changed since
        // the decision (rare: an admin change landed while the request was
        // in flight) make its indexes meaningless: nothing is recorded for
        // this request, and the user's next request records the exposure.
        let defs = self.defs.current.load();
        if defs.generation != generation {
            return;
        }
        let user = decision.user_id.as_str();
        let now_ms = crate::kv::now_ms();
        let day = now_ms / 86_400_000;
        let event = |kind: &'static str, exp: &ExperimentRuntime, variant: &str| exposures::Event {
            time_ms: now_ms,
            event: kind,
            experiment: exp.name.clone(),
            variant: variant.to_owned(),
            user_id: user.to_owned(),
            route: route.to_owned(),
            path: path.to_owned(),
        };
        for &(e, v) in &decision.assigned {
            let (Some(exp), true) = (defs.experiments.get(e), true) else {
                continue;
            };
            let Some(variant) = exp.variants.get(v) else {
                continue;
            };
            if !self
                .dedup
                .first_today(day, Outcome::Exposure, &exp.key_name, user)
            {
                continue;
            }
            variant.unique_exposures.incr();
            if let Some(row) = variant.daily {
                self.outcomes.daily.record(Outcome::Exposure, row, day);
            }
            self.events.push(|| event("exposure", exp, &variant.name));
            self.writes
                .push(Write::Put {
                    key: exposed_key(exp, &variant.name, user),
                    value: Bytes::from_static(b"1"),
                    ttl: self.sticky_ttl,
                })
                .await;
        }
        for exp in &defs.experiments {
            // A paused or stopped experiment records nothing.
            if !exp.status.is_running() || !exp.goals.iter().any(|g| g.matches(method, path)) {
                continue;
            }
            if !self
                .dedup
                .first_today(day, Outcome::Conversion, &exp.key_name, user)
            {
                continue;
            }
            let variant = decision
                .assigned
                .iter()
                .find(|(e, _)| {
                    defs.experiments
                        .get(*e)
                        .is_some_and(|x| std::ptr::eq(x, exp))
                })
                .and_then(|&(_, v)| exp.variants.get(v));
            if let Some(variant) = variant {
                variant.conversions.incr();
                if let Some(row) = variant.daily {
                    self.outcomes.daily.record(Outcome::Conversion, row, day);
                }
            }
            self.events
                .push(|| event("conversion", exp, variant.map_or("", |v| v.name.as_str())));
            self.writes
                .push(Write::Put {
                    key: converted_key(exp, user),
                    value: Bytes::from_static(b"1"),
                    ttl: self.sticky_ttl,
                })
                .await;
        }
    }

    /// Waits until every state write queued so far (sticky assignments,
    /// preference renewals) is committed. The gateway calls it on shutdown;
    /// tests call it before inspecting the KV.
    pub async fn settle(&self) {
        self.writes.settle().await;
    }

    /// Preferences expire `ttl_days` after their last write; a request from
    /// the user renews them, at most once per `renew_after` (a day, or half
    /// the TTL if shorter), so an active user's document never expires and
    /// reads do not turn into a write each. Entries stored without a TTL
    /// (before TTLs existed) get one.
    async fn renew_prefs_if_due(&self, user: &str, entry: &KvEntry) {
        let renew_after = (self.prefs_ttl / 2).min(Duration::from_secs(86_400));
        let due = match entry.expires_at {
            None => true,
            Some(at) => {
                let left = at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                self.prefs_ttl.saturating_sub(left) >= renew_after
            }
        };
        if due {
            self.writes
                .push(Write::RenewPrefs {
                    user: user.to_owned(),
                    ttl: self.prefs_ttl,
                })
                .await;
        }
    }

    /// Every state-store read for one user, as one batch: the full keys
    /// (namespace included, as `kv` would build them) are written into one
    /// buffer and read straight from the store.
    async fn read_user_state(
        &self,
        defs: &Compiled,
        user: &str,
        alias: Option<&str>,
        entered: &[(&ExperimentRuntime, Option<usize>)],
    ) -> UserState {
        let aliased = alias.map_or(0, |_| entered.len());
        let count = defs.flags.len() + entered.len() + aliased + 1;
        let mut text = String::with_capacity(count * (self.key_prefix.len() + 24 + user.len()));
        let mut ends = Vec::with_capacity(count);
        let mut push = |prefix: &str, id: &str| {
            text.push_str(&self.key_prefix);
            text.push_str(prefix);
            text.push_str(id);
            ends.push(text.len());
        };
        for flag in &defs.flags {
            push(&flag.override_prefix, user);
        }
        for (exp, _) in entered {
            push(exp.sticky_prefix(), user);
        }
        if let Some(alias) = alias {
            for (exp, _) in entered {
                push(exp.sticky_prefix(), alias);
            }
        }
        push(PREFS_KEY_PREFIX, user);
        let keys: Vec<&str> = (0..ends.len())
            .map(|i| {
                let start = i.checked_sub(1).map_or(0, |before| ends[before]);
                &text[start..ends[i]]
            })
            .collect();
        // One batch: one round trip on a networked store, one lock and one
        // clock reading on an in-process one.
        let reads = match self.user_reads.get_many(&keys).await {
            Ok(reads) => reads,
            Err(err) => {
                let why = err.to_string();
                keys.iter()
                    .map(|_| Err(KvError::Backend(why.clone())))
                    .collect()
            }
        };
        UserState {
            reads,
            flags: defs.flags.len(),
            entered: entered.len(),
            alias: alias.is_some(),
        }
    }

    /// A state-store read that failed: counted (`/metrics`) and logged.
    fn read_failed(&self, what: &str, user: &str, err: &dyn std::fmt::Display) {
        self.counters.count_state_read_error();
        self.warn_kv(what, user, err);
    }

    fn warn_kv(&self, what: &str, user: &str, err: &dyn std::fmt::Display) {
        if self.warn.allow() {
            tracing::warn!(user_id = user, error = %err, "edge state read for {what} failed; using the fallback");
        }
    }

    /// A stored override, if it is valid for the flag's current definition.
    fn parse_override(&self, flag: &FlagRuntime, raw: &[u8]) -> Result<FlagValue, String> {
        let json: serde_json::Value = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
        FlagValue::typed(flag.kind, &json, self.defs.json_max)
    }

    /// Each flag's override, if the user has a valid one.
    fn flag_overrides<'f>(
        &self,
        defs: &'f Compiled,
        user: &str,
        reads: Option<&[Read]>,
    ) -> Vec<(&'f FlagRuntime, Option<FlagValue>)> {
        let mut reads = reads.map(<[Read]>::iter);
        defs.flags
            .iter()
            .map(|flag| {
                let overridden = match reads.as_mut().and_then(Iterator::next) {
                    Some(Ok(Some(entry))) => match self.parse_override(flag, &entry.value) {
                        Ok(value) => Some(value),
                        Err(why) => {
                            self.warn_kv(&format!("flag {} override", flag.name), user, &why);
                            None
                        }
                    },
                    Some(Err(err)) => {
                        self.read_failed("flag overrides", user, &err);
                        None
                    }
                    Some(Ok(None)) | None => None,
                };
                (flag, overridden)
            })
            .collect()
    }

    /// `X-Feature-Flags` for the request: the prebuilt default value when no
    /// flag has rules and the user has no override; otherwise the members
    /// (prebuilt per rule and default) joined, overrides serialized.
    fn flags_value(
        &self,
        defs: &Compiled,
        req: &RequestAttributes<'_>,
        reads: Option<&[Read]>,
    ) -> Option<HeaderValue> {
        let default = defs.default_flags_value.as_ref()?;
        let no_overrides = reads.is_none_or(|r| r.iter().all(|r| matches!(r, Ok(None))));
        if no_overrides && !defs.flags_have_rules {
            return Some(default.clone());
        }
        let values = if no_overrides {
            Vec::new()
        } else {
            self.flag_overrides(defs, req.user_id, reads)
        };
        let dict = Self::flags_dictionary(defs, req, &values);
        Some(HeaderValue::from_str(&dict).unwrap_or_else(|_| default.clone()))
    }

    fn flags_dictionary(
        defs: &Compiled,
        req: &RequestAttributes<'_>,
        overrides: &[(&FlagRuntime, Option<FlagValue>)],
    ) -> String {
        let mut dict = String::with_capacity(defs.flags.len() * 16);
        for (i, flag) in defs.flags.iter().enumerate() {
            if i > 0 {
                dict.push_str(", ");
            }
            match overrides.get(i).and_then(|(_, v)| v.as_ref()) {
                Some(value) => {
                    // Checked to serialize in `parse_override`.
                    let mut member = String::new();
                    if sfv::write_member(&mut member, &flag.sf_key, value).is_ok() {
                        dict.push_str(member.trim_start_matches(", "));
                    } else {
                        dict.push_str(flag.member_for(req));
                    }
                }
                None => dict.push_str(flag.member_for(req)),
            }
        }
        dict
    }

    /// The variant for a user who entered `exp`: a stored assignment whose
    /// variant still exists wins, then the aliased anonymous id's (copied to
    /// the user); otherwise the hash picks (`None`: outside the traffic) and
    /// the pick is stored in the background. Not stored: a KV read failure
    /// (the store is down; the hash answer is the fallback) and a freshly
    /// issued anonymous id (a client that drops cookies would otherwise
    /// write one record per request; the id's first return stores the same,
    /// deterministic pick).
    async fn assign(
        &self,
        exp: &ExperimentRuntime,
        hashed: Option<usize>,
        user: &str,
        read: Option<&Read>,
        alias_read: Option<&Read>,
        fresh: bool,
    ) -> Option<usize> {
        let store = match read {
            Some(Ok(Some(entry))) => match exp.variant(&entry.value) {
                Some(variant) => return Some(variant),
                None => true, // the stored variant was removed since
            },
            Some(Ok(None)) => !fresh,
            Some(Err(err)) => {
                self.read_failed(&format!("experiment {} assignment", exp.name), user, &err);
                false
            }
            None => !fresh,
        };
        let aliased = match alias_read {
            Some(Ok(Some(entry))) => exp.variant(&entry.value),
            _ => None,
        };
        let variant = aliased.or(hashed)?;
        if store {
            self.store_assignment(exp.sticky_key(user), exp.variants[variant].stored.clone())
                .await;
        }
        Some(variant)
    }

    async fn store_assignment(&self, key: String, value: Bytes) {
        // No metadata: every request of the user reads this entry back, and
        // the assignment time is already implied by the expiry (expiry - TTL).
        // A full queue drops it (counted); the next request stores it.
        self.writes
            .push(Write::Put {
                key,
                value,
                ttl: self.sticky_ttl,
            })
            .await;
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

    fn prefs_value(&self, user: &str, read: Option<&Read>) -> HeaderValue {
        match read {
            Some(Ok(Some(entry))) => match Self::stored_prefs(entry) {
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
                self.read_failed("preferences", user, &err);
                self.prefs.default_value.clone()
            }
            Some(Ok(None)) | None => self.prefs.default_value.clone(),
        }
    }
}

/// A key no one knows, for the requests served while the stored secret
/// cannot be read: whatever it signs is never accepted later.
fn fallback_secret() -> [u8; GENERATED_SECRET_BYTES] {
    let mut secret = [0u8; GENERATED_SECRET_BYTES];
    if getrandom::getrandom(&mut secret).is_err() {
        // No randomness at all: a per-process value is still unknown to clients.
        let seed = uuid::Uuid::new_v4();
        secret[..16].copy_from_slice(seed.as_bytes());
    }
    secret
}

#[cfg(test)]
mod tests;
