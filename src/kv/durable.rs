//! Embedded durable backend on redb: the default home of kvgate's state.
//!
//! Every put, batch of puts and delete is its own committed write
//! transaction with redb's default `Durability::Immediate` (fsync before
//! commit returns), so an acknowledged write survives `kill -9` and power
//! loss. Callers with many small writes batch them (`put_batch`): one fsync
//! for the lot.
//!
//! Threading: writes and listings run in `tokio::task::spawn_blocking`, because
//! a commit waits for fsync (milliseconds on real disks) and a listing may walk
//! many expired entries; neither may stall a runtime worker. Point reads run
//! inline: redb reads are MVCC snapshots that never wait for a writer, and they
//! are served from redb's page cache or the OS page cache in about a
//! microsecond, which is less than the thread hop of `spawn_blocking` would add
//! to every request on the hot path.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use redb::{Database, ReadableTable, TableDefinition};

use super::{
    check_key, clamp_limit, is_expired, now_ms, parse_metadata, prepare_put, time_from_ms, KeyInfo,
    Kv, KvEntry, KvError, KvFuture, ListPage, PutItem, PutOptions, Reads,
};

/// key -> encoded record (see [`encode`]).
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
/// (expiry ms, key) for every entry with a TTL, so a sweep finds what is due
/// without scanning every entry.
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");

const RECORD_VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 8 + 4;
/// Expired entries removed inside each write transaction: bounded so one
/// write never pays for a large backlog.
const SWEEP_PER_WRITE: usize = 64;

/// A [`Kv`] in a single redb file: survives restarts; writes are
/// transactions run on blocking threads.
pub struct DurableKv {
    db: Arc<Database>,
}

fn backend(err: impl std::fmt::Display) -> KvError {
    KvError::Backend(err.to_string())
}

/// Record layout: version (1 byte), expiry ms (u64 LE, 0 = never), metadata
/// length (u32 LE), metadata JSON, value. Expiry and metadata come first so a
/// listing can read them without touching the value.
fn encode(expires_ms: u64, metadata: Option<&[u8]>, value: &[u8]) -> Result<Vec<u8>, KvError> {
    let meta = metadata.unwrap_or_default();
    let meta_len = u32::try_from(meta.len())
        .map_err(|_| KvError::InvalidArgument("metadata too large".into()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + value.len());
    out.push(RECORD_VERSION);
    out.extend_from_slice(&expires_ms.to_le_bytes());
    out.extend_from_slice(&meta_len.to_le_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(value);
    Ok(out)
}

struct Decoded<'r> {
    expires_ms: u64,
    metadata: Option<&'r [u8]>,
    value: &'r [u8],
}

fn decode(record: &[u8]) -> Result<Decoded<'_>, KvError> {
    let corrupt = |why: &str| KvError::Corrupt(why.to_owned());
    if record.len() < HEADER_LEN {
        return Err(corrupt("record shorter than its header"));
    }
    if record[0] != RECORD_VERSION {
        return Err(corrupt("unknown record version"));
    }
    let mut expires = [0u8; 8];
    expires.copy_from_slice(&record[1..9]);
    let mut meta_len = [0u8; 4];
    meta_len.copy_from_slice(&record[9..13]);
    let meta_len = u32::from_le_bytes(meta_len) as usize;
    let rest = &record[HEADER_LEN..];
    if rest.len() < meta_len {
        return Err(corrupt("metadata length past the end of the record"));
    }
    let (meta, value) = rest.split_at(meta_len);
    Ok(Decoded {
        expires_ms: u64::from_le_bytes(expires),
        metadata: (meta_len > 0).then_some(meta),
        value,
    })
}

impl DurableKv {
    /// Opens the database at `path`, creating it (and its tables) if needed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, KvError> {
        let db = Database::create(path.as_ref())
            .map_err(|e| KvError::Backend(format!("opening {}: {e}", path.as_ref().display())))?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(ENTRIES).map_err(backend)?;
        txn.open_table(EXPIRY).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(DurableKv { db: Arc::new(db) })
    }

    /// Removes every expired entry now; returns how many were removed.
    #[cfg(test)]
    pub(crate) async fn sweep_expired(&self) -> Result<usize, KvError> {
        self.blocking(|db| {
            let txn = db.begin_write().map_err(backend)?;
            let removed = {
                let mut entries = txn.open_table(ENTRIES).map_err(backend)?;
                let mut expiry = txn.open_table(EXPIRY).map_err(backend)?;
                sweep(&mut entries, &mut expiry, now_ms(), usize::MAX)?
            };
            txn.commit().map_err(backend)?;
            Ok(removed)
        })
        .await
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T, KvError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, KvError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(|e| KvError::Backend(format!("storage task failed: {e}")))?
    }

    fn get_now(&self, key: &str) -> Result<Option<KvEntry>, KvError> {
        check_key(key)?;
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(ENTRIES).map_err(backend)?;
        Self::read(&table, key, now_ms())
    }

    /// Every key in one read transaction, at one clock reading.
    fn get_many_now(&self, keys: &[&str]) -> Result<Reads, KvError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(ENTRIES).map_err(backend)?;
        let now = now_ms();
        Ok(keys
            .iter()
            .map(|key| {
                check_key(key)?;
                Self::read(&table, key, now)
            })
            .collect())
    }

    fn read(
        table: &redb::ReadOnlyTable<&str, &[u8]>,
        key: &str,
        now: u64,
    ) -> Result<Option<KvEntry>, KvError> {
        let Some(guard) = table.get(key).map_err(backend)? else {
            return Ok(None);
        };
        let record = decode(guard.value())?;
        // Lazy expiry: an expired entry is invisible at once; its removal waits
        // for the next write transaction's sweep rather than paying an fsync here.
        if is_expired(record.expires_ms, now) {
            return Ok(None);
        }
        Ok(Some(KvEntry {
            value: Bytes::copy_from_slice(record.value),
            metadata: parse_metadata(record.metadata)?,
            expires_at: time_from_ms(record.expires_ms),
        }))
    }
}

type EntriesTable<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type ExpiryTable<'t> = redb::Table<'t, (u64, &'static str), ()>;

/// Removes up to `max` entries whose expiry is due. An index row whose entry
/// was since rewritten with another expiry is dropped without touching the entry.
fn sweep(
    entries: &mut EntriesTable<'_>,
    expiry: &mut ExpiryTable<'_>,
    now: u64,
    max: usize,
) -> Result<usize, KvError> {
    let mut due = Vec::new();
    for row in expiry
        .range(..(now.saturating_add(1), ""))
        .map_err(backend)?
    {
        if due.len() == max {
            break;
        }
        let (k, _) = row.map_err(backend)?;
        let (at, key) = k.value();
        due.push((at, key.to_owned()));
    }
    let mut removed = 0;
    for (at, key) in &due {
        expiry.remove((*at, key.as_str())).map_err(backend)?;
        let matches = match entries.get(key.as_str()).map_err(backend)? {
            Some(guard) => decode(guard.value()).map_or(true, |r| r.expires_ms == *at),
            None => false,
        };
        if matches {
            entries.remove(key.as_str()).map_err(backend)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes `key` from both tables; returns the old record's expiry if it existed.
fn remove_entry(
    entries: &mut EntriesTable<'_>,
    expiry: &mut ExpiryTable<'_>,
    key: &str,
) -> Result<Option<u64>, KvError> {
    // A corrupt old record is overwritten anyway; its stray index row, if any,
    // is dropped by a later sweep.
    let old_expiry = entries
        .remove(key)
        .map_err(backend)?
        .map(|old| decode(old.value()).map_or(0, |r| r.expires_ms));
    if let Some(at) = old_expiry.filter(|at| *at != 0) {
        expiry.remove((at, key)).map_err(backend)?;
    }
    Ok(old_expiry)
}

impl Kv for DurableKv {
    fn get<'a>(&'a self, key: &'a str) -> KvFuture<'a, Option<KvEntry>> {
        Box::pin(async move { self.get_now(key) })
    }

    fn get_many<'a>(&'a self, keys: &'a [&'a str]) -> KvFuture<'a, Reads> {
        Box::pin(async move { self.get_many_now(keys) })
    }

    fn put<'a>(&'a self, key: &'a str, value: Bytes, opts: PutOptions) -> KvFuture<'a, ()> {
        self.put_batch(vec![PutItem {
            key: key.to_owned(),
            value,
            opts,
        }])
    }

    fn put_batch<'a>(&'a self, items: Vec<PutItem>) -> KvFuture<'a, ()> {
        Box::pin(async move {
            // Everything is checked and encoded before the transaction, so a
            // refused item stores nothing.
            let mut records = Vec::with_capacity(items.len());
            for item in items {
                check_key(&item.key)?;
                let (expires_ms, metadata) = prepare_put(&item.opts)?;
                let record = encode(expires_ms, metadata.as_deref(), &item.value)?;
                records.push((item.key, expires_ms, record));
            }
            if records.is_empty() {
                return Ok(());
            }
            self.blocking(move |db| {
                let txn = db.begin_write().map_err(backend)?;
                {
                    let mut entries = txn.open_table(ENTRIES).map_err(backend)?;
                    let mut expiry = txn.open_table(EXPIRY).map_err(backend)?;
                    for (key, expires_ms, record) in &records {
                        remove_entry(&mut entries, &mut expiry, key)?;
                        entries
                            .insert(key.as_str(), record.as_slice())
                            .map_err(backend)?;
                        if *expires_ms != 0 {
                            expiry
                                .insert((*expires_ms, key.as_str()), ())
                                .map_err(backend)?;
                        }
                    }
                    sweep(&mut entries, &mut expiry, now_ms(), SWEEP_PER_WRITE)?;
                }
                txn.commit().map_err(backend)
            })
            .await
        })
    }

    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        opts: PutOptions,
    ) -> KvFuture<'a, bool> {
        Box::pin(async move {
            check_key(key)?;
            let (expires_ms, metadata) = prepare_put(&opts)?;
            let record = encode(expires_ms, metadata.as_deref(), &value)?;
            let key = key.to_owned();
            // One write transaction checks and stores: redb runs one writer
            // at a time, so two creators cannot both see the key absent.
            self.blocking(move |db| {
                let txn = db.begin_write().map_err(backend)?;
                let stored = {
                    let mut entries = txn.open_table(ENTRIES).map_err(backend)?;
                    let mut expiry = txn.open_table(EXPIRY).map_err(backend)?;
                    let live = match entries.get(key.as_str()).map_err(backend)? {
                        Some(guard) => {
                            decode(guard.value()).is_ok_and(|r| !is_expired(r.expires_ms, now_ms()))
                        }
                        None => false,
                    };
                    if !live {
                        remove_entry(&mut entries, &mut expiry, &key)?;
                        entries
                            .insert(key.as_str(), record.as_slice())
                            .map_err(backend)?;
                        if expires_ms != 0 {
                            expiry
                                .insert((expires_ms, key.as_str()), ())
                                .map_err(backend)?;
                        }
                    }
                    !live
                };
                txn.commit().map_err(backend)?;
                Ok(stored)
            })
            .await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> KvFuture<'a, bool> {
        Box::pin(async move {
            check_key(key)?;
            let key = key.to_owned();
            self.blocking(move |db| {
                let txn = db.begin_write().map_err(backend)?;
                let old = {
                    let mut entries = txn.open_table(ENTRIES).map_err(backend)?;
                    let mut expiry = txn.open_table(EXPIRY).map_err(backend)?;
                    remove_entry(&mut entries, &mut expiry, &key)?
                };
                txn.commit().map_err(backend)?;
                Ok(old.is_some_and(|at| !is_expired(at, now_ms())))
            })
            .await
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> KvFuture<'a, ListPage> {
        let prefix = prefix.to_owned();
        let cursor = cursor.map(str::to_owned);
        Box::pin(self.blocking(move |db| list_blocking(db, &prefix, cursor.as_deref(), limit)))
    }
}

fn list_blocking(
    db: &Database,
    prefix: &str,
    cursor: Option<&str>,
    limit: usize,
) -> Result<ListPage, KvError> {
    let limit = clamp_limit(limit);
    let now = now_ms();
    let start = super::list_start(prefix, cursor);
    let txn = db.begin_read().map_err(backend)?;
    let table = txn.open_table(ENTRIES).map_err(backend)?;
    let mut keys = Vec::new();
    let mut more = false;
    for row in table
        .range::<&str>((start, Bound::Unbounded))
        .map_err(backend)?
    {
        let (k, v) = row.map_err(backend)?;
        let name = k.value();
        if !name.starts_with(prefix) {
            break;
        }
        let record = decode(v.value())?;
        if is_expired(record.expires_ms, now) {
            continue;
        }
        if keys.len() == limit {
            more = true;
            break;
        }
        keys.push(KeyInfo {
            name: name.to_owned(),
            metadata: parse_metadata(record.metadata)?,
            expires_at: time_from_ms(record.expires_ms),
        });
    }
    Ok(ListPage::new(keys, more))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::conformance;
    use redb::ReadableTableMetadata;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    fn fresh() -> (tempfile::TempDir, DurableKv) {
        let dir = tempfile::tempdir().unwrap();
        let kv = DurableKv::open(dir.path().join("state.redb")).unwrap();
        (dir, kv)
    }

    #[tokio::test]
    async fn put_get_delete() {
        let (_dir, kv) = fresh();
        conformance::put_get_delete(&kv).await;
    }

    #[tokio::test]
    async fn metadata_round_trips() {
        let (_dir, kv) = fresh();
        conformance::metadata_round_trips(&kv).await;
    }

    #[tokio::test]
    async fn ttl_expiry() {
        let (_dir, kv) = fresh();
        conformance::ttl_expiry(&kv).await;
        conformance::get_many(&kv).await;
    }

    #[tokio::test]
    async fn list_prefix_and_cursor() {
        let (_dir, kv) = fresh();
        conformance::list_prefix_and_cursor(&kv).await;
    }

    #[tokio::test]
    async fn refusals() {
        let (_dir, kv) = fresh();
        conformance::refusals(&kv).await;
    }

    #[tokio::test]
    async fn put_batch() {
        let (_dir, kv) = fresh();
        conformance::put_batch(&kv).await;
    }

    #[tokio::test]
    async fn put_if_absent() {
        let (_dir, kv) = fresh();
        conformance::put_if_absent(&kv).await;
    }

    #[tokio::test]
    async fn a_batch_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let kv = DurableKv::open(&path).unwrap();
            let items = (0..100)
                .map(|i| PutItem {
                    key: format!("exp:e:user:{i}"),
                    value: Bytes::from_static(b"control"),
                    opts: PutOptions::ttl(Duration::from_secs(3600)),
                })
                .collect();
            kv.put_batch(items).await.unwrap();
        }
        let kv = DurableKv::open(&path).unwrap();
        let page = kv.list("exp:e:user:", None, 1000).await.unwrap();
        assert_eq!(page.keys.len(), 100);
        assert!(page.keys.iter().all(|k| k.expires_at.is_some()));
    }

    #[tokio::test]
    async fn value_survives_drop_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let kv = DurableKv::open(&path).unwrap();
            let opts = PutOptions {
                ttl: Some(Duration::from_secs(3600)),
                metadata: Some(serde_json::json!({"by": "test"})),
            };
            kv.put(
                "exp:new-checkout:user:42",
                Bytes::from_static(b"variant_a"),
                opts,
            )
            .await
            .unwrap();
            kv.put("gone", Bytes::from_static(b"x"), PutOptions::default())
                .await
                .unwrap();
            assert!(kv.delete("gone").await.unwrap());
        }
        let kv = DurableKv::open(&path).unwrap();
        let entry = kv.get("exp:new-checkout:user:42").await.unwrap().unwrap();
        assert_eq!(entry.value, "variant_a");
        assert_eq!(entry.metadata, Some(serde_json::json!({"by": "test"})));
        assert!(entry.expires_at.is_some());
        assert_eq!(kv.get("gone").await.unwrap(), None);
    }

    #[tokio::test]
    async fn sweep_removes_expired_rows_for_good() {
        let (_dir, kv) = fresh();
        // TTLs well above an fsync, so no put's own sweep gets there first.
        let ttl = PutOptions::ttl(Duration::from_millis(300));
        kv.put("a", Bytes::new(), ttl.clone()).await.unwrap();
        // Rewritten without TTL: its old index row must not delete it.
        kv.put("b", Bytes::new(), ttl).await.unwrap();
        kv.put("b", Bytes::new(), PutOptions::default())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(kv.sweep_expired().await.unwrap(), 1);
        assert_eq!(kv.sweep_expired().await.unwrap(), 0);
        assert!(kv.get("b").await.unwrap().is_some());
        let txn = kv.db.begin_read().unwrap();
        assert!(txn.open_table(ENTRIES).unwrap().get("a").unwrap().is_none());
        assert!(txn.open_table(EXPIRY).unwrap().is_empty().unwrap());
    }

    #[test]
    fn corrupt_records_are_reported_not_panicked_on() {
        assert!(matches!(decode(b""), Err(KvError::Corrupt(_))));
        assert!(matches!(decode(&[9; HEADER_LEN]), Err(KvError::Corrupt(_))));
        let mut bad = encode(0, Some(b"{}"), b"v").unwrap();
        bad[9] = 200; // metadata length past the end
        assert!(matches!(decode(&bad), Err(KvError::Corrupt(_))));
        let good = encode(7, Some(b"{}"), b"value").unwrap();
        let decoded = decode(&good).unwrap();
        assert_eq!(
            (decoded.expires_ms, decoded.metadata, decoded.value),
            (7, Some(&b"{}"[..]), &b"value"[..])
        );
    }

    const CHILD_ENV: &str = "KVGATE_TEST_KILL9_DB";

    /// Proves an acknowledged put survives `kill -9`: a child process (this
    /// test binary, re-run in child mode) writes, reports, then is SIGKILLed
    /// while still holding the database open.
    #[tokio::test]
    async fn acknowledged_put_survives_kill_9() {
        if let Ok(path) = std::env::var(CHILD_ENV) {
            let kv = DurableKv::open(&path).unwrap();
            kv.put(
                "flag:newUI:user:7",
                Bytes::from_static(b"true"),
                PutOptions::default(),
            )
            .await
            .unwrap();
            println!("committed");
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "kv::durable::tests::acknowledged_put_survives_kill_9",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let committed = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("committed"));
        assert!(committed, "child never reported its write");
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();

        let kv = DurableKv::open(&path).unwrap();
        let entry = kv.get("flag:newUI:user:7").await.unwrap().unwrap();
        assert_eq!(entry.value, "true");
    }
}
