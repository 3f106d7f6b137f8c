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
//! (`ARCHITECTURE.md` at the root draws the request path, the modes, and
//! where each invariant is enforced.)
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | the TOML file, environment and flag overrides, validation |
//! | [`context`] | what every session shares, and the snapshot a reload swaps (rules, limits, users, fence) |
//! | [`server`] | listener, per-client sessions (the request path), routing, requests, the outbox, client transport, the directory of clients |
//! | [`server::session`] | the request path: classify → admit → note writes → dispatch by mode (shared, pinned, transaction, relay) → respond → record |
//! | [`upstream`] | connections to Redis: the session's lane (pool, sticky connection, ordering), pools, connection tasks, handshake, transport |
//! | [`cache`] | L1: generation-checked fills, invalidation, key-prefix rules |
//! | [`fill`] | fetching missed reads: single flight, PTTL, refresh-ahead, MGET split and stitch, stale-if-error; warming (`fill/warm.rs`) |
//! | [`stored`] | values Redis stores compressed (`store_compressed`): the format, which commands, decoding replies |
//! | [`coherence`] | the one acknowledgement path, the NATS invalidation bus, Redis tracking |
//! | [`stats`] | one registry of counters: requests by class, latency by path, errors by kind, per-rule cache counters and big keys, bus and its peers, tracking; hot keys (sampled per session), the slow log |
//! | [`reload`] | SIGHUP and `PROXY RELOAD`: the file read again, what can change swapped, what cannot reported |
//! | [`admin`] | `PROXY …` commands and `INFO`'s `# Nearcache` section; the admin HTTP listener (the dashboard at `/`, `/healthz`, `/readyz`, `/metrics`, `/stats`) |
//! | [`error`] | the errors nearcache answers with itself: kind, side, whether the connection closes |
//! | [`protocol`] | client command parsing (bounded, incremental), upstream reply framing, replies the proxy writes |
//! | [`command`] | Redis's command table (flags, key specs, cacheability) and key extraction |
//! | [`acl`] | users and permissions (`[[users]]`, a subset of Redis's ACL), fenced commands (`server.deny`, `server.rename`) |
//! | [`limits`] | rate limits at admission (`[[limits]]`): which commands count, buckets per ip/name/user/command/pattern, fleet shares |
//! | [`tls`] | TLS on both sides (rustls, ring): client and server configurations from PEM files, the plain-or-TLS stream |
//! | [`glob`] | Redis-style glob matching (pattern rules, `PROXY INVALIDATE`) |

#![forbid(unsafe_code)]
// The docs are for the project's developers and built with
// `--document-private-items` (scripts/test.sh): the layout table links the
// crate-private modules too.
#![allow(rustdoc::private_intra_doc_links)]

pub mod acl;
pub(crate) mod admin;
pub mod cache;
pub mod coherence;
pub mod command;
pub mod config;
pub(crate) mod context;
pub mod error;
pub(crate) mod fill;
pub mod glob;
pub mod limits;
pub mod protocol;
pub mod reload;
pub mod server;
pub mod stats;
pub(crate) mod stored;
pub mod tls;
pub(crate) mod upstream;

pub use config::Config;
pub use server::Proxy;
