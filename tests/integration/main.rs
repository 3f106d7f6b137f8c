//! Integration tests: real redis-server (and nats-server) processes on free
//! loopback ports, nearcache in-process or as the built binary, and real
//! clients (redis-rs, redis-cli, raw sockets).

mod support;

mod command_keys;
mod smoke;
