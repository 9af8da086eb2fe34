//! Targeting conditions as written (`{attribute, op, value}`) and their
//! checked, compiled form: attributes named, operators parsed, regexes
//! compiled once with a size bound, versions parsed. Evaluation against a
//! request is `edge::targeting`'s job; this module only decides what a
//! condition means, so `check-config` and the admin API refuse the same
//! things.

use serde::{Deserialize, Serialize};

/// Longest regex pattern accepted, in bytes.
pub(crate) const MAX_PATTERN_BYTES: usize = 256;
/// Compiled-regex size bound (the `regex` crate matches in linear time; this
/// bounds the memory and build time of one pattern).
const REGEX_SIZE_LIMIT: usize = 64 * 1024;
/// Most values of an `in` / `not_in` list, and most conditions of one rule.
pub(crate) const MAX_LIST_VALUES: usize = 1000;
pub(crate) const MAX_CONDITIONS: usize = 32;
/// Longest string a condition compares with.
pub(crate) const MAX_VALUE_BYTES: usize = 1024;

/// A condition as written in the TOML and the admin API's JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConditionConfig {
    /// `user_id`, `path`, `country`, `user_agent` (its family), or
    /// `header:<name>`, `cookie:<name>`, `query:<name>`.
    pub(crate) attribute: String,
    /// `equals`, `not_equals`, `in`, `not_in`, `starts_with`, `matches`,
    /// `lt`, `lte`, `gt`, `gte` (numbers), `version_lt`, `version_lte`,
    /// `version_gt`, `version_gte`, `version_eq` (semantic versions), `exists`.
    pub(crate) op: String,
    /// A string or number; a list of strings for `in` / `not_in`; absent for `exists`.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub(crate) value: serde_json::Value,
}

/// A request attribute a condition reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attribute {
    UserId,
    Path,
    /// The configured country header, believed from trusted peers only.
    Country,
    /// The user agent's family (`chrome`, `firefox`, `safari`, `edge`, ...).
    UserAgentFamily,
    /// Lowercased header name.
    Header(http::HeaderName),
    Cookie(String),
    Query(String),
}

/// A semantic version, compared numerically part by part; a missing part is
/// 0 (`1.2` == `1.2.0`), and a pre-release sorts before its release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Version {
    parts: [u64; 3],
    pre: Option<String>,
}

impl Version {
    /// `v1.2.3-beta.1+build` style; `None` when it is not one.
    pub(crate) fn parse(text: &str) -> Option<Version> {
        let text = text.trim();
        let text = text.strip_prefix(['v', 'V']).unwrap_or(text);
        let text = text.split_once('+').map_or(text, |(v, _)| v);
        let (core, pre) = match text.split_once('-') {
            Some((core, pre)) if !pre.is_empty() => (core, Some(pre.to_owned())),
            Some(_) => return None,
            None => (text, None),
        };
        let mut parts = [0u64; 3];
        for (n, piece) in core.split('.').enumerate() {
            if n == 3 || piece.is_empty() || !piece.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            parts[n] = piece.parse().ok()?;
        }
        Some(Version { parts, pre })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        self.parts.cmp(&other.parts).then_with(|| {
            match (&self.pre, &other.pre) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                // Identifiers compared numerically when both are numbers.
                (Some(a), Some(b)) => {
                    let mut x = a.split('.');
                    let mut y = b.split('.');
                    loop {
                        match (x.next(), y.next()) {
                            (None, None) => return Ordering::Equal,
                            (None, Some(_)) => return Ordering::Less,
                            (Some(_), None) => return Ordering::Greater,
                            (Some(p), Some(q)) => {
                                let o = match (p.parse::<u64>(), q.parse::<u64>()) {
                                    (Ok(m), Ok(n)) => m.cmp(&n),
                                    (Ok(_), Err(_)) => Ordering::Less,
                                    (Err(_), Ok(_)) => Ordering::Greater,
                                    (Err(_), Err(_)) => p.cmp(q),
                                };
                                if o != Ordering::Equal {
                                    return o;
                                }
                            }
                        }
                    }
                }
            }
        })
    }
}

/// A comparison, its operand parsed.
#[derive(Debug, Clone)]
pub(crate) enum Operator {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    StartsWith(String),
    Matches(regex::Regex),
    Number(std::cmp::Ordering, bool, f64),
    Version(std::cmp::Ordering, bool, Version),
    Exists,
}

/// A checked condition, ready to evaluate.
#[derive(Debug, Clone)]
pub(crate) struct Condition {
    pub(crate) attribute: Attribute,
    pub(crate) op: Operator,
}

fn string_operand(op: &str, value: &serde_json::Value) -> Result<String, String> {
    let s = match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        other => return Err(format!("`{op}` takes a string, got {other}")),
    };
    if s.len() > MAX_VALUE_BYTES {
        return Err(format!("value is longer than {MAX_VALUE_BYTES} bytes"));
    }
    Ok(s)
}

fn list_operand(op: &str, value: &serde_json::Value) -> Result<Vec<String>, String> {
    let serde_json::Value::Array(items) = value else {
        return Err(format!("`{op}` takes a list of strings"));
    };
    if items.len() > MAX_LIST_VALUES {
        return Err(format!("`{op}` takes at most {MAX_LIST_VALUES} values"));
    }
    items.iter().map(|v| string_operand(op, v)).collect()
}

impl Attribute {
    pub(crate) fn parse(text: &str) -> Result<Attribute, String> {
        let named = |kind: &str, name: &str| -> Result<String, String> {
            if name.is_empty() || name.len() > 128 {
                return Err(format!("{kind} name must be 1 to 128 bytes"));
            }
            Ok(name.to_owned())
        };
        Ok(match text {
            "user_id" => Attribute::UserId,
            "path" => Attribute::Path,
            "country" => Attribute::Country,
            "user_agent" => Attribute::UserAgentFamily,
            _ => match text.split_once(':') {
                Some(("header", name)) => Attribute::Header(
                    http::HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| format!("{name:?} is not a header name"))?,
                ),
                Some(("cookie", name)) => Attribute::Cookie(named("cookie", name)?),
                Some(("query", name)) => Attribute::Query(named("query parameter", name)?),
                _ => {
                    return Err(format!(
                        "unknown attribute {text:?}: use user_id, path, country, user_agent, \
                         header:<name>, cookie:<name> or query:<name>"
                    ))
                }
            },
        })
    }
}

impl Condition {
    /// Checks and compiles one condition.
    pub(crate) fn compile(cfg: &ConditionConfig) -> Result<Condition, String> {
        use std::cmp::Ordering::{Equal, Greater, Less};
        let attribute = Attribute::parse(&cfg.attribute)?;
        let op = cfg.op.as_str();
        let v = &cfg.value;
        let number = || {
            v.as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| format!("`{op}` takes a number"))
        };
        let version = || {
            v.as_str()
                .and_then(Version::parse)
                .ok_or_else(|| format!("`{op}` takes a version such as \"1.2.3\""))
        };
        let op = match op {
            "equals" => Operator::Equals(string_operand(op, v)?),
            "not_equals" => Operator::NotEquals(string_operand(op, v)?),
            "in" => Operator::In(list_operand(op, v)?),
            "not_in" => Operator::NotIn(list_operand(op, v)?),
            "starts_with" => Operator::StartsWith(string_operand(op, v)?),
            "matches" => {
                let pattern = string_operand(op, v)?;
                if pattern.len() > MAX_PATTERN_BYTES {
                    return Err(format!("pattern is longer than {MAX_PATTERN_BYTES} bytes"));
                }
                let re = regex::RegexBuilder::new(&pattern)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .dfa_size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| format!("invalid pattern: {e}"))?;
                Operator::Matches(re)
            }
            "lt" => Operator::Number(Less, false, number()?),
            "lte" => Operator::Number(Less, true, number()?),
            "gt" => Operator::Number(Greater, false, number()?),
            "gte" => Operator::Number(Greater, true, number()?),
            "version_lt" => Operator::Version(Less, false, version()?),
            "version_lte" => Operator::Version(Less, true, version()?),
            "version_gt" => Operator::Version(Greater, false, version()?),
            "version_gte" => Operator::Version(Greater, true, version()?),
            "version_eq" => Operator::Version(Equal, true, version()?),
            "exists" => Operator::Exists,
            other => {
                return Err(format!(
                    "unknown operator {other:?}: use equals, not_equals, in, not_in, \
                     starts_with, matches, lt, lte, gt, gte, version_lt, version_lte, \
                     version_gt, version_gte, version_eq or exists"
                ))
            }
        };
        Ok(Condition { attribute, op })
    }

    /// Checks and compiles a list, naming the failing index under `field`.
    pub(crate) fn compile_all(
        field: &str,
        list: &[ConditionConfig],
    ) -> Result<Vec<Condition>, (String, String)> {
        if list.len() > MAX_CONDITIONS {
            return Err((
                field.to_owned(),
                format!("at most {MAX_CONDITIONS} conditions"),
            ));
        }
        list.iter()
            .enumerate()
            .map(|(i, c)| Condition::compile(c).map_err(|e| (format!("{field}[{i}]"), e)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(attribute: &str, op: &str, value: serde_json::Value) -> Result<Condition, String> {
        Condition::compile(&ConditionConfig {
            attribute: attribute.into(),
            op: op.into(),
            value,
        })
    }

    #[test]
    fn versions_order_like_semver() {
        let v = |s| Version::parse(s).unwrap();
        assert!(v("1.2.3") < v("1.10.0"));
        assert_eq!(v("1.2"), v("1.2.0"));
        assert_eq!(v("v2.0.0+build.7"), v("2.0.0"));
        assert!(v("1.0.0-alpha") < v("1.0.0"));
        assert!(v("1.0.0-alpha") < v("1.0.0-alpha.1"));
        assert!(v("1.0.0-alpha.2") < v("1.0.0-alpha.10"));
        assert!(v("1.0.0-1") < v("1.0.0-alpha"));
        for bad in ["", "1..2", "1.2.3.4", "x", "1.2-", "-1"] {
            assert!(Version::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn refusals_say_why() {
        let cases = [
            (
                cond("country_code", "equals", json!("DE")),
                "unknown attribute",
            ),
            (
                cond("header:bad name", "equals", json!("x")),
                "not a header name",
            ),
            (cond("user_id", "like", json!("x")), "unknown operator"),
            (cond("user_id", "in", json!("x")), "list of strings"),
            (cond("header:x-n", "gt", json!("ten")), "takes a number"),
            (cond("header:x-v", "version_gt", json!("one")), "version"),
            (
                cond("path", "matches", json!("(unclosed")),
                "invalid pattern",
            ),
            (
                cond("path", "matches", json!("a".repeat(MAX_PATTERN_BYTES + 1))),
                "longer than",
            ),
            // Bounded repetition that would compile to a huge program.
            (
                cond("path", "matches", json!("(a{1000}){1000}")),
                "invalid pattern",
            ),
        ];
        for (got, want) in cases {
            let err = got.unwrap_err();
            assert!(err.contains(want), "{err} lacks {want}");
        }
        assert!(cond("cookie:plan", "exists", serde_json::Value::Null).is_ok());
        assert!(cond("query:ref", "in", json!(["a", "b"])).is_ok());
    }
}
