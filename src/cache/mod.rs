//! The HTTP cache: keys, RFC 9111 policy (pure), the store, and the
//! single-flight table for fetches and background refreshes.

pub mod directives;
pub mod key;
pub mod policy;
pub mod revalidate;
pub mod store;
pub mod tags;
