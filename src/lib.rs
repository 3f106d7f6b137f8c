//! nearcache: a Redis-protocol caching proxy.
//!
//! Applications keep their Redis client and point it at nearcache, which
//! forwards every command to the upstream Redis — pipelined over a few shared
//! connections, with stateful commands pinned to dedicated ones — and answers
//! hot reads from an in-process L1 cache governed by key-prefix rules, kept
//! coherent across instances by invalidations broadcast over NATS.
//!
//! # Layout
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | the TOML file, environment and flag overrides, validation |
//! | [`protocol`] | client command parsing (bounded, incremental), upstream reply framing, replies the proxy writes |
//! | [`command`] | Redis's command table (flags, key specs) and key extraction |
//! | [`server`] | listener, per-client sessions (the request path), routing, outbox, shutdown, the directory of clients (`CLIENT LIST`, `KILL`, id translation) |
//! | [`error`] | the errors nearcache answers with itself: kind, side, whether the connection closes |
//! | [`upstream`] | connections to Redis: handshake, pipelined connection tasks, pools, reconnects |
//! | [`cache`] | L1: key-prefix rules, generation-checked fills, single flight, per-rule stats |
//! | [`coherence`] | the NATS invalidation bus: message format, batching, sequence gaps, loss policy |
//! | [`admin`] | `PROXY …` commands |
//! | [`stats`] | one registry of counters: requests by class, latency by path, errors by kind, per-rule cache counters, bus and tracking |
//! | [`glob`] | Redis-style glob matching (pattern rules, `PROXY INVALIDATE`) |
//!
//! The request path reads top to bottom in [`server::session`]; its cache
//! phases (lookup, fetch and fill, write invalidation) are in
//! `session/cached.rs`, what it answers itself in `session/local.rs`, and
//! pinning to dedicated connections in `session/pinned.rs`.

#![forbid(unsafe_code)]
// The docs are for the project's developers and built with
// `--document-private-items` (scripts/test.sh): the layout table links the
// crate-private modules too.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod admin;
pub mod cache;
pub mod coherence;
pub mod command;
pub mod config;
pub(crate) mod context;
pub mod error;
pub(crate) mod fill;
pub mod glob;
pub mod protocol;
pub mod server;
pub mod stats;
pub(crate) mod upstream;

pub use config::Config;
pub use server::Proxy;
