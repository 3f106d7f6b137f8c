//! nearcache's own view of itself: `PROXY …` commands that redis-cli can run.
//! (The HTTP endpoints, metrics and INFO section come with the admin issue.)

use bytes::Bytes;

use crate::protocol::reply::{self, Protocol, Reply};
use crate::server::Context;

/// Answers `PROXY <subcommand> …`.
pub fn proxy_command(argv: &[Bytes], ctx: &Context, proto: Protocol) -> Bytes {
    let sub = argv.get(1).map(|s| s.to_ascii_uppercase());
    match sub.as_deref() {
        Some(b"STATS") if argv.len() == 2 => stats(ctx, proto),
        Some(b"STATS") => reply::error("ERR wrong number of arguments for 'proxy|stats' command"),
        Some(other) => reply::error(&format!(
            "ERR unknown subcommand '{}'. Try PROXY STATS.",
            String::from_utf8_lossy(other)
        )),
        None => reply::error("ERR wrong number of arguments for 'proxy' command"),
    }
}

/// Cache totals and per-rule counters, as nested maps (flat key/value arrays
/// in RESP2, which redis-cli prints as numbered lines).
fn stats(ctx: &Context, proto: Protocol) -> Bytes {
    let mut r = Reply::new(proto);
    let Some(l1) = &ctx.l1 else {
        r.map(1)
            .bulk(b"cache")
            .bulk(b"disabled (no rule caches anything)");
        return r.finish();
    };
    let (entries, bytes) = l1.usage();
    let rules: Vec<_> = l1.rule_stats().collect();
    r.map(4);
    r.bulk(b"keys")
        .int(i64::try_from(entries).unwrap_or(i64::MAX));
    r.bulk(b"bytes")
        .int(i64::try_from(bytes).unwrap_or(i64::MAX));
    r.bulk(b"max_memory")
        .int(i64::try_from(ctx.cfg.cache.max_memory.0).unwrap_or(i64::MAX));
    r.bulk(b"rules").array(rules.len());
    for (rule, stats) in rules {
        let counters = stats.snapshot();
        r.map(3 + counters.len());
        r.bulk(b"prefix").bulk(&rule.prefix);
        r.bulk(b"ttl_ms")
            .int(i64::try_from(rule.ttl.as_millis()).unwrap_or(i64::MAX));
        r.bulk(b"cache").int(i64::from(rule.cache));
        for (name, value) in counters {
            r.bulk(name.as_bytes()).int(value);
        }
    }
    r.finish()
}
