//! The purge, version and state broadcast: every instance's memory cache
//! learns of purges and version bumps made through any instance's admin
//! API, and every instance's local copy of edge state (`kv::cached`) of
//! the keys other instances wrote.
//!
//! Two Redis Streams per region (`XADD ... MAXLEN ~ N`): `cluster:events`
//! for the memory cache, `cluster:state` for state keys. Each entry has a
//! sequence number from a counter bumped in the same Lua script, so a
//! reader can tell a gap from a quiet period, and a message id (publisher,
//! counter) that is the same in every region. Messages go to every region
//! in parallel; a region that fails one gets it later from a bounded retry
//! queue, so a region that was down catches up when it is back.
//!
//! Every instance reads both streams of every region with one `XREAD BLOCK`
//! per region, from the last ids it saw: after a disconnect it resumes
//! there and replays what it missed; a message that arrives through several
//! regions is applied once (the local region's copy is always applied, as
//! it moves the generation the shared response tier keys carry). When a
//! region's gap cannot be replayed (the stream was trimmed past it, or
//! Redis restarted empty), the instance drops its whole memory cache, unless
//! another region was followed without a break for the whole time: every
//! message reached, or is queued for, every region. A state gap drops the
//! local state copy (cheap: it is a short-lived cache anyway). An instance
//! skips its own messages: it applied them already.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::cache::storage::Storage;
use crate::kv::cached::{CachedKv, WriteListener};
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
/// Messages a region's retry queue holds; the oldest goes when it is full.
const RETRY_CAPACITY: usize = 1_000;
/// How often the retry queues are drained.
const RETRY_INTERVAL: Duration = Duration::from_millis(200);
/// Message ids remembered to apply a message once over several regions.
const SEEN_CAPACITY: usize = 4_096;
/// State keys waiting to be broadcast; writes past it are not broadcast
/// (the other instances see them after their copy's TTL) and counted.
const STATE_QUEUE: usize = 4_096;
/// Most state keys in one message.
const STATE_BATCH: usize = 256;

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

/// Increments the region's sequence and appends the message in one step,
/// so that sequence order is stream order. ARGV: from, message id, payload
/// field name, payload, max length.
const PUBLISH: &str = r"
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'seq', seq, 'from', ARGV[1], 'id', ARGV[2], ARGV[3], ARGV[4])
return seq
";

/// A stream and the counter that numbers its entries.
pub(crate) struct StreamKeys {
    pub(crate) stream: String,
    pub(crate) sequence: String,
}

/// The streams under the deployment's prefix.
pub(crate) struct Channel {
    /// Purges and version bumps (field `event`).
    pub(crate) cache: StreamKeys,
    /// State keys written (field `keys`).
    pub(crate) state: StreamKeys,
}

impl Channel {
    pub(crate) fn new(redis: &Redis) -> Channel {
        Channel {
            cache: StreamKeys {
                stream: redis.key("cluster:events"),
                sequence: redis.key("cluster:events:seq"),
            },
            state: StreamKeys {
                stream: redis.key("cluster:state"),
                sequence: redis.key("cluster:state:seq"),
            },
        }
    }

    fn keys(&self, kind: Kind) -> &StreamKeys {
        match kind {
            Kind::Cache => &self.cache,
            Kind::State => &self.state,
        }
    }
}

/// Which stream a message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Cache,
    State,
}

impl Kind {
    fn field(self) -> &'static str {
        match self {
            Kind::Cache => "event",
            Kind::State => "keys",
        }
    }
}

/// A message ready to send (and to resend from a retry queue).
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    kind: Kind,
    id: u64,
    payload: Arc<str>,
}

/// The outcome of publishing one event.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Published {
    /// Regions that took the event.
    pub(crate) regions: Vec<String>,
    /// The sequence number the local region gave the event.
    #[serde(skip)]
    pub(crate) local_seq: Option<u64>,
    /// Regions that did not (down, slow): queued for them, they get it
    /// when they are back.
    pub(crate) failed: Vec<String>,
}

/// Shared with the gateway: the local reader's position (the "generation"
/// the response tier keys carry) and whether it is connected.
#[derive(Default)]
pub(crate) struct ReaderState {
    /// Sequence number of the last event applied from the local region's
    /// cache stream (0: none yet).
    pub(crate) applied_seq: AtomicU64,
    /// Whether the local region's reader is connected.
    pub(crate) connected: AtomicBool,
    /// Times the memory cache was dropped because events were lost.
    pub(crate) cache_drops: AtomicU64,
}

/// One region's reader, as the others and `/readyz` see it.
#[derive(Default)]
struct RegionFollow {
    /// 1 + milliseconds since `Broadcast::epoch` when the reader last
    /// connected; 0 while it is not connected.
    connected_since: AtomicU64,
    /// Messages waiting for this region (it failed them).
    retry: Mutex<VecDeque<Outgoing>>,
    /// Messages dropped from the full retry queue.
    retry_dropped: AtomicU64,
}

/// A region's broadcast state for `/readyz`.
#[derive(Debug, serde::Serialize)]
pub(crate) struct RegionFollowing {
    pub(crate) name: String,
    pub(crate) following: bool,
    pub(crate) retry_queued: usize,
    pub(crate) retry_dropped: u64,
}

/// Ids of messages applied lately, bounded, oldest forgotten first.
#[derive(Default)]
struct Seen {
    set: HashSet<(Arc<str>, u64)>,
    order: VecDeque<(Arc<str>, u64)>,
}

impl Seen {
    /// True when `id` was not seen before (it is remembered now).
    fn first(&mut self, id: (Arc<str>, u64)) -> bool {
        if self.set.contains(&id) {
            return false;
        }
        if self.order.len() >= SEEN_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(id.clone());
        self.order.push_back(id);
        true
    }
}

/// Everything the publishers and the readers of one instance share.
pub(crate) struct Broadcast {
    redis: Arc<Redis>,
    channel: Channel,
    /// Random per process: tells this instance's messages from others'.
    instance: Arc<str>,
    next_id: AtomicU64,
    epoch: Instant,
    pub(crate) reader: Arc<ReaderState>,
    regions: Vec<RegionFollow>,
    seen: Mutex<Seen>,
    /// The local copy of edge state the state stream invalidates.
    state_cache: arc_swap::ArcSwapOption<CachedKv>,
    /// State keys not broadcast because the queue was full.
    pub(crate) state_dropped: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a push, a pop or a lookup: a poisoned
    // lock still guards consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Broadcast {
    /// Sets up the broadcast and starts its retry task (needs a runtime).
    pub(crate) fn new(redis: Arc<Redis>, instance: Arc<str>) -> Arc<Broadcast> {
        let broadcast = Arc::new(Broadcast {
            channel: Channel::new(&redis),
            regions: redis
                .regions()
                .iter()
                .map(|_| RegionFollow::default())
                .collect(),
            redis,
            instance,
            next_id: AtomicU64::new(1),
            epoch: Instant::now(),
            reader: Arc::new(ReaderState::default()),
            seen: Mutex::new(Seen::default()),
            state_cache: arc_swap::ArcSwapOption::empty(),
            state_dropped: AtomicU64::new(0),
        });
        spawn_retrier(Arc::downgrade(&broadcast));
        broadcast
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn local_index(&self) -> usize {
        let local = self.redis.local();
        self.redis
            .regions()
            .iter()
            .position(|r| Arc::ptr_eq(r, local))
            .unwrap_or(0)
    }

    /// Each region's reader and retry queue.
    pub(crate) fn regions(&self) -> Vec<RegionFollowing> {
        self.redis
            .regions()
            .iter()
            .zip(&self.regions)
            .map(|(r, f)| RegionFollowing {
                name: r.name().to_owned(),
                following: f.connected_since.load(Relaxed) != 0,
                retry_queued: lock(&f.retry).len(),
                retry_dropped: f.retry_dropped.load(Relaxed),
            })
            .collect()
    }

    /// The local copy of edge state that other instances' writes
    /// invalidate, and that reports this instance's writes to them.
    pub(crate) fn share_state(self: &Arc<Self>, cache: &Arc<CachedKv>) {
        self.state_cache.store(Some(Arc::clone(cache)));
        let (tx, rx) = tokio::sync::mpsc::channel(STATE_QUEUE);
        if cache.set_listener(Arc::new(StateWrites {
            tx,
            broadcast: Arc::downgrade(self),
        })) {
            spawn_state_publisher(Arc::downgrade(self), rx);
        }
    }

    fn outgoing(&self, kind: Kind, payload: String) -> Outgoing {
        Outgoing {
            kind,
            id: self.next_id.fetch_add(1, Relaxed),
            payload: Arc::from(payload),
        }
    }

    async fn send(&self, region: &Region, msg: &Outgoing) -> Result<u64, RedisError> {
        let keys = self.channel.keys(msg.kind);
        let script = ::redis::Script::new(PUBLISH);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&keys.sequence)
            .key(&keys.stream)
            .arg(&*self.instance)
            .arg(msg.id)
            .arg(msg.kind.field())
            .arg(&*msg.payload)
            .arg(STREAM_MAX_LEN);
        region.script(&invocation).await
    }

    /// Sends `msg` to every region at once, each bounded by the Redis
    /// timeout; regions that fail it get it from their retry queue later.
    async fn send_all(&self, msg: Outgoing) -> Published {
        let sends = self.redis.regions().iter().map(|region| {
            let msg = &msg;
            async move { (region.name().to_owned(), self.send(region, msg).await) }
        });
        let mut published = Published {
            regions: vec![],
            local_seq: None,
            failed: vec![],
        };
        let local = self.local_index();
        let results = crate::kv::join_all(sends.map(Box::pin)).await;
        for (i, (name, result)) in results.into_iter().enumerate() {
            match result {
                Ok(seq) => {
                    if i == local {
                        published.local_seq = Some(seq);
                    }
                    published.regions.push(name);
                }
                Err(e) => {
                    tracing::warn!(region = %name, error = %e, "cluster message not published; queued for the region");
                    self.enqueue(i, msg.clone());
                    published.failed.push(name);
                }
            }
        }
        published
    }

    fn enqueue(&self, region: usize, msg: Outgoing) {
        let follow = &self.regions[region];
        let mut queue = lock(&follow.retry);
        if queue.len() >= RETRY_CAPACITY {
            queue.pop_front();
            follow.retry_dropped.fetch_add(1, Relaxed);
        }
        queue.push_back(msg);
    }

    /// Resends each region's queue in order until it is empty or a send
    /// fails.
    async fn drain(&self) {
        for (region, follow) in self.redis.regions().iter().zip(&self.regions) {
            loop {
                let Some(next) = lock(&follow.retry).front().cloned() else {
                    break;
                };
                if self.send(region, &next).await.is_err() {
                    break;
                }
                lock(&follow.retry).pop_front();
            }
        }
    }

    /// Sends `event` (already applied here) to every region.
    pub(crate) async fn publish(&self, event: &Event) -> Published {
        match serde_json::to_string(event) {
            Ok(payload) => self.send_all(self.outgoing(Kind::Cache, payload)).await,
            Err(e) => {
                // Plain data: cannot fail; kept typed rather than unwrapped.
                tracing::error!(error = %e, "cluster event not encodable");
                Published {
                    regions: vec![],
                    local_seq: None,
                    failed: self
                        .redis
                        .regions()
                        .iter()
                        .map(|r| r.name().to_owned())
                        .collect(),
                }
            }
        }
    }

    /// Sends state keys this instance wrote to every region.
    async fn publish_state(&self, keys: &[String]) {
        match serde_json::to_string(keys) {
            Ok(payload) => {
                self.send_all(self.outgoing(Kind::State, payload)).await;
            }
            Err(e) => tracing::error!(error = %e, "state keys not encodable"),
        }
    }

    /// Whether another region than `region` has been followed without a
    /// break since `since` (ms since the epoch): then every message of a
    /// gap in `region` reached this instance through it (or is queued for
    /// it and arrives later).
    fn covered(&self, region: usize, since: u64) -> bool {
        self.regions.iter().enumerate().any(|(j, f)| {
            let connected = f.connected_since.load(Relaxed);
            j != region && connected != 0 && connected - 1 <= since
        })
    }
}

/// The cluster's [`WriteListener`]: queues written keys for the publisher.
struct StateWrites {
    tx: tokio::sync::mpsc::Sender<String>,
    broadcast: Weak<Broadcast>,
}

impl WriteListener for StateWrites {
    fn written(&self, key: &str) {
        if self.tx.try_send(key.to_owned()).is_err() {
            if let Some(b) = self.broadcast.upgrade() {
                b.state_dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Sends queued state keys, as many as are waiting (up to a batch) per
/// message, until the listener is gone.
fn spawn_state_publisher(broadcast: Weak<Broadcast>, mut rx: tokio::sync::mpsc::Receiver<String>) {
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(STATE_BATCH);
        while rx.recv_many(&mut batch, STATE_BATCH).await > 0 {
            batch.sort_unstable();
            batch.dedup();
            let Some(b) = broadcast.upgrade() else { return };
            b.publish_state(&batch).await;
            batch.clear();
        }
    });
}

fn spawn_retrier(broadcast: Weak<Broadcast>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RETRY_INTERVAL).await;
            let Some(b) = broadcast.upgrade() else { return };
            b.drain().await;
        }
    });
}

/// Where a reader is in one stream.
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

/// What a message carries.
#[derive(Debug)]
enum Body {
    Cache(Event),
    State(Vec<String>),
    /// A newer instance's message this version cannot read.
    Unknown,
}

/// A decoded stream entry.
#[derive(Debug)]
struct Received {
    id: String,
    seq: u64,
    from: String,
    /// The publisher's message id (absent from older publishers).
    message: Option<u64>,
    body: Body,
}

fn decode((id, mut fields): RawEntry) -> Option<Received> {
    let seq = std::str::from_utf8(&fields.remove("seq")?)
        .ok()?
        .parse()
        .ok()?;
    let from = String::from_utf8(fields.remove("from")?).ok()?;
    let message = fields
        .remove("id")
        .and_then(|m| std::str::from_utf8(&m).ok()?.parse().ok());
    // A message this version cannot read is not fatal: its stream's
    // reader treats it as a gap.
    let body = if let Some(e) = fields.remove("event") {
        serde_json::from_slice(&e).map_or(Body::Unknown, Body::Cache)
    } else if let Some(k) = fields.remove("keys") {
        serde_json::from_slice(&k).map_or(Body::Unknown, Body::State)
    } else {
        Body::Unknown
    };
    Some(Received {
        id,
        seq,
        from,
        message,
        body,
    })
}

/// Starts a reader per region; each stops when `target` is gone.
pub(crate) fn spawn_readers(broadcast: &Arc<Broadcast>, target: Weak<dyn LocalCache>) {
    for region in 0..broadcast.regions.len() {
        let b = Arc::clone(broadcast);
        let target = target.clone();
        tokio::spawn(async move {
            let mut reader = Reader {
                b,
                region,
                local: false,
                target,
                positions: [None, None],
                lost_at: None,
            };
            reader.local = reader.region == reader.b.local_index();
            reader.run().await;
        });
    }
}

/// Why a reader stopped reading for a while.
#[derive(Debug, thiserror::Error)]
#[error("cluster event reader on redis region {region}")]
struct ReaderError {
    region: String,
    #[source]
    source: ::redis::RedisError,
}

/// Follows both streams of one region.
struct Reader {
    b: Arc<Broadcast>,
    region: usize,
    /// Whether this is the instance's own region (its sequence is the
    /// generation of the shared response tier).
    local: bool,
    target: Weak<dyn LocalCache>,
    /// Cache stream, state stream.
    positions: [Option<Position>; 2],
    /// Milliseconds since the epoch when the connection was lost.
    lost_at: Option<u64>,
}

const KINDS: [Kind; 2] = [Kind::Cache, Kind::State];

impl Reader {
    fn region(&self) -> &Arc<Region> {
        &self.b.redis.regions()[self.region]
    }

    async fn run(&mut self) {
        loop {
            if self.target.strong_count() == 0 {
                return;
            }
            match self.read_until_error().await {
                Ok(()) => return, // the gateway is gone
                Err(e) => {
                    self.b.regions[self.region]
                        .connected_since
                        .store(0, Relaxed);
                    if self.local {
                        self.b.reader.connected.store(false, Relaxed);
                    }
                    let now = self.b.now_ms();
                    self.lost_at.get_or_insert(now);
                    self.region().log_fault(&e);
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                }
            }
        }
    }

    /// Connects, catches up from the positions and follows the streams
    /// until a connection error (returned) or until the target is dropped.
    async fn read_until_error(&mut self) -> Result<(), ReaderError> {
        let region = Arc::clone(self.region());
        let fail = |source| ReaderError {
            region: region.name().to_owned(),
            source,
        };
        // A connection of its own: XREAD BLOCK holds the connection it runs on.
        let mut conn = region
            .dedicated(READ_BLOCK + region.timeout())
            .await
            .map_err(fail)?;
        for (i, kind) in KINDS.into_iter().enumerate() {
            let stream = &self.b.channel.keys(kind).stream;
            match &mut self.positions[i] {
                None => {
                    // First start: nothing stored here is older than what the
                    // stream holds; follow from the newest entry.
                    let last: Vec<RawEntry> = ::redis::cmd("XREVRANGE")
                        .arg(stream)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1)
                        .query_async(&mut conn)
                        .await
                        .map_err(fail)?;
                    self.positions[i] = Some(match last.into_iter().next().and_then(decode) {
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
                        .arg(stream)
                        .arg(&p.id)
                        .arg(&p.id)
                        .query_async(&mut conn)
                        .await
                        .map_err(fail)?;
                    if still_there.is_empty() {
                        // What follows is not checked against the old
                        // sequence (after a restart it starts again at 1).
                        p.seq = None;
                        let since = self.lost_at.unwrap_or_else(|| self.b.now_ms());
                        self.gap(
                            kind,
                            since,
                            "the stream no longer holds the last entry read",
                        );
                    }
                }
                Some(_) => {}
            }
        }
        if self.local {
            if let Some(seq) = self.positions[0].as_ref().and_then(|p| p.seq) {
                self.b.reader.applied_seq.store(seq, Relaxed);
            }
            self.b.reader.connected.store(true, Relaxed);
        }
        self.b.regions[self.region]
            .connected_since
            .store(self.b.now_ms() + 1, Relaxed);
        self.lost_at = None;
        loop {
            let (Some(cache), Some(state)) = (&self.positions[0], &self.positions[1]) else {
                return Ok(());
            };
            let reply: XreadReply = ::redis::cmd("XREAD")
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(READ_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&self.b.channel.cache.stream)
                .arg(&self.b.channel.state.stream)
                .arg(&cache.id)
                .arg(&state.id)
                .query_async(&mut conn)
                .await
                .map_err(fail)?;
            let Some(target) = self.target.upgrade() else {
                return Ok(());
            };
            for (stream, entries) in reply.unwrap_or_default() {
                let kind = if stream == self.b.channel.cache.stream {
                    Kind::Cache
                } else {
                    Kind::State
                };
                for raw in entries {
                    self.receive(kind, raw, &*target);
                }
            }
        }
    }

    /// Events of `kind` since `since` (ms since the epoch) may be lost.
    fn gap(&self, kind: Kind, since: u64, why: &str) {
        match kind {
            Kind::Cache => {
                if self.b.covered(self.region, since) {
                    tracing::info!(
                        region = %self.region().name(),
                        reason = why,
                        "cluster events of a region may be lost; another region was followed meanwhile, the memory cache stays"
                    );
                } else if let Some(t) = self.target.upgrade() {
                    t.drop_all();
                    self.b.reader.cache_drops.fetch_add(1, Relaxed);
                    tracing::warn!(
                        region = %self.region().name(),
                        reason = why,
                        "cluster events may be lost; memory cache dropped"
                    );
                }
            }
            Kind::State => {
                if let Some(cache) = self.b.state_cache.load_full() {
                    cache.invalidate_all_remote();
                }
            }
        }
    }

    fn receive(&mut self, kind: Kind, raw: RawEntry, target: &dyn LocalCache) {
        let slot = match kind {
            Kind::Cache => 0,
            Kind::State => 1,
        };
        let id = raw.0.clone();
        let Some(received) = decode(raw) else {
            tracing::warn!(id = %id, "unreadable cluster message skipped");
            if let Some(p) = &mut self.positions[slot] {
                p.id = id;
            }
            return;
        };
        let expected = self.positions[slot]
            .as_ref()
            .and_then(|p| p.seq)
            .map(|s| s.saturating_add(1));
        let gap = expected.is_some_and(|e| e != received.seq);
        // The generation moves before the memory cache changes, so that no
        // request reads a shared copy of the old generation into memory
        // after the purge (see `Cluster::before_fetch`).
        if kind == Kind::Cache && self.local {
            if gap {
                self.b.reader.applied_seq.store(received.seq, Relaxed);
            } else {
                self.b.reader.applied_seq.fetch_max(received.seq, Relaxed);
            }
        }
        if gap {
            tracing::warn!(
                region = %self.region().name(),
                expected = expected.unwrap_or(0),
                got = received.seq,
                "cluster messages missed"
            );
            self.gap(kind, self.b.now_ms(), "sequence gap");
        }
        self.positions[slot] = Some(Position {
            id: received.id,
            seq: Some(received.seq),
        });
        if received.from == *self.b.instance {
            return;
        }
        let first = match received.message {
            Some(m) => lock(&self.b.seen).first((Arc::from(received.from.as_str()), m)),
            None => true,
        };
        match received.body {
            // The local region's copy is applied even when another region's
            // came first: only now has the generation moved (see above).
            Body::Cache(event) if first || self.local => target.apply(&event),
            Body::Cache(_) => {}
            Body::State(keys) => {
                if let Some(cache) = self.b.state_cache.load_full() {
                    cache.invalidate_remote(keys.iter().map(String::as_str));
                }
            }
            Body::Unknown => {
                tracing::warn!(seq = received.seq, "unknown cluster message");
                // To be safe, forget what it might have invalidated.
                match kind {
                    Kind::Cache => {
                        target.drop_all();
                        self.b.reader.cache_drops.fetch_add(1, Relaxed);
                    }
                    Kind::State => self.gap(kind, self.b.now_ms(), "unknown message"),
                }
            }
        }
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
    fn a_message_id_is_first_once_and_the_memory_is_bounded() {
        let mut seen = Seen::default();
        let id = |n| (Arc::<str>::from("a"), n);
        assert!(seen.first(id(1)));
        assert!(!seen.first(id(1)));
        assert!(seen.first((Arc::from("b"), 1)));
        for n in 2..(SEEN_CAPACITY as u64 + 10) {
            seen.first(id(n));
        }
        assert_eq!(seen.set.len(), SEEN_CAPACITY);
        assert_eq!(seen.order.len(), SEEN_CAPACITY);
        // The oldest was forgotten.
        assert!(seen.first(id(1)));
    }

    #[test]
    fn entries_without_a_sequence_are_not_decoded() {
        let mut fields = HashMap::new();
        fields.insert("from".to_owned(), b"x".to_vec());
        assert!(decode(("1-0".into(), fields.clone())).is_none());
        fields.insert("seq".to_owned(), b"4".to_vec());
        fields.insert("event".to_owned(), b"{\"kind\":\"nope\"}".to_vec());
        let r = decode(("1-0".into(), fields.clone())).unwrap();
        assert_eq!(r.seq, 4);
        assert!(matches!(r.body, Body::Unknown));
        assert_eq!(r.message, None);
        fields.remove("event");
        fields.insert("id".to_owned(), b"9".to_vec());
        fields.insert("keys".to_owned(), b"[\"production:a\"]".to_vec());
        let r = decode(("1-0".into(), fields)).unwrap();
        assert_eq!(r.message, Some(9));
        assert!(matches!(r.body, Body::State(ref k) if k == &["production:a".to_owned()]));
    }
}
