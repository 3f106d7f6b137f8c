//! What an operator looks into with redis-cli: `PROXY RULES`, `PROXY
//! HOTKEYS [N]`, `PROXY BIGKEYS [N]`, `PROXY PEERS` and `PROXY SLOWLOG [N]`;
//! and the `hot_keys` / `big_keys` lists of `/stats`. Each entry is a map (a
//! flat name/value array in RESP2, which redis-cli prints as numbered lines).
//!
//! Keys are shown as stored (binary-safe bulk strings; UTF-8-lossy text in
//! JSON), with a `db` field only when it is not 0: most deployments use one
//! database, and their lists stay short.

use std::sync::atomic::Ordering::Relaxed;

use serde_json::{Value, json};

use crate::context::Context;
use crate::protocol::reply::Reply;
use crate::stats::BigKey;

/// How many entries `HOTKEYS`, `BIGKEYS` and `SLOWLOG` list without `N`.
pub const DEFAULT_COUNT: usize = 10;
/// How many hot keys `/stats` lists.
const JSON_HOT_KEYS: usize = 20;

fn n(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `PROXY RULES`: every rule in match order, as configured, with what it
/// holds now and how it serves.
pub fn rules(r: &mut Reply, ctx: &Context) {
    let snapshot = ctx.snapshot.load();
    let rules: Vec<_> = snapshot.rules.iter().collect();
    r.array(rules.len());
    let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    for rule in rules {
        let s = &rule.stats;
        let (kind, selector) = rule.selector();
        r.map(14);
        r.bulk(kind.as_bytes()).bulk(selector);
        r.bulk(b"ttl_ms").int(ms(rule.ttl));
        r.bulk(b"cache").int(i64::from(rule.cache));
        r.bulk(b"negative_ttl_ms")
            .int(rule.negative_ttl.map_or(-1, ms));
        r.bulk(b"upstream_ttl_ms")
            .int(rule.upstream_ttl.map_or(-1, ms));
        r.bulk(b"max_value_size").int(n(rule.max_value_size as u64));
        r.bulk(b"refresh_ahead");
        match rule.refresh_ahead {
            Some(f) => r.double(f),
            None => r.null(),
        };
        r.bulk(b"stale_if_error_ms")
            .int(rule.stale_if_error.map_or(-1, ms));
        r.bulk(b"compress_min_size")
            .int(rule.compress_min_size.map_or(-1, |s| n(s as u64)));
        r.bulk(b"entries").int(s.entries.load(Relaxed).max(0));
        r.bulk(b"bytes").int(s.bytes.load(Relaxed).max(0));
        let (hits, misses) = (s.hits.load(Relaxed), s.misses.load(Relaxed));
        r.bulk(b"hits").int(n(hits));
        r.bulk(b"misses").int(n(misses));
        r.bulk(b"hit_ratio").ratio(hits, misses);
    }
}

/// `PROXY HOTKEYS [N]`: the `count` most-read keys, most first, with their
/// estimated reads (see `stats::HotKeys`).
pub fn hot_keys(r: &mut Reply, ctx: &Context, count: usize) {
    let top = ctx.stats.hot_keys.top(count);
    r.array(top.len());
    for k in top {
        r.map(if k.db == 0 { 3 } else { 4 });
        r.bulk(b"key").bulk(&k.key);
        if k.db != 0 {
            r.bulk(b"db").int(i64::from(k.db));
        }
        r.bulk(b"count").int(n(k.count));
        r.bulk(b"error").int(n(k.error));
    }
}

/// Every rule's largest replies, largest first, with the rule's selector.
fn big_keys_all(ctx: &Context) -> Vec<(BigKey, String)> {
    let snapshot = ctx.snapshot.load();
    let mut all: Vec<(BigKey, String)> = snapshot
        .rules
        .iter()
        .flat_map(|rule| {
            let (kind, selector) = rule.selector();
            let name = format!("{kind}:{}", String::from_utf8_lossy(selector));
            rule.stats
                .big_keys
                .largest()
                .into_iter()
                .map(move |k| (k, name.clone()))
        })
        .collect();
    all.sort_by_key(|k| std::cmp::Reverse(k.0.bytes));
    all
}

/// `PROXY BIGKEYS [N]`: the `count` largest replies L1 stored, largest
/// first, each with its rule (`prefix:…` or `pattern:…`).
pub fn big_keys(r: &mut Reply, ctx: &Context, count: usize) {
    let all = big_keys_all(ctx);
    let shown = all.len().min(count);
    r.array(shown);
    for (k, rule) in all.into_iter().take(count) {
        r.map(if k.db == 0 { 3 } else { 4 });
        r.bulk(b"key").bulk(&k.key);
        if k.db != 0 {
            r.bulk(b"db").int(i64::from(k.db));
        }
        r.bulk(b"bytes").int(n(k.bytes));
        r.bulk(b"rule").bulk(rule.as_bytes());
    }
}

/// `PROXY PEERS`: the other instances heard on the bus (none without one).
pub fn peers(r: &mut Reply, ctx: &Context) {
    let peers = match &ctx.bus {
        Some(_) => ctx.stats.bus.peers(),
        None => Vec::new(),
    };
    r.array(peers.len());
    for (id, seen) in peers {
        r.map(4);
        r.bulk(b"id").bulk(id.as_bytes());
        r.bulk(b"last_heard_ms_ago")
            .int(i64::try_from(seen.heard.elapsed().as_millis()).unwrap_or(i64::MAX));
        r.bulk(b"delay_us").int(n(seen.delay_us));
        r.bulk(b"messages").int(n(seen.messages));
    }
}

/// `PROXY SLOWLOG [N]`: the latest `count` slow upstream calls, newest
/// first (see `stats::Slowlog`).
pub fn slowlog(r: &mut Reply, ctx: &Context, count: usize) {
    let entries = ctx.stats.slowlog.latest(count);
    r.array(entries.len());
    for e in entries {
        r.map(6);
        r.bulk(b"id").int(n(e.id));
        r.bulk(b"unix_time").int(n(e.unix_time));
        r.bulk(b"latency_us").int(n(e.latency_us));
        r.bulk(b"command").bulk(e.command.as_bytes());
        r.bulk(b"commands").int(i64::from(e.commands));
        r.bulk(b"path").bulk(e.path.as_bytes());
    }
}

/// `/stats`'s `hot_keys`: `[{"key": "...", "count": N}, …]` (and `"db"`
/// when not 0), most read first.
pub fn hot_keys_json(ctx: &Context) -> Value {
    let list: Vec<Value> = ctx
        .stats
        .hot_keys
        .top(JSON_HOT_KEYS)
        .into_iter()
        .map(|k| {
            let mut v = json!({
                "key": String::from_utf8_lossy(&k.key),
                "count": k.count,
            });
            if k.db != 0 {
                v["db"] = json!(k.db);
            }
            v
        })
        .collect();
    Value::Array(list)
}

/// `/stats`'s `big_keys`: `[{"key": "...", "bytes": N, "rule": "..."}, …]`
/// (and `"db"` when not 0), largest first: every rule's (at most
/// `stats::BIG_KEYS_PER_RULE` each).
pub fn big_keys_json(ctx: &Context) -> Value {
    let list: Vec<Value> = big_keys_all(ctx)
        .into_iter()
        .map(|(k, rule)| {
            let mut v = json!({
                "key": String::from_utf8_lossy(&k.key),
                "bytes": k.bytes,
                "rule": rule,
            });
            if k.db != 0 {
                v["db"] = json!(k.db);
            }
            v
        })
        .collect();
    Value::Array(list)
}
