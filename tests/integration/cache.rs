//! The L1 cache, end to end: what is served from L1, for how long, and that
//! every write through the proxy is seen by the next read (DESIGN.md,
//! "Coherence invariants").
//!
//! "Served from L1" is always proved with Redis's own `INFO commandstats`
//! (`RedisServer::calls`), never with timing. Sleeps appear only to let a TTL
//! elapse, and then sleep well past the deadline and assert the effect (an
//! upstream call, a new value). Raw sockets ([`Raw`]) compare replies byte
//! for byte with what Redis itself answers.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use nearcache::config::{ByteSize, Duration as Dur, RuleConfig};
use redis::Value;
use redis::aio::MultiplexedConnection;

use crate::compat::{Raw, direct_async, encode};
use crate::support::{RedisServer, TestProxy, config_for, proxy_stats, text};

const OK: &[u8] = b"+OK\r\n";
const QUEUED: &[u8] = b"+QUEUED\r\n";
const NIL: &[u8] = b"$-1\r\n";

/// How long a bounded poll may wait for the proxy to reach a state.
const POLL_LIMIT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ helpers

/// A caching rule for `prefix` (no negative caching, 1 MiB values).
fn rule(prefix: &str, ttl: Duration) -> RuleConfig {
    RuleConfig::caching(prefix, ttl)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A proxy in front of `redis` with `rules`.
async fn proxy_with(redis: &RedisServer, rules: Vec<RuleConfig>) -> TestProxy {
    let mut cfg = config_for(redis);
    cfg.cache.rules = rules;
    TestProxy::start_with(cfg).await
}

/// The usual setup: `c:` cached for 10 s, everything else not cached.
async fn proxy_c(redis: &RedisServer) -> TestProxy {
    proxy_with(redis, vec![rule("c:", Duration::from_secs(10))]).await
}

/// RESP2 bulk string.
fn bulk(s: &str) -> Vec<u8> {
    format!("${}\r\n{s}\r\n", s.len()).into_bytes()
}

/// RESP integer.
fn int(n: i64) -> Vec<u8> {
    format!(":{n}\r\n").into_bytes()
}

/// RESP2 array of bulk strings.
fn arr(items: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", items.len()).into_bytes();
    for i in items {
        out.extend_from_slice(&bulk(i));
    }
    out
}

/// Reads `args` through the proxy twice and proves the second read was
/// answered from L1 (Redis's call count for the command did not move).
/// Returns the (identical) reply.
async fn cache_it(p: &mut Raw, redis: &RedisServer, args: &[&str]) -> Bytes {
    let cmd = args[0].to_ascii_lowercase();
    let first = p.cmd(args).await;
    let before = redis.calls(&cmd);
    let second = p.cmd(args).await;
    assert_eq!(first, second, "{args:?}: the cached reply differs");
    assert_eq!(
        redis.calls(&cmd),
        before,
        "{args:?}: the second read went upstream instead of L1"
    );
    first
}

/// `PROXY STATS`, flattened (see `support::proxy_stats`).
#[derive(Debug)]
struct Stats(HashMap<String, i64>);

impl Stats {
    fn top(&self, name: &str) -> i64 {
        *self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {self:?}"))
    }

    /// Counter `name` of the rule whose prefix (or pattern) is `selector`.
    fn rule(&self, selector: &str, name: &str) -> i64 {
        ["prefix", "pattern"]
            .iter()
            .find_map(|kind| self.0.get(&format!("rules.{kind}:{selector}.{name}")))
            .copied()
            .unwrap_or_else(|| panic!("no {name} for rule {selector:?} in {self:?}"))
    }
}

async fn stats(c: &mut MultiplexedConnection) -> Stats {
    Stats(proxy_stats(c).await)
}

/// Polls `PROXY STATS` (answered by the proxy itself, so it works while Redis
/// is stopped) until `rule`'s counter `name` reaches `target`.
async fn until_stat(c: &mut MultiplexedConnection, rule: &str, name: &str, target: i64) {
    let deadline = tokio::time::Instant::now() + POLL_LIMIT;
    loop {
        let s = stats(c).await;
        if s.rule(rule, name) >= target {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {rule}{name} to reach {target}: {s:?}"
        );
        tokio::time::sleep(ms(2)).await;
    }
}

/// Resumes a SIGSTOPped Redis even if the test fails while it is stopped.
struct Resume<'a>(&'a RedisServer);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.signal("CONT");
    }
}

// ---------------------------------------------------- 1. what L1 answers

/// Guards `cache::cacheable` + `Session::cached_read`: every cacheable read is
/// answered from L1 the second time, with exactly Redis's bytes; keys outside
/// every rule and multi-key EXISTS always go upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cacheable_read_is_served_from_l1_the_second_time() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;

    for setup in [
        &["SET", "c:s", "hello world"][..],
        &["SET", "u:s", "uncached"],
        &["HSET", "c:h", "f1", "v1", "f2", "v2"],
        &["RPUSH", "c:l", "a", "b", "c"],
        &["SADD", "c:set", "x", "y", "z"],
        &["ZADD", "c:z", "1", "a", "2", "b", "3", "c"],
        &["XADD", "c:x", "1-1", "f", "v"],
        &["XADD", "c:x", "2-1", "f", "w"],
    ] {
        let r = d.cmd(setup).await;
        assert!(!r.starts_with(b"-"), "{setup:?}: {r:?}");
    }

    let cases: &[&[&str]] = &[
        &["GET", "c:s"],
        &["GETRANGE", "c:s", "0", "4"],
        &["STRLEN", "c:s"],
        &["EXISTS", "c:s"],
        &["HGET", "c:h", "f1"],
        &["HMGET", "c:h", "f1", "f2", "nope"],
        &["HGETALL", "c:h"],
        &["HLEN", "c:h"],
        &["HEXISTS", "c:h", "f1"],
        &["LRANGE", "c:l", "0", "-1"],
        &["LLEN", "c:l"],
        &["LINDEX", "c:l", "1"],
        &["SMEMBERS", "c:set"],
        &["SISMEMBER", "c:set", "y"],
        &["SCARD", "c:set"],
        &["ZRANGE", "c:z", "0", "-1"],
        &["ZRANGE", "c:z", "1", "2", "BYSCORE"],
        &["ZRANGE", "c:z", "0", "-1", "REV"],
        &["ZRANGE", "c:z", "0", "-1", "WITHSCORES"],
        &["ZSCORE", "c:z", "b"],
        &["ZCARD", "c:z"],
        &["ZRANK", "c:z", "c"],
        &["XRANGE", "c:x", "-", "+"],
        &["TYPE", "c:z"],
    ];
    for args in cases {
        let want = d.cmd(args).await;
        assert!(!want.starts_with(b"-"), "{args:?}: Redis said {want:?}");
        redis.reset_stats();
        let first = p.cmd(args).await;
        let second = p.cmd(args).await;
        assert_eq!(first, want, "{args:?}: first read through the proxy");
        assert_eq!(second, want, "{args:?}: second read (from L1)");
        assert_eq!(
            redis.calls(args[0]),
            1,
            "{args:?}: two reads through the proxy must reach Redis once"
        );
    }

    // Outside every rule: never cached.
    redis.reset_stats();
    for _ in 0..2 {
        assert_eq!(p.cmd(&["GET", "u:s"]).await, bulk("uncached"));
    }
    assert_eq!(redis.calls("get"), 2, "a key no rule names is not cached");

    // Multi-key EXISTS: not a single-key read.
    redis.reset_stats();
    for _ in 0..2 {
        assert_eq!(p.cmd(&["EXISTS", "c:s", "c:h"]).await, int(2));
    }
    assert_eq!(redis.calls("exists"), 2, "EXISTS a b is not cached");
}

/// Guards `Rules::lookup` (longest prefix wins, `cache = false` exempts) and
/// `fill_ttl`'s `max_value_size`: exempt keys and oversized replies always go
/// upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exempt_sub_prefixes_and_oversized_replies_are_not_cached() {
    let redis = RedisServer::start();
    let mut exempt = rule("c:private:", Duration::from_secs(10));
    exempt.cache = false;
    let mut small = rule("s:", Duration::from_secs(10));
    small.max_value_size = ByteSize(100);
    let proxy = proxy_with(
        &redis,
        vec![exempt, rule("c:", Duration::from_secs(10)), small],
    )
    .await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;
    let big = "b".repeat(200);
    assert_eq!(d.cmd(&["SET", "c:private:k", "v"]).await, OK);
    assert_eq!(d.cmd(&["SET", "s:big", &big]).await, OK);
    assert_eq!(d.cmd(&["SET", "s:small", "v"]).await, OK);

    for (key, want) in [("c:private:k", bulk("v")), ("s:big", bulk(&big))] {
        redis.reset_stats();
        for _ in 0..2 {
            assert_eq!(p.cmd(&["GET", key]).await, want, "{key}");
        }
        assert_eq!(redis.calls("get"), 2, "{key} must not be cached");
    }
    // The small value under the same rule is cached.
    assert_eq!(
        cache_it(&mut p, &redis, &["GET", "s:small"]).await,
        bulk("v")
    );
}

/// Guards `Rules::lookup` for pattern rules: `c:*:1m` (cache = false) exempts
/// one-minute candles while the `c:` prefix rule still caches the rest, and
/// `PROXY STATS` names the rule by its pattern.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_rule_takes_precedence_over_a_prefix_rule() {
    let redis = RedisServer::start();
    let mut minute = rule("", Duration::from_secs(10));
    minute.pattern = Some("c:*:1m".into());
    minute.cache = false;
    let proxy = proxy_with(&redis, vec![rule("c:", Duration::from_secs(10)), minute]).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;
    assert_eq!(d.cmd(&["SET", "c:BTC:1m", "m"]).await, OK);
    assert_eq!(d.cmd(&["SET", "c:BTC:1h", "h"]).await, OK);

    redis.reset_stats();
    for _ in 0..2 {
        assert_eq!(p.cmd(&["GET", "c:BTC:1m"]).await, bulk("m"));
    }
    assert_eq!(redis.calls("get"), 2, "c:BTC:1m matches c:*:1m: not cached");
    assert_eq!(
        cache_it(&mut p, &redis, &["GET", "c:BTC:1h"]).await,
        bulk("h")
    );

    let mut c = proxy.conn().await;
    let s = stats(&mut c).await;
    assert_eq!(s.rule("c:", "hits"), 1, "{s:?}");
    assert_eq!(s.rule("c:*:1m", "cache"), 0, "{s:?}");
}

// ------------------------------------------------------------- 2. lifetime

/// Guards `fill_ttl` (cached.rs): an entry never outlives the key's own expiry
/// in Redis, even when the rule's TTL is much longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_never_outlives_the_keys_expiry_in_redis() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await; // rule ttl 10 s
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;

    // PX 1000 rather than 300: room for a slow machine between the two reads.
    assert_eq!(d.cmd(&["SET", "c:t", "v", "PX", "1000"]).await, OK);
    redis.reset_stats();
    assert_eq!(cache_it(&mut p, &redis, &["GET", "c:t"]).await, bulk("v"));
    assert_eq!(redis.calls("get"), 1);

    tokio::time::sleep(ms(2000)).await; // well past the key's expiry
    assert_eq!(
        p.cmd(&["GET", "c:t"]).await,
        NIL,
        "L1 served a key Redis has expired"
    );
    assert_eq!(redis.calls("get"), 2, "the read after expiry went upstream");
}

/// Guards the rule TTL (`L1::fill` expiry, `EntryExpiry`): a write that
/// bypasses every proxy is served stale only until the rule TTL passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_bypasses_the_proxy_is_seen_once_the_rule_ttl_passes() {
    let redis = RedisServer::start();
    // 1 s rather than 300 ms: the "still stale" read must land inside it.
    let proxy = proxy_with(&redis, vec![rule("r:", ms(1000))]).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;

    assert_eq!(d.cmd(&["SET", "r:k", "old"]).await, OK);
    redis.reset_stats();
    assert_eq!(p.cmd(&["GET", "r:k"]).await, bulk("old"));
    assert_eq!(d.cmd(&["SET", "r:k", "new"]).await, OK);
    assert_eq!(
        p.cmd(&["GET", "r:k"]).await,
        bulk("old"),
        "within the rule TTL, L1 still holds the old value (documented staleness)"
    );
    assert_eq!(redis.calls("get"), 1, "the stale read came from L1");

    tokio::time::sleep(ms(2500)).await; // well past the rule TTL
    assert_eq!(p.cmd(&["GET", "r:k"]).await, bulk("new"));
    assert_eq!(redis.calls("get"), 2, "the entry expired and was refetched");
}

// ------------------------------------------------------ 3. negative caching

/// Guards `fill_ttl`'s `-2` arm: "not found" is cached only when the rule asks
/// (`negative_ttl`), and a write through the proxy replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_are_cached_only_with_negative_ttl() {
    let redis = RedisServer::start();
    let mut negative = rule("n:", Duration::from_secs(10));
    negative.negative_ttl = Some(Dur(ms(1000)));
    let proxy = proxy_with(&redis, vec![rule("c:", Duration::from_secs(10)), negative]).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;

    // Off by default.
    redis.reset_stats();
    for _ in 0..3 {
        assert_eq!(p.cmd(&["GET", "c:missing"]).await, NIL);
    }
    assert_eq!(
        redis.calls("get"),
        3,
        "without negative_ttl, misses are not cached"
    );

    // On: the second read of a missing key is from L1.
    redis.reset_stats();
    assert_eq!(p.cmd(&["GET", "n:missing"]).await, NIL);
    assert_eq!(p.cmd(&["GET", "n:missing"]).await, NIL);
    assert_eq!(redis.calls("get"), 1, "the 'not found' was served from L1");

    // A SET through the proxy replaces it at once.
    assert_eq!(p.cmd(&["SET", "n:missing", "here"]).await, OK);
    assert_eq!(p.cmd(&["GET", "n:missing"]).await, bulk("here"));

    // And a negative entry expires after negative_ttl (key created directly).
    assert_eq!(p.cmd(&["GET", "n:later"]).await, NIL);
    assert_eq!(d.cmd(&["SET", "n:later", "v"]).await, OK);
    tokio::time::sleep(ms(2000)).await;
    assert_eq!(p.cmd(&["GET", "n:later"]).await, bulk("v"));
}

// -------------------------------------------------- 4. read your writes

/// Guards `Session::note_write` + `Outbox::answered` for strings and the
/// keyspace commands: each write through the proxy is seen by the next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_and_keyspace_writes_are_read_back() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;
    let get = |k: &'static str| ["GET", k];

    // SET / APPEND / INCR / GETDEL
    assert_eq!(d.cmd(&["SET", "c:s", "v1"]).await, OK);
    assert_eq!(cache_it(&mut p, &redis, &get("c:s")).await, bulk("v1"));
    assert_eq!(p.cmd(&["SET", "c:s", "v2"]).await, OK);
    assert_eq!(p.cmd(&get("c:s")).await, bulk("v2"), "SET");
    cache_it(&mut p, &redis, &get("c:s")).await;
    assert_eq!(p.cmd(&["APPEND", "c:s", "x"]).await, int(3));
    assert_eq!(p.cmd(&get("c:s")).await, bulk("v2x"), "APPEND");
    assert_eq!(d.cmd(&["SET", "c:n", "1"]).await, OK);
    assert_eq!(cache_it(&mut p, &redis, &get("c:n")).await, bulk("1"));
    assert_eq!(p.cmd(&["INCR", "c:n"]).await, int(2));
    assert_eq!(p.cmd(&get("c:n")).await, bulk("2"), "INCR");
    cache_it(&mut p, &redis, &get("c:s")).await;
    assert_eq!(p.cmd(&["GETDEL", "c:s"]).await, bulk("v2x"));
    assert_eq!(p.cmd(&get("c:s")).await, NIL, "GETDEL");

    // DEL / UNLINK
    for (cmd, key) in [("DEL", "c:del"), ("UNLINK", "c:unlink")] {
        assert_eq!(d.cmd(&["SET", key, "v"]).await, OK);
        assert_eq!(cache_it(&mut p, &redis, &["GET", key]).await, bulk("v"));
        assert_eq!(p.cmd(&[cmd, key]).await, int(1));
        assert_eq!(p.cmd(&["GET", key]).await, NIL, "{cmd}");
    }

    // RENAME: both the source and the destination are dropped.
    assert_eq!(d.cmd(&["SET", "c:src", "a"]).await, OK);
    assert_eq!(d.cmd(&["SET", "c:dst", "old"]).await, OK);
    cache_it(&mut p, &redis, &get("c:src")).await;
    assert_eq!(cache_it(&mut p, &redis, &get("c:dst")).await, bulk("old"));
    assert_eq!(p.cmd(&["RENAME", "c:src", "c:dst"]).await, OK);
    assert_eq!(p.cmd(&get("c:src")).await, NIL, "RENAME source");
    assert_eq!(p.cmd(&get("c:dst")).await, bulk("a"), "RENAME destination");

    // COPY … REPLACE onto a cached destination.
    assert_eq!(d.cmd(&["SET", "c:csrc", "new"]).await, OK);
    assert_eq!(d.cmd(&["SET", "c:cdst", "old"]).await, OK);
    assert_eq!(cache_it(&mut p, &redis, &get("c:cdst")).await, bulk("old"));
    assert_eq!(
        p.cmd(&["COPY", "c:csrc", "c:cdst", "REPLACE"]).await,
        int(1)
    );
    assert_eq!(p.cmd(&get("c:cdst")).await, bulk("new"), "COPY");

    // MOVE to another database.
    assert_eq!(d.cmd(&["SET", "c:mv", "v"]).await, OK);
    assert_eq!(cache_it(&mut p, &redis, &get("c:mv")).await, bulk("v"));
    assert_eq!(p.cmd(&["MOVE", "c:mv", "1"]).await, int(1));
    assert_eq!(p.cmd(&get("c:mv")).await, NIL, "MOVE");
    assert_eq!(p.cmd(&["SELECT", "1"]).await, OK);
    assert_eq!(p.cmd(&get("c:mv")).await, bulk("v"), "MOVE landed in db 1");
    assert_eq!(p.cmd(&["SELECT", "0"]).await, OK);
}

/// Guards the expiry path of `note_write` (EXPIRE drops the entry; the refill
/// is capped by the new PTTL): after EXPIRE's deadline the key reads as gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_through_the_proxy_ends_the_cached_value_with_the_key() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await; // rule ttl 10 s
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;

    assert_eq!(d.cmd(&["SET", "c:e", "v"]).await, OK);
    assert_eq!(cache_it(&mut p, &redis, &["GET", "c:e"]).await, bulk("v"));
    assert_eq!(p.cmd(&["EXPIRE", "c:e", "1"]).await, int(1));
    // Re-cache it while it still exists: the refill must carry the new TTL.
    let r = p.cmd(&["GET", "c:e"]).await;
    assert!(r == bulk("v") || r == NIL, "{r:?}");
    tokio::time::sleep(ms(2500)).await; // well past EXPIRE's deadline
    redis.reset_stats();
    assert_eq!(p.cmd(&["GET", "c:e"]).await, NIL, "EXPIRE then read");
    assert_eq!(redis.calls("get"), 1, "the read after expiry went upstream");
}

/// Guards `note_write` key extraction for every collection type and streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_writes_are_read_back() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;

    // Hash: HSET / HDEL.
    assert_eq!(d.cmd(&["HSET", "c:h", "f", "v1"]).await, int(1));
    assert_eq!(
        cache_it(&mut p, &redis, &["HGET", "c:h", "f"]).await,
        bulk("v1")
    );
    cache_it(&mut p, &redis, &["HGETALL", "c:h"]).await;
    assert_eq!(p.cmd(&["HSET", "c:h", "f", "v2", "g", "w"]).await, int(1));
    assert_eq!(p.cmd(&["HGET", "c:h", "f"]).await, bulk("v2"), "HSET");
    assert_eq!(
        p.cmd(&["HGETALL", "c:h"]).await,
        arr(&["f", "v2", "g", "w"])
    );
    cache_it(&mut p, &redis, &["HGET", "c:h", "f"]).await;
    assert_eq!(p.cmd(&["HDEL", "c:h", "f"]).await, int(1));
    assert_eq!(p.cmd(&["HGET", "c:h", "f"]).await, NIL, "HDEL");
    assert_eq!(p.cmd(&["HGETALL", "c:h"]).await, arr(&["g", "w"]));

    // List: LPUSH / RPOP / LSET.
    let lrange = ["LRANGE", "c:l", "0", "-1"];
    assert_eq!(d.cmd(&["RPUSH", "c:l", "a", "b"]).await, int(2));
    assert_eq!(cache_it(&mut p, &redis, &lrange).await, arr(&["a", "b"]));
    assert_eq!(p.cmd(&["LPUSH", "c:l", "z"]).await, int(3));
    assert_eq!(p.cmd(&lrange).await, arr(&["z", "a", "b"]), "LPUSH");
    cache_it(&mut p, &redis, &lrange).await;
    assert_eq!(p.cmd(&["RPOP", "c:l"]).await, bulk("b"));
    assert_eq!(p.cmd(&lrange).await, arr(&["z", "a"]), "RPOP");
    cache_it(&mut p, &redis, &lrange).await;
    assert_eq!(p.cmd(&["LSET", "c:l", "0", "y"]).await, OK);
    assert_eq!(p.cmd(&lrange).await, arr(&["y", "a"]), "LSET");

    // Set: SADD / SREM.
    let ismember = ["SISMEMBER", "c:set", "m"];
    assert_eq!(d.cmd(&["SADD", "c:set", "x"]).await, int(1));
    assert_eq!(cache_it(&mut p, &redis, &ismember).await, int(0));
    assert_eq!(p.cmd(&["SADD", "c:set", "m"]).await, int(1));
    assert_eq!(p.cmd(&ismember).await, int(1), "SADD");
    cache_it(&mut p, &redis, &ismember).await;
    assert_eq!(p.cmd(&["SREM", "c:set", "m"]).await, int(1));
    assert_eq!(p.cmd(&ismember).await, int(0), "SREM");

    // Sorted set: ZADD / ZINCRBY.
    let zscore = ["ZSCORE", "c:z", "m"];
    assert_eq!(d.cmd(&["ZADD", "c:z", "1", "m"]).await, int(1));
    assert_eq!(cache_it(&mut p, &redis, &zscore).await, bulk("1"));
    assert_eq!(p.cmd(&["ZADD", "c:z", "5", "m"]).await, int(0));
    assert_eq!(p.cmd(&zscore).await, bulk("5"), "ZADD");
    cache_it(&mut p, &redis, &zscore).await;
    assert_eq!(p.cmd(&["ZINCRBY", "c:z", "2", "m"]).await, bulk("7"));
    assert_eq!(p.cmd(&zscore).await, bulk("7"), "ZINCRBY");

    // Stream: XADD then XRANGE.
    let xrange = ["XRANGE", "c:x", "-", "+"];
    assert_eq!(d.cmd(&["XADD", "c:x", "1-1", "f", "v"]).await, bulk("1-1"));
    cache_it(&mut p, &redis, &xrange).await;
    assert_eq!(p.cmd(&["XADD", "c:x", "2-1", "f", "w"]).await, bulk("2-1"));
    assert_eq!(
        p.cmd(&xrange).await,
        &b"*2\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n\
           *2\r\n$3\r\n2-1\r\n*2\r\n$1\r\nf\r\n$1\r\nw\r\n"[..],
        "XADD"
    );
}

/// Guards `note_write` for SORT … STORE and scripts: declared keys are
/// dropped; a script with no declared keys flushes L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sort_store_and_script_writes_are_read_back() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;

    // SORT … STORE onto a cached destination.
    let lrange = ["LRANGE", "c:sorted", "0", "-1"];
    assert_eq!(d.cmd(&["RPUSH", "c:unsorted", "3", "1", "2"]).await, int(3));
    assert_eq!(d.cmd(&["RPUSH", "c:sorted", "old"]).await, int(1));
    assert_eq!(cache_it(&mut p, &redis, &lrange).await, arr(&["old"]));
    assert_eq!(
        p.cmd(&["SORT", "c:unsorted", "STORE", "c:sorted"]).await,
        int(3)
    );
    assert_eq!(p.cmd(&lrange).await, arr(&["1", "2", "3"]), "SORT … STORE");

    // EVAL with the written key declared.
    assert_eq!(d.cmd(&["SET", "c:ev", "old"]).await, OK);
    assert_eq!(
        cache_it(&mut p, &redis, &["GET", "c:ev"]).await,
        bulk("old")
    );
    let set_declared = "return redis.call('SET', KEYS[1], ARGV[1])";
    assert_eq!(p.cmd(&["EVAL", set_declared, "1", "c:ev", "new"]).await, OK);
    assert_eq!(p.cmd(&["GET", "c:ev"]).await, bulk("new"), "EVAL, 1 key");

    // EVAL with no declared keys writing a (cached) key: flush.
    assert_eq!(d.cmd(&["SET", "c:ev0", "old"]).await, OK);
    assert_eq!(
        cache_it(&mut p, &redis, &["GET", "c:ev0"]).await,
        bulk("old")
    );
    let set_undeclared = "return redis.call('SET', 'c:ev0', 'new')";
    assert_eq!(p.cmd(&["EVAL", set_undeclared, "0"]).await, OK);
    assert_eq!(p.cmd(&["GET", "c:ev0"]).await, bulk("new"), "EVAL, 0 keys");
}

/// Guards dispatch-time invalidation (`note_write` before `cached_read`): a
/// read pipelined right behind a write, in the same TCP write, sees the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_pipelined_behind_a_write_sees_it() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;

    assert_eq!(d.cmd(&["SET", "c:p", "v1"]).await, OK);
    assert_eq!(cache_it(&mut p, &redis, &["GET", "c:p"]).await, bulk("v1"));
    for round in 2..12 {
        let value = format!("v{round}");
        let mut both = encode(&[b"SET", b"c:p", value.as_bytes()]);
        both.extend_from_slice(&encode(&[b"GET", b"c:p"]));
        p.write(&both).await;
        assert_eq!(p.frame().await, OK);
        assert_eq!(
            p.frame().await,
            bulk(&value),
            "round {round}: GET pipelined after SET"
        );
        // The GET cached the new value; the next round's SET must drop it.
    }
}

/// Guards `Session::exec_writes`: writes queued in MULTI invalidate at EXEC,
/// for the client that ran it and for every other client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_exec_writes_are_seen_by_every_client_after_exec() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut a = Raw::connect(proxy.port()).await;
    let mut b = Raw::connect(proxy.port()).await;

    assert_eq!(d.cmd(&["SET", "c:tx", "old"]).await, OK);
    assert_eq!(
        cache_it(&mut b, &redis, &["GET", "c:tx"]).await,
        bulk("old")
    );
    assert_eq!(a.cmd(&["MULTI"]).await, OK);
    assert_eq!(a.cmd(&["SET", "c:tx", "new"]).await, QUEUED);
    assert_eq!(
        b.cmd(&["GET", "c:tx"]).await,
        bulk("old"),
        "not applied before EXEC"
    );
    assert_eq!(a.cmd(&["EXEC"]).await, &b"*1\r\n+OK\r\n"[..]);
    assert_eq!(a.cmd(&["GET", "c:tx"]).await, bulk("new"), "same client");
    assert_eq!(b.cmd(&["GET", "c:tx"]).await, bulk("new"), "another client");
}

// ---------------------------------------------- 5. whole-keyspace writes

/// Guards the `flush` arm of `note_write`: FLUSHDB, FLUSHALL and SWAPDB leave
/// nothing stale in L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushdb_flushall_and_swapdb_leave_nothing_stale() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p0 = Raw::connect(proxy.port()).await;
    let mut p1 = Raw::connect(proxy.port()).await;
    assert_eq!(p1.cmd(&["SELECT", "1"]).await, OK);

    for flush in ["FLUSHDB", "FLUSHALL"] {
        assert_eq!(d.cmd(&["SET", "c:f", "v"]).await, OK);
        assert_eq!(cache_it(&mut p0, &redis, &["GET", "c:f"]).await, bulk("v"));
        assert_eq!(p0.cmd(&[flush]).await, OK);
        assert_eq!(p0.cmd(&["GET", "c:f"]).await, NIL, "{flush}");
    }

    assert_eq!(d.cmd(&["SET", "c:sw", "zero"]).await, OK);
    assert_eq!(d.cmd(&["SELECT", "1"]).await, OK);
    assert_eq!(d.cmd(&["SET", "c:sw", "one"]).await, OK);
    assert_eq!(
        cache_it(&mut p0, &redis, &["GET", "c:sw"]).await,
        bulk("zero")
    );
    assert_eq!(
        cache_it(&mut p1, &redis, &["GET", "c:sw"]).await,
        bulk("one")
    );
    assert_eq!(p0.cmd(&["SWAPDB", "0", "1"]).await, OK);
    assert_eq!(p0.cmd(&["GET", "c:sw"]).await, bulk("one"), "SWAPDB, db 0");
    assert_eq!(p1.cmd(&["GET", "c:sw"]).await, bulk("zero"), "SWAPDB, db 1");
}

// ------------------------------------------------------- 6. RESP2 / RESP3

/// Guards the variant key (protocol + request) of `L1::get`/`L1::fill`: RESP2
/// and RESP3 clients of one cached key each get their own encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp2_and_resp3_clients_each_get_their_own_encoding() {
    let redis = RedisServer::start();
    let mut negative = rule("n:", Duration::from_secs(10));
    negative.negative_ttl = Some(Dur(Duration::from_secs(10)));
    let proxy = proxy_with(&redis, vec![rule("c:", Duration::from_secs(10)), negative]).await;
    let mut d2 = Raw::connect(redis.port()).await;
    let mut d3 = Raw::connect_resp3(redis.port()).await;
    let mut p2 = Raw::connect(proxy.port()).await;
    let mut p3 = Raw::connect_resp3(proxy.port()).await;

    assert_eq!(d2.cmd(&["HSET", "c:h", "f", "v", "g", "w"]).await, int(2));
    let want2 = d2.cmd(&["HGETALL", "c:h"]).await;
    let want3 = d3.cmd(&["HGETALL", "c:h"]).await;
    assert!(want2.starts_with(b"*") && want3.starts_with(b"%"));
    redis.reset_stats();
    for round in 0..2 {
        assert_eq!(
            p2.cmd(&["HGETALL", "c:h"]).await,
            want2,
            "RESP2, read {round}"
        );
        assert_eq!(
            p3.cmd(&["HGETALL", "c:h"]).await,
            want3,
            "RESP3, read {round}"
        );
    }
    assert_eq!(
        redis.calls("hgetall"),
        2,
        "one fill per protocol, then hits"
    );

    redis.reset_stats();
    for round in 0..2 {
        assert_eq!(p2.cmd(&["GET", "n:nope"]).await, NIL, "RESP2, read {round}");
        assert_eq!(
            p3.cmd(&["GET", "n:nope"]).await,
            &b"_\r\n"[..],
            "RESP3, read {round}"
        );
    }
    assert_eq!(redis.calls("get"), 2, "one negative fill per protocol");
}

// ---------------------------------------------------------- 7. single flight

/// Guards `L1::join`/`L1::land`: concurrent misses of one read share one
/// upstream fetch. Redis is stopped while the 20 misses arrive, so they all
/// overlap; PROXY STATS (answered by the proxy) shows when all 20 are in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_one_key_make_one_upstream_read() {
    const N: usize = 20;
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut s = proxy.conn().await;
    let mut clients = Vec::new();
    for _ in 0..N {
        let mut c = Raw::connect(proxy.port()).await;
        // Warm up: the session gets its upstream connection while Redis runs.
        assert_eq!(c.cmd(&["EXISTS", "u:warm"]).await, int(0));
        clients.push(c);
    }
    assert_eq!(d.cmd(&["SET", "c:sf", "shared"]).await, OK);
    let misses0 = stats(&mut s).await.rule("c:", "misses");
    redis.reset_stats();

    redis.signal("STOP");
    let resume = Resume(&redis);
    for c in &mut clients {
        c.send_str(&["GET", "c:sf"]).await;
    }
    until_stat(&mut s, "c:", "misses", misses0 + N as i64).await;
    drop(resume); // SIGCONT

    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.frame().await, bulk("shared"), "client {i}");
    }
    assert_eq!(redis.calls("get"), 1, "{N} concurrent misses, one GET");
    assert_eq!(redis.calls("pttl"), 1);
    let st = stats(&mut s).await;
    assert_eq!(st.rule("c:", "fills"), 1, "{st:?}");
}

// ------------------------------------------------------- 8. no stale fill

/// Guards the fill token (`L1::begin_fill`/`L1::fill`): a miss in flight when
/// its key is written through the proxy must not cache what it fetched.
///
/// Per round, with Redis stopped: A's GET misses (its token is taken), then
/// B's SET is dispatched (its invalidation is visible as a dropped entry,
/// because the key holds another cached variant, STRLEN). Then Redis resumes.
/// A may see either value; afterwards the key must read "new" through the
/// proxy, and the rejected fills must show in PROXY STATS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_racing_a_write_through_the_proxy_is_discarded() {
    const ROUNDS: usize = 20;
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut a = Raw::connect(proxy.port()).await;
    let mut b = Raw::connect(proxy.port()).await;
    let mut c = Raw::connect(proxy.port()).await;
    let mut s = proxy.conn().await;
    for x in [&mut a, &mut b, &mut c] {
        assert_eq!(x.cmd(&["EXISTS", "u:warm"]).await, int(0));
    }
    let rejected0 = stats(&mut s).await.rule("c:", "stale_fills_rejected");
    let mut a_saw_old = 0;

    for round in 0..ROUNDS {
        let key = format!("c:race:{round}");
        let (old, new) = (format!("old{round}"), format!("new{round}"));
        assert_eq!(d.cmd(&["SET", &key, &old]).await, OK);
        // Another variant of the key, so B's invalidation is observable.
        assert_eq!(c.cmd(&["STRLEN", &key]).await, int(old.len() as i64));
        let st = stats(&mut s).await;
        let (misses0, inv0) = (st.rule("c:", "misses"), st.rule("c:", "invalidations"));

        redis.signal("STOP");
        let resume = Resume(&redis);
        a.send_str(&["GET", &key]).await;
        until_stat(&mut s, "c:", "misses", misses0 + 1).await;
        b.send_str(&["SET", &key, &new]).await;
        until_stat(&mut s, "c:", "invalidations", inv0 + 1).await;
        drop(resume); // SIGCONT

        let got = a.frame().await;
        assert!(
            got == bulk(&old) || got == bulk(&new),
            "round {round}: A got {got:?}"
        );
        if got == bulk(&old) {
            a_saw_old += 1;
        }
        assert_eq!(b.frame().await, OK);
        for _ in 0..2 {
            assert_eq!(
                c.cmd(&["GET", &key]).await,
                bulk(&new),
                "round {round}: a fill of the old value survived the write"
            );
        }
    }
    let rejected = stats(&mut s).await.rule("c:", "stale_fills_rejected") - rejected0;
    assert!(
        rejected >= 1,
        "no round exercised the rejection (A saw the old value {a_saw_old} times)"
    );
}

// ------------------------------------------------------- 9. pinned clients

/// Guards the `self.pin.is_some()` bypass in `cached_read`: inside MULTI or
/// WATCH, reads go to Redis even if L1 holds an older copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_and_watch_bypass_l1() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;

    assert_eq!(d.cmd(&["SET", "c:m", "old"]).await, OK);
    assert_eq!(cache_it(&mut p, &redis, &["GET", "c:m"]).await, bulk("old"));
    assert_eq!(d.cmd(&["SET", "c:m", "new"]).await, OK); // bypasses the proxy
    assert_eq!(
        p.cmd(&["GET", "c:m"]).await,
        bulk("old"),
        "L1 still holds the old copy"
    );

    assert_eq!(p.cmd(&["MULTI"]).await, OK);
    assert_eq!(p.cmd(&["GET", "c:m"]).await, QUEUED);
    assert_eq!(p.cmd(&["EXEC"]).await, &b"*1\r\n$3\r\nnew\r\n"[..], "MULTI");

    assert_eq!(p.cmd(&["WATCH", "c:m"]).await, OK);
    redis.reset_stats();
    assert_eq!(p.cmd(&["GET", "c:m"]).await, bulk("new"), "WATCH");
    assert_eq!(redis.calls("get"), 1, "a WATCHing client reads from Redis");
    assert_eq!(p.cmd(&["UNWATCH"]).await, OK);
}

// ------------------------------------------------------------ 10. memory

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Guards `cache.max_memory` (moka weigher, `KeyEntry::weight`): 5 MiB of
/// distinct values through a 1 MiB cache stay within the budget, evicting.
/// The RSS bound (64 MiB) is loose on purpose: other tests share the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_holds_under_5000_distinct_values() {
    const KEYS: usize = 5000;
    const BUDGET: i64 = 1 << 20;
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.cache.max_memory = ByteSize(BUDGET as u64);
    cfg.cache.rules = vec![rule("c:", Duration::from_secs(60))];
    let proxy = TestProxy::start_with(cfg).await;
    let mut s = proxy.conn().await;
    let value = "x".repeat(1024);

    let mut direct = direct_async(&redis, 0).await;
    let mut pipe = redis::pipe();
    for i in 0..KEYS {
        pipe.cmd("SET").arg(format!("c:{i}")).arg(&value).ignore();
    }
    let () = pipe.query_async(&mut direct).await.unwrap();

    let rss_before = rss_kib();
    let mut p = Raw::connect(proxy.port()).await;
    let mut reads = Vec::new();
    for i in 0..KEYS {
        reads.extend_from_slice(&encode(&[b"GET", format!("c:{i}").as_bytes()]));
    }
    p.write(&reads).await;
    drop(reads);
    let want = bulk(&value);
    for i in 0..KEYS {
        assert_eq!(p.frame().await, want, "GET c:{i}");
    }
    let rss_after = rss_kib();

    let st = stats(&mut s).await;
    assert_eq!(st.top("max_memory"), BUDGET);
    assert!(st.top("bytes") <= BUDGET, "bytes over budget: {st:?}");
    assert!(st.top("keys") < KEYS as i64, "nothing evicted: {st:?}");
    assert!(st.rule("c:", "evictions") > 0, "no evictions: {st:?}");
    assert!(
        (0..=BUDGET).contains(&st.rule("c:", "bytes")),
        "rule bytes out of range: {st:?}"
    );
    assert_eq!(
        st.rule("c:", "bytes"),
        st.top("bytes"),
        "the rule's byte count disagrees with the cache's weight"
    );
    let grew_kib = rss_after.saturating_sub(rss_before);
    assert!(
        grew_kib < 64 * 1024,
        "RSS grew by {grew_kib} KiB ({rss_before} → {rss_after} KiB)"
    );
}

// ------------------------------------------------------------- 11. stats

/// Guards the counters behind `PROXY STATS` (`RuleStats`): a known sequence of
/// reads and writes moves hits, misses, fills and invalidations exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_stats_counts_a_known_sequence() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;
    let mut s = proxy.conn().await;
    assert_eq!(d.cmd(&["SET", "c:a", "1"]).await, OK);
    assert_eq!(d.cmd(&["SET", "u:a", "1"]).await, OK);

    let st = stats(&mut s).await;
    for name in [
        "hits",
        "misses",
        "fills",
        "invalidations",
        "stale_fills_rejected",
    ] {
        assert_eq!(st.rule("c:", name), 0, "{name} at start: {st:?}");
    }
    assert_eq!(st.top("keys"), 0);

    p.cmd(&["GET", "c:a"]).await; // miss, fill
    p.cmd(&["GET", "c:a"]).await; // hit
    p.cmd(&["GET", "c:a"]).await; // hit
    p.cmd(&["STRLEN", "c:a"]).await; // miss, fill (second variant, same key)
    p.cmd(&["GET", "u:a"]).await; // no rule: not counted
    let st = stats(&mut s).await;
    assert_eq!(
        [
            st.rule("c:", "hits"),
            st.rule("c:", "misses"),
            st.rule("c:", "fills")
        ],
        [2, 2, 2],
        "hits, misses, fills after 3×GET + STRLEN: {st:?}"
    );
    assert_eq!(st.top("keys"), 1, "two variants, one key: {st:?}");
    assert!(st.top("bytes") > 0);

    assert_eq!(p.cmd(&["SET", "c:a", "2"]).await, OK); // drops the key once
    let st = stats(&mut s).await;
    assert_eq!(st.rule("c:", "invalidations"), 1, "{st:?}");
    assert_eq!(st.top("keys"), 0, "{st:?}");

    assert_eq!(p.cmd(&["GET", "c:a"]).await, bulk("2")); // miss, fill
    assert_eq!(p.cmd(&["GET", "c:a"]).await, bulk("2")); // hit
    assert_eq!(p.cmd(&["DEL", "c:a"]).await, int(1)); // drops it again
    let st = stats(&mut s).await;
    assert_eq!(
        [
            st.rule("c:", "hits"),
            st.rule("c:", "misses"),
            st.rule("c:", "fills"),
            st.rule("c:", "invalidations"),
            st.rule("c:", "stale_fills_rejected"),
        ],
        [3, 3, 3, 2, 0],
        "hits, misses, fills, invalidations, stale: {st:?}"
    );
    assert_eq!(st.rule("c:", "bytes"), 0, "{st:?}");
}

// ------------------------------------------------------------- 12. MGET

/// Logs every command Redis runs from now on (SLOWLOG with a 0 µs
/// threshold), forgetting what was logged before.
fn log_commands(redis: &RedisServer) {
    let mut c = redis.direct();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg("0")
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("SLOWLOG").arg("RESET").query(&mut c).unwrap();
}

/// The argument lists of the `cmd` calls Redis ran since [`log_commands`],
/// oldest first.
fn logged(redis: &RedisServer, cmd: &str) -> Vec<Vec<String>> {
    let v: Value = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg("-1")
        .query(&mut redis.direct())
        .unwrap();
    let Value::Array(entries) = v else {
        panic!("SLOWLOG GET: {v:?}")
    };
    let mut out: Vec<Vec<String>> = entries
        .iter()
        .map(|e| match e {
            Value::Array(fields) => match &fields[3] {
                Value::Array(args) => args.iter().map(text).collect(),
                other => panic!("SLOWLOG arguments: {other:?}"),
            },
            other => panic!("SLOWLOG entry: {other:?}"),
        })
        .filter(|args: &Vec<String>| args[0].eq_ignore_ascii_case(cmd))
        .collect();
    out.reverse();
    out
}

/// `["MGET", keys…]` as owned strings, to compare with [`logged`].
fn mget_of(keys: &[&str]) -> Vec<String> {
    std::iter::once("MGET")
        .chain(keys.iter().copied())
        .map(String::from)
        .collect()
}

/// Guards `cached_mget`, `split_mget` and `stitch`: an MGET is answered per
/// key, cached keys from L1 and only the rest (keys outside every rule, keys
/// not cached) fetched in one upstream MGET with one PTTL for each key a rule
/// caches (none for keys only passed through); the reply is
/// Redis's own, byte for byte and in order, in RESP2 and RESP3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mget_serves_cached_keys_from_l1_and_fetches_only_the_rest() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;

    assert_eq!(d.cmd(&["SET", "c:a", "alpha"]).await, OK);
    assert_eq!(d.cmd(&["SET", "c:e", ""]).await, OK);
    assert_eq!(d.cmd(&["SET", "u:x", "outside"]).await, OK);
    assert_eq!(d.cmd(&["HSET", "c:h", "f", "v"]).await, int(1));
    // c:missing does not exist; c:a appears twice.
    let keys = ["c:a", "u:x", "c:missing", "c:h", "c:e", "c:a"];
    let mget: Vec<&str> = std::iter::once("MGET").chain(keys).collect();
    let want = d.cmd(&mget).await;
    assert_eq!(
        want,
        &b"*6\r\n$5\r\nalpha\r\n$7\r\noutside\r\n$-1\r\n$-1\r\n$0\r\n\r\n$5\r\nalpha\r\n"[..],
        "Redis's own MGET reply"
    );

    // First read: every key goes upstream, in one MGET.
    redis.reset_stats();
    log_commands(&redis);
    assert_eq!(p.cmd(&mget).await, want, "first MGET through the proxy");
    assert_eq!(redis.calls("mget"), 1);
    assert_eq!(
        redis.calls("pttl"),
        keys.len() as u64 - 1,
        "one PTTL per key a rule caches (not u:x)"
    );
    assert_eq!(logged(&redis, "mget"), vec![mget_of(&keys)]);

    // Second read: only the key outside every rule and the missing key (not
    // cached without negative_ttl) go upstream.
    redis.reset_stats();
    log_commands(&redis);
    assert_eq!(p.cmd(&mget).await, want, "second MGET through the proxy");
    assert_eq!(redis.calls("mget"), 1, "one upstream MGET for the rest");
    assert_eq!(redis.calls("pttl"), 1, "PTTL only for c:missing");
    assert_eq!(logged(&redis, "mget"), vec![mget_of(&["u:x", "c:missing"])]);

    // Only cached keys: Redis is not asked at all.
    let cached_only = ["MGET", "c:h", "c:a", "c:e"];
    let want_cached = d.cmd(&cached_only).await;
    redis.reset_stats();
    assert_eq!(p.cmd(&cached_only).await, want_cached);
    assert_eq!(redis.calls("mget"), 0, "every key came from L1");
    assert_eq!(redis.calls("pttl"), 0);

    // RESP3: its own entries, and Redis's RESP3 bytes (nulls as `_`).
    let mut d3 = Raw::connect_resp3(redis.port()).await;
    let mut p3 = Raw::connect_resp3(proxy.port()).await;
    let want3 = d3.cmd(&mget).await;
    assert_eq!(
        want3,
        &b"*6\r\n$5\r\nalpha\r\n$7\r\noutside\r\n_\r\n_\r\n$0\r\n\r\n$5\r\nalpha\r\n"[..],
        "Redis's own RESP3 MGET reply"
    );
    redis.reset_stats();
    assert_eq!(p3.cmd(&mget).await, want3, "first RESP3 MGET");
    assert_eq!(redis.calls("mget"), 1);
    assert_eq!(
        redis.calls("pttl"),
        keys.len() as u64 - 1,
        "RESP3 does not share RESP2's entries"
    );
    redis.reset_stats();
    assert_eq!(p3.cmd(&mget).await, want3, "second RESP3 MGET");
    assert_eq!(redis.calls("mget"), 1);
    assert_eq!(redis.calls("pttl"), 1, "PTTL only for c:missing");
    // And RESP2 still gets its own encoding from L1.
    assert_eq!(p.cmd(&cached_only).await, want_cached);
}

/// Guards `note_write` for keys cached by MGET: a write through the proxy is
/// seen by the next MGET; a write that bypasses the proxy only once the rule
/// TTL passes (documented staleness).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mget_reads_back_writes() {
    let redis = RedisServer::start();
    // 2 s: the "still stale" read must land inside it.
    let proxy = proxy_with(
        &redis,
        vec![rule("c:", Duration::from_secs(10)), rule("r:", ms(2000))],
    )
    .await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;

    // Through the proxy: seen at once.
    assert_eq!(d.cmd(&["SET", "c:a", "a1"]).await, OK);
    assert_eq!(d.cmd(&["SET", "c:b", "b1"]).await, OK);
    let mget = ["MGET", "c:a", "c:b"];
    assert_eq!(cache_it(&mut p, &redis, &mget).await, arr(&["a1", "b1"]));
    assert_eq!(p.cmd(&["SET", "c:a", "a2"]).await, OK);
    redis.reset_stats();
    assert_eq!(p.cmd(&mget).await, arr(&["a2", "b1"]), "SET then MGET");
    assert_eq!(redis.calls("mget"), 1);
    assert_eq!(redis.calls("pttl"), 1, "only the written key was refetched");
    assert_eq!(cache_it(&mut p, &redis, &mget).await, arr(&["a2", "b1"]));
    assert_eq!(p.cmd(&["DEL", "c:b"]).await, int(1));
    assert_eq!(
        p.cmd(&mget).await,
        &b"*2\r\n$2\r\na2\r\n$-1\r\n"[..],
        "DEL then MGET"
    );

    // Bypassing the proxy: stale within the rule TTL, then fresh.
    assert_eq!(d.cmd(&["SET", "r:k", "old"]).await, OK);
    redis.reset_stats();
    assert_eq!(p.cmd(&["MGET", "r:k"]).await, arr(&["old"]));
    assert_eq!(d.cmd(&["SET", "r:k", "new"]).await, OK);
    assert_eq!(
        p.cmd(&["MGET", "r:k"]).await,
        arr(&["old"]),
        "within the rule TTL, L1 still holds the old value (documented staleness)"
    );
    assert_eq!(redis.calls("mget"), 1, "the stale read came from L1");

    tokio::time::sleep(ms(4000)).await; // well past the rule TTL
    assert_eq!(p.cmd(&["MGET", "r:k"]).await, arr(&["new"]));
    assert_eq!(
        redis.calls("mget"),
        2,
        "the entry expired and was refetched"
    );
}

/// Guards `MGET_ELEMENT` (MGET's elements are their own variant): GET of a
/// hash is WRONGTYPE (an error, never cached) while MGET of it is nil (cached);
/// neither answer leaks into the other, in either order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mget_after_get_does_not_share_entries() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;

    for key in ["c:h1", "c:h2"] {
        assert_eq!(d.cmd(&["HSET", key, "f", "v"]).await, int(1));
    }
    let wrongtype = d.cmd(&["GET", "c:h1"]).await;
    assert!(wrongtype.starts_with(b"-WRONGTYPE"), "{wrongtype:?}");
    let nil1 = &b"*1\r\n$-1\r\n"[..];
    assert_eq!(d.cmd(&["MGET", "c:h1"]).await, nil1);

    // GET first: the error is not cached; then MGET caches its nil.
    redis.reset_stats();
    for _ in 0..2 {
        assert_eq!(p.cmd(&["GET", "c:h1"]).await, wrongtype);
    }
    assert_eq!(redis.calls("get"), 2, "an error reply is not cached");
    assert_eq!(cache_it(&mut p, &redis, &["MGET", "c:h1"]).await, nil1);
    assert_eq!(redis.calls("mget"), 1, "MGET's nil is cached");
    assert_eq!(
        p.cmd(&["GET", "c:h1"]).await,
        wrongtype,
        "GET after MGET was cached"
    );
    assert_eq!(redis.calls("get"), 3, "GET does not use MGET's entry");

    // MGET first: its cached nil does not answer GET.
    redis.reset_stats();
    assert_eq!(cache_it(&mut p, &redis, &["MGET", "c:h2"]).await, nil1);
    for _ in 0..2 {
        assert_eq!(p.cmd(&["GET", "c:h2"]).await, wrongtype);
    }
    assert_eq!(redis.calls("get"), 2, "GET went upstream both times");
    assert_eq!(p.cmd(&["MGET", "c:h2"]).await, nil1);
    assert_eq!(redis.calls("mget"), 1, "MGET's entry survived the GETs");
}

// ---------------------------------------------------- 13. upstream_ttl

/// `PTTL key`, asked of Redis directly.
fn pttl(redis: &RedisServer, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query(&mut redis.direct())
        .unwrap()
}

/// Guards `with_upstream_ttl` and its dispatch in `Session::handle`: a SET of
/// a key whose rule has `upstream_ttl` gets that expiry in Redis unless it
/// sets its own (EX/PX/KEEPTTL…); keys outside the rule are untouched; the
/// client's reply is unchanged, and the rewritten SET still invalidates L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_ttl_is_added_to_sets_without_an_expiry() {
    const UPSTREAM_TTL: i64 = 2000;
    let redis = RedisServer::start();
    let mut t = rule("t:", Duration::from_secs(10));
    t.upstream_ttl = Some(Dur(ms(UPSTREAM_TTL as u64)));
    let proxy = proxy_with(&redis, vec![t]).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;
    let added = |key: &str| {
        let ms = pttl(&redis, key);
        assert!(
            0 < ms && ms <= UPSTREAM_TTL,
            "{key}: PTTL {ms}, want the upstream_ttl (0, {UPSTREAM_TTL}]"
        );
    };

    // No expiry of its own: upstream_ttl is added.
    assert_eq!(p.cmd(&["SET", "t:a", "v"]).await, OK);
    added("t:a");
    assert_eq!(p.cmd(&["set", "t:nx", "v", "nx"]).await, OK);
    added("t:nx");

    // An expiry of its own is kept.
    assert_eq!(p.cmd(&["SET", "t:ex", "v", "EX", "100"]).await, OK);
    let kept = pttl(&redis, "t:ex");
    assert!(
        UPSTREAM_TTL < kept && kept <= 100_000,
        "SET … EX 100: PTTL {kept}"
    );
    assert_eq!(p.cmd(&["SET", "t:px", "v", "px", "60000"]).await, OK);
    let kept = pttl(&redis, "t:px");
    assert!(
        UPSTREAM_TTL < kept && kept <= 60_000,
        "SET … px 60000: PTTL {kept}"
    );

    // KEEPTTL keeps the key's existing TTL, as Redis would.
    assert_eq!(d.cmd(&["SET", "t:keep", "v1", "EX", "100"]).await, OK);
    assert_eq!(p.cmd(&["SET", "t:keep", "v2", "KEEPTTL"]).await, OK);
    let kept = pttl(&redis, "t:keep");
    assert!(
        UPSTREAM_TTL < kept && kept <= 100_000,
        "SET … KEEPTTL: PTTL {kept}"
    );
    assert_eq!(d.cmd(&["GET", "t:keep"]).await, bulk("v2"));

    // Outside the rule: untouched.
    assert_eq!(p.cmd(&["SET", "other", "v"]).await, OK);
    assert_eq!(pttl(&redis, "other"), -1, "a key no rule names");

    // The reply is the client's own: SET … GET answers the old value.
    assert_eq!(p.cmd(&["SET", "t:g", "v1", "GET"]).await, NIL);
    added("t:g");
    assert_eq!(p.cmd(&["SET", "t:g", "v2", "GET"]).await, bulk("v1"));
    added("t:g");
    assert_eq!(d.cmd(&["GET", "t:g"]).await, bulk("v2"));

    // The rewritten SET still drops the cached value (read your writes).
    assert_eq!(cache_it(&mut p, &redis, &["GET", "t:g"]).await, bulk("v2"));
    assert_eq!(p.cmd(&["SET", "t:g", "v3"]).await, OK);
    assert_eq!(p.cmd(&["GET", "t:g"]).await, bulk("v3"), "SET then GET");
    added("t:g");

    // Inside MULTI too.
    assert_eq!(p.cmd(&["MULTI"]).await, OK);
    assert_eq!(p.cmd(&["SET", "t:m", "v"]).await, QUEUED);
    assert_eq!(p.cmd(&["EXEC"]).await, &b"*1\r\n+OK\r\n"[..]);
    added("t:m");
}

// -------------------------------------------------- 14. refresh-ahead

/// Reads `key` through `p` every 20 ms for `span`, asserting each reply is
/// `want`. Returns how many reads there were.
async fn read_hot(p: &mut Raw, key: &str, want: &[u8], span: Duration) -> u64 {
    read_hot_with(p, &["GET", key], want, span).await
}

/// [`read_hot`] with any read command.
async fn read_hot_with(p: &mut Raw, cmd: &[&str], want: &[u8], span: Duration) -> u64 {
    let deadline = tokio::time::Instant::now() + span;
    let mut reads = 0;
    while tokio::time::Instant::now() < deadline {
        assert_eq!(p.cmd(cmd).await, want, "{cmd:?}, read {reads}");
        reads += 1;
        // Pacing the loop, not waiting for an event.
        tokio::time::sleep(ms(20)).await;
    }
    reads
}

/// A proxy with two 1 s rules: `hot:` refreshes ahead at half its TTL,
/// `cold:` (the control) does not.
async fn hot_and_cold_proxy(redis: &RedisServer) -> TestProxy {
    let mut hot = rule("hot:", ms(1000));
    hot.refresh_ahead = Some(0.5);
    proxy_with(redis, vec![hot, rule("cold:", ms(1000))]).await
}

/// Guards the refresh-ahead branch of `cached_read` (`Variant::refresh_at`,
/// the background `start_fetch`): a key read continuously is refetched before
/// its entry expires, so it misses once; without refresh-ahead it misses
/// every TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_keeps_a_hot_key_from_missing() {
    const SPAN: Duration = Duration::from_millis(3500);
    let redis = RedisServer::start();
    let proxy = hot_and_cold_proxy(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;
    let mut s = proxy.conn().await;
    assert_eq!(d.cmd(&["SET", "hot:k", "v"]).await, OK);
    assert_eq!(d.cmd(&["SET", "cold:k", "v"]).await, OK);

    redis.reset_stats();
    let reads = read_hot(&mut p, "hot:k", &bulk("v"), SPAN).await;
    let gets = redis.calls("get");
    let st = stats(&mut s).await;
    assert_eq!(
        st.rule("hot:", "misses"),
        1,
        "only the first read missed: {st:?}"
    );
    assert!(st.rule("hot:", "fills") > 2, "no refreshes: {st:?}");
    assert!(
        gets > 2 && gets * 4 < reads,
        "{gets} upstream GETs for {reads} reads: most must come from L1"
    );

    // Control: the same loop without refresh-ahead misses every TTL.
    let reads = read_hot(&mut p, "cold:k", &bulk("v"), SPAN).await;
    let st = stats(&mut s).await;
    assert!(
        st.rule("cold:", "misses") > 1,
        "{reads} reads of a 1 s entry over {SPAN:?} missed once: {st:?}"
    );
}

/// Guards refresh-ahead for keys an MGET serves (`cached_mget` →
/// `refresh_element`): hot keys read only through MGET are refetched before
/// their entries expire too, so each misses once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_keeps_hot_keys_read_by_mget_from_missing() {
    const SPAN: Duration = Duration::from_millis(3500);
    let redis = RedisServer::start();
    let proxy = hot_and_cold_proxy(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;
    let mut s = proxy.conn().await;
    for k in ["hot:a", "hot:b", "cold:a", "cold:b"] {
        assert_eq!(d.cmd(&["SET", k, k]).await, OK);
    }

    let want = |a: &str, b: &str| [&b"*2\r\n"[..], &bulk(a), &bulk(b)].concat();
    redis.reset_stats();
    let reads = read_hot_with(
        &mut p,
        &["MGET", "hot:a", "hot:b"],
        &want("hot:a", "hot:b"),
        SPAN,
    )
    .await;
    let st = stats(&mut s).await;
    assert_eq!(
        st.rule("hot:", "misses"),
        2,
        "only the first read missed (both keys): {st:?}"
    );
    assert!(st.rule("hot:", "fills") > 4, "no refreshes: {st:?}");
    let mgets = redis.calls("mget");
    assert!(
        mgets > 2 && mgets * 4 < reads,
        "{mgets} upstream MGETs for {reads} reads: most must come from L1"
    );

    // Control: without refresh-ahead the keys miss every TTL.
    let reads = read_hot_with(
        &mut p,
        &["MGET", "cold:a", "cold:b"],
        &want("cold:a", "cold:b"),
        SPAN,
    )
    .await;
    let st = stats(&mut s).await;
    assert!(
        st.rule("cold:", "misses") > 2,
        "{reads} MGETs of 1 s entries over {SPAN:?} missed once: {st:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_move_into_another_database_drop_what_l1_holds_there() {
    let redis = RedisServer::start();
    let mut cached = rule("c:", Duration::from_secs(10));
    cached.negative_ttl = Some(Dur(Duration::from_secs(10)));
    let proxy = proxy_with(&redis, vec![cached]).await;
    let mut p0 = Raw::connect(proxy.port()).await;
    let mut p1 = Raw::connect(proxy.port()).await;
    assert_eq!(p1.cmd(&["SELECT", "1"]).await, OK);
    let mut d = Raw::connect(redis.port()).await;

    // COPY … DB 1 REPLACE onto a value L1 holds for database 1.
    assert_eq!(d.cmd(&["SET", "c:src", "new"]).await, OK);
    assert_eq!(d.cmd(&["SELECT", "1"]).await, OK);
    assert_eq!(d.cmd(&["SET", "c:dst", "old"]).await, OK);
    assert_eq!(
        cache_it(&mut p1, &redis, &["GET", "c:dst"]).await,
        bulk("old")
    );
    assert_eq!(
        p0.cmd(&["COPY", "c:src", "c:dst", "DB", "1", "REPLACE"])
            .await,
        int(1)
    );
    assert_eq!(p1.cmd(&["GET", "c:dst"]).await, bulk("new"), "COPY DB 1");

    // MOVE into database 1, where L1 holds the key's absence.
    assert_eq!(d.cmd(&["SELECT", "0"]).await, OK);
    assert_eq!(d.cmd(&["SET", "c:mv", "v"]).await, OK);
    assert_eq!(cache_it(&mut p1, &redis, &["GET", "c:mv"]).await, NIL);
    assert_eq!(p0.cmd(&["MOVE", "c:mv", "1"]).await, int(1));
    assert_eq!(p1.cmd(&["GET", "c:mv"]).await, bulk("v"), "MOVE into db 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pfcount_rewriting_its_key_drops_the_cached_value() {
    let redis = RedisServer::start();
    let proxy = proxy_c(&redis).await;
    let mut p = Raw::connect(proxy.port()).await;
    let mut d = Raw::connect(redis.port()).await;
    assert_eq!(p.cmd(&["PFADD", "c:hll", "a", "b", "c"]).await, int(1));
    let before = cache_it(&mut p, &redis, &["GET", "c:hll"]).await;
    // Flagged read-only, PFCOUNT still stores the cardinality it computed in
    // the value (the HLL header's cache), which GET returns.
    assert_eq!(p.cmd(&["PFCOUNT", "c:hll"]).await, int(3));
    let after = d.cmd(&["GET", "c:hll"]).await;
    assert_ne!(before, after, "PFCOUNT left the value as it was");
    assert_eq!(p.cmd(&["GET", "c:hll"]).await, after);
}
