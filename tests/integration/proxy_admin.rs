//! Administration through a plain Redis client: `INFO`'s `# Nearcache`
//! section and every `PROXY …` subcommand, through `redis-cli` (RESP2 and
//! `-3`) and redis-rs (RESP2 and RESP3), against a real redis-server; hot
//! keys under a skewed load, big keys, the slow log, the bus's peers and the
//! `/stats` JSON the dashboard reads.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nearcache::config::{Config, RuleConfig};
use redis::Value;
use redis::aio::MultiplexedConnection;

use crate::support::{
    NatsServer, RedisServer, TestProxy, config_for, pairs, redis_cli, set_then_get, text,
};

/// How long a condition that follows from traffic already sent may take.
const POLL_LIMIT: Duration = Duration::from_secs(10);

/// A proxy caching `t:` for a minute, with `tweak` applied.
async fn proxy(redis: &RedisServer, tweak: impl FnOnce(&mut Config)) -> TestProxy {
    let mut cfg = config_for(redis);
    cfg.cache.rules = vec![RuleConfig::caching("t:", Duration::from_secs(60))];
    tweak(&mut cfg);
    TestProxy::start_with(cfg).await
}

async fn query(c: &mut MultiplexedConnection, args: &[&str]) -> Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(c).await.unwrap()
}

async fn resp3(proxy: &TestProxy) -> MultiplexedConnection {
    proxy
        .client_resp3()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A map (or RESP2 flat array) reply as a map.
fn map(v: &Value) -> HashMap<String, Value> {
    pairs(v).into_iter().collect()
}

/// An array reply's elements.
fn items(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items.clone(),
        other => panic!("not an array: {other:?}"),
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        other => panic!("not an integer: {other:?}"),
    }
}

/// A ratio as either protocol sends it: a double (RESP3) or a bulk string
/// (RESP2).
fn ratio(v: &Value) -> f64 {
    match v {
        Value::Double(d) => *d,
        Value::BulkString(b) => String::from_utf8_lossy(b).parse().unwrap(),
        other => panic!("not a ratio: {other:?}"),
    }
}

/// A string reply, bulk or verbatim.
fn string(v: &Value) -> String {
    redis::from_redis_value::<String>(v.clone()).unwrap()
}

/// `name:value` lines of an INFO text.
fn info_fields(info: &str) -> HashMap<String, String> {
    info.lines()
        .filter_map(|l| l.trim_end().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_nearcache_is_answered_here_and_appended_to_redis_s_info() {
    let redis = RedisServer::start();
    let p = proxy(&redis, |_| {}).await;
    let mut c = p.conn().await;
    set_then_get(&mut c, "t:a", "1", 3).await;
    redis.reset_stats();

    // RESP2: a bulk string; only our section, Redis not asked.
    let ours = query(&mut c, &["INFO", "nearcache"]).await;
    assert!(matches!(ours, Value::BulkString(_)), "{ours:?}");
    let ours = string(&ours);
    assert!(ours.starts_with("# Nearcache\r\n"), "{ours}");
    assert!(!ours.contains("# Server"), "{ours}");
    assert_eq!(redis.calls("info"), 0, "INFO nearcache reached Redis");
    let f = info_fields(&ours);
    assert_eq!(f["nearcache_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(f["nearcache_connected_clients"], "1");
    assert_eq!(f["nearcache_l1_keys"], "1");
    assert_eq!(
        (
            f["nearcache_l1_hits"].as_str(),
            f["nearcache_l1_misses"].as_str()
        ),
        ("2", "1")
    );
    assert_eq!(f["nearcache_l1_hit_ratio"], "0.6667");
    assert_eq!(f["nearcache_upstream_up"], "1");
    assert_eq!(f["nearcache_bus"], "none");
    assert_eq!(f["nearcache_rate_limit_rejected"], "0");
    for name in [
        "nearcache_uptime_in_seconds",
        "nearcache_pinned_clients",
        "nearcache_l1_bytes",
        "nearcache_l1_max_memory",
        "nearcache_bus_live_peers",
    ] {
        assert!(f.contains_key(name), "{name} missing: {ours}");
    }

    // Full INFO: Redis's sections, then ours.
    let full = string(&query(&mut c, &["INFO"]).await);
    let (server, nearcache) = (full.find("# Server"), full.find("\r\n\r\n# Nearcache\r\n"));
    assert!(
        matches!((server, nearcache), (Some(s), Some(n)) if s < n),
        "{full}"
    );
    for sections in [
        &["INFO", "all"][..],
        &["INFO", "everything"],
        &["INFO", "server", "nearcache"],
    ] {
        let info = string(&query(&mut c, sections).await);
        assert!(
            info.contains("# Server") && info.contains("# Nearcache"),
            "{sections:?}: {info}"
        );
    }
    let server_only = string(&query(&mut c, &["INFO", "server"]).await);
    assert!(server_only.contains("# Server") && !server_only.contains("# Nearcache"));

    // RESP3: a verbatim string, as Redis answers INFO.
    let mut c3 = resp3(&p).await;
    for sections in [&["INFO", "nearcache"][..], &["INFO"]] {
        let v = query(&mut c3, sections).await;
        assert!(
            matches!(v, Value::VerbatimString { .. }),
            "{sections:?}: {v:?}"
        );
        assert!(string(&v).contains("nearcache_version:"), "{v:?}");
    }

    // Inside MULTI, Redis queues INFO and answers it in EXEC's reply,
    // unchanged (documented in session/info.rs).
    let (exec,): (String,) = redis::pipe()
        .atomic()
        .cmd("INFO")
        .arg("server")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        exec.contains("# Server") && !exec.contains("# Nearcache"),
        "{exec}"
    );

    // redis-cli, plain and RESP3.
    for args in [
        &["INFO", "nearcache"][..],
        &["-3", "INFO", "nearcache"],
        &["INFO"],
    ] {
        let out = redis_cli(p.port(), args, None);
        assert!(
            out.contains("# Nearcache") && out.contains("nearcache_l1_hit_ratio:"),
            "{args:?}: {out}"
        );
    }
    let out = redis_cli(p.port(), &["-3", "INFO"], None);
    assert!(
        out.contains("# Server") && out.contains("# Nearcache"),
        "{out}"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_help_lists_every_subcommand_and_an_unknown_one_points_to_it() {
    let redis = RedisServer::start();
    let p = proxy(&redis, |_| {}).await;
    let subcommands = [
        "HELP",
        "INFO",
        "STATS",
        "RULES",
        "HOTKEYS",
        "BIGKEYS",
        "PEERS",
        "SLOWLOG",
        "CONFIG GET",
        "LIMITS",
        "INVALIDATE",
        "FLUSH",
        "RELOAD",
    ];
    for args in [&["PROXY", "HELP"][..], &["-3", "PROXY", "HELP"]] {
        let out = redis_cli(p.port(), args, None);
        for sub in subcommands {
            assert!(
                out.lines().any(|l| l.starts_with(sub)),
                "{args:?}: no line for {sub}: {out}"
            );
        }
    }
    let mut c = p.conn().await;
    let help = items(&query(&mut c, &["PROXY", "help"]).await);
    assert_eq!(
        help.len(),
        subcommands.len() + 1,
        "a header and one line each"
    );
    let err = redis::cmd("PROXY")
        .arg("NOSUCH")
        .query_async::<String>(&mut c)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Try PROXY HELP"), "{err}");
    let err = redis::cmd("PROXY")
        .arg("HOTKEYS")
        .arg("lots")
        .query_async::<String>(&mut c)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_info_rules_stats_and_config_get_in_both_protocols_with_secrets_masked() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let url = format!("redis://default:s3cret@127.0.0.1:{}", redis.port());
    let masked = format!("redis://default:***@127.0.0.1:{}", redis.port());
    let p = proxy(&redis, |cfg| {
        cfg.upstream.url = url.clone();
        cfg.admin.token = Some("admintoken".into());
    })
    .await;
    let mut c2 = p.conn().await;
    let mut c3 = resp3(&p).await;
    let _: () = redis::cmd("SET")
        .arg("t:a")
        .arg("xyz")
        .query_async(&mut c2)
        .await
        .unwrap();
    for _ in 0..4 {
        let _: String = redis::cmd("GET")
            .arg("t:a")
            .query_async(&mut c2)
            .await
            .unwrap();
    }
    for c in [&mut c2, &mut c3] {
        let info = map(&query(c, &["PROXY", "INFO"]).await);
        assert_eq!(text(&info["upstream"]), masked);
        assert_eq!(text(&info["version"]), env!("CARGO_PKG_VERSION"));
        assert_eq!(text(&info["bus"]), "none");
        assert_eq!(text(&info["upstream_up"]), "1");

        let got = map(&query(c, &["PROXY", "CONFIG", "GET", "upstream.url"]).await);
        assert_eq!(got.len(), 1);
        assert_eq!(text(&got["upstream.url"]), masked);
        let cache = map(&query(
            c,
            &["PROXY", "CONFIG", "GET", "cache.*", "ADMIN.SLOWLOG_LEN"],
        )
        .await);
        assert_eq!(text(&cache["cache.max_memory"]), "256MiB");
        assert_eq!(text(&cache["cache.rules[0].prefix"]), "t:");
        assert_eq!(text(&cache["admin.slowlog_len"]), "128");
        let all = format!("{:?}", query(c, &["PROXY", "CONFIG", "GET", "*"]).await);
        assert!(
            !all.contains("s3cret") && !all.contains("admintoken"),
            "{all}"
        );
        assert!(all.contains("admin.token"), "{all}");

        let rules = items(&query(c, &["PROXY", "RULES"]).await);
        assert_eq!(rules.len(), 1);
        let rule = map(&rules[0]);
        assert_eq!(text(&rule["prefix"]), "t:");
        assert_eq!(int(&rule["ttl_ms"]), 60_000);
        assert_eq!(int(&rule["cache"]), 1);
        assert_eq!(int(&rule["entries"]), 1);
        assert!(int(&rule["bytes"]) > 0);
        assert_eq!((int(&rule["hits"]), int(&rule["misses"])), (3, 1));
        assert_eq!(ratio(&rule["hit_ratio"]), 0.75);

        let stats = map(&query(c, &["PROXY", "STATS"]).await);
        assert_eq!(ratio(&stats["hit_ratio"]), 0.75);
        let rule = map(&items(&stats["rules"])[0]);
        assert_eq!(ratio(&rule["hit_ratio"]), 0.75);
        let requests = map(&stats["requests"]);
        assert_eq!(int(&requests["clients"]), 2);
        assert_eq!(int(&requests["pinned"]), 0);
    }
    for args in [
        &["PROXY", "CONFIG", "GET", "upstream.url"][..],
        &["-3", "PROXY", "CONFIG", "GET", "upstream.url"],
    ] {
        let out = redis_cli(p.port(), args, None);
        assert!(
            out.contains(&masked) && !out.contains("s3cret"),
            "{args:?}: {out}"
        );
    }
    for args in [&["PROXY", "INFO"][..], &["-3", "PROXY", "INFO"]] {
        let out = redis_cli(p.port(), args, None);
        assert!(
            out.contains(&masked) && !out.contains("s3cret"),
            "{args:?}: {out}"
        );
    }
    for args in [&["PROXY", "RULES"][..], &["-3", "PROXY", "RULES"]] {
        let out = redis_cli(p.port(), args, None);
        assert!(
            out.contains("hit_ratio") && out.contains("0.75"),
            "{args:?}: {out}"
        );
    }
    p.shutdown().await;
}

/// A deterministic generator (xorshift64), so the load is the same each run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A Zipf(1)-distributed rank in 0..n, from its cumulative weights.
    fn zipf(&mut self, cumulative: &[f64]) -> usize {
        let total = cumulative[cumulative.len() - 1];
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64 * total;
        cumulative
            .partition_point(|&c| c < u)
            .min(cumulative.len() - 1)
    }
}

/// An HTTP GET of the admin listener: the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: nearcache\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_keys_under_a_zipf_load_hold_the_true_top_ten_in_the_reported_top_twenty() {
    const KEYS: usize = 200;
    const READS: usize = 50_000;
    let redis = RedisServer::start();
    let p = proxy(&redis, |cfg| cfg.admin.listen = "127.0.0.1:0".into()).await;
    let mut c = p.conn().await;
    let mut set = redis::pipe();
    for k in 0..KEYS {
        set.cmd("SET").arg(format!("t:{k}")).arg(k).ignore();
    }
    let _: () = set.query_async(&mut c).await.unwrap();
    // Zipf(1) over the keys, shuffled so that rank is not key order.
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut names: Vec<usize> = (0..KEYS).collect();
    for i in (1..KEYS).rev() {
        names.swap(i, rng.next() as usize % (i + 1));
    }
    let mut cumulative = Vec::with_capacity(KEYS);
    let mut sum = 0.0;
    for rank in 0..KEYS {
        sum += 1.0 / (rank + 1) as f64;
        cumulative.push(sum);
    }
    let mut truth = vec![0u64; KEYS];
    for _ in 0..READS / 500 {
        let mut batch = redis::pipe();
        for _ in 0..500 {
            let key = names[rng.zipf(&cumulative)];
            truth[key] += 1;
            batch.cmd("GET").arg(format!("t:{key}")).ignore();
        }
        let _: () = batch.query_async(&mut c).await.unwrap();
    }
    let mut by_reads: Vec<usize> = (0..KEYS).collect();
    by_reads.sort_by_key(|&k| std::cmp::Reverse(truth[k]));
    let true_top: Vec<String> = by_reads[..10].iter().map(|k| format!("t:{k}")).collect();

    let reported: Vec<String> = items(&query(&mut c, &["PROXY", "HOTKEYS", "20"]).await)
        .iter()
        .map(|e| text(&map(e)["key"]))
        .collect();
    assert_eq!(reported.len(), 20);
    for key in &true_top {
        assert!(
            reported.contains(key),
            "true top-10 key {key} not in the reported top 20 {reported:?}"
        );
    }
    let in_top_ten = true_top
        .iter()
        .filter(|k| reported[..10].contains(k))
        .count();
    assert!(
        in_top_ten >= 8,
        "only {in_top_ten} of the true top 10 in the reported top 10"
    );
    // Counts estimate reads: the hottest key's within 20%.
    let hottest = map(&items(&query(&mut c, &["PROXY", "HOTKEYS", "1"]).await)[0]);
    let (estimate, real) = (int(&hottest["count"]) as f64, truth[by_reads[0]] as f64);
    assert!(
        (estimate - real).abs() / real < 0.2,
        "estimated {estimate}, read {real}"
    );

    // RESP3 and redis-cli show the same list.
    let mut c3 = resp3(&p).await;
    let first = map(&items(&query(&mut c3, &["PROXY", "HOTKEYS"]).await)[0]);
    assert_eq!(text(&first["key"]), reported[0]);
    for args in [
        &["PROXY", "HOTKEYS", "3"][..],
        &["-3", "PROXY", "HOTKEYS", "3"],
    ] {
        let out = redis_cli(p.port(), args, None);
        assert!(out.contains(&reported[0]), "{args:?}: {out}");
    }

    // The dashboard's shape in /stats.
    let stats: serde_json::Value =
        serde_json::from_str(&http_get(p.admin_addr(), "/stats")).unwrap();
    let hot = stats["hot_keys"].as_array().expect("hot_keys is a list");
    assert_eq!(hot[0]["key"], serde_json::json!(reported[0]));
    assert!(hot[0]["count"].as_u64().unwrap() > 0);
    assert!(hot.len() <= 20 && hot.len() >= 10);
    let big = stats["big_keys"].as_array().expect("big_keys is a list");
    assert!(!big.is_empty());
    for b in big {
        assert!(
            b["key"].is_string() && b["bytes"].is_u64() && b["rule"] == "prefix:t:",
            "{b}"
        );
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_keys_report_the_largest_values_with_their_rule_and_database() {
    let redis = RedisServer::start();
    let p = proxy(&redis, |cfg| {
        cfg.cache
            .rules
            .push(RuleConfig::caching("u:", Duration::from_secs(60)));
    })
    .await;
    let mut c = p.conn().await;
    for i in 1..=40usize {
        let (key, value) = (format!("t:{i}"), "x".repeat(i * 100));
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .query_async(&mut c)
            .await
            .unwrap();
        let _: String = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("SET")
        .arg("u:one")
        .arg("y".repeat(50_000))
        .query_async(&mut c)
        .await
        .unwrap();
    let _: String = redis::cmd("GET")
        .arg("u:one")
        .query_async(&mut c)
        .await
        .unwrap();
    // One in database 1, named with its database.
    let mut db1 = redis::Client::open(format!("{}/1", p.url()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("t:db1")
        .arg("z".repeat(9_000))
        .query_async(&mut db1)
        .await
        .unwrap();
    let _: String = redis::cmd("GET")
        .arg("t:db1")
        .query_async(&mut db1)
        .await
        .unwrap();

    // (A fill is stored as its reply arrives: poll, bounded.)
    let deadline = Instant::now() + POLL_LIMIT;
    let list = loop {
        let list = items(&query(&mut c, &["PROXY", "BIGKEYS", "4"]).await);
        if list.len() == 4 && list.iter().any(|e| map(e).contains_key("db")) {
            break list;
        }
        assert!(Instant::now() < deadline, "big keys never showed: {list:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let entries: Vec<(String, i64, String, Option<i64>)> = list
        .iter()
        .map(|e| {
            let m = map(e);
            (
                text(&m["key"]),
                int(&m["bytes"]),
                text(&m["rule"]),
                m.get("db").map(int),
            )
        })
        .collect();
    let keys: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(keys, ["u:one", "t:db1", "t:40", "t:39"], "{entries:?}");
    assert_eq!(entries[0].2, "prefix:u:");
    assert_eq!(entries[1].3, Some(1));
    assert_eq!(entries[2].3, None, "database 0 is not named");
    // The reply as sent: the value and its RESP framing.
    assert_eq!(entries[2].1, 4000 + "$4000\r\n\r\n".len() as i64);
    assert!(entries.windows(2).all(|w| w[0].1 >= w[1].1));
    for args in [&["PROXY", "BIGKEYS"][..], &["-3", "PROXY", "BIGKEYS"]] {
        let out = redis_cli(p.port(), args, None);
        assert!(
            out.contains("u:one") && out.contains("prefix:u:"),
            "{args:?}: {out}"
        );
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slowlog_records_calls_over_the_threshold_and_not_fast_ones() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let p = proxy(&redis, |cfg| {
        cfg.admin.slowlog_threshold = nearcache::config::Duration(Duration::from_millis(30));
    })
    .await;
    let mut c = p.conn().await;
    // (Connections settle before the log is judged.)
    let _: () = redis::cmd("SET")
        .arg("warm")
        .arg("1")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("PROXY")
        .arg("SLOWLOG")
        .arg("RESET")
        .query_async(&mut c)
        .await
        .unwrap();
    for i in 0..20 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg(i)
            .query_async(&mut c)
            .await
            .unwrap();
        let _: String = redis::cmd("GET")
            .arg(format!("k{i}"))
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("DEBUG")
        .arg("SLEEP")
        .arg("0.1")
        .query_async(&mut c)
        .await
        .unwrap();
    // A script busy for 100 ms (on a scripts' connection of its own).
    let busy = "local t = redis.call('TIME') local start = t[1] * 1000000 + t[2] \
                while true do local n = redis.call('TIME') \
                if n[1] * 1000000 + n[2] - start > 100000 then return 1 end end";
    let _: i64 = redis::cmd("EVAL")
        .arg(busy)
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();

    for c in [&mut c, &mut resp3(&p).await] {
        let log = items(&query(c, &["PROXY", "SLOWLOG"]).await);
        let entries: Vec<HashMap<String, Value>> = log.iter().map(map).collect();
        let commands: Vec<String> = entries.iter().map(|e| text(&e["command"])).collect();
        assert_eq!(
            commands,
            ["eval", "debug"],
            "newest first, fast calls left out: {entries:?}"
        );
        assert_eq!(text(&entries[0]["path"]), "script");
        assert_eq!(text(&entries[1]["path"]), "shared");
        for e in &entries {
            assert!(int(&e["latency_us"]) >= 100_000, "{e:?}");
            assert_eq!(int(&e["commands"]), 1);
        }
        assert!(int(&entries[0]["id"]) > int(&entries[1]["id"]));
        let one = items(&query(c, &["PROXY", "SLOWLOG", "1"]).await);
        assert_eq!(one.len(), 1);
    }
    for args in [&["PROXY", "SLOWLOG"][..], &["-3", "PROXY", "SLOWLOG"]] {
        let out = redis_cli(p.port(), args, None);
        assert!(
            out.contains("debug") && out.contains("eval"),
            "{args:?}: {out}"
        );
    }
    let _: () = redis::cmd("PROXY")
        .arg("SLOWLOG")
        .arg("RESET")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(items(&query(&mut c, &["PROXY", "SLOWLOG"]).await).is_empty());
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_peers_lists_the_other_instance_on_the_bus() {
    let redis = RedisServer::start();
    let nats = NatsServer::start();
    let start = |id: &'static str| {
        let mut cfg = config_for(&redis);
        cfg.cache.rules = vec![RuleConfig::caching("t:", Duration::from_secs(60))];
        cfg.coherence.nats_url = nats.url();
        cfg.coherence.instance_id = id.into();
        TestProxy::start_with(cfg)
    };
    let a = start("peer-a").await;
    let b = start("peer-b").await;
    // (The gap a first message shows is the documented cost of joining.)
    for p in [&a, &b] {
        p.expect_log("invalidation gap");
    }
    let mut c = a.conn().await;
    let deadline = Instant::now() + POLL_LIMIT;
    let peer = loop {
        let peers = items(&query(&mut c, &["PROXY", "PEERS"]).await);
        if let [only] = &peers[..] {
            break map(only);
        }
        assert!(Instant::now() < deadline, "b never heard: {peers:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(text(&peer["id"]).starts_with("peer-b~"), "{peer:?}");
    // Heartbeats every 20 ms: heard well within the 100 ms peer timeout.
    assert!(int(&peer["last_heard_ms_ago"]) < 1000, "{peer:?}");
    assert!(int(&peer["messages"]) >= 1);
    assert!(int(&peer["delay_us"]) >= 0);
    let out = redis_cli(a.port(), &["-3", "PROXY", "PEERS"], None);
    assert!(
        out.contains("peer-b~") && out.contains("last_heard_ms_ago"),
        "{out}"
    );
    // Without a bus: no peers.
    let alone = proxy(&redis, |_| {}).await;
    let mut c = alone.conn().await;
    assert!(items(&query(&mut c, &["PROXY", "PEERS"]).await).is_empty());
    alone.shutdown().await;
    b.shutdown().await;
    a.shutdown().await;
}
