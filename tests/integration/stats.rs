//! The request path's counters in `PROXY STATS` (`requests`): commands by
//! class, errors nearcache answered with by kind, reply latency by path, and
//! clients connected — each checked against a known sequence of commands.

use std::collections::HashMap;
use std::time::Duration;

use nearcache::config::RuleConfig;
use redis::Value;
use redis::aio::MultiplexedConnection;

use crate::support::{RedisServer, TestProxy, config_for, pairs, set_then_get};

/// A map reply as a map.
fn map(v: &Value) -> HashMap<String, Value> {
    pairs(v).into_iter().collect()
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        other => panic!("not an integer: {other:?}"),
    }
}

/// `PROXY STATS`'s `requests` map, flattened to `section.name` (and
/// `latency_us.path.field`) → value.
async fn requests(c: &mut MultiplexedConnection) -> HashMap<String, i64> {
    let v: Value = redis::cmd("PROXY")
        .arg("STATS")
        .query_async(c)
        .await
        .unwrap();
    let top = map(&v);
    let requests = map(top.get("requests").expect("a requests section"));
    let mut flat = HashMap::new();
    for (section, value) in requests {
        match value {
            Value::Int(n) => {
                flat.insert(section, n);
            }
            nested => {
                for (name, value) in map(&nested) {
                    match value {
                        Value::Int(n) => {
                            flat.insert(format!("{section}.{name}"), n);
                        }
                        deeper => {
                            for (field, value) in map(&deeper) {
                                flat.insert(format!("{section}.{name}.{field}"), int(&value));
                            }
                        }
                    }
                }
            }
        }
    }
    flat
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_stats_counts_commands_errors_and_latency_by_path() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.cache.rules = vec![RuleConfig::caching("c:", Duration::from_secs(60))];
    let proxy = TestProxy::start_with(cfg).await;
    let mut c = proxy.conn().await;
    // A second client, counted while it is connected.
    let second = proxy.conn().await;
    let before = requests(&mut c).await;
    assert_eq!(before["clients"], 2, "{before:?}");
    // (A read's commands are added up once it is handled: this PROXY STATS
    // shows in the next.)
    assert_eq!(before["commands.proxy"], 0, "{before:?}");

    set_then_get(&mut c, "c:k", "v", 3).await;
    let wrong: redis::RedisResult<String> = redis::cmd("GET").query_async(&mut c).await;
    assert!(wrong.is_err());
    let _: () = redis::cmd("MULTI").query_async(&mut c).await.unwrap();
    let _: () = redis::cmd("EXEC").query_async(&mut c).await.unwrap();

    let after = requests(&mut c).await;
    let delta = |k: &str| after[k] - before.get(k).copied().unwrap_or(0);
    assert_eq!(after["clients"], 2, "{after:?}");
    assert_eq!(delta("commands.write"), 1, "SET");
    assert_eq!(delta("commands.read"), 4, "3 GETs and the wrong-arity one");
    assert_eq!(delta("commands.transaction"), 2, "MULTI and EXEC");
    assert_eq!(delta("commands.proxy"), 1, "the first PROXY STATS");
    assert_eq!(delta("errors.arity"), 1);
    assert_eq!(delta("errors.upstream_lost"), 0);
    // The first GET missed and went upstream with the SET; the other two
    // were served from L1.
    assert_eq!(delta("latency_us.l1_hit.count"), 2);
    assert_eq!(
        delta("latency_us.shared.count"),
        2,
        "SET and the missed GET"
    );
    assert_eq!(delta("latency_us.pinned.count"), 2, "MULTI and EXEC");
    assert!(after["latency_us.shared.p99"] >= after["latency_us.shared.p50"]);
    assert!(after["latency_us.shared.max"] >= after["latency_us.shared.p99"]);
    drop(second);
    proxy.shutdown().await;
}
