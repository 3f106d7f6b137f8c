//! The harness itself works: a proxy in front of a real server forwards.

use crate::support::{RedisServer, TestProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forwards_to_the_real_server() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let mut conn = proxy.conn().await;
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    let v: String = redis::cmd("GET")
        .arg("k")
        .query(&mut redis.direct())
        .unwrap();
    assert_eq!(v, "v");
    proxy.shutdown().await;
}
