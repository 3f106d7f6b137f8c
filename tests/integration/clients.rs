//! Real client libraries through the proxy, each driven by a script of its
//! own language that runs its checks and exits non-zero on the first failure:
//!
//! - redis-py, the client most Python trading bots use:
//!   `tests/python/redis_py_compat.py` (pipelines, MULTI with WATCH
//!   conflicts, scripts, pub/sub, blocking pops, RESP3, SELECT), and with
//!   `store_compressed`: `tests/python/redis_py_compressed.py`;
//! - ioredis, the Node.js one: `tests/node/ioredis_compat.js` (the ready
//!   check and connection name, pipelines, SCAN streams, MULTI/WATCH,
//!   `defineCommand` scripts, auto-pipelining against L1, pub/sub, blocking
//!   pops, SELECT).
//! - Both across a Redis restart, with redis-py's `Retry` and ioredis's
//!   defaults: `tests/python/redis_py_restart.py`, `tests/node/ioredis_restart.js`.
//!
//! `scripts/test.sh` installs both (redis-py into the project's `.venv`,
//! whose python it passes as `NEARCACHE_PYTHON`; `npm ci` in `tests/node`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use nearcache::config::RuleConfig;

use crate::support::{RedisServer, TestProxy, config_for};

/// The Python that has redis-py: `NEARCACHE_PYTHON` (set by `scripts/test.sh`),
/// else the project's `.venv` when it exists, else `python3` from `PATH`.
fn python() -> String {
    if let Ok(python) = std::env::var("NEARCACHE_PYTHON") {
        return python;
    }
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    if std::path::Path::new(venv).exists() {
        return venv.to_owned();
    }
    "python3".to_owned()
}

/// Runs `program script PROXY_PORT REDIS_PORT` and fails with its output
/// unless it succeeds.
async fn run_checks(program: &str, script: &str, proxy: &TestProxy, redis: &RedisServer) {
    let (proxy_port, redis_port) = (proxy.port(), redis.port());
    let (program, path) = (program.to_owned(), script.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&program)
            .arg(&path)
            .arg(proxy_port.to_string())
            .arg(redis_port.to_string())
            .output()
            .unwrap_or_else(|e| panic!("{program} {path}: {e} (scripts/test.sh installs it)"))
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_works_unchanged_through_the_proxy() {
    let redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/redis_py_compat.py"
    );
    run_checks(&python(), script, &proxy, &redis).await;
    proxy.shutdown().await;
}

/// redis-py with `store_compressed` on `cz:` (cached in L1 too): values
/// read back as written through pipelines, MULTI, GETSET/GETEX/GETDEL,
/// while Redis holds them compressed; APPEND is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_reads_back_values_stored_compressed() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.cache.rules = vec![RuleConfig {
        store_compressed: true,
        compress_min_size: Some(nearcache::config::ByteSize(256)),
        ..RuleConfig::caching("cz:", Duration::from_secs(60))
    }];
    let proxy = TestProxy::start_with(cfg).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/redis_py_compressed.py"
    );
    run_checks(&python(), script, &proxy, &redis).await;
    proxy.shutdown().await;
}

/// The proxy caches `io:c:` (the script checks read-your-writes under
/// auto-pipelining, and that a repeated read never reaches Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ioredis_works_unchanged_through_the_proxy() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.cache.rules = vec![RuleConfig::caching("io:c:", Duration::from_secs(60))];
    let proxy = TestProxy::start_with(cfg).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node/ioredis_compat.js");
    run_checks("node", script, &proxy, &redis).await;
    proxy.shutdown().await;
}

/// Runs `program script PROXY_PORT`, restarts Redis once it prints
/// `ready`, and fails unless the script (which checks every command
/// succeeded, and that INFO shows the new server) succeeds.
async fn across_a_restart(program: &str, script: &str) {
    let mut redis = RedisServer::start();
    let proxy = TestProxy::start(&redis).await;
    proxy
        .expect_log("upstream connection lost")
        .expect_log("upstream connect failed");
    let port = proxy.port();
    tokio::task::block_in_place(|| {
        let mut child = Command::new(program)
            .arg(script)
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} {script}: {e} (scripts/test.sh installs it)"));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.next().and_then(Result::ok);
        if ready.as_deref() == Some("ready") {
            redis.restart();
        }
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let out = child.wait_with_output().unwrap();
        assert!(
            ready.as_deref() == Some("ready") && out.status.success(),
            "{script} failed ({:?}):\n{ready:?}\n{}\n{}",
            out.status,
            rest.join("\n"),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(rest.iter().any(|l| l.starts_with("ok:")), "{rest:?}");
    });
    proxy.shutdown().await;
}

/// redis-py's `Retry` recovers through nearcache across a Redis restart with
/// no error reaching the application: a command in flight when Redis went
/// closes the client's connection (`upstream.on_lost = "close"`), which
/// redis-py retries; the retried command waits for the reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_retry_recovers_across_a_redis_restart() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/redis_py_restart.py"
    );
    across_a_restart(&python(), script).await;
}

/// The same with ioredis's defaults (reconnect, resend what was unanswered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ioredis_defaults_recover_across_a_redis_restart() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node/ioredis_restart.js");
    across_a_restart("node", script).await;
}
