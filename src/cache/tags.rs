//! Cache tags: which tags a stored response carries, so that one purge can
//! drop every response about one thing (a user, a product, a section).
//!
//! Tags come from the origin (`Surrogate-Key`: space separated, `Cache-Tag`:
//! comma separated; names configurable) and from config rules whose
//! templates are filled from the URL (`user:{segment2}` for `/users/42`).
//! Never from who asked: a shared entry is filled by whichever client came
//! first, so a tag naming the requester would name the wrong user for
//! everyone else, and a purge by that user's tag would miss the page.
//! Pure: no I/O, no clock; the fetch phase calls [`Tagger::take_from_response`]
//! on every origin response and [`Tagger::entry_tags`] where it builds an entry.

use crate::config::tag_template::Template;
use crate::config::CacheConfig;
use crate::error::TagConfigError;
use http::header::{HeaderMap, HeaderName};
use std::collections::HashSet;
use std::sync::Arc;

/// Tags from a space-separated (`Surrogate-Key`) value.
pub(crate) fn parse_surrogate_key(value: &str) -> impl Iterator<Item = &str> {
    value.split_ascii_whitespace()
}

/// Tags from a comma-separated (`Cache-Tag`) value.
pub(crate) fn parse_cache_tag(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|t| !t.is_empty())
}

struct Rule {
    prefix: String,
    template: Template,
}

/// The configured tag sources and limits.
pub(crate) struct Tagger {
    surrogate_key: Option<HeaderName>,
    cache_tag: Option<HeaderName>,
    strip: bool,
    rules: Vec<Rule>,
    max_per_entry: usize,
    max_len: usize,
}

fn header_name(name: &str) -> Result<Option<HeaderName>, TagConfigError> {
    if name.is_empty() {
        return Ok(None);
    }
    HeaderName::from_bytes(name.as_bytes())
        .map(Some)
        .map_err(|e| TagConfigError::HeaderName(name.to_owned(), e))
}

impl Tagger {
    /// From `[cache.tags]` and `[[cache.tag_rule]]` (already validated by
    /// the config; the errors here only guard configs built in code).
    pub(crate) fn new(cfg: &CacheConfig) -> Result<Tagger, TagConfigError> {
        let t = &cfg.tags;
        let rules = cfg
            .tag_rules
            .iter()
            .map(|r| {
                Ok(Rule {
                    prefix: r.prefix.get_ref().clone(),
                    template: Template::parse(r.tag.get_ref()).map_err(TagConfigError::Template)?,
                })
            })
            .collect::<Result<Vec<_>, TagConfigError>>()?;
        Ok(Tagger {
            surrogate_key: header_name(&t.surrogate_key_header)?,
            cache_tag: header_name(&t.cache_tag_header)?,
            strip: t.strip_headers,
            rules,
            max_per_entry: t.max_per_entry,
            max_len: t.max_len,
        })
    }

    /// Reads the origin's tags from a response head and, unless configured
    /// otherwise, removes the tag headers so neither the client nor later
    /// hits see them (they are the origin's internal vocabulary).
    pub(crate) fn take_from_response(&self, headers: &mut HeaderMap) -> Vec<String> {
        let mut tags = Vec::new();
        if let Some(name) = &self.surrogate_key {
            for v in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
                tags.extend(parse_surrogate_key(v).map(str::to_string));
            }
        }
        if let Some(name) = &self.cache_tag {
            for v in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
                tags.extend(parse_cache_tag(v).map(str::to_string));
            }
        }
        if self.strip {
            for name in [&self.surrogate_key, &self.cache_tag].into_iter().flatten() {
                headers.remove(name);
            }
        }
        tags
    }

    /// The tags of an entry: rule tags first (the operator's, so an origin
    /// sending many tags cannot crowd them out), then the origin's;
    /// deduplicated, overlong ones dropped, at most `max_per_entry`.
    pub(crate) fn entry_tags(&self, from_origin: Vec<String>, path: &str) -> Vec<Arc<str>> {
        if from_origin.is_empty() && self.rules.is_empty() {
            return Vec::new();
        }
        let from_rules = self
            .rules
            .iter()
            .filter(|r| path.starts_with(&r.prefix))
            .filter_map(|r| r.template.render(path));
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for tag in from_rules.chain(from_origin) {
            if out.len() >= self.max_per_entry {
                break;
            }
            if tag.is_empty() || tag.len() > self.max_len || !is_visible_ascii(&tag) {
                continue;
            }
            if seen.insert(tag.clone()) {
                out.push(Arc::from(tag));
            }
        }
        out
    }
}

fn is_visible_ascii(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, TagRuleConfig};
    use http::HeaderValue;
    use toml::Spanned;

    fn rule(prefix: &str, tag: &str) -> TagRuleConfig {
        TagRuleConfig {
            prefix: Spanned::new(0..0, prefix.into()),
            tag: Spanned::new(0..0, tag.into()),
        }
    }

    fn tagger(rules: Vec<TagRuleConfig>, tweak: impl FnOnce(&mut CacheConfig)) -> Tagger {
        let mut c = Config::default().cache;
        c.tag_rules = rules;
        tweak(&mut c);
        Tagger::new(&c).unwrap()
    }

    fn strs(tags: &[Arc<str>]) -> Vec<&str> {
        tags.iter().map(|t| &**t).collect()
    }

    #[test]
    fn origin_headers_are_parsed_and_stripped() {
        let t = tagger(vec![], |_| {});
        let mut h = HeaderMap::new();
        h.insert("surrogate-key", HeaderValue::from_static(" a  b\tc "));
        h.append("surrogate-key", HeaderValue::from_static("d"));
        h.insert("cache-tag", HeaderValue::from_static("e, f ,,g"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        let tags = t.take_from_response(&mut h);
        assert_eq!(tags, ["a", "b", "c", "d", "e", "f", "g"]);
        assert!(!h.contains_key("surrogate-key") && !h.contains_key("cache-tag"));
        assert!(h.contains_key("content-type"));
    }

    #[test]
    fn header_names_are_configurable_and_stripping_optional() {
        let t = tagger(vec![], |c| {
            c.tags.surrogate_key_header = "X-Keys".into();
            c.tags.cache_tag_header = String::new();
            c.tags.strip_headers = false;
        });
        let mut h = HeaderMap::new();
        h.insert("x-keys", HeaderValue::from_static("a b"));
        h.insert("cache-tag", HeaderValue::from_static("ignored"));
        assert_eq!(t.take_from_response(&mut h), ["a", "b"]);
        assert!(h.contains_key("x-keys"));
    }

    #[test]
    fn entry_tags_rules_first_deduplicated_and_capped() {
        let t = tagger(
            vec![
                rule("/users/", "user:{segment2}"),
                rule("/", "s:{segment1}"),
            ],
            |c| {
                c.tags.max_per_entry = 4;
                c.tags.max_len = 10;
            },
        );
        let origin = vec![
            "user:u1".to_string(),
            "x".repeat(11),
            "ok".into(),
            "bad tag".into(),
            "more".into(),
            "over".into(),
        ];
        let tags = t.entry_tags(origin, "/users/u1");
        assert_eq!(strs(&tags), ["user:u1", "s:users", "ok", "more"]);
        // the user rule does not apply outside its prefix
        let tags = t.entry_tags(vec![], "/items/1");
        assert_eq!(strs(&tags), ["s:items"]);
    }

    #[test]
    fn nothing_configured_costs_nothing() {
        let t = tagger(vec![], |_| {});
        assert!(t.entry_tags(vec![], "/a").is_empty());
    }
}
