//! Warming L1 from Redis (`fill::warm`): rules with `warm = true` are filled
//! at start and after every full flush, within the rate, and never with a
//! value a write replaced.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use nearcache::config::RuleConfig;
use redis::aio::MultiplexedConnection;

use crate::support::{RedisServer, TcpRelay, TestProxy, config_for, http_get, proxy_stats, q};

const STRINGS: usize = 300;
const HASHES: usize = 20;

fn rule(prefix: &str, warm: bool) -> RuleConfig {
    RuleConfig {
        warm,
        ..RuleConfig::caching(prefix, Duration::from_secs(60))
    }
}

/// Waits until `PROXY STATS` shows `passes` finished warming passes.
async fn until_warmed(
    admin: &mut MultiplexedConnection,
    passes: i64,
) -> std::collections::HashMap<String, i64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = proxy_stats(admin).await;
        if stats["warm.passes"] >= passes && stats["warm.running"] == 0 {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "no warming pass {passes} within 20 s: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn seed(redis: &RedisServer) {
    let mut d = redis.direct();
    for i in 0..STRINGS {
        let _: () = redis::cmd("SET")
            .arg(format!("w:s:{i}"))
            .arg(format!("v{i}"))
            .query(&mut d)
            .unwrap();
    }
    for i in 0..HASHES {
        let _: () = redis::cmd("HSET")
            .arg(format!("w:h:{i}"))
            .arg("bid")
            .arg(i)
            .arg("ask")
            .arg(i + 1)
            .query(&mut d)
            .unwrap();
    }
    let _: () = redis::cmd("RPUSH")
        .arg("w:list")
        .arg("a")
        .query(&mut d)
        .unwrap();
    for key in ["w:x:0", "c:0"] {
        let _: () = redis::cmd("SET").arg(key).arg("v").query(&mut d).unwrap();
    }
}

/// Guards `fill::warm`: at start, the strings and hashes of the warmed rule
/// (and only those: not a longer prefix's that does not warm, not another
/// rule's, not a list) are in L1 — read by `GET` in either case of the
/// command name, `HGETALL` in RESP2 and RESP3 — with no read reaching
/// Redis; after `PROXY FLUSH` a second pass fills them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_fills_the_warmed_rules_keys_at_start_and_after_a_flush() {
    let redis = RedisServer::start();
    seed(&redis);
    let mut cfg = config_for(&redis);
    cfg.cache.rules = vec![rule("w:", true), rule("w:x:", false), rule("c:", false)];
    cfg.cache.warm.resp3 = true;
    let proxy = TestProxy::start_with(cfg).await;
    proxy.must_log("L1 warmed");
    let mut admin = proxy.conn().await;
    let stats = until_warmed(&mut admin, 1).await;
    assert_eq!(
        stats["warm.last_keys"],
        (STRINGS + HASHES) as i64,
        "{stats:?}"
    );

    redis.reset_stats();
    let mut c = proxy.conn().await;
    let mut raw = crate::compat::Raw::connect(proxy.port()).await;
    let mut resp3 = proxy
        .client_resp3()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for i in 0..STRINGS {
        let key = format!("w:s:{i}");
        let v: String = q(&mut c, &["GET", &key]).await;
        assert_eq!(v, format!("v{i}"));
        let lower = raw.cmd(&["get", &key]).await;
        assert_eq!(lower, format!("${}\r\nv{i}\r\n", v.len()).into_bytes());
    }
    for i in 0..HASHES {
        let key = format!("w:h:{i}");
        let h: Vec<(String, String)> = q(&mut c, &["HGETALL", &key]).await;
        assert_eq!(
            h,
            vec![
                ("bid".into(), i.to_string()),
                ("ask".into(), (i + 1).to_string())
            ]
        );
        let m: std::collections::HashMap<String, String> = q(&mut resp3, &["HGETALL", &key]).await;
        assert_eq!(m.len(), 2);
    }
    assert_eq!(redis.calls("get"), 0, "every warmed string was in L1");
    assert_eq!(redis.calls("hgetall"), 0, "every warmed hash was in L1");

    for key in ["w:x:0", "c:0"] {
        let _: String = q(&mut c, &["GET", key]).await;
    }
    let _: Vec<String> = q(&mut c, &["LRANGE", "w:list", "0", "-1"]).await;
    assert_eq!(
        redis.calls("get"),
        2,
        "keys of rules that do not warm were not"
    );
    assert_eq!(redis.calls("lrange"), 1, "lists are not warmed");

    let _: String = q(&mut admin, &["PROXY", "FLUSH"]).await;
    until_warmed(&mut admin, 2).await;
    redis.reset_stats();
    for i in 0..STRINGS {
        let _: String = q(&mut c, &["GET", &format!("w:s:{i}")]).await;
    }
    assert_eq!(redis.calls("get"), 0, "warmed again after the flush");
    proxy.shutdown().await;
}

/// Guards the fill tokens `fill::warm` takes before each batch: with a
/// writer rewriting every key through nearcache for as long as a slow pass
/// (25 keys/s, 5 a batch) walks them, no key is left in L1 with a value a
/// later write replaced: once both are done, every read through nearcache
/// equals Redis's value. (Each write's own acknowledgement drops the key
/// again, so this cannot see a late token; the slow-link test below does.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_never_installs_a_value_a_write_replaced() {
    const KEYS: usize = 50;
    let value = |round: u64| format!("{round}:{}", "x".repeat(200_000));
    let redis = RedisServer::start();
    let mut d = redis.direct();
    for i in 0..KEYS {
        let _: () = redis::cmd("SET")
            .arg(format!("r:{i}"))
            .arg(value(0))
            .query(&mut d)
            .unwrap();
    }
    let mut cfg = config_for(&redis);
    cfg.cache.rules = vec![rule("r:", true)];
    cfg.cache.warm.rate = 25;
    cfg.cache.warm.scan_count = 5;
    let proxy = TestProxy::start_with(cfg).await;
    let mut admin = proxy.conn().await;
    let mut c = proxy.conn().await;
    let mut round = 0u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    // Rounds of writes until the pass is over (bounded by the deadline).
    while proxy_stats(&mut admin).await["warm.passes"] == 0 {
        round += 1;
        for i in 0..KEYS {
            let _: () = q(&mut c, &["SET", &format!("r:{i}"), &value(round)]).await;
        }
        assert!(Instant::now() < deadline, "the pass never finished");
    }
    assert!(round > 1, "the writes overlapped the pass");
    for i in 0..KEYS {
        let key = format!("r:{i}");
        let through: String = q(&mut c, &["GET", &key]).await;
        let direct: String = redis::cmd("GET").arg(&key).query(&mut d).unwrap();
        let round_of = |v: &str| v.split(':').next().unwrap_or_default().to_string();
        assert_eq!(
            round_of(&through),
            round_of(&direct),
            "{key} after {round} rounds"
        );
        assert_eq!(through.len(), direct.len());
    }
    proxy.shutdown().await;
}

/// Guards `admin::readiness` with `cache.warm.ready_after_warm`: `/readyz`
/// says not ready, and why, while the first pass runs (100 keys at 100/s
/// take a second), and ready once it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_first_warming_pass_when_asked_to() {
    let redis = RedisServer::start();
    let mut d = redis.direct();
    for i in 0..100 {
        let _: () = redis::cmd("SET")
            .arg(format!("w:{i}"))
            .arg("v")
            .query(&mut d)
            .unwrap();
    }
    let mut cfg = config_for(&redis);
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.cache.rules = vec![rule("w:", true)];
    cfg.cache.warm.rate = 100;
    cfg.cache.warm.scan_count = 10;
    cfg.cache.warm.ready_after_warm = true;
    let proxy = TestProxy::start_with(cfg).await;
    let mut admin = proxy.conn().await;
    let (status, body) = http_get(proxy.admin_addr(), "/readyz", "");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("\"warming\":true") && body.contains("warming L1"),
        "{body}"
    );
    until_warmed(&mut admin, 1).await;
    let (status, body) = http_get(proxy.admin_addr(), "/readyz", "");
    assert_eq!(status, 200, "{body}");
    proxy.shutdown().await;
}

/// Guards the fill tokens `fill::warm` takes before each batch is sent,
/// where the race is wide: nearcache's link to Redis holds every reply back
/// 400 ms. As soon as Redis has run the pass's first batch of GETs, every
/// key is rewritten in Redis directly and `PROXY INVALIDATE r:*` is sent
/// (what a peer's invalidation or Redis tracking does), all while the
/// batch's reply is still on the link. That batch's fills must be
/// discarded: kept, they would serve the replaced values for the rule's
/// whole 60 s. After the pass, every key reads as Redis holds it.
/// (Mutation-checked: with the tokens taken when the replies arrive, the
/// raced keys stay stale.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_over_a_slow_link_never_keeps_a_value_invalidated_meanwhile() {
    const KEYS: usize = 20;
    let redis = RedisServer::start();
    let mut d = redis.direct();
    let set_all = |d: &mut redis::Connection, v: u64| {
        for i in 0..KEYS {
            let _: () = redis::cmd("SET")
                .arg(format!("r:{i}"))
                .arg(v)
                .query(d)
                .unwrap();
        }
    };
    set_all(&mut d, 0);
    let slow = TcpRelay::start_delayed(redis.port(), Duration::from_millis(400)).await;
    let mut cfg = config_for(&redis);
    cfg.upstream.url = format!("redis://127.0.0.1:{}", slow.port());
    cfg.cache.rules = vec![rule("r:", true)];
    cfg.cache.warm.scan_count = 5;
    let proxy = TestProxy::start_with(cfg).await;
    let mut c = proxy.conn().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.calls("get") == 0 {
        assert!(Instant::now() < deadline, "the pass sent no GET");
    }
    set_all(&mut d, 1);
    let _: i64 = q(&mut c, &["PROXY", "INVALIDATE", "r:*"]).await;
    let stats = loop {
        let stats = proxy_stats(&mut c).await;
        if stats["warm.passes"] == 1 {
            break stats;
        }
        assert!(Instant::now() < deadline, "the pass never ended: {stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for i in 0..KEYS {
        let key = format!("r:{i}");
        let through: u64 = q(&mut c, &["GET", &key]).await;
        assert_eq!(
            through, 1,
            "{key}: a fill that raced the invalidation was kept"
        );
    }
    assert!(
        stats["rules.prefix:r:.stale_fills_rejected"] > 0,
        "no fill raced the invalidation: nothing was checked ({stats:?})"
    );
    proxy.shutdown().await;
}
