//! Integration tests (run against real redis-server processes).

mod command_keys;
