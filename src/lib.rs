//! kvgate: a reverse-proxy caching gateway.
//!
//! The request path flows one way: `proxy` (listener, guard, origin client)
//! -> `cache` (key, policy, store, revalidation) -> response. `config` holds
//! the TOML schema.

pub mod edge;
pub mod kv;
