//! The `[edge]` section of the TOML config, and its validation.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::sfv;
use crate::protocol::cidr::Cidr;

pub(crate) mod targeting;

use targeting::{Condition, ConditionConfig};

/// Cookie that carries an anonymous id kvgate issued.
pub(crate) const ANONYMOUS_COOKIE: &str = "kvgate_uid";

/// Shortest edge secret accepted (HMAC-SHA256 keys of at least 32 bytes).
pub(crate) const MIN_SECRET_BYTES: usize = 32;

/// Longest flag, experiment or variant name.
pub(crate) const MAX_NAME_LEN: usize = 64;
/// Longest environment name.
pub(crate) const MAX_ENVIRONMENT_LEN: usize = 64;
/// Upper bound for `preferences.max_bytes`: the document travels in a request
/// header, and origins commonly cap a header line at 8 to 16 KiB.
pub(crate) const MAX_PREFERENCES_BYTES: usize = 16 * 1024;
/// Default for `write_queue_capacity`.
pub(crate) const DEFAULT_WRITE_QUEUE_CAPACITY: usize = 10_000;
/// Default and upper bound of `flag_json_max_bytes`.
pub(crate) const DEFAULT_FLAG_JSON_MAX_BYTES: usize = 1024;
pub(crate) const MAX_FLAG_JSON_BYTES: usize = 8 * 1024;
/// Upper bound for `write_queue_capacity`.
pub(crate) const MAX_WRITE_QUEUE_CAPACITY: usize = 1_000_000;

/// The `[edge]` section: identity, flags, experiments and preferences.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    pub(crate) identity: IdentityConfig,
    /// Key namespace in the KV, so `production` and `preview` never share state.
    pub(crate) environment: String,
    /// Lifetime of a sticky experiment assignment; past it the user is
    /// assigned again by hash (the same variant unless weights changed).
    pub(crate) sticky_ttl_days: u32,
    /// Most state writes (sticky assignments, preference refreshes) waiting
    /// to be committed; past it new ones are dropped and counted
    /// (`Edge::dropped_writes`), since a dropped write is redone on the
    /// user's next request.
    pub(crate) write_queue_capacity: usize,
    /// How long queued writes wait for company before one commit takes
    /// them all: at most one commit (fsync) per this many milliseconds,
    /// however many users arrive. 0 commits as soon as a write is queued.
    /// Shutdown commits at once.
    pub(crate) write_flush_ms: u64,
    /// Flags, segments and experiments: the TOML seeds the state store at
    /// first start; after that the store (changed through the admin API) is
    /// the truth and these are ignored.
    pub(crate) flags: BTreeMap<String, FlagConfig>,
    pub(crate) segments: BTreeMap<String, SegmentConfig>,
    pub(crate) experiments: BTreeMap<String, ExperimentConfig>,
    pub(crate) preferences: PreferencesConfig,
    pub(crate) targeting: TargetingConfig,
    pub(crate) exposures: ExposuresConfig,
    /// Largest JSON flag value, as compact ASCII JSON.
    pub(crate) flag_json_max_bytes: usize,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            identity: IdentityConfig::default(),
            environment: "production".into(),
            sticky_ttl_days: 30,
            write_queue_capacity: DEFAULT_WRITE_QUEUE_CAPACITY,
            write_flush_ms: 50,
            flags: BTreeMap::new(),
            segments: BTreeMap::new(),
            experiments: BTreeMap::new(),
            preferences: PreferencesConfig::default(),
            targeting: TargetingConfig::default(),
            exposures: ExposuresConfig::default(),
            flag_json_max_bytes: DEFAULT_FLAG_JSON_MAX_BYTES,
        }
    }
}

#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct IdentityConfig {
    /// Request header carrying an authenticated user id (set by an upstream
    /// auth layer; kvgate does not authenticate it). Believed only from
    /// peers in `trusted_from`.
    pub(crate) header: String,
    /// Optional cookie carrying the user id, read when the header is absent.
    /// A plain cookie proves nothing (any client can set it), so it too is
    /// believed only from peers in `trusted_from`.
    pub(crate) cookie: Option<String>,
    /// Networks (CIDR, or bare addresses) whose requests may name a user in
    /// `header` or `cookie`: the auth proxy in front of kvgate. Empty (the
    /// default): never believed, every user is anonymous.
    pub(crate) trusted_from: Vec<String>,
    /// Key for signing anonymous ids, at least 32 bytes. `KVGATE_EDGE_SECRET`
    /// wins when set. Without either, kvgate generates one and keeps it in
    /// the state store, so ids survive restarts as long as the state does.
    pub(crate) secret: Option<String>,
    /// Mark the anonymous cookie `Secure` even on plain HTTP, for a
    /// TLS-terminating balancer in front (it is always set on TLS).
    pub(crate) cookie_secure: bool,
    /// A header (believed from `trusted_from` peers only) that names the
    /// anonymous id (`anon:<id>`) the authenticated user had before logging
    /// in: their experiment variants carry over to the user id.
    pub(crate) alias_header: Option<String>,
}

// By hand, so the secret never reaches a log line.
impl fmt::Debug for IdentityConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityConfig")
            .field("header", &self.header)
            .field("cookie", &self.cookie)
            .field("trusted_from", &self.trusted_from)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("cookie_secure", &self.cookie_secure)
            .field("alias_header", &self.alias_header)
            .finish()
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            header: "X-User-Id".into(),
            cookie: None,
            trusted_from: Vec::new(),
            secret: None,
            cookie_secure: false,
            alias_header: None,
        }
    }
}

impl IdentityConfig {
    /// The parsed `trusted_from` networks.
    pub(crate) fn trusted_networks(&self) -> Result<Vec<Cidr>, EdgeConfigError> {
        self.trusted_from
            .iter()
            .enumerate()
            .map(|(i, text)| {
                Cidr::parse(text).map_err(|e| problem(format!("identity.trusted_from[{i}]"), e))
            })
            .collect()
    }
}

/// The type of a flag's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FlagKind {
    Boolean,
    String,
    Number,
    Json,
}

impl FlagKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FlagKind::Boolean => "boolean",
            FlagKind::String => "string",
            FlagKind::Number => "number",
            FlagKind::Json => "json",
        }
    }
}

/// A flag: a typed default and rules tried in order.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct FlagConfig {
    /// Inferred from `default` when absent (a list or table needs `json`).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub(crate) kind: Option<FlagKind>,
    pub(crate) default: serde_json::Value,
    #[serde(default)]
    pub(crate) description: String,
    /// The first rule that matches (and whose rollout includes the user)
    /// serves its value; none: the default.
    #[serde(default)]
    pub(crate) rules: Vec<RuleConfig>,
}

/// One targeting rule of a flag.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleConfig {
    /// A named segment the request must be in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) segment: Option<String>,
    /// Conditions that must all hold (besides the segment's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) conditions: Vec<ConditionConfig>,
    /// The value served.
    pub(crate) value: serde_json::Value,
    /// A percentage rollout (0..=100): only users whose bucket (hash of the
    /// rule's salt and the user id) is below it are served; the others
    /// fall through to the next rule. Raising it only adds users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) percent: Option<f64>,
    /// Hash seed of the rollout; the flag's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) salt: Option<String>,
}

/// A named, reusable set of conditions (all must hold).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct SegmentConfig {
    pub(crate) conditions: Vec<ConditionConfig>,
    #[serde(default)]
    pub(crate) description: String,
}

/// How users are hashed into an experiment's buckets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum HashScheme {
    /// SHA-256 of seed and id, separate entry and variant buckets.
    #[default]
    Sha256,
    /// GrowthBook's v2 hash (FNV-1a 32) and bucket ranges, so an origin
    /// running GrowthBook's SDK agrees on every user's variant.
    Growthbook,
}

/// A conversion goal: a request pattern answered 2xx.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct GoalConfig {
    /// `GET`, `POST`, ...; any method when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) method: Option<String>,
    /// The exact path, or a prefix ending in `*`.
    pub(crate) path: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExperimentConfig {
    /// Variant name -> weight. Any non-negative numbers in the TOML (shares
    /// are weight / sum); percentages summing to 100 through the admin API.
    /// Variants are laid out on the buckets in name order (a `BTreeMap`), so
    /// the order they are written in does not matter.
    pub(crate) variants: BTreeMap<String, f64>,
    /// Share of users that enter the experiment at all, 0..=1.
    #[serde(default = "full_traffic")]
    pub(crate) traffic: f64,
    /// Only requests whose path is this prefix, segment-wise, see the experiment.
    #[serde(default)]
    pub(crate) path_prefix: Option<String>,
    /// Hash seed in place of the experiment name; change it to reshuffle users.
    #[serde(default)]
    pub(crate) salt: Option<String>,
    #[serde(default)]
    pub(crate) description: String,
    /// A named segment the request must be in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) segment: Option<String>,
    /// Conditions that must all hold for the request to enter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) conditions: Vec<ConditionConfig>,
    /// Bump to reshuffle every user on purpose (sticky assignments of older
    /// versions are no longer read).
    #[serde(default)]
    pub(crate) bucket_version: u32,
    #[serde(default)]
    pub(crate) hash: HashScheme,
    /// Requests that count as a conversion for exposed users.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) goals: Vec<GoalConfig>,
    /// The variant others are compared with; `control` if there is one,
    /// else the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) control: Option<String>,
    /// Significance level of the results' test.
    #[serde(default = "default_alpha")]
    pub(crate) alpha: f64,
}

fn default_alpha() -> f64 {
    0.05
}

/// `[edge.targeting]`: where request attributes come from.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TargetingConfig {
    /// A country header set by the CDN in front (e.g. `CF-IPCountry`),
    /// believed from `identity.trusted_from` peers only.
    pub(crate) country_header: Option<String>,
}

/// `[edge.exposures]`: exposure and conversion events.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ExposuresConfig {
    /// JSON-lines file of exposure events; none: not written.
    pub(crate) path: Option<std::path::PathBuf>,
    /// The file is rotated (`.1`, `.2`, ...) past this size.
    pub(crate) max_bytes: u64,
    /// Rotated files kept besides the current one.
    pub(crate) max_files: u32,
    /// Events waiting for the file writer; past it they are dropped and counted.
    pub(crate) queue_capacity: usize,
    /// (user, experiment) pairs remembered per day for deduplication.
    pub(crate) dedup_capacity: usize,
}

impl Default for ExposuresConfig {
    fn default() -> Self {
        ExposuresConfig {
            path: None,
            max_bytes: 64 * 1024 * 1024,
            max_files: 5,
            queue_capacity: 10_000,
            dedup_capacity: 1_000_000,
        }
    }
}

fn full_traffic() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PreferencesConfig {
    /// Preferences every user starts from; a user's document is merged over it.
    pub(crate) defaults: serde_json::Map<String, serde_json::Value>,
    /// Request header the effective document reaches the origin in.
    pub(crate) header: String,
    /// Largest effective document (defaults merged with the user's, as sent
    /// in the header) that a PATCH may produce.
    pub(crate) max_bytes: usize,
    /// A path on the main listener where users read (GET) and update
    /// (PATCH) their own preferences; off when absent. The user is whoever
    /// the identity layer says (X-User-Id must come from a trusted auth
    /// layer in front of kvgate).
    pub(crate) self_service_path: Option<String>,
    /// A user's stored preferences are dropped after this many days without
    /// a change or a request from them (requests renew it at most daily).
    pub(crate) ttl_days: u32,
}

impl Default for PreferencesConfig {
    fn default() -> Self {
        PreferencesConfig {
            defaults: serde_json::Map::new(),
            header: "X-User-Preferences".into(),
            max_bytes: 4096,
            self_service_path: None,
            ttl_days: 365,
        }
    }
}

/// A flag's value: a boolean, string, number or (for `json` flags) any JSON.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FlagValue {
    Bool(bool),
    Str(String),
    Int(i64),
    Dec(f64),
    Json(serde_json::Value),
}

impl FlagValue {
    /// `None` for JSON values that are not a boolean, string or number.
    pub(crate) fn from_json(value: &serde_json::Value) -> Option<FlagValue> {
        use serde_json::Value;
        match value {
            Value::Bool(b) => Some(FlagValue::Bool(*b)),
            Value::String(s) => Some(FlagValue::Str(s.clone())),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Some(FlagValue::Int(i)),
                None => n.as_f64().map(FlagValue::Dec),
            },
            _ => None,
        }
    }

    /// The kind a default implies: lists, tables and null need `type = "json"`.
    pub(crate) fn infer_kind(value: &serde_json::Value) -> Option<FlagKind> {
        use serde_json::Value;
        match value {
            Value::Bool(_) => Some(FlagKind::Boolean),
            Value::String(_) => Some(FlagKind::String),
            Value::Number(_) => Some(FlagKind::Number),
            _ => None,
        }
    }

    /// `value` as a value of a `kind` flag that fits in `X-Feature-Flags`
    /// (and, for JSON, in `json_max` bytes); the reason otherwise.
    pub(crate) fn typed(
        kind: FlagKind,
        value: &serde_json::Value,
        json_max: usize,
    ) -> Result<FlagValue, String> {
        let parsed = if kind == FlagKind::Json {
            let len = sfv::json_text(value).len();
            if len > json_max {
                return Err(format!(
                    "JSON value is {len} bytes, more than the limit of {json_max}"
                ));
            }
            FlagValue::Json(value.clone())
        } else {
            let v = FlagValue::from_json(value)
                .filter(|v| v.kind() == kind.as_str())
                .ok_or_else(|| format!("a {} flag cannot take {value}", kind.as_str()))?;
            v
        };
        sfv::serialize_item(&parsed).map_err(|e| e.to_string())?;
        Ok(parsed)
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            FlagValue::Bool(b) => (*b).into(),
            FlagValue::Str(s) => s.as_str().into(),
            FlagValue::Int(i) => (*i).into(),
            FlagValue::Dec(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            FlagValue::Json(v) => v.clone(),
        }
    }

    /// "boolean", "string", "number" or "json": integers and decimals are
    /// one kind, so a flag defaulting to `1` accepts an override of `0.5`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            FlagValue::Bool(_) => "boolean",
            FlagValue::Str(_) => "string",
            FlagValue::Int(_) | FlagValue::Dec(_) => "number",
            FlagValue::Json(_) => "json",
        }
    }
}

/// A config problem, naming the offending field as a dotted path under `edge`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("edge.{field}: {message}")]
pub struct EdgeConfigError {
    pub(crate) field: String,
    pub(crate) message: String,
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> EdgeConfigError {
    EdgeConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// Headers kvgate writes itself; configured header names must stay clear of them.
pub(crate) const FEATURE_FLAGS_HEADER: &str = "x-feature-flags";
pub(crate) const EXPERIMENT_HEADER_PREFIX: &str = "x-experiment-";

fn is_injected_name(lower: &str) -> bool {
    lower == FEATURE_FLAGS_HEADER || lower.starts_with(EXPERIMENT_HEADER_PREFIX)
}

/// A name that starts with `first` and continues with ASCII alphanumerics or
/// one of `extra`.
fn check_name(
    field: &str,
    what: &str,
    name: &str,
    first: fn(u8) -> bool,
    first_desc: &str,
    extra: &[u8],
) -> Result<(), EdgeConfigError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && first(bytes[0])
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(b));
    if ok {
        Ok(())
    } else {
        let extra: String = extra.iter().map(|&b| b as char).collect();
        Err(problem(
            field,
            format!(
                "{what} {name:?} must be 1 to {MAX_NAME_LEN} characters: {first_desc} \
                 first, then letters, digits or any of {extra:?}"
            ),
        ))
    }
}

fn check_header_name(field: &str, name: &str) -> Result<String, EdgeConfigError> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map(|h| h.as_str().to_owned())
        .map_err(|_| problem(field, format!("{name:?} is not a valid HTTP header name")))
}

/// A cookie name is an RFC 6265 token.
fn check_cookie_name(field: &str, name: &str) -> Result<(), EdgeConfigError> {
    const SEPARATORS: &[u8] = b"()<>@,;:\\\"/[]?={} \t";
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !SEPARATORS.contains(&b));
    if ok {
        Ok(())
    } else {
        Err(problem(
            field,
            format!("{name:?} is not a valid cookie name"),
        ))
    }
}

/// How experiment weights must add up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightRule {
    /// Any non-negative numbers with a positive sum (the TOML: shares).
    Shares,
    /// Percentages summing to 100 (the admin API).
    Percent,
}

/// Flags, segments and experiments: what the TOML seeds and the admin API
/// changes, stored as JSON in the state store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Definitions {
    pub(crate) flags: BTreeMap<String, FlagConfig>,
    pub(crate) segments: BTreeMap<String, SegmentConfig>,
    pub(crate) experiments: BTreeMap<String, ExperimentConfig>,
}

/// A segment's field and conditions, checked and compiled.
pub(crate) type CompiledSegments = HashMap<String, Vec<Condition>>;

fn compile_conditions(
    field: &str,
    list: &[ConditionConfig],
) -> Result<Vec<Condition>, EdgeConfigError> {
    Condition::compile_all(field, list).map_err(|(f, m)| problem(f, m))
}

fn check_segment_ref(
    field: &str,
    segment: &Option<String>,
    segments: &BTreeMap<String, SegmentConfig>,
) -> Result<(), EdgeConfigError> {
    match segment {
        Some(name) if !segments.contains_key(name) => {
            Err(problem(field, format!("no segment named {name:?}")))
        }
        _ => Ok(()),
    }
}

impl Definitions {
    /// The kind of a flag: its `type`, else what its default implies.
    pub(crate) fn flag_kind(flag: &FlagConfig) -> Option<FlagKind> {
        flag.kind.or_else(|| FlagValue::infer_kind(&flag.default))
    }

    /// Checks every definition (names, types, values, rules, conditions,
    /// segment references, weights); the first problem found is returned,
    /// naming its field (`flags.newUI.rules[0].conditions[1]`).
    pub(crate) fn validate(
        &self,
        json_max: usize,
        weights: WeightRule,
    ) -> Result<CompiledSegments, EdgeConfigError> {
        let mut segments = CompiledSegments::new();
        for (name, seg) in &self.segments {
            let field = format!("segments.{name}");
            check_name(
                &field,
                "segment name",
                name,
                |b| b.is_ascii_alphanumeric(),
                "a letter or digit",
                b"_-.",
            )?;
            if seg.conditions.is_empty() {
                return Err(problem(
                    format!("{field}.conditions"),
                    "needs at least one condition",
                ));
            }
            let compiled = compile_conditions(&format!("{field}.conditions"), &seg.conditions)?;
            segments.insert(name.clone(), compiled);
        }

        let mut sf_keys: HashMap<String, &str> = HashMap::new();
        for (name, flag) in &self.flags {
            let field = format!("flags.{name}");
            check_name(
                &field,
                "flag name",
                name,
                |b| b.is_ascii_alphabetic(),
                "a letter",
                b"_-.",
            )?;
            let key = sfv::dictionary_key(name);
            if let Some(other) = sf_keys.insert(key.clone(), name) {
                return Err(problem(
                    field,
                    format!(
                        "flag names {other:?} and {name:?} are the same once lowercased \
                         ({key:?}) for X-Feature-Flags"
                    ),
                ));
            }
            let kind = Self::flag_kind(flag).ok_or_else(|| {
                problem(
                    format!("{field}.default"),
                    "must be a boolean, a string or a number (or set type = \"json\")",
                )
            })?;
            FlagValue::typed(kind, &flag.default, json_max)
                .map_err(|e| problem(format!("{field}.default"), e))?;
            if flag.rules.len() > 100 {
                return Err(problem(format!("{field}.rules"), "at most 100 rules"));
            }
            for (i, rule) in flag.rules.iter().enumerate() {
                let rfield = format!("{field}.rules[{i}]");
                check_segment_ref(&format!("{rfield}.segment"), &rule.segment, &self.segments)?;
                compile_conditions(&format!("{rfield}.conditions"), &rule.conditions)?;
                FlagValue::typed(kind, &rule.value, json_max)
                    .map_err(|e| problem(format!("{rfield}.value"), e))?;
                if let Some(p) = rule.percent {
                    if !(0.0..=100.0).contains(&p) {
                        return Err(problem(
                            format!("{rfield}.percent"),
                            format!("{p} must be within 0..=100"),
                        ));
                    }
                }
                if let Some(salt) = &rule.salt {
                    if salt.is_empty() || salt.len() > 256 {
                        return Err(problem(format!("{rfield}.salt"), "must be 1 to 256 bytes"));
                    }
                }
            }
        }

        let mut experiment_headers: HashMap<String, &str> = HashMap::new();
        for (name, exp) in &self.experiments {
            let field = format!("experiments.{name}");
            check_name(
                &field,
                "experiment name",
                name,
                |b| b.is_ascii_alphanumeric(),
                "a letter or digit",
                b"_-",
            )?;
            if let Some(other) = experiment_headers.insert(name.to_ascii_lowercase(), name) {
                return Err(problem(
                    field,
                    format!(
                        "experiments {other:?} and {name:?} would share one \
                         (case-insensitive) X-Experiment header"
                    ),
                ));
            }
            if exp.variants.is_empty() {
                return Err(problem(
                    format!("{field}.variants"),
                    "needs at least one variant",
                ));
            }
            if exp.variants.len() > 100 {
                return Err(problem(format!("{field}.variants"), "at most 100 variants"));
            }
            for (variant, weight) in &exp.variants {
                let vfield = format!("{field}.variants.{variant}");
                check_name(
                    &vfield,
                    "variant name",
                    variant,
                    |b| b.is_ascii_alphanumeric(),
                    "a letter or digit",
                    b"_-.",
                )?;
                if !weight.is_finite() || *weight < 0.0 {
                    return Err(problem(
                        vfield,
                        format!("weight {weight} must be a finite number >= 0"),
                    ));
                }
            }
            let total: f64 = exp.variants.values().sum();
            match weights {
                WeightRule::Shares if !(total > 0.0 && total.is_finite()) => {
                    return Err(problem(
                        format!("{field}.variants"),
                        "weights must sum to more than 0",
                    ));
                }
                WeightRule::Percent if (total - 100.0).abs() > 1e-6 => {
                    return Err(problem(
                        format!("{field}.variants"),
                        format!("weights are percentages and must sum to 100, not {total}"),
                    ));
                }
                _ => {}
            }
            if !(0.0..=1.0).contains(&exp.traffic) {
                return Err(problem(
                    format!("{field}.traffic"),
                    format!(
                        "{} must be within 0..=1 (the share of users that enter)",
                        exp.traffic
                    ),
                ));
            }
            if let Some(prefix) = &exp.path_prefix {
                let ok = prefix.starts_with('/')
                    && prefix
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#');
                if !ok {
                    return Err(problem(
                        format!("{field}.path_prefix"),
                        format!(
                            "{prefix:?} must start with '/' and hold no query, fragment or spaces"
                        ),
                    ));
                }
            }
            if let Some(salt) = &exp.salt {
                if salt.is_empty() || salt.len() > 256 {
                    return Err(problem(format!("{field}.salt"), "must be 1 to 256 bytes"));
                }
            }
            check_segment_ref(&format!("{field}.segment"), &exp.segment, &self.segments)?;
            compile_conditions(&format!("{field}.conditions"), &exp.conditions)?;
            if exp.goals.len() > 32 {
                return Err(problem(format!("{field}.goals"), "at most 32 goals"));
            }
            for (i, goal) in exp.goals.iter().enumerate() {
                let gfield = format!("{field}.goals[{i}]");
                if let Some(m) = &goal.method {
                    if http::Method::from_bytes(m.as_bytes()).is_err() || m.is_empty() {
                        return Err(problem(
                            format!("{gfield}.method"),
                            format!("{m:?} is not a method"),
                        ));
                    }
                }
                let ok = goal.path.starts_with('/')
                    && goal.path.len() <= 1024
                    && goal
                        .path
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#');
                if !ok {
                    return Err(problem(
                        format!("{gfield}.path"),
                        "must start with '/' and hold no query, fragment or spaces (a trailing '*' matches any rest)",
                    ));
                }
            }
            if let Some(control) = &exp.control {
                if !exp.variants.contains_key(control) {
                    return Err(problem(
                        format!("{field}.control"),
                        format!("no variant named {control:?}"),
                    ));
                }
            }
            if !(exp.alpha > 0.0 && exp.alpha < 0.5) {
                return Err(problem(format!("{field}.alpha"), "must be within (0, 0.5)"));
            }
        }
        Ok(segments)
    }
}

impl EdgeConfig {
    /// The flags, segments and experiments of the TOML, weights turned into
    /// percentages, as the state store is seeded with them.
    pub(crate) fn definitions(&self) -> Definitions {
        Definitions {
            flags: self.flags.clone(),
            segments: self.segments.clone(),
            experiments: self.experiments.clone(),
        }
    }
}

impl Definitions {
    /// Experiment weights as percentages summing to 100 (the stored form).
    pub(crate) fn with_percent_weights(mut self) -> Definitions {
        for exp in self.experiments.values_mut() {
            let total: f64 = exp.variants.values().sum();
            if total > 0.0 && total.is_finite() {
                for w in exp.variants.values_mut() {
                    *w = *w * 100.0 / total;
                }
            }
        }
        self
    }
}

impl EdgeConfig {
    /// Checks everything `Edge::new` relies on; the first problem found is returned.
    pub(crate) fn validate(&self) -> Result<(), EdgeConfigError> {
        let identity_header = check_header_name("identity.header", &self.identity.header)?;
        if is_injected_name(&identity_header) {
            return Err(problem(
                "identity.header",
                "must not be a header kvgate injects (X-Feature-Flags, X-Experiment-*)",
            ));
        }
        if let Some(cookie) = &self.identity.cookie {
            check_cookie_name("identity.cookie", cookie)?;
            if cookie == ANONYMOUS_COOKIE {
                return Err(problem(
                    "identity.cookie",
                    "kvgate_uid is the anonymous-id cookie; name the cookie that carries \
                     authenticated ids",
                ));
            }
        }
        self.identity.trusted_networks()?;
        if let Some(secret) = &self.identity.secret {
            if secret.len() < MIN_SECRET_BYTES {
                return Err(problem(
                    "identity.secret",
                    format!("must be at least {MIN_SECRET_BYTES} bytes"),
                ));
            }
        }

        let env = &self.environment;
        if env.is_empty()
            || env.len() > MAX_ENVIRONMENT_LEN
            || !env
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(problem(
                "environment",
                format!("{env:?} must be 1 to {MAX_ENVIRONMENT_LEN} letters, digits, '-' or '_'"),
            ));
        }
        if !(1..=3650).contains(&self.sticky_ttl_days) {
            return Err(problem("sticky_ttl_days", "must be within 1..=3650"));
        }
        if self.write_flush_ms > 60_000 {
            return Err(problem("write_flush_ms", "must be within 0..=60000"));
        }
        if !(1..=MAX_WRITE_QUEUE_CAPACITY).contains(&self.write_queue_capacity) {
            return Err(problem(
                "write_queue_capacity",
                format!("must be within 1..={MAX_WRITE_QUEUE_CAPACITY}"),
            ));
        }

        if !(2..=MAX_FLAG_JSON_BYTES).contains(&self.flag_json_max_bytes) {
            return Err(problem(
                "flag_json_max_bytes",
                format!("must be within 2..={MAX_FLAG_JSON_BYTES}"),
            ));
        }
        if let Some(h) = &self.targeting.country_header {
            check_header_name("targeting.country_header", h)?;
        }
        if let Some(h) = &self.identity.alias_header {
            let name = check_header_name("identity.alias_header", h)?;
            if is_injected_name(&name) || name == identity_header {
                return Err(problem(
                    "identity.alias_header",
                    "must differ from the identity header and the headers kvgate injects",
                ));
            }
        }
        let x = &self.exposures;
        if x.max_bytes < 1024 || x.max_files > 1000 {
            return Err(problem(
                "exposures",
                "max_bytes must be at least 1024 and max_files at most 1000",
            ));
        }
        if !(1..=MAX_WRITE_QUEUE_CAPACITY).contains(&x.queue_capacity)
            || !(1..=100_000_000).contains(&x.dedup_capacity)
        {
            return Err(problem(
                "exposures",
                format!(
                    "queue_capacity must be within 1..={MAX_WRITE_QUEUE_CAPACITY} and \
                     dedup_capacity within 1..=100000000"
                ),
            ));
        }
        self.definitions()
            .validate(self.flag_json_max_bytes, WeightRule::Shares)?;

        let prefs = &self.preferences;
        let prefs_header = check_header_name("preferences.header", &prefs.header)?;
        if is_injected_name(&prefs_header) || prefs_header == identity_header {
            return Err(problem(
                "preferences.header",
                "must differ from X-Feature-Flags, X-Experiment-* and the identity header",
            ));
        }
        if let Some(p) = &prefs.self_service_path {
            if !p.starts_with('/') {
                return Err(problem(
                    "preferences.self_service_path",
                    "must be a path starting with '/'",
                ));
            }
        }
        if !(1..=3650).contains(&prefs.ttl_days) {
            return Err(problem("preferences.ttl_days", "must be within 1..=3650"));
        }
        if !(2..=MAX_PREFERENCES_BYTES).contains(&prefs.max_bytes) {
            return Err(problem(
                "preferences.max_bytes",
                format!("must be within 2..={MAX_PREFERENCES_BYTES}"),
            ));
        }
        let encoded = crate::protocol::headers::ascii_json(&prefs.defaults);
        if encoded.len() > prefs.max_bytes {
            return Err(problem(
                "preferences.defaults",
                format!(
                    "encode to {} bytes, more than preferences.max_bytes ({})",
                    encoded.len(),
                    prefs.max_bytes
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The issue's own example, as it ships in config/kvgate.toml.
    pub(crate) const EXAMPLE: &str = r#"
        environment = "production"
        sticky_ttl_days = 30

        [identity]
        header = "X-User-Id"
        cookie = "session_user"
        trusted_from = ["127.0.0.0/8", "::1/128"]

        [flags.newUI]
        default = false
        description = "The redesigned UI"

        [flags.betaFeatures]
        default = false
        description = "Early access features"

        [experiments.new-checkout]
        variants = { control = 50, variant_a = 25, variant_b = 25 }
        traffic = 1.0
        path_prefix = "/checkout"

        [preferences]
        header = "X-User-Preferences"
        max_bytes = 4096
        defaults = { theme = "light", language = "en", notifications = true, timezone = "UTC" }
    "#;

    fn parse(text: &str) -> Result<EdgeConfig, toml::de::Error> {
        toml::from_str(text)
    }

    fn invalid(text: &str) -> EdgeConfigError {
        parse(text).unwrap().validate().unwrap_err()
    }

    #[test]
    fn example_parses_and_validates() {
        let cfg = parse(EXAMPLE).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.flags["newUI"].default, serde_json::json!(false));
        let exp = &cfg.experiments["new-checkout"];
        assert_eq!(exp.variants["control"], 50.0);
        assert_eq!(exp.path_prefix.as_deref(), Some("/checkout"));
        assert_eq!(cfg.preferences.defaults["theme"], "light");
        assert_eq!(cfg.identity.cookie.as_deref(), Some("session_user"));
        assert_eq!(cfg.identity.trusted_networks().unwrap().len(), 2);
    }

    #[test]
    fn empty_section_takes_defaults() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg, EdgeConfig::default());
        assert_eq!(cfg.identity.header, "X-User-Id");
        assert_eq!(cfg.environment, "production");
        assert_eq!(cfg.sticky_ttl_days, 30);
        assert_eq!(cfg.preferences.header, "X-User-Preferences");
        assert_eq!(cfg.preferences.max_bytes, 4096);
        assert_eq!(cfg.preferences.ttl_days, 365);
        assert_eq!(cfg.write_queue_capacity, 10_000);
        assert_eq!(cfg.write_flush_ms, 50);
        assert!(
            cfg.identity.trusted_from.is_empty(),
            "no peer is trusted by default"
        );
        assert_eq!(cfg.identity.secret, None);
        assert!(!cfg.identity.cookie_secure);
        cfg.validate().unwrap();
        let exp = parse("[experiments.e]\nvariants = { a = 1 }").unwrap();
        assert_eq!(exp.experiments["e"].traffic, 1.0);
    }

    #[test]
    fn flag_values_of_each_kind() {
        let cfg = parse(
            r#"
            flags.a = { default = true }
            flags.b = { default = "dark" }
            flags.c = { default = 3 }
            flags.d = { default = 0.25 }
        "#,
        )
        .unwrap();
        let kind = |name: &str| Definitions::flag_kind(&cfg.flags[name]);
        assert_eq!(kind("a"), Some(FlagKind::Boolean));
        assert_eq!(kind("b"), Some(FlagKind::String));
        assert_eq!(kind("c"), Some(FlagKind::Number));
        assert_eq!(kind("d"), Some(FlagKind::Number));
        cfg.validate().unwrap();
        let list = parse("flags.a = { default = [1] }").unwrap();
        let err = list.validate().unwrap_err();
        assert_eq!(err.field, "flags.a.default");
        assert!(
            err.message.contains("a boolean, a string or a number"),
            "{err}"
        );
        let json = parse(
            "flags.a = { type = \"json\", default = { limits = [1, 2], label = \"caf\u{e9}\" } }",
        )
        .unwrap();
        json.validate().unwrap();
        let value = FlagValue::typed(FlagKind::Json, &json.flags["a"].default, 1024).unwrap();
        assert_eq!(
            sfv::serialize_item(&value).unwrap(),
            r#""{\"label\":\"caf\\u00e9\",\"limits\":[1,2]}""#
        );
        let big = format!(
            "flags.a = {{ type = \"json\", default = \"{}\" }}",
            "x".repeat(2000)
        );
        let err = parse(&big).unwrap().validate().unwrap_err();
        assert!(err.message.contains("more than the limit"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        for text in [
            "colour = 1",
            "[identity]\nheadr = \"X\"",
            "flags.a = { default = true, descripton = \"x\" }",
            "experiments.e = { variants = { a = 1 }, trafic = 0.5 }",
            "[preferences]\nmax_byte = 1",
        ] {
            assert!(parse(text).is_err(), "accepted: {text}");
        }
        assert!(parse("flags.a = { description = \"no default\" }").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            ("experiments.e = { variants = { a = 0, b = 0 } }", "experiments.e.variants"),
            ("experiments.e = { variants = {} }", "experiments.e.variants"),
            ("experiments.e = { variants = { a = -1 } }", "experiments.e.variants.a"),
            ("experiments.e = { variants = { a = 1 }, traffic = 1.5 }", "experiments.e.traffic"),
            ("experiments.e = { variants = { a = 1 }, traffic = -0.1 }", "experiments.e.traffic"),
            ("experiments.\"bad name\" = { variants = { a = 1 } }", "experiments.bad name"),
            ("experiments.e = { variants = { \"a b\" = 1 } }", "experiments.e.variants.a b"),
            ("experiments.e = { variants = { a = 1 }, path_prefix = \"checkout\" }", "experiments.e.path_prefix"),
            ("experiments.e = { variants = { a = 1 }, salt = \"\" }", "experiments.e.salt"),
            ("experiments.E = { variants = { a = 1 } }\nexperiments.e = { variants = { a = 1 } }", "experiments.e"),
            ("flags.\"9lives\" = { default = true }", "flags.9lives"),
            ("flags.\"a:b\" = { default = true }", "flags.a:b"),
            ("flags.newUI = { default = true }\nflags.newui = { default = false }", "flags.newui"),
            ("flags.t = { default = \"caf\u{e9}\" }", "flags.t.default"),
            ("flags.n = { default = 1e300 }", "flags.n.default"),
            ("environment = \"prod:eu\"", "environment"),
            ("environment = \"\"", "environment"),
            ("sticky_ttl_days = 0", "sticky_ttl_days"),
            ("identity.header = \"bad header\"", "identity.header"),
            ("identity.header = \"X-Feature-Flags\"", "identity.header"),
            ("identity.cookie = \"a;b\"", "identity.cookie"),
            ("identity.cookie = \"kvgate_uid\"", "identity.cookie"),
            ("identity.trusted_from = [\"127.0.0.0/8\", \"10.0.0.0/33\"]", "identity.trusted_from[1]"),
            ("identity.trusted_from = [\"localhost\"]", "identity.trusted_from[0]"),
            ("identity.secret = \"short\"", "identity.secret"),
            ("write_queue_capacity = 0", "write_queue_capacity"),
            ("write_flush_ms = 60001", "write_flush_ms"),
            ("preferences.ttl_days = 0", "preferences.ttl_days"),
            ("preferences.header = \"X-Experiment-foo\"", "preferences.header"),
            ("preferences.header = \"x-user-id\"", "preferences.header"),
            ("preferences.max_bytes = 1", "preferences.max_bytes"),
            ("preferences.max_bytes = 10\npreferences.defaults = { theme = \"light\" }", "preferences.defaults"),
        ];
        for (text, field) in cases {
            let err = invalid(text);
            assert_eq!(err.field, field, "{text} -> {err}");
            assert!(err.to_string().starts_with(&format!("edge.{field}: ")));
        }
    }
}

#[cfg(test)]
mod secret_tests {
    use super::*;

    #[test]
    fn debug_output_redacts_the_secret() {
        let cfg = IdentityConfig {
            secret: Some("s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t".into()),
            ..IdentityConfig::default()
        };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
