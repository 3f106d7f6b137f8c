//! Rate limits at admission, through real clients against a real Redis:
//! the admitted rate follows the configured one, refusals carry the
//! documented error and take their place in a pipeline or a transaction,
//! `delay` holds one client without holding another, L1 hits are free for
//! limits that count upstream traffic, and nothing in a long pipeline is
//! lost or run twice.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nearcache::Config;
use nearcache::config::RuleConfig;

use crate::support::{RedisServer, TestProxy, config_for};

const RATE_LIMITED: &str = "-ERR rate limited by '";

/// A proxy for `redis` with the `[[limits]]` (and other tables) of `toml`.
async fn proxy_with(redis: &RedisServer, toml: &str, rules: Vec<RuleConfig>) -> TestProxy {
    let extra: Config = toml::from_str(toml).unwrap();
    let mut cfg = config_for(redis);
    cfg.limits = extra.limits;
    cfg.cache.rules = rules;
    cfg.validate("test").unwrap();
    TestProxy::start_with(cfg).await
}

/// A raw client: commands written as RESP, each reply one line (what these
/// tests send answers in one line).
struct Raw {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let w = TcpStream::connect(("127.0.0.1", port)).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        Raw { w, r }
    }

    fn send(&mut self, cmds: &[&[&str]]) {
        let mut buf = Vec::new();
        for args in cmds {
            buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for a in *args {
                buf.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
            }
        }
        self.w.write_all(&buf).unwrap();
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "connection closed");
        line.trim_end().to_owned()
    }

    fn call(&mut self, args: &[&str]) -> String {
        self.send(&[args]);
        self.line()
    }
}

/// Sends `cmd` in pipelined batches of 10 for about `span`, and returns
/// (admitted, refused, seconds it took); every refusal must be the limit's.
fn hammer(c: &mut Raw, cmd: &[&str], span: Duration) -> (u64, u64, f64) {
    let start = Instant::now();
    let (mut ok, mut refused) = (0, 0);
    // (Bounded: at most 5,000 batches, whatever the clock says.)
    for _ in 0..5_000 {
        if start.elapsed() >= span {
            break;
        }
        c.send(&[cmd; 10]);
        for _ in 0..10 {
            let line = c.line();
            if line.starts_with(RATE_LIMITED) {
                refused += 1;
            } else {
                assert!(!line.starts_with('-'), "unexpected error {line}");
                ok += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    (ok, refused, start.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_ip_read_limit_admits_its_rate_and_leaves_writes_alone() {
    let redis = RedisServer::start();
    let proxy = proxy_with(
        &redis,
        r#"
        [[limits]]
        name = "reads"
        rate = "100/s"
        burst = 10
        per = ["ip"]
        commands = ["@read"]
        "#,
        vec![],
    )
    .await;
    let port = proxy.port();
    tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(port);
        let (ok, refused, secs) = hammer(&mut c, &["GET", "k"], Duration::from_secs(2));
        let expected = 10.0 + 100.0 * secs;
        let ratio = ok as f64 / expected;
        assert!(
            (0.9..=1.1).contains(&ratio),
            "admitted {ok} in {secs:.2}s, expected ~{expected:.0}"
        );
        assert!(
            refused > ok,
            "the load was above the limit: {refused} refused"
        );
        // The error, whole.
        let mut line = String::new();
        for _ in 0..100 {
            line = c.call(&["GET", "k"]);
            if line.starts_with('-') {
                break;
            }
        }
        let re = regex_like(&line);
        assert!(re, "{line}");
        // Writes are not reads: none refused, though from the same ip.
        let (ok, refused, _) = hammer(&mut c, &["SET", "k", "v"], Duration::from_millis(300));
        assert_eq!(refused, 0, "{ok} writes admitted");
    })
    .await
    .unwrap();
    proxy.shutdown().await;
}

/// `-ERR rate limited by 'reads' (100/s per ip), retry in N ms`.
fn regex_like(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("-ERR rate limited by 'reads' (100/s per ip), retry in ")
    else {
        return false;
    };
    let Some(ms) = rest.strip_suffix(" ms") else {
        return false;
    };
    ms.parse::<u64>().is_ok_and(|ms| (1..=1000).contains(&ms))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_of_ten_thousand_is_answered_in_order_none_lost_none_twice() {
    let redis = RedisServer::start();
    let proxy = proxy_with(
        &redis,
        r#"
        [[limits]]
        name = "incr"
        rate = "2000/s"
        burst = 100
        commands = ["INCR"]
        "#,
        vec![],
    )
    .await;
    let port = proxy.port();
    let (admitted, refused) = tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(port);
        c.send(&[&["INCR", "n"][..]; 10_000]);
        let (mut last, mut refused) = (0i64, 0u64);
        for _ in 0..10_000 {
            let line = c.line();
            if line.starts_with(RATE_LIMITED) {
                refused += 1;
                continue;
            }
            let v: i64 = line.strip_prefix(':').unwrap().parse().unwrap();
            assert_eq!(v, last + 1, "in order, each once");
            last = v;
        }
        (last, refused)
    })
    .await
    .unwrap();
    assert_eq!(admitted as u64 + refused, 10_000);
    assert!(
        admitted >= 100 && refused > 0,
        "{admitted} admitted, {refused} refused"
    );
    let mut direct = redis.direct();
    let n: i64 = redis::cmd("GET").arg("n").query(&mut direct).unwrap();
    assert_eq!(n, admitted, "Redis ran exactly the admitted ones");
    assert_eq!(redis.calls("incr"), admitted as u64);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_holds_one_client_and_not_another_then_rejects_past_max_wait() {
    let redis = RedisServer::start();
    let proxy = proxy_with(
        &redis,
        r#"
        [[limits]]
        name = "slow-bots"
        rate = "10/s"
        burst = 1
        per = ["name"]
        commands = ["GET"]
        action = "delay"
        max_wait = "150ms"

        [[limits]]
        name = "impatient"
        rate = "2/s"
        burst = 1
        per = ["name"]
        commands = ["EXISTS"]
        action = "delay"
        max_wait = "50ms"
        "#,
        vec![],
    )
    .await;
    let port = proxy.port();
    // Ten GETs at 10/s take about a second, each within max_wait of the one
    // before: all admitted, none refused.
    let slow = tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(port);
        assert_eq!(c.call(&["CLIENT", "SETNAME", "slow"]), "+OK");
        c.send(&[&["GET", "k"][..]; 10]);
        (0..10).map(|_| c.line()).collect::<Vec<_>>()
    });
    let other = tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(port);
        assert_eq!(c.call(&["CLIENT", "SETNAME", "fast"]), "+OK");
        c.call(&["GET", "k"])
    })
    .await
    .unwrap();
    assert_eq!(other, "$-1", "another client's GET is its own bucket's");
    assert!(
        !slow.is_finished(),
        "the other client was not held behind the delayed one"
    );
    let replies = slow.await.unwrap();
    assert!(replies.iter().all(|r| r == "$-1"), "{replies:?}");
    assert_eq!(redis.calls("get"), 11);

    // At 2/s the second waits 500 ms, past max_wait: refused.
    let (first, second) = tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(port);
        c.send(&[&["EXISTS", "k"], &["EXISTS", "k"]]);
        (c.line(), c.line())
    })
    .await
    .unwrap();
    assert_eq!(first, ":0");
    assert!(
        second.starts_with("-ERR rate limited by 'impatient' (2/s per name), retry in "),
        "{second}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_inside_multi_aborts_the_transaction_as_redis_does() {
    let redis = RedisServer::start();
    let proxy = proxy_with(
        &redis,
        r#"
        [[limits]]
        name = "writes"
        rate = "1/m"
        burst = 1
        commands = ["@write"]
        "#,
        vec![],
    )
    .await;
    let port = proxy.port();
    let replies = tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(port);
        c.send(&[
            &["MULTI"],
            &["SET", "a", "1"],
            &["SET", "b", "2"],
            &["EXEC"],
        ]);
        (0..4).map(|_| c.line()).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(replies[..2], ["+OK", "+QUEUED"]);
    assert!(
        replies[2].starts_with("-ERR rate limited by 'writes' (1/m)"),
        "{}",
        replies[2]
    );
    assert_eq!(
        replies[3],
        "-EXECABORT Transaction discarded because of previous errors."
    );
    let mut direct = redis.direct();
    let a: Option<String> = redis::cmd("GET").arg("a").query(&mut direct).unwrap();
    assert_eq!(a, None, "nothing of the transaction ran");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_limit_lets_l1_hits_through_and_counts_misses() {
    let redis = RedisServer::start();
    let proxy = proxy_with(
        &redis,
        r#"
        [[limits]]
        name = "redis-cap"
        rate = "1/m"
        burst = 3
        counts = "upstream"
        "#,
        vec![RuleConfig {
            // (The keys do not exist: "no such key" is what L1 caches.)
            negative_ttl: Some(nearcache::config::Duration(Duration::from_secs(60))),
            ..RuleConfig::caching("t:", Duration::from_secs(60))
        }],
    )
    .await;
    let port = proxy.port();
    let replies = tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(port);
        // One miss, then hits: free.
        let hits: Vec<String> = (0..50).map(|_| c.call(&["GET", "t:1"])).collect();
        // Two more upstream commands fit the burst; the third does not.
        let rest: Vec<String> = ["u:1", "u:2", "u:3"]
            .iter()
            .map(|k| c.call(&["GET", k]))
            .collect();
        // A miss of a cached prefix counts too.
        let miss = c.call(&["GET", "t:2"]);
        let proxy_cmd = c.call(&["PROXY", "LIMITS"]);
        (hits, rest, miss, proxy_cmd)
    })
    .await
    .unwrap();
    assert!(replies.0.iter().all(|r| r == "$-1"), "{:?}", replies.0);
    assert_eq!(replies.1[..2], ["$-1", "$-1"]);
    assert!(
        replies.1[2].starts_with("-ERR rate limited by 'redis-cap'"),
        "{}",
        replies.1[2]
    );
    assert!(
        replies.2.starts_with("-ERR rate limited by 'redis-cap'"),
        "{}",
        replies.2
    );
    assert!(
        replies.3.starts_with('*'),
        "PROXY LIMITS is not limited: {}",
        replies.3
    );
    assert_eq!(
        redis.calls("get"),
        3,
        "one miss and two plain reads reached Redis"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_limits_shows_each_limit_and_its_counts() {
    let redis = RedisServer::start();
    let proxy = proxy_with(
        &redis,
        r#"
        [[limits]]
        name = "heavy"
        rate = "5/s"
        burst = 2
        commands = ["KEYS", "HGETALL"]
        "#,
        vec![],
    )
    .await;
    let client = proxy.client();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut refused = 0;
    for _ in 0..4 {
        let r: redis::RedisResult<Vec<String>> =
            redis::cmd("KEYS").arg("*").query_async(&mut conn).await;
        if let Err(e) = r {
            assert!(
                e.to_string().contains("rate limited by 'heavy' (5/s)"),
                "{e}"
            );
            refused += 1;
        }
    }
    assert!(
        refused >= 1,
        "the redis crate surfaces the refusal as an error"
    );
    let limits: Vec<redis::Value> = redis::cmd("PROXY")
        .arg("LIMITS")
        .query_async(&mut conn)
        .await
        .unwrap();
    let text = format!("{limits:?}");
    for want in ["heavy", "5/s", "keys hgetall"] {
        assert!(text.to_lowercase().contains(want), "{want}: {text}");
    }
    let stats: redis::Value = redis::cmd("PROXY")
        .arg("STATS")
        .query_async(&mut conn)
        .await
        .unwrap();
    let stats = format!("{stats:?}");
    assert!(stats.contains("heavy"), "{stats}");
    proxy.shutdown().await;
}

/// The `instances` a fleet limit (the first limit) is shared by now, as
/// `PROXY LIMITS` says.
fn fleet_instances(port: u16) -> i64 {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_connection().unwrap();
    let limits: Vec<redis::Value> = redis::cmd("PROXY").arg("LIMITS").query(&mut conn).unwrap();
    let redis::Value::Array(fields) = &limits[0] else {
        panic!("{limits:?}")
    };
    fields
        .chunks(2)
        .find_map(|kv| match kv {
            [redis::Value::BulkString(k), redis::Value::Int(n)] if k == b"instances" => Some(*n),
            _ => None,
        })
        .unwrap()
}

/// Each of `ports` hammered at once from its own thread for `span`: the
/// admitted total, and the seconds it took.
fn hammer_all(ports: &[u16], span: Duration) -> (u64, f64) {
    let start = Instant::now();
    let threads: Vec<_> = ports
        .iter()
        .map(|&port| {
            std::thread::spawn(move || {
                let mut c = Raw::connect(port);
                hammer(&mut c, &["GET", "k"], span).0
            })
        })
        .collect();
    let admitted = threads.into_iter().map(|t| t.join().unwrap()).sum();
    (admitted, start.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_limit_is_shared_by_the_live_instances_and_follows_one_leaving() {
    let redis = RedisServer::start();
    let nats = crate::support::NatsServer::start();
    let extra: Config = toml::from_str(
        r#"
        [[limits]]
        name = "fleet-gets"
        rate = "300/s"
        burst = 60
        commands = ["GET"]
        scope = "fleet"
        "#,
    )
    .unwrap();
    let mut proxies = Vec::new();
    for i in 0..3 {
        let mut cfg = config_for(&redis);
        // (The bus runs where L1 does.)
        cfg.cache.rules = vec![RuleConfig::caching("t:", Duration::from_secs(60))];
        cfg.coherence.nats_url = nats.url();
        cfg.coherence.instance_id = format!("fleet-{i}");
        cfg.limits = extra.limits.clone();
        proxies.push(TestProxy::start_with(cfg).await);
    }
    let ports: Vec<u16> = proxies.iter().map(TestProxy::port).collect();
    let limit = Duration::from_secs(10);
    let all = ports.clone();
    tokio::task::spawn_blocking(move || {
        crate::support::wait_until("every instance to see three", limit, || {
            all.iter().all(|&p| fleet_instances(p) == 3)
        });
        // Each instance's burst is its share of 60 (20), so a client that a
        // loaded machine holds up for less than 200 ms loses no tokens; an
        // instance still at a third's rate with two left would come to 0.67.
        let (admitted, secs) = hammer_all(&all, Duration::from_secs(2));
        let expected = 60.0 + 300.0 * secs;
        let ratio = admitted as f64 / expected;
        assert!(
            (0.85..=1.15).contains(&ratio),
            "three: {admitted} in {secs:.2}s, ~{expected:.0} expected"
        );
    })
    .await
    .unwrap();

    let gone = proxies.pop().unwrap();
    gone.shutdown().await;
    let two = ports[..2].to_vec();
    tokio::task::spawn_blocking(move || {
        crate::support::wait_until("the other two to see two", limit, || {
            two.iter().all(|&p| fleet_instances(p) == 2)
        });
        let (admitted, secs) = hammer_all(&two, Duration::from_secs(2));
        let expected = 60.0 + 300.0 * secs;
        let ratio = admitted as f64 / expected;
        assert!(
            (0.85..=1.15).contains(&ratio),
            "two: {admitted} in {secs:.2}s, ~{expected:.0} expected"
        );
    })
    .await
    .unwrap();
    for p in proxies {
        p.shutdown().await;
    }
}
