//! The listener and the request path, one file per phase (see `gateway`).

pub mod body;
mod fetch;
pub mod gateway;
pub mod headers;
mod lookup;
pub mod origin;
mod pass;
mod request;
pub mod respond;
pub mod self_service;
pub mod server;
#[cfg(test)]
mod tests;
