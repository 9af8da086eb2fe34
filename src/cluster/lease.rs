//! One origin fetch per key across the cluster: a lease in Redis in front
//! of each instance's single-flight.
//!
//! The instance whose leader wins `SET lease token NX PX ttl` fetches; when
//! the response is stored, it writes it to Redis (if small enough) and then
//! releases the lease by compare-and-delete, so it never deletes a lease
//! that expired and went to someone else. The losers poll for that
//! response; if the lease goes away without one (the response was not
//! storable) or the bounded wait ends, they fetch themselves. A crashed
//! holder blocks nobody longer than the lease's expiry.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::cache::directives::RequestDirectives;
use crate::cache::policy::{self, Usability};
use crate::cache::storage::Entry;
use crate::cache::tier;
use crate::redis::Region;

/// How often a loser looks for the winner's response.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Deletes the lease only if it still holds our token.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The lease's expiry.
    pub(crate) ttl: Duration,
    /// How long a loser waits for the winner's response.
    pub(crate) wait: Duration,
    /// Largest body handed over through Redis.
    pub(crate) max_body: usize,
    /// The response tier (`[cache.l2]`): misses read it before taking the
    /// lease, and copies live as long as they are usable (up to this cap)
    /// rather than just long enough for the waiters.
    pub(crate) l2_max_ttl: Option<Duration>,
}

/// What a cacheable miss does.
pub(crate) enum Miss {
    /// Another instance fetched it: serve and store this.
    Found(Arc<Entry>),
    /// This instance fetches for the cluster; complete the lease with the
    /// stored entry.
    Lead(Lease),
    /// Fetch alone (Redis unreachable, the winner's response not shared,
    /// or the wait ran out).
    Alone,
}

/// A won lease. Dropping it releases it (in the background).
pub(crate) struct Lease {
    held: Option<Held>,
}

struct Held {
    region: Arc<Region>,
    settings: Settings,
    lease_key: String,
    response_key: String,
    token: String,
}

impl Lease {
    /// The fetch stored `entry` (or did not): hand it to the waiting
    /// instances, then release the lease. Runs in the background.
    pub(crate) fn complete(mut self, entry: Option<Arc<Entry>>) {
        if let Some(held) = self.held.take() {
            spawn(async move {
                if let Some(e) = entry.filter(|e| e.body_len() <= held.settings.max_body) {
                    let cap = held.settings.l2_max_ttl.unwrap_or(held.settings.ttl);
                    let keep = tier::keep_for(&e, SystemTime::now(), cap);
                    let bytes = tier::encode(&e);
                    let mut set = ::redis::cmd("SET");
                    set.arg(&held.response_key)
                        .arg(bytes)
                        .arg("PX")
                        .arg(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX));
                    // A failure is counted and logged by the region; the
                    // waiters then fetch themselves.
                    let _ = held.region.query::<()>(&set).await;
                }
                held.release().await;
            });
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            spawn(async move { held.release().await });
        }
    }
}

impl Held {
    async fn release(self) {
        let script = ::redis::Script::new(RELEASE);
        let mut invocation = script.prepare_invoke();
        invocation.key(&self.lease_key).arg(&self.token);
        // If this fails the lease expires on its own.
        let _ = self.region.script::<i64>(&invocation).await;
    }
}

/// Spawns on the current runtime, if there is one (a lease dropped outside
/// a runtime simply expires).
fn spawn(f: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(f);
    }
}

/// The winner's response, if it is there and usable for this request.
fn usable(
    bytes: Option<Vec<u8>>,
    max_body: usize,
    request: &http::HeaderMap,
    directives: &RequestDirectives,
) -> Option<Arc<Entry>> {
    let entry = tier::decode(&bytes?, max_body)?;
    let fresh =
        policy::usability(&entry.freshness, directives, SystemTime::now()) == Usability::Fresh;
    (fresh && policy::vary_matches(entry.vary(), request)).then(|| Arc::new(entry))
}

pub(super) async fn before_fetch(
    region: &Arc<Region>,
    settings: &Settings,
    lease_key: &str,
    response_key: &str,
    request: &http::HeaderMap,
    directives: &RequestDirectives,
) -> Miss {
    if settings.l2_max_ttl.is_some() {
        let mut read = ::redis::cmd("GET");
        read.arg(response_key);
        match region.query::<Option<Vec<u8>>>(&read).await {
            Ok(bytes) => {
                if let Some(e) = usable(bytes, settings.max_body, request, directives) {
                    return Miss::Found(e);
                }
            }
            Err(_) => return Miss::Alone, // counted and logged by the region
        }
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    let mut acquire = ::redis::cmd("SET");
    acquire
        .arg(lease_key)
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(u64::try_from(settings.ttl.as_millis()).unwrap_or(u64::MAX));
    match region.query::<Option<String>>(&acquire).await {
        Ok(Some(_)) => {
            return Miss::Lead(Lease {
                held: Some(Held {
                    region: Arc::clone(region),
                    settings: settings.clone(),
                    lease_key: lease_key.to_owned(),
                    response_key: response_key.to_owned(),
                    token,
                }),
            })
        }
        Ok(None) => {}
        Err(_) => return Miss::Alone, // counted and logged by the region
    }
    // Someone else fetches: wait for their response, bounded.
    let deadline = Instant::now() + settings.wait;
    while Instant::now() < deadline {
        tokio::time::sleep(POLL_INTERVAL).await;
        let mut look = ::redis::pipe();
        look.cmd("GET")
            .arg(response_key)
            .cmd("EXISTS")
            .arg(lease_key);
        match region.pipeline::<(Option<Vec<u8>>, bool)>(&look).await {
            Ok((response, held)) => {
                let had_response = response.is_some();
                if let Some(e) = usable(response, settings.max_body, request, directives) {
                    return Miss::Found(e);
                }
                if had_response || !held {
                    // Not for this request (Vary, stale), or not shared.
                    return Miss::Alone;
                }
            }
            Err(_) => return Miss::Alone,
        }
    }
    Miss::Alone
}
