//! nearcache: a Redis-protocol caching proxy.
//!
//! Applications keep their Redis client and point it at nearcache, which
//! forwards every command to the upstream Redis — pipelined over a few shared
//! connections, with stateful commands pinned to dedicated ones — and (in later
//! stages) answers hot reads from an in-process cache kept coherent across
//! instances over NATS.
//!
//! # Layout
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | the TOML file, environment and flag overrides, validation |
//! | [`protocol`] | client command parsing (bounded, incremental), upstream reply framing, replies the proxy writes |
//! | [`command`] | Redis's command table (flags, key specs) and key extraction |
//! | [`server`] | listener, per-client sessions (the request path), routing, reply writer, shutdown |
//! | [`upstream`] | connections to Redis: handshake, pipelined connection tasks, pools, reconnects |
//!
//! The request path reads top to bottom in [`server::session`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod cache;
pub mod command;
pub mod config;
pub mod protocol;
pub mod server;
pub mod upstream;

pub use config::Config;
pub use server::Proxy;
