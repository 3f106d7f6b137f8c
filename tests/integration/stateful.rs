//! Stateful commands through the proxy: transactions, WATCH, pub/sub (RESP2
//! and RESP3), blocking commands, MONITOR, CLIENT REPLY, RESET and QUIT, and
//! that a client leaving in the middle of any of them leaves no state behind.
//!
//! Mostly raw sockets ([`Raw`]): the exact frames (and their order) are what
//! is under test. Waiting is always on an event or a bounded poll of what
//! Redis itself reports (`INFO clients`, `CLIENT LIST`, `PUBSUB NUMSUB`).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis_protocol::resp3::types::OwnedFrame;

use crate::compat::{Raw, blob, direct_async, encode, encode_pipeline};
use crate::support::{RedisServer, TestProxy, config_for, q, wait_until};

const OK: &[u8] = b"+OK\r\n";
const QUEUED: &[u8] = b"+QUEUED\r\n";

/// RESP2 bulk string.
fn bulk(s: &str) -> String {
    format!("${}\r\n{s}\r\n", s.len())
}

/// RESP2 array of bulk strings and integers (`:n` items pass through).
fn array(kind: char, items: &[&str]) -> Vec<u8> {
    let mut out = format!("{kind}{}\r\n", items.len());
    for i in items {
        if i.starts_with(':') {
            out.push_str(i);
            out.push_str("\r\n");
        } else {
            out.push_str(&bulk(i));
        }
    }
    out.into_bytes()
}

/// Polls `probe` every 10 ms until it returns true; fails after 10 s.
async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !probe().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after 10 s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `blocked_clients` from Redis's `INFO clients`.
async fn blocked_clients(d: &mut MultiplexedConnection) -> u64 {
    let info: String = q(d, &["INFO", "clients"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("blocked_clients in INFO clients")
}

/// Waits until Redis reports exactly `n` blocked clients.
async fn wait_blocked(d: &mut MultiplexedConnection, n: u64) {
    let what = format!("{n} blocked client(s) on Redis");
    eventually(&what, || {
        let mut d = d.clone();
        async move { blocked_clients(&mut d).await == n }
    })
    .await;
}

/// Redis's `CLIENT LIST`, one map of fields per client.
async fn client_list(d: &mut MultiplexedConnection) -> Vec<Vec<(String, String)>> {
    let list: String = q(d, &["CLIENT", "LIST"]).await;
    list.lines()
        .map(|l| {
            l.split(' ')
                .filter_map(|f| f.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

fn field<'a>(client: &'a [(String, String)], name: &str) -> &'a str {
    client
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

// ---------------------------------------------------------------- MULTI/EXEC

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_exec_queues_then_runs_atomically() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut other = proxy.conn().await;
    let mut a = Raw::connect(proxy.port()).await;

    assert_eq!(a.cmd(&["MULTI"]).await, OK);
    assert_eq!(a.cmd(&["SET", "tx", "1"]).await, QUEUED);
    assert_eq!(a.cmd(&["INCR", "tx"]).await, QUEUED);
    assert_eq!(a.cmd(&["GET", "tx"]).await, QUEUED);
    let before: Option<String> = q(&mut other, &["GET", "tx"]).await;
    assert_eq!(before, None, "queued commands have not run yet");
    assert_eq!(
        a.cmd(&["EXEC"]).await,
        b"*3\r\n+OK\r\n:2\r\n$1\r\n2\r\n"[..]
    );
    let after: Option<String> = q(&mut other, &["GET", "tx"]).await;
    assert_eq!(after.as_deref(), Some("2"));
    // Out of the transaction: commands run immediately again.
    assert_eq!(a.cmd(&["SET", "tx2", "x"]).await, OK);
    // And a second transaction on the same connection works.
    assert_eq!(a.cmd(&["MULTI"]).await, OK);
    assert_eq!(a.cmd(&["INCR", "tx"]).await, QUEUED);
    assert_eq!(a.cmd(&["EXEC"]).await, b"*1\r\n:3\r\n"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_discard_drops_the_queued_commands() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut a = Raw::connect(proxy.port()).await;

    assert_eq!(a.cmd(&["MULTI"]).await, OK);
    assert_eq!(a.cmd(&["SET", "d", "1"]).await, QUEUED);
    assert_eq!(a.cmd(&["DISCARD"]).await, OK);
    assert_eq!(
        a.cmd(&["GET", "d"]).await,
        b"$-1\r\n"[..],
        "the queued SET never ran"
    );
    assert_eq!(a.cmd(&["SET", "d", "2"]).await, OK, "not queued any more");
    let mut d = direct_async(&redis, 0).await;
    let v: Option<String> = q(&mut d, &["GET", "d"]).await;
    assert_eq!(v.as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_aborts_exec_when_another_client_writes_the_key() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut a = Raw::connect(proxy.port()).await;
    let mut b = proxy.conn().await;

    let _: () = q(&mut b, &["SET", "w", "start"]).await;
    assert_eq!(a.cmd(&["WATCH", "w"]).await, OK);
    assert_eq!(a.cmd(&["GET", "w"]).await, bulk("start").as_bytes()[..]);
    let _: () = q(&mut b, &["SET", "w", "by-b"]).await;
    assert_eq!(a.cmd(&["MULTI"]).await, OK);
    assert_eq!(a.cmd(&["SET", "w", "by-a"]).await, QUEUED);
    assert_eq!(a.cmd(&["EXEC"]).await, b"*-1\r\n"[..], "EXEC aborted (nil)");
    let v: String = q(&mut b, &["GET", "w"]).await;
    assert_eq!(v, "by-b", "the aborted transaction wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_lets_exec_run_when_nobody_touched_the_key() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut a = Raw::connect(proxy.port()).await;
    let mut b = proxy.conn().await;

    let _: () = q(&mut b, &["SET", "w", "start"]).await;
    assert_eq!(a.cmd(&["WATCH", "w"]).await, OK);
    // Another client writing a different key does not matter.
    let _: () = q(&mut b, &["SET", "unrelated", "x"]).await;
    assert_eq!(a.cmd(&["MULTI"]).await, OK);
    assert_eq!(a.cmd(&["SET", "w", "by-a"]).await, QUEUED);
    assert_eq!(a.cmd(&["EXEC"]).await, b"*1\r\n+OK\r\n"[..]);
    let v: String = q(&mut b, &["GET", "w"]).await;
    assert_eq!(v, "by-a");
    // The watch ended with EXEC: a later write by B does not affect A.
    assert_eq!(a.cmd(&["MULTI"]).await, OK);
    let _: () = q(&mut b, &["SET", "w", "by-b"]).await;
    assert_eq!(a.cmd(&["SET", "w", "by-a-again"]).await, QUEUED);
    assert_eq!(a.cmd(&["EXEC"]).await, b"*1\r\n+OK\r\n"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_discard_without_multi_are_redis_errors() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut p = Raw::connect(proxy.port()).await;
    let mut d = Raw::connect(redis.port()).await;
    for cmd in ["EXEC", "DISCARD"] {
        let from_redis = d.cmd(&[cmd]).await;
        assert_eq!(
            from_redis,
            format!("-ERR {cmd} without MULTI\r\n").as_bytes()[..]
        );
        assert_eq!(p.cmd(&[cmd]).await, from_redis);
    }
    assert_eq!(p.cmd(&["PING"]).await, b"+PONG\r\n"[..]);
}

/// Runs `MULTI; SET ok 1; <bad>; EXEC` on `conn` and returns the four replies.
async fn transaction_with_bad_command(conn: &mut Raw, bad: &[&str]) -> Vec<Vec<u8>> {
    let mut replies = Vec::new();
    for args in [&["MULTI"][..], &["SET", "ok", "1"], bad, &["EXEC"]] {
        replies.push(conn.cmd(args).await.to_vec());
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_wrong_arity_command_aborts_exec_with_execabort() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let direct = transaction_with_bad_command(&mut d, &["SET", "k"]).await;
    assert!(
        direct[3].starts_with(b"-EXECABORT"),
        "Redis: {:?}",
        direct[3]
    );
    assert_eq!(d.cmd(&["EXISTS", "ok"]).await, b":0\r\n"[..]);

    let mut p = Raw::connect(proxy.port()).await;
    let proxied = transaction_with_bad_command(&mut p, &["SET", "k"]).await;
    assert_eq!(
        proxied
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect::<Vec<_>>(),
        direct
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        d.cmd(&["EXISTS", "ok"]).await,
        b":0\r\n"[..],
        "the aborted transaction's SET must not have run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_unknown_command_aborts_exec_with_execabort() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut d = Raw::connect(redis.port()).await;
    let direct = transaction_with_bad_command(&mut d, &["NOSUCHCMD", "x"]).await;
    assert!(
        direct[3].starts_with(b"-EXECABORT"),
        "Redis: {:?}",
        direct[3]
    );

    let mut p = Raw::connect(proxy.port()).await;
    let proxied = transaction_with_bad_command(&mut p, &["NOSUCHCMD", "x"]).await;
    assert_eq!(proxied, direct);
    assert_eq!(d.cmd(&["EXISTS", "ok"]).await, b":0\r\n"[..]);
    assert_eq!(
        p.cmd(&["SET", "after", "1"]).await,
        OK,
        "no transaction left open"
    );
}

// ------------------------------------------------------------------ pub/sub

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp2_pubsub_subscribe_publish_psubscribe_unsubscribe() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut publisher = proxy.conn().await;
    let mut s = Raw::connect(proxy.port()).await;

    assert_eq!(
        s.cmd(&["SUBSCRIBE", "ch"]).await,
        array('*', &["subscribe", "ch", ":1"])[..]
    );
    let receivers: i64 = q(&mut publisher, &["PUBLISH", "ch", "hello"]).await;
    assert_eq!(receivers, 1);
    assert_eq!(s.frame().await, array('*', &["message", "ch", "hello"])[..]);

    assert_eq!(
        s.cmd(&["PSUBSCRIBE", "news.*"]).await,
        array('*', &["psubscribe", "news.*", ":2"])[..]
    );
    let receivers: i64 = q(&mut publisher, &["PUBLISH", "news.tech", "chips"]).await;
    assert_eq!(receivers, 1);
    assert_eq!(
        s.frame().await,
        array('*', &["pmessage", "news.*", "news.tech", "chips"])[..]
    );
    let receivers: i64 = q(&mut publisher, &["PUBLISH", "other", "x"]).await;
    assert_eq!(receivers, 0);

    // PING in subscribe mode answers with the pub/sub form.
    assert_eq!(s.cmd(&["PING"]).await, array('*', &["pong", ""])[..]);
    assert_eq!(
        s.cmd(&["PING", "hi"]).await,
        array('*', &["pong", "hi"])[..]
    );
    // Other commands are refused by Redis while subscribed in RESP2.
    let refused = s.cmd(&["GET", "k"]).await;
    assert!(
        refused.starts_with(b"-ERR"),
        "GET while subscribed: {refused:?}"
    );

    assert_eq!(
        s.cmd(&["UNSUBSCRIBE", "ch"]).await,
        array('*', &["unsubscribe", "ch", ":1"])[..]
    );
    assert_eq!(
        s.cmd(&["PUNSUBSCRIBE", "news.*"]).await,
        array('*', &["punsubscribe", "news.*", ":0"])[..]
    );
    let receivers: i64 = q(&mut publisher, &["PUBLISH", "ch", "gone"]).await;
    assert_eq!(receivers, 0, "nobody subscribed any more");

    // Normal commands work again on the same connection.
    assert_eq!(s.cmd(&["SET", "k", "v"]).await, OK);
    assert_eq!(s.cmd(&["GET", "k"]).await, bulk("v").as_bytes()[..]);
    assert_eq!(s.cmd(&["PING"]).await, b"+PONG\r\n"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_pubsub_uses_push_frames_and_still_answers_commands() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut publisher = proxy.conn().await;
    let _: () = q(&mut publisher, &["SET", "k", "v"]).await;

    let mut s = Raw::connect_resp3(proxy.port()).await;

    let confirm = s.cmd(&["SUBSCRIBE", "ch"]).await;
    assert_eq!(confirm, array('>', &["subscribe", "ch", ":1"])[..]);
    let receivers: i64 = q(&mut publisher, &["PUBLISH", "ch", "hello"]).await;
    assert_eq!(receivers, 1);
    match s.frame3().await {
        OwnedFrame::Push { data, .. } => {
            assert_eq!(data, vec![blob("message"), blob("ch"), blob("hello")]);
        }
        other => panic!("a published message is a push frame, got {other:?}"),
    }
    // A normal command while subscribed gets its normal reply.
    assert_eq!(s.cmd(&["GET", "k"]).await, bulk("v").as_bytes()[..]);
    assert_eq!(s.cmd(&["GET", "missing"]).await, b"_\r\n"[..]);
    let receivers: i64 = q(&mut publisher, &["PUBLISH", "ch", "again"]).await;
    assert_eq!(receivers, 1);
    assert_eq!(s.frame().await, array('>', &["message", "ch", "again"])[..]);
    assert_eq!(
        s.cmd(&["UNSUBSCRIBE", "ch"]).await,
        array('>', &["unsubscribe", "ch", ":0"])[..]
    );
}

// --------------------------------------------------- client-side caching

/// `CLIENT TRACKING on` in RESP3: the client's invalidation pushes come
/// through the proxy, after a write by another client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tracking_pushes_invalidations_through_the_proxy() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut writer = proxy.conn().await;
    let _: () = q(&mut writer, &["SET", "tk", "1"]).await;

    let mut t = Raw::connect_resp3(proxy.port()).await;
    assert_eq!(t.cmd(&["CLIENT", "TRACKING", "on"]).await, OK);
    assert_eq!(t.cmd(&["GET", "tk"]).await, bulk("1").as_bytes()[..]);
    let _: () = q(&mut writer, &["SET", "tk", "2"]).await;
    match t.frame3().await {
        OwnedFrame::Push { data, .. } => assert_eq!(
            data,
            vec![
                blob("invalidate"),
                OwnedFrame::Array {
                    data: vec![blob("tk")],
                    attributes: None
                }
            ]
        ),
        other => panic!("an invalidation is a push frame, got {other:?}"),
    }
    assert_eq!(t.cmd(&["GET", "tk"]).await, bulk("2").as_bytes()[..]);
}

/// The RESP2 form: `CLIENT TRACKING on REDIRECT <id>` names, by the id its
/// `CLIENT ID` gave, a client subscribed to `__redis__:invalidate`. Redis
/// knows that client by its upstream connection, so nearcache translates the
/// id; an id no pinned client has gets Redis's own error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tracking_redirect_names_a_client_by_its_proxy_id() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut writer = proxy.conn().await;
    let _: () = q(&mut writer, &["SET", "rk", "1"]).await;

    let mut listener = Raw::connect(proxy.port()).await;
    let id = client_id(&mut listener).await;
    assert_eq!(
        listener.cmd(&["SUBSCRIBE", "__redis__:invalidate"]).await,
        array('*', &["subscribe", "__redis__:invalidate", ":1"])[..]
    );

    let mut tracked = Raw::connect(proxy.port()).await;
    assert_eq!(
        tracked
            .cmd(&["CLIENT", "TRACKING", "on", "REDIRECT", "999999"])
            .await,
        b"-ERR The client ID you want redirect to does not exist\r\n"[..]
    );
    assert_eq!(
        tracked
            .cmd(&["CLIENT", "TRACKING", "on", "REDIRECT", &id])
            .await,
        OK
    );
    assert_eq!(tracked.cmd(&["GET", "rk"]).await, bulk("1").as_bytes()[..]);
    let _: () = q(&mut writer, &["SET", "rk", "2"]).await;
    let mut invalidate = format!("*3\r\n{}{}", bulk("message"), bulk("__redis__:invalidate"));
    invalidate.push_str(&format!("*1\r\n{}", bulk("rk")));
    assert_eq!(listener.frame().await, invalidate.as_bytes()[..]);
    // CLIENT LIST names the redirect by nearcache's id too.
    let mine = client_lines(&tracked.cmd(&["CLIENT", "INFO"]).await);
    assert_eq!(field(&mine[0], "redir"), id);
    assert!(field(&mine[0], "flags").contains('t'), "{mine:?}");
}

/// The order redis-py's `client_tracking_on(clientid=…)` may take: the
/// redirect names a client that has not subscribed yet (it is on the shared
/// connections, so Redis knows no connection of its). nearcache holds a
/// connection for it, redirects there, and the client subscribes on that
/// very connection: the invalidations reach it, as directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracking_redirect_to_a_client_not_yet_subscribed_reaches_it() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut heard = Vec::new();
    for port in [redis.port(), proxy.port()] {
        let mut writer = Raw::connect(port).await;
        assert_eq!(writer.cmd(&["SET", "rk", "1"]).await, OK);
        let mut listener = Raw::connect(port).await;
        let id = client_id(&mut listener).await;
        let mut tracked = Raw::connect(port).await;
        heard.push(tracked.cmd(&["CLIENT", "GETREDIR"]).await);
        heard.push(
            tracked
                .cmd(&["CLIENT", "TRACKING", "on", "REDIRECT", &id])
                .await,
        );
        // The redirect by the id the client knows.
        assert_eq!(
            tracked.cmd(&["CLIENT", "GETREDIR"]).await,
            format!(":{id}\r\n").as_bytes()[..]
        );
        heard.push(tracked.cmd(&["GET", "rk"]).await);
        heard.push(listener.cmd(&["SUBSCRIBE", "__redis__:invalidate"]).await);
        assert_eq!(writer.cmd(&["SET", "rk", "2"]).await, OK);
        heard.push(listener.frame().await);
    }
    assert_eq!(&heard[0][..], b":-1\r\n", "{heard:?}");
    assert_eq!(&heard[1][..], OK, "{heard:?}");
    assert_eq!(heard[5..], heard[..5], "through nearcache");
}

// ---------------------------------------------------------------- blocking

/// Sends a blocking command on a fresh proxy connection, waits until Redis
/// reports it blocked, runs `release` through another client, and returns
/// the blocked client's reply.
async fn blocked_then_released(
    redis: &RedisServer,
    proxy: &TestProxy,
    blocking: &[&str],
    release: &[&str],
) -> bytes::Bytes {
    let mut d = direct_async(redis, 0).await;
    let mut other = proxy.conn().await;
    let mut a = Raw::connect(proxy.port()).await;
    a.send_str(blocking).await;
    wait_blocked(&mut d, 1).await;
    let _: redis::Value = q(&mut other, release).await;
    let reply = a.frame().await;
    wait_blocked(&mut d, 0).await;
    assert_eq!(
        a.cmd(&["PING"]).await,
        b"+PONG\r\n"[..],
        "the client goes on normally"
    );
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blpop_is_released_by_another_clients_push() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let reply =
        blocked_then_released(&redis, &proxy, &["BLPOP", "q", "0"], &["RPUSH", "q", "x"]).await;
    assert_eq!(reply, array('*', &["q", "x"])[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brpop_is_released_by_another_clients_push() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let reply = blocked_then_released(
        &redis,
        &proxy,
        &["BRPOP", "q1", "q2", "0"],
        &["LPUSH", "q2", "a", "b"],
    )
    .await;
    assert_eq!(reply, array('*', &["q2", "a"])[..]);
    let mut d = direct_async(&redis, 0).await;
    let left: Vec<String> = q(&mut d, &["LRANGE", "q2", "0", "-1"]).await;
    assert_eq!(left, ["b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blmove_is_released_by_another_clients_push() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let reply = blocked_then_released(
        &redis,
        &proxy,
        &["BLMOVE", "src", "dst", "LEFT", "RIGHT", "0"],
        &["RPUSH", "src", "item"],
    )
    .await;
    assert_eq!(reply, bulk("item").as_bytes()[..]);
    let mut d = direct_async(&redis, 0).await;
    let dst: Vec<String> = q(&mut d, &["LRANGE", "dst", "0", "-1"]).await;
    assert_eq!(dst, ["item"]);
    let src: i64 = q(&mut d, &["LLEN", "src"]).await;
    assert_eq!(src, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bzpopmin_is_released_by_another_clients_zadd() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let reply = blocked_then_released(
        &redis,
        &proxy,
        &["BZPOPMIN", "zq", "0"],
        &["ZADD", "zq", "2", "two", "1", "one"],
    )
    .await;
    assert_eq!(reply, array('*', &["zq", "one", "1"])[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xread_block_is_released_by_another_clients_xadd() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut d = direct_async(&redis, 0).await;
    let _: String = q(&mut d, &["XADD", "xs", "1-1", "old", "entry"]).await;
    let reply = blocked_then_released(
        &redis,
        &proxy,
        &["XREAD", "BLOCK", "0", "STREAMS", "xs", "$"],
        &["XADD", "xs", "5-1", "f", "v"],
    )
    .await;
    let want = b"*1\r\n*2\r\n$2\r\nxs\r\n*1\r\n*2\r\n$3\r\n5-1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n";
    assert_eq!(reply, want[..], "only the entry added after blocking");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_commands_with_a_timeout_return_nil() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut p = Raw::connect(proxy.port()).await;
    let mut d = Raw::connect(redis.port()).await;
    for args in [
        &["BLPOP", "empty", "0.05"][..],
        &["BRPOP", "empty", "0.05"],
        &["BLMOVE", "empty", "dst", "LEFT", "LEFT", "0.05"],
        &["BZPOPMIN", "emptyz", "0.05"],
        &["XREAD", "BLOCK", "50", "STREAMS", "emptys", "$"],
    ] {
        let from_redis = d.cmd(args).await;
        assert!(
            from_redis[..] == b"*-1\r\n"[..] || from_redis[..] == b"$-1\r\n"[..],
            "{args:?}: Redis said {from_redis:?}"
        );
        assert_eq!(p.cmd(args).await, from_redis, "{args:?}");
    }
    assert_eq!(p.cmd(&["PING"]).await, b"+PONG\r\n"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_client_does_not_block_other_clients() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut d = direct_async(&redis, 0).await;
    let mut other = proxy.conn().await;
    let _: () = q(&mut other, &["SET", "k", "v"]).await;

    let mut a = Raw::connect(proxy.port()).await;
    a.send_str(&["BLPOP", "q", "0"]).await;
    wait_blocked(&mut d, 1).await;
    let gets = async {
        for _ in 0..100 {
            let v: String = q(&mut other, &["GET", "k"]).await;
            assert_eq!(v, "v");
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gets)
        .await
        .expect("100 GETs complete while another client is blocked");
    assert_eq!(
        blocked_clients(&mut d).await,
        1,
        "the BLPOP is still blocked"
    );
    let _: i64 = q(&mut other, &["RPUSH", "q", "done"]).await;
    assert_eq!(a.frame().await, array('*', &["q", "done"])[..]);
}

// ---------------------------------------------------------------------- WAIT

/// A replica of `master`, once the master reports it online.
async fn replica_of(master: &RedisServer) -> RedisServer {
    let port = master.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let d = direct_async(master, 0).await;
    eventually("the replica to be online", || {
        let mut d = d.clone();
        async move {
            let info: String = q(&mut d, &["INFO", "replication"]).await;
            info.contains("state=online")
        }
    })
    .await;
    replica
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_counts_acks_for_the_clients_own_writes() {
    let redis = RedisServer::start();
    let replica = replica_of(&redis).await;
    let proxy = TestProxy::start(&redis).await;
    let mut c = Raw::connect(proxy.port()).await;
    // Pipelined: WAIT must count the SET before it, and replies stay in order.
    let mut pipeline = encode(&[b"SET", b"k", b"1"]);
    pipeline.extend(encode(&[b"WAIT", b"1", b"5000"]));
    pipeline.extend(encode(&[b"GET", b"k"]));
    c.write(&pipeline).await;
    assert_eq!(c.frame().await, OK[..]);
    assert_eq!(c.frame().await, b":1\r\n"[..], "the replica acked the SET");
    assert_eq!(c.frame().await, bulk("1").as_bytes());
    // Let the replica ack everything so far (it acks every second): a WAIT
    // counting from an earlier point — the offset of whatever its own
    // connection last did — would then see it as caught up.
    let d = direct_async(&redis, 0).await;
    eventually("the replica to ack the whole stream", || {
        let mut d = d.clone();
        async move {
            let info: String = q(&mut d, &["INFO", "replication"]).await;
            let field = |name: &str| {
                info.split([',', '\r', '\n'])
                    .find_map(|f| f.strip_prefix(name))
                    .map(str::to_string)
            };
            let master = field("master_repl_offset:");
            master.is_some() && field("offset=") == master
        }
    })
    .await;
    // A stopped replica acks nothing more, so WAIT must answer 0.
    replica.signal("STOP");
    assert_eq!(c.cmd(&["SET", "k", "2"]).await, OK[..]);
    let acked = c.cmd(&["WAIT", "1", "200"]).await;
    replica.signal("CONT");
    assert_eq!(acked, b":0\r\n"[..], "nothing acked the second SET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_does_not_hold_up_clients_sharing_its_connection() {
    let redis = RedisServer::start();
    // One shared connection: every client's commands go over it.
    let mut cfg = config_for(&redis);
    cfg.upstream.pool_size = 1;
    let proxy = TestProxy::start_with(cfg).await;
    let mut d = direct_async(&redis, 0).await;
    let mut a = Raw::connect(proxy.port()).await;
    // No replica: this WAIT blocks until its client leaves.
    a.send_str(&["WAIT", "1", "0"]).await;
    wait_blocked(&mut d, 1).await;
    let mut b = Raw::connect(proxy.port()).await;
    let gets = async {
        for _ in 0..100 {
            assert_eq!(b.cmd(&["GET", "k"]).await, b"$-1\r\n"[..]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gets)
        .await
        .expect("100 GETs complete while another client waits");
    assert_eq!(
        blocked_clients(&mut d).await,
        1,
        "the WAIT is still blocked"
    );
    // Leaving releases it: its connection closes, as Redis drops the WAIT
    // of a client that disconnects.
    drop(a);
    wait_blocked(&mut d, 0).await;
}

// ------------------------------------------------ clients that leave midway

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_multi_leaves_no_queued_transaction() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut d = direct_async(&redis, 0).await;

    let mut a = Raw::connect(proxy.port()).await;
    assert_eq!(a.cmd(&["MULTI"]).await, OK);
    assert_eq!(a.cmd(&["SET", "abandoned", "1"]).await, QUEUED);
    let in_multi = client_list(&mut d)
        .await
        .iter()
        .filter(|c| field(c, "flags").contains('x'))
        .count();
    assert_eq!(in_multi, 1, "Redis sees one connection inside MULTI");
    drop(a);

    eventually("no upstream connection left inside MULTI", || {
        let mut d = d.clone();
        async move {
            client_list(&mut d)
                .await
                .iter()
                .all(|c| !field(c, "flags").contains('x'))
        }
    })
    .await;
    // The next transactions start from nothing.
    for _ in 0..3 {
        let mut b = Raw::connect(proxy.port()).await;
        assert_eq!(b.cmd(&["MULTI"]).await, OK, "not a nested MULTI");
        assert_eq!(b.cmd(&["EXEC"]).await, b"*0\r\n"[..], "nothing queued by A");
    }
    let v: Option<String> = q(&mut d, &["GET", "abandoned"]).await;
    assert_eq!(v, None, "A's queued SET never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_watch_leaves_no_watch() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut d = direct_async(&redis, 0).await;

    let mut a = Raw::connect(proxy.port()).await;
    assert_eq!(a.cmd(&["WATCH", "wk"]).await, OK);
    let watching = client_list(&mut d)
        .await
        .iter()
        .filter(|c| field(c, "cmd") == "watch")
        .count();
    assert_eq!(watching, 1);
    drop(a);
    // Closed, or at least reset (UNWATCH/RESET), before anyone reuses it.
    eventually(
        "the abandoned WATCH connection to be closed or reset",
        || {
            let mut d = d.clone();
            async move {
                client_list(&mut d)
                    .await
                    .iter()
                    .all(|c| field(c, "cmd") != "watch")
            }
        },
    )
    .await;

    // Whatever connection the next clients get, a write to wk does not abort
    // their transactions.
    for i in 0..3 {
        let mut b = Raw::connect(proxy.port()).await;
        assert_eq!(b.cmd(&["MULTI"]).await, OK);
        let _: () = q(&mut d, &["SET", "wk", &format!("changed{i}")]).await;
        assert_eq!(b.cmd(&["SET", "other", "1"]).await, QUEUED);
        assert_eq!(b.cmd(&["EXEC"]).await, b"*1\r\n+OK\r\n"[..], "round {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_blpop_leaves_no_blocked_upstream() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut d = direct_async(&redis, 0).await;

    let mut a = Raw::connect(proxy.port()).await;
    a.send_str(&["BLPOP", "abq", "0"]).await;
    wait_blocked(&mut d, 1).await;
    let blocked_on_blpop = |list: &[Vec<(String, String)>]| {
        list.iter()
            .filter(|c| field(c, "cmd") == "blpop" && field(c, "flags").contains('b'))
            .count()
    };
    assert_eq!(blocked_on_blpop(&client_list(&mut d).await), 1);
    drop(a);

    eventually("the abandoned BLPOP's upstream connection to close", || {
        let mut d = d.clone();
        async move { blocked_on_blpop(&client_list(&mut d).await) == 0 }
    })
    .await;
    assert_eq!(blocked_clients(&mut d).await, 0);

    let mut b = proxy.conn().await;
    let len: i64 = q(&mut b, &["RPUSH", "abq", "precious"]).await;
    assert_eq!(len, 1);
    let items: Vec<String> = q(&mut d, &["LRANGE", "abq", "0", "-1"]).await;
    assert_eq!(
        items,
        ["precious"],
        "the push was not eaten by the abandoned BLPOP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_subscribe_leaves_no_subscription() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut d = direct_async(&redis, 0).await;

    let mut a = Raw::connect(proxy.port()).await;
    assert_eq!(
        a.cmd(&["SUBSCRIBE", "gone"]).await,
        array('*', &["subscribe", "gone", ":1"])[..]
    );
    let numsub = |d: MultiplexedConnection| async move {
        let mut d = d;
        let r: (String, i64) = q(&mut d, &["PUBSUB", "NUMSUB", "gone"]).await;
        r.1
    };
    assert_eq!(numsub(d.clone()).await, 1);
    drop(a);
    eventually("the abandoned subscription to go", || {
        let d = d.clone();
        async move { numsub(d).await == 0 }
    })
    .await;
    let mut b = Raw::connect(proxy.port()).await;
    assert_eq!(
        b.cmd(&["PING"]).await,
        b"+PONG\r\n"[..],
        "a new client is not in subscribe mode"
    );
    assert_eq!(b.cmd(&["PUBLISH", "gone", "x"]).await, b":0\r\n"[..]);
    let _: () = q(&mut d, &["SET", "k", "v"]).await;
    assert_eq!(b.cmd(&["GET", "k"]).await, bulk("v").as_bytes()[..]);
}

// ------------------------------------------------- MONITOR, REPLY, RESET, QUIT

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_shows_commands_of_other_clients() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut m = Raw::connect(proxy.port()).await;
    assert_eq!(m.cmd(&["MONITOR"]).await, OK);

    let mut other = proxy.conn().await;
    let _: () = q(&mut other, &["SET", "monitored-key", "seen"]).await;
    let mut lines = Vec::new();
    for _ in 0..100 {
        let line = m.frame().await;
        let text = String::from_utf8_lossy(&line).into_owned();
        lines.push(text.clone());
        if text.starts_with('+') && text.contains(r#""SET" "monitored-key" "seen""#) {
            return;
        }
    }
    panic!("MONITOR never showed the SET; saw {lines:?}");
}

/// MONITOR shows the clients' commands, not nearcache's own connections:
/// a new pool's handshake (`HELLO … SETNAME nearcache`, its `SELECT`) and
/// the stand-ins' marked `PING`s stay out of view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_does_not_show_nearcache_s_own_connections() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut m = Raw::connect(proxy.port()).await;
    assert_eq!(m.cmd(&["MONITOR"]).await, OK);
    // A client moving to a database no one used opens a pool there; inside
    // a relay, CLIENT ID is answered by a stand-in.
    let mut other = Raw::connect(proxy.port()).await;
    assert_eq!(other.cmd(&["SELECT", "5"]).await, OK);
    assert_eq!(other.cmd(&["SET", "seen", "1"]).await, OK);
    let mut tracker = Raw::connect_resp3(proxy.port()).await;
    assert_eq!(tracker.cmd(&["CLIENT", "TRACKING", "on"]).await, OK);
    assert!(tracker.cmd(&["CLIENT", "ID"]).await.starts_with(b":"));
    assert_eq!(other.cmd(&["SET", "last", "1"]).await, OK);
    let mut lines = Vec::new();
    loop {
        let line = String::from_utf8_lossy(&m.frame().await).into_owned();
        let done = line.contains(r#""SET" "last" "1""#);
        lines.push(line);
        if done {
            break;
        }
    }
    assert!(
        lines.iter().any(|l| l.contains(r#""SET" "seen" "1""#)),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("nearcache")),
        "nearcache's own commands shown: {lines:?}"
    );
}

/// Scripts run on connections of their own: a `SELECT` between two
/// scripts, and plain commands behind them, still land in the database the
/// client chose, pipelined or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_follow_the_client_s_database() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    // (Both runs share one Redis: each starts from the same keys.)
    let script: &[&[&str]] = &[
        &["SELECT", "1"],
        &["DEL", "k"],
        &["SELECT", "0"],
        &["SET", "k", "zero"],
        &["EVAL", "return redis.call('GET', KEYS[1])", "1", "k"],
        &["SELECT", "1"],
        &["EVAL", "return redis.call('GET', KEYS[1])", "1", "k"],
        &["SET", "k", "one"],
        &["EVAL_RO", "return redis.call('GET', KEYS[1])", "1", "k"],
        &["SELECT", "0"],
        &["GET", "k"],
        &["ECHO", "done"],
    ];
    let heard = frames_up_to_done(&redis, &proxy, false, script).await;
    assert_eq!(&heard[0][6][..], b"$-1\r\n", "{:?}", heard[0]);
    // (DEL answers 0 the first time, 1 the second.)
    assert_eq!(heard[1][2..], heard[0][2..], "through nearcache");
}

/// Dedicated connections are kept warm (`min_idle_dedicated`, 2): a client
/// that takes one (MULTI) finds it ready, and the pool opens another in its
/// place, so the next one needs no handshake either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_dedicated_connections_are_kept_warm() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let nearcache_conns = || {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(&mut redis.direct())
            .unwrap();
        list.lines()
            .filter(|l| l.contains(" name=nearcache "))
            .count()
    };
    // Two shared connections, two for scripts and two idle dedicated ones.
    wait_until("the pool to warm up", Duration::from_secs(10), || {
        nearcache_conns() == 6
    });
    let mut c = Raw::connect(proxy.port()).await;
    assert_eq!(c.cmd(&["MULTI"]).await, OK);
    // The taken one is replaced while the transaction holds it.
    wait_until(
        "the idle list to be topped up",
        Duration::from_secs(10),
        || nearcache_conns() == 7,
    );
    assert_eq!(c.cmd(&["DISCARD"]).await, OK);
}

/// `CLIENT REPLY` is nearcache's to apply (it drops the replies; Redis
/// still answers, so writes are acknowledged): every mode change, SKIP
/// meeting another CLIENT REPLY or RESET, errors and nearcache's own replies
/// under it, a transaction and a blocking command skipped — byte for byte
/// as from Redis. Then the hand-over: a relay that starts while replies are
/// off or skipped leaves the dropping to Redis, which still sends pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_modes_answer_as_redis_does() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let script: &[&[&str]] = &[
        &["CLIENT", "REPLY", "maybe"],
        &["CLIENT", "REPLY", "SKIP"],
        &["RESET"],
        &["PING"],
        &["CLIENT", "REPLY", "OFF"],
        &["DEL", "n"],
        &["GET", "k"],
        &["GET"],
        &["NOSUCH"],
        &["CLIENT", "ID"],
        &["CLIENT", "SETNAME", "quiet"],
        &["RESET"],
        &["CLIENT", "GETNAME"],
        &["CLIENT", "REPLY", "SKIP"],
        &["CLIENT", "REPLY", "maybe"],
        &["PING", "a"],
        &["CLIENT", "REPLY", "SKIP"],
        &["CLIENT", "REPLY", "ON"],
        &["PING", "b"],
        &["CLIENT", "REPLY", "SKIP"],
        &["CLIENT", "REPLY", "SKIP"],
        &["PING", "c"],
        &["PING", "d"],
        &["CLIENT", "REPLY", "OFF"],
        &["CLIENT", "REPLY", "SKIP"],
        &["INCR", "n"],
        &["CLIENT", "REPLY", "ON"],
        &["CLIENT", "REPLY", "SKIP"],
        &["MULTI"],
        &["INCR", "n"],
        &["EXEC"],
        &["CLIENT", "REPLY", "SKIP"],
        &["BLPOP", "nolist", "0.05"],
        &["GET", "n"],
        &["CLIENT", "REPLY", "SKIP"],
        &["SELECT", "1"],
        &["SET", "k", "db1"],
        &["GET", "k"],
        &["ECHO", "done"],
    ];
    let heard = frames_up_to_done(&redis, &proxy, false, script).await;
    assert_eq!(heard[0].len(), 15, "Redis: {:?}", heard[0]);
    assert_eq!(heard[1], heard[0], "through nearcache");

    // ON queued in a transaction runs at EXEC: under OFF, Redis drops EXEC's
    // reply up to ON's +OK, and sends the elements after it. A bad mode is a
    // runtime error there, not a reason to abort.
    let script: &[&[&str]] = &[
        &["MULTI"],
        &["CLIENT", "REPLY", "ON"],
        &["EXEC"],
        &["CLIENT", "REPLY", "OFF"],
        &["MULTI"],
        &["CLIENT", "REPLY", "ON"],
        &["SET", "a", "1"],
        &["GET", "a"],
        &["EXEC"],
        &["PING", "x"],
        &["MULTI"],
        &["CLIENT", "REPLY", "FOO"],
        &["SET", "a", "2"],
        &["EXEC"],
        &["ECHO", "done"],
    ];
    let heard = frames_up_to_done(&redis, &proxy, false, script).await;
    assert_eq!(heard[0].len(), 12, "Redis: {:?}", heard[0]);
    assert_eq!(heard[1], heard[0], "through nearcache");

    // In a relay, an error nearcache makes (a redirect to no client) comes
    // in its place among the relay's frames.
    let script: &[&[&str]] = &[
        &["CLIENT", "TRACKING", "on"],
        &["CLIENT", "TRACKING", "on", "REDIRECT", "999999"],
        &["PING", "x"],
        &["ECHO", "done"],
    ];
    let heard = frames_up_to_done(&redis, &proxy, true, script).await;
    assert_eq!(heard[0].len(), 4, "Redis: {:?}", heard[0]);
    assert_eq!(heard[1], heard[0], "through nearcache");

    // RESP3: a subscriber may run anything, and under OFF still gets its
    // pushes (its own PUBLISH's message among them).
    let resp3: &[&[&str]] = &[
        &["CLIENT", "REPLY", "OFF"],
        &["SUBSCRIBE", "ch"],
        &["PUBLISH", "ch", "m"],
        &["CLIENT", "REPLY", "ON"],
        &["CLIENT", "REPLY", "SKIP"],
        &["PSUBSCRIBE", "p*"],
        &["PING", "x"],
        &["UNSUBSCRIBE"],
        &["PUNSUBSCRIBE"],
        &["ECHO", "done"],
    ];
    // RESP2: a subscriber's CLIENT REPLY is refused until it unsubscribes.
    let resp2: &[&[&str]] = &[
        &["CLIENT", "REPLY", "OFF"],
        &["SUBSCRIBE", "ch"],
        &["CLIENT", "REPLY", "ON"],
        &["UNSUBSCRIBE", "ch"],
        &["CLIENT", "REPLY", "ON"],
        &["CLIENT", "REPLY", "SKIP"],
        &["SUBSCRIBE", "ch"],
        &["PING", "x"],
        &["UNSUBSCRIBE"],
        &["ECHO", "done"],
    ];
    for (resp3, script) in [(true, resp3), (false, resp2)] {
        let heard = frames_up_to_done(&redis, &proxy, resp3, script).await;
        assert!(heard[0].len() >= 6, "Redis (RESP3 {resp3}): {:?}", heard[0]);
        assert_eq!(heard[1], heard[0], "through nearcache (RESP3 {resp3})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_off_silences_until_on() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = Raw::connect(proxy.port()).await;

    c.send_str(&["CLIENT", "REPLY", "OFF"]).await;
    c.send_str(&["SET", "silent", "1"]).await;
    c.send_str(&["INCR", "silent"]).await;
    c.send_str(&["CLIENT", "REPLY", "ON"]).await;
    c.send_str(&["GET", "silent"]).await;
    c.send_str(&["PING"]).await;
    // The first reply is ON's: nothing for OFF, SET or INCR.
    assert_eq!(c.frame().await, OK);
    assert_eq!(
        c.frame().await,
        bulk("2").as_bytes()[..],
        "the silenced commands ran"
    );
    assert_eq!(c.frame().await, b"+PONG\r\n"[..]);

    c.send_str(&["CLIENT", "REPLY", "SKIP"]).await;
    c.send_str(&["SET", "skipped", "1"]).await;
    c.send_str(&["GET", "skipped"]).await;
    assert_eq!(
        c.frame().await,
        bulk("1").as_bytes()[..],
        "only the skipped reply is missing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_inside_multi_returns_to_normal() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = Raw::connect(proxy.port()).await;

    assert_eq!(c.cmd(&["SELECT", "4"]).await, OK);
    assert_eq!(c.cmd(&["CLIENT", "SETNAME", "before"]).await, OK);
    assert_eq!(c.cmd(&["MULTI"]).await, OK);
    assert_eq!(c.cmd(&["SET", "rk", "queued"]).await, QUEUED);
    assert_eq!(c.cmd(&["RESET"]).await, b"+RESET\r\n"[..]);
    assert_eq!(
        c.cmd(&["SET", "rk2", "now"]).await,
        OK,
        "not queued any more"
    );
    assert_eq!(c.cmd(&["EXEC"]).await, b"-ERR EXEC without MULTI\r\n"[..]);
    assert_eq!(
        c.cmd(&["CLIENT", "GETNAME"]).await,
        b"$-1\r\n"[..],
        "RESET clears the name"
    );

    let mut d0 = direct_async(&redis, 0).await;
    let mut d4 = direct_async(&redis, 4).await;
    let v: Vec<Option<String>> = q(&mut d0, &["MGET", "rk", "rk2"]).await;
    assert_eq!(v, vec![None, Some("now".into())], "RESET went back to db 0");
    let n: i64 = q(&mut d4, &["DBSIZE"]).await;
    assert_eq!(n, 0, "the queued SET was discarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_inside_subscribe_mode_returns_to_normal() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut d = direct_async(&redis, 0).await;
    let mut c = Raw::connect(proxy.port()).await;

    assert_eq!(
        c.cmd(&["SUBSCRIBE", "rch"]).await,
        array('*', &["subscribe", "rch", ":1"])[..]
    );
    assert_eq!(c.cmd(&["RESET"]).await, b"+RESET\r\n"[..]);
    assert_eq!(
        c.cmd(&["PING"]).await,
        b"+PONG\r\n"[..],
        "no longer in subscribe mode"
    );
    assert_eq!(c.cmd(&["SET", "k", "v"]).await, OK);
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk("v").as_bytes()[..]);
    let r: (String, i64) = q(&mut d, &["PUBSUB", "NUMSUB", "rch"]).await;
    assert_eq!(r.1, 0, "the subscription is gone");
    let receivers: i64 = q(&mut d, &["PUBLISH", "rch", "late"]).await;
    assert_eq!(receivers, 0);
    assert_eq!(
        c.cmd(&["PING"]).await,
        b"+PONG\r\n"[..],
        "no message arrived after RESET"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_answers_ok_and_closes() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = Raw::connect(proxy.port()).await;
    assert_eq!(c.cmd(&["SET", "k", "v"]).await, OK);
    assert_eq!(c.cmd(&["QUIT"]).await, OK);
    c.expect_eof().await;

    // Commands pipelined after QUIT are not run.
    let mut c = Raw::connect(proxy.port()).await;
    c.send_str(&["QUIT"]).await;
    c.send_str(&["SET", "after-quit", "1"]).await;
    assert_eq!(c.frame().await, OK);
    c.expect_eof().await;
    let mut d = direct_async(&redis, 0).await;
    let v: Option<String> = q(&mut d, &["GET", "after-quit"]).await;
    assert_eq!(v, None);
}

// ------------------------------------------- a pipeline keeps Redis's order
//
// Redis runs one connection's commands strictly in order. nearcache spreads a
// client's pipeline over several connections (shared, dedicated, another
// database's), and answers some commands itself, yet the client must not be
// able to tell.

/// Writes `cmds` in one go and reads one reply per command.
async fn pipelined(conn: &mut Raw, cmds: &[&[&str]]) -> Vec<Vec<u8>> {
    conn.write(&encode_pipeline(cmds)).await;
    let mut replies = Vec::with_capacity(cmds.len());
    for _ in cmds {
        replies.push(conn.frame().await.to_vec());
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_behind_exec_run_after_the_transaction() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut p = Raw::connect(proxy.port()).await;
    for n in 1..=20 {
        // EXEC runs on the dedicated connection, GET on the shared one.
        let replies = pipelined(
            &mut p,
            &[&["MULTI"], &["INCR", "tx"], &["EXEC"], &["GET", "tx"]],
        )
        .await;
        assert_eq!(replies[2], format!("*1\r\n:{n}\r\n").into_bytes());
        assert_eq!(replies[3], bulk(&n.to_string()).into_bytes(), "round {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_in_a_pipeline_moves_only_the_commands_after_it() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut p = Raw::connect(proxy.port()).await;
    let replies = pipelined(
        &mut p,
        &[
            &["SET", "before", "0"],
            &["SELECT", "1"],
            &["SET", "after", "1"],
            &["GET", "before"],
        ],
    )
    .await;
    assert_eq!(replies, [OK, OK, OK, b"$-1\r\n"]);
    let mut db0 = direct_async(&redis, 0).await;
    let mut db1 = direct_async(&redis, 1).await;
    let placed: (Option<String>, Option<String>) = (
        q(&mut db0, &["GET", "before"]).await,
        q(&mut db1, &["GET", "after"]).await,
    );
    assert_eq!(placed, (Some("0".into()), Some("1".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_the_proxy_makes_keep_their_place_in_a_pipeline() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut p = Raw::connect(proxy.port()).await;
    let replies = pipelined(
        &mut p,
        &[
            &["SET", "k", "1"],
            &["GET"],
            &["CLIENT", "SETNAME", "me"],
            &["INCR", "k"],
            &["CLIENT", "GETNAME"],
            &["INCR", "k"],
            &["QUIT"],
        ],
    )
    .await;
    assert_eq!(
        replies,
        [
            OK,
            b"-ERR wrong number of arguments for 'get' command\r\n",
            OK,
            b":2\r\n",
            b"$2\r\nme\r\n",
            b":3\r\n",
            OK,
        ]
    );
    p.expect_eof().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_that_selected_another_database_hands_the_session_over_there() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    // Where SELECT inside a pin leaves the client: at once outside a
    // transaction, at EXEC inside one, nowhere if it is discarded.
    let cases: [(&[&[&str]], &str, u32); 3] = [
        (&[&["WATCH", "w"], &["SELECT", "1"], &["UNWATCH"]], "x", 1),
        (&[&["MULTI"], &["SELECT", "1"], &["EXEC"]], "y", 1),
        (&[&["MULTI"], &["SELECT", "1"], &["DISCARD"]], "z", 0),
    ];
    for (pin, key, db) in cases {
        let mut p = Raw::connect(proxy.port()).await;
        let set = ["SET", key, "v"];
        let mut cmds = pin.to_vec();
        cmds.push(&set);
        let replies = pipelined(&mut p, &cmds).await;
        assert!(
            replies.iter().all(|r| !r.starts_with(b"-")),
            "{pin:?}: {replies:?}"
        );
        let mut d = direct_async(&redis, db).await;
        let found: Option<String> = q(&mut d, &["GET", key]).await;
        assert_eq!(
            found.as_deref(),
            Some("v"),
            "{pin:?} then SET {key}: not in db {db}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_behind_a_blocking_command_wait_for_it() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut p = Raw::connect(proxy.port()).await;
    // Redis runs RPUSH only once BLPOP has timed out: BLPOP gets nothing.
    let replies = pipelined(
        &mut p,
        &[&["BLPOP", "q", "0.2"], &["RPUSH", "q", "x"], &["LLEN", "q"]],
    )
    .await;
    assert_eq!(replies, [&b"*-1\r\n"[..], b":1\r\n", b":1\r\n"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_commands_inside_multi_are_queued_and_answered_in_exec() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut p = Raw::connect(proxy.port()).await;
    // As Redis does: queued, then run at EXEC in their place.
    let replies = pipelined(
        &mut p,
        &[
            &["CLIENT", "SETNAME", "a"],
            &["MULTI"],
            &["CLIENT", "SETNAME", "b"],
            &["CLIENT", "GETNAME"],
            &["ECHO", "x"],
            &["EXEC"],
            &["CLIENT", "GETNAME"],
        ],
    )
    .await;
    let exec = b"*3\r\n+OK\r\n$1\r\nb\r\n$1\r\nx\r\n";
    assert_eq!(
        replies,
        [OK, OK, QUEUED, QUEUED, QUEUED, exec, b"$1\r\nb\r\n"]
    );
    // Discarded, they never run.
    let replies = pipelined(
        &mut p,
        &[
            &["MULTI"],
            &["CLIENT", "SETNAME", "c"],
            &["DISCARD"],
            &["CLIENT", "GETNAME"],
        ],
    )
    .await;
    assert_eq!(replies, [OK, QUEUED, OK, b"$1\r\nb\r\n"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_unblock_takes_the_id_client_id_answered() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut d = direct_async(&redis, 0).await;
    let mut a = Raw::connect(proxy.port()).await;
    let mut b = Raw::connect(proxy.port()).await;
    let id = client_id(&mut a).await;

    a.send_str(&["BLPOP", "q", "0"]).await;
    wait_blocked(&mut d, 1).await;
    assert_eq!(b.cmd(&["CLIENT", "UNBLOCK", &id]).await, b":1\r\n"[..]);
    assert_eq!(a.frame().await, b"*-1\r\n"[..], "unblocked as by a timeout");

    a.send_str(&["BRPOP", "q", "0"]).await;
    wait_blocked(&mut d, 1).await;
    assert_eq!(
        b.cmd(&["CLIENT", "UNBLOCK", &id, "ERROR"]).await,
        b":1\r\n"[..]
    );
    assert!(a.frame().await.starts_with(b"-UNBLOCKED"));

    // Not blocked, or no such client: 0, and bad arguments get Redis's own
    // errors, as directly.
    let mut direct = Raw::connect(redis.port()).await;
    for args in [
        &["CLIENT", "UNBLOCK", &id][..],
        &["CLIENT", "UNBLOCK", "987654"],
        &["CLIENT", "UNBLOCK", "x"],
        &["CLIENT", "UNBLOCK", &id, "LATER"],
    ] {
        assert_eq!(b.cmd(args).await, direct.cmd(args).await, "{args:?}");
    }
    assert_eq!(a.cmd(&["PING"]).await, b"+PONG\r\n"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_inside_watch_switches_protocol_and_reports_the_clients_id() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut p = Raw::connect(proxy.port()).await;
    let id = p.cmd(&["CLIENT", "ID"]).await;
    assert_eq!(p.cmd(&["WATCH", "w"]).await, OK);
    // Redis answers on the pinned connection, with its own id for it.
    p.resp3 = true;
    p.send_str(&["HELLO", "3"]).await;
    let hello = p.frame3().await;
    let OwnedFrame::Map { data, .. } = hello else {
        panic!("HELLO 3 inside WATCH: {hello:?}");
    };
    let reported = data.get(&blob("id")).cloned();
    let id: i64 = std::str::from_utf8(&id[1..id.len() - 2])
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        reported,
        Some(OwnedFrame::Number {
            data: id,
            attributes: None
        })
    );
    // The pin's replies are RESP3 now.
    assert_eq!(p.cmd(&["HGETALL", "nosuch"]).await, b"%0\r\n"[..]);
    assert_eq!(p.cmd(&["UNWATCH"]).await, OK);
    assert_eq!(p.cmd(&["HGETALL", "nosuch"]).await, b"%0\r\n"[..]);
}

/// Redis's ids of nearcache's shared upstream connections (named
/// `nearcache`, neither subscribed nor monitoring).
async fn shared_connections(direct: &mut Raw) -> Vec<String> {
    let list = direct.cmd(&["CLIENT", "LIST"]).await;
    String::from_utf8_lossy(&list)
        .lines()
        .filter(|l| l.contains(" name=nearcache ") && l.contains(" flags=N "))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(|id| {
            id.trim_start_matches(|c: char| !c.is_ascii_digit())
                .to_owned()
        })
        .collect()
}

/// Guards `Session::client_kill` and `Directory::kill`: every form of CLIENT
/// KILL closes nearcache's clients — by type (subscribers of either protocol
/// are `pubsub`, a MONITOR is `normal`, as in Redis), address, local address,
/// user — and never the upstream connections they share (Redis's view, where
/// `TYPE normal` would fail every client's requests in flight). Counts,
/// replies and errors as Redis gives them; inside MULTI it is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_filters_close_nearcache_clients_never_shared_connections() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut direct = Raw::connect(redis.port()).await;
    let mut a = Raw::connect(proxy.port()).await;
    let mut s2 = Raw::connect(proxy.port()).await;
    let mut s3 = Raw::connect_resp3(proxy.port()).await;
    let mut m = Raw::connect(proxy.port()).await;
    let mut b = Raw::connect(proxy.port()).await;
    assert_eq!(a.cmd(&["GET", "k"]).await, b"$-1\r\n"[..]);
    assert_eq!(b.cmd(&["GET", "k"]).await, b"$-1\r\n"[..]);
    assert!(s2.cmd(&["SUBSCRIBE", "ch"]).await.starts_with(b"*3"));
    assert!(s3.cmd(&["SUBSCRIBE", "ch"]).await.starts_with(b">3"));
    assert_eq!(m.cmd(&["MONITOR"]).await, OK);
    let shared = shared_connections(&mut direct).await;
    assert!(!shared.is_empty(), "no shared connection in Redis's list");

    assert_eq!(
        b.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await,
        b":2\r\n"[..]
    );
    s2.expect_eof().await;
    s3.expect_eof().await;
    let a_addr = a.local_addr();
    assert_eq!(
        b.cmd(&["CLIENT", "KILL", "ADDR", &a_addr]).await,
        b":1\r\n"[..]
    );
    a.expect_eof().await;
    // The caller is spared (SKIPME yes is the default); the monitor is not.
    assert_eq!(
        b.cmd(&["CLIENT", "KILL", "TYPE", "normal"]).await,
        b":1\r\n"[..]
    );
    m.expect_eof().await;
    for t in ["master", "replica", "slave"] {
        assert_eq!(
            b.cmd(&["CLIENT", "KILL", "TYPE", t]).await,
            b":0\r\n"[..],
            "{t}"
        );
    }
    assert_eq!(
        b.cmd(&["CLIENT", "KILL", "USER", "default"]).await,
        b":0\r\n"[..],
        "every client is the default user, and only the caller is left"
    );
    // The old form: +OK, or Redis's error when no client has the address.
    let mut c = Raw::connect(proxy.port()).await;
    assert_eq!(c.cmd(&["PING"]).await, b"+PONG\r\n"[..]);
    assert_eq!(b.cmd(&["CLIENT", "KILL", &c.local_addr()]).await, OK);
    c.expect_eof().await;
    // Inside MULTI it is queued and runs at EXEC.
    let mut d = Raw::connect(proxy.port()).await;
    let d_id = client_id(&mut d).await;
    assert_eq!(b.cmd(&["MULTI"]).await, OK);
    assert_eq!(
        b.cmd(&["CLIENT", "KILL", "ID", &d_id]).await,
        b"+QUEUED\r\n"[..]
    );
    assert_eq!(d.cmd(&["PING"]).await, b"+PONG\r\n"[..], "not before EXEC");
    assert_eq!(b.cmd(&["EXEC"]).await, b"*1\r\n:1\r\n"[..]);
    d.expect_eof().await;
    for args in [
        &["CLIENT", "KILL", "1.2.3.4:5"][..],
        &["CLIENT", "KILL", "TYPE", "nosuch"],
        &["CLIENT", "KILL", "TYPE", "nosuch", "ADDR"],
        &["CLIENT", "KILL", "ADDR", "x", "TYPE"],
        &["CLIENT", "KILL", "USER", "nosuch"],
        &["CLIENT", "KILL", "FOO", "bar"],
        &["CLIENT", "KILL", "TYPE"],
        &["CLIENT", "KILL", "ADDR", "1.2.3.4:5", "SKIPME", "no"],
    ] {
        assert_eq!(b.cmd(args).await, direct.cmd(args).await, "{args:?}");
    }

    let after = shared_connections(&mut direct).await;
    for id in &shared {
        assert!(
            after.contains(id),
            "shared connection {id} was closed: {after:?}"
        );
    }
    // Killing itself (by nearcache's local address): the reply, then EOF.
    let laddr = format!("127.0.0.1:{}", proxy.port());
    assert_eq!(
        b.cmd(&["CLIENT", "KILL", "LADDR", &laddr, "SKIPME", "no"])
            .await,
        b":1\r\n"[..]
    );
    b.expect_eof().await;
}

/// Guards `Route::ClientNoEvict`: answered as Redis answers it, and the flag
/// never lands on a connection other clients share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_no_evict_is_answered_without_flagging_a_shared_connection() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut direct = Raw::connect(redis.port()).await;
    let mut p = Raw::connect(proxy.port()).await;
    for args in [
        &["CLIENT", "NO-EVICT", "on"][..],
        &["CLIENT", "NO-EVICT", "OFF"],
        &["CLIENT", "NO-EVICT", "maybe"],
        &["CLIENT", "NO-EVICT"],
    ] {
        assert_eq!(p.cmd(args).await, direct.cmd(args).await, "{args:?}");
    }
    assert_eq!(p.cmd(&["CLIENT", "NO-EVICT", "on"]).await, OK);
    assert_eq!(p.cmd(&["MULTI"]).await, OK);
    assert_eq!(
        p.cmd(&["CLIENT", "NO-EVICT", "on"]).await,
        b"+QUEUED\r\n"[..]
    );
    assert_eq!(p.cmd(&["EXEC"]).await, b"*1\r\n+OK\r\n"[..]);
    let list = direct.cmd(&["CLIENT", "LIST"]).await;
    let flagged: Vec<&str> = std::str::from_utf8(&list)
        .unwrap()
        .lines()
        .filter(|l| {
            l.contains(" name=nearcache ")
                && l.split(' ')
                    .any(|f| f.starts_with("flags=") && f.contains('e'))
        })
        .collect();
    assert!(
        flagged.is_empty(),
        "no-evict on an upstream connection: {flagged:?}"
    );
}

/// Pipelines `script` (which ends with `ECHO done`) on a fresh connection to
/// Redis and to nearcache (RESP3 when `resp3`), and returns each side's
/// frames up to `done`.
async fn frames_up_to_done(
    redis: &RedisServer,
    proxy: &TestProxy,
    resp3: bool,
    script: &[&[&str]],
) -> [Vec<Bytes>; 2] {
    let pipeline = encode_pipeline(script);
    let mut heard = [Vec::new(), Vec::new()];
    for (side, port) in [redis.port(), proxy.port()].into_iter().enumerate() {
        let mut c = if resp3 {
            Raw::connect_resp3(port).await
        } else {
            Raw::connect(port).await
        };
        c.write(&pipeline).await;
        loop {
            let f = c.frame().await;
            let last = f[..] == b"$4\r\ndone\r\n"[..];
            heard[side].push(f);
            if last {
                break;
            }
        }
    }
    heard
}

/// Guards the reply mode in relays: after `CLIENT REPLY OFF` (or for the
/// command after `SKIP`) Redis sends nothing, not even errors, and the
/// replies nearcache makes itself (CLIENT ID, GETNAME, wrong arity) must be
/// silent too — else a client that turns replies back on reads them first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_off_and_skip_silence_the_replies_nearcache_makes_too() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let script: &[&[&str]] = &[
        &["CLIENT", "REPLY", "SKIP"],
        &["CLIENT", "ID"],
        &["PING"],
        &["CLIENT", "REPLY", "OFF"],
        &["CLIENT", "ID"],
        &["GET"],
        &["CLIENT", "GETNAME"],
        &["SET", "k", "v"],
        &["CLIENT", "REPLY", "ON"],
        &["CLIENT", "REPLY", "SKIP"],
        &["GET"],
        &["ECHO", "done"],
    ];
    let heard = frames_up_to_done(&redis, &proxy, false, script).await;
    assert_eq!(
        heard[0].len(),
        3,
        "Redis: +PONG, +OK, $4 done: {:?}",
        heard[0]
    );
    assert_eq!(heard[1], heard[0], "through nearcache");
}

/// Guards `Op::Inject`'s stand-ins: in a relay, a reply nearcache makes
/// itself (CLIENT GETNAME, a wrong-arity error) takes its place among
/// Redis's replies to the commands pipelined before and after it, instead of
/// jumping ahead of replies still on their way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_nearcache_makes_keep_their_place_in_a_relay() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let script: &[&[&str]] = &[
        &["SUBSCRIBE", "ch"],
        &["PING"],
        &["CLIENT", "GETNAME"],
        &["GET"],
        &["PING", "x"],
        &["CLIENT", "GETNAME"],
        &["ECHO", "done"],
    ];
    let heard = frames_up_to_done(&redis, &proxy, true, script).await;
    assert_eq!(heard[0].len(), 7, "Redis: {:?}", heard[0]);
    assert_eq!(heard[1], heard[0], "through nearcache");
}

/// The id `CLIENT ID` gives the client on `c`.
async fn client_id(c: &mut Raw) -> String {
    let reply = c.cmd(&["CLIENT", "ID"]).await;
    let id = std::str::from_utf8(&reply[1..reply.len() - 2]).unwrap();
    assert!(reply.starts_with(b":"), "{reply:?}");
    id.to_owned()
}

/// The text of a bulk or verbatim reply, as lines of `key=value` fields.
fn client_lines(reply: &[u8]) -> Vec<Vec<(String, String)>> {
    let text = std::str::from_utf8(reply).unwrap();
    let (header, body) = text.split_once("\r\n").unwrap();
    assert!(header.starts_with('$') || header.starts_with('='), "{text}");
    let body = body.strip_suffix("\r\n").unwrap();
    let body = body.strip_prefix("txt:").unwrap_or(body);
    body.lines()
        .map(|line| {
            line.split(' ')
                .map(|f| {
                    let (k, v) = f.split_once('=').unwrap();
                    (k.to_owned(), v.to_owned())
                })
                .collect()
        })
        .collect()
}

/// `CLIENT LIST` and `CLIENT INFO` show nearcache's clients — the ids
/// `CLIENT ID` gives and `CLIENT KILL` takes, the addresses they connect
/// from, their names and databases — in Redis's format; a client pinned to
/// a dedicated connection shows Redis's state of it (flags, subscriptions,
/// queued commands).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_list_and_info_show_nearcache_clients() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut a = Raw::connect(proxy.port()).await;
    a.cmd(&["CLIENT", "SETNAME", "bot"]).await;
    a.cmd(&["SELECT", "2"]).await;
    let a_id = client_id(&mut a).await;
    let info = client_lines(&a.cmd(&["CLIENT", "INFO"]).await);
    let mut direct = Raw::connect(redis.port()).await;
    let theirs = client_lines(&direct.cmd(&["CLIENT", "INFO"]).await);
    let keys = |line: &[(String, String)]| line.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(
        keys(&info[0]),
        keys(&theirs[0]),
        "Redis's fields, in Redis's order"
    );
    let me = &info[0];
    assert_eq!(field(me, "id"), a_id);
    assert_eq!(field(me, "addr"), a.local_addr());
    assert_eq!(field(me, "laddr"), format!("127.0.0.1:{}", proxy.port()));
    assert_eq!(field(me, "name"), "bot");
    assert_eq!(field(me, "db"), "2");
    assert_eq!(field(me, "flags"), "N");
    assert_eq!(field(me, "cmd"), "client|info");
    assert_eq!(a.cmd(&["CLIENT", "NO-EVICT", "on"]).await, b"+OK\r\n"[..]);

    // A RESP3 subscriber and a client in a transaction are pinned.
    let mut s = Raw::connect_resp3(proxy.port()).await;
    let s_id = client_id(&mut s).await;
    s.send_str(&["SUBSCRIBE", "x", "y"]).await;
    s.send_str(&["PSUBSCRIBE", "p*"]).await;
    for _ in 0..3 {
        assert!(s.frame().await.starts_with(b">3"));
    }
    let mut t = Raw::connect(proxy.port()).await;
    let t_id = client_id(&mut t).await;
    t.cmd(&["MULTI"]).await;
    t.cmd(&["SET", "k", "v"]).await;

    let mut b = Raw::connect(proxy.port()).await;
    let b_id = client_id(&mut b).await;
    let all = client_lines(&b.cmd(&["CLIENT", "LIST"]).await);
    let ids: Vec<&str> = all.iter().map(|l| field(l, "id")).collect();
    assert_eq!(ids, [&a_id, &s_id, &t_id, &b_id], "every client, by id");
    assert_eq!(
        field(&all[0], "flags"),
        "e",
        "NO-EVICT, which Redis never sees"
    );
    assert_eq!(field(&all[0], "cmd"), "client|no-evict");
    let sub = &all[1];
    assert_eq!(field(sub, "flags"), "P");
    assert_eq!((field(sub, "sub"), field(sub, "psub")), ("2", "1"));
    assert_eq!(field(sub, "resp"), "3");
    assert_eq!(field(sub, "addr"), s.local_addr());
    assert_eq!(
        (field(&all[2], "flags"), field(&all[2], "multi")),
        ("x", "1")
    );
    assert_eq!(field(&all[3], "cmd"), "client|list");

    let pubsub = client_lines(&b.cmd(&["CLIENT", "LIST", "TYPE", "pubsub"]).await);
    assert_eq!(
        pubsub.iter().map(|l| field(l, "id")).collect::<Vec<_>>(),
        [&s_id]
    );
    let normal = client_lines(&b.cmd(&["CLIENT", "LIST", "TYPE", "normal"]).await);
    assert_eq!(normal.len(), 3);
    let picked = client_lines(
        &b.cmd(&["CLIENT", "LIST", "ID", &t_id, "999999", &a_id])
            .await,
    );
    let picked: Vec<&str> = picked.iter().map(|l| field(l, "id")).collect();
    assert_eq!(picked, [&t_id, &a_id], "in the order asked");
    // A subscriber asks too (RESP3: a verbatim string).
    let own = s.cmd(&["CLIENT", "INFO"]).await;
    assert!(own.starts_with(b"="), "{own:?}");
    assert_eq!(field(&client_lines(&own)[0], "id"), s_id);

    // Bad arguments get Redis's errors.
    for args in [
        &["CLIENT", "LIST", "TYPE", "x"][..],
        &["CLIENT", "LIST", "ID", "1", "x"],
        &["CLIENT", "LIST", "ID"],
        &["CLIENT", "LIST", "TYPE", "normal", "ID", "1"],
        &["CLIENT", "INFO", "x"],
    ] {
        assert_eq!(b.cmd(args).await, direct.cmd(args).await, "{args:?}");
    }
    // A killed client is gone from the list.
    assert_eq!(b.cmd(&["CLIENT", "KILL", "ID", &a_id]).await, b":1\r\n"[..]);
    a.expect_eof().await;
    let all = client_lines(&b.cmd(&["CLIENT", "LIST"]).await);
    assert!(all.iter().all(|l| field(l, "id") != a_id));
}

/// A RESP2 subscriber may only (un)subscribe, PING, QUIT and RESET: Redis
/// refuses the rest, including what nearcache answers itself, until the
/// client has unsubscribed from everything. (A refused CLIENT SETNAME or
/// KILL must not take effect either.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp2_subscriber_is_refused_what_redis_refuses_it() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let script: &[&[&str]] = &[
        &["SUBSCRIBE", "ch"],
        &["CLIENT", "ID"],
        &["CLIENT", "GETNAME"],
        &["AUTH", "x"],
        &["GET"],
        &["CLIENT", "NO-EVICT", "on"],
        &["CLIENT", "SETNAME", "refused"],
        &["HELLO", "3"],
        &["CLIENT", "KILL", "TYPE", "pubsub", "SKIPME", "no"],
        &["UNSUBSCRIBE", "ch"],
        &["CLIENT", "GETNAME"],
        &["AUTH", "x"],
        &["CLIENT", "NO-EVICT", "on"],
        &["ECHO", "done"],
    ];
    let heard = frames_up_to_done(&redis, &proxy, false, script).await;
    assert_eq!(heard[0].len(), 14, "Redis: {:?}", heard[0]);
    assert!(heard[0][1].starts_with(b"-ERR Can't execute 'client|id'"));
    assert_eq!(heard[1], heard[0], "through nearcache");
}

/// A RESP2 subscriber that has left every channel may run anything again, as
/// in Redis: the counts in Redis's own (un)subscribe replies lift what
/// nearcache refuses a subscriber (`CLIENT SETNAME`, `HELLO`, `CLIENT KILL`),
/// so a connection can be reused after unsubscribing — say, switched to RESP3
/// by a client-side caching set-up. Each command waits for its replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_left_every_channel_may_run_anything_again() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let steps: &[(&[&str], usize)] = &[
        (&["SUBSCRIBE", "a", "b"], 2),
        (&["PSUBSCRIBE", "p*"], 1),
        (&["UNSUBSCRIBE"], 2),
        // Still on a pattern: refused.
        (&["CLIENT", "SETNAME", "early"], 1),
        (&["PUNSUBSCRIBE"], 1),
        (&["CLIENT", "SETNAME", "later"], 1),
        (&["CLIENT", "GETNAME"], 1),
        (&["CLIENT", "KILL", "TYPE", "pubsub", "SKIPME", "no"], 1),
    ];
    let mut heard = [Vec::new(), Vec::new()];
    for (side, port) in [redis.port(), proxy.port()].into_iter().enumerate() {
        let mut c = Raw::connect(port).await;
        for (cmd, replies) in steps {
            c.send_str(cmd).await;
            for _ in 0..*replies {
                heard[side].push(c.frame().await);
            }
        }
        c.resp3 = true;
        let hello = c.cmd(&["HELLO", "3"]).await;
        assert!(
            hello.starts_with(b"%"),
            "HELLO 3 after unsubscribing: {hello:?}"
        );
        heard[side].push(c.cmd(&["PING"]).await);
    }
    assert!(
        heard[0][5].starts_with(b"-ERR Can't execute 'client|setname'"),
        "{:?}",
        heard[0]
    );
    assert_eq!(&heard[0][8][..], b"$5\r\nlater\r\n");
    assert_eq!(heard[1], heard[0], "through nearcache");
}

/// Guards `Op::Ack`'s counting: while a script keeps Redis busy, a relayed
/// client's write is refused with `-BUSY`, and that refusal is all it gets —
/// nothing nearcache sends to learn when its writes are done may draw a
/// reply of its own (an extra `-BUSY` would put every later reply one off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_redis_answers_a_relayed_client_as_it_would_directly() {
    let redis = RedisServer::start_with(&["--busy-reply-threshold", "50"]);
    let mut cfg = config_for(&redis);
    cfg.cache.rules = vec![nearcache::config::RuleConfig::caching(
        "",
        Duration::from_secs(60),
    )];
    let proxy = TestProxy::start_with(cfg).await;
    let mut heard = Vec::new();
    for port in [redis.port(), proxy.port()] {
        let mut c = Raw::connect_resp3(port).await;
        assert_eq!(c.cmd(&["CLIENT", "TRACKING", "on"]).await, OK);
        // Busy for 400 ms, on a connection of its own.
        let mut script = Raw::connect(redis.port()).await;
        script
            .send_str(&[
                "EVAL",
                "local t = redis.call('TIME') \
                 local stop = t[1] * 1000000 + t[2] + 400000 \
                 repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] > stop",
                "0",
            ])
            .await;
        let mut probe = Raw::connect(redis.port()).await;
        while !probe.cmd(&["PING"]).await.starts_with(b"-BUSY") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.send_str(&["SET", "busy", "1"]).await;
        let refused = c.frame().await;
        assert!(refused.starts_with(b"-BUSY"), "{refused:?}");
        assert_eq!(script.frame().await, b"$-1\r\n"[..], "the script ends");
        heard.push(refused);
        let mut after = Vec::new();
        c.send_str(&["PING", "after"]).await;
        loop {
            let f = c.frame().await;
            let done = f[..] == b"$5\r\nafter\r\n"[..];
            after.push(f);
            if done {
                break;
            }
        }
        heard.push(Bytes::from(after.concat()));
    }
    assert_eq!(heard[2..], heard[..2], "through nearcache, as from Redis");
}

/// Guards `exec_local` when the transaction did not run (a WATCH fired):
/// EXEC answers the null array, the commands nearcache queued itself do not
/// run, and the client goes on (the slot was answered, not left spent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_exec_with_queued_local_commands_answers_null_and_goes_on() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = Raw::connect(proxy.port()).await;
    let mut other = Raw::connect(proxy.port()).await;
    assert_eq!(c.cmd(&["WATCH", "w"]).await, OK);
    assert_eq!(c.cmd(&["MULTI"]).await, OK);
    assert_eq!(
        c.cmd(&["CLIENT", "SETNAME", "never"]).await,
        b"+QUEUED\r\n"[..]
    );
    assert_eq!(c.cmd(&["SET", "w", "mine"]).await, b"+QUEUED\r\n"[..]);
    assert_eq!(other.cmd(&["SET", "w", "theirs"]).await, OK);
    assert_eq!(c.cmd(&["EXEC"]).await, b"*-1\r\n"[..]);
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, b"$-1\r\n"[..]);
    assert_eq!(c.cmd(&["GET", "w"]).await, bulk("theirs").as_bytes()[..]);
}

/// Guards `Session::refuse_in_multi`: inside a transaction, commands after
/// which replies would stop pairing with commands are refused, and the
/// transaction fails at EXEC as Redis fails one with a command refused while
/// queuing; the client goes on as before, replies and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaying_commands_inside_multi_are_refused_and_abort_it() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut c = Raw::connect(proxy.port()).await;
    for cmd in [
        &["SUBSCRIBE", "ch"][..],
        &["CLIENT", "TRACKING", "on"],
        &["CLIENT", "REPLY", "OFF"],
        &["CLIENT", "REPLY", "SKIP"],
        &["MONITOR"],
    ] {
        assert_eq!(c.cmd(&["MULTI"]).await, OK);
        let refused = c.cmd(cmd).await;
        assert!(
            refused.starts_with(b"-ERR '")
                && refused.ends_with(b"inside MULTI is not supported by nearcache\r\n"),
            "{cmd:?}: {refused:?}"
        );
        assert_eq!(c.cmd(&["SET", "aborted", "1"]).await, b"+QUEUED\r\n"[..]);
        let exec = c.cmd(&["EXEC"]).await;
        assert!(exec.starts_with(b"-EXECABORT"), "{cmd:?}: {exec:?}");
        assert_eq!(c.cmd(&["GET", "aborted"]).await, b"$-1\r\n"[..], "{cmd:?}");
    }
    assert_eq!(c.cmd(&["PING", "still"]).await, b"$5\r\nstill\r\n"[..]);
}

/// A relayed client's transaction: what nearcache answers itself is queued
/// like the rest and answered in its place in EXEC's reply; a wrong arity
/// aborts the transaction, as in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_transaction_answers_as_redis_does() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let script: &[&[&str]] = &[
        &["SUBSCRIBE", "ch"],
        &["MULTI"],
        &["CLIENT", "GETNAME"],
        &["SET", "k", "v"],
        &["GET"],
        &["EXEC"],
        &["MULTI"],
        &["CLIENT", "GETNAME"],
        &["CLIENT", "NO-EVICT", "on"],
        &["GET", "k"],
        &["EXEC"],
        &["ECHO", "done"],
    ];
    let heard = frames_up_to_done(&redis, &proxy, true, script).await;
    assert_eq!(heard[0].len(), 12, "Redis: {:?}", heard[0]);
    assert_eq!(heard[1], heard[0], "through nearcache");
}

/// A subscriber (its commands relayed) may kill itself too: the reply comes
/// through, then the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_killing_itself_gets_its_reply_then_eof() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut s = Raw::connect_resp3(proxy.port()).await;
    assert!(s.cmd(&["SUBSCRIBE", "ch"]).await.starts_with(b">3"));
    assert_eq!(
        s.cmd(&["CLIENT", "KILL", "TYPE", "pubsub", "SKIPME", "no"])
            .await,
        b":1\r\n"[..]
    );
    s.expect_eof().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_id_closes_the_client_client_id_named() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut a = Raw::connect(proxy.port()).await;
    let mut b = Raw::connect(proxy.port()).await;
    let a_id = client_id(&mut a).await;
    let b_id = client_id(&mut b).await;

    assert_eq!(b.cmd(&["CLIENT", "KILL", "ID", &a_id]).await, b":1\r\n"[..]);
    a.expect_eof().await;
    assert_eq!(b.cmd(&["CLIENT", "KILL", "ID", &a_id]).await, b":0\r\n"[..]);
    // The caller is spared unless it says otherwise.
    assert_eq!(b.cmd(&["CLIENT", "KILL", "ID", &b_id]).await, b":0\r\n"[..]);
    // Bad values get Redis's own errors.
    let mut direct = Raw::connect(redis.port()).await;
    for args in [
        &["CLIENT", "KILL", "ID", "x"][..],
        &["CLIENT", "KILL", "ID", "0"],
        &["CLIENT", "KILL", "ID", "5", "SKIPME", "maybe"],
    ] {
        assert_eq!(b.cmd(args).await, direct.cmd(args).await, "{args:?}");
    }
    assert_eq!(
        b.cmd(&["CLIENT", "KILL", "ID", &b_id, "SKIPME", "no"])
            .await,
        b":1\r\n"[..]
    );
    b.expect_eof().await;
}
