//! kvgate: a reverse-proxy caching gateway.
//!
//! The request path flows one way: `proxy` (listener, guard, origin client)
//! -> `edge` (identity, flags, experiments, preferences: injected headers)
//! -> `cache` (key, policy, store, revalidation) -> response. `kv` holds the
//! state edge decisions need; `config` holds the TOML schema.
//!
//! The public surface is what the binary, the integration tests and the
//! benchmarks use: [`cli`] (start and run a gateway), [`config`] (the
//! schema), the [`cache`] pieces the benchmarks measure, the [`kv`]
//! backends, [`edge`] decisions, the [`Gateway`] a running instance shares
//! and [`demo`]. Everything else is private to the crate, so the compiler
//! reports what nothing uses.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![warn(unreachable_pub)]

mod admin;
pub mod cache;
pub mod cli;
mod cluster;
pub mod config;
pub mod demo;
pub mod edge;
pub mod error;
pub mod kv;
mod logging;
mod metrics;
mod protocol;
mod proxy;
mod redis;
mod telemetry;

pub use proxy::gateway::Gateway;
pub use proxy::respond::{CacheResult, Labels};

/// The response a plain HIT builds from a stored entry (headers, `Age`,
/// `X-Cache`, `Cache-Status`, ranges and 304s), the body left out: what
/// the hot-path benchmark measures.
pub fn hit_response(
    e: &cache::Entry,
    req: &http::HeaderMap,
    head: bool,
    now: std::time::SystemTime,
    labels: &Labels,
) -> http::Response<()> {
    let hit = proxy::respond::CacheStatus::hit(CacheResult::Hit);
    proxy::respond::from_entry(e, req, head, now, labels, hit)
        .response
        .map(drop)
}
