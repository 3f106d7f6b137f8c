//! Compression: a rule's `compress_min_size` holds large replies
//! lz4-compressed in L1, and every hit still answers the exact bytes Redis
//! sent.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::time::Duration;

use nearcache::config::{ByteSize, RuleConfig};
use redis::AsyncCommands;

use crate::support::{RedisServer, TestProxy, config_for, proxy_stats};

/// An order book as a trading feed publishes it: 25 levels a side, as JSON
/// (about 1.6 KB; `n` varies the prices so no two books are alike).
pub fn order_book(n: u32) -> String {
    let side = |base: f64, step: f64| {
        (0..25)
            .map(|i| {
                let price = base + step * f64::from(i);
                let size = 0.0137 * f64::from((i * 37 + n) % 101 + 1);
                format!("[\"{price:.2}\",\"{size:.5}\"]")
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let mid = 64_250.0 + f64::from(n % 500);
    format!(
        "{{\"symbol\":\"BTCUSDT\",\"lastUpdateId\":{},\"bids\":[{}],\"asks\":[{}]}}",
        91_238_475_612_u64 + u64::from(n),
        side(mid - 0.05, -0.10),
        side(mid + 0.05, 0.10)
    )
}

/// A page of one-minute candles as JSON (60 of them, about 6 KB).
pub fn candles(n: u32) -> String {
    let rows: Vec<String> = (0..60u32)
        .map(|i| {
            let open = 64_000.0 + f64::from((n * 7 + i * 13) % 900) / 10.0;
            format!(
                "{{\"t\":{},\"o\":\"{:.1}\",\"h\":\"{:.1}\",\"l\":\"{:.1}\",\"c\":\"{:.1}\",\"v\":\"{:.4}\"}}",
                1_733_500_000_000_u64 + u64::from(i) * 60_000,
                open,
                open + 12.3,
                open - 8.7,
                open + 3.1,
                f64::from((i * 31 + n) % 97) * 1.37
            )
        })
        .collect();
    format!("[{}]", rows.join(","))
}

fn rule(prefix: &str, compress: Option<u64>) -> RuleConfig {
    RuleConfig {
        compress_min_size: compress.map(ByteSize),
        ..RuleConfig::caching(prefix, Duration::from_secs(60))
    }
}

/// Guards `cache::held` and the hit paths (`Outbox::put_held`, MGET's
/// stitching, RESP3): replies over the threshold are held compressed, hits
/// answer them byte for byte without Redis, and the saving shows in
/// `PROXY STATS`; replies under it, and rules without it, stay as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_replies_are_held_compressed_and_every_hit_answers_them_whole() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.cache.rules = vec![rule("book:", Some(512)), rule("plain:", None)];
    let proxy = TestProxy::start_with(cfg).await;
    let mut direct = redis.direct();
    let books: Vec<(String, String)> = (0..20)
        .map(|i| (format!("book:{i}"), order_book(i)))
        .collect();
    for (key, value) in &books {
        let () = redis::Commands::set(&mut direct, key, value).unwrap();
    }
    // Under the threshold: held as it is.
    let () = redis::Commands::set(&mut direct, "book:small", "42").unwrap();
    let () = redis::Commands::set(&mut direct, "plain:0", order_book(99)).unwrap();

    let mut resp2 = proxy.conn().await;
    let mut resp3 = proxy
        .client_resp3()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<&str> = books.iter().map(|(k, _)| k.as_str()).collect();
    let expected: Vec<&str> = books.iter().map(|(_, v)| v.as_str()).collect();
    redis.reset_stats();
    for round in 0..3 {
        for conn in [&mut resp2, &mut resp3] {
            for (key, value) in &books {
                let got: String = conn.get(key).await.unwrap();
                assert_eq!(&got, value, "GET {key}, round {round}");
            }
            let got: Vec<String> = conn.mget(&keys).await.unwrap();
            assert_eq!(got, expected, "MGET, round {round}");
            let small: String = conn.get("book:small").await.unwrap();
            assert_eq!(small, "42");
            let plain: String = conn.get("plain:0").await.unwrap();
            assert_eq!(plain, order_book(99));
        }
    }
    // Each GET and MGET was filled once per protocol; every later read hit.
    assert_eq!(redis.calls("get"), 2 * (20 + 2), "GETs reaching Redis");
    assert_eq!(redis.calls("mget"), 2, "MGETs reaching Redis");

    let stats = proxy_stats(&mut resp2).await;
    let saved = stats["rules.prefix:book:.compression_saved_bytes"];
    let held = stats["rules.prefix:book:.bytes"];
    let raw: usize = expected.iter().map(|v| v.len()).sum::<usize>() * 4;
    assert!(
        saved as usize > raw / 2,
        "saved {saved} of about {raw} bytes of order books (held {held})"
    );
    // lz4 halves these order books (entries' own overhead included).
    assert!(
        held * 10 < (held + saved) * 6,
        "held {held}, saved {saved}: over 60 %"
    );
    assert_eq!(stats["rules.prefix:plain:.compression_saved_bytes"], 0);
    let info: String = redis::cmd("INFO")
        .arg("nearcache")
        .query_async(&mut resp2)
        .await
        .unwrap();
    assert!(
        info.contains(&format!("nearcache_l1_compression_saved_bytes:{saved}\r\n")),
        "{info}"
    );

    // A write drops the compressed entry like any other.
    let () = resp2.set("book:0", "new").await.unwrap();
    let got: String = resp3.get("book:0").await.unwrap();
    assert_eq!(got, "new");
}

/// `store_compressed` rules: `book:` cached in L1, `raw:` not cached.
fn stored_rules() -> Vec<RuleConfig> {
    vec![
        RuleConfig {
            store_compressed: true,
            ..rule("book:", Some(256))
        },
        RuleConfig {
            store_compressed: true,
            cache: false,
            ..rule("raw:", Some(256))
        },
        rule("tick:", None),
    ]
}

/// What Redis itself holds for `key` (no decompression on this path).
fn in_redis(redis: &RedisServer, key: &str) -> Vec<u8> {
    redis::cmd("GET")
        .arg(key)
        .query(&mut redis.direct())
        .unwrap()
}

const MAGIC: &[u8] = b"\x00NZ\x01";

/// Guards `stored` and every path a stored value takes back: written with
/// each command of the SET family, it is compressed in Redis, and read
/// through nearcache — GET (an L1 miss and hit, and a rule that does not
/// cache), MGET, GETEX, GETDEL, GETSET, SET … GET, inside MULTI and under
/// WATCH, RESP2 and RESP3 — it is the value written. A value written
/// directly reads unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_stored_compressed_read_back_whole_through_every_read() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.cache.rules = stored_rules();
    let proxy = TestProxy::start_with(cfg).await;
    let mut c = proxy.conn().await;
    let mut c3 = proxy
        .client_resp3()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let book = |i: u32| order_book(i);

    let () = c.set("book:1", book(1)).await.unwrap();
    let () = c.set_ex("book:2", book(2), 60).await.unwrap();
    let () = redis::cmd("PSETEX")
        .arg("book:3")
        .arg(60_000)
        .arg(book(3))
        .query_async(&mut c)
        .await
        .unwrap();
    let set: bool = c.set_nx("book:4", book(4)).await.unwrap();
    assert!(set);
    let () = c
        .mset(&[("book:5", book(5)), ("tick:5", book(5)), ("raw:5", book(5))])
        .await
        .unwrap();
    let () = c.set("book:small", "7").await.unwrap();
    // In Redis: compressed, and under half the size; the rest as written.
    for key in ["book:1", "book:2", "book:3", "book:4", "book:5", "raw:5"] {
        let stored = in_redis(&redis, key);
        assert!(stored.starts_with(MAGIC), "{key} not stored compressed");
        assert!(stored.len() < book(1).len() / 2, "{key}: {}", stored.len());
    }
    assert_eq!(in_redis(&redis, "tick:5"), book(5).as_bytes());
    assert_eq!(in_redis(&redis, "book:small"), b"7");
    // Written directly, as before the rule was switched on: read unchanged.
    let () = redis::Commands::set(&mut redis.direct(), "book:old", book(9)).unwrap();

    for round in 0..2 {
        for conn in [&mut c, &mut c3] {
            for (key, i) in [("book:1", 1), ("book:2", 2), ("book:3", 3), ("book:4", 4)] {
                let got: String = conn.get(key).await.unwrap();
                assert_eq!(got, book(i), "GET {key}, round {round}");
            }
            let got: Vec<String> = conn
                .mget(&["book:5", "tick:5", "raw:5", "book:small", "book:old"])
                .await
                .unwrap();
            assert_eq!(got, [book(5), book(5), book(5), "7".into(), book(9)]);
            let got: String = conn.get("raw:5").await.unwrap();
            assert_eq!(got, book(5), "a rule that does not cache");
            let got: String = conn.get_ex("book:2", redis::Expiry::EX(120)).await.unwrap();
            assert_eq!(got, book(2), "GETEX");
        }
    }
    // MGET and GET of the same keys through L1, as hits: filled decoded.
    redis.reset_stats();
    let got: String = c.get("book:1").await.unwrap();
    assert_eq!(got, book(1));
    assert_eq!(redis.calls("get"), 0, "a hit");

    let old: String = c.getset("book:1", book(11)).await.unwrap();
    assert_eq!(old, book(1), "GETSET");
    let old: String = redis::cmd("SET")
        .arg("book:1")
        .arg(book(12))
        .arg("GET")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(old, book(11), "SET … GET");
    assert!(in_redis(&redis, "book:1").starts_with(MAGIC));
    let got: String = c.get_del("book:4").await.unwrap();
    assert_eq!(got, book(4), "GETDEL");

    // Inside MULTI (EXEC's reply) and under WATCH (a pinned connection).
    let (a, b, m): (String, String, Vec<String>) = redis::pipe()
        .atomic()
        .get("book:1")
        .set("book:6", book(6))
        .ignore()
        .get("book:6")
        .mget(&["book:2", "tick:5"])
        .query_async(&mut c3)
        .await
        .unwrap();
    assert_eq!((a, b, m), (book(12), book(6), vec![book(2), book(5)]));
    // Another rule's value that merely looks stored (a raw copy of one) is
    // read as it is, in MGET as in GET.
    let copied = in_redis(&redis, "book:2");
    let () = redis::Commands::set(&mut redis.direct(), "tick:copy", &copied).unwrap();
    let got: Vec<Vec<u8>> = c.mget(&["tick:copy", "book:2"]).await.unwrap();
    assert_eq!(got, [copied.clone(), book(2).into_bytes()]);
    let got: Vec<u8> = c.get("tick:copy").await.unwrap();
    assert_eq!(got, copied);
    let mut pinned = proxy
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("WATCH")
        .arg("book:3")
        .query_async(&mut pinned)
        .await
        .unwrap();
    let got: String = pinned.get("book:3").await.unwrap();
    assert_eq!(got, book(3), "GET under WATCH");
    let () = redis::cmd("UNWATCH")
        .query_async(&mut pinned)
        .await
        .unwrap();
}

/// Guards `stored::plan`'s refusals and the relay check: commands on a
/// stored value's raw bytes are refused naming the rule (and change
/// nothing); other rules' keys are untouched; a tracking client cannot read
/// a stored value it could not decompress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_byte_commands_on_values_stored_compressed_are_refused_naming_the_rule() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.cache.rules = stored_rules();
    let proxy = TestProxy::start_with(cfg).await;
    let mut c = crate::faults::Client::connect(proxy.port()).await;
    assert_eq!(
        c.cmd(&["SET", "book:1", &order_book(1)]).await,
        crate::faults::Reply::status("OK")
    );
    let before = in_redis(&redis, "book:1");
    for cmd in [
        &["APPEND", "book:1", "x"][..],
        &["STRLEN", "book:1"],
        &["GETRANGE", "book:1", "0", "10"],
        &["SETRANGE", "book:1", "0", "x"],
        &["INCR", "book:1"],
        &["GETBIT", "book:1", "3"],
        &["BITCOUNT", "book:1"],
        &["LCS", "tick:1", "book:1"],
        &["BITOP", "OR", "tick:d", "tick:1", "book:1"],
    ] {
        let reply = c.cmd(cmd).await;
        let e = reply
            .error()
            .unwrap_or_else(|| panic!("{cmd:?}: {reply:?}"));
        assert!(
            e.starts_with(&format!("ERR {} is refused on 'book:1'", cmd[0]))
                && e.contains("prefix \"book:\"")
                && e.contains("store_compressed"),
            "{cmd:?}: {e}"
        );
    }
    assert_eq!(in_redis(&redis, "book:1"), before, "nothing changed");
    let reply = c.cmd(&["COPY", "book:1", "tick:9"]).await;
    assert!(
        reply
            .error()
            .is_some_and(|e| e.starts_with("ERR COPY from 'book:1' to 'tick:9' is refused")),
        "{reply:?}"
    );
    assert_eq!(
        c.cmd(&["APPEND", "tick:1", "ab"]).await,
        crate::faults::Reply::Int(2)
    );
    assert_eq!(
        c.cmd(&["STRLEN", "tick:1"]).await,
        crate::faults::Reply::Int(2)
    );

    let mut tracking = crate::faults::Client::connect(proxy.port()).await;
    let _ = tracking.cmd(&["HELLO", "3"]).await;
    assert_eq!(
        tracking.cmd(&["CLIENT", "TRACKING", "on"]).await,
        crate::faults::Reply::status("OK")
    );
    let reply = tracking.cmd(&["GET", "book:1"]).await;
    assert!(
        reply
            .error()
            .is_some_and(|e| e.contains("store_compressed") && e.contains("tracking")),
        "{reply:?}"
    );
    assert_eq!(
        tracking.cmd(&["GET", "tick:1"]).await,
        crate::faults::Reply::bulk("ab")
    );
}

/// Redis's `used_memory` after writing `books` order books and `pages`
/// pages of candles through a nearcache with `rules`.
async fn redis_memory_for(rules: Vec<RuleConfig>, books: u32, pages: u32) -> (u64, u64) {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis);
    cfg.cache.rules = rules;
    let proxy = TestProxy::start_with(cfg).await;
    let mut c = proxy.conn().await;
    let used = |redis: &RedisServer| -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query(&mut redis.direct())
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let before = used(&redis);
    let mut raw = 0;
    for chunk in (0..books).collect::<Vec<_>>().chunks(100) {
        let pairs: Vec<(String, String)> = chunk
            .iter()
            .map(|&i| (format!("book:{i}"), order_book(i)))
            .collect();
        raw += pairs.iter().map(|(_, v)| v.len() as u64).sum::<u64>();
        let () = c.mset(&pairs).await.unwrap();
    }
    for i in 0..pages {
        let page = candles(i);
        raw += page.len() as u64;
        let () = c.set(format!("candles:{i}"), page).await.unwrap();
    }
    (used(&redis) - before, raw)
}

/// The memory `store_compressed` saves Redis on order books and candles as
/// JSON (benches/RESULTS.md has the figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_compressed_cuts_redis_memory_on_order_books_and_candles() {
    let compressed = |prefix: &str| RuleConfig {
        store_compressed: true,
        ..rule(prefix, Some(256))
    };
    let (books, pages) = (2000, 500);
    let (plain, raw) = redis_memory_for(vec![rule("", None)], books, pages).await;
    let (small, _) = redis_memory_for(
        vec![compressed("book:"), compressed("candles:")],
        books,
        pages,
    )
    .await;
    eprintln!(
        "Redis used_memory for {books} order books + {pages} candle pages ({raw} bytes of JSON): \
         {plain} bytes as written, {small} bytes with store_compressed ({:.0} % saved)",
        100.0 * (plain - small) as f64 / plain as f64
    );
    assert!(
        small * 10 < plain * 6,
        "store_compressed: {small} bytes, as written: {plain}"
    );
}
