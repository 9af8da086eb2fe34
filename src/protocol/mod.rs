//! Protocol rules that are neither proxying nor caching, used by both:
//! request-target normalisation (RFC 3986), trusted address ranges. Pure
//! functions, no I/O.

pub mod cidr;
pub mod path;
