//! Protocol rules that are neither proxying nor caching, used by both:
//! request-target normalisation (RFC 3986), hop-by-hop fields (RFC 9110),
//! header-safe JSON, header texts kept in static memory,
//! trusted address ranges, W3C trace context. Pure functions (but for
//! `interned`'s process-wide table of texts), no I/O; imports nothing above it.

pub(crate) mod cidr;
pub(crate) mod headers;
pub(crate) mod interned;
pub(crate) mod path;
pub(crate) mod trace_context;
