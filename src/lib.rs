//! kvgate: a reverse-proxy caching gateway.
//!
//! The request path flows one way: `proxy` (listener, guard, origin client)
//! -> `edge` (identity, flags, experiments, preferences: injected headers)
//! -> `cache` (key, policy, store, revalidation) -> response. `kv` holds the
//! state edge decisions need; `config` holds the TOML schema.

pub mod admin;
pub mod cache;
pub mod cli;
pub mod config;
pub mod demo;
pub mod edge;
pub mod kv;
pub mod metrics;
pub mod protocol;
pub mod proxy;
