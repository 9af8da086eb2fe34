//! The HTTP cache: keys, RFC 9111 policy (pure), the route rules over it
//! (`filters`), the storage seam and its memory implementation, the
//! single-flight table for fetches and background refreshes, and the body
//! its waiters share. Imports `protocol` and `config`, nothing above.

pub mod directives;
pub mod filters;
pub mod key;
pub mod policy;
pub mod result;
pub mod shared_body;
pub mod single_flight;
pub mod storage;
pub mod tags;
