//! nearcache's own view of itself: `PROXY …` commands that redis-cli can
//! run, and the admin HTTP listener ([`http`]: health, readiness, `/metrics`
//! from [`metrics`], `/stats`, the [`dashboard`] page). Everything here reads `Context`. `PROXY LIMITS` is in
//! `limits.rs`; `INFO`'s section and `PROXY INFO` in [`info`]; `PROXY CONFIG
//! GET` in `config_get.rs`; `RULES`, `HOTKEYS`, `BIGKEYS`, `PEERS` and
//! `SLOWLOG` in `inspect.rs`.

mod config_get;
mod dashboard;
pub mod http;
pub mod info;
mod inspect;
mod limits;
mod metrics;

use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use serde_json::{Value, json};

use crate::context::Context;
use crate::protocol::reply::{self, Protocol, Reply};
use crate::stats::Path;

/// `PROXY HELP`: one line per subcommand, as Redis's `… HELP` lists its own.
const HELP: &[&str] = &[
    "PROXY <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "HELP -- This help.",
    "INFO -- Version, uptime, config file, listen addresses, upstream (password masked) and bus.",
    "STATS -- Cache, rule, request, upstream, bus and limit counters, with hit ratios.",
    "RULES -- Each cache rule: selector, TTLs, cache on/off, entries, bytes, hits, misses, hit ratio.",
    "HOTKEYS [<count>] -- The most-read cacheable keys (estimated reads; default 10).",
    "BIGKEYS [<count>] -- The largest replies stored in L1, with their rule (default 10).",
    "PEERS -- Other instances on the bus: id, last heard (ms ago), delay, messages.",
    "SLOWLOG [<count>|RESET] -- Latest upstream calls slower than admin.slowlog_threshold (default 10).",
    "CONFIG GET <field|glob> [...] -- Configuration in force by dotted name (upstream.url); secrets masked.",
    "LIMITS -- Every rate limit, as configured, with its share and counters.",
    "INVALIDATE <pattern> -- Drop matching keys from L1 here and on every peer (Redis untouched).",
    "FLUSH -- Empty L1 here and on every peer (Redis untouched).",
    "RELOAD -- Read the configuration file again (as SIGHUP).",
];

/// An optional `[<count>]` argument (at `argv[2]`): `default` when absent.
fn count_arg(argv: &[Bytes], default: usize) -> Result<usize, Bytes> {
    match argv.get(2) {
        None => Ok(default),
        Some(a) => crate::protocol::parser::parse_i64(a)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| reply::error("ERR value is out of range, must be positive")),
    }
}

/// The reply built by `f` in `proto`.
fn built(proto: Protocol, f: impl FnOnce(&mut Reply)) -> Bytes {
    let mut r = Reply::new(proto);
    f(&mut r);
    r.finish()
}

/// Answers `PROXY <subcommand> …`.
pub fn proxy_command(argv: &[Bytes], ctx: &Context, proto: Protocol) -> Bytes {
    let sub = argv.get(1).map(|s| s.to_ascii_uppercase());
    let arity = |name: &str| {
        reply::error(&format!(
            "ERR wrong number of arguments for 'proxy|{name}' command"
        ))
    };
    match sub.as_deref() {
        Some(b"HELP") if argv.len() == 2 => built(proto, |r| {
            r.array(HELP.len());
            for line in HELP {
                r.simple(line);
            }
        }),
        Some(b"INFO") if argv.len() == 2 => built(proto, |r| info::proxy_info(r, ctx)),
        Some(b"RULES") if argv.len() == 2 => built(proto, |r| inspect::rules(r, ctx)),
        Some(b"PEERS") if argv.len() == 2 => built(proto, |r| inspect::peers(r, ctx)),
        Some(b"HOTKEYS") if argv.len() <= 3 => match count_arg(argv, inspect::DEFAULT_COUNT) {
            Ok(n) => built(proto, |r| inspect::hot_keys(r, ctx, n)),
            Err(e) => e,
        },
        Some(b"BIGKEYS") if argv.len() <= 3 => match count_arg(argv, inspect::DEFAULT_COUNT) {
            Ok(n) => built(proto, |r| inspect::big_keys(r, ctx, n)),
            Err(e) => e,
        },
        Some(b"SLOWLOG") if argv.len() == 3 && argv[2].eq_ignore_ascii_case(b"reset") => {
            ctx.stats.slowlog.reset();
            Bytes::from_static(reply::OK)
        }
        Some(b"SLOWLOG") if argv.len() <= 3 => match count_arg(argv, inspect::DEFAULT_COUNT) {
            Ok(n) => built(proto, |r| inspect::slowlog(r, ctx, n)),
            Err(e) => e,
        },
        Some(b"CONFIG") if argv.len() >= 4 && argv[2].eq_ignore_ascii_case(b"get") => {
            built(proto, |r| config_get::config_get(r, &ctx.cfg, &argv[3..]))
        }
        Some(b"CONFIG") if argv.len() >= 3 && !argv[2].eq_ignore_ascii_case(b"get") => {
            reply::error(&format!(
                "ERR unknown subcommand 'config|{}'. Try PROXY HELP.",
                String::from_utf8_lossy(&argv[2]).to_lowercase()
            ))
        }
        Some(
            name @ (b"HELP" | b"INFO" | b"RULES" | b"PEERS" | b"HOTKEYS" | b"BIGKEYS" | b"SLOWLOG"
            | b"CONFIG"),
        ) => {
            let name = String::from_utf8_lossy(name).to_lowercase();
            match name.as_str() {
                "config" => arity("config|get"),
                other => arity(other),
            }
        }
        Some(b"STATS") if argv.len() == 2 => stats(ctx, proto),
        Some(b"LIMITS") if argv.len() == 2 => {
            let mut r = Reply::new(proto);
            limits::limits(&mut r, ctx);
            r.finish()
        }
        Some(b"LIMITS") => reply::error("ERR wrong number of arguments for 'proxy|limits' command"),
        Some(b"INVALIDATE") if argv.len() == 3 => {
            // Local first, then every peer over the bus. Redis is untouched.
            let dropped = ctx
                .l1
                .as_ref()
                .map_or(0, |l1| l1.invalidate_matching(&argv[2]));
            if let Some(bus) = &ctx.bus {
                bus.publish_pattern(argv[2].clone());
            }
            let mut r = Reply::new(proto);
            r.int(i64::try_from(dropped).unwrap_or(i64::MAX));
            r.finish()
        }
        Some(b"INVALIDATE") => {
            reply::error("ERR wrong number of arguments for 'proxy|invalidate' command")
        }
        Some(b"FLUSH") if argv.len() == 2 => {
            if let Some(l1) = &ctx.l1 {
                l1.flush();
            }
            if let Some(bus) = &ctx.bus {
                bus.publish_flush();
            }
            Bytes::from_static(reply::OK)
        }
        Some(b"STATS") => reply::error("ERR wrong number of arguments for 'proxy|stats' command"),
        Some(other) => reply::error(&format!(
            "ERR unknown subcommand '{}'. Try PROXY HELP.",
            String::from_utf8_lossy(other)
        )),
        None => reply::error("ERR wrong number of arguments for 'proxy' command"),
    }
}

/// Cache totals and per-rule counters, the request path's counters and the
/// bus's, as nested maps (flat key/value arrays in RESP2, which redis-cli
/// prints as numbered lines).
fn stats(ctx: &Context, proto: Protocol) -> Bytes {
    let mut r = Reply::new(proto);
    let Some(l1) = &ctx.l1 else {
        r.map(4)
            .bulk(b"cache")
            .bulk(b"disabled (no rule caches anything)");
        upstream_stats(&mut r, ctx);
        request_stats(&mut r, ctx);
        limits::stats(&mut r, ctx);
        return r.finish();
    };
    let (entries, bytes) = l1.usage();
    let snapshot = ctx.snapshot.load();
    let rules: Vec<_> = snapshot.rules.iter().collect();
    r.map(12);
    bus_stats(&mut r, ctx);
    warm_stats(&mut r, ctx);
    upstream_stats(&mut r, ctx);
    request_stats(&mut r, ctx);
    limits::stats(&mut r, ctx);
    // 1 once Redis tracks the cached prefixes for us (and L1 was flushed
    // after it began), 0 while it does not, -1 when not configured.
    let configured = ctx.cfg.coherence.redis_tracking;
    let tracking = &ctx.stats.tracking;
    let tracking_active = if configured {
        i64::from(tracking.active.load(std::sync::atomic::Ordering::Relaxed))
    } else {
        -1
    };
    r.bulk(b"redis_tracking").int(tracking_active);
    // Keys Redis's invalidations named (-1 when not configured).
    let tracked = if configured {
        i64::try_from(tracking.keys.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(i64::MAX)
    } else {
        -1
    };
    r.bulk(b"redis_tracking_keys").int(tracked);
    r.bulk(b"keys")
        .int(i64::try_from(entries).unwrap_or(i64::MAX));
    r.bulk(b"bytes")
        .int(i64::try_from(bytes).unwrap_or(i64::MAX));
    r.bulk(b"max_memory")
        .int(i64::try_from(ctx.cfg.cache.max_memory.0).unwrap_or(i64::MAX));
    // (A double: a bulk string in RESP2, as Redis sends one; null before
    // any cacheable read.)
    let (hits, misses) = info::hits_and_misses(ctx);
    r.bulk(b"hit_ratio").ratio(hits, misses);
    r.bulk(b"rules").array(rules.len());
    for rule in rules {
        let counters = rule.stats.snapshot();
        r.map(5 + counters.len());
        let (kind, selector) = rule.selector();
        r.bulk(kind.as_bytes()).bulk(selector);
        r.bulk(b"ttl_ms")
            .int(i64::try_from(rule.ttl.as_millis()).unwrap_or(i64::MAX));
        r.bulk(b"cache").int(i64::from(rule.cache));
        for (name, value) in counters {
            r.bulk(name.as_bytes()).int(value);
        }
        let s = &rule.stats;
        r.bulk(b"hit_ratio").ratio(
            s.hits.load(std::sync::atomic::Ordering::Relaxed),
            s.misses.load(std::sync::atomic::Ordering::Relaxed),
        );
        // Held / uncompressed (null while nothing is held compressed).
        let (held, saved) = compression(s);
        r.bulk(b"compression_ratio");
        match saved {
            0 => r.null(),
            _ => r.ratio(held, saved),
        };
    }
    r.finish()
}

/// The `requests` entry of `PROXY STATS`: clients connected (and of them
/// pinned to a connection of their own), commands by class, errors
/// nearcache answered with by kind, and reply latency by path.
fn request_stats(r: &mut Reply, ctx: &Context) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &ctx.stats.requests;
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    r.bulk(b"requests").map(5);
    r.bulk(b"clients").int(n(s.clients.load(Relaxed)));
    r.bulk(b"pinned")
        .int(n(ctx.directory.pinned_count() as u64));
    let commands: Vec<_> = s.commands().collect();
    r.bulk(b"commands").map(commands.len());
    for (class, count) in commands {
        r.bulk(class.name().as_bytes()).int(n(count));
    }
    let errors: Vec<_> = s.errors().collect();
    r.bulk(b"errors").map(errors.len());
    for (kind, count) in errors {
        r.bulk(kind.name().as_bytes()).int(n(count));
    }
    r.bulk(b"latency_us").map(Path::ALL.len());
    for path in Path::ALL {
        let h = s.latency(path);
        r.bulk(path.name().as_bytes()).map(4);
        r.bulk(b"count").int(n(h.count()));
        r.bulk(b"p50").int(n(h.quantile(0.5)));
        r.bulk(b"p99").int(n(h.quantile(0.99)));
        r.bulk(b"max").int(n(h.max()));
    }
}

/// The `upstream` entry of `PROXY STATS`: whether a shared connection is
/// up, how often it turned out to be another server, and what waits for
/// Redis against its caps.
fn upstream_stats(r: &mut Reply, ctx: &Context) {
    let b = ctx.upstream.backlog.stats();
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let breaker = &ctx.upstream.breaker;
    let fields: [(&str, i64); 10] = [
        ("up", i64::from(ctx.default_pool.any_shared_up())),
        ("identity_changes", n(ctx.upstream.identity_changes())),
        ("circuit_state", breaker.state().code()),
        ("circuit_opened", n(breaker.opened())),
        ("in_flight", n(b.commands)),
        ("in_flight_bytes", n(b.bytes)),
        ("max_in_flight", n(b.max_commands)),
        ("max_in_flight_bytes", n(b.max_bytes)),
        ("backlog_waits", n(b.waited)),
        ("backlog_refused", n(b.refused)),
    ];
    r.bulk(b"upstream").map(fields.len());
    for (name, value) in fields {
        r.bulk(name.as_bytes()).int(value);
    }
}

/// The `warm` entry of `PROXY STATS`: warming L1 (`fill::warm`).
fn warm_stats(r: &mut Reply, ctx: &Context) {
    let w = &ctx.stats.warm;
    let n = |v: &std::sync::atomic::AtomicU64| i64::try_from(v.load(Relaxed)).unwrap_or(i64::MAX);
    let fields: [(&str, i64); 7] = [
        ("running", i64::from(w.running.load(Relaxed))),
        ("passes", n(&w.passes)),
        ("failed", n(&w.failed)),
        ("keys", n(&w.keys)),
        ("peer_keys", n(&w.peer_keys)),
        ("last_keys", n(&w.last_keys)),
        ("last_ms", n(&w.last_ms)),
    ];
    r.bulk(b"warm").map(fields.len());
    for (name, value) in fields {
        r.bulk(name.as_bytes()).int(value);
    }
}

/// Whether `cache.warm.ready_after_warm` still holds readiness back: no
/// pass finished yet, within `cache.warm.timeout` of the start, while some
/// rule warms.
fn warming(ctx: &Context) -> bool {
    let cfg = &ctx.cfg.cache.warm;
    cfg.ready_after_warm
        && ctx.l1.is_some()
        && ctx.stats.warm.passes.load(Relaxed) == 0
        && ctx.stats.started.0.elapsed() < cfg.timeout.0
        && ctx.snapshot.load().rules.iter().any(|r| r.warm)
}

/// The `bus` entry of `PROXY STATS`.
fn bus_stats(r: &mut Reply, ctx: &Context) {
    use std::sync::atomic::Ordering::Relaxed;
    r.bulk(b"bus");
    let Some(bus) = &ctx.bus else {
        r.bulk(b"none");
        return;
    };
    let s = &ctx.stats.bus;
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let d = &s.delay_us;
    let fields: [(&str, i64); 19] = [
        ("healthy", i64::from(bus.healthy())),
        ("live_peers", n(s.live_peers.load(Relaxed))),
        ("published", n(s.published.load(Relaxed))),
        ("published_keys", n(s.published_keys.load(Relaxed))),
        ("received", n(s.received.load(Relaxed))),
        ("applied_keys", n(s.applied_keys.load(Relaxed))),
        ("gaps", n(s.gaps.load(Relaxed))),
        ("flushes", n(s.flushes.load(Relaxed))),
        ("publish_errors", n(s.publish_errors.load(Relaxed))),
        ("dropped_keys", n(s.dropped_keys.load(Relaxed))),
        ("queued_keys", n(s.queued_keys.load(Relaxed) as u64)),
        ("silent_peers", n(s.silent_peers.load(Relaxed))),
        ("peers_left", n(s.peers_left.load(Relaxed))),
        ("awaiting_peers", n(s.awaiting_peers.load(Relaxed))),
        ("delay_samples", n(d.count())),
        ("delay_avg_us", n(d.mean())),
        ("delay_p50_us", n(d.quantile(0.5))),
        ("delay_p99_us", n(d.quantile(0.99))),
        ("delay_max_us", n(d.max())),
    ];
    r.map(fields.len() + 1);
    r.bulk(b"instance").bulk(bus.instance.as_bytes());
    for (name, value) in fields {
        r.bulk(name.as_bytes()).int(value);
    }
}

/// Whether the proxy can serve, and if not, why.
#[derive(Debug)]
pub struct Readiness {
    /// Every check passed.
    pub ready: bool,
    /// A shared upstream connection is up.
    pub upstream: bool,
    /// The bus: "none", "connected", "lost, policy serves L1" or "lost".
    pub bus: &'static str,
    /// Graceful shutdown has begun.
    pub draining: bool,
    /// The upstream's circuit breaker: "closed", "open" or "half_open".
    pub circuit: &'static str,
    /// The first warming pass is still running (`ready_after_warm`).
    pub warming: bool,
}

impl Readiness {
    /// The `/readyz` body.
    pub fn to_json(&self) -> Value {
        let mut why = Vec::new();
        if !self.upstream {
            why.push("upstream unreachable");
        }
        if self.bus == "lost" {
            why.push("bus lost and the loss policy bypasses L1");
        }
        if self.draining {
            why.push("draining");
        }
        if self.circuit == "open" {
            why.push("upstream circuit open");
        }
        if self.warming {
            why.push("warming L1 (cache.warm.ready_after_warm)");
        }
        json!({
            "ready": self.ready,
            "upstream": if self.upstream { "up" } else { "down" },
            "circuit": self.circuit,
            "bus": self.bus,
            "draining": self.draining,
            "warming": self.warming,
            "why": why,
        })
    }
}

/// Readiness now: the upstream reachable, the bus connected or its loss
/// policy still serving L1, and not draining.
pub fn readiness(ctx: &Context, draining: bool) -> Readiness {
    let upstream = ctx.default_pool.any_shared_up();
    let bus = match &ctx.bus {
        None => "none",
        Some(bus) if bus.healthy() => "connected",
        Some(bus) if bus.l1_usable() => "lost, policy serves L1",
        Some(_) => "lost",
    };
    let circuit = ctx.upstream.breaker.state().name();
    let warming = warming(ctx);
    Readiness {
        ready: upstream && bus != "lost" && !draining && circuit != "open" && !warming,
        upstream,
        bus,
        draining,
        circuit,
        warming,
    }
}

/// What `PROXY STATS` shows, as JSON (`/stats`), with hit ratios added.
pub fn stats_json(ctx: &Context) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &ctx.stats.requests;
    let latency: serde_json::Map<String, Value> = Path::ALL
        .into_iter()
        .map(|p| {
            let h = s.latency(p);
            let v = json!({
                "count": h.count(),
                "p50": h.quantile(0.5),
                "p99": h.quantile(0.99),
                "max": h.max(),
            });
            (p.name().to_owned(), v)
        })
        .collect();
    let commands: serde_json::Map<String, Value> = s
        .commands()
        .map(|(c, v)| (c.name().to_owned(), json!(v)))
        .collect();
    let errors: serde_json::Map<String, Value> = s
        .errors()
        .map(|(k, v)| (k.name().to_owned(), json!(v)))
        .collect();
    let requests = json!({
        "clients": s.clients.load(Relaxed),
        "pinned": ctx.directory.pinned_count(),
        "commands": commands,
        "errors": errors,
        "latency_us": latency,
    });
    let ratio = |hits: u64, misses: u64| {
        let total = hits + misses;
        if total == 0 {
            Value::Null
        } else {
            json!(hits as f64 / total as f64)
        }
    };
    let snapshot = ctx.snapshot.load();
    let (mut all_hits, mut all_misses) = (0, 0);
    let rules: Vec<Value> = snapshot
        .rules
        .iter()
        .map(|rule| {
            let (kind, selector) = rule.selector();
            let mut m = serde_json::Map::new();
            m.insert(kind.into(), json!(String::from_utf8_lossy(selector)));
            m.insert(
                "ttl_ms".into(),
                json!(u64::try_from(rule.ttl.as_millis()).unwrap_or(u64::MAX)),
            );
            m.insert("cache".into(), json!(rule.cache));
            for (name, value) in rule.stats.snapshot() {
                m.insert(name.into(), json!(value));
            }
            let hits = rule.stats.hits.load(Relaxed);
            let misses = rule.stats.misses.load(Relaxed);
            all_hits += hits;
            all_misses += misses;
            m.insert("hit_ratio".into(), ratio(hits, misses));
            let (held, saved) = compression(&rule.stats);
            m.insert(
                "compression_ratio".into(),
                if saved == 0 {
                    Value::Null
                } else {
                    ratio(held, saved)
                },
            );
            Value::Object(m)
        })
        .collect();
    let cache = match &ctx.l1 {
        None => json!("disabled (no rule caches anything)"),
        Some(l1) => {
            let (entries, bytes) = l1.usage();
            json!({
                "keys": entries,
                "bytes": bytes,
                "max_memory": ctx.cfg.cache.max_memory.0,
                "hit_ratio": ratio(all_hits, all_misses),
                "rules": rules,
            })
        }
    };
    let bus = match &ctx.bus {
        None => json!("none"),
        Some(bus) => {
            let b = &ctx.stats.bus;
            let d = &b.delay_us;
            json!({
                "instance": bus.instance.to_string(),
                "healthy": bus.healthy(),
                "l1_usable": bus.l1_usable(),
                "published": b.published.load(Relaxed),
                "published_keys": b.published_keys.load(Relaxed),
                "received": b.received.load(Relaxed),
                "applied_keys": b.applied_keys.load(Relaxed),
                "gaps": b.gaps.load(Relaxed),
                "flushes": b.flushes.load(Relaxed),
                "publish_errors": b.publish_errors.load(Relaxed),
                "dropped_keys": b.dropped_keys.load(Relaxed),
                "queued_keys": b.queued_keys.load(Relaxed),
                "silent_peers": b.silent_peers.load(Relaxed),
                "peers_left": b.peers_left.load(Relaxed),
                "awaiting_peers": b.awaiting_peers.load(Relaxed),
                "delay_samples": d.count(),
                "delay_avg_us": d.mean(),
                "delay_p50_us": d.quantile(0.5),
                "delay_p99_us": d.quantile(0.99),
                "delay_max_us": d.max(),
            })
        }
    };
    let tracking = if ctx.cfg.coherence.redis_tracking {
        json!({
            "active": ctx.stats.tracking.active.load(Relaxed),
            "keys": ctx.stats.tracking.keys.load(Relaxed),
        })
    } else {
        json!("off")
    };
    let backlog = ctx.upstream.backlog.stats();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "upstream": if ctx.default_pool.any_shared_up() { "up" } else { "down" },
        "upstream_identity_changes": ctx.upstream.identity_changes(),
        "upstream_circuit": {
            "state": ctx.upstream.breaker.state().name(),
            "opened": ctx.upstream.breaker.opened(),
        },
        "upstream_backlog": {
            "in_flight": backlog.commands,
            "in_flight_bytes": backlog.bytes,
            "max_in_flight": backlog.max_commands,
            "max_in_flight_bytes": backlog.max_bytes,
            "waits": backlog.waited,
            "refused": backlog.refused,
        },
        "requests": requests,
        "cache": cache,
        "hot_keys": inspect::hot_keys_json(ctx),
        "big_keys": inspect::big_keys_json(ctx),
        "bus": bus,
        "redis_tracking": tracking,
    })
}

// ---------------------------------------------------------------------------
// `/stats` figures the dashboard needs that the sections above do not give.
// Kept in one block, added to the body by `http::stats`.
// ---------------------------------------------------------------------------

/// Adds to a `/stats` body: `limits` (each limit's decisions, by name, as
/// `PROXY STATS` has them) and `peers` (instances alive on the bus, this one
/// included, and the other peers' states; `live` is 1 and the rest 0
/// without a bus).
pub fn dashboard_stats(ctx: &Context, body: &mut serde_json::Map<String, Value>) {
    use std::sync::atomic::Ordering::Relaxed;
    let snapshot = ctx.snapshot.load();
    let limits: serde_json::Map<String, Value> = snapshot
        .limits
        .iter()
        .map(|limit| {
            let s = &limit.stats;
            let v = json!({
                "allowed": s.allowed.load(Relaxed),
                "delayed": s.delayed.load(Relaxed),
                "rejected": s.rejected.load(Relaxed),
            });
            (limit.name().to_owned(), v)
        })
        .collect();
    body.insert("limits".into(), Value::Object(limits));
    let b = &ctx.stats.bus;
    let (awaiting, silent, left) = if ctx.bus.is_some() {
        (
            b.awaiting_peers.load(Relaxed),
            b.silent_peers.load(Relaxed),
            b.peers_left.load(Relaxed),
        )
    } else {
        (0, 0, 0)
    };
    body.insert(
        "peers".into(),
        json!({
            "live": ctx.live_instances(),
            "awaiting": awaiting,
            "silent_total": silent,
            "left_total": left,
        }),
    );
}

/// A rule's bytes held in L1 and the bytes compression saves on them.
fn compression(s: &crate::stats::RuleStats) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let get = |v: &std::sync::atomic::AtomicI64| u64::try_from(v.load(Relaxed)).unwrap_or(0);
    (get(&s.bytes), get(&s.compression_saved))
}
