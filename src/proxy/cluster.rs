//! The gateway's side of the purge broadcast: events from other instances
//! applied to this instance's memory cache and versions.

use super::gateway::Gateway;
use crate::cache::storage::Storage;
use crate::cluster::{Event, LocalCache};
use std::sync::atomic::Ordering;

impl LocalCache for Gateway {
    fn apply(&self, event: &Event) {
        match event {
            Event::Purge(purge) => {
                let purged = purge.apply(&self.store);
                self.metrics
                    .purged_entries
                    .fetch_add(purged as u64, Ordering::Relaxed);
                tracing::debug!(purged, "purge from another instance");
            }
            Event::Version { version } => {
                let now = self.follow_version(*version);
                tracing::debug!(version = now, "version bump from another instance");
            }
            Event::RouteVersion { route } => {
                // A route this instance does not know (another config) has
                // no keys here.
                let _ = self.bump_route_version(route);
            }
        }
    }

    fn drop_all(&self) {
        // Every key's path starts with '/' (the path is in normal form).
        let dropped = self.store.purge_prefix("/", false);
        tracing::warn!(dropped, "memory cache dropped: cluster events were lost");
    }
}
