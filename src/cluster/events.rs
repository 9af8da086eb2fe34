//! The purge and version broadcast: every instance's memory cache learns of
//! purges and version bumps made through any instance's admin API.
//!
//! Events go into a Redis Stream per region (`XADD ... MAXLEN ~ N`), each
//! with a sequence number from a counter bumped in the same Lua script, so
//! a reader can tell a gap from a quiet period. Every instance reads its
//! local region's stream with `XREAD BLOCK` from the last id it saw: after
//! a disconnect it resumes there and replays what it missed. When the gap
//! cannot be replayed (the stream was trimmed past it, or Redis restarted
//! empty), it drops its whole memory cache instead of serving what may have
//! been purged meanwhile. An instance skips its own events: the admin call
//! applied them already.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::cache::storage::Storage;
use crate::protocol::path::normalize_target;
use crate::redis::{Redis, RedisError, Region};

/// Entries a region's stream keeps (approximately: `MAXLEN ~`). A reader
/// cut off for longer than this many events drops its cache on return.
const STREAM_MAX_LEN: u64 = 10_000;
/// How long one `XREAD` blocks on the server before asking again.
const READ_BLOCK: Duration = Duration::from_millis(1_000);
/// Entries one `XREAD` returns at most.
const READ_COUNT: usize = 100;
/// Pause between reconnect attempts of the reader.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// One thing every instance applies to its memory cache.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Event {
    /// `POST /purge`: targets as the admin API validated them.
    Purge(Purge),
    /// The global version was bumped (or raised by a reload) to `version`.
    Version { version: u64 },
    /// A route's version was bumped.
    RouteVersion { route: String },
}

/// Purge targets (see `admin::purge::PurgeRequest`, which validates them).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Purge {
    #[serde(default)]
    pub(crate) urls: Vec<String>,
    #[serde(default)]
    pub(crate) prefixes: Vec<String>,
    #[serde(default)]
    pub(crate) tags: Vec<String>,
    #[serde(default)]
    pub(crate) soft: bool,
}

impl Purge {
    /// Applies the purge to `store`; returns how many entries it touched.
    /// URLs and prefixes are matched in the normal form keys are in.
    pub(crate) fn apply(&self, store: &dyn Storage) -> usize {
        let mut purged = 0;
        for url in &self.urls {
            if let Ok(url) = normalize_target(url) {
                purged += store.purge_path(&url, self.soft);
            }
        }
        for prefix in &self.prefixes {
            if let Ok(prefix) = normalize_target(prefix) {
                purged += store.purge_prefix(&prefix, self.soft);
            }
        }
        for tag in &self.tags {
            // An unknown tag simply matches nothing.
            purged += store.purge_tag(tag, self.soft);
        }
        purged
    }
}

/// What the broadcast applies events to: the gateway's memory cache and
/// versions (implemented by the proxy layer, which owns them).
pub(crate) trait LocalCache: Send + Sync {
    /// Applies an event another instance published.
    fn apply(&self, event: &Event);
    /// Forgets every stored response: events were lost.
    fn drop_all(&self);
}

/// Increments the region's sequence and appends the event in one step, so
/// that sequence order is stream order.
const PUBLISH: &str = r"
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'seq', seq, 'from', ARGV[1], 'event', ARGV[2])
return seq
";

/// The stream's keys under the deployment's prefix.
pub(crate) struct Channel {
    pub(crate) stream: String,
    pub(crate) sequence: String,
}

impl Channel {
    pub(crate) fn new(redis: &Redis) -> Channel {
        Channel {
            stream: redis.key("cluster:events"),
            sequence: redis.key("cluster:events:seq"),
        }
    }
}

/// The outcome of publishing one event.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Published {
    /// Regions that took the event.
    pub(crate) regions: Vec<String>,
    /// The sequence number the local region gave the event.
    #[serde(skip)]
    pub(crate) local_seq: Option<u64>,
    /// Regions that did not (down, slow): their instances miss it until
    /// they notice the gap.
    pub(crate) failed: Vec<String>,
}

/// Appends `event` to every region's stream, in parallel, each bounded by
/// the Redis timeout.
pub(crate) async fn publish(
    redis: &Redis,
    channel: &Channel,
    instance: &str,
    event: &Event,
) -> Published {
    let payload = match serde_json::to_string(event) {
        Ok(p) => p,
        Err(e) => {
            // Plain data: cannot fail; kept typed rather than unwrapped.
            tracing::error!(error = %e, "cluster event not encodable");
            return Published {
                regions: vec![],
                local_seq: None,
                failed: redis
                    .regions()
                    .iter()
                    .map(|r| r.name().to_owned())
                    .collect(),
            };
        }
    };
    let script = ::redis::Script::new(PUBLISH);
    let sends = redis.regions().iter().map(|region| {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&channel.sequence)
            .key(&channel.stream)
            .arg(instance)
            .arg(&payload)
            .arg(STREAM_MAX_LEN);
        async move {
            let result: Result<u64, RedisError> = region.script(&invocation).await;
            (region.name().to_owned(), result)
        }
    });
    let mut published = Published {
        regions: vec![],
        local_seq: None,
        failed: vec![],
    };
    let local = redis.local().name();
    for (name, result) in crate::kv::redis::join_all(sends).await {
        match result {
            Ok(seq) => {
                if name == local {
                    published.local_seq = Some(seq);
                }
                published.regions.push(name);
            }
            Err(e) => {
                tracing::warn!(region = %name, error = %e, "cluster event not published");
                published.failed.push(name);
            }
        }
    }
    published
}

/// Where the reader is in its region's stream.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Position {
    /// The last stream id read (`0-0` before any).
    pub(crate) id: String,
    /// The sequence number of that entry, when there was one.
    pub(crate) seq: Option<u64>,
}

/// One stream entry as read.
type RawEntry = (String, HashMap<String, Vec<u8>>);
/// An `XREAD` answer: per stream, its entries (nil when the block timed out).
type XreadReply = Option<Vec<(String, Vec<RawEntry>)>>;

/// A decoded stream entry.
#[derive(Debug)]
struct Received {
    id: String,
    seq: u64,
    from: String,
    event: Option<Event>,
}

fn decode((id, mut fields): RawEntry) -> Option<Received> {
    let seq = std::str::from_utf8(&fields.remove("seq")?)
        .ok()?
        .parse()
        .ok()?;
    let from = String::from_utf8(fields.remove("from")?).ok()?;
    // An event this version cannot read is skipped (and logged), not fatal.
    let event = fields
        .remove("event")
        .and_then(|e| serde_json::from_slice(&e).ok());
    Some(Received {
        id,
        seq,
        from,
        event,
    })
}

/// Shared with the gateway: the reader's position (the "generation" the
/// response tier keys carry) and whether it is connected.
#[derive(Default)]
pub(crate) struct ReaderState {
    /// Sequence number of the last event applied (0: none yet).
    pub(crate) applied_seq: std::sync::atomic::AtomicU64,
    pub(crate) connected: std::sync::atomic::AtomicBool,
    /// Times the reader dropped the memory cache because of a gap.
    pub(crate) cache_drops: std::sync::atomic::AtomicU64,
}

/// Starts the reader of the local region's stream; it stops when `target`
/// is gone.
pub(crate) fn spawn_reader(
    redis: Arc<Redis>,
    channel: Arc<Channel>,
    instance: Arc<str>,
    state: Arc<ReaderState>,
    target: Weak<dyn LocalCache>,
) {
    tokio::spawn(async move {
        let region = Arc::clone(redis.local());
        let mut position: Option<Position> = None;
        loop {
            if target.strong_count() == 0 {
                return;
            }
            match read_until_error(&region, &channel, &instance, &state, &target, &mut position)
                .await
            {
                Ok(()) => return, // the gateway is gone
                Err(e) => {
                    state
                        .connected
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    region.log_fault(&e);
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                }
            }
        }
    });
}

/// Why the reader stopped reading for a while.
#[derive(Debug, thiserror::Error)]
#[error("cluster event reader on redis region {region}")]
struct ReaderError {
    region: String,
    #[source]
    source: ::redis::RedisError,
}

/// Connects, catches up from `position` and follows the stream until a
/// connection error (returned) or until the target is dropped (`Ok`).
async fn read_until_error(
    region: &Region,
    channel: &Channel,
    instance: &str,
    state: &ReaderState,
    target: &Weak<dyn LocalCache>,
    position: &mut Option<Position>,
) -> Result<(), ReaderError> {
    use std::sync::atomic::Ordering::Relaxed;
    let fail = |source| ReaderError {
        region: region.name().to_owned(),
        source,
    };
    // A connection of its own: XREAD BLOCK holds the connection it runs on.
    let config = ::redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(region.timeout()))
        .set_response_timeout(Some(READ_BLOCK + region.timeout()));
    let mut conn = region
        .client()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(fail)?;
    match position {
        None => {
            // First start: the memory cache is empty, nothing to replay;
            // follow from the newest entry.
            let last: Vec<RawEntry> = ::redis::cmd("XREVRANGE")
                .arg(&channel.stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
                .map_err(fail)?;
            *position = Some(match last.into_iter().next().and_then(decode) {
                Some(r) => Position {
                    id: r.id,
                    seq: Some(r.seq),
                },
                None => Position {
                    id: "0-0".into(),
                    seq: None,
                },
            });
        }
        Some(p) if p.id != "0-0" => {
            // Back after a disconnect: can we replay from where we were?
            let still_there: Vec<RawEntry> = ::redis::cmd("XRANGE")
                .arg(&channel.stream)
                .arg(&p.id)
                .arg(&p.id)
                .query_async(&mut conn)
                .await
                .map_err(fail)?;
            if still_there.is_empty() {
                // Trimmed past it, or Redis lost the stream: whatever was
                // purged meanwhile is unknown, so nothing stored is trusted.
                drop_all(
                    target,
                    state,
                    "the stream no longer holds the last event read",
                );
                // What follows is not checked against the old sequence
                // (after a restart it starts again at 1).
                p.seq = None;
            }
        }
        Some(_) => {}
    }
    if let Some(seq) = position.as_ref().and_then(|p| p.seq) {
        state.applied_seq.store(seq, Relaxed);
    }
    state.connected.store(true, Relaxed);
    loop {
        let Some(p) = position.as_mut() else {
            return Ok(());
        };
        let reply: XreadReply = ::redis::cmd("XREAD")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&channel.stream)
            .arg(&p.id)
            .query_async(&mut conn)
            .await
            .map_err(fail)?;
        let Some(target) = target.upgrade() else {
            return Ok(());
        };
        for (_, entries) in reply.unwrap_or_default() {
            for raw in entries {
                let id = raw.0.clone();
                let Some(received) = decode(raw) else {
                    tracing::warn!(id = %id, "unreadable cluster event skipped");
                    p.id = id;
                    continue;
                };
                let expected = p.seq.map(|s| s.saturating_add(1));
                // The generation moves before the memory cache changes, so
                // that no request reads a shared copy of the old generation
                // into memory after the purge (see `Cluster::before_fetch`).
                if expected.is_some_and(|e| e != received.seq) {
                    // Events between were lost (or the sequence restarted).
                    state.applied_seq.store(received.seq, Relaxed);
                    target.drop_all();
                    state.cache_drops.fetch_add(1, Relaxed);
                    tracing::warn!(
                        expected = expected.unwrap_or(0),
                        got = received.seq,
                        "cluster events missed; memory cache dropped"
                    );
                } else {
                    state.applied_seq.fetch_max(received.seq, Relaxed);
                }
                p.id = received.id;
                p.seq = Some(received.seq);
                if received.from != instance {
                    match &received.event {
                        Some(event) => target.apply(event),
                        None => {
                            // A newer instance's event: to be safe, forget
                            // what it might have invalidated.
                            tracing::warn!(
                                seq = received.seq,
                                "unknown cluster event; memory cache dropped"
                            );
                            target.drop_all();
                            state.cache_drops.fetch_add(1, Relaxed);
                        }
                    }
                }
            }
        }
    }
}

fn drop_all(target: &Weak<dyn LocalCache>, state: &ReaderState, why: &str) {
    if let Some(t) = target.upgrade() {
        t.drop_all();
        state
            .cache_drops
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            reason = why,
            "cluster events may be lost; memory cache dropped"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_json() {
        for e in [
            Event::Purge(Purge {
                urls: vec!["/a?b=1".into()],
                prefixes: vec!["/p/".into()],
                tags: vec!["t".into()],
                soft: true,
            }),
            Event::Version { version: 7 },
            Event::RouteVersion {
                route: "api".into(),
            },
        ] {
            let text = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), e);
        }
    }

    #[test]
    fn entries_without_a_sequence_are_not_decoded() {
        let mut fields = HashMap::new();
        fields.insert("from".to_owned(), b"x".to_vec());
        assert!(decode(("1-0".into(), fields.clone())).is_none());
        fields.insert("seq".to_owned(), b"4".to_vec());
        fields.insert("event".to_owned(), b"{\"kind\":\"nope\"}".to_vec());
        let r = decode(("1-0".into(), fields)).unwrap();
        assert_eq!(r.seq, 4);
        assert!(r.event.is_none());
    }
}
