//! Flags, segments and experiments compiled for the request path: every
//! header value and dictionary member serialized, every condition parsed
//! and every regex built once per definition change, never per request.

use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use super::counters::{Counters, StripedCounter};
use super::exposures::{DailyRow, Outcome, OutcomeCounters};
use super::rollout::{self, BUCKETS};
use super::targeting::RequestAttributes;
use crate::config::edge::targeting::Condition;
use crate::config::edge::{
    Definitions, EdgeConfigError, ExperimentStatus, FlagKind, FlagValue, HashScheme, WeightRule,
    EXPERIMENT_HEADER_PREFIX,
};
use crate::config::sfv;
use crate::protocol::interned;

fn problem(field: impl Into<String>, message: impl std::fmt::Display) -> EdgeConfigError {
    EdgeConfigError {
        field: field.into(),
        message: message.to_string(),
    }
}

pub(crate) struct RuleRuntime {
    /// The segment's conditions, then the rule's own.
    conditions: Vec<Condition>,
    pub(crate) value: FlagValue,
    /// `key=value` for X-Feature-Flags.
    member: String,
    seed: String,
    /// Rollout: users whose bucket is below this are served.
    cutoff: Option<u64>,
}

pub(crate) struct FlagRuntime {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) sf_key: String,
    pub(crate) kind: FlagKind,
    pub(crate) default: FlagValue,
    default_member: String,
    pub(crate) rules: Vec<RuleRuntime>,
    pub(crate) evaluations: Arc<StripedCounter>,
    /// `flag:{name}:user:`, the user's override key without the user.
    pub(crate) override_prefix: String,
}

impl FlagRuntime {
    /// The first rule that matches the request and whose rollout includes
    /// the user; `None`: the default.
    pub(crate) fn matching_rule(&self, req: &RequestAttributes<'_>) -> Option<&RuleRuntime> {
        self.rules.iter().find(|rule| {
            req.all(&rule.conditions)
                && rule.cutoff.is_none_or(|cutoff| {
                    rollout::growthbook_v2_bucket(&rule.seed, req.user_id) < cutoff
                })
        })
    }

    /// The dictionary member the request gets without an override.
    pub(crate) fn member_for(&self, req: &RequestAttributes<'_>) -> &str {
        self.matching_rule(req)
            .map_or(self.default_member.as_str(), |r| r.member.as_str())
    }

    pub(crate) fn value_for(&self, req: &RequestAttributes<'_>) -> (&FlagValue, &'static str) {
        match self.matching_rule(req) {
            Some(rule) => (&rule.value, "rule"),
            None => (&self.default, "default"),
        }
    }
}

pub(crate) struct VariantRuntime {
    pub(crate) name: String,
    pub(crate) weight: f64,
    /// Buckets below this (and at or above the previous variant's) pick it.
    pub(crate) cutoff: u64,
    pub(crate) header_value: HeaderValue,
    pub(crate) stored: bytes::Bytes,
    /// Requests the variant was injected on.
    pub(crate) exposures: Arc<StripedCounter>,
    /// Users exposed (2xx, once per user and day) and converted.
    pub(crate) unique_exposures: Arc<StripedCounter>,
    pub(crate) conversions: Arc<StripedCounter>,
    /// Where its unique exposures and conversions are counted per day
    /// (`None`: past the row limit, not counted per day).
    pub(crate) daily: Option<DailyRow>,
}

/// A conversion goal, matched against method and path.
pub(crate) struct Goal {
    method: Option<http::Method>,
    path: String,
    prefix: bool,
}

impl Goal {
    pub(crate) fn matches(&self, method: &http::Method, path: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && if self.prefix {
                path.starts_with(self.path.as_str())
            } else {
                path == self.path
            }
    }
}

pub(crate) struct ExperimentRuntime {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) header: HeaderName,
    /// The hash seed: salt or name, with `:v{n}` for bucket version n > 0.
    pub(crate) hash_seed: String,
    pub(crate) salted: bool,
    pub(crate) hash: HashScheme,
    pub(crate) traffic: f64,
    /// Users whose entry bucket is below this enter (SHA-256 scheme).
    traffic_cutoff: u64,
    /// GrowthBook bucket ranges per variant (GrowthBook scheme).
    ranges: Vec<(f64, f64)>,
    pub(crate) path_prefix: Option<String>,
    conditions: Vec<Condition>,
    pub(crate) bucket_version: u32,
    /// `exp:{name}:user:` (`exp:{name}@v{n}:user:` for bucket version n).
    sticky_prefix: String,
    /// `{name}` (`{name}@v{n}`): exposures and conversions are per bucket version.
    pub(crate) key_name: String,
    pub(crate) variants: Vec<VariantRuntime>,
    pub(crate) goals: Vec<Goal>,
    pub(crate) control: usize,
    pub(crate) alpha: f64,
    pub(crate) status: ExperimentStatus,
    /// Stopped with a winner: the variant everyone the experiment applies to gets.
    pub(crate) winner: Option<usize>,
}

impl ExperimentRuntime {
    /// The variant the hash gives a user, `None` when outside the traffic.
    pub(crate) fn hashed(&self, user_id: &str) -> Option<usize> {
        match self.hash {
            HashScheme::Sha256 => {
                let seed = &self.hash_seed;
                let (entry, variant_bucket) = rollout::sha256_buckets(seed, user_id);
                (entry < self.traffic_cutoff).then(|| {
                    self.variants
                        .iter()
                        .position(|v| variant_bucket < v.cutoff)
                        .unwrap_or(self.variants.len() - 1)
                })
            }
            HashScheme::Growthbook => {
                let n =
                    rollout::growthbook_v2_bucket(&self.hash_seed, user_id) as f64 / BUCKETS as f64;
                rollout::choose_variation(n, &self.ranges)
            }
        }
    }

    /// The variant a variant bucket picks (SHA-256 scheme).
    #[cfg(test)]
    pub(crate) fn pick(&self, variant_bucket: u64) -> &VariantRuntime {
        let i = self.variants.iter().position(|v| variant_bucket < v.cutoff);
        &self.variants[i.unwrap_or(self.variants.len() - 1)]
    }

    pub(crate) fn variant(&self, name: &[u8]) -> Option<usize> {
        self.variants.iter().position(|v| v.name.as_bytes() == name)
    }

    pub(crate) fn sticky_key(&self, user_id: &str) -> String {
        format!("{}{user_id}", self.sticky_prefix)
    }

    /// `exp:{name}:user:` ([`Self::sticky_key`] without the user).
    pub(crate) fn sticky_prefix(&self) -> &str {
        &self.sticky_prefix
    }

    /// Whether the request may enter: path prefix (segment-wise: `/checkout`
    /// applies to `/checkout` and `/checkout/pay`, not `/checkouts`) and
    /// targeting.
    pub(crate) fn applies_to(&self, req: &RequestAttributes<'_>) -> bool {
        let path_ok = match &self.path_prefix {
            None => true,
            Some(prefix) => match req.path.strip_prefix(prefix.as_str()) {
                Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
                None => false,
            },
        };
        path_ok && req.all(&self.conditions)
    }
}

/// Everything compiled from one version of the definitions.
pub(crate) struct Compiled {
    /// The definitions as stored (what the admin API shows).
    pub(crate) doc: Definitions,
    pub(crate) flags: Vec<FlagRuntime>,
    /// `X-Feature-Flags` when every flag takes its default; `None` without flags.
    pub(crate) default_flags_value: Option<HeaderValue>,
    /// Some flag has rules: the header is built per request.
    pub(crate) flags_have_rules: bool,
    pub(crate) experiments: Vec<ExperimentRuntime>,
    /// Distinct for every compilation in the process: a decision names the
    /// definitions it was made with by this number rather than by holding
    /// an `Arc` (whose count every core would write on every request).
    pub(crate) generation: u64,
}

/// The source of [`Compiled::generation`] (written once per definition change).
static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled").field("doc", &self.doc).finish()
    }
}

fn member(sf_key: &str, value: &FlagValue, field: &str) -> Result<String, EdgeConfigError> {
    let mut out = String::new();
    sfv::write_member(&mut out, sf_key, value).map_err(|e| problem(field, e))?;
    Ok(out)
}

impl Compiled {
    /// Validates and compiles `doc`.
    pub(crate) fn new(
        doc: Definitions,
        weights: WeightRule,
        json_max: usize,
        counters: &Counters,
        outcomes: &OutcomeCounters,
    ) -> Result<Compiled, EdgeConfigError> {
        let segments = doc.validate(json_max, weights)?;
        let segment_conditions = |name: &Option<String>| -> Vec<Condition> {
            name.as_ref()
                .and_then(|n| segments.get(n))
                .cloned()
                .unwrap_or_default()
        };
        let compile =
            |field: &str, list| Condition::compile_all(field, list).map_err(|(f, m)| problem(f, m));

        let mut flags = Vec::with_capacity(doc.flags.len());
        for (name, flag) in &doc.flags {
            let field = format!("flags.{name}");
            let kind = Definitions::flag_kind(flag).ok_or_else(|| problem(&field, "no type"))?;
            let typed = |v, f: &str| FlagValue::typed(kind, v, json_max).map_err(|e| problem(f, e));
            let sf_key = sfv::dictionary_key(name);
            let default = typed(&flag.default, &format!("{field}.default"))?;
            let mut rules = Vec::with_capacity(flag.rules.len());
            for (i, rule) in flag.rules.iter().enumerate() {
                let rfield = format!("{field}.rules[{i}]");
                let mut conditions = segment_conditions(&rule.segment);
                conditions.extend(compile(&format!("{rfield}.conditions"), &rule.conditions)?);
                let value = typed(&rule.value, &format!("{rfield}.value"))?;
                rules.push(RuleRuntime {
                    conditions,
                    member: member(&sf_key, &value, &rfield)?,
                    value,
                    seed: rule.salt.clone().unwrap_or_else(|| name.clone()),
                    cutoff: rule.percent.map(rollout::percent_cutoff),
                });
            }
            flags.push(FlagRuntime {
                name: name.clone(),
                description: flag.description.clone(),
                default_member: member(&sf_key, &default, &format!("{field}.default"))?,
                sf_key,
                kind,
                default,
                rules,
                evaluations: counters.flag_evaluations(name),
                override_prefix: super::flag_key(name, ""),
            });
        }
        let default_flags_value = if flags.is_empty() {
            None
        } else {
            let members: Vec<&str> = flags.iter().map(|f| f.default_member.as_str()).collect();
            Some(interned::value(&members.join(", ")).map_err(|e| problem("flags", e))?)
        };

        let mut experiments = Vec::with_capacity(doc.experiments.len());
        for (name, exp) in &doc.experiments {
            let field = format!("experiments.{name}");
            let key_name = if exp.bucket_version == 0 {
                name.clone()
            } else {
                format!("{name}@v{}", exp.bucket_version)
            };
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
                    header_value: interned::value(variant)
                        .map_err(|e| problem(format!("{field}.variants.{variant}"), e))?,
                    stored: bytes::Bytes::from(variant.clone()),
                    exposures: counters.exposures(name, variant),
                    unique_exposures: outcomes.counter(Outcome::Exposure, name, variant),
                    conversions: outcomes.counter(Outcome::Conversion, name, variant),
                    daily: outcomes.daily.row(&key_name, variant),
                });
            }
            let weights: Vec<f64> = exp.variants.values().map(|w| w / total).collect();
            let base_seed = exp.salt.clone().unwrap_or_else(|| name.clone());
            let versioned = |sep: &str| {
                if exp.bucket_version == 0 {
                    base_seed.clone()
                } else {
                    format!("{base_seed}{sep}v{}", exp.bucket_version)
                }
            };
            let hash_seed = match exp.hash {
                // kvgate's own scheme hashes "seed:" in front of the id.
                HashScheme::Sha256 => format!("{}:", versioned(":")),
                // GrowthBook hashes the seed as given (the SDK's `seed`).
                HashScheme::Growthbook => versioned(":"),
            };
            let sticky_prefix = format!("exp:{key_name}:user:");
            let mut conditions = segment_conditions(&exp.segment);
            conditions.extend(compile(&format!("{field}.conditions"), &exp.conditions)?);
            let control = exp
                .control
                .as_deref()
                .or(exp.variants.contains_key("control").then_some("control"))
                .and_then(|c| variants.iter().position(|v| v.name == c))
                .unwrap_or(0);
            let winner = exp
                .winner
                .as_deref()
                .filter(|_| exp.status == ExperimentStatus::Stopped)
                .and_then(|w| variants.iter().position(|v| v.name == w));
            experiments.push(ExperimentRuntime {
                name: name.clone(),
                description: exp.description.clone(),
                header: interned::name(&format!("{EXPERIMENT_HEADER_PREFIX}{name}"))
                    .map_err(|e| problem(&field, e))?,
                hash_seed,
                salted: exp.salt.is_some(),
                hash: exp.hash,
                traffic: exp.traffic,
                traffic_cutoff: (exp.traffic * BUCKETS as f64).round() as u64,
                ranges: rollout::growthbook_ranges(variants.len(), exp.traffic, &weights),
                path_prefix: exp.path_prefix.clone(),
                conditions,
                bucket_version: exp.bucket_version,
                sticky_prefix,
                key_name,
                variants,
                goals: exp
                    .goals
                    .iter()
                    .map(|g| Goal {
                        method: g
                            .method
                            .as_deref()
                            .and_then(|m| http::Method::from_bytes(m.as_bytes()).ok()),
                        prefix: g.path.ends_with('*'),
                        path: g.path.trim_end_matches('*').to_owned(),
                    })
                    .collect(),
                control,
                alpha: exp.alpha,
                status: exp.status,
                winner,
            });
        }
        Ok(Compiled {
            flags_have_rules: flags.iter().any(|f| !f.rules.is_empty()),
            doc,
            flags,
            default_flags_value,
            experiments,
            generation: GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Exact name first, then case-insensitively (names are unique that way).
    pub(crate) fn flag(&self, name: &str) -> Option<&FlagRuntime> {
        self.flags.iter().find(|f| f.name == name).or_else(|| {
            self.flags
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(name))
        })
    }

    pub(crate) fn experiment(&self, name: &str) -> Option<&ExperimentRuntime> {
        self.experiments
            .iter()
            .find(|e| e.name == name)
            .or_else(|| {
                self.experiments
                    .iter()
                    .find(|e| e.name.eq_ignore_ascii_case(name))
            })
    }
}
