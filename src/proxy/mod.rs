//! The listener and the request path, one file per phase (see `gateway`).

pub(crate) mod body;
mod cluster;
mod connector;
mod fetch;
pub(crate) mod gateway;
mod h1_edge;
mod h1_hits;
mod h1_relay;
pub(crate) mod headers;
mod lookup;
pub(crate) mod origin;
mod origin_server;
mod pass;
pub(crate) mod probes;
mod request;
pub(crate) mod respond;
pub(crate) mod self_service;
pub(crate) mod server;
#[cfg(test)]
mod tests;
