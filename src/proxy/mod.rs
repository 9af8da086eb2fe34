//! The listener and the request pipeline.

pub mod body;
pub mod headers;
pub mod origin;
pub mod pipeline;
pub mod respond;
pub mod self_service;
pub mod server;
