//! The L1 hit path: the cost of answering a GET from memory, and of one
//! held compressed (`compress_min_size`).
//!
//! `cargo bench --bench cache`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use nearcache::cache::{Keep, L1, Now, Rules};
use nearcache::config::RuleConfig;
use nearcache::protocol::Protocol;
use nearcache::stats::{RuleStats, Stats};

fn rules() -> Rules {
    Rules::new(
        &[RuleConfig::caching("ticker:", Duration::from_secs(3600))],
        &Stats::default(),
    )
}

fn l1(keys: usize) -> std::sync::Arc<L1> {
    let cache = L1::new(256 << 20);
    let stats = std::sync::Arc::new(RuleStats::default());
    for i in 0..keys {
        let key = format!("ticker:{i}");
        let req = request(&key);
        let token = cache.begin_fill(0, key.as_bytes());
        let value = [b'x'; 64];
        let reply = [&b"$64\r\n"[..], &value, b"\r\n"].concat();
        cache.fill(
            token,
            0,
            key.as_bytes(),
            &stats,
            Protocol::Resp2.into(),
            &req,
            &reply,
            Keep {
                ttl: Duration::from_secs(3600),
                stale_for: Duration::ZERO,
                refresh_ahead: None,
                compress_min_size: None,
            },
        );
    }
    cache
}

fn request(key: &str) -> Vec<u8> {
    format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).into_bytes()
}

fn bench(c: &mut Criterion) {
    let cache = l1(10_000);
    let key = "ticker:4242";
    let req = request(key);
    let mut scratch = Vec::with_capacity(64);
    let mut out = Vec::with_capacity(1 << 16);
    c.bench_function("l1/hit_get_64b", |b| {
        b.iter(|| {
            out.clear();
            let hit = cache.get(
                0,
                black_box(key.as_bytes()),
                Protocol::Resp2.into(),
                black_box(&req),
                Now::current(),
                |reply| reply.append_to(&mut out),
            );
            black_box(hit)
        })
    });
    // The server's case: many hot keys, so each hit finds its entry cold in
    // the CPU cache. Keys visited in a scrambled order over all 10 000.
    let keys: Vec<(String, Vec<u8>)> = (0..10_000)
        .map(|i| (i * 7919) % 10_000)
        .map(|i| {
            let key = format!("ticker:{i}");
            let req = request(&key);
            (key, req)
        })
        .collect();
    let mut next = 0;
    c.bench_function("l1/hit_get_64b_10k_keys", |b| {
        b.iter(|| {
            let (key, req) = &keys[next];
            next = (next + 1) % keys.len();
            out.clear();
            let hit = cache.get(
                0,
                key.as_bytes(),
                Protocol::Resp2.into(),
                req,
                Now::current(),
                |reply| reply.append_to(&mut out),
            );
            black_box(hit)
        })
    });
    let absent = "ticker:absent";
    let absent_req = request(absent);
    c.bench_function("l1/miss_lookup", |b| {
        b.iter(|| {
            black_box(cache.get(
                0,
                black_box(absent.as_bytes()),
                Protocol::Resp2.into(),
                &absent_req,
                Now::current(),
                |_| true,
            ))
        })
    });
    // A peer's invalidation for a key this instance never cached: the
    // common case on the receiving side of the bus.
    let mut i = 0u64;
    c.bench_function("l1/invalidate_uncached_key", |b| {
        b.iter(|| {
            i += 1;
            let key = format!("ticker:other:{}", i % 100_000);
            cache.invalidate(0, key.as_bytes(), &mut scratch);
        })
    });
    let rules = rules();
    c.bench_function("l1/rule_for", |b| {
        b.iter(|| black_box(rules.caching(black_box(key.as_bytes()))))
    });
}

/// A 20-level order book as JSON, the kind of reply `compress_min_size` is
/// for (about 1.3 KB).
fn order_book() -> Vec<u8> {
    let side = |base: f64, step: f64| {
        (0..20)
            .map(|i| {
                let price = base + step * f64::from(i);
                let size = 0.013 * f64::from((i * 37) % 101 + 1);
                format!("[\"{price:.2}\",\"{size:.4}\"]")
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let json = format!(
        "{{\"symbol\":\"BTCUSDT\",\"lastUpdateId\":91238475612,\"bids\":[{}],\"asks\":[{}]}}",
        side(64_250.10, -0.10),
        side(64_250.20, 0.10)
    );
    [
        format!("${}\r\n", json.len()).as_bytes(),
        json.as_bytes(),
        b"\r\n",
    ]
    .concat()
}

/// A hit on an order book held as it is against one held compressed.
fn bench_compressed(c: &mut Criterion) {
    let cache = L1::new(256 << 20);
    let stats = std::sync::Arc::new(RuleStats::default());
    let reply = order_book();
    for (key, compress_min_size) in [("book:plain", None), ("book:lz4", Some(256))] {
        let token = cache.begin_fill(0, key.as_bytes());
        cache.fill(
            token,
            0,
            key.as_bytes(),
            &stats,
            Protocol::Resp2.into(),
            &request(key),
            &reply,
            Keep {
                ttl: Duration::from_secs(3600),
                stale_for: Duration::ZERO,
                refresh_ahead: None,
                compress_min_size,
            },
        );
    }
    let saved = stats
        .compression_saved
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(saved > 0, "the order book was not held compressed");
    #[allow(clippy::print_stderr)]
    let () = eprintln!(
        "order book: {} bytes, held compressed in {} ({:.0} % saved)",
        reply.len(),
        reply.len() as i64 - saved,
        100.0 * saved as f64 / reply.len() as f64
    );
    let mut out = Vec::with_capacity(1 << 16);
    for (name, key) in [
        ("l1/hit_orderbook_plain", "book:plain"),
        ("l1/hit_orderbook_lz4", "book:lz4"),
    ] {
        let req = request(key);
        c.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                let hit = cache.get(
                    0,
                    black_box(key.as_bytes()),
                    Protocol::Resp2.into(),
                    black_box(&req),
                    Now::current(),
                    |reply| reply.append_to(&mut out),
                );
                assert_eq!(out.len(), reply.len());
                black_box(hit)
            })
        });
    }
}

criterion_group!(benches, bench, bench_compressed);
criterion_main!(benches);
