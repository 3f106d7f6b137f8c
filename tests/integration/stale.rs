//! Stale-if-error: a rule's `stale_if_error` lets L1 answer past an entry's
//! TTL while Redis is unreachable, and never otherwise.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use nearcache::config::{Duration as ConfigDuration, RuleConfig};

use crate::faults::{Client, Ended, Reply, encode, wait_for_pong};
use crate::support::{
    RedisServer, TestProxy, UPSTREAM_CONNECT_FAILED, UPSTREAM_LOST, config_for, proxy_stats,
};

const TTL: Duration = Duration::from_millis(300);
const STALE: Duration = Duration::from_secs(3);

fn rule(prefix: &str, stale: Option<Duration>) -> RuleConfig {
    RuleConfig {
        stale_if_error: stale.map(ConfigDuration),
        ..RuleConfig::caching(prefix, TTL)
    }
}

/// `cmd` on `client`, reconnecting once if nearcache closed it (a command
/// in flight when Redis went, `upstream.on_lost = "close"`).
async fn ask(client: &mut Client, port: u16, cmd: &[&str]) -> Reply {
    client.send(&encode(cmd)).await;
    match client.next(Duration::from_secs(5)).await {
        Ok(reply) => reply,
        Err(Ended::Closed) => {
            *client = Client::connect(port).await;
            client.cmd(cmd).await
        }
        Err(e) => panic!("{cmd:?}: {e:?}"),
    }
}

fn unavailable(reply: &Reply) -> bool {
    reply
        .error()
        .is_some_and(|e| e.starts_with("ERR upstream unavailable"))
}

/// Guards `fill::FillPolicy::stale` and `L1::get_stale`: with Redis gone, a
/// key read past its TTL is answered from L1 (GET and MGET) under a rule with
/// `stale_if_error`, for no longer than the window, and counted as a stale
/// hit; never under a rule without it, never for a key written since it was
/// filled, never past the key's own expiry in Redis, and never after Redis
/// came back as another server (its identity flushes L1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_answers_past_the_ttl_only_while_redis_is_unreachable() {
    let mut redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.cache.rules = vec![rule("s:", Some(STALE)), rule("n:", None)];
    cfg.upstream.connect_timeout = ConfigDuration(Duration::from_millis(200));
    cfg.upstream.breaker_failures = 2;
    let proxy = TestProxy::start_with(cfg).await;
    proxy
        .expect_log(UPSTREAM_LOST)
        .expect_log(UPSTREAM_CONNECT_FAILED);
    let port = proxy.port();
    let mut admin = proxy.conn().await;
    let mut c = Client::connect(port).await;
    for key in ["s:a", "s:b", "n:a"] {
        assert_eq!(c.cmd(&["SET", key, "1"]).await, Reply::status("OK"));
    }
    // Redis expires this one within L1's TTL: gone, not stale, once it does.
    assert_eq!(
        c.cmd(&["SET", "s:e", "1", "PX", "200"]).await,
        Reply::status("OK")
    );
    let filled = Instant::now();
    for key in ["s:a", "s:b", "s:e"] {
        assert_eq!(c.cmd(&["GET", key]).await, Reply::bulk("1"), "{key}");
    }
    let both = Reply::Array(Some(vec![Reply::bulk("1"), Reply::bulk("1")]));
    assert_eq!(c.cmd(&["MGET", "s:a", "s:b"]).await, both);
    // Filled last: once it misses, every other entry is past its TTL too.
    assert_eq!(c.cmd(&["GET", "n:a"]).await, Reply::bulk("1"));

    redis.kill();
    // A write while Redis is gone fails, and its key leaves L1 all the same.
    let write = ask(&mut c, port, &["SET", "s:b", "2"]).await;
    assert!(unavailable(&write), "{write:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match ask(&mut c, port, &["GET", "n:a"]).await {
            Reply::Bulk(Some(v)) if v == b"1" => {}
            reply => {
                assert!(
                    unavailable(&reply),
                    "n:a (no stale_if_error) past its TTL: {reply:?}"
                );
                break;
            }
        }
        assert!(Instant::now() < deadline, "n:a never expired from L1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(filled.elapsed() >= TTL);

    assert_eq!(
        ask(&mut c, port, &["GET", "s:a"]).await,
        Reply::bulk("1"),
        "stale"
    );
    let one = Reply::Array(Some(vec![Reply::bulk("1")]));
    assert_eq!(ask(&mut c, port, &["MGET", "s:a"]).await, one, "stale MGET");
    for cmd in [
        &["GET", "s:b"][..],
        &["MGET", "s:a", "s:b"],
        &["GET", "s:e"],
        &["GET", "s:never"],
    ] {
        let reply = ask(&mut c, port, cmd).await;
        assert!(
            unavailable(&reply),
            "{cmd:?} must not be answered: {reply:?}"
        );
    }
    let stats = proxy_stats(&mut admin).await;
    assert_eq!(stats["rules.prefix:s:.stale_hits"], 2, "{stats:?}");
    assert_eq!(stats["rules.prefix:n:.stale_hits"], 0, "{stats:?}");

    // Served for the whole window after the TTL, then no longer.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = ask(&mut c, port, &["GET", "s:a"]).await;
        if reply != Reply::bulk("1") {
            assert!(unavailable(&reply), "{reply:?}");
            break;
        }
        assert!(Instant::now() < deadline, "still served stale after 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        filled.elapsed() >= TTL + STALE,
        "the window ended early: {:?} after the fill",
        filled.elapsed()
    );

    // Back, and filled from there; then back as another (empty) server,
    // seen by nearcache (PING went through): what L1 held of the former one
    // is gone, so a second outage has nothing of it to serve.
    redis.restart();
    wait_for_pong(&mut c, Duration::from_secs(10)).await;
    assert_eq!(c.cmd(&["SET", "s:c", "old"]).await, Reply::status("OK"));
    assert_eq!(c.cmd(&["GET", "s:c"]).await, Reply::bulk("old"));
    let changes = proxy_stats(&mut admin).await["upstream.identity_changes"];
    redis.restart();
    wait_for_pong(&mut c, Duration::from_secs(10)).await;
    assert!(proxy_stats(&mut admin).await["upstream.identity_changes"] > changes);
    redis.kill();
    let reply = ask(&mut c, port, &["GET", "s:c"]).await;
    assert!(
        unavailable(&reply),
        "an entry of a former server: {reply:?}"
    );
    proxy.shutdown().await;
}
