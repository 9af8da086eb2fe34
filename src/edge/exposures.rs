//! Exposures and conversions: counted once per user, experiment and day
//! (a bounded set of hashes per day), appended as JSON lines to a bounded,
//! rotated file by a writer thread behind a bounded queue (the request
//! path never waits: a full queue drops the event and counts it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// The same, per UTC day, for the results' `daily`.
    pub(crate) daily: DailyOutcomes,
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
/// At most this many (experiment key, variant) rows are registered; the
/// names come from the definitions, so this is only a backstop.
const DAILY_MAX_ROWS: usize = 4096;
/// Shards of the per-day counts: each thread records into its own.
const DAILY_SHARDS: usize = 16;

/// Which (experiment key, variant) a daily count belongs to: an index
/// registered when the definitions are compiled, so recording needs no
/// name, no allocation and no lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DailyRow(u32);

#[derive(Default)]
struct RowNames {
    names: Vec<(String, String)>,
    index: HashMap<(String, String), DailyRow>,
}

/// One thread's share of the counts: today's by row index, earlier days
/// (within the window) by (day, row).
#[derive(Default)]
struct DailyShard {
    today: u64,
    counts: Vec<[u64; 2]>,
    past: BTreeMap<(u64, u32), [u64; 2]>,
}

impl DailyShard {
    /// Makes `day` today: today's counts move to `past`, days that left
    /// the window go (once per day, not per event).
    fn roll_to(&mut self, day: u64) {
        let today = self.today;
        for (row, counts) in self.counts.iter_mut().enumerate() {
            if *counts != [0, 0] {
                let past = self.past.entry((today, row as u32)).or_default();
                past[0] += counts[0];
                past[1] += counts[1];
                *counts = [0, 0];
            }
        }
        self.today = day;
        let oldest = day.saturating_sub(DAILY_DAYS_KEPT - 1);
        self.past.retain(|(d, _), _| *d >= oldest);
    }
}

/// Pads a shard's lock to its own cache lines.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

thread_local! {
    static DAILY_SHARD: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % DAILY_SHARDS
    };
}

/// Unique exposures and conversions per experiment key, UTC day and variant,
/// for the last [`DAILY_DAYS_KEPT`] days (this instance's traffic).
///
/// Recording takes the lock of the calling thread's own shard (uncontended
/// unless more threads than shards record at once) and bumps today's count
/// by row index; the window is pruned when a shard's day changes. Reading
/// merges the shards.
pub(crate) struct DailyOutcomes {
    rows: Mutex<RowNames>,
    shards: Box<[Padded<Mutex<DailyShard>>]>,
}

impl Default for DailyOutcomes {
    fn default() -> Self {
        DailyOutcomes {
            rows: Mutex::default(),
            shards: (0..DAILY_SHARDS).map(|_| Padded::default()).collect(),
        }
    }
}

impl DailyOutcomes {
    /// The row of (experiment key, variant), registered on first use;
    /// `None` past [`DAILY_MAX_ROWS`] (such a row is not counted per day).
    pub(crate) fn row(&self, experiment: &str, variant: &str) -> Option<DailyRow> {
        let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        let key = (experiment.to_owned(), variant.to_owned());
        if let Some(row) = rows.index.get(&key) {
            return Some(*row);
        }
        if rows.names.len() >= DAILY_MAX_ROWS {
            return None;
        }
        let row = DailyRow(u32::try_from(rows.names.len()).ok()?);
        rows.names.push(key.clone());
        rows.index.insert(key, row);
        Some(row)
    }

    /// Counts one outcome of `row` on `day` (days since the Unix epoch).
    pub(crate) fn record(&self, outcome: Outcome, row: DailyRow, day: u64) {
        let shard = DAILY_SHARD.with(|s| *s);
        let mut shard = self.shards[shard]
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let i = row.0 as usize;
        if day > shard.today {
            shard.roll_to(day);
        } else if day < shard.today {
            // Computed just before midnight, recorded just after.
            if day >= shard.today.saturating_sub(DAILY_DAYS_KEPT - 1) {
                shard.past.entry((day, row.0)).or_default()[outcome as usize] += 1;
            }
            return;
        }
        if shard.counts.len() <= i {
            shard.counts.resize(i + 1, [0, 0]);
        }
        shard.counts[i][outcome as usize] += 1;
    }

    /// `(day, variant, exposures, conversions)` for one experiment key,
    /// oldest day first, only days within the window ending at `today`.
    pub(crate) fn rows(&self, experiment: &str, today: u64) -> Vec<(u64, String, u64, u64)> {
        let oldest = today.saturating_sub(DAILY_DAYS_KEPT - 1);
        let variants: Vec<(u32, String)> = {
            let rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
            rows.names
                .iter()
                .enumerate()
                .filter(|(_, (e, _))| e == experiment)
                .map(|(i, (_, v))| (i as u32, v.clone()))
                .collect()
        };
        let mut merged: BTreeMap<(u64, &str), [u64; 2]> = BTreeMap::new();
        let mut add = |day: u64, row: u32, counts: &[u64; 2]| {
            if day < oldest || day > today || *counts == [0, 0] {
                return;
            }
            if let Some((_, v)) = variants.iter().find(|(r, _)| *r == row) {
                let m = merged.entry((day, v.as_str())).or_default();
                m[0] += counts[0];
                m[1] += counts[1];
            }
        };
        for shard in self.shards.iter() {
            let shard = shard.0.lock().unwrap_or_else(|p| p.into_inner());
            for ((day, row), counts) in &shard.past {
                add(*day, *row, counts);
            }
            for (row, counts) in shard.counts.iter().enumerate() {
                add(shard.today, row as u32, counts);
            }
        }
        merged
            .into_iter()
            .map(|((d, v), c)| (d, v.to_owned(), c[0], c[1]))
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
        let row = |e: &str, v: &str| d.row(e, v).unwrap();
        let (ea, eb, fa) = (row("e", "a"), row("e", "b"), row("f", "a"));
        assert_eq!(row("e", "a"), ea, "registered once");
        d.record(Outcome::Exposure, ea, 100);
        d.record(Outcome::Exposure, ea, 100);
        d.record(Outcome::Conversion, ea, 100);
        d.record(Outcome::Exposure, eb, 101);
        d.record(Outcome::Exposure, fa, 101);
        // Late by a day (computed before midnight): still counted on its day.
        d.record(Outcome::Conversion, ea, 100);
        assert_eq!(
            d.rows("e", 101),
            vec![(100, "a".to_owned(), 2, 2), (101, "b".to_owned(), 1, 0)]
        );
        // Thirty days later day 100 has left the window, and is dropped.
        d.record(Outcome::Exposure, eb, 130);
        assert_eq!(
            d.rows("e", 130),
            vec![(101, "b".to_owned(), 1, 0), (130, "b".to_owned(), 1, 0)]
        );
        d.record(Outcome::Exposure, eb, 131);
        assert_eq!(d.rows("e", 131).len(), 2);
        assert_eq!(d.rows("e", 131)[0].0, 130);
        let held: usize = d
            .shards
            .iter()
            .map(|s| s.0.lock().unwrap().past.len())
            .sum();
        assert!(held <= 2, "pruned as the days pass: {held}");
    }

    #[test]
    fn daily_outcomes_are_exact_across_threads() {
        let d = Arc::new(DailyOutcomes::default());
        let rows = [d.row("e", "a").unwrap(), d.row("e", "b").unwrap()];
        let threads: Vec<_> = (0..24)
            .map(|t| {
                let d = Arc::clone(&d);
                std::thread::spawn(move || {
                    for i in 0..1000u64 {
                        // Half the threads cross into the next day halfway.
                        let day = if t % 2 == 0 && i >= 500 { 11 } else { 10 };
                        d.record(Outcome::Exposure, rows[t % 2], day);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            d.rows("e", 11),
            vec![
                (10, "a".to_owned(), 6000, 0),
                (10, "b".to_owned(), 12_000, 0),
                (11, "a".to_owned(), 6000, 0)
            ]
        );
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
