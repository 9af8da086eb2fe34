//! The `[edge]` section of the TOML config, and its validation.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::sfv;
use crate::protocol::cidr::Cidr;

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
    pub(crate) flags: BTreeMap<String, FlagConfig>,
    pub(crate) experiments: BTreeMap<String, ExperimentConfig>,
    pub(crate) preferences: PreferencesConfig,
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
            experiments: BTreeMap::new(),
            preferences: PreferencesConfig::default(),
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

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct FlagConfig {
    pub(crate) default: FlagValue,
    #[serde(default)]
    pub(crate) description: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExperimentConfig {
    /// Variant name -> weight. Any non-negative numbers; shares are weight / sum.
    /// Variants are laid out on the buckets in name order (a `BTreeMap`), so
    /// the order they are written in the TOML does not matter.
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

/// A flag's value: the TOML (and JSON) boolean, string or number.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FlagValue {
    Bool(bool),
    Str(String),
    Int(i64),
    Dec(f64),
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

    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            FlagValue::Bool(b) => (*b).into(),
            FlagValue::Str(s) => s.as_str().into(),
            FlagValue::Int(i) => (*i).into(),
            FlagValue::Dec(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
        }
    }

    /// "boolean", "string" or "number": integers and decimals are one kind,
    /// so a flag defaulting to `1` accepts an override of `0.5`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            FlagValue::Bool(_) => "boolean",
            FlagValue::Str(_) => "string",
            FlagValue::Int(_) | FlagValue::Dec(_) => "number",
        }
    }
}

impl<'de> Deserialize<'de> for FlagValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FlagValueVisitor;
        impl Visitor<'_> for FlagValueVisitor {
            type Value = FlagValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a boolean, a string or a number")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<FlagValue, E> {
                Ok(FlagValue::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<FlagValue, E> {
                Ok(FlagValue::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<FlagValue, E> {
                i64::try_from(v)
                    .map(FlagValue::Int)
                    .map_err(|_| E::custom("integer flag value out of range"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<FlagValue, E> {
                Ok(FlagValue::Dec(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FlagValue, E> {
                Ok(FlagValue::Str(v.to_owned()))
            }
        }
        deserializer.deserialize_any(FlagValueVisitor)
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
            sfv::serialize_item(&flag.default)
                .map_err(|e| problem(format!("{field}.default"), e.to_string()))?;
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
            if !(total > 0.0 && total.is_finite()) {
                return Err(problem(
                    format!("{field}.variants"),
                    "weights must sum to more than 0",
                ));
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
        }

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
        assert_eq!(cfg.flags["newUI"].default, FlagValue::Bool(false));
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
        assert_eq!(cfg.flags["a"].default, FlagValue::Bool(true));
        assert_eq!(cfg.flags["b"].default, FlagValue::Str("dark".into()));
        assert_eq!(cfg.flags["c"].default, FlagValue::Int(3));
        assert_eq!(cfg.flags["d"].default, FlagValue::Dec(0.25));
        let err = parse("flags.a = { default = [1] }")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a boolean, a string or a number"), "{err}");
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
