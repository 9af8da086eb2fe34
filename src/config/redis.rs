//! The `[redis]` schema: where shared state lives when several instances
//! run as one gateway.
//!
//! One region is a single `url`; several are `[[redis.regions]]` with this
//! instance's `region` named among them. State writes go to every region,
//! reads to the local one first (see `kv::redis`).

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;

/// Most regions one gateway writes to (each write fans out to all of them).
pub(crate) const MAX_REGIONS: usize = 16;
/// Longest `key_prefix`.
pub(crate) const MAX_KEY_PREFIX_BYTES: usize = 128;
/// Upper bound of `timeout_ms`: a Redis call may never hold a request longer.
pub(crate) const MAX_TIMEOUT_MS: u64 = 60_000;

/// `[redis]`: the shared state store (Redis or Valkey, standalone).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// One region's server, e.g. `redis://127.0.0.1:6379` (or use `regions`).
    pub url: Option<Spanned<String>>,
    /// Every Redis call (connect, command, script) gives up after this long.
    pub timeout_ms: u64,
    /// Prefix of every key kvgate writes; default `kvgate:<edge.environment>:`,
    /// so two environments sharing one Redis never collide.
    pub key_prefix: Option<String>,
    /// This instance's region: reads go there first.
    pub region: Option<String>,
    /// Several regions, each its own Redis; writes reach all of them.
    pub regions: Vec<RegionConfig>,
    /// Writes a region missed, kept to be replayed when it is back (per
    /// region; past it the oldest are dropped and counted).
    pub retry_queue: usize,
    /// Hot-path reads are served from a local copy this long (0: off).
    pub cache_ttl_ms: u64,
    /// Entries of that local copy at most.
    pub cache_max_entries: usize,
    /// Bytes of that local copy at most (keys, values and metadata).
    pub cache_max_bytes: usize,
    /// Redis keys each shared counter is spread over.
    pub counter_shards: u32,
    /// How often local counter deltas are added to the shared totals.
    pub counter_flush_ms: u64,
    /// Every region is a Redis Cluster and its url one of its nodes (a
    /// single url may say so itself with `redis+cluster://`). Every kvgate
    /// key then carries one hash tag, so multi-key scripts stay in one slot.
    pub cluster: bool,
}

/// One `[[redis.regions]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// The region's name, e.g. `eu`.
    pub name: String,
    /// Its Redis server.
    pub url: Spanned<String>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            timeout_ms: 250,
            key_prefix: None,
            region: None,
            regions: Vec::new(),
            retry_queue: 10_000,
            cache_ttl_ms: 1_000,
            cache_max_entries: 10_000,
            cache_max_bytes: 16 * 1024 * 1024,
            counter_shards: 8,
            counter_flush_ms: 1_000,
            cluster: false,
        }
    }
}

/// A region to connect to, resolved from either form of the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RegionTarget {
    pub(crate) name: String,
    /// Always `redis://` (a `redis+cluster://` url is turned into one).
    pub(crate) url: String,
    /// A Redis Cluster, `url` one of its nodes.
    pub(crate) cluster: bool,
}

/// The scheme that marks a url as a Redis Cluster node.
const CLUSTER_SCHEME: &str = "redis+cluster://";

/// The plain `redis://` url, and whether `url` named a cluster.
fn split_cluster(url: &str) -> (String, bool) {
    match url.strip_prefix(CLUSTER_SCHEME) {
        Some(rest) => (format!("redis://{rest}"), true),
        None => (url.to_owned(), false),
    }
}

impl RedisConfig {
    /// The config `--redis URL` means: one region at `url`.
    pub(crate) fn single(url: &str) -> RedisConfig {
        RedisConfig {
            url: Some(Spanned::new(0..0, url.to_owned())),
            ..RedisConfig::default()
        }
    }

    /// Regions to connect to, and the index of this instance's own.
    pub(crate) fn targets(&self) -> (Vec<RegionTarget>, usize) {
        let target = |name: String, url: &str| {
            let (url, cluster) = split_cluster(url);
            RegionTarget {
                name,
                url,
                cluster: cluster || self.cluster,
            }
        };
        if let Some(url) = &self.url {
            let name = self.region.clone().unwrap_or_else(|| "default".into());
            return (vec![target(name, url.get_ref())], 0);
        }
        let targets: Vec<RegionTarget> = self
            .regions
            .iter()
            .map(|r| target(r.name.clone(), r.url.get_ref()))
            .collect();
        let local = self
            .region
            .as_ref()
            .and_then(|want| targets.iter().position(|t| &t.name == want))
            .unwrap_or(0);
        (targets, local)
    }

    /// The key prefix in effect: the configured one, else one per environment.
    ///
    /// On a Redis Cluster the whole prefix is a hash tag (`{kvgate:production:}`
    /// unless the configured one has a tag already): every key kvgate writes
    /// is then in one slot, so the Lua scripts, the atomic pipelines and the
    /// two-stream `XREAD` that touch several keys are single-slot. The price:
    /// one master holds all of kvgate's keys (the cluster gives failover,
    /// not spreading).
    pub(crate) fn effective_key_prefix(&self, environment: &str) -> String {
        let prefix = self
            .key_prefix
            .clone()
            .unwrap_or_else(|| format!("kvgate:{environment}:"));
        let cluster = self.targets().0.iter().any(|t| t.cluster);
        if cluster && !has_hash_tag(&prefix) {
            format!("{{{prefix}}}")
        } else {
            prefix
        }
    }

    pub(crate) fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms)
    }

    /// Checks the section; errors name the file, line and key.
    pub(crate) fn validate(&self, src: &str, file: &str) -> Result<(), ConfigError> {
        let at =
            |(line, column): (usize, usize), key: &str, message: String, hint: &str| ConfigError {
                file: file.to_owned(),
                line,
                column,
                message: format!("{key}: {message}"),
                hint: Some(hint.to_owned()),
            };
        let plain = |key: &str| super::locate_plain_key(src, "redis", key);
        let spanned = |s: &Spanned<String>| {
            if s.span().is_empty() {
                (0, 0)
            } else {
                super::line_col(src, s.span().start)
            }
        };
        match (&self.url, self.regions.is_empty()) {
            (Some(url), false) => {
                return Err(at(
                    spanned(url),
                    "redis.url",
                    "give either `url` (one region) or [[redis.regions]], not both".into(),
                    "with several regions, put each one's url in its [[redis.regions]] entry",
                ))
            }
            (None, true) => {
                return Err(at(
                    header_line(src, "redis"),
                    "redis.url",
                    "no Redis server: set `url` or add [[redis.regions]]".into(),
                    "e.g. url = \"redis://127.0.0.1:6379\"",
                ))
            }
            _ => {}
        }
        if let Some(url) = &self.url {
            check_url(url.get_ref()).map_err(|m| at(spanned(url), "redis.url", m, URL_HINT))?;
        }
        if self.regions.len() > MAX_REGIONS {
            return Err(at(
                header_line(src, "redis.regions"),
                "redis.regions",
                format!("at most {MAX_REGIONS} regions"),
                "every write goes to every region",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &self.regions {
            let key = format!("redis.regions[{}]", r.name);
            if !valid_region_name(&r.name) {
                return Err(at(
                    spanned(&r.url),
                    &format!("{key}.name"),
                    "must be 1 to 32 letters, digits, '-' or '_'".into(),
                    "e.g. name = \"eu\"",
                ));
            }
            if !seen.insert(r.name.as_str()) {
                return Err(at(
                    spanned(&r.url),
                    &format!("{key}.name"),
                    "two regions have this name".into(),
                    "every region needs a name of its own",
                ));
            }
            check_url(r.url.get_ref())
                .map_err(|m| at(spanned(&r.url), &format!("{key}.url"), m, URL_HINT))?;
        }
        match &self.region {
            Some(name) if !valid_region_name(name) => {
                return Err(at(
                    plain("region"),
                    "redis.region",
                    "must be 1 to 32 letters, digits, '-' or '_'".into(),
                    "e.g. region = \"eu\"",
                ))
            }
            Some(name)
                if !self.regions.is_empty() && !self.regions.iter().any(|r| &r.name == name) =>
            {
                return Err(at(
                    plain("region"),
                    "redis.region",
                    format!("{name:?} is not one of the [[redis.regions]]"),
                    "name this instance's region as one of the regions listed",
                ))
            }
            None if self.regions.len() > 1 => {
                return Err(at(
                    header_line(src, "redis"),
                    "redis.region",
                    "several regions are listed but this instance's is not named".into(),
                    "e.g. region = \"eu\": reads go to that region first",
                ))
            }
            _ => {}
        }
        if let Some(prefix) = &self.key_prefix {
            if prefix.is_empty()
                || prefix.len() > MAX_KEY_PREFIX_BYTES
                || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(at(
                    plain("key_prefix"),
                    "redis.key_prefix",
                    format!("must be 1 to {MAX_KEY_PREFIX_BYTES} bytes without spaces or control characters"),
                    "e.g. key_prefix = \"kvgate:production:\"",
                ));
            }
        }
        let ranges: [(&str, u64, u64, u64, &str); 5] = [
            (
                "timeout_ms",
                self.timeout_ms,
                1,
                MAX_TIMEOUT_MS,
                "milliseconds, e.g. 250",
            ),
            (
                "retry_queue",
                self.retry_queue as u64,
                1,
                1_000_000,
                "writes per region, e.g. 10000",
            ),
            (
                "cache_ttl_ms",
                self.cache_ttl_ms,
                0,
                60_000,
                "milliseconds, e.g. 1000 (0 turns the local copy off)",
            ),
            (
                "counter_shards",
                u64::from(self.counter_shards),
                1,
                1024,
                "e.g. 8",
            ),
            (
                "counter_flush_ms",
                self.counter_flush_ms,
                10,
                3_600_000,
                "milliseconds, e.g. 1000",
            ),
        ];
        for (key, value, min, max, hint) in ranges {
            if !(min..=max).contains(&value) {
                return Err(at(
                    plain(key),
                    &format!("redis.{key}"),
                    format!("must be between {min} and {max}"),
                    hint,
                ));
            }
        }
        Ok(())
    }
}

const URL_HINT: &str = "e.g. \"redis://127.0.0.1:6379\", \"redis://:password@host:6379/0\" or \"redis+cluster://10.0.0.5:7000\"";

/// Region names appear in logs, metrics labels and keys: keep them plain.
fn valid_region_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `key` has a Redis Cluster hash tag: a `{` followed later by a
/// `}` with something between.
fn has_hash_tag(key: &str) -> bool {
    key.find('{')
        .and_then(|open| key[open + 1..].find('}'))
        .is_some_and(|len| len > 0)
}

/// A URL the redis client accepts, on plain `redis://` (TLS is not built
/// in), or `redis+cluster://` for a node of a Redis Cluster.
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    if !url.starts_with("redis://") && !url.starts_with(CLUSTER_SCHEME) {
        return Err(format!(
            "{url:?} must start with redis:// or {CLUSTER_SCHEME} (rediss:// is not supported)"
        ));
    }
    ::redis::Client::open(split_cluster(url).0)
        .map(drop)
        .map_err(|e| format!("{url:?} is not a Redis URL: {e}"))
}

/// The line of the `[table]` or `[[table]]` header, when present.
fn header_line(src: &str, table: &str) -> (usize, usize) {
    src.lines()
        .position(|l| l.trim().trim_matches(|c| c == '[' || c == ']').trim() == table)
        .map_or((0, 0), |i| (i + 1, 1))
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, StateBackend};

    #[test]
    fn one_url_is_one_region() {
        let c = Config::parse(
            "[state]\nbackend = \"redis\"\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n",
            "k.toml",
        )
        .unwrap();
        assert_eq!(c.state.backend, StateBackend::Redis);
        let r = c.redis.unwrap();
        let (targets, local) = r.targets();
        assert_eq!(targets.len(), 1);
        assert_eq!((targets[0].name.as_str(), local), ("default", 0));
        assert_eq!(r.timeout_ms, 250);
        assert_eq!(r.effective_key_prefix("preview"), "kvgate:preview:");
    }

    #[test]
    fn a_cluster_by_setting_or_by_scheme_tags_the_prefix() {
        for redis in [
            "url = \"redis://10.0.0.1:7000\"\ncluster = true\n",
            "url = \"redis+cluster://10.0.0.1:7000\"\n",
        ] {
            let c = Config::parse(&format!("[redis]\n{redis}"), "k.toml").unwrap();
            let r = c.redis.unwrap();
            let (targets, _) = r.targets();
            assert!(targets[0].cluster, "{redis}");
            assert_eq!(targets[0].url, "redis://10.0.0.1:7000");
            assert_eq!(r.effective_key_prefix("preview"), "{kvgate:preview:}");
        }
        // A prefix with a tag of its own keeps it.
        let c = Config::parse(
            "[redis]\nurl = \"redis+cluster://a:1\"\nkey_prefix = \"app:{kv}:\"\n",
            "k.toml",
        )
        .unwrap();
        assert_eq!(c.redis.unwrap().effective_key_prefix("x"), "app:{kv}:");
        // Standalone: no tag.
        let c = Config::parse("[redis]\nurl = \"redis://a:1\"\n", "k.toml").unwrap();
        assert!(!c.redis.unwrap().targets().0[0].cluster);
        // Still refused: TLS.
        let e = Config::parse("[redis]\nurl = \"rediss://a:1\"\n", "k.toml").unwrap_err();
        assert!(e.to_string().contains("rediss:// is not supported"), "{e}");
        assert!(e.to_string().contains("k.toml:2"), "{e}");
    }

    #[test]
    fn regions_and_the_local_one() {
        let c = Config::parse(
            "[redis]\nregion = \"us\"\n[[redis.regions]]\nname = \"eu\"\nurl = \"redis://10.0.0.1:6379\"\n[[redis.regions]]\nname = \"us\"\nurl = \"redis://10.0.0.2:6379\"\n",
            "k.toml",
        )
        .unwrap();
        let (targets, local) = c.redis.unwrap().targets();
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[local].name, "us");
    }

    #[test]
    fn errors_name_the_line_and_key() {
        let cases: &[(&str, usize, &str)] = &[
            ("[redis]\ntimeout_ms = 5\nurl = \"http://x\"\n", 3, "redis.url"),
            ("[redis]\nurl = \"redis://a:1\"\ntimeout_ms = 0\n", 3, "redis.timeout_ms"),
            ("\n[redis]\ntimeout_ms = 5\n", 2, "redis.url"),
            (
                "[redis]\nurl = \"redis://a:1\"\n[[redis.regions]]\nname = \"eu\"\nurl = \"redis://b:1\"\n",
                2,
                "redis.url",
            ),
            (
                "[redis]\nregion = \"ap\"\n[[redis.regions]]\nname = \"eu\"\nurl = \"redis://b:1\"\n",
                2,
                "redis.region",
            ),
            (
                "[redis]\n[[redis.regions]]\nname = \"eu\"\nurl = \"redis://b:1\"\n[[redis.regions]]\nname = \"eu\"\nurl = \"redis://c:1\"\n",
                7,
                "redis.regions[eu].name",
            ),
            (
                "[redis]\nurl = \"redis://a:1\"\nkey_prefix = \"a b\"\n",
                3,
                "redis.key_prefix",
            ),
        ];
        for (src, line, key) in cases {
            let e = Config::parse(src, "k.toml").unwrap_err();
            assert_eq!(e.line, *line, "{src}: {e}");
            assert!(e.message.starts_with(key), "{src}: {e}");
            assert_eq!(e.file, "k.toml");
        }
        // The servers may come from --redis instead.
        Config::parse("[state]\nbackend = \"redis\"\n", "k.toml").unwrap();
        let e =
            Config::parse("[redis]\nurl = \"redis://a:1\"\ntimeout = 5\n", "k.toml").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
    }
}
