//! L1's own tests: fills and their races with invalidations, variants,
//! expiry, memory.

#![allow(clippy::unwrap_used)]
use super::*;

/// An L1 and the counters of its one rule (`t:`).
struct Cache {
    l1: Arc<L1>,
    rule_stats: Arc<RuleStats>,
}

impl std::ops::Deref for Cache {
    type Target = L1;
    fn deref(&self) -> &L1 {
        &self.l1
    }
}

fn l1(max: u64) -> Cache {
    Cache {
        l1: L1::new(max),
        rule_stats: Arc::default(),
    }
}

/// The reply (copied) and refresh flag of a hit.
fn lookup(c: &L1, db: u32, key: &[u8], proto: Protocol, req: &[u8]) -> Option<(Vec<u8>, bool)> {
    let mut reply = Vec::new();
    let refresh = c.get(db, key, proto.into(), req, Now::current(), |r| {
        r.append_to(&mut reply)
    })?;
    Some((reply, refresh))
}

/// A lifetime of `ttl` with no stale-if-error window.
fn life(ttl: Duration, refresh_ahead: Option<f64>) -> Keep {
    Keep {
        ttl,
        stale_for: Duration::ZERO,
        refresh_ahead,
        compress_min_size: None,
    }
}

const REQ: &[u8] = b"*2\r\n$3\r\nGET\r\n$3\r\nt:a\r\n";

#[test]
fn a_fill_is_served_for_the_same_request_and_protocol_only() {
    let c = l1(1 << 20);
    let t = c.begin_fill(0, b"t:a");
    assert!(c.fill(
        t,
        0,
        b"t:a",
        &c.rule_stats,
        Protocol::Resp2.into(),
        REQ,
        b"$1\r\nx\r\n",
        life(Duration::from_secs(5), None),
    ));
    let (hit, refresh) = lookup(&c, 0, b"t:a", Protocol::Resp2, REQ).unwrap();
    assert_eq!(&hit[..], b"$1\r\nx\r\n");
    assert!(!refresh);
    assert_eq!(lookup(&c, 0, b"t:a", Protocol::Resp3, REQ), None);
    assert_eq!(lookup(&c, 1, b"t:a", Protocol::Resp2, REQ), None);
    assert_eq!(
        lookup(
            &c,
            0,
            b"t:a",
            Protocol::Resp2,
            b"*2\r\n$6\r\nSTRLEN\r\n$3\r\nt:a\r\n"
        ),
        None
    );
}

/// The race from DESIGN.md: a miss starts, the key is written and
/// invalidated, then the (old) reply arrives. It must not be cached.
#[test]
fn no_stale_fill_after_an_invalidation_during_the_miss() {
    let c = l1(1 << 20);
    let mut s = Vec::new();
    let t = c.begin_fill(0, b"t:a");
    c.invalidate(0, b"t:a", &mut s);
    assert!(!c.fill(
        t,
        0,
        b"t:a",
        &c.rule_stats,
        Protocol::Resp2.into(),
        REQ,
        b"$3\r\nold\r\n",
        life(Duration::from_secs(5), None),
    ));
    assert_eq!(lookup(&c, 0, b"t:a", Protocol::Resp2, REQ), None);
    assert_eq!(c.rule_stats.stale_fills_rejected.load(SeqCst), 1);
    // A flush moves every generation.
    let t = c.begin_fill(0, b"t:a");
    c.flush();
    assert!(!c.fill(
        t,
        0,
        b"t:a",
        &c.rule_stats,
        Protocol::Resp2.into(),
        REQ,
        b"$3\r\nold\r\n",
        life(Duration::from_secs(5), None),
    ));
}

/// The same race for an invalidation in every database (a script's key,
/// Redis's tracking message), with the miss the first ever in its
/// database: that invalidation must not skip the database as unused.
#[test]
fn no_stale_first_fill_in_a_database_after_an_invalidation_in_every_one() {
    let c = l1(1 << 20);
    let mut s = Vec::new();
    let t = c.begin_fill(5, b"t:a");
    Invalidation {
        keys: vec![(ANY_DB, Bytes::from_static(b"t:a"))],
        flush: false,
    }
    .apply(&c, &mut s);
    let fill = |t| {
        c.fill(
            t,
            5,
            b"t:a",
            &c.rule_stats,
            Protocol::Resp2.into(),
            REQ,
            b"$3\r\nold\r\n",
            life(Duration::from_secs(5), None),
        )
    };
    assert!(!fill(t), "a fill begun before the invalidation is stale");
    // A cached key in another database is dropped too.
    assert!(fill(c.begin_fill(5, b"t:a")));
    c.invalidate_any_db(b"t:a", &mut s);
    assert_eq!(lookup(&c, 5, b"t:a", Protocol::Resp2, REQ), None);
}

/// Another race: fill A began before an invalidation and is inserted
/// just after it, so A is about to remove itself (its re-check sees the
/// generation moved); meanwhile fill B, begun after the invalidation,
/// must not copy A's variant into its own entry, where it would outlive
/// A's clean-up. Here the generation moves without removing A's entry
/// (another key in the same stripe is invalidated), which is the state B
/// finds in that window.
#[test]
fn a_fill_never_carries_over_variants_from_an_older_generation() {
    let c = l1(1 << 20);
    let mut s = Vec::new();
    // (The hasher is seeded per process: search far enough that some
    // key always shares the stripe, ~4096 tries on average.)
    let stripe_mate = (0..1_000_000)
        .map(|i| format!("t:other{i}").into_bytes())
        .find(|k| stripe_of(c.index.hash(0, k)) == stripe_of(c.index.hash(0, b"t:a")))
        .expect("some key shares the stripe");
    let fill = |t: FillToken, proto: Protocol, reply: &[u8]| {
        c.fill(
            t,
            0,
            b"t:a",
            &c.rule_stats,
            proto.into(),
            REQ,
            reply,
            life(Duration::from_secs(5), None),
        )
    };
    assert!(fill(
        c.begin_fill(0, b"t:a"),
        Protocol::Resp2,
        b"$3\r\nold\r\n"
    ));
    c.invalidate(0, &stripe_mate, &mut s);
    assert!(fill(
        c.begin_fill(0, b"t:a"),
        Protocol::Resp3,
        b"$3\r\nnew\r\n"
    ));
    assert_eq!(lookup(&c, 0, b"t:a", Protocol::Resp2, REQ), None);
    assert!(lookup(&c, 0, b"t:a", Protocol::Resp3, REQ).is_some());
    // Without a generation change in between, variants are kept together.
    assert!(fill(
        c.begin_fill(0, b"t:a"),
        Protocol::Resp2,
        b"$3\r\nnew\r\n"
    ));
    assert!(lookup(&c, 0, b"t:a", Protocol::Resp3, REQ).is_some());
    assert!(lookup(&c, 0, b"t:a", Protocol::Resp2, REQ).is_some());
}

/// Fills racing invalidations from other threads: once an invalidation
/// has returned, no hit may serve a value from before it — not even a
/// stale fill that is about to be discarded. (The value a filler stores
/// is the version it read after taking its token, so a fill is stale
/// exactly when an invalidation came after its token.)
#[test]
fn concurrent_fills_never_serve_a_value_older_than_an_invalidation() {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    let c = l1(1 << 24);
    let version = AtomicU64::new(0);
    let invalidated = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                while !stop.load(SeqCst) {
                    let t = c.begin_fill(0, b"t:a");
                    let v = version.load(SeqCst).to_string();
                    c.fill(
                        t,
                        0,
                        b"t:a",
                        &c.rule_stats,
                        Protocol::Resp2.into(),
                        REQ,
                        v.as_bytes(),
                        life(Duration::from_secs(60), None),
                    );
                }
            });
        }
        scope.spawn(|| {
            while !stop.load(SeqCst) {
                let floor = invalidated.load(SeqCst);
                if let Some((v, _)) = lookup(&c, 0, b"t:a", Protocol::Resp2, REQ) {
                    let v: u64 = std::str::from_utf8(&v).unwrap().parse().unwrap();
                    assert!(v >= floor, "served version {v} after invalidation {floor}");
                }
            }
        });
        let mut s = Vec::new();
        for i in 1..=300_000 {
            version.store(i, SeqCst);
            c.invalidate(0, b"t:a", &mut s);
            invalidated.store(i, SeqCst);
        }
        stop.store(true, SeqCst);
    });
}

#[test]
fn invalidation_drops_every_variant_of_the_key() {
    let c = l1(1 << 20);
    let mut s = Vec::new();
    for proto in [Protocol::Resp2, Protocol::Resp3] {
        let t = c.begin_fill(0, b"t:a");
        assert!(c.fill(
            t,
            0,
            b"t:a",
            &c.rule_stats,
            proto.into(),
            REQ,
            b":1\r\n",
            life(Duration::from_secs(5), None),
        ));
    }
    assert!(lookup(&c, 0, b"t:a", Protocol::Resp2, REQ).is_some());
    assert!(lookup(&c, 0, b"t:a", Protocol::Resp3, REQ).is_some());
    c.invalidate(0, b"t:a", &mut s);
    assert!(lookup(&c, 0, b"t:a", Protocol::Resp2, REQ).is_none());
    assert!(lookup(&c, 0, b"t:a", Protocol::Resp3, REQ).is_none());
    assert_eq!(c.rule_stats.invalidations.load(SeqCst), 1);
}

#[test]
fn a_hit_past_the_refresh_point_asks_for_a_refresh() {
    let c = l1(1 << 20);
    let t = c.begin_fill(0, b"t:a");
    let ttl = Duration::from_secs(60);
    assert!(c.fill(
        t,
        0,
        b"t:a",
        &c.rule_stats,
        Protocol::Resp2.into(),
        REQ,
        b":1\r\n",
        life(ttl, Some(0.000_001))
    ));
    // 60 s × 1e-6 = 60 µs: due almost at once, long before expiry.
    std::thread::sleep(Duration::from_millis(1));
    assert_eq!(
        lookup(&c, 0, b"t:a", Protocol::Resp2, REQ).map(|(_, due)| due),
        Some(true)
    );
}

#[test]
fn expired_variants_are_not_served() {
    let c = l1(1 << 20);
    let t = c.begin_fill(0, b"t:a");
    assert!(c.fill(
        t,
        0,
        b"t:a",
        &c.rule_stats,
        Protocol::Resp2.into(),
        REQ,
        b":1\r\n",
        life(Duration::ZERO, None)
    ));
    assert_eq!(lookup(&c, 0, b"t:a", Protocol::Resp2, REQ), None);
}

#[test]
fn memory_stays_within_the_budget() {
    let budget = 256 * 1024;
    let c = l1(budget);
    let value = vec![b'x'; 1000];
    for i in 0..5000 {
        let key = format!("t:{i}");
        let t = c.begin_fill(0, key.as_bytes());
        c.fill(
            t,
            0,
            key.as_bytes(),
            &c.rule_stats,
            Protocol::Resp2.into(),
            REQ,
            &value,
            life(Duration::from_secs(60), None),
        );
    }
    let (entries, bytes) = c.usage();
    assert!(bytes <= budget, "{bytes} > {budget}");
    assert!(entries > 0 && entries < 5000);
    assert!(c.rule_stats.evictions.load(SeqCst) > 0);
    assert_eq!(c.rule_stats.bytes.load(SeqCst), bytes as i64);
    assert_eq!(c.rule_stats.entries.load(SeqCst), entries as i64);
}

#[test]
fn each_viewer_sees_only_its_own_replies() {
    let c = l1(1 << 20);
    let alice = Viewer {
        proto: Protocol::Resp2,
        user: 1,
    };
    let t = c.begin_fill(0, b"t:a");
    assert!(c.fill(
        t,
        0,
        b"t:a",
        &c.rule_stats,
        alice,
        REQ,
        b"$1\r\nx\r\n",
        life(Duration::from_secs(5), None),
    ));
    assert!(lookup(&c, 0, b"t:a", Protocol::Resp2, REQ).is_none());
    let mut hit = None;
    c.get(0, b"t:a", alice, REQ, Now::current(), |r| {
        hit = r.to_bytes();
        true
    });
    assert_eq!(hit.as_deref(), Some(&b"$1\r\nx\r\n"[..]));
}

#[test]
fn a_compressed_fill_is_served_whole_weighed_as_stored_and_its_saving_counted() {
    let c = l1(1 << 20);
    let json = br#"{"t":1733500000,"o":"64250.1","h":"64301.9","l":"64190.0","c":"64288.4"}"#;
    let value = json.repeat(30);
    let reply = [format!("${}\r\n", value.len()).as_bytes(), &value, b"\r\n"].concat();
    let fill = |key: &[u8], compress_min_size| {
        let t = c.begin_fill(0, key);
        assert!(c.fill(
            t,
            0,
            key,
            &c.rule_stats,
            Protocol::Resp2.into(),
            REQ,
            &reply,
            Keep {
                compress_min_size,
                ..life(Duration::from_secs(5), None)
            },
        ));
    };
    fill(b"t:a", Some(256));
    let saved = c.rule_stats.compression_saved.load(SeqCst);
    let held = c.rule_stats.bytes.load(SeqCst);
    assert!(
        saved > reply.len() as i64 / 2,
        "saved {saved} of {}",
        reply.len()
    );
    assert!(
        held < reply.len() as i64 - saved + 256,
        "weighed {held}: as stored"
    );
    let (hit, _) = lookup(&c, 0, b"t:a", Protocol::Resp2, REQ).unwrap();
    assert_eq!(hit, reply);
    // A stale read decompresses too.
    assert_eq!(
        c.get_stale(0, b"t:a", Protocol::Resp2.into(), REQ, Duration::ZERO)
            .as_deref(),
        Some(&reply[..])
    );

    // Below the threshold, or with none: held as it is.
    fill(b"t:b", Some(reply.len() + 1));
    fill(b"t:c", None);
    assert_eq!(c.rule_stats.compression_saved.load(SeqCst), saved);

    // The saving leaves with the entry.
    c.invalidate(0, b"t:a", &mut Vec::new());
    c.maintain();
    assert_eq!(c.rule_stats.compression_saved.load(SeqCst), 0);
    c.flush();
    c.maintain();
    assert_eq!(c.rule_stats.bytes.load(SeqCst), 0);
}
