//! The HTTP cache: keys, RFC 9111 policy (pure), the store, the
//! single-flight table for fetches and background refreshes, and the body
//! its waiters share. Imports `protocol` and `config`, nothing above.

pub mod directives;
pub mod filters;
pub mod key;
pub mod policy;
pub mod result;
pub mod shared_body;
pub mod single_flight;
pub mod store;
pub mod tags;
