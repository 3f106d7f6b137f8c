//! A busy, paused or restarting Redis, through nearcache as directly: a
//! script running past `busy-reply-threshold` answers its caller, other
//! clients get Redis's own `-BUSY`, `SCRIPT KILL` reaches it; a write held by
//! `CLIENT PAUSE WRITE` longer than `command_timeout` simply waits; a
//! `SELECT` Redis cannot take while busy gets Redis's refusal; and service
//! resumes as soon as Redis is back, however long the reconnect backoff.
//!
//! Each scenario runs against Redis directly and through nearcache, and the
//! replies must be the same bytes.

use std::time::Duration;

use bytes::Bytes;
use nearcache::config::Duration as Dur;

use crate::compat::Raw;
use crate::support::{
    RedisServer, TestProxy, UPSTREAM_CONNECT_FAILED, UPSTREAM_LOST, config_for, wait_until,
};

/// Spins for ARGV[1] µs, then answers `done`; it writes nothing, so
/// `SCRIPT KILL` may stop it.
const SPIN: &str = "local t = redis.call('TIME') \
    local start = t[1] * 1000000 + t[2] \
    while true do \
        local n = redis.call('TIME') \
        if n[1] * 1000000 + n[2] - start > tonumber(ARGV[1]) then break end \
    end \
    return 'done'";

/// A Redis that answers `-BUSY` 100 ms into a script.
fn busy_redis() -> RedisServer {
    RedisServer::start_with(&["--busy-reply-threshold", "100"])
}

/// A proxy whose `command_timeout` is shorter than the scripts and pauses
/// below, so a timeout would show.
async fn impatient_proxy(redis: &RedisServer) -> TestProxy {
    let mut cfg = config_for(redis);
    cfg.upstream.command_timeout = Dur(Duration::from_millis(300));
    TestProxy::start_with(cfg).await
}

/// Waits until Redis itself answers `-BUSY` (a script is past the
/// threshold), asking it directly.
async fn until_busy(redis: &RedisServer) {
    let mut direct = Raw::connect(redis.port()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if direct.cmd(&["PING"]).await.starts_with(b"-BUSY") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis never got busy"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A script outliving the threshold, then one killed, seen through `port`:
/// the caller's replies, another client's meanwhile, the killer's.
async fn scripts(port: u16, redis: &RedisServer) -> Vec<Bytes> {
    let mut seen = Vec::new();
    let mut caller = Raw::connect(port).await;
    caller.send_str(&["EVAL", SPIN, "0", "1500000"]).await;
    until_busy(redis).await;
    let mut other = Raw::connect(port).await;
    seen.push(other.cmd(&["GET", "k"]).await);
    seen.push(caller.frame().await);

    caller.send_str(&["EVAL", SPIN, "0", "30000000"]).await;
    until_busy(redis).await;
    let mut killer = Raw::connect(port).await;
    seen.push(killer.cmd(&["SCRIPT", "KILL"]).await);
    seen.push(caller.frame().await);
    // And everyone is served again.
    seen.push(other.cmd(&["SET", "k", "v"]).await);
    seen.push(caller.cmd(&["GET", "k"]).await);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_past_busy_reply_threshold_answers_as_redis_does() {
    let redis = busy_redis();
    let direct = scripts(redis.port(), &redis).await;
    assert!(direct[0].starts_with(b"-BUSY"), "{direct:?}");
    assert_eq!(&direct[1][..], b"$4\r\ndone\r\n");
    assert_eq!(&direct[2][..], b"+OK\r\n");
    let _: () = redis::cmd("DEL")
        .arg("k")
        .query(&mut redis.direct())
        .unwrap();
    let proxy = impatient_proxy(&redis).await;
    let proxied = scripts(proxy.port(), &redis).await;
    assert_eq!(proxied, direct);
    proxy.shutdown().await;
}

/// A write held by `CLIENT PAUSE WRITE`, and a read beside it, through
/// `port`.
async fn paused(port: u16, redis: &RedisServer) -> Vec<Bytes> {
    let mut admin = Raw::connect(redis.port()).await;
    assert_eq!(
        &admin.cmd(&["CLIENT", "PAUSE", "1000", "WRITE"]).await[..],
        b"+OK\r\n"
    );
    let mut writer = Raw::connect(port).await;
    let reply = writer.cmd(&["SET", "paused", "v"]).await;
    vec![reply, writer.cmd(&["GET", "paused"]).await]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_paused_longer_than_command_timeout_waits_as_directly() {
    let redis = RedisServer::start();
    let direct = paused(redis.port(), &redis).await;
    assert_eq!(&direct[0][..], b"+OK\r\n");
    let _: () = redis::cmd("DEL")
        .arg("paused")
        .query(&mut redis.direct())
        .unwrap();
    let proxy = impatient_proxy(&redis).await;
    let proxied = paused(proxy.port(), &redis).await;
    assert_eq!(proxied, direct);
    proxy.shutdown().await;
}

/// `SELECT 1` while a script runs (Redis refuses it), then a write and a
/// read in the database the client is left in, through `port`.
async fn select_while_busy(port: u16, redis: &RedisServer) -> Vec<Bytes> {
    let mut caller = Raw::connect(port).await;
    caller.send_str(&["EVAL", SPIN, "0", "600000"]).await;
    until_busy(redis).await;
    let mut other = Raw::connect(port).await;
    let mut seen = vec![other.cmd(&["SELECT", "1"]).await];
    seen.push(caller.frame().await);
    seen.push(other.cmd(&["SET", "where", "here"]).await);
    seen.push(other.cmd(&["SELECT", "0"]).await);
    seen.push(other.cmd(&["GET", "where"]).await);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_select_refused_while_busy_is_redis_s_refusal_and_the_client_stays() {
    let redis = busy_redis();
    let direct = select_while_busy(redis.port(), &redis).await;
    assert!(direct[0].starts_with(b"-BUSY"), "{direct:?}");
    assert_eq!(&direct[4][..], b"$4\r\nhere\r\n");
    let _: () = redis::cmd("DEL")
        .arg("where")
        .query(&mut redis.direct())
        .unwrap();
    let proxy = impatient_proxy(&redis).await;
    let proxied = select_while_busy(proxy.port(), &redis).await;
    assert_eq!(proxied, direct);
    proxy.shutdown().await;
}

/// Guards the pool's wake-up: with a reconnect backoff of 20 s, a Redis that
/// is back is served at once all the same, because a request finding the
/// pool down makes it try again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_resumes_as_soon_as_redis_is_back_whatever_the_backoff() {
    let mut redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.upstream.reconnect_min = Dur(Duration::from_secs(20));
    cfg.upstream.reconnect_max = Dur(Duration::from_secs(20));
    // (One client polls throughout: a GET meeting the dying connection is
    // answered, not closed.)
    cfg.upstream.on_lost = nearcache::config::OnLost::Error;
    let proxy = TestProxy::start_with(cfg).await;
    proxy
        .expect_log(UPSTREAM_LOST)
        .expect_log(UPSTREAM_CONNECT_FAILED);
    let mut client = Raw::connect(proxy.port()).await;
    assert_eq!(&client.cmd(&["SET", "k", "v"]).await[..], b"+OK\r\n");
    redis.kill();
    // The pool has noticed, and is backing off.
    wait_until(
        "the pool to find Redis gone",
        Duration::from_secs(10),
        || futures_executor(client.cmd(&["GET", "k"])).starts_with(b"-ERR upstream unavailable"),
    );
    redis.restart();
    wait_until(
        "service within the poll limit, not the 20 s backoff",
        Duration::from_secs(10),
        || &futures_executor(client.cmd(&["GET", "k"]))[..] == b"$-1\r\n",
    );
    proxy.shutdown().await;
}

/// Runs `f` to completion from inside a blocking section of the test's
/// runtime (for [`wait_until`]'s synchronous condition).
fn futures_executor<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// A client changes the upstream's password: connections already open keep
/// working; a new one (another database's pool) is refused in Redis's own
/// words, not as a proxy error; and it works again the moment the password
/// does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_changed_under_nearcache_is_redis_s_refusal_until_it_works_again() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut admin = Raw::connect(proxy.port()).await;
    let mut other = Raw::connect(proxy.port()).await;
    assert_eq!(&other.cmd(&["SET", "k", "v"]).await[..], b"+OK\r\n");
    assert_eq!(
        &admin.cmd(&["CONFIG", "SET", "requirepass", "s3cret"]).await[..],
        b"+OK\r\n"
    );
    // The shared connections stay authenticated, as a direct client would.
    assert_eq!(&other.cmd(&["GET", "k"]).await[..], b"$1\r\nv\r\n");
    let refused = other.cmd(&["SELECT", "1"]).await;
    assert!(refused.starts_with(b"-NOAUTH "), "{refused:?}");
    assert_eq!(
        &other.cmd(&["GET", "k"]).await[..],
        b"$1\r\nv\r\n",
        "still in db 0"
    );
    assert_eq!(
        &admin.cmd(&["CONFIG", "SET", "requirepass", ""]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(&other.cmd(&["SELECT", "1"]).await[..], b"+OK\r\n");
    proxy.shutdown().await;
}
