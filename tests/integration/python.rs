//! redis-py, the client most Python trading bots use, through the proxy:
//! `tests/python/redis_py_compat.py` runs its checks (pipelines, MULTI with
//! WATCH conflicts, scripts, pub/sub, blocking pops, RESP3, SELECT) and exits
//! non-zero on the first failure. `scripts/test.sh` installs redis-py.

use std::process::Command;

use crate::support::{RedisServer, TestProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_works_unchanged_through_the_proxy() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/redis_py_compat.py"
    );
    let (proxy_port, redis_port) = (proxy.port(), redis.port());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(proxy_port.to_string())
            .arg(redis_port.to_string())
            .output()
            .expect("python3 (install it, and redis-py: pip install redis)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "redis-py checks failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    proxy.shutdown().await;
}
