//! Redis's own ACL users through nearcache (`server.auth = "redis"`): Redis
//! judges each `AUTH`, and the client's commands run on connections
//! authenticated as its user, so `-NOPERM`, key patterns and `ACL WHOAMI`
//! are Redis's — byte for byte as directly; L1 keeps each user's replies
//! apart.

use std::time::Duration;

use bytes::Bytes;
use nearcache::config::{AuthMode, RuleConfig};

use crate::compat::Raw;
use crate::support::{RedisServer, TestProxy, config_for};

/// alice may read `ticker:*` only; bob may read and write everything.
fn redis_with_users() -> RedisServer {
    let redis = RedisServer::start();
    let mut c = redis.direct();
    for rule in [
        &[
            "SETUSER",
            "alice",
            "on",
            ">alice-pw",
            "~ticker:*",
            "+@read",
            "+@connection",
            "+ping",
            "+acl|whoami",
        ][..],
        &["SETUSER", "bob", "on", ">bob-pw", "~*", "+@all"],
    ] {
        let _: () = redis::cmd("ACL").arg(rule).query(&mut c).unwrap();
    }
    let _: () = redis::cmd("SET")
        .arg("ticker:btc")
        .arg("97000")
        .query(&mut c)
        .unwrap();
    redis
}

async fn redis_auth_proxy(redis: &RedisServer) -> TestProxy {
    let mut cfg = config_for(redis);
    cfg.server.auth = AuthMode::Redis;
    cfg.cache.rules = vec![RuleConfig::caching("ticker:", Duration::from_secs(60))];
    TestProxy::start_with(cfg).await
}

/// What a client sees of Redis's users through `port`.
async fn as_users(port: u16) -> Vec<Bytes> {
    let mut seen = Vec::new();
    let mut c = Raw::connect(port).await;
    for cmd in [
        &["AUTH", "just-a-password"][..],
        &["AUTH", "alice", "wrong"],
        &["AUTH", "nobody", "x"],
        &["AUTH", "alice", "alice-pw"],
        &["ACL", "WHOAMI"],
        &["GET", "ticker:btc"],
        &["GET", "ticker:btc"],
        &["SET", "ticker:btc", "1"],
        &["GET", "orders:1"],
        &["AUTH", "bob", "bob-pw"],
        &["ACL", "WHOAMI"],
        &["SET", "orders:1", "x"],
        &["GET", "orders:1"],
        &["GET", "ticker:btc"],
    ] {
        seen.push(c.cmd(cmd).await);
    }
    let mut hello = Raw::connect(port).await;
    let reply = hello.cmd(&["HELLO", "2", "AUTH", "alice", "wrong"]).await;
    seen.push(reply);
    let reply = hello
        .cmd(&["HELLO", "2", "AUTH", "alice", "alice-pw"])
        .await;
    assert!(reply.starts_with(b"*14\r\n"), "HELLO as alice: {reply:?}");
    seen.push(hello.cmd(&["ACL", "WHOAMI"]).await);
    seen.push(hello.cmd(&["DEL", "orders:1"]).await);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_decides_on_its_own_users_as_it_would_directly() {
    let redis = redis_with_users();
    let direct = as_users(redis.port()).await;
    assert!(
        direct[0].starts_with(b"-ERR AUTH <password> called without"),
        "{direct:?}"
    );
    assert!(direct[1].starts_with(b"-WRONGPASS"), "{direct:?}");
    assert_eq!(&direct[4][..], b"$5\r\nalice\r\n");
    assert!(direct[7].starts_with(b"-NOPERM"), "{direct:?}");
    let _: () = redis::cmd("DEL")
        .arg("orders:1")
        .query(&mut redis.direct())
        .unwrap();
    let proxy = redis_auth_proxy(&redis).await;
    let proxied = as_users(proxy.port()).await;
    assert_eq!(proxied, direct);
    proxy.shutdown().await;
}

/// L1 serves a user only what was filled for that user: bob's cached reply
/// is not alice's, and each user's second read is a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_has_its_own_l1() {
    let redis = redis_with_users();
    let proxy = redis_auth_proxy(&redis).await;
    let read_as = |user: &'static str, pw: &'static str| {
        let port = proxy.port();
        async move {
            let mut c = Raw::connect(port).await;
            assert_eq!(&c.cmd(&["AUTH", user, pw]).await[..], b"+OK\r\n");
            c.cmd(&["GET", "ticker:btc"]).await
        }
    };
    redis.reset_stats();
    assert_eq!(&read_as("bob", "bob-pw").await[..], b"$5\r\n97000\r\n");
    assert_eq!(&read_as("bob", "bob-pw").await[..], b"$5\r\n97000\r\n");
    assert_eq!(redis.calls("get"), 1, "bob's second read is an L1 hit");
    assert_eq!(&read_as("alice", "alice-pw").await[..], b"$5\r\n97000\r\n");
    assert_eq!(redis.calls("get"), 2, "alice does not get bob's entry");
    assert_eq!(&read_as("alice", "alice-pw").await[..], b"$5\r\n97000\r\n");
    assert_eq!(redis.calls("get"), 2, "alice's second read is an L1 hit");
    // A write by either drops the key for both.
    let mut bob = Raw::connect(proxy.port()).await;
    assert_eq!(&bob.cmd(&["AUTH", "bob", "bob-pw"]).await[..], b"+OK\r\n");
    assert_eq!(
        &bob.cmd(&["SET", "ticker:btc", "98000"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(&read_as("alice", "alice-pw").await[..], b"$5\r\n98000\r\n");
    proxy.shutdown().await;
}

/// `CLIENT LIST` names each client's user, and `CLIENT KILL USER` closes
/// that user's clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_list_and_kill_know_redis_s_users() {
    let redis = redis_with_users();
    let proxy = redis_auth_proxy(&redis).await;
    let mut alice = Raw::connect(proxy.port()).await;
    assert_eq!(
        &alice.cmd(&["AUTH", "alice", "alice-pw"]).await[..],
        b"+OK\r\n"
    );
    let mut bob = Raw::connect(proxy.port()).await;
    assert_eq!(&bob.cmd(&["AUTH", "bob", "bob-pw"]).await[..], b"+OK\r\n");
    let info = bob.cmd(&["CLIENT", "INFO"]).await;
    assert!(
        String::from_utf8_lossy(&info).contains(" user=bob "),
        "{info:?}"
    );
    let list = String::from_utf8_lossy(&bob.cmd(&["CLIENT", "LIST"]).await).into_owned();
    assert_eq!(list.matches(" user=alice ").count(), 1, "{list}");
    assert!(
        bob.cmd(&["CLIENT", "KILL", "USER", "nobody"])
            .await
            .starts_with(b"-ERR No such user 'nobody'")
    );
    assert_eq!(
        &bob.cmd(&["CLIENT", "KILL", "USER", "alice"]).await[..],
        b":1\r\n"
    );
    // alice's client was killed.
    alice.expect_eof().await;
    proxy.shutdown().await;
}
