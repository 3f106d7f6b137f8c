//! The log check of `support/` itself: a proxy's WARN/ERROR lines are
//! captured from every task it spawns, kept apart from other proxies', and a
//! line no test declared (or a required one that never came) fails the test.

use std::time::Duration;

use crate::support::{
    ProxyProcess, RedisServer, TestProxy, UPSTREAM_CONNECT_FAILED as CONNECT_FAILED,
    UPSTREAM_LOST as LOST, wait_until,
};
const LIMIT: Duration = Duration::from_secs(10);

/// One command through the proxy to Redis: the pool's connections are up.
async fn through(proxy: &TestProxy) {
    let _: Option<String> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut proxy.conn().await)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_from_a_spawned_task_lands_in_its_own_proxy_s_log() {
    let mut redis = RedisServer::start();
    let other_redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let other = TestProxy::start(&other_redis).await;
    proxy.must_log(LOST).expect_log(CONNECT_FAILED);
    through(&proxy).await;

    // The pool's supervisor task notices, on the proxy's runtime.
    redis.kill();
    proxy.wait_for_log(LOST, LIMIT).await;

    assert_eq!(other.log().matches("nearcache listening").count(), 1);
    assert!(
        !other.log().contains(LOST),
        "another proxy's warning leaked into this one's log:\n{}",
        other.log()
    );
    assert_eq!(proxy.log().matches("nearcache listening").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "WARN/ERROR line(s) the test did not expect")]
async fn an_undeclared_warning_fails_the_test() {
    let mut redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    proxy.expect_log(CONNECT_FAILED);
    through(&proxy).await;
    redis.kill();
    // (The WARN itself: another slot's DEBUG line of the same loss may come
    // first.)
    proxy.wait_for_log(&format!("WARN…{LOST}"), LIMIT).await;
    // Dropping the proxy fails the test.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "never logged a line the test requires")]
async fn a_required_line_that_never_came_fails_the_test() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    proxy.must_log(LOST);
    proxy.shutdown().await;
}

#[test]
fn the_binary_s_log_is_checked_too() {
    let mut redis = RedisServer::start();
    let proxy = ProxyProcess::start(&redis, &[]);
    proxy.must_log(LOST).expect_log(CONNECT_FAILED);
    let _: Option<String> = redis::cmd("GET")
        .arg("k")
        .query(&mut redis::Client::open(proxy.url()).unwrap())
        .unwrap();
    redis.kill();
    wait_until("the binary to log the lost connection", LIMIT, || {
        proxy.log().contains(LOST)
    });
}
