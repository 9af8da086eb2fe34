//! Exposures and conversions: counted once per user, experiment and day
//! (a bounded set of hashes per day), appended as JSON lines to a bounded,
//! rotated file by a writer thread behind a bounded queue (the request
//! path never waits: a full queue drops the event and counts it).

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use super::counters::StripedCounter;
use crate::config::edge::ExposuresConfig;

/// What happened to a user in an experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Outcome {
    Exposure,
    Conversion,
}

/// Unique exposures and conversions per experiment and variant, kept across
/// definition changes (a variant that comes back keeps its counts).
#[derive(Default)]
pub(crate) struct OutcomeCounters {
    map: Mutex<BTreeMap<(Outcome, String, String), Arc<StripedCounter>>>,
}

impl OutcomeCounters {
    pub(crate) fn counter(
        &self,
        outcome: Outcome,
        experiment: &str,
        variant: &str,
    ) -> Arc<StripedCounter> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            map.entry((outcome, experiment.to_owned(), variant.to_owned()))
                .or_default(),
        )
    }

    /// outcome -> experiment -> variant -> count.
    pub(crate) fn snapshot(&self) -> Vec<(Outcome, String, String, u64)> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|((o, e, v), c)| (*o, e.clone(), v.clone(), c.sum()))
            .collect()
    }
}

/// Days of per-day counts kept (the oldest are dropped as days pass).
pub(crate) const DAILY_DAYS_KEPT: u64 = 30;
/// At most this many (experiment, day, variant) rows, whatever the names.
const DAILY_MAX_ROWS: usize = 100_000;

/// Unique exposures and conversions per experiment key, UTC day and variant,
/// for the last [`DAILY_DAYS_KEPT`] days (this instance's traffic).
#[derive(Default)]
pub(crate) struct DailyOutcomes {
    map: Mutex<BTreeMap<(String, u64, String), [u64; 2]>>,
}

impl DailyOutcomes {
    /// Counts one outcome on `day` (days since the Unix epoch).
    pub(crate) fn record(&self, outcome: Outcome, experiment: &str, variant: &str, day: u64) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = day.saturating_sub(DAILY_DAYS_KEPT - 1);
        map.retain(|(_, d, _), _| *d >= oldest);
        let key = (experiment.to_owned(), day, variant.to_owned());
        if !map.contains_key(&key) && map.len() >= DAILY_MAX_ROWS {
            return;
        }
        let row = map.entry(key).or_default();
        row[outcome as usize] += 1;
    }

    /// `(day, variant, exposures, conversions)` for one experiment key,
    /// oldest day first, only days within the window ending at `today`.
    pub(crate) fn rows(&self, experiment: &str, today: u64) -> Vec<(u64, String, u64, u64)> {
        let oldest = today.saturating_sub(DAILY_DAYS_KEPT - 1);
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.range((experiment.to_owned(), oldest, String::new())..)
            .take_while(|((e, _, _), _)| e == experiment)
            .map(|((_, d, v), c)| (*d, v.clone(), c[0], c[1]))
            .collect()
    }
}

/// `YYYY-MM-DD` of a day counted from the Unix epoch (UTC; Howard
/// Hinnant's civil-from-days).
pub(crate) fn utc_date(day: u64) -> String {
    let z = day as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

const DEDUP_SHARDS: usize = 16;

struct DayShard {
    day: u64,
    seen: HashSet<u64>,
}

/// Which (outcome, experiment, user) pairs were seen today: hashes only,
/// at most `capacity` a day across shards. Past the capacity an event is
/// counted again (duplicates, never unbounded memory).
pub(crate) struct DailyDedup {
    shards: Vec<Mutex<DayShard>>,
    per_shard: usize,
    /// Events let through because the day's set was full.
    pub(crate) overflow: AtomicU64,
}

impl DailyDedup {
    pub(crate) fn new(capacity: usize) -> DailyDedup {
        DailyDedup {
            shards: (0..DEDUP_SHARDS)
                .map(|_| {
                    Mutex::new(DayShard {
                        day: 0,
                        seen: HashSet::new(),
                    })
                })
                .collect(),
            per_shard: capacity.div_ceil(DEDUP_SHARDS).max(1),
            overflow: AtomicU64::new(0),
        }
    }

    /// True the first time `(outcome, experiment, user)` is seen on `day`.
    pub(crate) fn first_today(
        &self,
        day: u64,
        outcome: Outcome,
        experiment: &str,
        user: &str,
    ) -> bool {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (outcome, experiment, user).hash(&mut hasher);
        let h = hasher.finish();
        let shard = &self.shards[(h as usize) % DEDUP_SHARDS];
        let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
        if shard.day != day {
            shard.day = day;
            shard.seen = HashSet::new();
        }
        if shard.seen.contains(&h) {
            return false;
        }
        if shard.seen.len() >= self.per_shard {
            self.overflow.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        shard.seen.insert(h);
        true
    }
}

/// One line of the exposures file.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Event {
    /// Unix milliseconds.
    pub(crate) time_ms: u64,
    /// `exposure` or `conversion`.
    pub(crate) event: &'static str,
    pub(crate) experiment: String,
    pub(crate) variant: String,
    pub(crate) user_id: String,
    /// The configured route's name (`default` for none).
    pub(crate) route: String,
    pub(crate) path: String,
}

/// The file writer's queue; `None` without `[edge.exposures] path`.
pub(crate) struct EventLog {
    sender: Option<SyncSender<Event>>,
    pub(crate) dropped: AtomicU64,
    /// Events written so far (the tests wait on it).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) written: Arc<AtomicU64>,
}

impl EventLog {
    pub(crate) fn new(cfg: &ExposuresConfig) -> EventLog {
        let written = Arc::new(AtomicU64::new(0));
        let sender = cfg.path.clone().map(|path| {
            let (tx, rx) = sync_channel(cfg.queue_capacity);
            let writer = Rotating {
                path,
                max_bytes: cfg.max_bytes,
                max_files: cfg.max_files,
                written: Arc::clone(&written),
            };
            let spawned = std::thread::Builder::new()
                .name("kvgate-exposures".into())
                .spawn(move || writer.run(rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the exposures writer; events are dropped");
            }
            tx
        });
        EventLog {
            sender,
            dropped: AtomicU64::new(0),
            written,
        }
    }

    /// Queues an event without waiting; a full queue drops it (counted).
    /// The event is built only when a file is being written.
    pub(crate) fn push(&self, event: impl FnOnce() -> Event) {
        if let Some(tx) = &self.sender {
            match tx.try_send(event()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A JSON-lines file rotated past `max_bytes`: `path` -> `path.1` -> ...
/// -> `path.{max_files}`, the oldest removed.
struct Rotating {
    path: PathBuf,
    max_bytes: u64,
    max_files: u32,
    written: Arc<AtomicU64>,
}

impl Rotating {
    fn numbered(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&self) -> std::io::Result<()> {
        if self.max_files == 0 {
            return std::fs::remove_file(&self.path);
        }
        let _ = std::fs::remove_file(self.numbered(self.max_files));
        for n in (1..self.max_files).rev() {
            let _ = std::fs::rename(self.numbered(n), self.numbered(n + 1));
        }
        std::fs::rename(&self.path, self.numbered(1))
    }

    fn open(&self) -> std::io::Result<(std::io::BufWriter<std::fs::File>, u64)> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let size = file.metadata()?.len();
        Ok((std::io::BufWriter::new(file), size))
    }

    /// Until every sender is gone (the `Edge` dropped).
    fn run(self, rx: Receiver<Event>) {
        let mut out = None;
        let mut warned = false;
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            while let Some(event) = next {
                if let Err(e) = self.write(&mut out, &event) {
                    out = None;
                    if !warned {
                        tracing::warn!(path = %self.path.display(), error = %e, "exposures file write failed");
                        warned = true;
                    }
                }
                next = rx.try_recv().ok();
            }
            // The queue is empty: make what was written visible.
            if let Some((w, _)) = out.as_mut() {
                let _ = std::io::BufWriter::flush(w);
            }
        }
    }

    fn write(
        &self,
        out: &mut Option<(std::io::BufWriter<std::fs::File>, u64)>,
        event: &Event,
    ) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if out.is_none() {
            *out = Some(self.open()?);
        }
        if let Some((w, size)) = out.as_mut() {
            if *size > 0 && *size + line.len() as u64 > self.max_bytes {
                w.flush()?;
                *out = None;
                self.rotate()?;
                *out = Some(self.open()?);
            }
        }
        if let Some((w, size)) = out.as_mut() {
            w.write_all(&line)?;
            *size += line.len() as u64;
            self.written.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daily_outcomes_keep_the_last_days_per_variant() {
        let d = DailyOutcomes::default();
        d.record(Outcome::Exposure, "e", "a", 100);
        d.record(Outcome::Exposure, "e", "a", 100);
        d.record(Outcome::Conversion, "e", "a", 100);
        d.record(Outcome::Exposure, "e", "b", 101);
        d.record(Outcome::Exposure, "f", "a", 101);
        assert_eq!(
            d.rows("e", 101),
            vec![(100, "a".to_owned(), 2, 1), (101, "b".to_owned(), 1, 0)]
        );
        // Thirty days later day 100 has left the window, and is dropped.
        d.record(Outcome::Exposure, "e", "b", 130);
        assert_eq!(
            d.rows("e", 130),
            vec![(101, "b".to_owned(), 1, 0), (130, "b".to_owned(), 1, 0)]
        );
        d.record(Outcome::Exposure, "e", "b", 131);
        assert_eq!(d.rows("e", 131).len(), 2);
        assert_eq!(d.rows("e", 131)[0].0, 130);
    }

    #[test]
    fn utc_dates_from_epoch_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(59), "1970-03-01");
        assert_eq!(utc_date(11_016), "2000-02-29");
        assert_eq!(utc_date(20_417), "2025-11-25");
    }

    #[test]
    fn dedup_counts_once_per_day_and_stays_bounded() {
        let d = DailyDedup::new(64);
        assert!(d.first_today(1, Outcome::Exposure, "e", "alice"));
        assert!(!d.first_today(1, Outcome::Exposure, "e", "alice"));
        assert!(d.first_today(1, Outcome::Conversion, "e", "alice"));
        assert!(d.first_today(1, Outcome::Exposure, "f", "alice"));
        assert!(
            d.first_today(2, Outcome::Exposure, "e", "alice"),
            "a new day"
        );
        for i in 0..1000 {
            d.first_today(2, Outcome::Exposure, "e", &format!("u{i}"));
        }
        let held: usize = d.shards.iter().map(|s| s.lock().unwrap().seen.len()).sum();
        assert!(held <= 64 + DEDUP_SHARDS, "{held}");
        assert!(d.overflow.load(Ordering::Relaxed) > 0);
    }

    fn event(i: usize) -> Event {
        Event {
            time_ms: 1,
            event: "exposure",
            experiment: "e".into(),
            variant: "control".into(),
            user_id: format!("user-{i}"),
            route: "default".into(),
            path: "/".into(),
        }
    }

    #[test]
    fn the_file_rotates_and_keeps_max_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exposures.jsonl");
        let cfg = ExposuresConfig {
            path: Some(path.clone()),
            max_bytes: 1024,
            max_files: 2,
            queue_capacity: 10_000,
            dedup_capacity: 10,
        };
        let log = EventLog::new(&cfg);
        for i in 0..200 {
            log.push(|| event(i));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.written.load(Ordering::Relaxed) < 200 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(log);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            ["exposures.jsonl", "exposures.jsonl.1", "exposures.jsonl.2"]
        );
        for f in &files {
            let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(text.len() as u64 <= 1024, "{f}: {}", text.len());
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["experiment"], "e");
            }
        }
        // The newest lines are in the current file.
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.contains("\"user-199\""), "{current}");
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        // The writer cannot open a file in a missing directory: events pile up.
        let cfg = ExposuresConfig {
            path: Some(dir.path().join("missing").join("x.jsonl")),
            queue_capacity: 1,
            ..ExposuresConfig::default()
        };
        let log = EventLog::new(&cfg);
        for i in 0..1000 {
            log.push(|| event(i));
        }
        assert!(log.dropped.load(Ordering::Relaxed) > 0);
    }
}
