//! The HTTP cache: keys, RFC 9111 policy (pure), the route rules over it
//! (`filters`), the storage seam and its memory implementation, the
//! single-flight table for fetches and background refreshes, and the body
//! its waiters share. Imports `protocol` and `config`, nothing above.

pub(crate) mod directives;
pub(crate) mod filters;
pub(crate) mod key;
pub(crate) mod policy;
pub(crate) mod result;
pub(crate) mod shared_body;
pub(crate) mod single_flight;
pub(crate) mod storage;
pub(crate) mod tags;
pub(crate) mod tier;

// What the benchmarks and tests reach: the key, the stored entry and the
// storage seam, the freshness policy, and Cache-Control parsing.
pub use directives::{RequestDirectives, ResponseDirectives};
pub use key::CacheKey;
pub use policy::{usability, Freshness};
pub use storage::{Entry, Storage, Store, StoreStats};
