//! Integration tests: real redis-server (and nats-server) processes on free
//! loopback ports, nearcache in-process or as the built binary, and real
//! clients (redis-rs, redis-cli, raw sockets).

// A failed unwrap in a test is a failed test with its reason: exactly right.
#![allow(clippy::unwrap_used)]

mod support;

mod acl;
mod admin;
mod backpressure;
mod busy;
mod clients;
mod command_keys;
mod compress;
mod dashboard;
mod deploy;
mod faults;
mod lifecycle;
mod limits;
mod log_check;
mod logs;
mod proxy_admin;
mod reload;
mod smoke;
mod stale;
mod tls;
mod users;
mod warm;

mod cache;
mod checker;
mod cli;
mod coherence;
mod compat;
mod differential;
mod stateful;
mod stats;
